"""Promotion's statistics and the champion's history: the paired bootstrap of a test-average gain, the decision
rule, the alias history kept on the registered model, and rollback.

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
from mlflow.exceptions import MlflowException

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
