"""WUDI Merging (Cheng et al., ICML 2025, arXiv:2503.08099). Granularity: per layer (2-D weights only).

``min_{tau_m} sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2`` (paper Eq. 1, squared norm as in
MLLMerging and WUDI's Eq. 1), from the sum of the task vectors, Adam lr 1e-5, 300 steps, as in the official scripts.
It is OptMerge's loss with ``k = min(m, n)`` and an uncentred target (``P_i P_i^T = tau_i^T tau_i``), so it shares
the m x k form and the solvers of :mod:`mergelab.methods.optmerge`. Zero task vectors are left out of the loss; if
all are, the mean is returned. The inputs are never modified.

Per-expert coefficients ``c_i >= 0`` weigh expert i in the loss (``w_i = c_i / ||tau_i||_F^2``) and in the
initialisation (``sum_i c_i tau_i``, or the ``c``-weighted mean with ``init="mean"``), as in OptMerge; all ones
(or None) is the paper, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mergelab.methods._linalg import check_matrix, coefficients_or_none, quadratic_factors
from mergelab.methods.base import MergeContext
from mergelab.methods.optmerge import minimise, svd_method, validate_solver_fields


@dataclass(frozen=True, kw_only=True)
class WudiConfig:
    """WUDI hyperparameters (same meaning as in :class:`~mergelab.methods.optmerge.OptMergeConfig`)."""

    lam: float = 1.0
    steps: int = 300
    lr: float = 1e-5
    optimizer: str = "adam"
    momentum: float = 0.9
    init: str = "sum"
    compute_dtype: str | None = None
    solver: str = "auto"
    svd: str = "auto"
    coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        validate_solver_fields(self)


def wudi(base: Tensor, deltas: Tensor, cfg: WudiConfig, ctx: MergeContext) -> Tensor:
    """Merged WUDI task vector of one weight matrix (shape ``(m, n)``, deltas' dtype).

    Raises:
        ValueError: when ``deltas`` is not a stack of matrices.
    """
    check_matrix(deltas, ctx.name, "wudi")
    _, m, n = deltas.shape
    coef = coefficients_or_none(cfg.coefficients, deltas, ctx.name)
    dtype = torch.float64 if deltas.dtype == torch.float64 else torch.float32
    factors = quadratic_factors(
        deltas,
        min(m, n),
        centred_target=False,
        centred_projector=False,
        dtype=dtype,
        svd=svd_method(cfg, deltas),
        coefficients=coef,
        ctx=ctx,
    )
    return minimise(deltas, factors, cfg, coef)
