"""The chunked TIES/DARE/task-arithmetic kernels against their plain full-size formulations (issue 2).

The fast paths must reproduce the official rule exactly: the threshold is ``kthvalue(int(numel * (1 - density)))``
of ``|tau_i|`` (ties at the threshold kept), and the merged values are bit-identical to the where-based formulation.
Dyadic test data (multiples of 1/4, small) make every sum exact in any order, so the bitwise checks do not depend
on how torch splits a reduction.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mergelab.methods import METHODS, MergeContext
from mergelab.methods._sparsify import (
    dare_drop,
    disjoint_merge,
    kth_smallest_abs,
    magnitude_threshold,
    trim_and_merge_,
    trim_to_threshold,
)
from mergelab.methods.task_arithmetic import TaskArithmeticConfig, task_arithmetic, weighted_sum
from mergelab.methods.ties import TiesConfig, ties


def bits(t: Tensor) -> Tensor:
    """The raw bit patterns (so that -0.0 and +0.0 differ)."""
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def ref_trim(d: Tensor, th: Tensor) -> Tensor:
    keep = d.abs().to(torch.float32) >= th.reshape((d.shape[0],) + (1,) * (d.dim() - 1))
    return torch.where(keep, d, torch.zeros((), dtype=d.dtype))


def ref_merge(trimmed: Tensor) -> Tensor:
    sign = torch.sign(trimmed.sum(dim=0))
    sign = torch.where(sign == 0, torch.sign(sign.sum()), sign)
    agree = ((trimmed > 0) & (sign > 0)) | ((trimmed < 0) & (sign < 0))
    kept = torch.where(agree, trimmed, torch.zeros((), dtype=trimmed.dtype))
    return kept.sum(dim=0) / agree.sum(dim=0).clamp(min=1).to(trimmed.dtype)


def sample(kind: str, n: int, m: int, g: torch.Generator) -> Tensor:
    x = torch.randn(n, m, generator=g)
    if kind == "ties":  # many exact ties
        x = torch.round(x * 4) / 4
    elif kind == "zeros":  # mostly zeros (the threshold falls on 0), signed zeros included
        x = torch.round(x * 4) / 4 * (torch.rand(n, m, generator=g) < 0.15)
        x[:, ::7] = -0.0
    elif kind == "spread":  # magnitudes over many octaves, subnormals included
        x = x * torch.exp2(torch.randint(-140, 60, (n, m), generator=g).float())
    return x


@pytest.mark.parametrize("kind", ["gauss", "ties", "zeros", "spread"])
@pytest.mark.parametrize("m", [1, 37, 5000, 70_001])  # below and above the radix cut-over, several chunks
def test_kth_smallest_abs_equals_kthvalue(kind: str, m: int) -> None:
    g = torch.Generator().manual_seed(m)
    x = sample(kind, 3, m, g)
    a = x.abs()
    for k in sorted({1, m, (m + 1) // 2, max(1, int(m * 0.8)), max(1, m - 3)}):
        assert torch.equal(bits(kth_smallest_abs(x, k)), bits(a.kthvalue(k, dim=1).values)), k
    for dt in (torch.float64, torch.bfloat16, torch.float16):
        y = x.to(dt)
        k = max(1, int(m * 0.8))
        assert torch.equal(kth_smallest_abs(y, k), y.abs().float().kthvalue(k, dim=1).values)
    with pytest.raises(ValueError, match="k must be in"):
        kth_smallest_abs(x, m + 1)


def test_magnitude_threshold_semantics() -> None:
    x = sample("ties", 2, 40_000, torch.Generator().manual_seed(1)).reshape(2, 200, 200)
    for density in (0.2, 0.5, 0.999, 1.0):
        j = int(40_000 * (1 - density))
        want = x.reshape(2, -1).abs().kthvalue(j, dim=1).values if j else torch.zeros(2)
        assert torch.equal(magnitude_threshold(x, density), want)


@pytest.mark.parametrize("n", [1, 2, 3, 6])
@pytest.mark.parametrize("kind", ["ties", "zeros"])
def test_trim_and_merge_is_bit_identical_to_the_where_rule(n: int, kind: str) -> None:
    g = torch.Generator().manual_seed(n)
    for m in (1, 300, 70_003):
        x = sample(kind, n, m, g)
        for density in (0.2, 0.7, 1.0):
            th = magnitude_threshold(x, density)
            want = ref_merge(ref_trim(x, th))
            y = x.clone()
            got = trim_and_merge_(y, th)
            assert torch.equal(bits(got), bits(want)), (m, density)
            assert torch.equal(y, ref_trim(x, th))  # trimmed in place
            assert torch.equal(bits(disjoint_merge(ref_trim(x, th))), bits(want))
            assert torch.equal(bits(trim_to_threshold(x, th)), bits(ref_trim(x, th)))


def test_majority_sign_breaks_exact_cancellations() -> None:
    # column 0 cancels exactly (+1 and -1): the elected sign is the tensor's majority (negative here)
    x = torch.tensor([[1.0, -2.0, -3.0, 0.0], [-1.0, -1.0, 1.0, 0.0]])
    for want_sign, xx in ((-1.0, x), (1.0, -x)):
        got = trim_and_merge_(xx.clone(), torch.zeros(2))
        assert torch.equal(bits(got), bits(ref_merge(xx)))
        assert got[0] == want_sign and bits(got[3]) == 0  # nothing agrees: +0.0
    even = torch.tensor([[1.0, 2.0, -3.0], [-1.0, 0.0, 0.0]])  # one + and one - sum: majority 0 -> 0
    assert torch.equal(bits(disjoint_merge(even)), bits(ref_merge(even)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_ties_matches_the_full_size_rule_on_random_floats(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    x = (0.01 * torch.randn(3, 130, 517, generator=g)).to(dtype)
    th = x.reshape(3, -1).abs().float().kthvalue(int(x[0].numel() * 0.8), dim=1).values
    want = ref_merge(ref_trim(x, th))
    got = ties(None, x.clone(), TiesConfig(density=0.2), MergeContext(name="w"))
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dare_drop_keeps_its_masks_and_leaves_the_input_alone() -> None:
    x = torch.randn(3, 50, 40)
    before = x.clone()
    out = dare_drop(x, 0.3, MergeContext(), torch.Generator().manual_seed(9))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(bits(out), bits(torch.where(u >= 0.3, x / 0.7, torch.zeros(()))))
    assert torch.equal(x, before) and dare_drop(x, 0.0, MergeContext()) is x


def test_weighted_sum_and_task_arithmetic_without_full_size_product() -> None:
    g = torch.Generator().manual_seed(3)
    for m in (1, 255, 70_001):
        x = sample("ties", 4, m, g)
        coef = torch.tensor([0.5, -1.25, 2.0, 0.75])
        assert torch.equal(bits(weighted_sum(x, coef)), bits((x * coef[:, None]).sum(0)))
        r = torch.randn(4, m, generator=g)
        torch.testing.assert_close(weighted_sum(r, coef), (r * coef[:, None]).sum(0))
        cfg = TaskArithmeticConfig(coefficients=(0.5, -1.25, 2.0, 0.75))
        assert torch.equal(task_arithmetic(None, x, cfg, MergeContext()), (x * coef[:, None]).sum(0))
        assert torch.equal(task_arithmetic(None, r, TaskArithmeticConfig(), MergeContext()), r.sum(0))


def test_dare_ties_repeated_calls_on_one_buffer_agree() -> None:
    x = torch.randn(3, 80, 90)
    spec = METHODS["dare_ties"]
    cfg = spec.make_config({"density": 0.3})
    a = spec.fn(None, x, cfg, MergeContext(name="w", generator=torch.Generator().manual_seed(1)))
    b = spec.fn(None, x, cfg, MergeContext(name="w", generator=torch.Generator().manual_seed(1)))
    assert torch.equal(a, b)


def test_huge_tie_buckets_and_global_stats_over_many_chunks() -> None:
    """A bucket holding more than the pending-candidate bound (mostly zeros) and the two-pass global statistics on
    tensors spanning many chunks both give kthvalue's exact answer."""
    from mergelab.methods._sparsify import _FLUSH, GlobalMagnitudeThreshold

    g = torch.Generator().manual_seed(4)
    m = _FLUSH + 300_000
    x = torch.randn(2, m, generator=g) * (torch.rand(2, m, generator=g) < 0.1)
    for k in (1, int(m * 0.5), int(m * 0.95), m):
        assert torch.equal(kth_smallest_abs(x, k), x.abs().kthvalue(k, dim=1).values)
    parts = {
        "a": x[:, :200_000].reshape(2, 400, 500),
        "b": torch.randn(2, 150_001, generator=g),
        "c": x[:, -5:],
    }
    for density in (0.2, 0.97):
        stats = GlobalMagnitudeThreshold(density, 2)
        while True:
            for k, v in parts.items():
                stats.update(k, v)
            if not stats.finish_pass():
                break
        flat = torch.cat([v.reshape(2, -1) for v in parts.values()], dim=1).abs()
        assert torch.equal(stats.thresholds, flat.kthvalue(int(flat.shape[1] * (1 - density)), dim=1).values)
