"""The evaluators' task table: each task is a loader, a prompt, a parser, a per-sample metric and an aggregation.

Three families share one table, :data:`TASKS`:

* the offline benchmark's tasks, derived from :data:`mergelab.bench.tasks.TASK_SPECS` (``vqa``, ``geometry``,
  ``chart``, ``ocr``, ``grounding``: the ``shifted`` variant, i.e. the benchmark's test set) and their
  ``*_generic`` twins (the ``generic`` variant, for forgetting);
* the paper's ten evaluation columns (its Tables 2 and 3): ``vizwiz``, ``gqa``, ``mathvista_geo``,
  ``mathvision_geo``, ``chartqa``, ``textvqa``, ``ocrvqa``, ``refcoco``, ``refcoco_plus``, ``refcocog``.
* the omni benchmark's tasks (:data:`mergelab.bench.omni.tasks.OMNI_TASKS`): the cross-modal sets ``music_avqa``
  and ``avqa`` (``accuracy`` and ``qtype/<type>``) and each modality's own tasks (``image_color`` ...
  ``video_speed``); their items are generated and answered with all their media (:mod:`mergelab.evaluators.omni`).

Metric names are ``<task>/<metric>`` with ``<metric>`` from :attr:`Task.metric_names` (documented in
``docs/evaluators.md``), all in percent; they contain no comma or bracket, so MLflow accepts them as is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mergelab.bench.data import default_data_root, read_split
from mergelab.bench.omni.tasks import OMNI_TASKS as OMNI_TASK_NAMES
from mergelab.bench.tasks import TASK_SPECS as BENCH_TASKS
from mergelab.bench.tasks.common import TaskSpec
from mergelab.evaluators import metrics as M
from mergelab.evaluators import omni
from mergelab.evaluators.loaders import (
    GROUNDING_PROMPT,
    Sample,
    default_paper_root,
    load_chartqa,
    load_gqa,
    load_mathvision_geo,
    load_mathvista_geo,
    load_ocrvqa,
    load_refcoco,
    load_textvqa,
    load_vizwiz,
)

Loader = Callable[[Path, str, "int | None"], list[Sample]]
Scorer = Callable[[str, Sample], dict[str, float]]
Aggregator = Callable[[Sequence[Mapping[str, float]], Sequence[Sample]], dict[str, float]]
Generator = Callable[[Any, Any, Sequence[Sample], int, int], list[str]]


@dataclass(frozen=True)
class Task:
    """One task table entry.

    Attributes:
        name: Table key, also the metric-name prefix.
        family: ``"offline"``, ``"paper"`` or ``"omni"``.
        load: ``(data_root, split, limit) -> samples``. Paper tasks have one fixed split and ignore ``split``.
        prompt: The user-turn text for a sample (the image goes in the same chat message).
        parse: Cleans a raw generation into the prediction that is scored.
        score: ``(prediction, sample) -> {metric: value in [0, 1]}``; must hold :attr:`primary`.
        aggregate: Per-sample values and samples -> ``{metric: percent}``; must hold :attr:`primary`.
        primary: The metric reported in ``EvalResult.scores``.
        metric_names: Every metric :attr:`aggregate` returns (documented, stable).
        max_new_tokens: Default generation budget.
        default_root: The data root used when none is given.
        generate: ``(model, processor, samples, batch_size, max_new_tokens) -> raw answers``, for tasks whose
            items are not one image and a question (the omni tasks: image, audio and video); None: the runner's
            chat prompt with the sample's image.
    """

    name: str
    family: str
    load: Loader
    prompt: Callable[[Sample], str]
    parse: Callable[[str], str]
    score: Scorer
    aggregate: Aggregator
    primary: str
    metric_names: tuple[str, ...]
    max_new_tokens: int
    default_root: Callable[[], Path]
    description: str = ""
    generate: Generator | None = None


def mean_aggregate(values: Sequence[Mapping[str, float]], samples: Sequence[Sample]) -> dict[str, float]:
    """Mean of every per-sample metric, in percent (NaN for no samples)."""
    keys = list(values[0]) if values else []
    return {k: 100.0 * M.mean(v[k] for v in values) for k in keys}


def strip_prediction(text: str) -> str:
    """The default parser: the generation without surrounding whitespace (VLMEvalKit strips predictions too)."""
    return str(text).strip()


# --- offline benchmark -------------------------------------------------------------------------------------------

REPORTED_METRICS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "exact_match": ("accuracy",),
    "relaxed_accuracy": ("accuracy",),
    "iou50": ("acc_iou50", "mean_iou"),
})
"""Per-sample metric of an offline item (:data:`mergelab.bench.tasks.common.METRICS`) -> the metrics its task
reports, the primary first."""

OFFLINE_VARIANTS: Mapping[str, str] = MappingProxyType({"shifted": "", "generic": "_generic"})
"""Benchmark variant -> suffix of its evaluator task's name (``vqa`` is the shifted test set, ``vqa_generic``
the generic one, for forgetting), in the table's order."""


def offline_score(prediction: str, sample: Sample) -> dict[str, float]:
    """Score one offline item with the metric its JSONL line names (``metric`` field).

    ``exact_match`` -> ``accuracy`` (:func:`~mergelab.evaluators.metrics.exact_match`, the paper's modified
    normaliser); ``relaxed_accuracy`` -> ``accuracy`` (ChartQA's relaxed correctness, max over answers);
    ``iou50`` -> ``acc_iou50`` and ``mean_iou`` (boxes parsed from the answer strings on the 0-1000 grid, or
    ``meta["target_box"]`` when given, normalised).
    """
    if sample.metric == "iou50":
        return _grounding_score(prediction, sample)
    if sample.metric == "relaxed_accuracy":
        return {"accuracy": M.relaxed_accuracy_max(prediction=prediction, answers=sample.answers)}
    return {"accuracy": M.exact_match(prediction=prediction, answers=sample.answers)}


def _grounding_score(prediction: str, sample: Sample) -> dict[str, float]:
    targets: list[Sequence[float]] = []
    if sample.meta.get("target_box") is not None:
        targets.append([float(v) for v in sample.meta["target_box"]])
    else:
        for ref in sample.answers:
            box = M.parse_box(text=ref, scale=1000.0)
            if box is not None:
                targets.append(box)
    best = {"acc_iou50": 0.0, "iou": 0.0}
    for t in targets:
        s = M.grounding_scores(prediction=prediction, target_box=t, scale=1000.0)
        if s["iou"] > best["iou"]:
            best = s
    return {"acc_iou50": best["acc_iou50"], "mean_iou": best["iou"]}


def _offline_loader(spec: TaskSpec, variant: str) -> Loader:
    reported = REPORTED_METRICS[spec.metric]

    def load(data_root: Path, split: str, limit: int | None) -> list[Sample]:
        samples = read_split(spec.name, variant, split, data_root, limit=limit, load_images=False)
        for s in samples:
            if REPORTED_METRICS[str(s.metric)] != reported:
                raise ValueError(
                    f"{Path(data_root) / spec.name / variant / (split + '.jsonl')}: sample {s.id!r} has metric "
                    f"{s.metric!r}, which task {spec.name!r} does not report"
                )
        return samples

    return load


def _offline_task(spec: TaskSpec, variant: str) -> Task:
    names = REPORTED_METRICS[spec.metric]
    return Task(
        name=spec.name + OFFLINE_VARIANTS[variant],
        family="offline",
        load=_offline_loader(spec, variant),
        prompt=lambda s: s.question,
        parse=strip_prediction,
        score=offline_score,
        aggregate=mean_aggregate,
        primary=names[0],
        metric_names=names,
        max_new_tokens=spec.max_new_tokens,
        default_root=default_data_root,
        description=f"offline benchmark, {spec.name} ({variant} variant)",
    )


# --- the paper's ten columns ---------------------------------------------------------------------------------------

SHORT_ANSWER = "Answer the question using a single word or phrase."
VIZWIZ_HINT = "When the provided information is insufficient, respond with 'Unanswerable'."


def _paper_loader(fn: Callable[..., list[Sample]], **kw: str) -> Loader:
    def load(data_root: Path, split: str, limit: int | None) -> list[Sample]:
        return fn(data_root, limit=limit, **kw)

    return load


def _vqa_score(prediction: str, sample: Sample) -> dict[str, float]:
    return {"vqa_score": M.vqa_soft_accuracy(prediction=prediction, answers=sample.answers)}


def _em_score(prediction: str, sample: Sample) -> dict[str, float]:
    return {"accuracy": M.exact_match(prediction=prediction, answers=sample.answers)}


def _relaxed_score(prediction: str, sample: Sample) -> dict[str, float]:
    return {"relaxed_accuracy": M.relaxed_accuracy_max(prediction=prediction, answers=sample.answers)}


def _mathvista_score(prediction: str, sample: Sample) -> dict[str, float]:
    m = sample.meta
    return {
        "accuracy": M.mathvista_score(
            prediction=prediction,
            answer=sample.answers[0],
            question_type=str(m.get("question_type", "free_form")),
            answer_type=str(m.get("answer_type", "text")),
            choices=m.get("choices") or None,
            precision=None if m.get("precision") is None else int(m["precision"]),
        )
    }


def _mathvision_score(prediction: str, sample: Sample) -> dict[str, float]:
    return {
        "accuracy": M.mathvision_score(
            prediction=prediction, answer=sample.answers[0], options=sample.meta.get("options") or None
        )
    }


def _row_key(row: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in row).strip("_").replace("__", "_").replace("__", "_")


def _subset_aggregate(rows: Sequence[str]) -> Aggregator:
    def aggregate(values: Sequence[Mapping[str, float]], samples: Sequence[Sample]) -> dict[str, float]:
        sub = M.subset_mean_accuracy(
            scores=[v["accuracy"] for v in values],
            categories=[s.meta.get("categories", []) for s in samples],
            rows=rows,
        )
        out = {"accuracy": 100.0 * sub["subset"]}
        out.update({_row_key(r): 100.0 * sub[r] for r in rows})
        return out

    return aggregate


def _vqa_prompt(suffix: str) -> Callable[[Sample], str]:
    return lambda s: f"{s.question}\n{suffix}"


def _mathvision_prompt(s: Sample) -> str:
    opts = s.meta.get("options") or []
    if not opts:
        return f"{s.question}\nAnswer the question with a number or a short expression."
    listed = "\n".join(f"({M.OPTION_LETTERS[i]}) {o}" for i, o in enumerate(opts))
    return (
        f"{s.question}\nChoices:\n{listed}\nAnswer with the option's letter from the given choices directly."
    )


def _paper_task(
    name: str,
    loader: Loader,
    prompt: Callable[[Sample], str],
    score: Scorer,
    primary: str,
    max_new_tokens: int,
    description: str,
    aggregate: Aggregator = mean_aggregate,
    metric_names: tuple[str, ...] | None = None,
) -> Task:
    return Task(
        name=name,
        family="paper",
        load=loader,
        prompt=prompt,
        parse=strip_prediction,
        score=score,
        aggregate=aggregate,
        primary=primary,
        metric_names=metric_names or (primary,),
        max_new_tokens=max_new_tokens,
        default_root=default_paper_root,
        description=description,
    )


def _refcoco_task(which: str, label: str) -> Task:
    return _paper_task(
        which,
        _paper_loader(load_refcoco, which=which),
        lambda s: GROUNDING_PROMPT.format(expr=s.question),
        _grounding_score,
        "acc_iou50",
        48,
        f"{label} val: accuracy at IoU >= 0.5 (and mean IoU)",
        metric_names=("acc_iou50", "mean_iou"),
    )


_MV_ROWS = tuple(_row_key(r) for r in M.MATHVISTA_GEOMETRY_ROWS)
_MVI_ROWS = tuple(_row_key(r) for r in M.MATHVISION_GEOMETRY_ROWS)

PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("vizwiz", "VizWiz"),
    ("gqa", "GQA"),
    ("mathvista_geo", "MathVista"),
    ("mathvision_geo", "MATH-V"),
    ("chartqa", "ChartQA"),
    ("textvqa", "TextVQA"),
    ("ocrvqa", "OCRVQA"),
    ("refcoco", "RefCOCO"),
    ("refcoco_plus", "RefCOCO+"),
    ("refcocog", "RefCOCOg"),
)
"""The paper's Tables 2 and 3 columns, in order: (task name, column header)."""

def _omni_task(name: str) -> Task:
    return Task(
        name=name,
        family="omni",
        load=lambda root, split, limit: omni.load(name, split, limit),
        prompt=lambda s: s.question,
        parse=strip_prediction,
        score=omni.score,
        aggregate=omni.aggregate,
        primary="accuracy",
        metric_names=omni.metric_names(name),
        max_new_tokens=omni.MAX_NEW_TOKENS,
        default_root=omni.omni_root,
        description=f"omni benchmark, {name} (generated items, all their media)",
        generate=omni.generate,
    )


_TASK_LIST: list[Task] = [
    *(_offline_task(spec, v) for v in OFFLINE_VARIANTS for spec in BENCH_TASKS.values()),
    _paper_task("vizwiz", _paper_loader(load_vizwiz), _vqa_prompt(f"{VIZWIZ_HINT}\n{SHORT_ANSWER}"), _vqa_score,
                "vqa_score", 32, "VizWiz val: VQA soft accuracy"),
    _paper_task("gqa", _paper_loader(load_gqa), _vqa_prompt(SHORT_ANSWER), _em_score, "accuracy", 32,
                "GQA test-dev balanced: exact match (modified normaliser)"),
    _paper_task("mathvista_geo", _paper_loader(load_mathvista_geo), lambda s: s.question, _mathvista_score,
                "accuracy", 512, "MathVista testmini, geometry subset (mean of 3 rows)",
                aggregate=_subset_aggregate(M.MATHVISTA_GEOMETRY_ROWS), metric_names=("accuracy", *_MV_ROWS)),
    _paper_task("mathvision_geo", _paper_loader(load_mathvision_geo), _mathvision_prompt, _mathvision_score,
                "accuracy", 512, "MATH-Vision testmini, geometry subset (mean of 4 subjects)",
                aggregate=_subset_aggregate(M.MATHVISION_GEOMETRY_ROWS), metric_names=("accuracy", *_MVI_ROWS)),
    _paper_task("chartqa", _paper_loader(load_chartqa), _vqa_prompt(SHORT_ANSWER), _relaxed_score,
                "relaxed_accuracy", 32, "ChartQA test: relaxed accuracy"),
    _paper_task("textvqa", _paper_loader(load_textvqa), _vqa_prompt(SHORT_ANSWER), _vqa_score, "vqa_score", 32,
                "TextVQA val: VQA soft accuracy"),
    _paper_task("ocrvqa", _paper_loader(load_ocrvqa), _vqa_prompt(SHORT_ANSWER), _em_score, "accuracy", 32,
                "OCR-VQA test: exact match (modified normaliser)"),
    _refcoco_task("refcoco", "RefCOCO"),
    _refcoco_task("refcoco_plus", "RefCOCO+"),
    _refcoco_task("refcocog", "RefCOCOg"),
    *(_omni_task(name) for name in OMNI_TASK_NAMES),
]  # fmt: skip

TASKS: Mapping[str, Task] = MappingProxyType({t.name: t for t in _TASK_LIST})
"""Every task, by name (read-only)."""

OFFLINE_TASKS: tuple[str, ...] = tuple(BENCH_TASKS)
"""The offline benchmark's five tasks (shifted variant), in the paper's expert order of capabilities."""

OMNI_TASKS: tuple[str, ...] = OMNI_TASK_NAMES
"""The omni benchmark's tasks: the cross-modal sets, then each modality's own tasks."""


def get_task(name: str) -> Task:
    """The task called ``name``, or a ``KeyError`` listing the known names."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def metric_name(task: str, metric: str) -> str:
    """The flat, MLflow-safe metric name ``<task>/<metric>``."""
    return f"{task}/{metric}"


__all__ = [
    "OFFLINE_TASKS",
    "OFFLINE_VARIANTS",
    "OMNI_TASKS",
    "PAPER_COLUMNS",
    "REPORTED_METRICS",
    "TASKS",
    "Task",
    "get_task",
    "mean_aggregate",
    "metric_name",
    "offline_score",
    "strip_prediction",
]
