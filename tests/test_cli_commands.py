"""Commands users expect: `mergelab methods`, `mergelab merge --dry-run`, `mergelab merge --eval`, and
`mergelab eval models:/NAME@ALIAS`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from conftest_platform import WeightEvaluator, make_expert_family

from mergelab.methods import METHODS
from mergelab.platform.cli import main
from mergelab.platform.merge_config import load_recipe


def _run(args: list[str]) -> Any:
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_methods_lists_every_method_with_parameters_and_defaults() -> None:
    r = _run(["methods"])
    assert r.exit_code == 0
    for name in METHODS:
        assert f"\n{name}: " in "\n" + r.output
    rows = json.loads(_run(["methods", "--json"]).output)
    assert [x["name"] for x in rows] == list(METHODS)
    ties = next(x for x in rows if x["name"] == "ties")
    fields = {f.name: f.default for f in dataclasses.fields(METHODS["ties"].config_cls)}
    assert {p["name"]: p["default"] for p in ties["parameters"]} == fields
    density = next(p for p in ties["parameters"] if p["name"] == "density")
    assert "official scripts" in density["doc"] and ties["lam_grid"] == [0.1, 0.3, 0.5, 0.7, 1.0, 1.5]
    one = _run(["methods", "dare_ties"]).output
    assert one.startswith("dare_ties:") and "drop_rate = 0.2" in one and "ties:" not in one.split("\n", 1)[1]
    assert CliRunner().invoke(main, ["methods", "nope"]).exit_code == 1


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    return make_expert_family(tmp_path / "ckpt", n=2)


def test_merge_dry_run_prints_recipe_digest_and_plan(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = family
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"base": str(base), "experts": [str(e) for e in experts], "method": "ties",
                                   "params": {"density": 0.5}, "policy": []}))
    out = tmp_path / "out"
    r = _run(["merge", str(cfg), "--out", str(out), "--dry-run", "--track"])
    assert r.exit_code == 0, r.output
    assert f"digest: {load_recipe(cfg).digest}" in r.output and "method: ties" in r.output
    assert "plan: merge 11 (total 11;" in r.output and "dry run: nothing merged" in r.output
    assert not out.exists() and not list(tmp_path.glob("mlruns*"))
    # without --out, and on a mergekit YAML
    mk = tmp_path / "mk.yaml"
    mk.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                  "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts]}))
    r = _run(["merge", str(mk), "--dry-run"])
    assert r.exit_code == 0 and "method: task_arithmetic" in r.output and "coefficient: 0.5" in r.output
    bad = CliRunner().invoke(main, ["merge", str(cfg)])
    assert bad.exit_code == 2 and "--out" in bad.output


def test_merge_eval_in_one_tracked_run(family: tuple[Path, list[Path]], tmp_path: Path, platform_store: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.platform import merge_run

    base, experts = family
    evaluator = WeightEvaluator(base, {"vqa": experts[0], "ocr": experts[1]})
    monkeypatch.setattr(merge_run, "HFEvaluator", lambda device="auto", progress=False: evaluator)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"base": str(base), "experts": [str(e) for e in experts],
                                   "method": "task_arithmetic", "params": {"lam": 0.5}}))
    out = tmp_path / "merged"
    r = _run(["merge", str(cfg), "--out", str(out), "--track", "--eval", "vqa,ocr", "--quiet"])
    assert r.exit_code == 0, r.output
    assert evaluator.calls == [(str(out), "val")] and "val: vqa " in r.output
    run_id = r.output.split("MLflow run ")[1].split()[0]
    run = platform_store.client().get_run(run_id)
    assert {"val/vqa", "val/ocr"} <= set(run.data.metrics)
    assert "## Evaluation" in (out / "README.md").read_text()
    bad = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(tmp_path / "x"), "--eval", "nope"])
    assert bad.exit_code == 2 and "unknown task" in bad.output and not (tmp_path / "x").exists()


def test_eval_on_registered_model_uri(family: tuple[Path, list[Path]], platform_store: Any,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import mergelab.evaluators as evaluators
    from mergelab.evaluators import EvalResult

    _, experts = family
    client = platform_store.client()
    client.create_registered_model("tiny")
    mv = client.create_model_version("tiny", source=experts[1].resolve().as_uri())
    client.set_registered_model_alias("tiny", "champion", mv.version)
    seen: list[Path] = []

    class Res(EvalResult):
        def summary(self) -> str:
            return "vqa 50.0"

    def fake(model_dir: Path, **kw: Any) -> Res:
        seen.append(Path(model_dir))
        return Res(split=kw["split"], scores={"vqa": 50.0})

    monkeypatch.setattr(evaluators, "evaluate_path", fake)
    r = _run(["eval", "models:/tiny@champion", "--tasks", "vqa"])
    assert r.exit_code == 0, r.output
    assert seen == [experts[1].resolve()] and "vqa 50.0" in r.output
    missing = CliRunner().invoke(main, ["eval", "models:/tiny@nope", "--tasks", "vqa"])
    assert missing.exit_code != 0 and "tiny" in missing.output  # one line naming the model, no traceback
