"""A fresh SQLite store copied from the schema template (issue 22: a first tracked merge into a new store paid seconds
of MLflow's migrations). The copy is the store MLflow creates itself (schema, alembic revision, rows), it passes
MLflow's own schema check and upgrade, the client, the registry and ``mlflow server`` use it; a corrupt or
mismatched template is rebuilt, an unusable template directory leaves the store to MLflow, an existing database is
never replaced, and concurrent first uses each end with a valid store."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mergelab.platform import store_template
from mergelab.platform.store import Store

try:
    from tests import pg
except ImportError:  # tests/ is not a package: pytest puts it on sys.path itself
    import pg  # type: ignore[no-redef]

Snapshot = tuple[list[tuple[Any, ...]], dict[str, list[tuple[Any, ...]]]]


def _definition(sql: str | None) -> tuple[str, ...]:
    """A schema object's SQL as the set of its lines, commas dropped: MLflow's own migrations write a table's
    constraints in an order that follows Python's string hashing (two stores it creates with different
    ``PYTHONHASHSEED`` differ so), which SQLite does not care about."""
    return tuple(sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))


def _snapshot(db: Path) -> Snapshot:
    """A database's schema (every table, index and trigger with its definition) and rows, the times at which
    experiment 0 was created left out (the store's only content that depends on when it was opened)."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        schema = sorted(((t, n, tbl, _definition(sql)) for t, n, tbl, sql in
                         con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")), key=repr)
        rows = {}
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            cols = [c[1] for c in con.execute(f'PRAGMA table_info("{table}")')]
            keep = [c for c in cols if not (table == "experiments" and c.endswith("_time"))]
            rows[table] = sorted(con.execute(f'SELECT {", ".join(keep)} FROM "{table}"'), key=repr)
    return schema, rows


def _db(store: Store) -> Path:
    return Path(store.tracking_uri.removeprefix("sqlite:///"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A templates directory holding the installed MLflow's template (built once per module)."""
    directory = tmp_path_factory.mktemp("store-templates")
    store_template.build(store_template.template_path(directory))
    return directory


@pytest.fixture(scope="module")
def normal(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """The snapshot of a store MLflow created the normal way (no template: its migrations)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(store_template.ENV, "off")
        store = Store.resolve(tmp_path_factory.mktemp("normal-store"))
        store.client()
    assert not list(_db(store).parent.glob("*.tmp"))
    return _snapshot(_db(store))


@pytest.fixture
def templates(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the built templates directory, in use (``$MERGELAB_STORE_TEMPLATES``)."""
    directory = tmp_path / "templates"
    shutil.copytree(built, directory)
    monkeypatch.setenv(store_template.ENV, str(directory))
    return directory


def test_a_store_from_the_template_is_the_store_mlflow_creates(normal: Snapshot, templates: Path,
                                                                  tmp_path: Path) -> None:
    from mlflow.store.db import utils as mlflow_db

    store = Store.resolve(tmp_path / "mlruns")
    assert store_template.seed(_db(store))
    store.client()
    assert _snapshot(_db(store)) == normal
    assert normal[1]["alembic_version"] == [(store_template.schema_head(),)]
    # `mlflow db upgrade` level: MLflow's own schema check passes and upgrading to its head changes nothing
    engine = mlflow_db.create_sqlalchemy_engine(store.tracking_uri)
    try:
        mlflow_db._verify_schema(engine)
        mlflow_db._upgrade_db(engine)
    finally:
        engine.dispose()
    assert _snapshot(_db(store)) == normal
    assert sorted(p.name for p in _db(store).parent.iterdir()) == [".mlflow-init.lock", "mlflow.db"]


def _use(store: Store, model_dir: Path) -> tuple[str, str]:
    """Runs, metrics, artifacts and the registry on ``store``; returns the experiment and run ids."""
    client = store.client()
    exp_id = store.experiment_id("template-check", client)
    run_id = client.create_run(exp_id, run_name="r").info.run_id
    client.log_param(run_id, "method", "ties")
    client.log_metric(run_id, "val/average", 61.5)
    client.log_dict(run_id, {"a": 1}, "config/merge.yaml")
    client.set_terminated(run_id)
    client.create_registered_model("tmpl-model")
    version = client.create_model_version("tmpl-model", model_dir.resolve().as_uri(), run_id=run_id)
    client.set_registered_model_alias("tmpl-model", "champion", version.version)
    assert client.get_model_version_by_alias("tmpl-model", "champion").run_id == run_id
    (run,) = client.search_runs([exp_id], "metrics.`val/average` > 60")
    assert run.data.params == {"method": "ties"} and run.info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(run_id, "config")] == ["config/merge.yaml"]
    return exp_id, run_id


@pytest.mark.slow
def test_the_client_the_registry_and_mlflow_server_use_a_store_from_the_template(templates: Path,
                                                                                  tmp_path: Path) -> None:
    store = Store.resolve(tmp_path / "mlruns")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    exp_id, run_id = _use(store, model_dir)
    assert store_template.check(store_template.template_path(templates)) is None  # the copy's writes stay there
    server = pg.start_mlflow_server(store.tracking_uri, tmp_path / "server-artifacts", tmp_path / "server")
    try:
        def get(path: str) -> dict[str, Any]:
            with urllib.request.urlopen(f"{server.uri}{path}", timeout=30) as r:
                return json.loads(r.read())

        run = get(f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
        assert run["info"]["experiment_id"] == exp_id and run["info"]["status"] == "FINISHED"
        alias = get("/api/2.0/mlflow/registered-models/alias?name=tmpl-model&alias=champion")
        assert alias["model_version"]["run_id"] == run_id
        with urllib.request.urlopen(f"{server.uri}/", timeout=30) as r:  # the UI's page
            assert r.status == 200
    finally:
        server.stop()


def _corrupt(path: Path) -> None:
    path.write_bytes(b"not a database" * 100)


def _old_revision(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute("UPDATE alembic_version SET version_num = '0123456789ab'")
        con.commit()


def _with_experiment(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute("INSERT INTO experiments (name, workspace, artifact_location, lifecycle_stage) "
                    "VALUES ('stale', 'default', '/elsewhere', 'active')")
        con.commit()


@pytest.mark.parametrize("spoil", [_corrupt, _old_revision, _with_experiment], ids=lambda f: f.__name__[1:])
def test_an_invalid_template_is_built_again(spoil: Any, normal: Snapshot, templates: Path, tmp_path: Path) -> None:
    tpl = store_template.template_path(templates)
    spoil(tpl)
    assert store_template.check(tpl) is not None
    store = Store.resolve(tmp_path / "mlruns")
    store.client()
    assert store_template.check(tpl) is None
    assert _snapshot(_db(store)) == normal


def test_an_unusable_template_directory_leaves_the_store_to_mlflow(normal: Snapshot, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    monkeypatch.setenv(store_template.ENV, str(not_a_dir))
    store = Store.resolve(tmp_path / "mlruns")
    assert not store_template.seed(_db(store))
    assert not _db(store).exists()
    store.client()
    assert _snapshot(_db(store)) == normal


def test_templates_off_and_an_existing_database_are_left_alone(templates: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "mlflow.db"
    shutil.copy(store_template.template_path(templates), db)
    _with_experiment(db)
    before = _snapshot(db)
    assert not store_template.seed(db)
    assert _snapshot(db) == before
    monkeypatch.setenv(store_template.ENV, "off")
    assert store_template.template_dir() is None
    assert not store_template.seed(tmp_path / "other.db") and not (tmp_path / "other.db").exists()


def test_concurrent_first_uses_each_get_a_valid_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "templates"  # empty: the first thread builds the template, the others wait for it
    monkeypatch.setenv(store_template.ENV, str(directory))
    dbs = [tmp_path / f"s{i}" / "mlflow.db" for i in range(3)]
    for db in dbs:
        db.parent.mkdir()
    go = threading.Barrier(len(dbs))
    seeded: list[bool] = []

    def first_use(db: Path) -> None:
        go.wait()
        seeded.append(store_template.seed(db))

    threads = [threading.Thread(target=first_use, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seeded == [True] * len(dbs)
    tpl = store_template.template_path(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted([tpl.name, f".{tpl.stem}-init.lock"])
    assert store_template.check(tpl) is None
    assert all(_snapshot(db) == _snapshot(tpl) for db in dbs)


def test_a_failed_build_leaves_nothing_and_the_store_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "templates"
    monkeypatch.setenv(store_template.ENV, str(directory))

    def broken(engine: Any) -> None:
        raise RuntimeError("a change in MLflow's internals")

    monkeypatch.setattr(store_template.mlflow_db, "_initialize_tables", broken)
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    assert not store_template.seed(db)
    assert not db.exists() and not list(db.parent.iterdir())
    assert [p.name for p in directory.iterdir()] == [f".{store_template.template_path(directory).stem}-init.lock"]
