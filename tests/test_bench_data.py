"""Tests of the offline benchmark's generators and data files (mergelab.bench.tasks, mergelab.bench.data).

Answers are re-derived here from ``meta`` with code independent of the generators, and the pixels are checked
against ``meta`` (colours at object centres, empty cells blank, ink on strokes, glyphs decoded dot by dot).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
from PIL import Image

from mergelab.bench.data import (
    MANIFEST,
    default_data_root,
    ensure_data,
    read_manifest,
    read_split,
    sha256_file,
    write_split,
)
from mergelab.bench.tasks import DEFAULT_SIZES, TASK_SPECS, TASKS, generate
from mergelab.bench.tasks.common import COLOURS, GENERIC_COLOURS, GLYPHS, METRICS, SHIFTED_COLOURS, Sample

VARIANTS = ("generic", "shifted")
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
N_CHECK = 60


def _png(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _fingerprint(s: Sample) -> str:
    return hashlib.sha256(s.question.encode() + s.image.tobytes()).hexdigest()


# --- registry, determinism, disjointness ---------------------------------------------------------------------


def test_registry_and_metrics() -> None:
    assert TASKS == ("vqa", "geometry", "chart", "ocr", "grounding")
    assert {t: TASK_SPECS[t].metric for t in TASKS} == {
        "vqa": "exact_match", "geometry": "exact_match", "chart": "relaxed_accuracy",
        "ocr": "exact_match", "grounding": "iou50",
    }  # fmt: skip
    with pytest.raises(ValueError, match="'nope'"):
        generate("nope", "generic", "val", n=1)
    with pytest.raises(ValueError, match="'hard'"):
        generate("vqa", "hard", "val", n=1)
    with pytest.raises(ValueError, match="'dev'"):
        generate("vqa", "generic", "dev", n=1)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_and_prefix_stable(task: str) -> None:
    for variant in VARIANTS:
        a = generate(task, variant, "val", n=12, seed=3)
        b = generate(task, variant, "val", n=20, seed=3)[:12]
        assert a == b  # ids, questions, answers, meta (images are excluded from ==)
        assert [_png(s.image) for s in a] == [_png(s.image) for s in b]
        assert all(s.image.mode == "RGB" and s.image.size == (112, 112) for s in a)
        other = generate(task, variant, "val", n=12, seed=4)
        assert [s.meta for s in other] != [s.meta for s in a]
        assert len({s.id for s in b}) == len(b) and a[0].id == f"{task}-{variant}-val-00000"
        json.dumps([s.meta for s in a])  # JSON-safe


@pytest.mark.parametrize("task", TASKS)
def test_splits_disjoint_across_splits_and_seeds(task: str) -> None:
    for variant in VARIANTS:
        train = {_fingerprint(s) for s in generate(task, variant, "train", n=200)}
        train |= {_fingerprint(s) for s in generate(task, variant, "train", n=100, seed=1)}
        val = {_fingerprint(s) for s in generate(task, variant, "val", n=60)}
        test = generate(task, variant, "test", n=120)
        fp_test = {_fingerprint(s) for s in test}
        assert len(fp_test) == len(test)  # no duplicates inside a split
        assert not train & val and not train & fp_test and not val & fp_test


def test_test_split_standard_error_sizing() -> None:
    n = DEFAULT_SIZES["test"]
    assert max(math.sqrt(p * (1 - p) / n) for p in (i / 100 for i in range(101))) <= 0.015
    assert DEFAULT_SIZES["val"] >= 300 and DEFAULT_SIZES["train"] >= 4000
    assert len(generate("chart", "shifted", "test")) == n


# --- answers right by construction ---------------------------------------------------------------------------


def _derive_vqa(s: Sample) -> str:
    objs = s.meta["objects"]
    q = s.question
    if q.startswith("what color is the "):
        shape = q.removeprefix("what color is the ").removesuffix("?")
        (hit,) = [o for o in objs if o["shape"] == shape]
        return hit["colour"]
    if q.startswith("what shape is the "):
        colour = q.removeprefix("what shape is the ").removesuffix(" object?")
        (hit,) = [o for o in objs if o["colour"] == colour]
        return hit["shape"]
    colour, shape = q.removesuffix("?").split()[-2:]
    return "yes" if any(o["colour"] == colour and o["shape"] == shape for o in objs) else "no"


def _check_objects(s: Sample, offset: int = 0) -> None:
    """Each object's colour at its centre, objects inside their cells, every other cell blank."""
    img = s.image
    canvas = Image.new("RGB", img.size, WHITE)
    if s.meta.get("background") == "gradient":  # (255 - 48 x / 111, 255 - 48 y / 111, 255)
        canvas.putdata(
            [(255 - 48 * x // 111, 255 - 48 * y // 111, 255) for y in range(112) for x in range(112)]
        )
    occupied = set()
    for o in s.meta["objects"]:
        x0, y0, x1, y1 = o["box"]
        cx, cy = o["cell"][0] * 28 + offset, o["cell"][1] * 28 + offset
        assert cx + 1 < x0 and x1 < cx + 27 and cy + 1 < y0 and y1 < cy + 27, (s.id, o)
        assert img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2 + 2)) == COLOURS[o["colour"]], (s.id, o)
        ring = [(x, y) for x in range(x0 - 1, x1 + 2) for y in (y0 - 1, y1 + 1)]
        ring += [(x, y) for y in range(y0, y1 + 1) for x in (x0 - 1, x1 + 1)]
        assert all(img.getpixel(p) == canvas.getpixel(p) for p in ring), (s.id, o)  # drawn inside its box
        occupied.add(tuple(o["cell"]))
    side = 4 if offset == 0 else 3
    for c in range(side):
        for r in range(side):
            if (c, r) not in occupied:
                box = (c * 28 + offset, r * 28 + offset, c * 28 + offset + 28, r * 28 + offset + 28)
                assert img.crop(box).tobytes() == canvas.crop(box).tobytes(), (s.id, c, r)


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _parse_box(text: str) -> list[float]:
    assert text.startswith("<|box_start|>(") and text.endswith(")<|box_end|>"), text
    body = text.removeprefix("<|box_start|>(").removesuffix(")<|box_end|>")
    (x1, y1), (x2, y2) = (map(int, p.split(",")) for p in body.split("),("))
    return [x1 / 1000, y1 / 1000, x2 / 1000, y2 / 1000]


@pytest.mark.parametrize("variant", VARIANTS)
def test_vqa_answers_and_pixels(variant: str) -> None:
    samples = generate("vqa", variant, "test", n=N_CHECK)
    palette = GENERIC_COLOURS if variant == "generic" else SHIFTED_COLOURS
    for s in samples:
        assert s.answer == _derive_vqa(s) and s.answers[0] == s.answer, s.id
        assert s.metric == "exact_match"
        named = [w for w in s.question.removesuffix("?").split() if w in COLOURS]
        assert named == [] or named[0] in palette  # the question is about the variant's colours
        if s.answer in COLOURS:
            assert s.answer in palette
        _check_single_object(s)
    assert {s.answer for s in samples} >= ({"yes", "no"} | set(palette))
    sizes = {s.meta["objects"][0]["box"][2] - s.meta["objects"][0]["box"][0] + 1 for s in samples}
    assert len(sizes) > 2 and min(sizes) >= 36  # large objects of several sizes


def _check_single_object(s: Sample) -> None:
    """One object inside its box (its colour at the centre), white everywhere outside the box."""
    ((o),) = s.meta["objects"]
    x0, y0, x1, y1 = o["box"]
    assert 2 <= x0 and x1 <= 109 and 2 <= y0 and y1 <= 109 and x1 - x0 == y1 - y0, (s.id, o)
    assert s.image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2 + 2)) == COLOURS[o["colour"]], (s.id, o)
    outside = s.image.copy()
    outside.paste(WHITE, (x0, y0, x1 + 1, y1 + 1))
    assert outside.getcolors(1) == [(112 * 112, WHITE)], s.id


@pytest.mark.parametrize("variant", VARIANTS)
def test_grounding_answers_and_pixels(variant: str) -> None:
    offset = 0 if variant == "generic" else 14
    coords = {0, 250, 500, 750, 1000} if variant == "generic" else {125, 375, 625, 875}
    for s in generate("grounding", variant, "test", n=N_CHECK):
        objs = s.meta["objects"]
        target = objs[s.meta["target"]]
        assert s.question.endswith(f": the {target['colour']} {target['shape']}")
        assert s.question.startswith("Please provide the bounding box coordinate of the region this sentence")
        assert sum(o["colour"] == target["colour"] and o["shape"] == target["shape"] for o in objs) == 1
        box = _parse_box(s.answer)
        assert {round(v * 1000) for v in box} <= coords, s.answer
        x0, y0, x1, y1 = target["box"]
        exact = [x0 / 112, y0 / 112, (x1 + 1) / 112, (y1 + 1) / 112]
        assert s.meta["target_box"] == pytest.approx(exact)
        assert len(objs) == 1 and _iou(box, exact) > 0.5  # the answer box passes the IoU >= 0.5 metric
        for o in objs:  # and no other object does
            if o is not target:
                ox0, oy0, ox1, oy1 = o["box"]
                assert _iou(box, [ox0 / 112, oy0 / 112, (ox1 + 1) / 112, (oy1 + 1) / 112]) < 0.5
        assert (
            s.metric == "iou50" and s.meta["image_size"] == [112, 112] and s.meta["background"] == "gradient"
        )
        _check_objects(s, offset)


def _ink(img: Image.Image, x: float, y: float) -> bool:
    """Black within one pixel of (x, y)."""
    return any(
        img.getpixel((min(111, max(0, round(x) + dx)), min(111, max(0, round(y) + dy)))) == BLACK
        for dx in (-1, 0, 1)
        for dy in (-1, 0, 1)
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_geometry_answers_and_pixels(variant: str) -> None:
    names = {3: "triangle", 4: "quadrilateral", 5: "pentagon", 6: "hexagon"}
    families = set()
    for s in generate("geometry", variant, "test", n=N_CHECK):
        m, img = s.meta, s.image
        families.add(m["family"])
        assert {c for _, c in img.getcolors(256)} <= {WHITE, BLACK}  # one fixed colour
        if m["family"] == "sides":
            pts = m["points"]
            assert s.answer == (names[len(pts)] if variant == "shifted" else str(len(pts)))
            for (ax, ay), (bx, by) in zip(pts, pts[1:] + pts[:1], strict=True):
                assert _ink(img, ax, ay) and _ink(img, (ax + bx) / 2, (ay + by) / 2), s.id
        elif m["family"] == "lengths":
            (a, b) = [math.dist(seg[:2], seg[2:]) for seg in m["segments"]]
            horizontal = all(seg[1] == seg[3] for seg in m["segments"])
            assert horizontal == (variant == "generic")
            first, second = ("top", "bottom") if horizontal else ("left", "right")
            assert max(a, b) >= 1.3 * min(a, b)
            assert s.answer == (first if a > b else second)
            for seg in m["segments"]:
                assert _ink(img, (seg[0] + seg[2]) / 2, (seg[1] + seg[3]) / 2), s.id
        else:
            vx, vy = m["vertex"]
            (ax, ay), (bx, by) = m["rays"]
            ang = abs(math.degrees(math.atan2(vy - ay, ax - vx) - math.atan2(vy - by, bx - vx))) % 360
            ang = min(ang, 360 - ang)
            assert abs(ang - m["degrees"]) < 3
            want = (
                ("smaller" if ang < 90 else "larger")
                if variant == "shifted"
                else ("acute" if ang < 90 else "obtuse")
            )
            assert s.answer == want, s.id
            for rx, ry in m["rays"]:
                assert _ink(img, (vx + rx) / 2, (vy + ry) / 2), s.id
    assert families == {"sides", "lengths", "angles"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_chart_answers_and_pixels(variant: str) -> None:
    ordinals = ["first", "second", "third", "fourth"]
    scale = 1 if variant == "generic" else 10
    for s in generate("chart", variant, "test", n=N_CHECK):
        m, img = s.meta, s.image
        units = m["units"]
        values = [u * scale for u in units]
        assert m["values"] == values and m["kind"] == ("bar" if variant == "generic" else "line")
        words = s.question.removesuffix("?").split()
        if s.question == "what is the highest value?":
            assert s.answer == str(max(values))
        elif s.question.startswith("what is the value of the"):
            assert s.answer == str(values[ordinals.index(words[-2])])
        else:
            i, j = ordinals.index(words[2]), ordinals.index(words[-2])
            assert s.answer == ("yes" if units[i] > units[j] else "no"), s.id
        for k, u in enumerate(units):  # ink exactly where each value's top is
            x, top = 28 * k + 14, 104 - 10 * u
            assert img.getpixel((x, top + 2)) == BLACK, (s.id, k)
            if m["kind"] == "bar":
                assert img.getpixel((x, top - 2)) != BLACK and img.getpixel((x, 103)) == BLACK
            else:
                assert img.getpixel((x, top - 6)) != BLACK and img.getpixel((x, top + 7)) != BLACK


@pytest.mark.parametrize("variant", VARIANTS)
def test_ocr_answers_and_glyphs(variant: str) -> None:
    decode = {rows: ch for ch, rows in GLYPHS.items()}
    inks = [(0, 0, 0), (40, 40, 40), (20, 20, 70), (70, 20, 20)]
    for s in generate("ocr", variant, "test", n=N_CHECK):
        m, img = s.meta, s.image
        assert s.answer == m["text"] and s.metric == "exact_match" and len(s.answer) == 1
        assert s.answer.isdigit() if variant == "generic" else s.answer.isalpha()
        dot, (jx, jy), ink = m["dot"], m["jitter"], inks[m["ink"]]
        assert dot in (6, 7, 8) and max(abs(jx), abs(jy)) <= 6
        x0, y0 = (112 - 5 * dot) // 2 + jx, (112 - 7 * dot) // 2 + jy
        rows = tuple(
            "".join("#" if img.getpixel((x0 + dot * c + dot // 2, y0 + dot * r + dot // 2)) == ink else "."
                    for c in range(5))
            for r in range(7)
        )
        assert decode.get(rows) == s.answer, s.id
        outside = img.copy()
        outside.paste(WHITE, (x0, y0, x0 + 5 * dot, y0 + 7 * dot))
        assert outside.getcolors(1) == [(112 * 112, WHITE)], s.id  # nothing drawn outside the glyph's box


def test_shifted_variants_use_new_answer_words() -> None:
    for task in ("vqa", "geometry", "chart"):
        gen = {s.answer for s in generate(task, "generic", "train", n=150)} - {"yes", "no"}
        shi = {s.answer for s in generate(task, "shifted", "train", n=150)} - {"yes", "no"}
        new = shi - gen
        assert new and len(new) >= 0.5 * len(shi), (task, shi & gen)
    for task in TASKS:  # no constant answer scores high
        for variant in VARIANTS:
            answers = [s.answer for s in generate(task, variant, "train", n=150)]
            top = max(answers.count(a) for a in set(answers)) / len(answers)
            assert top < (0.2 if task == "grounding" else 0.35), (task, variant, top)


# --- files -------------------------------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    samples = generate("grounding", "shifted", "val", n=15) + []
    path = write_split(samples, tmp_path)
    assert path == tmp_path / "grounding" / "shifted" / "val.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["id"] for x in lines] == [s.id for s in samples]
    assert list(lines[0]) == ["id", "task", "variant", "split", "image", "question", "answer", "answers", "metric",
                              "meta"]  # fmt: skip
    assert (
        lines[0]["image"] == f"images/val/{samples[0].id}.png" and (path.parent / lines[0]["image"]).is_file()
    )
    back = read_split("grounding", "shifted", "val", tmp_path)
    assert back == samples
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(back, samples, strict=True))
    assert len(read_split("grounding", "shifted", "val", tmp_path, limit=4)) == 4
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    # rewriting a smaller split replaces the images directory
    write_split(samples[:5], tmp_path)
    assert len(list((path.parent / "images" / "val").iterdir())) == 5


def test_file_errors_name_the_culprit(tmp_path: Path) -> None:
    a = generate("ocr", "generic", "val", n=2)
    b = generate("ocr", "generic", "test", n=1)
    with pytest.raises(ValueError, match="ocr-generic-test-00000"):
        write_split(a + b, tmp_path)
    with pytest.raises(ValueError, match="duplicate sample id"):
        write_split(a + a, tmp_path)
    with pytest.raises(FileNotFoundError, match="val.jsonl"):
        read_split("ocr", "generic", "val", tmp_path)
    path = write_split(a, tmp_path)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"val\.jsonl:3: invalid JSON"):
        read_split("ocr", "generic", "val", tmp_path)
    path.write_text(json.dumps({"id": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"val\.jsonl:1: missing field"):
        read_split("ocr", "generic", "val", tmp_path)
    write_split(a, tmp_path)
    (path.parent / "images" / "val" / f"{a[1].id}.png").unlink()
    with pytest.raises(FileNotFoundError, match=a[1].id):
        read_split("ocr", "generic", "val", tmp_path)


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MERGELAB_DATA", str(tmp_path / "d"))
    assert default_data_root() == tmp_path / "d"
    monkeypatch.delenv("MERGELAB_DATA")
    assert default_data_root() == Path("~/.cache/mergelab/data").expanduser()


def test_ensure_data_layout_manifest_idempotent(tmp_path: Path) -> None:
    sizes = {"val": 12, "test": 20}
    kw = dict(tasks=("chart", "ocr"), variants=("generic", "shifted"), sizes=sizes)
    root = ensure_data(tmp_path, **kw)
    assert root == tmp_path
    man = read_manifest(root)
    assert man is not None and man["seed"] == 0 and man["generator_version"] and man["image_size"] == 112
    assert set(man["splits"]) == {
        f"{t}/{v}/{s}.jsonl" for t in ("chart", "ocr") for v in VARIANTS for s in sizes
    }
    for rel, entry in man["splits"].items():
        assert entry["count"] == sizes[entry["split"]] and entry["sha256"] == sha256_file(root / rel)
        assert (
            len(list((root / rel).parent.joinpath("images", entry["split"]).glob("*.png"))) == entry["count"]
        )
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    ensure_data(tmp_path, **kw)  # nothing to do: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamp
    # a missing image or a tampered JSONL gets that split (only) rewritten
    victim = root / "ocr" / "shifted" / "test.jsonl"
    next((victim.parent / "images" / "test").iterdir()).unlink()
    (root / "chart" / "generic" / "val.jsonl").write_text("")
    ensure_data(tmp_path, **kw)
    assert read_split("ocr", "shifted", "test", root) == generate("ocr", "shifted", "test", n=20)
    assert len(read_split("chart", "generic", "val", root)) == 12
    assert (root / "ocr" / "generic" / "val.jsonl").stat().st_mtime_ns == stamp[
        root / "ocr" / "generic" / "val.jsonl"
    ]
    assert read_manifest(root)["splits"]["chart/generic/val.jsonl"]["sha256"] == sha256_file(
        root / "chart" / "generic" / "val.jsonl"
    )
    with pytest.raises(ValueError, match=MANIFEST):
        ensure_data(tmp_path, seed=1, **kw)
    # data of another generator version is rebuilt
    man = read_manifest(root)
    (root / MANIFEST).write_text(json.dumps({**man, "generator_version": "0"}))
    before = victim.stat().st_mtime_ns
    ensure_data(tmp_path, **kw)
    assert (
        victim.stat().st_mtime_ns != before
        and read_manifest(root)["generator_version"] == man["generator_version"]
    )
    with pytest.raises(ValueError, match="'nope'"):
        ensure_data(tmp_path, tasks=("nope",))
    assert not [p for p in root.rglob(".tmp-*")] and not [p for p in root.rglob(".old-*")]
    assert os.path.isfile(root / MANIFEST)


# --- one task list: each task defined once, in its module --------------------------------------------------------


def test_every_task_is_one_module_and_everything_derives_from_the_registry() -> None:
    from mergelab.bench import tasks as bench_tasks
    from mergelab.evaluators import lmeval, suites
    from mergelab.evaluators import tasks as ev
    from mergelab.evaluators.loaders import Sample as EvalSample

    here = Path(bench_tasks.__file__).parent
    assert {p.stem for p in here.glob("*.py")} - {"__init__", "common"} == set(TASKS)
    for name, spec in TASK_SPECS.items():
        module = __import__(f"mergelab.bench.tasks.{name}", fromlist=["SPEC"])
        assert module.SPEC is spec and spec.name == name and spec.variants == VARIANTS
        for suffix in ev.OFFLINE_VARIANTS.values():
            task = ev.get_task(name + suffix)
            assert task.max_new_tokens == spec.max_new_tokens
            assert task.metric_names == ev.REPORTED_METRICS[spec.metric] and task.primary == task.metric_names[0]
    assert set(ev.REPORTED_METRICS) == set(METRICS)
    assert ev.OFFLINE_TASKS == TASKS == tuple(lmeval.OFFLINE_LMEVAL_TASKS)
    assert suites.SUITES["offline"].tasks == TASKS
    assert EvalSample is Sample  # one sample type for the benchmark and every evaluator loader


@pytest.mark.parametrize("task", TASKS)
def test_vocabulary_holds_every_answer(task: str) -> None:
    spec = TASK_SPECS[task]
    for variant in VARIANTS:
        vocab = spec.vocabulary[variant]
        assert list(vocab) == sorted(set(vocab))
        seen = {s.answer for split in ("train", "test") for s in generate(task, variant, split, n=150)}
        assert seen <= set(vocab), sorted(seen - set(vocab))
        assert len(seen) >= len(vocab) // 2  # the vocabulary is what the generator gives, not a loose superset


def test_a_new_task_is_one_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task defined only by its TaskSpec (what its module holds) is generated, written, read back and evaluated."""
    import random
    from types import MappingProxyType

    from mergelab.bench import tasks as bench_tasks
    from mergelab.bench.tasks.common import Draft, TaskSpec, blank
    from mergelab.evaluators import tasks as ev

    def draft(rng: random.Random, variant: str) -> Draft:
        n = rng.randint(1, 4) * (1 if variant == "generic" else 2)
        return Draft(question="how many dots?", answer=str(n), answers=(str(n),), meta={"n": n, "r": rng.random()})

    spec = TaskSpec(name="dots", metric="exact_match", draft=draft, render=lambda meta: blank()[0],
                    vocabulary={"generic": ("1", "2", "3", "4"), "shifted": ("2", "4", "6", "8")})  # fmt: skip
    monkeypatch.setattr(bench_tasks, "TASK_SPECS", MappingProxyType({**TASK_SPECS, "dots": spec}))
    samples = generate("dots", "shifted", "val", n=5)
    assert {s.answer for s in samples} <= set(spec.vocabulary["shifted"]) and samples[0].metric == "exact_match"
    write_split(samples, tmp_path)
    task = ev._offline_task(spec, "shifted")
    loaded = task.load(tmp_path, "val", None)
    assert [s.id for s in loaded] == [s.id for s in samples] and isinstance(loaded[0].image, Path)
    assert task.score(loaded[0].answer, loaded[0]) == {"accuracy": 1.0}
    with pytest.raises(ValueError, match="vocabulary"):
        TaskSpec(name="x", metric="exact_match", draft=draft, render=lambda m: blank()[0], vocabulary={})
    with pytest.raises(ValueError, match="unknown metric"):
        TaskSpec(name="x", metric="bleu", draft=draft, render=lambda m: blank()[0], vocabulary=spec.vocabulary)


def test_read_split_keeps_paths_or_loads_pixels(tmp_path: Path) -> None:
    samples = generate("vqa", "generic", "val", n=3)
    path = write_split(samples, tmp_path)
    lazy = read_split("vqa", "generic", "val", tmp_path, load_images=False)
    assert lazy == samples and lazy[0].image == path.parent / "images" / "val" / f"{samples[0].id}.png"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[0]["image"] = None  # a text-only item
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_split("vqa", "generic", "val", tmp_path)[0].image is None
    rows[1]["metric"] = "bleu"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"val\.jsonl:2: unknown metric 'bleu'"):
        read_split("vqa", "generic", "val", tmp_path)
