"""Shared linear algebra and config validation for the merging methods.

Everything here is pure: tensors in, tensors out, no device moves, no global state. SVDs run in float32 (or float64
when asked) whatever the input dtype, because LAPACK/cuSOLVER have no half-precision SVD.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mergelab.methods.base import MergeContext, cached, tensor_digest

#: Squared Frobenius norms below this count as "no task vector" (the guard of the author's fusion_bench port of
#: OptMerge: return the mean when ``max ||tau_i||^2 < 1e-12``).
ZERO_NORM2 = 1e-12

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


# ---------------------------------------------------------------------------------------------------------------
# validation: one-line ValueErrors naming the field and the bad value
# ---------------------------------------------------------------------------------------------------------------
def check_real(cls: str, field: str, value: object) -> float:
    """Return ``value`` as a float, or raise naming ``cls.field`` when it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{cls}.{field} must be a finite number, got {value!r}")
    return float(value)


def check_range(
    cls: str, field: str, value: object, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> float:
    """Check ``lo <= value <= hi`` (open ends when asked) and return it as a float."""
    v = check_real(cls, field, value)
    if (v < lo or (lo_open and v == lo)) or (v > hi or (hi_open and v == hi)):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{cls}.{field} must be in {interval}, got {value!r}")
    return v


def check_positive_int(cls: str, field: str, value: object) -> int:
    """Check that ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cls}.{field} must be an integer >= 1, got {value!r}")
    return value


def check_choice(cls: str, field: str, value: object, choices: Sequence[str]) -> str:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{cls}.{field} must be one of {list(choices)}, got {value!r}")
    return str(value)


def check_coefficients(cls: str, value: object, *, weights: bool = False) -> tuple[float, ...] | None:
    """Validate per-expert coefficients: None or a non-empty sequence of finite floats.

    Args:
        cls: config class name (for the message).
        value: the field's value.
        weights: the coefficients weigh a mean or a loss (weight average, TIES, WUDI, OptMerge, SWUDI): each must
            be >= 0 and their sum > 0.
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"{cls}.coefficients must be None or a non-empty sequence of numbers, got {value!r}")
    coefs = tuple(check_real(cls, f"coefficients[{i}]", c) for i, c in enumerate(value))
    if weights and (min(coefs) < 0.0 or sum(coefs) <= 0.0):
        raise ValueError(
            f"{cls}.coefficients are weights: each must be >= 0 with a positive sum, got {value!r}"
        )
    return coefs


def coefficient_vector(coefficients: tuple[float, ...] | None, deltas: Tensor, name: str) -> Tensor:
    """Per-expert coefficients as a ``(N, 1, ..., 1)`` tensor broadcastable against ``deltas``.

    Raises:
        ValueError: when the number of coefficients differs from the number of experts.
    """
    n = deltas.shape[0]
    if coefficients is None:
        c = torch.ones(n, dtype=deltas.dtype, device=deltas.device)
    else:
        if len(coefficients) != n:
            raise ValueError(
                f"coefficients has {len(coefficients)} entries but tensor {name or '?'} has {n} experts"
            )
        c = torch.tensor(coefficients, dtype=deltas.dtype, device=deltas.device)
    return c.reshape((n,) + (1,) * (deltas.dim() - 1))


def coefficients_or_none(coefficients: tuple[float, ...] | None, deltas: Tensor, name: str) -> Tensor | None:
    """The per-expert coefficients as a float64 ``(N,)`` tensor, or None when they are absent or all exactly 1.

    None selects each method's unweighted code path, so all-ones coefficients give bit-identical merges to no
    coefficients at all.

    Raises:
        ValueError: when the number of coefficients differs from the number of experts.
    """
    if coefficients is None:
        return None
    c = coefficient_vector(coefficients, deltas, name).reshape(-1)
    if all(v == 1.0 for v in coefficients):
        return None
    return c.to(torch.float64)


def scale_experts(deltas: Tensor, coefficients: tuple[float, ...] | None, name: str) -> Tensor:
    """``c_i tau_i`` for every expert: ``deltas`` itself when the coefficients are absent or all ones, else a new stack.

    Raises:
        ValueError: when the number of coefficients differs from the number of experts.
    """
    coef = coefficients_or_none(coefficients, deltas, name)
    if coef is None:
        return deltas
    return deltas * coef.to(deltas.dtype).reshape((-1,) + (1,) * (deltas.dim() - 1))


def resolve_dtype(cls: str, field: str, value: str | None) -> torch.dtype | None:
    """Map a dtype name (``"float32"``...) to a torch dtype; None stays None (use the context's)."""
    if value is None:
        return None
    return _DTYPES[check_choice(cls, field, value, sorted(_DTYPES))]


def check_matrix(deltas: Tensor, name: str, method: str) -> None:
    """Raise unless ``deltas`` is a stack ``(N, m, n)`` of matrices."""
    if deltas.dim() != 3 or deltas.shape[0] < 1:
        raise ValueError(
            f"{method} needs 2-D weights: tensor {name or '?'} has task-vector stack {tuple(deltas.shape)}"
        )


# ---------------------------------------------------------------------------------------------------------------
# linear algebra
# ---------------------------------------------------------------------------------------------------------------
def svd_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an SVD runs in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def thin_svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD ``x = U diag(S) Vh`` of a matrix or a batch of matrices, in float32/float64.

    Uses ``torch.linalg.svd(full_matrices=False)``: the official scripts' full SVD produces an m-by-m ``U`` that is
    never used; the thin one gives the same leading factors.
    """
    return torch.linalg.svd(x.to(svd_dtype(x.dtype)), full_matrices=False)


def polar(x: Tensor) -> Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``x = P diag(s) Q^T``: the nearest matrix with orthonormal columns/rows.

    This is the orthogonalisation step of TSV-Merge (Gargiulo et al., arXiv:2412.00081) and Iso-CTS.
    """
    p, _, qh = thin_svd(x)
    return p @ qh


def squared_norms(deltas: Tensor) -> Tensor:
    """Squared Frobenius norm of every expert's task vector, in float64 (exact enough for the zero guards)."""
    return deltas.reshape(deltas.shape[0], -1).to(torch.float64).pow(2).sum(dim=1)


def rank_k(min_dim: int, n_experts: int, rank_ratio: float | None) -> int:
    """OptMerge/TSV truncation rank: ``min(m,n) // N`` by default, else ``floor(min(m,n) * rank_ratio)``; >= 1."""
    if rank_ratio is None:
        return max(1, min_dim // n_experts)
    return max(1, min(min_dim, math.floor(min_dim * rank_ratio)))


# ---------------------------------------------------------------------------------------------------------------
# the quadratic loss of WUDI / OptMerge and its solvers
# ---------------------------------------------------------------------------------------------------------------
#: Gram matrices of at least this order are eigendecomposed in float32 and their top-k block refined in float64
#: (:func:`_refine_top`) when the input is not float64 and the refined block is smaller than the matrix: at
#: n = 3584 the float64 ``eigh`` costs about 3x the float32 one (20.6 s against 6.5 s, one core), five times per
#: layer. Smaller Gram matrices take the float64 ``eigh`` directly.
REFINE_MIN_N = 2048


def _refine_block(n: int, k: int) -> int:
    """Columns of the block :func:`_refine_top` refines for the top ``k`` of an order-``n`` Gram matrix."""
    return min(n, k + max(32, k // 4))


def refines(x: Tensor, k: int, svd: str) -> bool:
    """Whether the Gram route refines a float32 eigendecomposition for the top ``k`` of ``x`` ``(N, m, n)``."""
    n = min(x.shape[-2], x.shape[-1])
    return svd == "gram" and x.dtype != torch.float64 and n >= REFINE_MIN_N and _refine_block(n, k) < n


def _spectrum(x: Tensor, svd: str, refine: bool = False) -> tuple[Tensor, ...]:
    """The full per-expert decomposition :func:`_top_k` slices, independent of the rank (what a cache keeps).

    ``svd="lapack"``: the thin SVD ``(U, S, Vh)``; ``svd="gram"``: float64 ``eigh`` ``(eigenvalues, Q)`` of the
    smaller Gram matrix (``x x^T`` when ``m <= n``, else ``x^T x``). ``refine=True`` (see :func:`refines`): the
    float64 Gram matrix is kept beside a float32 ``eigh`` of it, ``(eigenvalues, Q, gram)``, and :func:`_top_k`
    refines the block it needs.
    """
    if svd == "lapack":
        return thin_svd(x)
    xd = x.to(torch.float64)
    gram = xd @ xd.transpose(1, 2) if x.shape[1] <= x.shape[2] else xd.transpose(1, 2) @ xd
    del xd
    if not refine:
        return torch.linalg.eigh(gram)
    ev, q = torch.linalg.eigh(gram.to(torch.float32))
    return ev, q, gram


def _refine_top(q: Tensor, gram: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` eigenpairs of float64 ``gram`` from an approximate (float32) eigenbasis ``q``, in float64.

    The top ``b`` columns of ``q`` (``b = k`` plus an oversampling of ``max(32, k/4)``) take one subspace iteration
    ``gram @ Q`` and a Rayleigh-Ritz step (the ``b x b`` projection eigendecomposed in float64). A float32 ``eigh``
    mixes each eigenvector only with those of nearby eigenvalues, so the oversampled block holds the top-k
    subspace up to float32 error over the gap ``lambda_k - lambda_{b+1}`` (not ``lambda_k - lambda_{k+1}``), and the
    iteration shrinks that by ``lambda_{b+1} / lambda_k``; within the block everything is float64. Cost: two
    ``n x n x b`` products, a QR and a ``b x b`` eigh per expert, against a full float64 ``eigh``.

    Returns:
        ``(eigenvalues, vectors)``, ascending like ``eigh``: ``(N, k)`` and ``(N, n, k)``.
    """
    b = _refine_block(gram.shape[-1], k)
    block, _ = torch.linalg.qr(gram @ q[..., -b:].to(torch.float64))
    proj = block.transpose(1, 2) @ (gram @ block)
    ev, w = torch.linalg.eigh(0.5 * (proj + proj.transpose(1, 2)))
    return ev[..., -k:], block @ w[..., -k:]


def _top_k(
    x: Tensor, k: int, svd: str, spectrum: tuple[Tensor, ...] | None = None
) -> tuple[Tensor, Tensor, bool]:
    """Top-k spectral data of a batch ``(N, m, n)``: ``(basis, P, left)``.

    ``P = V_k diag(s_k)`` (N, n, k); ``basis`` spans the top-k left singular space (``left=True``, N x m x k) or the
    right one (``left=False``, N x n x k), so the rank-k truncation is ``U_k U_k^T x`` or ``x V_k V_k^T``.
    ``svd="lapack"``: ``torch.linalg.svd(full_matrices=False)``. ``svd="gram"``: float64 ``eigh`` of the smaller Gram
    matrix (``x x^T`` or ``x^T x``): the same subspaces (singular values accurate to ~1e-8 of the largest, far
    beyond float32 data), several times faster than LAPACK's SVD on CPU, and no division by singular values.
    From order :data:`REFINE_MIN_N` on (float32/half input) the Gram matrix is eigendecomposed in float32 and the
    top-k block refined in float64 (:func:`_refine_top`).
    Only ``P P^T`` and products with the truncation are used downstream, so sign/rotation freedom is harmless.
    ``spectrum`` is :func:`_spectrum` ``(x, svd, refines(x, k, svd))`` when the caller already has it (a cache hit).
    """
    dec = _spectrum(x, svd, refines(x, k, svd)) if spectrum is None else spectrum
    if svd == "lapack":
        u, s, vh = dec
        return u[:, :, :k], vh[:, :k].transpose(1, 2) * s[:, None, :k], True
    if len(dec) == 3:  # refined in float64; the products that follow are plain ones, in the data's dtype
        ev, q = _refine_top(dec[1], dec[2], k)
        ev, q = ev.to(x.dtype), q.to(x.dtype)
    else:
        ev, q = dec[0][:, -k:], dec[1][:, :, -k:]
    if x.shape[1] <= x.shape[2]:
        return q, x.to(q.dtype).transpose(1, 2) @ q, True
    return q, q * ev[:, None, :].clamp(min=0).sqrt(), False


def _truncated_times(x: Tensor, basis: Tensor, left: bool, y: Tensor) -> Tensor:
    """``TruncSVD_k(x) @ y`` without forming the truncation: ``U_k (U_k^T (x y))`` or ``x (V_k (V_k^T y))``."""
    if left:
        return basis @ (basis.transpose(1, 2) @ (x @ y))
    return x @ (basis @ (basis.transpose(1, 2) @ y))


def quadratic_factors(
    deltas: Tensor,
    k: int,
    *,
    centred_target: bool,
    centred_projector: bool,
    dtype: torch.dtype,
    svd: str = "lapack",
    coefficients: Tensor | None = None,
    ctx: MergeContext | None = None,
) -> tuple[Tensor, Tensor] | None:
    """Factored form ``(F, H)`` of ``L(x) = sum_i w_i ||(x - t_i) P_i||_F^2 = ||x F - H||_F^2``.

    ``w_i = c_i/||tau_i||_F^2`` (untruncated norm; ``c_i = 1`` without coefficients, the paper's weight),
    ``P_i = V_{i,1:k} diag(s_{i,1:k})`` (n x k),
    ``t_i = TruncSVD_k(tau_i - mean) + mean`` (centred target, full-FT variant) or ``TruncSVD_k(tau_i)``.
    ``F = [sqrt(w_i) P_i]_i`` is n x (N'k) and ``H = [sqrt(w_i) t_i P_i]_i`` is m x (N'k), so the m x m products
    of the official code (``(x - t_i) P_pad^T``, zero outside its first k columns) are never formed. With
    ``k = min(m, n)`` and an uncentred target this is WUDI's Eq. 1 (``P_i P_i^T = tau_i^T tau_i``). Experts with
    ``||tau_i||^2 < 1e-12`` or ``c_i = 0`` are left out of the loss (never a ``1/0``).

    Args:
        deltas: ``(N, m, n)`` task vectors.
        k: truncation rank, ``1 <= k <= min(m, n)``.
        centred_target: take ``t_i`` from the SVD of ``tau_i - mean_j tau_j`` (plus the mean).
        centred_projector: take ``P_i`` from that centred SVD too (paper Eq. 3) instead of the uncentred one (code).
        dtype: dtype of the returned factors.
        svd: ``"lapack"`` (batched thin SVD) or ``"gram"`` (float64 Gram eigendecomposition), see :func:`_top_k`.
        coefficients: per-expert loss weights ``c_i >= 0`` (float64 ``(N,)``), or None for all ones.
        ctx: the merge context; with a ``ctx.cache`` the per-expert spectra (:func:`_spectrum` of the active task
            vectors, and of their centred form; independent of the rank) and the unweighted rank-k pieces
            ``P_i``, ``t_i P_i`` are looked up by content, so trials that change only the coefficients or the
            solver reuse both, and trials that change the rank reuse the spectra.

    Returns:
        ``(F, H)``, or None when every expert is (near) zero.
    """
    x = deltas.to(svd_dtype(deltas.dtype))
    norms2 = squared_norms(x)
    active = norms2 >= ZERO_NORM2  # experts with a task vector (a property of the content alone)
    live = active if coefficients is None else active & (coefficients.to(active.device) > 0)  # in the loss
    if not bool(live.any()):
        return None
    xa = x if bool(active.all()) else x[active]
    keep = None if bool(live.all()) or bool(live[active].all()) else live[active]  # the live rows of xa
    w_sqrt = norms2[live].rsqrt().reshape(-1, 1, 1)
    if coefficients is not None:
        w_sqrt = w_sqrt * coefficients.to(w_sqrt.device)[live].sqrt().reshape(-1, 1, 1)
    digest = tensor_digest(deltas) if ctx is not None and ctx.cache is not None else ""

    def top_k(xs: Tensor, centred: bool) -> tuple[Tensor, Tensor, bool]:
        # the full spectrum depends on the content, the centring and the solver alone (not on the rank)
        spectrum = None
        if ctx is not None:
            refine = refines(xs, k, svd)
            spectrum = cached(
                ctx, "quadratic_spectrum", digest, lambda: _spectrum(xs, svd, refine), svd, centred, refine
            )
        return _top_k(xs, k, svd, spectrum)

    def pieces() -> tuple[Tensor, Tensor]:
        # P_i and t_i P_i of every active expert, unweighted: the content and the rank decide them, the
        # coefficients only select and weigh them below
        if not (centred_target and centred_projector):
            basis, p, left = top_k(xa, False)
        if centred_target or centred_projector:
            mean = x.mean(dim=0)
            xc = xa - mean
            basis_c, p_c, left_c = top_k(xc, True)
            if centred_projector:
                p = p_c
        if centred_target:
            return p, _truncated_times(xc.to(p.dtype), basis_c, left_c, p) + mean.to(p.dtype) @ p
        return p, _truncated_times(xa.to(p.dtype), basis, left, p)

    if ctx is None:
        p, tp = pieces()  # tp: t_i P_i, (N', m, k)
    else:
        p, tp = cached(ctx, "quadratic_pieces", digest, pieces, svd, centred_target, centred_projector, k)
    if keep is not None:
        p, tp = p[keep], tp[keep]
    w_sqrt = w_sqrt.to(p.dtype)
    f = (p * w_sqrt).permute(1, 0, 2).reshape(x.shape[2], -1)
    h = (tp * w_sqrt).permute(1, 0, 2).reshape(x.shape[1], -1)
    return f.to(dtype), h.to(dtype)


def quadratic_loss(x: Tensor, f: Tensor, h: Tensor) -> Tensor:
    """``||x F - H||_F^2``: the m x k form of the (WUDI/OptMerge) loss (summed over experts)."""
    return (x @ f - h).square().sum()


def _gradient_fn(f: Tensor, h: Tensor) -> Callable[[Tensor], Tensor]:
    """``x -> 2 (x A - B)`` with ``A = F F^T``, ``B = H F^T``, in the cheaper of the dense and factored forms."""
    n, r = f.shape
    # factored: two m x n x r products per step; the factor 2 rides on F^T (exact: a power of two)
    if 2 * r < n:
        ft2 = 2.0 * f.T
        return lambda x: torch.addmm(h, x, f, beta=-1.0) @ ft2
    a, b = f @ f.T, h @ f.T  # dense: one m x n x n product per step
    return lambda x: torch.addmm(b, x, a, beta=-2.0, alpha=2.0)


def _fused_adam(x: Tensor) -> bool | None:
    """``fused=True`` where torch has a fused Adam for this tensor (CPU and CUDA floats), else the default."""
    return True if x.device.type in ("cpu", "cuda") and x.dtype in (torch.float32, torch.float64) else None


def solve_iterative(
    x0: Tensor, f: Tensor, h: Tensor, *, optimizer: str, lr: float, steps: int, momentum: float
) -> Tensor:
    """Run ``steps`` full-batch ``torch.optim`` steps (Adam with defaults, or SGD with momentum) on the loss.

    The gradient ``2 (x A - B)`` is exactly the autograd gradient of the official loss, so the optimiser
    sees the same sequence of gradients up to float-summation order. This is the reference path. Adam runs
    torch's fused kernel (one pass over the state per step instead of the single-tensor loop's several; same
    update rule, rounding order aside), where the device and dtype have one.
    """
    grad = _gradient_fn(f, h)
    x = x0.clone().requires_grad_(True)
    opt = (
        torch.optim.Adam([x], lr=lr, fused=_fused_adam(x))
        if optimizer == "adam"
        else torch.optim.SGD([x], lr=lr, momentum=momentum)
    )
    for _ in range(steps):
        with torch.no_grad():
            x.grad = grad(x)
        opt.step()
    return x.detach()


def heavy_ball_response(a: Tensor, *, lr: float, momentum: float, steps: int) -> Tensor:
    """Closed-form response ``phi(a)`` of ``steps`` heavy-ball SGD iterations on ``g(y) = 2 (a y + c)``.

    torch's SGD with momentum ``mu`` (no dampening) is ``v <- mu v + g``, ``y <- y - lr v`` with ``v_0 = 0``; for
    ``y_0 = 0`` the state ``(y, v, 1)`` evolves by a 3 x 3 matrix ``M(a)``, so ``y_T = (M^T)_{0,2} * c``.
    Computed in float64 by repeated squaring (``matrix_power``); ``a = 0`` is exact (no division by ``a``).
    """
    a = a.to(torch.float64)
    m = torch.zeros(a.shape + (3, 3), dtype=torch.float64, device=a.device)
    m[..., 0, 0] = 1.0 - 2.0 * lr * a
    m[..., 0, 1] = -lr * momentum
    m[..., 0, 2] = -2.0 * lr
    m[..., 1, 0] = 2.0 * a
    m[..., 1, 1] = momentum
    m[..., 1, 2] = 2.0
    m[..., 2, 2] = 1.0
    return torch.linalg.matrix_power(m, steps)[..., 0, 2]


def solve_sgd_exact(x0: Tensor, f: Tensor, h: Tensor, *, lr: float, steps: int, momentum: float) -> Tensor:
    """The exact result of ``steps`` SGD-with-momentum iterations, from one small symmetric eigendecomposition.

    With ``A = F F^T = Q diag(a) Q^T`` and ``x = x0 + y Q^T``, the gradient is ``2 (c + y diag(a)) Q^T`` with
    ``c = (x0 A - B) Q``, so every column of ``y`` follows its own scalar linear recurrence
    (:func:`heavy_ball_response`) and ``x_T = x0 + (x0 A - B) Q diag(phi(a)) Q^T``. The component of ``x`` outside
    ``span(A)`` keeps its initial value (the loss is flat there). When ``F`` has fewer columns R than rows n, the
    same result is
    ``x0 + (x0 F - H) W diag(phi) W^T F^T`` with ``F^T F = W diag(a) W^T`` (R x R): no n x n matrix, no division
    by singular values. Cost: one min(n, R)-sized ``eigh`` plus three m x n x R products, for any number of steps;
    for tall matrices (``2 m > R + n``) the eigenbasis is folded first into the R x n operator
    ``W diag(phi) W^T F^T`` (or ``F^T Q diag(phi) Q^T``): two m-row products instead of four.
    """
    n, r = f.shape
    resid = x0 @ f - h  # x0 F - H, m x R
    fold = 2 * x0.shape[0] > r + n  # tall: fold the eigenbasis into one R x n operator (two m-row products, not four)
    if r <= n:
        a, w = torch.linalg.eigh(f.T @ f)
        phi = heavy_ball_response(a.clamp(min=0), lr=lr, momentum=momentum, steps=steps).to(x0.dtype)
        if fold:
            return torch.addmm(x0, resid, ((w * phi) @ w.T) @ f.T)
        return x0 + (((resid @ w) * phi) @ w.T) @ f.T
    a, q = torch.linalg.eigh(f @ f.T)
    phi = heavy_ball_response(a.clamp(min=0), lr=lr, momentum=momentum, steps=steps).to(x0.dtype)
    if fold:
        return torch.addmm(x0, resid, (f.T @ (q * phi)) @ q.T)
    return x0 + (((resid @ f.T) @ q) * phi) @ q.T
