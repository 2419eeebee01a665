"""The lm-eval adapter: the offline benchmark as lm-eval tasks must agree with the native runner within 1 point."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergelab.evaluators import evaluate, get_task
from mergelab.evaluators.lmeval import lmeval_task_name, sanitize_metric, write_lmeval_tasks


def _runner_helpers() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_evrunner", Path(__file__).with_name("test_evaluators_runner.py")
    )
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_names_and_yaml_budgets_match_the_registry(tmp_path: Path) -> None:
    assert sanitize_metric("acc,none") == "acc"
    assert sanitize_metric("exact_match,strict-match") == "exact_match_strict-match"
    assert sanitize_metric("acc_stderr,none") == "acc_stderr"
    assert (
        lmeval_task_name("vqa") == "mergelab_vqa"
        and lmeval_task_name("ocr_generic") == "mergelab_ocr_generic"
    )
    with pytest.raises(KeyError):
        lmeval_task_name("gqa")
    written = write_lmeval_tasks(tmp_path / "tasks")  # the YAML files are derived from the task table
    assert {p.stem for p in written.glob("*.yaml")} == {
        *(lmeval_task_name(t + s) for t in ("vqa", "geometry", "chart", "ocr", "grounding") for s in ("", "_generic")),
        "mergelab_offline", "mergelab_offline_generic",
    }  # fmt: skip
    group = yaml.safe_load((written / "mergelab_offline_generic.yaml").read_text())
    assert group["task"][0] == "mergelab_vqa_generic" and len(group["task"]) == 5
    for native in ("vqa", "geometry", "chart", "ocr", "grounding"):
        for name in (native, f"{native}_generic"):
            text = (written / f"{lmeval_task_name(name)}.yaml").read_text()
            cfg = yaml.safe_load(text)
            task = get_task(name)
            assert cfg["generation_kwargs"]["max_gen_toks"] == task.max_new_tokens
            assert [m["metric"] for m in cfg["metric_list"]] == list(task.metric_names)
            assert cfg["dataset_kwargs"]["variant"] == ("generic" if name.endswith("_generic") else "shifted")


def test_native_and_lmeval_agree_within_one_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    h = _runner_helpers()
    model, proc = h.tiny_vlm(seed=1)
    base = h.write_offline(tmp_path / "probe", n=6)
    tasks = ["vqa", "geometry", "chart", "ocr", "grounding"]
    probe = evaluate(model, proc, tasks=tasks, data_root=base, batch_size=4)
    preds = {(r["task"], int(r["id"][-5:])): r["prediction"] for r in probe.records}

    def answer(task: str, i: int) -> str:  # the model's own output on even items: a non-trivial 50 %
        if task == "grounding":
            return "<|box_start|>(100,200),(300,400)<|box_end|>"
        return preds[(task, i)] if i % 2 == 0 else "no-such-answer"

    root = h.write_offline(tmp_path / "oracle", n=6, answer=answer)
    native = evaluate(model, proc, tasks=tasks, data_root=root, batch_size=4)
    assert native.scores["vqa"] == 50.0 and native.scores["ocr"] == 50.0

    from mergelab.evaluators.lmeval import run_lmeval

    out = run_lmeval(
        model, proc, ["mergelab_offline"], data_root=root, split="val", batch_size=4, log_samples=True
    )
    m = out["metrics"]
    for t in tasks:
        primary = get_task(t).primary
        lm = 100.0 * m[f"mergelab_{t}/{primary}"]
        assert abs(lm - native.scores[t]) <= 1.0, (t, lm, native.scores[t])
    assert abs(100.0 * m["mergelab_grounding/mean_iou"] - native.metrics["grounding/mean_iou"]) <= 1.0
    # same generations, item by item
    lm_preds = {s["doc"]["id"]: s["filtered_resps"][0].strip() for s in out["samples"]["mergelab_vqa"]}
    assert lm_preds == {r["id"]: r["prediction"] for r in native.records if r["task"] == "vqa"}
    assert model.generation_config.eos_token_id == proc.tokenizer.eos_token_id  # restored after the run
    assert all("," not in k and "[" not in k for k in m)


def test_text_lm_inline_task_through_hflm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A text LM runs through HFLM on an inline lm-eval task; references = its own outputs on even items."""
    import json

    import torch
    import transformers

    from mergelab.bench import modeling as bm
    from mergelab.evaluators import generate
    from mergelab.evaluators.lmeval import run_lmeval

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    questions = ["what is two plus two", "name a colour", "which way is left", "count to three"]
    tok = bm.build_tokenizer(questions, vocab_size=300)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    own = generate(model, tok, questions, max_new_tokens=4)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": own[i] if i % 2 == 0 else "nope"}) + "\n"
                            for i, q in enumerate(questions)))  # fmt: skip
    task = {
        "task": "toy_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}", "target_delimiter": "",
        "generation_kwargs": {"until": [], "max_gen_toks": 4, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }  # fmt: skip
    out = run_lmeval(model, tok, [task], apply_chat_template=False, batch_size=2, max_length=128)
    assert out["metrics"]["toy_gen/exact_match"] == pytest.approx(0.5)
