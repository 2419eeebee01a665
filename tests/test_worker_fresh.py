"""``mergelab worker`` has no ``--fresh`` (decided, issue 22): workers share one study, and a worker that deleted it
at its start would throw away the trials the others are running (compose starts N replicas at once). Starting over
is one ``mergelab campaign CONFIG --fresh`` (``--n-trials 0`` resets without working a trial); a worker refused a
changed study says so and deletes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from click.testing import CliRunner
from conftest_platform import CAMPAIGN_TASKS, WeightEvaluator, make_expert_family

from mergelab.platform.campaign import run_campaign
from mergelab.platform.campaign_config import load_campaign
from mergelab.platform.cli import main
from mergelab.platform.store import Store
from mergelab.platform.worker import run_worker


def _campaign(tmp_path: Path, high: float) -> tuple[Path, WeightEvaluator]:
    base, experts = make_expert_family(tmp_path / "zoo", n=3)
    raw: dict[str, Any] = {
        "name": "camp", "base": str(base), "method": "task_arithmetic", "policy": "llama", "device": "cpu",
        "experts": [{"path": str(p), "name": t, "score": 100.0} for p, t in zip(experts, CAMPAIGN_TASKS, strict=True)],
        "search_space": {"lam": {"type": "float", "low": 0.1, "high": high}}, "eval": {"tasks": CAMPAIGN_TASKS},
        "sampler": {"name": "random", "seed": 0}, "budget": {"n_trials": 2}, "registry": {"register": "none"},
    }
    path = tmp_path / f"camp-{high}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, WeightEvaluator(base, dict(zip(CAMPAIGN_TASKS, experts, strict=True)))


def test_a_worker_on_a_changed_study_is_refused_and_campaign_fresh_resets_it_once(platform_store: Store,
                                                                                 tmp_path: Path) -> None:
    first, ev = _campaign(tmp_path, 1.2)
    run_campaign(load_campaign(first), store=platform_store, evaluator=ev, n_trials=1)
    changed, _ = _campaign(tmp_path, 2.0)
    with pytest.raises(ValueError, match=r"exists with another search_space.*mergelab campaign CONFIG --fresh"):
        run_worker(changed, store=platform_store, evaluator=ev)
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    assert len(study.trials) == 1  # the refusal deleted nothing
    assert "--fresh" not in {p.name for p in main.get_command(None, "worker").params}  # type: ignore[union-attr]

    reset = run_campaign(load_campaign(changed), store=platform_store, evaluator=ev, fresh=True, n_trials=0)
    assert reset.n_complete == 0
    res = run_worker(changed, store=platform_store, evaluator=ev)
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    assert res.n_complete == 2 and len(study.trials) == 2
    assert all(0.1 <= t.params["lam"] <= 2.0 for t in study.trials)


def test_the_worker_command_documents_why_it_has_no_fresh() -> None:
    out = CliRunner().invoke(main, ["worker", "--help"]).output
    assert "mergelab campaign CONFIG --fresh" in out
