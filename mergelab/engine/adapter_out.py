"""LoRA in, LoRA out: a merge of LoRA adapters written as one PEFT LoRA adapter (``output: adapter``).

Every expert is a LoRA adapter, so the merge changes only the adapters' target modules (and their
``modules_to_save``). The merge itself runs unchanged (any method, policy, seed and ``lora_merge`` mode) into a
temporary float32 checkpoint beside the output; then, per target module, the merged update is written as LoRA
factors ``B @ A``, by the mode the recipe merged LoRA experts in:

* ``lora_merge: delta``: the update ``D = theta_m - theta_0`` is factored by SVD at the output rank ``r``
  (``adapter_rank``; default the sum of the experts' ranks), with ``lora_alpha = r`` so that peft's scaling is 1.
  Exact (up to float32 rounding) when ``rank(D) <= r``: always for task arithmetic and weight averaging at the
  default rank, since ``rank(sum_i c_i B_i A_i) <= sum_i r_i``; otherwise the best rank-``r`` approximation
  (truncated SVD; Eckart-Young), with the relative Frobenius error ``|D - B A| / |D|`` of every tensor in the report.
* ``lora_merge: core``: the engine holds the update as ``U M V^T`` (:mod:`mergelab.engine.core_space`); it is
  split by the SVD of the small core ``M`` at rank ``r`` (default the largest core rank ``R <= sum_i r_i``, then
  exact for every method; below it the optimal truncation, error reported), scaling 1, no ``m x n`` SVD.
* ``lora_merge: factors``: the merged ``A_m``, ``B_m`` are the adapter and are written as they are, under the
  experts' own ``r``, ``lora_alpha`` and patterns (no SVD; exact). With ``adapter_rank`` they are re-split like the
  core mode's (QR of each factor, SVD of the small product).

Target modules the policy did not merge through the factors (kept at the base, taken from an ``owner``) take the SVD
path. ``modules_to_save`` tensors are written as their merged values. Adapters with ``lora_bias`` are refused.
Cost: for per-tensor methods, a temporary base holding only the tensors the adapters touch and their float32 merge
(a method with global statistics merges the whole checkpoint, as its statistics span every tensor), plus the
factoring above.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mergelab import _signals
from mergelab.engine.adapters import LoraAdapter
from mergelab.engine.factors import LowRank
from mergelab.engine.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointReader, MergeError
from mergelab.engine.recipe import MergeRecipe
from mergelab.engine.report import MergeReport
from mergelab.engine.writer import OutSpec, ShardWriter, write_model_card

ADAPTER_REPORT = "mergelab_adapter.json"


@dataclass
class AdapterMergeReport(MergeReport):
    """A :class:`MergeReport` of the full merge plus the adapter it was written as.

    Attributes:
        adapter: ``{"rank", "exact", "max_rel_error", "written_from", "tensors": {base key: {"rank",
            "rel_error"}}}``: the output rank, whether every tensor was reproduced exactly (relative error below
            1e-5), where the factors came from (``"SVD"`` of the merged update in the delta mode, ``"core space"``,
            ``"factors as merged"`` or ``"factors, truncated"``), and per target module the numerical rank of the
            merged update (the experts' rank for factors written as merged) and the relative Frobenius error of
            its rank-``r`` factors.
    """

    adapter: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """The merge's summary plus the adapter's rank and worst reconstruction error."""
        a = self.adapter
        worst = max(a.get("tensors", {}).items(), key=lambda kv: kv[1]["rel_error"], default=None)
        line = (f"adapter: rank {a.get('rank')}, {len(a.get('tensors', {}))} LoRA module(s) from "
                f"{a.get('written_from', 'SVD')}, {'exact' if a.get('exact') else 'truncated SVD'}; "
                f"max relative error {a.get('max_rel_error', 0):.2e}")
        if worst is not None and not a.get("exact"):
            line += f" ({worst[0]}, rank {worst[1]['rank']})"
        return super().summary() + "\n" + line


def factor(update: torch.Tensor, rank: int, *, oversample: int = 16, power_iters: int = 2) -> tuple[
        torch.Tensor, torch.Tensor, int, float]:
    """``update ~= B @ A`` with ``B (m, rank)``, ``A (rank, n)`` (zero-padded when ``rank`` exceeds ``min(m, n)``),
    each singular value split evenly between the factors.

    Small matrices (``min(m, n) <= 2 * (rank + oversample)``) take a full float64 SVD. Larger ones take a seeded
    randomized SVD (Halko et al. 2011: range of ``update @ Omega`` with ``rank + oversample`` columns and
    ``power_iters`` power iterations, then the SVD of the small projection), which is exact when
    ``rank(update) <= rank + oversample`` and costs ``O(m n (rank + oversample))`` instead of ``O(m n min(m, n))``.
    The reported error is measured on the factors actually returned.

    Returns:
        ``(B, A, numerical rank of update (at most rank + oversample on the randomized path), relative
        Frobenius error |update - B A| / |update|)``.
    """
    m = update.double()
    q = rank + oversample
    if min(m.shape) <= 2 * q:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    else:
        g = torch.Generator(device=m.device).manual_seed(0)
        y = m @ torch.randn(m.shape[1], q, generator=g, dtype=m.dtype, device=m.device)
        for _ in range(power_iters):
            y = m @ (m.T @ torch.linalg.qr(y).Q)
        basis = torch.linalg.qr(y).Q
        u_small, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
        u = basis @ u_small
    tol = float(s.max()) * max(m.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    num_rank = int((s > tol).sum())
    k = min(rank, s.numel())
    sq = s[:k].sqrt()
    b = torch.zeros(m.shape[0], rank, dtype=torch.float64, device=m.device)
    a = torch.zeros(rank, m.shape[1], dtype=torch.float64, device=m.device)
    b[:, :k] = u[:, :k] * sq
    a[:k] = sq[:, None] * vh[:k]
    norm = float(torch.linalg.matrix_norm(m))
    err = float(torch.linalg.matrix_norm(m - b @ a)) / norm if norm > 0 else 0.0
    return b.float(), a.float(), num_rank, err


def _subset(base: CheckpointReader, keys: list[str], root: Path) -> Path:
    """A checkpoint directory named like the base, holding its ``config.json`` and only ``keys`` (streamed)."""
    bdir = base.path if base.path.is_dir() else base.path.parent
    sub = root / bdir.name
    sub.mkdir(parents=True)
    if (bdir / "config.json").exists():
        shutil.copy2(bdir / "config.json", sub / "config.json")
    writer = ShardWriter(sub, [OutSpec(k, base.infos[k].dtype, tuple(base.infos[k].shape)) for k in keys], 2**62)
    for k in keys:
        writer.write(k, base.get(k))
    writer.close()
    return sub


def merge_to_adapter(recipe: MergeRecipe, out: str | Path, *, overwrite: bool,
                     full_merge: Callable[[MergeRecipe, Path, dict[str, LowRank]], MergeReport]
                     ) -> AdapterMergeReport:
    """Run ``recipe`` (``output: adapter``) and write the result as one PEFT LoRA adapter in ``out``.

    Args:
        recipe: a recipe whose experts are all LoRA adapters.
        out: output directory (``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``).
        overwrite: replace an existing ``out``.
        full_merge: runs a full-output recipe into a directory (the engine's merge), filling the dict it is given
            with the updates it merged as factors (``lora_merge: factors`` and ``core``).

    Raises:
        MergeError: an expert that is not a LoRA adapter, ``lora_bias`` adapters, or an existing ``out``.
    """
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MergeError(f"out: {out} already exists (pass overwrite=True / --overwrite to replace it)")
    base = CheckpointReader(recipe.base)
    adapters = [LoraAdapter(e.path, base.keys()) for e in recipe.experts]
    if any(ad._bias_of for ad in adapters):
        raise MergeError("output: adapters with lora_bias cannot be written as one adapter")
    modules: dict[str, Any] = {}  # base key -> the first adapter's LoRA module (key names, transpose)
    ranks: dict[str, int] = {}
    saved: dict[str, str] = {}  # base key -> adapter key of a modules_to_save value
    for ad in adapters:
        for k, m in ad.modules.items():
            modules.setdefault(k, m)
            ranks[k] = ranks.get(k, 0) + int(ad.reader.infos[m.a_key].shape[0])
        for k, ak in ad.full.items():
            saved.setdefault(k, ak)
    first = adapters[0]
    out_dtype = first.reader.get(next(iter(first.modules.values())).a_key).dtype if first.modules else torch.float32
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.adapter-", dir=out.parent))
    try:
        run = recipe.replace(output="full", adapter_rank=None, dtype="float32")
        stats = recipe.spec.make_stats(recipe.config, len(adapters)) if recipe.spec.make_stats else None
        if stats is None:  # per-tensor methods: merge only the tensors the adapters touch
            run = run.replace(base=str(_subset(base, sorted(set(modules) | set(saved)), work / "subset")))
        low_rank: dict[str, LowRank] = {}  # lora_merge factors / core: the merged updates as factors
        report = full_merge(run, work / "full", low_rank)
        # factor mode at the experts' rank: the merged A_m, B_m are the adapter, under the experts' own config
        native = recipe.lora_merge == "factors" and recipe.adapter_rank is None
        rank = int(recipe.adapter_rank or max((low_rank[k].rank if k in low_rank else ranks[k] for k in modules),
                                              default=1))
        merged = CheckpointReader(work / "full")
        try:
            if native:
                tensors, info = _native_factors(merged, base, modules, low_rank, first, out_dtype)
            else:
                tensors, info = _factors(merged, base, modules, low_rank, rank, out_dtype)
            for k, ak in sorted(saved.items()):
                tensors[ak] = merged.get(k).to(first.reader.get(ak).dtype).contiguous()
        finally:
            merged.close()
        result = work / "adapter"
        result.mkdir()
        save_file(tensors, str(result / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        cfg = dict(first.config)
        cfg.update(target_modules=sorted({m.module for m in modules.values()}),
                   modules_to_save=sorted({x for ad in adapters for x in ad.config.get("modules_to_save") or []})
                   or None)
        if native:
            rank = int(cfg["r"])
        else:  # scaling 1: the factors carry it
            cfg.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
        (result / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))
        max_err = max((v["rel_error"] for v in info.values()), default=0.0)
        how = ("factors as merged" if native else "core space" if recipe.lora_merge == "core"
               else "factors, truncated" if recipe.lora_merge == "factors" else "SVD")
        summary = {"rank": rank, "exact": max_err < 1e-5, "max_rel_error": max_err, "written_from": how,
                   "tensors": info}
        rep = AdapterMergeReport(**{f.name: getattr(report, f.name) for f in fields(MergeReport)}, adapter=summary)
        rep.out = str(out)
        rep.shards = [ADAPTER_WEIGHTS]
        (result / ADAPTER_REPORT).write_text(json.dumps(summary, indent=2))
        write_model_card(result, recipe)
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        result.replace(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        base.close()
        for ad in adapters:
            ad.reader.close()
    return rep


def _factors(merged: CheckpointReader, base: CheckpointReader, modules: dict[str, Any],
             low_rank: dict[str, LowRank], rank: int, dtype: torch.dtype) -> tuple[
        dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The rank-``rank`` LoRA factors (scaling 1) of every target module's merged update (adapter key -> tensor)
    and, per base key, the update's numerical rank and the factors' relative error. An update the engine holds as
    factors (``low_rank``: factor and core modes) is split by the SVD of its small core, never of ``m x n``; any
    other is the SVD of ``merged - base``. A stop request is acted on between modules."""
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for k, m in sorted(modules.items()):
        _signals.check()
        if k in low_rank:
            b, a, num_rank, err = split(low_rank[k], rank)
        else:
            update = merged.get(k).float() - base.get(k).float()
            b, a, num_rank, err = factor(update.T if m.transpose else update, rank)
        tensors[m.a_key], tensors[m.b_key] = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        info[k] = {"rank": num_rank, "rel_error": err}
    return tensors, info


def _native_factors(merged: CheckpointReader, base: CheckpointReader, modules: dict[str, Any],
                    low_rank: dict[str, LowRank], first: LoraAdapter, dtype: torch.dtype) -> tuple[
        dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """``lora_merge: factors`` at the experts' rank: every merged ``A_m``, ``B_m`` written as it is (the experts'
    rank and scaling, no SVD); a module the policy did not merge (kept at the base, or an owner's) is the SVD of its
    update divided by the module's scaling, exact as its rank is at most the experts'."""
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for k, m in sorted(modules.items()):
        _signals.check()
        r = int(first.reader.infos[m.a_key].shape[0])
        if k in low_rank:
            b, a, num_rank, err = low_rank[k].b, low_rank[k].a, r, 0.0
        else:
            update = (merged.get(k).float() - base.get(k).float()) / m.scaling
            b, a, num_rank, err = factor(update.T if m.transpose else update, r)
        tensors[m.a_key], tensors[m.b_key] = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        info[k] = {"rank": num_rank, "rel_error": err}
    return tensors, info


def split(update: LowRank, rank: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """:func:`factor` for an update held as factors: ``B (m, rank)``, ``A (rank, n)`` (scaling 1, zero-padded), each
    singular value split evenly, from :meth:`LowRank.svd` (cost ``O((m + n) R^2)``; exact when ``rank >= R``).

    Returns:
        ``(B, A, numerical rank, relative Frobenius error of the truncation)``.
    """
    u, s, vh = update.svd()
    tol = float(s.max()) * max(u.shape[0], vh.shape[1]) * torch.finfo(s.dtype).eps if s.numel() else 0.0
    k = min(rank, s.numel())
    sq = s[:k].sqrt()
    b = u.new_zeros(u.shape[0], rank)
    a = u.new_zeros(rank, vh.shape[1])
    b[:, :k] = u[:, :k] * sq
    a[:k] = sq[:, None] * vh[:k]
    norm = float(s.norm())
    err = float(s[k:].norm()) / norm if norm > 0 else 0.0
    return b.cpu(), a.cpu(), int((s > tol).sum()), err


__all__ = ["ADAPTER_REPORT", "AdapterMergeReport", "factor", "merge_to_adapter", "split"]
