"""Hand-computed cases per method (STYLE.md 12), TIES global top-k, DARE statistics, hyperparameter validation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mergelab.methods import METHODS, MergeContext
from mergelab.methods._sparsify import GlobalMagnitudeThreshold, dare_drop, disjoint_merge, trim_to_threshold
from mergelab.methods.base import tensor_generator, tensor_seed
from mergelab.methods.iso import IsoCConfig, IsoCtsConfig, iso_c, iso_cts, iso_cts_split
from mergelab.methods.task_arithmetic import TaskArithmeticConfig, task_arithmetic
from mergelab.methods.ties import TiesConfig, ties
from mergelab.methods.tsv import TsvConfig, tsv

CTX = MergeContext(name="w")


def test_weight_average_and_task_arithmetic_by_hand() -> None:
    d = torch.tensor([[[1.0, -2.0]], [[3.0, 5.0]]])
    wa = METHODS["weight_average"]
    torch.testing.assert_close(wa.fn(torch.zeros(1, 2), d, wa.make_config(), CTX), torch.tensor([[2.0, 1.5]]))
    torch.testing.assert_close(
        task_arithmetic(None, d, TaskArithmeticConfig(), CTX), torch.tensor([[4.0, 3.0]])
    )
    cfg = TaskArithmeticConfig(coefficients=(0.5, 2.0))
    torch.testing.assert_close(task_arithmetic(None, d, cfg, CTX), torch.tensor([[6.5, 9.0]]))


def test_task_arithmetic_coefficients_must_match_experts() -> None:
    with pytest.raises(ValueError, match=r"coefficients has 3 entries but tensor w has 2 experts"):
        task_arithmetic(None, torch.ones(2, 4), TaskArithmeticConfig(coefficients=(1.0, 1.0, 1.0)), CTX)


def test_ties_by_hand() -> None:
    """density 0.4 of 5 entries: j = int(5 * 0.6) = 3; the 3rd smallest |tau_i| is the threshold and, as in the
    official code (``abs >= kthvalue``), entries equal to it are kept.

    thresholds 1, 3, 2 give e1 = [4, -3, 1, 0, 0], e2 = [-4.5, 0, -5, 0, 3], e3 = [2, 0, 0, -6, -3]; summed signs
    [+, -, -, -, 0]; the 0 takes the majority sign (-2 -> -). Disjoint means: (4 + 2) / 2 = 3, -3, -5 (the +1
    disagrees), -6, -3.
    """
    d = torch.tensor([[4.0, -3.0, 1.0, 0.5, -0.2], [-4.5, 2.0, -5.0, 0.1, 3.0], [2.0, 1.0, 0.3, -6.0, -3.0]])
    out = ties(None, d, TiesConfig(density=0.4), CTX)
    torch.testing.assert_close(out, torch.tensor([3.0, -3.0, -5.0, -6.0, -3.0]))


def test_ties_density_one_identical_experts_is_the_expert() -> None:
    d = torch.randn(6, 4)
    torch.testing.assert_close(ties(None, torch.stack([d, d, d]), TiesConfig(density=1.0), CTX), d)


def test_ties_global_equals_brute_force_top_k() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 40, 30, generator=g),
        "b": 3.0 * torch.randn(3, 77, generator=g),
        "c": torch.round(torch.randn(3, 16, 16, generator=g) * 4) / 4,  # many exact ties at the threshold
    }
    for density in (0.3, 0.05, 1.0):
        cfg = TiesConfig(density=density, scope="global")
        stats = METHODS["ties"].make_stats(cfg, 3)
        passes = 0
        while True:
            for k, v in tensors.items():
                stats.update(k, v)
            passes += 1
            if not stats.finish_pass():
                break
        assert passes == (1 if density == 1.0 else 2)
        flat = torch.cat([v.reshape(3, -1) for v in tensors.values()], dim=1).abs()
        j = int(flat.shape[1] * (1 - density))
        expected_thr = flat.kthvalue(j, dim=1).values if j else torch.zeros(3)
        assert torch.equal(stats.thresholds, expected_thr)
        for k, v in tensors.items():
            out = ties(None, v, cfg, MergeContext(name=k, stats=stats))
            keep = v.abs() >= expected_thr.reshape((3,) + (1,) * (v.dim() - 1))
            torch.testing.assert_close(out, disjoint_merge(v * keep))


def test_ties_global_counts_unstreamed_zero_tensors() -> None:
    """``add_zeros`` gives the same threshold as streaming an all-zero tensor (as the official flatten does)."""
    v = torch.randn(2, 30, 20, generator=torch.Generator().manual_seed(11))
    for density in (0.2, 0.9):  # threshold inside the non-zero values, and inside the zeros (threshold 0)
        a = GlobalMagnitudeThreshold(density, 2)
        b = GlobalMagnitudeThreshold(density, 2)
        while True:
            a.update("v", v)
            a.update("z", torch.zeros(2, 700))
            b.update("v", v)
            b.add_zeros(700)
            more_a, more_b = a.finish_pass(), b.finish_pass()
            assert more_a == more_b
            if not more_a:
                break
        assert torch.equal(a.thresholds, b.thresholds)
    assert a.thresholds.eq(0).all()


def test_ties_global_without_stats_is_an_error() -> None:
    with pytest.raises(ValueError, match="make_stats"):
        ties(None, torch.randn(2, 5), TiesConfig(scope="global"), CTX)


def test_dare_ties_global_replays_the_same_masks_in_every_pass() -> None:
    v = torch.randn(3, 50, 20)
    cfg = METHODS["dare_ties"].make_config({"scope": "global", "density": 0.5, "seed": 7})
    stats = METHODS["dare_ties"].make_stats(cfg, 3)
    stats.update("w", v)
    while stats.finish_pass():
        stats.update("w", v)
    dropped = stats.prepare("w", v)
    assert 0.7 < (dropped != 0).float().mean() < 0.9  # p = 0.2
    flat = dropped.reshape(3, -1).abs()
    assert torch.equal(stats.thresholds, flat.kthvalue(int(flat.shape[1] * 0.5), dim=1).values)
    out = ties(None, v, cfg, MergeContext(name="w", stats=stats))
    torch.testing.assert_close(out, disjoint_merge(trim_to_threshold(dropped, stats.thresholds)))


def test_dare_drop_rescale_and_mean_over_seeds() -> None:
    spec = METHODS["dare_task_arithmetic"]
    cfg = spec.make_config({})
    assert cfg.drop_rate == 0.2 and METHODS["dare_ties"].make_config({}).drop_rate == 0.2
    d = torch.randn(1, 64)
    outs = torch.stack(
        [spec.fn(None, d, cfg, MergeContext(generator=torch.Generator().manual_seed(s))) for s in range(400)]
    )
    kept = outs != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.01
    torch.testing.assert_close(outs[kept], (d[0] / 0.8).expand_as(outs)[kept])
    # E[DARE(tau)] = tau; the std of the mean over 400 seeds is |tau| * sqrt(p / (1 - p) / 400) = |tau| / 40
    assert ((outs.mean(0) - d[0]).abs() <= 4 * d[0].abs() / 40 + 1e-6).all()
    assert not torch.equal(outs[0], outs[1])
    torch.testing.assert_close(spec.fn(None, d, spec.make_config({"drop_rate": 0.0}), CTX), d[0])


def test_tsv_orthogonal_tasks_sum() -> None:
    """Tasks with mutually orthogonal singular subspaces, each of rank <= r = min(m,n)/N: U_hat and V_hat already
    have orthonormal columns/rows, so their polar factors are themselves and TSV returns sum_i tau_i exactly."""
    g = torch.Generator().manual_seed(4)
    u = torch.linalg.qr(torch.randn(12, 12, generator=g)).Q
    v = torch.linalg.qr(torch.randn(9, 9, generator=g)).Q
    s = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.25, 0.1])
    deltas = torch.stack(
        [(u[:, 3 * i : 3 * i + 3] * s[3 * i : 3 * i + 3]) @ v[:, 3 * i : 3 * i + 3].T for i in range(2)]
    )
    out = tsv(None, deltas, TsvConfig(), CTX)  # r = 9 // 2 = 4 >= rank 3
    torch.testing.assert_close(out, deltas.sum(0), rtol=1e-4, atol=1e-5)
    # overlapping tasks: the output has the concatenated spectrum (orthogonalisation only rotates the bases)
    deltas = 0.1 * torch.randn(3, 12, 9, generator=g)
    out = tsv(None, deltas, TsvConfig(), CTX)
    s_hat = torch.linalg.svdvals(deltas)[:, :3].reshape(-1).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(out), s_hat, rtol=1e-4, atol=1e-5)


def test_iso_c_by_hand() -> None:
    """tau_1 = diag(3, 0), tau_2 = diag(0, 1): the sum diag(3, 1) has spectrum (3, 1); its mean 2 gives diag(2, 2)."""
    d = torch.stack([torch.diag(torch.tensor([3.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))])
    torch.testing.assert_close(iso_c(None, d, IsoCConfig(), CTX), 2.0 * torch.eye(2))


def test_iso_cts_structure() -> None:
    """common_space_fraction 1 is Iso-C; otherwise the result is isotropic (one distinct singular value) and differs
    from Iso-C when tasks have their own low-rank directions."""
    g = torch.Generator().manual_seed(5)
    d = torch.stack([torch.randn(16, 2, generator=g) @ torch.randn(2, 12, generator=g) for _ in range(3)])
    d = d + 0.01 * torch.randn(3, 16, 12, generator=g)
    torch.testing.assert_close(
        iso_cts(None, d, IsoCtsConfig(common_space_fraction=1.0), CTX), iso_c(None, d, IsoCConfig(), CTX)
    )
    out = iso_cts(None, d, IsoCtsConfig(common_space_fraction=0.5), CTX)
    sv = torch.linalg.svdvals(out)
    torch.testing.assert_close(sv, sv.mean().expand_as(sv), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, iso_c(None, d, IsoCConfig(), CTX), atol=1e-3)
    # scale: the mean of the stacked spectrum (6 common directions of the sum, then 2 per task)
    u, s, _ = torch.linalg.svd(d.sum(0), full_matrices=False)
    resid = d - u[:, :6] @ (u[:, :6].T @ d)
    stacked = torch.cat([s[:6], torch.linalg.svdvals(resid)[:, :2].reshape(-1)])
    torch.testing.assert_close(sv.mean(), stacked.mean(), rtol=1e-4, atol=1e-6)


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("task_arithmetic", {"lam": float("nan")}, "lam"),
    ("task_arithmetic", {"coefficients": (1.0, "x")}, "coefficients"),
    ("task_arithmetic", {"coefficients": 3.0}, "coefficients"),
    ("dare_task_arithmetic", {"drop_rate": 1.0}, "drop_rate"),
    ("dare_task_arithmetic", {"drop_rate": -0.1}, "drop_rate"),
    ("ties", {"density": 0.0}, "density"),
    ("ties", {"density": 1.5}, "density"),
    ("ties", {"scope": "model"}, "scope"),
    ("ties", {"seed": -1}, "seed"),
    ("dare_ties", {"drop_rate": 2}, "drop_rate"),
    ("tsv", {"rank_ratio": 0.0}, "rank_ratio"),
    ("tsv", {"lam": "big"}, "lam"),
    ("iso_c", {"lam": math.inf}, "lam"),
    ("iso_cts", {"common_space_fraction": 1.2}, "common_space_fraction"),
    ("wudi", {"steps": 0}, "steps"),
    ("wudi", {"lr": -1e-5}, "lr"),
    ("wudi", {"optimizer": "rmsprop"}, "optimizer"),
    ("optmerge", {"variant": "half"}, "variant"),
    ("optmerge", {"rank_ratio": 1.5}, "rank_ratio"),
    ("optmerge", {"steps": 2.5}, "steps"),
    ("optmerge", {"momentum": 1.0}, "momentum"),
    ("optmerge", {"init": "zeros"}, "init"),
    ("optmerge", {"projector": "both"}, "projector"),
    ("optmerge", {"compute_dtype": "int8"}, "compute_dtype"),
    ("optmerge", {"solver": "closed"}, "solver"),
    ("optmerge", {"solver": "exact", "optimizer": "adam"}, "solver"),
    ("optmerge", {"svd": "randomized"}, "svd"),
]


@pytest.mark.parametrize(("name", "params", "field"), BAD)
def test_out_of_range_hyperparameters_are_named(name: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        METHODS[name].make_config(params)
    assert "\n" not in str(info.value)


def test_bad_table_names_registered_methods() -> None:
    """Every method's coefficients are validated by the conformance suite; this table adds per-field cases."""
    assert {name for name, _, _ in BAD} <= set(METHODS)


@pytest.mark.parametrize("name", ["task_arithmetic", "wudi"])
def test_a_zero_expert_is_left_out(name: str) -> None:
    """Task arithmetic sums it away; WUDI leaves it out of the loss and its sum init: both equal the merge of the
    other two experts."""
    g = torch.Generator().manual_seed(3)
    deltas = 0.02 * torch.randn(3, 8, 6, generator=g)
    deltas[1] = 0.0
    spec = METHODS[name]
    out = spec.fn(None, deltas, spec.make_config(), CTX)
    torch.testing.assert_close(
        out, spec.fn(None, deltas[[0, 2]], spec.make_config(), CTX), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize(
    ("p", "t", "fraction", "expected"),
    [
        (512, 5, 0.8, (407, 21)),  # 103 / 5 = 20.6 -> 21 (rounding down gave 20 and k_c = 412)
        (4864, 5, 0.8, (3889, 195)),  # 973 / 5 = 194.6 -> 195
        (18944, 5, 0.8, (15154, 758)),  # 3789 / 5 = 757.8 -> 758
        (12, 5, 0.8, (7, 1)),  # 3 / 5 = 0.6 -> 1
        (12, 3, 0.5, (6, 2)),  # exact
        (10, 4, 0.8, (10, 0)),  # 2 / 4 = 0.5 -> 0 (half to even, as Python's round in the reference code)
        (3, 2, 0.1, (1, 1)),  # 3 / 2 = 1.5 -> 2 would need 4 > 3 directions: capped at 3 // 2
    ],
)
def test_iso_cts_split_rounds_to_nearest(p: int, t: int, fraction: float, expected: tuple[int, int]) -> None:
    k_c, share = iso_cts_split(p, t, fraction)
    assert (k_c, share) == expected and k_c >= 0 and k_c + t * share == p


def test_iso_cts_uses_the_rounded_up_share() -> None:
    """16 x 12, 5 tasks, fraction 0.8: 12 - 9 = 3 directions for 5 tasks round to 1 each, so k_c = 7 and the scale
    is the mean of the sum's top 7 singular values and each residual's top one."""
    g = torch.Generator().manual_seed(6)
    d = 0.1 * torch.randn(5, 16, 12, generator=g)
    out = iso_cts(None, d, IsoCtsConfig(), CTX)
    u, s, _ = torch.linalg.svd(d.sum(0), full_matrices=False)
    resid = d - u[:, :7] @ (u[:, :7].T @ d)
    stacked = torch.cat([s[:7], torch.linalg.svdvals(resid)[:, :1].reshape(-1)])
    torch.testing.assert_close(torch.linalg.svdvals(out).mean(), stacked.mean(), rtol=1e-4, atol=1e-6)


def test_tsv_drops_zero_singular_triplets_of_low_rank_task_vectors() -> None:
    """Rank-2 task vectors (LoRA-like) with r = 9 // 2 = 4 > 2: the zero triplets (arbitrary singular vectors) are
    left out, so the result equals TSV truncated at the true rank (rank_ratio 2/9) and does not depend on them."""
    g = torch.Generator().manual_seed(7)
    d64 = torch.stack(
        [torch.randn(12, 2, generator=g).double() @ torch.randn(2, 9, generator=g).double() for _ in "ab"]
    )
    d = (0.1 * d64).float()
    out = tsv(None, d, TsvConfig(), CTX)
    torch.testing.assert_close(out, tsv(None, d, TsvConfig(rank_ratio=2 / 9), CTX), rtol=1e-4, atol=1e-6)
    assert int(torch.linalg.matrix_rank(out)) == 4
    # float32 and float64 see different rounding noise in the null directions, yet agree once it is dropped
    torch.testing.assert_close(out.double(), tsv(None, 0.1 * d64, TsvConfig(), CTX), rtol=1e-4, atol=1e-6)


def test_iso_c_span_only_stays_in_the_tasks_span() -> None:
    """Two rank-2 task vectors: the sum has rank 4 of min(m, n) = 9. The paper's Iso-C spreads mean(S) over all 9
    directions (5 of them noise outside the span); span_only keeps the 4 with s > 0, each at their mean."""
    g = torch.Generator().manual_seed(8)
    d = (
        torch.stack([torch.randn(12, 2, generator=g) @ torch.randn(2, 9, generator=g) for _ in range(2)])
        * 0.1
    )
    s = torch.linalg.svdvals(d.sum(0))
    paper = iso_c(None, d, IsoCConfig(), CTX)
    span = iso_c(None, d, IsoCConfig(span_only=True), CTX)
    torch.testing.assert_close(torch.linalg.svdvals(paper), s.mean().expand(9), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.linalg.svdvals(span)[:4], s[:4].mean().expand(4), rtol=1e-4, atol=1e-6)
    assert torch.linalg.svdvals(span)[4:].max() < 1e-5
    q_left = torch.linalg.svd(torch.cat([d[0], d[1]], dim=1)).U[:, :4]  # the tasks' joint column span
    torch.testing.assert_close(q_left @ (q_left.T @ span), span, rtol=1e-4, atol=1e-6)
    outside = paper - q_left @ (q_left.T @ paper)
    assert outside.norm() ** 2 > 0.5 * paper.norm() ** 2  # 5 of 9 isotropic directions lie outside the span
    full = 0.1 * torch.randn(2, 12, 9, generator=g)  # full rank: both agree
    torch.testing.assert_close(
        iso_c(None, full, IsoCConfig(span_only=True), CTX), iso_c(None, full, IsoCConfig(), CTX)
    )


def test_dare_ties_global_draws_from_the_merge_contexts_generator() -> None:
    """Global DARE-TIES draws each tensor's masks from tensor_generator(seed, name), the generator the engine puts in
    ctx.generator for that tensor at merge seed ``seed``: the same masks as the tensor-scope path with that ctx."""
    v = torch.randn(3, 40, 10)
    cfg = METHODS["dare_ties"].make_config({"scope": "global", "density": 1.0, "seed": 4})
    stats = METHODS["dare_ties"].make_stats(cfg, 3)
    ctx = MergeContext(name="layer.w", generator=tensor_generator(4, "layer.w"))
    torch.testing.assert_close(stats.prepare("layer.w", v), dare_drop(v, 0.2, ctx), rtol=0, atol=0)
    assert tensor_seed(4, "layer.w") == tensor_generator(4, "layer.w").initial_seed()
