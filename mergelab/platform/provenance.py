"""Provenance of a merge run: package versions and the git commit (content hashes: :func:`mergelab._files.content_hash`)."""


from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path


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
