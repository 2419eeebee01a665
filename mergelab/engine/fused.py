"""The fused CPU path for elementwise merges: read, subtract, merge and finish a tensor chunk by chunk.

For a method whose per-tensor function is elementwise under its config (``MethodSpec.elementwise``: task
arithmetic without DARE, weight average) and for the policy's ``average`` rule, entry ``j`` of the result depends
only on entry ``j`` of the base and of each expert. The engine then never builds the ``(N, *S)`` stack of task
vectors in the compute dtype: :func:`fused_merge` walks the flattened tensor in cache-sized chunks, fills a small
``(N, k)`` stack from the memory-mapped experts, applies the method's own function to it, scales by lambda, adds
the base and converts to the output dtype, so every entry is read from the mapped files once and written once, and
the stack's memory traffic stays in the cache.

Every operation is the one the stacked path applies, elementwise, in the same order (``expert - base`` in the
compute dtype, the method's reduction over the expert axis, ``* lam``, ``+ base``, the conversion to the output
dtype), so the merged tensor is bit-identical to the stacked path's (``tests/test_fused.py``; the benchmark's
``merge_hashes.py --check``). The report's norms are accumulated over the chunks (float64 sums of the chunks'
float32 squares), so they can differ from a whole-tensor norm in the last digits. An all-zero stack of task
vectors gives the base, converted directly (as the stacked path's ``zero`` rule does, signed zeros included).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergelab.engine.io import MergeError
from mergelab.engine.plan import Expert, PlanItem, has_nonfinite

_CHUNK = 1 << 18  # entries per expert in a chunk: the stack (a few MB) stays in the cache; larger chunks cost fewer calls


_RELEASE_BYTES = 8 << 20  # output bytes between two calls of ``release``


def chunk_elements(n_experts: int) -> int:
    """Entries per expert in one chunk of :func:`fused_merge` (fastest of 2^14 to 2^20 measured on the 2-core
    EPYC, 2 MB L2 per core, 32 MB L3: 0.47 s at 2^18 against 0.83 s at 2^14 for Qwen2-VL-2B's shapes, N = 2)."""
    return _CHUNK


@dataclass
class FusedResult:
    """What :func:`fused_merge` returns: the finished tensor and the report's numbers."""

    value: torch.Tensor  # the merged tensor, in the output dtype, shaped like the base
    norms: list[float]  # per-expert Frobenius norms of the task vectors
    merged_norm: float  # the norm of lam * tau_m
    zero: bool  # every task vector was zero: value is the base, converted
    seconds: float


def fused_merge(
    item: PlanItem,
    base: torch.Tensor,
    experts: Sequence[Expert],
    tau_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    lam: float,
    cdtype: torch.dtype,
    chunk: int | None = None,
    release: Callable[[int], None] | None = None,
    out: torch.Tensor | None = None,
) -> FusedResult:
    """Merge one tensor of full experts on the CPU without its stack of task vectors.

    Args:
        item: the plan item (its name, shape and output dtype).
        base: the base tensor on the CPU, in its stored dtype (a memory-mapped view).
        experts: the experts; each has ``full`` (their stored tensors are read chunk by chunk).
        tau_fn: ``tau_fn(base_chunk, deltas_chunk) -> tau_chunk``: the elementwise merge of an ``(N, k)`` stack
            (``base_chunk``: the base's ``k`` entries in their stored dtype).
        lam: the scale of the merged task vector.
        cdtype: the compute dtype.
        chunk: entries per expert and chunk (default :func:`chunk_elements`).
        release: ``release(j)``, called every :data:`_RELEASE_BYTES` of output: the inputs' first ``j`` entries are
            done with (the engine drops their memory-mapped pages, so the resident input stays a few MB per tensor).
        out: a 1-D buffer of the tensor's entries in the output dtype to write the result into (the engine's reused
            buffers), or None for a new one.

    Raises:
        MergeError: an expert's tensor or the merged task vector holds NaN or Inf (naming the file and tensor).
    """
    t0 = time.perf_counter()
    n_ex = len(experts)
    flat_b = base.reshape(-1)
    views = [e.full.view(item.name).reshape(-1) for e in experts]  # type: ignore[union-attr]
    n = flat_b.numel()
    step = chunk or chunk_elements(n_ex)
    k0 = max(1, min(step, n))
    stack_buf = torch.empty(n_ex * k0, dtype=cdtype)
    base_buf = torch.empty(k0, dtype=cdtype)
    n_chunks = -(-n // step)
    chunk_norms = torch.zeros(n_chunks, n_ex, dtype=cdtype)  # per chunk (no sync with Python per chunk)
    merged_norms = torch.zeros(n_chunks, dtype=cdtype)

    def deltas(a: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's base (compute dtype) and its ``(N, k)`` stack, ``expert - base`` as the stacked path forms it."""
        bc = base_buf[:k]
        bc.copy_(flat_b[a : a + k])
        d = stack_buf[: n_ex * k].view(n_ex, k)  # contiguous, like the stacked path's rows
        for i, v in enumerate(views):
            if v.dtype == cdtype:
                torch.sub(v[a : a + k], bc, out=d[i])
            else:
                d[i].copy_(v[a : a + k])
                d[i].sub_(bc)
        return bc, d

    def update(a: int, k: int, d: torch.Tensor) -> torch.Tensor:
        """``lam * tau_m`` of the chunk, in the compute dtype (never a view of the reused buffers)."""
        upd = tau_fn(flat_b[a : a + k], d).to(cdtype)
        if upd.untyped_storage().data_ptr() in (stack_buf.untyped_storage().data_ptr(),
                                                base_buf.untyped_storage().data_ptr()):
            upd = upd.clone()
        if lam != 1.0:
            upd.mul_(lam)
        return upd

    if out is None:
        out = torch.empty(n, dtype=item.out_dtype)
    assert out.dtype == item.out_dtype and out.numel() == n and out.is_contiguous()
    every = max(1, _RELEASE_BYTES // max(1, step * item.out_dtype.itemsize))
    for ci, a in enumerate(range(0, n, step)):
        if release is not None and ci and ci % every == 0:
            release(a)
        k = min(step, n - a)
        bc, d = deltas(a, k)
        torch.linalg.vector_norm(d, dim=1, out=chunk_norms[ci])
        upd = update(a, k, d)
        torch.linalg.vector_norm(upd, out=merged_norms[ci])
        upd.add_(bc)
        out[a : a + k].copy_(upd)
    # the checks of the stacked path, on the chunks' norms: an expert's NaN/Inf first (naming its file), then the
    # merged task vector's (a non-finite norm can be an overflow of the squares: the chunk is formed again to tell)
    finite = torch.isfinite(chunk_norms)
    for i in range(n_ex):
        if not bool(finite[:, i].all()):
            experts[i].check_finite(item.name)
    for ci in torch.nonzero(~torch.isfinite(merged_norms)).flatten().tolist():
        a = ci * step
        k = min(step, n - a)
        if has_nonfinite(update(a, k, deltas(a, k)[1])):
            raise MergeError(f"tensor {item.name}: the merged task vector contains NaN or Inf (rule {item.rule})")
    sq = chunk_norms.to(torch.float64).square_().sum(0)
    norms = [math.sqrt(float(x)) for x in sq]
    zero = all(x == 0.0 for x in norms)
    if zero:  # exactly zero (a norm can underflow to 0): every chunk's stack formed again, in this rare case
        zero = not any(bool(deltas(a, min(step, n - a))[1].any()) for a in range(0, n, step))
    if zero:
        out.copy_(flat_b)  # the base itself, as the stacked path writes it (signed zeros kept)
    merged_norm = math.sqrt(float(merged_norms.to(torch.float64).square_().sum()))
    # a plain tensor over out's storage, not a view of it (a view would keep ``out`` as its base, and the engine's
    # buffer pool takes back only buffers that no other tensor uses)
    value = torch.empty(0, dtype=out.dtype).set_(out.untyped_storage(), out.storage_offset(), item.shape)
    del out
    return FusedResult(value, norms, merged_norm, zero, time.perf_counter() - t0)


def method_tau(fn: Callable[..., torch.Tensor], cfg: Any, ctx: Any) -> Callable[[torch.Tensor, torch.Tensor],
                                                                                 torch.Tensor]:
    """``tau_fn`` for :func:`fused_merge` from a method's per-tensor function, config and context."""
    return lambda b, d: fn(b, d, cfg, ctx)


def mean_tau(b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``tau_fn`` of the policy's ``average`` rule: the plain mean of the task vectors."""
    return d.mean(dim=0)


__all__ = ["FusedResult", "chunk_elements", "fused_merge", "mean_tau", "method_tau"]
