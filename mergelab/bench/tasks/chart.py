"""Chart: value, max and comparison on bar or line charts (the stand-in for OptMerge's ChartQA).

A chart holds four data points at the centres of the four 28-px columns, over light-gray gridlines every 10 px
and a black baseline at y = 104; everything else is black on white. A point of value ``v`` (in grid units 1-9)
reaches ``104 - 10 v``. Answers are scored by relaxed accuracy (numbers within 5%, else exact match).

Variants reuse the height-reading skill with new answer words:

* ``generic`` -- filled bars, values 1-9: ``"what is the value of the third bar?"`` -> ``"7"``;
  ``"what is the highest value?"``; ``"is the first bar taller than the fourth bar?"`` -> yes / no.
* ``shifted`` -- a line chart (dots joined by a line), values 10-90 in steps of 10 (gridlines every 10 units):
  ``"what is the value of the third point?"`` -> ``"70"``; ``"what is the highest value?"``;
  ``"is the first point higher than the fourth point?"``.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image

from mergelab.bench.tasks.common import CELL, GRIDLINE, INK, Draft, Sample, TaskSpec, blank, weighted_choice

BASELINE = 104
UNIT = 10
N_POINTS = 4
BAR_HALF_WIDTH = 8
DOT_RADIUS = 4
ORDINALS = ("first", "second", "third", "fourth")
QUESTION_WEIGHTS = {"value": 0.5, "max": 0.25, "compare": 0.25}
SCALE = {"generic": 1, "shifted": 10}


def column_x(k: int) -> int:
    """Pixel x of the centre of data point ``k``."""
    return k * CELL + CELL // 2


def top_y(value_units: int) -> int:
    """Pixel y reached by a value of ``value_units`` grid units."""
    return BASELINE - UNIT * value_units


def draft(rng: random.Random, variant: str) -> Draft:
    """Propose one chart item of ``variant`` (see the module docstring)."""
    units = [rng.randint(1, 9) for _ in range(N_POINTS)]
    while len(set(units)) == 1:  # a comparison needs two different values
        units = [rng.randint(1, 9) for _ in range(N_POINTS)]
    scale = SCALE[variant]
    noun = "bar" if variant == "generic" else "point"
    qtype = weighted_choice(rng, QUESTION_WEIGHTS)
    query: dict[str, Any] = {"type": qtype}
    if qtype == "value":
        k = rng.randrange(N_POINTS)
        question, answer = f"what is the value of the {ORDINALS[k]} {noun}?", str(units[k] * scale)
        query["index"] = k
    elif qtype == "max":
        question, answer = "what is the highest value?", str(max(units) * scale)
    else:
        while True:
            i, j = rng.sample(range(N_POINTS), 2)
            if units[i] != units[j]:
                break
        verb = "taller" if variant == "generic" else "higher"
        question = f"is the {ORDINALS[i]} {noun} {verb} than the {ORDINALS[j]} {noun}?"
        answer = "yes" if units[i] > units[j] else "no"
        query.update(first=i, second=j)
    meta = {
        "kind": "bar" if variant == "generic" else "line",
        "units": units,
        "scale": scale,
        "values": [u * scale for u in units],
        "query": query,
    }
    return Draft(question=question, answer=answer, answers=(answer,), meta=meta)


def render(meta: dict[str, Any]) -> Image.Image:
    """Draw a chart from its ``meta``."""
    img, draw = blank()
    for u in range(1, 10):
        draw.line((0, top_y(u), img.width - 1, top_y(u)), fill=GRIDLINE, width=1)
    points = [(column_x(k), top_y(u)) for k, u in enumerate(meta["units"])]
    if meta["kind"] == "bar":
        for x, y in points:
            draw.rectangle((x - BAR_HALF_WIDTH, y, x + BAR_HALF_WIDTH - 1, BASELINE), fill=INK)
    else:
        draw.line(points, fill=INK, width=2)
        for x, y in points:
            draw.ellipse((x - DOT_RADIUS, y - DOT_RADIUS, x + DOT_RADIUS, y + DOT_RADIUS), fill=INK)
    draw.line((0, BASELINE, img.width - 1, BASELINE), fill=INK, width=2)
    return img


def describe(sample: Sample) -> str:
    """The scene in words: the values, left to right."""
    return "the values are " + ", ".join(str(v) for v in sample.meta["values"]) + "."


SPEC = TaskSpec(
    name="chart",
    metric="relaxed_accuracy",
    draft=draft,
    render=render,
    vocabulary={v: tuple(sorted({*(str(u * s) for u in range(1, 10)), "yes", "no"})) for v, s in SCALE.items()},
    description="value / max / comparison on 4-point charts; shifted: line charts with values in tens",
    describe=describe,
)
