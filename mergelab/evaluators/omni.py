"""The omni benchmark's tasks as evaluator tasks: load, answer, score and aggregate (the parts of their table entries).

The omni tasks (:data:`mergelab.bench.omni.tasks.OMNI_TASKS`: the cross-modal sets ``music_avqa`` and ``avqa``, and
each modality's own tasks ``image_color`` ... ``video_speed``) are procedural: their items are generated in memory
(:mod:`mergelab.bench.omni.data`, seed :data:`~mergelab.bench.omni.tasks.DATA_SEED`; no data root is read), as many
per split as the omni table evaluates (:class:`mergelab.bench.omni.table.EvalSizes`, val and test). Every item carries all of its media (a cross-modal item: image, audio and video), and
the model answers through the omni prompt and processor (:func:`mergelab.bench.omni.train.answers`), not the
runner's one-image chat prompt. Scores are the table's (:func:`mergelab.bench.omni.metrics.item_score`: the choice
letter for ``avqa``, exact match after EvalAI normalisation for the others), reported as ``accuracy`` and, per
question type, ``qtype/<type>``, in percent.

The benchmark's modules are imported when a task runs, not with this module: they import transformers and the
Qwen2.5-Omni modelling code (seconds), which building the task table must not pay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergelab.bench.omni.tasks import CROSS_SETS, DATA_SEED, MAX_NEW_TOKENS, OMNI_TASKS, qtypes
from mergelab.bench.tasks.common import Sample

OMNI_DATA = Path("omni-generated")
"""The ``data_root`` an omni task reports (its items are generated in memory; nothing is read from it)."""

OMNI_SPLITS = ("val", "test")


def omni_root() -> Path:
    """The default root of an omni task: :data:`OMNI_DATA` (a label; the items are generated)."""
    return OMNI_DATA


def items_per_split(task: str, split: str) -> int:
    """How many items of ``task`` an evaluation on ``split`` uses: the omni table's :class:`EvalSizes` default."""
    from mergelab.bench.omni.table import EvalSizes  # transformers and the omni model code: seconds

    if split not in OMNI_SPLITS:
        raise ValueError(f"omni task {task!r}: split {split!r}; the omni tasks have {list(OMNI_SPLITS)}")
    sizes = EvalSizes()
    cross = task in CROSS_SETS
    if split == "val":
        return sizes.cross_val if cross else sizes.task_val
    return sizes.cross_test if cross else sizes.task_test


def load(task: str, split: str, limit: int | None) -> list[Sample]:
    """The first ``limit`` (default all) items of ``task`` on ``split`` as evaluator samples (``meta["omni"]``: the
    :class:`~mergelab.bench.omni.data.OmniSample`, as a dict)."""
    from mergelab.bench.omni import data  # transformers and the omni model code: seconds

    n = items_per_split(task, split)
    n = min(n, limit) if limit is not None else n
    items = (data.cross_samples(task, split, n, DATA_SEED) if task in CROSS_SETS
             else data.task_samples(task, split, n, DATA_SEED))
    return [Sample(id=s.id, question=s.question, answers=[s.answer], meta={"omni": s.to_dict()}, task=task,
                   split=split) for s in items]


def omni_sample(sample: Sample) -> Any:
    """The :class:`~mergelab.bench.omni.data.OmniSample` an evaluator sample of an omni task carries."""
    from mergelab.bench.omni.data import OmniSample

    d = dict(sample.meta["omni"])
    return OmniSample(**{**d, "choices": tuple(d.get("choices") or ())})


def generate(model: Any, processor: Any, samples: Sequence[Sample], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers of an omni model to ``samples``, each with its media (:func:`~mergelab.bench.omni.train.answers`)."""
    from mergelab.bench.omni.train import answers

    return answers(model, processor, [omni_sample(s) for s in samples], batch_size=batch_size,
                   max_new_tokens=max_new_tokens)


def score(prediction: str, sample: Sample) -> dict[str, float]:
    """``{"accuracy": 0 or 1}``: the omni table's rule for the sample's task."""
    from mergelab.bench.omni.metrics import item_score

    return {"accuracy": item_score(sample.task, prediction, sample.answers[0])}


def aggregate(values: Sequence[Mapping[str, float]], samples: Sequence[Sample]) -> dict[str, float]:
    """Accuracy (percent) over all samples and, for a cross-modal set, per question type (``qtype/<type>``, the
    types present)."""
    per: dict[str, list[float]] = {}
    for v, s in zip(values, samples, strict=True):
        if s.task in CROSS_SETS:
            per.setdefault(str(s.meta["omni"]["qtype"]), []).append(v["accuracy"])
    out = {"accuracy": 100.0 * sum(v["accuracy"] for v in values) / len(values) if values else float("nan")}
    out.update({f"qtype/{k}": 100.0 * sum(v) / len(v) for k, v in sorted(per.items())})
    return out


def metric_names(task: str) -> tuple[str, ...]:
    """Every metric an omni task reports: ``accuracy``, then ``qtype/<type>`` for the cross-modal sets."""
    types = qtypes(task)
    return ("accuracy", *(f"qtype/{t}" for t in types)) if len(types) > 1 else ("accuracy",)


__all__ = ["MAX_NEW_TOKENS", "OMNI_DATA", "OMNI_TASKS", "aggregate", "generate", "items_per_split", "load", "metric_names",
           "omni_root", "omni_sample", "score"]
