"""Omni benchmark data (tasks, cross-modal sets, described items) and the cross-modal metrics on golden cases."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from mergelab.bench.omni import data, metrics
from mergelab.bench.omni.modeling import SAMPLE_RATE, VIDEO_FRAMES, VIDEO_SIZE


@pytest.mark.parametrize("task", list(data.TASKS))
def test_tasks_are_deterministic_split_disjoint_and_balanced(task: str) -> None:
    a = data.task_samples(task, "train", 60)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in data.task_samples(task, "train", 60)]
    test = data.task_samples(task, "test", 60)
    seen = {json.dumps(s.scene, sort_keys=True) for s in a}
    assert not seen & {json.dumps(s.scene, sort_keys=True) for s in test}
    modality, question, words = data.TASKS[task]
    assert all(s.modalities == (modality,) and s.question == question and s.answer in words for s in a + test)
    assert len(Counter(s.answer for s in a)) == len(words)


def test_answer_words_of_different_modalities_do_not_overlap() -> None:
    by_modality: dict[str, set[str]] = {}
    for modality, _, words in data.TASKS.values():
        by_modality.setdefault(modality, set()).update(words)
    pairs = [(a, b) for a in by_modality for b in by_modality if a < b]
    assert all(not by_modality[a] & by_modality[b] for a, b in pairs)


def test_media_render_as_the_model_expects() -> None:
    scene = data.cross_samples("music_avqa", "test", 1)[0].scene
    image = data.render_image(scene["image"])
    assert image.size == (112, 112)
    wave = data.render_audio(scene["audio"])
    assert wave.shape == (SAMPLE_RATE,) and wave.dtype == np.float32 and 0.3 < np.abs(wave).max() <= 0.5
    loud = np.abs(wave) > 0.05
    onsets = int((loud[1:] & ~loud[:-1]).sum())  # rising edges of the envelope: one per beep (sines cross zero...)
    assert onsets >= scene["audio"]["beeps"]
    clip = data.render_video(scene["video"])
    assert clip.shape == (VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3) and clip.dtype == np.uint8


@pytest.mark.parametrize("motion,axis,sign", [("left", 1, -1), ("right", 1, 1), ("up", 0, -1), ("down", 0, 1)])
def test_video_square_moves_the_named_way(motion: str, axis: int, sign: int) -> None:
    clip = data.render_video({"motion": motion, "speed": "fast", "side": 12, "offset": 0})
    centres = [np.argwhere(f[..., 0] > 0).mean(axis=0)[axis] for f in clip]
    assert sign * (centres[-1] - centres[0]) > 20


def test_beep_pitch_direction_and_count() -> None:
    rising = data.draw_scene(__import__("random").Random(3))["audio"]
    freqs = rising["freqs"]
    assert len(freqs) == rising["beeps"]
    assert (np.diff(freqs) > 0).all() if rising["pitch"] == "rising" else (np.diff(freqs) < 0).all()


@pytest.mark.parametrize("which", data.CROSS_SETS)
def test_cross_modal_sets_carry_every_medium_and_cycle_question_types(which: str) -> None:
    items = data.cross_samples(which, "test", 70)
    assert all(s.modalities == data.MODALITIES and s.task == which for s in items)
    types = Counter(s.qtype for s in items)
    assert set(types) == set(data.TASKS) | ({"composite"} if which == "music_avqa" else set())
    if which == "avqa":
        assert all(s.answer in "ABCD" and s.choices[("ABCD").index(s.answer)] in data.TASKS[s.qtype][2]
                   and s.question.endswith(data.AVQA_SUFFIX) for s in items)
    else:
        composite = [s.answer for s in items if s.qtype == "composite"]
        assert set(composite) == {"yes", "no"}


def test_single_modality_view_keeps_only_its_medium() -> None:
    item = data.cross_samples("avqa", "test", 1)[0]
    audio = item.only(("audio",))
    assert audio.modalities == ("audio",) and audio.question == item.question and audio.answer == item.answer
    assert item.modalities == data.MODALITIES


def test_described_items_are_text_only_and_state_their_answer() -> None:
    items = data.described_samples(200)
    assert all(not s.scene for s in items)
    for s in items:
        if s.qtype in data.TASKS and not s.choices:
            assert s.answer in s.question.split("?")[0].replace(".", " ").split() or s.qtype.endswith("beeps")


# golden cases of the paper's two cross-modal metrics
@pytest.mark.parametrize("prediction,answer,expected", [
    ("A", "A", 1.0), ("A. red", "A", 1.0), ("  B", "B", 1.0), ("b", "B", 0.0), ("The answer is A", "A", 0.0),
    ("", "A", 0.0), ("C", "A", 0.0),
])
def test_avqa_scores_the_first_character(prediction: str, answer: str, expected: float) -> None:
    assert metrics.avqa_correct(prediction, answer) == expected


@pytest.mark.parametrize("prediction,answer,expected", [
    ("red", "red", 1.0), ("Red.", "red", 1.0), ("the circle", "circle", 1.0), ("three", "3", 1.0),
    ("3", "three", 1.0), ("rising!", "rising", 1.0), ("up left", "up", 0.0), ("reds", "red", 0.0), ("", "no", 0.0),
])
def test_music_avqa_is_evalai_normalised_exact_match(prediction: str, answer: str, expected: float) -> None:
    assert metrics.music_avqa_correct(prediction, answer) == expected


def test_score_breaks_down_by_question_type() -> None:
    items = data.cross_samples("music_avqa", "test", 14)
    preds = [s.answer if s.qtype.startswith("audio") else "nothing" for s in items]
    out = metrics.score(items, preds)
    assert out["n"] == 14 and out["accuracy"] == pytest.approx(100 * 4 / 14)
    assert out["qtype/audio_beeps"] == out["qtype/audio_pitch"] == 100.0
    assert out["qtype/image_color"] == out["qtype/composite"] == 0.0
    letters = data.cross_samples("avqa", "test", 6)
    assert metrics.score(letters, [s.answer + ". x" for s in letters])["accuracy"] == 100.0
    with pytest.raises(ValueError, match="predictions"):
        metrics.score(items, preds[:-1])


def test_other_media_keep_the_question_and_the_own_medium() -> None:
    items = data.task_samples("audio_beeps", "train", 40)
    mixed = data.with_other_media(items, 0.5, seed=1)
    full = [m for m in mixed if m.modalities == data.MODALITIES]
    assert 10 < len(full) < 30
    assert all(m.scene["audio"] == s.scene["audio"] and m.question == s.question and m.answer == s.answer
               for m, s in zip(mixed, items, strict=True))


def test_lettered_items_ask_the_own_fact_with_options_and_never_name_another_modality() -> None:
    """``as_lettered`` turns a share of an expert's task items into AVQA-style lettered questions about its own
    medium (options in the task's fixed order, answered by the letter); the cross-modal clause never appears."""
    items = data.task_samples("video_motion", "train", 60, leads=True)
    mixed = data.as_lettered(items, 0.5, seed=2)
    lettered = [m for m in mixed if m.choices]
    assert 15 < len(lettered) < 45
    for m, s in zip(mixed, items, strict=True):
        assert m.scene == s.scene and m.question.startswith(s.question)
        if m.choices:
            assert m.choices == data.TASKS["video_motion"][2] and m.question.endswith(data.AVQA_SUFFIX)
            assert m.choices["ABCD".index(m.answer)] == s.answer and "while" not in m.question
        else:
            assert m == s
    assert data.as_lettered(items, 0.5, seed=2) == mixed and data.as_lettered(items, 0.0) == items
