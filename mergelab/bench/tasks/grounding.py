"""Grounding: referring expression -> box (the stand-in for OptMerge's RefCOCO capability, arXiv:2505.19892).

Scene: one filled shape (4 shapes x 6 colours) in one cell of the grid. The prompt is lmms-eval's RefCOCO
prompt, ``"Please provide the bounding box coordinate of the region this sentence describes: the red circle"``,
and the answer is Qwen2-VL's box format on the 0-1000 grid, ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``
(LLaMA-Factory's conversion), scored at IoU >= 0.5.

Learnability: objects sit on a coarse grid and the target box is the box of the object's *cell*, so a box uses a
handful of distinct coordinates (single tokens for a trained tokenizer). Objects are 20-24 px in a 28-px cell, so
the cell box's IoU with the object's exact box (``meta["target_box"]``, normalised to 0-1: what the evaluator
scores against) is above 0.5 (0.51 at 20 px), while the box of any other cell scores below 0.2. One object per
scene: with two to four objects the tiny model must bind the expression to one of several image tokens, which it
does not learn in a CPU budget (docs/benchmark-zoo.md: 2-4 objects stay at chance after 300 steps where a single
object is localised).

Every scene is drawn on the coordinate canvas (:func:`~mergelab.bench.tasks.common.coordinate_canvas`): a pale
gradient that gives each image token its absolute position, which Qwen2-VL's rotary-only vision tower lacks.

Variants: ``generic`` uses the 4x4 grid of 28-px cells (coordinates 0, 250, 500, 750, 1000); ``shifted`` puts the
objects on the 3x3 grid shifted by half a cell (14 px: coordinates 125, 375, 625, 875, new answer words), so the
base's localisation skill is reused with new coordinates.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image

from mergelab.bench.tasks.common import (
    CELL,
    GENERIC_COLOURS,
    GRID,
    IMAGE_SIZE,
    SHAPES,
    Draft,
    Sample,
    TaskSpec,
    draw_objects,
    place_object,
    spoken,
)

PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "
SCALE = 1000
SIZES = (20, 21, 22, 23, 24)
N_OBJECTS = (1,)
BACKGROUND = "gradient"
"""Canvas of every scene: ``"gradient"`` (the coordinate canvas) or ``"white"``; changing it changes the data."""
LAYOUTS = {"generic": (GRID, 0), "shifted": (GRID - 1, CELL // 2)}
"""Per variant: (cells per side, pixel offset of the grid)."""


def format_box(box: list[int]) -> str:
    """Qwen2-VL's box string for integer 0-1000 coordinates ``[x1, y1, x2, y2]``."""
    x1, y1, x2, y2 = box
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def cell_box(cell: list[int], offset: int) -> list[int]:
    """The 0-1000 box of grid cell ``[col, row]`` on the grid shifted by ``offset`` pixels."""
    x0, y0 = cell[0] * CELL + offset, cell[1] * CELL + offset
    return [round(v * SCALE / IMAGE_SIZE) for v in (x0, y0, x0 + CELL, y0 + CELL)]


def draft(rng: random.Random, variant: str) -> Draft:
    """Propose one grounding item of ``variant`` (see the module docstring)."""
    side, offset = LAYOUTS[variant]
    n = rng.choice(N_OBJECTS)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        p = (rng.choice(SHAPES), rng.choice(list(GENERIC_COLOURS)))
        if p not in pairs:
            pairs.append(p)
    target = rng.randrange(n)
    cells = rng.sample(range(side * side), n)
    order = sorted(range(n), key=lambda k: cells[k])  # objects listed in reading order: a canonical meta
    objects = [
        place_object(rng, *pairs[k], (cells[k] % side, cells[k] // side), rng.choice(SIZES), offset)
        for k in order
    ]
    target = order.index(target)
    obj = objects[target]
    expression = f"the {obj['colour']} {obj['shape']}"
    question = PROMPT + expression
    answer_box = cell_box(obj["cell"], offset)
    answer = format_box(answer_box)
    x0, y0, x1, y1 = obj["box"]
    meta = {
        "objects": objects,
        "target": target,
        "expression": expression,
        "grid_offset": offset,
        "background": BACKGROUND,
        "answer_box": answer_box,
        "target_box": [x0 / IMAGE_SIZE, y0 / IMAGE_SIZE, (x1 + 1) / IMAGE_SIZE, (y1 + 1) / IMAGE_SIZE],
        "box_format": "xyxy",
        "box_scale": SCALE,
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
    }
    return Draft(question=question, answer=answer, answers=(answer,), meta=meta)


def render(meta: dict[str, Any]) -> Image.Image:
    """Draw a grounding scene from its ``meta``."""
    return draw_objects(meta["objects"], meta.get("background", "white"))


def describe(sample: Sample) -> str:
    """The scene in words: the referred object and its box (without the box markers)."""
    return f"{sample.meta['expression']} is at {spoken(sample.answer)}."


SPEC = TaskSpec(
    name="grounding",
    metric="iou50",
    draft=draft,
    render=render,
    vocabulary={
        v: tuple(sorted(format_box(cell_box([c, r], offset)) for c in range(side) for r in range(side)))
        for v, (side, offset) in LAYOUTS.items()
    },
    max_new_tokens=24,
    description="referring expression -> Qwen2-VL box on the 0-1000 grid; shifted: half-cell-shifted grid",
    describe=describe,
)
