"""Tests for transforms/readers.py on the real DICOM series in ../shared/data/dicom."""

from __future__ import annotations

import gzip
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.transforms import LoadImage, LoadImaged

from pipeline.errors import InputDataError
from tests.conftest import HIPPOCAMPUS, dicom_series
from transforms.readers import (
    MedicalImageReader,
    SeriesInfo,
    list_dicom_series,
    load_nifti,
    read_dicom_series,
    write_nifti_atomic,
)

SERIES = ["hippocrop_pgbm002", "hippocrop_pgbm006", "pgbm003_t1post", "pgbm003_tumor_mask", "chest_ct"]
# Independent LPS <-> RAS flip, written out here rather than imported from the module.
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def _load(path: Path | list[Path], **kwargs: object) -> object:
    paths = [str(p) for p in path] if isinstance(path, list) else str(path)
    return LoadImage(reader=MedicalImageReader(**kwargs), image_only=True)(paths)


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _headers_by_position(folder: Path) -> list[tuple[float, Path, pydicom.Dataset]]:
    rows = []
    for path in folder.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        rows.append((float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))), path, ds))
    rows.sort(key=lambda r: r[0])
    return rows


def _copy_series(name: str, dest: Path) -> Path:
    return Path(shutil.copytree(dicom_series(name), dest))


def _expect_error(call: object, *fragments: str) -> InputDataError:
    with pytest.raises(InputDataError) as info:
        call()  # type: ignore[operator]
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ct_ours() -> object:
    """Load the chest CT through LoadImage + MedicalImageReader (once per module)."""
    return _load(dicom_series("chest_ct"))


@pytest.fixture(scope="module")
def ct_sitk() -> sitk.Image:
    """Read the chest CT with SimpleITK alone (once per module)."""
    return _sitk_series(dicom_series("chest_ct"))


@pytest.fixture(scope="module")
def error_messages() -> list[str]:
    """Collect error messages raised by the bad-input tests, for the privacy test."""
    return []


# ---------------------------------------------------------------------- geometry


@pytest.mark.parametrize("name", SERIES)
def test_geometry_and_values_match_simpleitk(name: str, request: pytest.FixtureRequest) -> None:
    """Shape, spacing, origin, direction and voxels equal SimpleITK's own reading."""
    if name == "chest_ct":
        ours, ref = request.getfixturevalue("ct_ours"), request.getfixturevalue("ct_sitk")
    else:
        folder = dicom_series(name)
        ours, ref = _load(folder), _sitk_series(folder)
    assert tuple(ours.shape) == ref.GetSize()  # (i, j, k) = SimpleITK (x, y, z)
    affine_lps = FLIP @ ours.affine.numpy()
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    direction = affine_lps[:3, :3] / spacing
    np.testing.assert_allclose(spacing, ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(affine_lps[:3, 3], ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(direction, np.reshape(ref.GetDirection(), (3, 3)), atol=1e-4)
    np.testing.assert_allclose(ours.meta["original_affine"], ours.affine.numpy())
    assert tuple(ours.meta["spatial_shape"]) == ref.GetSize()
    assert ours.meta["original_channel_dim"] == "no_channel"
    assert ours.meta["filename_or_obj"] == str(dicom_series(name))
    expected = sitk.GetArrayViewFromImage(ref).transpose(2, 1, 0)
    assert np.array_equal(ours.numpy(), expected)


@pytest.mark.parametrize("name", SERIES)
def test_listing_and_order_agree_with_gdcm(name: str) -> None:
    """Our series listing and geometric slice order (pydicom) agree with GDCM's."""
    folder = dicom_series(name)
    reader = sitk.ImageSeriesReader()
    uids = reader.GetGDCMSeriesIDs(str(folder))
    infos = list_dicom_series(folder)
    assert [i.uid for i in infos] == list(uids)
    assert infos[0].num_files == len(list(folder.iterdir()))
    gdcm_order = [Path(p).name for p in reader.GetGDCMSeriesFileNames(str(folder), uids[0])]
    assert gdcm_order == [p.name for _, p, _ in _headers_by_position(folder)]


def test_oblique_mask_on_same_grid_as_image() -> None:
    """The oblique T1 and its tumour mask share a grid; mask voxels sit where SimpleITK puts them."""
    image = _load(dicom_series("pgbm003_t1post"))
    mask = _load(dicom_series("pgbm003_tumor_mask"))
    assert image.shape == mask.shape == (512, 512, 24)
    np.testing.assert_allclose(image.affine.numpy(), mask.affine.numpy(), atol=1e-4)
    direction = (FLIP @ image.affine.numpy())[:3, :3] / np.asarray([0.4297, 0.4297, 6.5])
    assert abs(direction[2, 1]) > 0.05, "t1post should be oblique"
    assert set(np.unique(mask.numpy())) == {0.0, 1.0}

    ref = _sitk_series(dicom_series("pgbm003_tumor_mask"))
    ref_array = sitk.GetArrayViewFromImage(ref)
    nonzero = np.argwhere(mask.numpy() > 0)
    assert len(nonzero) > 0
    for i, j, k in nonzero[np.linspace(0, len(nonzero) - 1, 6).astype(int)]:
        world_ras = mask.affine.numpy() @ np.array([i, j, k, 1.0])
        point_lps = ref.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
        np.testing.assert_allclose(world_ras[:3], FLIP[:3, :3] @ np.asarray(point_lps), atol=1e-3)
        assert ref_array[k, j, i] == 1


def test_ct_in_hounsfield_units(ct_ours: object) -> None:
    """CT comes out in HU: padding -3024, air inside the field of view near -1000, as pydicom says."""
    array = ct_ours.numpy()
    assert array.min() == -3024 and array.max() == 3071
    air = array[246:266, 20:40, 60:80]  # anterior, outside the body, inside the scan circle
    assert -1030 < air.mean() < -950
    assert ct_ours.meta["modality"] == "CT"
    rows = _headers_by_position(dicom_series("chest_ct"))
    for k in (0, 70, len(rows) - 1):
        ds = pydicom.dcmread(rows[k][1])
        hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)  # rows x columns = (j, i)
        assert np.array_equal(array[:, :, k], hu.T)


def test_shuffled_file_names_give_identical_volume(tmp_path: Path) -> None:
    """Permuting the file names changes nothing: slices are ordered by geometry."""
    source = dicom_series("pgbm003_t1post")
    files = sorted(source.iterdir())
    names = [f.name for f in files]
    random.Random(1234).shuffle(names)
    target = tmp_path / "shuffled"
    target.mkdir()
    for src, name in zip(files, names, strict=True):
        shutil.copyfile(src, target / name)
    assert names != [f.name for f in files]
    original, shuffled = _load(source), _load(target)
    assert np.array_equal(original.numpy(), shuffled.numpy())
    np.testing.assert_array_equal(original.affine.numpy(), shuffled.affine.numpy())


def test_load_imaged_meta_and_nifti(tmp_path: Path) -> None:
    """LoadImaged works with DICOM and NIfTI; NIfTI round-trips through write_nifti_atomic."""
    out = LoadImaged(keys=["image"], reader=MedicalImageReader(), image_only=False)(
        {"image": str(dicom_series("hippocrop_pgbm002"))}
    )
    meta = out["image_meta_dict"]
    for key in ("affine", "original_affine", "spatial_shape", "filename_or_obj"):
        assert key in meta
    assert meta["modality"] == "MR"

    labels = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 3).astype(np.int64)
    affine = np.array([[-0.5, 0, 0, 10], [0, 0.8, 0.1, -4], [0, 0, 2.0, 3], [0, 0, 0, 1]])
    target = write_nifti_atomic(labels, affine, tmp_path / "out" / "seg.nii.gz")
    write_nifti_atomic(labels, affine, target)  # overwriting is fine too
    assert sorted(p.name for p in target.parent.iterdir()) == ["seg.nii.gz"]  # no temp files left
    loaded = _load(target)
    assert np.array_equal(loaded.numpy(), labels)
    np.testing.assert_allclose(loaded.affine.numpy(), affine, atol=1e-6)
    assert nib.load(target).get_data_dtype() == np.int32
    assert np.array_equal(load_nifti(target).get_fdata(), labels)


def test_multichannel_needs_same_grid() -> None:
    """A list of paths stacks channels first; channels on different grids are refused."""
    a, b = dicom_series("hippocrop_pgbm002"), dicom_series("hippocrop_pgbm006")
    stacked = _load([a, a])
    assert tuple(stacked.shape) == (2, 35, 51, 32)
    _expect_error(lambda: _load([a, b]), str(b), "same voxel grid")


# ---------------------------------------------------------------------- bad inputs


def test_empty_folder(tmp_path: Path) -> None:
    """An empty folder has no DICOM series."""
    _expect_error(lambda: _load(tmp_path), str(tmp_path), "no DICOM series found")
    assert list_dicom_series(tmp_path) == []


def test_folder_without_dicom_files(tmp_path: Path) -> None:
    """Non-DICOM files are not a DICOM series."""
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    _expect_error(lambda: read_dicom_series(tmp_path), str(tmp_path), "no DICOM series found")


def test_missing_folder_and_file(tmp_path: Path) -> None:
    """Paths that do not exist are named as such."""
    _expect_error(lambda: read_dicom_series(tmp_path / "nope"), str(tmp_path / "nope"), "not found")
    _expect_error(lambda: _load(tmp_path / "nope.nii.gz"), str(tmp_path / "nope.nii.gz"), "not found")


def test_missing_slice(tmp_path: Path, error_messages: list[str]) -> None:
    """Deleting a middle slice is reported as a missing slice at its position."""
    folder = _copy_series("hippocrop_pgbm002", tmp_path / "series")
    rows = _headers_by_position(folder)
    _, path, ds = rows[len(rows) // 2]
    path.unlink()
    error = _expect_error(lambda: _load(folder), str(folder), "missing slice")
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    assert f"({x:.2f}, {y:.2f}, {z:.2f})" in str(error)
    error_messages.append(str(error))


def test_non_uniform_spacing(tmp_path: Path, error_messages: list[str]) -> None:
    """Spacing changing midway from 1 mm to 1.3 mm (no gap of 2x) is non-uniform spacing."""
    folder = _copy_series("hippocrop_pgbm002", tmp_path / "series")
    rows = _headers_by_position(folder)
    middle = rows[len(rows) // 2][0]
    for position, path, _ in rows[len(rows) // 2 + 1 :]:
        ds = pydicom.dcmread(path)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ipp[2] = middle + (position - middle) * 1.3  # axial series: normal is +z
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.save_as(path)
    error = _expect_error(lambda: read_dicom_series(folder), str(folder), "non-uniform slice spacing")
    assert "missing" not in str(error)
    error_messages.append(str(error))


def test_duplicate_slice(tmp_path: Path) -> None:
    """Two files at the same position are refused."""
    folder = _copy_series("hippocrop_pgbm002", tmp_path / "series")
    shutil.copyfile(folder / "5.dcm", folder / "5_copy.dcm")
    _expect_error(lambda: read_dicom_series(folder), str(folder), "duplicate slice position")


def test_truncated_dicom_file(tmp_path: Path, error_messages: list[str]) -> None:
    """A slice cut to half its bytes is named as truncated (SimpleITK alone skips it)."""
    folder = _copy_series("hippocrop_pgbm002", tmp_path / "series")
    victim = _headers_by_position(folder)[10][1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    error = _expect_error(lambda: _load(folder), str(victim), "truncated")
    error_messages.append(str(error))


def test_single_slice_series_refused(tmp_path: Path) -> None:
    """One 2D slice is not a 3D volume."""
    (tmp_path / "one").mkdir()
    shutil.copyfile(dicom_series("hippocrop_pgbm002") / "1.dcm", tmp_path / "one" / "1.dcm")
    _expect_error(lambda: read_dicom_series(tmp_path / "one"), str(tmp_path / "one"), "single slice")


def test_two_series_in_one_folder(tmp_path: Path, error_messages: list[str]) -> None:
    """Two series: the error lists both with slice counts; --series-uid selects one."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("hippocrop_pgbm002", "hippocrop_pgbm006"):
        for src in dicom_series(name).iterdir():
            shutil.copyfile(src, folder / f"{name}_{src.name}")
    infos = {i.num_files: i for i in list_dicom_series(folder)}
    assert sorted(infos) == [32, 35] and all(isinstance(i, SeriesInfo) for i in infos.values())
    error = _expect_error(
        lambda: _load(folder),
        str(folder),
        infos[32].uid,
        infos[35].uid,
        "32 slices",
        "35 slices",
        "HippoCrop",
        "MR",
        "--series-uid",
    )
    error_messages.append(str(error))
    chosen = _load(folder, series_uid=infos[35].uid)
    assert tuple(chosen.shape) == (36, 48, 35)
    assert read_dicom_series(folder, infos[32].uid).GetSize() == (35, 51, 32)
    error = _expect_error(lambda: read_dicom_series(folder, "1.2.3.4"), str(folder), "1.2.3.4", infos[32].uid)
    error_messages.append(str(error))


def test_error_is_not_swallowed_by_load_image(tmp_path: Path) -> None:
    """LoadImage falls back to other readers on read() errors: ours must still surface intact."""
    nan_file = tmp_path / "nan.nii.gz"
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), nan_file)
    with pytest.raises(InputDataError):
        LoadImaged(keys=["image"], reader=MedicalImageReader())({"image": str(nan_file)})


def _hippocampus_nifti() -> Path:
    files = sorted((HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))
    if not files:
        pytest.skip(f"shared NIfTI data not available under {HIPPOCAMPUS}")
    return files[0]


def test_truncated_nifti(tmp_path: Path) -> None:
    """A .nii.gz cut in half is reported, not leaked as a gzip traceback."""
    source = _hippocampus_nifti()
    target = tmp_path / "cut.nii.gz"
    raw = source.read_bytes()
    target.write_bytes(raw[: len(raw) // 2])
    assert len(gzip.decompress(raw)) > 0  # the original is fine
    _expect_error(lambda: _load(target), str(target), "truncated or corrupt")
    _expect_error(lambda: load_nifti(target), str(target), "truncated or corrupt")


def test_nan_in_nifti(tmp_path: Path) -> None:
    """NaN/Inf intensities are refused with a count."""
    data = np.ones((5, 6, 7), np.float32)
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = np.inf
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    _expect_error(lambda: _load(path), str(path), "non-finite", "1 NaN", "1 Inf")


def _break_nifti(source: Path, target: Path, how: str) -> Path:
    raw = source.read_bytes()
    if how == "truncated_gz":
        target.write_bytes(raw[: len(raw) // 2])
    elif how == "empty":
        target.write_bytes(b"")
    elif how == "garbage":
        target.write_bytes(random.Random(5).randbytes(len(raw)))
    elif how == "header_only":  # an uncompressed .nii holding its 348-byte header and no voxels
        image = nib.load(source)
        target = target.with_name(target.name.replace(".nii.gz", ".nii"))
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header), target)
        target.write_bytes(target.read_bytes()[:352])
    return target


@pytest.mark.parametrize("broken_channel", [0, 1])
@pytest.mark.parametrize("how", ["truncated_gz", "empty", "garbage", "header_only"])
def test_multichannel_nifti_with_broken_channel(tmp_path: Path, how: str, broken_channel: int) -> None:
    """One unreadable channel file among several is named in the error; no channel is silently dropped."""
    source = _hippocampus_nifti()
    good = tmp_path / "case_0000.nii.gz"
    shutil.copyfile(source, good)
    broken = _break_nifti(source, tmp_path / "case_0001.nii.gz", how)
    channels = [good, broken] if broken_channel == 1 else [broken, good]
    assert tuple(_load([good, good]).shape)[0] == 2  # the good file is fine as a channel
    error = _expect_error(lambda: _load(channels), str(broken))
    assert str(error).startswith(f"{broken}: ") and error.path == str(broken)
    assert "\n" not in str(error)
    with pytest.raises(InputDataError) as info:
        LoadImaged(keys=["image"], reader=MedicalImageReader())({"image": [str(p) for p in channels]})
    assert info.value.path == str(broken)


def test_4d_nifti(tmp_path: Path) -> None:
    """A 4D NIfTI where 3D is expected is refused; a trailing singleton is squeezed."""
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), np.eye(4)), path)
    _expect_error(lambda: _load(path), str(path), "is 4D (shape (4, 5, 6, 2)), expected a 3D image")
    single = tmp_path / "single.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 1), np.float32), np.eye(4)), single)
    assert tuple(_load(single).shape) == (4, 5, 6)


# ---------------------------------------------------------------------- privacy


@pytest.mark.parametrize("name", SERIES)
def test_no_patient_identifiers_leak(name: str, request: pytest.FixtureRequest) -> None:
    """PatientName/PatientID appear in no SeriesInfo, meta dict or error message."""
    folder = dicom_series(name)
    ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    secrets = {str(ds.PatientName), str(ds.PatientID)} - {""}
    assert secrets, "test data should carry (placeholder) patient identifiers"

    loaded = request.getfixturevalue("ct_ours") if name == "chest_ct" else _load(folder)
    texts = [repr(list_dicom_series(folder)), repr(dict(loaded.meta)), str(list(loaded.meta.values()))]
    texts += [str(v) for v in loaded.meta.values()]
    # Error messages: the ones collected by the bad-input tests plus a fresh one for this series.
    texts += request.getfixturevalue("error_messages")
    with pytest.raises(InputDataError) as info:
        read_dicom_series(folder, series_uid="9.9.9")
    texts.append(str(info.value))
    for secret in secrets:
        for text in texts:
            assert secret not in text, f"patient identifier leaked: {text[:200]!r}"
