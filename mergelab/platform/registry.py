"""The MLflow model registry for merges: zero-copy registration, top-k pruning, promotion, loading back.

A merged model's weights are written once, into its run's artifact directory (``<run artifacts>/merged``), and a
model version is created that *points at them* with ``MlflowClient.create_model_version(source=..., run_id=...)``
(no second copy; this works in-process and through a tracking server whose artifact root is local). Consequently deleting a version also deletes its weights, and weights are deleted only together with their
version, so no version ever points at nothing.

Version tags: ``method``, ``hp.<name>`` (every hyperparameter), ``campaign``, ``trial``, ``run_id``, ``val/...``
metrics, ``mergelab.score`` / ``mergelab.direction`` (the campaign's ranking objective), ``eval.tasks``, and after
:func:`promote` ``promotion.*`` and ``test/...``. The description holds the lineage (base and experts with SHA-256).

Promotion (``mergelab promote NAME``): the candidate and the version holding the alias ``champion`` are evaluated
on the whole TEST split, in the same process, on the same items; ``champion`` moves only if the 95% paired
bootstrap interval of the test-average gain lies above ``margin`` (default 0) and no task drops by more than
``max_task_drop`` points (:mod:`mergelab.platform.promotion`). Otherwise the candidate gets the alias
``challenger``. The decision and its numbers are tags on both versions; every change of champion is kept in the
model's alias history, and ``mergelab rollback NAME`` restores the previous champion.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mergelab.evaluators import EvalResult
from mergelab.platform.evaluation import Evaluator, HFEvaluator, log_eval
from mergelab.platform.mlmodel import write_mlmodel
from mergelab.platform.promotion import (
    CHAMPION,
    decide,
    finite,
    mark_champion,
    paired_bootstrap,
    record_champion,
)
from mergelab.platform.store import TAG_RECIPE, TAG_WEIGHTS, Store, local_path, metric_name

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
SCORE_TAG = "mergelab.score"
DIRECTION_TAG = "mergelab.direction"
VAL_ITEMS_TAG = "val.items"  # how many val items the version's val/* metrics average over
TEST_ITEMS_TAG = "test.items"  # how many test items its test/* metrics average over (the whole split)


def _is_missing(e: MlflowException) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")) or "not found" in str(e).lower()


def ensure_registered_model(client: MlflowClient, name: str, description: str | None = None) -> None:
    """Create the registered model ``name`` if it does not exist (safe when workers race)."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(e, "error_code", "")) and "already exists" not in str(e):
                raise


def lineage(client: MlflowClient, run_id: str) -> str:
    """A markdown description of a merged model's lineage from its run's params (base, experts, hashes, method)."""
    p = client.get_run(run_id).data.params
    lines = [f"Merged with `{p.get('method', '?')}` (run `{run_id}`, git `{p.get('git.commit', '?')}`).", "",
             f"- base: `{p.get('base.path', '?')}` sha256 `{p.get('base.sha256', '?')}`"]
    for i in range(int(p.get("n_experts", 0))):
        lines.append(f"- expert `{p.get(f'expert.{i}.name')}`: `{p.get(f'expert.{i}.path')}` "
                     f"sha256 `{p.get(f'expert.{i}.sha256')}` coefficient {p.get(f'expert.{i}.coefficient')}")
    hps = {k[3:]: v for k, v in p.items() if k.startswith("hp.")}
    if hps:
        lines += ["", "hyperparameters: " + ", ".join(f"{k}={v}" for k, v in sorted(hps.items()))]
    return "\n".join(lines)


def register_run(
    client: MlflowClient,
    name: str,
    run_id: str,
    source: str,
    *,
    tags: Mapping[str, Any] | None = None,
    score: float | None = None,
    direction: str = "maximize",
) -> ModelVersion:
    """Register the merged weights at ``source`` (the run's ``.../merged`` artifact URI) as a new version, no copy.

    Args:
        client: registry client.
        name: registered model name (created if missing).
        run_id: the run that wrote the weights.
        source: artifact URI of the weights directory.
        tags: version tags (method, hyperparameters, campaign, trial, val metrics...); the run's recipe digest
            (``mergelab.recipe``) is added.
        score: the ranking value used by :func:`prune_campaign` (stored as ``mergelab.score``).
        direction: ``maximize`` or ``minimize`` for ``score``.

    Returns:
        The created model version, or the existing version of the same merge: a version whose recipe digest
        (``mergelab.recipe``) equals the run's is reused, so the registry never holds one merge twice (the caller
        may then delete the new run's weights: ``version.run_id`` is not ``run_id``).
    """
    ensure_registered_model(client, name)
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    all_tags["run_id"] = run_id
    recipe = client.get_run(run_id).data.tags.get(TAG_RECIPE)
    if recipe:  # the merge's identity (MergeRecipe.digest), carried from its run
        same = [v for v in campaign_versions(client, name) if v.tags.get(TAG_RECIPE) == recipe]
        if same:
            log.info("%s: run %s merges recipe %s, already version %s; reused", name, run_id, recipe,
                     same[-1].version)
            return same[-1]
        all_tags[TAG_RECIPE] = recipe
    if score is not None:
        all_tags[SCORE_TAG] = repr(float(score))
        all_tags[DIRECTION_TAG] = direction
    folder = local_path(source)
    if folder is not None and folder.is_dir():
        try:  # a real MLflow model where MLflow's flavour serves it (text LMs); the weights stay where they are
            write_mlmodel(folder)
        except OSError as e:
            log.warning("%s: no MLmodel written (%s); the version loads with mergelab only", folder, e)
    return client.create_model_version(name, source=source, run_id=run_id, tags=all_tags,
                                       description=lineage(client, run_id))


def aliases_of(client: MlflowClient, name: str) -> dict[str, str]:
    """``{alias: version}`` of a registered model (search results do not carry aliases)."""
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as e:
        if _is_missing(e):
            return {}
        raise
    return {str(k): str(v) for k, v in dict(aliases).items()}


def campaign_versions(client: MlflowClient, name: str, campaign: str | None = None) -> list[ModelVersion]:
    """All versions of ``name`` (of one campaign when given), newest first."""
    filt = f"name='{name}'"
    try:
        versions = list(client.search_model_versions(filt, max_results=10000))
    except MlflowException as e:
        if _is_missing(e):
            return []
        raise
    if campaign is not None:
        versions = [v for v in versions if v.tags.get("campaign") == campaign]
    return sorted(versions, key=lambda v: int(v.version), reverse=True)


def _score(v: ModelVersion) -> float:
    try:
        s = float(v.tags.get(SCORE_TAG, "nan"))
    except ValueError:
        s = math.nan
    if math.isnan(s):
        return -math.inf
    return -s if v.tags.get(DIRECTION_TAG) == "minimize" else s


def ranked(versions: Sequence[ModelVersion]) -> list[ModelVersion]:
    """Versions best first by ``mergelab.score`` (honouring its direction; ties: older version first)."""
    return sorted(versions, key=lambda v: (-_score(v), int(v.version)))


def delete_version(client: MlflowClient, name: str, version: str | int) -> None:
    """Delete a version, then its weights (when local and no other version points at them); tag the run.

    The version goes first, so at no moment does a version point at deleted weights.
    """
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as e:
        if _is_missing(e):
            return
        raise
    try:
        client.delete_model_version(name, str(version))
    except MlflowException as e:
        if not _is_missing(e):  # another worker deleted it first
            raise
    path = local_path(mv.source)
    if path is None or not path.exists():
        return
    others = [v for v in campaign_versions(client, name) if v.source == mv.source]
    if others:
        return
    shutil.rmtree(path, ignore_errors=True)
    if mv.run_id:
        with contextlib.suppress(MlflowException):
            client.set_tag(mv.run_id, TAG_WEIGHTS, "deleted")


def prune_campaign(client: MlflowClient, name: str, campaign: str, keep: int) -> list[str]:
    """Keep the best ``keep`` versions of a campaign; delete the others with their weights.

    Versions holding an alias (``champion``, ``challenger``) are never deleted. Safe when several workers prune
    concurrently (each prunes what it sees; every registration is followed by a prune).

    Returns:
        The deleted version numbers.
    """
    versions = ranked(campaign_versions(client, name, campaign))
    aliased = set(aliases_of(client, name).values())
    deleted = []
    for v in versions[keep:]:
        if str(v.version) in aliased:
            continue
        delete_version(client, name, v.version)
        deleted.append(str(v.version))
    return deleted


def would_enter_top_k(client: MlflowClient, name: str, campaign: str, score: float, direction: str,
                      keep: int) -> bool:
    """Whether a new version with ``score`` would rank within the campaign's best ``keep`` versions."""
    versions = ranked(campaign_versions(client, name, campaign))
    if len(versions) < keep:
        return True
    s = -score if direction == "minimize" else score
    return s > _score(versions[keep - 1])


# --------------------------------------------------------------------------------------------------------------
# Listing and loading
# --------------------------------------------------------------------------------------------------------------


def list_versions(store: Store, name: str | None = None) -> list[dict[str, Any]]:
    """Rows describing registered versions (one model, or all): metrics, aliases, campaign, trial, source."""
    client = store.client()
    names = [name] if name else [m.name for m in client.search_registered_models(max_results=1000)]
    rows = []
    for n in names:
        by_version: dict[str, list[str]] = {}
        for alias, ver in aliases_of(client, n).items():
            by_version.setdefault(ver, []).append(alias)
        for v in campaign_versions(client, n):
            t = v.tags
            rows.append({
                "name": n, "version": int(v.version), "aliases": ",".join(sorted(by_version.get(str(v.version), []))),
                "method": t.get("method", ""), "campaign": t.get("campaign", ""), "trial": t.get("trial", ""),
                "val/average": t.get("val/average", ""), "test/average": t.get("test/average", ""),
                "decision": t.get("promotion.decision", ""), "run_id": v.run_id, "source": v.source,
            })
    return rows


def resolve_model_dir(store: Store, uri_or_name: str) -> Path:
    """The local directory of a registered model: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``NAME``.

    For a local artifact store this is the run's own ``merged`` directory (no copy); otherwise the artifacts are
    downloaded once to a temporary directory.

    Raises:
        ValueError: the URI does not resolve to a version, naming it.
    """
    client = store.client()
    mv = get_version(client, uri_or_name)
    path = local_path(mv.source)
    if path is not None:
        if not path.exists():
            raise ValueError(f"{uri_or_name}: version {mv.version} points at missing weights {mv.source}")
        return path
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, tracking_uri=store.tracking_uri))


def get_version(client: MlflowClient, uri_or_name: str) -> ModelVersion:
    """Parse ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` / ``NAME`` (latest) into a model version."""
    ref = uri_or_name.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        if "/" in ref:
            name, version = ref.rsplit("/", 1)
            return client.get_model_version(name, version)
        versions = campaign_versions(client, ref)
        if not versions:
            raise ValueError(f"{uri_or_name}: registered model has no versions")
        return versions[0]
    except MlflowException as e:
        raise ValueError(f"{uri_or_name}: no such registered model version ({e.message})") from None


def load_registered(store: Store, uri: str) -> tuple[Any, Any]:
    """Load ``models:/NAME@champion`` (or any version URI) into a working ``(model, processor)``.

    Uses ``mergelab.hf.load_model`` (which handles the VLM processors that ``mlflow.transformers`` cannot log).
    """
    from mergelab.hf import load_model

    return load_model(str(resolve_model_dir(store, uri)))


# --------------------------------------------------------------------------------------------------------------
# Promotion
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PromotionDecision:
    """The outcome of :func:`promote`.

    Attributes:
        name: registered model.
        candidate: candidate version.
        champion: previous champion version (``None`` if there was none).
        decision: ``"champion"`` (alias moved), ``"challenger"``, or ``"already_champion"``.
        candidate_scores, champion_scores: per-task TEST scores.
        delta: candidate average minus champion average (points).
        worst_drop: the largest per-task drop from champion to candidate (points), with ``worst_task``.
        reason: one line explaining the decision (with the gain and its interval).
        ci_low, ci_high: the gain's 95% paired-bootstrap interval (NaN without a champion to compare with).
        test_items: test items the candidate was scored on.
    """

    name: str
    candidate: str
    champion: str | None
    decision: str
    candidate_scores: dict[str, float]
    champion_scores: dict[str, float]
    delta: float
    worst_drop: float
    worst_task: str | None
    reason: str
    ci_low: float = math.nan
    ci_high: float = math.nan
    test_items: int = 0

    @property
    def promoted(self) -> bool:
        """True when the candidate now holds ``champion``."""
        return self.decision in ("champion", "already_champion")


def _candidate(client: MlflowClient, name: str, version: str | int | None, campaign: str | None) -> ModelVersion:
    if version is not None:
        try:
            return client.get_model_version(name, str(version))
        except MlflowException as e:
            raise ValueError(f"registered model {name!r} has no version {version}") from e
    versions = campaign_versions(client, name, campaign)
    if not versions:
        raise ValueError(f"registered model {name!r} has no versions" + (f" from campaign {campaign!r}" if campaign
                                                                       else ""))
    if campaign is not None:
        return ranked(versions)[0]
    return versions[0]


def _tasks_of(mv: ModelVersion) -> list[str] | None:
    raw = mv.tags.get("eval.tasks")
    return list(json.loads(raw)) if raw else None


def _evaluate_version(store: Store, mv: ModelVersion, tasks: Sequence[str], evaluator: Evaluator) -> EvalResult:
    path = resolve_model_dir(store, f"models:/{mv.name}/{mv.version}")
    return evaluator(path, list(tasks), "test", None)


def promote(
    name: str,
    *,
    version: str | int | None = None,
    campaign: str | None = None,
    margin: float = 0.0,
    max_task_drop: float | None = 2.0,
    tasks: Sequence[str] | None = None,
    evaluator: Evaluator | None = None,
    store: Store | None = None,
) -> PromotionDecision:
    """Evaluate a candidate version and the champion on the whole TEST split; move ``champion`` only on a real win.

    Both are evaluated here, in this process, on the same items (an :class:`HFEvaluator` with a ``limit`` is run
    without it). The gain's 95% interval is a paired bootstrap over the items
    (:func:`mergelab.platform.promotion.paired_bootstrap`); ``champion`` moves only when the interval's lower end
    is above ``margin`` and no task drops by more than ``max_task_drop``, else the candidate becomes
    ``challenger``. Both versions get their ``test/*`` tags with ``test.items``, and the decision with its numbers
    (``promotion.*`` on the candidate, ``promotion.defended.*`` on the champion); a change of champion is
    appended to the model's alias history (:func:`mergelab.platform.promotion.rollback` undoes it).

    Args:
        name: registered model name.
        version: the candidate version; default: the best version of ``campaign`` by its val objective, or the
            newest version when no campaign is given.
        campaign: pick the candidate among this campaign's versions.
        margin: the lower end of the gain's 95% interval must exceed this many points (0: it excludes 0).
        max_task_drop: no task may drop by more than this many points versus the champion (None: no limit).
        tasks: evaluation tasks (default: the candidate's ``eval.tasks`` tag).
        evaluator: ``evaluator(model_dir, tasks, "test", None)`` (default :class:`HFEvaluator`, whole split).
        store: the store.

    Returns:
        The :class:`PromotionDecision`.

    Raises:
        ValueError: unknown model/version, or no tasks to evaluate on.
    """
    store = store or Store.resolve()
    client = store.client()
    evaluator = evaluator or HFEvaluator()
    if isinstance(evaluator, HFEvaluator) and evaluator.limit is not None:
        evaluator = dataclasses.replace(evaluator, limit=None)  # promotion always sees the whole test split
    cand = _candidate(client, name, version, campaign)
    tasks = list(tasks or _tasks_of(cand) or [])
    if not tasks:
        raise ValueError(f"{name} v{cand.version}: no evaluation tasks (pass tasks=... / --tasks)")
    try:
        champ: ModelVersion | None = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champ = None

    cand_eval = _evaluate_version(store, cand, tasks, evaluator)
    _log_test(client, cand, cand_eval)
    champ_scores: dict[str, float] = {}
    gain = None
    if champ is not None and champ.version == cand.version:
        decision, reason = "already_champion", f"v{cand.version} already holds {CHAMPION}"
        champ_scores = dict(cand_eval.scores)
    elif champ is None:
        decision, reason = "champion", f"no {CHAMPION} yet: v{cand.version} becomes {CHAMPION}"
    else:
        champ_eval = _evaluate_version(store, champ, tasks, evaluator)
        _log_test(client, champ, champ_eval)
        champ_scores = dict(champ_eval.scores)
        gain = paired_bootstrap(cand_eval, champ_eval, tasks)
        won, reason = decide(gain, margin=margin, max_task_drop=max_task_drop)
        decision = "champion" if won else "challenger"
    drops = {t: champ_scores[t] - cand_eval.scores.get(t, -math.inf) for t in champ_scores}
    worst_task = max(drops, key=lambda t: drops[t]) if drops and gain is not None else None
    worst_drop = drops[worst_task] if worst_task else 0.0
    delta = gain.delta if gain is not None else (0.0 if decision == "already_champion" else math.nan)

    if decision == "champion":
        client.set_registered_model_alias(name, CHAMPION, cand.version)
        if aliases_of(client, name).get(CHALLENGER) == str(cand.version):
            client.delete_registered_model_alias(name, CHALLENGER)
        if champ is not None:
            client.set_model_version_tag(name, champ.version, "promotion.replaced_by", str(cand.version))
        record_champion(client, name, str(cand.version), str(champ.version) if champ is not None else None,
                        "promote", reason)
        mark_champion(client, name, str(cand.version), str(champ.version) if champ is not None else None,
                      "promote", reason)
    elif decision == "challenger":
        client.set_registered_model_alias(name, CHALLENGER, cand.version)

    stamp = str(int(time.time()))
    tags = {"promotion.decision": decision, "promotion.reason": reason, "promotion.time": stamp,
            "promotion.margin": str(margin), "promotion.max_task_drop": str(max_task_drop),
            "promotion.champion_version": str(champ.version) if champ is not None else "",
            "promotion.delta": finite(delta), "promotion.worst_drop": f"{worst_drop:.4f}",
            "promotion.worst_task": worst_task or "", "promotion.tasks": json.dumps(tasks),
            "promotion.champion_test_average": (f"{sum(champ_scores.values()) / len(champ_scores):.4f}"
                                                if champ_scores else "")}
    if gain is not None:
        tags.update({"promotion.ci_low": f"{gain.ci_low:.4f}", "promotion.ci_high": f"{gain.ci_high:.4f}",
                     "promotion.paired_items": str(gain.n_items)})
    tags.update({f"promotion.champion_test/{metric_name(t)}": f"{s:.4f}" for t, s in champ_scores.items()})
    for k, v in tags.items():
        client.set_model_version_tag(name, cand.version, k, v)
    if champ is not None and champ.version != cand.version:  # the decision, seen from the champion's side
        defended = {"promotion.defended.by": str(cand.version), "promotion.defended.decision": decision,
                    "promotion.defended.reason": reason, "promotion.defended.time": stamp,
                    "promotion.defended.delta": finite(delta)}
        for k, v in defended.items():
            client.set_model_version_tag(name, champ.version, k, v)
    return PromotionDecision(name=name, candidate=str(cand.version),
                             champion=str(champ.version) if champ is not None else None, decision=decision,
                             candidate_scores=dict(cand_eval.scores), champion_scores=champ_scores, delta=delta,
                             worst_drop=worst_drop, worst_task=worst_task, reason=reason,
                             ci_low=gain.ci_low if gain is not None else math.nan,
                             ci_high=gain.ci_high if gain is not None else math.nan,
                             test_items=len(cand_eval.records))


def _log_test(client: MlflowClient, mv: ModelVersion, result: Any) -> None:
    """A version's whole-split test scores: ``test/*`` and ``test.items`` on the version, metrics on its run."""
    tags = {f"test/{metric_name(t)}": f"{s:.4f}" for t, s in result.scores.items()}
    tags["test/average"] = f"{result.average:.4f}"
    tags[TEST_ITEMS_TAG] = str(len(result.records))
    for k, v in tags.items():
        client.set_model_version_tag(mv.name, mv.version, k, v)
    if mv.run_id:
        with contextlib.suppress(MlflowException):
            log_eval(client, mv.run_id, result)
            client.set_tag(mv.run_id, TEST_ITEMS_TAG, tags[TEST_ITEMS_TAG])  # the run's test/* now cover these
