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
import sys
import time
import uuid
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
    assert set(services) == {"postgres", "mlflow", "optuna-init", "worker"}
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert name == "optuna-init" or (hc and hc.get("test")), f"service {name} has no healthcheck"
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
        "optuna-init": "service_completed_successfully",
        "mlflow": "service_healthy",
    }
    init = services["optuna-init"]
    assert init["environment"]["MERGELAB_OPTUNA_STORAGE"] == worker["environment"]["MERGELAB_OPTUNA_STORAGE"]
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
    """A compose client validates the file against the Compose schema with .env.example's values (no engine).

    `docker compose` (v2) when present; else Debian's `docker-compose` 1.29 (installed by .ci/run), which knows
    every key used here except the top-level `name`, so that one line is dropped for it.
    """
    work = tmp_path / "repo"
    (work / "docker").mkdir(parents=True)
    shutil.copytree(ROOT / "docker" / "postgres-init", work / "docker" / "postgres-init")
    shutil.copy(ROOT / "docker" / "Dockerfile", work / "docker" / "Dockerfile")
    shutil.copy(ENV_EXAMPLE, work / ".env")
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        shutil.copy(COMPOSE, work / "docker-compose.yml")
        argv = [docker, "compose", "config"]
    elif shutil.which("docker-compose"):
        text = COMPOSE.read_text()
        assert re.search(r"^name: mergelab$", text, re.M)
        (work / "docker-compose.yml").write_text(re.sub(r"^name: mergelab\n", "", text, flags=re.M))
        argv = [shutil.which("docker-compose"), "config"]
    else:
        pytest.skip(
            "no compose client (`docker compose` or `docker-compose`); test_compose_topology checks the file"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "MLFLOW_", "DOCKER_"))}
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=work, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    worker = resolved["services"]["worker"]
    assert (
        worker["environment"]["MERGELAB_OPTUNA_STORAGE"]
        == "postgresql+psycopg2://mergelab:change-me@postgres:5432/optuna"
    )
    assert int(worker["deploy"]["replicas"]) == 2
    assert resolved["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].endswith(
        "@postgres:5432/mlflow"
    )


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


@pytest.mark.postgres
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


@pytest.mark.postgres
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


@pytest.mark.postgres
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


# --------------------------------------------------------------------------------------------- two workers
TASKS = ("vqa", "chart")
N_TRIALS = 5  # the budget: five complete, plus the one killed mid-trial (run again: it does not count)
TOP_K = 2


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Benchmark data (val/test of two tasks) and a tiny zoo (base, full and LoRA experts of the two tasks)."""
    import torch

    from mergelab.bench.data import ensure_data
    from mergelab.bench.zoo_build import build_zoo

    root = tmp_path_factory.mktemp("bench")
    data = ensure_data(root / "data", tasks=TASKS, splits=("val", "test"), sizes={"val": 8, "test": 8})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_zoo(root / "zoo", tiny=True, progress=False, tasks=TASKS, device="cpu", evaluate=False)
    finally:
        torch.set_num_threads(threads)
    return data, root / "zoo"


def _compose_optuna_init(env: dict[str, str]) -> None:
    """Run the compose file's `optuna-init` command (creates Optuna's schema once, before the workers)."""
    argv = _compose()["services"]["optuna-init"]["command"]
    assert argv[0] == "python"
    proc = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "optuna schema ready" in proc.stdout, proc.stderr[-2000:]


def _start_worker(campaign: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            _worker_argv(campaign),
            env=env,
            cwd=log.parent,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _wait_for_running_trial(
    url: str, study: str, proc: subprocess.Popen, log: Path, timeout: float = 240
) -> int:
    """The number of the first RUNNING trial that already has its MLflow run (polled in the Optuna database)."""
    import optuna

    storage = optuna.storages.RDBStorage(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"worker exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
            try:
                trials = storage.get_all_trials(storage.get_study_id_from_name(study), deepcopy=False)
            except KeyError:  # the study does not exist yet
                trials = []
            for t in trials:
                if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("mlflow_run_id"):
                    return t.number
            time.sleep(0.2)
    finally:
        storage.engine.dispose()
    raise AssertionError(f"no running trial within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _worker_argv(campaign: Path) -> list[str]:
    exe = Path(sys.executable).parent / "mergelab"
    return (
        [str(exe), "worker", str(campaign)]
        if exe.exists()
        else [sys.executable, "-m", "mergelab.platform.cli", "worker", str(campaign)]
    )


@pytest.mark.postgres
@pytest.mark.slow
def test_two_workers_share_one_campaign(
    postgres: PostgresServer, mlflow_server: MlflowServer, tiny_bench: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two `mergelab worker` processes on one campaign, Optuna on PostgreSQL, MLflow through the server's HTTP URI.

    A first worker is SIGKILLed mid-trial; its trial must be failed by the heartbeat (Optuna and MLflow), not lost.
    Checks: every trial ran exactly once (one Optuna trial, one MLflow run, one worker per number, both workers
    busy), every run is nested under the campaign's single parent run, and the registry is consistent (every
    version's source exists, the versions are the campaign's top-k, unregistered weights are gone, aliases point
    at existing versions, `models:/NAME@champion` resolves to the weights).
    """
    import optuna
    from mlflow.tracking import MlflowClient

    from mergelab.platform import promotion
    from mergelab.platform import registry as reg
    from mergelab.platform.evaluation import HFEvaluator
    from mergelab.platform.store import Store, local_path

    data, zoo = tiny_bench
    name = f"scaleout-{uuid.uuid4().hex[:8]}"
    optuna_db = f"optuna_{uuid.uuid4().hex[:8]}"  # fresh, as in a new compose deployment
    optuna_url = postgres.create_database(optuna_db)
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "experts": {"zoo": str(zoo), "kind": "lora"},  # the zoo's base and LoRA experts
                "method": "task_arithmetic",
                "search_space": {"lam": {"type": "float", "low": 0.2, "high": 1.2}},
                "sampler": {"name": "random", "seed": 0},
                "budget": {"n_trials": N_TRIALS},
                "eval": {"tasks": list(TASKS), "data_root": str(data), "limit": 8, "batch_size": 8},
                "registry": {"name": name, "register": "top_k", "top_k": TOP_K, "evaluate_test": True},
                "tracking": {"experiment": "scaleout", "heartbeat_interval": 1, "grace_period": 2},
                "device": "cpu",
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MERGELAB_"))}
    env.update(
        MLFLOW_TRACKING_URI=mlflow_server.uri,
        MERGELAB_OPTUNA_STORAGE=optuna_url,
        MLFLOW_DISABLE_TELEMETRY="true",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        MERGELAB_DATA=str(data),
        PYTHONUNBUFFERED="1",
        MERGELAB_VERBOSE="1",  # Optuna's "Trial N finished" lines (quiet by default) tell which worker ran a trial
    )
    _compose_optuna_init(env)

    # A first worker is killed (SIGKILL) in the middle of its first trial; then two workers share the campaign.
    doomed = _start_worker(campaign, env, tmp_path / "worker-killed.log")
    try:
        killed = _wait_for_running_trial(optuna_url, name, doomed, tmp_path / "worker-killed.log")
    finally:
        doomed.kill()
        doomed.wait()
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [_start_worker(campaign, env, log) for log in logs]
    try:
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text(errors="replace") for log in logs]
    for i, (rc, text) in enumerate(zip(rcs, texts, strict=True)):
        assert rc == 0, f"worker {i} exited {rc}:\n{text[-4000:]}"

    # Every trial ran exactly once, the killed one was failed by the heartbeat (not lost) and, not counting against
    # the budget, run again: N_TRIALS complete trials; both workers worked.
    study = optuna.load_study(study_name=name, storage=optuna_url)
    worked = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("mergelab.skipped")]
    assert sorted(t.number for t in worked) == list(range(N_TRIALS + 1))
    states = {t.number: t.state.name for t in worked}
    assert states == {n: "FAIL" if n == killed else "COMPLETE" for n in range(N_TRIALS + 1)}, states
    complete = [t for t in worked if t.number != killed]
    finished = [set(map(int, re.findall(r"Trial (\d+) finished", text))) for text in texts]
    assert not finished[0] & finished[1], f"trials finished by both workers: {finished[0] & finished[1]}"
    assert finished[0] | finished[1] == {t.number for t in complete}, finished
    assert finished[0] and finished[1], f"one worker did every trial: {finished}"

    # One MLflow run per trial, all nested under the campaign's single parent run.
    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name("scaleout")
    runs = client.search_runs([exp.experiment_id], f"tags.`mergelab.campaign` = '{name}'", max_results=1000)
    parents = [r for r in runs if r.data.tags.get("mergelab.role") == "campaign"]
    assert len(parents) == 1, f"{len(parents)} campaign runs"
    parent_id = parents[0].info.run_id
    trial_runs = [r for r in runs if r.data.tags.get("mergelab.role") == "trial"]
    by_trial: dict[int, list] = {}
    for r in trial_runs:
        by_trial.setdefault(int(r.data.tags["mergelab.trial"]), []).append(r)
    assert {n: len(rs) for n, rs in by_trial.items()} == dict.fromkeys(range(N_TRIALS + 1), 1)
    for t in worked:
        (r,) = by_trial[t.number]
        assert r.info.run_id == t.user_attrs["mlflow_run_id"]
        assert r.data.tags.get("mlflow.parentRunId") == parent_id, f"trial {t.number} not nested"
        if t.number == killed:
            assert r.info.status == "FAILED" and "no heartbeat" in r.data.tags.get("mergelab.error", "")
            continue
        assert r.info.status == "FINISHED"
        assert r.data.metrics["val/average"] == pytest.approx(t.value)
    assert study.user_attrs.get("mlflow_parent_run_id") == parent_id

    # Registry: the campaign's top-k, every source present and inside its run's artifact directory.
    versions = client.search_model_versions(f"name='{name}'")
    top = sorted(complete, key=lambda t: t.value, reverse=True)[:TOP_K]
    assert sorted(float(v.tags["mergelab.score"]) for v in versions) == sorted(t.value for t in top)
    registered_runs = set()
    for v in versions:
        src = local_path(v.source)
        run = client.get_run(v.run_id)
        assert src is not None and src.is_dir() and any(src.glob("*.safetensors")), (
            f"v{v.version}: {v.source}"
        )
        assert v.source.startswith(run.info.artifact_uri), f"v{v.version} source outside its run's artifacts"
        registered_runs.add(v.run_id)
    for r in trial_runs:
        if r.info.run_id not in registered_runs:
            merged = local_path(f"{r.info.artifact_uri}/merged")
            assert merged is not None and not merged.exists(), f"unregistered weights left at {merged}"

    # Promote the campaign's best, then every alias must point at an existing version with its weights.
    store = Store.resolve(tmp_path / "unused", tracking_uri=mlflow_server.uri, optuna_storage=optuna_url)
    evaluator = HFEvaluator(data_root=str(data), batch_size=8, limit=8, device="cpu")
    decision = promotion.promote(name, campaign=name, evaluator=evaluator, store=store)
    assert decision.decision == "champion"
    model = client.get_registered_model(name)
    assert set(model.aliases) >= {"champion"}
    live = {v.version for v in client.search_model_versions(f"name='{name}'")}
    for alias, version in model.aliases.items():
        assert str(version) in live, f"alias {alias} -> missing version {version}"
    champion_dir = reg.resolve_model_dir(store, f"models:/{name}@champion")
    assert champion_dir == local_path(client.get_model_version_by_alias(name, "champion").source)
