"""OCR: reading a rendered character (the stand-in for OptMerge's TextVQA / OCR-VQA capability).

One large character of the package's 5x7 bitmap font is drawn near the middle of the image, 6-8 pixels per font
dot (30x42 to 40x56-px glyphs), in one of four dark inks, jittered by up to 6 pixels. The question is
``"what is written in the image?"`` and the answer is the character (exact match).

Variants: ``generic`` draws a digit; ``shifted`` one of ten capital letters (A C E H K L P R T X): new glyphs and
new answer tokens on the same reading skill.

Why one large centred glyph: the tiny Qwen2-VL learns anything that changes its *pooled* image features within a
few hundred steps, but not to select one of 16 image tokens and read fine detail from it (docs/benchmark-zoo.md:
a 15x21-px digit in a random cell stays at chance after 700 steps; a 40x56-px digit in the middle is read at 95%
after 200). Strings of several small glyphs would leave the OCR expert nothing to learn in a CPU budget.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image

from mergelab.bench.tasks.common import IMAGE_SIZE, Draft, Sample, TaskSpec, blank, draw_glyph

DIGITS = "0123456789"
LETTERS = "ACEHKLPRTX"
ALPHABETS = {"generic": DIGITS, "shifted": LETTERS}
QUESTION = "what is written in the image?"
DOTS = (6, 7, 8)
"""Pixels per font dot: glyphs of 30x42, 35x49 or 40x56 pixels."""
JITTER = 6
"""Largest offset of the glyph from the image centre, per axis, in pixels."""
INKS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (40, 40, 40), (20, 20, 70), (70, 20, 20))
"""Dark inks (black, charcoal, navy, maroon): variety that keeps the glyph the darkest thing in the image."""


def glyph_origin(dot: int, jitter: tuple[int, int]) -> tuple[int, int]:
    """Top-left pixel of a glyph of ``dot`` pixels per font dot, centred and offset by ``jitter``."""
    return (IMAGE_SIZE - 5 * dot) // 2 + jitter[0], (IMAGE_SIZE - 7 * dot) // 2 + jitter[1]


def draft(rng: random.Random, variant: str) -> Draft:
    """Propose one OCR item of ``variant`` (see the module docstring)."""
    text = rng.choice(ALPHABETS[variant])
    meta = {
        "text": text,
        "dot": rng.choice(DOTS),
        "jitter": [rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)],
        "ink": rng.randrange(len(INKS)),
    }
    return Draft(question=QUESTION, answer=text, answers=(text,), meta=meta)


def render(meta: dict[str, Any]) -> Image.Image:
    """Draw an OCR item from its ``meta``."""
    img, draw = blank()
    x, y = glyph_origin(meta["dot"], tuple(meta["jitter"]))
    draw_glyph(draw, meta["text"], x, y, fill=INKS[meta["ink"]], dot=meta["dot"])
    return img


def describe(sample: Sample) -> str:
    """The scene in words: the text."""
    return f"the image shows {sample.meta['text']}."


SPEC = TaskSpec(
    name="ocr",
    metric="exact_match",
    draft=draft,
    render=render,
    vocabulary={v: tuple(sorted(chars)) for v, chars in ALPHABETS.items()},
    description="read one large bitmap-font character; generic: digits, shifted: capital letters",
    describe=describe,
)
