"""Provenance of a merge: content hashes of checkpoints, package versions, the git commit, resolved hyperparameters."""


from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine a merge's result (logged as ``version.<name>`` params)."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("mergelab", "torch", "transformers", "safetensors", "peft", "mlflow", "optuna"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def git_commit() -> str | None:
    """The commit of the repository holding this package (``+dirty`` when modified), or ``None``."""
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def expert_fields(e: Any) -> tuple[str, float | None, str | None]:
    if isinstance(e, (str, os.PathLike)):
        return str(e), None, None
    if isinstance(e, Mapping):
        return str(e["path"]), e.get("coefficient"), e.get("name")
    return str(e.path), getattr(e, "coefficient", None), getattr(e, "name", None)


def expert_name(e: Any) -> str:
    """The expert's name: its explicit ``name`` or the last component of its path."""
    path, _, name = expert_fields(e)
    return name or Path(path).name


def method_hyperparameters(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every hyperparameter of ``method`` (defaults filled in from its config dataclass), validated.

    Raises:
        KeyError: unknown method (naming it and the known ones).
        ValueError: unknown or invalid parameter (raised by the method's config).
    """
    from mergelab.methods import METHODS

    if method not in METHODS:
        raise KeyError(f"unknown merge method {method!r}; known: {sorted(METHODS)}")
    cfg = METHODS[method].make_config(dict(params or {}))
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(params or {})

