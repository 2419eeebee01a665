"""A fresh SQLite MLflow store, copied from a schema template instead of migrated from nothing.

MLflow builds its schema the first time a process opens an empty database: ``create_all`` of its initial tables, then
every alembic migration since (68 in MLflow 3.17), 2-6 s of pure-Python CPU, most of what a first tracked merge
into a new store costs on top of one into an existing store. The result depends only on the installed MLflow,
alembic, SQLAlchemy and SQLite, so it is built once per installed combination into a template database and every
later fresh store is a copy of it (a 1 MB file copy, milliseconds).

The template is exactly what MLflow's tracking store creates on an empty database (the same private function,
``mlflow.store.db.utils._initialize_tables``, on an engine made by MLflow's own ``create_sqlalchemy_engine``): the
tables and indexes, the ``alembic_version`` row at MLflow's head revision, the ``default`` workspace row, and no
experiment. Experiment 0 (``Default``) is not in it: its artifact location names the working directory of the
process that first opens the store, so MLflow adds it on that first opening, as it does for a store it migrated.

Where it lives: ``$MERGELAB_STORE_TEMPLATES`` (a directory; ``off``, ``0`` or empty: no template, MLflow builds
every fresh store itself), else ``$XDG_CACHE_HOME/mergelab/store-templates`` (``~/.cache`` when unset), one file per
key: ``mlflow-<version>-<alembic head>-alembic-<version>-sqlalchemy-<version>-sqlite-<version>.db``. It is built by
one process at a time (a ``flock`` beside it, as for a store's first opening; concurrent first uses wait for it),
under a temporary name renamed into place, and checked before each copy: SQLite's ``quick_check``, the alembic
revision equal to MLflow's head, every table of MLflow's models present, no experiment. A template that fails a
check is built again in its place; anything that goes wrong (no usable cache directory, a change in MLflow's
internals) leaves the database alone and MLflow creates it the normal way. The copy is written beside the database
under a temporary name and hard-linked into place, which fails when the database exists by then: an existing
database is never replaced.

This module imports mlflow: :meth:`~mergelab.platform.store.Store.client` imports it only when it opens a store.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import sqlite3
import threading
from pathlib import Path

import alembic
import mlflow
import mlflow.store.db.utils as mlflow_db
import sqlalchemy

from mergelab.platform.store import schema_lock

log = logging.getLogger(__name__)

_BUILD_LOCK = threading.Lock()  # alembic's migration context is process-global: one build at a time per process

ENV = "MERGELAB_STORE_TEMPLATES"
"""The environment variable naming the templates' directory (``off``, ``0`` or empty: no templates)."""


def template_dir() -> Path | None:
    """The templates' directory: ``$MERGELAB_STORE_TEMPLATES`` (``off``, ``0``, ``none`` or empty: ``None``), else
    ``$XDG_CACHE_HOME/mergelab/store-templates`` (``~/.cache`` when unset)."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "none") else Path(env).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mergelab" / "store-templates"


@functools.cache
def schema_head() -> str:
    """MLflow's alembic head revision: the schema version a store it creates or upgrades has (read once per
    process from its migration scripts)."""
    return str(mlflow_db._get_latest_schema_revision())


def template_path(directory: Path) -> Path:
    """The template of the installed MLflow, alembic head, alembic, SQLAlchemy and SQLite in ``directory``."""
    key = (f"mlflow-{mlflow.__version__}-{schema_head()}-alembic-{alembic.__version__}"
           f"-sqlalchemy-{sqlalchemy.__version__}-sqlite-{sqlite3.sqlite_version}")
    return directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.db"


def build(path: Path) -> None:
    """Build the template at ``path``: MLflow's schema on an empty database, under a temporary name renamed into
    place (what was at ``path`` is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        engine = mlflow_db.create_sqlalchemy_engine(f"sqlite:///{tmp}")
        try:
            mlflow_db._initialize_tables(engine)
        finally:
            engine.dispose()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed build leaves nothing behind


def check(path: Path) -> str | None:
    """What is wrong with the template at ``path`` (one line), or ``None`` when it is a pristine store at MLflow's
    head revision: SQLite's ``quick_check`` passes, ``alembic_version`` holds exactly the head, every table of
    MLflow's models exists, and it holds no experiment."""
    if not path.is_file():
        return "missing"
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        return f"cannot open: {e}"
    try:
        with contextlib.closing(con):
            if con.execute("PRAGMA quick_check").fetchone() != ("ok",):
                return "SQLite quick_check failed"
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = set(mlflow_db.Base.metadata.tables) - tables
            if missing or "alembic_version" not in tables:
                return f"tables missing: {sorted(missing) or ['alembic_version']}"
            versions = [r[0] for r in con.execute("SELECT version_num FROM alembic_version")]
            if versions != [schema_head()]:
                return f"alembic revision {versions}, MLflow's head is {schema_head()}"
            if con.execute("SELECT count(*) FROM experiments").fetchone() != (0,):
                return "holds experiments"
    except sqlite3.Error as e:
        return f"unreadable: {e}"
    return None


def ready_template(directory: Path) -> Path:
    """The valid template in ``directory``, built first when it is missing or fails :func:`check` (one builder at
    a time: threads of this process and, with ``flock``, other processes wait for it and then use its template).

    Raises:
        OSError, sqlite3.Error, RuntimeError: the template could not be built (or the one built is invalid).
    """
    tpl = template_path(directory)
    if check(tpl) is None:
        return tpl
    directory.mkdir(parents=True, exist_ok=True)
    with _BUILD_LOCK, schema_lock(f"sqlite:///{tpl}"):
        problem = check(tpl)
        if problem is None:
            return tpl  # built meanwhile by another process
        if problem != "missing":
            log.info("store template %s: %s; building it again", tpl, problem)
        build(tpl)
        problem = check(tpl)
        if problem is not None:
            raise RuntimeError(f"the template just built: {problem}")
    return tpl


def seed(db: Path) -> bool:
    """Make the SQLite database ``db``, when it does not exist, a copy of the template (built first when missing or
    invalid). Never raises and never replaces an existing file.

    Args:
        db: the database file of a ``sqlite:///`` tracking URI.

    Returns:
        Whether ``db`` is now a copy of the template; ``False``: it existed already, templates are off, or
        something failed (logged at debug level), and MLflow creates or opens it the normal way.
    """
    directory = template_dir()
    if directory is None or db.exists():
        return False
    try:
        tpl = ready_template(directory)
        tmp = _tmp_name(db)
        try:
            shutil.copyfile(tpl, tmp)
            os.link(tmp, db)  # fails when db exists by now: never replaced
        finally:
            tmp.unlink(missing_ok=True)
    except Exception as e:  # noqa: BLE001 - MLflow creates the store itself
        log.debug("no store template for %s: %s: %s", db, type(e).__name__, e)
        return False
    return True


def _tmp_name(path: Path) -> Path:
    """A temporary name beside ``path``, unique to this process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
