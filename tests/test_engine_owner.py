"""Policy action ``owner``: a tensor that exactly one expert changes is taken from it bit for bit (omni preset)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab.engine import MergeError, merge
from mergelab.engine.policy import PRESETS, resolve_policy

Q = "model.language_model.layers.0.self_attn.q_proj.weight"
IMG = "model.visual.merger.mlp.0.weight"
AUD = "model.audio_tower.proj.weight"
VID = "model.video_visual.blocks.0.attn.qkv.weight"
NORM = "model.language_model.norm.weight"


def save_ckpt(d: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config or {"model_type": "mergelab_omni_thinker"}))
    return d


def base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {Q: torch.randn(4, 4, generator=g), IMG: torch.randn(3, 4, generator=g),
            AUD: torch.randn(3, 4, generator=g), VID: torch.randn(2, 2, generator=g), NORM: torch.ones(4)}


def _expert(base: dict[str, torch.Tensor], seed: int, owns: tuple[str, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in base.items()}
    for k in (Q, *owns):
        out[k] = out[k] + torch.randn(out[k].shape, generator=g)
    return out


def save_lora(d: Path, a: torch.Tensor, b: torch.Tensor, save: dict[str, torch.Tensor] | None = None) -> Path:
    """A peft-layout LoRA adapter (alpha = 2 r, so scaling 2) with factors ``a``, ``b`` on ``Q`` and ``save`` as
    ``modules_to_save``."""
    mod = "base_model.model." + Q.removesuffix(".weight")
    t = {f"{mod}.lora_A.weight": a.contiguous(), f"{mod}.lora_B.weight": b.contiguous()}
    for k, v in (save or {}).items():
        t["base_model.model." + k.removesuffix(".weight") + ".modules_to_save.default.weight"] = v
    d.mkdir(parents=True)
    save_file(t, str(d / "adapter_model.safetensors"))
    r = a.shape[0]
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                       "target_modules": ["q_proj"]}))
    return d


def test_omni_preset_under_both_naming_schemes() -> None:
    pol = PRESETS["omni_thinker"]
    for name in (IMG, AUD, VID, "visual.merger.mlp.0.weight", "thinker.visual.blocks.0.norm1.weight",
                 "audio_tower.ln_post.bias", "thinker.audio_tower.proj.weight", "model.audio_tower.ln_post.weight"):
        assert pol.action(name) == "owner", name
    assert pol.action(Q) == "merge" and pol.action(NORM) == "base" and pol.action("lm_head.weight") == "base"
    for mt in ("mergelab_omni_thinker", "qwen2_5_omni_thinker"):
        assert resolve_policy("auto", {"model_type": mt}).name == "omni_thinker"


def test_owned_towers_are_taken_bit_for_bit_and_reported(tmp_path: Path) -> None:
    base = base_tensors()
    b = save_ckpt(tmp_path / "base", base)
    ea, eb = _expert(base, 1, (IMG,)), _expert(base, 2, (AUD,))
    a = save_ckpt(tmp_path / "vision", ea)
    bb = save_ckpt(tmp_path / "audio", eb)
    rep = merge(base=b, experts=[a, bb], method="task_arithmetic", params={"lam": 1.0}, policy="auto",
                out=tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(got[IMG], ea[IMG]) and torch.equal(got[AUD], eb[AUD]) and torch.equal(got[VID], base[VID])
    torch.testing.assert_close(got[Q], base[Q] + (ea[Q] - base[Q]) + (eb[Q] - base[Q]))
    owners = {t.name: t.owner for t in rep.tensors}
    assert owners[IMG] == "vision" and owners[AUD] == "audio" and owners[VID] is None and owners[Q] is None
    assert rep.counts == {"base": 1, "merge": 1, "owner": 3}
    assert rep.accounting["base"] == {"copied": 2, "merged": 1, "owned": 2}
    assert rep.accounting["experts"]["vision"] == {"excluded": 1, "merged": 1, "owned": 1, "unchanged": 2}


def test_two_owners_is_an_error_naming_both(tmp_path: Path) -> None:
    base = base_tensors()
    b = save_ckpt(tmp_path / "base", base)
    a = save_ckpt(tmp_path / "vision", _expert(base, 1, (IMG,)))
    c = save_ckpt(tmp_path / "video", _expert(base, 3, (IMG, VID)))
    with pytest.raises(MergeError, match=r"tensor model\.visual\.merger\.mlp\.0\.weight: .*vision and video"):
        merge(base=b, experts=[a, c], method="ties", policy="auto", out=tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_lora_modules_to_save_value_is_owned_bit_for_bit(tmp_path: Path) -> None:
    base = base_tensors()
    b = save_ckpt(tmp_path / "base", base)
    ea = _expert(base, 1, (IMG,))
    a = save_ckpt(tmp_path / "vision", ea)
    conn = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(4)
    fa, fb = torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g)
    ad = save_lora(tmp_path / "audio", fa, fb, {AUD: conn, VID: base[VID].clone()})  # VID saved but unchanged
    rep = merge(base=b, experts=[a, ad], method="task_arithmetic", params={"lam": 1.0}, policy="omni_thinker",
                out=tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(got[AUD], conn) and torch.equal(got[IMG], ea[IMG]) and torch.equal(got[VID], base[VID])
    torch.testing.assert_close(got[Q], base[Q] + (ea[Q] - base[Q]) + 2.0 * fb @ fa)
    assert {t.name: t.owner for t in rep.tensors}[AUD] == "audio"
