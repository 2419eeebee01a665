"""Each loader on a tiny fixture in its documented layout, and its error on a missing file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mergelab.evaluators import loaders as L
from mergelab.evaluators.tasks import TASKS, get_task


def _img(path: Path, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)


def _json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_paper_fixture(root: Path) -> Path:
    """Two or three items of each of the ten benchmarks, in the release layouts documented by the loaders."""
    # VizWiz
    _json(root / "vizwiz/Annotations/val.json", [
        {"image": f"VizWiz_val_0000000{i}.jpg", "question": f"what is this {i}?", "answer_type": "other",
         "answers": [{"answer": "soup", "answer_confidence": "yes"}] * 10} for i in range(2)])  # fmt: skip
    for i in range(2):
        _img(root / f"vizwiz/val/VizWiz_val_0000000{i}.jpg")
    # GQA
    _json(root / "gqa/testdev_balanced_questions.json",
          {"q1": {"imageId": "n1", "question": "Is it red?", "answer": "yes"},
           "q2": {"imageId": "n2", "question": "What colour?", "answer": "blue"}})  # fmt: skip
    _img(root / "gqa/images/n1.jpg")
    _img(root / "gqa/images/n2.jpg")
    # MathVista: pid 1 geometry, pid 2 not in any geometry row (filtered), pid 3 algebraic
    md = {"1": {"task": "geometry problem solving", "skills": ["geometry reasoning"]},
          "2": {"task": "figure question answering", "skills": ["arithmetic reasoning"]},
          "3": {"task": "math word problem", "skills": ["algebraic reasoning"]}}  # fmt: skip
    _json(root / "mathvista/annot_testmini.json", {
        pid: {"pid": pid, "question": f"q{pid}", "query": f"Hint: ...\nQuestion: q{pid}", "image": f"images/{pid}.jpg",
              "choices": ["30", "60"] if pid == "1" else None, "answer": "60" if pid == "1" else "4",
              "question_type": "multi_choice" if pid == "1" else "free_form",
              "answer_type": "text" if pid == "1" else "integer", "precision": None, "metadata": m}
        for pid, m in md.items()})  # fmt: skip
    for pid in md:
        _img(root / f"mathvista/images/{pid}.jpg")
    # MATH-Vision: one per geometry subject plus one algebra item (filtered)
    subs = ["metric geometry - angle", "metric geometry - area", "metric geometry - length", "solid geometry",
            "algebra"]  # fmt: skip
    _jsonl(root / "mathvision/data/testmini.jsonl", [
        {"id": str(i), "question": f"<image1>\nFind x {i}.", "options": ["1", "2", "3", "4", "5"] if i % 2 else [],
         "image": f"images/{i}.jpg", "answer": "B" if i % 2 else "3.5", "solution": None, "level": 2, "subject": s}
        for i, s in enumerate(subs)])  # fmt: skip
    for i in range(len(subs)):
        _img(root / f"mathvision/images/{i}.jpg")
    # ChartQA
    _json(root / "chartqa/test/test_human.json", [{"imgname": "a.png", "query": "max?", "label": "45"}])
    _json(root / "chartqa/test/test_augmented.json", [{"imgname": "b.png", "query": "min?", "label": "Yes"}])
    _img(root / "chartqa/test/png/a.png")
    _img(root / "chartqa/test/png/b.png")
    # TextVQA
    _json(root / "textvqa/TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "question": "what brand?", "image_id": "003a8ae2ef43b901",
         "answers": ["nokia"] * 10}]})  # fmt: skip
    _img(root / "textvqa/train_images/003a8ae2ef43b901.jpg")
    # OCR-VQA: book b1 in test (2 questions), b2 in train (skipped)
    _json(root / "ocrvqa/dataset.json", {
        "b1": {"imageURL": "http://x/b1.jpg", "questions": ["Who wrote this book?", "Is this a comic?"],
               "answers": ["Jane Doe", "No"], "title": "t", "genre": "g", "split": 3},
        "b2": {"imageURL": "http://x/b2.jpg", "questions": ["q"], "answers": ["a"], "split": 1}})  # fmt: skip
    _img(root / "ocrvqa/images/b1.jpg")
    # RefCOCO family (Qwen-VL eval files), COCO images under coco/
    for name in ("refcoco", "refcoco+", "refcocog"):
        _jsonl(root / f"refcoco/{name}_val.jsonl", [
            {"image": "train2014/COCO_train2014_000000000001.jpg", "sent": "the left dog",
             "bbox": [10, 15, 30, 45], "height": 60, "width": 100},
            {"image": "train2014/COCO_train2014_000000000001.jpg", "sent": "the right dog",
             "bbox": [50, 0, 100, 60]}])  # fmt: skip
    _img(root / "coco/train2014/COCO_train2014_000000000001.jpg", size=(100, 60))
    return root


EXPECTED_COUNTS = {"vizwiz": 2, "gqa": 2, "mathvista_geo": 2, "mathvision_geo": 4, "chartqa": 2, "textvqa": 1,
                   "ocrvqa": 2, "refcoco": 2, "refcoco_plus": 2, "refcocog": 2}  # fmt: skip


@pytest.fixture(scope="module")
def paper_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_paper_fixture(tmp_path_factory.mktemp("paper"))


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_paper_loader_reads_documented_layout(paper_root: Path, name: str) -> None:
    task = get_task(name)
    samples = task.load(paper_root, "val", None)
    assert len(samples) == EXPECTED_COUNTS[name]
    for s in samples:
        assert s.image is not None and s.image.is_file()
        assert s.answers and all(isinstance(r, str) for r in s.answers)
        assert task.prompt(s).strip()
    assert len(task.load(paper_root, "val", 1)) == 1  # limit keeps the first item


def test_paper_loader_fields(paper_root: Path) -> None:
    viz = get_task("vizwiz").load(paper_root, "val", None)
    assert viz[0].answers == ["soup"] * 10 and viz[0].id == "VizWiz_val_00000000"
    mv = get_task("mathvista_geo").load(paper_root, "val", None)
    assert [s.id for s in mv] == ["1", "3"]  # pid 2 has no geometry row
    assert mv[0].meta["choices"] == ["30", "60"] and "geometry reasoning" in mv[0].meta["categories"]
    assert mv[0].question.startswith("Hint:")  # the release's query is the prompt
    mvi = get_task("mathvision_geo").load(paper_root, "val", None)
    assert {s.meta["categories"][0] for s in mvi} == {
        "metric geometry - angle",
        "metric geometry - area",
        "metric geometry - length",
        "solid geometry",
    }
    assert "<image1>" not in mvi[0].question
    chart = get_task("chartqa").load(paper_root, "val", None)
    assert [s.id for s in chart] == ["human-0", "augmented-0"]
    ocr = get_task("ocrvqa").load(paper_root, "val", None)
    assert [(s.id, s.answers) for s in ocr] == [("b1-0", ["Jane Doe"]), ("b1-1", ["No"])]
    ref = get_task("refcoco").load(paper_root, "val", None)
    assert ref[0].meta["target_box"] == pytest.approx([0.1, 0.25, 0.3, 0.75])
    assert ref[0].answers == ["<|box_start|>(100,250),(300,750)<|box_end|>"]
    assert ref[1].meta["target_box"] == pytest.approx([0.5, 0.0, 1.0, 1.0])  # size read from the image
    assert "the left dog" in get_task("refcoco").prompt(ref[0])


def test_ocrvqa_core_subset(paper_root: Path) -> None:
    core = paper_root / "ocrvqa" / "testcore_ids.txt"
    core.write_text("b1-1\n")
    try:
        assert [s.id for s in get_task("ocrvqa").load(paper_root, "val", None)] == ["b1-1"]
    finally:
        core.unlink()


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("vizwiz", "vizwiz/Annotations/val.json"),
        ("gqa", "gqa/testdev_balanced_questions.json"),
        ("mathvista_geo", "mathvista/annot_testmini.json"),
        ("mathvision_geo", "mathvision/data/testmini.jsonl"),
        ("chartqa", "chartqa/test/test_human.json"),
        ("textvqa", "textvqa/TextVQA_0.5.1_val.json"),
        ("ocrvqa", "ocrvqa/dataset.json"),
        ("refcoco", "refcoco/refcoco_val.jsonl"),
        ("refcoco_plus", "refcoco/refcoco+_val.jsonl"),
        ("refcocog", "refcoco/refcocog_val.jsonl"),
    ],
)
def test_missing_annotation_file_is_named(tmp_path: Path, name: str, missing: str) -> None:
    with pytest.raises(FileNotFoundError, match=missing.split("/")[-1].replace("+", r"\+")):
        get_task(name).load(tmp_path, "val", None)


def test_missing_image_is_named(tmp_path: Path) -> None:
    root = write_paper_fixture(tmp_path)
    (root / "gqa/images/n2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"n2\.jpg"):
        get_task("gqa").load(root, "val", None)


def _offline_row(i: int, **kw: object) -> dict:
    row = {"id": f"vqa-shifted-val-{i:05d}", "task": "vqa", "variant": "shifted", "split": "val",
           "image": f"images/val/vqa-shifted-val-{i:05d}.png", "question": "what colour is the square?",
           "answer": "teal", "answers": ["teal"], "metric": "exact_match", "meta": {"k": i}}  # fmt: skip
    row.update(kw)
    return row


def test_offline_loader_layout_and_errors(tmp_path: Path) -> None:
    d = tmp_path / "vqa" / "shifted"
    _jsonl(d / "val.jsonl", [_offline_row(i) for i in range(3)])
    for i in range(3):
        _img(d / "images" / "val" / f"vqa-shifted-val-{i:05d}.png")
    samples = get_task("vqa").load(tmp_path, "val", None)
    assert [s.meta["k"] for s in samples] == [0, 1, 2] and samples[0].metric == "exact_match"
    assert samples[0].image == d / "images/val/vqa-shifted-val-00000.png"
    with pytest.raises(FileNotFoundError, match=r"vqa/generic/val\.jsonl"):
        get_task("vqa_generic").load(tmp_path, "val", None)
    _jsonl(d / "test.jsonl", [_offline_row(0, metric="bleu")])
    with pytest.raises(ValueError, match=r"test\.jsonl:1: unknown metric 'bleu'"):
        get_task("vqa").load(tmp_path, "test", None)
    _jsonl(d / "train.jsonl", [_offline_row(0, metric="iou50")])
    with pytest.raises(ValueError, match="does not report"):
        get_task("vqa").load(tmp_path, "train", None)
    bad = _offline_row(0)
    del bad["question"]
    _jsonl(d / "val.jsonl", [bad])
    with pytest.raises(ValueError, match=r"val\.jsonl:1: missing field 'question'"):
        get_task("vqa").load(tmp_path, "val", None)
    (d / "val.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"val\.jsonl:1: invalid JSON"):
        get_task("vqa").load(tmp_path, "val", None)


def test_registry_covers_the_paper_and_offline_tasks() -> None:
    assert {"vqa", "geometry", "chart", "ocr", "grounding"} <= set(TASKS)
    assert {f"{t}_generic" for t in ("vqa", "geometry", "chart", "ocr", "grounding")} <= set(TASKS)
    assert set(EXPECTED_COUNTS) <= set(TASKS)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")
    for t in TASKS.values():
        assert t.primary in t.metric_names
        for m in t.metric_names:
            assert not set(f"{t.name}/{m}") & set(",[]{}()")  # MLflow-safe
    assert L.default_paper_root().name  # a path, no I/O
