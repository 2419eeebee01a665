"""Newer families as presets, on tiny models built from their transformers configs: Qwen3-VL (its own family) and
InternVL3 (InternVL2.5's layout and model types: the ``internvl2_5`` preset covers it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from mergelab.engine import CheckpointReader, MergeRecipe, run_merge
from mergelab.engine.policy import preset_for_config
from mergelab.families import FAMILIES, family_for_config

_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def tiny_qwen3_vl() -> Any:
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(**_TEXT, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0, 1],
                           num_position_embeddings=64),
        image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
    return transformers.Qwen3VLForConditionalGeneration(cfg)


def tiny_internvl3() -> Any:
    """InternVL3's HF-native layout: InternViT, the MLP projector and a Qwen2 LM."""
    cfg = transformers.InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[28, 28], patch_size=[14, 14]),
        text_config=dict(model_type="qwen2", **_TEXT), image_token_id=120, downsample_ratio=0.5)
    return transformers.InternVLForConditionalGeneration(cfg)


def _family(root: Path, model: Any, n: int = 2) -> tuple[Path, list[Path]]:
    torch.manual_seed(0)
    model.save_pretrained(root / "base")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = []
    for i in range(n):
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(state[k] + 0.02 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / f"expert{i}")
        experts.append(root / f"expert{i}")
    return root / "base", experts


CASES = {
    # name: (builder, family, vision prefixes (kept at base), a merged LM weight, averaged tensors)
    "qwen3_vl": (tiny_qwen3_vl, "qwen3_vl", ("model.visual.",),
                 "model.language_model.layers.0.self_attn.q_proj.weight", ()),
    "internvl3": (tiny_internvl3, "internvl2_5", ("vision_tower.",),
                  "language_model.model.layers.0.self_attn.q_proj.weight", ("multi_modal_projector.layer_norm.",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_preset_on_tiny_model(case: str, tmp_path: Path) -> None:
    build, family, vision, lm_weight, averaged = CASES[case]
    model = build()
    base, experts = _family(tmp_path, model)
    config = json.loads((base / "config.json").read_text())
    assert family_for_config(config) is FAMILIES[family] and preset_for_config(config) == family
    rep = run_merge(MergeRecipe.build(base=base, experts=experts, method="task_arithmetic", device="cpu"),
                    tmp_path / "out")
    assert rep.policy["name"] == family
    rules = {t.name: t.rule for t in rep.tensors}
    vis = [k for k in rules if k.startswith(vision)]
    assert vis and all(rules[k] == "base" for k in vis)
    assert rules[lm_weight] == "merge"
    if averaged:
        avg = [k for k in rules if k.startswith(averaged)]
        assert avg and all(rules[k] == "average" for k in avg)
    out, b = CheckpointReader(tmp_path / "out"), CheckpointReader(base)
    assert all(torch.equal(out.get(k), b.get(k)) for k in vis)
    assert not torch.equal(out.get(lm_weight), b.get(lm_weight))
    _, info = type(model).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
