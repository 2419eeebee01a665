"""PEFT LoRA adapters read lazily as per-base-tensor task vectors ``scaling * B @ A``.

:class:`LoraAdapter` turns a PEFT adapter directory into task vectors computed on demand, with peft's own
``rank_pattern`` / ``alpha_pattern`` matching, so the result equals peft's ``merge_and_unload``. Only safetensors
adapters are read; ``adapter_model.bin`` (pickle) is refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelab.engine.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointReader, MergeError, NameResolver


def _peft_pattern_key(pattern_keys: Sequence[str], key: str) -> str:
    """peft's own pattern matching for rank/alpha patterns (``peft.utils.other.get_pattern_key``); without patterns
    the key itself, without importing peft (which imports transformers: seconds of a merge's start)."""
    if not pattern_keys:
        return key
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


