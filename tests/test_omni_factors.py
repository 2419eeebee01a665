"""LoRA factor-mode merging (the official modality script's way) on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from mergelab.engine.factors import OPTMERGE_FACTOR_PARAMS, factor_delta, factor_params, merge_factors
from mergelab.methods import METHODS


def _factors() -> dict[str, list[torch.Tensor]]:
    a1, a2 = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.0, 1.0, -1.0]])  # (r=1, d_in=3)
    b1, b2 = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [-1.0]])  # (d_out=2, r=1)
    return {"q.lora_A.weight": [a1, a2], "q.lora_B.weight": [b1, b2]}


def test_task_arithmetic_on_factors_is_the_product_of_sums_not_the_sum_of_products() -> None:
    f = _factors()
    merged = merge_factors(f, "task_arithmetic", {"lam": 1.0})
    a = f["q.lora_A.weight"][0] + f["q.lora_A.weight"][1]
    b = f["q.lora_B.weight"][0] + f["q.lora_B.weight"][1]
    torch.testing.assert_close(merged["q.lora_A.weight"], a)
    torch.testing.assert_close(merged["q.lora_B.weight"], b)
    delta = factor_delta(merged, scaling=2.0)["q"]
    expected = 2.0 * torch.tensor([[4.0], [1.0]]) @ torch.tensor([[1.0, 1.0, 1.0]])  # (B1+B2)(A1+A2)
    torch.testing.assert_close(delta, expected)
    per_expert = sum(2.0 * b @ a for a, b in zip(f["q.lora_A.weight"], f["q.lora_B.weight"], strict=True))
    assert not torch.allclose(delta, per_expert)  # B1A1 + B2A2 (the delta mode) differs: cross terms


def test_lambda_multiplies_each_factor_so_the_update_scales_by_its_square() -> None:
    half = factor_delta(merge_factors(_factors(), "task_arithmetic", {"lam": 0.5}), 1.0)["q"]
    one = factor_delta(merge_factors(_factors(), "task_arithmetic", {"lam": 1.0}), 1.0)["q"]
    torch.testing.assert_close(half, 0.25 * one)


def test_weight_average_is_the_mean_of_each_factor() -> None:
    merged = merge_factors(_factors(), "weight_average")
    torch.testing.assert_close(merged["q.lora_B.weight"], torch.tensor([[2.0], [0.5]]))


def test_optmerge_takes_the_official_scripts_settings() -> None:
    p = factor_params("optmerge")
    assert p == OPTMERGE_FACTOR_PARAMS and p["rank_ratio"] == 0.2 and p["lr"] == 5e-2
    assert factor_params("optmerge", {"steps": 5})["steps"] == 5


@pytest.mark.parametrize("method", [m for m, s in METHODS.items() if s.paper])
def test_every_paper_method_merges_factors(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    f = {"l.lora_A.weight": [torch.randn(8, 16, generator=g) for _ in range(3)],
         "l.lora_B.weight": [torch.randn(12, 8, generator=g) for _ in range(3)]}
    params = {"steps": 20} if method in ("optmerge", "wudi") else {}
    merged = merge_factors(f, method, params)
    assert merged["l.lora_A.weight"].shape == (8, 16) and merged["l.lora_B.weight"].shape == (12, 8)
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert factor_delta(merged, 2.0)["l"].shape == (12, 16)
