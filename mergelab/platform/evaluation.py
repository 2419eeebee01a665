"""The evaluation adapter: run the evaluators on a merged model and log their results with stable metric names.

Stable metric names (the UI's compare view lines them up):

========================== ==================================================================================
``<split>/<task>/<metric>`` every metric of the evaluator's ``.metrics`` (e.g. ``val/vqa/accuracy``)
``<split>/<task>``          the primary score of each task, percent
``<split>/average``         unweighted mean of the per-task primary scores (the paper's "Avg")
``<split>/worst_task``      the minimum per-task primary score
``<split>/normalized_average`` mean over tasks of ``100 * score / own-task expert score`` (where known)
========================== ==================================================================================

``<split>`` is ``val`` for merges and trials, ``test`` for registered candidates and promotion.
"""


from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mergelab.evaluators import EvalResult, evaluate
from mergelab.platform.store import log_scores, log_table, records_table

if TYPE_CHECKING:  # mlflow is imported by the store when a client is made (`mergelab merge` overlaps that import)
    from mlflow import MlflowClient

#: ``evaluator(model_dir, tasks, split, on_task)`` -> EvalResult; ``on_task(task, partial_summary)`` is called
#: after each task (the campaign reports the running average to Optuna's pruner there and may raise to stop).
Evaluator = Callable[[Path, Sequence[str], str, Callable[[str, EvalResult], None] | None], EvalResult]


@dataclasses.dataclass
class HFEvaluator:
    """Default evaluator: load the merged model once with ``mergelab.hf.load_model`` and run
    ``mergelab.evaluators.evaluate`` task by task (so a pruner can stop a bad trial after the first tasks).

    Attributes:
        data_root: the evaluators' data root (``None``: their default).
        batch_size: generation batch size.
        limit: at most this many samples per task (``None``: all).
        device: where to place the model (``"auto"``: CUDA when available).
        progress: one progress bar per task (``mergelab merge --eval``).
    """

    data_root: str | None = None
    batch_size: int = 32
    limit: int | None = None
    device: str = "auto"
    progress: bool = False

    def __call__(self, model_dir: Path, tasks: Sequence[str], split: str,
                 on_task: Callable[[str, EvalResult], None] | None = None) -> EvalResult:
        # imported when an evaluation runs, not with the platform: transformers takes seconds to import, and a
        # merge without evaluation (``mergelab merge``) never needs it
        from mergelab.hf import load_model

        model, processor = load_model(str(model_dir), device=self.device)
        total = EvalResult(split=split, scores={})
        for task in tasks:
            res = evaluate(model, processor, tasks=[task], split=split, data_root=self.data_root,
                           limit=self.limit, batch_size=self.batch_size, progress=self.progress)
            total.update(res.only(task))  # per-task metrics only: a one-task call's aggregate would be wrong here
            if on_task is not None:
                on_task(task, total)
        return total


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


def log_eval(client: MlflowClient, run_id: str, summary: EvalResult,
             reference: Mapping[str, float] | None = None, *, chart: bool = True) -> dict[str, float]:
    """Log an evaluation to a run: metrics, per-sample predictions (an MLflow table) and a per-task chart.

    The average and the per-task scores are logged first: MLflow's compare page starts its parallel-coordinates
    plot on the first metric (in the first run's logging order) that every compared run has, so ``<split>/average``.

    Returns:
        The metrics logged.
    """
    metrics = summary.flat_metrics(reference)
    sp = summary.split or "eval"
    first = [f"{sp}/average", *(f"{sp}/{t}" for t in summary.scores)]
    metrics = {**{k: metrics[k] for k in first if k in metrics}, **metrics}
    log_scores(client, run_id, metrics)
    if summary.records:
        log_table(client, run_id, records_table(summary.records), f"predictions/{summary.split}.json")
    if chart and summary.scores:
        with tempfile.TemporaryDirectory() as tmp:
            png = score_chart(Path(tmp) / f"{summary.split}_scores.png", summary.scores, reference,
                              title=f"{summary.split} average {summary.average:.2f}")
            client.log_artifact(run_id, str(png), "charts")
    return metrics

