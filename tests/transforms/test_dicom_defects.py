"""Broken files in a DICOM series folder: each is named in a one-line error, none is silently dropped.

Every file in a series folder must be a slice of a series, clearly not DICOM (no
``DICM`` marker, no ``.dcm``-like name), a well-formed non-image DICOM object (DICOMDIR,
report, SEG, ...), or the subject of an :class:`InputDataError` naming it. The defects
are made in copies of the real series ``hippocrop_pgbm002``; the slice order used to
pick the broken slice comes from an independent pydicom sort, not from the reader.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.transforms import LoadImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SegmentationStorage,
    generate_uid,
)

from pipeline.errors import InputDataError
from tests.conftest import dicom_series, run_main
from tests.data.test_io_pipeline import _slices_by_position, assert_no_files, assert_one_line_error, run_cli
from transforms.dicom import list_dicom_series, read_dicom_series, series_files
from transforms.readers import MedicalImageReader

SERIES = "hippocrop_pgbm002"
NUM_SLICES = 32


# ----------------------------------------------------------------------------- helpers


def _copy_series(dest: Path, name: str = SERIES) -> Path:
    """A writable copy of a shared series (the shared files are read-only)."""
    return Path(shutil.copytree(dicom_series(name), dest, copy_function=shutil.copyfile))


def _secrets(path: Path) -> set[str]:
    """Patient-identifying values of a real slice, which no message may contain."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    values = {str(ds.get(keyword, "") or "") for keyword in ("PatientName", "PatientID", "PatientBirthDate")}
    values -= {""}
    assert values, "the test data should carry (placeholder) patient identifiers"
    return values


def _meta_end(path: Path) -> int:
    """Offset of the first byte after the file meta information (preamble, DICM, group 0002)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    return 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)


def _pixel_offset(path: Path) -> int:
    """Offset of the PixelData element (its tag)."""
    with path.open("rb") as fp:
        pydicom.dcmread(fp, stop_before_pixels=True)
        return fp.tell()


def _edit(victim: Path, change: Callable[[pydicom.FileDataset], None]) -> Path:
    ds = pydicom.dcmread(victim)
    change(ds)
    ds.save_as(victim, enforce_file_format=False)
    return victim


def _set_sop_classes(ds: pydicom.FileDataset, uid: str) -> None:
    ds.SOPClassUID = uid
    ds.file_meta.MediaStorageSOPClassUID = uid


def _overwrite(victim: Path, data: bytes) -> Path:
    victim.write_bytes(data)
    return victim


def _random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _raw_data_set(victim: Path) -> Path:
    """The slice without its preamble and DICM marker, under a name without a DICOM ending."""
    target = victim.with_name("IM" + victim.stem)
    target.write_bytes(victim.read_bytes()[132:])
    victim.unlink()
    return target


def _broken_symlink(victim: Path) -> Path:
    victim.unlink()
    victim.symlink_to(victim.parent / "moved-away.dcm")
    return victim


def _fifo(victim: Path) -> Path:
    victim.unlink()
    os.mkfifo(victim)
    return victim


def _pixel_length_too_small(victim: Path) -> Path:
    """Explicit VR little endian OW PixelData: its 4-byte length sits 8 bytes after the tag."""
    raw = bytearray(victim.read_bytes())
    at = _pixel_offset(victim) + 8
    length = int.from_bytes(raw[at : at + 4], "little")
    raw[at : at + 4] = (length - 2).to_bytes(4, "little")
    return _overwrite(victim, bytes(raw[:-2]))


@dataclass(frozen=True)
class Defect:
    """One way a slice file can be broken, and what the error must say about it."""

    name: str
    make: Callable[[Path], Path]  # breaks the victim slice; returns the path the error must name
    says: str  # fragment of the expected message


DEFECTS = [
    # 1. preamble + DICM followed by random bytes
    Defect("magic_then_random", lambda v: _overwrite(v, v.read_bytes()[:132] + _random_bytes(0, 4000)),
           "is corrupt: no DICOM file meta information (group 0002) follows its 'DICM' marker"),
    # 2. preamble + DICM, nothing else
    Defect("magic_only", lambda v: _overwrite(v, v.read_bytes()[:132]), "is truncated: nothing follows its DICOM marker"),
    # 3. a valid file meta group followed by garbage
    Defect("meta_then_garbage", lambda v: _overwrite(v, v.read_bytes()[: _meta_end(v)] + _random_bytes(1, 4000)),
           "garbage where the DICOM header should be"),
    # 4. header cut in the middle of the data set, before the pixel data
    Defect("header_cut", lambda v: _overwrite(v, v.read_bytes()[: (_meta_end(v) + _pixel_offset(v)) // 2]),
           "is truncated: header data element"),
    # 5. pixel data cut
    Defect("pixels_cut", lambda v: _overwrite(v, v.read_bytes()[: _pixel_offset(v) + 12 + 100]),
           "is truncated: its pixel data needs 3570 bytes but the file holds only 100"),
    # 6. an empty .dcm file
    Defect("empty_dcm", lambda v: _overwrite(v, b""), "is empty (0 bytes) although its name says DICOM"),
    # 7. no SeriesInstanceUID
    Defect("no_series_uid", lambda v: _edit(v, lambda ds: ds.__delattr__("SeriesInstanceUID")),
           "is a DICOM image without a SeriesInstanceUID (0020,000E)"),
    # 8. SOP class deleted, garbage, inconsistent or not an image class
    Defect("no_sop_class",
           lambda v: _edit(v, lambda ds: (ds.__delattr__("SOPClassUID"), ds.file_meta.__delattr__("MediaStorageSOPClassUID"))),
           "lacks a SOP Class UID (neither SOPClassUID (0008,0016) nor MediaStorageSOPClassUID (0002,0002))"),
    Defect("no_sop_class_in_data_set", lambda v: _edit(v, lambda ds: ds.__delattr__("SOPClassUID")),
           "lacks SOPClassUID (0008,0016), which every DICOM image needs"),
    Defect("no_media_sop_class", lambda v: _edit(v, lambda ds: ds.file_meta.__delattr__("MediaStorageSOPClassUID")),
           "lacks MediaStorageSOPClassUID (0002,0002) in its file meta information"),
    Defect("garbage_sop_class", lambda v: _edit(v, lambda ds: setattr(ds, "SOPClassUID", "garbage")),
           "has an invalid SOPClassUID (0008,0016): the value is not a DICOM UID"),
    Defect("garbage_media_sop_class", lambda v: _edit(v, lambda ds: setattr(ds.file_meta, "MediaStorageSOPClassUID", "x.y")),
           "has an invalid MediaStorageSOPClassUID (0002,0002): the value is not a DICOM UID"),
    Defect("sop_classes_disagree", lambda v: _edit(v, lambda ds: setattr(ds, "SOPClassUID", CTImageStorage)),
           "its SOPClassUID (0008,0016) differs from the MediaStorageSOPClassUID (0002,0002)"),
    Defect("non_image_sop_class", lambda v: _edit(v, lambda ds: _set_sop_classes(ds, BasicTextSRStorage)),
           "its SOP class (Basic Text SR Storage) is not an image storage class"),
    Defect("sop_class_not_a_sop_class", lambda v: _edit(v, lambda ds: _set_sop_classes(ds, ExplicitVRLittleEndian)),
           "has a SOP Class UID that is not a SOP class but a Transfer Syntax"),
    # 9. pixel data element removed
    Defect("no_pixel_data", lambda v: _edit(v, lambda ds: ds.__delattr__("PixelData")),
           "has no pixel data: no PixelData element (7FE0,0010) follows its header"),
    # 10. other ways found to lose a slice silently
    Defect("garbage_series_uid", lambda v: _edit(v, lambda ds: setattr(ds, "SeriesInstanceUID", "not-a-uid")),
           "has an invalid SeriesInstanceUID (0020,000E)"),
    Defect("pixel_length_too_small", _pixel_length_too_small,
           "is corrupt: its PixelData element declares 3568 bytes but 35x51 pixels need 3570 bytes"),
    Defect("text_named_dcm", lambda v: _overwrite(v, b"exported by a tool that failed\n" * 10),
           "is truncated or not a DICOM file: no DICOM header ('DICM' marker at byte 128) found (310 bytes)"),
    Defect("raw_data_set_without_file_header", _raw_data_set, "is a DICOM data set without the DICOM file header"),
    Defect("broken_symlink", _broken_symlink, "is a broken symbolic link"),
    Defect("fifo", _fifo, "is not a regular file"),
]


def _load(folder: Path) -> object:
    return LoadImage(reader=MedicalImageReader(), image_only=True)(str(folder))


def _expect_named(call: Callable[[], object], broken: Path, says: str, secrets: set[str]) -> str:
    with pytest.raises(InputDataError) as info:
        call()
    message = str(info.value)
    assert info.value.path == str(broken), message
    assert message.startswith(f"{broken}: "), message
    assert says in message, f"{says!r} not in {message!r}"
    assert "\n" not in message
    for secret in secrets:
        assert secret not in message, f"patient identifier leaked: {message!r}"
    return message


# ----------------------------------------------------------------------------- reader level


@pytest.mark.parametrize("where", ["first", "middle"])
@pytest.mark.parametrize("defect", DEFECTS, ids=lambda d: d.name)
def test_broken_slice_is_named(defect: Defect, where: str, tmp_path: Path) -> None:
    """A broken first slice (where a lost slice leaves no gap) or middle slice is named, by every entry point."""
    folder = _copy_series(tmp_path / "series")
    slices = _slices_by_position(folder)
    assert len(slices) == NUM_SLICES
    victim = slices[0] if where == "first" else slices[len(slices) // 2]
    secrets = _secrets(victim)
    broken = defect.make(victim)
    _expect_named(lambda: read_dicom_series(folder), broken, defect.says, secrets)
    _expect_named(lambda: series_files(folder), broken, defect.says, secrets)
    _expect_named(lambda: _load(folder), broken, defect.says, secrets)


def test_unreadable_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that cannot be opened (permissions) is an error even without a DICOM name, not a stray file."""
    folder = _copy_series(tmp_path / "series")
    victim = _slices_by_position(folder)[0]
    hidden = victim.rename(victim.with_name("IM" + victim.stem))
    real_open = Path.open

    def refusing_open(self: Path, *args: object, **kwargs: object) -> object:
        if self == hidden:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)
    _expect_named(lambda: read_dicom_series(folder), hidden, "cannot be read (Permission denied)", _secrets(folder / "5.dcm"))


def _basic_text_sr(path: Path, series_uid: str | None = None) -> Path:
    """A minimal, well-formed Basic Text SR object saved as a DICOM file."""
    ds = Dataset()
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = "No finding."
    ds.ContentSequence = [item]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def _dicomdir(source_slice: Path, workspace: Path) -> Path:
    """A real DICOMDIR (pydicom FileSet) indexing one slice; only the DICOMDIR file is used."""
    instance = pydicom.dcmread(source_slice)
    instance.SeriesNumber = instance.get("SeriesNumber") or 1  # the SERIES record requires it
    fileset = FileSet()
    fileset.add(instance)
    fileset.write(workspace)
    return workspace / "DICOMDIR"


def test_stray_and_non_image_files_are_ignored(tmp_path: Path) -> None:
    """Non-DICOM files and well-formed non-image DICOM objects are ignored; the volume keeps all its slices."""
    original = dicom_series(SERIES)
    folder = _copy_series(tmp_path / "series")
    image_series = pydicom.dcmread(folder / "1.dcm", stop_before_pixels=True).SeriesInstanceUID
    (folder / "readme.txt").write_text("HippoCrop export\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + _random_bytes(2, 2000))
    (folder / "Thumbs.db").write_bytes(_random_bytes(3, 500))
    _basic_text_sr(folder / "report.dcm")
    _basic_text_sr(folder / "SR0001", series_uid=image_series)  # no image rows: a note filed in the series
    shutil.copyfile(_dicomdir(original / "1.dcm", tmp_path / "fileset"), folder / "DICOMDIR")
    seg_like = pydicom.dcmread(original / "2.dcm")  # a non-image object with pixels, in its own series
    _set_sop_classes(seg_like, SegmentationStorage)
    seg_like.SeriesInstanceUID = generate_uid()
    seg_like.save_as(folder / "seg.dcm", enforce_file_format=False)

    infos = list_dicom_series(folder)
    assert [(i.uid, i.num_files) for i in infos] == [(image_series, NUM_SLICES)]
    ours, reference = read_dicom_series(folder), read_dicom_series(original)
    assert ours.GetSize() == reference.GetSize() == (35, 51, NUM_SLICES)
    assert np.array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(reference))
    assert [p.name for p in series_files(folder)] == [p.name for p in _slices_by_position(original)]
    assert tuple(_load(folder).shape) == (35, 51, NUM_SLICES)


# ----------------------------------------------------------------------------- series_files


@pytest.mark.parametrize("name", ["hippocrop_pgbm002", "pgbm003_t1post", "chest_ct"])
def test_series_files_follow_volume_slice_order(name: str) -> None:
    """File k of series_files is slice k of the volume: same order as an independent pydicom sort, same pixels."""
    folder = dicom_series(name)
    files = series_files(folder)
    assert files == _slices_by_position(folder)
    volume = sitk.GetArrayFromImage(read_dicom_series(folder))  # (k, j, i), a copy
    assert volume.shape[0] == len(files)
    for k in (0, len(files) // 3, len(files) - 1):
        ds = pydicom.dcmread(files[k])
        expected = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)  # rows x columns = (j, i)
        assert np.array_equal(volume[k], expected)


def test_series_files_shuffled_names_and_series_choice(tmp_path: Path) -> None:
    """Order comes from geometry, not names; series_uid picks one series of a mixed folder."""
    source = dicom_series(SERIES)
    files = sorted(source.iterdir())
    names = [f.name for f in files]
    random.Random(7).shuffle(names)
    folder = tmp_path / "mixed"
    folder.mkdir()
    renamed = {}
    for src, name in zip(files, names, strict=True):
        shutil.copyfile(src, folder / f"a_{name}")
        renamed[src.name] = f"a_{name}"
    for src in dicom_series("hippocrop_pgbm006").iterdir():
        shutil.copyfile(src, folder / f"b_{src.name}")
    uid = pydicom.dcmread(source / "1.dcm", stop_before_pixels=True).SeriesInstanceUID
    with pytest.raises(InputDataError, match="--series-uid"):
        series_files(folder)
    chosen = series_files(folder, series_uid=uid)
    assert [p.name for p in chosen] == [renamed[p.name] for p in _slices_by_position(source)]
    with pytest.raises(InputDataError, match="folder not found"):
        series_files(tmp_path / "nope")


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda d: d.name)
def test_cli_predict_names_broken_slice(defect: Defect, tmp_path: Path, tiny_checkpoint: Path) -> None:
    """``predict`` on a series with a broken first slice: exit 2, one ``error:`` line naming the file, no output.

    In process (the CLI's ``main``), so that every way costs no interpreter start; a bug would raise here
    instead of printing a traceback. The console entry point itself is run by the test below.
    """
    folder = _copy_series(tmp_path / "series")
    victim = _slices_by_position(folder)[0]
    secrets = _secrets(victim)
    broken = defect.make(victim)
    out = tmp_path / "out"
    res = run_main("predict", "--model", str(tiny_checkpoint), str(folder), "--out", str(out),
                   "--work-dir", str(tmp_path / "w"))
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    assert errors[0].startswith(f"error: {broken}: ") and defect.says in errors[0], errors[0]
    assert_no_files(out)
    for secret in secrets:
        assert secret not in res.stderr + res.stdout, "patient identifier leaked"


def test_console_entry_point_names_broken_slice(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """The same through ``python -m pipeline`` in a fresh interpreter: no traceback, one line, exit 2."""
    defect = DEFECTS[0]
    folder = _copy_series(tmp_path / "series")
    victim = _slices_by_position(folder)[0]
    broken = defect.make(victim)
    out = tmp_path / "out"
    res = run_cli("predict", "--model", str(tiny_checkpoint), str(folder), "--out", str(out),
                  "--work-dir", str(tmp_path / "w"))
    assert res.returncode == 2, res.stderr
    line = assert_one_line_error(res, str(broken), defect.says)
    assert line.startswith(f"error: {broken}: "), line
    assert_no_files(out)
