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
:func:`module_update` connect these to the engine's :class:`~mergelab.engine.adapters.LoraAdapter`. The engine runs this for a recipe with ``lora_merge:
factors`` (:func:`mergelab.engine.loop.run_merge`); the omni benchmark (``mergelab/bench/omni``) is its first user.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergelab.engine.adapters import LoraAdapter
from mergelab.engine.io import MergeError
from mergelab.methods import METHODS
from mergelab.methods.base import MergeContext, scale_of, tensor_generator

OPTMERGE_FACTOR_PARAMS: dict[str, Any] = {"variant": "lora", "rank_ratio": 0.2, "init": "mean", "optimizer": "sgd",
                                          "lr": 5e-2, "momentum": 0.9, "steps": 300, "projector": "uncentred"}
"""OptMerge's settings in the official modality script (``wudi_merging2``, ``iter_num=300``)."""


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


def module_update(adapter: LoraAdapter, key: str, merged: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``scaling * B_m @ A_m`` of base tensor ``key`` from merged factors (transposed as the adapter's module is)."""
    m = adapter.modules[key]
    ba = factor_delta({f"{key}.lora_A.weight": merged[f"{key}.lora_A.weight"],
                       f"{key}.lora_B.weight": merged[f"{key}.lora_B.weight"]}, m.scaling)[key]
    return ba.T if m.transpose else ba
