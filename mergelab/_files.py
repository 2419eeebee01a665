"""Small file readers shared by the engine, the benchmark, the evaluators and the model loader, and the content hash
of a checkpoint (a merge recipe's identity, cached in memory and on disk); one-line errors naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["content_hash", "hash_cache_file", "iter_jsonl", "read_json", "require_file"]


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


_HASH_CACHE: dict[str, str] = {}
_HASH_LOCK = threading.Lock()
_DISK_ENTRIES = 4096  # fingerprints kept in the on-disk cache (least recently written dropped first)


def hash_cache_file() -> Path | None:
    """The on-disk cache of :func:`content_hash`: ``$MERGELAB_HASH_CACHE`` (``off`` or empty: none), else
    ``$XDG_CACHE_HOME/mergelab/content_hashes.json`` (``~/.cache`` when unset)."""
    env = os.environ.get("MERGELAB_HASH_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "none") else Path(env).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mergelab" / "content_hashes.json"


def _fingerprint(p: Path, files: list[Path]) -> str:
    """Identifies a checkpoint's files as they are now: the resolved path, and each file's relative name, size,
    modification and change times (ns) and inode. Rewriting a file changes its change time, which no tool sets back,
    so a changed file never matches an old fingerprint."""
    rows = []
    for f in files:
        st = f.stat()
        rows.append([str(f.relative_to(p)) if p.is_dir() else f.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                     st.st_ino])
    return hashlib.sha256(json.dumps([str(p.resolve()), rows]).encode()).hexdigest()


def _disk_read(cache: Path | None) -> dict[str, str]:
    if cache is None:
        return {}
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _disk_add(cache: Path | None, key: str, digest: str) -> None:
    """Add one entry to the on-disk cache (best effort: a read-only or racing cache only costs a recomputation)."""
    if cache is None:
        return
    data = _disk_read(cache)
    data.pop(key, None)
    data[key] = digest
    keep = dict(list(data.items())[-_DISK_ENTRIES:])
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(keep))
        os.replace(tmp, cache)
    except OSError:
        tmp.unlink(missing_ok=True)


def content_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 over a checkpoint's files (relative names and bytes, sorted), cached by the files' fingerprint.

    Computing it reads every byte of the checkpoint (seconds per GB), so digests are kept in memory and on disk
    (:func:`hash_cache_file`), keyed by the files' resolved path, names, sizes, modification and change times and
    inodes: a later process merging the same unchanged checkpoints does not read them again.

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
    key = _fingerprint(p, files)
    cache = hash_cache_file()
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
        known = _disk_read(cache).get(key)
        if isinstance(known, str):
            _HASH_CACHE[key] = known
            return known
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = digest
        _disk_add(cache, key, digest)
    return digest
