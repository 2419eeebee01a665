"""The omni failure analysis: delta interference rows and the answer-word confusion, on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from mergelab.bench.omni import analysis, data


def test_delta_interference_cosines_norms_and_kept_share() -> None:
    e = torch.eye(2)
    tv = {"model.language_model.layers.0.mlp.up_proj.weight": [e, -e, torch.zeros(2, 2)]}
    merged = {"model.language_model.layers.0.mlp.up_proj.weight": e / 2}
    (row,) = analysis.delta_interference(tv, merged)
    assert row["cos/image-audio"] == pytest.approx(-1.0) and row["cos/image-video"] == 0.0
    assert row["norm/image"] == pytest.approx(2**0.5) and row["norm/video"] == 0.0
    assert row["kept/image"] == pytest.approx(0.5) and row["kept/audio"] == pytest.approx(-0.5)
    (layer,) = analysis.by_layer([row])
    assert layer["group"] == "layer 0" and layer["kept/image"] == pytest.approx(0.5)


def test_answer_confusion_separates_right_same_fact_other_modality_and_other() -> None:
    items = [s for s in data.cross_samples("music_avqa", "test", 28) if s.qtype == "audio_pitch"][:4]
    wrong = {"rising": "falling", "falling": "rising"}
    preds = [items[0].answer, wrong[items[1].answer], "left", "banana"]
    out = analysis.answer_confusion(items, preds)["audio_pitch"]
    assert out == {"right": 25.0, "same_fact": 25.0, "other_modality": 25.0, "other": 25.0}
    lettered = [s for s in data.cross_samples("avqa", "test", 12) if s.qtype == "video_motion"][:1]
    assert analysis.answer_confusion(lettered, [lettered[0].answer])["video_motion"]["right"] == 100.0
    other = next(c for c in "ABCD" if c != lettered[0].answer)  # a letter naming another direction
    assert analysis.answer_confusion(lettered, [other])["video_motion"]["same_fact"] == 100.0


def test_connector_effect_puts_back_only_the_other_modalities_towers() -> None:
    """``with_base_connectors`` changes exactly the other two towers; with the base's towers equal to the merge's,
    the swapped model answers as the merge does (the two accuracies agree)."""
    from mergelab.bench.omni.modeling import OmniSize, build_model, build_processor, build_tokenizer
    from mergelab.bench.omni.train import TOWERS

    torch.set_num_threads(1)
    tok = build_tokenizer(data.corpus(0), 400)
    proc = build_processor(tok)
    merged = build_model(tok, OmniSize.tiny(), seed=0).eval()
    other = build_model(tok, OmniSize.tiny(), seed=1).state_dict()
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    after = analysis.with_base_connectors(merged, other, "audio").state_dict()
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert changed and all(k.startswith((TOWERS["image"], TOWERS["video"])) for k in changed)
    assert all(torch.equal(after[k], other[k]) for k in before if k.startswith((TOWERS["image"], TOWERS["video"])))
    state = build_model(tok, OmniSize.tiny(), seed=0).state_dict()
    items = data.cross_samples("music_avqa", "test", 14)
    out = analysis.connector_effect(lambda: build_model(tok, OmniSize.tiny(), seed=0).eval(), proc, state, items)
    assert set(out) == set(data.MODALITIES)
    assert all(v["merged"] == v["own_connector_only"] and 0.0 <= v["merged"] <= 100.0 for v in out.values())
