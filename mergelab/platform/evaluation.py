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
from typing import Any

from mlflow import MlflowClient

from mergelab.platform.store import log_metrics, log_table, metric_name, numeric_value, records_table


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
        out = {f"{self.split}/{metric_name(k)}": float(v) for k, v in self.metrics.items() if numeric_value(v) is not None}
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


def log_eval(client: MlflowClient, run_id: str, summary: EvalSummary,
             reference: Mapping[str, float] | None = None, *, chart: bool = True) -> dict[str, float]:
    """Log an evaluation to a run: metrics, per-sample predictions (an MLflow table) and a per-task chart.

    Returns:
        The metrics logged.
    """
    metrics = summary.flat_metrics(reference)
    log_metrics(client, run_id, metrics)
    if summary.records:
        log_table(client, run_id, records_table(summary.records), f"predictions/{summary.split}.json")
    if chart and summary.scores:
        with tempfile.TemporaryDirectory() as tmp:
            png = score_chart(Path(tmp) / f"{summary.split}_scores.png", summary.scores, reference,
                              title=f"{summary.split} average {summary.average:.2f}")
            client.log_artifact(run_id, str(png), "charts")
    return metrics

