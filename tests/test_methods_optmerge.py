"""OptMerge and WUDI: the m x k form against the official m x m formulation, the exact SGD path against the loop,
and the numerical facts of spec section 1.9."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mergelab.methods import MergeContext
from mergelab.methods._linalg import (
    quadratic_factors,
    quadratic_loss,
    rank_k,
    solve_iterative,
    solve_sgd_exact,
)
from mergelab.methods.optmerge import OptMergeConfig, optmerge, optmerge_factors
from mergelab.methods.wudi import WudiConfig, wudi

CTX = MergeContext(name="w")


def official(
    d: Tensor,
    *,
    target: str,
    projector: str,
    init: str,
    optimizer: str,
    lr: float,
    steps: int,
    k: int | None = None,
) -> tuple[Tensor, list[float]]:
    """The official code's formulation (spec 1.3/1.4/1.8): full SVDs, a zero-padded m x n low-rank projector and an
    m x m product per task and step, autograd, ``torch.optim``. ``target``: "centred", "uncentred" or "raw" (WUDI:
    t_i = tau_i); ``projector``: "uncentred", "centred" or "raw" (WUDI: tau_i itself)."""
    t_, m, n = d.shape
    k = min(m, n) // t_ if k is None else k
    mean = d.mean(0)
    targets, lows, weights = [], [], []
    for i in range(t_):
        u, s, vh = torch.linalg.svd(d[i], full_matrices=True)
        uc, sc, vhc = torch.linalg.svd(d[i] - mean, full_matrices=True)
        low = torch.zeros(m, n, dtype=d.dtype)
        if projector == "raw":
            low = d[i]
        else:
            sp, vp = (s, vh) if projector == "uncentred" else (sc, vhc)
            low[:k] = sp[:k, None] * vp[:k]
        if target == "raw":
            t = d[i]
        elif target == "centred":
            t = (uc[:, :k] * sc[:k]) @ vhc[:k] + mean
        else:
            t = (u[:, :k] * s[:k]) @ vh[:k]
        targets.append(t)
        lows.append(low)
        weights.append(1.0 / d[i].square().sum())
    x = (d.sum(0) if init == "sum" else d.mean(0)).clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr) if optimizer == "adam" else torch.optim.SGD([x], lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = sum(
            ((x - t) @ low.T).square().sum() * w for t, low, w in zip(targets, lows, weights, strict=True)
        )
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach(), losses


@pytest.mark.parametrize("svd", ["lapack", "gram"])
@pytest.mark.parametrize("variant", ["full", "lora"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_m_by_k_equals_official_m_by_m(variant: str, optimizer: str, svd: str) -> None:
    g = torch.Generator().manual_seed(0)
    d = 0.01 * torch.randn(3, 24, 18, generator=g, dtype=torch.float64)
    lr = 1e-5 if optimizer == "adam" else 0.05
    kwargs = {
        "target": "centred" if variant == "full" else "uncentred",
        "projector": "uncentred",
        "init": "sum" if variant == "full" else "mean",
        "optimizer": optimizer,
        "lr": lr,
    }
    ref_x, ref_losses = official(d, steps=100, **kwargs)
    cfg = OptMergeConfig(variant=variant, optimizer=optimizer, lr=lr, steps=100, solver="iterative", svd=svd)
    f, h = optmerge_factors(d, cfg)
    x0 = d.sum(0) if cfg.init == "sum" else d.mean(0)
    assert quadratic_loss(x0, f, h).item() == pytest.approx(ref_losses[0], rel=1e-10)
    for steps in (1, 10, 50):  # trajectory: iterates and losses along the way
        x = optmerge(
            None,
            d,
            OptMergeConfig(
                variant=variant, optimizer=optimizer, lr=lr, steps=steps, solver="iterative", svd=svd
            ),
            CTX,
        )
        ref_t, ref_l = official(d, steps=steps + 1, **kwargs)
        assert quadratic_loss(x, f, h).item() == pytest.approx(ref_l[-1], rel=1e-8)
    x = optmerge(None, d, cfg, CTX)
    torch.testing.assert_close(x, ref_x, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(x, x0, atol=1e-5)  # it did move
    assert ref_losses[-1] < ref_losses[0]


@pytest.mark.parametrize("shape", [(14, 22), (22, 14)])
def test_gram_and_lapack_spectra_give_the_same_loss(shape: tuple[int, int]) -> None:
    """Both SVD routes give the same A = F F^T, B = H F^T and loss constant, in both orientations, for every
    target/projector combination, including a k above the rank (LoRA-like rank-3 task vectors)."""
    g = torch.Generator().manual_seed(10)
    dense = 0.01 * torch.randn(3, *shape, generator=g)
    lowrank = torch.stack(
        [torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g) for _ in range(3)]
    )
    for d in (dense, 0.01 * lowrank):
        for k in (4, 9):
            for ct, cp in ((True, False), (False, False), (True, True), (False, True)):
                kw = {"centred_target": ct, "centred_projector": cp, "dtype": torch.float64}
                f1, h1 = quadratic_factors(d, k, svd="lapack", **kw)
                f2, h2 = quadratic_factors(d, k, svd="gram", **kw)
                torch.testing.assert_close(f1 @ f1.T, f2 @ f2.T, rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(h1 @ f1.T, h2 @ f2.T, rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(h1.square().sum(), h2.square().sum(), rtol=1e-4, atol=1e-7)


def test_centred_projector_matches_paper_eq3() -> None:
    d = 0.01 * torch.randn(3, 16, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = OptMergeConfig(variant="full", projector="centred", steps=30, solver="iterative")
    ref, _ = official(
        d, target="centred", projector="centred", init="sum", optimizer="adam", lr=1e-5, steps=30
    )
    torch.testing.assert_close(optmerge(None, d, cfg, CTX), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_wudi_equals_official_loss(optimizer: str) -> None:
    d = 0.01 * torch.randn(3, 14, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lr = 1e-5 if optimizer == "adam" else 0.02
    ref, losses = official(
        d, target="raw", projector="raw", init="sum", optimizer=optimizer, lr=lr, steps=100
    )
    out = wudi(None, d, WudiConfig(optimizer=optimizer, lr=lr, steps=100, solver="iterative"), CTX)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("shape", "lr"), [((20, 30), 1e-4), ((30, 20), 1e-4), ((12, 40), 0.05), ((40, 12), 0.3)]
)
def test_exact_sgd_path_equals_iterative_300_steps(shape: tuple[int, int], lr: float) -> None:
    """Both gradient forms (factored when 2Nk < n, dense otherwise) and slow to strongly moving regimes."""
    g = torch.Generator().manual_seed(3)
    d = 0.02 * torch.randn(3, *shape, generator=g)
    for variant in ("lora", "full"):
        kw = {"variant": variant, "optimizer": "sgd", "lr": lr, "steps": 300}
        exact = optmerge(None, d, OptMergeConfig(solver="exact", **kw), CTX)
        loop = optmerge(None, d, OptMergeConfig(solver="iterative", **kw), CTX)
        assert torch.equal(optmerge(None, d, OptMergeConfig(**kw), CTX), exact)  # auto = exact for SGD
        scale = (loop - d.mean(0)).abs().max()
        torch.testing.assert_close(exact, loop, rtol=1e-4, atol=1e-4 * float(scale) + 1e-9)


def test_exact_path_in_float64_matches_loop_tightly() -> None:
    """Both closed forms: the R x R one (F has fewer columns than rows) and the n x n one (more columns)."""
    g = torch.Generator().manual_seed(4)
    for n, r in ((30, 12), (12, 30)):
        f = torch.randn(n, r, generator=g, dtype=torch.float64) * 0.2
        h = torch.randn(8, r, generator=g, dtype=torch.float64)
        x0 = torch.randn(8, n, generator=g, dtype=torch.float64)
        for momentum in (0.0, 0.9):
            loop = solve_iterative(x0, f, h, optimizer="sgd", lr=0.01, steps=300, momentum=momentum)
            exact = solve_sgd_exact(x0, f, h, lr=0.01, steps=300, momentum=momentum)
            torch.testing.assert_close(exact, loop, rtol=1e-10, atol=1e-10)


def test_sgd_keeps_null_space_component_and_adam_does_not() -> None:
    """Spec 1.5: under SGD the component of tau_m outside span{V_{i,1:k}} never moves from its init."""
    g = torch.Generator().manual_seed(5)
    d = 0.01 * torch.randn(3, 20, 30, generator=g)  # k = 6, span of dimension 18 < 30
    basis = torch.cat([torch.linalg.svd(t, full_matrices=False).Vh[:6] for t in d]).T
    null = torch.eye(30) - basis @ torch.linalg.pinv(basis)
    for solver in ("exact", "iterative"):
        out = optmerge(None, d, OptMergeConfig(variant="lora", lr=1.0, solver=solver), CTX)
        moved = (out - d.mean(0)).abs().max().item()
        assert moved > 1e-3
        assert ((out - d.mean(0)) @ null).abs().max() < 1e-3 * moved
    out = optmerge(None, d, OptMergeConfig(variant="lora", optimizer="adam", lr=1e-4), CTX)
    assert ((out - d.mean(0)) @ null).abs().max() > 1e-4


def test_identical_experts_spec_1_9() -> None:
    g = torch.Generator().manual_seed(6)
    tau = 0.1 * torch.randn(12, 2, generator=g) @ torch.randn(2, 10, generator=g)  # rank 2 <= k = 10 // 3
    d = torch.stack([tau, tau, tau])
    torch.testing.assert_close(
        optmerge(None, d, OptMergeConfig(variant="lora"), CTX), tau, rtol=1e-5, atol=1e-6
    )
    # full variant: target tau, init 3 tau; Adam moves each entry by at most ~lr per step toward tau
    out = optmerge(None, d, OptMergeConfig(variant="full"), CTX)
    assert (out - 3 * tau).abs().max() <= 300 * 1e-5 * 1.01
    assert (out - tau).norm() < (3 * tau - tau).norm()


def test_zero_guards() -> None:
    tiny = 1e-9 * torch.randn(3, 6, 5)  # max ||tau_i||^2 ~ 3e-17 < 1e-12: the mean is returned
    for fn, cfg in ((optmerge, OptMergeConfig()), (wudi, WudiConfig())):
        assert torch.equal(fn(None, tiny, cfg, CTX), tiny.mean(0))
    g = torch.Generator().manual_seed(7)
    d = 0.01 * torch.randn(3, 10, 8, generator=g)
    with_zero = torch.cat([d, torch.zeros(1, 10, 8)])
    cfg = OptMergeConfig(variant="lora", init="sum", rank_ratio=0.25, lr=0.5)
    out = optmerge(None, with_zero, cfg, CTX)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, optmerge(None, d, cfg, CTX), rtol=1e-5, atol=1e-7)


def test_rank_rule_and_variant_defaults() -> None:
    assert rank_k(896, 5, None) == 179 and rank_k(128, 5, None) == 25 and rank_k(3584, 5, None) == 716
    assert rank_k(4, 5, None) == 1 and rank_k(896, 5, 0.1) == 89
    full, lora = OptMergeConfig(variant="full"), OptMergeConfig(variant="lora")
    assert (full.lam, full.lr, full.optimizer, full.init, full.steps) == (0.1, 1e-5, "adam", "sum", 300)
    assert (lora.lam, lora.lr, lora.optimizer, lora.init, lora.momentum) == (1.0, 1e-4, "sgd", "mean", 0.9)
    assert OptMergeConfig(variant="lora", lr=5e-2, init="sum").lr == 5e-2


def test_half_precision_loop_runs_iteratively() -> None:
    d = 0.01 * torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(8))
    kw = {"variant": "lora", "lr": 0.5}
    ref = optmerge(None, d, OptMergeConfig(**kw), CTX)
    out = optmerge(None, d, OptMergeConfig(compute_dtype="float16", **kw), CTX)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # really ran in float16 ...
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # ... and stayed close to the float32 result


def test_runs_under_inference_mode() -> None:
    """The engine may call methods under ``torch.inference_mode()``; the optimiser loop must still run."""
    d = 0.01 * torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(9))
    ref = optmerge(None, d, OptMergeConfig(steps=20), CTX)
    with torch.inference_mode():
        out = optmerge(None, d.clone(), OptMergeConfig(steps=20), CTX)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# --- init from another method's merge (an extension beyond the paper) --------------------------------------------


def _stack(seed: int = 0, shape: tuple[int, int] = (24, 40), n: int = 3) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g) * 0.02


@pytest.mark.parametrize("variant", ["full", "lora"])
@pytest.mark.parametrize("method", ["tsv", "iso_c", "task_arithmetic"])
def test_init_from_a_method_starts_at_its_merge(variant: str, method: str) -> None:
    """``init=<method>``: a negligible step leaves that method's task vector (its defaults, lambda not applied)."""
    from mergelab.methods import METHODS

    d = _stack()
    before = d.clone()
    want = METHODS[method].fn(None, d, METHODS[method].make_config({}), CTX)
    got = optmerge(None, d, OptMergeConfig(variant=variant, init=method, lr=1e-12, steps=1), CTX)
    assert torch.equal(d, before)  # the init method never overwrites the experts
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-9)
    # and the optimiser does move it: 300 steps at the variant's own rate end elsewhere, nearer the loss minimum
    cfg = OptMergeConfig(variant=variant, init=method, lr=1e-2 if variant == "lora" else 1e-3)
    moved = optmerge(None, d, cfg, CTX)
    f, h = optmerge_factors(d, cfg)
    assert not torch.allclose(moved, want, rtol=1e-3, atol=1e-6)
    assert quadratic_loss(moved, f, h) < quadratic_loss(want, f, h)


def test_init_from_a_method_takes_the_coefficients() -> None:
    from mergelab.methods import METHODS

    d = _stack(1)
    c = (2.0, 0.5, 1.0)
    want = METHODS["tsv"].fn(None, d, METHODS["tsv"].make_config({"coefficients": c}), CTX)
    got = optmerge(None, d, OptMergeConfig(variant="lora", init="tsv", lr=1e-12, steps=1, coefficients=c), CTX)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(got, METHODS["tsv"].fn(None, d, METHODS["tsv"].make_config({}), CTX), atol=1e-6)


def test_init_names_only_per_matrix_methods() -> None:
    from mergelab.methods.optmerge import init_methods

    assert {"tsv", "iso_c", "iso_cts", "wudi", "task_arithmetic", "swudi"} <= set(init_methods())
    assert "ties" not in init_methods() and "optmerge" not in init_methods()  # global statistics; itself
    with pytest.raises(ValueError, match="init") as e:
        OptMergeConfig(init="ties")
    assert "tsv" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="init"):
        WudiConfig(init="tsv")  # WUDI keeps the paper's two
