"""Sparsification and sign-consensus building blocks shared by TIES and DARE (cf. peft ``utils/merge_utils.py``).

* :func:`dare_drop`: DARE (Yu et al. 2024, arXiv:2311.03099): drop each entry with probability ``p``, rescale the
  survivors by ``1/(1-p)``.
* :func:`magnitude_threshold` / :func:`trim_to_threshold`: TIES trimming (Yadav et al. 2023, arXiv:2306.01708) as in
  the official scripts: with ``j = int(numel * (1 - density))``, the threshold is the j-th smallest ``|tau|`` and
  entries with ``|tau| >= threshold`` are kept (ties at the threshold are kept; ``j = 0`` keeps everything).
* :func:`kth_smallest_abs`: that threshold computed exactly (bit-identical to ``kthvalue``) by a two-pass radix select
  on float32 bit patterns, O(n) and without full-size temporaries; one pass when the answer is a bf16-exact value
  (task vectors of bf16 checkpoints, mostly).
* :class:`GlobalMagnitudeThreshold`: the same threshold over *all* merged tensors of an expert (InternVL script),
  computed exactly in one or two streaming passes over float32 bit patterns, never materialising the task vectors.
* :func:`disjoint_merge`: sign election plus disjoint mean; :func:`trim_and_merge_` fuses trimming and merging in
  cache-sized chunks, trimming its input in place (bit-identical to the full-size formulation).

Functions are pure except those whose name ends in ``_``, which modify their first argument in place; randomness
only comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergelab.methods._linalg import check_range
from mergelab.methods.base import MergeContext, tensor_generator

_HALF = 1 << 16  # buckets per 16-bit half of a float32 bit pattern
_CHUNK = 1 << 16  # columns per chunk on CPU: a chunk's temporaries stay in the L2 cache
_RADIX_MIN = 1 << 14  # below this many entries per expert kthvalue is cheaper than two radix passes
_SELECT_CHUNK = 1 << 19  # entries per chunk of the radix-select passes on CPU (2 MB buffers)
_FLUSH = 1 << 20  # pending bucket candidates before they are folded into the low-half histogram
_MERGE_CHUNKS = 4  # the TIES core's chunks, in chunk_size units: fewer calls per entry, still in the L3 cache
_SAMPLE = 4096  # entries of the strided sample that picks the select's first-pass histogram


def chunk_size(n_rows: int, device: torch.device) -> int:
    """Columns per chunk of the chunked kernels: cache-sized on CPU, effectively unchunked on GPUs."""
    if device.type != "cpu":
        return 1 << 26
    return max(256, (_CHUNK // max(1, n_rows // 2)) // 256 * 256)


def _abs_bits(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Bit patterns (int32) of ``|x|`` in float32; non-negative floats order like these integers.

    ``out``: an optional float32 buffer of at least ``x.numel()`` entries (1-D) to write into, so that a chunked
    pass reuses one buffer instead of allocating (and page-faulting) a fresh one per chunk.
    """
    if out is None:
        a = x.abs() if x.dtype == torch.float32 else x.to(torch.float32).abs_()
        return a.contiguous().view(torch.int32)
    a = out[: x.numel()]
    if x.dtype == torch.float32:
        torch.abs(x.reshape(-1), out=a)
    else:
        a.copy_(x.reshape(-1)).abs_()
    return a.view(torch.int32)


def _abs_buffer(row: Tensor) -> Tensor:
    """The float32 buffer a chunked pass over ``row`` hands to :func:`_abs_bits`."""
    return torch.empty(min(_select_chunk(row.device), row.shape[0]), dtype=torch.float32, device=row.device)


def _select_chunk(device: torch.device) -> int:
    """Entries per chunk of the radix-select passes (one row at a time: larger than the merge's chunks)."""
    return _SELECT_CHUNK if device.type == "cpu" else 1 << 26


def _high_counts(row: Tensor, split: bool = False) -> Tensor:
    """Histogram (int64) of the high 16 bits of ``|row|``'s float32 bit patterns, chunk by chunk.

    Without ``split``: 2^15 buckets. With ``split``: 2^16, the first 2^15 counting the entries whose low 16 bits
    are 0 (bfloat16-exact magnitudes: the smallest value of their bucket) and the last 2^15 the others.
    """
    c = _select_chunk(row.device)
    hist = torch.zeros(_HALF if split else _HALF // 2, dtype=torch.int64, device=row.device)
    buf = _abs_buffer(row)
    key_buf = torch.empty(buf.shape[0], dtype=torch.int32, device=row.device) if split else None
    for i in range(0, row.shape[0], c):
        add_high_counts_(hist, row[i : i + c], buf, key_buf)
    return hist


def add_high_counts_(hist: Tensor, x: Tensor, buf: Tensor, key_buf: Tensor | None) -> None:
    """Add the high-half histogram of ``|x|`` (a 1-D chunk of a row) to ``hist`` (:func:`_high_counts`: 2^15
    buckets, or 2^16 with the bf16-exact entries apart when ``key_buf`` is given). ``buf`` (float32) and ``key_buf``
    (int32) hold at least ``x.numel()`` entries and are overwritten."""
    bits = _abs_bits(x, buf)
    if key_buf is None:
        key = bits.bitwise_right_shift_(16)
    else:
        key = torch.bitwise_right_shift(bits, 16, out=key_buf[: bits.shape[0]])
        # + 2^15 when the low half is not 0
        key.add_(bits.bitwise_and_(0xFFFF).clamp_(max=1), alpha=_HALF // 2)
    hist += torch.bincount(key, minlength=hist.shape[0])


def _mostly_exact_in_bf16(row: Tensor) -> bool:
    """True when most of a strided sample of ``|row|`` has 16 zero low bits (task vectors of bf16 checkpoints)."""
    return sample_exact_in_bf16(row[sample_index(row.shape[0])])


def sample_index(m: int) -> slice:
    """The entries of a row of ``m`` that :func:`_mostly_exact_in_bf16` looks at (a strided sample)."""
    step = max(1, m // _SAMPLE)
    return slice(0, min(m, step * _SAMPLE), step)


def sample_exact_in_bf16(sample: Tensor) -> bool:
    """True when most of ``|sample|`` has 16 zero low bits."""
    low = _abs_bits(sample) & 0xFFFF
    return 2 * int(torch.count_nonzero(low).item()) < low.numel()


def _low_counts(row: Tensor, bucket: int) -> Tensor:
    """Histogram (int64, 2^16 buckets) of the low 16 bits of the entries of ``|row|`` whose high half is ``bucket``."""
    c = _select_chunk(row.device)
    counter = LowCounts(bucket, min(c, row.shape[0]), row.device)
    for i in range(0, row.shape[0], c):
        counter.add_(row[i : i + c])
    return counter.finish()


class LowCounts:
    """:func:`_low_counts` fed chunk by chunk: ``add_`` each 1-D chunk (at most ``size`` entries) of a row, then
    ``finish`` for the histogram."""

    def __init__(self, bucket: int, size: int, device: torch.device) -> None:
        self.bucket = bucket
        self.hi_buf = torch.empty(size, dtype=torch.int32, device=device)  # reused: no allocation per chunk
        self.sel_buf = torch.empty(size, dtype=torch.bool, device=device)
        self.buf = torch.empty(size, dtype=torch.float32, device=device)
        self.lanes = torch.arange(8, device=device)
        self.hist = torch.zeros(_HALF, dtype=torch.int64, device=device)
        self.pending: list[Tensor] = []
        self.n_pending = 0

    def add_(self, x: Tensor) -> None:
        bucket = self.bucket
        bits = _abs_bits(x, self.buf)
        k = bits.shape[0]
        sel = torch.eq(torch.bitwise_right_shift(bits, 16, out=self.hi_buf[:k]), bucket, out=self.sel_buf[:k])
        # Compacting a mostly-False mask costs more than the rest of the pass: find the 8-entry blocks holding a
        # candidate on the mask's int64 view (8x fewer entries), then filter those few blocks exactly.
        k8 = k - k % 8
        blocks = sel[:k8].view(torch.int64).nonzero().squeeze(1)
        cand = bits[(blocks.unsqueeze(1) * 8 + self.lanes).reshape(-1)]
        cand = cand[(cand >> 16) == bucket]
        if k8 < k:
            tail = bits[k8:]
            cand = torch.cat([cand, tail[(tail >> 16) == bucket]])
        if cand.numel():
            self.pending.append(cand)
            self.n_pending += cand.numel()
            if self.n_pending >= _FLUSH:  # fold into the histogram: memory stays bounded when the bucket is huge
                self.hist += torch.bincount(torch.cat(self.pending) & 0xFFFF, minlength=_HALF)
                self.pending, self.n_pending = [], 0

    def finish(self) -> Tensor:
        if self.pending:
            self.hist += torch.bincount(torch.cat(self.pending) & 0xFFFF, minlength=_HALF)
            self.pending, self.n_pending = [], 0
        return self.hist


def locate(counts: Tensor, split: bool, k: int) -> tuple[int, int, int | None]:
    """From a row's high-half histogram (:func:`_high_counts`), the bucket of its k-th smallest ``|x|``, the rank
    inside the bucket, and the answer's float32 bits when the high pass settles it (the rank falls among the
    bucket's bf16-exact entries: the bucket's smallest value), else None (the low pass is needed)."""
    dev = counts.device
    exact = counts[: _HALF // 2] if split else None
    cum = (counts[: _HALF // 2] + counts[_HALF // 2 :] if split else counts).cumsum(0)
    bucket = int(torch.searchsorted(cum, torch.tensor([k], device=dev)).item())
    rank = k - (int(cum[bucket - 1].item()) if bucket > 0 else 0)
    if exact is not None and rank <= int(exact[bucket].item()):
        return bucket, rank, bucket << 16  # the bucket's smallest value, which its first exact[bucket] entries equal
    return bucket, rank, None


def low_bits(low_counts: Tensor, bucket: int, rank: int) -> int:
    """The float32 bits of the rank-th smallest entry of ``bucket`` from its low-half histogram."""
    low_cum = low_counts.cumsum(0)
    low = int(torch.searchsorted(low_cum, torch.tensor([rank], device=low_counts.device)).item())
    return (bucket << 16) | low


def kth_smallest_abs(rows: Tensor, k: int) -> Tensor:
    """Exact ``rows.abs().float().kthvalue(k, dim=1).values`` by a two-pass radix select on float32 bits.

    Pass 1 histograms the high 16 bits of each row's ``|x|`` (chunk by chunk, so no full-size temporary); that gives
    the bucket of the k-th smallest value and its rank inside the bucket. Pass 2 histograms the low 16 bits of the
    entries in that bucket only. The result is the exact bit pattern of the k-th order statistic, ties and zeros
    included (O(n), against kthvalue's selection with its full-size copy).

    Task vectors of bf16 checkpoints are mostly bf16-exact (low 16 bits 0, the smallest value of their bucket).
    When a strided sample says so, pass 1 counts those entries apart; if the rank falls among them the answer is
    the bucket's smallest value and pass 2 is skipped (about half the select's time), otherwise it runs as usual.

    Args:
        rows: ``(N, M)`` floating tensor (any float dtype; compared in float32 as :func:`magnitude_threshold` does).
        k: rank, ``1 <= k <= M``.

    Returns:
        float32 ``(N,)`` on ``rows.device``.
    """
    n, m = rows.shape
    if not 1 <= k <= m:
        raise ValueError(f"k must be in [1, {m}], got {k}")
    if m < _RADIX_MIN:
        return rows.abs().to(torch.float32).kthvalue(k, dim=1).values
    dev = rows.device
    out = torch.empty(n, dtype=torch.int32, device=dev)
    for r in range(n):
        split = _mostly_exact_in_bf16(rows[r])
        bucket, rank, bits = locate(_high_counts(rows[r], split), split, k)
        out[r] = bits if bits is not None else low_bits(_low_counts(rows[r], bucket), bucket, rank)
    return out.view(torch.float32)


def check_density(cls: str, value: object) -> float:
    """TIES density (fraction of entries KEPT per task vector) must be in (0, 1]."""
    return check_range(cls, "density", value, 0.0, 1.0, lo_open=True)


def check_drop_rate(cls: str, value: object) -> float:
    """DARE drop rate must be in [0, 1)."""
    return check_range(cls, "drop_rate", value, 0.0, 1.0, hi_open=True)


def dare_drop(
    deltas: Tensor, drop_rate: float, ctx: MergeContext, generator: torch.Generator | None = None
) -> Tensor:
    """DARE: per expert and per entry, drop with probability ``drop_rate`` and rescale survivors by ``1/(1-p)``.

    Args:
        deltas: stacked task vectors ``(N, *S)`` (not modified).
        drop_rate: ``p`` in [0, 1).
        ctx: context; ``ctx.generator`` is used unless ``generator`` is given. Without either,
            :func:`~mergelab.methods.base.tensor_generator` ``(0, ctx.name)`` is used, so the result is still
            deterministic.
        generator: explicit generator overriding ``ctx.generator``.

    Returns:
        A new sparsified, rescaled stack (same shape and dtype) that the caller owns. ``drop_rate == 0`` returns
        ``deltas`` itself.
    """
    if drop_rate == 0.0:
        return deltas
    gen = generator or ctx.generator or tensor_generator(0, ctx.name, deltas.device)
    u = torch.rand(deltas.shape, generator=gen, device=gen.device, dtype=torch.float32).to(deltas.device)
    drop = u < drop_rate
    del u
    return torch.div(deltas, 1.0 - drop_rate).masked_fill_(drop, 0.0)


def n_trimmed(numel: int, density: float) -> int:
    """How many entries TIES zeroes: ``int(numel * (1 - density))`` (the scripts' ``mask_rate``-based count)."""
    return int(numel * (1.0 - density))


def magnitude_threshold(deltas: Tensor, density: float, *, exact_topk: bool = False) -> Tensor:
    """Per-expert TIES threshold over one tensor: the ``n_trimmed``-th smallest ``|tau_i|`` (float32, shape ``(N,)``).

    Exactly ``|tau_i|.float().kthvalue(j)``, computed by :func:`kth_smallest_abs` (radix select, no full-size copy).
    Keeping ``|tau_i| >= threshold`` then keeps ``numel - j + 1`` entries (the official scripts' rule). With
    ``exact_topk`` the threshold is the ``k``-th largest ``|tau_i|`` for ``k = max(1, int(density * numel))``, so
    exactly ``k`` entries are kept when magnitudes are distinct (mergekit's ``sparsify.magnitude``; ``density == 1``
    keeps everything).
    """
    flat = deltas.reshape(deltas.shape[0], -1)
    j = rank_to_trim(flat.shape[1], density, exact_topk)
    if j == 0:
        return torch.zeros(flat.shape[0], dtype=torch.float32, device=flat.device)
    return kth_smallest_abs(flat, j)


def rank_to_trim(m: int, density: float, exact_topk: bool) -> int:
    """The rank ``j`` of :func:`magnitude_threshold`'s threshold among a row's ``m`` magnitudes (0: keep all)."""
    if exact_topk:
        k = m if density >= 1.0 else max(1, int(density * m))
        j = m - k + 1
        return j if j > 1 else 0  # the smallest magnitude as threshold keeps everything, as 0 does
    return n_trimmed(m, density)


def _below(x: Tensor, th: Tensor) -> Tensor:
    """``|x| < th`` with ``|x|`` compared in float32 (th: float32 ``(N, 1)``)."""
    a = x.abs()
    if a.dtype != torch.float32:
        a = a.to(torch.float32)
    return a < th


def trim_to_threshold(deltas: Tensor, thresholds: Tensor) -> Tensor:
    """Zero every entry of expert ``i`` whose magnitude is below ``thresholds[i]`` (ties kept); a new tensor."""
    shape = (deltas.shape[0],) + (1,) * (deltas.dim() - 1)
    return deltas.masked_fill(_below(deltas, thresholds.reshape(shape).to(deltas.device, torch.float32)), 0.0)


def disjoint_merge(trimmed: Tensor) -> Tensor:
    """TIES sign election and disjoint mean over a stack of trimmed task vectors (``trimmed`` is not modified).

    The elected sign is ``sign(sum_i tau_i)``; entries where it is 0 take the tensor's majority sign
    ``sign(sum of elected signs)``. Each entry is then the mean of the experts' values that agree with the elected
    sign (zeros excluded), or 0 when none does.
    """
    return _trim_and_merge(trimmed, None)


def weighted_disjoint_merge(trimmed: Tensor, coef: Tensor, *, normalize: bool = True) -> Tensor:
    """TIES sign election and disjoint mean with per-expert weights ``c_i >= 0`` (``trimmed`` is not modified).

    The elected sign is ``sign(sum_i c_i tau_i)`` (entries where it is 0 take the majority sign, as in
    :func:`disjoint_merge`); each entry is the weighted mean ``sum_i c_i tau_i / sum_i c_i`` over the experts whose
    non-zero value agrees with it, or 0 where none does (mergekit's TIES with ``normalize``). With every
    ``c_i = 1`` this is :func:`disjoint_merge`, up to float summation order. ``normalize=False`` returns the
    weighted sum ``sum_i c_i tau_i`` over the agreeing experts instead (mergekit's ``normalize: false``).
    """
    c = coef.to(trimmed.device, trimmed.dtype).reshape((-1,) + (1,) * (trimmed.dim() - 1))
    weighted = trimmed * c
    sign = torch.sign(weighted.sum(dim=0))
    majority = torch.sign(sign.sum())
    sign = torch.where(sign == 0, majority, sign)
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    num = (weighted * agree).sum(dim=0)
    if not normalize:
        return num
    den = (c * agree).sum(dim=0)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def trim_and_merge_(deltas: Tensor, thresholds: Tensor) -> Tensor:
    """``disjoint_merge(trim_to_threshold(deltas, thresholds))``, trimming ``deltas`` in place (bit-identical).

    Works chunk by chunk over the columns so that every temporary is cache-sized: no full-size copy of the stack.
    """
    return _trim_and_merge(deltas, thresholds)


def _shrink_levels(th: Tensor) -> list[float | None] | None:
    """Per expert, the largest float32 below its threshold: ``hardshrink`` at that level (zero where ``|x| <=
    level``) is the trim ``x * (|x| >= th)`` in one pass over float32 entries (a dropped entry becomes +0 rather
    than +-0). None for a row with threshold 0 (nothing to trim); None overall when a threshold is not finite."""
    if not bool(torch.isfinite(th).all()):
        return None
    flat = th.reshape(-1)
    levels = torch.nextafter(flat, torch.zeros_like(flat)).tolist()
    return [level if t > 0.0 else None for level, t in zip(levels, flat.tolist(), strict=True)]


def _row_sum(x: Tensor, out: Tensor) -> Tensor:
    """``torch.sum(x, dim=0, out=out)``; for two float32 rows on the CPU the add ``x[0] + x[1]`` (a third of the
    reduction's cost), which has the same value: torch's sum is ``(0 + x[0]) + x[1]``, so only the sign of a zero
    sum may differ, and the TIES core never looks at it (it takes ``sign`` of the sum and adds 0 to its result)."""
    if x.shape[0] == 2 and x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.add(x[0], x[1], out=out)
    return torch.sum(x, dim=0, out=out)


def _trim_and_merge(deltas: Tensor, thresholds: Tensor | None) -> Tensor:
    """Chunked TIES core. Float32 stacks are trimmed by ``hardshrink`` just below each threshold (one pass, see
    :func:`_shrink_levels`), others by a float 0/1 mask (bool masks cost twice as much on CPU); every sum runs
    over the experts in the same order as ``sum(dim=0)`` on the whole stack, so the result is bit-identical to
    ``disjoint_merge(trim_to_threshold(...))`` written with full-size temporaries. Chunks are multiples of 256
    columns, which keeps torch's vectorised and tail reductions on the same columns as an unchunked sum (where
    :func:`_row_sum` uses the reduction); every temporary lives in buffers allocated once per call."""
    n = deltas.shape[0]
    shape = tuple(deltas.shape[1:])
    flat = deltas.reshape(n, -1)  # a view of the caller's buffer when it is contiguous
    m = flat.shape[1]
    dev, dtype = flat.device, flat.dtype
    out = torch.empty(m, dtype=dtype, device=dev)
    c = chunk_size(n, dev) * (_MERGE_CHUNKS if dev.type == "cpu" else 1)
    core = TiesCore(n, dtype, dev, thresholds, min(c, m))
    # pass 1: trim in place (x *= |x| >= th, ties kept), per-entry sums; their signs give the majority sign
    for i in range(0, m, c):
        x = flat[:, i : i + c]
        core.sums(core.trim_(x), out[i : i + x.shape[1]])
    # pass 2: the disjoint mean over the trimmed stack (trimmed in place by pass 1)
    for i in range(0, m, c):
        x = flat[:, i : i + c]
        core.merge(x, out[i : i + x.shape[1]])
    return out.reshape(shape)


class TiesCore:
    """The TIES core's arithmetic on column chunks of an ``(N, M)`` stack, for :func:`_trim_and_merge` and for
    callers that form the chunks themselves (the engine's fused path): :meth:`trim_` each chunk and :meth:`sums` it
    over all chunks first (the per-entry sums and the majority sign), then :meth:`merge` each trimmed chunk with its
    sums. Every chunk holds at most ``size`` columns (``size <= 2^24``: the sign counts stay exact)."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, thresholds: Tensor | None,
                 size: int) -> None:
        self.buf = torch.empty((n, size), dtype=dtype, device=device)  # relu(x * sign)
        self.sg = torch.empty(size, dtype=dtype, device=device)
        self.cnt = torch.empty(size, dtype=dtype, device=device)
        self.th = None if thresholds is None else thresholds.to(device, torch.float32).reshape(n, 1)
        self.shrink = _shrink_levels(self.th) if self.th is not None and dtype == torch.float32 else None
        self.balance = torch.zeros((), dtype=torch.float64, device=device)
        self._majority: float | None = None

    def trim_(self, x: Tensor) -> Tensor:
        """Zero the entries of chunk ``x`` (N, k) below their expert's threshold, in place (ties kept)."""
        if self.shrink is not None:
            for row, level in zip(x, self.shrink, strict=True):
                if level is not None:
                    torch.hardshrink(row, level, out=row)
        elif self.th is not None:
            keep = x.abs().to(torch.float32).ge_(self.th)
            x.mul_(keep)  # dropped entries become +-0, which no sum or sign below can tell apart
        return x

    def sums(self, x: Tensor, out: Tensor) -> None:
        """The per-entry sums of trimmed chunk ``x`` into ``out`` (k,); their signs count toward the majority."""
        s = _row_sum(x, out)
        self.balance += torch.sign(s, out=self.sg[: x.shape[1]]).sum()  # exact: at most 2^24 signs per chunk

    def merge(self, x: Tensor, o: Tensor) -> Tensor:
        """Trimmed chunk ``x``'s disjoint mean, written over its sums ``o`` (what :meth:`sums` wrote), after every
        chunk's sums. The elected sign is the sum's (the majority where the sum is 0); with r = relu(x * sign) (|x|
        where x agrees, else 0), sum_i r_i * sign is exactly the sum of the agreeing x_i."""
        if self._majority is None:
            self._majority = float(torch.sign(self.balance).item())
        k = x.shape[1]
        sign = torch.sign(o, out=self.sg[:k])
        if self._majority != 0.0:
            sign.add_(0.5 * self._majority).sign_()  # 0 -> majority, +-1 unchanged
        r = torch.mul(x, sign, out=self.buf[:, :k]).clamp_min_(0.0)
        _row_sum(r, o)
        n_agree = _row_sum(r.sign_(), self.cnt[:k]).clamp_min_(1.0)
        # adding 0 turns -0 into +0 where nothing agrees, as the where-based rule gives
        return o.div_(n_agree).mul_(sign).add_(0.0)


class GlobalMagnitudeThreshold:
    """Exact per-expert global TIES threshold over every streamed tensor, in one or two passes.

    Non-negative float32 values order like their int32 bit patterns. Pass 1 histograms the high 16 bits of
    ``|tau_i|`` per expert (32,768 buckets, each counted twice: bf16-exact entries, whose low 16 bits are 0, apart
    from the others); that locates the bucket holding the j-th smallest magnitude and its rank inside the bucket.
    When that rank falls among the bucket's bf16-exact entries for every expert (task vectors of bf16 checkpoints,
    mostly), the threshold is the bucket's smallest value and no second pass is needed. Otherwise pass 2 histograms
    the low 16 bits of the entries in that bucket only, which pins the exact bit pattern of the j-th smallest value.
    Memory is ``N * 2^17`` counters, independent of the model, and each tensor is histogrammed in cache-sized chunks
    (no full-size temporary beyond DARE's copy).

    Args:
        density: fraction of entries kept per expert, in (0, 1].
        n_experts: number of experts N.
        drop_rate: DARE drop rate applied to each tensor before thresholding (0 = none).
        seed: seed of DARE's per-tensor generators, :func:`~mergelab.methods.base.tensor_generator` ``(seed,
            name)``: the engine's ``ctx.generator`` of each tensor when ``seed`` is the merge seed, and the same
            masks in every pass.
    """

    def __init__(self, density: float, n_experts: int, drop_rate: float = 0.0, seed: int = 0) -> None:
        self.density, self.n_experts, self.drop_rate, self.seed = density, n_experts, drop_rate, seed
        self.pass_index = 0
        self.numel = 0
        self._hi: Tensor | None = None
        self._lo: Tensor | None = None
        self._bucket: Tensor | None = None
        self._rank: Tensor | None = None
        self.thresholds: Tensor | None = None

    def prepare(self, name: str, deltas: Tensor) -> Tensor:
        """The task vectors as every pass sees them: ``deltas`` itself, or DARE's new stack drawn from
        :func:`~mergelab.methods.base.tensor_generator` ``(seed, name)`` (never modifies ``deltas``)."""
        if self.drop_rate == 0.0:
            return deltas
        gen = tensor_generator(self.seed, name, deltas.device)
        return dare_drop(deltas, self.drop_rate, MergeContext(name=name), gen)

    def update(self, name: str, deltas: Tensor) -> None:
        """Add one tensor's stacked task vectors ``(N, *S)`` to the current pass."""
        if deltas.shape[0] != self.n_experts:
            raise ValueError(
                f"tensor {name}: {deltas.shape[0]} experts, stats were made for {self.n_experts}"
            )
        if self.thresholds is not None:
            raise RuntimeError("GlobalMagnitudeThreshold.update called after the last pass finished")
        rows = self.prepare(name, deltas).reshape(self.n_experts, -1)
        if self.pass_index == 0:
            self.numel += rows.shape[1]
            counts = torch.stack([_high_counts(rows[r], split=True) for r in range(self.n_experts)])
            self._hi = counts if self._hi is None else self._hi + counts.to(self._hi.device)
        else:
            assert self._bucket is not None
            buckets = self._bucket.tolist()
            counts = torch.stack([_low_counts(rows[r], int(buckets[r])) for r in range(self.n_experts)])
            self._lo = counts if self._lo is None else self._lo + counts.to(self._lo.device)

    def add_zeros(self, numel: int) -> None:
        """Count ``numel`` all-zero entries per expert (an all-zero tensor the engine does not stream).

        The official InternVL script flattens every merged parameter, zeros included, so they shift the
        ``int(numel * (1 - density))`` rank; call this in every pass for such tensors to reproduce that.
        """
        if self.pass_index == 0:
            self.numel += numel
            if self._hi is None:
                self._hi = torch.zeros(self.n_experts, _HALF, dtype=torch.int64)
            self._hi[:, 0] += numel  # zeros are bf16-exact
        elif self._bucket is not None:
            if self._lo is None:
                self._lo = torch.zeros(self.n_experts, _HALF, dtype=torch.int64, device=self._bucket.device)
            self._lo[:, 0] += numel * (self._bucket.to(self._lo.device) == 0)

    def finish_pass(self) -> bool:
        """Close the current pass; True when another pass is needed."""
        j = n_trimmed(self.numel, self.density)
        if self.pass_index == 0:
            if j == 0 or self._hi is None:
                self.thresholds = torch.zeros(self.n_experts, dtype=torch.float32)
                return False
            exact = self._hi[:, : _HALF // 2]
            cum = (exact + self._hi[:, _HALF // 2 :]).cumsum(dim=1)
            target = torch.full((self.n_experts, 1), j, dtype=cum.dtype, device=cum.device)
            self._bucket = torch.searchsorted(cum, target).squeeze(1)
            before = torch.where(
                self._bucket > 0, cum.gather(1, (self._bucket - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0
            )
            self._rank = j - before
            if bool((self._rank <= exact.gather(1, self._bucket.unsqueeze(1)).squeeze(1)).all()):
                # every rank falls on its bucket's smallest value (bf16-exact entries sort first in a bucket)
                self.thresholds = (self._bucket << 16).to(torch.int32).view(torch.float32).cpu()
                self._hi = None
                self.pass_index = 2
                return False
            self.pass_index = 1
            return True
        assert self._bucket is not None and self._rank is not None
        lo_counts = (
            self._lo if self._lo is not None else torch.zeros(self.n_experts, _HALF, dtype=torch.int64)
        )
        cum = lo_counts.cumsum(dim=1)
        low = torch.searchsorted(cum, self._rank.to(cum.device).unsqueeze(1)).squeeze(1)
        bits = ((self._bucket.to(cum.device) << 16) | low).to(torch.int32)
        self.thresholds = bits.view(torch.float32).cpu()
        self._hi = self._lo = None
        self.pass_index = 2
        return False
