"""SWUDI and SWUDI-A: closed-form spectral successors of WUDI/OptMerge (arXiv 2606.07289; the authors' code calls
SWUDI-A "ASWUDI"). Granularity: per layer (2-D weights only).

Both solve WUDI's data-free loss ``L(x) = sum_i w_i ||(x - tau_i) tau_i^T||_F^2`` with ``w_i = c_i / ||tau_i||_F^2``
in closed form instead of by gradient steps. With ``C = sum_i w_i tau_i^T tau_i`` (n x n) and
``D = sum_i w_i tau_i tau_i^T tau_i`` (m x n) the gradient is ``2 (x C - D)``, so the gradient flow from ``x0`` is
``x(t) = x* + (x0 - x*) exp(-C t)`` with ``x* = D C^-1``. In the eigenbasis ``C = V diag(e) V^T`` (``e`` clamped
below at ``min_eigenvalue``) the merge is

    ``tau_m = x0 - (x0 V) diag(g) V^T + (D V) diag(g / e) V^T``

with a spectral filter ``g``: ``1 - exp(-e * exp_time)`` (``filter="exponential"``: the flow stopped at time
``exp_time``) or 1 (``filter="none"``: the minimiser on those directions), set to 0 outside the ``K`` largest
eigenvalues (there ``tau_m`` keeps ``x0``). ``x0`` is ``sum_i c_i tau_i`` (``init="sum"``), the ``c``-weighted mean
(``"mean"``) or 0 (``"zero"``: only the second term).

* SWUDI fixes ``K = floor(n * rank_ratio + 0.999)`` (``rank_ratio=None``: every direction).
* SWUDI-A picks ``K`` per layer from the spectrum by a rank rule (default ``participation_sqrt``:
  ``(sum_j sqrt(e_j))^2 / sum_j e_j``, rounded up), bounded by ``min_rank`` and ``max_rank_ratio * n`` and scaled
  by ``rank_scale``.

Defaults are the official runner's (``run_merge.py``): SWUDI ``exp_time=300``, ``rank_ratio=0.65``, exponential
filter, sum init; SWUDI-A ``participation_sqrt``, no filter, sum init; ``lam=1`` for both. Per-expert coefficients
``c_i >= 0`` weigh expert i in the loss and in the initialisation, as in OptMerge (all ones: the paper). If every
``||tau_i||^2 < 1e-12`` the mean task vector is returned. Float32 (float64 for float64 input), as the reference;
deterministic; the inputs are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mergelab.methods._linalg import (
    ZERO_NORM2,
    check_choice,
    check_coefficients,
    check_matrix,
    check_positive_int,
    check_range,
    check_real,
    coefficients_or_none,
    squared_norms,
    svd_dtype,
)
from mergelab.methods.base import MergeContext, cached
from mergelab.methods.task_arithmetic import combine

RANK_RULES = ("participation_sqrt", "participation", "entropy", "stable_rank", "gavish_donoho", "none")


def _check_common(cfg: SwudiConfig | SwudiAConfig) -> None:
    """Validate the fields SWUDI and SWUDI-A share; one-line ValueErrors naming the field."""
    name = type(cfg).__name__
    object.__setattr__(cfg, "lam", check_real(name, "lam", cfg.lam))
    object.__setattr__(cfg, "exp_time", check_range(name, "exp_time", cfg.exp_time, 0.0, 1e12, lo_open=True))
    check_choice(name, "filter", cfg.filter, ("exponential", "none"))
    check_choice(name, "init", cfg.init, ("sum", "mean", "zero"))
    object.__setattr__(
        cfg, "min_eigenvalue", check_range(name, "min_eigenvalue", cfg.min_eigenvalue, 0.0, 1.0, lo_open=True)
    )
    object.__setattr__(cfg, "coefficients", check_coefficients(name, cfg.coefficients, weights=True))


@dataclass(frozen=True, kw_only=True)
class SwudiConfig:
    """SWUDI hyperparameters (official defaults).

    Attributes:
        lam: scale of the merged task vector (``scaling_coefficient``, 1.0).
        exp_time: flow time ``t`` of the exponential filter (300).
        rank_ratio: kept fraction of the n eigendirections, in (0, 1] (0.65; 0.85 is the authors' Llama setting);
            None keeps every direction.
        filter: ``"exponential"`` (default) or ``"none"``.
        init: ``"sum"`` (default), ``"mean"`` or ``"zero"``.
        min_eigenvalue: lower clamp of the eigenvalues of ``C`` (1e-8).
        coefficients: per-expert weights ``c_i >= 0`` in the loss and the initialisation, or None (all ones).
    """

    lam: float = 1.0
    exp_time: float = 300.0
    rank_ratio: float | None = 0.65
    filter: str = "exponential"
    init: str = "sum"
    min_eigenvalue: float = 1e-8
    coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_common(self)
        if self.rank_ratio is not None:
            object.__setattr__(
                self,
                "rank_ratio",
                check_range(type(self).__name__, "rank_ratio", self.rank_ratio, 0.0, 1.0, lo_open=True),
            )


@dataclass(frozen=True, kw_only=True)
class SwudiAConfig:
    """SWUDI-A hyperparameters (official defaults).

    Attributes:
        lam: scale of the merged task vector (1.0).
        rank_rule: how ``K`` is read off the descending spectrum ``e`` of ``C``: ``"participation_sqrt"``
            (default), ``"participation"`` (``(sum e)^2 / sum e^2``), ``"entropy"`` (exp of the entropy of
            ``e / sum e``), ``"stable_rank"`` (``sum e^2 / e_1^2``), ``"gavish_donoho"`` (singular values
            ``sqrt(e)`` above the authors' optimal hard threshold; their choice for full fine-tunes), ``"none"``
            (every direction), or ``"cumvar_<f>"`` (smallest K whose share of ``sum e`` reaches ``f``).
        min_rank: lower bound on K (1).
        max_rank_ratio: upper bound on K as a fraction of n (1.0).
        rank_scale: multiplies the chosen K (1.0).
        filter: ``"none"`` (default) or ``"exponential"``.
        exp_time: flow time of the exponential filter (300, the runner's value; unused with ``filter="none"``).
        init: ``"sum"`` (default), ``"mean"`` or ``"zero"``.
        min_eigenvalue: lower clamp of the eigenvalues of ``C`` (1e-8).
        coefficients: per-expert weights ``c_i >= 0`` in the loss and the initialisation, or None (all ones).
    """

    lam: float = 1.0
    rank_rule: str = "participation_sqrt"
    min_rank: int = 1
    max_rank_ratio: float = 1.0
    rank_scale: float = 1.0
    filter: str = "none"
    exp_time: float = 300.0
    init: str = "sum"
    min_eigenvalue: float = 1e-8
    coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_common(self)
        if not (self.rank_rule in RANK_RULES or _cumvar_fraction(self.rank_rule) is not None):
            raise ValueError(
                f"{name}.rank_rule must be one of {list(RANK_RULES)} or 'cumvar_<f>', got {self.rank_rule!r}"
            )
        check_positive_int(name, "min_rank", self.min_rank)
        ratio = check_range(name, "max_rank_ratio", self.max_rank_ratio, 0.0, 1.0, lo_open=True)
        object.__setattr__(self, "max_rank_ratio", ratio)
        object.__setattr__(
            self, "rank_scale", check_range(name, "rank_scale", self.rank_scale, 0.0, 1e6, lo_open=True)
        )


def _cumvar_fraction(rule: object) -> float | None:
    """``f`` of a ``"cumvar_<f>"`` rule with ``0 < f <= 1``, else None."""
    if not isinstance(rule, str) or not rule.startswith("cumvar_"):
        return None
    try:
        f = float(rule.removeprefix("cumvar_"))
    except ValueError:
        return None
    return f if 0.0 < f <= 1.0 else None


def swudi_rank(e_desc: Tensor, m: int, n: int, rule: str) -> int:
    """The raw rank of SWUDI-A's ``rule`` for the descending, clamped spectrum ``e_desc`` of ``C`` (n values)."""
    tiny = 1e-30
    if rule == "none":
        return n
    if rule == "stable_rank":
        return math.ceil(float(e_desc.square().sum() / e_desc[0].square().clamp(min=tiny)))
    if rule == "entropy":
        p = (e_desc / e_desc.sum().clamp(min=tiny)).clamp(min=tiny)
        return math.ceil(float(torch.exp(-(p * p.log()).sum())))
    if rule in ("participation", "participation_sqrt"):
        y = e_desc.sqrt() if rule == "participation_sqrt" else e_desc
        return math.ceil(float(y.sum().square() / y.square().sum().clamp(min=tiny)))
    if rule == "gavish_donoho":
        beta = min(m, n) / max(m, n)
        y = e_desc.sqrt()
        mu = (
            math.sqrt(max((1.0 - beta) ** 2 + beta, 1e-3))
            if beta < 0.9999
            else math.sqrt(2.0 + math.sqrt(3.0))
        )
        lam_star = math.sqrt(
            2.0 * (beta + 1.0) + 8.0 * beta / (beta + 1.0 + math.sqrt(beta**2 + 14.0 * beta + 1.0))
        )
        threshold = lam_star / max(mu, 1e-3) * float(y.median().clamp(min=tiny))
        return max(int((y > threshold).sum()), 1)
    frac = _cumvar_fraction(rule)
    assert frac is not None, rule
    cum = e_desc.cumsum(0) / e_desc.sum().clamp(min=tiny)
    return int((cum < frac).sum()) + 1


def wudi_moments(deltas: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``(C, D) = (sum_i w_i tau_i^T tau_i, sum_i w_i tau_i tau_i^T tau_i)`` expert by expert (no N x n x n stack);
    each ``tau_i tau_i^T tau_i`` through the smaller Gram matrix."""
    _, m, n = deltas.shape
    c = torch.zeros(n, n, dtype=deltas.dtype, device=deltas.device)
    d = torch.zeros(m, n, dtype=deltas.dtype, device=deltas.device)
    for tau, w in zip(deltas, weights.tolist(), strict=True):
        if w == 0.0:
            continue
        gram = tau.T @ tau
        c.add_(gram, alpha=w)
        d.add_((tau @ tau.T) @ tau if m < n else tau @ gram, alpha=w)
    return c, d


def spectral_merge(
    deltas: Tensor,
    cfg: SwudiConfig | SwudiAConfig,
    ctx: MergeContext,
    pick_rank: Callable[[Tensor, int, int], int],
) -> Tensor:
    """The closed form shared by SWUDI and SWUDI-A; ``pick_rank(e_desc, m, n)`` returns K.

    The moments and the eigendecomposition of ``C`` depend on the task vectors and the coefficients alone: with a
    ``ctx.cache`` trials that change only the filter, the rank rule, ``init`` or ``lam`` reuse them.
    """
    _, m, n = deltas.shape
    coef = coefficients_or_none(cfg.coefficients, deltas, ctx.name)
    x = deltas.to(svd_dtype(deltas.dtype))
    norms2 = squared_norms(x)
    if float(norms2.max()) < ZERO_NORM2:
        return deltas.mean(dim=0)
    weights = 1.0 / norms2.clamp(min=ZERO_NORM2)
    if coef is not None:
        weights = weights * coef.to(weights.device)

    def moments_eigh() -> tuple[Tensor, Tensor, Tensor]:
        c, d = wudi_moments(x, weights)
        return (d, *torch.linalg.eigh(c))  # eigenvalues ascending

    coef_key = None if coef is None else tuple(coef.tolist())
    d, e, v = cached(ctx, "wudi_moments_eigh", deltas, moments_eigh, coef_key)
    e = e.clamp(min=cfg.min_eigenvalue)
    g = 1.0 - torch.exp(-e * float(cfg.exp_time)) if cfg.filter == "exponential" else torch.ones_like(e)
    k = pick_rank(e.flip(0), m, n)
    if k < n:
        g[: n - k] = 0.0
    out = ((d @ v) * (g / e)) @ v.T
    if cfg.init != "zero":
        x0 = combine(x, coef, mean=cfg.init == "mean")
        out = out + x0 - ((x0 @ v) * g) @ v.T
    return out.to(deltas.dtype)


def swudi(base: Tensor, deltas: Tensor, cfg: SwudiConfig, ctx: MergeContext) -> Tensor:
    """Merged SWUDI task vector of one weight matrix (shape ``(m, n)``, deltas' dtype).

    Raises:
        ValueError: when ``deltas`` is not a stack of matrices, or coefficients of the wrong length.
    """
    check_matrix(deltas, ctx.name, "swudi")
    ratio = cfg.rank_ratio

    def fixed_rank(e_desc: Tensor, m: int, n: int) -> int:
        return n if ratio is None else max(1, int((n * ratio + 0.999) // 1))

    return spectral_merge(deltas, cfg, ctx, fixed_rank)


def swudi_a(base: Tensor, deltas: Tensor, cfg: SwudiAConfig, ctx: MergeContext) -> Tensor:
    """Merged SWUDI-A task vector of one weight matrix (shape ``(m, n)``, deltas' dtype).

    Raises:
        ValueError: when ``deltas`` is not a stack of matrices, or coefficients of the wrong length.
    """
    check_matrix(deltas, ctx.name, "swudi_a")

    def adaptive_rank(e_desc: Tensor, m: int, n: int) -> int:
        k = swudi_rank(e_desc, m, n, cfg.rank_rule)
        k = max(cfg.min_rank, min(k, max(cfg.min_rank, round(cfg.max_rank_ratio * n))))
        if abs(cfg.rank_scale - 1.0) > 1e-8:
            k = max(cfg.min_rank, min(n, round(k * cfg.rank_scale)))
        return min(k, n)  # a min_rank above n keeps every direction

    return spectral_merge(deltas, cfg, ctx, adaptive_rank)


__all__ = ["SwudiAConfig", "SwudiConfig", "swudi", "swudi_a", "swudi_rank"]
