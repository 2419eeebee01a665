"""Task Arithmetic (Ilharco et al. 2023, arXiv:2212.04089). Granularity: per tensor (element-wise).

``tau_m = sum_i c_i tau_i``: the per-expert coefficient ``c_i`` scales expert i's task vector in the sum (any real
number; ``c_i < 0`` negates a task; default 1, the paper's plain sum); the engine writes ``theta_0 + lam * tau_m``.
With ``drop_rate > 0`` each task vector is first DARE-sparsified (Yu et al. 2024, arXiv:2311.03099; see
:mod:`mergelab.methods.dare`): that is the ``dare_task_arithmetic`` entry. The inputs are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mergelab.methods._linalg import check_coefficients, check_real, coefficients_or_none
from mergelab.methods._sparsify import check_drop_rate, chunk_size, dare_drop
from mergelab.methods.base import MergeContext


@dataclass(frozen=True, kw_only=True)
class TaskArithmeticConfig:
    """Task Arithmetic hyperparameters.

    Attributes:
        lam: scale of the merged task vector (paper grid {0.1, 0.3, 0.5, 0.7, 1.0, 1.5}).
        coefficients: per-expert scales ``c_i`` of the task vectors in the sum (N floats), or None for all ones.
        drop_rate: DARE drop probability ``p`` in [0, 1); 0 disables DARE.
    """

    lam: float = 1.0
    coefficients: tuple[float, ...] | None = None
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "lam", check_real(name, "lam", self.lam))
        object.__setattr__(self, "coefficients", check_coefficients(name, self.coefficients))
        object.__setattr__(self, "drop_rate", check_drop_rate(name, self.drop_rate))


def task_arithmetic(base: Tensor, deltas: Tensor, cfg: TaskArithmeticConfig, ctx: MergeContext) -> Tensor:
    """Weighted sum of (optionally DARE-sparsified) task vectors.

    Args:
        base: base tensor (unused).
        deltas: stacked task vectors ``(N, *S)`` in the compute dtype.
        cfg: :class:`TaskArithmeticConfig` (or the DARE subclass).
        ctx: merge context; ``ctx.generator`` drives DARE's Bernoulli masks.

    Returns:
        ``sum_i c_i * DARE(tau_i)`` with shape ``S``.

    Raises:
        ValueError: when ``cfg.coefficients`` does not have one entry per expert.
    """
    coef = coefficients_or_none(cfg.coefficients, deltas, ctx.name)
    d = dare_drop(deltas, cfg.drop_rate, ctx) if cfg.drop_rate > 0 else deltas
    return combine(d, coef)


def is_elementwise(cfg: TaskArithmeticConfig) -> bool:
    """``MethodSpec.elementwise``: the weighted sum is elementwise; DARE's masks are drawn over the whole tensor."""
    return cfg.drop_rate == 0


def combine(deltas: Tensor, coef: Tensor | None, *, mean: bool = False) -> Tensor:
    """``sum_i c_i tau_i`` (``mean=True``: divided by ``sum_i c_i``); without coefficients the plain sum/mean.

    Args:
        deltas: stacked task vectors ``(N, *S)`` (not modified).
        coef: ``(N,)`` coefficients or None (all ones: ``deltas.sum(0)`` / ``deltas.mean(0)`` exactly).
        mean: divide by the sum of the coefficients (a weighted mean).

    Returns:
        A new tensor of shape ``S`` in the deltas' dtype.
    """
    if coef is None:
        return deltas.mean(dim=0) if mean else deltas.sum(dim=0)
    out = weighted_sum(deltas, coef)
    return out.div_(float(coef.sum())) if mean else out


def weighted_sum(deltas: Tensor, coef: Tensor) -> Tensor:
    """``(deltas * coef[:, None, ...]).sum(0)`` bit for bit, with cache-sized chunks instead of a full-size product.

    Chunks are multiples of 256 columns, so every column is reduced by the same torch kernel path (vectorised body or
    tail) as in the unchunked expression.
    """
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    col = coef.reshape(n, 1).to(flat.dtype)
    out = torch.empty(flat.shape[1], dtype=flat.dtype, device=flat.device)
    c = chunk_size(n, flat.device)
    for i in range(0, flat.shape[1], c):
        torch.sum(flat[:, i : i + c] * col, dim=0, out=out[i : i + c])
    return out.reshape(deltas.shape[1:])
