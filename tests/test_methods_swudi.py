"""SWUDI and SWUDI-A (arXiv 2606.07289): hand-computed cases, rank rules, official defaults, and agreement with the
reference formula written out with full n x n stacks (as the authors' code does)."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab.methods import METHODS, MergeContext
from mergelab.methods.swudi import SwudiAConfig, SwudiConfig, swudi, swudi_a, swudi_rank

CTX = MergeContext(name="w")

# tau_1 = diag(1, 1), tau_2 = diag(3, 2): w = (1/2, 1/13); C = diag(1/2 + 9/13, 1/2 + 4/13) = diag(31/26, 21/26);
# D = sum_i w_i tau_i^3 = diag(1/2 + 27/13, 1/2 + 8/13) = diag(67/26, 29/26); minimiser x* = D C^-1 =
# diag(67/31, 29/21); sum init x0 = diag(4, 3), mean init diag(2, 1.5).
DIAG = torch.stack([torch.diag(torch.tensor([1.0, 1.0])), torch.diag(torch.tensor([3.0, 2.0]))]).double()
E = (31 / 26, 21 / 26)
X_STAR = (67 / 31, 29 / 21)


def diag(a: float, b: float) -> torch.Tensor:
    return torch.diag(torch.tensor([a, b], dtype=torch.float64))


def test_official_defaults() -> None:
    s, a = METHODS["swudi"].make_config(), METHODS["swudi_a"].make_config()
    assert (s.lam, s.exp_time, s.rank_ratio, s.filter, s.init, s.min_eigenvalue) == (
        1.0,
        300.0,
        0.65,
        "exponential",
        "sum",
        1e-8,
    )
    assert (a.lam, a.rank_rule, a.min_rank, a.max_rank_ratio, a.rank_scale, a.filter, a.init) == (
        1.0,
        "participation_sqrt",
        1,
        1.0,
        1.0,
        "none",
        "sum",
    )
    assert METHODS["swudi"].matrix_only and METHODS["swudi_a"].matrix_only


def test_no_filter_every_direction_is_the_minimiser() -> None:
    out = swudi(None, DIAG, SwudiConfig(filter="none", rank_ratio=None), CTX)
    torch.testing.assert_close(out, diag(*X_STAR))
    out = swudi_a(None, DIAG, SwudiAConfig(rank_rule="none"), CTX)
    torch.testing.assert_close(out, diag(*X_STAR))


def test_rank_truncation_keeps_the_init_outside_the_top_k() -> None:
    """rank_ratio 0.5: K = floor(2 * 0.5 + 0.999) = 1 keeps the largest eigenvalue 31/26 (direction e1); e2 keeps
    x0's value: the sum init gives 3, the mean init 1.5, the zero init 0."""
    for init, x0 in (("sum", 3.0), ("mean", 1.5), ("zero", 0.0)):
        out = swudi(None, DIAG, SwudiConfig(filter="none", rank_ratio=0.5, init=init), CTX)
        torch.testing.assert_close(out, diag(X_STAR[0], x0))


def test_exponential_filter_is_the_gradient_flow_at_exp_time() -> None:
    """g_j = 1 - exp(-e_j t): each diagonal entry is x0 (1 - g) + x* g (the flow of dx/dt = -(x C - D))."""
    t = 1.0
    out = swudi(None, DIAG, SwudiConfig(exp_time=t, rank_ratio=None), CTX)
    g = [1.0 - math.exp(-e * t) for e in E]
    want = diag(4.0 * (1 - g[0]) + X_STAR[0] * g[0], 3.0 * (1 - g[1]) + X_STAR[1] * g[1])
    torch.testing.assert_close(out, want)
    out = swudi(None, DIAG, SwudiConfig(exp_time=t, rank_ratio=None, init="zero"), CTX)
    torch.testing.assert_close(out, diag(X_STAR[0] * g[0], X_STAR[1] * g[1]))


def test_coefficients_weigh_loss_and_init() -> None:
    """c = (2, 1): w = (1, 1/13); C = diag(22/13, 17/13), D = diag(40/13, 21/13): x* = diag(20/11, 21/17); the sum
    init 2 tau_1 + tau_2 = diag(5, 4) shows on the direction the rank cut leaves (e2)."""
    cfg = SwudiConfig(filter="none", rank_ratio=0.5, coefficients=(2.0, 1.0))
    torch.testing.assert_close(swudi(None, DIAG, cfg, CTX), diag(20 / 11, 4.0))


def test_equivariant_under_rotations() -> None:
    """Rotating every task vector U tau_i W^T rotates the merge the same way (the method sees only Gram matrices)."""
    g = torch.Generator().manual_seed(0)
    d = 0.1 * torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64)).Q
    w = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64)).Q
    for fn, cfg in ((swudi, SwudiConfig()), (swudi_a, SwudiAConfig())):
        torch.testing.assert_close(fn(None, u @ d @ w.T, cfg, CTX), u @ fn(None, d, cfg, CTX) @ w.T)


@pytest.mark.parametrize(
    ("rule", "k"),
    [
        ("participation_sqrt", 3),  # y = (4, 2, 1, 0): 49 / 21 = 2.33 -> 3
        ("participation", 2),  # 21^2 / 273 = 1.62 -> 2
        ("stable_rank", 2),  # 273 / 256 = 1.07 -> 2
        ("entropy", 2),  # p = (16, 4, 1) / 21: exp(H) = 1.95 -> 2
        ("cumvar_0.9", 2),  # cumulative shares 0.76, 0.95, 1, 1
        ("cumvar_0.99", 3),
        ("none", 4),
        (
            "gavish_donoho",
            2,
        ),  # beta 1: threshold 1.195 * median(4, 2, 1, 1e-4) (lower median 1): 4 and 2 pass
    ],
)
def test_rank_rules_by_hand(rule: str, k: int) -> None:
    e_desc = torch.tensor([16.0, 4.0, 1.0, 0.0]).clamp(min=1e-8)
    assert swudi_rank(e_desc, 4, 4, rule) == k


def test_swudi_a_rank_bounds() -> None:
    """K is bounded by min_rank and round(max_rank_ratio * n), then scaled by rank_scale (at most n)."""
    d = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1)).double()
    zero_init = {"init": "zero", "rank_rule": "stable_rank"}
    kept = {}
    for name, extra in (("base", {}), ("min3", {"min_rank": 3}), ("max1", {"max_rank_ratio": 0.25}),
                        ("scale9", {"rank_scale": 9.0})):  # fmt: skip
        out = swudi_a(None, d, SwudiAConfig(**zero_init, **extra), CTX)
        kept[name] = int(torch.linalg.matrix_rank(out))
    assert kept["min3"] == max(3, kept["base"]) and kept["max1"] == 1 and kept["scale9"] == 4


def reference(deltas: torch.Tensor, *, k: int, exp_time: float | None, init: str) -> torch.Tensor:
    """The published closed form with full n x n stacks (B_i = tau_i^T tau_i, einsum sums, eigh, top-k mask)."""
    v = deltas.double()
    inv = 1.0 / v.reshape(v.shape[0], -1).square().sum(1)
    b = torch.einsum("nab,nac->nbc", v, v)
    c = torch.einsum("n,nbc->bc", inv, b)
    d = torch.einsum("n,nac->ac", inv, torch.einsum("nab,nbc->nac", v, b))
    e, q = torch.linalg.eigh(c)
    e = e.clamp(min=1e-8)
    g = torch.ones_like(e) if exp_time is None else 1.0 - torch.exp(-e * exp_time)
    g[: e.numel() - k] = 0.0
    out = ((d @ q) * (g / e)) @ q.T
    if init != "zero":
        x0 = v.sum(0) if init == "sum" else v.mean(0)
        out = x0 - ((x0 @ q) * g) @ q.T + out
    return out


@pytest.mark.parametrize("shape", [(9, 6), (5, 8)])
def test_agrees_with_the_reference_form(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(2)
    d = 0.05 * torch.randn(3, *shape, generator=g, dtype=torch.float64)
    n = shape[1]
    k = int((n * 0.65 + 0.999) // 1)
    torch.testing.assert_close(
        swudi(None, d, SwudiConfig(), CTX), reference(d, k=k, exp_time=300.0, init="sum")
    )
    ka = swudi_rank(
        torch.linalg.eigvalsh(reference_c(d)).clamp(min=1e-8).flip(0), *shape, "participation_sqrt"
    )
    torch.testing.assert_close(
        swudi_a(None, d, SwudiAConfig(init="mean"), CTX), reference(d, k=ka, exp_time=None, init="mean")
    )
    torch.testing.assert_close(
        swudi(None, d.float(), SwudiConfig(), CTX).double(),
        reference(d, k=k, exp_time=300.0, init="sum"),
        rtol=1e-3,
        atol=1e-5,
    )


def reference_c(deltas: torch.Tensor) -> torch.Tensor:
    inv = 1.0 / deltas.reshape(deltas.shape[0], -1).square().sum(1)
    return torch.einsum("n,nab,nac->bc", inv, deltas, deltas)


def test_bad_hyperparameters_are_named() -> None:
    for name, params, field in (
        ("swudi", {"rank_ratio": 0.0}, "rank_ratio"),
        ("swudi", {"filter": "gauss"}, "filter"),
        ("swudi", {"exp_time": -1.0}, "exp_time"),
        ("swudi_a", {"rank_rule": "cumvar_2"}, "rank_rule"),
        ("swudi_a", {"min_rank": 0}, "min_rank"),
        ("swudi_a", {"init": "ones"}, "init"),
    ):
        with pytest.raises(ValueError, match=field):
            METHODS[name].make_config(params)
