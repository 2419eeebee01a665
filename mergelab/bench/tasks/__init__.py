"""The offline benchmark's five procedural tasks: the task table and deterministic split generation.

Usage::

    from mergelab.bench.tasks import TASKS, generate, iter_samples
    test = generate("chart", "shifted", "test")                  # 1200 samples, deterministic
    stream = iter_samples("vqa", "generic", "train", seed=0)     # endless stream for training

Each task stands in for one capability of OptMerge (arXiv:2505.19892) and comes in two variants: ``generic`` (what
the base model learns) and ``shifted`` (what each expert specialises on and what the benchmark tests: the same
visual skill with new answer words). See ``docs/benchmark-data.md``.

A task is defined once, by the :class:`TaskSpec` of its module (name, metric, generator, answer vocabulary,
generation budget, splits); :data:`TASK_SPECS` lists the modules, and the data files, the evaluators' offline
tasks, the lm-eval tasks, the suites and the demo derive their task lists from it. A new task is one module
here plus one line in :data:`TASK_SPECS`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import islice
from types import MappingProxyType

from mergelab.bench.tasks import chart, geometry, grounding, ocr, vqa
from mergelab.bench.tasks.common import (
    METRICS,
    SPLITS,
    VARIANTS,
    Draft,
    Sample,
    TaskSpec,
    canonical,
    split_of,
    stable_seed,
)

GENERATOR_VERSION = "5"
"""Bump whenever any generator's output changes: ``ensure_data`` rewrites data of another version."""

TASK_SPECS: MappingProxyType[str, TaskSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            vqa.SPEC,
            geometry.SPEC,
            chart.SPEC,
            ocr.SPEC,
            grounding.SPEC,
        )
    }
)
"""Every task by name, in the paper's order of capabilities: one line per task module, the only list of tasks."""
TASKS: tuple[str, ...] = tuple(TASK_SPECS)
DEFAULT_SIZES: MappingProxyType[str, int] = MappingProxyType({"train": 4000, "val": 300, "test": 1200})
"""Samples per (task, variant) split. Test: sqrt(p(1-p)/n) <= 0.015 for every p needs n >= 1112."""

_MAX_TRIES_PER_SAMPLE = 1000


def _check(task: str, variant: str, split: str) -> TaskSpec:
    if task not in TASK_SPECS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    spec = TASK_SPECS[task]
    if variant not in spec.variants:
        raise ValueError(f"unknown variant {variant!r} for task {task!r}; known: {spec.variants}")
    if split not in spec.splits:
        raise ValueError(f"unknown split {split!r} for task {task!r}; known: {spec.splits}")
    return spec


def iter_drafts(task: str, variant: str, split: str, seed: int = 0) -> Iterator[Draft]:
    """Endless stream of the split's drafts (not rendered), without duplicates.

    Drafts come from one ``random.Random`` seeded by ``(task, variant, split, seed)``; only those whose
    ``(meta, question)`` hashes into ``split`` (see :func:`~mergelab.bench.tasks.common.split_of`) are kept, so
    splits are disjoint for any seeds and the first ``n`` items are a prefix of the first ``n + 1``.

    Raises:
        RuntimeError: The split's key space is exhausted (too many samples asked of a tiny task space).
    """
    spec = _check(task, variant, split)
    rng = random.Random(stable_seed("mergelab.bench", task, variant, split, seed))
    seen: set[str] = set()
    misses = 0
    while True:
        d = spec.draft(rng, variant)
        full = canonical([d.meta, d.question])
        if split_of(task, variant, full) != split or full in seen:
            misses += 1
            if misses > _MAX_TRIES_PER_SAMPLE:
                raise RuntimeError(
                    f"{task}/{variant}/{split}: no new sample after {misses} drafts ({len(seen)} made); "
                    "the task's space is exhausted for this split"
                )
            continue
        misses = 0
        seen.add(full)
        yield d


def iter_samples(task: str, variant: str, split: str, seed: int = 0) -> Iterator[Sample]:
    """Endless stream of rendered samples of one split (see :func:`iter_drafts`); ids count from 0."""
    spec = _check(task, variant, split)
    for i, d in enumerate(iter_drafts(task, variant, split, seed)):
        yield Sample(
            id=f"{task}-{variant}-{split}-{i:05d}",
            task=task,
            variant=variant,
            split=split,
            image=spec.render(d.meta),
            question=d.question,
            answer=d.answer,
            answers=list(d.answers),
            metric=spec.metric,
            meta=d.meta,
        )


def generate(task: str, variant: str, split: str, n: int | None = None, seed: int = 0) -> list[Sample]:
    """The first ``n`` samples of a split (``DEFAULT_SIZES[split]`` when ``n`` is None).

    Args:
        task: One of :data:`TASKS`.
        variant: ``"generic"`` or ``"shifted"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        n: Number of samples; None for the default size.
        seed: Data seed. Splits stay disjoint across seeds (the split of a scene does not depend on it).

    Returns:
        Deterministic samples: the same arguments give identical questions, answers, meta and pixels.
    """
    _check(task, variant, split)
    n = DEFAULT_SIZES[split] if n is None else n
    if n < 0:
        raise ValueError(f"n must be >= 0 for {task}/{variant}/{split}, got {n}")
    return list(islice(iter_samples(task, variant, split, seed), n))


__all__ = [
    "DEFAULT_SIZES",
    "GENERATOR_VERSION",
    "METRICS",
    "TASK_SPECS",
    "SPLITS",
    "TASKS",
    "VARIANTS",
    "Sample",
    "TaskSpec",
    "generate",
    "iter_drafts",
    "iter_samples",
]
