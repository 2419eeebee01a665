"""The MLflow model registry for merges: zero-copy registration, top-k pruning, loading back.

A merged model's weights are written once, into its run's artifact directory (``<run artifacts>/merged``), and a
model version is created that *points at them* with ``MlflowClient.create_model_version(source=..., run_id=...)``
(no second copy; this works in-process and through a tracking server whose artifact root is local).
Consequently deleting a version also deletes its weights, and weights are deleted only together with their
version, so no version ever points at nothing.

Version tags: ``method``, ``hp.<name>`` (every hyperparameter), ``campaign``, ``trial``, ``run_id``, ``val/...``
metrics, ``mergelab.score`` / ``mergelab.direction`` (the campaign's ranking objective), ``eval.tasks``, and after
:func:`mergelab.platform.promotion.promote` ``promotion.*`` and ``test/...``. The description holds the lineage (base and experts with SHA-256).

Promotion (``mergelab promote NAME``, :mod:`mergelab.platform.promotion`): the candidate and the version holding the alias ``champion`` are evaluated
on the whole TEST split, in the same process, on the same items; ``champion`` moves only if the 95% paired
bootstrap interval of the test-average gain lies above ``margin`` (default 0) and no task drops by more than
``max_task_drop`` points (:mod:`mergelab.platform.promotion`). Otherwise the candidate gets the alias
``challenger``. The decision and its numbers are tags on both versions; every change of champion is kept in the
model's alias history, and ``mergelab rollback NAME`` restores the previous champion.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mergelab.platform.mlmodel import write_mlmodel
from mergelab.platform.store import TAG_RECIPE, TAG_WEIGHTS, Store, local_path

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












