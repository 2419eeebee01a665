"""Promotion: a candidate against the champion on the whole test split (:func:`promote`), the paired bootstrap of
the test-average gain, the decision rule, the alias history kept on the registered model, and rollback.

The decision (:func:`decide`): the candidate and the champion are scored on the same test items in the same
process; the gain is the difference of their test averages (the unweighted mean over tasks, in points), and its
95% interval is a paired, per-task stratified bootstrap over the items (both models' scores of one item are drawn
together). ``champion`` moves only when the interval's lower end is above ``margin`` (default 0: the interval
excludes 0) and no task drops by more than ``max_task_drop`` points. Evaluators that return no per-item records
give a zero-width interval at the observed gain.

The history: every change of the ``champion`` alias (a promotion or a rollback) is one registered-model tag
``champion.history.<n>`` holding ``{"version", "previous", "action", "time", "reason"}``; replaying them gives the
line of champions, and :func:`rollback` gives the alias back to the one before the current holder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mergelab.evaluators import EvalResult
from mergelab.platform.evaluation import Evaluator, HFEvaluator, log_eval
from mergelab.platform.registry import (
    CHALLENGER,
    TEST_ITEMS_TAG,
    aliases_of,
    campaign_versions,
    ranked,
    resolve_model_dir,
)
from mergelab.platform.store import Store, metric_name

CHAMPION = "champion"
HISTORY_PREFIX = "champion.history."
TAG_CHAMPION_RUN = "mergelab.champion"
"""Run tag ``"true"`` on the run of the version holding ``champion`` (moved on promotion and rollback)."""


@dataclasses.dataclass(frozen=True)
class Gain:
    """A paired comparison on the test split.

    Attributes:
        delta: candidate average minus champion average (points).
        ci_low, ci_high: the bootstrap interval of ``delta`` (points).
        n_items: paired items the interval was drawn from (0: no records, zero-width interval).
        per_task: ``{task: candidate - champion}`` (points).
    """

    delta: float
    ci_low: float
    ci_high: float
    n_items: int
    per_task: dict[str, float]


def paired_bootstrap(candidate: Any, champion: Any, tasks: Sequence[str], *, n_boot: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> Gain:
    """The gain of ``candidate`` over ``champion`` (evaluation results with ``scores`` and ``records``) and its
    bootstrap interval, resampling each task's paired items (matched by ``(task, id)``) with replacement.

    The per-item scores are the primary metric in [0, 1]; a task's replicate is 100 times the mean paired
    difference, shifted so that the replicates centre on the task's reported difference (a task whose primary
    score is not an item mean keeps its own point estimate). A task without paired records adds its observed
    difference with no spread.
    """
    per_task = {t: float(candidate.scores[t]) - float(champion.scores[t]) for t in tasks}
    delta = sum(per_task.values()) / len(per_task)
    pairs: dict[str, dict[str, list[float]]] = {}
    champ_items = {(r.get("task"), r.get("id")): r.get("score") for r in (champion.records or [])}
    for r in candidate.records or []:
        key = (r.get("task"), r.get("id"))
        if key[0] in per_task and key in champ_items and r.get("score") is not None:
            d = pairs.setdefault(str(key[0]), {"d": []})
            d["d"].append(float(r["score"]) - float(champ_items[key]))
    n_items = sum(len(v["d"]) for v in pairs.values())
    if not n_items:
        return Gain(delta, delta, delta, 0, per_task)
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for t in tasks:
        d = np.asarray(pairs.get(t, {"d": []})["d"])
        if d.size == 0:
            total += per_task[t]
            continue
        idx = rng.integers(0, d.size, size=(n_boot, d.size))
        reps = 100.0 * d[idx].mean(axis=1)
        total += reps - 100.0 * d.mean() + per_task[t]
    total /= len(tasks)
    lo, hi = np.quantile(total, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Gain(delta, float(lo), float(hi), n_items, per_task)


def decide(gain: Gain, *, margin: float = 0.0, max_task_drop: float | None = 2.0) -> tuple[bool, str]:
    """Whether the candidate takes ``champion``, with a one-line reason stating the numbers."""
    interval = f"test average {gain.delta:+.2f} (95% CI [{gain.ci_low:+.2f}, {gain.ci_high:+.2f}], {gain.n_items} " \
               "paired items)"
    if not gain.ci_low > margin:
        return False, f"{interval}: the interval does not clear the margin {margin:g}"
    worst = min(gain.per_task, key=lambda t: gain.per_task[t]) if gain.per_task else None
    if worst is not None and max_task_drop is not None and -gain.per_task[worst] > max_task_drop:
        return False, f"{interval}, but task {worst} drops {-gain.per_task[worst]:.2f} > max_task_drop {max_task_drop}"
    return True, f"{interval} clears the margin {margin:g}"


# --------------------------------------------------------------------------------------------------------------
# The champion's history and rollback
# --------------------------------------------------------------------------------------------------------------


def champion_history(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Every change of ``champion`` on ``name``, oldest first."""
    tags = client.get_registered_model(name).tags or {}
    events = []
    for k, v in tags.items():
        if k.startswith(HISTORY_PREFIX):
            try:
                events.append((int(k[len(HISTORY_PREFIX):]), json.loads(v)))
            except ValueError:
                continue
    return [e for _, e in sorted(events, key=lambda kv: kv[0])]


def champion_line(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The champions still to fall back on, oldest first (a promotion pushes; a rollback pops)."""
    line: list[str] = []
    for e in history:
        if e.get("action") == "rollback":
            if line:
                line.pop()
        else:
            line.append(str(e["version"]))
    return line


def record_champion(client: MlflowClient, name: str, version: str, previous: str | None, action: str,
                    reason: str) -> dict[str, Any]:
    """Append one event to the champion's history (a registered-model tag)."""
    n = len(champion_history(client, name))
    event = {"version": str(version), "previous": previous, "action": action, "time": int(time.time()),
             "reason": reason}
    client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{n:05d}", json.dumps(event))
    return event


def champion_description(client: MlflowClient, name: str, version: str, action: str, reason: str,
                         when: int | None = None) -> str:
    """The registered model's description once ``version`` holds ``champion``: its method, run, whole-split test
    scores (its ``test/*`` tags) and the decision that gave it the alias."""
    tags = client.get_model_version(name, version).tags
    tests = {k.removeprefix("test/"): v for k, v in sorted(tags.items()) if k.startswith("test/")}
    avg = tests.pop("average", None)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when if when is not None else time.time()))
    lines = [f"**{CHAMPION}: v{version}** (`{tags.get('method', '?')}`, run `{tags.get('run_id', '?')}`)", ""]
    if avg is not None:
        per_task = ", ".join(f"{t} {float(v):.1f}" for t, v in tests.items())
        items = tags.get("test.items")
        lines.append(f"- test average **{float(avg):.2f}**" + (f" on {items} items" if items else "")
                     + (f" ({per_task})" if per_task else ""))
    if tags.get("val/average"):
        lines.append(f"- val average {float(tags['val/average']):.2f}")
    lines.append(f"- {'promoted' if action == 'promote' else action} {stamp}: {reason}")
    lines += ["", "History: `mergelab rollback NAME --history`; the registered model's `champion.history.*` tags."]
    return "\n".join(lines)


def mark_champion(client: MlflowClient, name: str, version: str, previous: str | None, action: str,
                  reason: str) -> None:
    """Make the holder of ``champion`` visible: :data:`TAG_CHAMPION_RUN` moves from ``previous``'s run to
    ``version``'s, and the registered model's description names the holder, its scores and the decision."""
    runs = {}
    for v in {previous, version} - {None}:
        try:
            runs[v] = client.get_model_version(name, v).run_id
        except MlflowException:
            runs[v] = None
    old_run, new_run = runs.get(previous) if previous else None, runs.get(version)
    if old_run and old_run != new_run:
        with contextlib.suppress(MlflowException):
            client.delete_tag(old_run, TAG_CHAMPION_RUN)
    if new_run:
        with contextlib.suppress(MlflowException):
            client.set_tag(new_run, TAG_CHAMPION_RUN, "true")
    client.update_registered_model(name, description=champion_description(client, name, version, action, reason))


def current_champion(client: MlflowClient, name: str) -> str | None:
    """The version holding ``champion`` (None when none does)."""
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def rollback(client: MlflowClient, name: str, reason: str = "rollback") -> dict[str, Any]:
    """Give ``champion`` back to the version that held it before the current holder; record it on both.

    Raises:
        ValueError: no champion, or none before it (naming the model).
    """
    current = current_champion(client, name)
    if current is None:
        raise ValueError(f"registered model {name!r} has no {CHAMPION}")
    line = champion_line(champion_history(client, name))
    if len(line) < 2 or line[-1] != current:
        raise ValueError(f"registered model {name!r}: no previous {CHAMPION} to roll back to (history: {line})")
    previous = line[-2]
    try:
        client.get_model_version(name, previous)
    except MlflowException:
        raise ValueError(f"registered model {name!r}: the previous {CHAMPION} v{previous} no longer exists") from None
    client.set_registered_model_alias(name, CHAMPION, previous)
    event = record_champion(client, name, previous, current, "rollback", reason)
    mark_champion(client, name, previous, current, "rollback", reason)
    stamp = str(event["time"])
    client.set_model_version_tag(name, current, "promotion.rolled_back", f"{stamp}: {CHAMPION} back to v{previous}")
    client.set_model_version_tag(name, previous, "promotion.restored", f"{stamp}: from v{current} ({reason})")
    return event


def history_rows(client: MlflowClient, name: str) -> list[str]:
    """The champion's history as printable lines."""
    rows = []
    for e in champion_history(client, name):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.get("time", 0)))
        prev = e.get("previous") or "-"
        rows.append(f"{when}  {e.get('action', '?'):<9} v{e['version']} (was v{prev}): {e.get('reason', '')}")
    return rows


def finite(x: float) -> str:
    """A number for a tag (``""`` for NaN)."""
    return "" if math.isnan(x) else f"{x:.4f}"


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

