"""LoRA factor merging, as the official modality-merging script does it (pure tensors; ``lora_merge: factors``).

The ModelCompose merge script (OptMerge paper, section 5.1) merges LoRA experts on their **raw factors**: for each
adapted linear layer the stack of ``lora_A`` matrices ``(r, d_in)`` and the stack of ``lora_B`` matrices
``(d_out, r)`` each go through the method separately, with the factor itself as the "task vector" (a zero base, no
init subtracted, no product ``B @ A``) and lambda multiplying each merged factor. The merged layer's update is then
``scaling * B_m @ A_m``; for task arithmetic that is ``(sum B_i)(sum A_i)``, cross terms included, not the delta
mode's ``sum B_i A_i``. The script's OptMerge is the ``lora`` variant with k = min(m, n) // 5 (``rank_ratio
0.2``) over the raw factor, the full untruncated projector, mean init, SGD lr 5e-2, momentum 0.9, 300 steps
(:data:`OPTMERGE_FACTOR_PARAMS`).

:func:`merge_factors` does this for whole adapters (``{module: (A stack, B stack)}``) with any method of
:data:`mergelab.methods.METHODS`, global statistics (TIES' global top-k) included, and returns the merged factors;
:func:`factor_delta` turns them into weight deltas; :func:`factor_stacks`, :func:`check_same_factors` and
:func:`factor_updates` connect these to the engine's :class:`~mergelab.engine.adapters.LoraAdapter`: the engine
runs this for a recipe with ``lora_merge: factors`` (:func:`mergelab.engine.loop.run_merge`) and gets one
:class:`LowRank` per merged tensor, which it expands for a full checkpoint and ``output: adapter`` writes as it is
(:mod:`mergelab.engine.adapter_out`); the omni benchmark (``mergelab/bench/omni``) is its first user.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergelab.engine.adapters import LoraAdapter
from mergelab.engine.io import MergeError
from mergelab.methods import METHODS
from mergelab.methods.base import MergeContext, scale_of, tensor_generator

OPTMERGE_FACTOR_PARAMS: dict[str, Any] = {"variant": "lora", "rank_ratio": 0.2, "init": "mean", "optimizer": "sgd",
                                          "lr": 5e-2, "momentum": 0.9, "steps": 300, "projector": "uncentred"}
"""OptMerge's settings in the official modality script (``wudi_merging2``, ``iter_num=300``)."""


@dataclass(frozen=True)
class LowRank:
    """A merged LoRA update held as factors: ``scaling * b @ mid @ a`` (``mid`` omitted when None), transposed for
    modules whose LoRA is stored transposed (embeddings, ``fan_in_fan_out``).

    The factor mode gives ``b = B_m (m, r)``, ``a = A_m (r, n)`` and the adapters' scaling; the core-space mode
    (:mod:`mergelab.engine.core_space`) gives orthonormal bases ``b = U (m, R)``, ``a = V^T (R', n)`` and the merged
    core ``mid = M (R, R')``, scaling 1.

    Attributes:
        b: left factor (the ``lora_B`` side).
        a: right factor (the ``lora_A`` side).
        mid: the core between them, or None.
        scaling: a scalar on the product.
        transpose: the base tensor is the transposed product.
    """

    b: torch.Tensor
    a: torch.Tensor
    mid: torch.Tensor | None = None
    scaling: float = 1.0
    transpose: bool = False

    @property
    def rank(self) -> int:
        """The inner dimension: an upper bound on the update's rank."""
        return int(min(self.b.shape[1], self.a.shape[0]))

    def dense(self) -> torch.Tensor:
        """The update as a full matrix, shaped like the base tensor."""
        b = self.b if self.mid is None else self.b @ self.mid
        ba = (self.scaling * b if self.scaling != 1.0 else b) @ self.a
        return ba.T if self.transpose else ba

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, S, Vh)`` with ``scaling * b @ mid @ a = U diag(S) Vh`` (untransposed), from small matrices only.

        With a core the bases are orthonormal and the SVD of ``mid`` is the update's; otherwise ``b = Q_b R_b``,
        ``a^T = Q_a R_a`` and the SVD of ``R_b R_a^T`` (rank x rank). Cost ``O((m + n) rank^2)``, never ``O(m n)``.
        """
        if self.mid is not None:
            p, s, qh = torch.linalg.svd(self.mid * self.scaling, full_matrices=False)
            return self.b @ p, s, qh @ self.a
        qb, rb = torch.linalg.qr(self.b)
        qa, ra = torch.linalg.qr(self.a.T)
        p, s, qh = torch.linalg.svd((rb @ ra.T) * self.scaling, full_matrices=False)
        return qb @ p, s, qh @ qa.T


def factor_params(method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The method's parameters in factor mode: the official script's OptMerge settings, then ``params``."""
    base = dict(OPTMERGE_FACTOR_PARAMS) if method == "optmerge" else dict(METHODS[method].setting_params("lora"))
    return {**base, **dict(params or {})}


def merge_factors(factors: Mapping[str, Sequence[torch.Tensor]], method: str,
                  params: Mapping[str, Any] | None = None, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Merge raw LoRA factors with ``method``: each key's stack as task vectors over a zero base, times lambda.

    Args:
        factors: ``{tensor name: [expert 1's factor, expert 2's, ...]}`` (``...lora_A.weight`` and
            ``...lora_B.weight`` entries are independent tensors).
        method: a key of :data:`mergelab.methods.METHODS`.
        params: the method's parameters (:func:`factor_params` adds the script's OptMerge settings).
        seed: per-tensor generator seed (stochastic methods such as DARE).

    Returns:
        ``{tensor name: lambda * merged factor}``.
    """
    spec = METHODS[method]
    cfg = spec.make_config(factor_params(method, params))
    lam = scale_of(cfg)
    stacks = {k: torch.stack([t.float() for t in v]) for k, v in factors.items()}
    stats = spec.make_stats(cfg, len(next(iter(stacks.values())))) if spec.make_stats else None
    while stats is not None:
        for name, deltas in stacks.items():
            stats.update(name, deltas)
        if not stats.finish_pass():
            break
    out = {}
    for name, deltas in stacks.items():
        ctx = MergeContext(name=name, generator=tensor_generator(seed, name), stats=stats)
        out[name] = spec.fn(torch.zeros_like(deltas[0]), deltas, cfg, ctx) * lam
    return out


def factor_delta(merged: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """``{module: scaling * B @ A}`` from merged factors named ``<module>.lora_A.weight`` / ``.lora_B.weight``."""
    out = {}
    for name, a in merged.items():
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            out[module] = scaling * merged[f"{module}.lora_B.weight"] @ a
    return out


def factor_stacks(adapters: Sequence[LoraAdapter], keys: Sequence[str]) -> dict[str, list[torch.Tensor]]:
    """The experts' raw factors of the base tensors ``keys``, as :func:`merge_factors` takes them.

    Returns:
        ``{"<key>.lora_A.weight": [A_1, A_2, ...], "<key>.lora_B.weight": [B_1, ...]}`` (float32).
    """
    out: dict[str, list[torch.Tensor]] = {}
    for key in keys:
        out[f"{key}.lora_A.weight"] = [a.reader.get(a.modules[key].a_key).float() for a in adapters]
        out[f"{key}.lora_B.weight"] = [a.reader.get(a.modules[key].b_key).float() for a in adapters]
    return out


def check_same_factors(adapters: Sequence[LoraAdapter], names: Sequence[str]) -> None:
    """Factor mode needs every adapter to target the same base tensors with the same rank and scaling.

    Raises:
        MergeError: naming the first adapter that differs from the first one, and how.
    """
    ref, ref_name = adapters[0], names[0]
    for a, name in zip(adapters[1:], names[1:], strict=True):
        if set(a.modules) != set(ref.modules):
            diff = sorted(set(a.modules) ^ set(ref.modules))
            raise MergeError(f"lora_merge: 'factors' needs the same LoRA targets in every expert; {name} and "
                             f"{ref_name} differ on {diff[0]}" + (f" and {len(diff) - 1} more" if len(diff) > 1 else ""))
        for key, m in a.modules.items():
            r = ref.modules[key]
            same = (a.reader.infos[m.a_key].shape == ref.reader.infos[r.a_key].shape
                    and a.reader.infos[m.b_key].shape == ref.reader.infos[r.b_key].shape)
            if not same or m.scaling != r.scaling or m.transpose != r.transpose:
                raise MergeError(f"lora_merge: 'factors' needs the same rank and scaling in every expert; {name} "
                                 f"and {ref_name} differ on {key}")


def factor_updates(adapters: Sequence[LoraAdapter], rules: Mapping[str, str], method: str,
                   params: Mapping[str, Any], *, seed: int, lam: float) -> dict[str, LowRank]:
    """``lora_merge: factors`` for the engine: every planned tensor's ``lora_A`` and ``lora_B`` stacks merged.

    Tensors the policy merges (rule ``merge``) go through ``method`` (:func:`merge_factors`, global statistics over
    every merged factor); tensors it averages get the mean factors; both times lambda.

    Args:
        adapters: the experts' adapters (same targets, ranks and scalings: :func:`check_same_factors`).
        rules: ``{base tensor: "merge" | "average"}``.
        method: a key of :data:`mergelab.methods.METHODS`.
        params: the method's parameters, per-expert ``coefficients`` included.
        seed: the merge seed.
        lam: the recipe's lambda (applied to averaged factors).

    Returns:
        ``{base tensor: LowRank(B_m, A_m, scaling, transpose)}`` as the first adapter stores the module.
    """
    merged_keys = [k for k, r in rules.items() if r == "merge"]
    out = merge_factors(factor_stacks(adapters, merged_keys), method, params, seed=seed) if merged_keys else {}
    averaged = factor_stacks(adapters, [k for k, r in rules.items() if r == "average"])
    out.update({k: torch.stack(v).mean(dim=0) * lam for k, v in averaged.items()})
    mods = adapters[0].modules
    return {k: LowRank(out[f"{k}.lora_B.weight"], out[f"{k}.lora_A.weight"], None, mods[k].scaling,
                       mods[k].transpose) for k in rules}
