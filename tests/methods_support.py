"""Helpers shared by the method tests: call a registered method the way the engine does."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mergelab.methods import METHODS, MergeContext
from mergelab.methods.base import tensor_generator


def run(
    name: str,
    base: Tensor,
    deltas: Tensor,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    *,
    inplace: bool = False,
) -> Tensor:
    """Run method ``name`` on one tensor like the engine: the merge ``seed`` fills a ``seed`` field left unset, the
    stats passes of global methods run first, and ``ctx.generator`` is seeded from ``(seed, tensor name)``."""
    spec = METHODS[name]
    params = dict(params or {})
    if "seed" in getattr(spec.config_cls, "__dataclass_fields__", {}):
        params.setdefault("seed", seed)
    cfg = spec.make_config(params)
    stats = spec.make_stats(cfg, deltas.shape[0]) if spec.make_stats else None
    if stats is not None:
        stats.update("w", deltas)
        while stats.finish_pass():
            stats.update("w", deltas)
    gen = tensor_generator(seed, "w", deltas.device)
    ctx = MergeContext(name="w", generator=gen, stats=stats, compute_dtype=deltas.dtype, inplace=inplace)
    return spec.fn(base, deltas, cfg, ctx)


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float(a @ b / (a.norm() * b.norm()))
