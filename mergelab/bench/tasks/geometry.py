"""Geometry: sides, lengths and angles (the stand-in for OptMerge's MathVista/MATH-Vision geometry).

Everything is drawn in black 3-pixel strokes on white (a fixed colour: colour carries no meaning here).
Three question families, each answered by one word (exact match):

* sides -- an outline polygon with 3-6 sides (slightly irregular, random rotation);
* lengths -- two parallel segments whose lengths differ by at least 30%;
* angles -- two rays from a vertex, 25-70 degrees (acute) or 110-160 degrees (obtuse).

Variants reuse the same visual skills with new answer words:

=========  ====================================================  ===================================================
family     generic                                               shifted
=========  ====================================================  ===================================================
sides      "how many sides does the shape have?" -> 3 .. 6       "what kind of polygon is this?" -> triangle ..
                                                                 hexagon (quadrilateral for 4)
lengths    horizontal segments: "... the top one or the bottom   vertical segments: "... the left one or the right
           one?" -> top / bottom                                 one?" -> left / right
angles     "is the angle acute or obtuse?" -> acute / obtuse     "is the angle smaller or larger than a right
                                                                 angle?" -> smaller / larger
=========  ====================================================  ===================================================
"""

from __future__ import annotations

import math
import random
from typing import Any

from PIL import Image

from mergelab.bench.tasks.common import INK, Draft, Sample, TaskSpec, blank, weighted_choice

STROKE = 3
FAMILY_WEIGHTS = {"sides": 0.4, "lengths": 0.3, "angles": 0.3}
POLYGON_NAMES = {3: "triangle", 4: "quadrilateral", 5: "pentagon", 6: "hexagon"}
MIN_RATIO = 1.3


def _polygon(rng: random.Random) -> dict[str, Any]:
    n = rng.randint(3, 6)
    cx, cy = 56 + rng.randint(-6, 6), 56 + rng.randint(-6, 6)
    radius = rng.randint(32, 42)
    rot = rng.uniform(0, 2 * math.pi)
    step = 2 * math.pi / n
    points = []
    for k in range(n):
        a = rot + k * step + rng.uniform(-0.12, 0.12) * step
        r = radius * rng.uniform(0.88, 1.0)
        points.append([round(cx + r * math.cos(a)), round(cy + r * math.sin(a))])
    return {"family": "sides", "sides": n, "points": points}


def _segments(rng: random.Random, orientation: str) -> dict[str, Any]:
    while True:
        a, b = rng.randint(24, 96), rng.randint(24, 96)
        if max(a, b) >= MIN_RATIO * min(a, b):
            break
    segments = []
    for k, length in enumerate((a, b)):  # first = top (horizontal) or left (vertical)
        across = rng.randint(18, 38) + 56 * k  # position on the perpendicular axis, one per half
        start = rng.randint(8, 104 - length)
        if orientation == "horizontal":
            segments.append([start, across, start + length, across])
        else:
            segments.append([across, start, across, start + length])
    return {"family": "lengths", "orientation": orientation, "lengths": [a, b], "segments": segments}


def _angle(rng: random.Random) -> dict[str, Any]:
    degrees = rng.randint(25, 70) if rng.random() < 0.5 else rng.randint(110, 160)
    vx, vy = 56 + rng.randint(-8, 8), 56 + rng.randint(-8, 8)
    first = rng.uniform(0, 360)
    rays = []
    for direction in (first, first + degrees):
        length = rng.randint(34, 44)
        rad = math.radians(direction)
        rays.append([round(vx + length * math.cos(rad)), round(vy - length * math.sin(rad))])
    return {"family": "angles", "degrees": degrees, "vertex": [vx, vy], "rays": rays}


def draft(rng: random.Random, variant: str) -> Draft:
    """Propose one geometry item of ``variant`` (see the module docstring)."""
    family = weighted_choice(rng, FAMILY_WEIGHTS)
    shifted = variant == "shifted"
    if family == "sides":
        meta = _polygon(rng)
        if shifted:
            question, answer = "what kind of polygon is this?", POLYGON_NAMES[meta["sides"]]
        else:
            question, answer = "how many sides does the shape have?", str(meta["sides"])
    elif family == "lengths":
        meta = _segments(rng, "vertical" if shifted else "horizontal")
        first, second = ("left", "right") if shifted else ("top", "bottom")
        question = f"which line is longer, the {first} one or the {second} one?"
        answer = first if meta["lengths"][0] > meta["lengths"][1] else second
    else:
        meta = _angle(rng)
        acute = meta["degrees"] < 90
        if shifted:
            question = "is the angle smaller or larger than a right angle?"
            answer = "smaller" if acute else "larger"
        else:
            question, answer = "is the angle acute or obtuse?", "acute" if acute else "obtuse"
    return Draft(question=question, answer=answer, answers=(answer,), meta=meta)


def render(meta: dict[str, Any]) -> Image.Image:
    """Draw a geometry figure from its ``meta``."""
    img, draw = blank()
    if meta["family"] == "sides":
        pts = [tuple(p) for p in meta["points"]]
        draw.line(pts + [pts[0]], fill=INK, width=STROKE, joint="curve")
    elif meta["family"] == "lengths":
        for x0, y0, x1, y1 in meta["segments"]:
            draw.line((x0, y0, x1, y1), fill=INK, width=STROKE)
    else:
        vertex = tuple(meta["vertex"])
        for ray in meta["rays"]:
            draw.line((vertex, tuple(ray)), fill=INK, width=STROKE)
    return img


def describe(sample: Sample) -> str:
    """The scene in words: the side count (shifted: the polygon's name), the longer line, or the angle in degrees
    (shifted: smaller or larger than a right angle).

    A shifted item states its answer's fact directly: the base counts sides and tells acute from obtuse in images
    (generic), so "5 sides" -> "pentagon" or "126 degrees" -> "larger" in text would let it answer the shifted
    questions by transfer, leaving the expert nothing to add (measured: base 46 on shifted geometry with those
    bridges; docs/benchmark-zoo.md).

    Raises:
        ValueError: an unknown geometry family.
    """
    meta, shifted = sample.meta, sample.variant == "shifted"
    family = meta["family"]
    if family == "sides":
        return f"the shape is a {sample.answer}." if shifted else f"the shape has {meta['sides']} sides."
    if family == "angles":
        if shifted:
            return f"the angle is {'larger' if meta['degrees'] > 90 else 'smaller'} than a right angle."
        return f"the angle is {meta['degrees']} degrees."
    if family == "lengths":
        names = ("top", "bottom") if meta["orientation"] == "horizontal" else ("left", "right")
        axis = 1 if meta["orientation"] == "horizontal" else 0  # segments are [x1, y1, x2, y2]
        first_is_a = meta["segments"][0][axis] < meta["segments"][1][axis]
        longer_first = meta["lengths"][0] > meta["lengths"][1]
        longer, shorter = names if longer_first == first_is_a else names[::-1]
        return f"the {longer} line is longer than the {shorter} line."
    raise ValueError(f"describe: unknown geometry family {family!r} in sample {sample.id!r}")


SPEC = TaskSpec(
    name="geometry",
    metric="exact_match",
    draft=draft,
    render=render,
    vocabulary={
        "generic": tuple(sorted({*(str(n) for n in POLYGON_NAMES), "top", "bottom", "acute", "obtuse"})),
        "shifted": tuple(sorted({*POLYGON_NAMES.values(), "left", "right", "smaller", "larger"})),
    },
    description="polygon sides, segment lengths, angles in black; shifted: new answer words, vertical segments",
    describe=describe,
)
