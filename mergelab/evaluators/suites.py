"""Suites: named task lists with a table layout.

* ``paper``: the ten columns of the paper's Tables 2 and 3 (VizWiz, GQA, MathVista, MATH-V, ChartQA, TextVQA,
  OCRVQA, RefCOCO, RefCOCO+, RefCOCOg) plus ``Avg``, the unweighted mean of the available columns (as in the paper:
  rows with "-" cells average the columns they have).
* ``offline``: the offline benchmark's synthetic tasks (:data:`mergelab.bench.tasks.TASK_SPECS`, shifted variant)
  plus ``Avg``.
* ``offline_generic``: their generic variants (forgetting).
* ``omni``: the omni benchmark's cross-modal sets and single-modality tasks (:data:`mergelab.bench.omni.tasks.OMNI_TASKS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from mergelab.evaluators.tasks import OFFLINE_TASKS, OMNI_TASKS, PAPER_COLUMNS


@dataclass(frozen=True)
class Suite:
    """A named list of tasks and their column headers."""

    name: str
    tasks: tuple[str, ...]
    headers: tuple[str, ...]
    description: str = ""


SUITES: Mapping[str, Suite] = MappingProxyType(
    {
        "paper": Suite(
            "paper",
            tuple(t for t, _ in PAPER_COLUMNS),
            tuple(h for _, h in PAPER_COLUMNS),
            "the paper's Tables 2 and 3 (ten columns + Avg)",
        ),
        "offline": Suite(
            "offline", OFFLINE_TASKS, OFFLINE_TASKS, "offline benchmark, shifted variant (test set)"
        ),
        "offline_generic": Suite(
            "offline_generic",
            tuple(f"{t}_generic" for t in OFFLINE_TASKS),
            OFFLINE_TASKS,
            "offline benchmark, generic variant (forgetting)",
        ),
        "omni": Suite("omni", OMNI_TASKS, OMNI_TASKS, "omni benchmark: the cross-modal sets, then each modality's tasks"),
    }
)


def get_suite(name: str) -> Suite:
    """The suite called ``name``, or a ``KeyError`` listing the known suites."""
    try:
        return SUITES[name]
    except KeyError:
        raise KeyError(f"unknown suite {name!r}; known suites: {', '.join(SUITES)}") from None


def paper_table_row(scores: Mapping[str, float], suite: str = "paper") -> dict[str, float]:
    """One table row: ``{header: score}`` in the suite's column order plus ``"Avg"``.

    Missing or NaN columns (the paper's "-" cells) are NaN and left out of ``Avg``, as in the paper.

    Args:
        scores: ``EvalResult.scores`` (task name -> percent).
        suite: A suite name.

    Returns:
        The ordered row, values rounded to 2 decimals as in the paper's tables.
    """
    s = get_suite(suite)
    row = {h: float(scores.get(t, math.nan)) for t, h in zip(s.tasks, s.headers, strict=True)}
    vals = [v for v in row.values() if math.isfinite(v)]
    row["Avg"] = sum(vals) / len(vals) if vals else math.nan
    return {k: round(v, 2) if math.isfinite(v) else v for k, v in row.items()}
