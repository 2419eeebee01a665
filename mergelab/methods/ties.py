"""TIES-Merging (Yadav et al. 2023, arXiv:2306.01708). Granularity: per tensor (default) or global.

Trim each task vector to its largest-magnitude ``density`` fraction, elect a sign per entry, average the entries
that agree with it (the paper's three steps). ``scope="tensor"`` trims per tensor as the official Qwen2-VL script does;
``scope="global"`` trims against one threshold per expert over all merged tensors, as the InternVL script does,
computed exactly in one or two streaming passes by :class:`~mergelab.methods._sparsify.GlobalMagnitudeThreshold`
(``make_stats``). With ``drop_rate > 0`` each task vector is DARE-sparsified first (``dare_ties``). Sign-election
ties fall back to the majority sign of the current tensor in both scopes.

Per-expert coefficients ``c_i >= 0`` weigh expert i's trimmed task vector in the sign election
(``sign(sum_i c_i tau_i)``) and in the disjoint mean (``sum c_i tau_i / sum c_i`` over the agreeing experts), as
mergekit's TIES does with ``normalize``; trimming is per expert and does not see them. All ones is the paper.

Buffers: the stacked task vectors are trimmed in place (no full-size copy) only when ``ctx.inplace`` says the caller
hands them over (the engine does); otherwise :func:`ties` works on a copy and leaves its inputs untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mergelab.methods._linalg import check_choice, check_coefficients, check_real, coefficients_or_none
from mergelab.methods._sparsify import (
    _HALF,
    GlobalMagnitudeThreshold,
    LowCounts,
    TiesCore,
    add_high_counts_,
    check_density,
    check_drop_rate,
    dare_drop,
    locate,
    low_bits,
    magnitude_threshold,
    rank_to_trim,
    sample_exact_in_bf16,
    sample_index,
    trim_and_merge_,
    trim_to_threshold,
    weighted_disjoint_merge,
)
from mergelab.methods.base import MergeContext


@dataclass(frozen=True, kw_only=True)
class TiesConfig:
    """TIES hyperparameters.

    Attributes:
        lam: scale of the merged task vector.
        density: fraction of entries KEPT per task vector, in (0, 1] (official scripts: mask rate 0.8 -> 0.2).
        scope: ``"tensor"`` (Qwen script) or ``"global"`` (InternVL script; needs the engine's stats passes).
        drop_rate: DARE drop probability applied before trimming, in [0, 1).
        seed: with ``scope="global"`` and ``drop_rate > 0`` the DARE masks are drawn from the generator
            :func:`~mergelab.methods.base.tensor_generator` seeds from ``(seed, tensor name)`` (the merge context's
            scheme: the engine sets ``seed`` to the merge seed unless given), so that every streaming pass sees the
            same masks; otherwise unused.
        coefficients: per-expert weights ``c_i >= 0`` in the sign election and the disjoint mean, or None (ones).
        topk: ``"scripts"`` (default, the official scripts: zero the entries below the ``int(numel * (1 -
            density))``-th smallest magnitude) or ``"exact"`` (keep exactly ``max(1, int(density * numel))``
            entries per tensor, mergekit's convention; ``scope="tensor"`` only).
        normalize: True (default, the paper): the (weighted) mean of the agreeing entries; False: their (weighted)
            sum, mergekit's ``normalize: false`` (its ``dare_ties`` default).
    """

    lam: float = 1.0
    density: float = 0.2
    scope: str = "tensor"
    drop_rate: float = 0.0
    seed: int = 0
    coefficients: tuple[float, ...] | None = None
    topk: str = "scripts"
    normalize: bool = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "lam", check_real(name, "lam", self.lam))
        object.__setattr__(self, "density", check_density(name, self.density))
        check_choice(name, "scope", self.scope, ("tensor", "global"))
        check_choice(name, "topk", self.topk, ("scripts", "exact"))
        if self.topk == "exact" and self.scope == "global":
            raise ValueError(f"{name}.topk='exact' is per tensor; scope='global' uses the scripts' rule")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"{name}.normalize must be true or false, got {self.normalize!r}")
        object.__setattr__(self, "drop_rate", check_drop_rate(name, self.drop_rate))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{name}.seed must be a non-negative integer, got {self.seed!r}")
        object.__setattr__(self, "coefficients", check_coefficients(name, self.coefficients, weights=True))


def make_stats(cfg: TiesConfig, n_experts: int) -> GlobalMagnitudeThreshold | None:
    """Global statistics for ``scope="global"`` (None for per-tensor TIES)."""
    if cfg.scope != "global":
        return None
    return GlobalMagnitudeThreshold(cfg.density, n_experts, cfg.drop_rate, cfg.seed)


def ties(base: Tensor, deltas: Tensor, cfg: TiesConfig, ctx: MergeContext) -> Tensor:
    """Merged TIES task vector for one tensor.

    Args:
        base: base tensor (unused).
        deltas: stacked task vectors ``(N, *S)``; trimmed in place when ``ctx.inplace``, else left untouched.
        cfg: :class:`TiesConfig`.
        ctx: context; ``ctx.generator`` drives DARE (tensor scope); ``ctx.stats`` holds the finished
            :class:`GlobalMagnitudeThreshold` (global scope); ``ctx.inplace`` hands ``deltas`` over.

    Returns:
        The disjoint mean of the trimmed, sign-agreeing task vectors, shape ``S``.

    Raises:
        ValueError: global scope without finished statistics, or coefficients of the wrong length.
    """
    coef = coefficients_or_none(cfg.coefficients, deltas, ctx.name)
    if cfg.scope == "global":
        stats = ctx.stats
        if not isinstance(stats, GlobalMagnitudeThreshold) or stats.thresholds is None:
            raise ValueError(
                f"ties scope='global' needs finished make_stats() passes (tensor {ctx.name or '?'})"
            )
        d = stats.prepare(ctx.name, deltas)
        thresholds = stats.thresholds
    else:
        d = dare_drop(deltas, cfg.drop_rate, ctx) if cfg.drop_rate > 0 else deltas
        thresholds = magnitude_threshold(d, cfg.density, exact_topk=cfg.topk == "exact")
    if coef is None and not cfg.normalize:
        coef = torch.ones(d.shape[0], dtype=d.dtype, device=d.device)
    if coef is not None:
        return weighted_disjoint_merge(trim_to_threshold(d, thresholds), coef, normalize=cfg.normalize)
    if d is deltas and not ctx.inplace:
        d = deltas.clone()  # a library caller keeps its task vectors
    # d is ours here: DARE's fresh stack, a copy, or the engine's handed-over buffer
    return trim_and_merge_(d, thresholds)


class TiesChunked:
    """TIES of one tensor (per-tensor scope, no DARE, no coefficients, the disjoint mean) as passes over column
    chunks (:class:`~mergelab.methods.base.ChunkedMerge`), bit-identical to :func:`ties`.

    Pass 1 histograms the high halves of every expert's magnitudes (the radix select of
    :func:`~mergelab.methods._sparsify.kth_smallest_abs`); pass 2, only for experts whose rank it does not settle,
    the low halves in the threshold's bucket. Then :class:`~mergelab.methods._sparsify.TiesCore`'s two passes: the
    per-entry sums of the trimmed task vectors (kept, one float per entry: the only full-size buffer) and the
    balance of their signs, then the disjoint mean. (Merging in the sums' pass, the majority sign assumed and the
    chunks it changes merged again once it is known, was slower: with bf16 task vectors exactly cancelling entries
    are common, in about three chunks of four on Qwen2-VL-2B's shapes.)"""

    def __init__(self, cfg: TiesConfig, m: int, n_experts: int, dtype: torch.dtype, device: torch.device,
                 sample: Any, size: int) -> None:
        self.n, self.dtype, self.device, self.size = n_experts, dtype, device, size
        self.j = rank_to_trim(m, cfg.density, cfg.topk == "exact")
        self.sums_buf = torch.empty(m, dtype=dtype, device=device)
        self.final = False
        self.core: TiesCore | None = None
        if self.j == 0:
            self._start_core(torch.zeros(n_experts, dtype=torch.float32, device=device))
            return
        self.phase = "high"
        idx = sample_index(m)
        self.split = [sample_exact_in_bf16(sample(r, idx)) for r in range(n_experts)]
        self.hist = [torch.zeros(_HALF if sp else _HALF // 2, dtype=torch.int64, device=device) for sp in self.split]
        self.abs_buf = torch.empty(size, dtype=torch.float32, device=device)
        self.key_buf = torch.empty(size, dtype=torch.int32, device=device)
        self.bits: list[int | None] = [None] * n_experts
        self.low: dict[int, tuple[int, int, LowCounts]] = {}

    def _start_core(self, thresholds: Tensor) -> None:
        self.core = TiesCore(self.n, self.dtype, self.device, thresholds, self.size)
        self.phase = "sums"

    def visit(self, a: int, base: Tensor, d: Tensor) -> Tensor | None:
        k = d.shape[1]
        if self.phase == "high":
            for r in range(self.n):
                add_high_counts_(self.hist[r], d[r], self.abs_buf, self.key_buf if self.split[r] else None)
        elif self.phase == "low":
            for r, (_, _, counter) in self.low.items():
                counter.add_(d[r])
        elif self.phase == "sums":
            assert self.core is not None
            self.core.sums(self.core.trim_(d), self.sums_buf[a : a + k])
        else:
            assert self.core is not None
            return self.core.merge(self.core.trim_(d), self.sums_buf[a : a + k])
        return None

    def end_pass(self) -> None:
        if self.phase == "high":
            for r in range(self.n):
                bucket, rank, bits = locate(self.hist[r], self.split[r], self.j)
                if bits is None:
                    self.low[r] = (bucket, rank, LowCounts(bucket, self.size, self.device))
                self.bits[r] = bits
            if self.low:
                self.phase = "low"
                return
        elif self.phase == "low":
            for r, (bucket, rank, counter) in self.low.items():
                self.bits[r] = low_bits(counter.finish(), bucket, rank)
        elif self.phase == "sums":
            self.phase, self.final = "merge", True
            return
        else:
            return
        self._start_core(torch.tensor(self.bits, dtype=torch.int32, device=self.device).view(torch.float32))


def chunked(cfg: TiesConfig) -> Callable[..., TiesChunked] | None:
    """``MethodSpec.chunked``: the factory of TIES's chunked form under ``cfg``, or None when ``cfg`` has none
    (global scope, DARE, coefficients or ``normalize: false``: the stacked path handles those)."""
    if cfg.scope != "tensor" or cfg.drop_rate > 0 or cfg.coefficients is not None or not cfg.normalize:
        return None
    return _ChunkedFactory(cfg)


class _ChunkedFactory(functools.partial):  # type: ignore[type-arg]
    """``TiesChunked`` under a config, with :meth:`native_rank` for the compiled kernels' path
    (:func:`mergelab.engine.fused.native_ties`)."""

    def __new__(cls, cfg: TiesConfig) -> _ChunkedFactory:
        return super().__new__(cls, TiesChunked, cfg)

    def native_rank(self, m: int) -> int:
        """The rank of the trimming threshold among a tensor's ``m`` magnitudes (0: nothing trimmed)."""
        cfg = self.args[0]
        return rank_to_trim(m, cfg.density, cfg.topk == "exact")


__all__ = ["TiesChunked", "TiesConfig", "chunked", "make_stats", "ties"]
