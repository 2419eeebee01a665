"""MLflow tracking for merges: the embedded store, and one MLflow run per merge (``mergelab merge`` or a trial).

Store (spec/ecosystem.md section 2 and pitfalls 3-6, 9, 12): by default everything lives under ``mlruns/``:
``mlruns/mlflow.db`` (tracking and registry, SQLite), ``mlruns/artifacts/`` (artifact root, always passed as
``artifact_location`` when an experiment is created) and ``mlruns/optuna.db`` (Optuna's own RDB; never the MLflow
file, both use alembic). ``MLFLOW_TRACKING_URI`` and ``MERGELAB_OPTUNA_STORAGE`` override the URIs (PostgreSQL, an
``http://`` tracking server), so the code is storage-agnostic. Library code talks to MLflow only through an explicit
``MlflowClient(tracking_uri)`` and explicit run ids (STYLE.md section 3 point 9): no fluent active-run stack, so
trials in threads or other processes nest under their campaign by the ``mlflow.parentRunId`` tag.

Stable metric names of a tracked merge (the UI's compare view lines them up):

========================== ==================================================================================
``val/<task>/<metric>``     every metric of the evaluator's ``.metrics`` (e.g. ``val/vqa/accuracy``)
``val/<task>``              the primary score of each task, percent
``val/average``             unweighted mean of the per-task primary scores (the paper's "Avg")
``val/worst_task``          the minimum per-task primary score
``val/normalized_average``  mean over tasks of ``100 * score / own-task expert score`` (where the expert's is known)
``merge/seconds``           wall seconds of the merge as measured around the engine call
``merge/peak_host_mb``      peak resident host memory of the process (MiB)
``merge/peak_gpu_mb``       peak allocated CUDA memory during the merge (MiB; 0 on CPU)
``merge/report/<key>``      every numeric total of the engine's ``MergeReport``
``test/...``                the same names on the test split (registered candidates and promotion only)
========================== ==================================================================================

Params: ``method``, ``hp.<name>`` (every field of the method's config dataclass, defaults included),
``policy``, ``device``, ``dtype``, ``compute_dtype``, ``seed``, ``base.path``/``base.sha256``,
``expert.<i>.name/path/sha256/coefficient``, ``version.<package>``, ``git.commit``.
Artifacts: ``config/merge.yaml``, ``merge_report.json``, ``predictions/val.json`` (an MLflow table),
``charts/val_scores.png`` and the merged weights under ``merged/`` (written once, by the engine, in place).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_ROOT = "mlruns"
DEFAULT_EXPERIMENT = "mergelab"
TAG_ROLE = "mergelab.role"  # "merge" | "trial" | "campaign"
TAG_CAMPAIGN = "mergelab.campaign"
TAG_TRIAL = "mergelab.trial"
TAG_MERGED = "mergelab.merged_uri"
TAG_WEIGHTS = "mergelab.weights"  # "present" | "deleted"
TAG_ERROR = "mergelab.error"


# --------------------------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------------------------


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
                "(both use alembic; spec/ecosystem.md pitfall 6)"
            )
        for u in (uri, opt):
            if u.startswith("sqlite:///"):
                Path(u.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return cls(tracking_uri=uri, artifact_root=art, optuna_storage=opt)

    def client(self) -> MlflowClient:
        """A client bound to this store's tracking and registry URI (no process-global state)."""
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def experiment_id(self, name: str = DEFAULT_EXPERIMENT, client: MlflowClient | None = None) -> str:
        """Get or create experiment ``name`` (always with an explicit ``artifact_location``; pitfall 5)."""
        client = client or self.client()
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.artifact_root is not None:
            location = f"{self.artifact_root.rstrip('/')}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created concurrently by another worker
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


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


# --------------------------------------------------------------------------------------------------------------
# Provenance: content hashes, package versions, git commit
# --------------------------------------------------------------------------------------------------------------

_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def content_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 over a checkpoint's files (relative names and bytes, sorted), memoised per (path, size, mtime).

    Args:
        path: a file or a checkpoint/adapter directory. Hidden files and sub-directories starting with ``.`` are
            skipped.

    Returns:
        The hex digest.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"expert/base path not found: {p}")
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    stat_key = sum(f.stat().st_size for f in files), max((f.stat().st_mtime_ns for f in files), default=0)
    key = (str(p.resolve()), stat_key[0], stat_key[1])
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = digest
    return digest


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine a merge's result (logged as ``version.<name>`` params)."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("mergelab", "torch", "transformers", "safetensors", "peft", "mlflow", "optuna"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def git_commit() -> str | None:
    """The commit of the repository holding this package (``+dirty`` when modified), or ``None``."""
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


# --------------------------------------------------------------------------------------------------------------
# Names and values
# --------------------------------------------------------------------------------------------------------------

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


def _numeric(v: Any) -> float | None:
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
        x = _numeric(v)
        if x is not None:
            items.append(Metric(metric_name(k), x, ts, step))
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


# --------------------------------------------------------------------------------------------------------------
# Evaluation adapter
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalSummary:
    """Evaluation results in the shape the platform logs (mirrors ``mergelab.evaluators``' result).

    Attributes:
        split: ``"val"`` or ``"test"``.
        scores: primary score per task, percent.
        metrics: flat MLflow-safe metric names without the split prefix (``"vqa/accuracy"``).
        records: per-sample dicts (task, id, prompt, prediction, references, score).
    """

    split: str
    scores: dict[str, float]
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def average(self) -> float:
        """Unweighted mean of the per-task scores (NaN when empty)."""
        return sum(self.scores.values()) / len(self.scores) if self.scores else math.nan

    @property
    def worst_task(self) -> float:
        """The minimum per-task score (NaN when empty)."""
        return min(self.scores.values()) if self.scores else math.nan

    def normalized_average(self, reference: Mapping[str, float] | None) -> float | None:
        """Mean over tasks of ``100 * score / reference[task]`` for tasks with a positive reference score."""
        if not reference:
            return None
        ratios = [100.0 * s / reference[t] for t, s in self.scores.items() if reference.get(t, 0) > 0]
        return sum(ratios) / len(ratios) if ratios else None

    def flat_metrics(self, reference: Mapping[str, float] | None = None) -> dict[str, float]:
        """Metric dict with the stable ``<split>/...`` names documented in this module."""
        out = {f"{self.split}/{metric_name(k)}": float(v) for k, v in self.metrics.items() if _numeric(v) is not None}
        out.update({f"{self.split}/{metric_name(t)}": float(s) for t, s in self.scores.items()})
        out[f"{self.split}/average"] = self.average
        out[f"{self.split}/worst_task"] = self.worst_task
        norm = self.normalized_average(reference)
        if norm is not None:
            out[f"{self.split}/normalized_average"] = norm
        return out

    @classmethod
    def from_result(cls, result: Any, split: str) -> EvalSummary:
        """Adapt an evaluator result (``.scores``, ``.metrics``, ``.records``) or a plain dict of the same keys."""
        get = result.get if isinstance(result, Mapping) else lambda k, d=None: getattr(result, k, d)
        return cls(split=split, scores={str(k): float(v) for k, v in dict(get("scores") or {}).items()},
                   metrics=dict(get("metrics") or {}), records=list(get("records") or []))

    def update(self, other: EvalSummary) -> None:
        """Merge another task's results into this one."""
        self.scores.update(other.scores)
        self.metrics.update(other.metrics)
        self.records.extend(other.records)


#: ``evaluator(model_dir, tasks, split, on_task)`` -> EvalSummary; ``on_task(task, partial_summary)`` is called
#: after each task (the campaign reports the running average to Optuna's pruner there and may raise to stop).
Evaluator = Callable[[Path, Sequence[str], str, Callable[[str, EvalSummary], None] | None], EvalSummary]


@dataclasses.dataclass
class HFEvaluator:
    """Default evaluator: load the merged model once with ``mergelab.hf.load_model`` and run
    ``mergelab.evaluators.evaluate`` task by task (so a pruner can stop a bad trial after the first tasks).

    Attributes:
        data_root: the evaluators' data root (``None``: their default).
        batch_size: generation batch size.
        limit: at most this many samples per task (``None``: all).
        device: where to place the model (``"auto"``: CUDA when available).
    """

    data_root: str | None = None
    batch_size: int = 32
    limit: int | None = None
    device: str = "auto"

    def __call__(self, model_dir: Path, tasks: Sequence[str], split: str,
                 on_task: Callable[[str, EvalSummary], None] | None = None) -> EvalSummary:
        from mergelab.evaluators import evaluate
        from mergelab.hf import load_model

        model, processor = load_model(str(model_dir), device=self.device)
        total = EvalSummary(split=split, scores={})
        for task in tasks:
            res = evaluate(model, processor, tasks=[task], split=split, data_root=self.data_root,
                           limit=self.limit, batch_size=self.batch_size)
            part = EvalSummary.from_result(res, split)
            # keep per-task metrics only (an across-task aggregate of a one-task call would be wrong here)
            part.metrics = {k: v for k, v in part.metrics.items() if k.split("/", 1)[0] == task}
            total.update(part)
            if on_task is not None:
                on_task(task, total)
        return total


# --------------------------------------------------------------------------------------------------------------
# A tracked merge
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrackedMerge:
    """What :func:`tracked_merge` returns.

    Attributes:
        run_id: the MLflow run.
        merged_uri: artifact URI of the merged weights (``<run artifact uri>/merged``) or the explicit output path.
        merged_path: the local directory of the merged weights (``None`` for a remote artifact store).
        report: the engine's ``MergeReport``.
        val: the validation summary (``None`` when no tasks were evaluated).
        metrics: every metric logged to the run.
    """

    run_id: str
    merged_uri: str
    merged_path: Path | None
    report: Any
    val: EvalSummary | None
    metrics: dict[str, float]


def _expert_fields(e: Any) -> tuple[str, float | None, str | None]:
    if isinstance(e, (str, os.PathLike)):
        return str(e), None, None
    if isinstance(e, Mapping):
        return str(e["path"]), e.get("coefficient"), e.get("name")
    return str(e.path), getattr(e, "coefficient", None), getattr(e, "name", None)


def expert_name(e: Any) -> str:
    """The expert's name: its explicit ``name`` or the last component of its path."""
    path, _, name = _expert_fields(e)
    return name or Path(path).name


def method_hyperparameters(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every hyperparameter of ``method`` (defaults filled in from its config dataclass), validated.

    Raises:
        KeyError: unknown method (naming it and the known ones).
        ValueError: unknown or invalid parameter (raised by the method's config).
    """
    from mergelab.methods import METHODS

    if method not in METHODS:
        raise KeyError(f"unknown merge method {method!r}; known: {sorted(METHODS)}")
    cfg = METHODS[method].make_config(dict(params or {}))
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(params or {})


def _peak_host_mb() -> float:
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 1024.0 if sys.platform != "darwin" else rss / (1024.0 * 1024.0)
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        import psutil

        return psutil.Process().memory_info().rss / (1024.0 * 1024.0)


def _report_dict(report: Any) -> dict[str, Any]:
    if report is None:
        return {}
    if hasattr(report, "to_dict"):
        return dict(report.to_dict())
    if dataclasses.is_dataclass(report):
        return dataclasses.asdict(report)
    return dict(report) if isinstance(report, Mapping) else {}


def report_metrics(report: Any) -> dict[str, float]:
    """Numeric totals of a ``MergeReport`` as ``merge/report/<key>`` metrics.

    Scalars at the top level (``bytes_read``, ``bytes_written``, ``wall_seconds``, ``peak_rss_bytes``,
    ``peak_gpu_bytes``, ``stats_passes``...) and the per-rule tensor ``counts``; per-tensor records, the seed and the
    method params are not metrics.
    """
    d = _report_dict(report)
    totals = d.get("totals") if isinstance(d.get("totals"), Mapping) else d
    out = {}
    for k, v in totals.items():
        if k in ("seed", "params", "tensors", "policy", "experts"):
            continue
        items = flatten(v, f"{k}/").items() if isinstance(v, Mapping) else [(k, v)]
        for name, val in items:
            x = _numeric(val)
            if x is not None and math.isfinite(x):
                out[f"merge/report/{metric_name(name)}"] = x
    return out


def score_chart(path: Path, scores: Mapping[str, float], reference: Mapping[str, float] | None = None,
                title: str = "") -> Path:
    """Write a per-task bar chart PNG (merged vs own-task expert where known) with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tasks = list(scores)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(tasks) + 2), 3.2))
    xs = range(len(tasks))
    width = 0.4 if reference else 0.7
    ax.bar([x - (width / 2 if reference else 0) for x in xs], [scores[t] for t in tasks], width, label="merged")
    if reference:
        ax.bar([x + width / 2 for x in xs], [reference.get(t, math.nan) for t in tasks], width, label="own expert")
        ax.legend(fontsize=8)
    ax.set_xticks(list(xs), tasks, rotation=20, fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _records_table(records: Iterable[Mapping[str, Any]]) -> dict[str, list[Any]]:
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


def log_eval(client: MlflowClient, run_id: str, summary: EvalSummary,
             reference: Mapping[str, float] | None = None, *, chart: bool = True) -> dict[str, float]:
    """Log an evaluation to a run: metrics, per-sample predictions (an MLflow table) and a per-task chart.

    Returns:
        The metrics logged.
    """
    metrics = summary.flat_metrics(reference)
    log_metrics(client, run_id, metrics)
    if summary.records:
        log_table(client, run_id, _records_table(summary.records), f"predictions/{summary.split}.json")
    if chart and summary.scores:
        with tempfile.TemporaryDirectory() as tmp:
            png = score_chart(Path(tmp) / f"{summary.split}_scores.png", summary.scores, reference,
                              title=f"{summary.split} average {summary.average:.2f}")
            client.log_artifact(run_id, str(png), "charts")
    return metrics


def run_artifact_path(client: MlflowClient, run_id: str, sub: str = "") -> tuple[str, Path | None]:
    """The artifact URI of ``sub`` inside a run, and its local path when the artifact store is local."""
    uri = client.get_run(run_id).info.artifact_uri.rstrip("/")
    full = f"{uri}/{sub}" if sub else uri
    return full, local_path(full)


def end_status(error: BaseException | str) -> str:
    """The MLflow status of a run ended by ``error``: KILLED for an interrupt (Ctrl-C, or SIGTERM raised as one by
    the CLI), FAILED otherwise."""
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def fail_run(client: MlflowClient, run_id: str, error: BaseException | str) -> None:
    """Mark a run FAILED (KILLED when interrupted) and record the error (best effort: never masks the original
    exception)."""
    status = end_status(error)
    try:
        client.set_tag(run_id, TAG_ERROR, (repr(error) if isinstance(error, BaseException) else error)[:5000])
        client.set_terminated(run_id, status=status)
    except Exception as e:  # noqa: BLE001 - the store itself may be what failed
        log.warning("could not mark run %s %s: %s", run_id, status, e)


def tracked_merge(
    *,
    base: str | os.PathLike[str],
    experts: Sequence[Any],
    method: str,
    params: Mapping[str, Any] | None = None,
    policy: str | Any = "auto",
    device: str = "auto",
    dtype: str | None = None,
    compute_dtype: str = "float32",
    seed: int = 0,
    store: Store | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    extra_params: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    out: str | os.PathLike[str] | None = None,
    tasks: Sequence[str] = (),
    evaluator: Evaluator | None = None,
    reference_scores: Mapping[str, float] | None = None,
    on_task: Callable[[str, EvalSummary], None] | None = None,
    on_run: Callable[[str], None] | None = None,
    merge_fn: Callable[..., Any] | None = None,
    overwrite: bool = False,
    engine_kwargs: Mapping[str, Any] | None = None,
    end_run: bool = True,
) -> TrackedMerge:
    """Merge experts into the base as one MLflow run, then evaluate the result on the val split.

    The merged weights are written once by the engine straight into ``<run artifact dir>/merged`` (or ``out``),
    which the registry then points at without copying (spec/ecosystem.md section 2, "zero-copy registration"). For
    a remote artifact store the engine writes to a temporary directory that is uploaded once and removed.

    Args:
        base: the base checkpoint directory.
        experts: ``ExpertSpec``s, ``{"path", "coefficient", "name"}`` dicts or paths.
        method: a key of ``mergelab.methods.METHODS``.
        params: the method's hyperparameters (missing ones take the config's defaults; all are logged).
        policy: the engine's tensor policy.
        device, dtype, compute_dtype, seed: passed to the engine.
        store: the store (default :meth:`Store.resolve`).
        experiment: MLflow experiment name.
        run_name: MLflow run name.
        parent_run_id: nest this run under that run (by tag, so it works from any thread or process).
        tags: extra run tags.
        extra_params: extra params (e.g. Optuna's raw trial params).
        config: the resolved config to log as ``config/merge.yaml`` (default: built from the arguments).
        out: write the merged weights there instead of into the run's artifact directory.
        tasks: evaluation tasks on the val split (empty: no evaluation).
        evaluator: ``evaluator(model_dir, tasks, split, on_task)`` (default :class:`HFEvaluator`).
        reference_scores: own-task expert scores per task for ``val/normalized_average``.
        on_task: forwarded to the evaluator (pruning); an exception raised there fails the run unless it is
            ``optuna.TrialPruned``-like (its class name contains ``Pruned``), which ends the run KILLED.
        on_run: called with the run id as soon as the run exists.
        merge_fn: the merge function (default ``mergelab.engine.loop.merge``).
        overwrite: let the engine replace an existing ``out``.
        engine_kwargs: further engine arguments (``max_shard_bytes``, ``carry_unique``, ``progress``).
        end_run: set the run FINISHED on success (a campaign keeps it open to add registry tags).

    Returns:
        A :class:`TrackedMerge`.

    Raises:
        Any exception of the engine or the evaluator, after the run has been marked FAILED (KILLED for an
        interrupt: Ctrl-C, or SIGTERM under the CLI) and partial weights removed.
    """
    store = store or Store.resolve()
    client = store.client()
    exp_id = store.experiment_id(experiment, client)
    run_tags = {TAG_ROLE: "merge", "method": method, **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=run_tags)
    run_id = run.info.run_id
    if on_run is not None:
        on_run(run_id)
    merged_path: Path | None = None
    tmp_out: Path | None = None
    try:
        if merge_fn is None:
            from mergelab.engine import merge as merge_fn  # type: ignore[no-redef]
        try:
            hp = method_hyperparameters(method, params)
        except ImportError:  # registry not importable in a stripped install: log what was given
            hp = dict(params or {})
        expert_rows = [_expert_fields(e) for e in experts]
        p: dict[str, Any] = {"method": method, "policy": policy if isinstance(policy, str) else json.dumps(policy),
                             "device": device, "dtype": dtype or "auto", "compute_dtype": compute_dtype,
                             "seed": seed, "base.path": str(base), "base.sha256": content_hash(base),
                             "n_experts": len(expert_rows), "git.commit": git_commit() or "unknown"}
        p.update({f"hp.{k}": v for k, v in hp.items()})
        for i, (path, coef, name) in enumerate(expert_rows):
            p[f"expert.{i}.name"] = name or Path(path).name
            p[f"expert.{i}.path"] = path
            p[f"expert.{i}.sha256"] = content_hash(path)
            p[f"expert.{i}.coefficient"] = "default" if coef is None else coef
        p.update({f"version.{k}": v for k, v in package_versions().items()})
        p.update(extra_params or {})
        log_params(client, run_id, p)
        resolved = dict(config) if config is not None else {
            "base": str(base), "experts": [{"path": a, "coefficient": c, "name": n} for a, c, n in expert_rows],
            "method": method, "params": hp, "policy": policy, "device": device, "dtype": dtype,
            "compute_dtype": compute_dtype, "seed": seed}
        client.log_dict(run_id, json.loads(json.dumps(resolved, default=str)), "config/merge.yaml")

        if out is not None:
            merged_path = Path(out)
            merged_uri = merged_path.resolve().as_uri()
        else:
            merged_uri, merged_path = run_artifact_path(client, run_id, "merged")
            if merged_path is None:
                tmp_out = Path(tempfile.mkdtemp(prefix="mergelab-merged-"))
        target = merged_path if merged_path is not None else tmp_out
        assert target is not None
        target.parent.mkdir(parents=True, exist_ok=True)

        gpu = _cuda_reset_peak()
        t0 = time.perf_counter()
        report = merge_fn(base=str(base), experts=_expert_specs(experts), method=method, params=dict(params or {}),
                          policy=policy, out=str(target), device=device, dtype=dtype,
                          compute_dtype=compute_dtype, seed=seed, overwrite=overwrite, **dict(engine_kwargs or {}))
        seconds = time.perf_counter() - t0
        metrics = {"merge/seconds": seconds, "merge/peak_host_mb": _peak_host_mb(),
                   "merge/peak_gpu_mb": _cuda_peak_mb() if gpu else 0.0}
        rd = _report_dict(report)
        if _numeric(rd.get("peak_rss_bytes")):  # the engine's own sampler covers only the merge itself
            metrics["merge/peak_host_mb"] = float(rd["peak_rss_bytes"]) / 2**20
        if _numeric(rd.get("peak_gpu_bytes")):
            metrics["merge/peak_gpu_mb"] = float(rd["peak_gpu_bytes"]) / 2**20
        metrics.update(report_metrics(report))
        log_metrics(client, run_id, metrics)
        client.log_dict(run_id, json.loads(json.dumps(_report_dict(report), default=str)), "merge_report.json")
        if tmp_out is not None:
            client.log_artifacts(run_id, str(tmp_out), "merged")
            shutil.rmtree(tmp_out, ignore_errors=True)
            tmp_out = None
        client.set_tag(run_id, TAG_MERGED, merged_uri)
        client.set_tag(run_id, TAG_WEIGHTS, "present")

        val = None
        if tasks:
            evaluator = evaluator or HFEvaluator(device=device)
            model_dir = merged_path if merged_path is not None else _download(store, merged_uri)
            val = evaluator(model_dir, list(tasks), "val", on_task)
            metrics.update(log_eval(client, run_id, val, reference_scores))
        if end_run:
            client.set_terminated(run_id, status="FINISHED")
        return TrackedMerge(run_id=run_id, merged_uri=merged_uri, merged_path=merged_path, report=report,
                            val=val, metrics=metrics)
    except BaseException as e:
        if tmp_out is not None:
            shutil.rmtree(tmp_out, ignore_errors=True)
        if "Pruned" in type(e).__name__:
            with contextlib.suppress(Exception):
                client.set_tag(run_id, "mergelab.pruned", "true")
                client.set_terminated(run_id, status="KILLED")
        else:
            fail_run(client, run_id, e)
        if out is None and merged_path is not None and merged_path.exists():
            shutil.rmtree(merged_path, ignore_errors=True)  # no dangling partial/unregistered weights
            with contextlib.suppress(Exception):
                client.set_tag(run_id, TAG_WEIGHTS, "deleted")
        raise


def track_merge_config(
    cfg: Any,
    *,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    device: str | None = None,
    store: Store | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    tasks: Sequence[str] = (),
    evaluator: Evaluator | None = None,
) -> TrackedMerge:
    """``mergelab merge CONFIG`` as an MLflow run: :func:`tracked_merge` with a validated ``MergeConfig``.

    Args:
        cfg: a :class:`mergelab.platform.merge_config.MergeConfig`.
        out: output directory; ``None`` writes into the run's artifact directory (registrable without a copy).
        overwrite, progress: passed to the engine.
        device: overrides the config's device.
        store, experiment, run_name: where to track.
        tasks, evaluator: optional val evaluation of the merged model.
    """
    kw = cfg.merge_kwargs()
    if device is not None:
        kw["device"] = device
    engine_extra = {k: kw.pop(k) for k in ("max_shard_bytes", "carry_unique") if k in kw}
    engine_extra["progress"] = progress
    return tracked_merge(**kw, store=store, experiment=experiment, run_name=run_name,
                         config=json.loads(cfg.model_dump_json()), out=out, overwrite=overwrite,
                         engine_kwargs=engine_extra, tasks=tasks, evaluator=evaluator)


def _expert_specs(experts: Sequence[Any]) -> list[Any]:
    """Dict entries become the engine's ``ExpertSpec``; specs and plain paths pass through."""
    from mergelab.engine import ExpertSpec

    return [ExpertSpec(e["path"], e.get("coefficient"), e.get("name")) if isinstance(e, Mapping) else e
            for e in experts]


def _download(store: Store, uri: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=store.tracking_uri))


def _cuda_reset_peak() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    if not torch.cuda.is_available():
        return False
    torch.cuda.reset_peak_memory_stats()
    return True


def _cuda_peak_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / (1024.0 * 1024.0)
