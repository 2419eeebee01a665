"""VQA: attributes and existence of objects (the stand-in for OptMerge's VQA capability, arXiv:2505.19892 s3).

Scene: 1-4 filled shapes (circle, square, triangle, diamond), one per cell of the 4x4 grid, on white.
Questions (answers are single words, scored by exact match):

* ``"what color is the {shape}?"`` -> colour (the shape is unique in the scene);
* ``"what shape is the {colour} object?"`` -> shape (the colour is unique in the scene);
* ``"is there a {colour} {shape}?"`` -> ``yes`` / ``no`` (a ``no`` scene always holds a near miss that shares
  the colour or the shape).

Variants: ``generic`` uses six colours; ``shifted`` asks about objects in four *new* colours (pink, brown, cyan,
gray: new answer words) among distractors of all ten colours, so the base's colour skill is reused.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image

from mergelab.bench.tasks.common import (
    COLOURS,
    GENERIC_COLOURS,
    GRID,
    SHAPES,
    SHIFTED_COLOURS,
    Draft,
    TaskSpec,
    colour_answers,
    draw_objects,
    place_object,
    weighted_choice,
)

QUESTION_WEIGHTS = {
    "generic": {"colour": 0.4, "exists": 0.3, "shape": 0.3},
    "shifted": {"colour": 0.5, "exists": 0.25, "shape": 0.25},
}
N_OBJECTS_WEIGHTS = {1: 1.0, 2: 2.0, 3: 2.0, 4: 1.5}
SIZES = (20, 22, 24)


def _palettes(variant: str) -> tuple[list[str], list[str]]:
    """(target colours, distractor colours) of a variant."""
    if variant == "generic":
        return list(GENERIC_COLOURS), list(GENERIC_COLOURS)
    return list(SHIFTED_COLOURS), list(COLOURS)


def draft(rng: random.Random, variant: str) -> Draft:
    """Propose one VQA item of ``variant`` (see the module docstring)."""
    targets, others = _palettes(variant)
    qtype = weighted_choice(rng, QUESTION_WEIGHTS[variant])
    n = int(weighted_choice(rng, {str(k): w for k, w in N_OBJECTS_WEIGHTS.items()}))
    shape, colour = rng.choice(SHAPES), rng.choice(targets)
    pairs: list[tuple[str, str]] = []
    if qtype == "colour":  # the target's shape is unique
        pairs.append((shape, colour))
        pairs += [(rng.choice([s for s in SHAPES if s != shape]), rng.choice(others)) for _ in range(n - 1)]
        question, answers = f"what color is the {shape}?", colour_answers(colour)
    elif qtype == "shape":  # the target's colour is unique
        pairs.append((shape, colour))
        pairs += [(rng.choice(SHAPES), rng.choice([c for c in others if c != colour])) for _ in range(n - 1)]
        question, answers = f"what shape is the {colour} object?", (shape,)
    else:
        present = rng.random() < 0.5
        if present:
            pairs.append((shape, colour))
        else:  # a near miss: same colour, other shape, or same shape, other colour
            if rng.random() < 0.5:
                pairs.append((rng.choice([s for s in SHAPES if s != shape]), colour))
            else:
                pairs.append((shape, rng.choice([c for c in others if c != colour])))
        while len(pairs) < n:
            p = (rng.choice(SHAPES), rng.choice(others))
            if present or p != (shape, colour):
                pairs.append(p)
        article = "an" if colour[0] in "aeiou" else "a"
        question, answers = f"is there {article} {colour} {shape}?", ("yes" if present else "no",)
    cells = rng.sample(range(GRID * GRID), len(pairs))  # a random cell per object, the target's included
    objects = [
        place_object(rng, s, c, (cell % GRID, cell // GRID), rng.choice(SIZES))
        for (s, c), cell in zip(pairs, cells, strict=True)
    ]
    objects.sort(key=lambda o: (o["cell"][1], o["cell"][0]))  # reading order: a canonical meta
    query: dict[str, Any] = {"type": qtype, "shape": shape, "colour": colour}
    if qtype == "colour":
        del query["colour"]
    elif qtype == "shape":
        del query["shape"]
    meta = {"objects": objects, "query": query}
    return Draft(question=question, answer=answers[0], answers=tuple(answers), meta=meta)


def render(meta: dict[str, Any]) -> Image.Image:
    """Draw a VQA scene from its ``meta``."""
    return draw_objects(meta["objects"])


SPEC = TaskSpec(
    name="vqa",
    metric="exact_match",
    draft=draft,
    render=render,
    description="attributes and existence of coloured shapes; shifted: four new colours",
)
