"""content_hash: the digest of a checkpoint's files, cached in memory and on disk by the files' fingerprint."""

from __future__ import annotations

import builtins
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from mergelab import _files
from mergelab._files import content_hash, hash_cache_file


def _ckpt(d: Path) -> Path:
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\x01" * 1000)
    (d / "config.json").write_text("{}")
    (d / "sub" / "x.py").write_text("pass\n")
    (d / ".hidden").write_text("skipped")
    return d


def _reference(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith(".")):
        h.update(str(f.relative_to(d)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """The files content_hash opens; its caches start empty, the disk cache under tmp_path."""
    monkeypatch.setenv("MERGELAB_HASH_CACHE", str(tmp_path / "cache" / "hashes.json"))
    monkeypatch.setattr(_files, "_HASH_CACHE", {})
    opened: list[str] = []

    def counting_open(file: Any, *a: Any, **k: Any) -> Any:
        opened.append(str(file))
        return builtins.open(file, *a, **k)

    monkeypatch.setattr(_files, "open", counting_open, raising=False)
    return opened


def test_digest_covers_names_and_bytes(tmp_path: Path, reads: list[str]) -> None:
    d = _ckpt(tmp_path / "ck")
    assert content_hash(d) == _reference(d)
    f = d / "model.safetensors"
    assert content_hash(f) == hashlib.sha256(b"model.safetensors\0" + f.read_bytes()).hexdigest()


def test_a_later_process_reads_the_digest_from_disk(tmp_path: Path, reads: list[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    d = _ckpt(tmp_path / "ck")
    first = content_hash(d)
    assert len(reads) == 3 and hash_cache_file() is not None and hash_cache_file().exists()
    monkeypatch.setattr(_files, "_HASH_CACHE", {})  # a new process: only the disk cache is left
    assert content_hash(d) == first and len(reads) == 3  # nothing read again


def test_a_rewritten_file_is_hashed_again(tmp_path: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    d = _ckpt(tmp_path / "ck")
    first = content_hash(d)
    f = d / "model.safetensors"
    st = f.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity
    f.write_bytes(b"\x02" * 1000)  # same size, and the modification time set back: the change time still moves
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.setattr(_files, "_HASH_CACHE", {})
    assert content_hash(d) != first and content_hash(d) == _reference(d)


def test_disk_cache_off(tmp_path: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGELAB_HASH_CACHE", "off")
    assert hash_cache_file() is None
    content_hash(_ckpt(tmp_path / "ck"))
    assert not (tmp_path / "cache").exists()
