"""The generation runner on a tiny real Qwen2-VL (mergelab.bench.modeling) and a tiny Llama, on local fixtures."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mergelab.evaluators import evaluate, evaluate_path, generate, paper_table_row
from mergelab.evaluators.runner import build_prompt

torch.set_num_threads(1)

OFFLINE = {"vqa": "exact_match", "geometry": "exact_match", "chart": "relaxed_accuracy", "ocr": "exact_match",
           "grounding": "iou50"}  # fmt: skip
QUESTIONS = {"vqa": "what colour is the square?", "geometry": "which line is longer?", "chart": "value of bar 2?",
             "ocr": "what letter is shown?", "grounding": "where is the red circle?"}  # fmt: skip


def tiny_vlm(seed: int = 0) -> tuple[Any, Any]:
    """A random tiny Qwen2-VL with Qwen2-VL-Instruct's chat template (the offline benchmark's builder)."""
    from mergelab.bench import modeling as bm

    lines = [*QUESTIONS.values(), "red", "blue", "left", "right", "42", "a", "(100,200),(300,400)"]
    tok = bm.build_tokenizer(lines, vocab_size=400)
    return bm.build_model(tok, bm.TinyQwen2VLConfig.tiny(), seed=seed), bm.build_processor(tok)


def write_offline(root: Path, n: int = 4, answer: Callable[[str, int], str] | None = None,
                  split: str = "val", variant: str = "shifted", with_images: bool = True) -> Path:  # fmt: skip
    """``n`` items per offline task in the benchmark's layout; ``answer(task, i)`` picks the reference."""
    for task, metric in OFFLINE.items():
        d = root / task / variant
        (d / "images" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            sid = f"{task}-{variant}-{split}-{i:05d}"
            ans = answer(task, i) if answer else ("<|box_start|>(100,200),(300,400)<|box_end|>" if metric == "iou50"
                                                  else "red")  # fmt: skip
            row = {"id": sid, "task": task, "variant": variant, "split": split, "question": QUESTIONS[task],
                   "answer": ans, "answers": [ans], "metric": metric, "meta": {"i": i}}  # fmt: skip
            if with_images:
                Image.new("RGB", (112, 112), ((37 * i) % 256, (91 * i) % 256, 60)).save(
                    d / "images" / split / f"{sid}.png"
                )
                row["image"] = f"images/{split}/{sid}.png"
            rows.append(row)
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def vlm() -> tuple[Any, Any]:
    return tiny_vlm()


@pytest.fixture(scope="module")
def offline_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_offline(tmp_path_factory.mktemp("offline"))


def test_prompt_is_the_chat_template(vlm: tuple[Any, Any]) -> None:
    _, proc = vlm
    p = build_prompt(proc, "what is it?", with_image=True, model_type="qwen2_vl")
    assert p == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|>what is it?<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip

    class NoTemplate:  # a processor without a chat template falls back to the family's format
        chat_template = None
        tokenizer = None

    assert build_prompt(NoTemplate(), "q", with_image=True, model_type="qwen2_vl") == p.replace(
        "what is it?", "q"
    )
    assert (
        build_prompt(NoTemplate(), "q", with_image=True, model_type="llava") == "USER: <image>\nq ASSISTANT:"
    )


def test_evaluate_offline_end_to_end(vlm: tuple[Any, Any], offline_root: Path) -> None:
    model, proc = vlm
    res = evaluate(model, proc, tasks=["vqa", "geometry", "chart", "ocr", "grounding"], split="val",
                   data_root=offline_root, batch_size=3)  # fmt: skip
    assert list(res.scores) == ["vqa", "geometry", "chart", "ocr", "grounding"]
    assert set(res.metrics) == {"vqa/accuracy", "geometry/accuracy", "chart/accuracy", "ocr/accuracy",
                                "grounding/acc_iou50", "grounding/mean_iou", "avg/score"}  # fmt: skip
    assert all(0.0 <= v <= 100.0 for v in res.scores.values())
    assert res.average == pytest.approx(sum(res.scores.values()) / 5) == res.metrics["avg/score"]
    assert len(res.records) == 20
    r = res.records[0]
    assert {"task", "id", "prompt", "prediction", "references", "score"} <= set(r)
    assert r["id"] == "vqa-shifted-val-00000" and r["references"] == ["red"]
    assert "<|image_pad|>" in r["prompt"]
    saved = json.loads(res.save(offline_root.parent / "out" / "eval.json").read_text())
    assert saved["scores"] == res.scores and len(saved["records"]) == 20
    assert not [p for p in (offline_root.parent / "out").iterdir() if p.name != "eval.json"]  # no temp left
    assert res.config["num_samples"]["vqa"] == 4
    assert "vqa" in res.summary()


def test_prediction_equals_manual_greedy_generation(vlm: tuple[Any, Any], offline_root: Path) -> None:
    model, proc = vlm
    res = evaluate(model, proc, tasks=["vqa"], data_root=offline_root, limit=1, max_new_tokens=6)
    img = Image.open(offline_root / "vqa/shifted/images/val/vqa-shifted-val-00000.png").convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS["vqa"]}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], images=[img], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    ids = out[0, enc["input_ids"].shape[1] :].tolist()
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = ids[: ids.index(eos)] if eos in ids else ids
    assert res.records[0]["prediction"] == proc.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert len(proc.tokenizer(res.records[0]["raw"])["input_ids"]) <= 8  # budget respected (re-tokenised)


def test_batch_size_and_repeat_invariance(vlm: tuple[Any, Any], offline_root: Path) -> None:
    model, proc = vlm
    runs = [evaluate(model, proc, tasks=["vqa", "ocr"], data_root=offline_root, batch_size=b, max_new_tokens=5)
            for b in (1, 4, 4)]  # fmt: skip
    preds = [[r["prediction"] for r in res.records] for res in runs]
    assert preds[0] == preds[1] == preds[2]
    assert len({p for p in preds[0]}) > 1  # the images do change the outputs: the comparison is not vacuous


def test_oracle_references_give_exact_scores(
    vlm: tuple[Any, Any], tmp_path: Path, offline_root: Path
) -> None:
    """References equal to the model's own outputs on even items: the accuracy must be exactly 50 %."""
    model, proc = vlm
    first = evaluate(model, proc, tasks=["vqa", "chart"], data_root=offline_root, max_new_tokens=5)
    preds = {(r["task"], int(r["id"][-5:])): r["prediction"] for r in first.records}
    root = write_offline(
        tmp_path, answer=lambda t, i: preds.get((t, i), "x") if i % 2 == 0 else "no-such-answer"
    )
    again = evaluate(model, proc, tasks=["vqa", "chart"], data_root=root, max_new_tokens=5)
    assert again.scores == {"vqa": 50.0, "chart": 50.0}
    assert [r["score"] for r in again.records[:4]] == [1.0, 0.0, 1.0, 0.0]


def _load_test_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_paper_suite_end_to_end(vlm: tuple[Any, Any], tmp_path: Path) -> None:
    from mergelab.evaluators import get_suite

    model, proc = vlm
    root = _load_test_module("test_evaluators_loaders").write_paper_fixture(tmp_path)
    suite = get_suite("paper")
    res = evaluate(model, proc, tasks=suite.tasks, data_root=root, max_new_tokens=4, batch_size=4)
    assert list(res.scores) == list(suite.tasks)
    by_name = evaluate(model, proc, tasks="paper", data_root=root, max_new_tokens=4, batch_size=4)
    assert by_name.scores == res.scores  # a suite name expands to its tasks; same outputs again
    assert "mathvista_geo/geometry_reasoning" in res.metrics and "refcocog/mean_iou" in res.metrics
    assert "mathvision_geo/solid_geometry" in res.metrics and "chartqa/relaxed_accuracy" in res.metrics
    row = paper_table_row(res.scores)
    assert list(row) == ["VizWiz", "GQA", "MathVista", "MATH-V", "ChartQA", "TextVQA", "OCRVQA", "RefCOCO",
                         "RefCOCO+", "RefCOCOg", "Avg"]  # fmt: skip
    assert row["Avg"] == pytest.approx(round(res.average, 2), abs=0.01)


def test_paper_table_row_averages_available_columns() -> None:
    row = paper_table_row({"vizwiz": 30.0, "gqa": 60.0, "refcoco": math.nan})
    assert row["Avg"] == 45.0 and math.isnan(row["RefCOCO"]) and math.isnan(row["ChartQA"])


def test_text_lm_on_text_only_items(tmp_path: Path) -> None:
    import transformers

    from mergelab.bench import modeling as bm

    tok = bm.build_tokenizer(list(QUESTIONS.values()), vocab_size=320)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    root = write_offline(tmp_path, n=3, with_images=False)
    res = evaluate(model, tok, tasks=["vqa", "chart"], data_root=root, max_new_tokens=4, batch_size=2)
    assert set(res.scores) == {"vqa", "chart"} and len(res.records) == 6
    assert res.records[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert generate(model, tok, ["hello"], max_new_tokens=3) == generate(
        model, tok, ["hello"], max_new_tokens=3
    )
    vlm_root = write_offline(tmp_path / "img", n=1)
    with pytest.raises(ValueError, match="has no image processor"):
        evaluate(model, tok, tasks=["vqa"], data_root=vlm_root)


def test_evaluate_path_matches_in_memory(vlm: tuple[Any, Any], offline_root: Path, tmp_path: Path) -> None:
    from mergelab.hf import save_model

    model, proc = vlm
    save_model(model, proc, tmp_path / "ckpt")
    a = evaluate(model, proc, tasks=["ocr"], data_root=offline_root, max_new_tokens=5)
    b = evaluate_path(
        tmp_path / "ckpt", tasks=["ocr"], data_root=offline_root, max_new_tokens=5, device="cpu"
    )
    assert [r["prediction"] for r in a.records] == [r["prediction"] for r in b.records]
    assert b.config["model_dir"] == str(tmp_path / "ckpt")


def test_bad_arguments_are_named(vlm: tuple[Any, Any], offline_root: Path, tmp_path: Path) -> None:
    model, proc = vlm
    with pytest.raises(KeyError, match="unknown task 'vqa2'"):
        evaluate(model, proc, tasks=["vqa2"], data_root=offline_root)
    with pytest.raises(FileNotFoundError, match=r"vqa/shifted/test\.jsonl"):
        evaluate(model, proc, tasks=["vqa"], split="test", data_root=offline_root)
    (tmp_path / "vqa/shifted").mkdir(parents=True)
    (tmp_path / "vqa/shifted/val.jsonl").write_text("")
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, proc, tasks=["vqa"], data_root=tmp_path)


def test_evaluators_never_import_mlflow_optuna_and_keep_lm_eval_lazy() -> None:
    pkg = Path(__file__).resolve().parents[1] / "mergelab" / "evaluators"
    for f in pkg.rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("mlflow", "optuna"), f"{f} imports {n}"
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in top:
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(m.split(".")[0] == "lm_eval" for m in mods), f"{f} imports lm_eval at module level"
