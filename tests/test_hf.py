"""mergelab.hf: save/load of tiny Qwen2-VL, LoRA adapter directories and text LMs, with their processors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from PIL import Image, ImageDraw

from mergelab import hf
from mergelab.bench import modeling

torch.set_num_threads(1)

COLOURS = ("red", "green", "blue", "yellow")


def _samples(n: int = 8) -> list[SimpleNamespace]:
    out = []
    for i in range(n):
        img = Image.new("RGB", (112, 112), "white")
        ImageDraw.Draw(img).rectangle((10 + i, 20, 60 + i, 70), fill=COLOURS[i % 4])
        out.append(SimpleNamespace(image=img, question="what color is the square?", answer=COLOURS[i % 4]))
    return out


@pytest.fixture(scope="module")
def tiny_vlm() -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    tok = modeling.build_tokenizer(modeling.corpus_lines(_samples()), vocab_size=320)
    proc = modeling.build_processor(tok)
    return modeling.build_model(tok, modeling.TinyQwen2VLConfig.tiny(), seed=3), proc


def _generate(model: transformers.PreTrainedModel, proc: transformers.ProcessorMixin) -> torch.Tensor:
    s = _samples(4)
    prompts = [modeling.build_prompt(proc, x.question) for x in s]
    inputs = proc(text=prompts, images=[x.image for x in s], return_tensors="pt", padding=True, padding_side="left")
    return model.generate(**inputs, max_new_tokens=4, do_sample=False)


def test_qwen2_vl_roundtrip_reloads_processor_and_generates(tiny_vlm, tmp_path: Path) -> None:
    model, proc = tiny_vlm
    out = hf.save_model(model, proc, tmp_path / "ckpt")
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "chat_template.jinja" in files and "preprocessor_config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind

    model2, proc2 = hf.load_model(out, device="cpu")
    assert type(model2) is transformers.Qwen2VLForConditionalGeneration
    assert isinstance(proc2, transformers.Qwen2VLProcessor)
    assert proc2.image_processor.size["longest_edge"] == 112 * 112
    assert modeling.build_prompt(proc2, "q?") == modeling.build_prompt(proc, "q?")
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    a, b = _generate(model, proc), _generate(model2, proc2)
    assert a.shape[1] > b.shape[1] - 5 and torch.equal(a, b)


def test_load_model_dtype_and_errors(tiny_vlm, tmp_path: Path) -> None:
    model, proc = tiny_vlm
    hf.save_model(model, proc, tmp_path / "m")
    m16, _ = hf.load_model(tmp_path / "m", dtype="bfloat16")
    assert next(m16.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float99'"):
        hf.load_model(tmp_path / "m", dtype="float99")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hf.load_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="device: unknown device 'gpu'"):
        hf.load_model(tmp_path / "m", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' requested but CUDA is not available"):
            hf.load_model(tmp_path / "m", device="cuda")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_model(tmp_path / "empty")
    with pytest.raises(FileExistsError, match="already exists"):
        hf.save_model(model, proc, tmp_path / "m")
    hf.save_model(model, proc, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m"]


def test_lora_adapter_directory_loads_merged(tiny_vlm, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from mergelab.bench.train import LM_LINEAR_TARGETS

    model, proc = tiny_vlm
    hf.save_model(model, proc, tmp_path / "base")
    base, _ = hf.load_model(tmp_path / "base")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LM_LINEAR_TARGETS))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
        assert "lora" in name or not p.requires_grad, name  # vision tower and the rest frozen
    assert not any("visual" in n for n, _ in peft_model.named_parameters() if "lora" in n)
    peft_model.peft_config["default"].base_model_name_or_path = "../base"
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "../base"

    merged, proc2 = hf.load_model(tmp_path / "adapter")
    expected = peft_model.merge_and_unload().state_dict()
    got = merged.state_dict()
    assert set(got) == set(expected)
    changed = [k for k in got if not torch.equal(got[k], model.state_dict()[k])]
    assert changed and all("language_model" in k for k in changed)
    for k in got:
        torch.testing.assert_close(got[k], expected[k])
    assert isinstance(proc2, transformers.Qwen2VLProcessor)


def test_text_lm_roundtrip_returns_tokenizer(tmp_path: Path) -> None:
    tok = modeling.build_tokenizer(["hello world", "the cat sat"], vocab_size=300)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_model(model, tok, tmp_path / "lm")
    model2, tok2 = hf.load_model(tmp_path / "lm")
    assert isinstance(model2, transformers.LlamaForCausalLM)
    assert isinstance(tok2, transformers.PreTrainedTokenizerBase)
    ids = tok2("hello world", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(model(ids).logits, model2(ids).logits)


def test_unknown_config_is_named(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad/config.json: invalid JSON"):
        hf.load_model(d)
