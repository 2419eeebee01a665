"""TIES's exact magnitude selection with reused chunk buffers (issue 22): the radix select's passes write ``|x|``
into one buffer per pass; the kept set must stay the official rule ``|tau_i| >= kthvalue(j)`` whatever the dtype,
layout or number of equal magnitudes at the threshold."""

from __future__ import annotations

import pytest
import torch

from mergelab.methods._sparsify import (
    _RADIX_MIN,
    _SELECT_CHUNK,
    kth_smallest_abs,
    magnitude_threshold,
    trim_to_threshold,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_equal_magnitudes_over_several_chunks_keep_the_same_set(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(22)
    m = 2 * _SELECT_CHUNK + 12_345  # three chunks, the last one partial and not a multiple of 8
    levels = torch.tensor([0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 3.0])
    x = levels[torch.randint(len(levels), (3, m), generator=g)]
    x[2] = torch.randn(m, generator=g) * (x[2] != 0)  # one row of distinct magnitudes among zeros
    x = x.to(dtype)
    a = x.abs().float()
    for density in (0.2, 0.5, 0.63, 0.99):
        j = int(m * (1 - density))
        want = a.kthvalue(j, dim=1).values
        th = magnitude_threshold(x, density)
        assert torch.equal(th, want), density
        kept = trim_to_threshold(x, th) != 0
        assert torch.equal(kept, (a >= want.unsqueeze(1)) & (x != 0)), density


def test_strided_rows_select_like_contiguous_ones() -> None:
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(2, 2 * _SELECT_CHUNK + 1000, generator=g)
    rows = wide[:, ::2]  # not contiguous: every chunk is copied into the buffer through its strides
    for k in (1, 5, rows.shape[1] // 3, rows.shape[1]):
        assert torch.equal(kth_smallest_abs(rows, k), rows.abs().kthvalue(k, dim=1).values), k


def _bf16_deltas(n: int, m: int, seed: int) -> torch.Tensor:
    """Task vectors of bf16 checkpoints as the engine forms them: float32 differences of bf16 weights."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(m, generator=g) * 0.02).bfloat16().float()
    experts = (base + torch.randn(n, m, generator=g) * 0.002).bfloat16().float()
    return experts - base


def _select_sample(kind: str, m: int, g: torch.Generator) -> torch.Tensor:
    if kind == "bf16_deltas":
        return _bf16_deltas(2, m, int(g.initial_seed()))
    if kind == "float32":  # no structure: nearly every magnitude has non-zero low bits
        return torch.randn(2, m, generator=g)
    if kind == "tied":  # a handful of bf16-exact levels, each held by a large share of the entries
        return torch.tensor([0.0, 0.5, -0.5, 0.75, -2.0])[torch.randint(5, (2, m), generator=g)]
    if kind == "all_zero":
        return torch.zeros(2, m)
    if kind == "negative_zero":  # -0.0 and +0.0 (equal magnitudes) among bf16-exact values
        x = _bf16_deltas(2, m, 3)
        x[:, ::3] = -0.0
        x[:, 1::3] = 0.0
        return x
    if kind == "subnormal":  # tiny magnitudes: subnormals and the smallest normals, bf16-exact and not
        return torch.randn(2, m, generator=g) * 1e-39
    if kind == "mixed":  # bf16-exact values with a third perturbed in their low bits: both paths of pass 1
        x = _bf16_deltas(2, m, 5)
        x[:, ::3] += 1e-9 * torch.randn(2, (m + 2) // 3, generator=g)
        return x
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["bf16_deltas", "float32", "tied", "all_zero", "negative_zero", "subnormal", "mixed"]
)
@pytest.mark.parametrize("m", [_RADIX_MIN, 70_001])
def test_split_select_equals_kthvalue(kind: str, m: int) -> None:
    """The select with its bf16-exact shortcut returns kthvalue's bit pattern at every rank it is asked for."""
    g = torch.Generator().manual_seed(m)
    x = _select_sample(kind, m, g)
    a = x.abs()
    for k in sorted({1, 2, m // 7, m // 2, int(m * 0.8), m - 1, m}):
        got = kth_smallest_abs(x, k).view(torch.int32)
        assert torch.equal(got, a.kthvalue(k, dim=1).values.view(torch.int32)), (kind, k)


def test_huge_rows_with_duplicates_select_exactly() -> None:
    """Several select chunks of a few duplicated bf16-exact values plus bf16 task vectors: every rank exact."""
    g = torch.Generator().manual_seed(11)
    m = 3 * _SELECT_CHUNK + 77
    x = _bf16_deltas(2, m, 11)
    levels = torch.tensor([0.0, 2.0**-9, -(2.0**-9), 2.0**-8])
    x[:, : m // 2] = levels[torch.randint(4, (2, m // 2), generator=g)]
    a = x.abs()
    for density in (0.05, 0.2, 0.5, 0.9):
        j = int(m * (1 - density))
        assert torch.equal(magnitude_threshold(x, density), a.kthvalue(j, dim=1).values), density


def test_select_falls_back_to_the_second_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second pass runs when the rank falls on a magnitude that is not bf16-exact (or the sample says the row
    is not bf16-shaped) and is skipped when it falls on a bf16-exact one; the answer is exact either way."""
    import mergelab.methods._sparsify as sp

    calls: list[int] = []
    low_counts = sp._low_counts

    def spy(row: torch.Tensor, bucket: int) -> torch.Tensor:
        calls.append(bucket)
        return low_counts(row, bucket)

    monkeypatch.setattr(sp, "_low_counts", spy)
    m = 70_001
    x = _bf16_deltas(2, m, 2)
    a = x.abs()
    j = int(m * 0.8)
    assert torch.equal(kth_smallest_abs(x, j), a.kthvalue(j, dim=1).values) and calls == []
    y = x.clone()
    top = y.abs().argmax(dim=1)
    # the largest magnitude of row 0 is no longer bf16-exact: rank m needs pass 2
    y[0, top[0]] *= 1.0 + 2.0**-20
    assert torch.equal(kth_smallest_abs(y, m), y.abs().kthvalue(m, dim=1).values) and len(calls) == 1
    z = torch.randn(2, m, generator=torch.Generator().manual_seed(2))  # float32 noise: pass 2 for every row
    calls.clear()
    assert torch.equal(kth_smallest_abs(z, j), z.abs().kthvalue(j, dim=1).values) and len(calls) == 2


@pytest.mark.parametrize("n", [2, 3, 5])
def test_ties_core_over_several_large_chunks_is_the_where_rule(n: int) -> None:
    """Float32 values whose sums depend on the order of the adds, over several of the TIES core's chunks (and a
    partial one): trimmed in place and merged bit for bit like the where-based rule with full-size sums."""
    from mergelab.methods._sparsify import _MERGE_CHUNKS, chunk_size, trim_and_merge_

    g = torch.Generator().manual_seed(n)
    m = 2 * chunk_size(n, torch.device("cpu")) * _MERGE_CHUNKS + 333
    x = torch.randn(n, m, generator=g) * torch.exp2(torch.randint(-20, 20, (n, m), generator=g).float())
    x[:, ::11] = -0.0
    x[1, ::13] = -x[0, ::13]  # exact cancellations: the majority sign decides
    th = magnitude_threshold(x, 0.3)
    keep = x.abs() >= th.unsqueeze(1)
    trimmed = torch.where(keep, x, torch.zeros(()))
    sign = torch.sign(trimmed.sum(dim=0))
    sign = torch.where(sign == 0, torch.sign(sign.sum()), sign)
    agree = ((trimmed > 0) & (sign > 0)) | ((trimmed < 0) & (sign < 0))
    want = torch.where(agree, trimmed, torch.zeros(())).sum(dim=0) / agree.sum(dim=0).clamp(min=1).float()
    y = x.clone()
    got = trim_and_merge_(y, th)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.equal(y, trimmed)


def test_trim_by_shrink_keeps_ties_and_handles_zero_and_infinite_thresholds() -> None:
    """The float32 trim (hardshrink just below each threshold) keeps ``|x| >= th`` exactly: entries equal to the
    threshold stay, a zero threshold trims nothing, an infinite one keeps only infinities; a NaN threshold takes
    the mask path (nothing compares >= NaN)."""
    from mergelab.methods._sparsify import trim_and_merge_

    g = torch.Generator().manual_seed(8)
    x = torch.round(torch.randn(2, 4096, generator=g) * 4) / 4  # many entries equal to the thresholds
    x[1, ::97] = float("inf")
    x[1, 5::97] = -float("inf")
    for th in ([0.0, 0.5], [0.75, float("inf")], [2.0**-149, 1.25]):
        t = torch.tensor(th)
        y = x.clone()
        trim_and_merge_(y, t)
        assert torch.equal(y, torch.where(x.abs() >= t.unsqueeze(1), x, torch.zeros(()))), th
    finite = x.clamp(-8.0, 8.0)
    y = finite.clone()
    trim_and_merge_(y, torch.tensor([float("nan"), 0.5]))
    assert torch.equal(y[0], torch.zeros(4096)) and torch.equal(y[1], finite[1] * (finite[1].abs() >= 0.5))


@pytest.mark.parametrize("dirty", [False, True])
def test_global_threshold_needs_one_pass_when_the_ranks_fall_on_bf16_exact_values(dirty: bool) -> None:
    """Global TIES statistics over bf16 task vectors finish after the first pass (the threshold is the bucket's
    bf16-exact smallest value); when a rank falls on other values the second pass runs. Exact either way."""
    from mergelab.methods._sparsify import GlobalMagnitudeThreshold

    parts = {"a": _bf16_deltas(2, 300_001, 1), "b": _bf16_deltas(2, 20_000, 2).reshape(2, 100, 200)}
    if dirty:  # every magnitude perturbed in its low bits
        parts = {k: v * (1.0 + 2.0**-20) for k, v in parts.items()}
    stats = GlobalMagnitudeThreshold(0.2, 2)
    passes = 0
    while True:
        passes += 1
        for name, v in parts.items():
            stats.update(name, v)
        stats.add_zeros(5_000)
        if not stats.finish_pass():
            break
    flat = torch.cat([v.reshape(2, -1) for v in parts.values()] + [torch.zeros(2, 5_000)], dim=1).abs()
    assert torch.equal(stats.thresholds, flat.kthvalue(int(flat.shape[1] * 0.8), dim=1).values)
    assert passes == (2 if dirty else 1)
