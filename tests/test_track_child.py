"""A merge's run recorded by a child process (issue 22: tracking cost more than merging; importing mlflow in a thread
of the merging process slowed the merge as much as it overlapped it). The run is the same as the in-process path's;
the merging process never imports mlflow; failures, an unopenable store and stops keep their semantics; the child
imports neither torch nor the engine, and never outlives its parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest_platform import make_expert_family

from mergelab.engine import MergeRecipe
from mergelab.platform.merge_run import tracked_merge
from mergelab.platform.store import Store
from mergelab.platform.track_child import MODULE, TrackingError

REPO = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path) -> MergeRecipe:
    base, experts = make_expert_family(tmp_path / "zoo", n=2)
    return MergeRecipe.build(base=base, experts=experts, method="task_arithmetic", policy="llama", device="cpu")


def _content(store: Store, run_id: str) -> dict[str, Any]:
    """Everything a run records, minus what differs between two runs of the same merge."""
    client = store.client()
    run = client.get_run(run_id)
    art = sorted(f.path for f in client.list_artifacts(run_id)) + sorted(
        f.path for f in client.list_artifacts(run_id, "config"))
    root = Path(run.info.artifact_uri.removeprefix("file://"))
    report = json.loads((root / "merge_report.json").read_text())
    tags = {k: v for k, v in run.data.tags.items() if k not in ("mergelab.merged_uri", "mlflow.runName")}
    return {"status": run.info.status, "params": run.data.params, "tags": tags, "metrics": sorted(run.data.metrics),
            "artifacts": art, "config": (root / "config" / "merge.yaml").read_text(), "report": sorted(report),
            "report_totals": {k: v for k, v in report.items() if k != "out" and "seconds" not in k and "peak" not in k
                              and not isinstance(v, (dict, list))}}


def test_the_child_records_the_same_run_as_the_in_process_path(platform_store: Store, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    seen: list[int] = []

    def merge_fn(r: MergeRecipe, out: Path, **kw: Any) -> Any:
        from mergelab.engine import run_merge

        seen.append(int(time.time() * 1000))
        return run_merge(r, out, **kw)

    before = int(time.time() * 1000)
    child = tracked_merge(recipe, store=platform_store, experiment="unit", run_name="m", out=tmp_path / "a",
                          tags={"x": "1"}, extra_params={"extra": 2}, merge_fn=merge_fn, child=True)
    here = tracked_merge(recipe, store=platform_store, experiment="unit", run_name="m", out=tmp_path / "b",
                         tags={"x": "1"}, extra_params={"extra": 2}, child=False)
    a, b = _content(platform_store, child.run_id), _content(platform_store, here.run_id)
    assert a == b and a["status"] == "FINISHED" and a["params"]["extra"] == "2"
    assert {"merge_report.json", "config/merge.yaml"} <= set(a["artifacts"])
    assert sorted(child.metrics) == sorted(here.metrics) == a["metrics"]
    run = platform_store.client().get_run(child.run_id)
    assert before <= run.info.start_time <= seen[0] <= run.info.end_time  # the true start time
    assert run.data.tags["mergelab.merged_uri"] == (tmp_path / "a").resolve().as_uri()
    assert child.link is not None and child.run_id in child.link and "workflowType=machine_learning" in child.link
    assert here.link is None
    assert recipe.digest in (tmp_path / "a" / "README.md").read_text()


def test_the_store_opens_in_the_child_while_the_merge_runs(platform_store: Store, tmp_path: Path) -> None:
    """The child gets (creates) the experiment while the parent merges; the run is made only after the merge."""
    recipe = _recipe(tmp_path)
    seen: dict[str, Any] = {}

    def merge_fn(r: MergeRecipe, out: Path, **kw: Any) -> Any:
        from mergelab.engine import run_merge

        client = platform_store.client()
        deadline = time.monotonic() + 120
        while client.get_experiment_by_name("opened-by-child") is None and time.monotonic() < deadline:
            time.sleep(0.1)
        exp = client.get_experiment_by_name("opened-by-child")
        seen["opened"] = exp is not None
        seen["runs"] = len(client.search_runs([exp.experiment_id])) if exp else None
        return run_merge(r, out, **kw)

    tm = tracked_merge(recipe, store=platform_store, experiment="opened-by-child", out=tmp_path / "o",
                       merge_fn=merge_fn, child=True)
    assert seen == {"opened": True, "runs": 0}
    assert platform_store.client().get_run(tm.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("child", [True, False])
def test_a_failing_merge_is_a_failed_run_its_output_removed_the_old_one_back(platform_store: Store, tmp_path: Path,
                                                                            child: bool) -> None:
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the previous merge")

    def broken(r: MergeRecipe, target: Path, **kw: Any) -> Any:
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        tracked_merge(recipe, store=platform_store, experiment="unit", out=out, overwrite=True, merge_fn=broken,
                      child=child)
    client = platform_store.client()
    (run,) = client.search_runs([platform_store.experiment_id("unit", client)])
    assert run.info.status == "FAILED" and "disk on fire" in run.data.tags["mergelab.error"]
    assert run.data.tags["mergelab.weights"] == "deleted" and run.data.params["recipe.sha"] == recipe.digest
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and not list(tmp_path.glob(".out.*"))


def test_a_store_the_child_cannot_open_fails_the_call_after_the_merge(tmp_path: Path) -> None:
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the previous merge")
    merged: list[bool] = []

    def merge_fn(r: MergeRecipe, target: Path, **kw: Any) -> Any:
        from mergelab.engine import run_merge

        merged.append(True)
        return run_merge(r, target, **kw)

    bad = Store(tracking_uri="nosuchscheme://nowhere", artifact_root=None, optuna_storage="sqlite://")
    with pytest.raises(TrackingError, match=r"^MLflow store nosuchscheme://nowhere: "):
        tracked_merge(recipe, store=bad, out=out, overwrite=True, merge_fn=merge_fn, child=True)
    assert merged == [True]  # it merged, then failed: the output is removed and the old one put back
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and not list(tmp_path.glob(".out.*"))
    # the inputs' hashing thread was joined (its result is the failed run's record): nothing of the call runs on
    assert not [t.name for t in threading.enumerate() if t.name == "mergelab-inputs"]


def test_child_needs_an_output_and_no_evaluation(platform_store: Store, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    with pytest.raises(ValueError, match="child=True"):
        tracked_merge(recipe, store=platform_store, child=True)
    with pytest.raises(ValueError, match="child=True"):
        tracked_merge(recipe, store=platform_store, out=tmp_path / "o", tasks=["vqa"], child=True)
    assert not (tmp_path / "o").exists()


# the child driven by hand; what it imported is written to stderr (its stdout carries the answers) when it exits
_CHILD = f"""
import json, os, sys
from {MODULE} import main

def noting_exit(code, _exit=os._exit):
    mods = [m for m in sys.modules
            if m.split(".")[0] in ("torch", "transformers", "pandas") or m.startswith("mergelab.engine")]
    sys.stderr.write("\\nMODULES " + json.dumps(sorted(mods)) + "\\n")
    sys.stderr.flush()
    _exit(code)

os._exit = noting_exit
os._exit(main())
"""


def _start_child(store: Store) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps({"store": {"tracking_uri": store.tracking_uri, "artifact_root": store.artifact_root,
                                           "optuna_storage": store.optuna_storage}, "experiment": "hand"}) + "\n")
    proc.stdin.flush()
    return proc


def test_the_child_records_a_run_from_plain_data_and_imports_neither_torch_nor_the_engine(
        platform_store: Store) -> None:
    """Nor pandas: mlflow is imported as mlflow-skinny runs it (0.35-0.4 s less on the tracked merge's path)."""
    proc = _start_child(platform_store)
    start = {"start_time": 1_000, "run_name": "hand", "tags": {"mergelab.role": "merge"},
             "params": {"method": "task_arithmetic", "n_experts": 2}, "config": {"method": "task_arithmetic"}}
    rec = {"start": start, "metrics": {"merge/seconds": 1.5}, "report": {"bytes_written": 10},
           "merged_uri": "file:///nowhere", "end_run": True}
    out, err = proc.communicate(json.dumps(rec) + "\n", timeout=300)
    assert proc.returncode == 0, err
    opened, answer = (json.loads(line) for line in out.splitlines())
    assert set(opened) == {"open"} and set(answer) == {"run_id", "link"}
    assert json.loads(err.rsplit("MODULES ", 1)[1]) == []
    run = platform_store.client().get_run(answer["run_id"])
    assert run.info.status == "FINISHED" and run.info.start_time == 1_000 and run.info.run_name == "hand"
    assert run.data.params == {"method": "task_arithmetic", "n_experts": "2"}
    assert run.data.metrics == {"merge/seconds": 1.5} and run.data.tags["mergelab.weights"] == "present"


def test_the_end_of_its_input_before_a_record_ends_the_child_without_a_run(platform_store: Store) -> None:
    proc = _start_child(platform_store)
    out, err = proc.communicate("", timeout=300)
    assert proc.returncode == 0, err
    client = platform_store.client()
    exp = client.get_experiment_by_name("hand")
    assert exp is None or client.search_runs([exp.experiment_id]) == []


def _cli(tmp_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`mergelab merge` (:data:`_CLI`) of two tiny experts into ``tmp_path / "out"``."""
    base, experts = make_expert_family(tmp_path / "zoo", n=2)
    y = tmp_path / "m.yaml"
    y.write_text(yaml.safe_dump({"base": str(base), "experts": [str(e) for e in experts], "method": "ties",
                                 "policy": "llama", "device": "cpu"}))
    env = {**os.environ, "MERGELAB_TRACK": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-c", _CLI, "merge", str(y), "--out", str(tmp_path / "out"),
                             "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# `mergelab merge` noting whether mlflow is imported when the merge ends and when the command ends; with SLOW_S the
# merge sleeps that long before each tensor, so that a signal lands inside it
_CLI = """
import atexit, os, sys, time
from mergelab.engine import loop
from mergelab.platform.cli import main

_run, _one = loop._run_merge, loop._merge_one
def run(*a, **kw):
    r = _run(*a, **kw)
    print("mlflow imported when the merge ended:", "mlflow" in sys.modules)
    return r
def one(*a, **kw):
    time.sleep(float(os.environ.get("SLOW_S", "0")))
    return _one(*a, **kw)
loop._run_merge, loop._merge_one = run, one
atexit.register(lambda: print("mlflow imported at the end:", "mlflow" in sys.modules))
sys.exit(main())
"""


def test_the_merge_command_never_imports_mlflow(platform_store: Store, tmp_path: Path) -> None:
    proc = _cli(tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "mlflow imported when the merge ended: False" in out and "mlflow imported at the end: False" in out, out
    client = platform_store.client()
    (run,) = client.search_runs([platform_store.experiment_id("mergelab", client)])
    assert run.info.status == "FINISHED" and f"MLflow run {run.info.run_id}" in out
    assert f"/runs/{run.info.run_id}?workflowType=machine_learning" in out


def test_an_unopenable_store_exits_1_with_one_line_naming_it_and_no_output(tmp_path: Path) -> None:
    proc = _cli(tmp_path, {"MLFLOW_TRACKING_URI": "nosuchscheme://nowhere",
                           "MERGELAB_ROOT": str(tmp_path / "mlruns")})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, (out, err)
    assert "nosuchscheme://nowhere" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def _wait_for_the_merge(proc: subprocess.Popen[str], tmp_path: Path) -> None:
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.tmp-*")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the merge never started (exit {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.1)


def test_sigterm_during_the_merge_is_a_killed_run_and_exit_143(platform_store: Store, tmp_path: Path) -> None:
    proc = _cli(tmp_path, {"SLOW_S": "1"})
    _wait_for_the_merge(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    client = platform_store.client()
    (run,) = client.search_runs([platform_store.experiment_id("mergelab", client)])
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["mergelab.error"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_parent_killed_with_9_leaves_no_run_and_no_child(platform_store: Store, tmp_path: Path) -> None:
    proc = _cli(tmp_path, {"SLOW_S": "1"})
    _wait_for_the_merge(proc, tmp_path)
    children = [c for c in psutil.Process(proc.pid).children() if MODULE in " ".join(c.cmdline())]
    assert len(children) == 1
    proc.kill()
    proc.communicate(timeout=60)
    gone, alive = psutil.wait_procs(children, timeout=120)
    assert alive == []
    client = platform_store.client()
    exp = client.get_experiment_by_name("mergelab")
    assert exp is None or client.search_runs([exp.experiment_id]) == []


def test_bad_input_exits_2_and_the_early_child_creates_no_database(tmp_path: Path) -> None:
    """`mergelab merge` starts its tracking child before checking its input; bad input ends it before it opens the
    store."""
    y = tmp_path / "m.yaml"
    y.write_text(yaml.safe_dump({"base": str(tmp_path / "missing"), "experts": [str(tmp_path / "missing2")],
                                 "method": "task_arithmetic", "policy": "llama", "device": "cpu"}))
    env = {**os.environ, "MERGELAB_TRACK": "1", "OMP_NUM_THREADS": "1", "MERGELAB_ROOT": str(tmp_path / "mlruns")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "mergelab.platform.cli", "merge", str(y), "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() and not (tmp_path / "out").exists()


def test_mlflow_imported_without_pandas_leaves_pandas_importable() -> None:
    code = ("import sys; from mergelab.platform.track_child import import_mlflow_without_pandas as f; f(); "
            "assert 'mlflow' in sys.modules and 'pandas' not in sys.modules; "
            "import pandas, mlflow; print(pandas.DataFrame({'a': [1]}).shape, mlflow.MlflowClient.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(1,", "1)", "MlflowClient"]
