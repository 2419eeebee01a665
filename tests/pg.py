"""A throwaway PostgreSQL server for tests, started from Debian's binaries on loopback.

The scale-out topology of ``docker-compose.yml`` (PostgreSQL with one database for MLflow and one for Optuna) is
tested without a Docker engine: :func:`start_postgres` runs ``initdb`` and ``pg_ctl`` from
``/usr/lib/postgresql/<version>/bin`` (or ``$MERGELAB_PG_BINDIR``) in a fresh temporary directory, on 127.0.0.1 and a
free port, with password (SCRAM) authentication. ``initdb`` refuses to run as root, so under root every server
command runs as the unprivileged ``postgres`` system user (``nobody`` as a fallback) through ``runuser``, in a
temporary directory that user owns.

Use the session fixture :func:`postgres` (import it into a test module); it creates the ``mlflow`` and ``optuna``
databases. When no PostgreSQL is installed the fixture skips with the reason, except under
``MERGELAB_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), where the skip becomes a failure.

Durability is traded for speed (``fsync=off``, ``synchronous_commit=off``): this is a test server.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

REQUIRE_ENV = "MERGELAB_REQUIRE_POSTGRES"
BINDIR_ENV = "MERGELAB_PG_BINDIR"
UNPRIVILEGED_USERS = ("postgres", "nobody")
DEFAULT_DATABASES = ("mlflow", "optuna")
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL installation (binaries, unprivileged user or driver) on this machine."""


def find_bindir(debian_root: Path = Path("/usr/lib/postgresql"), path: str | None = None) -> Path:
    """Locate the PostgreSQL server binaries (``initdb``, ``pg_ctl``).

    Order: ``$MERGELAB_PG_BINDIR``, the newest ``<debian_root>/*/bin`` (Debian/Ubuntu layout), then ``initdb`` on
    ``path`` (default ``$PATH``).

    Raises:
        PostgresUnavailable: when none of them holds both ``initdb`` and ``pg_ctl``.
    """
    candidates: list[Path] = []
    if os.environ.get(BINDIR_ENV):
        candidates.append(Path(os.environ[BINDIR_ENV]))
    debian = sorted(
        debian_root.glob("*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")],
        reverse=True,
    )
    candidates.extend(debian)
    on_path = shutil.which("initdb", path=path)
    if on_path:
        candidates.append(Path(on_path).parent)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl) in $MERGELAB_PG_BINDIR, /usr/lib/postgresql/*/bin or PATH; "
        "install Debian's `postgresql` package (apt-get install postgresql)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as when we are root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable(
        f"running as root and none of the users {UNPRIVILEGED_USERS} exists to run initdb"
    )


@dataclass
class PostgresServer:
    """A running test server; connection URLs come from :meth:`url`."""

    bindir: Path
    root: Path
    port: int
    user: str = "mergelab"
    password: str = ""
    host: str = "127.0.0.1"
    os_user: str | None = None
    databases: list[str] = field(default_factory=list)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        """SQLAlchemy URL of ``database`` (``driver="postgresql"`` for the plain libpq form)."""
        return (
            f"{driver}://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{database}"
        )

    @property
    def mlflow_url(self) -> str:
        return self.url("mlflow")

    @property
    def optuna_url(self) -> str:
        return self.url("optuna")

    def _connect(self, database: str = "postgres"):  # noqa: ANN202 - psycopg2 connection
        try:
            import psycopg2
        except ImportError as e:  # pragma: no cover - psycopg2-binary is in the platform extra
            raise PostgresUnavailable(
                "the PostgreSQL driver psycopg2 is not installed (pip install psycopg2-binary)"
            ) from e
        return psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            connect_timeout=10,
        )

    def create_database(self, name: str) -> str:
        """Create database ``name`` (owned by the test user) if it does not exist; return its URL."""
        if not _DB_NAME.match(name):
            raise ValueError(f"invalid database name {name!r}: lowercase letters, digits and _ only")
        conn = self._connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        if name not in self.databases:
            self.databases.append(name)
        return self.url(name)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"

    def stop(self) -> None:
        """Stop the server (immediate shutdown: the data is thrown away) and delete its directory."""
        if (self.datadir / "postmaster.pid").exists():
            _pg(
                self,
                ["pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "-t", "30", "stop"],
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)


def _pg(
    server: PostgresServer, argv: list[str], *, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run a PostgreSQL binary from ``server.bindir``, as the unprivileged user when we are root."""
    cmd = [str(server.bindir / argv[0]), *argv[1:]]
    if server.os_user is not None:
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        cmd = [runuser, "-u", server.os_user, "--", *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    proc = subprocess.run(
        cmd,
        cwd=server.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}"
            f"\n--- server log ---\n{server.log_tail()}"
        )
    return proc


def start_postgres(databases: tuple[str, ...] = DEFAULT_DATABASES, attempts: int = 3) -> PostgresServer:
    """Initialise and start a fresh PostgreSQL on 127.0.0.1, then create ``databases``.

    Args:
        databases: names of the databases to create (owned by the test user).
        attempts: start retries with a new port if another process takes the chosen one first.

    Returns:
        The running server; call :meth:`PostgresServer.stop` when done.

    Raises:
        PostgresUnavailable: no binaries, no unprivileged user to run them, or no driver.
        RuntimeError: initdb or pg_ctl failed (the message carries their output and the server log).
    """
    bindir = find_bindir()
    account = _run_as()
    if account is not None and not (shutil.which("runuser") or Path("/usr/sbin/runuser").exists()):
        raise PostgresUnavailable(
            "running as root but `runuser` (util-linux) is missing to drop privileges for initdb"
        )
    # Not under pytest's tmp_path: its parents are 0700 root-owned, so the unprivileged user could not reach them.
    root = Path(tempfile.mkdtemp(prefix="mergelab-pg-"))
    server = PostgresServer(
        bindir=bindir,
        root=root,
        port=0,
        password=secrets.token_urlsafe(16),
        os_user=account.pw_name if account else None,
    )
    try:
        pwfile = root / "pwfile"
        pwfile.write_text(server.password + "\n")
        pwfile.chmod(0o600)
        if account is not None:
            for p in (root, pwfile):
                os.chown(p, account.pw_uid, account.pw_gid)
        _pg(
            server,
            [
                "initdb",
                "-D",
                str(server.datadir),
                "-U",
                server.user,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
        )
        pwfile.unlink()
        last_error: Exception | None = None
        for _ in range(attempts):
            server.port = free_port()
            opts = (
                f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200"
            )
            proc = _pg(
                server,
                [
                    "pg_ctl",
                    "-D",
                    str(server.datadir),
                    "-l",
                    str(server.logfile),
                    "-o",
                    opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
                check=False,
            )
            if proc.returncode == 0:
                last_error = None
                break
            last_error = RuntimeError(
                f"pg_ctl start on port {server.port} failed: {(proc.stderr or proc.stdout).strip()[-1000:]}"
                f"\n--- server log ---\n{server.log_tail()}"
            )
            time.sleep(0.5)
        if last_error is not None:
            raise last_error
        for name in databases:
            server.create_database(name)
        return server
    except BaseException:
        server.stop()
        raise


def _unavailable(reason: str) -> None:
    """Skip with ``reason``, or fail when PostgreSQL is required (``MERGELAB_REQUIRE_POSTGRES=1``)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"PostgreSQL required ({REQUIRE_ENV}=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason} (set {REQUIRE_ENV}=1 to make this a failure)")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the test session with the ``mlflow`` and ``optuna`` databases."""
    try:
        server = start_postgres()
    except PostgresUnavailable as e:
        _unavailable(str(e))
        raise AssertionError("unreachable") from e
    try:
        yield server
    finally:
        server.stop()


@dataclass
class MlflowServer:
    """An ``mlflow server`` subprocess (see :func:`start_mlflow_server`)."""

    proc: subprocess.Popen
    port: int
    logfile: Path
    host: str = "127.0.0.1"

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"

    def stop(self) -> None:
        """SIGTERM the server's process group (uvicorn workers included), SIGKILL after 3 s."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start_mlflow_server(
    backend_store_uri: str, artifact_root: Path, logdir: Path, timeout: float = 90
) -> MlflowServer:
    """Start ``mlflow server`` on 127.0.0.1 and a free port, as the compose file's ``mlflow`` service does.

    The huey job runner is off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``) and there is one uvicorn worker: the
    server comes up in a few seconds instead of 15-20 (spec/ecosystem.md, pitfall 12). The artifact root is a local
    ``file://`` directory that clients write to directly, as the shared volume does in docker-compose.yml.

    Args:
        backend_store_uri: SQLAlchemy URL of the MLflow database (tracking and registry).
        artifact_root: directory of the default artifact root (created).
        logdir: where ``mlflow-server.log`` goes.
        timeout: seconds to wait for ``/health``.

    Raises:
        RuntimeError: the server exited or did not answer ``/health`` in time (with the log's tail).
    """
    import urllib.error
    import urllib.request

    artifact_root.mkdir(parents=True, exist_ok=True)
    logdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    logfile = logdir / "mlflow-server.log"
    env = dict(
        os.environ,
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    argv = [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--default-artifact-root",
        artifact_root.resolve().as_uri(),
        "--serve-artifacts",
        "--artifacts-destination",
        artifact_root.resolve().as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(logfile, "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=logdir,
            start_new_session=True,
        )
    server = MlflowServer(proc=proc, port=port, logfile=logfile)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f} s:\n{server.log_tail()}")
