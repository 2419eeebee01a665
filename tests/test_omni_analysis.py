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
