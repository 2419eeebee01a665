"""Checkpoint IO for the streaming merge engine: sharded safetensors, PEFT LoRA adapters, bounded output shards.

Everything here is lazy. :class:`CheckpointReader` parses a Hugging Face directory (``model.safetensors``, or shards
plus ``model.safetensors.index.json``) and reads tensor *metadata* from the safetensors headers without touching the
data; tensors are read one at a time through memory-mapped :func:`safetensors.safe_open` handles (the shape of
mergekit's ``LazyTensorLoader``, spec/peers.md section 2). :class:`LoraAdapter` turns a PEFT adapter directory into
per-base-tensor task vectors ``scaling * B @ A`` computed on demand, with peft's own ``rank_pattern`` /
``alpha_pattern`` matching, so the result equals ``merge_and_unload`` (spec/ecosystem.md section 6).
:class:`ShardWriter` writes the output as bounded safetensors shards whose headers are computed up front from the
plan, so tensors are streamed to disk as they are produced (no shard buffer in memory).

Loading is safe: safetensors only; pickled ``*.bin`` checkpoints are refused.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

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


def _parse_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header and the byte offset where tensor data starts.

    Raises:
        MergeError: the file is missing, truncated or not a safetensors file (message names the file).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MergeError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise MergeError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise MergeError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MergeError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise MergeError(f"{path}: truncated safetensors file (needs {8 + n + end} bytes, has {size})")
    return header, 8 + n


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
        self._handles: dict[Path, Any] = {}
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
        the process's heap. Falls back to :meth:`get` (a copy) for data not aligned to its dtype.
        """
        info = self.infos[name]
        item = _itemsize(info.dtype)
        if info.offset < 0 or info.offset % item or info.nbytes == 0:
            return self.get(name)
        m = self._maps.get(info.file)
        if m is None:
            with open(info.file, "rb") as f:
                m = self._maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        t = torch.frombuffer(m, dtype=info.dtype, count=info.nbytes // item, offset=info.offset)
        return t.view(info.shape)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor through ``safetensors.safe_open`` (memory-mapped file, copied out on the CPU)."""
        info = self.infos[name]
        h = self._handles.get(info.file)
        if h is None:
            h = self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
        try:
            return h.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise MergeError(f"{info.file}: cannot read tensor {name}: {e}") from None

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
        """Drop the open handles (mappings stay alive while a tensor view still uses them)."""
        self._handles.clear()
        self._maps.clear()


# --------------------------------------------------------------------------------------------------------------
# Naming schemes (transformers 5 writes legacy 4.x names on disk, uses new names in memory; ecosystem.md section 5)

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


# --------------------------------------------------------------------------------------------------------------
# PEFT LoRA adapters


def _peft_pattern_key(pattern_keys: Sequence[str], key: str) -> str:
    """peft's own pattern matching for rank/alpha patterns (``peft.utils.other.get_pattern_key``)."""
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:  # pragma: no cover - peft is a core dependency; same semantics as peft 0.21
        for p in pattern_keys:
            if re.match(rf"(.*\.)?({p})$", key):
                return p
        return key
    return get_pattern_key(pattern_keys, key)


@dataclass
class _LoraModule:
    module: str  # in-memory module path, as peft names it (without ``base_model.model.``)
    a_key: str
    b_key: str
    scaling: float
    transpose: bool  # fan_in_fan_out (Conv1D) or embedding layers
    bias_key: str | None = None


class LoraAdapter:
    """A PEFT LoRA adapter directory read lazily as per-tensor task vectors.

    The task vector of a targeted linear layer is ``scaling * B @ A`` with ``scaling = alpha / r`` (or
    ``alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``alpha`` resolved per module through ``rank_pattern`` and
    ``alpha_pattern`` exactly as peft does; embedding layers get ``(B @ A)^T``; ``fan_in_fan_out`` transposes.
    ``lora_bias`` adds ``scaling * lora_B.bias`` to the base bias. ``modules_to_save`` tensors are full values
    (task vector = value - base). DoRA and non-LoRA adapters are refused.

    Args:
        path: the adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        base_keys: the base checkpoint's tensor names, for key mapping across naming schemes.

    Raises:
        MergeError: unsupported adapter type, missing files, or an adapter tensor with no base counterpart.
    """

    def __init__(self, path: str | Path, base_keys: Iterable[str]) -> None:
        self.path = Path(path)
        cfg_file = self.path / ADAPTER_CONFIG
        try:
            self.config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise MergeError(f"{cfg_file}: invalid JSON ({e})") from None
        ptype = str(self.config.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise MergeError(f"{cfg_file}: peft_type {ptype} is not supported (only LORA)")
        if self.config.get("use_dora"):
            raise MergeError(f"{cfg_file}: use_dora adapters are not supported")
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.exists():
            if (self.path / "adapter_model.bin").exists():
                raise MergeError(f"{self.path}: only adapter_model.bin found; pickled adapters are refused")
            raise MergeError(f"{weights}: file not found")
        self.reader = CheckpointReader(weights)
        self.resolver = NameResolver(base_keys)
        self.modules: dict[str, _LoraModule] = {}  # base key -> LoRA module
        self.full: dict[str, str] = {}  # base key -> adapter key (modules_to_save: full values)
        self._bias_of: dict[str, _LoraModule] = {}  # base bias key -> LoRA module with lora_bias
        self._build()

    def _scaling(self, module: str) -> float:
        c = self.config
        rp, ap = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
        r = rp.get(_peft_pattern_key(list(rp), module), c["r"])
        alpha = ap.get(_peft_pattern_key(list(ap), module), c["lora_alpha"])
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r

    def _map(self, name: str, adapter_key: str) -> str:
        key = self.resolver.resolve(name)
        if key is None:
            raise MergeError(
                f"{self.path}: adapter tensor {adapter_key} maps to {name}, which is not in the base checkpoint"
            )
        return key

    def _build(self) -> None:
        prefix = "base_model.model."
        keys = self.reader.keys()
        fan = bool(self.config.get("fan_in_fan_out"))
        for k in keys:
            if "lora_magnitude_vector" in k:
                raise MergeError(f"{self.path}: tensor {k} is a DoRA magnitude; DoRA is not supported")
            m = re.match(r"(.*)\.(lora_A)(?:\.[^.]+)?\.weight$", k) or re.match(
                r"(.*)\.(lora_embedding_A)(?:\.[^.]+)?$", k
            )
            if m:
                mod_full, kind = m.group(1), m.group(2)
                b_key = k.replace(f".{kind}", f".{kind[:-1]}B", 1)
                if b_key not in self.reader.infos:
                    raise MergeError(f"{self.path}: tensor {k} has no matching {b_key}")
                module = mod_full.removeprefix(prefix)
                if len(self.reader.infos[k].shape) != 2:
                    raise MergeError(f"{self.path}: tensor {k} is not a 2-D LoRA factor (conv LoRA is not supported)")
                r = self.reader.infos[k].shape[0]
                expected_r = self._rank(module)
                if r != expected_r:
                    raise MergeError(f"{self.path}: tensor {k} has rank {r}, adapter_config says r={expected_r}")
                base_key = self._map(module + ".weight", k)
                bias = b_key[: -len(".weight")] + ".bias" if b_key.endswith(".weight") else ""
                self.modules[base_key] = _LoraModule(
                    module,
                    k,
                    b_key,
                    self._scaling(module),
                    transpose=(kind == "lora_embedding_A") or fan,
                    bias_key=bias if bias in self.reader.infos else None,
                )
            elif re.search(r"\.lora_B(?:\.[^.]+)?\.(weight|bias)$", k) or re.search(
                r"\.lora_embedding_B(?:\.[^.]+)?$", k
            ):
                continue
            elif ".lora_" in k:
                raise MergeError(f"{self.path}: adapter tensor {k} is of an unsupported LoRA kind")
            else:  # modules_to_save / trainable tokens saved as full tensors
                name = k.removeprefix(prefix).replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
                self.full[self._map(name, k)] = k
        for mod in self.modules.values():
            if mod.bias_key is not None:
                self._bias_of[self._map(mod.module + ".bias", mod.bias_key)] = mod
        if not self.modules and not self.full:
            raise MergeError(f"{self.path}: adapter holds no LoRA tensors")

    def _rank(self, module: str) -> int:
        rp = self.config.get("rank_pattern") or {}
        return int(rp.get(_peft_pattern_key(list(rp), module), self.config["r"]))

    def touched(self) -> set[str]:
        """Base keys this adapter changes."""
        return set(self.modules) | set(self.full) | set(self._bias_of)

    def factor_keys(self, base_key: str) -> list[str]:
        """Adapter tensor names read for ``base_key`` (for finiteness checks and byte counts)."""
        out: list[str] = []
        if base_key in self.modules:
            out += [self.modules[base_key].a_key, self.modules[base_key].b_key]
        if base_key in self._bias_of:
            out.append(self._bias_of[base_key].bias_key or "")
        if base_key in self.full:
            out.append(self.full[base_key])
        return out

    def delta(
        self, base_key: str, base: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, int]:
        """The task vector for ``base_key`` (None when untouched) and the number of bytes read.

        Args:
            base_key: the base checkpoint's tensor name.
            base: the base tensor on ``device`` (used for ``modules_to_save`` values and shape checks).
            device: compute device.
            dtype: compute dtype.

        Raises:
            MergeError: a shape mismatch between ``B @ A`` and the base tensor, or a non-finite adapter tensor.
        """
        nbytes = 0
        read: dict[str, torch.Tensor] = {}
        for k in self.factor_keys(base_key):
            t = self.reader.get(k)
            nbytes += t.numel() * t.element_size()
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise MergeError(f"{self.reader.infos[k].file}: tensor {k} contains NaN or Inf")
            read[k] = t.to(device=device, dtype=dtype)
        if not read:
            return None, 0
        parts: list[torch.Tensor] = []
        if base_key in self.full:  # saved full values (modules_to_save, saved embedding layers)
            v = read[self.full[base_key]]
            if tuple(v.shape) != tuple(base.shape):
                raise MergeError(
                    f"{self.path}: tensor {self.full[base_key]} has shape {tuple(v.shape)}, base {base_key} has "
                    f"{tuple(base.shape)}"
                )
            parts.append(v - base.to(dtype))
        if base_key in self.modules:
            m = self.modules[base_key]
            ba = read[m.b_key] @ read[m.a_key]
            parts.append((ba.T if m.transpose else ba) * m.scaling)
        if base_key in self._bias_of:
            m = self._bias_of[base_key]
            parts.append(read[m.bias_key or ""] * m.scaling)
        d = parts[0]
        for p in parts[1:]:
            d = d + p
        if tuple(d.shape) != tuple(base.shape):
            raise MergeError(
                f"{self.path}: LoRA update for {base_key} has shape {tuple(d.shape)}, base has {tuple(base.shape)}"
            )
        return d.contiguous(), nbytes


def is_lora_dir(path: str | Path) -> bool:
    """True when ``path`` is a PEFT adapter directory."""
    return (Path(path) / ADAPTER_CONFIG).exists()


# --------------------------------------------------------------------------------------------------------------
# Output


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer, processor, chat-template, generation and custom-code files from ``src``.

    Every top-level regular file that is not a weight file or a weight index is copied.

    Returns:
        The copied file names.
    """
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in _WEIGHT_INDEXES:
            continue
        if f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


@dataclass(frozen=True)
class OutSpec:
    """One output tensor as planned: name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


class ShardWriter:
    """Stream tensors into bounded safetensors shards whose layout is fixed up front.

    Because every output tensor's name, dtype and shape is known from the plan, each shard's header is written
    before its data and tensors are appended as they are produced, in plan order: the writer holds no buffer.
    One shard is named ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` (the Hugging Face layout).

    Args:
        out_dir: directory to write into (the engine's temporary directory).
        specs: output tensors in the order they will be written.
        max_shard_bytes: a shard's data is kept under this size unless a single tensor is larger.
    """

    def __init__(self, out_dir: Path, specs: Sequence[OutSpec], max_shard_bytes: int) -> None:
        if max_shard_bytes <= 0:
            raise MergeError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = out_dir
        groups: list[list[OutSpec]] = [[]]
        size = 0
        for s in specs:
            if groups[-1] and size + s.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(s)
            size += s.nbytes
        n = len(groups)
        self.names = (
            [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._plan: list[tuple[int, OutSpec]] = [(gi, s) for gi, g in enumerate(groups) for s in g]
        self._groups = groups
        self._pos = 0
        self._file: Any = None
        self._gi = -1
        self.bytes_written = 0
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(s.nbytes for s in specs)

    def _open(self, gi: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for s in self._groups[gi]:
            header[s.name] = {"dtype": DTYPE_TO_ST[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
            off += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.out_dir / self.names[gi], "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self.bytes_written += 8 + len(raw)
        self._gi = gi

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (must come in plan order with the planned dtype and shape)."""
        gi, spec = self._plan[self._pos]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise MergeError(
                f"internal: writer expected {spec.name} {spec.dtype} {spec.shape}, got {name} {tensor.dtype} "
                f"{tuple(tensor.shape)}"
            )
        if gi != self._gi:
            self._open(gi)
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.bytes_written += spec.nbytes
        self.weight_map[name] = self.names[gi]
        self._pos += 1

    def close(self) -> None:
        """Finish the last shard and write the index (several shards). Every planned tensor must be written."""
        if self._pos != len(self._plan):
            raise MergeError(f"internal: {len(self._plan) - self._pos} planned tensors were never written")
        if self._file is None and self._plan:
            self._open(0)
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            raw = json.dumps(index, indent=2).encode()
            (self.out_dir / INDEX_NAME).write_bytes(raw)
            self.bytes_written += len(raw)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
