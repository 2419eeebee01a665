"""Shared pieces of the loaders: the :class:`Sample` record (the benchmark's own, one type for every dataset) and
safe JSON / image helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from mergelab._files import iter_jsonl, read_json, require_file
from mergelab.bench.tasks.common import Sample

__all__ = ["Sample", "env_path", "field_of", "image_path", "iter_jsonl", "open_image", "read_json", "require_file"]


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


def open_image(image: Path | Image.Image) -> Image.Image:
    """An item's image as RGB: an image file opened and fully loaded (so the file handle is closed), or an image
    already in memory (a generated sample's) converted."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def env_path(var: str, default: str) -> Path:
    """``$var`` if set and non-empty, else ``default`` (``~`` expanded)."""
    return Path(os.environ.get(var) or default).expanduser()
