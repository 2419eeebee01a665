"""TSV-Merge (Gargiulo et al., CVPR 2025, arXiv:2412.00081). Granularity: per layer (2-D weights only).

Per task, keep the top ``r = min(m,n)//N`` singular triplets of ``tau_i`` (thin SVD); concatenate
``U_hat = [U_1,r ... U_N,r]``, ``s_hat`` and ``V_hat``; replace ``U_hat`` and ``V_hat`` by their orthogonal polar
factors (nearest orthonormal matrices, ``P Q^T`` from their SVDs) and return ``U_perp diag(s_hat) V_perp``.
This is the correct algorithm: the official MLLM scripts' ``lm_head`` gate makes their TSV the plain mean of the
task vectors. Singular triplets with a numerically zero singular value (``s <= s_max * max(m,n) * eps``, e.g.
beyond the rank of a LoRA task vector or of an all-zero expert) are left out: they carry no weight, but their
arbitrary, LAPACK-dependent singular vectors would otherwise take part in the orthogonalisation. The reference
code keeps them, which makes its result ill-defined on exactly low-rank task vectors (LoRA: ``rank(tau_i) <= r``
whenever ``r`` exceeds the adapter rank); ours equals TSV truncated at each task's true rank.

Per-expert coefficients ``c_i`` scale task vector i (``tau_i -> c_i tau_i``, so its singular values) before the
selection and orthogonalisation; ``c_i = 0`` removes the task's directions, all ones is the paper. SVDs in float32
(float64 for float64 input); deterministic; the inputs are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mergelab.methods._linalg import (
    check_coefficients,
    check_matrix,
    check_range,
    check_real,
    polar,
    rank_k,
    scale_experts,
    thin_svd,
)
from mergelab.methods.base import MergeContext, cached


@dataclass(frozen=True, kw_only=True)
class TsvConfig:
    """TSV hyperparameters.

    Attributes:
        lam: scale of the merged task vector.
        rank_ratio: per-task kept rank as a fraction of min(m, n) in (0, 1]; None = 1/N (the paper's choice).
        coefficients: per-expert scales ``c_i`` of the task vectors (N floats), or None for all ones.
    """

    lam: float = 1.0
    rank_ratio: float | None = None
    coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "lam", check_real(name, "lam", self.lam))
        if self.rank_ratio is not None:
            object.__setattr__(
                self, "rank_ratio", check_range(name, "rank_ratio", self.rank_ratio, 0.0, 1.0, lo_open=True)
            )
        object.__setattr__(self, "coefficients", check_coefficients(name, self.coefficients))


def tsv(base: Tensor, deltas: Tensor, cfg: TsvConfig, ctx: MergeContext) -> Tensor:
    """Merged TSV task vector of one weight matrix.

    Args:
        base: base matrix (unused).
        deltas: ``(N, m, n)`` task vectors.
        cfg: :class:`TsvConfig`.
        ctx: merge context (the name is used in errors).

    Returns:
        ``U_perp diag(s_hat) V_perp``, shape ``(m, n)``, in the deltas' dtype.
    """
    check_matrix(deltas, ctx.name, "tsv")
    deltas = scale_experts(deltas, cfg.coefficients, ctx.name)
    n_exp, m, n = deltas.shape
    r = rank_k(min(m, n), n_exp, cfg.rank_ratio)
    u, s, vh = cached(ctx, "thin_svd", deltas, lambda: thin_svd(deltas))  # reused across ranks and lambdas
    u_hat = u[:, :, :r].permute(1, 0, 2).reshape(m, -1)
    s_hat = s[:, :r].reshape(-1)
    v_hat = vh[:, :r, :].reshape(-1, n)
    keep = s_hat > s_hat.max() * max(m, n) * torch.finfo(s_hat.dtype).eps
    if not bool(keep.any()):
        return torch.zeros_like(deltas[0])
    u_hat, s_hat, v_hat = u_hat[:, keep], s_hat[keep], v_hat[keep]
    return ((polar(u_hat) * s_hat) @ polar(v_hat)).to(deltas.dtype)
