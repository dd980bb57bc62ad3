"""DICOMweb access: find studies and series, retrieve series and instances, store instances and confirm them.

Used by ``pipeline.data`` (datasets whose labels live on a PACS) and ``pipeline.pacs`` (segment a study, store
the SEG back), so it sits below both and knows nothing of models or inference.

Credentials come only from the environment, never from the command line (where ``ps`` and the shell
history would show them): ``DICOMWEB_USER`` and ``DICOMWEB_PASSWORD`` for basic auth, or
``DICOMWEB_TOKEN`` for a bearer token. TLS certificates are verified; ``DICOMWEB_CA_BUNDLE`` names the
CA bundle of a PACS signed by a private authority.

Every failure is a one-line :class:`~pipeline.errors.PipelineError` that names the URL (without
credentials or query) and never a header value: patient names, IDs, birth dates and accession numbers
stay out of messages and logs. UIDs and series descriptions are not patient identifiers and do appear.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from pipeline.dicomweb.series import SeriesSummary
from pipeline.errors import ConfigError, InputDataError, PacsAuthError, PacsRejectedError, PacsUnavailableError

logger = logging.getLogger(__name__)


ENV_USER = "DICOMWEB_USER"


ENV_PASSWORD = "DICOMWEB_PASSWORD"


ENV_TOKEN = "DICOMWEB_TOKEN"


ENV_CA_BUNDLE = "DICOMWEB_CA_BUNDLE"


# QIDO-RS and STOW-RS answers are DICOM JSON, keyed by tag (PS3.18 F.2), not by keyword.
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"


_MODALITY, _SERIES_DESCRIPTION, _NUM_SERIES_INSTANCES = "00080060", "0008103E", "00201209"


_FAILED_SOP_SEQUENCE, _REFERENCED_SOP_INSTANCE_UID, _FAILURE_REASON = "00081198", "00081155", "00081197"


# What an archive answers a QIDO-RS series search at its root when it only takes study-level ones: bad request,
# forbidden, not found, method not allowed, not implemented. 401 stays a credentials error; a 403 that means bad
# credentials comes back at the study search, which maps it to one.
_ROOT_SEARCH_REFUSED = frozenset({400, 403, 404, 405, 501})


_PAGE = 500  # QIDO page size; servers cap it lower at will, the paging copes with either


_INDEX_NAME = re.compile(r"^\d{5}\.dcm$")


def redact_url(url: str) -> str:
    """The URL without user, password, query or fragment: the only form of it that goes into messages and logs.

    Args:
        url: any URL.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<malformed URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _session(url: str, verify_tls: bool) -> requests.Session:
    """A session with the environment's credentials and TLS settings; the values themselves are never logged."""
    user, password, token = (os.environ.get(name) or None for name in (ENV_USER, ENV_PASSWORD, ENV_TOKEN))
    if token and (user or password):
        raise ConfigError(f"both {ENV_TOKEN} and {ENV_USER}/{ENV_PASSWORD} are set: keep one of them")
    if bool(user) != bool(password):
        raise ConfigError(f"{ENV_USER} and {ENV_PASSWORD} must be set together")
    session = requests.Session()
    # Left on, requests would let REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override session.verify (verify_tls=False and
    # DICOMWEB_CA_BUNDLE would do nothing) and would take credentials from ~/.netrc. Proxies are kept, by hand.
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(url))
    if token:
        token = token.strip()
        # requests would refuse such a header with an error quoting its value, i.e. the token.
        if not token or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in token):
            raise ConfigError(f"{ENV_TOKEN} holds whitespace or control characters")
        session.headers["Authorization"] = f"Bearer {token}"
    # Bytes, because requests encodes str credentials as Latin-1 and fails, quoting them, on anything else.
    if user and password:
        session.auth = (user.encode(), password.encode())
    parts = urlsplit(url)
    if not verify_tls:
        session.verify = False
        logger.warning("TLS certificate verification is off for %s", redact_url(url))
    elif os.environ.get(ENV_CA_BUNDLE):
        bundle = Path(os.environ[ENV_CA_BUNDLE])
        if not bundle.is_file():
            raise InputDataError(bundle, f"the CA bundle named by {ENV_CA_BUNDLE} does not exist")
        session.verify = str(bundle)
    else:
        # The CA bundle the machine's other tools are told to use, as requests itself would pick it.
        session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    if (user or token) and parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
        logger.warning("%s is plain http: the credentials cross the network unencrypted (use https)", redact_url(url))
    return session


def _first(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _text(item: dict[str, Any], tag: str) -> str:
    value = _first(item, tag)
    return "" if value is None else str(value).strip()


def _connection_problem(exc: requests.exceptions.ConnectionError) -> str:
    # The exception's text holds the host and the query only; inspect it, but never pass it on.
    text = str(exc)
    if any(s in text for s in ("NameResolutionError", "Name or service not known", "nodename nor servname",
                                "getaddrinfo failed", "Temporary failure in name resolution")):
        return "host name not found"
    if "refused" in text.lower():
        return "connection refused"
    return "cannot connect"


def _failures(payload: Any) -> list[str]:
    """``UID (reason 0xNNNN)`` for each item of a STOW-RS answer's FailedSOPSequence."""
    if not isinstance(payload, dict):
        return []
    failed = []
    for item in (payload.get(_FAILED_SOP_SEQUENCE) or {}).get("Value") or []:
        if isinstance(item, dict):
            reason = _first(item, _FAILURE_REASON)
            code = f"0x{int(reason):04X}" if isinstance(reason, int) else "unknown"
            failed.append(f"{_text(item, _REFERENCED_SOP_INSTANCE_UID) or '?'} (reason {code})")
    return failed


def _examples(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _write_atomic(dataset: pydicom.Dataset, path: Path) -> None:
    """Write ``dataset`` to ``path`` so that ``path`` never holds a partial file (written, synced, renamed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            dataset.save_as(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DicomWebClient:
    """A DICOMweb PACS: QIDO-RS searches, WADO-RS retrieval and STOW-RS storage, with errors mapped to exit codes.

    Credentials are read from the environment at construction (see the module docstring). Unreachable,
    refusing and rejecting servers raise :class:`PacsUnavailableError` (exit 7), :class:`PacsAuthError`
    (exit 8) and :class:`PacsRejectedError` (exit 9). Requests are not retried: a scheduled pass is the retry.

    Args:
        url: the DICOMweb root, e.g. ``https://pacs.example.org/dicom-web``; no credentials in it.
        verify_tls: verify the server's certificate (on unless explicitly turned off).
        timeout_s: connect and read timeout of each request, in seconds.
        confirm_timeout_s: how long :meth:`store` waits for stored instances to show up in QIDO-RS.
    """

    def __init__(self, url: str, verify_tls: bool = True, timeout_s: float = 60, confirm_timeout_s: float = 10) -> None:
        parts = urlsplit(url)
        self.url = url.rstrip("/")
        self.safe_url = redact_url(self.url)
        if parts.username is not None or parts.password is not None:
            raise ConfigError(f"{self.safe_url}: credentials in the URL are not accepted; set {ENV_USER} and "
                              f"{ENV_PASSWORD} (or {ENV_TOKEN}) in the environment")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(f"{self.safe_url}: not a DICOMweb root URL (http(s)://HOST[:PORT]/PATH)")
        self.timeout_s = timeout_s
        self.confirm_timeout_s = confirm_timeout_s
        try:
            self._client = DICOMwebClient(self.url, session=_session(self.url, verify_tls), timeout=timeout_s)
        except ValueError:
            raise ConfigError(f"{self.safe_url}: not a DICOMweb root URL (http(s)://HOST[:PORT]/PATH)") from None
        # Its default retries every failure five times over 30 s; a PACS that is down should say so at once.
        self._client.set_http_retry_params(retry=False)
        # Set when the archive refused a series search at its root: later searches go study by study at once.
        self._root_series_refused = False

    def __repr__(self) -> str:
        return f"DicomWebClient({self.safe_url!r})"

    @contextlib.contextmanager
    def _errors(self, action: str, storing: bool = False) -> Iterator[None]:
        """Map the HTTP layer's exceptions to one-line pipeline errors; their own text is never passed on."""
        try:
            yield
        except requests.exceptions.HTTPError as exc:
            raise self._http_error(exc.response, action, storing) from None
        except requests.exceptions.SSLError as exc:
            if "certificate verify failed" in str(exc).lower():
                raise PacsUnavailableError(f"{self.safe_url}: TLS certificate not trusted while {action}; for a private "
                                           f"CA, set {ENV_CA_BUNDLE} to its bundle") from None
            raise PacsUnavailableError(f"{self.safe_url}: TLS handshake failed while {action} (does the server speak "
                                       "https on that port?)") from None
        except requests.exceptions.Timeout:
            raise PacsUnavailableError(f"{self.safe_url}: no answer within {self.timeout_s:g} s while {action}") from None
        except requests.exceptions.ConnectionError as exc:
            raise PacsUnavailableError(f"{self.safe_url}: {_connection_problem(exc)} while {action}") from None
        except requests.exceptions.RequestException as exc:
            raise PacsUnavailableError(f"{self.safe_url}: {type(exc).__name__} while {action}") from None
        except ValueError as exc:
            # dicomweb-client's decoding of a body that is not DICOMweb (an HTML login page, a proxy's error...).
            raise PacsUnavailableError(f"{self.safe_url}: not a DICOMweb answer while {action} "
                                       f"({type(exc).__name__})") from None

    def _http_error(self, response: requests.Response | None, action: str, storing: bool) -> Exception:
        status = response.status_code if response is not None else None
        if status in (401, 403):
            return PacsAuthError(f"{self.safe_url}: the PACS refused the credentials (HTTP {status}) while {action}; "
                                 f"check {ENV_USER}/{ENV_PASSWORD} or {ENV_TOKEN}")
        if storing and status is not None and status not in (502, 503, 504):
            try:
                failed = _failures(response.json()) if response is not None and response.content else []
            except ValueError:
                failed = []
            detail = f": failed {_examples(failed)}" if failed else ""
            return PacsRejectedError(f"{self.safe_url}: the PACS rejected the STOW-RS request (HTTP {status}){detail}")
        return PacsUnavailableError(f"{self.safe_url}: HTTP {status} while {action}")

    def _search(self, find: Callable[..., list[dict[str, Any]]], key: str, **kwargs: Any) -> list[dict[str, Any]]:
        """All results of a QIDO-RS search, page by page.

        Stops on an empty page or one that brings nothing new, so a server that ignores ``offset`` cannot
        loop us forever (dicomweb-client's ``get_remaining`` would).
        """
        results: list[dict[str, Any]] = []
        seen: set[str] = set()
        while True:
            page = find(limit=_PAGE, offset=len(results), **kwargs)
            new = [item for item in page if _text(item, key) not in seen]
            if not new:
                return results
            seen.update(_text(item, key) for item in new)
            results.extend(new)

    def ping(self) -> None:
        """Check with the cheapest QIDO-RS search (one study) that the PACS answers and accepts our credentials."""
        with self._errors("checking the PACS"):
            self._client.search_for_studies(limit=1, fields=["StudyInstanceUID"])

    def find_studies(self, since: date | None = None) -> list[str]:
        """The StudyInstanceUIDs of the PACS's studies, optionally only those with StudyDate on or after ``since``.

        Args:
            since: the earliest StudyDate; ``None`` for all studies (a study without StudyDate then counts too).
        """
        filters = {"StudyDate": f"{since:%Y%m%d}-"} if since else None
        with self._errors("searching for studies"):
            found = self._search(self._client.search_for_studies, _STUDY_UID, search_filters=filters,
                                 fields=["StudyInstanceUID"])
        return [uid for uid in dict.fromkeys(_text(item, _STUDY_UID) for item in found) if uid]

    def list_series(self, study_uid: str, modality: str | None = None) -> list[SeriesSummary]:
        """The series of a study with their modality, description and instance count.

        When the server leaves out NumberOfSeriesRelatedInstances, the instances are counted with QIDO-RS.

        Args:
            study_uid: the StudyInstanceUID.
            modality: only series of this Modality (e.g. ``SEG``), or ``None`` for all.
        """
        filters = {"Modality": modality} if modality else None
        with self._errors(f"listing the series of study {study_uid}"):
            found = self._search(self._client.search_for_series, _SERIES_UID, study_instance_uid=study_uid,
                                 search_filters=filters,
                                 fields=["Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances"])
        return [self._summary(study_uid, item) for item in found
                if _text(item, _SERIES_UID) and (not modality or _text(item, _MODALITY).upper() == modality.upper())]

    def _summary(self, study_uid: str, item: dict[str, Any], count: bool = True) -> SeriesSummary:
        uid = _text(item, _SERIES_UID)
        try:
            count = int(_first(item, _NUM_SERIES_INSTANCES))
        except (TypeError, ValueError):
            count = len(self._instance_uids(study_uid, uid)) if count else 0
        return SeriesSummary(uid, _text(item, _MODALITY), _text(item, _SERIES_DESCRIPTION), count)

    def find_series(self, modality: str) -> list[tuple[str, SeriesSummary]]:
        """Every series of one Modality on the server, across studies, as ``(StudyInstanceUID, summary)``.

        A server may ignore a search key it does not index: the modality is checked again here. Where the
        server gives no NumberOfSeriesRelatedInstances, ``num_instances`` is 0 (not counted: the caller lists them).
        An archive that refuses a series search at its root (HTTP 400, 403, 404, 405 or 501: some answer only
        study-level queries) is searched study by study instead, said once in the log.

        Args:
            modality: e.g. ``SEG`` or ``RTSTRUCT``.
        """
        fields = ["StudyInstanceUID", "Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances"]
        found: list[dict[str, Any]] | None = None
        if not self._root_series_refused:
            with self._errors(f"searching for {modality} series"):
                try:
                    found = self._search(self._client.search_for_series, _SERIES_UID,
                                         search_filters={"Modality": modality}, fields=fields)
                except requests.exceptions.HTTPError as exc:
                    status = exc.response.status_code if exc.response is not None else None
                    if status not in _ROOT_SEARCH_REFUSED:
                        raise
                    self._root_series_refused = True
                    logger.warning("%s does not answer a series search at its root (HTTP %s); searching its "
                                   "studies one by one", self.safe_url, status)
        if found is None:
            found = self._series_study_by_study(modality, fields)
        return [(_text(item, _STUDY_UID), self._summary(_text(item, _STUDY_UID), item, count=False)) for item in found
                if _text(item, _SERIES_UID) and _text(item, _STUDY_UID)
                and _text(item, _MODALITY).upper() == modality.upper()]

    def _series_study_by_study(self, modality: str, fields: list[str]) -> list[dict[str, Any]]:
        """The series of one Modality found study by study (``/studies``, then ``/studies/{uid}/series``): what
        an archive that answers only study-level queries allows."""
        found: list[dict[str, Any]] = []
        for study_uid in self.find_studies():
            with self._errors(f"searching for {modality} series in study {study_uid}"):
                series = self._search(self._client.search_for_series, _SERIES_UID, study_instance_uid=study_uid,
                                      search_filters={"Modality": modality}, fields=fields)
            # A study-level answer need not repeat the study's UID: the query's own one is the truth.
            for item in series:
                item[_STUDY_UID] = {"vr": "UI", "Value": [study_uid]}
            found.extend(series)
        return found

    def instance_uids(self, study_uid: str, series_uid: str) -> set[str]:
        """The SOPInstanceUIDs of a series (QIDO-RS).

        Args:
            study_uid: the StudyInstanceUID.
            series_uid: the SeriesInstanceUID.
        """
        return self._instance_uids(study_uid, series_uid)

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str, path: Path) -> Path:
        """Download one instance with WADO-RS, in its stored transfer syntax, written atomically to ``path``.

        Args:
            study_uid: the StudyInstanceUID.
            series_uid: the SeriesInstanceUID.
            sop_uid: the SOPInstanceUID.
            path: the file to write (its folder is created).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(f"retrieving instance {sop_uid}"):
            dataset = self._client.retrieve_instance(study_uid, series_uid, sop_uid,
                                                     media_types=(("application/dicom", "*"),))
        _write_atomic(dataset, path)
        return path

    def _instance_uids(self, study_uid: str, series_uid: str) -> set[str]:
        with self._errors(f"listing the instances of series {series_uid}"):
            found = self._search(self._client.search_for_instances, _SOP_UID, study_instance_uid=study_uid,
                                 series_instance_uid=series_uid, fields=["SOPInstanceUID"])
        return {uid for uid in (_text(item, _SOP_UID) for item in found) if uid}

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        """Download a series with WADO-RS, in the transfer syntax it is stored in, one file per instance.

        Files are named ``00000.dcm``, ``00001.dcm``... in the order received (never after a header value)
        and written atomically; earlier files of that form in ``folder`` are removed first, so a retry
        never mixes two downloads.

        Args:
            study_uid: the StudyInstanceUID.
            series_uid: the SeriesInstanceUID.
            folder: where to write (created when missing).

        Returns:
            The files written.
        """
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if _INDEX_NAME.match(stale.name):
                stale.unlink()
        paths: list[Path] = []
        with self._errors(f"retrieving series {series_uid}"):
            datasets = self._client.iter_series(study_uid, series_uid, media_types=(("application/dicom", "*"),))
            for index, dataset in enumerate(datasets):
                path = folder / f"{index:05d}.dcm"
                _write_atomic(dataset, path)
                paths.append(path)
        if not paths:
            raise InputDataError(f"{self.safe_url} series {series_uid}", "the PACS returned no instances")
        logger.info("retrieved %d instances of series %s into %s", len(paths), series_uid, folder)
        return paths

    def store(self, datasets: Sequence[pydicom.Dataset], study_uid: str | None = None) -> list[str]:
        """Store instances with STOW-RS, then confirm with QIDO-RS that every one of them is there.

        Some Orthanc versions (and Orthanc with a filter that drops an instance) answer 200, even listing
        the instance as stored, without storing it: only the query afterwards tells.

        Args:
            datasets: the instances, e.g. one DICOM SEG.
            study_uid: post to this study's URL, so that the server refuses instances of any other study.

        Returns:
            The stored SOPInstanceUIDs.

        Raises:
            PacsRejectedError: an HTTP error answer, a FailedSOPSequence, or an instance not found afterwards.
        """
        if not datasets:
            return []
        try:
            keys = [(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)) for ds in datasets]
        except AttributeError:
            raise InputDataError("STOW-RS", "an instance to store lacks its Study/Series/SOP Instance UID") from None
        count = f"{len(datasets)} instance{'s' if len(datasets) != 1 else ''}"
        with self._errors(f"storing {count}", storing=True):
            answer = self._client.store_instances(list(datasets), study_instance_uid=study_uid)
        failed = _failures(answer.to_json_dict()) if len(answer) else []
        if failed:
            raise PacsRejectedError(f"{self.safe_url}: the PACS rejected {len(failed)} of {count}: {_examples(failed)}")
        if "ReferencedSOPSequence" in answer:
            listed = {str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.ReferencedSOPSequence}
            left_out = [sop for _, _, sop in keys if sop not in listed]
            if left_out:
                raise PacsRejectedError(f"{self.safe_url}: the PACS did not store {len(left_out)} of {count} "
                                        f"(not in its STOW-RS answer): {_examples(left_out)}")
        self._confirm(keys, count)
        logger.info("stored and confirmed %s in %s", count, self.safe_url)
        return [sop for _, _, sop in keys]

    def _confirm(self, keys: Sequence[tuple[str, str, str]], count: str) -> None:
        by_series: dict[tuple[str, str], set[str]] = {}
        for study, series, sop in keys:
            by_series.setdefault((study, series), set()).add(sop)
        deadline = time.monotonic() + self.confirm_timeout_s
        while True:
            missing = sorted(sop for (study, series), sops in by_series.items()
                             for sop in sops - self._instance_uids(study, series))
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise PacsRejectedError(f"{self.safe_url}: the PACS accepted the STOW-RS request but {len(missing)} of "
                                        f"{count} are not in it after {self.confirm_timeout_s:g} s: "
                                        f"{_examples(missing)}")
            # Some archives index asynchronously; a short wait spares a false alarm.
            time.sleep(0.5)

    def find_instance(self, study_uid: str, sop_instance_uid: str) -> bool:
        """Whether the study holds the instance (QIDO-RS).

        Args:
            study_uid: the StudyInstanceUID.
            sop_instance_uid: the SOPInstanceUID.
        """
        with self._errors(f"looking for instance {sop_instance_uid}"):
            found = self._client.search_for_instances(study_instance_uid=study_uid,
                                                      search_filters={"SOPInstanceUID": sop_instance_uid},
                                                      fields=["SOPInstanceUID"])
        return any(_text(item, _SOP_UID) == sop_instance_uid for item in found)
