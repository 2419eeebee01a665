"""Loaders of the paper's ten evaluation columns (its Tables 2 and 3), reading the public releases from disk.

Nothing is downloaded: point ``data_root`` (default ``$MERGELAB_PAPER_DATA`` or ``~/.cache/mergelab/paper``) at a
directory holding the releases, each in its own sub-directory with the release's own file names. Every loader
documents its layout; a missing file raises ``FileNotFoundError`` naming the path. ``limit`` keeps the first items
in file order (after the subset filter of the geometry columns).

Summary (details in each function and in ``docs/evaluators.md``)::

    vizwiz/Annotations/val.json           vizwiz/val/VizWiz_val_*.jpg
    gqa/testdev_balanced_questions.json   gqa/images/<imageId>.jpg
    mathvista/annot_testmini.json         mathvista/images/<pid>.jpg
    mathvision/data/testmini.jsonl        mathvision/images/<id>.jpg
    chartqa/test/test_human.json, test_augmented.json   chartqa/test/png/<imgname>
    textvqa/TextVQA_0.5.1_val.json        textvqa/train_images/<image_id>.jpg
    ocrvqa/dataset.json                   ocrvqa/images/<book id>.jpg   [ocrvqa/testcore_ids.txt]
    refcoco/{refcoco,refcoco+,refcocog}_val.jsonl       coco/train2014/COCO_train2014_*.jpg
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mergelab.evaluators.loaders.common import (
    Sample,
    env_path,
    field_of,
    image_path,
    iter_jsonl,
    read_json,
    require_file,
)
from mergelab.evaluators.metrics import MATHVISION_GEOMETRY_ROWS, MATHVISTA_GEOMETRY_ROWS


def default_paper_root() -> Path:
    """``$MERGELAB_PAPER_DATA`` or ``~/.cache/mergelab/paper``."""
    return env_path("MERGELAB_PAPER_DATA", "~/.cache/mergelab/paper")


def _take(items: Iterable[Sample], limit: int | None) -> list[Sample]:
    out: list[Sample] = []
    for s in items:
        if limit is not None and len(out) >= limit:
            break
        out.append(s)
    return out


def load_vizwiz(data_root: Path, *, limit: int | None = None) -> list[Sample]:
    """VizWiz-VQA val (VLMEvalKit ``VizWiz``): VQA soft accuracy over 10 answers.

    Layout (the official release, vizwiz.org)::

        vizwiz/Annotations/val.json   # [{"image": "VizWiz_val_00000000.jpg", "question": ..., "answers":
                                      #   [{"answer": ..., "answer_confidence": ...} x10], "answer_type": ...}]
        vizwiz/val/VizWiz_val_00000000.jpg ...
    """
    base = Path(data_root) / "vizwiz"
    ann = base / "Annotations" / "val.json"
    data = read_json(ann, "VizWiz annotations (Annotations/val.json of the VizWiz-VQA release)")

    def gen() -> Iterable[Sample]:
        for i, rec in enumerate(data):
            where = f"{ann}[{i}]"
            img = str(field_of(rec, "image", where))
            answers = [
                a["answer"] if isinstance(a, dict) else str(a) for a in field_of(rec, "answers", where)
            ]
            yield Sample(
                id=Path(img).stem,
                question=str(field_of(rec, "question", where)),
                answers=answers,
                image=image_path(base / "val", img, where),
                meta={"answer_type": rec.get("answer_type")},
            )

    return _take(gen(), limit)


def load_gqa(data_root: Path, *, limit: int | None = None) -> list[Sample]:
    """GQA test-dev balanced (VLMEvalKit ``GQA_TestDev_Balanced``): exact match, modified normaliser.

    Layout (the official GQA release, cs.stanford.edu/people/dorarad/gqa)::

        gqa/testdev_balanced_questions.json   # {question_id: {"imageId": ..., "question": ..., "answer": ...}}
        gqa/images/<imageId>.jpg
    """
    base = Path(data_root) / "gqa"
    qfile = base / "testdev_balanced_questions.json"
    data = read_json(qfile, "GQA questions (testdev_balanced_questions.json of the GQA release)")

    def gen() -> Iterable[Sample]:
        for qid, rec in data.items():
            where = f"{qfile}[{qid}]"
            yield Sample(
                id=str(qid),
                question=str(field_of(rec, "question", where)),
                answers=[str(field_of(rec, "answer", where))],
                image=image_path(base / "images", f"{field_of(rec, 'imageId', where)}.jpg", where),
                meta={"types": rec.get("types")},
            )

    return _take(gen(), limit)


def load_mathvista_geo(data_root: Path, *, limit: int | None = None) -> list[Sample]:
    """MathVista testmini, geometry subset (the paper's MathVista column): items whose skills or task is a geometry row.

    Layout (the release on the Hugging Face hub, AI4Math/MathVista; ``testmini.json`` of the GitHub release is
    accepted too)::

        mathvista/annot_testmini.json   # {pid: {"question", "image": "images/<pid>.jpg", "choices", "unit",
                                        #        "precision", "answer", "question_type", "answer_type",
                                        #        "metadata": {"task", "skills", ...}, "query"}}
        mathvista/images/<pid>.jpg

    The prompt is the release's ``query`` (hint + question + choices). Rows: ``MATHVISTA_GEOMETRY_ROWS``.
    """
    base = Path(data_root) / "mathvista"
    ann = base / "annot_testmini.json"
    if not ann.is_file() and (base / "testmini.json").is_file():
        ann = base / "testmini.json"
    data = read_json(ann, "MathVista testmini annotations (annot_testmini.json of AI4Math/MathVista)")
    items = (
        data.items() if isinstance(data, dict) else ((str(r.get("pid", i)), r) for i, r in enumerate(data))
    )

    def gen() -> Iterable[Sample]:
        for pid, rec in items:
            where = f"{ann}[{pid}]"
            md = rec.get("metadata") or {}
            cats = [str(c).lower() for c in (md.get("skills") or [])] + [str(md.get("task", "")).lower()]
            if not set(cats) & set(MATHVISTA_GEOMETRY_ROWS):
                continue
            yield Sample(
                id=str(pid),
                question=str(rec.get("query") or field_of(rec, "question", where)),
                answers=[str(field_of(rec, "answer", where))],
                image=image_path(base, str(field_of(rec, "image", where)), where),
                meta={
                    "categories": cats,
                    "question_type": rec.get("question_type", "free_form"),
                    "answer_type": rec.get("answer_type", "text"),
                    "choices": list(rec.get("choices") or []),
                    "precision": rec.get("precision"),
                },
            )

    return _take(gen(), limit)


def load_mathvision_geo(data_root: Path, *, limit: int | None = None) -> list[Sample]:
    """MATH-Vision testmini, geometry subset (the paper's MATH-V column): the four geometry subjects, 19 items each.

    Layout (the GitHub release, mathllm/MATH-V)::

        mathvision/data/testmini.jsonl   # {"id", "question", "options": [...], "image": "images/<id>.jpg",
                                         #  "answer", "solution", "level", "subject"}
        mathvision/images/<id>.jpg
    """
    base = Path(data_root) / "mathvision"
    path = base / "data" / "testmini.jsonl"

    def gen() -> Iterable[Sample]:
        for n, rec in iter_jsonl(path, "MATH-Vision testmini (data/testmini.jsonl of mathllm/MATH-V)"):
            where = f"{path}:{n}"
            subject = str(field_of(rec, "subject", where)).lower()
            if subject not in MATHVISION_GEOMETRY_ROWS:
                continue
            options = [str(o) for o in (rec.get("options") or [])]
            question = str(field_of(rec, "question", where)).replace("<image1>", "").strip()
            yield Sample(
                id=str(field_of(rec, "id", where)),
                question=question,
                answers=[str(field_of(rec, "answer", where))],
                image=image_path(base, str(field_of(rec, "image", where)), where),
                meta={"categories": [subject], "options": options, "level": rec.get("level")},
            )

    return _take(gen(), limit)


def load_chartqa(data_root: Path, *, limit: int | None = None) -> list[Sample]:
    """ChartQA test (VLMEvalKit ``ChartQA_TEST``): human then augmented questions, relaxed accuracy.

    Layout (the official release, vis-nlp/ChartQA, folder ``ChartQA Dataset``)::

        chartqa/test/test_human.json       # [{"imgname": "41699051005347.png", "query": ..., "label": ...}]
        chartqa/test/test_augmented.json
        chartqa/test/png/<imgname>
    """
    base = Path(data_root) / "chartqa" / "test"
    files = [base / "test_human.json", base / "test_augmented.json"]
    for f in files:
        require_file(f, "ChartQA test questions (test/test_human.json and test/test_augmented.json)")

    def gen() -> Iterable[Sample]:
        for f in files:
            part = f.stem.removeprefix("test_")
            for i, rec in enumerate(read_json(f, "ChartQA test questions")):
                where = f"{f}[{i}]"
                yield Sample(
                    id=f"{part}-{i}",
                    question=str(field_of(rec, "query", where)),
                    answers=[str(field_of(rec, "label", where))],
                    image=image_path(base / "png", str(field_of(rec, "imgname", where)), where),
                    meta={"part": part},
                )

    return _take(gen(), limit)


def load_textvqa(data_root: Path, *, limit: int | None = None) -> list[Sample]:
    """TextVQA val (VLMEvalKit ``TextVQA_VAL``): VQA soft accuracy over 10 answers.

    Layout (the official release, textvqa.org; the val images ship in ``train_images``)::

        textvqa/TextVQA_0.5.1_val.json   # {"data": [{"question_id", "question", "image_id", "answers": [x10]}]}
        textvqa/train_images/<image_id>.jpg
    """
    base = Path(data_root) / "textvqa"
    ann = base / "TextVQA_0.5.1_val.json"
    data = read_json(ann, "TextVQA annotations (TextVQA_0.5.1_val.json of the TextVQA 0.5.1 release)")
    rows = data["data"] if isinstance(data, dict) and "data" in data else data

    def gen() -> Iterable[Sample]:
        for i, rec in enumerate(rows):
            where = f"{ann}[data][{i}]"
            yield Sample(
                id=str(rec.get("question_id", i)),
                question=str(field_of(rec, "question", where)),
                answers=[str(a) for a in field_of(rec, "answers", where)],
                image=image_path(base / "train_images", f"{field_of(rec, 'image_id', where)}.jpg", where),
            )

    return _take(gen(), limit)


def load_ocrvqa(data_root: Path, *, limit: int | None = None) -> list[Sample]:
    """OCR-VQA test (VLMEvalKit ``OCRVQA_TESTCORE``): exact match with the modified normaliser.

    Layout (the official release, ocr-vqa.github.io; images fetched by its ``downloadImages.py``)::

        ocrvqa/dataset.json        # {book_id: {"imageURL", "questions": [...], "answers": [...], "split": 1|2|3}}
        ocrvqa/images/<book_id>.jpg   (any extension of the image URL is accepted)
        ocrvqa/testcore_ids.txt    # optional: one sample id ("<book_id>-<k>") per line, e.g. VLMEvalKit's core
                                   # subset; without it the whole test split (split == 3) is used

    One sample per question; its id is ``<book_id>-<k>``.
    """
    base = Path(data_root) / "ocrvqa"
    ann = base / "dataset.json"
    data = read_json(ann, "OCR-VQA annotations (dataset.json of the OCR-VQA release)")
    core_file = base / "testcore_ids.txt"
    core = (
        {ln.strip() for ln in core_file.read_text().splitlines() if ln.strip()}
        if core_file.is_file()
        else None
    )

    def gen() -> Iterable[Sample]:
        for book, rec in data.items():
            if int(rec.get("split", 0)) != 3:
                continue
            where = f"{ann}[{book}]"
            ext = Path(str(rec.get("imageURL", ".jpg"))).suffix or ".jpg"
            img = None
            qs, ans = field_of(rec, "questions", where), field_of(rec, "answers", where)
            if len(qs) != len(ans):
                raise ValueError(f"{where}: {len(qs)} questions but {len(ans)} answers")
            for k, (q, a) in enumerate(zip(qs, ans, strict=True)):
                sid = f"{book}-{k}"
                if core is not None and sid not in core:
                    continue
                img = img or image_path(base / "images", f"{book}{ext}", where)
                yield Sample(
                    id=sid, question=str(q), answers=[str(a)], image=img, meta={"genre": rec.get("genre")}
                )

    return _take(gen(), limit)


_REFCOCO_FILES = {
    "refcoco": "refcoco_val.jsonl",
    "refcoco_plus": "refcoco+_val.jsonl",
    "refcocog": "refcocog_val.jsonl",
}
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {expr}"


def load_refcoco(data_root: Path, *, which: str, limit: int | None = None) -> list[Sample]:
    """RefCOCO / RefCOCO+ / RefCOCOg val: accuracy at IoU >= 0.5 (lmms-eval ``*_bbox_rec_val``; InternVL P@1).

    Layout (the Qwen-VL evaluation files, as InternVL's ``eval/refcoco`` uses them; images from COCO 2014)::

        refcoco/refcoco_val.jsonl     # {"image": "train2014/COCO_train2014_....jpg", "sent": "...",
        refcoco/refcoco+_val.jsonl    #  "bbox": [x1, y1, x2, y2] (pixels), "height": h, "width": w}
        refcoco/refcocog_val.jsonl
        coco/train2014/COCO_train2014_*.jpg   (``image`` is resolved under ``coco/``, then under ``data_root``)

    The reference box is stored normalised to [0, 1] in ``meta["target_box"]``; its 0-1000 grid form is the
    reference string.

    Args:
        data_root: The paper data root.
        which: ``"refcoco"``, ``"refcoco_plus"`` or ``"refcocog"``.
        limit: Keep the first ``limit`` items.
    """
    if which not in _REFCOCO_FILES:
        raise ValueError(f"unknown RefCOCO variant {which!r}; expected one of {sorted(_REFCOCO_FILES)}")
    root = Path(data_root)
    path = root / "refcoco" / _REFCOCO_FILES[which]

    def gen() -> Iterable[Sample]:
        for n, rec in iter_jsonl(
            path, f"{which} val expressions ({_REFCOCO_FILES[which]} of the Qwen-VL eval files)"
        ):
            where = f"{path}:{n}"
            rel = str(field_of(rec, "image", where))
            img = root / "coco" / rel
            if not img.is_file():
                img = image_path(root, rel, where)
            x1, y1, x2, y2 = (float(v) for v in field_of(rec, "bbox", where))
            w, h = rec.get("width"), rec.get("height")
            if not w or not h:
                from PIL import Image

                with Image.open(img) as im:
                    w, h = im.size
            box = [x1 / w, y1 / h, x2 / w, y2 / h]
            grid = [round(v * 1000) for v in box]
            expr = str(field_of(rec, "sent", where))
            yield Sample(
                id=f"{which}-{n}",
                question=expr,
                answers=[f"<|box_start|>({grid[0]},{grid[1]}),({grid[2]},{grid[3]})<|box_end|>"],
                image=img,
                meta={"target_box": box, "expression": expr},
            )

    return _take(gen(), limit)
