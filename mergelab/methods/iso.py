"""Iso-C and Iso-CTS (Marczak et al., ICML 2025, arXiv:2502.04959). Granularity: per layer (2-D weights only).

* Iso-C: ``Delta = sum_i tau_i = U S V^T`` (thin SVD); return ``mean(S) * U V^T``: the task-arithmetic subspace with
  an isotropic (flattened) spectrum, as in the paper and the official scripts. On exactly low-rank task vectors
  (LoRA) most of the ``min(m, n)`` directions have a zero singular value: their singular vectors are rounding noise outside every
  task's span, yet they get the full ``mean(S)``, so most of the output norm lies outside the tasks' span
  (measured on the zoo in docs/methods.md). ``span_only=True`` keeps only the directions with a non-zero singular
  value (``s > s_max * max(m, n) * eps``), each scaled by the mean of those singular values (isotropic on the tasks'
  span); the default ``False`` is the paper.
* Iso-CTS: common *and* task-specific subspaces. The common subspace is the top ``k_c`` singular directions of
  ``Delta``. The ``min(m,n) - floor(min(m,n) * common_space_fraction)`` remaining directions are shared equally among
  the ``T`` tasks, each share rounded to the NEAREST integer (Python's ``round``, half to even), as the authors' code
  and FusionBench do, and the common subspace takes what is left (``k_c = min(m,n) - T * share``; a share is capped
  at ``min(m,n) // T``). Each task contributes its share of top singular triplets of its task vector with the
  common left subspace projected out, ``tau_i - U_c U_c^T tau_i``. The stacked left and right bases are orthogonalised
  (polar factors, as in TSV) and every direction gets the same scale, the mean of the stacked singular values.

Experts whose task vector is exactly zero take no task-specific slot in Iso-CTS.

Per-expert coefficients ``c_i`` scale task vector i (``tau_i -> c_i tau_i``) in both methods: in Iso-C they weigh it
in the task-arithmetic sum whose spectrum is flattened; in Iso-CTS also its residual, hence its task-specific
directions' singular values (``c_i = 0``: the expert takes no slot). All ones is the paper. SVDs in float32 (float64
for float64 input); deterministic; the inputs are never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mergelab.methods._linalg import (
    check_coefficients,
    check_matrix,
    check_range,
    check_real,
    coefficients_or_none,
    polar,
    scale_experts,
    squared_norms,
    thin_svd,
)
from mergelab.methods.base import MergeContext, cached
from mergelab.methods.task_arithmetic import combine


@dataclass(frozen=True, kw_only=True)
class IsoCConfig:
    """Iso-C hyperparameters.

    Attributes:
        lam: scale of the merged task vector.
        coefficients: per-expert scales ``c_i`` of the task vectors in the sum (N floats), or None for all ones.
        span_only: keep only the directions of the sum with a non-zero singular value (the tasks' span), scaled by
            their mean singular value; False (default) is the paper (every direction, scaled by ``mean(S)``).
    """

    lam: float = 1.0
    coefficients: tuple[float, ...] | None = None
    span_only: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "lam", check_real(name, "lam", self.lam))
        object.__setattr__(self, "coefficients", check_coefficients(name, self.coefficients))
        if not isinstance(self.span_only, bool):
            raise ValueError(f"{name}.span_only must be true or false, got {self.span_only!r}")


@dataclass(frozen=True, kw_only=True)
class IsoCtsConfig:
    """Iso-CTS hyperparameters.

    Attributes:
        lam: scale of the merged task vector.
        common_space_fraction: share of the min(m, n) directions given to the common subspace, in (0, 1]
            (0.8 in the paper).
        coefficients: per-expert scales ``c_i`` of the task vectors (N floats), or None for all ones.
    """

    lam: float = 1.0
    common_space_fraction: float = 0.8
    coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "lam", check_real(name, "lam", self.lam))
        object.__setattr__(
            self,
            "common_space_fraction",
            check_range(name, "common_space_fraction", self.common_space_fraction, 0.0, 1.0, lo_open=True),
        )
        object.__setattr__(self, "coefficients", check_coefficients(name, self.coefficients))


def iso_c(base: Tensor, deltas: Tensor, cfg: IsoCConfig, ctx: MergeContext) -> Tensor:
    """Merged Iso-C task vector ``mean(S) U V^T`` of ``sum_i tau_i`` (shape ``(m, n)``, deltas' dtype)."""
    check_matrix(deltas, ctx.name, "iso_c")
    x = combine(deltas, coefficients_or_none(cfg.coefficients, deltas, ctx.name))
    u, s, vh = cached(ctx, "thin_svd", x, lambda: thin_svd(x))  # reused across lambdas
    if cfg.span_only:
        keep = s > s.max() * max(deltas.shape[1:]) * torch.finfo(s.dtype).eps
        if not bool(keep.any()):
            return torch.zeros_like(deltas[0])
        u, s, vh = u[:, keep], s[keep], vh[keep]
    return (s.mean() * (u @ vh)).to(deltas.dtype)


def iso_cts_split(p: int, t: int, common_space_fraction: float) -> tuple[int, int]:
    """``(k_c, share)``: the common subspace's size and each of the ``t`` tasks' share of ``p = min(m, n)`` directions.

    ``share = round((p - floor(p * common_space_fraction)) / t)`` (nearest integer, half to even: the authors' code
    and FusionBench), at most ``p // t``; ``k_c = p - t * share`` absorbs the rounding remainder of either sign.
    """
    share = min(round((p - min(p, math.floor(p * common_space_fraction))) / t), p // t)
    return p - share * t, share


def iso_cts(base: Tensor, deltas: Tensor, cfg: IsoCtsConfig, ctx: MergeContext) -> Tensor:
    """Merged Iso-CTS task vector of one weight matrix (shape ``(m, n)``, deltas' dtype)."""
    check_matrix(deltas, ctx.name, "iso_cts")
    deltas = scale_experts(deltas, cfg.coefficients, ctx.name)
    _, m, n = deltas.shape
    p = min(m, n)
    x = deltas[squared_norms(deltas) > 0]
    if x.shape[0] == 0:
        return torch.zeros_like(deltas[0])
    k_c, per_task = iso_cts_split(p, x.shape[0], cfg.common_space_fraction)
    total = x.sum(dim=0)
    u, s, vh = cached(ctx, "thin_svd", total, lambda: thin_svd(total))  # reused across fractions and lambdas
    u_c, s_c, vh_c = u[:, :k_c], s[:k_c], vh[:k_c]
    if per_task > 0:

        def resid_svd() -> tuple[Tensor, Tensor, Tensor]:
            xs = x.to(u.dtype)
            return thin_svd(xs - u_c @ (u_c.T @ xs))

        ut, st, vht = cached(ctx, "iso_cts_residual_svd", x, resid_svd, k_c)  # reused across lambdas
        u_c = torch.cat([u_c, ut[:, :, :per_task].permute(1, 0, 2).reshape(m, -1)], dim=1)
        s_c = torch.cat([s_c, st[:, :per_task].reshape(-1)])
        vh_c = torch.cat([vh_c, vht[:, :per_task, :].reshape(-1, n)], dim=0)
    return (s_c.mean() * (polar(u_c) @ polar(vh_c))).to(deltas.dtype)
