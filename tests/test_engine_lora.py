"""LoRA experts: the engine's task vector ``scaling * B @ A`` equals peft's ``merge_and_unload`` exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mergelab.engine import CheckpointReader, ExpertSpec, merge
from mergelab.engine.adapters import LoraAdapter


def save_adapter(model_kind: str, base_dir: Path, out: Path, seed: int, **lora_kw: Any) -> dict[str, torch.Tensor]:
    """Build a peft adapter (non-zero B) on the base at ``base_dir``, save it, return the merge_and_unload weights."""
    import peft
    import transformers

    cls = {"llama": transformers.LlamaForCausalLM, "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}[model_kind]
    model = cls.from_pretrained(base_dir)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(init_lora_weights=False, **lora_kw)
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(out)
    merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def load_merged(kind: str, d: Path) -> dict[str, torch.Tensor]:
    import transformers

    cls = {"llama": transformers.LlamaForCausalLM, "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}[kind]
    model, info = cls.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    return model.state_dict()


@pytest.mark.parametrize(
    "variant",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
        dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"]),
        dict(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
            rank_pattern={"layers.1.self_attn.q_proj": 2, "o_proj": 6}, alpha_pattern={r".*\.0\.self_attn\.v_proj": 3},
        ),
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_lora_delta_equals_merge_and_unload(variant: dict[str, Any], tiny_models: Any, tmp_path: Path) -> None:
    base_dir, _ = tiny_models("llama")
    want = save_adapter("llama", base_dir, tmp_path / "ad", 0, **variant)
    adapter = LoraAdapter(tmp_path / "ad", CheckpointReader(base_dir).keys())
    if "rank_pattern" in variant:  # the patterns really produced different ranks and scalings
        ranks = {m.module.split("model.", 1)[1]: adapter.reader.infos[m.a_key].shape[0] for m in adapter.modules.values()}
        assert ranks["layers.1.self_attn.q_proj"] == 2 and ranks["layers.0.self_attn.o_proj"] == 6
        assert ranks["layers.0.self_attn.q_proj"] == 4
        scal = {m.module.split("model.", 1)[1]: m.scaling for m in adapter.modules.values()}
        assert scal["layers.0.self_attn.v_proj"] == 3 / 4 and scal["layers.1.self_attn.v_proj"] == 8 / 4
    merge(base=base_dir, experts=[tmp_path / "ad"], method="task_arithmetic", params={"lam": 1.0}, policy=[],
          out=tmp_path / "out", device="cpu")
    got = load_merged("llama", tmp_path / "out")
    base = CheckpointReader(base_dir)
    changed = 0
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=2e-7, msg=k)
        changed += int(not torch.equal(base.get(k), got[k]))
    assert changed == len(adapter.modules) > 0


def test_lora_experts_for_a_vlm_map_in_memory_names_to_legacy_disk_names(tiny_models: Any, tmp_path: Path) -> None:
    base_dir, full_experts = tiny_models("qwen2_vl")
    target = r".*language_model.*\.(q_proj|v_proj)"
    want1 = save_adapter("qwen2_vl", base_dir, tmp_path / "a1", 1, r=4, lora_alpha=8, target_modules=target)
    save_adapter("qwen2_vl", base_dir, tmp_path / "a2", 2, r=4, lora_alpha=16, target_modules=target)
    ad = LoraAdapter(tmp_path / "a1", CheckpointReader(base_dir).keys())
    assert all(m.module.startswith("model.language_model.") for m in ad.modules.values())  # 5.x in-memory names
    assert all(k.startswith("model.layers.") for k in ad.modules)  # mapped to the 4.x names on disk
    # single LoRA expert, lambda 1: exactly merge_and_unload
    merge(base=base_dir, experts=[tmp_path / "a1"], method="task_arithmetic", policy="qwen2_vl",
          out=tmp_path / "one", device="cpu")
    got = load_merged("qwen2_vl", tmp_path / "one")
    for k, v in want1.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=2e-7, msg=k)
    # mixed: two LoRA experts and a full fine-tuned one, averaged
    rep = merge(base=base_dir, experts=[tmp_path / "a1", ExpertSpec(tmp_path / "a2", name="lora2"), full_experts[0]],
                method="weight_average", policy="auto", out=tmp_path / "mix", device="cpu")
    assert rep.policy["name"] == "qwen2_vl" and [e["kind"] for e in rep.experts] == ["lora", "lora", "full"]
    out = CheckpointReader(tmp_path / "mix")
    base = CheckpointReader(base_dir)
    full = CheckpointReader(full_experts[0])
    a2 = LoraAdapter(tmp_path / "a2", base.keys())
    k = "model.layers.1.self_attn.v_proj.weight"
    b = base.get(k)
    d1, _ = ad.delta(k, b, torch.device("cpu"), torch.float32)
    d2, _ = a2.delta(k, b, torch.device("cpu"), torch.float32)
    assert d1 is not None and d2 is not None
    want = b + (d1 + d2 + (full.get(k) - b)) / 3
    torch.testing.assert_close(out.get(k), want, rtol=0, atol=1e-6)
    k = "model.layers.0.mlp.up_proj.weight"  # only the full expert touches it
    torch.testing.assert_close(out.get(k), base.get(k) + (full.get(k) - base.get(k)) / 3, rtol=0, atol=1e-6)


def test_adapter_key_without_base_counterpart_is_named(tiny_models: Any, tmp_path: Path) -> None:
    import json

    from safetensors.torch import save_file

    base_dir, _ = tiny_models("llama")
    ad = tmp_path / "bad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)},
              str(ad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.7\.self_attn\.q_proj\.lora_A\.weight maps to .* not in the base"):
        merge(base=base_dir, experts=[ad], method="task_arithmetic", policy=[], out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
