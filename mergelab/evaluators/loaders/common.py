"""Shared pieces of the loaders: the :class:`Sample` record and safe JSON / image helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mergelab._files import iter_jsonl, read_json, require_file  # noqa: F401  (re-exported to the loaders)


@dataclass(frozen=True)
class Sample:
    """One evaluation item, independent of the benchmark it came from.

    Attributes:
        id: Unique within its task.
        question: The question text (no image placeholder; the runner adds the image to the chat message).
        references: The accepted answers (10 annotator answers for VQA soft accuracy; a box string for grounding).
        image: Path of the image file, or None for a text-only item. Images are opened lazily by the runner.
        meta: Benchmark fields the metric or the aggregation needs (choices, categories, the reference box ...).
        metric: A per-sample metric name (the offline JSONL's ``metric`` field), or None for the task's metric.
    """

    id: str
    question: str
    references: list[str]
    image: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None


def field_of(rec: dict[str, Any], key: str, where: str) -> Any:
    """``rec[key]``, or a ``ValueError`` naming the record's location and the missing field."""
    if key not in rec:
        raise ValueError(f"{where}: missing field {key!r}")
    return rec[key]


def image_path(root: Path, rel: str, where: str) -> Path:
    """Resolve an image path relative to ``root`` and check that the file exists."""
    p = Path(rel)
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        raise FileNotFoundError(f"{p}: missing image (referenced by {where})")
    return p


def open_image(path: Path) -> Image.Image:
    """Open an image file as RGB, fully loaded (so the file handle is closed)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def env_path(var: str, default: str) -> Path:
    """``$var`` if set and non-empty, else ``default`` (``~`` expanded)."""
    return Path(os.environ.get(var) or default).expanduser()
