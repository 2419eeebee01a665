"""Several processes opening a fresh store at once: MLflow's schema is created once, every worker gets through.

MLflow builds its schema (``create_all`` and the alembic migrations) the first time a process opens an empty SQL
database; workers that open a fresh store together raced in those migrations and the losers died with an alembic
error ("Online migration expected to match one row", a duplicate ``alembic_version`` key, a CircularDependencyError).
:meth:`Store.client` serialises the first initialisation (a file lock next to a SQLite database, a PostgreSQL advisory
lock). Optuna's RDB storage has the same race (``open_storage`` retries it). Each test starts ``N`` processes that
import everything, wait at a barrier, then open Optuna's storage and create a study, open the MLflow store and create
an experiment and a run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from tests import pg
except ImportError:  # tests/ is not a package: pytest puts it on sys.path itself
    import pg  # type: ignore[no-redef]

postgres = pg.postgres  # the session fixture

ROOT = Path(__file__).resolve().parents[1]
N = 4

_WORKER = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
import optuna
from mergelab.platform.campaign import open_storage
from mergelab.platform.store import Store
root, go, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(go.parent / f"ready-{me}").touch()
while not go.exists():
    time.sleep(0.005)
store = Store.resolve(root)
tracking = SimpleNamespace(heartbeat_interval=60, grace_period=120)
storage = open_storage(SimpleNamespace(tracking=tracking), store)  # Optuna's schema: the same race
optuna.create_study(storage=storage, study_name="init-race", load_if_exists=True)
client = store.client()
eid = store.experiment_id("init-race", client)
run = client.create_run(eid, run_name=f"worker-{me}")
client.set_terminated(run.info.run_id)
print(run.info.run_id)
"""


def _race(root: Path, sync: Path, env: dict[str, str], n: int = N) -> list[subprocess.CompletedProcess]:
    """Start ``n`` workers, release them together once all are ready, and collect them."""
    sync.mkdir(parents=True, exist_ok=True)
    go = sync / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "PYTHONPATH": str(ROOT), **env}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(root), str(go), str(i)], env=env, cwd=sync,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    end = time.monotonic() + 180
    while len(list(sync.glob("ready-*"))) < n and time.monotonic() < end:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    go.touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _check(results: list[subprocess.CompletedProcess], uri: str, optuna_uri: str) -> None:
    failed = [[ln for ln in r.stderr.splitlines() if "Error" in ln][-1:] for r in results if r.returncode != 0]
    assert not failed, f"{len(failed)}/{len(results)} workers failed: {failed}"
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("init-race")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(r.stdout.strip() for r in results)
    assert all(r.info.status == "FINISHED" for r in runs)
    import optuna

    assert [s.study_name for s in optuna.get_all_study_summaries(optuna_uri)] == ["init-race"]


@pytest.mark.parametrize("templates", ["off", "new"])
def test_fresh_sqlite_store_opened_by_several_processes(templates: str, tmp_path: Path) -> None:
    """With the store templates off (MLflow migrates the store) and with a new templates directory (the first
    worker builds the template, and every worker opens the copy)."""
    root = tmp_path / "mlruns"
    env = {"MERGELAB_ROOT": str(root),
           "MERGELAB_STORE_TEMPLATES": "off" if templates == "off" else str(tmp_path / "templates")}
    for k in ("MLFLOW_TRACKING_URI", "MERGELAB_OPTUNA_STORAGE", "MERGELAB_ARTIFACT_ROOT"):
        env[k] = ""  # the embedded store under root, whatever the caller's environment says
    results = _race(root, tmp_path / "sync", env)
    _check(results, f"sqlite:///{root / 'mlflow.db'}", f"sqlite:///{root / 'optuna.db'}")


def test_fresh_postgres_store_opened_by_several_processes(postgres: pg.PostgresServer, tmp_path: Path) -> None:
    url, optuna_url = postgres.create_database("init_race"), postgres.create_database("init_race_optuna")
    env = {"MLFLOW_TRACKING_URI": url, "MERGELAB_ARTIFACT_ROOT": (tmp_path / "artifacts").as_uri(),
           "MERGELAB_OPTUNA_STORAGE": optuna_url}
    results = _race(tmp_path / "mlruns", tmp_path / "sync", env)
    _check(results, url, optuna_url)
