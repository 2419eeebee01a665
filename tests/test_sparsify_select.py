"""TIES's exact magnitude selection with reused chunk buffers (issue 22): the radix select's passes write ``|x|``
into one buffer per pass; the kept set must stay the official rule ``|tau_i| >= kthvalue(j)`` whatever the dtype,
layout or number of equal magnitudes at the threshold."""

from __future__ import annotations

import pytest
import torch

from mergelab.methods._sparsify import _SELECT_CHUNK, kth_smallest_abs, magnitude_threshold, trim_to_threshold


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
