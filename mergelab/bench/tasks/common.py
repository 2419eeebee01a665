"""Shared pieces of the offline benchmark's procedural task generators: samples, randomness, drawing.

The offline benchmark stands in for the five capabilities of OptMerge (arXiv:2505.19892: VQA,
Geometry, Chart, OCR, Grounding). Every image is 112x112 RGB, drawn on a 4x4 grid of 28-pixel cells so that one
cell is exactly one merged image token of a Qwen2-VL with 14-pixel patches and a 2x2 spatial merge.

Determinism and disjoint splits: a task module proposes :class:`Draft` items from a ``random.Random`` stream
seeded by ``(task, variant, split, seed)``. A draft's ``meta`` is its complete, canonically ordered scene (the
image is a pure function of it), and the SHA-256 of ``(meta, question)`` assigns the draft to exactly one split,
independently of the seed. A split keeps only the drafts that fall in its bucket, so no question + image can
appear in two splits, for any seeds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

IMAGE_SIZE = 112
"""Side of every image in pixels (8x8 patches of 14 px, 16 tokens after Qwen2-VL's 2x2 merge)."""
GRID = 4
"""Cells per side of the layout grid."""
CELL = IMAGE_SIZE // GRID
"""Side of one grid cell in pixels (28: one merged Qwen2-VL image token)."""

BACKGROUND: tuple[int, int, int] = (255, 255, 255)
INK: tuple[int, int, int] = (0, 0, 0)
"""The fixed drawing colour of geometry, chart and OCR images (colour carries meaning only in VQA/grounding)."""
GRIDLINE: tuple[int, int, int] = (200, 200, 200)

GENERIC_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 190),
    "orange": (250, 130, 10),
}
SHIFTED_COLOURS: dict[str, tuple[int, int, int]] = {
    "pink": (255, 120, 200),
    "brown": (125, 70, 25),
    "cyan": (20, 210, 220),
    "gray": (128, 128, 128),
}
COLOURS: dict[str, tuple[int, int, int]] = {**GENERIC_COLOURS, **SHIFTED_COLOURS}
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {"gray": ("gray", "grey")}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

VARIANTS: tuple[str, ...] = ("generic", "shifted")
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.70, "val": 0.10, "test": 0.20}
"""Share of the (meta, question) hash space owned by each split (drafts outside a split's share are skipped)."""
METRICS: tuple[str, ...] = ("exact_match", "relaxed_accuracy", "iou50")


@dataclass(frozen=True)
class Sample:
    """One benchmark item: generated here, written to and read from a split's JSONL, or read from the paper's
    datasets by the evaluators' loaders (one type for all of them).

    Attributes:
        id: Unique within its task (and variant), e.g. ``"vqa-shifted-test-00042"``; also the PNG's stem.
        question: The prompt text (without any image placeholder token: the runner puts the image in the chat).
        answers: Accepted answers for scoring, the target first (ten annotators' answers for VQA soft accuracy;
            a box string for grounding).
        image: The image: in memory (generated, or read with its pixels), the path of its file (opened lazily by
            the evaluators), or None for a text-only item.
        meta: JSON-safe facts: for generated items the full scene (the image is a pure function of it) and the
            structured query; for the paper's items what their metric needs (choices, categories, ...).
        metric: The per-sample metric (one of :data:`METRICS` for the offline benchmark), or None for the
            evaluator task's own.
        task: The offline benchmark's task (one of ``TASKS``); empty for the paper's datasets.
        variant: ``"generic"`` (what the base model is trained on) or ``"shifted"`` (experts and benchmark).
        split: ``"train"``, ``"val"`` or ``"test"``.
        answer: The exact target string a model is trained to output (default: the first of ``answers``).
    """

    id: str
    question: str
    answers: list[str]
    image: Image.Image | Path | None = field(default=None, compare=False, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None
    task: str = ""
    variant: str = ""
    split: str = ""
    answer: str = ""

    def __post_init__(self) -> None:
        if not self.answer and self.answers:
            object.__setattr__(self, "answer", str(self.answers[0]))


@dataclass(frozen=True)
class Draft:
    """A proposed scene before split assignment and rendering.

    Attributes:
        question: Prompt text.
        answer: Target string.
        answers: Accepted references (``answer`` first).
        meta: JSON-safe scene description; the task's ``render(meta)`` draws the image from it alone.
    """

    question: str
    answer: str
    answers: tuple[str, ...]
    meta: dict[str, Any]


@dataclass(frozen=True)
class TaskSpec:
    """One task of the offline benchmark, defined once in its module; everything else derives from it.

    The task table (:data:`mergelab.bench.tasks.TASK_SPECS`), the data files (:mod:`mergelab.bench.data`), the
    evaluators' task table and suites (:mod:`mergelab.evaluators.tasks`), the lm-eval tasks
    (:mod:`mergelab.evaluators.lmeval`) and the demo read a task's facts from here.

    Attributes:
        name: The task's name: its directory under the data root, its evaluator task and metric prefix.
        metric: The per-sample metric, one of :data:`METRICS` (the evaluators report ``accuracy`` for
            ``exact_match`` and ``relaxed_accuracy``, ``acc_iou50`` and ``mean_iou`` for ``iou50``).
        draft: ``(rng, variant) -> Draft``: proposes one item (the generator).
        render: ``meta -> image``: draws an item from its scene alone.
        vocabulary: Per variant, every answer (target string) an item of that variant can have, sorted.
        max_new_tokens: The evaluators' generation budget for one answer.
        description: One line for listings.
        splits: The splits the task is generated in (each a share of the hash space, :data:`SPLIT_FRACTIONS`).
        describe: ``sample -> str``: the item's scene in words, enough to answer its question without the image
            (the base's text-only "described items", :mod:`mergelab.bench.lexicon`); None: the task has none.
    """

    name: str
    metric: str
    draft: Callable[[random.Random, str], Draft]
    render: Callable[[dict[str, Any]], Image.Image]
    vocabulary: Mapping[str, tuple[str, ...]]
    max_new_tokens: int = 12
    description: str = ""
    splits: tuple[str, ...] = SPLITS
    describe: Callable[[Sample], str] | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: unknown metric {self.metric!r}; known: {METRICS}")
        if tuple(self.vocabulary) != VARIANTS:
            raise ValueError(f"task {self.name!r}: vocabulary must list the variants {VARIANTS} in order")
        if not set(self.splits) <= set(SPLITS):
            raise ValueError(f"task {self.name!r}: splits {self.splits} not all in {SPLITS}")
        if self.max_new_tokens < 1:
            raise ValueError(f"task {self.name!r}: max_new_tokens must be >= 1")

    @property
    def variants(self) -> tuple[str, ...]:
        """The task's variants (:data:`VARIANTS`: ``generic``, then ``shifted``)."""
        return tuple(self.vocabulary)


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts`` that is identical across processes and machines (unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def canonical(obj: Any) -> str:
    """Canonical JSON text of ``obj`` (sorted keys, no spaces): the basis of split assignment and dedup."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def split_of(task: str, variant: str, key: str) -> str:
    """The split that owns ``key`` (a draft's canonical ``[meta, question]``): a seed-independent hash bucket."""
    u = stable_seed("split", task, variant, key) / 2.0**64
    acc = 0.0
    for name in SPLITS:
        acc += SPLIT_FRACTIONS[name]
        if u < acc:
            return name
    return SPLITS[-1]


def weighted_choice(rng: random.Random, weights: dict[str, float]) -> str:
    """Draw one key of ``weights`` with probability proportional to its value."""
    names = list(weights)
    return rng.choices(names, weights=[weights[n] for n in names], k=1)[0]


def blank() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A white 112x112 RGB canvas and its drawer."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    return img, ImageDraw.Draw(img)


GRADIENT_DEPTH = 48
"""How much the coordinate canvas darkens red (left to right) and green (top to bottom), in 0-255 levels."""


@functools.lru_cache(maxsize=1)
def _coordinate_canvas() -> Image.Image:
    last = IMAGE_SIZE - 1
    data = bytearray()
    for y in range(IMAGE_SIZE):
        g = 255 - GRADIENT_DEPTH * y // last
        for x in range(IMAGE_SIZE):
            data += bytes((255 - GRADIENT_DEPTH * x // last, g, 255))
    return Image.frombytes("RGB", (IMAGE_SIZE, IMAGE_SIZE), bytes(data))


def coordinate_canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A canvas whose pale background encodes each pixel's position: ``(255 - 48 x/111, 255 - 48 y/111, 255)``.

    Qwen2-VL's vision tower has rotary (relative) positions only, so the features of an image token say little
    about *where* it is; a tiny model trained for minutes does not learn absolute positions from rotary phases
    (the pilots' grounding stayed at chance). The gradient puts absolute coordinates into the pixels, as a
    coordinate-coloured canvas, so grounding is learnable by content alone.
    """
    img = _coordinate_canvas().copy()
    return img, ImageDraw.Draw(img)


def background_at(x: int, y: int) -> tuple[int, int, int]:
    """The coordinate canvas's colour at pixel ``(x, y)``."""
    last = IMAGE_SIZE - 1
    return (255 - GRADIENT_DEPTH * x // last, 255 - GRADIENT_DEPTH * y // last, 255)


def cell_origin(cell: Sequence[int]) -> tuple[int, int]:
    """Top-left pixel of grid cell ``(col, row)``."""
    return cell[0] * CELL, cell[1] * CELL


def shape_points(shape: str, box: Sequence[int]) -> list[tuple[int, int]]:
    """Vertices of a polygonal shape inscribed in ``box = (x0, y0, x1, y1)`` (inclusive pixel bounds)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "triangle":
        return [(round(cx), y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(round(cx), y0), (x1, round(cy)), (round(cx), y1), (x0, round(cy))]
    raise ValueError(f"shape {shape!r} is not polygonal")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[int], fill: tuple[int, int, int]) -> None:
    """Draw a filled ``shape`` (one of ``SHAPES``) whose bounding box is exactly ``box`` (inclusive)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape in ("triangle", "diamond"):
        draw.polygon(shape_points(shape, box), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def colour_answers(name: str) -> tuple[str, ...]:
    """Accepted spellings of a colour word (the canonical one first)."""
    return COLOUR_SYNONYMS.get(name, (name,))


# A 5x7 bitmap font (digits and ten well-separated capitals), drawn with 3x3-pixel dots: 15x21-pixel glyphs that
# stay crisp at 112x112 and render identically on every machine (no FreeType dependence).
GLYPHS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
}
GLYPH_DOT = 3
GLYPH_W = 5 * GLYPH_DOT
GLYPH_H = 7 * GLYPH_DOT


def draw_glyph(
    draw: ImageDraw.ImageDraw, char: str, x: int, y: int, fill: tuple[int, int, int] = INK, dot: int = GLYPH_DOT
) -> None:
    """Draw ``char`` from :data:`GLYPHS` with its top-left corner at pixel ``(x, y)``, ``dot`` pixels per font dot."""
    rows = GLYPHS.get(char)
    if rows is None:
        raise ValueError(f"no glyph for character {char!r}; known: {''.join(GLYPHS)}")
    for r, row in enumerate(rows):
        for c, bit in enumerate(row):
            if bit == "#":
                px, py = x + c * dot, y + r * dot
                draw.rectangle((px, py, px + dot - 1, py + dot - 1), fill=fill)


def place_object(
    rng: random.Random, shape: str, colour: str, cell: Sequence[int], size: int, offset: int = 0
) -> dict[str, Any]:
    """A JSON-safe object record: ``shape`` of side ``size`` px at a jittered spot inside grid cell ``cell``.

    The object keeps a 2-pixel margin to the cell border, so objects in different cells never touch.

    Args:
        rng: Random stream (jitter).
        shape: One of ``SHAPES``.
        colour: A key of ``COLOURS``.
        cell: ``(col, row)`` of the 28-pixel cell.
        size: Side of the object in pixels, at most ``CELL - 4``.
        offset: Pixels added to the cell's origin on both axes (14 puts cells on the half-shifted grid).

    Returns:
        ``{"shape", "colour", "cell": [col, row], "box": [x0, y0, x1, y1]}`` with inclusive pixel bounds.
    """
    if not 1 <= size <= CELL - 4:
        raise ValueError(f"object size {size} does not fit a {CELL}-pixel cell with 2-pixel margins")
    ox, oy = (v + offset for v in cell_origin(cell))
    x0 = ox + 2 + rng.randint(0, CELL - 4 - size)
    y0 = oy + 2 + rng.randint(0, CELL - 4 - size)
    return {
        "shape": shape,
        "colour": colour,
        "cell": list(cell),
        "box": [x0, y0, x0 + size - 1, y0 + size - 1],
    }


def draw_objects(objects: Sequence[dict[str, Any]], background: str = "white") -> Image.Image:
    """Render object records (see :func:`place_object`) on a ``"white"`` or ``"gradient"`` canvas."""
    if background not in ("white", "gradient"):
        raise ValueError(f"unknown background {background!r}; known: ('white', 'gradient')")
    img, draw = blank() if background == "white" else coordinate_canvas()
    for obj in objects:
        draw_shape(draw, obj["shape"], obj["box"], COLOURS[obj["colour"]])
    return img


MARKERS = ("<|box_start|>", "<|box_end|>")
"""Qwen2-VL's box markers: special tokens that belong in answers, never inside a prompt."""


def spoken(answer: str) -> str:
    """How an answer appears inside a prompt: without the box markers (special tokens belong in answers only)."""
    for marker in MARKERS:
        answer = answer.replace(marker, "")
    return answer
