"""LoRA factor-mode merging (the official modality script's way, ``lora_merge: factors``) on hand-computed cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergelab.engine import MergeError, merge
from mergelab.engine.factors import OPTMERGE_FACTOR_PARAMS, factor_delta, factor_params, merge_factors
from mergelab.engine.recipe import MergeRecipe
from mergelab.methods import METHODS
from mergelab.platform.merge_config import load_recipe
from tests.test_engine_owner import IMG, Q, base_tensors, save_ckpt, save_lora


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


# --- lora_merge: factors through the engine ---------------------------------------------------------------------

_A = (torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]]), torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, 1]]))
_B = (torch.tensor([[1.0, 0], [0, 1], [0, 0], [0, 0]]), torch.tensor([[0.0, 0], [0, 0], [1, 0], [0, 1]]))
# B1 A1 + B2 A2 = I (the delta mode); (B1 + B2)(A1 + A2) = the pattern below (the factor mode, cross terms included)
_CROSS = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]])


def _factor_experts(tmp_path: Path) -> tuple[Path, list[Path], dict[str, torch.Tensor]]:
    base = base_tensors()
    b = save_ckpt(tmp_path / "base", base)
    return b, [save_lora(tmp_path / f"e{i}", _A[i], _B[i]) for i in range(2)], base


@pytest.mark.parametrize(("method", "params", "want"), [
    ("task_arithmetic", {"lam": 1.0}, 2.0 * _CROSS),  # scaling 2 * (B1 + B2)(A1 + A2)
    ("task_arithmetic", {"lam": 0.5}, 0.5 * _CROSS),  # lambda per factor: 2 * (B/2)(A/2)
    ("weight_average", {}, 0.5 * _CROSS),  # 2 * (B1 + B2)/2 (A1 + A2)/2
])
def test_factor_mode_through_the_engine_is_hand_computed(tmp_path: Path, method: str, params: dict,
                                                        want: torch.Tensor) -> None:
    b, experts, base = _factor_experts(tmp_path)
    rep = merge(base=b, experts=experts, method=method, params=params, policy="llama", lora_merge="factors",
                out=tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(got[Q], base[Q] + want)
    assert {t.name: t.rule for t in rep.tensors}[Q] == "factors"
    assert torch.equal(got[IMG], base[IMG])
    delta = merge(base=b, experts=experts, method="task_arithmetic", params={"lam": 1.0}, policy="llama",
                  out=tmp_path / "delta", device="cpu")  # the default: sum_i scaling B_i A_i
    torch.testing.assert_close(load_file(str(tmp_path / "delta" / "model.safetensors"))[Q],
                               base[Q] + 2.0 * torch.eye(4))
    assert delta.accounting == rep.accounting


def test_factor_mode_refuses_full_experts_and_other_ranks(tmp_path: Path) -> None:
    b, experts, base = _factor_experts(tmp_path)
    full = save_ckpt(tmp_path / "full", base)
    with pytest.raises(MergeError, match="lora_merge: 'factors' needs every expert to be a LoRA adapter; full"):
        MergeRecipe.build(base=b, experts=[experts[0], full], method="ties", lora_merge="factors")
    r1 = save_lora(tmp_path / "r1", _A[0][:1], _B[0][:, :1])
    with pytest.raises(MergeError, match="same rank and scaling in every expert; r1 and e0 differ on .*q_proj"):
        merge(base=b, experts=[experts[0], r1], method="ties", lora_merge="factors", out=tmp_path / "o")
    with pytest.raises(MergeError, match="lora_merge: must be one of"):
        MergeRecipe.build(base=b, experts=experts, method="ties", lora_merge="factor")


def test_factor_mode_is_a_merge_config_field_and_keeps_default_digests(tmp_path: Path) -> None:
    b, experts, _ = _factor_experts(tmp_path)
    y = tmp_path / "m.yaml"
    y.write_text(f"base: {b}\nexperts: [{experts[0]}, {experts[1]}]\nmethod: ties\nlora_merge: factors\n")
    r = load_recipe(y)
    assert r.lora_merge == "factors" and r.identity()["lora_merge"] == "factors"
    d = r.replace(lora_merge="delta")
    assert "lora_merge" not in d.identity() and d.digest != r.digest
    assert MergeRecipe.build(base=b, experts=experts, method="ties").digest == d.digest


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_merges_factors_through_the_engine(tmp_path: Path, method: str) -> None:
    b, _, base = _factor_experts(tmp_path)
    g = torch.Generator().manual_seed(1)
    experts = [save_lora(tmp_path / f"x{i}", torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g))
               for i in range(3)]
    params = {"steps": 5} if "steps" in METHODS[method].make_config({}).__dict__ else {}
    rep = merge(base=b, experts=experts, method=method, params=params, policy="llama", lora_merge="factors",
                out=tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert rep.counts["factors"] == 1 and torch.isfinite(got[Q]).all() and torch.equal(got[IMG], base[IMG])
