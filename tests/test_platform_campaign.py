"""Campaigns: a real Optuna RDB study on its own SQLite file, trials as nested MLflow runs, crash-in-trial failed and
the campaign goes on, top-k registration without dangling versions, resume, heartbeat, val-only objective."""

from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
import pytest
from conftest_platform import WeightEvaluator, tiny_campaign

from mergelab.platform import promotion
from mergelab.platform import registry as reg
from mergelab.platform.campaign import RUN_ATTR, SKIP_ATTR, run_campaign
from mergelab.platform.campaign_config import CampaignConfig, load_campaign
from mergelab.platform.store import Store, local_path

TASKS = ["vqa", "geometry", "ocr"]


def _campaign(tmp_path: Path, **over: object) -> tuple[CampaignConfig, WeightEvaluator]:
    return tiny_campaign(tmp_path, **{"coefficients": {"low": 0.5, "high": 1.5}, "sampler": {"name": "tpe", "seed": 0},
                                    "budget": {"n_trials": 4},
                                    "registry": {"name": "camp-model", "register": "top_k", "top_k": 2}, **over})


def _crash_on_call(n: int):  # noqa: ANN202
    from mergelab.engine import run_merge

    calls = {"n": 0}

    def merge_fn(recipe, out, **kw):  # noqa: ANN001, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("GPU fell off the bus")
        return run_merge(recipe, out, **kw)

    return merge_fn


def test_sigterm_in_a_trial_ends_its_run_killed_and_its_trial_failed(platform_store: Store, tmp_path: Path) -> None:
    """A worker stopped by SIGTERM (``docker compose stop``), as every ``mergelab`` command handles it: the trial in
    flight is FAIL in Optuna and KILLED in MLflow, with no partial weights, before the interrupt ends the campaign
    (no heartbeat grace period needed)."""
    import os
    import signal

    from mergelab.engine import run_merge
    from mergelab.platform.cli import raise_on_sigterm

    cfg, ev = _campaign(tmp_path)
    calls = {"n": 0}

    def merge_fn(recipe, out, **kw):  # noqa: ANN001, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded; acted on at the engine's first safe point
        return run_merge(recipe, out, **kw)

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert raise_on_sigterm()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            run_campaign(cfg, store=platform_store, evaluator=ev, merge_fn=merge_fn)
    finally:
        signal.signal(signal.SIGTERM, previous)
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    client = platform_store.client()
    run = client.get_run(study.trials[1].user_attrs[RUN_ATTR])
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["mergelab.error"]
    assert not (local_path(run.info.artifact_uri) / "merged").exists()


def test_campaign_nests_trials_survives_crash_registers_top_k_and_resumes(platform_store: Store,
                                                                          tmp_path: Path) -> None:
    cfg, ev = _campaign(tmp_path)
    res = run_campaign(cfg, store=platform_store, evaluator=ev, merge_fn=_crash_on_call(3))
    client = platform_store.client()
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert (res.n_complete, res.n_failed) == (3, 1)
    # every trial is a child run of the campaign run; the crashed one is FAILED in MLflow too
    exp = platform_store.experiment_id("mergelab", client)
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert len(children) == 4
    by_trial = {int(r.data.tags["mergelab.trial"]): r for r in children}
    assert by_trial[2].info.status == "FAILED" and "GPU fell off" in by_trial[2].data.tags["mergelab.error"]
    assert all(by_trial[i].info.status == "FINISHED" for i in (0, 1, 3))
    assert {t.user_attrs[RUN_ATTR] for t in study.trials} == {r.info.run_id for r in children}
    # the sampler saw val only; params of the trial are logged
    assert all("optuna.lam" in by_trial[i].data.params and "optuna.coef.vqa" in by_trial[i].data.params
               for i in (0, 1, 3))
    # top-2 registered by val/average, zero-copy into the run's artifact dir; the rest's weights deleted
    versions = reg.campaign_versions(client, "camp-model", "camp")
    assert len(versions) == 2
    best2 = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: -t.values[0])[:2]
    assert {int(v.tags["trial"]) for v in versions} == {t.number for t in best2}
    for v in versions:
        src = local_path(v.source)
        assert src.exists() and src == local_path(client.get_run(v.run_id).info.artifact_uri) / "merged"
        assert float(v.tags["val/average"]) == pytest.approx(by_trial[int(v.tags["trial"])].data.metrics[
            "val/average"], abs=1e-3)
        assert "hp.lam" in v.tags and "sha256" in v.description and int(v.tags["val.items"]) == 9
        assert not any(k.startswith("test/") for k in v.tags)  # registration logs what the search saw: val
        assert v.tags["mergelab.score"] and json.loads(v.tags["eval.tasks"]) == TASKS
    registered_runs = {v.run_id for v in versions}
    for r in children:
        merged = local_path(r.info.artifact_uri) / "merged"
        assert merged.exists() == (r.info.run_id in registered_runs), r.data.tags["mergelab.trial"]
    # no test metric before promotion; val only for the sampler
    assert not any("test/average" in r.data.metrics for r in children)
    # the parent got the summary
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["campaign/n_complete"] == 3
    assert parent.data.tags["best_trial"] == str(best2[0].number)
    files = {f.path for f in client.list_artifacts(res.parent_run_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/optimization_history.html",
            "optuna/param_importances.png", "optuna/parallel_coordinate.html"} <= files
    table = json.loads((local_path(parent.info.artifact_uri) / "trials.json").read_text())
    assert len(table["data"]) == 4
    page = (local_path(parent.info.artifact_uri) / "optuna" / "optimization_history.html").read_text()
    assert 'src="https://cdn.plot.ly' not in page and len(page) > 1_000_000  # plotly inline: renders offline
    series = client.get_metric_history(res.parent_run_id, "trials/val/average")  # step = trial number
    assert [(m.step, round(m.value, 6)) for m in series] == [(t.number, round(t.values[0], 6)) for t in study.trials
                                                              if t.state.name == "COMPLETE"]

    # resume: same study, same parent run, budget raised to 5 -> exactly 1 more trial
    cfg5 = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"n_trials": 5})})
    res2 = run_campaign(cfg5, store=platform_store, evaluator=ev)
    assert res2.parent_run_id == res.parent_run_id
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    assert len(study.trials) == 5 and res2.n_complete == 4
    versions = reg.campaign_versions(client, "camp-model", "camp")
    assert len(versions) == 2 and all(local_path(v.source).exists() for v in versions)
    # the comparison table is replaced, not appended to, when the campaign is summarised again
    table = json.loads((local_path(parent.info.artifact_uri) / "trials.json").read_text())
    assert [row[0] for row in table["data"]] == list(range(5))
    steps = [m.step for m in client.get_metric_history(res.parent_run_id, "trials/val/average")]
    assert steps == sorted(set(steps)) and len(steps) == 4  # summarised again: one point per trial, no repeats
    # a third run with the budget spent does nothing
    res3 = run_campaign(cfg5, store=platform_store, evaluator=ev, summarize=False)
    assert len(optuna.load_study(study_name="camp", storage=platform_store.optuna_storage).trials) == 5
    assert res3.n_complete == 4


def test_test_split_objective_is_refused(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("name: c\nbase: b\nexperts: [{path: e}]\nmethod: ties\nobjective: {metrics: [test/average]}\n")
    with pytest.raises(ValueError, match=r"c.yaml: objective.metrics: .*not on the val split"):
        load_campaign(y)
    y.write_text("name: c\nbase: b\nexperts: [{path: e}]\nmethod: ties\neval: {split: test}\n")
    with pytest.raises(ValueError, match=r"eval.split: .*refused"):
        load_campaign(y)
    y.write_text("name: c\nbase: b\nexperts: [{path: e}]\nmethod: ties\n"
                 "search_space: {lam: {type: float, low: 2, high: 1}}\n")
    with pytest.raises(ValueError, match=r"search_space.lam"):
        load_campaign(y)
    y.write_text("name: c\nbase: b\nexperts: [{path: e}]\nmethod: ties\nsearch_space: {nope: {type: int, low: 1,"
                 " high: 2}}\n")
    cfg = load_campaign(y)
    assert cfg.base == str(tmp_path / "b") and cfg.registry.name == "c" and cfg.registry.top_k == 3
    with pytest.raises(ValueError, match=r"\['nope'\] are not hyperparameters of 'ties'"):
        run_campaign(cfg, store=Store.resolve(tmp_path / "mlruns"))


def test_killed_worker_trial_is_failed_by_heartbeat(platform_store: Store, tmp_path: Path) -> None:
    cfg, ev = _campaign(tmp_path, budget={"n_trials": 2}, tracking={"heartbeat_interval": 1, "grace_period": 1},
                        registry={"register": "none"})
    client = platform_store.client()
    # a worker that started trial 0, opened its MLflow run, and died without a word
    storage = optuna.storages.RDBStorage(platform_store.optuna_storage, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name="camp", storage=storage, direction="maximize")
    dead = study.ask()
    run = client.create_run(platform_store.experiment_id("mergelab", client), tags={"mergelab.trial": "0"})
    dead.set_user_attr(RUN_ATTR, run.info.run_id)
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)
    res = run_campaign(cfg, store=platform_store, evaluator=ev)
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    # the lost trial does not count against the budget: the campaign still ends with 2 complete trials
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert "no heartbeat" in client.get_run(run.info.run_id).data.tags["mergelab.error"]
    assert res.n_complete == 2 and reg.campaign_versions(client, "camp-model", "camp") == []


def test_zoo_reference_resolves_base_experts_and_reference_scores(tmp_path: Path) -> None:
    from mergelab.platform.campaign import recipe_template

    models = {"seed0/base": {"kind": "base"}, "seed0/lora/vqa": {"kind": "lora", "task": "vqa",
                                                                 "scores": {"shifted": {"vqa": 66.6}}},
              "seed0/lora/ocr": {"kind": "lora", "task": "ocr"}, "seed0/full/vqa": {"kind": "full", "task": "vqa"}}
    (tmp_path / "manifest.json").write_text(json.dumps({"models": models}))
    cfg = CampaignConfig.model_validate({"name": "z", "method": "ties", "experts": {"zoo": str(tmp_path),
                                         "kind": "lora"}, "eval": {"tasks": ["vqa", "ocr", "chart"]}})
    recipe, ref = recipe_template(cfg)
    assert recipe.base == str(tmp_path / "seed0/base") and recipe.method == "ties"
    assert [(e.name, e.path) for e in recipe.experts] == [("vqa", str(tmp_path / "seed0/lora/vqa")),
                                                   ("ocr", str(tmp_path / "seed0/lora/ocr"))]
    assert ref == {"vqa": 66.6}
    bad = cfg.model_copy(update={"experts": cfg.experts.model_copy(update={"seed": 3})})
    with pytest.raises(ValueError, match=r"manifest.json: no seed3/base"):
        recipe_template(bad)


def test_multi_objective_campaign_registers_all_and_logs_pareto_front(platform_store: Store, tmp_path: Path) -> None:
    cfg, ev = _campaign(tmp_path, objective={"metrics": ["val/average", "val/worst_task"]}, sampler={"name": "nsga2"},
                        budget={"n_trials": 3}, coefficients=None,
                        registry={"name": "camp-model", "register": "all"})
    res = run_campaign(cfg, store=platform_store, evaluator=ev)
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"] and res.n_complete == 3
    for t in study.trials:
        assert t.values[1] == pytest.approx(min(t.user_attrs["val_scores"].values()), abs=1e-9)
    client = platform_store.client()
    assert len(reg.campaign_versions(client, "camp-model", "camp")) == 3
    files = {f.path for f in client.list_artifacts(res.parent_run_id, "optuna")}
    assert "optuna/pareto_front.html" in files and "optuna/optimization_history.png" in files
    with pytest.raises(ValueError, match="directions"):  # the same study cannot be re-opened single-objective
        run_campaign(cfg.model_copy(update={"objective": cfg.objective.model_copy(
            update={"metrics": ["val/average"], "directions": ["maximize"]})}), store=platform_store, evaluator=ev)


@pytest.mark.slow
def test_campaign_end_to_end_on_the_tiny_zoo_then_promote_and_load_champion(platform_store: Store,
                                                                             tmp_path: Path, tiny_zoo: Path) -> None:
    """Real pieces only: the tiny benchmark zoo (LoRA experts), the streaming engine, the evaluators on written
    val/test data, a real study; then `promote` on the test split and `models:/NAME@champion` loads."""
    import torch

    from mergelab.bench.data import write_split
    from mergelab.bench.tasks import generate

    torch.set_num_threads(1)
    tasks = ["vqa", "ocr"]
    for t in tasks:
        for split in ("val", "test"):
            write_split(generate(t, "shifted", split, n=6), tmp_path / "data")
    cfg = CampaignConfig.model_validate({
        "name": "e2e", "experts": {"zoo": str(tiny_zoo), "kind": "lora", "tasks": tasks}, "method": "task_arithmetic",
        "device": "cpu", "search_space": {"lam": {"type": "float", "low": 0.2, "high": 1.0}},
        "sampler": {"name": "random"}, "budget": {"n_trials": 2},
        "eval": {"tasks": tasks, "data_root": str(tmp_path / "data"), "limit": 6, "batch_size": 6},
        "registry": {"register": "best"}})
    res = run_campaign(cfg, store=platform_store)
    assert res.n_complete == 2 and len(res.registered) == 1
    client = platform_store.client()
    run = client.get_run(res.best["run_id"])
    assert {"val/vqa/accuracy", "val/ocr/accuracy", "val/average"} <= set(run.data.metrics)
    assert "test/average" not in run.data.metrics  # test is computed at promotion
    table = json.loads((local_path(run.info.artifact_uri) / "predictions" / "val.json").read_text())
    assert len(table["data"]) == 12
    from mergelab.platform.evaluation import HFEvaluator

    d = promotion.promote("e2e", campaign="e2e", store=platform_store,
                    evaluator=HFEvaluator(data_root=str(tmp_path / "data"), limit=6, batch_size=6, device="cpu"))
    assert d.decision == "champion" and set(d.candidate_scores) == set(tasks)
    test_table = json.loads((local_path(run.info.artifact_uri) / "predictions" / "test.json").read_text())
    assert len(test_table["data"]) == 12  # re-evaluated at promotion: replaced, not appended
    model, processor = reg.load_registered(platform_store, "models:/e2e@champion")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration" and processor is not None


def test_workers_in_threads_share_the_study_and_run_each_trial_once(platform_store: Store, tmp_path: Path) -> None:
    """`mergelab worker` attaches to the campaign's study: two workers (threads here; processes on PostgreSQL in
    test_scaleout) finish the budget, each trial once, every run nested under the one campaign run."""
    import threading

    import yaml

    from mergelab.platform.worker import run_worker

    cfg, ev = _campaign(tmp_path, budget={"n_trials": 4},
                        registry={"name": "camp-model", "top_k": 2, "evaluate_test": False})
    first = run_campaign(cfg, store=platform_store, evaluator=ev, n_trials=1)
    y = tmp_path / "camp.yaml"
    y.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json(by_alias=True))))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            run_worker(y, store=platform_store, evaluator=ev)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    # two workers racing past the budget may each create a trial; the late one is marked skipped, not run
    counted = [t for t in study.trials if not t.user_attrs.get(SKIP_ATTR)]
    assert [t.number for t in counted] == list(range(4))
    assert all(t.state.name == "COMPLETE" for t in counted)
    assert all(t.state.name == "FAIL" and t.number >= 4 for t in study.trials if t not in counted)
    # the threads share a pid, yet their samplers are salted apart: no two trials propose the same point
    assert len({tuple(sorted(t.params.items())) for t in counted}) == 4
    client = platform_store.client()
    exp = platform_store.experiment_id("mergelab", client)
    runs = client.search_runs([exp])
    assert [r.info.run_id for r in runs if r.data.tags.get("mergelab.role") == "campaign"] == [first.parent_run_id]
    trials = [r for r in runs if r.data.tags.get("mergelab.role") == "trial"]
    assert sorted(int(r.data.tags["mergelab.trial"]) for r in trials) == list(range(4))
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {first.parent_run_id}
    versions = reg.campaign_versions(client, "camp-model", "camp")
    assert len(versions) == 2 and all(local_path(v.source).exists() for v in versions)


def test_salted_seeds_of_neighbouring_workers_and_resumes_never_coincide() -> None:
    """Two threads of one process with consecutive ids, resuming a study one trial apart, used to get one seed (the
    salt was added: pid * k + tid + n_before) and drew the same trial; the salt is now hashed."""
    from mergelab.platform.campaign_space import salted_seed

    assert salted_seed(7, ()) == 7 and salted_seed(7, (0,)) == 7  # no salt: the config's seed, reproducible
    seeds = {salted_seed(0, (pid, tid, n)) for pid in (100, 101) for tid in range(200, 210) for n in range(5)}
    assert len(seeds) == 2 * 10 * 5
    assert salted_seed(0, (100, 201, 1)) == salted_seed(0, (100, 201, 1))  # deterministic


@pytest.mark.parametrize("name,cls", [("tpe", "TPESampler"), ("random", "RandomSampler"), ("cmaes", "CmaEsSampler"),
                                      ("gp", "GPSampler"), ("grid", "GridSampler")])
def test_samplers_are_built_from_the_config(name: str, cls: str, tmp_path: Path) -> None:
    from mergelab.platform.campaign import make_pruner, make_sampler

    cfg = CampaignConfig.model_validate({
        "name": "s", "base": "b", "experts": [{"path": "e", "name": "vqa"}], "method": "task_arithmetic",
        "search_space": {"lam": {"type": "float", "low": 0.2, "high": 1.0, "step": 0.4}},
        "coefficients": {"low": 0.5, "high": 1.0, "step": 0.5}, "sampler": {"name": name, "seed": 1},
        "pruning": {"pruner": "median"}})
    sampler = make_sampler(cfg, ["vqa"])
    assert type(sampler).__name__ == cls
    assert type(make_pruner(cfg)).__name__ == "MedianPruner"
    if name == "grid":  # 3 lam values x 2 coefficient values
        study = optuna.create_study(sampler=sampler, direction="maximize")
        study.optimize(lambda t: t.suggest_float("lam", 0.2, 1.0, step=0.4) + t.suggest_float("coef.vqa", 0.5, 1.0,
                                                                                               step=0.5), n_trials=10)
        assert len(study.trials) == 6 and sampler.is_exhausted(study)


def test_grid_campaign_stops_when_the_grid_is_exhausted(platform_store: Store, tmp_path: Path) -> None:
    cfg, ev = _campaign(tmp_path, search_space={"lam": {"type": "categorical", "choices": [0.3, 0.6]}},
                        coefficients=None, sampler={"name": "grid"}, budget={"n_trials": 10},
                        registry={"name": "camp-model", "register": "none"})
    res = run_campaign(cfg, store=platform_store, evaluator=ev)
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    assert sorted(t.params["lam"] for t in study.trials) == [0.3, 0.6] and res.n_complete == 2
    assert res.registered == []
    # no version registered: every trial's weights were removed
    client = platform_store.client()
    for t in study.trials:
        run = client.get_run(t.user_attrs[RUN_ATTR])
        assert run.data.tags["mergelab.weights"] == "deleted"
        assert not (local_path(run.info.artifact_uri) / "merged").exists()


def test_pruned_trials_end_killed_without_weights(platform_store: Store, tmp_path: Path) -> None:
    cfg, ev = _campaign(tmp_path, coefficients=None, sampler={"name": "random", "seed": 3}, budget={"n_trials": 5},
                        pruning={"pruner": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
                        search_space={"lam": {"type": "float", "low": 0.02, "high": 0.6}},
                        registry={"name": "camp-model", "register": "best", "evaluate_test": False})
    res = run_campaign(cfg, store=platform_store, evaluator=ev)
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned, [(t.number, t.state.name, t.params, t.intermediate_values) for t in study.trials]
    assert res.n_pruned == len(pruned) and res.n_complete + res.n_pruned == 5
    client = platform_store.client()
    for t in pruned:
        run = client.get_run(t.user_attrs[RUN_ATTR])
        assert run.info.status == "KILLED" and run.data.tags["mergelab.pruned"] == "true"
        assert not (local_path(run.info.artifact_uri) / "merged").exists()
        assert len(t.intermediate_values) < len(TASKS)  # stopped before evaluating every task
    assert len(res.registered) == 1


def test_retry_on_conflict_retries_unique_key_races_only() -> None:
    """Two workers summarising one campaign at once: the loser's duplicate-key INSERT is retried (then an UPDATE)."""
    from mlflow.exceptions import MlflowException

    from mergelab.platform.campaign import retry_on_conflict

    calls = []

    def flaky(key: str, value: str) -> str:
        calls.append((key, value))
        if len(calls) == 1:
            raise MlflowException('BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates '
                                  'unique constraint "tag_pk"')
        return value

    assert retry_on_conflict(flaky, "best_trial", "1") == "1" and len(calls) == 2

    def broken() -> None:
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run not found")

    with pytest.raises(MlflowException, match="not found"):
        retry_on_conflict(broken)


def test_resume_never_replays_a_finished_trials_parameters(platform_store: Store, tmp_path: Path) -> None:
    """A resumed study's sampler does not draw the first session's points again (the seed moves on with the
    study), and a recipe already merged is never merged twice."""
    from mergelab.platform.campaign import RECIPE_ATTR

    cfg, ev = _campaign(tmp_path, budget={"n_trials": 3}, defaults_first=False)
    run_campaign(cfg, store=platform_store, evaluator=ev, summarize=False)
    cfg6 = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"n_trials": 6})})
    run_campaign(cfg6, store=platform_store, evaluator=ev, summarize=False)
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6
    points = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(points)) == 6, points
    assert len({t.user_attrs[RECIPE_ATTR] for t in study.trials}) == 6


def test_a_new_study_starts_from_the_defaults_then_the_enqueued_points(platform_store: Store,
                                                                       tmp_path: Path) -> None:
    from mergelab.platform.campaign import RECIPE_ATTR, START_ATTR, campaign_plan, recipe_template

    cfg, ev = _campaign(tmp_path, budget={"n_trials": 3}, enqueue=[{"lam": 0.7, "coef.ocr": 1.2}])
    plan = campaign_plan(cfg)
    assert "start point defaults: " in plan and '"coef.vqa": 1.0' in plan and "start point enqueue[0]" in plan
    run_campaign(cfg, store=platform_store, evaluator=ev, summarize=False)
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    t0, t1 = study.trials[0], study.trials[1]
    assert t0.user_attrs[START_ATTR] == "defaults" and t1.user_attrs[START_ATTR] == "enqueue[0]"
    assert t0.params == {"lam": 1.0, "coef.vqa": 1.0, "coef.geometry": 1.0, "coef.ocr": 1.0}
    assert t1.params == {"lam": 0.7, "coef.vqa": 1.0, "coef.geometry": 1.0, "coef.ocr": 1.2}
    template, _ = recipe_template(cfg)
    assert t0.user_attrs[RECIPE_ATTR] == template.digest  # trial 0 is exactly the default merge
    best = max(t.values[0] for t in study.trials)
    assert best >= t0.values[0] and best >= t1.values[0]  # never worse than where it started
    # resuming does not enqueue the start points again
    run_campaign(cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"n_trials": 4})}),
                 store=platform_store, evaluator=ev, summarize=False)
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    assert [t.user_attrs.get(START_ATTR) for t in study.trials] == ["defaults", "enqueue[0]", None, None]


def test_optmerge_defaults_trial_is_the_papers_merge(tmp_path: Path) -> None:
    """OptMerge's default rank ratio is None (k = min(m, n) // N): trial 0 shows it as 1/N and merges with None."""
    from mergelab.platform.campaign import campaign_plan, recipe_template, start_points

    cfg, _ = _campaign(tmp_path, method="optmerge", params={"variant": "lora"}, search_space={
        "rank_ratio": {"type": "float", "low": 0.05, "high": 0.5},
        "steps": {"type": "int", "low": 50, "high": 400, "step": 50},
        "lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-3, "log": True},
        "lam": {"type": "float", "low": 0.3, "high": 1.5},
        "init": {"type": "categorical", "choices": ["mean", "sum"]}})
    template, _ = recipe_template(cfg)
    (label, point), = start_points(cfg, template, ["vqa", "geometry", "ocr"])
    assert label == "defaults"
    assert point == {"rank_ratio": pytest.approx(1 / 3), "steps": 300, "lr": 1e-4, "lam": 1.0, "init": "mean",
                     "coef.vqa": 1.0, "coef.geometry": 1.0, "coef.ocr": 1.0}
    assert "template digest: " + template.digest in campaign_plan(cfg)


def test_a_recipe_already_merged_is_not_merged_again(platform_store: Store, tmp_path: Path) -> None:
    from mergelab.platform.campaign import DUPLICATE_ATTR

    cfg, ev = _campaign(tmp_path, search_space={"lam": {"type": "categorical", "choices": [0.5]}}, coefficients=None,
                        sampler={"name": "random", "seed": 0}, budget={"n_trials": 3}, defaults_first=False)
    res = run_campaign(cfg, store=platform_store, evaluator=ev, summarize=False)
    study = optuna.load_study(study_name="camp", storage=platform_store.optuna_storage)
    assert [t.user_attrs.get(DUPLICATE_ATTR) for t in study.trials] == [None, 0, 0]
    assert len({t.values[0] for t in study.trials}) == 1
    client = platform_store.client()
    runs = client.search_runs([platform_store.experiment_id("mergelab", client)],
                              filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert len(runs) == 1 and len(reg.campaign_versions(client, "camp-model", "camp")) == 1
