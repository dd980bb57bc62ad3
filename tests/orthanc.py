"""A real Orthanc with its DICOMweb plugin for the PACS tests, started as a plain process on free local ports.

A test module gets the fixtures ``orthanc`` and ``orthanc_factory`` with ``pytest_plugins = ["tests.orthanc"]``. Without
``/usr/sbin/Orthanc`` or the DICOMweb plugin (Debian ``orthanc`` and ``orthanc-dicomweb``; ``make test``
installs them when run as root) the tests that use them are skipped, or fail where ``UNET_TESTS_STRICT`` is set (CI).

Orthanc 1.10 has no read-only mode (``ReadOnly`` and ``MaximumStorageMode: Reject`` came in 1.11/1.12), so the
refusing variants use a Lua ``ReceivedInstanceFilter``. Its DICOMweb plugin (1.7) does not report the refusal:
with a filter returning false it answers 200 and even lists the instance as stored; with a filter raising
an error it answers 200 and leaves the instance out of its answer. Only a query afterwards shows the truth.

Orthanc 1.10's own https (``SslEnabled``) crashes with a segmentation fault on the first request on Debian 12,
so the https variant puts a TLS terminator in front of it, like the reverse proxy before many a real PACS.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests

from tests.mlflow_server import free_port

# UNET_TEST_ORTHANC names another binary (a build of one's own; a missing path shows what a run without Orthanc does).
ORTHANC = Path(os.environ.get("UNET_TEST_ORTHANC") or "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER = "unet"
START_TIMEOUT_S = 60

# Bodies of ReceivedInstanceFilter(dicom, origin, info): return true to store the instance.
REJECT_ALL = "return false"
REJECT_SEG = "return dicom.Modality ~= 'SEG'"
RAISE_ON_SEG = "if dicom.Modality == 'SEG' then error('SEG refused by this test PACS') end return true"


def orthanc_missing() -> str | None:
    """Why no test Orthanc can start here, or ``None`` when it can."""
    for path, package in ((ORTHANC, "orthanc"), (DICOMWEB_PLUGIN, "orthanc-dicomweb")):
        if not path.is_file():
            return f"{path} not found: install the Debian package {package} (`make test` does it when run as root)"
    return None


@dataclass
class OrthancServer:
    """A running test Orthanc.

    Args:
        http_root: ``http://127.0.0.1:PORT`` (Orthanc's REST API).
        user: the registered user.
        password: its random password.
        folder: the server's config, storage and log folder.
        process: the Orthanc process.
        ca_bundle: with https, the certificate to trust (self-signed, for 127.0.0.1).
        proxy: with https, the TLS terminator in front of Orthanc.
    """

    http_root: str
    user: str
    password: str
    folder: Path
    process: subprocess.Popen
    ca_bundle: Path | None = None
    proxy: TlsTerminator | None = None

    @property
    def url(self) -> str:
        """The DICOMweb root."""
        return f"{self.http_root}/dicom-web"

    @property
    def log_path(self) -> Path:
        """Orthanc's stdout and stderr."""
        return self.folder / "orthanc.log"

    def env(self) -> dict[str, str]:
        """The environment variables that give a :class:`~pipeline.pacs.PacsClient` this server's credentials."""
        return {"DICOMWEB_USER": self.user, "DICOMWEB_PASSWORD": self.password}

    def log_tail(self, lines: int = 40) -> str:
        """The end of Orthanc's log."""
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate Orthanc (kill it when it does not stop within 10 s); safe to call twice."""
        if self.proxy is not None:
            self.proxy.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def upload(self, items: Sequence[Path | pydicom.Dataset], batch: int = 50) -> None:
        """Store files or datasets with STOW-RS, independently of the client under test.

        Args:
            items: DICOM files or datasets.
            batch: instances per request.
        """
        from dicomweb_client import DICOMwebClient

        session = requests.Session()
        session.auth = (self.user, self.password)
        session.verify = str(self.ca_bundle) if self.ca_bundle else True
        client = DICOMwebClient(self.url, session=session)
        client.set_http_retry_params(retry=False)
        datasets = [item if isinstance(item, pydicom.Dataset) else pydicom.dcmread(item) for item in items]
        for start in range(0, len(datasets), batch):
            answer = client.store_instances(datasets[start:start + batch])
            assert not answer.get("FailedSOPSequence"), f"Orthanc refused an upload:\n{self.log_tail()}"


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: ``(cert.pem, server.pem)``, the latter with the key, for Orthanc.

    Args:
        folder: where to write both files.
    """
    pytest.importorskip("cryptography", reason="the https test makes its certificate with cryptography")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (folder / "cert.pem").write_bytes(cert_pem)
    (folder / "server.pem").write_bytes(cert_pem + key_pem)
    return folder / "cert.pem", folder / "server.pem"


class TlsTerminator:
    """Accepts https on a free local port and pipes the decrypted bytes to a plain http port on 127.0.0.1.

    Args:
        target_port: the http port behind it.
        server_pem: the server's certificate and private key (PEM).
    """

    def __init__(self, target_port: int, server_pem: Path) -> None:
        self.target_port = target_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(server_pem)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, conn: socket.socket) -> None:
        try:
            # A client that does not trust the certificate aborts here.
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            conn.close()
            return
        try:
            with tls, socket.create_connection(("127.0.0.1", self.target_port)) as upstream:
                while not self.closed:
                    ready, _, _ = select.select([tls, upstream], [], [], 1)
                    for source in ready:
                        target = upstream if source is tls else tls
                        data = source.recv(65536)
                        # Decrypted bytes may wait in the TLS buffer where select() cannot see them.
                        while data and source is tls and tls.pending():
                            data += tls.recv(tls.pending())
                        if not data:
                            return
                        target.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        """Stop accepting; open connections end within a second."""
        self.closed = True
        self.listener.close()


class StudyLevelOnlyProxy:
    """An archive that answers only study-level queries, made of a real Orthanc: an http proxy on a free local port
    that forwards every request to Orthanc except a QIDO-RS series search at the DICOMweb root
    (``GET {root}/series``), which it refuses with ``status``.

    Args:
        server: the Orthanc behind it.
        status: the refusal's HTTP status (archives answer 400, 403, 404 or 501).

    Attributes:
        url: the DICOMweb root through the proxy.
        refused: the paths (with query) of the refused requests.
        forwarded: the paths (with query) of the forwarded GET requests.
    """

    def __init__(self, server: OrthancServer, status: int = 400) -> None:
        import http.server
        from urllib.parse import urlsplit

        root_path = urlsplit(server.url).path.rstrip("/")
        self.refused: list[str] = []
        self.forwarded: list[str] = []
        proxy = self
        upstream = requests.Session()
        upstream.verify = str(server.ca_bundle) if server.ca_bundle else True
        # Hop-by-hop headers and those requests undoes (it decompresses, and the body is sent whole).
        dropped = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length", "host"}

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                if self.command == "GET" and urlsplit(self.path).path.rstrip("/") == f"{root_path}/series":
                    proxy.refused.append(self.path)
                    body = b'{"error": "series search at the root is not supported: query a study"}'
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.command == "GET":
                    proxy.forwarded.append(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                answer = upstream.request(
                    self.command, f"{server.http_root}{self.path}", data=self.rfile.read(length) if length else None,
                    headers={k: v for k, v in self.headers.items() if k.lower() not in dropped}, timeout=60)
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in dropped:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass  # the test reads .refused and .forwarded; stderr stays the pipeline's

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{root_path}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def _config(folder: Path, password: str, http_port: int, dicom_port: int, lua_filter: str | None) -> dict:
    for sub in ("storage", "index", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "unet-pipeline-tests",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "TemporaryDirectory": str(folder / "tmp"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        # Orthanc 1.10 cannot bind its DICOM server to loopback only, and the tests speak DICOMweb alone.
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: password},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DeidentifyLogs": True,
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "StorageCompression": False,
    }
    if lua_filter is not None:
        script = folder / "filter.lua"
        script.write_text(f"function ReceivedInstanceFilter(dicom, origin, info)\n  {lua_filter}\nend\n")
        config["LuaScripts"] = [str(script)]
    return config


def start_orthanc(folder: Path, lua_filter: str | None = None, https: bool = False, tries: int = 3) -> OrthancServer:
    """Start Orthanc with its config, storage and log in ``folder`` and wait until ``GET /system`` answers.

    Args:
        folder: an empty folder of its own.
        lua_filter: the body of a Lua ``ReceivedInstanceFilter`` (e.g. :data:`REJECT_ALL`), or ``None``.
        https: serve https (through a :class:`TlsTerminator`) with a self-signed certificate, the result's
            ``ca_bundle``.
        tries: new ports are tried when one was taken between choosing it and Orthanc binding it.
    """
    reason = orthanc_missing()
    if reason:
        pytest.skip(reason)
    password = secrets.token_urlsafe(18)
    ca_bundle, server_pem = self_signed_certificate(folder) if https else (None, None)
    for attempt in range(1, tries + 1):
        http_port, dicom_port = free_port(), free_port()
        config_path = folder / "orthanc.json"
        config = _config(folder, password, http_port, dicom_port, lua_filter)
        config_path.write_text(json.dumps(config, indent=1))
        log = (folder / "orthanc.log").open("ab")
        process = subprocess.Popen([str(ORTHANC), str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=folder)
        log.close()
        server = OrthancServer(f"http://127.0.0.1:{http_port}", USER, password, folder, process)
        deadline = time.monotonic() + START_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if requests.get(f"{server.http_root}/system", auth=(USER, password), timeout=2).ok:
                    if server_pem is not None:
                        server.proxy = TlsTerminator(http_port, server_pem)
                        server.http_root, server.ca_bundle = f"https://127.0.0.1:{server.proxy.port}", ca_bundle
                    return server
            except requests.RequestException:
                pass
            time.sleep(0.1)
        server.stop()
        if process.returncode is not None and attempt < tries and time.monotonic() < deadline:
            continue
        break
    raise RuntimeError(f"Orthanc did not start within {START_TIMEOUT_S} s (exit code {process.returncode}); "
                       f"its log:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One Orthanc for a test module (storing everything); its log is printed when the module's last test fails."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()
    # pytest shows a fixture's teardown output only for a failed test.
    print(f"--- Orthanc log ({server.log_path}) ---\n{server.log_tail()}")


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """Start extra Orthancs for one test: ``start(read_only=False, lua_filter=None, https=False)``; all stop at
    teardown.

    ``read_only=True`` refuses every instance stored (Lua filter :data:`REJECT_ALL`); ``lua_filter`` gives any
    other filter body, e.g. :data:`REJECT_SEG` or :data:`RAISE_ON_SEG`; ``https=True`` serves https with a
    self-signed certificate (the server's ``ca_bundle``).
    """
    servers: list[OrthancServer] = []

    def start(read_only: bool = False, lua_filter: str | None = None, https: bool = False) -> OrthancServer:
        folder = tmp_path / f"orthanc{len(servers)}"
        folder.mkdir()
        server = start_orthanc(folder, REJECT_ALL if read_only else lua_filter, https=https)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
        print(f"--- Orthanc log ({server.log_path}) ---\n{server.log_tail()}")
