"""benchmarks/optmerge_cost.py: the per-step FLOP model behind the full variant's bound, and the per-layer table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import optmerge_cost as oc  # noqa: E402

from mergelab.methods._linalg import _gradient_fn  # noqa: E402
from mergelab.methods.optmerge import OptMergeConfig, optmerge_factors  # noqa: E402


def _official_step_flops(d: torch.Tensor) -> int:
    """FLOPs torch counts for one step of the official m x m form (forward and backward)."""
    t_, m, n = d.shape
    k = min(m, n) // t_
    lows = []
    for i in range(t_):
        _, s, vh = torch.linalg.svd(d[i], full_matrices=True)
        low = torch.zeros(m, n)
        low[:k] = s[:k, None] * vh[:k]
        lows.append(low)
    x = d.sum(0).clone().requires_grad_(True)
    with FlopCounterMode(display=False) as fc:
        loss = sum(((x - d[i]) @ low.T).square().sum() for i, low in enumerate(lows))
        loss.backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("shape", [(12, 60), (60, 12), (30, 30), (8, 40)])
def test_flop_model_counts_what_torch_runs(shape: tuple[int, int]) -> None:
    """``step_flops`` equals the FLOPs torch counts for our gradient and for the official step, per orientation."""
    d = 0.01 * torch.randn(5, *shape, generator=torch.Generator().manual_seed(0))
    f, h = optmerge_factors(d, OptMergeConfig(variant="full"))
    grad = _gradient_fn(f, h)
    with FlopCounterMode(display=False) as fc:
        grad(d.sum(0))
    ours, official = oc.step_flops(*shape, experts=5)
    assert fc.get_total_flops() == ours
    assert _official_step_flops(d) == official


def test_flop_table_and_layer_families(capsys: pytest.CaptureFixture[str]) -> None:
    """Both families' decoder layers are seven projections; a whole layer is >= 10x by FLOPs, a wide one ~5x."""
    oc.flop_table(5)
    out = capsys.readouterr().out
    for projs in oc.LAYERS.values():
        assert [p for p, _ in projs] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        ours = sum(oc.step_flops(m, n, 5)[0] for _, (m, n) in projs)
        official = sum(oc.step_flops(m, n, 5)[1] for _, (m, n) in projs)
        assert official / ours >= 10
        assert f"{official / ours:6.1f}x" in out
    assert oc.step_flops(896, 4864, 5)[1] / oc.step_flops(896, 4864, 5)[0] == pytest.approx(5.0, rel=0.01)


def test_per_step_layer_row_sums_each_shape_times_its_count(capsys: pytest.CaptureFixture[str]) -> None:
    """``--layer``'s last row: each shape's seconds times the projections it stands for, and the FLOP ratio."""
    counts = {(16, 40): ("a", "b"), (40, 16): ("c",)}
    oc.per_step_table(list(counts), 3, 20, 1, 2, torch.device("cpu"), counts)
    lines = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.strip().startswith(("16x40", "40x16", "one"))}
    assert set(rows) == {"16x40", "40x16", "one"}
    step = 2 * float(rows["16x40"][2]) + float(rows["40x16"][2])
    assert float(rows["one"][3]) == pytest.approx(step, abs=2e-4)
    fl = [oc.step_flops(16, 40, 3), oc.step_flops(40, 16, 3)]
    want = (2 * fl[0][1] + fl[1][1]) / (2 * fl[0][0] + fl[1][0])
    assert rows["one"][8] == f"{want:.1f}x"
