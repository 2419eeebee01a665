"""The CLI's output is quiet by default (issue 22): a tracked `mergelab merge` prints its run, where the merge went
and one line each for the method, the tensors and the costs, under one progress bar; MLflow's INFO lines (a fresh
store's "Creating initial MLflow database tables..."), Optuna's per-trial lines and the libraries' warnings are
not shown. ``-v`` shows all of them and the full merge summary. Run in subprocesses: the libraries' log handlers
hold the real stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest_platform import make_expert_family

from mergelab.platform.store import Store

REPO = Path(__file__).resolve().parents[1]

_CLI = "import sys; from mergelab.platform.cli import main; sys.exit(main())"

# `mergelab campaign` on the tiny campaign, scored by the weight evaluator instead of generating with a model
_CAMPAIGN = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import yaml
from conftest_platform import tiny_campaign
from mergelab.platform import campaign
from mergelab.platform.cli import main

work = Path(sys.argv[2])
cfg, ev = tiny_campaign(work, name=sys.argv[3], budget={"n_trials": 3})


class WeightScored(campaign.HFEvaluator):
    def __new__(cls, **kw):
        return ev


campaign.HFEvaluator = WeightScored
(work / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
sys.exit(main([*sys.argv[4:], "campaign", str(work / "c.yaml")]))
"""


def _run(args: list[str], root: Path, code: str = _CLI) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MERGELAB_VERBOSE", "MLFLOW_LOGGING_LEVEL", "MLFLOW_TRACKING_URI", "MERGELAB_TRACK")}
    env.update(MERGELAB_ROOT=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _root(store: Store) -> Path:
    """The root of an embedded store (``MERGELAB_ROOT``)."""
    return Path(store.tracking_uri.removeprefix("sqlite:///")).parent


def _bars(stderr: str) -> set[str]:
    """The progress bars drawn (by description) and every other stderr line."""
    return {line.split(":")[0].strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()}


def test_a_tracked_merge_prints_six_lines_and_one_bar_and_v_prints_everything(platform_store: Store,
                                                                             tmp_path: Path) -> None:
    base, experts = make_expert_family(tmp_path / "zoo", n=2)
    recipe = tmp_path / "m.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(base), "experts": [str(e) for e in experts], "method": "ties",
                                      "policy": "llama", "device": "cpu"}))
    quiet = _run(["merge", str(recipe), "--out", str(tmp_path / "a")], tmp_path / "fresh-store")
    lines = quiet.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["MLflow", "in", "merged", "method", "tensors:", "read"], lines
    assert _bars(quiet.stderr) == {"merge"}, quiet.stderr  # one bar; no "INFO mlflow.store.db.utils: Creating..."
    loud = _run(["-v", "merge", str(recipe), "--out", str(tmp_path / "b")], _root(platform_store))
    assert "slowest tensors:" in loud.stdout and "accounted: base" in loud.stdout and "policy llama" in loud.stdout


def test_a_campaign_prints_its_summary_without_optuna_lines_or_warnings(platform_store: Store, tmp_path: Path) -> None:
    root = _root(platform_store)
    quiet = _run([str(REPO / "tests"), str(tmp_path / "q"), "camp"], root, code=_CAMPAIGN)
    lines = quiet.stdout.splitlines()
    assert lines[0].startswith("campaign camp: 3 complete") and lines[2].startswith("best trial"), lines
    assert all(line.startswith("registered camp v") for line in lines[3:]), lines
    assert "Trial 0 finished" not in quiet.stderr and "[I " not in quiet.stderr and "Warning" not in quiet.stderr, \
        quiet.stderr
    loud = _run([str(REPO / "tests"), str(tmp_path / "v"), "loud", "-v"], root, code=_CAMPAIGN)
    assert "Trial 0 finished" in loud.stderr
