"""A weighted objective: ``objective.weights`` combine several val metrics into one (``val/weighted``), a
single-objective study whose value is the weighted mean, logged on each trial's run and on its registered version."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest_platform import WeightEvaluator, tiny_campaign

from mergelab.platform import registry as reg
from mergelab.platform.campaign import RUN_ATTR, run_campaign, search_signature
from mergelab.platform.campaign_config import WEIGHTED, CampaignConfig, ObjectiveConfig
from mergelab.platform.store import Store

METRICS = ["val/vqa", "val/geometry", "val/ocr"]


def test_weights_combine_the_metrics_into_one_weighted_mean() -> None:
    obj = ObjectiveConfig(metrics=METRICS, weights=[2, 1, 1])
    assert obj.names == [WEIGHTED] and obj.directions == ["maximize"]
    assert obj.values({"val/vqa": 80.0, "val/geometry": 40.0, "val/ocr": 20.0}) == [pytest.approx(55.0)]
    assert ObjectiveConfig(metrics=METRICS).values({m: 1.0 for m in METRICS}) == [1.0, 1.0, 1.0]
    with pytest.raises(KeyError, match="val/ocr"):
        obj.values({"val/vqa": 1.0, "val/geometry": 1.0})


@pytest.mark.parametrize(("over", "match"), [
    ({"weights": [1, 1]}, "3 objective metrics but 2 weights"),
    ({"weights": [1, -1, 1]}, ">= 0"),
    ({"weights": [0, 0, 0]}, "not all 0"),
    ({"weights": [1, 1, 1], "directions": ["maximize"] * 3}, "one weighted objective but 3 directions"),
])
def test_bad_weights_are_refused(over: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ObjectiveConfig(metrics=METRICS, **over)


def test_a_weighted_campaign_is_single_objective(tmp_path: Path) -> None:
    cfg, _ = tiny_campaign(tmp_path, objective={"metrics": METRICS, "weights": [1, 1, 1]})
    assert not cfg.multi_objective
    with pytest.raises(ValueError, match="nsga2 is for multi-objective"):
        CampaignConfig.model_validate({**cfg.model_dump(), "sampler": {"name": "nsga2"}})
    with pytest.raises(ValueError, match="pruning works with a single objective metric"):
        CampaignConfig.model_validate({**cfg.model_dump(), "pruning": {"pruner": "median"}})
    plain, _ = tiny_campaign(tmp_path, objective={"metrics": METRICS})
    assert "weights" not in search_signature(plain)  # studies recorded before weights existed still resume
    assert search_signature(cfg)["weights"] == [1, 1, 1]


def test_weighted_campaign_optimises_and_logs_the_weighted_mean(platform_store: Store, tmp_path: Path) -> None:
    cfg, ev = tiny_campaign(tmp_path, objective={"metrics": METRICS, "weights": [3, 1, 0]},
                            budget={"n_trials": 2}, coefficients={"low": 0.5, "high": 1.5},
                            registry={"name": "camp-model", "register": "all"})
    res = run_campaign(cfg, store=platform_store, evaluator=ev)
    assert isinstance(ev, WeightEvaluator) and res.n_complete == 2
    study = optuna.load_study(study_name=cfg.study_name, storage=platform_store.optuna_storage)
    assert len(study.directions) == 1
    client = platform_store.client()
    for t in study.trials:
        s = t.user_attrs["val_scores"]
        assert t.values[0] == pytest.approx((3 * s["vqa"] + s["geometry"]) / 4)
        assert client.get_run(t.user_attrs[RUN_ATTR]).data.metrics[WEIGHTED] == pytest.approx(t.values[0], abs=1e-4)
    versions = reg.campaign_versions(client, "camp-model", cfg.name)
    assert len(versions) == 2 and all(v.tags["objective"] == WEIGHTED for v in versions)
    assert {round(float(v.tags[WEIGHTED]), 3) for v in versions} == {round(t.values[0], 3) for t in study.trials}
    parent = client.get_run(res.parent_run_id)
    assert parent.data.metrics[f"best/{WEIGHTED}"] == pytest.approx(res.best["values"][0])
