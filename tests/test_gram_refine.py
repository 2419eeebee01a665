"""The Gram route's refined top-k (float32 ``eigh`` + float64 Rayleigh-Ritz) against the float64 ``eigh`` route."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mergelab.engine.cache import DecompositionLRU
from mergelab.methods import MergeContext, _linalg
from mergelab.methods._linalg import quadratic_factors, refines, solve_iterative, solve_sgd_exact
from mergelab.methods.optmerge import OptMergeConfig, optmerge


def _stack(shape: tuple[int, int], kind: str, g: torch.Generator) -> Tensor:
    """Three float32 task vectors: i.i.d. noise, a decaying spectrum, or rank 6 (below k, like a LoRA delta)."""
    m, n = shape
    out = []
    for _ in range(3):
        if kind == "noise":
            out.append(torch.randn(m, n, generator=g))
        elif kind == "decaying":
            u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
            v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
            s = torch.logspace(0, -3, min(m, n))
            out.append((u * s) @ v.T)
        else:
            out.append(torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g))
    return 1e-3 * torch.stack(out)


@pytest.mark.parametrize("shape", [(100, 260), (260, 100)])
@pytest.mark.parametrize("kind", ["noise", "decaying", "lowrank"])
def test_refined_top_k_equals_float64_eigh(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int],
                                           kind: str) -> None:
    d = _stack(shape, kind, torch.Generator().manual_seed(3))
    k = 20
    kw = {"centred_target": True, "centred_projector": False, "dtype": torch.float64, "svd": "gram"}
    assert not refines(d, k, "gram")  # order 100 is below the threshold: the float64 eigh route
    f64, h64 = quadratic_factors(d, k, **kw)
    monkeypatch.setattr(_linalg, "REFINE_MIN_N", 64)
    assert refines(d, k, "gram") and not refines(d.double(), k, "gram")
    assert not refines(d, 90, "gram")  # the oversampled block would be the whole matrix
    f, h = quadratic_factors(d, k, **kw)
    f32, h32 = quadratic_factors(d, k, **{**kw, "svd": "lapack"})  # float32 SVD: the official scripts' precision
    a, b = f64 @ f64.T, h64 @ f64.T

    def err(f: Tensor, h: Tensor) -> tuple[float, float]:
        return (float((f @ f.T - a).abs().max() / a.abs().max()), float((h @ f.T - b).abs().max() / b.abs().max()))

    refined, official = err(f, h), err(f32, h32)
    # measured 7e-8 to 3.6e-7 (float32 products after the float64 refinement) against 5e-7 to 6e-6 for LAPACK
    assert max(refined) < 1e-6, refined
    assert refined[0] < 0.5 * official[0] and refined[1] < 0.5 * official[1], (refined, official)

def test_refined_route_through_optmerge_and_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """OptMerge (LoRA variant, exact solver) on the refined route equals the float64 route to float32 rounding, and a
    cached second merge is bit-identical to the first."""
    d = _stack((90, 200), "decaying", torch.Generator().manual_seed(5))
    cfg = OptMergeConfig(variant="lora", svd="gram")
    ref = optmerge(None, d, cfg, MergeContext(name="w"))
    monkeypatch.setattr(_linalg, "REFINE_MIN_N", 64)
    ctx = MergeContext(name="w", cache=DecompositionLRU(64 * 2**20))
    first = optmerge(None, d, cfg, ctx)
    second = optmerge(None, d, cfg, ctx)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("shape,r", [((60, 20), 12), ((60, 20), 30), ((20, 60), 12)])
def test_exact_solver_equals_the_sgd_loop_folded_or_not(shape: tuple[int, int], r: int) -> None:
    """The exact heavy-ball solver equals 300 torch SGD steps, on tall matrices (the folded R x n operator, for
    R <= n and R > n) and a wide one (the unfolded products)."""
    g = torch.Generator().manual_seed(7)
    m, n = shape
    x0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    f = 0.1 * torch.randn(n, r, generator=g, dtype=torch.float64)
    h = torch.randn(m, r, generator=g, dtype=torch.float64)
    kw = {"lr": 1e-2, "steps": 300, "momentum": 0.9}
    exact = solve_sgd_exact(x0, f, h, **kw)
    loop = solve_iterative(x0, f, h, optimizer="sgd", **kw)
    torch.testing.assert_close(exact, loop, rtol=1e-9, atol=1e-9)
