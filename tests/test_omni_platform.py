"""The omni benchmark on the platform: its tasks in the evaluators' table, a campaign over the omni experts (the
shipped example on the quick zoo), registered omni versions loaded back, the base and experts as reference runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mergelab.bench.omni import tasks as omni_tasks
from mergelab.bench.omni.build import OmniPlan, build, seed_dir

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def omni_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick omni zoo of seed 0 (the builder ``tests/test_omni_table.py``'s quick run starts with)."""
    zoo = tmp_path_factory.mktemp("omni_zoo")
    build(zoo, 0, OmniPlan.quick(), device="cpu", log=lambda _: None)
    return zoo


def test_the_task_names_are_the_benchmarks() -> None:
    """The light name table the evaluators register is exactly the data module's tasks, sets and question types."""
    from mergelab.bench.omni import data

    assert tuple(omni_tasks.SINGLE_TASKS) == tuple(data.TASKS)
    assert dict(omni_tasks.SINGLE_TASKS) == {t: m for t, (m, _, _) in data.TASKS.items()}
    assert omni_tasks.CROSS_SETS == data.CROSS_SETS
    for name in data.CROSS_SETS:
        seen = {s.qtype for s in data.cross_samples(name, "val", 28)}
        assert seen == set(omni_tasks.qtypes(name)), name


def test_every_omni_task_is_an_evaluator_task_and_import_stays_light() -> None:
    from mergelab.evaluators import SUITES, TASKS

    for name in omni_tasks.OMNI_TASKS:
        task = TASKS[name]
        assert task.family == "omni" and task.generate is not None and task.primary == "accuracy"
    assert TASKS["music_avqa"].metric_names == ("accuracy", *(f"qtype/{t}" for t in omni_tasks.qtypes("music_avqa")))
    assert SUITES["omni"].tasks == omni_tasks.OMNI_TASKS
    # building the task table imports no transformers (`mergelab merge` and `mergelab campaign --dry-run` import
    # the evaluators and never generate): the omni modules are imported when an omni task runs
    code = ("import sys, mergelab.platform.campaign_config, mergelab.evaluators as e; assert 'music_avqa' in e.TASKS; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_evaluators_score_an_omni_checkpoint_like_the_table(omni_zoo: Path) -> None:
    """``evaluate_path`` on an expert: the table's items (a prefix), all their media, the table's answers and
    metric; ``val/<task>/qtype/<type>`` per question type."""
    from mergelab.bench.omni import data, metrics
    from mergelab.bench.omni.train import answers
    from mergelab.evaluators import evaluate_path
    from mergelab.hf import load_model

    expert = seed_dir(omni_zoo, 0) / "experts" / "lora" / "audio"
    res = evaluate_path(expert, tasks=["music_avqa", "avqa", "audio_beeps"], split="val", limit=8, device="cpu")
    model, processor = load_model(expert)
    for name in ("music_avqa", "avqa"):
        items = data.cross_samples(name, "val", 8)
        preds = [r["prediction"] for r in res.records if r["task"] == name]
        assert [r["id"] for r in res.records if r["task"] == name] == [s.id for s in items]
        assert preds == answers(model, processor, items)
        want = metrics.score(items, preds)
        assert res.metrics[f"{name}/accuracy"] == pytest.approx(want["accuracy"])
        assert {k for k in res.metrics if k.startswith(f"{name}/qtype/")} == {
            f"{name}/{k}" for k in want if k.startswith("qtype/")}
    assert set(res.flat_metrics()) >= {"val/music_avqa", "val/avqa/qtype/audio_beeps", "val/audio_beeps/accuracy"}
    with pytest.raises(ValueError, match="split 'train'"):
        evaluate_path(expert, tasks=["avqa"], split="train", device="cpu")


def test_omni_campaign_example_on_the_quick_zoo_registers_versions_that_load_back(
        omni_zoo: Path, platform_store, tmp_path: Path) -> None:
    """``examples/campaign-omni.yaml`` on the quick zoo (two trials, 7 val items per set): each trial merges the
    three LoRA adapters (connectors owned) and is scored on the cross-modal sets; the top 2 are registered, and
    ``mergelab eval models:/optmerge-omni@champion`` loads an omni model and scores it."""
    from click.testing import CliRunner

    from mergelab.bench.omni.classes import OmniThinkerForConditionalGeneration
    from mergelab.platform.campaign import run_campaign
    from mergelab.platform.campaign_config import OmniZooRef, load_campaign
    from mergelab.platform.cli import main as cli
    from mergelab.platform.registry import load_registered

    t0 = time.perf_counter()
    cfg = load_campaign(REPO / "examples" / "campaign-omni.yaml")
    assert isinstance(cfg.experts, OmniZooRef) and cfg.eval.tasks == ["music_avqa", "avqa"]
    cfg.experts.omni_zoo = str(omni_zoo)
    cfg.budget.n_trials, cfg.eval.limit, cfg.device = 2, 7, "cpu"
    res = run_campaign(cfg, store=platform_store)
    assert res.n_complete == 2 and res.best is not None and len(res.registered) == 2
    client = platform_store.client()
    trial = client.get_run(res.best["run_id"])
    assert {"val/average", "val/music_avqa", "val/avqa", "val/music_avqa/qtype/composite"} <= set(trial.data.metrics)
    assert trial.data.metrics["val/average"] == pytest.approx(
        (trial.data.metrics["val/music_avqa"] + trial.data.metrics["val/avqa"]) / 2)

    version = res.registered[0][0]
    client.set_registered_model_alias("optmerge-omni", "champion", version)
    model, processor = load_registered(platform_store, "models:/optmerge-omni@champion")
    assert isinstance(model, OmniThinkerForConditionalGeneration) and type(processor).__name__ == "OmniProcessor"
    out = tmp_path / "eval.json"
    cli_res = CliRunner().invoke(cli, ["eval", "models:/optmerge-omni@champion", "--tasks", "music_avqa,audio_beeps",
                                       "--split", "test", "--limit", "5", "--device", "cpu", "--json-out", str(out)])
    assert cli_res.exit_code == 0, cli_res.output
    saved = json.loads(out.read_text())
    assert set(saved["scores"]) == {"music_avqa", "audio_beeps"} and "music_avqa/qtype/audio_pitch" in saved["metrics"]
    assert time.perf_counter() - t0 < 90


def test_a_full_ft_omni_campaign_owns_every_tower_and_registers_a_version_that_loads_back(
        omni_zoo: Path, platform_store) -> None:
    """``experts: {omni_zoo, kind: full}`` on the quick zoo, whose plan builds LoRA experts only: the campaign trains
    the three full fine-tunes on the built base (the manifest kept), a trial merges them on the whole base (policy
    ``auto``: the omni preset), each tower and connector bit for bit from its full expert (not the LoRA one), the
    LLM merged; the registered version loads back as an omni model with its processor."""
    from mergelab.bench.omni.classes import OmniThinkerForConditionalGeneration
    from mergelab.bench.omni.compose import read_weights
    from mergelab.bench.omni.train import TOWERS
    from mergelab.platform.campaign import run_campaign
    from mergelab.platform.campaign_config import CampaignConfig
    from mergelab.platform.registry import load_registered, resolve_model_dir

    t0 = time.perf_counter()
    root = seed_dir(omni_zoo, 0)
    manifest = (root / "build.json").read_text()
    cfg = CampaignConfig.model_validate({
        "name": "omni-full", "experts": {"omni_zoo": str(omni_zoo), "kind": "full", "seed": 0, "quick": True},
        "method": "task_arithmetic", "search_space": {"lam": {"type": "float", "low": 0.5, "high": 1.5}},
        "budget": {"n_trials": 1}, "eval": {"limit": 5}, "device": "cpu",
        "registry": {"name": "omni-full", "register": "top_k", "top_k": 1}})
    res = run_campaign(cfg, store=platform_store)
    assert res.n_complete == 1 and len(res.registered) == 1
    trial = platform_store.client().get_run(res.best["run_id"])
    assert {"val/average", "val/music_avqa", "val/avqa"} <= set(trial.data.metrics)
    assert (root / "build.json").read_text() == manifest  # the quick plan's manifest, untouched
    merged = read_weights(resolve_model_dir(platform_store, f"models:/omni-full/{res.registered[0][0]}"))
    base = read_weights(root / "base")
    assert set(merged) == set(base)
    for m, prefix in TOWERS.items():
        full, lora = read_weights(root / "experts" / "full" / m), read_weights(root / "experts" / "lora" / m)
        names = [k for k in merged if k.startswith(prefix)]
        assert names and all(torch.equal(merged[k], full[k]) for k in names), m
        assert any(not torch.equal(full[k], lora[k]) for k in names), m  # the full expert's own connector
    llm = [k for k in merged if k.startswith("model.language_model.layers.") and k.endswith("_proj.weight")]
    assert llm and any(not torch.equal(merged[k], base[k]) for k in llm)

    model, processor = load_registered(platform_store, f"models:/omni-full/{res.registered[0][0]}")
    assert isinstance(model, OmniThinkerForConditionalGeneration) and type(processor).__name__ == "OmniProcessor"
    assert time.perf_counter() - t0 < 90


def test_bench_omni_track_logs_the_base_and_experts_as_reference_runs(omni_zoo: Path, platform_store) -> None:
    """``--track``: beside the merges, ``seed0/base``, each ``seed0/expert/<m>/lora`` and each online composition
    ``seed0/compose/<mode>/lora`` as reference runs with the merges' metric names; a second run reuses them."""
    from click.testing import CliRunner

    from mergelab.platform.cli import main as cli

    args = ["bench", "omni", "--zoo", str(omni_zoo), "--quick", "--methods", "weight_average", "--track",
            "--experiment", "omni-refs"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    client = platform_store.client()
    exp = client.get_experiment_by_name("omni-refs")
    runs = client.search_runs([exp.experiment_id])
    refs = {r.data.tags["mergelab.reference"]: r for r in runs if r.data.tags.get("mergelab.role") == "reference"}
    assert set(refs) == {"seed0/base", *(f"seed0/expert/{m}/lora" for m in ("image", "audio", "video")),
                         "seed0/compose/naivemc/lora", "seed0/compose/damc/lora"}
    merge = next(r for r in runs if "test/cross_avg" in r.data.metrics and r.data.tags.get("mergelab.role") != "reference")
    assert set(refs["seed0/base"].data.metrics) == set(merge.data.metrics) & {k for k in merge.data.metrics
                                                                              if k.startswith("test/")}
    audio = refs["seed0/expert/audio/lora"].data.metrics
    assert {"test/cross_avg", "test/music_avqa/qtype/audio_beeps", "test/own/audio"} <= set(audio)
    assert "test/own/image" not in audio  # an expert is scored with its own medium only, as in the table
    damc = refs["seed0/compose/damc/lora"]
    assert {"test/cross_avg", "test/own/image", "test/own/audio"} <= set(damc.data.metrics)
    assert damc.data.tags["mergelab.path"] == str(seed_dir(omni_zoo, 0) / "experts" / "lora")
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and again.output.count(" reused") == 6, again.output


def test_dry_run_on_an_unbuilt_omni_zoo_builds_nothing(tmp_path: Path) -> None:
    """``--dry-run`` says the zoo is built first and writes nothing; the resolved paths are the zoo's layout."""
    from mergelab.platform.campaign_config import CampaignConfig
    from mergelab.platform.campaign_space import campaign_plan
    from mergelab.platform.omni import omni_paths

    cfg = CampaignConfig.model_validate({"name": "omni-dry", "experts": {"omni_zoo": str(tmp_path / "z"),
                                                                         "modalities": ["image", "audio"]},
                                         "method": "task_arithmetic"})
    assert cfg.eval.tasks == ["music_avqa", "avqa"]  # an omni campaign scores the cross-modal sets by default
    plan = campaign_plan(cfg)
    assert "is not built yet" in plan and "builds it first" in plan and not (tmp_path / "z").exists()
    base, experts = omni_paths(cfg.experts)
    assert base == tmp_path / "z" / "omni" / "seed0" / "base"
    assert [(m, p.relative_to(base.parent).as_posix()) for m, p in experts] == [
        ("image", "experts/lora/image/adapter"), ("audio", "experts/lora/audio/adapter")]
