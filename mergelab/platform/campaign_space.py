"""A campaign's search space and start: the recipe template (a zoo reference resolved), the trial's recipe, the
sampler and pruner, the start points (the method's defaults first), the ``--dry-run`` plan and the sampling of a
trial's hyperparameters and per-expert coefficients. :mod:`mergelab.platform.campaign` runs the study with them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna

from mergelab.engine import ExpertSpec, MergeRecipe
from mergelab.methods import METHODS
from mergelab.platform.campaign_config import CampaignConfig, OmniZooRef, ZooRef
from mergelab.platform.omni import OmniZooMissing, omni_template

START_ATTR = "mergelab.start"  # "defaults" or "enqueue[i]" on the enqueued start points

#: What ``None`` means for a searched hyperparameter whose method default is None (to show it as a number).
NONE_DEFAULTS: dict[str, Callable[[int], float]] = {"rank_ratio": lambda n_experts: 1.0 / n_experts}


def recipe_template(cfg: CampaignConfig, source: str = "campaign", *,
                    build_missing: bool = False) -> tuple[MergeRecipe, dict[str, float]]:
    """The campaign's recipe template (a zoo reference resolved) and the experts' own-task reference scores.

    An omni zoo reference (``experts: {omni_zoo: ...}``) is resolved by :func:`mergelab.platform.omni.omni_template`
    (``build_missing``: build its checkpoints first when they are missing; else :class:`OmniZooMissing`).

    A zoo reference reads ``<zoo>/manifest.json`` written by :func:`mergelab.bench.zoo_build.build_zoo`: models are
    ``manifest["models"]["seed<S>/<kind>/<task>"]`` with ``kind``, ``task``, ``seed`` and ``scores`` (``{"shifted":
    {task: score}}``, the benchmark's own variant); the base is ``seed<S>/base``. The reference scores (for
    ``val/normalized_average``) are the zoo's recorded own-task scores or the experts' ``score`` fields: a fixed
    normaliser for display, never tuned on.

    Raises:
        ValueError: missing manifest, no experts of the requested kind/seed/tasks (naming the file), or a recipe
            field that does not validate (``MergeConfigError``, naming it).
    """
    if isinstance(cfg.experts, OmniZooRef):
        return omni_template(cfg, source, build_missing=build_missing)
    if not isinstance(cfg.experts, ZooRef):
        if cfg.base is None:
            raise ValueError(f"{source}: base: required when `experts` is a list of paths")
        recipe = cfg.to_recipe(source)
        scores = {r.name: float(e.score) for r, e in zip(recipe.experts, cfg.experts, strict=True)
                  if e.score is not None}
        return recipe, scores
    z = cfg.experts
    zoo = Path(z.zoo)
    mf = zoo / "manifest.json"
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{mf}: cannot read the zoo manifest ({e}); build it with `mergelab bench build`") from None
    models = manifest.get("models") or {}
    base_name = f"seed{z.seed}/base"
    if cfg.base is None and base_name not in models:
        raise ValueError(f"{mf}: no {base_name} in the zoo")
    base = cfg.base or str(zoo / base_name)
    wanted = list(z.tasks or cfg.eval.tasks)
    experts, ref = [], {}
    for task in wanted:
        name = f"seed{z.seed}/{z.kind}/{task}"
        entry = models.get(name)
        if entry is None:
            continue
        experts.append(ExpertSpec(str(zoo / name), None, task))
        own = ((entry.get("scores") or {}).get("shifted") or {}).get(task)
        if isinstance(own, (int, float)):
            ref[task] = float(own)
    if not experts:
        raise ValueError(f"{mf}: no seed{z.seed} {z.kind} experts for tasks {wanted}")
    return cfg.to_recipe(source, base=base, experts=experts), ref


def trial_recipe(template: MergeRecipe, params: Mapping[str, Any], coefs: Mapping[str, float]) -> MergeRecipe:
    """The template with a trial's hyperparameters and per-expert coefficients (``coefs`` by expert name)."""
    experts = tuple(dataclasses.replace(e, coefficient=coefs.get(e.name, e.coefficient)) for e in template.experts)
    return template.replace(params=dict(params), experts=experts)


def worker_salt() -> tuple[int, ...]:
    """What tells workers apart: its process and thread (threads of one process share a pid)."""
    return (os.getpid(), threading.get_native_id())


def salted_seed(seed: int, salt: tuple[int, ...]) -> int:
    """``seed`` itself without a salt, else a 31-bit hash of both. Hashed, not added: with an additive salt two
    threads whose ids differ by one, resuming a study one trial apart, got the same seed and drew the same trials."""
    if not any(salt):
        return seed
    digest = hashlib.blake2b(repr((seed, *salt)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def make_sampler(cfg: CampaignConfig, expert_names: list[str],
                 salt: tuple[int, ...] = ()) -> optuna.samplers.BaseSampler:
    """The configured sampler; ``salt`` (the worker, the trials already in the study) moves the seed so concurrent
    workers and resumed sessions do not propose identical trials."""
    s = cfg.sampler
    seed = None if s.seed is None else salted_seed(s.seed, salt)
    opts = dict(s.options)
    if s.name == "tpe":
        opts.setdefault("multivariate", True)
        return optuna.samplers.TPESampler(seed=seed, **opts)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed, **opts)
    if s.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **opts)
    if s.name == "gp":
        return optuna.samplers.GPSampler(seed=seed, **opts)
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **opts)
    if s.name == "grid":
        grid = {k: d.grid() for k, d in cfg.search_space.items()}
        if cfg.coefficients is not None:
            grid.update({f"coef.{n}": cfg.coefficients.grid() for n in expert_names})
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise ValueError(f"sampler.name: unknown sampler {s.name!r}")  # pragma: no cover - pydantic guards


def make_pruner(cfg: CampaignConfig) -> optuna.pruners.BasePruner:
    """The configured pruner (``NopPruner`` when pruning is off)."""
    p = cfg.pruning
    if p.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=len(cfg.eval.tasks))
    if p.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def check_search_space(cfg: CampaignConfig) -> None:
    """Refuse searched or fixed parameters that the method's config does not have (one line naming them)."""
    if cfg.method not in METHODS:
        raise ValueError(f"method: unknown merge method {cfg.method!r}; known: {sorted(METHODS)}")
    fields = set(getattr(METHODS[cfg.method].config_cls, "__dataclass_fields__", {}))
    unknown = sorted((set(cfg.search_space) | set(cfg.params)) - fields)
    if unknown:
        raise ValueError(f"search_space/params: {unknown} are not hyperparameters of {cfg.method!r}; "
                         f"known: {sorted(fields)}")
    if cfg.coefficients is not None and "coefficients" not in fields:
        raise ValueError(f"coefficients: method {cfg.method!r} takes no per-expert coefficients")


def start_points(cfg: CampaignConfig, template: MergeRecipe, expert_names: list[str]) -> list[tuple[str, dict[str,
                                                                                                            Any]]]:
    """The trials a new study begins with, as ``[(label, Optuna params)]``: the method's defaults (every searched
    hyperparameter at the value the template resolves it to, every coefficient 1: for OptMerge, the paper's
    setting), then ``cfg.enqueue``'s points with the defaults filling what they leave out.

    A campaign therefore never ends worse on val than the settings it started from. A default of ``None`` is
    shown as the number it means (:data:`NONE_DEFAULTS`, e.g. ``rank_ratio = 1/N``); the defaults trial merges
    with the ``None`` itself, so its recipe is exactly the default merge's.
    """
    hp = template.hyperparameters
    defaults: dict[str, Any] = {}
    for k in cfg.search_space:
        v = hp.get(k)
        if v is None and k in NONE_DEFAULTS:
            v = NONE_DEFAULTS[k](len(expert_names))
        if v is not None:
            defaults[k] = v
    if cfg.coefficients is not None:
        defaults.update({f"coef.{n}": 1.0 for n in expert_names})
    points = [("defaults", defaults)] if cfg.defaults_first else []
    points += [(f"enqueue[{i}]", {**defaults, **p}) for i, p in enumerate(cfg.enqueue)]
    if cfg.sampler.name == "grid":  # a grid sampler runs only grid points: the others are left out
        grid = {k: d.grid() for k, d in cfg.search_space.items()}
        if cfg.coefficients is not None:
            grid.update({f"coef.{n}": cfg.coefficients.grid() for n in expert_names})
        points = [(label, p) for label, p in points if all(v in grid.get(k, ()) for k, v in p.items())]
    return points


def campaign_plan(cfg: CampaignConfig) -> str:
    """What ``mergelab campaign --dry-run`` prints: the validated template recipe and its digest, the search space,
    the start points, the study, the budget and where results go. Reads the experts' files; writes nothing."""
    check_search_space(cfg)
    try:
        template, reference = recipe_template(cfg)
    except OmniZooMissing as e:  # nothing to hash yet: the campaign builds the zoo first
        return (f"campaign {cfg.name}: study {cfg.study_name!r}, method {cfg.method}; {e}\n"
                f"template digest: known once the zoo is built\nobjective {cfg.objective.metrics} on val of "
                f"{cfg.eval.tasks}; registry {cfg.registry.name}: register {cfg.registry.register_policy}")
    names = [e.name or "" for e in template.experts]
    lines = [f"campaign {cfg.name}: study {cfg.study_name!r}, method {template.method_name}, "
             f"{len(names)} experts {names}",
             f"template hyperparameters: {json.dumps(template.hyperparameters, sort_keys=True, default=str)}",
             f"template digest: {template.digest}",
             "search space: " + json.dumps({k: d.model_dump(exclude_none=True) for k, d in cfg.search_space.items()})]
    if cfg.coefficients is not None:
        lines.append("coefficients: " + ", ".join(f"coef.{n}" for n in names) + " in "
                     + json.dumps(cfg.coefficients.model_dump(exclude_none=True)))
    for label, point in start_points(cfg, template, names):
        lines.append(f"start point {label}: {json.dumps(point, default=str)}")
    lines += [f"sampler {cfg.sampler.name} (seed {cfg.sampler.seed}), budget {cfg.budget.model_dump()}, "
              f"objective {cfg.objective.metrics} on val "
              f"({'all items' if cfg.eval.limit is None else f'{cfg.eval.limit} items'} per task of {cfg.eval.tasks})",
              f"reference scores (val/normalized_average): {reference or 'none'}",
              f"registry {cfg.registry.name}: register {cfg.registry.register_policy}, top_k {cfg.registry.top_k}; "
              f"experiment {cfg.tracking.experiment!r}"]
    return "\n".join(lines)


def suggest(trial: optuna.Trial, cfg: CampaignConfig, expert_names: list[str]) -> tuple[dict[str, Any],
                                                                                          dict[str, float]]:
    """Sample the method's hyperparameters and the per-expert coefficients (``coef.<expert>``).

    On the enqueued defaults trial a searched hyperparameter whose default is ``None`` stays ``None`` (its
    :data:`NONE_DEFAULTS` number is only what Optuna records), so the merge is exactly the default one.
    """
    params = dict(cfg.params)
    for name, d in cfg.search_space.items():
        if d.type == "float":
            params[name] = trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)
        elif d.type == "int":
            params[name] = trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
        else:
            params[name] = trial.suggest_categorical(name, d.choices)
    if trial.user_attrs.get(START_ATTR) == "defaults":
        params = {k: v for k, v in params.items() if not (k in NONE_DEFAULTS and k not in cfg.params)}
    coefs: dict[str, float] = {}
    if cfg.coefficients is not None:
        c = cfg.coefficients
        for n in expert_names:
            coefs[n] = trial.suggest_float(f"coef.{n}", c.low, c.high, log=c.log, step=c.step)
        if trial.user_attrs.get(START_ATTR) == "defaults" and all(v == 1.0 for v in coefs.values()):
            coefs = {}  # all ones merge like none at all; keeping the template's makes the digest the default's
    return params, coefs
