"""The merge plan: the experts as task-vector sources, key and shape checks, and one planned action per tensor.

:func:`make_plan` walks the base checkpoint's tensors and asks the merge policy what to do with each (``base``:
keep it, ``merge``: hand it to the method, ``average``: the mean task vector, ``carry``: take it from the one expert
that has it); integer tensors are always kept, and matrix-only methods get only 2-D weights (other tensors are
averaged, as the official scripts do).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelab.engine.adapters import LoraAdapter, is_lora_dir
from mergelab.engine.io import CheckpointReader, MergeError
from mergelab.engine.policy import MergePolicy
from mergelab.engine.recipe import ExpertSpec
from mergelab.methods.base import MethodSpec


class Expert:
    """A full checkpoint or a LoRA adapter, giving task vectors per base tensor."""

    def __init__(self, spec: ExpertSpec, base: CheckpointReader) -> None:
        self.spec = spec
        self.path = Path(spec.path)
        self.name = spec.name or self.path.name
        self.lora: LoraAdapter | None = None
        self.full: CheckpointReader | None = None
        if is_lora_dir(self.path):
            self.lora = LoraAdapter(self.path, base.keys())
        else:
            self.full = CheckpointReader(self.path)

    def keys(self) -> set[str]:
        return set(self.full.infos) if self.full else set()

    def delta_into(
        self,
        name: str,
        slot: torch.Tensor,
        base_c: torch.Tensor,
        base_dev: torch.Tensor,
        device: torch.device,
        cdtype: torch.dtype,
    ) -> int:
        """Write the task vector of ``name`` into ``slot`` (compute dtype, on the device); return the bytes read."""
        if self.lora is not None:
            d, n = self.lora.delta(name, base_dev, device, cdtype)
            if d is None:
                slot.zero_()
            else:
                slot.copy_(d)
            return n
        assert self.full is not None
        t = self.full.view(name)
        if slot.device == t.device:
            torch.sub(t, base_c, out=slot)  # one fused pass: read, convert, subtract
        else:
            slot.copy_(t)
            slot.sub_(base_c)
        return t.numel() * t.element_size()

    def check_finite(self, name: str) -> None:
        """Raise when the expert's stored ``name`` holds NaN or Inf (names the file, tensor and expert)."""
        if self.full is not None and has_nonfinite(self.full.view(name)):
            raise MergeError(f"{self.full.infos[name].file}: tensor {name} contains NaN or Inf (expert {self.name})")


def has_nonfinite(t: torch.Tensor) -> bool:
    """True when a floating tensor holds NaN or Inf (one reduction; the exact check only if the sum overflows)."""
    if not t.is_floating_point():
        return False
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return False
    return not bool(torch.isfinite(t).all())


def check_keys(base: CheckpointReader, experts: Sequence[Expert], carry_unique: bool) -> dict[str, int]:
    """Compare key sets and shapes; return ``{tensor: owner index}`` for tensors carried from a single expert.

    Raises:
        MergeError: a tensor missing in an expert, an expert tensor absent from the base (unless carried), or a
            shape mismatch (names the tensor and both shapes).
    """
    base_keys = set(base.infos)
    carry: dict[str, int] = {}
    owners: dict[str, list[int]] = {}
    for i, e in enumerate(experts):
        if e.full is None:
            continue
        keys = e.keys()
        missing = sorted(base_keys - keys)
        if missing:
            raise MergeError(
                f"expert {e.path}: tensor {missing[0]} is missing (present in base {base.path})"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
        for k in sorted(keys - base_keys):
            owners.setdefault(k, []).append(i)
        for k in sorted(keys & base_keys):
            bs, es = base.infos[k].shape, e.full.infos[k].shape
            if bs != es:
                raise MergeError(f"tensor {k}: expert {e.full.infos[k].file} has shape {es}, base has shape {bs}")
    for k, who in owners.items():
        if not carry_unique:
            raise MergeError(f"expert {experts[who[0]].path}: tensor {k} is not in base {base.path}")
        if len(who) > 1:
            raise MergeError(f"tensor {k}: owned by {len(who)} experts but not the base; cannot carry it over")
        carry[k] = who[0]
    return carry


@dataclass
class PlanItem:
    name: str
    rule: str  # base | merge | average | carry
    out_dtype: torch.dtype
    shape: tuple[int, ...]
    owner: int = -1  # carry: expert index


def make_plan(
    base: CheckpointReader,
    ex: Sequence[Expert],
    carry: Mapping[str, int],
    pol: MergePolicy,
    spec: MethodSpec,
    odtype: torch.dtype | None,
) -> list[PlanItem]:
    items = []
    for k, info in base.infos.items():
        act = pol.action(k)
        if not info.dtype.is_floating_point:
            act = "base"
        elif act == "merge" and spec.matrix_only and not (len(info.shape) == 2 and "lm_head" not in k):
            act = "average"
        out_dtype = odtype if (odtype is not None and info.dtype.is_floating_point) else info.dtype
        items.append(PlanItem(k, act, out_dtype, info.shape))
    for k, owner in carry.items():
        e = ex[owner]
        assert e.full is not None
        info = e.full.infos[k]
        out_dtype = odtype if (odtype is not None and info.dtype.is_floating_point) else info.dtype
        items.append(PlanItem(k, "carry", out_dtype, info.shape, owner))
    return items

