"""The omni model: three-tower thinker, processor, Auto registration, generate with any subset of media."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from mergelab.bench.omni import data, modeling
from mergelab.bench.omni.classes import MODEL_TYPE, OmniThinkerForConditionalGeneration, patchify_video

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def processor() -> transformers.ProcessorMixin:
    return modeling.build_processor(modeling.build_tokenizer(data.corpus(), vocab_size=500))


@pytest.fixture(scope="module")
def model(processor) -> OmniThinkerForConditionalGeneration:
    return modeling.build_model(processor.tokenizer, modeling.OmniSize.tiny(), seed=0)


def _inputs(processor, samples: list[data.OmniSample]) -> dict:
    prompts = [modeling.build_prompt(processor, s.modalities, s.question) for s in samples]
    media: dict[str, list] = {}
    for s in samples:
        for key, values in data.render(s).items():
            media.setdefault(key, []).extend(values)
    return processor(text=prompts, **media, return_tensors="pt", padding=True)


def test_default_size_is_the_zoo_llm_with_depth_2_towers(processor) -> None:
    m = modeling.build_model(processor.tokenizer)
    n = sum(p.numel() for p in m.parameters())
    assert 1.6e6 < n < 1.8e6
    assert m.config.text_config.hidden_size == 128 and m.config.text_config.num_hidden_layers == 4
    assert m.config.vision_config.depth == m.config.video_config.depth == m.config.audio_config.encoder_layers == 2
    again = modeling.build_model(processor.tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values(), strict=True))


def test_save_and_auto_load_round_trip(tmp_path: Path, processor, model) -> None:
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert f'"model_type": "{MODEL_TYPE}"' in (tmp_path / "config.json").read_text()
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path)
    proc = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is OmniThinkerForConditionalGeneration and type(proc) is type(processor)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scene = data.cross_samples("music_avqa", "test", 2)
    x, y = _inputs(processor, scene), _inputs(proc, scene)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, loaded.eval()(**y).logits, rtol=0, atol=0)


@pytest.mark.parametrize("subset", [c for r in range(4) for c in itertools.combinations(data.MODALITIES, r)],
                         ids=lambda c: "+".join(c) or "text")
def test_generate_with_any_subset_of_media(processor, model, subset) -> None:
    samples = [s.only(subset) for s in data.cross_samples("music_avqa", "test", 2)]
    inputs = _inputs(processor, samples)
    tok = processor.tokenizer
    for m, token in (("image", "<|image_pad|>"), ("audio", "<|AUDIO|>"), ("video", "<|video_pad|>")):
        n = int((inputs["input_ids"] == tok.convert_tokens_to_ids(token)).sum())
        assert n == (2 * {"image": 16, "audio": 25, "video": 16}[m] if m in subset else 0)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_video_goes_through_video_visual_only(processor, model) -> None:
    inputs = _inputs(processor, [s.only(("video",)) for s in data.cross_samples("avqa", "test", 2)])
    with torch.no_grad():
        ref = model(**inputs).logits
        for name, changes in (("visual", False), ("video_visual", True)):
            tower = getattr(model.model, name)
            saved = {k: v.clone() for k, v in tower.state_dict().items()}
            for p in tower.parameters():
                p.add_(1.0)
            moved = not torch.equal(model(**inputs).logits, ref)
            tower.load_state_dict(saved)
            assert moved is changes, name


def test_patchify_video_matches_the_image_processor_on_a_still_clip(processor) -> None:
    image = data.render_image(data.task_samples("image_color", "test", 1)[0].scene["image"])
    ip = processor.image_processor
    ref = ip(images=[image], return_tensors="np")
    frame = np.asarray(image.convert("RGB"), dtype=np.uint8)
    patches, grid = patchify_video(np.stack([frame, frame]), ip.image_mean, ip.image_std, float(ip.rescale_factor))
    assert grid == list(ref["image_grid_thw"][0])
    np.testing.assert_allclose(patches, ref["pixel_values"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("modality,task", [("image", "image_color"), ("audio", "audio_beeps"),
                                           ("video", "video_motion")])
def test_frozen_towers_see_their_inputs(processor, modality, task) -> None:
    model = modeling.build_model(processor.tokenizer)  # the benchmark's size
    render = {"image": data.render_image, "audio": data.render_audio, "video": data.render_video}[modality]
    media = [render(s.scene[modality]) for s in data.task_samples(task, "train", 24)]
    feats = modeling.tower_features(model, processor, modality, media)
    blank = modeling.tower_features(model, processor, modality, [modeling.blank_medium(modality)])
    between, across = modeling.tower_contrast(feats, blank)
    assert between > 2 * across and between > 0.01


def test_the_default_audio_init_fails_the_contrast_check(processor) -> None:
    model = modeling.build_model(processor.tokenizer)
    torch.manual_seed(0)
    default = OmniThinkerForConditionalGeneration(model.config)  # transformers' own init of the audio convolutions
    media = [data.render_audio(s.scene["audio"]) for s in data.task_samples("audio_beeps", "train", 24)]
    feats = modeling.tower_features(default, processor, "audio", media)
    blank = modeling.tower_features(default, processor, "audio", [modeling.blank_medium("audio")])
    between, across = modeling.tower_contrast(feats, blank)
    assert between < across / 10


def test_import_mergelab_is_cheap_and_registers_on_first_auto_use() -> None:
    code = ("import sys, mergelab; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "from transformers import AutoConfig; "
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
            f"assert {MODEL_TYPE!r} in CONFIG_MAPPING; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_training_batch_labels_only_the_answer_and_end_of_turn(processor) -> None:
    from mergelab.bench.omni.train import batch

    samples = [data.task_samples("audio_beeps", "train", 1)[0], data.cross_samples("avqa", "train", 1)[0],
               data.described_samples(1)[0]]
    inputs = batch(processor, samples, [data.render(s) for s in samples])
    tok = processor.tokenizer
    for r, s in enumerate(samples):
        target = inputs["labels"][r][inputs["labels"][r] != -100]
        assert tok.decode(target) == f"{s.answer}<|im_end|>"
    prompts = batch(processor, samples, [data.render(s) for s in samples], with_answers=False)
    assert "labels" not in prompts and bool((prompts["attention_mask"][:, -1] == 1).all())  # left-padded


def test_mergelab_load_model_loads_an_omni_checkpoint(tmp_path: Path, processor, model) -> None:
    from mergelab import hf

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc = hf.load_model(tmp_path, device="cpu")
    assert type(loaded) is OmniThinkerForConditionalGeneration and type(proc) is type(processor)
