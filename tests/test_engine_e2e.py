"""End to end on tiny real models: the merged directory loads cleanly, vision stays at base, the LLM changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mergelab.engine import CheckpointReader, merge

VISION = {"llama": (), "qwen2_vl": ("visual.",), "llava": ("vision_tower.", "multi_modal_projector.")}


@pytest.mark.parametrize("kind,method,params", [
    ("llama", "ties", {"density": 0.5}),
    ("qwen2_vl", "task_arithmetic", {"lam": 0.7}),
    ("llava", "dare_ties", {"density": 0.5}),
])
def test_merged_tiny_model_loads_with_no_missing_keys(kind: str, method: str, params: dict[str, Any],
                                                      tiny_models: Any, tmp_path: Path) -> None:
    import transformers

    base_dir, experts = tiny_models(kind)
    out = tmp_path / "merged"
    rep = merge(base=base_dir, experts=experts, method=method, params=params, policy="auto", out=out, device="cpu",
                max_shard_bytes=200_000)
    assert rep.policy["name"] == kind
    assert (out / "model.safetensors.index.json").exists() and len(rep.shards) > 1
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"} <= set(
        rep.copied_files
    )
    cls = getattr(transformers, transformers.AutoConfig.from_pretrained(base_dir).architectures[0])
    model, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in cls.from_pretrained(base_dir).parameters())
    base, merged = CheckpointReader(base_dir), CheckpointReader(out)
    assert set(base.keys()) == set(merged.keys())
    vision = [k for k in base.keys() if k.startswith(VISION[kind])]
    assert len(vision) > 5 or kind == "llama"
    for k in vision:
        assert torch.equal(base.get(k), merged.get(k)), k  # bit-identical, although every expert changed it
    llm = [k for k in base.keys() if ".layers." in k and k.endswith("proj.weight") and not k.startswith(VISION[kind])]
    assert llm and all(not torch.equal(base.get(k), merged.get(k)) for k in llm)
    for k in base.keys():
        if "norm" in k or "embed_tokens" in k or "lm_head" in k:
            assert torch.equal(base.get(k), merged.get(k)), k
    with torch.no_grad():  # the merged model runs
        logits = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()
