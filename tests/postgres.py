"""A real PostgreSQL on 127.0.0.1 and an ``mlflow server`` whose backend store is in it, for tests.

Use it from a test module with ``pytest_plugins = ["tests.postgres"]``: that registers this module once for the
whole session, so every module that names it shares one PostgreSQL and one server (starting both costs ~20 s).
Importing the fixture functions into a module instead would give each such module its own copies.

Fixtures (session-scoped, started on first use, stopped when the session ends):

- ``postgres``: a :class:`PostgresCluster`; ``postgres.uri`` is the SQLAlchemy URI of its ``mlflow`` database
  (``postgresql+psycopg2://mlflow:PASSWORD@127.0.0.1:PORT/mlflow``), ``postgres.connect()`` a new psycopg2
  connection to it (close it: ``with contextlib.closing(postgres.connect()) as conn``), so a test can check
  that rows really are in PostgreSQL.
- ``postgres_mlflow_server``: a :class:`PostgresMlflowServer` (an :class:`~tests.mlflow_server.MlflowServer`)
  with ``.uri`` (``http://127.0.0.1:PORT``) for ``mlflow.tracking_uri``; artifacts go to a temporary folder
  it serves (``--artifacts-destination``).

Every test of the session sees the same database: name experiments and registered models after the test.
A test that stops the server must call ``postgres_mlflow_server.start()`` again (a no-op when it is up).

PostgreSQL refuses to run as root, and CI runs as root: then ``initdb`` and ``pg_ctl`` run as ``nobody``
(``runuser``, else ``setpriv``), in a data folder under the system's temporary directory that ``nobody`` owns
(pytest's own temporary folders are private to root). As any other user they run as that user. The binaries are
found on ``PATH`` or in Debian's ``/usr/lib/postgresql/VERSION/bin`` (package ``postgresql``; ``make test``
installs it when run as root). Without them or without ``psycopg2`` (the ``server`` extra) the tests skip.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer, free_port

START_TIMEOUT_S = 60
UNPRIVILEGED_USER = "nobody"
DATABASE = "mlflow"
ROLE = "mlflow"


def postgres_bin_dir() -> Path | None:
    """The folder with ``initdb``, ``pg_ctl`` and ``postgres``: from ``PATH``, else Debian's newest version."""
    on_path = shutil.which("initdb")
    if on_path:
        folder = Path(on_path).resolve().parent
        if (folder / "pg_ctl").is_file() and (folder / "postgres").is_file():
            return folder

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", p.parent.parent.name)) or (0,)

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    return found[-1].parent if found else None


def _run_as_prefix() -> list[str] | None:
    """The command prefix that drops root to ``nobody``; ``[]`` when not root; ``None`` when no way is found."""
    if os.geteuid() != 0:
        return []
    try:
        user = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        return None
    if shutil.which("runuser"):
        return ["runuser", "-u", UNPRIVILEGED_USER, "--"]
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]
    return None


def postgres_missing() -> str | None:
    """Why no test PostgreSQL can start here, or ``None`` when it can."""
    if postgres_bin_dir() is None:
        return ("PostgreSQL's initdb/pg_ctl not found on PATH or in /usr/lib/postgresql/*/bin: install the Debian "
                "package postgresql (`make test` does it when run as root)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[server]')"
    if _run_as_prefix() is None:
        return f"running as root, and neither user {UNPRIVILEGED_USER!r} with runuser/setpriv exists to run PostgreSQL"
    return None


class PostgresCluster:
    """One PostgreSQL cluster (``initdb`` + ``pg_ctl``) listening on 127.0.0.1 only, with an ``mlflow`` database.

    The superuser ``postgres`` and the owner ``mlflow`` of the database each get a random password; TCP logins
    need it (scram-sha-256), as on a lab server.

    Args:
        port: the TCP port; a free one when ``None``.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bin = postgres_bin_dir()
        self.prefix = _run_as_prefix() or []
        # Under the system's temp dir, not pytest's: /tmp/pytest-of-root is 0700, nobody could not enter it.
        self.root = Path(tempfile.mkdtemp(prefix="unet-postgres-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "postgres.log"
        self.superuser_password = secrets.token_hex(16)
        self.password = secrets.token_hex(16)
        # The driver named: SQLAlchemy >= 2.1 reads a bare postgresql:// as psycopg 3, which the server extra lacks.
        self.uri = f"postgresql+psycopg2://{ROLE}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"
        self._started = False

    def _pg(self, tool: str, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        cmd = [*self.prefix, str(self.bin / tool), *args]
        # cwd: the server's user must be able to enter it (root's home is not).
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root,
                             env={**os.environ, "LC_ALL": "C", "LANG": "C"})
        if res.returncode != 0:
            raise RuntimeError(f"{tool} failed ({res.returncode}): {res.stderr.strip()[-2000:]}\n{self.log_tail()}")

    def start(self) -> None:
        """``initdb`` a new cluster, start it, create the ``mlflow`` role and database."""
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        self.sockets.mkdir()
        if os.geteuid() == 0:
            user = pwd.getpwnam(UNPRIVILEGED_USER)
            for path in (self.root, self.sockets, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile), "--encoding=UTF8",
                 "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256")
        pwfile.unlink()
        # fsync off: a throw-away test cluster; durability after a power cut is not what these tests are about.
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t",
                 str(START_TIMEOUT_S), "start")
        self._started = True
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", password=self.superuser_password,
                                dbname="postgres")
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD %s", (self.password,))
                cur.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        finally:
            conn.close()

    def connect(self):
        """A new psycopg2 connection to the ``mlflow`` database as its owner (close it when done)."""
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=ROLE, password=self.password, dbname=DATABASE)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete the cluster's folder."""
        try:
            if self._started:
                self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
                self._started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log (empty before it exists)."""
        if not self.log.is_file():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class PostgresMlflowServer(MlflowServer):
    """An ``mlflow server`` whose backend store is a PostgreSQL database; artifacts in ``root/artifacts``.

    Args:
        root: folder for the artifacts and the server's log.
        backend_store_uri: the ``postgresql://`` URI of the database.
        port: the port; a free one when ``None``.
    """

    def __init__(self, root: Path, backend_store_uri: str, port: int | None = None) -> None:
        super().__init__(root, port)
        self.backend_store_uri = backend_store_uri

    @property
    def command(self) -> list[str]:
        """The lab's command line: PostgreSQL store, artifacts proxied by the server (``--artifacts-destination``)."""
        # No --default-artifact-root: experiments get ``mlflow-artifacts:/`` and every client writes its
        # artifacts through the server, as on a lab server whose disk the nodes cannot see.
        return [
            str(Path(sys.executable).with_name("mlflow")), "server",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
            "--workers", "1",
        ]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A running PostgreSQL with an empty ``mlflow`` database, for the whole session."""
    reason = postgres_missing()
    if reason:
        pytest.skip(reason)
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_mlflow_server(postgres: PostgresCluster,
                           tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresMlflowServer]:
    """A running ``mlflow server`` on the ``postgres`` database, for the whole session."""
    server = PostgresMlflowServer(tmp_path_factory.mktemp("mlflow-postgres"), postgres.uri)
    server.start()
    try:
        yield server
    finally:
        server.stop()
