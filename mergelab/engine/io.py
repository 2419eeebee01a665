"""Checkpoint reading for the streaming merge engine: sharded safetensors headers, lazy tensors, naming schemes.

:class:`CheckpointReader` parses a Hugging Face directory (``model.safetensors``, or shards plus
``model.safetensors.index.json``) and reads tensor *metadata* from the safetensors headers without touching the
data; tensors are read one at a time, as zero-copy views of a private memory map (the shape of mergekit's
``LazyTensorLoader``) or as plain reads into fresh buffers. A view's pages are released (``madvise(MADV_DONTNEED)``)
as soon as the view is dropped, so a merge streaming through the checkpoints keeps only the tensors in flight
resident: its peak RSS, mapped file pages included, stays at about the stream's footprint instead of growing with the
inputs' size. PEFT adapters are read by :mod:`mergelab.engine.adapters`, output shards written by
:mod:`mergelab.engine.writer`.

Loading is safe: safetensors only; pickled ``*.bin`` checkpoints are refused.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
_WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}


class MergeError(ValueError):
    """Bad merge input or state. The message is one line naming the culprit (file, tensor or field)."""


@dataclass(frozen=True)
class TensorInfo:
    """Header metadata of one stored tensor."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = -1  # absolute byte offset of the data in ``file``

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and validate a safetensors header without reading tensor data.

    Args:
        path: a ``*.safetensors`` file.

    Returns:
        The header mapping (``__metadata__`` removed).

    Raises:
        MergeError: the file is missing, truncated or not a safetensors file (message names the file).
    """
    return _parse_header(path)[0]


_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def _parse_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header and the byte offset where tensor data starts.

    The header is untrusted input: nothing is allocated from a size it states before that size is checked against the
    file. The 8-byte header length must fit in the file; each entry needs a known dtype, a shape of non-negative
    integers, and data offsets ``[begin, end]`` inside the data section whose span is exactly the shape's bytes; no
    two tensors' bytes overlap.

    Raises:
        MergeError: one line naming the file (and the tensor): missing, truncated, not a safetensors file, or a
            malformed, out-of-range or overlapping header entry.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MergeError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > _MAX_HEADER_BYTES:
                raise MergeError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file {size})")
            text = f.read(n)
    except FileNotFoundError:
        raise MergeError(f"{path}: file not found") from None
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, an integer of thousands of digits, deep nesting
        raise MergeError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    spans = sorted((*_entry_span(path, name, meta, data_size), name) for name, meta in header.items())
    reach, last = 0, ""
    for begin, end, name in spans:
        if begin < reach and end > begin:
            raise MergeError(f"{path}: tensor {_clip(name)} (bytes {begin}-{end}) overlaps tensor {_clip(last)}")
        if end > reach:
            reach, last = end, name
    return header, 8 + n


def _entry_span(path: Path, name: str, meta: Any, data_size: int) -> tuple[int, int]:
    """Validate one header entry against a data section of ``data_size`` bytes; its ``(begin, end)`` offsets."""
    where = f"{path}: tensor {_clip(name)}"
    if not isinstance(meta, dict):
        raise MergeError(f"{where}: header entry is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise MergeError(f"{where} has unsupported dtype {_clip(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise MergeError(f"{where}: shape {_clip(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise MergeError(f"{where}: data_offsets {_clip(offsets)} are not two non-negative integers")
    begin, end = offsets
    if begin > end:
        raise MergeError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    if end > data_size:
        raise MergeError(
            f"{path}: truncated or corrupt safetensors file (tensor {_clip(name)} ends at data byte {_clip(end)},"
            f" the file holds {data_size})"
        )
    item = _itemsize(ST_DTYPES[dtype])
    need, more = (0 if 0 in shape else item), ""
    for i, d in enumerate(shape):  # stops once past the file: a shape of huge dimensions costs no huge integer
        need *= d
        if need > data_size and i + 1 < len(shape):
            more = "at least "
            break
    if need != end - begin:
        raise MergeError(f"{where} spans {end - begin} bytes, its shape and dtype need {more}{need}")
    return begin, end


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _clip(value: Any, limit: int = 80) -> str:
    """A header value for a one-line message: printable, at most ``limit`` characters."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CheckpointReader:
    """Lazy, memory-mapped reader of a Hugging Face safetensors checkpoint directory (one file or shards + index).

    Args:
        path: the checkpoint directory (or a single ``.safetensors`` file).

    Raises:
        MergeError: no safetensors weights, a pickled-only checkpoint, an index naming a missing shard, or a
            truncated shard.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.infos: dict[str, TensorInfo] = {}
        files = self._shard_files()
        self._maps: dict[Path, mmap.mmap] = {}
        for file in files:
            header, start = _parse_header(file)
            for name, meta in header.items():
                dtype = ST_DTYPES.get(meta["dtype"])
                if dtype is None:
                    raise MergeError(f"{file}: tensor {name} has unsupported dtype {meta['dtype']}")
                info = TensorInfo(name, file, dtype, tuple(int(s) for s in meta["shape"]), start + meta["data_offsets"][0])
                b, e = meta["data_offsets"]
                if e - b != info.nbytes:
                    raise MergeError(f"{file}: tensor {name} spans {e - b} bytes, its shape and dtype need {info.nbytes}")
                self.infos[name] = info
        if not self.infos:
            raise MergeError(f"{self.path}: checkpoint holds no tensors")

    def _shard_files(self) -> list[Path]:
        p = self.path
        if p.is_file():
            if p.suffix != ".safetensors":
                raise MergeError(f"{p}: not a safetensors file (pickled checkpoints are refused)")
            return [p]
        if not p.is_dir():
            raise MergeError(f"{p}: checkpoint directory not found")
        index = p / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MergeError(f"{index}: invalid index (no 'weight_map')") from None
            files = sorted({p / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise MergeError(f"{index}: names shard {f.name}, which is missing")
            return files
        if (p / SINGLE_NAME).exists():
            return [p / SINGLE_NAME]
        files = sorted(p.glob("*.safetensors"))
        files = [f for f in files if f.name != ADAPTER_WEIGHTS]
        if files:
            return files
        if any(p.glob("*.bin")) or any(p.glob("*.pt")):
            raise MergeError(f"{p}: only pickled weights found; convert to safetensors (pickle is never loaded)")
        raise MergeError(f"{p}: no safetensors weights found")

    def keys(self) -> list[str]:
        return list(self.infos)

    def view(self, name: str) -> torch.Tensor:
        """One tensor as a zero-copy CPU view of the memory-mapped file (private copy-on-write mapping).

        Its pages are file-backed page cache, not anonymous memory, so streaming through a checkpoint does not grow
        the process's heap; they are unmapped (``MADV_DONTNEED``) when the returned tensor is garbage collected, so
        they stop counting in the process's RSS. The view must be treated as read-only: dropping the pages of a private
        mapping discards writes to them (a later access re-reads the file). Falls back to :meth:`get` (a copy) for
        data not aligned to its dtype.
        """
        info = self.infos[name]
        item = _itemsize(info.dtype)
        if info.offset < 0 or info.offset % item or info.nbytes == 0:
            return self.get(name)
        m = self._maps.get(info.file)
        if m is None:
            with open(info.file, "rb") as f:
                m = self._maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        t = torch.frombuffer(m, dtype=info.dtype, count=info.nbytes // item, offset=info.offset).view(info.shape)
        weakref.finalize(t, _release_pages, m, info.offset, info.nbytes)
        return t

    def release(self, name: str, upto: int | None = None, start: int = 0) -> None:
        """Drop the resident pages of tensor ``name`` (its entries ``start:upto`` only, when given) from the memory
        map now. Its views stay valid: a later access reads the pages again from the page cache (the bytes of the
        file; views are never written). A stream releases the window behind it since its last call (``start``), so
        that no call walks the pages an earlier one dropped."""
        info = self.infos[name]
        m = self._maps.get(info.file)
        item = _itemsize(info.dtype)
        nbytes = info.nbytes if upto is None else min(info.nbytes, upto * item)
        skip = min(nbytes, start * item)
        if m is not None and nbytes > skip:
            _release_pages(m, info.offset + skip, nbytes - skip)

    def read_runs(self, name: str, starts: Any, run: int) -> torch.Tensor:
        """The entries ``starts[i]:starts[i] + run`` of tensor ``name`` (flattened), concatenated, read with plain
        reads: nothing of the file is mapped, where a view's access maps a whole folio per page."""
        info = self.infos[name]
        item = _itemsize(info.dtype)
        buf = bytearray(len(starts) * run * item)
        view = memoryview(buf)
        try:
            with open(info.file, "rb", buffering=0) as f:
                for i, s in enumerate(starts):
                    f.seek(info.offset + int(s) * item)
                    done, want = 0, run * item
                    while done < want:
                        n = f.readinto(view[i * run * item + done : (i + 1) * run * item])
                        if not n:
                            raise OSError(f"file ends {want - done} bytes early")
                        done += n
        except OSError as e:
            raise MergeError(f"{info.file}: cannot read tensor {name}: {e.strerror or e}") from None
        return torch.frombuffer(buf, dtype=info.dtype)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor with plain reads into a fresh CPU buffer (a copy; no pages of the file stay mapped)."""
        info = self.infos[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return self.read_runs(name, [0], info.nbytes // _itemsize(info.dtype)).view(info.shape)

    def config(self) -> dict[str, Any]:
        """The directory's ``config.json`` ({} when absent)."""
        cfg = self.path / "config.json" if self.path.is_dir() else self.path.parent / "config.json"
        if not cfg.exists():
            return {}
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise MergeError(f"{cfg}: invalid JSON ({e})") from None

    def close(self) -> None:
        """Drop the memory maps (a mapping stays alive while a tensor view still uses it)."""
        self._maps.clear()


def _release_pages(m: mmap.mmap, offset: int, nbytes: int) -> None:
    """Unmap the pages of ``[offset, offset + nbytes)`` of a private mapping (widened to whole pages).

    A page shared with a neighbouring tensor that is still in use is simply faulted in again from the page cache on
    its next access, with the file's bytes (input views are never written).
    """
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or m.closed:
        return
    start = offset - offset % mmap.PAGESIZE
    end = min(len(m), offset + nbytes)
    try:
        m.madvise(advice, start, end - start)
    except (OSError, ValueError):  # best effort: the pages stay mapped
        pass


# --------------------------------------------------------------------------------------------------------------
# Naming schemes (transformers 5 writes legacy 4.x names on disk and uses new names in memory)

_WRAPPER_TOKENS = ("model", "language_model")


def canonical_name(name: str) -> str:
    """Strip the wrapper prefixes that differ between the on-disk and in-memory naming schemes.

    ``model.language_model.layers.0.x`` (5.x memory), ``model.layers.0.x`` (Qwen2-VL disk) and
    ``language_model.model.layers.0.x`` (LLaVA disk) all become ``layers.0.x``; ``model.visual.y`` and ``visual.y``
    become ``visual.y``; ``language_model.lm_head.weight`` becomes ``lm_head.weight``.
    """
    parts = name.split(".")
    i = 0
    while i < len(parts) - 1 and parts[i] in _WRAPPER_TOKENS:
        i += 1
    return ".".join(parts[i:])


class NameResolver:
    """Map a tensor name in either naming scheme to the base checkpoint's stored name."""

    def __init__(self, base_keys: Iterable[str]) -> None:
        self.keys = set(base_keys)
        self._canon: dict[str, str | None] = {}
        for k in self.keys:
            c = canonical_name(k)
            self._canon[c] = None if c in self._canon else k  # None marks an ambiguous canonical name

    def resolve(self, name: str) -> str | None:
        """The base key for ``name``, or None when absent or ambiguous."""
        if name in self.keys:
            return name
        return self._canon.get(canonical_name(name))
