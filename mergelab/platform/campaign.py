"""Optuna campaigns over merges: one study, one MLflow parent run, one nested MLflow run per trial.

The search space, start points and plan are in :mod:`mergelab.platform.campaign_space`. Over 500 lines because the
study, its budget accounting, the trial loop, registration and the parent run's summary share one study's state.

Design:

* The study lives in Optuna's own RDB (``mlruns/optuna.db`` or ``MERGELAB_OPTUNA_STORAGE``), never in the MLflow
  database, with a heartbeat and a grace period: a worker killed mid-trial is detected, its trial failed in Optuna
  (``fail_stale_trials``) and its MLflow run marked FAILED by the stale-trial callback. ``load_if_exists`` makes
  re-running the same campaign resume the study.
* The budget ``n_trials`` is for the whole study, shared by every worker attached to it (``mergelab worker``); a
  trial whose number is past the budget (two workers racing for the last slot) is skipped before any work.
* Each trial is ``tracked_merge`` with ``parent_run_id`` set to the campaign's run (a tag, so nesting holds across
  threads and processes: MLflow's fluent run stack is per thread). A crashing trial is FAILED in Optuna and MLflow and the campaign goes on.
* The sampler sees only val metrics (the objective is validated to be ``val/...``). Registered candidates are
  evaluated on the test split too, and those numbers go to MLflow and the registry only.
* Registration policy ``all | top_k | best``: a trial that would enter the campaign's top k is registered (zero-copy,
  pointing at its run's ``merged`` directory); versions falling out are deleted with their weights; weights of
  trials never registered are deleted unless ``keep_unregistered_weights``.
* At the end the parent run gets the Optuna visualisations (optimisation history, parameter importances, parallel
  coordinates; plotly HTML and matplotlib PNG), the best trial and a comparison table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mergelab import _signals
from mergelab.engine import run_merge
from mergelab.engine.loop import preflight
from mergelab.evaluators import EvalResult
from mergelab.platform import registry as reg
from mergelab.platform.campaign_config import WEIGHTED, CampaignConfig
from mergelab.platform.campaign_space import (  # noqa: F401  (re-exported: callers import them from here)
    NONE_DEFAULTS,
    START_ATTR,
    campaign_plan,
    check_search_space,
    make_pruner,
    make_sampler,
    recipe_template,
    start_points,
    suggest,
    trial_recipe,
    worker_salt,
)
from mergelab.platform.evaluation import Evaluator, HFEvaluator, log_eval
from mergelab.platform.merge_run import discard_run, tracked_merge
from mergelab.platform.store import (
    TAG_CAMPAIGN,
    TAG_ROLE,
    TAG_TRIAL,
    TAG_WEIGHTS,
    Store,
    fail_run,
    log_metrics,
    log_params,
    log_table,
    metric_name,
)

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
SKIP_ATTR = "mergelab.skipped"
SEARCH_ATTR = "mergelab.search"  # the study's objective and search space (a resume must match them)
ERROR_ATTR = "mergelab.error"  # a trial that failed by its own error (counts against the budget; a lost one does not)
RECIPE_ATTR = "mergelab.recipe"  # the trial's recipe digest
DUPLICATE_ATTR = "mergelab.duplicate_of"  # a trial whose recipe a finished trial already merged



class OverBudget(RuntimeError):
    """A trial asked for after the study's trial budget was spent (another worker took the last slot)."""


@dataclasses.dataclass
class CampaignResult:
    """What :func:`run_campaign` returns.

    Attributes:
        study_name: the Optuna study.
        parent_run_id: the campaign's MLflow run.
        n_complete, n_failed, n_pruned: trial counts in the study after this call.
        best: the best trial's number, values, params and run id (first objective; ``None`` if none completed).
        registered: ``[(version, trial number)]`` of this campaign in the registry, best first.
    """

    study_name: str
    parent_run_id: str
    n_complete: int
    n_failed: int
    n_pruned: int
    best: dict[str, Any] | None
    registered: list[tuple[str, str]]


# --------------------------------------------------------------------------------------------------------------
# Study and parent run
# --------------------------------------------------------------------------------------------------------------


def open_storage(cfg: CampaignConfig, store: Store) -> optuna.storages.RDBStorage:
    """Optuna RDB storage with heartbeat; stale trials' MLflow runs are failed by the callback."""

    def on_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        rid = trial.user_attrs.get(RUN_ATTR)
        if not rid:
            return
        client = store.client()
        fail_run(client, rid, f"worker lost: no heartbeat for trial {trial.number} within the grace period")
        discard_run(client, rid)  # its model versions (if it died while registering) and its weights

    kwargs: dict[str, Any] = {}
    if store.optuna_storage.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    t = cfg.tracking
    import random

    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    # Workers starting together on a fresh database race to create Optuna's tables (a unique violation on
    # alembic_version in PostgreSQL): the loser retries once the winner's schema is in place.
    for attempt in range(6):
        try:
            with _quiet():  # heartbeat is "experimental" in Optuna since 2.9; it is what detects killed workers
                return optuna.storages.RDBStorage(
                    store.optuna_storage, heartbeat_interval=t.heartbeat_interval,
                    grace_period=t.grace_period or 2 * t.heartbeat_interval,
                    heartbeat_stale_trial_callback=on_stale, **kwargs)
        except (IntegrityError, ProgrammingError, OperationalError, optuna.exceptions.StorageInternalError):
            if attempt == 5:
                raise
            time.sleep(0.2 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(cfg: CampaignConfig, storage: optuna.storages.BaseStorage, sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create or load (resume) the campaign's study; refuse a study created with other directions."""
    directions = list(cfg.objective.directions or [])
    study = optuna.create_study(study_name=cfg.study_name, storage=storage, load_if_exists=True,
                                directions=directions, sampler=sampler, pruner=pruner)
    have = [d.name.lower() for d in study.directions]
    if have != directions:
        raise ValueError(f"study {cfg.study_name!r} exists with directions {have}, the config asks {directions}: "
                         "use another campaign name")
    return study


def search_signature(cfg: CampaignConfig) -> dict[str, Any]:
    """What a resumed study must share with the config: objective, directions, search space, coefficients."""
    sig = {"objective": cfg.objective.metrics, "directions": cfg.objective.directions,
           "search_space": {k: v.model_dump() for k, v in cfg.search_space.items()},
           "coefficients": cfg.coefficients.model_dump() if cfg.coefficients else None}
    if cfg.objective.weights is not None:  # only then: the signatures of studies without weights stay as recorded
        sig["weights"] = cfg.objective.weights
    return json.loads(json.dumps(sig, sort_keys=True, default=str))


def check_resume(cfg: CampaignConfig, study: optuna.Study) -> None:
    """Record the study's objective and search space; refuse to resume it with other ones (``--fresh`` starts over).

    Raises:
        ValueError: naming what changed.
    """
    sig = search_signature(cfg)
    have = study.user_attrs.get(SEARCH_ATTR)
    if have is None:
        study.set_user_attr(SEARCH_ATTR, sig)
        return
    changed = [k for k in sig if have.get(k) != sig[k]]
    if changed:
        raise ValueError(f"study {cfg.study_name!r} exists with another {' and '.join(changed)} "
                         f"({', '.join(f'{k}: {have.get(k)} -> {sig[k]}' for k in changed)}); "
                         "start a new study with `mergelab campaign CONFIG --fresh` (once: workers share the study; "
                         "--n-trials 0 only resets it), or use another campaign name")


def retire_campaign(cfg: CampaignConfig, store: Store, client: MlflowClient,
                    storage: optuna.storages.BaseStorage) -> None:
    """``--fresh``: delete the campaign's study and retag its MLflow run(s) as superseded (kept for the record)."""
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=cfg.study_name or cfg.name, storage=storage)
    exp_id = store.experiment_id(cfg.tracking.experiment, client)
    filt = f"tags.`{TAG_ROLE}` = 'campaign' and tags.`{TAG_CAMPAIGN}` = '{cfg.name}'"
    for r in client.search_runs([exp_id], filter_string=filt, max_results=100):
        client.set_tag(r.info.run_id, TAG_CAMPAIGN, f"{cfg.name} (superseded {time.strftime('%Y-%m-%dT%H:%M:%S')})")
        if r.info.status == "RUNNING":
            client.set_terminated(r.info.run_id, status="KILLED")


def ensure_parent_run(cfg: CampaignConfig, store: Store, client: MlflowClient, study: optuna.Study) -> str:
    """The campaign's MLflow run: reused when it exists (resume), created once even when workers race."""
    exp_id = store.experiment_id(cfg.tracking.experiment, client)
    pid = study.user_attrs.get(PARENT_ATTR)
    if pid:
        try:
            run = client.get_run(pid)
            if run.info.lifecycle_stage == "active":
                if run.info.status != "RUNNING":
                    client.update_run(pid, status="RUNNING")
                return pid
        except MlflowException:
            pass
    filt = f"tags.`{TAG_ROLE}` = 'campaign' and tags.`{TAG_CAMPAIGN}` = '{cfg.name}'"

    def existing() -> list[Any]:
        runs = client.search_runs([exp_id], filter_string=filt, max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    runs = existing()
    mine = None
    if not runs:
        mine = client.create_run(exp_id, run_name=cfg.name, tags={TAG_ROLE: "campaign", TAG_CAMPAIGN: cfg.name,
                                                                  "optuna.study": cfg.study_name or cfg.name})
        runs = existing()
    pid = runs[0].info.run_id
    if mine is not None and mine.info.run_id != pid:
        client.delete_run(mine.info.run_id)  # another worker created the campaign run first
    elif mine is not None:
        log_params(client, pid, {
            "method": cfg.method, "sampler": cfg.sampler.name, "sampler.seed": cfg.sampler.seed,
            "budget.n_trials": cfg.budget.n_trials, "budget.timeout_s": cfg.budget.timeout_s,
            "objective": cfg.objective.metrics, "directions": cfg.objective.directions,
            **({"objective.weights": cfg.objective.weights} if cfg.objective.weights is not None else {}),
            "pruner": cfg.pruning.pruner, "eval.tasks": cfg.eval.tasks, "registry.name": cfg.registry.name,
            "registry.register": cfg.registry.register_policy, "registry.top_k": cfg.registry.top_k,
            "search_space": {k: v.model_dump() for k, v in cfg.search_space.items()},
            "coefficients": cfg.coefficients.model_dump() if cfg.coefficients else None,
            "params": cfg.params, "optuna.study": cfg.study_name})
    else:
        client.update_run(pid, status="RUNNING")
    study.set_user_attr(PARENT_ATTR, pid)
    client.log_dict(pid, json.loads(cfg.model_dump_json()), "config/campaign.yaml")
    return pid


# --------------------------------------------------------------------------------------------------------------
# The campaign loop
# --------------------------------------------------------------------------------------------------------------


def run_campaign(
    cfg: CampaignConfig,
    *,
    store: Store | None = None,
    evaluator: Evaluator | None = None,
    test_evaluator: Evaluator | None = None,
    merge_fn: Callable[..., Any] | None = None,
    n_trials: int | None = None,
    summarize: bool = True,
    worker: bool = False,
    fresh: bool = False,
) -> CampaignResult:
    """Run (or resume, or join as a worker) a campaign until its budget is spent.

    Args:
        cfg: the validated campaign.
        store: tracking/Optuna store (default: from ``cfg.tracking`` and the environment).
        evaluator: val evaluator (default :class:`HFEvaluator` with ``cfg.eval``'s options).
        test_evaluator: test evaluator for registered candidates (default: the same as ``evaluator``).
        merge_fn: the engine entry point (default :func:`mergelab.engine.run_merge`; a test seam).
        n_trials: stop this process after this many trials (the study's budget still applies).
        summarize: log visualisations, the best trial and the comparison table to the parent run at the end.
        worker: salt the sampler seed with the process id (several processes on one study).
        fresh: delete the campaign's study (and retire its MLflow run) first; without it, resuming a study whose
            objective or search space differs from ``cfg``'s is refused.

    Returns:
        A :class:`CampaignResult`.
    """
    t = cfg.tracking
    store = store or Store.resolve(t.root, tracking_uri=t.tracking_uri, artifact_root=t.artifact_root,
                                   optuna_storage=t.optuna_storage)
    check_search_space(cfg)
    template, reference = recipe_template(cfg, build_missing=True)
    names = [e.name or "" for e in template.experts]
    if len(set(names)) != len(names):
        raise ValueError(f"experts: names must be unique for per-expert coefficients, got {names}")
    if evaluator is None:
        evaluator = HFEvaluator(data_root=cfg.eval.data_root, batch_size=cfg.eval.batch_size,
                                limit=cfg.eval.limit, device=cfg.device)
    if test_evaluator is None:  # the whole test split, whatever limit the search's val evaluation has
        test_evaluator = (dataclasses.replace(evaluator, limit=None) if isinstance(evaluator, HFEvaluator)
                          else evaluator)
    client = store.client()
    preflight(template, None)  # the experts against the base (shapes, lineage, plan) before any study or run
    store.experiment_id(t.experiment, client)  # the tracking server answers, or nothing is created in Optuna
    storage = open_storage(cfg, store)
    if fresh:
        retire_campaign(cfg, store, client, storage)
    salt = worker_salt() if worker else ()
    study = open_study(cfg, storage, make_sampler(cfg, names, salt), make_pruner(cfg))
    check_resume(cfg, study)
    with _quiet():
        optuna.storages.fail_stale_trials(study)
    n_before = len(study.get_trials(deepcopy=False))
    if n_before:
        # A resumed study: a sampler seeded as in the first session would draw that session's parameters again
        # (TPE's and CMA-ES's start-up draws come from the seeded generator), so the seed moves on with the study.
        study.sampler = make_sampler(cfg, names, (*salt, n_before))
    else:
        with _quiet():  # a default outside the searched range is still tried as is (Optuna warns)
            for label, point in start_points(cfg, template, names):
                study.enqueue_trial(point, user_attrs={START_ATTR: label}, skip_if_exists=True)
    parent = ensure_parent_run(cfg, store, client, study)
    budget = cfg.budget.n_trials
    started = time.monotonic()
    direction0 = (cfg.objective.directions or ["maximize"])[0]
    keep = {"all": None, "top_k": cfg.registry.top_k, "best": 1, "none": 0}[cfg.registry.register_policy]

    def objective(trial: optuna.Trial) -> float | list[float]:
        if budget is not None and counted_trials(trial.study, below=trial.number) >= budget:
            trial.set_user_attr(SKIP_ATTR, "over budget")
            trial.study.stop()
            raise OverBudget(f"trial {trial.number}: study budget of {budget} trials is spent")
        params, coefs = suggest(trial, cfg, names)
        recipe = trial_recipe(template, params, coefs)
        trial.set_user_attr(RECIPE_ATTR, recipe.digest)
        same = finished_with(trial.study, recipe.digest, trial.number)
        if same is not None:  # never merge the same recipe twice: its values stand (a grid or a narrow space)
            trial.set_user_attr(DUPLICATE_ATTR, same.number)
            trial.set_user_attr("val_scores", same.user_attrs.get("val_scores", {}))
            log.info("trial %d: recipe %s is trial %d's; not merged again", trial.number, recipe.digest, same.number)
            return same.values[0] if len(same.values) == 1 else list(same.values)
        pruning = cfg.pruning.pruner != "none"

        def on_task(task: str, partial: EvalResult) -> None:
            if pruning:
                trial.report(partial.average, step=len(partial.scores))
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after {len(partial.scores)} task(s): "
                                             f"running average {partial.average:.2f}")

        tm = tracked_merge(
            recipe, store=store, experiment=t.experiment, run_name=f"{cfg.name}-trial-{trial.number}", parent_run_id=parent,
            tags={TAG_ROLE: "trial", TAG_CAMPAIGN: cfg.name, TAG_TRIAL: str(trial.number),
                  "optuna.study": cfg.study_name or cfg.name},
            extra_params={f"optuna.{k}": v for k, v in trial.params.items()} | {"optuna.trial": trial.number},
            tasks=cfg.eval.tasks, evaluator=evaluator, reference_scores=reference, on_task=on_task,
            on_run=lambda rid: trial.set_user_attr(RUN_ATTR, rid), merge_fn=merge_fn or run_merge, end_run=False)
        try:
            try:
                values = cfg.objective.values(tm.metrics)
            except KeyError as e:
                raise ValueError(f"objective metric {e.args[0]!r} missing or not finite in trial {trial.number}; "
                                 f"have {sorted(k for k in tm.metrics if k.startswith('val/'))}") from None
            if cfg.objective.weights is not None:  # the combined objective, on the run and the version's tags
                tm.metrics[WEIGHTED] = values[0]
                log_metrics(client, tm.run_id, {WEIGHTED: values[0]})
            assert tm.val is not None
            trial.set_user_attr("val_scores", tm.val.scores)
            _register_or_discard(cfg, store, client, trial.number, tm, values[0], direction0, keep,
                                 test_evaluator, params, coefs)
            client.set_terminated(tm.run_id, status="FINISHED")
        except BaseException as e:
            fail_run(client, tm.run_id, e)
            discard_run(client, tm.run_id)  # nothing of a failed or stopped trial stays: versions, then weights
            raise
        return values[0] if len(values) == 1 else values

    try:
        with _signals.deferred():  # SIGTERM/SIGINT acted on between trials, tensors and evaluation batches
            _work(cfg, study, _recording_errors(objective), budget, n_trials, started)
    except KeyboardInterrupt:
        stop_parent(client, study, parent)
        raise

    if keep:
        reg.prune_campaign(client, cfg.registry.name or cfg.name, cfg.name, keep)
    if summarize:
        summarize_campaign(cfg, store, study, parent, client)
    return _result(cfg, study, parent, client)


def _work(cfg: CampaignConfig, study: optuna.Study, objective: Callable[[optuna.Trial], Any], budget: int | None,
          n_trials: int | None, started: float) -> None:
    """This worker's trial loop: until the budget, ``n_trials`` or the timeout is spent, or the grid exhausted."""
    done_here = 0
    while True:
        _signals.check()  # a safe point: between trials
        if n_trials is not None and done_here >= n_trials:
            break
        if budget is not None and not budget_left(study, budget, cfg.tracking.heartbeat_interval):
            break
        if cfg.budget.timeout_s is not None and time.monotonic() - started >= cfg.budget.timeout_s:
            break
        sampler = study.sampler
        if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
            break
        study.optimize(objective, n_trials=1, catch=(Exception,))
        done_here += 1


def _recording_errors(objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
    """The objective, recording a trial's own error (``mergelab.error``) so that it counts against the budget."""

    def run(trial: optuna.Trial) -> Any:
        try:
            return objective(trial)
        except (optuna.TrialPruned, OverBudget):
            raise
        except Exception as e:
            with contextlib.suppress(Exception):
                trial.set_user_attr(ERROR_ATTR, f"{type(e).__name__}: {e}"[:500])
            raise

    return run


def counted_trials(study: optuna.Study, below: int | None = None) -> int:
    """Trials that count against ``budget.n_trials``: COMPLETE, PRUNED, RUNNING and those FAILED by their own error;
    not the enqueued ones not yet started (WAITING), the skipped ones (over budget) nor the lost ones (a worker
    killed or stopped mid-trial: FAIL without ``mergelab.error``), which other workers run again. ``below``: only
    trials numbered below it."""
    states = optuna.trial.TrialState
    n = 0
    for t in study.get_trials(deepcopy=False):
        if (below is not None and t.number >= below) or t.state == states.WAITING:
            continue
        if t.state == states.FAIL:
            n += bool(t.user_attrs.get(ERROR_ATTR)) and not t.user_attrs.get(SKIP_ATTR)
        else:
            n += 1
    return n


def budget_left(study: optuna.Study, budget: int, poll: float = 1.0) -> bool:
    """Whether the study needs another trial. When the budget looks spent only because trials are still running,
    wait for them: one whose worker died fails once its heartbeat is stale (``fail_stale_trials``) and then no
    longer counts, so this worker runs it again instead of ending the campaign one trial short."""
    while True:
        with _quiet():
            optuna.storages.fail_stale_trials(study)
        if counted_trials(study) < budget:
            return True
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if not running:
            return False
        _signals.sleep(min(max(poll, 0.2), 2.0))


def stop_parent(client: MlflowClient, study: optuna.Study, parent: str) -> None:
    """A stopped worker's share of ending the campaign run: KILLED, unless another worker still runs a trial (the
    last one to finish then ends it). Best effort: never masks the stop itself."""
    try:
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            client.set_terminated(parent, status="KILLED")
    except Exception as e:  # noqa: BLE001
        log.warning("campaign run %s not ended KILLED: %s", parent, e)


def finished_with(study: optuna.Study, digest: str, number: int) -> optuna.trial.FrozenTrial | None:
    """The first finished (COMPLETE) trial of ``study`` other than ``number`` whose recipe digest is ``digest``."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.number != number and t.user_attrs.get(RECIPE_ATTR) == digest:
            return t
    return None


def _register_or_discard(cfg: CampaignConfig, store: Store, client: MlflowClient, number: int, tm: Any,
                         score: float, direction: str, keep: int | None, test_evaluator: Evaluator,
                         params: dict[str, Any], coefs: dict[str, float]) -> None:
    name = cfg.registry.name or cfg.name
    register = keep is None or (keep > 0 and reg.would_enter_top_k(client, name, cfg.name, score, direction, keep))
    if not register:
        if not cfg.registry.keep_unregistered_weights and tm.merged_path is not None and tm.merged_path.exists():
            shutil.rmtree(tm.merged_path, ignore_errors=True)
            client.set_tag(tm.run_id, TAG_WEIGHTS, "deleted")
        return
    tags: dict[str, Any] = {"method": cfg.method, "campaign": cfg.name, "trial": number,
                            "eval.tasks": json.dumps(cfg.eval.tasks), "objective": cfg.objective.names[0]}
    tags.update({f"hp.{k}": v for k, v in params.items()})
    tags.update({f"coef.{k}": v for k, v in coefs.items()})
    tags.update({k: f"{v:.4f}" for k, v in tm.metrics.items() if k.startswith("val/") and k.count("/") == 1})
    if tm.val is not None and tm.val.records:
        tags[reg.VAL_ITEMS_TAG] = len(tm.val.records)
    if cfg.registry.evaluate_test and tm.merged_path is not None:  # opt-in; promotion evaluates test anyway
        test = test_evaluator(tm.merged_path, cfg.eval.tasks, "test", None)
        _signals.check()  # a safe point: a stop during the test evaluation registers nothing
        test_metrics = log_eval(client, tm.run_id, test)
        tags.update({k: f"{v:.4f}" for k, v in test_metrics.items() if k.count("/") == 1})
        tags[reg.TEST_ITEMS_TAG] = len(test.records)
    mv = reg.register_run(client, name, tm.run_id, tm.merged_uri, tags=tags, score=score, direction=direction)
    if mv.run_id != tm.run_id:  # the same merge is registered already (same recipe digest): keep that version
        if tm.merged_path is not None and tm.merged_path.exists():
            shutil.rmtree(tm.merged_path, ignore_errors=True)
            client.set_tag(tm.run_id, TAG_WEIGHTS, "deleted")
        client.set_tag(tm.run_id, "mergelab.duplicate_of_version", f"{name}/{mv.version}")
        return
    client.set_tag(tm.run_id, "mergelab.registered_version", f"{name}/{mv.version}")
    if keep is not None:
        reg.prune_campaign(client, name, cfg.name, keep)


def _result(cfg: CampaignConfig, study: optuna.Study, parent: str, client: MlflowClient) -> CampaignResult:
    trials = study.get_trials(deepcopy=False)
    states = optuna.trial.TrialState
    complete = [t for t in trials if t.state == states.COMPLETE]
    best = None
    if complete:
        sign = -1.0 if (cfg.objective.directions or ["maximize"])[0] == "minimize" else 1.0
        b = max(complete, key=lambda t: sign * t.values[0])
        best = {"number": b.number, "values": list(b.values), "params": dict(b.params),
                "run_id": b.user_attrs.get(RUN_ATTR)}
    versions = reg.ranked(reg.campaign_versions(client, cfg.registry.name or cfg.name, cfg.name))
    return CampaignResult(
        study_name=study.study_name, parent_run_id=parent, n_complete=len(complete),
        n_failed=sum(t.state == states.FAIL and not t.user_attrs.get(SKIP_ATTR) for t in trials),
        n_pruned=sum(t.state == states.PRUNED for t in trials), best=best,
        registered=[(str(v.version), v.tags.get("trial", "")) for v in versions])


# --------------------------------------------------------------------------------------------------------------
# Summary on the parent run
# --------------------------------------------------------------------------------------------------------------


def trials_table(study: optuna.Study) -> dict[str, list[Any]]:
    """The comparison table: one row per trial (state, objective values, params, val scores, MLflow run)."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SKIP_ATTR)]
    pnames = sorted({k for t in trials for k in t.params})
    tasks = sorted({k for t in trials for k in t.user_attrs.get("val_scores", {})})
    n_obj = len(study.directions)
    cols: dict[str, list[Any]] = {"trial": [], "state": []}
    cols.update({f"objective_{i}": [] for i in range(n_obj)})
    cols.update({f"param.{p}": [] for p in pnames})
    cols.update({f"val/{k}": [] for k in tasks})
    cols.update({"seconds": [], "mlflow_run_id": []})
    for t in trials:
        cols["trial"].append(t.number)
        cols["state"].append(t.state.name)
        for i in range(n_obj):
            cols[f"objective_{i}"].append(t.values[i] if t.values else None)
        for p in pnames:
            cols[f"param.{p}"].append(t.params.get(p))
        for k in tasks:
            cols[f"val/{k}"].append(t.user_attrs.get("val_scores", {}).get(k))
        dur = t.duration.total_seconds() if t.duration else None
        cols["seconds"].append(dur)
        cols["mlflow_run_id"].append(t.user_attrs.get(RUN_ATTR))
    return cols


def retry_on_conflict(fn: Callable[..., Any], *args: Any, attempts: int = 4, **kwargs: Any) -> Any:
    """Call ``fn``, retrying when the tracking database reports a unique-key conflict.

    Workers that finish at the same moment summarise the same parent run: MLflow writes a new tag with an INSERT,
    so the second of two concurrent ``set_tag`` calls fails with a duplicate key (PostgreSQL ``UniqueViolation``,
    SQLite ``UNIQUE constraint failed``); on retry the key exists and MLflow updates it.
    """
    for attempt in range(attempts - 1):
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if "duplicate key" not in str(exc) and "UNIQUE constraint" not in str(exc):
                raise
            time.sleep(0.05 * (attempt + 1))
    return fn(*args, **kwargs)


def summarize_campaign(cfg: CampaignConfig, store: Store, study: optuna.Study, parent: str,
                       client: MlflowClient | None = None) -> None:
    """Log the best trial, the comparison table and the Optuna visualisations to the campaign's parent run.

    The parent ends FINISHED unless a trial is still running in another worker (then it stays RUNNING and the
    last worker to finish summarises again).
    """
    client = client or store.client()
    trials = study.get_trials(deepcopy=False)
    states = optuna.trial.TrialState
    complete = [t for t in trials if t.state == states.COMPLETE]
    metrics = {"campaign/n_trials": len([t for t in trials if not t.user_attrs.get(SKIP_ATTR)]),
               "campaign/n_complete": len(complete),
               "campaign/n_failed": sum(t.state == states.FAIL and not t.user_attrs.get(SKIP_ATTR) for t in trials),
               "campaign/n_pruned": sum(t.state == states.PRUNED for t in trials)}
    if complete:
        sign = -1.0 if (cfg.objective.directions or ["maximize"])[0] == "minimize" else 1.0
        best = max(complete, key=lambda t: sign * t.values[0])
        metrics["best/trial"] = best.number
        for m, v in zip(cfg.objective.names, best.values, strict=True):
            metrics[f"best/{m}"] = v
        for k, v in best.user_attrs.get("val_scores", {}).items():
            metrics[f"best/val/{k}"] = v
        retry_on_conflict(client.set_tag, parent, "best_trial", str(best.number))
        if best.user_attrs.get(RUN_ATTR):
            retry_on_conflict(client.set_tag, parent, "best_run_id", best.user_attrs[RUN_ATTR])
        client.log_dict(parent, {"number": best.number, "values": best.values, "params": best.params,
                                 "val_scores": best.user_attrs.get("val_scores"),
                                 "mlflow_run_id": best.user_attrs.get(RUN_ATTR)}, "best_trial.json")
    retry_on_conflict(log_metrics, client, parent, metrics)
    retry_on_conflict(log_objective_series, client, parent, complete, cfg.objective.names)
    table = trials_table(study)
    if table["trial"]:
        log_table(client, parent, table, "trials.json")
    if len(complete) >= 1:
        _log_plots(cfg, study, parent, client)
    if not any(t.state == states.RUNNING for t in study.get_trials(deepcopy=False)):
        client.set_terminated(parent, status="FINISHED")


def log_objective_series(client: MlflowClient, parent: str, complete: list[optuna.trial.FrozenTrial],
                         metrics: list[str]) -> None:
    """Each complete trial's objective values on the parent run as ``trials/<metric>`` at ``step`` = trial number
    (a chart in the run's metrics tab), stamped with the trial's completion time so a re-summary logs nothing
    new."""
    from mlflow.entities import Metric

    items = []
    for t in complete:
        ts = int((t.datetime_complete or t.datetime_start).timestamp() * 1000) if t.datetime_start else 0
        items += [Metric(metric_name(f"trials/{m}"), float(v), ts, t.number)
                  for m, v in zip(metrics, t.values or [], strict=False)]
    for i in range(0, len(items), 1000):
        client.log_batch(parent, metrics=items[i : i + 1000])


def _log_plots(cfg: CampaignConfig, study: optuna.Study, parent: str, client: MlflowClient) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import optuna.visualization as pv
    import optuna.visualization.matplotlib as pm

    kw: dict[str, Any] = {}
    if len(study.directions) > 1:
        kw = {"target": lambda t: t.values[0], "target_name": cfg.objective.names[0]}
    plots: list[tuple[str, Callable[..., Any], Callable[..., Any]]] = [
        ("optimization_history", pv.plot_optimization_history, pm.plot_optimization_history),
        ("parallel_coordinate", pv.plot_parallel_coordinate, pm.plot_parallel_coordinate),
    ]
    n_complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    if n_complete >= 2 and study.best_trials and len(study.best_trials[0].params) >= 1:
        plots.append(("param_importances", pv.plot_param_importances, pm.plot_param_importances))
    if len(study.directions) > 1:
        plots.append(("pareto_front", pv.plot_pareto_front, pm.plot_pareto_front))
    with tempfile.TemporaryDirectory() as tmp:
        for name, plotly_fn, mpl_fn in plots:
            pkw = {} if name == "pareto_front" else kw
            if name == "pareto_front":
                pkw = {"target_names": cfg.objective.names}
            try:
                fig = plotly_fn(study, **pkw)
                html = Path(tmp) / f"{name}.html"
                fig.write_html(str(html), include_plotlyjs=True)  # bundled: renders offline (~4.7 MB)
                client.log_artifact(parent, str(html), "optuna")
            except Exception as e:  # noqa: BLE001 - a plot must not fail the campaign
                log.warning("optuna %s (plotly) not logged: %s", name, e)
            try:
                with _quiet():
                    ax = mpl_fn(study, **pkw)
                fig_m = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                png = Path(tmp) / f"{name}.png"
                fig_m.set_size_inches(8, 5)
                fig_m.tight_layout()
                fig_m.savefig(png, dpi=90)
                plt.close(fig_m)
                client.log_artifact(parent, str(png), "optuna")
            except Exception as e:  # noqa: BLE001
                log.warning("optuna %s (matplotlib) not logged: %s", name, e)


@contextlib.contextmanager
def _quiet() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
