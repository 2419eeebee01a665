"""Small file readers shared by the engine, the benchmark, the evaluators and the model loader, and the content hash
of a checkpoint (a merge recipe's identity); one-line errors naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["content_hash", "iter_jsonl", "read_json", "require_file"]


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise ``FileNotFoundError`` naming it and what it should hold."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing {what}")
    return path


def read_json(path: Path, what: str) -> Any:
    """Read one JSON document, naming the file on a missing file or a syntax error."""
    require_file(path, what)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def iter_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` of a JSON-lines file, naming file and line on errors."""
    require_file(path, what)
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            yield n, rec


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


_HASH_LOCK = threading.Lock()


def content_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 over a checkpoint's files (relative names and bytes, sorted), memoised per (path, size, mtime).

    Args:
        path: a file or a checkpoint/adapter directory. Hidden files and sub-directories starting with ``.`` are
            skipped.

    Returns:
        The hex digest.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"expert/base path not found: {p}")
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    stat_key = sum(f.stat().st_size for f in files), max((f.stat().st_mtime_ns for f in files), default=0)
    key = (str(p.resolve()), stat_key[0], stat_key[1])
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = digest
    return digest
