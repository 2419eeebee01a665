"""Security: the compose stack's MLflow server refuses unauthenticated requests; no secrets or defaults ship.

The compose file is checked statically (basic-auth app on, passwords required from ``.env``, nothing published beyond
127.0.0.1, workers log in), ``docker/check-env.sh`` (``make stack-check``) against good and bad ``.env`` files, and the
authentication for real without a Docker engine: ``mlflow server --app-name basic-auth`` with the committed
``docker/mlflow/basic_auth.ini`` (its user store moved into a temporary directory) on loopback, over a temporary SQLite
backend, where an unauthenticated REST call gets 401 and an authenticated one succeeds.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

try:
    from tests import pg
except ImportError:  # tests/ is not a package: pytest puts it on sys.path itself
    import pg  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
AUTH_INI = ROOT / "docker" / "mlflow" / "basic_auth.ini"
CHECK_ENV = ROOT / "docker" / "check-env.sh"
SECRETS = ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
ADMIN, ADMIN_PASSWORD = "admin", "s3cure-test-Passw0rd"


# --------------------------------------------------------------------------------------------- compose, statically
def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_mlflow_runs_the_basic_auth_app_with_the_password_from_env() -> None:
    mlflow = _services()["mlflow"]
    command = " ".join(mlflow["command"])
    assert re.search(r"\bmlflow server --app-name basic-auth\b", command), command
    env = mlflow["environment"]
    # `:?` makes compose refuse to start when the variable is missing or empty; no default value anywhere.
    assert re.fullmatch(r"\$\{MLFLOW_ADMIN_PASSWORD:\?[^}]+\}", env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    assert re.fullmatch(
        r"\$\{MLFLOW_FLASK_SERVER_SECRET_KEY:\?[^}]+\}", env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    )
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert "./docker/mlflow/basic_auth.ini:/etc/mlflow/basic_auth.ini:ro" in mlflow["volumes"]
    for name in SECRETS:
        for m in re.finditer(r"\$\{" + name + r"(:?[-?])?([^}]*)\}", COMPOSE.read_text()):
            assert m.group(1) in (None, ":?"), f"{name} has a default in docker-compose.yml: {m.group(0)}"

    ini = configparser.ConfigParser()
    ini.read(AUTH_INI)
    assert not ini["mlflow"].get("admin_password"), "the auth config must not hold a password"
    auth_db = ini["mlflow"]["database_uri"]
    assert auth_db.startswith("sqlite:////mlauth/"), auth_db
    assert any(v.endswith(":/mlauth") for v in mlflow["volumes"])
    assert not any(":/mlauth" in v for v in _services()["worker"]["volumes"]), (
        "workers must not see the user store"
    )


def test_compose_publishes_mlflow_on_loopback_only_and_postgres_not_at_all() -> None:
    services = _services()
    assert "ports" not in services["postgres"], "PostgreSQL must stay on the compose network"
    for name, svc in services.items():
        for port in svc.get("ports", []):
            spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            assert spec.startswith("127.0.0.1:"), f"{name} publishes {spec!r} beyond the host's loopback"
    assert services["mlflow"]["ports"], "the UI must be reachable from the host's loopback"


def test_compose_workers_authenticate() -> None:
    env = _services()["worker"]["environment"]
    assert env["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_ADMIN_USERNAME:-admin}"
    assert re.fullmatch(r"\$\{MLFLOW_ADMIN_PASSWORD:\?[^}]+\}", env["MLFLOW_TRACKING_PASSWORD"])
    # The admin user the server creates is the one the workers log in as.
    assert (
        _services()["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_USERNAME"] == env["MLFLOW_TRACKING_USERNAME"]
    )


def test_no_env_file_is_committed_and_the_example_holds_placeholders_only() -> None:
    proc = subprocess.run(
        ["git", "ls-files", "--", ".env", "*.env", "**/.env"], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()}")
    assert proc.stdout.strip() == "", f"committed env files: {proc.stdout.split()}"
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert {example[k] for k in SECRETS} == {"change-me"}


# --------------------------------------------------------------------------------------------- make stack-check
def _check_env(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CHECK_ENV), str(path)], capture_output=True, text=True, timeout=30)


def test_stack_check_refuses_missing_placeholder_and_short_secrets(tmp_path: Path) -> None:
    proc = _check_env(ENV_EXAMPLE)
    assert proc.returncode == 2
    assert [line.split()[1] for line in proc.stderr.splitlines()] == list(SECRETS), proc.stderr
    assert all("placeholder" in line for line in proc.stderr.splitlines())

    good = {k: f"'{k.lower()}-Xk4PqZ9'" for k in SECRETS}
    env = tmp_path / ".env"
    env.write_text("".join(f"{k}={v}\n" for k, v in good.items()))
    assert _check_env(env).returncode == 0, _check_env(env).stderr

    env.write_text(f"POSTGRES_PASSWORD={good['POSTGRES_PASSWORD']}\nexport MLFLOW_ADMIN_PASSWORD=short\n")
    proc = _check_env(env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"check-env: MLFLOW_ADMIN_PASSWORD in {env} is shorter than 12 characters",
        f"check-env: MLFLOW_FLASK_SERVER_SECRET_KEY is not set in {env}",
    ]
    proc = _check_env(tmp_path / "missing.env")
    assert proc.returncode == 2 and "not found" in proc.stderr and "cp .env.example .env" in proc.stderr

    make = subprocess.run(["make", "-n", "stack-up"], cwd=ROOT, capture_output=True, text=True)
    if make.returncode == 0:  # no make: the script is what matters
        lines = make.stdout.splitlines()
        assert lines[0] == "docker/check-env.sh .env" and "docker compose up" in lines[-1]


# --------------------------------------------------------------------------------------------- a real auth server
def _auth_server_env(tmp: Path, admin_password: str) -> dict[str, str]:
    """The mlflow service's environment from docker-compose.yml, with the auth config's user store under ``tmp``."""
    ini = configparser.ConfigParser()
    ini.read(AUTH_INI)
    ini["mlflow"]["database_uri"] = f"sqlite:///{tmp / 'basic_auth.db'}"
    config = tmp / "basic_auth.ini"
    with open(config, "w") as fh:
        ini.write(fh)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DATABRICKS_"))}
    env.update(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        MLFLOW_AUTH_CONFIG_PATH=str(config),
        MLFLOW_AUTH_ADMIN_USERNAME=ADMIN,
        MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
        MLFLOW_FLASK_SERVER_SECRET_KEY="test-csrf-signing-key-0123456789",
    )
    return env


def _start_auth_server(tmp: Path, admin_password: str, timeout: float = 120) -> pg.MlflowServer:
    """``mlflow server --app-name basic-auth`` on 127.0.0.1, as the compose file's ``mlflow`` service runs it."""
    pytest.importorskip(
        "flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF); pip install -e .[dev]"
    )
    tmp.mkdir(parents=True, exist_ok=True)
    port = pg.free_port()
    exe = Path(sys.executable).parent / "mlflow"
    store = (f"sqlite:///{tmp / 'mlflow.db'}", (tmp / "artifacts").as_uri())
    argv = [str(exe) if exe.exists() else "mlflow", "server", "--app-name", "basic-auth"]
    argv += ["--backend-store-uri", store[0], "--default-artifact-root", store[1]]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    logfile = tmp / "mlflow-server.log"
    with open(logfile, "wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp, start_new_session=True,
            env=_auth_server_env(tmp, admin_password),
        )  # fmt: skip
    server = pg.MlflowServer(proc=proc, port=port, logfile=logfile)
    deadline = time.monotonic() + timeout
    while (
        proc.poll() is None and time.monotonic() < deadline
    ):  # an exited server is returned: the caller reads its log
        try:
            if _get(f"{server.uri}/health")[0] == 200:
                break
        except OSError:  # not listening yet
            time.sleep(0.3)
    else:
        if proc.poll() is None:
            server.stop()
            raise RuntimeError(
                f"mlflow server did not answer /health within {timeout:.0f} s:\n{server.log_tail()}"
            )
    return server


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pg.MlflowServer]:
    server = _start_auth_server(tmp_path_factory.mktemp("auth"), ADMIN_PASSWORD)
    try:
        assert server.proc.poll() is None, f"auth server exited:\n{server.log_tail()}"
        yield server
    finally:
        server.stop()


def _get(url: str, user: str | None = None, password: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_unauthenticated_requests_are_refused(auth_server: pg.MlflowServer) -> None:
    search = f"{auth_server.uri}/api/2.0/mlflow/experiments/search?max_results=5"
    assert _get(search)[0] == 401
    assert _get(f"{auth_server.uri}/")[0] == 401, "the UI must ask for a login too"
    assert _get(f"{auth_server.uri}/api/2.0/mlflow/registered-models/search")[0] == 401
    assert _get(search, ADMIN, "wrong-password-123")[0] == 401
    assert _get(search, "nobody-here", ADMIN_PASSWORD)[0] == 401
    status, body = _get(search, ADMIN, ADMIN_PASSWORD)
    assert status == 200, body[:500]
    assert "Default" in {e["name"] for e in json.loads(body).get("experiments", [])}
    # The compose healthchecks probe /health without credentials.
    assert _get(f"{auth_server.uri}/health")[0] == 200


def test_workers_log_in_with_the_tracking_credentials(
    auth_server: pg.MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a worker does: an MlflowClient with MLFLOW_TRACKING_USERNAME/PASSWORD writes; without them it is refused."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(tracking_uri=auth_server.uri, registry_uri=auth_server.uri)
    with pytest.raises(MlflowException, match="401|[Uu]nauthori[sz]ed|credentials"):
        client.create_experiment("anonymous-write")

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    exp = client.create_experiment("worker-write")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "score", 0.5)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics == {"score": 0.5}


def test_server_refuses_to_start_with_the_placeholder_password(tmp_path: Path) -> None:
    """The `change-me` of .env.example never becomes the admin password: MLflow rejects it (under 12 characters)."""
    server = _start_auth_server(tmp_path / "placeholder", "change-me", timeout=120)
    try:
        if server.proc.poll() is None:
            status = _get(f"{server.uri}/api/2.0/mlflow/experiments/search", ADMIN, "change-me")[0]
            pytest.fail(f"the server started with the placeholder password (login answered {status})")
        assert server.proc.returncode != 0
        assert "12 characters" in server.log_tail(200), server.log_tail()
    finally:
        server.stop()
