"""VQA: attributes and existence of objects (the stand-in for OptMerge's VQA capability, arXiv:2505.19892).

Scene: one filled shape (circle, square, triangle, diamond) of 36-52 pixels anywhere on a white image.
Questions (answers are single words, scored by exact match):

* ``"what color is the {shape}?"`` -> colour;
* ``"what shape is the {colour} object?"`` -> shape;
* ``"is there a {colour} {shape}?"`` -> ``yes`` / ``no`` (a ``no`` scene is always a near miss that shares the
  colour or the shape).

Variants: ``generic`` uses six colours; ``shifted`` asks about objects in four *new* colours (pink, brown, cyan,
gray: new answer words; a ``no`` near miss may take any of the ten colours), so the base's colour skill is reused.

Why one large object: the tiny Qwen2-VL learns what changes its *pooled* image features within a few hundred steps,
not to bind a word to one of several objects or read a 20-px object from one of 16 image tokens
(docs/benchmark-zoo.md). One object of up to 52 px is read at 62% after 400 single-task steps where 20-24-px
objects among distractors stayed at chance.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image

from mergelab.bench.tasks.common import (
    COLOURS,
    GENERIC_COLOURS,
    IMAGE_SIZE,
    SHAPES,
    SHIFTED_COLOURS,
    Draft,
    Sample,
    TaskSpec,
    colour_answers,
    draw_objects,
    weighted_choice,
)

QUESTION_WEIGHTS = {
    "generic": {"colour": 0.4, "exists": 0.3, "shape": 0.3},
    "shifted": {"colour": 0.5, "exists": 0.25, "shape": 0.25},
}
SIZES = (36, 40, 44, 48, 52)
MARGIN = 2
"""Pixels kept free between an object and the image border."""


def _palettes(variant: str) -> tuple[list[str], list[str]]:
    """(target colours, distractor colours) of a variant."""
    if variant == "generic":
        return list(GENERIC_COLOURS), list(GENERIC_COLOURS)
    return list(SHIFTED_COLOURS), list(COLOURS)


def draft(rng: random.Random, variant: str) -> Draft:
    """Propose one VQA item of ``variant`` (see the module docstring)."""
    targets, others = _palettes(variant)
    qtype = weighted_choice(rng, QUESTION_WEIGHTS[variant])
    shape, colour = rng.choice(SHAPES), rng.choice(targets)
    drawn = (shape, colour)
    if qtype == "colour":
        question, answers = f"what color is the {shape}?", colour_answers(colour)
    elif qtype == "shape":
        question, answers = f"what shape is the {colour} object?", (shape,)
    else:
        present = rng.random() < 0.5
        if not present:  # a near miss: same colour, other shape, or same shape, other colour
            if rng.random() < 0.5:
                drawn = (rng.choice([s for s in SHAPES if s != shape]), colour)
            else:
                drawn = (shape, rng.choice([c for c in others if c != colour]))
        article = "an" if colour[0] in "aeiou" else "a"
        question, answers = f"is there {article} {colour} {shape}?", ("yes" if present else "no",)
    size = rng.choice(SIZES)
    x0 = rng.randint(MARGIN, IMAGE_SIZE - MARGIN - size)
    y0 = rng.randint(MARGIN, IMAGE_SIZE - MARGIN - size)
    objects = [{"shape": drawn[0], "colour": drawn[1], "box": [x0, y0, x0 + size - 1, y0 + size - 1]}]
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


def describe(sample: Sample) -> str:
    """The scene in words: the object's colour and shape."""
    obj = sample.meta["objects"][0]
    return f"there is a {obj['colour']} {obj['shape']}."


SPEC = TaskSpec(
    name="vqa",
    metric="exact_match",
    draft=draft,
    render=render,
    vocabulary={
        "generic": tuple(sorted({*GENERIC_COLOURS, *SHAPES, "yes", "no"})),
        "shifted": tuple(sorted({*SHIFTED_COLOURS, *SHAPES, "yes", "no"})),
    },
    description="attributes and existence of one large coloured shape; shifted: four new colours",
    describe=describe,
)
