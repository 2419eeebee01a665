"""OptMerge (Wei et al., ICLR 2026, arXiv:2505.19892). Granularity: per layer (2-D weights only).

Per weight matrix, minimise ``L(tau_m) = sum_i w_i ||(tau_m - t_i) P_i||_F^2`` (paper Sec. 4, Eq. 2-3) with
``w_i = c_i/||tau_i||_F^2``, ``P_i = V_{i,1:k} S_{i,1:k}`` (uncentred SVD, as in the code), ``k = min(m,n)//N``
(or ``floor(min(m,n) * rank_ratio)``), and the target ``t_i``:

* ``variant="full"`` (InternVL script, the author's fusion_bench port): ``TruncSVD_k(tau_i - mean) + mean``;
  Adam lr 1e-5, sum init, lambda 0.1.
* ``variant="lora"`` (Qwen2-VL script): ``TruncSVD_k(tau_i)``; SGD lr 1e-4 momentum 0.9, mean init, lambda 1.0.

Every default is overridable. The loss is evaluated in its m x k form ``||x F - H||_F^2`` (never the code's m x m
products) from batched thin SVDs (``svd="lapack"``) or, the default on CPU, float64 eigendecompositions of each
smaller Gram matrix (``svd="gram"``: same subspaces, about 4x faster than LAPACK's SVD at 896 x 4864; from order
2048 a float32 eigendecomposition whose top-k block is refined in float64, about 3x cheaper again). Its
gradient ``2 (x A - B)`` uses precomputed ``A``/``B`` or their factors, whichever is cheaper. SGD with momentum is
a linear recurrence, so ``solver="auto"`` computes its result exactly from one small eigendecomposition
(:func:`~mergelab.methods._linalg.solve_sgd_exact`); Adam (and ``solver="iterative"``) runs the ``torch.optim``
loop. The returned value is the ``steps``-th iterate, not the closed-form minimiser. Experts with
``||tau_i||^2 < 1e-12`` are left out of the loss; if all are, the mean task vector is returned. Dtype: spectra in
float32 (float64 on the Gram route or for float64 input); the loop in ``compute_dtype`` (default: the deltas'
dtype; the Qwen script ran it in float16). Deterministic given the inputs, which are never modified.

Per-expert coefficients ``c_i >= 0`` weigh expert i in the loss (``w_i = c_i / ||tau_i||_F^2``) and in the
initialisation (``init="sum"``: ``sum_i c_i tau_i``; ``"mean"``: ``sum_i c_i tau_i / sum_i c_i``); ``c_i = 0``
leaves the expert out of both. The centring mean of the full variant's target stays the plain mean. With every
``c_i = 1`` (or None) this is exactly the paper (bit for bit).

Beyond the paper, ``init`` may name another registered per-matrix method (:func:`init_methods`: TSV, Iso-C, WUDI,
...): the optimiser then starts from that method's merged task vector (its defaults, the same coefficients). With
few steps at a small learning rate OptMerge returns that merge, so a campaign that enqueues ``{"init": "tsv",
"lam": <TSV's lambda>, "lr": 1e-6, "steps": 50}`` starts from the best default method's merge and searches around
it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mergelab.methods._linalg import (
    check_choice,
    check_coefficients,
    check_matrix,
    check_positive_int,
    check_range,
    check_real,
    coefficients_or_none,
    quadratic_factors,
    rank_k,
    resolve_dtype,
    solve_iterative,
    solve_sgd_exact,
)
from mergelab.methods.base import MergeContext
from mergelab.methods.task_arithmetic import combine

_VARIANT_DEFAULTS = {
    "full": {"lam": 0.1, "lr": 1e-5, "optimizer": "adam", "init": "sum"},
    "lora": {"lam": 1.0, "lr": 1e-4, "optimizer": "sgd", "init": "mean"},
}


def validate_solver_fields(cfg: Any, inits: tuple[str, ...] = ("sum", "mean")) -> None:
    """Validate (and normalise) the optimiser fields shared by OptMerge and WUDI; one-line ValueErrors."""
    name = type(cfg).__name__
    object.__setattr__(cfg, "lam", check_real(name, "lam", cfg.lam))
    check_positive_int(name, "steps", cfg.steps)
    object.__setattr__(cfg, "lr", check_range(name, "lr", cfg.lr, 0.0, 1e3, lo_open=True))
    check_choice(name, "optimizer", cfg.optimizer, ("adam", "sgd"))
    object.__setattr__(cfg, "momentum", check_range(name, "momentum", cfg.momentum, 0.0, 1.0, hi_open=True))
    check_choice(name, "init", cfg.init, inits)
    check_choice(name, "solver", cfg.solver, ("auto", "exact", "iterative"))
    if cfg.solver == "exact" and cfg.optimizer != "sgd":
        raise ValueError(f"{name}.solver='exact' needs optimizer='sgd', got optimizer={cfg.optimizer!r}")
    resolve_dtype(name, "compute_dtype", cfg.compute_dtype)
    check_choice(name, "svd", cfg.svd, ("auto", "lapack", "gram"))
    object.__setattr__(cfg, "coefficients", check_coefficients(name, cfg.coefficients, weights=True))


def svd_method(cfg: Any, deltas: Tensor) -> str:
    """``cfg.svd`` with ``"auto"`` resolved: the Gram path on CPU (measured ~4x faster), LAPACK/cuSOLVER elsewhere."""
    if cfg.svd != "auto":
        return str(cfg.svd)
    return "gram" if deltas.device.type == "cpu" else "lapack"


@dataclass(frozen=True, kw_only=True)
class OptMergeConfig:
    """OptMerge hyperparameters; ``None`` fields take the variant's official default in ``__post_init__``.

    Attributes:
        variant: ``"full"`` (full fine-tuning) or ``"lora"`` (LoRA fine-tuning).
        lam: scale of the merged task vector (default 0.1 full / 1.0 lora).
        rank_ratio: k as a fraction of min(m, n) in (0, 1]; None = 1/N (``min(m,n)//N``, the code's choice).
        steps: optimiser iterations (300).
        lr: learning rate (1e-5 full / 1e-4 lora).
        optimizer: ``"adam"`` (default betas/eps) or ``"sgd"`` (default adam full / sgd lora).
        momentum: SGD momentum (0.9, as in the code; unused by Adam).
        init: ``"sum"`` or ``"mean"`` of the task vectors (default sum full / mean lora), or the name of a
            registered per-matrix method (:func:`init_methods`, e.g. ``"tsv"``): its merged task vector of the
            matrix, with its defaults and these coefficients (an extension beyond the paper).
        projector: ``"uncentred"`` (code, both variants) or ``"centred"`` (paper Eq. 3).
        compute_dtype: dtype of the optimisation loop (``"float32"``, ``"float64"``, ``"float16"``,
            ``"bfloat16"``) or None for the deltas' dtype.
        solver: ``"auto"`` (exact path for SGD, loop for Adam), ``"exact"`` (SGD only) or ``"iterative"``.
        svd: how the per-expert top-k spectra are computed: ``"lapack"`` (``torch.linalg.svd``, thin),
            ``"gram"`` (float64 eigendecomposition of the smaller Gram matrix; from order 2048 a float32 one
            whose top-k block is refined in float64) or ``"auto"`` (gram on CPU).
        coefficients: per-expert weights ``c_i >= 0`` in the loss and the initialisation, or None (all ones).
    """

    variant: str = "full"
    lam: float | None = None
    rank_ratio: float | None = None
    steps: int = 300
    lr: float | None = None
    optimizer: str | None = None
    momentum: float = 0.9
    init: str | None = None
    projector: str = "uncentred"
    compute_dtype: str | None = None
    solver: str = "auto"
    svd: str = "auto"
    coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        defaults = _VARIANT_DEFAULTS[check_choice(name, "variant", self.variant, sorted(_VARIANT_DEFAULTS))]
        for field, value in defaults.items():
            if getattr(self, field) is None:
                object.__setattr__(self, field, value)
        if self.rank_ratio is not None:
            object.__setattr__(
                self, "rank_ratio", check_range(name, "rank_ratio", self.rank_ratio, 0.0, 1.0, lo_open=True)
            )
        check_choice(name, "projector", self.projector, ("uncentred", "centred"))
        validate_solver_fields(self, ("sum", "mean", *init_methods()))


def init_methods() -> tuple[str, ...]:
    """The registered methods an OptMerge run may start from (``init=<name>``): those merging a matrix on its own
    (no global statistics), OptMerge itself excluded."""
    from mergelab.methods import METHODS  # the table imports this module

    return tuple(n for n, spec in METHODS.items() if spec.make_stats is None and n != "optmerge")


def method_init(base: Tensor, deltas: Tensor, cfg: OptMergeConfig, ctx: MergeContext) -> Tensor:
    """The task vector of method ``cfg.init`` (its defaults, OptMerge's coefficients) as OptMerge's starting point.

    Its lambda is not applied (the engine applies OptMerge's), and it never overwrites ``deltas``."""
    from mergelab.methods import METHODS

    spec = METHODS[cfg.init]
    init_cfg = spec.make_config({} if cfg.coefficients is None else {"coefficients": cfg.coefficients})
    return spec.fn(base, deltas, init_cfg, dataclasses.replace(ctx, inplace=False))


def minimise(
    deltas: Tensor, factors: tuple[Tensor, Tensor] | None, cfg: Any, coef: Tensor | None = None,
    x0: Tensor | None = None,
) -> Tensor:
    """Run the configured optimiser on ``||x F - H||^2`` from ``x0`` (default: the ``coef``-weighted sum/mean
    init); shared with WUDI.

    Returns:
        The final iterate in the deltas' dtype (the mean task vector when ``factors`` is None).
    """
    if factors is None:
        return deltas.mean(dim=0)
    loop_dtype = resolve_dtype(type(cfg).__name__, "compute_dtype", cfg.compute_dtype) or deltas.dtype
    exact = cfg.optimizer == "sgd" and (
        cfg.solver == "exact" or (cfg.solver == "auto" and loop_dtype in (torch.float32, torch.float64))
    )
    if exact and loop_dtype not in (torch.float32, torch.float64):
        loop_dtype = torch.float32
    f, h = (t.to(loop_dtype) for t in factors)
    x0 = (combine(deltas, coef, mean=cfg.init == "mean") if x0 is None else x0).to(loop_dtype)
    if exact:
        x = solve_sgd_exact(x0, f, h, lr=cfg.lr, steps=cfg.steps, momentum=cfg.momentum)
    else:
        x = solve_iterative(
            x0, f, h, optimizer=cfg.optimizer, lr=cfg.lr, steps=cfg.steps, momentum=cfg.momentum
        )
    return x.to(deltas.dtype)


def optmerge_factors(
    deltas: Tensor, cfg: OptMergeConfig, coef: Tensor | None = None, ctx: MergeContext | None = None
) -> tuple[Tensor, Tensor] | None:
    """The factored loss ``(F, H)`` of one weight matrix (see :func:`~mergelab.methods._linalg.quadratic_factors`).

    With a ``ctx.cache`` the per-expert spectra are reused across trials that change only ``rank_ratio``, the
    coefficients, ``steps``, ``lr``, ``init`` or ``lam``.
    """
    n_exp, m, n = deltas.shape
    k = rank_k(min(m, n), n_exp, cfg.rank_ratio)
    return quadratic_factors(
        deltas,
        k,
        centred_target=cfg.variant == "full",
        centred_projector=cfg.projector == "centred",
        dtype=torch.float64 if deltas.dtype == torch.float64 else torch.float32,
        svd=svd_method(cfg, deltas),
        coefficients=coef,
        ctx=ctx,
    )


def optmerge(base: Tensor, deltas: Tensor, cfg: OptMergeConfig, ctx: MergeContext) -> Tensor:
    """Merged OptMerge task vector of one weight matrix.

    Args:
        base: base matrix (unused).
        deltas: ``(N, m, n)`` task vectors.
        cfg: :class:`OptMergeConfig`.
        ctx: merge context (the name is used in errors).

    Returns:
        ``tau_m`` after ``cfg.steps`` iterations, shape ``(m, n)``, in the deltas' dtype.

    Raises:
        ValueError: when ``deltas`` is not a stack of matrices.
    """
    check_matrix(deltas, ctx.name, "optmerge")
    coef = coefficients_or_none(cfg.coefficients, deltas, ctx.name)
    x0 = None if cfg.init in ("sum", "mean") else method_init(base, deltas, cfg, ctx)
    return minimise(deltas, optmerge_factors(deltas, cfg, coef, ctx), cfg, coef, x0)
