"""The PACS layer against a real Orthanc (DICOMweb plugin), with the real shared DICOM series: no mocks."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pipeline.errors import (
    EXIT_PACS_AUTH,
    EXIT_PACS_REJECTED,
    EXIT_PACS_UNAVAILABLE,
    EXIT_PARTIAL_FAILURE,
    ConfigError,
    InputDataError,
    PacsAuthError,
    PacsRejectedError,
    PacsUnavailableError,
    PartialFailureError,
)
from pipeline.pacs import (
    PacsClient,
    SeriesRules,
    SeriesSummary,
    WatchLedger,
    model_tag,
    run_watch_pass,
    select_series,
)
from tests.conftest import dicom_series
from tests.mlflow_server import free_port
from tests.orthanc import RAISE_ON_SEG, OrthancServer

pytest_plugins = ["tests.orthanc"]  # the fixtures orthanc and orthanc_factory

HIPPO, T1POST = "hippocrop_pgbm002", "pgbm003_t1post"
ENV_NAMES = ("DICOMWEB_USER", "DICOMWEB_PASSWORD", "DICOMWEB_TOKEN", "DICOMWEB_CA_BUNDLE")
TAG = model_tag("hippo-unet", 3)


def _files(name: str) -> list[Path]:
    return sorted(dicom_series(name).glob("*.dcm"))


def _header(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(_files(name)[0], stop_before_pixels=True)


def _identifying_values(*names: str) -> set[str]:
    """The patient-identifying header values of the source series, and the parts of the names."""
    values: set[str] = set()
    for name in names:
        for path in _files(name):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs"):
                value = str(ds.get(keyword, "") or "").strip()
                values.update(v for v in [value, *value.split("^")] if len(v) >= 4)
    return values


def _use(monkeypatch: pytest.MonkeyPatch, server: OrthancServer, password: str | None = None) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DICOMWEB_USER", server.user)
    monkeypatch.setenv("DICOMWEB_PASSWORD", password or server.password)


@pytest.fixture(scope="module")
def loaded(orthanc: OrthancServer) -> OrthancServer:
    """The module's Orthanc holding the two real series, stored through ``PacsClient.store``."""
    with pytest.MonkeyPatch.context() as mp:
        _use(mp, orthanc)
        client = PacsClient(orthanc.url)
        for name in (HIPPO, T1POST):
            stored = client.store([pydicom.dcmread(path) for path in _files(name)])
            assert len(stored) == len(_files(name))
    return orthanc


@pytest.fixture
def client(loaded: OrthancServer, monkeypatch: pytest.MonkeyPatch) -> PacsClient:
    _use(monkeypatch, loaded)
    return PacsClient(loaded.url)


def _seg(name: str, description: str = TAG) -> pydicom.Dataset:
    """A real DICOM SEG (highdicom, BINARY, one segment) of the first four slices of a shared series."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(path) for path in _files(name)[:4]]
    for ds in sources:
        # hippocrop lacks these Type 2 attributes, which highdicom copies into the SEG.
        for keyword in ("PatientBirthDate", "PatientSex"):
            if keyword not in ds:
                setattr(ds, keyword, "")
    mask = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), np.uint8)
    mask[:, 5:12, 5:12] = 1
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="hippocampus", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="hippo-unet", family=codes.cid7162.ArtificialIntelligence, version="3"),
    )
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="unet-pipeline", manufacturer_model_name="hippo-unet", software_versions="3",
        device_serial_number="0", series_description=description,
    )


# --- listing, retrieval, storage -----------------------------------------------------------------------------------


def test_list_series_shows_the_stored_series_with_counts_and_modality(client: PacsClient) -> None:
    for name, count, description in ((HIPPO, 32, "HippoCrop"), (T1POST, 24, "T1post")):
        header = _header(name)
        assert header.StudyInstanceUID in client.find_studies()
        series = {s.uid: s for s in client.list_series(header.StudyInstanceUID)}
        assert series[header.SeriesInstanceUID] == SeriesSummary(header.SeriesInstanceUID, "MR", description, count)


def test_find_studies_since_filters_on_study_date(client: PacsClient) -> None:
    hippo, t1 = _header(HIPPO), _header(T1POST)  # StudyDate 2020-01-19 and 1995-10-17
    since_2000 = client.find_studies(date(2000, 1, 1))
    assert hippo.StudyInstanceUID in since_2000 and t1.StudyInstanceUID not in since_2000
    assert client.find_studies(date(2030, 1, 1)) == []


def test_retrieve_series_writes_exactly_the_instances_with_equal_pixel_data(client: PacsClient, tmp_path: Path) -> None:
    for name in (HIPPO, T1POST):
        header = _header(name)
        folder = tmp_path / name
        paths = client.retrieve_series(header.StudyInstanceUID, header.SeriesInstanceUID, folder)
        assert [p.name for p in paths] == [f"{i:05d}.dcm" for i in range(len(_files(name)))]
        assert sorted(p.name for p in folder.iterdir()) == [p.name for p in paths]  # no temporary file left
        source = {str(ds.SOPInstanceUID): ds.PixelData for ds in map(pydicom.dcmread, _files(name))}
        retrieved = {str(ds.SOPInstanceUID): ds.PixelData for ds in map(pydicom.dcmread, paths)}
        assert retrieved.keys() == source.keys()
        assert all(retrieved[uid] == source[uid] for uid in source)
    # A second download into the same folder replaces the first, never mixes with it.
    header = _header(T1POST)
    assert len(client.retrieve_series(header.StudyInstanceUID, header.SeriesInstanceUID, tmp_path / HIPPO)) == 24
    assert len(list((tmp_path / HIPPO).iterdir())) == 24


def test_store_a_real_seg_then_find_it_as_this_models_seg(client: PacsClient) -> None:
    seg = _seg(HIPPO)
    study = str(seg.StudyInstanceUID)
    assert client.seg_from_model(study, TAG) is None
    assert client.store([seg], study_uid=study) == [seg.SOPInstanceUID]
    assert client.find_instance(study, seg.SOPInstanceUID)
    assert not client.find_instance(study, generate_uid())
    found = [s for s in client.seg_series_for(study) if s.sop_instance_uid == seg.SOPInstanceUID]
    assert len(found) == 1 and found[0].series_description == TAG and found[0].series_uid == seg.SeriesInstanceUID
    assert client.seg_from_model(study, TAG) == seg.SOPInstanceUID
    assert client.seg_from_model(study, model_tag("hippo-unet", 4)) is None
    # The series rules never pick the SEG as the image series to segment.
    series = client.list_series(study)
    assert select_series(series, SeriesRules(modality="MR")).uid == _header(HIPPO).SeriesInstanceUID


# --- series selection ------------------------------------------------------------------------------------------


def test_select_series_by_rules_and_by_uid(client: PacsClient) -> None:
    hippo, t1 = _header(HIPPO), _header(T1POST)
    series = [s for s in client.list_series(hippo.StudyInstanceUID) if s.modality == "MR"]
    series += client.list_series(t1.StudyInstanceUID)
    assert select_series(series, SeriesRules(modality="mr", description_pattern="T1")).uid == t1.SeriesInstanceUID
    assert select_series(series, SeriesRules(min_slices=30)).uid == hippo.SeriesInstanceUID
    assert select_series(series, SeriesRules(description_pattern="^hippo")).uid == hippo.SeriesInstanceUID
    # An explicit UID wins over the rules.
    assert select_series(series, SeriesRules(modality="CT"), series_uid=t1.SeriesInstanceUID).uid == t1.SeriesInstanceUID


def test_select_series_errors_list_the_series_found(client: PacsClient) -> None:
    hippo, t1 = _header(HIPPO), _header(T1POST)
    series = [s for s in client.list_series(hippo.StudyInstanceUID) if s.modality == "MR"]
    series += client.list_series(t1.StudyInstanceUID)
    listed_hippo = f'{hippo.SeriesInstanceUID} (MR, "HippoCrop", 32 instances)'
    listed_t1 = f'{t1.SeriesInstanceUID} (MR, "T1post", 24 instances)'
    with pytest.raises(InputDataError) as none:
        select_series(series, SeriesRules(modality="CT"), study_uid="1.2.3")
    with pytest.raises(InputDataError) as several:
        select_series(series, SeriesRules(modality="MR"))
    with pytest.raises(InputDataError) as unknown:
        select_series(series, SeriesRules(), series_uid="1.2.3.4")
    for error in (none, several, unknown):
        message = str(error.value)
        assert "\n" not in message and listed_hippo in message and listed_t1 in message
        assert error.value.exit_code == 2
    assert "study 1.2.3" in str(none.value) and "modality CT" in str(none.value)
    assert "2 series" in str(several.value) and "1.2.3.4" in str(unknown.value)
    with pytest.raises(ConfigError):
        SeriesRules(description_pattern="(")


# --- failures: auth, down, rejected -----------------------------------------------------------------------------


def test_wrong_password_is_an_auth_error_naming_the_url(loaded: OrthancServer, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "wrong-" + loaded.password
    _use(monkeypatch, loaded, password=wrong)
    client = PacsClient(loaded.url)
    for call in (client.ping, lambda: client.list_series(_header(HIPPO).StudyInstanceUID)):
        with pytest.raises(PacsAuthError) as error:
            call()
        message = str(error.value)
        assert error.value.exit_code == EXIT_PACS_AUTH == 8
        assert loaded.url in message and "HTTP 401" in message and "\n" not in message
        assert wrong not in message and loaded.password not in message
    # No credentials at all, and a bearer token that this server does not know, are refused the same way.
    monkeypatch.delenv("DICOMWEB_USER")
    monkeypatch.delenv("DICOMWEB_PASSWORD")
    with pytest.raises(PacsAuthError):
        PacsClient(loaded.url).ping()
    monkeypatch.setenv("DICOMWEB_TOKEN", "t0ken-" + loaded.password)
    token_client = PacsClient(loaded.url)
    assert token_client._client._session.headers["Authorization"] == "Bearer t0ken-" + loaded.password
    with pytest.raises(PacsAuthError) as error:
        token_client.ping()
    assert loaded.password not in str(error.value)


def test_orthanc_down_or_closed_port_is_unavailable(orthanc_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    server = orthanc_factory()
    _use(monkeypatch, server)
    client = PacsClient(server.url, timeout_s=5)
    client.ping()
    with pytest.raises(PacsUnavailableError, match="TLS handshake failed while checking the PACS"):
        PacsClient(server.url.replace("http://", "https://"), timeout_s=5).ping()
    server.stop()
    for call in (client.ping, client.find_studies, lambda: client.store([_seg(HIPPO)])):
        with pytest.raises(PacsUnavailableError) as error:
            call()
        assert error.value.exit_code == EXIT_PACS_UNAVAILABLE == 7
        assert str(error.value).startswith(f"{server.url}: connection refused while ")
        assert server.password not in str(error.value)
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(PacsUnavailableError, match="connection refused while checking the PACS"):
        PacsClient(closed, timeout_s=5).ping()


def test_http_error_other_than_auth_is_unavailable_with_status(loaded: OrthancServer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, loaded)
    with pytest.raises(PacsUnavailableError, match=r"/not-dicom-web: HTTP 404 while checking the PACS$"):
        PacsClient(f"{loaded.http_root}/not-dicom-web").ping()


def test_read_only_pacs_rejects_the_seg(orthanc_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Orthanc 1.10 answers 200 and lists the instance as stored: only the query afterwards shows the refusal.
    server = orthanc_factory(read_only=True)
    _use(monkeypatch, server)
    seg = _seg(HIPPO)
    with pytest.raises(PacsRejectedError) as error:
        PacsClient(server.url, confirm_timeout_s=1).store([seg], study_uid=seg.StudyInstanceUID)
    assert error.value.exit_code == EXIT_PACS_REJECTED == 9
    assert str(error.value).startswith(f"{server.url}: the PACS accepted the STOW-RS request but 1 of 1 instance")
    assert seg.SOPInstanceUID in str(error.value)


def test_filter_raising_on_seg_is_a_rejection(orthanc_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Images are stored, the SEG is left out of the STOW-RS answer.
    server = orthanc_factory(lua_filter=RAISE_ON_SEG)
    _use(monkeypatch, server)
    client = PacsClient(server.url, confirm_timeout_s=1)
    client.store([pydicom.dcmread(path) for path in _files(HIPPO)[:4]])
    with pytest.raises(PacsRejectedError, match="did not store 1 of 1 instance .not in its STOW-RS answer."):
        client.store([_seg(HIPPO)])


def test_stow_failure_answer_is_a_rejection(client: PacsClient) -> None:
    # Posted to another study's URL: Orthanc answers 409 with a FailedSOPSequence.
    seg = _seg(HIPPO)
    with pytest.raises(PacsRejectedError) as error:
        client.store([seg], study_uid=generate_uid())
    assert f"(HTTP 409): failed {seg.SOPInstanceUID} (reason 0x0110)" in str(error.value)
    assert not client.find_instance(str(seg.StudyInstanceUID), str(seg.SOPInstanceUID))


# --- configuration and secrets -----------------------------------------------------------------------------------


def test_credentials_only_from_the_environment_and_tls_verified(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    for name in (*ENV_NAMES, "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as error:
        PacsClient("https://unet:s3cret@pacs.example.org/dicom-web")
    assert "s3cret" not in str(error.value) and "https://pacs.example.org/dicom-web" in str(error.value)
    client = PacsClient("https://pacs.example.org/dicom-web/")
    assert client.url == "https://pacs.example.org/dicom-web" and client._client._session.verify is True
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "system.pem"))
    assert PacsClient("https://pacs.example.org/dicom-web")._client._session.verify == str(tmp_path / "system.pem")
    monkeypatch.setenv("DICOMWEB_USER", "unet")
    with pytest.raises(ConfigError, match="must be set together"):
        PacsClient("https://pacs.example.org/dicom-web")
    monkeypatch.setenv("DICOMWEB_PASSWORD", "s3cret")
    monkeypatch.setenv("DICOMWEB_TOKEN", "abc")
    with pytest.raises(ConfigError, match="keep one"):
        PacsClient("https://pacs.example.org/dicom-web")
    monkeypatch.delenv("DICOMWEB_TOKEN")
    monkeypatch.setenv("DICOMWEB_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(InputDataError, match="DICOMWEB_CA_BUNDLE"):
        PacsClient("https://pacs.example.org/dicom-web")
    (tmp_path / "ca.pem").write_text("")
    monkeypatch.setenv("DICOMWEB_CA_BUNDLE", str(tmp_path / "ca.pem"))
    assert PacsClient("https://pacs.example.org/dicom-web")._client._session.verify == str(tmp_path / "ca.pem")


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_https_certificate_is_verified_and_a_ca_bundle_trusts_it(orthanc_factory,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import certifi

    server = orthanc_factory(https=True)
    _use(monkeypatch, server)
    # requests lets this variable override a session's own verify setting: ours must win over it.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    assert server.url.startswith("https://")
    with pytest.raises(PacsUnavailableError, match="TLS certificate not trusted while checking the PACS; .*CA_BUNDLE"):
        PacsClient(server.url).ping()
    PacsClient(server.url, verify_tls=False).ping()
    monkeypatch.setenv("DICOMWEB_CA_BUNDLE", str(server.ca_bundle))
    client = PacsClient(server.url)
    client.ping()
    seg = _seg(HIPPO)
    assert client.store([seg]) == [seg.SOPInstanceUID]


def test_no_credential_or_patient_value_in_logs_or_messages(loaded: OrthancServer, orthanc_factory,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    token = "tok-" + loaded.password
    secrets = {loaded.password, "wrong-" + loaded.password, token} | _identifying_values(HIPPO, T1POST)
    assert "Chrisjen^Avasarala" in secrets
    messages = []
    _use(monkeypatch, loaded)
    client = PacsClient(loaded.url)
    header = _header(T1POST)
    client.retrieve_series(header.StudyInstanceUID, header.SeriesInstanceUID, tmp_path / "t1")
    client.store([_seg(HIPPO, description="leak check")])
    client.seg_series_for(header.StudyInstanceUID)
    with pytest.raises(PacsRejectedError) as error:
        client.store([_seg(HIPPO)], study_uid=generate_uid())
    messages.append(str(error.value))
    _use(monkeypatch, loaded, password="wrong-" + loaded.password)
    with pytest.raises(PacsAuthError) as error:
        PacsClient(loaded.url).find_studies()
    messages.append(str(error.value))
    monkeypatch.delenv("DICOMWEB_USER")
    monkeypatch.delenv("DICOMWEB_PASSWORD")
    monkeypatch.setenv("DICOMWEB_TOKEN", token)
    with pytest.raises(PacsAuthError) as error:
        PacsClient(loaded.url).list_series(header.StudyInstanceUID)
    messages.append(str(error.value))
    read_only = orthanc_factory(read_only=True)
    _use(monkeypatch, read_only)
    with pytest.raises(PacsRejectedError) as error:
        PacsClient(read_only.url, confirm_timeout_s=0).store([_seg(T1POST)])
    messages.append(str(error.value))
    assert caplog.records, "nothing was logged: the check would prove nothing"
    for text in [caplog.text, *messages]:
        leaked = [s for s in secrets | {read_only.password} if s in text]
        assert not leaked, f"leaked {len(leaked)} value(s)"


# --- the watch pass ------------------------------------------------------------------------------------------------


def _derived_study(description: str = "HippoCrop", slices: int = 4) -> list[pydicom.Dataset]:
    """A new study (new Study/Series/SOP UIDs) made of the first slices of the real hippocrop series."""
    study, series = generate_uid(), generate_uid()
    datasets = []
    for path in _files(HIPPO)[:slices]:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = description
        datasets.append(ds)
    return datasets


class FakeSegmentation:
    """The ``process`` callback: pulls the series, stores a derived "SEG" (a copy of a slice) into the study."""

    def __init__(self, client: PacsClient, folder: Path) -> None:
        self.client, self.folder = client, folder
        self.calls: list[str] = []
        self.fail: dict[str, BaseException] = {}

    def __call__(self, study_uid: str, series: SeriesSummary) -> str:
        self.calls.append(study_uid)
        if study_uid in self.fail:
            raise self.fail.pop(study_uid)
        paths = self.client.retrieve_series(study_uid, series.uid, self.folder / study_uid)
        assert len(paths) == series.num_instances
        seg = pydicom.dcmread(paths[0])
        seg.SeriesInstanceUID, seg.SOPInstanceUID = generate_uid(), generate_uid()
        seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
        seg.Modality, seg.SeriesDescription = "SEG", TAG
        return self.client.store([seg], study_uid=study_uid)[0]


@pytest.fixture
def watch_pacs(orthanc_factory, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[OrthancServer, PacsClient]]:
    server = orthanc_factory()
    _use(monkeypatch, server)
    yield server, PacsClient(server.url)


def test_watch_processes_each_study_once_and_new_ones_later(watch_pacs, tmp_path: Path) -> None:
    server, client = watch_pacs
    studies = [_derived_study() for _ in range(3)]
    for datasets in studies:
        server.upload(datasets)
    uids = {str(d[0].StudyInstanceUID) for d in studies}
    rules = SeriesRules(modality="MR", description_pattern="hippocrop")
    process, ledger = FakeSegmentation(client, tmp_path / "dl"), WatchLedger(tmp_path / "work")

    first = run_watch_pass(client, TAG, rules, None, process, ledger)
    assert set(first.processed) == uids and not first.failed and not first.skipped
    assert sorted(process.calls) == sorted(uids)
    assert all(client.seg_from_model(study, TAG) == seg for study, seg in first.processed.items())
    assert (tmp_path / "work" / "pacs" / "ledger.json").is_file()
    assert all(WatchLedger(tmp_path / "work").get(s, TAG).status == "done" for s in uids)

    second = run_watch_pass(client, TAG, rules, None, process, ledger)
    assert not second.processed and set(second.skipped) == uids and len(process.calls) == 3
    assert second.summary() == "0 processed, 3 skipped, 0 failed"

    later = _derived_study()
    server.upload(later)
    third = run_watch_pass(client, TAG, rules, None, process, WatchLedger(tmp_path / "work"))
    assert list(third.processed) == [later[0].StudyInstanceUID] and len(process.calls) == 4
    assert not run_watch_pass(client, TAG, rules, date(2030, 1, 1), process, ledger).skipped  # StudyDate filter

    # A lost ledger duplicates nothing: the SEGs of this model version on the PACS are recognised.
    fresh = run_watch_pass(client, TAG, rules, None, process, WatchLedger(tmp_path / "other-work"))
    assert not fresh.processed and len(fresh.skipped) == 4 and len(process.calls) == 4
    assert all("already holds a SEG of " + TAG in reason for reason in fresh.skipped.values())
    # Another model version processes them again.
    assert len(run_watch_pass(client, model_tag("hippo-unet", 4), rules, None, process, ledger).processed) == 4


def test_watch_failures_no_match_and_interrupted_pass(watch_pacs, tmp_path: Path) -> None:
    server, client = watch_pacs
    rules = SeriesRules(modality="MR", description_pattern="hippocrop")
    process, ledger = FakeSegmentation(client, tmp_path / "dl"), WatchLedger(tmp_path / "work")

    # A pass interrupted inside the segmentation (Ctrl-C) leaves the study in progress.
    interrupted = _derived_study()
    server.upload(interrupted)
    process.fail[interrupted[0].StudyInstanceUID] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        run_watch_pass(client, TAG, rules, None, process, ledger)
    assert WatchLedger(tmp_path / "work").get(interrupted[0].StudyInstanceUID, TAG).status == "in_progress"

    ok, failing, unexpected = (_derived_study() for _ in range(3))
    scout = _derived_study(description="localizer")
    ambiguous = _derived_study()
    second_series = generate_uid()
    for ds in _derived_study():  # a second matching series in the same study
        ds.StudyInstanceUID, ds.SeriesInstanceUID = ambiguous[0].StudyInstanceUID, second_series
        ambiguous.append(ds)
    for datasets in (ok, failing, unexpected, scout, ambiguous):
        server.upload(datasets)
    uid = {name: str(d[0].StudyInstanceUID) for name, d in {
        "interrupted": interrupted, "ok": ok, "failing": failing, "unexpected": unexpected, "scout": scout,
        "ambiguous": ambiguous}.items()}
    # A pipeline error wrapped in another exception (as MONAI's Compose does) is reported by its own message.
    wrapped = RuntimeError("applying LoadImage to Chrisjen^Avasarala")
    wrapped.__cause__ = InputDataError("study", "cannot segment this one")
    process.fail[uid["failing"]] = wrapped
    process.fail[uid["unexpected"]] = RuntimeError("boom for Chrisjen^Avasarala")
    ledger = WatchLedger(tmp_path / "work")
    report = run_watch_pass(client, TAG, rules, None, process, ledger)
    assert set(report.processed) == {uid["interrupted"], uid["ok"]}  # the interrupted one is redone
    assert set(report.failed) == {uid["failing"], uid["unexpected"], uid["ambiguous"]}
    assert report.skipped == {uid["scout"]: "no matching series"}
    assert report.failed[uid["ambiguous"]].startswith(f"study {uid['ambiguous']}: 2 series with modality MR")
    assert report.failed[uid["failing"]] == "study: cannot segment this one"
    assert report.failed[uid["unexpected"]].startswith("unexpected RuntimeError at test_pacs_client.py:")
    assert "Chrisjen" not in (tmp_path / "work" / "pacs" / "ledger.json").read_text()
    assert ledger.get(uid["failing"], TAG).status == "failed" and ledger.get(uid["failing"], TAG).attempts == 1
    assert report.lines()[-1] == "2 processed, 1 skipped, 3 failed"
    assert f"FAILED {uid['failing']}: study: cannot segment this one" in report.lines()
    with pytest.raises(PartialFailureError) as error:
        report.raise_for_failures()
    assert error.value.exit_code == EXIT_PARTIAL_FAILURE and str(error.value).startswith("PACS watch: 3 of 5 studies")

    # The next pass retries the failed studies only.
    calls = len(process.calls)
    retry = run_watch_pass(client, TAG, rules, None, process, ledger)
    assert set(retry.processed) == {uid["failing"], uid["unexpected"]} and list(retry.failed) == [uid["ambiguous"]]
    assert ledger.get(uid["ambiguous"], TAG).attempts == 2
    assert len(process.calls) == calls + 2
    assert all(client.seg_from_model(uid[name], TAG) for name in ("interrupted", "ok", "failing", "unexpected"))
    assert client.seg_from_model(uid["scout"], TAG) is None


def test_watch_gives_up_after_max_attempts_and_stops_when_the_pacs_is_down(watch_pacs, tmp_path: Path) -> None:
    server, client = watch_pacs
    study = _derived_study()
    server.upload(study)
    uid = str(study[0].StudyInstanceUID)
    rules = SeriesRules(modality="MR")
    process, ledger = FakeSegmentation(client, tmp_path / "dl"), WatchLedger(tmp_path / "work")
    # A PACS error of one study while the PACS answers is that study's failure, not the pass's.
    process.fail[uid] = PacsUnavailableError(f"{server.url}: HTTP 404 while retrieving series X")
    assert run_watch_pass(client, TAG, rules, None, process, ledger, max_attempts=2).failed[uid].endswith("series X")
    process.fail[uid] = InputDataError("study", "attempt 2")
    assert uid in run_watch_pass(client, TAG, rules, None, process, ledger, max_attempts=2).failed
    report = run_watch_pass(client, TAG, rules, None, process, ledger, max_attempts=2)
    assert report.skipped[uid] == "gave up after 2 failed attempts (last: study: attempt 2)"
    assert len(process.calls) == 2

    # The PACS goes down during a study: the pass stops with exit 7 and the study is redone next time.
    later = _derived_study()
    server.upload(later)

    def pacs_goes_down(study_uid: str, series: SeriesSummary) -> str:
        server.stop()
        return process(study_uid, series)

    with pytest.raises(PacsUnavailableError) as error:
        run_watch_pass(client, TAG, rules, None, pacs_goes_down, ledger, max_attempts=2)
    assert error.value.exit_code == EXIT_PACS_UNAVAILABLE and "connection refused" in str(error.value)
    assert ledger.get(later[0].StudyInstanceUID, TAG).status == "in_progress"
    with pytest.raises(PacsUnavailableError):
        run_watch_pass(client, TAG, rules, None, process, ledger)


def test_watch_ledger_rejects_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "pacs" / "ledger.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(InputDataError, match="not a valid watch ledger"):
        WatchLedger(tmp_path)
