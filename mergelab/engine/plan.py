"""The merge plan: the experts as task-vector sources, key and shape checks, and one planned action per tensor.

:func:`make_plan` walks the base checkpoint's tensors and asks the merge policy what to do with each (``base``:
keep it, ``merge``: hand it to the method, ``average``: the mean task vector, ``owner``: take it from the one expert
that changes it, ``carry``: take it from the one expert that has it); integer tensors are always kept, and matrix-only methods get only 2-D weights (other tensors are
averaged, as the official scripts do). :func:`check_lineage` refuses experts fine-tuned from another base, and
:func:`account` proves that no tensor of the base or of an expert is dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.engine.adapters import LoraAdapter, is_lora_dir
from mergelab.engine.factors import check_same_factors
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
        if slot.device == t.device and slot.dtype == t.dtype:
            torch.sub(t, base_c, out=slot)  # one fused pass: read and subtract
        else:  # convert into the slot first: a mixed-dtype sub would allocate a converted copy of the whole tensor
            slot.copy_(t)
            slot.sub_(base_c)
        return t.numel() * t.element_size()

    def changes(self, name: str, base: torch.Tensor) -> bool:
        """Whether this expert's value of base tensor ``name`` differs from ``base`` (exact comparison; a LoRA
        adapter changes the tensors its factors target and its ``modules_to_save`` values that differ)."""
        if self.lora is not None:
            if name not in self.lora.touched():
                return False
            if self.lora.factor_keys(name) == [self.lora.full.get(name)]:  # a saved full value only
                return not torch.equal(self.lora.reader.get(self.lora.full[name]).to(base.dtype), base)
            return True
        assert self.full is not None
        return not torch.equal(self.full.view(name).to(base.dtype), base)

    def value(self, name: str, base: torch.Tensor, device: torch.device, cdtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """This expert's value of base tensor ``name`` (stored bit for bit where it is stored; a LoRA factor
        update as ``base + delta`` in the compute dtype) and the bytes read."""
        if self.full is not None:
            t = self.full.view(name)
            return t, t.numel() * t.element_size()
        assert self.lora is not None
        if self.lora.factor_keys(name) == [self.lora.full.get(name)]:
            t = self.lora.reader.get(self.lora.full[name])
            if tuple(t.shape) != tuple(base.shape):
                raise MergeError(f"{self.path}: tensor {self.lora.full[name]} has shape {tuple(t.shape)}, base "
                                 f"{name} has {tuple(base.shape)}")
            return t, t.numel() * t.element_size()
        b = base.to(device=device, dtype=cdtype)
        d, n = self.lora.delta(name, b, device, cdtype)
        return (b if d is None else b + d), n

    def check_finite(self, name: str) -> None:
        """Raise when the expert's stored ``name`` holds NaN or Inf (names the file, tensor and expert)."""
        if self.full is not None and has_nonfinite(self.full.view(name)):
            raise MergeError(f"{self.full.infos[name].file}: tensor {name} contains NaN or Inf (expert {self.name})")


# Elements per chunk of the CPU loops below: 4 MiB of float32, so a chunk's conversions stay in the cache and its
# temporaries are recycled by the allocator (a fresh tensor-sized buffer costs a page fault per page on first touch,
# several times the arithmetic it holds).
CHUNK = 1 << 20


def untouched(experts: Sequence[Expert], name: str) -> bool:
    """True when every expert is a LoRA adapter that leaves base tensor ``name`` alone (its task vectors are zero)."""
    return bool(experts) and all(e.lora is not None and name not in e.lora.touched() for e in experts)


def fill_deltas(
    experts: Sequence[Expert], name: str, deltas: torch.Tensor, base: torch.Tensor, device: torch.device,
    cdtype: torch.dtype,
) -> int:
    """Write every expert's task vector of base tensor ``name`` into ``deltas[i]``; return the bytes read.

    Full experts on the CPU are converted and subtracted in chunks of :data:`CHUNK` elements, one expert at a time
    (its memory-mapped pages are released before the next expert's are read), so no tensor-sized copy of the base in
    the compute dtype is allocated; elsewhere the base is converted once, whole. The values are the same either way
    (elementwise ``expert - base`` in ``cdtype``).

    Args:
        experts: the experts, in stack order.
        name: the base tensor.
        deltas: ``(N, *S)`` output stack in ``cdtype`` on ``device``.
        base: the base tensor on ``device``, in its stored dtype.
        device: compute device.
        cdtype: compute dtype.
    """
    chunked = device.type == "cpu" and deltas.is_contiguous()
    base_c = None
    nbytes = 0
    for i, e in enumerate(experts):
        if e.full is None or not chunked:
            if e.full is not None and base_c is None:
                base_c = base.to(cdtype)
            nbytes += e.delta_into(name, deltas[i], base if base_c is None else base_c, base, device, cdtype)
            continue
        t = e.full.view(name)
        nbytes += t.numel() * t.element_size()
        _sub_chunked(deltas[i].reshape(-1), t.reshape(-1), base.reshape(-1))
        del t
    return nbytes


def _sub_chunked(slot: torch.Tensor, t: torch.Tensor, base: torch.Tensor) -> None:
    """``slot = t - base`` on flat CPU tensors in ``slot``'s dtype, :data:`CHUNK` elements at a time."""
    for a in range(0, slot.numel(), CHUNK):
        b = a + CHUNK
        bc = base[a:b].to(slot.dtype)
        if t.dtype == slot.dtype:
            torch.sub(t[a:b], bc, out=slot[a:b])
        else:
            slot[a:b].copy_(t[a:b])
            slot[a:b].sub_(bc)


def add_base_(upd: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``upd += base`` in ``upd``'s dtype, in place; on the CPU a base of another dtype is converted in chunks of
    :data:`CHUNK` elements instead of whole (the same values: the conversion is elementwise)."""
    if upd.device.type != "cpu" or base.dtype == upd.dtype or not upd.is_contiguous():
        return upd.add_(base)
    flat_u, flat_b = upd.reshape(-1), base.reshape(-1)
    for a in range(0, flat_u.numel(), CHUNK):
        flat_u[a : a + CHUNK].add_(flat_b[a : a + CHUNK].to(upd.dtype))
    return upd


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
    rule: str  # base | merge | average | owner | carry | factors (lora_merge: factors; ``merged`` in the stats)
    out_dtype: torch.dtype
    shape: tuple[int, ...]
    owner: int = -1  # owner, carry: expert index (owner: -1 when no expert changes the tensor)


def owner_of(name: str, base: CheckpointReader, experts: Sequence[Expert]) -> int:
    """The index of the one expert that changes base tensor ``name``, or -1 when none does.

    Raises:
        MergeError: two or more experts change it (names the tensor and two of them).
    """
    b = base.view(name)
    who = [i for i, e in enumerate(experts) if e.changes(name, b)]
    if len(who) > 1:
        raise MergeError(f"tensor {name}: policy 'owner' needs one owner, but experts {experts[who[0]].name} and "
                         f"{experts[who[1]].name} both change it")
    return who[0] if who else -1


def to_factor_items(items: Sequence[PlanItem], experts: Sequence[Expert]) -> dict[str, str]:
    """``lora_merge: factors``: turn every merged or averaged LoRA-targeted tensor's item into rule ``factors``.

    Returns:
        ``{base tensor: the policy's rule}`` (``merge``: the method merges its factors, ``average``: their mean).

    Raises:
        MergeError: an expert that is not a LoRA adapter, or adapters with other targets, ranks or scalings.
    """
    adapters = []
    for e in experts:
        if e.lora is None:
            raise MergeError(f"lora_merge: 'factors' needs every expert to be a LoRA adapter; {e.name} is not")
        adapters.append(e.lora)
    check_same_factors(adapters, [e.name for e in experts])
    out = {}
    for it in items:
        if it.rule in ("merge", "average") and it.name in adapters[0].modules:
            out[it.name] = it.rule
            it.rule = "factors"
    return out


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
        items.append(PlanItem(k, act, out_dtype, info.shape, owner_of(k, base, ex) if act == "owner" else -1))
    for k, owner in carry.items():
        e = ex[owner]
        assert e.full is not None
        info = e.full.infos[k]
        out_dtype = odtype if (odtype is not None and info.dtype.is_floating_point) else info.dtype
        items.append(PlanItem(k, "carry", out_dtype, info.shape, owner))
    return items



# Config fields that name an architecture: an expert whose config disagrees with the base's on one of them was not
# fine-tuned from this base.
ARCH_FIELDS = ("model_type", "architectures")


def _config_of(d: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:  # pragma: no cover - permissions
        return False


def check_lineage(base: CheckpointReader, experts: Sequence[Expert]) -> None:
    """Refuse experts that were not fine-tuned from this base (overridden by ``allow_base_mismatch``).

    A LoRA adapter's ``base_model_name_or_path`` must name this base: a directory (absolute, or relative to the
    adapter) that is the base or holds the same ``config.json``, or a hub id equal to the base config's
    ``_name_or_path`` or ending in the base directory's name. A full checkpoint's ``config.json`` must agree with the
    base's on the architecture fields (``model_type``, ``architectures``) where both state them.

    Raises:
        MergeError: naming the expert, what it says its base is, and the base.
    """
    bdir = base.path if base.path.is_dir() else base.path.parent
    bcfg = _config_of(bdir)
    strip = {"_name_or_path", "torch_dtype", "dtype", "transformers_version"}
    for e in experts:
        if e.lora is not None:
            claimed = str(e.lora.config.get("base_model_name_or_path") or "")
            if not claimed:
                continue
            p = Path(claimed) if Path(claimed).is_absolute() else e.path / claimed
            if p.is_dir():
                ok = _same_dir(p, bdir) or (
                    {k: v for k, v in _config_of(p).items() if k not in strip}
                    == {k: v for k, v in bcfg.items() if k not in strip}
                    and bool(bcfg)
                )
            else:
                ok = claimed in (bcfg.get("_name_or_path"), str(bdir)) or claimed.rstrip("/").split("/")[-1] == bdir.name
            if not ok:
                raise MergeError(
                    f"expert {e.path}: adapter was trained on base {claimed!r}, not on {bdir} "
                    "(pass allow_base_mismatch / --allow-base-mismatch to merge anyway)"
                )
        elif e.full is not None:
            ecfg = _config_of(e.path if e.path.is_dir() else e.path.parent)
            for f in ARCH_FIELDS:
                if f in ecfg and f in bcfg and ecfg[f] != bcfg[f]:
                    raise MergeError(
                        f"expert {e.path}: config {f} is {ecfg[f]!r}, base {bdir} has {bcfg[f]!r} "
                        "(pass allow_base_mismatch / --allow-base-mismatch to merge anyway)"
                    )


# How a plan rule accounts for a base tensor and for an expert's tensor.
_BASE_FATE = {"merge": "merged", "average": "averaged", "base": "copied", "owner": "owned", "factors": "merged",
              "core": "merged"}
_EXPERT_FATE = {"merge": "merged", "average": "averaged", "base": "excluded", "carry": "owned", "owner": "owned",
                "factors": "merged", "core": "merged"}


def account(base: CheckpointReader, experts: Sequence[Expert], items: Sequence[PlanItem]) -> dict[str, Any]:
    """Account for every tensor of the base and of every expert, or raise naming the first one that is not.

    Each base tensor is ``merged`` (by the method), ``averaged``, ``owned`` (replaced by its one owner's value) or
    ``copied`` (kept: the policy excludes it, no expert owns it, or it is not floating point). Each expert tensor (a
    LoRA adapter's tensors through the base tensor they change) is ``merged``, ``averaged``, ``owned`` (carried over:
    only this expert has it or changes it), ``unchanged`` (an ``owner`` tensor this expert leaves at the base's
    value) or ``excluded`` (the policy keeps the base's value there: explicitly dropped, and counted as such).

    Returns:
        ``{"base": {fate: n}, "experts": {name: {fate: n}}}`` for the report.

    Raises:
        MergeError: a tensor that no planned output accounts for (names it and its checkpoint).
    """
    rules = {it.name: it for it in items}
    base_counts: dict[str, int] = {}
    for k in base.infos:
        it = rules.get(k)
        if it is None or it.rule not in _BASE_FATE:
            raise MergeError(f"base {base.path}: tensor {k} is not accounted for by the merge plan")
        fate = "copied" if it.rule == "owner" and it.owner < 0 else _BASE_FATE[it.rule]
        base_counts[fate] = base_counts.get(fate, 0) + 1
    per_expert: dict[str, dict[str, int]] = {}
    for i, e in enumerate(experts):
        counts: dict[str, int] = {}
        if e.full is not None:
            names = {k: k for k in e.full.infos}
        else:
            assert e.lora is not None
            names = {}
            for bk in e.lora.touched():
                for ak in e.lora.factor_keys(bk):
                    names[ak] = bk
            for ak in e.lora.reader.infos:  # every adapter tensor must change some base tensor
                if ak not in names:
                    raise MergeError(f"expert {e.path}: adapter tensor {ak} changes no base tensor")
        for k, target in names.items():
            it = rules.get(target)
            if it is None or (it.rule == "carry" and it.owner != i):
                raise MergeError(f"expert {e.path}: tensor {k} is not accounted for by the merge plan")
            fate = "unchanged" if it.rule == "owner" and it.owner != i else _EXPERT_FATE[it.rule]
            counts[fate] = counts.get(fate, 0) + 1
        per_expert[e.name if e.name not in per_expert else f"{e.name}#{i}"] = dict(sorted(counts.items()))
    return {"base": dict(sorted(base_counts.items())), "experts": per_expert}
