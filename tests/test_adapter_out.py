"""LoRA in, LoRA out: ``output: adapter`` writes the merge of LoRA experts as one PEFT adapter that loads with
``PeftModel.from_pretrained`` and gives the full merge's logits when exact; truncation reports its error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mergelab.engine import MergeError, MergeRecipe, run_merge
from mergelab.engine.adapter_out import factor
from tests.test_engine_lora import save_adapter


@pytest.fixture(scope="module")
def loras(tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    """The tiny Llama base, two LoRA adapters (r=4, different targets) and one full expert."""
    base, full = tiny_models("llama")
    root = tmp_path_factory.mktemp("loras")
    save_adapter("llama", base, root / "a1", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    save_adapter("llama", base, root / "a2", 2, r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"])
    return base, [root / "a1", root / "a2"], full[0]


def _logits(model: Any) -> torch.Tensor:
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_out_equals_full_merge(loras: tuple[Path, list[Path], Path], tmp_path: Path) -> None:
    import peft
    import transformers

    base, ads, _ = loras
    recipe = MergeRecipe.build(base=base, experts=[{"path": ads[0], "coefficient": 0.5}, ads[1]],
                               method="task_arithmetic", params={"lam": 0.8}, device="cpu")
    run_merge(recipe, tmp_path / "full")
    rep = run_merge(recipe.replace(output="adapter"), tmp_path / "adapter")
    files = {f.name for f in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert not any(f.endswith(".safetensors") and f.startswith("model") for f in files)
    assert rep.adapter["rank"] == 8 and rep.adapter["exact"] and rep.adapter["max_rel_error"] < 1e-5
    assert len(rep.adapter["tensors"]) == 2 * 3  # q_proj (both), v_proj, down_proj in 2 layers
    assert len(rep.tensors) == 6  # only the touched tensors were merged (a per-tensor method)
    assert {v["rank"] for v in rep.adapter["tensors"].values()} <= {4, 8}
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8 and "adapter: rank 8" in rep.summary()
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "one PEFT LoRA adapter" in card and "output: adapter" in card

    want = _logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "full"))
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), tmp_path / "adapter")
    torch.testing.assert_close(_logits(pm), want, rtol=1e-4, atol=1e-5)


def test_truncated_rank_reports_error(loras: tuple[Path, list[Path], Path], tmp_path: Path) -> None:
    base, ads, _ = loras
    recipe = MergeRecipe.build(base=base, experts=ads, method="ties", params={"density": 0.5}, device="cpu",
                               output="adapter", adapter_rank=2)
    rep = run_merge(recipe, tmp_path / "adapter")
    assert rep.adapter["rank"] == 2 and not rep.adapter["exact"]
    errs = [v["rel_error"] for v in rep.adapter["tensors"].values()]
    assert all(0 < e < 1 for e in errs)
    saved = json.loads((tmp_path / "adapter" / "mergelab_adapter.json").read_text())
    assert saved["max_rel_error"] == pytest.approx(max(errs))
    assert "truncated SVD" in rep.summary() and len(rep.tensors) == 6
    # a method with global statistics merges the whole checkpoint; the adapter is built the same way
    rep = run_merge(recipe.replace(params={"density": 0.5, "scope": "global"}), tmp_path / "global")
    assert len(rep.tensors) > 6 and rep.stats_passes in (1, 2) and len(rep.adapter["tensors"]) == 6


def test_adapter_out_needs_lora_experts(loras: tuple[Path, list[Path], Path]) -> None:
    base, ads, full = loras
    with pytest.raises(MergeError, match="every expert to be a LoRA adapter"):
        MergeRecipe.build(base=base, experts=[ads[0], full], method="task_arithmetic", output="adapter")
    with pytest.raises(MergeError, match="adapter_rank"):
        MergeRecipe.build(base=base, experts=ads, method="task_arithmetic", adapter_rank=4)


def test_factor_is_exact_below_rank_and_optimal_above() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(20, 3, generator=g) @ torch.randn(3, 30, generator=g)
    b, a, r, err = factor(low, 5)
    assert r == 3 and err < 1e-6 and b.shape == (20, 5) and a.shape == (5, 30)
    full = torch.randn(20, 30, generator=g)
    s = torch.linalg.svdvals(full.double())
    _, _, r, err = factor(full, 4)
    assert r == 20 and err == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-6)


def test_randomized_factor_on_large_matrices() -> None:
    """Above 2 * (rank + oversample) the seeded randomized SVD is exact on low-rank updates and within a hair of
    the optimal truncation error otherwise; it is deterministic."""
    g = torch.Generator().manual_seed(1)
    low = torch.randn(300, 6, generator=g) @ torch.randn(6, 200, generator=g)
    b, a, r, err = factor(low, 8)
    assert r == 6 and err < 1e-6
    full = torch.randn(300, 200, generator=g) @ torch.diag(torch.logspace(0, -3, 200))
    s = torch.linalg.svdvals(full.double())
    b, a, r, err = factor(full, 10)
    best = float(s[10:].norm() / s.norm())
    assert best <= err <= best * 1.01
    assert torch.equal(factor(full, 10)[0], b)
