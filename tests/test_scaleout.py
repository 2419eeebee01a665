"""Scale-out on PostgreSQL without a Docker engine: the topology of docker-compose.yml, tested for real.

A real PostgreSQL (tests/pg.py) holds one database for MLflow and one for Optuna; an ``mlflow server`` process serves
tracking and the registry over HTTP with a local file artifact root; two ``mergelab worker`` processes work one
campaign. The compose file, its PostgreSQL init script and ``.ci/run`` are checked statically (and the init script
against the real server).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

try:
    from tests import pg
except ImportError:  # tests/ is not a package: pytest puts it on sys.path itself
    import pg  # type: ignore[no-redef]

MlflowServer, PostgresServer, start_mlflow_server = pg.MlflowServer, pg.PostgresServer, pg.start_mlflow_server
postgres = pg.postgres  # the session fixture

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
INIT_SCRIPT = ROOT / "docker" / "postgres-init" / "10-create-databases.sh"
ENV_EXAMPLE = ROOT / ".env.example"
CI_RUN = ROOT / ".ci" / "run"
_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")


# --------------------------------------------------------------------------------------------- static checks
def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_topology() -> None:
    """postgres + mlflow server + GPU worker replicas, healthchecks, shared artifact volume, worker command."""
    doc = _compose()
    services = doc["services"]
    assert set(services) == {"postgres", "mlflow", "worker"}
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test"), f"service {name} has no healthcheck"
    assert "/docker-entrypoint-initdb.d" in " ".join(services["postgres"]["volumes"])
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert (
        "mlflow server" in mlflow_cmd
        and "postgres" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    )
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "--serve-artifacts" in mlflow_cmd and "--allowed-hosts" in mlflow_cmd
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"

    worker = services["worker"]
    assert worker["command"][:2] == ["mergelab", "worker"] and worker["command"][2].endswith(".yaml}")
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["environment"]["MERGELAB_OPTUNA_STORAGE"].startswith("postgresql+psycopg2://")
    assert worker["environment"]["MERGELAB_OPTUNA_STORAGE"].endswith("/${OPTUNA_DB:-optuna}")
    assert {d: c["condition"] for d, c in worker["depends_on"].items()} == {
        "postgres": "service_healthy",
        "mlflow": "service_healthy",
    }
    assert "replicas" in worker["deploy"]
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    # Zero-copy registration needs the server's artifact root mounted at the same path in the workers.
    art = next(v for v in services["mlflow"]["volumes"] if v.endswith(":/mlartifacts"))
    assert art in worker["volumes"] and "file:///mlartifacts" in mlflow_cmd
    assert set(doc["volumes"]) >= {"pgdata", art.split(":")[0]}
    build = services["worker"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def test_compose_credentials_come_from_env_file() -> None:
    """No literal secret in the compose file; every variable it needs is documented in .env.example."""
    text = COMPOSE.read_text()
    doc = _compose()
    pg_env = doc["services"]["postgres"]["environment"]
    assert pg_env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD"), (
        "password must be interpolated from .env"
    )
    assert pg_env["POSTGRES_USER"].startswith("${POSTGRES_USER")
    for m in re.finditer(r"postgresql\+psycopg2://([^@\s]+)@", text):
        assert m.group(1) == "${POSTGRES_USER}:${POSTGRES_PASSWORD}", f"credentials in a URL: {m.group(0)}"
    required = {m.group(1) for m in re.finditer(r"\$\{([A-Za-z_]\w*):\?", text)}
    used = set(_VAR.findall(text))
    example = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert required <= example, f".env.example lacks required {sorted(required - example)}"
    assert used <= example, f".env.example does not document {sorted(used - example)}"
    assert ".env" in (ROOT / ".gitignore").read_text().split(), ".env must be git-ignored"


def test_docker_compose_config_parses(tmp_path: Path) -> None:
    """`docker compose config` (needs no engine) accepts the file with .env.example's values, when available."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` client here; the structure is checked by test_compose_topology")
    env_file = tmp_path / ".env"
    shutil.copy(ENV_EXAMPLE, env_file)
    proc = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "--env-file", str(env_file), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr


def test_ci_run_is_an_executable_noninteractive_entry_point() -> None:
    text = CI_RUN.read_text()
    assert CI_RUN.stat().st_mode & stat.S_IXUSR, ".ci/run must be executable"
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "apt-get update" in text and re.search(r"apt-get install -y[^\n]*\\?\n?[^\n]*postgresql", text)
    assert "MERGELAB_REQUIRE_POSTGRES=1" in text and re.search(r"^make test$", text, re.M)
    assert subprocess.run(["bash", "-n", str(CI_RUN)]).returncode == 0


# --------------------------------------------------------------------------------------------- PostgreSQL
def test_missing_postgres_skips_unless_required(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No binaries: a skip naming the fix, which becomes a failure under MERGELAB_REQUIRE_POSTGRES=1 (CI)."""
    monkeypatch.delenv(pg.BINDIR_ENV, raising=False)
    with pytest.raises(pg.PostgresUnavailable, match="apt-get install postgresql"):
        pg.find_bindir(debian_root=tmp_path, path=str(tmp_path))
    fake = tmp_path / "15" / "bin"
    fake.mkdir(parents=True)
    for name in ("initdb", "pg_ctl"):
        (fake / name).touch()
    assert pg.find_bindir(debian_root=tmp_path, path=str(tmp_path)) == fake
    monkeypatch.delenv(pg.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no initdb"):
        pg._unavailable("no initdb")
    monkeypatch.setenv(pg.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="required"):
        pg._unavailable("no initdb")


def test_postgres_fixture_serves_optuna_and_mlflow(postgres: PostgresServer, tmp_path: Path) -> None:
    """Both databases exist on loopback with password auth; Optuna RDBStorage and MLflow's SQL store work on them."""
    import optuna
    import sqlalchemy as sa
    from mlflow.tracking import MlflowClient

    assert postgres.host == "127.0.0.1" and not postgres.url("x").startswith(
        "postgresql+psycopg2://mergelab:@"
    )
    engine = sa.create_engine(postgres.url("postgres"))
    with engine.connect() as conn:
        names = {r[0] for r in conn.execute(sa.text("SELECT datname FROM pg_database"))}
        assert {"mlflow", "optuna"} <= names
        assert conn.execute(sa.text("SHOW listen_addresses")).scalar() == "127.0.0.1"
    engine.dispose()
    bad = postgres.url("optuna").replace(postgres.password, "wrong")
    with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
        sa.create_engine(bad).connect()

    storage = optuna.storages.RDBStorage(postgres.optuna_url)
    study = optuna.create_study(study_name="fixture-check", storage=storage, load_if_exists=True)
    study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.5) ** 2, n_trials=3)
    again = optuna.load_study(study_name="fixture-check", storage=postgres.optuna_url)
    assert len(again.trials) == 3 and all(t.state.name == "COMPLETE" for t in again.trials)

    client = MlflowClient(tracking_uri=postgres.mlflow_url, registry_uri=postgres.mlflow_url)
    exp = client.create_experiment("fixture-check", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "val/average", 42.0)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics["val/average"] == 42.0


def test_compose_init_script_creates_both_databases(postgres: PostgresServer) -> None:
    """docker/postgres-init/10-create-databases.sh, run as the postgres image runs it, is idempotent."""
    env = dict(
        os.environ,
        PATH=f"{postgres.bindir}:{os.environ['PATH']}",
        PGHOST=postgres.host,
        PGPORT=str(postgres.port),
        PGPASSWORD=postgres.password,
        POSTGRES_USER=postgres.user,
        MLFLOW_DB="compose_mlflow",
        OPTUNA_DB="compose_optuna",
    )
    for _ in range(2):
        proc = subprocess.run(["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    import sqlalchemy as sa

    engine = sa.create_engine(postgres.url("postgres"))
    with engine.connect() as conn:
        owners = dict(
            conn.execute(
                sa.text(
                    "SELECT d.datname, r.rolname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba"
                    " WHERE d.datname LIKE 'compose_%'"
                )
            ).all()
        )
    engine.dispose()
    assert owners == {"compose_mlflow": postgres.user, "compose_optuna": postgres.user}
    bad = subprocess.run(
        ["bash", str(INIT_SCRIPT)], env={**env, "OPTUNA_DB": "x; DROP"}, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "invalid database name" in bad.stderr


# --------------------------------------------------------------------------------------------- MLflow server
@pytest.fixture(scope="module")
def mlflow_server(
    postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """An `mlflow server` on the PostgreSQL `mlflow` database with a file artifact root in tmp."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = start_mlflow_server(postgres.mlflow_url, root / "artifacts", root)
    try:
        yield server
    finally:
        server.stop()


def test_mlflow_server_registers_from_run_artifact_dir_only(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """Over HTTP: files written straight into a run's artifact dir register with no copy; outside paths are refused."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    exp = client.create_experiment("server-check")
    run = client.create_run(exp)
    art = run.info.artifact_uri
    assert art.startswith("file://"), art
    merged = Path(art.removeprefix("file://")) / "merged"
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"weights")
    client.create_registered_model("scaleout-check")
    mv = client.create_model_version("scaleout-check", source=f"{art}/merged", run_id=run.info.run_id)
    client.set_registered_model_alias("scaleout-check", "champion", mv.version)
    got = client.get_model_version_by_alias("scaleout-check", "champion")
    assert got.version == mv.version and Path(got.source.removeprefix("file://")) == merged

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(MlflowException, match="artifact directory of the run"):
        client.create_model_version("scaleout-check", source=outside.as_uri(), run_id=run.info.run_id)
