"""The omni experiment end to end at test size: build, merge through the engine, the Table 5 layout, the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergelab.bench.omni import data, table
from mergelab.bench.omni.__main__ import main
from mergelab.bench.omni.build import seed_dir, usable_jobs
from mergelab.bench.omni.table import format_targets, merge_experts, targets
from mergelab.bench.omni.train import TOWERS
from mergelab.engine import merge

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    zoo = tmp_path_factory.mktemp("omni_zoo")
    out = zoo / "table.json"
    main(["--zoo", str(zoo), "--quick", "--methods", "task_arithmetic,ties,optmerge", "--json-out", str(out)])
    return zoo, json.loads(out.read_text())


def test_quick_omni_table_has_every_model_and_row(quick_run, capsys) -> None:
    """(Its cost is measured in ``docs/omni.md`` "Cost", not asserted here: no timed tests.)"""
    zoo, result = quick_run
    models = result["per_seed"][0]["models"]
    assert set(models) == {f"expert/{m}/lora" for m in data.MODALITIES} | {
        f"lora/{m}" for m in ("task_arithmetic", "ties", "optmerge")} | {"compose/naivemc/lora", "compose/damc/lora"}
    assert result["compose"] == ["naivemc", "damc"] and result["per_seed"][0]["lam"]["compose/damc/lora"] is None
    for name in ("compose/naivemc/lora", "compose/damc/lora"):  # the online references: all media, like a merge
        assert {"music_avqa", "avqa", "cross_avg", "own/image", "own/audio", "own/video"} <= set(models[name])
        assert result["aggregate"][name]["cross_avg"]["n"] == 1
    for m in data.MODALITIES:  # an expert is scored with its own modality only: its own tasks, no others
        own = models[f"expert/{m}/lora"]
        assert f"own/{m}" in own and not {f"own/{o}" for o in data.MODALITIES if o != m} & set(own)
    merged = models["lora/ties"]
    assert {"music_avqa", "avqa", "cross_avg", "own/image", "own/audio", "own/video"} <= set(merged)
    assert any(k.startswith("music_avqa/qtype/") for k in merged)
    assert result["aggregate"]["lora/ties"]["cross_avg"]["n"] == 1
    assert result["targets"]["lora"]["best"] in {f"lora/{m}" for m in ("task_arithmetic", "ties", "optmerge")}


def test_targets_compare_the_best_merge_with_every_expert() -> None:
    """Best merge by mean cross-modal average, its lead over the best expert, its own-task loss per modality
    against that modality's expert, and the methods' spread (hand-made seed means)."""
    def cell(v: float) -> dict[str, float]:
        return {"mean": v, "std": 0.0, "n": 3}

    agg = {f"expert/{m}/lora": {"cross_avg": cell(c), f"own/{m}": cell(o)}
           for m, c, o in (("image", 40.0, 90.0), ("audio", 45.0, 95.0), ("video", 42.0, 80.0))}
    agg |= {"lora/tsv": {"cross_avg": cell(52.0), **{f"own/{m}": cell(v) for m, v in
                                                    (("image", 88.0), ("audio", 89.0), ("video", 81.0))}},
            "lora/iso_c": {"cross_avg": cell(38.0), **{f"own/{m}": cell(50.0) for m in data.MODALITIES}}}
    t = targets(agg, "lora")
    assert t["best"] == "lora/tsv" and t["margin"] == pytest.approx(7.0) and t["spread"] == pytest.approx(14.0)
    assert (t["own_loss/image"], t["own_loss/audio"], t["own_loss/video"]) == pytest.approx((2.0, 6.0, -1.0))
    text = format_targets(t)
    assert "+7.0 (>= 5: met)" in text and "(<= 5 each: not met)" in text and "spread 14.0 (>= 5: met)" in text
    assert targets(agg, "full") == {} and format_targets({}) == ""


def test_usable_jobs_are_the_cores_capped_at_the_work() -> None:
    cores = len(os.sched_getaffinity(0))
    assert usable_jobs(None, 1000) == cores and usable_jobs(None, 1) == 1
    assert usable_jobs(4, 2) == 2 and usable_jobs(1, 9) == 1 and usable_jobs(3, 0) == 1


def test_the_parallel_table_equals_the_sequential_one(quick_run, monkeypatch: pytest.MonkeyPatch) -> None:
    """``jobs=2`` (the evaluations in two worker processes, the merges here) gives the same scores, lambdas, log
    lines and table as ``jobs=1`` (everything in this process), with a val sweep, both LoRA modes and a
    composition: the evaluations are deterministic and gathered in the table's order."""
    pools: list[int] = []

    class Pool(ProcessPoolExecutor):
        def __init__(self, workers: int) -> None:
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(table, "ProcessPoolExecutor", Pool)
    results, logs = {}, {}
    for jobs in (1, 2):
        logs[jobs] = []
        results[jobs] = table.run(quick_run[0], jobs=jobs, quick=True, methods=["weight_average", "task_arithmetic"],
                                  lam_grid=[0.5, 1.0], lora_modes=("delta", "factors"), compose=("damc",),
                                  log=logs[jobs].append)
    assert pools == [2]
    seq, par = results[1]["per_seed"][0], results[2]["per_seed"][0]
    assert list(par["models"]) == list(seq["models"]) and par["models"] == seq["models"]
    assert par["lam"] == seq["lam"] and par["lam"]["lora/task_arithmetic/factors"] in (0.5, 1.0)
    assert logs[2] == logs[1] and results[2]["aggregate"] == results[1]["aggregate"]


def test_a_merge_keeps_each_tower_bit_identical_to_its_owner(quick_run, tmp_path: Path) -> None:
    root = seed_dir(quick_run[0], 0)
    report = merge_experts(root, "lora", "ties", 1.0, tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(root / "base" / "model.safetensors"))
    assert set(merged) == set(base)
    for m, prefix in TOWERS.items():
        owner = load_file(str(root / "experts" / "lora" / m / "model.safetensors"))
        names = [k for k in merged if k.startswith(prefix)]
        assert names and all(torch.equal(merged[k], owner[k]) for k in names)
        connector = [k for k in names if ".merger." in k or ".proj." in k or ".ln_post." in k]
        assert any(not torch.equal(owner[k], base[k]) for k in connector), m  # the expert trained its connector
    assert report is not None


def test_a_full_ft_expert_changes_only_the_decoder_linears_and_its_connector(quick_run) -> None:
    import re

    from mergelab.bench.omni.build import OmniPlan, build_expert
    from mergelab.bench.omni.train import FULL_TRAINABLE, connector_pattern

    root = seed_dir(quick_run[0], 0)
    build_expert(root, OmniPlan.quick(), 0, "full", "audio", device="cpu")
    base = load_file(str(root / "base" / "model.safetensors"))
    expert = load_file(str(root / "experts" / "full" / "audio" / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], expert[k])}
    allowed = re.compile(f"{FULL_TRAINABLE}|{connector_pattern('audio')}")
    assert changed and all(allowed.fullmatch(k) for k in changed)
    assert any(k.startswith("model.audio_tower.") for k in changed)
    assert any(k.startswith("model.language_model.layers.") for k in changed)
    stripped = load_file(str(root / "merge" / "full" / "audio" / "model.safetensors"))
    assert not any(k.startswith(("model.visual.", "model.video_visual.")) for k in stripped)


def test_mergelab_bench_omni_cli_runs_the_quick_table(quick_run, tmp_path: Path) -> None:
    """``mergelab bench omni`` calls the same :func:`~mergelab.bench.omni.table.run` (the zoo is already built)."""
    from click.testing import CliRunner

    from mergelab.platform.cli import main as cli

    out = tmp_path / "cli.json"
    res = CliRunner().invoke(cli, ["bench", "omni", "--zoo", str(quick_run[0]), "--quick", "--methods",
                                   "task_arithmetic", "--lora-merge", "delta,factors", "--json-out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert {f"expert/{m}/lora" for m in data.MODALITIES} | {"lora/task_arithmetic", "lora/task_arithmetic/factors"} \
        <= set(result["per_seed"][0]["models"])
    assert {"cross_avg", "own/audio"} <= set(result["per_seed"][0]["models"]["lora/task_arithmetic/factors"])
    assert "MUSIC-AVQA" in res.output and "task_arithmetic/factors" in res.output
    assert "Loading weights" not in res.output  # quiet by default (click's output holds stderr too)
    # the online compositions come last, under the paper's heading, and are never the targets' best merge
    heading, header = next((a, b) for a, b in zip(res.output.splitlines(), res.output.splitlines()[1:], strict=False)
                           if b.startswith("dataset"))
    assert heading.index("individual") < heading.index("static merging") < heading.index("online composing")
    assert header.split()[-2:] == ["compose/naivemc", "compose/damc"]
    assert result["targets"]["lora"]["best"].startswith("lora/task_arithmetic")


@pytest.mark.parametrize("lora_merge", ["delta", "factors"])
def test_lora_adapters_merge_with_owned_towers_in_both_modes(quick_run, tmp_path: Path, lora_merge: str) -> None:
    """The paper's setting straight from the peft adapters (connector in ``modules_to_save``): policy ``auto`` picks
    the omni preset, each connector comes bit for bit from its expert, the report names the owner."""
    root = seed_dir(quick_run[0], 0)
    experts = [{"path": root / "experts" / "lora" / m / "adapter", "name": m} for m in data.MODALITIES]
    report = merge(base=root / "base", experts=experts, method="ties", params={"lam": 1.0}, policy="auto",
                   lora_merge=lora_merge, out=tmp_path / "m", device="cpu")
    assert report.policy["name"] == "omni_thinker"
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    base = load_file(str(root / "base" / "model.safetensors"))
    owners = {t.name: t.owner for t in report.tensors}
    for m, prefix in TOWERS.items():
        full = load_file(str(root / "experts" / "lora" / m / "model.safetensors"))
        names = [k for k in merged if k.startswith(prefix)]
        assert names and all(torch.equal(merged[k], full[k]) for k in names)
        assert {owners[k] for k in names if not torch.equal(full[k], base[k])} == {m}
    llm = [t.name for t in report.tensors if t.rule in ("merge", "factors")]
    assert llm and all(n.startswith("model.language_model.") for n in llm)
    if lora_merge == "delta":  # the same merge as the stripped merge/ layout with carry_unique
        ref = tmp_path / "ref"
        merge_experts(root, "lora", "ties", 1.0, ref)
        want = load_file(str(ref / "model.safetensors"))
        for n in llm:
            torch.testing.assert_close(merged[n], want[n])


def test_bench_omni_track_makes_each_merge_an_mlflow_run(quick_run, tmp_path: Path, platform_store) -> None:
    """``--track``: every merge a run of the ``omni`` experiment; the chosen merge's run holds its test scores."""
    from click.testing import CliRunner

    from mergelab.platform.cli import main as cli

    res = CliRunner().invoke(cli, ["bench", "omni", "--zoo", str(quick_run[0]), "--quick", "--methods",
                                   "task_arithmetic", "--track", "--experiment", "omni-test"])
    assert res.exit_code == 0, res.output
    client = platform_store.client()
    exp = client.get_experiment_by_name("omni-test")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mergelab.role") != "reference"]
    assert len(runs) == 2  # quick: lambda grid (1.0,): the sweep's merge, then the chosen one again
    assert {r.info.run_name for r in runs} == {"seed0/lora/task_arithmetic/lam1.0"}
    scored = [r for r in runs if "test/cross_avg" in r.data.metrics]
    assert len(scored) == 1 and "test/own/audio" in scored[0].data.metrics
    assert scored[0].data.params["method"] == "task_arithmetic"


def test_python_m_bench_omni_is_quiet_by_default_and_v_shows_the_libraries(quick_run) -> None:
    """Issue 22's quiet output for ``python -m mergelab.bench.omni``, as for ``mergelab bench omni``: the table's
    lines only, no transformers progress bar ("Loading weights", one per model) or library warning on stderr;
    ``-v`` shows them."""
    env = {k: v for k, v in os.environ.items() if k != "MERGELAB_VERBOSE"} | {"OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "mergelab.bench.omni", "--zoo", str(quick_run[0]), "--quick", "--methods",
            "weight_average", "--compose", "none"]
    quiet = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "omni table" in quiet.stdout and "compose/" not in quiet.stdout
    assert quiet.stderr.strip() == "", quiet.stderr[-2000:]
    loud = subprocess.run([*args, "-v"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and "Loading weights" in loud.stderr, loud.stderr[-2000:]
