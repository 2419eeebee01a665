"""OCR: reading short rendered strings (the stand-in for OptMerge's TextVQA / OCR-VQA capability, s3).

A string of 1-3 characters is drawn in black with the package's 5x7 bitmap font (15x21-px glyphs), one character
per 28-px grid cell along one row of the 4x4 grid (one character per merged Qwen2-VL image token). The question is
``"what is written in the image?"`` and the answer is the string itself (exact match).

Variants: ``generic`` strings are digits only; ``shifted`` strings mix digits with ten capital letters
(A C E H K L P R T X) and always hold at least one letter, so the base's reading skill is reused for the digits
and the letters bring new glyphs and answer tokens.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image

from mergelab.bench.tasks.common import (
    CELL,
    GLYPH_H,
    GLYPH_W,
    GRID,
    Draft,
    TaskSpec,
    blank,
    cell_origin,
    draw_glyph,
    weighted_choice,
)

DIGITS = "0123456789"
LETTERS = "ACEHKLPRTX"
LENGTH_WEIGHTS = {"1": 0.2, "2": 0.4, "3": 0.4}
QUESTION = "what is written in the image?"
JITTER = 2


def glyph_origin(cell: tuple[int, int], jitter: tuple[int, int]) -> tuple[int, int]:
    """Top-left pixel of the glyph drawn in ``cell`` with the string's ``jitter``."""
    ox, oy = cell_origin(cell)
    return ox + (CELL - GLYPH_W) // 2 + jitter[0], oy + (CELL - GLYPH_H) // 2 + jitter[1]


def draft(rng: random.Random, variant: str) -> Draft:
    """Propose one OCR item of ``variant`` (see the module docstring)."""
    length = int(weighted_choice(rng, LENGTH_WEIGHTS))
    alphabet = DIGITS if variant == "generic" else DIGITS + LETTERS
    while True:
        text = "".join(rng.choice(alphabet) for _ in range(length))
        if variant == "generic" or any(c in LETTERS for c in text):
            break
    row = rng.randrange(GRID)
    col = rng.randint(0, GRID - length)
    jitter = [rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)]
    meta = {"text": text, "row": row, "col": col, "jitter": jitter}
    return Draft(question=QUESTION, answer=text, answers=(text,), meta=meta)


def render(meta: dict[str, Any]) -> Image.Image:
    """Draw an OCR string from its ``meta``."""
    img, draw = blank()
    for k, char in enumerate(meta["text"]):
        x, y = glyph_origin((meta["col"] + k, meta["row"]), tuple(meta["jitter"]))
        draw_glyph(draw, char, x, y)
    return img


SPEC = TaskSpec(
    name="ocr",
    metric="exact_match",
    draft=draft,
    render=render,
    description="read 1-3 bitmap-font characters; shifted: capitals mixed with digits",
)
