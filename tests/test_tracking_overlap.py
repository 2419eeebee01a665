"""Tracked merges with an explicit output recorded in this process (the path of a process that has imported mlflow
already, as these tests have: the store opens and the run is made before the merge). A failing merge is a FAILED run;
a store that cannot be opened fails the call, and with ``overwrite`` the directory that was at ``out`` comes back
untouched; ``mergelab merge`` leaves mlflow to its child process. The child-process path itself (issue 22: tracking
cost more than merging): tests/test_track_child.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest_platform import make_expert_family

from mergelab.engine import MergeError, MergeRecipe, run_merge
from mergelab.platform.merge_run import tracked_merge
from mergelab.platform.store import Store, local_path


def _recipe(tmp_path: Path) -> MergeRecipe:
    base, experts = make_expert_family(tmp_path / "zoo", n=2)
    return MergeRecipe.build(base=base, experts=experts, method="task_arithmetic", policy="llama", device="cpu")


def _old_output(out: Path) -> None:
    out.mkdir()
    (out / "keep.txt").write_text("the previous merge")


def test_a_failing_merge_is_still_a_failed_run_and_overwrite_keeps_the_old_output(platform_store: Store,
                                                                                    tmp_path: Path) -> None:
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    _old_output(out)

    def broken(r: MergeRecipe, target: Path, **kw: Any) -> Any:
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        tracked_merge(recipe, store=platform_store, experiment="unit", out=out, overwrite=True, merge_fn=broken)
    client = platform_store.client()
    (run,) = client.search_runs([platform_store.experiment_id("unit", client)])
    assert run.info.status == "FAILED" and "disk on fire" in run.data.tags["mergelab.error"]
    assert run.data.params["recipe.sha"] == recipe.digest  # what was attempted is recorded
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and not list(tmp_path.glob(".out.*"))


def test_a_failure_after_the_merge_removes_the_new_output_and_puts_the_old_back(platform_store: Store,
                                                                                tmp_path: Path) -> None:
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    _old_output(out)

    def broken_eval(model_dir: Path, tasks: Any, split: str, on_task: Any) -> Any:
        assert list(Path(model_dir).glob("*.safetensors"))  # the new merge is in place while it is evaluated
        raise RuntimeError("evaluator exploded")

    with pytest.raises(RuntimeError, match="evaluator exploded"):
        tracked_merge(recipe, store=platform_store, experiment="unit", out=out, overwrite=True, tasks=["vqa"],
                      evaluator=broken_eval)
    client = platform_store.client()
    (run,) = client.search_runs([platform_store.experiment_id("unit", client)])
    assert run.info.status == "FAILED" and run.data.tags["mergelab.weights"] == "deleted"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and not list(tmp_path.glob(".out.*"))


def test_a_store_that_cannot_be_opened_fails_and_leaves_nothing(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    bad = Store(tracking_uri="nosuchscheme://nowhere", artifact_root=None, optuna_storage="sqlite://")
    with pytest.raises(Exception, match="nosuchscheme"):
        tracked_merge(recipe, store=bad, out=tmp_path / "new")
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.*"))
    _old_output(tmp_path / "out")
    with pytest.raises(Exception, match="nosuchscheme"):
        tracked_merge(recipe, store=bad, out=tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".out.*"))


def test_without_an_output_the_run_comes_first(platform_store: Store, tmp_path: Path) -> None:
    """A campaign trial's weights go into its run's artifact directory: the run exists during the merge."""
    recipe = _recipe(tmp_path)
    seen: list[int] = []

    def merge_fn(r: MergeRecipe, out: Path, **kw: Any) -> Any:
        client = platform_store.client()
        seen.append(len(client.search_runs([platform_store.experiment_id("unit", client)])))
        return run_merge(r, out, **kw)

    tm = tracked_merge(recipe, store=platform_store, experiment="unit", merge_fn=merge_fn)
    assert seen == [1] and tm.merged_path == local_path(platform_store.client().get_run(tm.run_id).info.artifact_uri
                                                         ) / "merged"


# `mergelab merge` with a hook that notes whether the main thread imported mlflow before the merge started
_MAIN_THREAD_IMPORTS = """
import builtins, sys, threading

from mergelab.engine import loop

early = []
_import = builtins.__import__


def hooked(name, *a, **kw):
    if name.split(".")[0] == "mlflow" and threading.current_thread() is threading.main_thread():
        early.append(name)
    return _import(name, *a, **kw)


_run = loop._run_merge


def run(*a, **kw):
    print("mlflow imported by the main thread before the merge:", early[:3])
    return _run(*a, **kw)


builtins.__import__, loop._run_merge = hooked, run
from mergelab.platform.cli import main
sys.exit(main())
"""


def test_the_cli_leaves_the_mlflow_import_to_the_background(platform_store: Store, tmp_path: Path) -> None:
    """Importing mlflow takes seconds: a module that imports it on the CLI's way to the merge undoes the overlap."""
    import os
    import subprocess
    import sys

    import yaml

    base, experts = make_expert_family(tmp_path / "zoo", n=2)
    y = tmp_path / "m.yaml"
    y.write_text(yaml.safe_dump({"base": str(base), "experts": [str(e) for e in experts],
                                 "method": "task_arithmetic", "policy": "llama", "device": "cpu"}))
    env = {**os.environ, "MERGELAB_TRACK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _MAIN_THREAD_IMPORTS, "merge", str(y), "--out", str(tmp_path / "o"),
                           "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mlflow imported by the main thread before the merge: []" in proc.stdout, proc.stdout
    assert "MLflow run " in proc.stdout


def test_overwriting_a_link_replaces_the_link_and_records_the_new_directory(platform_store: Store,
                                                                            tmp_path: Path) -> None:
    recipe, out, elsewhere = _recipe(tmp_path), tmp_path / "out", tmp_path / "elsewhere"
    _old_output(elsewhere)
    out.symlink_to(elsewhere, target_is_directory=True)
    tm = tracked_merge(recipe, store=platform_store, experiment="unit", out=out, overwrite=True)
    assert not out.is_symlink() and list(out.glob("*.safetensors"))
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]  # what the link pointed at is not touched
    run = platform_store.client().get_run(tm.run_id)
    assert run.data.tags["mergelab.merged_uri"] == out.resolve().as_uri() != elsewhere.resolve().as_uri()
    assert not list(tmp_path.glob(".out.*"))


def test_a_merge_refused_because_out_appeared_meanwhile_leaves_the_other_output_alone(platform_store: Store,
                                                                                       tmp_path: Path) -> None:
    """Two merges into the same new ``out``: both pass the checks, the first renames its output into place, the
    engine of the second refuses to replace it (MergeError, nothing written). The second call used to remove the
    directory at ``out`` on its way out: the first merge's output."""
    recipe, out = _recipe(tmp_path), tmp_path / "out"

    def loses_the_race(r: MergeRecipe, target: Path, **kw: Any) -> Any:
        _old_output(target)  # the other merge's output, renamed into place while this one ran
        raise MergeError(f"out: {target} already exists (pass overwrite=True / --overwrite to replace it)")

    with pytest.raises(MergeError, match="already exists"):
        tracked_merge(recipe, store=platform_store, experiment="unit", out=out, merge_fn=loses_the_race)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    client = platform_store.client()
    (run,) = client.search_runs([platform_store.experiment_id("unit", client)])
    assert run.info.status == "FAILED" and run.data.tags.get("mergelab.weights") != "deleted"
