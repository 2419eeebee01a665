"""The MLflow store: where runs, artifacts, the registry and Optuna studies live, and how mergelab writes to it.

By default everything lives under ``mlruns/``: ``mlruns/mlflow.db`` (tracking and registry, SQLite),
``mlruns/artifacts/`` (artifact root, always passed as ``artifact_location`` when an experiment is created) and
``mlruns/optuna.db`` (Optuna's own RDB; never the MLflow file, both use alembic). A new ``mlflow.db`` is a copy of a
schema template built once per installed MLflow (:mod:`mergelab.platform.store_template`). ``MLFLOW_TRACKING_URI`` and
``MERGELAB_OPTUNA_STORAGE`` override the URIs (PostgreSQL, an ``http://`` tracking server), so the code is
storage-agnostic. Library code talks to MLflow only through an explicit ``MlflowClient(tracking_uri)`` and explicit
run ids: no fluent active-run stack, so trials in threads or other processes nest under their campaign by the
``mlflow.parentRunId`` tag. This module also holds the tag names mergelab sets and the helpers that log params,
metrics and tables with MLflow-safe names.
"""


from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import sqlalchemy
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from mlflow import MlflowClient

try:
    import fcntl
except ImportError:  # Windows: no flock, the first initialisation of a SQLite store is not serialised there
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


DEFAULT_ROOT = "mlruns"


DEFAULT_EXPERIMENT = "mergelab"


TAG_ROLE = "mergelab.role"  # "merge" | "trial" | "campaign"


TAG_CAMPAIGN = "mergelab.campaign"


TAG_TRIAL = "mergelab.trial"


TAG_MERGED = "mergelab.merged_uri"


TAG_WEIGHTS = "mergelab.weights"  # "present" | "deleted"


TAG_ERROR = "mergelab.error"
TAG_RECIPE = "mergelab.recipe"  # the recipe's digest: the merge's identity


TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
"""MLflow 3's experiment-kind tag; mergelab's experiments are ``custom_model_development`` (not GenAI)."""


EXPERIMENT_KIND = "custom_model_development"


TAG_DESCRIPTION = "mlflow.note.content"
"""The UI's description of an experiment or run (markdown)."""


EXPERIMENT_DESCRIPTION = (
    "Model merging with mergelab: one run per merge (params: the recipe; metrics: `val/<task>`, `val/average`, "
    "`test/*` on selected and registered merges), nested under a comparison or campaign run; reference runs "
    "(`mergelab.role = reference`: base, experts, mixture) carry the same metric names. Registered versions and "
    "the `champion` alias are on the Models page."
)


@dataclasses.dataclass(frozen=True)
class Store:
    """Where runs, artifacts, the registry and Optuna studies live.

    Attributes:
        tracking_uri: MLflow tracking (and registry) URI, e.g. ``sqlite:////abs/mlruns/mlflow.db``.
        artifact_root: artifact location given to new experiments, e.g. ``file:///abs/mlruns/artifacts``.
            ``None`` lets a tracking server choose (``--default-artifact-root``).
        optuna_storage: Optuna RDB URL, e.g. ``sqlite:////abs/mlruns/optuna.db`` (a separate file from MLflow's).
    """

    tracking_uri: str
    artifact_root: str | None
    optuna_storage: str

    @classmethod
    def resolve(
        cls,
        root: str | os.PathLike[str] | None = None,
        *,
        tracking_uri: str | None = None,
        artifact_root: str | None = None,
        optuna_storage: str | None = None,
    ) -> Store:
        """Resolve the store: explicit arguments, then the environment, then the embedded default under ``root``.

        Args:
            root: directory of the embedded store (default ``$MERGELAB_ROOT`` or ``./mlruns``).
            tracking_uri: overrides ``MLFLOW_TRACKING_URI``.
            artifact_root: overrides ``MERGELAB_ARTIFACT_ROOT``; by default ``<root>/artifacts`` for a local
                (sqlite) store and the server's choice for ``http(s)://`` tracking URIs.
            optuna_storage: overrides ``MERGELAB_OPTUNA_STORAGE``.

        Returns:
            The resolved :class:`Store`; the embedded root directory is created when it is used.
        """
        base = Path(root or os.environ.get("MERGELAB_ROOT") or DEFAULT_ROOT).expanduser().resolve()
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{base / 'mlflow.db'}"
        art = artifact_root or os.environ.get("MERGELAB_ARTIFACT_ROOT")
        if art is None and not uri.startswith(("http://", "https://", "databricks")):
            art = (base / "artifacts").as_uri()
        opt = optuna_storage or os.environ.get("MERGELAB_OPTUNA_STORAGE") or f"sqlite:///{base / 'optuna.db'}"
        if _same_sqlite_file(uri, opt):
            raise ValueError(
                f"Optuna storage {opt!r} is the MLflow database {uri!r}: give Optuna its own file "
                "(both keep an alembic_version table and would overwrite each other's schema version)"
            )
        for u in (uri, opt):
            if u.startswith("sqlite:///"):
                Path(u.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return cls(tracking_uri=uri, artifact_root=art, optuna_storage=opt)

    def client(self) -> MlflowClient:
        """A client bound to this store's tracking and registry URI (no process-global state).

        The first client of a SQL store in a process is made under :func:`schema_lock`: MLflow creates its schema
        (tables, then the alembic migrations) when a process first opens an empty database, and workers opening a
        fresh store together raced in it (the losers died with an alembic or duplicate-table error). Later calls
        take no lock. A SQLite database that does not exist yet is first made a copy of the installed MLflow's schema
        template (:func:`~mergelab.platform.store_template.seed`: milliseconds instead of seconds of migrations).
        """
        # imported here, not at the top: `import mlflow` costs seconds, and the merging process of `mergelab merge`
        # imports this module but never mlflow (its tracking child process opens the store: platform/track_child.py);
        # store_template imports mlflow too
        from mlflow import MlflowClient

        from mergelab.platform import store_template

        uri = self.tracking_uri
        if uri in _SCHEMA_READY or not uri.startswith(_SQL_SCHEMES):
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
        with _SCHEMA_READY_LOCK, schema_lock(uri):
            db = sqlite_path(uri)
            if db is not None:
                store_template.seed(db)
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # builds (or verifies) the tracking schema
            client.search_registered_models(max_results=1)  # the registry store checks the same schema
            _SCHEMA_READY.add(uri)
        return client

    def experiment_id(self, name: str = DEFAULT_EXPERIMENT, client: MlflowClient | None = None,
                      description: str = EXPERIMENT_DESCRIPTION) -> str:
        """Get or create experiment ``name``: always with an explicit ``artifact_location`` (else the SQLite
        backend puts artifacts under the cwd of whichever process first touched the database), tagged as a classic
        ML experiment (:data:`TAG_EXPERIMENT_KIND`) with ``description``. An existing experiment without the kind
        tag (made by an older mergelab) gets both tags."""
        from mlflow.exceptions import MlflowException  # lazy, as in client()

        client = client or self.client()
        tags = {TAG_EXPERIMENT_KIND: EXPERIMENT_KIND, TAG_DESCRIPTION: description}
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if TAG_EXPERIMENT_KIND not in exp.tags:
                for k, v in tags.items():
                    if k not in exp.tags:
                        client.set_experiment_tag(exp.experiment_id, k, v)
            return exp.experiment_id
        location = None
        if self.artifact_root is not None:
            location = f"{self.artifact_root.rstrip('/')}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
        try:
            return client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException:  # created concurrently by another worker
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


_SQL_SCHEMES = ("sqlite:", "postgresql", "mysql", "mssql")
_SCHEMA_READY: set[str] = set()  # the SQL stores this process has opened under the lock
_SCHEMA_READY_LOCK = threading.Lock()
_PG_LOCK_KEY = 0x6D657267656C6162  # "mergelab": a session-level advisory lock (scoped to the database)


@contextlib.contextmanager
def schema_lock(uri: str) -> Iterator[None]:
    """Serialise the first opening of SQL database ``uri`` (schema creation, migrations) across processes.

    A SQLite database ``<dir>/<name>.db`` is locked with ``flock`` on ``<dir>/.<name>-init.lock`` (POSIX), a
    PostgreSQL database with a session-level advisory lock on a separate connection. Other databases (MySQL,
    MSSQL), ``sqlite://`` in memory and Windows take no lock. Usable for MLflow's store and Optuna's RDB storage
    alike: both build their schema with alembic on first use.

    Args:
        uri: the SQLAlchemy URL of the database.
    """
    with contextlib.ExitStack() as stack:
        db = sqlite_path(uri)
        if db is not None and fcntl is not None:
            try:
                fh = stack.enter_context(open(db.parent / f".{db.stem}-init.lock", "a"))
            except OSError as e:  # a read-only directory: MLflow reports what is wrong with it
                log.debug("no init lock for %s: %s", uri, e)
            else:
                fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file is closed
        elif uri.startswith("postgresql"):
            engine = sqlalchemy.create_engine(uri, poolclass=NullPool)
            stack.callback(engine.dispose)
            try:
                conn = stack.enter_context(engine.connect())
            except SQLAlchemyError as e:  # unreachable: MLflow retries and reports it
                log.debug("no init lock for %s: %s", uri, e)
            else:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
                stack.callback(conn.execute, sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
        yield


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (its query string dropped), else ``None``."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def _same_sqlite_file(a: str, b: str) -> bool:
    if not (a.startswith("sqlite:///") and b.startswith("sqlite:///")):
        return False
    return Path(a.removeprefix("sqlite:///")).resolve() == Path(b.removeprefix("sqlite:///")).resolve()


def local_path(uri: str) -> Path | None:
    """The local filesystem path of a ``file://`` URI or plain path, else ``None`` (remote artifact store)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


_BAD = re.compile(r"[^0-9A-Za-z_\-./ :]")


def metric_name(name: str) -> str:
    """An MLflow-safe metric/param name: ``,`` ``[`` ``]`` and other illegal characters become ``_`` (pitfall 9)."""
    return _BAD.sub("_", name)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to ``a/b/c`` keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def numeric_value(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def _param_value(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params in batches of 100, names sanitised and values stringified (MLflow limits)."""
    from mlflow.entities import Param

    items = [Param(metric_name(k), _param_value(v)[:6000]) for k, v in params.items() if v is not None]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log numeric metrics in batches of 1000 (names sanitised; non-numeric values skipped)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = []
    for k, v in metrics.items():
        x = numeric_value(v)
        if x is not None:
            items.append(Metric(metric_name(k), x, ts, step))
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def log_scores(client: MlflowClient, run_id: str, scores: Mapping[str, float], step: int = 0) -> None:
    """Log evaluation scores (percentages over a few thousand items at most) rounded to 4 decimals: that keeps every
    distinction and spares the UI float noise such as 60.9839999 (callers keep the exact values)."""
    log_metrics(client, run_id, {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}, step)


def records_table(records: Iterable[Mapping[str, Any]]) -> dict[str, list[Any]]:
    rows = list(records)
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    table: dict[str, list[Any]] = {c: [] for c in cols}
    for r in rows:
        for c in cols:
            v = r.get(c)
            table[c].append(v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str))
    return table


def log_table(client: MlflowClient, run_id: str, data: Mapping[str, list[Any]], artifact_file: str) -> None:
    """Log (or replace) an MLflow table artifact.

    ``MlflowClient.log_table`` *appends* to an existing table; a re-logged table (a campaign summarised again by
    another worker, a promotion re-evaluating on test) must replace it, so later writes overwrite the JSON file in
    the same ``orient="split"`` format, keeping the UI's table view (registered by the first ``log_table``).
    """
    import pandas as pd

    folder = os.path.dirname(artifact_file)
    existing = {f.path for f in client.list_artifacts(run_id, folder or None)}
    if artifact_file not in existing:
        client.log_table(run_id, data=dict(data), artifact_file=artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / os.path.basename(artifact_file)
        path.write_text(pd.DataFrame(dict(data)).to_json(orient="split", index=False, date_format="iso"))
        client.log_artifact(run_id, str(path), folder or None)


def run_artifact_path(client: MlflowClient, run_id: str, sub: str = "") -> tuple[str, Path | None]:
    """The artifact URI of ``sub`` inside a run, and its local path when the artifact store is local."""
    uri = client.get_run(run_id).info.artifact_uri.rstrip("/")
    full = f"{uri}/{sub}" if sub else uri
    return full, local_path(full)


def end_status(error: BaseException | str) -> str:
    """The MLflow status of a run ended by ``error``: KILLED for an interrupt (Ctrl-C, or SIGTERM raised as one by
    the CLI), FAILED otherwise."""
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def end_run_as(client: MlflowClient, run_id: str, status: str, tags: Mapping[str, str]) -> None:
    """Set ``tags`` on a run and end it with ``status`` (best effort: a failure is logged, never raised, so that it
    never masks the error that ended the run)."""
    try:
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        client.set_terminated(run_id, status=status)
    except Exception as e:  # noqa: BLE001 - the store itself may be what failed
        log.warning("could not mark run %s %s: %s", run_id, status, e)


def fail_run(client: MlflowClient, run_id: str, error: BaseException | str) -> None:
    """Mark a run FAILED (KILLED when interrupted) and record the error (best effort: never masks the original
    exception)."""
    end_run_as(client, run_id, end_status(error),
               {TAG_ERROR: (repr(error) if isinstance(error, BaseException) else error)[:5000]})

