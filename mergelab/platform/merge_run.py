"""One MLflow run per merge (``mergelab merge``, a comparison row or a campaign trial): merge, log, evaluate.

The run records the :class:`~mergelab.engine.recipe.MergeRecipe` (params, ``config/merge.yaml`` and the
``mergelab.recipe`` tag: its digest, the merge's identity), the engine's :class:`~mergelab.engine.report.MergeReport`,
and, when tasks are given, the val evaluation (:mod:`mergelab.platform.evaluation`). The store it writes to is
:mod:`mergelab.platform.store`; when the run is not needed before the merge ends, a child process records it
(:mod:`mergelab.platform.track_child`), so that importing mlflow and opening the store run beside the merge.

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

Params: ``method``, ``recipe.sha``, ``hp.<name>`` (every field of the method's config dataclass, defaults
included), ``policy``, ``device``, ``dtype``, ``compute_dtype``, ``seed``, ``base.path``/``base.sha256``,
``expert.<i>.name/path/kind/sha256/coefficient``, ``version.<package>``, ``git.commit``.
Artifacts: ``config/merge.yaml``, ``merge_report.json``, ``predictions/val.json`` (an MLflow table),
``charts/val_scores.png`` and the merged weights under ``merged/`` (written once, by the engine, in place).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mergelab import _signals
from mergelab._files import content_hash
from mergelab.engine import MergeError, MergeRecipe, run_merge
from mergelab.engine.loop import preflight
from mergelab.engine.writer import write_model_card
from mergelab.evaluators import EvalResult
from mergelab.platform.evaluation import Evaluator, HFEvaluator, log_eval
from mergelab.platform.provenance import (
    git_commit,
    package_versions,
)
from mergelab.platform.store import (
    DEFAULT_EXPERIMENT,
    TAG_MERGED,
    TAG_RECIPE,
    TAG_ROLE,
    TAG_WEIGHTS,
    Store,
    flatten,
    local_path,
    metric_name,
    numeric_value,
    run_artifact_path,
)
from mergelab.platform.track_child import TrackingChild, create_run, end_failed, failure, log_merge

log = logging.getLogger(__name__)


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
        link: the run's UI link when a child process recorded it (``None``: :func:`mergelab.platform.ui.run_link`
            makes it, importing mlflow).
    """

    run_id: str
    merged_uri: str
    merged_path: Path | None
    report: Any
    val: EvalResult | None
    metrics: dict[str, float]
    link: str | None = None


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
            x = numeric_value(val)
            if x is not None and math.isfinite(x):
                out[f"merge/report/{metric_name(name)}"] = x
    return out


def tracked_merge(
    recipe: MergeRecipe,
    *,
    store: Store | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    extra_params: Mapping[str, Any] | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    tasks: Sequence[str] = (),
    evaluator: Evaluator | None = None,
    reference_scores: Mapping[str, float] | None = None,
    on_task: Callable[[str, EvalResult], None] | None = None,
    on_run: Callable[[str], None] | None = None,
    merge_fn: Callable[..., Any] = run_merge,
    end_run: bool = True,
    allow_base_mismatch: bool = False,
    child: bool | TrackingChild | None = None,
) -> TrackedMerge:
    """Merge a recipe as one MLflow run, then evaluate the result on the val split.

    The merged weights are written once by the engine straight into ``<run artifact dir>/merged`` (or ``out``),
    which the registry then points at without copying ("zero-copy registration"). For a remote artifact store the
    engine writes to a temporary directory that is uploaded once and removed.

    Two ways to record the run, with the same content (params, tags, metrics, artifacts, the true start time):

    - in this process: the store is opened and the run created before the merge, logged after it;
    - in a child process (:mod:`mergelab.platform.track_child`), when the run is not needed before the merge ends:
      the child imports mlflow and opens the store (creating or migrating the database on first use: seconds of
      CPU) on another core while this process hashes the inputs (the recipe's digest) in a thread and merges; the
      run is created and logged afterwards. A merge that fails or is stopped is still recorded as a FAILED (KILLED)
      run. A store that cannot be opened fails the call after the merge: the new output is removed and, with
      ``overwrite``, the directory that was at ``out`` (kept aside during the merge) is put back, as on any other
      failure.

    Args:
        recipe: what to merge (logged as params, ``config/merge.yaml`` and the ``mergelab.recipe`` tag).
        store: the store (default :meth:`Store.resolve`).
        experiment: MLflow experiment name.
        run_name: MLflow run name.
        parent_run_id: nest this run under that run (by tag, so it works from any thread or process).
        tags: extra run tags.
        extra_params: extra params (e.g. Optuna's raw trial params).
        out: write the merged weights there instead of into the run's artifact directory.
        overwrite: passed to the engine.
        progress: the engine's progress bar, and one per task of the default evaluator.
        tasks: evaluation tasks on the val split (empty: no evaluation).
        evaluator: ``evaluator(model_dir, tasks, split, on_task)`` (default :class:`HFEvaluator`).
        reference_scores: own-task expert scores per task for ``val/normalized_average``.
        on_task: forwarded to the evaluator (pruning); an exception raised there fails the run unless it is
            ``optuna.TrialPruned``-like (its class name contains ``Pruned``), which ends the run KILLED.
        on_run: called with the run id as soon as the run exists (before the merge).
        merge_fn: the engine entry point, ``merge_fn(recipe, out, overwrite=, progress=)`` (a seam for fault
            injection in tests).
        end_run: set the run FINISHED on success (a campaign keeps it open to add registry tags).
        allow_base_mismatch: merge experts whose adapter or model config names another base.
        child: record the run from a child process; ``None`` (default): when ``out`` is given, with no ``tasks``
            and no ``on_run``, in a process that has not imported mlflow yet (else it costs more than it saves). A
            :class:`~mergelab.platform.track_child.TrackingChild` the caller started earlier (``mergelab merge``
            does, before importing torch) is used, and closed, instead of a new one.

    Returns:
        A :class:`TrackedMerge`.

    Raises:
        MergeError: bad input found by :func:`~mergelab.engine.loop.preflight`, before any run exists.
        ValueError: ``child=True`` without ``out``, or with ``tasks`` or ``on_run`` (they need the run here).
        TrackingError: the child could not open the store or record the run (one line naming the store).
        Any exception of the engine or the evaluator, after the run has been marked FAILED (KILLED for a stop
        request: Ctrl-C or SIGTERM, acted on between phases and between tensors) and the weights written by this
        call removed (in the run's artifact directory, or ``out``).
    """
    tracker = child if isinstance(child, TrackingChild) else None
    try:
        if child is None:
            child = out is not None and not tasks and on_run is None and "mlflow" not in sys.modules
        elif child and (out is None or tasks or on_run is not None):
            raise ValueError("child=True records the run after the merge: it needs `out` and no `tasks` or `on_run`")
        preflight(recipe, out, overwrite=overwrite, allow_base_mismatch=allow_base_mismatch)
        if child and tracker is None:
            tracker = TrackingChild()
        with _signals.deferred():
            return _tracked_merge(recipe, store, experiment, run_name, parent_run_id, tags, extra_params, out,
                                  overwrite, progress, tasks, evaluator, reference_scores, on_task, on_run, merge_fn,
                                  end_run, allow_base_mismatch, tracker)
    finally:
        if tracker is not None:
            tracker.close()


def _tracked_merge(recipe: MergeRecipe, store: Store | None, experiment: str, run_name: str | None,
                   parent_run_id: str | None, tags: Mapping[str, str] | None, extra_params: Mapping[str, Any] | None,
                   out: str | os.PathLike[str] | None, overwrite: bool, progress: bool, tasks: Sequence[str],
                   evaluator: Evaluator | None, reference_scores: Mapping[str, float] | None,
                   on_task: Callable[[str, EvalResult], None] | None, on_run: Callable[[str], None] | None,
                   merge_fn: Callable[..., Any], end_run: bool, allow_base_mismatch: bool,
                   tracker: TrackingChild | None) -> TrackedMerge:
    _signals.check()
    start_ms = int(time.time() * 1000)  # the run's start time, also when the child creates it after the merge
    store = store or Store.resolve()
    if tracker is not None:
        tracker.open(store, experiment)
    inputs = _background(lambda: _inputs(recipe)) if tracker is not None else None

    def start() -> dict[str, Any]:
        params = {**(inputs() if inputs is not None else _inputs(recipe)), **(extra_params or {})}
        return run_start(recipe, run_name, parent_run_id, tags, params, start_ms)

    client: Any = None
    run_id: str | None = None
    link: str | None = None
    metrics: dict[str, float] | None = None
    report_json: dict[str, Any] | None = None
    merged_path: Path | None = None
    merged_uri = ""
    tmp_out: Path | None = None
    # whether what is at merged_path on failure is this call's (removed then): the run's own artifact directory
    # always; an explicit ``out`` once the merge ran (an existing one was moved aside to ``kept`` first, and is put
    # back on failure)
    kept: Path | None = None
    wrote = False
    try:
        if tracker is None:
            client, exp_id = _open_store(store, experiment)
            run_id = create_run(client, exp_id, start())
            if on_run is not None:
                on_run(run_id)
        if out is not None:
            merged_path = Path(out)
            if overwrite and (merged_path.exists() or merged_path.is_symlink()):
                kept = merged_path.parent / f".{merged_path.name}.replaced-{uuid.uuid4().hex[:8]}"
                os.replace(merged_path, kept)
            merged_uri = merged_path.resolve().as_uri()  # after the move: not through a link being replaced
        else:
            assert run_id is not None
            merged_uri, merged_path = run_artifact_path(client, run_id, "merged")
            if merged_path is None:
                tmp_out = Path(tempfile.mkdtemp(prefix="mergelab-merged-"))
        target = merged_path if merged_path is not None else tmp_out
        assert target is not None
        target.parent.mkdir(parents=True, exist_ok=True)

        gpu = _cuda_reset_peak()
        t0 = time.perf_counter()
        _signals.check()
        wrote = True
        kw = {"allow_base_mismatch": True} if allow_base_mismatch else {}
        try:
            report = merge_fn(recipe, target, overwrite=overwrite, progress=progress, **kw)
        except MergeError:
            # the engine refused and wrote nothing (bad input, or ``out`` taken by another merge while this one
            # ran: it never replaces what it did not move aside), so what is at ``out`` is not this call's
            wrote = out is None
            raise
        _signals.check()
        rd = _report_dict(report)  # built once: the metrics and merge_report.json
        metrics = _merge_metrics(rd, time.perf_counter() - t0, gpu)
        report_json = json.loads(json.dumps(rd, default=str))
        if tracker is None:
            assert run_id is not None
            if tmp_out is not None:
                client.log_artifacts(run_id, str(tmp_out), "merged")
                shutil.rmtree(tmp_out, ignore_errors=True)
                tmp_out = None
            log_merge(client, run_id, metrics, report_json, merged_uri)

        val = None
        if tasks:
            assert run_id is not None
            _signals.check()
            evaluator = evaluator or HFEvaluator(device=recipe.device, progress=progress)
            model_dir = merged_path if merged_path is not None else _download(store, merged_uri)
            val = evaluator(model_dir, list(tasks), "val", on_task)
            _signals.check()
            metrics.update(log_eval(client, run_id, val, reference_scores))
        rec = start() if tracker is not None else None  # the inputs' hashes first: the digest below is then free
        if merged_path is not None and merged_path.is_dir() and (val is not None or out is not None):
            # the model card gains the recipe digest (unknown to the engine while it merged) and the scores
            write_model_card(merged_path, recipe, digest=recipe.digest, scores=dict(val.scores) if val else None)
        _signals.check()
        if tracker is not None:
            run_id, link = tracker.record({"start": rec, "metrics": metrics, "report": report_json,
                                           "merged_uri": merged_uri, "end_run": end_run})
        elif end_run:
            client.set_terminated(run_id, status="FINISHED")
        assert run_id is not None
        if kept is not None:
            with contextlib.suppress(OSError):  # a leftover hidden copy is better than failing a finished run
                remove_tree(kept)
        return TrackedMerge(run_id=run_id, merged_uri=merged_uri, merged_path=merged_path, report=report,
                            val=val, metrics=metrics, link=link)
    except BaseException as e:
        if tmp_out is not None:
            shutil.rmtree(tmp_out, ignore_errors=True)
        deleted = wrote and merged_path is not None and (merged_path.exists() or merged_path.is_symlink())
        if deleted:
            assert merged_path is not None
            remove_tree(merged_path)  # nothing of a failed or stopped run stays behind
        if kept is not None and merged_path is not None:
            os.replace(kept, merged_path)  # --overwrite: the directory that was there before is back
        if tracker is not None and not tracker.done:  # record the failed merge now if the store opens
            try:
                tracker.record({"start": start(), "metrics": metrics, "report": report_json,
                                "merged_uri": merged_uri, "failure": failure(e), "weights_deleted": deleted})
            except Exception as store_error:  # noqa: BLE001 - the original error is the one to raise
                log.warning("could not record the failed merge in MLflow: %s", store_error)
        elif run_id is not None and tracker is None:
            end_failed(client, run_id, failure(e), weights_deleted=deleted)
        raise


def _merge_metrics(rd: Mapping[str, Any], seconds: float, gpu: bool) -> dict[str, float]:
    """The ``merge/*`` metrics of a finished merge from its report dict ``rd`` (the engine's own peak samplers win
    over the process's)."""
    metrics = {"merge/seconds": seconds, "merge/peak_host_mb": _peak_host_mb(),
               "merge/peak_gpu_mb": _cuda_peak_mb() if gpu else 0.0}
    if numeric_value(rd.get("peak_rss_bytes")):  # the engine's own sampler covers only the merge itself
        metrics["merge/peak_host_mb"] = float(rd["peak_rss_bytes"]) / 2**20
    if numeric_value(rd.get("peak_gpu_bytes")):
        metrics["merge/peak_gpu_mb"] = float(rd["peak_gpu_bytes"]) / 2**20
    metrics.update(report_metrics(rd))
    return metrics


def run_start(recipe: MergeRecipe, run_name: str | None, parent_run_id: str | None, tags: Mapping[str, str] | None,
              params: Mapping[str, Any], start_ms: int) -> dict[str, Any]:
    """What a merge's run starts with, as plain data (no mlflow; :func:`~mergelab.platform.track_child.create_run`
    creates it): the start time, the run name, the tags, the params (the recipe's, then ``params``: provenance and
    the caller's) and the ``config/merge.yaml`` dict."""
    run_tags = {TAG_ROLE: "merge", "method": recipe.method_name, TAG_RECIPE: recipe.digest, **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    p: dict[str, Any] = {"method": recipe.method_name, "recipe.sha": recipe.digest,
                         "policy": recipe.policy if isinstance(recipe.policy, str) else json.dumps(
                             recipe.to_dict()["policy"]),
                         "device": recipe.device, "dtype": recipe.dtype or "auto",
                         "compute_dtype": recipe.compute_dtype, "seed": recipe.seed, "base.path": recipe.base,
                         "base.sha256": content_hash(recipe.base), "n_experts": len(recipe.experts)}
    p.update({f"hp.{k}": v for k, v in recipe.hyperparameters.items()})
    for i, e in enumerate(recipe.experts):
        p[f"expert.{i}.name"] = e.name
        p[f"expert.{i}.path"] = str(e.path)
        p[f"expert.{i}.kind"] = e.kind
        p[f"expert.{i}.sha256"] = content_hash(e.path)
        p[f"expert.{i}.coefficient"] = "default" if e.coefficient is None else e.coefficient
    p.update(params)
    return json.loads(json.dumps({"start_time": start_ms, "run_name": run_name, "tags": run_tags, "params": p,
                                  "config": recipe.to_dict()}, default=str))


def _open_store(store: Store, experiment: str) -> tuple[Any, str]:
    """``(client, experiment id)``: imports mlflow, opens (on first use creates) the database, gets the experiment."""
    client = store.client()
    return client, store.experiment_id(experiment, client)


def _inputs(recipe: MergeRecipe) -> dict[str, Any]:
    """The provenance params (``git.commit``, ``version.<package>``) after hashing the recipe's inputs (memoised per
    file by :func:`~mergelab._files.content_hash`), so that its digest is then free; the digest itself is not computed
    here, so the engine's model card never races with it."""
    for path in (recipe.base, *(e.path for e in recipe.experts)):
        content_hash(path)
    return {"git.commit": git_commit() or "unknown", **{f"version.{k}": v for k, v in package_versions().items()}}


_T = TypeVar("_T")


def _background(fn: Callable[[], _T]) -> Callable[[], _T]:
    """Start ``fn`` in a daemon thread (hashing releases the interpreter lock: it overlaps the merge); the returned
    function waits for it and returns its result, raising its error on every call."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread by result()
            box["error"] = e

    th = threading.Thread(target=target, name="mergelab-inputs", daemon=True)
    th.start()

    def result() -> _T:
        th.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return result


def remove_tree(path: Path) -> None:
    """Remove a directory (or a file or link) and, when it was a run's ``merged`` directory, nothing else."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def discard_run(client: Any, run_id: str) -> None:
    """Remove what a failed or stopped run leaves behind: its model versions first (so none points at nothing), then
    its weights (the ``mergelab.merged_uri`` directory when local). Best effort: never masks the error at hand."""
    try:
        for mv in client.search_model_versions(f"run_id = '{run_id}'"):
            with contextlib.suppress(Exception):
                client.delete_model_version(mv.name, str(mv.version))
        run = client.get_run(run_id)
        uri = run.data.tags.get(TAG_MERGED)
        art = local_path(run.info.artifact_uri) if run.info.artifact_uri else None
        # the recorded weights, and the run's own `merged` directory even when the run died between the engine's
        # rename into place and the tag that records it, and any temporary output the engine left when killed
        paths = [local_path(uri) if uri else None]
        if art is not None:
            paths += [art / "merged", *art.glob(".merged.tmp-*")]
        removed = False
        for path in {p for p in paths if p is not None}:
            if path.exists() or path.is_symlink():
                remove_tree(path)
                removed = True
        if removed:
            client.set_tag(run_id, TAG_WEIGHTS, "deleted")
    except Exception as e:  # noqa: BLE001 - the store may be what failed
        log.warning("run %s: could not discard its versions/weights: %s", run_id, e)


def _download(store: Store, uri: str) -> Path:
    import mlflow.artifacts  # lazy: only a remote artifact store needs it, and importing mlflow costs seconds

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

