"""Bad input across the commands and the YAMLs: found before any work, one line naming the culprit (no traceback),
exit status 2, no MLflow run created and no file left behind; a failure during work exits 1 with its run FAILED."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import tiny_state, write_sharded
from conftest_platform import make_expert_family
from safetensors.torch import save_file

from mergelab.platform.cli import main
from mergelab.platform.store import Store


@pytest.fixture
def world(platform_store: Store, tmp_path: Path) -> dict[str, Path]:
    """A base, two full experts, a LoRA adapter on the base, and a valid merge and campaign YAML."""
    base, experts = make_expert_family(tmp_path / "zoo", n=2)
    lora = tmp_path / "zoo" / "lora"
    lora.mkdir()
    g = torch.Generator().manual_seed(3)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 16, generator=g),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, 2, generator=g)},
              str(lora / "adapter_model.safetensors"))
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                          "base_model_name_or_path": "../base"}))
    merge_yaml = {"base": str(base), "experts": [str(e) for e in experts], "method": "ties",
                  "params": {"density": 0.5}, "policy": "llama", "device": "cpu"}
    camp = {"name": "c", "base": str(base), "method": "task_arithmetic", "policy": "llama", "device": "cpu",
            "experts": [{"path": str(experts[0]), "name": "vqa"}, {"path": str(experts[1]), "name": "ocr"}],
            "search_space": {"lam": {"type": "float", "low": 0.1, "high": 1.0}}, "budget": {"n_trials": 1},
            "eval": {"tasks": ["vqa", "ocr"]}}
    return {"root": tmp_path, "base": base, "e0": experts[0], "e1": experts[1], "lora": lora,
            "merge": merge_yaml, "campaign": camp}


def _yaml(w: dict, name: str, data: dict | str) -> str:
    p = w["root"] / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return str(p)


def _merge(w: dict, *extra: str, **change: object) -> list[str]:
    data = {**w["merge"], **change}
    return ["merge", _yaml(w, "m.yaml", data), "--out", str(w["root"] / "out"), "--quiet", "--track", *extra]


def _campaign(w: dict, cmd: str = "campaign", **change: object) -> list[str]:
    return [cmd, _yaml(w, "c.yaml", {**w["campaign"], **change})]


def _mismatched_expert(w: dict) -> list[str]:
    sd = tiny_state(0)
    sd["model.norm.weight"] = torch.ones(17)
    write_sharded(w["root"] / "wide", sd, n_shards=1)
    return _merge(w, experts=[str(w["e0"]), str(w["root"] / "wide")])


def _missing_tensor(w: dict) -> list[str]:
    sd = tiny_state(0)
    del sd["lm_head.weight"]
    write_sharded(w["root"] / "short", sd, n_shards=1)
    return _merge(w, experts=[str(w["e0"]), str(w["root"] / "short")])


def _foreign_lora(w: dict) -> list[str]:
    cfg = json.loads((w["lora"] / "adapter_config.json").read_text())
    (w["lora"] / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "Qwen/Qwen2-7B"}))
    return _merge(w, experts=[str(w["lora"])])


def _foreign_full(w: dict) -> list[str]:
    (w["e1"] / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    return _merge(w)


def _out_exists(w: dict) -> list[str]:
    (w["root"] / "out").mkdir()
    (w["root"] / "out" / "keep.txt").write_text("mine")
    return _merge(w)


def _resume_changed(w: dict) -> list[str]:
    from conftest_platform import WeightEvaluator

    from mergelab.platform.campaign import run_campaign
    from mergelab.platform.campaign_config import load_campaign

    ev = WeightEvaluator(w["base"], {"vqa": w["e0"], "ocr": w["e1"]})
    run_campaign(load_campaign(_campaign(w)[1]), evaluator=ev)
    return _campaign(w, search_space={"lam": {"type": "float", "low": 0.1, "high": 2.0}})


# case -> (argv builder, text the one line must contain)
CASES: dict[str, tuple[Callable[[dict], list[str]], str]] = {
    # merge
    "merge/config_missing": (lambda w: ["merge", str(w["root"] / "nope.yaml"), "--out", str(w["root"] / "out")],
                             "nope.yaml: file not found"),
    "merge/yaml_syntax": (lambda w: ["merge", _yaml(w, "m.yaml", "base: [unclosed\n"), "--out",
                                     str(w["root"] / "out")], "invalid YAML"),
    "merge/unknown_key_line": (lambda w: ["merge", _yaml(w, "m.yaml", f"base: {w['base']}\nexperts: [{w['e0']}]\n"
                                                                      "method: ties\nparms: {density: 0.5}\n"),
                                          "--out", str(w["root"] / "out")],
                               "parms: unknown key 'parms' (did you mean 'params'?) (line 4)"),
    "merge/unknown_method": (lambda w: _merge(w, method="tis"), "unknown method 'tis'"),
    "merge/bad_param": (lambda w: _merge(w, params={"density": 1.5}), "density"),
    "merge/unknown_param": (lambda w: _merge(w, params={"densty": 0.5}), "densty"),
    "merge/base_missing": (lambda w: _merge(w, base=str(w["root"] / "nobase")), "nobase"),
    "merge/expert_missing": (lambda w: _merge(w, experts=[str(w["e0"]), str(w["root"] / "noexpert")]),
                             "noexpert"),
    "merge/out_exists": (_out_exists, "already exists"),
    "merge/out_overlaps_input": (lambda w: ["merge", _yaml(w, "m.yaml", w["merge"]), "--out",
                                            str(w["base"] / "merged")], "overlaps input"),
    "merge/shape_mismatch": (_mismatched_expert, "model.norm.weight"),
    "merge/missing_tensor": (_missing_tensor, "lm_head.weight is missing"),
    "merge/lora_other_base": (_foreign_lora, "'Qwen/Qwen2-7B', not on"),
    "merge/full_other_arch": (_foreign_full, "model_type is 'mistral'"),
    "merge/bad_device": (lambda w: _merge(w, device="tpu"), "device: unknown device 'tpu'"),
    "merge/bad_dtype": (lambda w: _merge(w, dtype="float13"), "float13"),
    "merge/bad_policy": (lambda w: _merge(w, policy="qwen9"), "qwen9"),
    "merge/report_dir_missing": (lambda w: _merge(w, "--report", str(w["root"] / "no" / "r.json")), "--report"),
    "merge/no_experts": (lambda w: _merge(w, experts=[]), "expert"),
    # campaign YAML
    "campaign/file_missing": (lambda w: ["campaign", str(w["root"] / "nocamp.yaml")], "nocamp.yaml"),
    "campaign/unknown_key_line": (lambda w: ["campaign", _yaml(w, "c.yaml", yaml.safe_dump(w["campaign"],
                                                                                            sort_keys=False)
                                                                + "budjet: {n_trials: 3}\n")],
                                  "unknown key 'budjet' (did you mean 'budget'?)"),
    "campaign/unknown_task": (lambda w: _campaign(w, eval={"tasks": ["vqa", "ocrr"]}),
                              "unknown task 'ocrr' (did you mean 'ocr'?)"),
    "campaign/unknown_objective": (lambda w: _campaign(w, objective={"metrics": ["val/averag"]}),
                                   "unknown metric 'val/averag' (did you mean 'val/average'?)"),
    "campaign/test_objective": (lambda w: _campaign(w, objective={"metrics": ["test/average"]}),
                                "not on the val split"),
    "campaign/unknown_hyperparameter": (lambda w: _campaign(w, search_space={"lamb": {"type": "float", "low": 0.1,
                                                                                     "high": 1.0}}),
                                        "['lamb'] are not hyperparameters"),
    "campaign/bad_range": (lambda w: _campaign(w, search_space={"lam": {"type": "float", "low": 2, "high": 1}}),
                           "search_space.lam"),
    "campaign/base_missing": (lambda w: _campaign(w, base=str(w["root"] / "nobase")), "nobase"),
    "campaign/expert_shape": (lambda w: (_mismatched_expert(w), _campaign(
        w, experts=[{"path": str(w["e0"]), "name": "vqa"}, {"path": str(w["root"] / "wide"), "name": "ocr"}]))[1],
                              "model.norm.weight"),
    "campaign/resume_changed_space": (_resume_changed, "exists with another search_space"),
    # worker
    "worker/unknown_method": (lambda w: _campaign(w, "worker", method="optmerj"), "optmerj"),
    "worker/unknown_task": (lambda w: _campaign(w, "worker", eval={"tasks": ["chartt"]}), "did you mean 'chart'"),
    # promote
    "promote/unknown_model": (lambda w: ["promote", "no-such-model", "--tasks", "vqa"], "no-such-model"),
    # eval
    "eval/model_missing": (lambda w: ["eval", str(w["root"] / "nomodel")], "nomodel"),
    "eval/unknown_task": (lambda w: ["eval", str(w["base"]), "--tasks", "vqa,grounding2"],
                          "unknown task 'grounding2' (did you mean 'grounding'?)"),
    "eval/unknown_registered_model": (lambda w: ["eval", "models:/ghost@champion"], "ghost"),
    # bench
    "bench/jobs_zero": (lambda w: ["bench", "build", "--jobs", "0"], "--jobs"),
    "bench/table_zoo_missing": (lambda w: ["bench", "table", "--zoo", str(w["root"] / "nozoo")], "nozoo"),
}


def _runs(store: Store) -> list:
    client = store.client()
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps) if exps else []


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_before_any_work(case: str, world: dict, platform_store: Store) -> None:
    build, culprit = CASES[case]
    argv = build(world)
    runs_before = {r.info.run_id for r in _runs(platform_store)}
    files_before = sorted(p for p in world["root"].rglob("*") if "mlruns" not in p.parts)
    res = CliRunner().invoke(main, argv)
    text = (res.stderr if hasattr(res, "stderr") else res.output).strip()
    assert res.exit_code == 2, (res.exit_code, res.output)
    error_lines = [line for line in text.splitlines() if line.strip() and not line.startswith(("Usage:", "Try "))]
    assert len(error_lines) == 1 and "Traceback" not in res.output, text
    assert culprit in error_lines[0], error_lines[0]
    assert {r.info.run_id for r in _runs(platform_store)} == runs_before, "an MLflow run was created"
    files_after = sorted(p for p in world["root"].rglob("*") if "mlruns" not in p.parts)
    assert files_after == files_before, set(files_after) ^ set(files_before)


def test_base_mismatch_is_overridable(world: dict, platform_store: Store) -> None:
    argv = _foreign_lora(world)
    res = CliRunner().invoke(main, [*argv, "--allow-base-mismatch"])
    assert res.exit_code == 0, res.output
    assert (world["root"] / "out").is_dir()


def test_a_failure_during_work_exits_1_with_its_run_failed_and_nothing_left(world: dict, platform_store: Store,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.engine import loop

    def broken(*a, **kw):  # noqa: ANN002, ANN003, ANN202 - a fault in the middle of the merge
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(loop, "_merge_one", broken)
    res = CliRunner().invoke(main, _merge(world))
    assert res.exit_code == 1, res.output
    text = (res.stderr if hasattr(res, "stderr") else res.output).strip()
    assert "illegal memory access" in text and "Traceback" not in text and len(text.splitlines()) == 1, text
    (run,) = _runs(platform_store)
    assert run.info.status == "FAILED"
    assert not (world["root"] / "out").exists() and not list(world["root"].glob(".out.*"))
    res = CliRunner().invoke(main, ["--debug", *_merge(world)])
    assert res.exit_code == 1 and "Traceback" in res.output
