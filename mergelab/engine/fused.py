"""The fused CPU path: read, subtract, merge and finish a tensor chunk by chunk, without its stack of task vectors.

A method merges a tensor this way when it has a *chunked form* (:class:`~mergelab.methods.base.ChunkedMerge`): one
or more passes over the column chunks of the ``(N, M)`` stack of task vectors, the last of which returns each
chunk's merged task vector. Elementwise methods (``MethodSpec.elementwise``: task arithmetic without DARE, weight
average) and the policy's ``average`` rule have one pass (:class:`Elementwise`); TIES per tensor has three or four
(its threshold's histograms, the per-entry sums and the majority sign, then the disjoint mean:
:func:`mergelab.methods.ties.chunked`). The engine never builds the stack in the compute dtype: :func:`fused_merge`
walks the flattened tensor in cache-sized chunks, forms each chunk's small ``(N, k)`` stack from the memory-mapped
experts (again in every pass: reading and subtracting costs less than writing and re-reading a full-size stack),
hands it to the method, and in the last pass scales the result by lambda, adds the base and converts it to the
output dtype, so the stack's memory traffic stays in the cache and the resident input stays a few MB per tensor.

Every operation is the one the stacked path applies, elementwise, in the same order (``expert - base`` in the
compute dtype, the method's arithmetic, ``* lam``, ``+ base``, the conversion to the output dtype), so the merged
tensor is bit-identical to the stacked path's (``tests/test_fused.py``; the benchmark's ``merge_hashes.py
--check``). The report's norms are accumulated over the chunks (float64 sums of the chunks' squared norms), so they
can differ from a whole-tensor norm in the last digits. An all-zero stack of task vectors gives the base, converted
directly (as the stacked path's ``zero`` rule does, signed zeros included).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergelab.engine.io import MergeError
from mergelab.engine.plan import Expert, PlanItem, has_nonfinite
from mergelab.methods._sparsify import kth_smallest_abs, locate, low_bits
from mergelab.methods.base import ChunkedMerge

# Entries per expert in a chunk, a multiple of 256 as the TIES core's chunks: the fastest of 2^14 to 2^20 measured on
# the 2-core EPYC (2 MB L2 per core, 32 MB L3): 0.47 s at 2^18 against 0.83 s at 2^14 for Qwen2-VL-2B's shapes, N = 2.
_CHUNK = 1 << 18
_RELEASE_BYTES = 8 << 20  # input bytes of the base between two calls of ``release``


@dataclass
class FusedResult:
    """What :func:`fused_merge` returns: the finished tensor and the report's numbers."""

    value: torch.Tensor  # the merged tensor, in the output dtype, shaped like the base
    norms: list[float]  # per-expert Frobenius norms of the task vectors
    merged_norm: float  # the norm of lam * tau_m
    zero: bool  # every task vector was zero: value is the base, converted
    seconds: float


class Elementwise:
    """The one-pass chunked form of an elementwise merge: ``tau(base_chunk, deltas_chunk)`` per chunk."""

    final = True

    def __init__(self, tau: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self._tau = tau

    def visit(self, a: int, base: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self._tau(base, d)

    def end_pass(self) -> None:
        pass


def method_tau(fn: Callable[..., torch.Tensor], cfg: Any, ctx: Any) -> Elementwise:
    """The chunked form of an elementwise method's per-tensor function under ``cfg`` and ``ctx``."""
    return Elementwise(lambda b, d: fn(b, d, cfg, ctx))


def mean_tau() -> Elementwise:
    """The chunked form of the policy's ``average`` rule: the plain mean of the task vectors."""
    return Elementwise(lambda b, d: d.mean(dim=0))


class Chunks:
    """The chunks of one tensor's task vectors, formed from the memory-mapped base and experts on demand."""

    def __init__(self, item: PlanItem, base: torch.Tensor, experts: Sequence[Expert], cdtype: torch.dtype,
                 chunk: int | None = None) -> None:
        self.item, self.experts, self.cdtype = item, experts, cdtype
        self.n_ex = len(experts)
        self.flat_b = base.reshape(-1)
        self.views = [e.full.view(item.name).reshape(-1) for e in experts]  # type: ignore[union-attr]
        self.n = self.flat_b.numel()
        self.step = chunk or _CHUNK
        k0 = max(1, min(self.step, self.n))
        self.stack_buf = torch.empty(self.n_ex * k0, dtype=cdtype)
        self.base_buf = torch.empty(k0, dtype=cdtype)
        self.readers: tuple[Any, list[Any]] | None = None  # (base, experts) CheckpointReaders: reads, not maps

    def starts(self) -> range:
        return range(0, self.n, self.step)

    def width(self, a: int) -> int:
        return min(self.step, self.n - a)

    def deltas(self, a: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's base (compute dtype) and its ``(N, k)`` stack, ``expert - base`` as the stacked path forms it
        (``plan.fill_deltas``). Both are reused buffers, overwritten by the next call."""
        bc = self.base_buf[:k]
        bc.copy_(self.flat_b[a : a + k])
        d = self.stack_buf[: self.n_ex * k].view(self.n_ex, k)  # contiguous, like the stacked path's rows
        for i, v in enumerate(self.views):
            if v.dtype == self.cdtype:
                torch.sub(v[a : a + k], bc, out=d[i])
            else:
                d[i].copy_(v[a : a + k])
                d[i].sub_(bc)
        return bc, d

    def sample(self, row: int, index: slice) -> torch.Tensor:
        """Expert ``row``'s task vector at the entries ``index`` (a new tensor, the values :meth:`deltas` gives)."""
        return self.views[row][index].to(self.cdtype) - self.flat_b[index].to(self.cdtype)

    def reused(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in this object's reused buffers (a result must not)."""
        p = t.untyped_storage().data_ptr()
        return p in (self.stack_buf.untyped_storage().data_ptr(), self.base_buf.untyped_storage().data_ptr())


def fused_merge(
    chunks: Chunks,
    method: ChunkedMerge,
    lam: float,
    release: Callable[[int], None] | None = None,
    out: torch.Tensor | None = None,
) -> FusedResult:
    """Merge one tensor of full experts on the CPU by ``method``'s passes over ``chunks``.

    Args:
        chunks: the tensor's chunks (:class:`Chunks`).
        method: the method's chunked form for this tensor.
        lam: the scale of the merged task vector.
        release: ``release(j)``, called every :data:`_RELEASE_BYTES` of the base's bytes within a pass: the inputs'
            first ``j`` entries are done with for now (the engine drops their memory-mapped pages; a later pass reads
            them again from the page cache).
        out: a 1-D buffer of the tensor's entries in the output dtype to write the result into (the engine's reused
            buffers), or None for a new one.

    Raises:
        MergeError: an expert's tensor or the merged task vector holds NaN or Inf (naming the file and tensor).
    """
    t0 = time.perf_counter()
    item, n, step, cdtype = chunks.item, chunks.n, chunks.step, chunks.cdtype
    n_chunks = -(-n // step)
    chunk_norms = torch.zeros(n_chunks, chunks.n_ex, dtype=cdtype)  # per chunk (no sync with Python per chunk)
    merged_sq = [0.0] * n_chunks
    if out is None:
        out = torch.empty(n, dtype=item.out_dtype)
    assert out.dtype == item.out_dtype and out.numel() == n and out.is_contiguous()
    every = max(1, _RELEASE_BYTES // max(1, step * chunks.flat_b.element_size()))

    def write(ci: int, a: int, k: int, bc: torch.Tensor, tau: torch.Tensor) -> None:
        """Finish chunk ``ci`` (first column ``a``) into ``out``: ``lam * tau`` in the compute dtype (never a view of
        the reused buffers), checked, plus the base, converted."""
        upd = tau.to(cdtype)
        if chunks.reused(upd):
            upd = upd.clone()
        if lam != 1.0:
            upd.mul_(lam)
        m = float(torch.linalg.vector_norm(upd))  # non-finite when an entry is (or the squares overflow)
        if not math.isfinite(m) and has_nonfinite(upd):
            raise MergeError(f"tensor {item.name}: the merged task vector contains NaN or Inf (rule {item.rule})")
        merged_sq[ci] = m * m
        upd.add_(bc)
        out[a : a + k].copy_(upd)

    first = True
    while True:
        final = method.final
        for ci, a in enumerate(chunks.starts()):
            if release is not None and ci and ci % every == 0:
                release(a)
            k = chunks.width(a)
            bc, d = chunks.deltas(a, k)
            if first:
                cn = torch.linalg.vector_norm(d, dim=1, out=chunk_norms[ci])
                if not bool(torch.isfinite(cn).all()):  # an expert's NaN/Inf named first, as in the stacked path
                    for i in range(chunks.n_ex):
                        if not math.isfinite(float(cn[i])):
                            chunks.experts[i].check_finite(item.name)  # raises unless the squares overflowed
            tau = method.visit(a, chunks.flat_b[a : a + k], d)
            if final:
                write(ci, a, k, bc, tau)
        method.end_pass()
        first = False
        if final:
            break
    sq = chunk_norms.to(torch.float64).square_().sum(0)
    norms = [math.sqrt(float(x)) for x in sq]
    zero = all(x == 0.0 for x in norms)
    if zero:  # exactly zero (a norm can underflow to 0): every chunk's stack formed again, in this rare case
        zero = not any(bool(chunks.deltas(a, chunks.width(a))[1].any()) for a in chunks.starts())
    if zero:
        out.copy_(chunks.flat_b)  # the base itself, as the stacked path writes it (signed zeros kept)
    merged_norm = math.sqrt(sum(merged_sq))
    # a plain tensor over out's storage, not a view of it (a view would keep ``out`` as its base, and the engine's
    # buffer pool takes back only buffers that no other tensor uses)
    value = torch.empty(0, dtype=out.dtype).set_(out.untyped_storage(), out.storage_offset(), item.shape)
    return FusedResult(value, norms, merged_norm, zero, time.perf_counter() - t0)


_NATIVE_SLAB = 1 << 21  # entries per call of the compiled TIES kernels (the inputs' pages are released behind them)


def _np_bits(t: torch.Tensor) -> Any:
    """A numpy view of 1-D ``t``: bf16 as its uint16 bits, float32 as it is."""
    import numpy as np

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


_KINDS = {torch.bfloat16: "bf16", torch.float32: "f32"}
_POOLS: dict[int, Any] = {}


def _pool(workers: int) -> Any:
    """A thread pool of ``workers`` threads for the compiled kernels' slabs (made once per size, per process)."""
    if workers not in _POOLS:
        from concurrent.futures import ThreadPoolExecutor

        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="mergelab-ties")
    return _POOLS[workers]


_BRACKET_SAMPLE = 1 << 16  # magnitudes per expert in the sample that brackets a threshold


@functools.cache
def _sum_group() -> int | None:
    """How many columns torch's ``sum(dim=0)`` of a float32 ``(N, M)`` stack on this CPU reduces as vectors (its
    last ``M % group`` columns, with ``N >= 5`` rows, take another order: ``ties_kernels._tail_sum``), found by
    comparing both orders on a random probe; None when neither fits (the compiled kernels then leave ``N >= 5``
    to the torch form)."""
    g = torch.Generator().manual_seed(0)
    for n in (5, 6, 9):
        x = torch.randn(n, 1279, generator=g) * torch.logspace(-4, 4, 1279)
        seq = x[0].clone()
        for r in range(1, n):
            seq += x[r]
        acc = [torch.zeros(1279) for _ in range(4)]
        for r in range(n):
            acc[r % 4 if r < n - n % 4 else 0] += x[r]
        tail = ((acc[0] + acc[1]) + acc[2]) + acc[3]
        got = torch.sum(x, dim=0)
        fits = [gr for gr in (8, 16, 32, 64, 128, 256)
                if torch.equal(got, torch.cat([seq[: 1279 - 1279 % gr], tail[1279 - 1279 % gr :]]))]
        if len(fits) != 1:
            return None
        if n == 5:
            group = fits[0]
        elif fits[0] != group:
            return None
    return group


_BRACKET_RUNS = 256  # the sample: this many runs of contiguous entries spread over the tensor (few pages touched)


def bracket_sample(n: int) -> int:
    """The sample's size for a tensor of ``n`` entries: a larger sample costs about 12 ns a magnitude and narrows the
    bracket (its width is 12 standard deviations of a quantile, ``~5 / sqrt(size)`` of the entries), which saves
    about 30 ns per entry kept as a candidate; the total is least near ``(6 n) ** (2/3)``. From ``_BRACKET_SAMPLE``
    to 2^21, a multiple of ``_BRACKET_RUNS``."""
    size = int((6.0 * n) ** (2.0 / 3.0))
    return max(_BRACKET_SAMPLE, min(1 << 21, size - size % _BRACKET_RUNS))


def _magnitudes(arr: Any, idx: Any, base: Any) -> Any:
    """``|arr[idx] - base[idx]|`` in float32 from the kernels' numpy views (bf16 as its bits)."""
    import numpy as np

    def f32(a: Any) -> Any:
        v = a[idx]
        return (v.astype(np.uint32) << 16).view(np.float32) if v.dtype == np.uint16 else v

    return np.abs(f32(arr) - f32(base))


_UNMAPPED_SAMPLE_BYTES = 64 << 20  # a tensor from this size on is sampled with plain reads, not through its map


def _sample_runs(chunks: Chunks, row: int, starts: Any, run: int) -> Any:
    """Expert ``row``'s magnitudes at the runs ``starts[i]:starts[i] + run``. A large tensor's runs are read with
    plain reads (:meth:`~mergelab.engine.io.CheckpointReader.read_runs`) when the readers are known: through the
    map, each run maps a whole folio (2 MB where the page cache holds huge folios), so the sample alone mapped
    1.4 GB of Qwen2-VL-2B's embedding (ties' peak RSS 1.6-1.8 against 0.8 GB)."""
    import numpy as np

    name = chunks.item.name
    if chunks.readers is None or chunks.flat_b.numel() * chunks.flat_b.element_size() < _UNMAPPED_SAMPLE_BYTES:
        idx = (starts[:, None] + np.arange(run, dtype=np.int64)).ravel()
        return _magnitudes(_np_bits(chunks.views[row]), idx, _np_bits(chunks.flat_b))
    base, experts = chunks.readers
    got = [_np_bits(r.read_runs(name, starts, run)) for r in (experts[row], base)]
    return _magnitudes(got[0], slice(None), got[1])


def _bracket(chunks: Chunks, row: int, rank: int) -> tuple[float, float, int]:
    """A bracket ``[lo, hi]`` of expert ``row``'s magnitudes that holds its ``rank``-th smallest with near
    certainty, and the number of entries expected inside: the order statistics six standard deviations either
    side of the rank's quantile (two more entries each way) in a sample of :func:`bracket_sample` magnitudes,
    taken as ``_BRACKET_RUNS`` runs of contiguous entries spread over the tensor (a strided sample would touch every
    page of a large tensor). A bracket that misses costs time, not exactness: the histogram passes select then.
    ``rank`` 0 (nothing trimmed): an empty bracket at infinity."""
    import numpy as np

    n = chunks.n
    if rank == 0:
        return math.inf, math.inf, 0
    size = bracket_sample(n)
    if n <= size:
        sample = _magnitudes(_np_bits(chunks.views[row]), slice(None), _np_bits(chunks.flat_b))
    else:
        run = size // _BRACKET_RUNS
        sample = _sample_runs(chunks, row, np.linspace(0, n - run, _BRACKET_RUNS).astype(np.int64), run)
    s = sample.shape[0]
    q = rank / n
    z = 6.0 * math.sqrt(s * q * (1.0 - q)) + 2.0
    lo_i, hi_i = math.floor(q * s - z), math.ceil(q * s + z)
    kth = [i for i in (lo_i, hi_i) if 0 <= i < s]
    part = np.partition(sample, kth) if kth else sample  # the two order statistics, without a full sort
    lo = float(part[lo_i]) if lo_i >= 0 else 0.0
    hi = float(part[hi_i]) if hi_i < s else math.inf
    return lo, hi, int((min(hi_i, s) - max(lo_i, 0)) / s * n) + 1


def native_kinds(base: torch.dtype, experts: Sequence[torch.dtype], out: torch.dtype,
                 cdtype: torch.dtype) -> tuple[str, str] | None:
    """The compiled TIES kernels' input and output kinds for these dtypes, or None when they do not apply (inputs
    of mixed dtypes or other than bf16/float32, an output other than those, a compute dtype other than float32)."""
    if cdtype != torch.float32 or {base, *experts} != {base} or base not in _KINDS or out not in _KINDS:
        return None
    return _KINDS[base], _KINDS[out]


def native_ties(chunks: Chunks, rank: int, lam: float, release: Callable[[int], None] | None = None,
                out: torch.Tensor | None = None, wait: bool = False) -> FusedResult | None:
    """TIES of one tensor (per-tensor scope, no DARE, no coefficients, the disjoint mean) by the compiled kernels of
    :mod:`mergelab.engine.ties_native`, bit-identical to :func:`fused_merge` over
    :class:`~mergelab.methods.ties.TiesChunked` (``rank``: the trimming threshold's rank, its ``j``). None when the
    kernels do not apply (numba missing or off, a dtype other than bf16 or float32 in or out, float32 compute
    required) or are not compiled yet (:func:`~mergelab.engine.ties_native.warm_up` runs in the background; with
    ``wait``, or for a tensor large enough that waiting pays (``worth_waiting``), this call waits for it); the
    caller then runs the torch form. Arguments and result as
    :func:`fused_merge`'s."""
    import numpy as np

    from mergelab.engine import ties_native as tn

    item, n, cdtype = chunks.item, chunks.n, chunks.cdtype
    kinds = native_kinds(chunks.flat_b.dtype, [v.dtype for v in chunks.views], item.out_dtype, cdtype)
    if kinds is None or n == 0:
        return None
    n_ex = len(chunks.views)
    wait = wait or tn.worth_waiting(n_ex, *kinds, n)
    early = wait and tn.available() and not tn.ready(n_ex, *kinds)  # the sample (numpy) while the kernels load
    brackets = [_bracket(chunks, r, rank) for r in range(n_ex)] if early else None
    if not tn.ready(n_ex, *kinds, wait=wait):
        return None
    tail = n  # from here on, sums over the experts take torch's tail order (five or more experts)
    if n_ex >= 5:
        group = _sum_group()
        if group is None:
            return None
        tail = n - n % group
    t0 = time.perf_counter()
    k = tn.kernels()
    if out is None:
        out = torch.empty(n, dtype=item.out_dtype)
    assert out.dtype == item.out_dtype and out.numel() == n and out.is_contiguous()
    b, o = _np_bits(chunks.flat_b.contiguous()), _np_bits(out.reshape(-1))
    es = tuple(_np_bits(v.contiguous()) for v in chunks.views)
    slabs = [(a, min(a + _NATIVE_SLAB, n)) for a in range(0, n, _NATIVE_SLAB)]
    # The kernels release the GIL: with torch's thread count above 1, a pass runs its slabs in rounds of that many
    # threads, each slot with its own accumulators (the candidates, counts and sums are combined after the pass; the
    # merged entries do not depend on the split, the report's norms only in their last digits). The inputs' pages
    # are released behind each round.
    workers = max(1, min(torch.get_num_threads(), len(slabs)))

    def each_slab(fn: Callable[[int, int, int], None], parallel: bool = True) -> None:
        step = workers if parallel else 1
        for g in range(0, len(slabs), step):
            group = slabs[g : g + step]
            if len(group) == 1:
                fn(0, *group[0])
            else:
                list(_pool(workers).map(lambda js: fn(js[0], *js[1]), enumerate(group)))
            if release is not None and group[-1][1] < n:
                release(group[-1][1])

    # pass 1: each expert's magnitudes against a bracket around its threshold from a sample (their count below it
    # and the few inside), its sum of squares, whether any entry is non-zero
    if brackets is None:
        brackets = [_bracket(chunks, r, rank) for r in range(n_ex)]
    cap = min(n, max(1 << 14, 2 * -(-max(c for _, _, c in brackets) // workers)))  # candidates per slot
    cand = np.empty((workers, n_ex, cap), dtype=np.float32)
    counts = np.zeros((workers, n_ex, 3), dtype=np.int64)  # below, candidates, candidates past cap
    acc = np.zeros((workers, n_ex, 2), dtype=np.float64)  # sum of squares, any non-zero entry
    lohi = [(np.float32(lo), np.float32(hi)) for lo, hi, _ in brackets]
    each_slab(lambda j, a0, a1: [k.bracket_pass(b, es[r], a0, a1, *lohi[r], cand[j, r], counts[j, r], acc[j, r])
                                 for r in range(n_ex)])
    sums = acc.sum(axis=0)
    for r in range(n_ex):  # an expert's NaN/Inf named first, as in the stacked path
        if not math.isfinite(float(sums[r, 0])):
            chunks.experts[r].check_finite(item.name)
    norms = [math.sqrt(float(x)) for x in sums[:, 0]]
    value = torch.empty(0, dtype=out.dtype).set_(out.untyped_storage(), out.storage_offset(), item.shape)
    if not sums[:, 1].any():  # every task vector is exactly zero: the base itself, as the stacked path writes it
        out.copy_(chunks.flat_b)
        return FusedResult(value, norms, 0.0, True, time.perf_counter() - t0)
    th = np.zeros(n_ex, dtype=np.float32)
    missed = []  # experts whose threshold the bracket missed: the radix select's histogram passes
    for r in range(n_ex):
        below, nc, over = (int(x) for x in counts[:, r].sum(axis=0))
        if rank == 0:
            continue
        if lohi[r][0] == lohi[r][1] and below < rank <= below + nc + over:  # a bracket of one value: it (16-bit
            th[r] = lohi[r][0]  # inputs often repeat the value at the threshold more times than ``cand`` holds)
        elif not over and below < rank <= below + nc:
            kept = np.concatenate([cand[j, r, : counts[j, r, 1]] for j in range(workers)])
            th[r] = float(kth_smallest_abs(torch.from_numpy(kept).view(1, -1), rank - below)[0])
        else:
            missed.append(r)
    cand = None  # freed before the merge pass
    if missed:  # (rare: one thread, the histograms shared)
        hist = np.zeros((n_ex, 1 << 16), dtype=np.int64)
        scratch = np.zeros((n_ex, 2), dtype=np.float64)
        each_slab(lambda j, a0, a1: [k.high_pass(b, es[r], a0, a1, hist[r], scratch[r]) for r in missed], False)
        low: dict[int, tuple[int, int, Any]] = {}
        for r in missed:
            bucket, rk, found = locate(torch.from_numpy(hist[r]), True, rank)
            if found is None:
                low[r] = (bucket, rk, np.zeros(1 << 16, dtype=np.int64))
            else:
                th[r] = np.uint32(found).view(np.float32)
        if low:
            each_slab(lambda j, a0, a1: [k.low_pass(b, es[r], a0, a1, bk, cnt) for r, (bk, _, cnt) in low.items()],
                      False)
            for r, (bk, rk, cnt) in low.items():
                th[r] = np.uint32(low_bits(torch.from_numpy(cnt), bk, rk)).view(np.float32)
    lam32 = np.float32(lam)
    amb = np.empty((workers, _NATIVE_SLAB + 1), dtype=np.int64)
    ambx = np.empty((workers, _NATIVE_SLAB + 1, n_ex + 1), dtype=np.float32)  # their base values and trimmed deltas
    waiting: list[Any] = []
    state = np.zeros((workers, 2), dtype=np.int64)  # set-aside entries of the slab, the balance of the sums' signs
    macc = np.zeros((workers, 2), dtype=np.float64)  # merged sum of squares, non-finite updates

    def merge_slab(j: int, a0: int, a1: int) -> None:
        state[j, 0] = 0
        k.merge_pass(b, es, a0, a1, th, lam32, tail, o, amb[j], ambx[j], state[j], macc[j])
        if state[j, 0]:
            waiting.append((amb[j, : state[j, 0]].copy(), ambx[j, : state[j, 0]].copy()))

    each_slab(merge_slab)
    macc = macc.sum(axis=0)
    if waiting:  # the sign of the balance is the majority sign (0: none)
        majority = np.float32(np.sign(state[:, 1].sum()))
        for idx, vals in waiting:
            k.patch_pass(tail, lam32, o, idx, vals, len(idx), majority, macc)
    if macc[1]:
        raise MergeError(f"tensor {item.name}: the merged task vector contains NaN or Inf (rule {item.rule})")
    return FusedResult(value, norms, math.sqrt(float(macc[0])), False, time.perf_counter() - t0)


__all__ = ["Chunks", "Elementwise", "FusedResult", "fused_merge", "mean_tau", "method_tau", "native_ties"]
