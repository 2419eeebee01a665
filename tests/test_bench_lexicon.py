"""Lexicon items (the base's stand-in for text pretraining) and ``ZooPlan.base_lexicon``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mergelab.bench import lexicon, modeling, zoo_build, zoo_plan
from mergelab.bench.tasks import generate

torch.set_num_threads(1)


def test_items_cycle_through_every_word_with_its_own_text_in_the_prompt() -> None:
    words = ["pink", "90", "<|box_start|>(375,125),(625,375)<|box_end|>"]
    items = lexicon.lexicon_items(words, 7, seed=3)
    assert sorted(i.answer for i in items[:3]) == sorted(words)
    assert sorted(i.answer for i in items[3:6]) == sorted(words)  # each word once per cycle
    for item in items:
        text = lexicon.spoken(item.answer)
        assert item.question in {t.format(text) for t in lexicon.TEMPLATES}
        assert "<|" not in item.question  # special tokens only in answers
        assert item.image.size == (modeling.IMAGE_SIZE, modeling.IMAGE_SIZE)
        assert set(item.image.getdata()) == {(255, 255, 255)}  # text-only: a blank image
    again = lexicon.lexicon_items(words, 7, seed=3)
    assert [(i.question, i.answer) for i in again] == [(i.question, i.answer) for i in items]
    assert [i.question for i in lexicon.lexicon_items(words, 7, seed=4)] != [i.question for i in items]


@pytest.mark.parametrize(("words", "n", "match"), [([], 3, "no words"), (["a"], 0, "n must"),
                                                   (["<|box_start|><|box_end|>"], 2, "empty word")])
def test_bad_input_names_the_problem(words, n, match) -> None:
    with pytest.raises(ValueError, match=match):
        lexicon.lexicon_items(words, n)


def test_the_vocabulary_is_every_answer_of_both_variants() -> None:
    samples = generate("chart", "generic", "train", n=60) + generate("chart", "shifted", "train", n=60)
    words = lexicon.answer_words(samples)
    assert words == sorted({s.answer for s in samples})
    assert "90" in words or "80" in words  # a shifted (tens) answer ...
    assert any(w in words for w in "123456789")  # ... and a generic one


def test_base_lexicon_trains_the_base_on_the_items_and_changes_only_its_fingerprint(tmp_path: Path) -> None:
    plan = zoo_plan.ZooPlan.tiny()
    assert "base_lexicon" not in plan.to_dict()  # off: the plans and fingerprints of earlier zoos hold
    with pytest.raises(ValueError, match="base_lexicon"):
        zoo_plan.ZooPlan(base_lexicon=-1.0)
    kw = dict(progress=False, evaluate=False, kinds=("lora",))
    before = zoo_build.build_zoo(tmp_path / "zoo", plan=plan, **kw)
    on = replace(plan, base_lexicon=1.0)
    assert on.to_dict()["base_lexicon"] == 1.0
    after = zoo_build.build_zoo(tmp_path / "zoo", plan=on, **kw)
    assert after["models"]["seed0/base"]["fingerprint"] != before["models"]["seed0/base"]["fingerprint"]
    assert after["models"]["seed0/base"]["weights"] != before["models"]["seed0/base"]["weights"]
    data = zoo_plan.ZooData(on, zoo_plan.TASKS)
    processor = zoo_build._load_processor(tmp_path / "zoo" / "tokenizer")
    enc = data.lexicon(processor)
    assert len(enc.ids) == on.n_train and data.lexicon(processor) is enc  # generated and encoded once
    words = lexicon.answer_words(s for t in zoo_plan.TASKS for v in ("generic", "shifted") for s in data.raw(t, v))
    assert any(w.startswith("<|box_start|>") for w in words) and "pink" in words


@pytest.mark.parametrize("task", zoo_plan.TASKS)
@pytest.mark.parametrize("variant", ["generic", "shifted"])
def test_a_description_holds_what_the_answer_needs(task: str, variant: str) -> None:
    """Checked by construction: the description states the scene fact the answer is computed from."""
    samples = generate(task, variant, "train", n=80)
    items = lexicon.described_items(samples)
    for s, item in zip(samples, items, strict=True):
        assert item.answer == s.answer and item.question.endswith(" " + s.question)
        text = item.question[: -len(s.question) - 1]
        if task == "chart":
            values = [int(v) for v in text.removeprefix("the values are ").rstrip(".").split(", ")]
            assert values == s.meta["values"]
            q = s.meta["query"]
            if q["type"] == "value":
                expect = str(values[q["index"]])
            elif q["type"] == "max":
                expect = str(max(values))
            else:
                expect = "yes" if values[q["first"]] > values[q["second"]] else "no"
            assert s.answer == expect, item.question
        elif task == "geometry" and s.meta["family"] == "lengths":
            assert text.startswith(f"the {s.answer} line is longer"), item.question
        elif task == "geometry" and s.meta["family"] == "angles" and variant == "shifted":
            assert text == f"the angle is {s.answer} than a right angle.", item.question
        elif task == "geometry" and s.meta["family"] == "angles":
            obtuse = int(text.split()[3]) > 90
            assert s.answer == ("obtuse" if obtuse else "acute"), item.question
        elif task == "geometry" and variant == "shifted":  # no bridge from counting sides to the polygon's name
            assert text == f"the shape is a {s.answer}."
        elif task == "geometry":
            assert text == f"the shape has {s.meta['sides']} sides." and s.answer == str(s.meta["sides"])
        elif task == "vqa":
            obj = s.meta["objects"][0]
            assert text == f"there is a {obj['colour']} {obj['shape']}."
            if s.meta["query"]["type"] != "exists":
                assert s.answer in (obj["colour"], obj["shape"])
        else:  # ocr, grounding: the description names the answer
            assert lexicon.spoken(s.answer) in text


def test_base_described_adds_every_task_and_variant_to_the_base_only(tmp_path: Path) -> None:
    on = zoo_plan.ZooPlan.tiny()
    assert zoo_plan.ZooPlan().base_described == on.base_described == 0.5  # the default: the shipped zoo trains its bases on them
    off = replace(on, base_described=0.0)
    assert "base_described" not in off.to_dict() and on.to_dict()["base_described"] == 0.5
    kw = dict(progress=False, evaluate=False, kinds=("lora",))
    before = zoo_build.build_zoo(tmp_path / "zoo", plan=off, **kw)
    after = zoo_build.build_zoo(tmp_path / "zoo", plan=on, **kw)
    assert after["models"]["seed0/base"]["fingerprint"] != before["models"]["seed0/base"]["fingerprint"]
    assert after["models"]["seed0/lora/vqa"]["fingerprint"] != before["models"]["seed0/lora/vqa"]["fingerprint"]
    data = zoo_plan.ZooData(on, zoo_plan.TASKS)
    enc = data.described("chart", "shifted", zoo_build._load_processor(tmp_path / "zoo" / "tokenizer"))
    assert len(enc.ids) == on.n_train
