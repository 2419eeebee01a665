"""``lora_merge: factors`` with ``output: adapter``: the merged ``A_m`` and ``B_m`` are the adapter, written as they
are (the experts' rank and scaling, no SVD) with the owned ``modules_to_save`` tensors; it loads with
``PeftModel.from_pretrained`` and gives the full-weight output's logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mergelab.engine import MergeRecipe, run_merge
from mergelab.engine.adapters import LoraAdapter
from mergelab.engine.factors import factor_stacks, merge_factors
from mergelab.engine.io import CheckpointReader

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _save_adapter(base: Path, out: Path, seed: int, *, save_norm: bool) -> None:
    """A peft adapter on the tiny Llama (r=4, alpha=8, non-zero B); with ``save_norm`` the final norm is a
    ``modules_to_save`` module with a changed value."""
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=TARGETS,
                          modules_to_save=["model.norm"] if save_norm else None)
    pm = peft.get_peft_model(model, cfg)
    if save_norm:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save" in n:
                    p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(out)


@pytest.fixture(scope="module")
def experts(tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    base, _ = tiny_models("llama")
    root = tmp_path_factory.mktemp("factor-adapters")
    _save_adapter(base, root / "e1", 1, save_norm=True)
    _save_adapter(base, root / "e2", 2, save_norm=False)
    _save_adapter(base, root / "e3", 3, save_norm=False)
    return base, [root / "e1", root / "e2", root / "e3"]


# the final norm is owned by the one expert that saves it; v_proj stays at the base (a LoRA target not merged)
POLICY = {"preset": "llama", "rules": [{"pattern": r"model\.norm\..*", "action": "owner"},
                                       {"pattern": r".*v_proj.*", "action": "base"}]}


def _logits(model: Any) -> torch.Tensor:
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(("method", "params"), [("task_arithmetic", {"lam": 0.7}), ("ties", {"density": 0.5})])
def test_factor_mode_adapter_is_the_merged_factors_and_gives_the_full_logits(
        experts: tuple[Path, list[Path]], tmp_path: Path, method: str, params: dict[str, Any]) -> None:
    import peft
    import transformers

    base, ads = experts
    recipe = MergeRecipe.build(base=base, experts=ads, method=method, params=params, policy=POLICY, device="cpu",
                               lora_merge="factors")
    run_merge(recipe, tmp_path / "full")
    rep = run_merge(recipe.replace(output="adapter"), tmp_path / "adapter")
    a = rep.adapter
    assert a["written_from"] == "factors as merged" and a["exact"] and a["rank"] == 4
    assert "factors as merged" in rep.summary()
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["modules_to_save"] == ["model.norm"]

    # the written factors are the method's merged factors (no SVD), the owned norm is expert 1's value
    written = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    b = CheckpointReader(base)
    lora = [LoraAdapter(p, b.keys()) for p in ads]
    q = next(k for k in lora[0].modules if "q_proj" in k)
    want = merge_factors(factor_stacks(lora, [q]), method, params)
    m = lora[0].modules[q]
    assert torch.equal(written[m.a_key], want[f"{q}.lora_A.weight"].to(written[m.a_key].dtype))
    assert torch.equal(written[m.b_key], want[f"{q}.lora_B.weight"].to(written[m.b_key].dtype))
    v = next(k for k in lora[0].modules if "v_proj" in k)
    assert not written[lora[0].modules[v].b_key].any() or not written[lora[0].modules[v].a_key].any()
    norm_key = lora[0].full["model.norm.weight"]
    assert torch.equal(written[norm_key], lora[0].reader.get(norm_key))
    b.close()

    full = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "full")
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), tmp_path / "adapter")
    torch.testing.assert_close(_logits(pm), _logits(full), rtol=1e-4, atol=1e-5)


def test_factor_mode_with_a_smaller_adapter_rank_truncates_without_a_full_svd(
        experts: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, ads = experts
    recipe = MergeRecipe.build(base=base, experts=ads, method="task_arithmetic", policy=POLICY, device="cpu",
                               lora_merge="factors", output="adapter", adapter_rank=2)
    rep = run_merge(recipe, tmp_path / "adapter")
    a = rep.adapter
    assert a["written_from"] == "factors, truncated" and a["rank"] == 2 and not a["exact"]
    assert all(0 <= t["rel_error"] < 1 for t in a["tensors"].values())
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 2
