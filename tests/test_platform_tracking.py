"""Tracking: the embedded store, a tracked merge as one MLflow run (params, metrics, artifacts, weights written once
into the run's artifact directory), failure marking, and `mergelab merge` as a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest_platform import WeightEvaluator, make_expert_family

from mergelab._files import content_hash
from mergelab.engine import MergeRecipe
from mergelab.platform.merge_run import tracked_merge
from mergelab.platform.store import Store, local_path


def test_store_defaults_env_and_separate_optuna_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLFLOW_TRACKING_URI", "MERGELAB_OPTUNA_STORAGE", "MERGELAB_ARTIFACT_ROOT", "MERGELAB_ROOT"):
        monkeypatch.delenv(var, raising=False)
    s = Store.resolve(tmp_path / "mlruns")
    assert s.tracking_uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert s.optuna_storage == f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    assert s.artifact_root == (tmp_path / "mlruns" / "artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5055")
    monkeypatch.setenv("MERGELAB_OPTUNA_STORAGE", "postgresql+psycopg2://u:p@127.0.0.1/optuna")
    s = Store.resolve(tmp_path / "mlruns")
    assert s.tracking_uri == "http://127.0.0.1:5055" and s.artifact_root is None
    assert s.optuna_storage.startswith("postgresql")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MERGELAB_OPTUNA_STORAGE", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    with pytest.raises(ValueError, match="Optuna storage .* is the MLflow database"):
        Store.resolve(tmp_path / "mlruns")


def test_tracked_merge_logs_everything_and_writes_weights_once(platform_store: Store, tmp_path: Path) -> None:
    base, experts = make_expert_family(tmp_path / "zoo", n=2)
    ev = WeightEvaluator(base, {"vqa": experts[0], "ocr": experts[1]})
    client = platform_store.client()
    exp = platform_store.experiment_id("unit", client)
    parent = client.create_run(exp, run_name="parent").info.run_id
    recipe = MergeRecipe.build(base=base, experts=[{"path": str(experts[0]), "name": "vqa", "coefficient": 0.8},
                                                   {"path": str(experts[1]), "name": "ocr"}],
                               method="task_arithmetic", params={"lam": 0.5}, policy="llama", device="cpu")
    res = tracked_merge(recipe, store=platform_store, experiment="unit", parent_run_id=parent, tasks=["vqa", "ocr"],
                        evaluator=ev, reference_scores={"vqa": 100.0, "ocr": 50.0})
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    p = run.data.params
    assert p["method"] == "task_arithmetic" and p["hp.lam"] == "0.5" and p["policy"] == "llama"
    assert p["recipe.sha"] == recipe.digest == run.data.tags["mergelab.recipe"] and p["expert.0.kind"] == "full"
    assert p["expert.0.sha256"] == content_hash(experts[0]) and p["base.sha256"] == content_hash(base)
    assert p["expert.0.coefficient"] == "0.8" and p["expert.1.coefficient"] == "default"
    assert "version.torch" in p and "git.commit" in p and p["seed"] == "0"
    m = run.data.metrics
    assert m["val/average"] == pytest.approx((m["val/vqa"] + m["val/ocr"]) / 2, abs=1e-4)  # logged to 4 decimals
    assert m["val/normalized_average"] == pytest.approx((m["val/vqa"] / 100 + m["val/ocr"] / 50) * 100 / 2)
    assert m["val/worst_task"] == min(m["val/vqa"], m["val/ocr"]) and "val/vqa/accuracy" in m
    assert m["merge/seconds"] > 0 and m["merge/report/bytes_written"] > 0 and "merge/peak_host_mb" in m
    # the weights live in the run's artifact directory, written once (the evaluator read them there)
    art = local_path(run.info.artifact_uri)
    assert res.merged_path == art / "merged" and list((art / "merged").glob("*.safetensors"))
    assert art.is_relative_to(local_path(platform_store.artifact_root) / "unit")
    assert ev.calls == [(str(art / "merged"), "val")]
    files = {f.path for f in client.list_artifacts(res.run_id)}
    assert {"config", "merge_report.json", "predictions", "charts", "merged"} <= files
    cfg_text = (art / "config" / "merge.yaml").read_text()
    assert "task_arithmetic" in cfg_text and str(experts[0]) in cfg_text
    table = json.loads((art / "predictions" / "val.json").read_text())
    assert len(table["data"]) == 6 and "prediction" in table["columns"]
    assert (art / "charts" / "val_scores.png").stat().st_size > 1000
    assert json.loads((art / "merge_report.json").read_text())["method"] == "task_arithmetic"


def test_failed_merge_marks_run_failed_and_leaves_no_weights(platform_store: Store, tmp_path: Path) -> None:
    base, experts = make_expert_family(tmp_path / "zoo", n=1)
    client = platform_store.client()

    def broken_eval(model_dir, tasks, split, on_task):  # noqa: ANN001, ANN202
        raise RuntimeError("evaluator exploded")

    with pytest.raises(RuntimeError, match="evaluator exploded"):
        tracked_merge(MergeRecipe.build(base=base, experts=[experts[0]], method="task_arithmetic", device="cpu"),
                      store=platform_store, experiment="unit", tasks=["vqa"], evaluator=broken_eval)
    (run,) = client.search_runs([platform_store.experiment_id("unit", client)])
    assert run.info.status == "FAILED" and "evaluator exploded" in run.data.tags["mergelab.error"]
    assert not (local_path(run.info.artifact_uri) / "merged").exists()
    with pytest.raises(ValueError, match="lam"):  # bad hyperparameter: caught by the recipe, before any run
        MergeRecipe.build(base=base, experts=[experts[0]], method="task_arithmetic", params={"lam": "x"})
    statuses = sorted(r.info.status for r in client.search_runs([platform_store.experiment_id("unit", client)]))
    assert statuses == ["FAILED"]


def test_mergelab_merge_cli_is_an_mlflow_run(platform_store: Store, tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from mergelab.platform.cli import main

    base, experts = make_expert_family(tmp_path / "zoo", n=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(base), "experts": [str(e) for e in experts],
                                      "method": "ties", "params": {"density": 0.5}, "policy": "llama"}))
    res = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "m"), "--quiet", "--track"])
    assert res.exit_code == 0, res.output
    run_id = next(line.split()[-1] for line in res.output.splitlines() if line.startswith("MLflow run"))
    run = platform_store.client().get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "recipe"
    assert run.data.params["method"] == "ties" and run.data.params["hp.density"] == "0.5"
    assert run.data.tags["mergelab.merged_uri"] == (tmp_path / "m").resolve().as_uri()
    assert run.data.metrics["merge/report/bytes_written"] > 0 and list((tmp_path / "m").glob("*.safetensors"))


_SIGTERM_MID_MERGE = """
import os, signal, sys, time

from mergelab import _signals
from mergelab.platform.cli import raise_on_sigterm
from mergelab.engine import MergeRecipe
from mergelab.platform.merge_run import tracked_merge

assert raise_on_sigterm()  # what every `mergelab` command does


def merge_fn(recipe, out, **kw):  # a merge stopped (docker stop, a scheduler's preemption) while it writes
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "model-00001-of-00002.safetensors"), "wb").write(b"partial")
    os.kill(os.getpid(), signal.SIGTERM)
    _signals.sleep(60)  # work with safe points, as the engine's loop between tensors


tracked_merge(MergeRecipe.build(base=sys.argv[1], experts=[sys.argv[2]], method="task_arithmetic", device="cpu"),
              experiment="unit", merge_fn=merge_fn)
"""


def test_sigterm_ends_a_tracked_merge_killed_and_removes_its_partial_weights(platform_store: Store,
                                                                            tmp_path: Path) -> None:
    """Under the CLI, SIGTERM is raised as an interrupt: the run ends KILLED (not left RUNNING, as a default
    SIGTERM, which runs no cleanup, would leave it) and its partial weights are removed."""
    import subprocess
    import sys

    base, experts = make_expert_family(tmp_path / "zoo", n=1)
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_MID_MERGE, str(base), str(experts[0])],
                          capture_output=True, text=True, timeout=50)  # the store comes from MERGELAB_ROOT
    assert proc.returncode != 0 and "Terminated: signal SIGTERM" in proc.stderr
    client = platform_store.client()
    (run,) = client.search_runs([platform_store.experiment_id("unit", client)])
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["mergelab.error"]
    assert run.data.tags.get("mergelab.weights") == "deleted"
    assert not (local_path(run.info.artifact_uri) / "merged").exists()


def test_interrupts_end_runs_killed_and_errors_failed() -> None:
    from mergelab.platform.cli import Terminated
    from mergelab.platform.store import end_status

    assert end_status(Terminated("signal SIGTERM")) == "KILLED" and end_status(KeyboardInterrupt()) == "KILLED"
    assert end_status(RuntimeError("x")) == "FAILED" and end_status("worker lost") == "FAILED"
