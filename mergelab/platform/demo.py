"""`mergelab demo`: the paper's comparison, an OptMerge campaign and an earned promotion, in both settings.

For each setting (full fine-tuning, then LoRA), in its own MLflow experiment (``mergelab-demo-<setting>``):

1. the offline benchmark's data and the model zoo (shipped in the package; ``--tiny`` builds one in seconds);
2. reference runs: the base, each expert and the mixture model, scored on the test split (``test/*``);
3. the comparison: each of the paper's methods merged at every lambda of the paper's grid, scored on val (one run
   per merge under one comparison run); the val-selected lambda's run is scored on the test split too, and the
   paper's table layout is printed on test;
4. the comparison's best merge (by val) is registered as ``mergelab-demo-<setting>`` and promoted as the first
   ``champion`` if there is none;
5. an Optuna campaign over OptMerge (rank ratio, steps, lr, lambda, init and one coefficient per expert), starting
   from the paper's OptMerge and from OptMerge at its val-selected lambda, top-k registered;
6. its best version is promoted only if it beats the champion on the whole test split (paired bootstrap,
   :func:`mergelab.platform.promotion.promote`).

Re-running is idempotent: a merge whose recipe digest already has a finished run in the experiment is not merged
again (its numbers are reused), reference runs are reused, the campaign resumes (and runs nothing once its budget
is spent), a version already compared with the current champion is not compared again; the demo says what it
skipped and reports the champion the registry holds.

The omni section (modality merging on the shipped omni zoo, ``mergelab-demo-omni``) is
:mod:`mergelab.platform.demo_omni`; it shares this module's comparison (:class:`Sweep`), reuse and promotion steps.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from mergelab.bench.data import ensure_data
from mergelab.bench.tasks import TASKS
from mergelab.bench.zoo_build import build_zoo
from mergelab.bench.zoo_plan import DEFAULT_ZOO, SETTINGS, expert_names, read_manifest
from mergelab.bench.zoo_table import choose_lam, lam_candidates
from mergelab.engine import MergeRecipe
from mergelab.methods import METHODS
from mergelab.methods.base import LAM_GRID
from mergelab.methods.optmerge import init_methods
from mergelab.platform.campaign import run_campaign
from mergelab.platform.campaign_config import CampaignConfig
from mergelab.platform.campaign_space import recipe_template
from mergelab.platform.evaluation import HFEvaluator, log_eval
from mergelab.platform.merge_run import tracked_merge
from mergelab.platform.promotion import current_champion, promote
from mergelab.platform.registry import TEST_ITEMS_TAG, register_run
from mergelab.platform.store import TAG_CAMPAIGN, TAG_RECIPE, TAG_ROLE, Store, end_status, log_metrics
from mergelab.platform.ui import log_comparison

PAPER_METHODS: tuple[str, ...] = tuple(name for name, spec in METHODS.items() if spec.paper)
"""The nine merging rows of the paper's Tables 2 and 3, in its order (the method table's order)."""

EXPERIMENT = "mergelab-demo"
"""Prefix of the demo's experiments: ``mergelab-demo-<setting>`` (``-tiny`` for a tiny zoo)."""

OPTMERGE_SPACE: dict[str, dict[str, Any]] = {
    "rank_ratio": {"type": "float", "low": 0.05, "high": 0.5},
    "steps": {"type": "int", "low": 50, "high": 400, "step": 50},
    "lr": {"type": "float", "low": 1.0e-6, "high": 1.0e-1, "log": True},
    "lam": {"type": "float", "low": 0.05, "high": 1.5},
    "init": {"type": "categorical", "choices": ["mean", "sum"]},
}
"""The campaign's search space around the paper's OptMerge (its defaults in both settings lie inside).

``lr`` reaches 1e-1: on the zoo's seed-0 LoRA experts (val split), SGD run close to its minimiser (lr 1e-2 to 1e-1,
300 steps) at lambda 0.5 scores 33.4-35.3 against 28.7 for the paper's lr 1e-4 at lambda 1.0."""


def start_from_best_default(vals: dict[str, float], lams: dict[str, float | None],
                            space: dict[str, dict[str, Any]] | None = None
                            ) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """The campaign's search space and its start point from the comparison's val averages: OptMerge started from the
    merge of the best default method on val that can start it (``init=<method>``, the method's lambda, and where
    ``space`` searches them lr 1e-6 and 50 steps: nearly unmoved), so the campaign starts from that merge's val
    score; that method is added to ``init``'s choices. ``space`` defaults to :data:`OPTMERGE_SPACE` (it is copied,
    never changed); ``(space, None)`` when no compared method can start OptMerge."""
    space = copy.deepcopy(OPTMERGE_SPACE if space is None else space)
    can_start = init_methods()
    starts = [m for m in vals if m in can_start]
    if not starts:
        return space, None
    best = max(starts, key=vals.__getitem__)
    space["init"]["choices"] = [*space["init"]["choices"], best]
    lam = lams.get(best)
    start = {"init": best, "lam": 1.0 if lam is None else lam, "lr": 1.0e-6, "steps": 50}
    return space, {k: v for k, v in start.items() if k in space}


@dataclass
class SettingResult:
    """One setting's numbers (test rows for the table, the registry's outcome, what was skipped)."""

    setting: str
    experiment: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    champion: dict[str, Any] | None = None
    campaign: dict[str, Any] | None = None
    promotion: dict[str, Any] | None = None
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    table: str = ""  # the printed table when it is not the capability layout (the omni section's Table 5)


@dataclass
class DemoResult:
    """What :func:`run_demo` returns: one :class:`SettingResult` per setting."""

    settings: list[SettingResult] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class OnceEvaluator:
    """An evaluator that scores each (model directory, tasks, split) once per process and then returns the same
    result: the champion scored on the whole test split at the first promotion is not scored again when the
    campaign's best is compared with it (the same items, the same process)."""

    inner: HFEvaluator
    seen: dict[tuple[str, tuple[str, ...], str], Any] = field(default_factory=dict)

    def __call__(self, model_dir: Path, tasks: Sequence[str], split: str, on_task: Any = None) -> Any:
        key = (str(Path(model_dir).resolve()), tuple(tasks), split)
        if key not in self.seen:
            self.seen[key] = self.inner(model_dir, tasks, split, on_task)
        return self.seen[key]


def _ensure_zoo(zoo: Path, tiny: bool, seed: int, settings: Sequence[str], log: Callable[[str], None]) -> None:
    try:
        models = read_manifest(zoo).get("models", {})
    except FileNotFoundError:
        models = {}
    needed = [f"seed{seed}/base", f"seed{seed}/mixture", *(n for s in settings for n in expert_names(seed, s))]
    if all(n in models and (zoo / n).is_dir() for n in needed):
        return
    log(f"building the model zoo under {zoo} ({'tiny, seconds' if tiny else 'about 20 minutes on 2 CPU cores'})")
    build_zoo(zoo, tiny=tiny, progress=True, seeds=[seed])


def format_rows(rows: Sequence[dict[str, Any]], tasks: Sequence[str] = TASKS) -> str:
    """The paper's table layout: one row per model/merge, one column per task and the average (percent)."""
    head = f"{'model':<34}{'lam':>5} " + "".join(f"{t[:9]:>10}" for t in tasks) + f"{'avg':>8}"
    if any(r.get("items") is not None for r in rows):
        head += f"{'items':>8}"
    out = [head, "-" * len(head)]
    for r in rows:
        lam = r.get("lam")
        lam_s = "" if lam is None else f"{lam:.2f}"
        cells = "".join(f"{r['scores'].get(t, math.nan):>10.1f}" for t in tasks)
        items = "" if r.get("items") is None else f"{r['items']:>8}"
        out.append(f"{r['name'][:34]:<34}{lam_s:>5} {cells}{r['average']:>8.1f}{items}")
    return "\n".join(out)


def finished_run(client: MlflowClient, exp_id: str, filt: str, metric: str) -> Any | None:
    """The newest FINISHED run of the experiment matching ``filt`` that has ``metric`` (None if none)."""
    runs = client.search_runs([exp_id], filter_string=f"{filt} and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=5)
    return next((r for r in runs if metric in r.data.metrics), None)


def _row(name: str, lam: float | None, metrics: dict[str, float], run_id: str | None, items: str | None = None,
         split: str = "test") -> dict[str, Any]:
    """A table row; ``items``: how many test items its scores average over (the ``test.items`` tag)."""
    scores = {t: metrics.get(f"{split}/{t}", math.nan) for t in TASKS}
    return {"name": name, "lam": lam, "scores": scores, "average": metrics.get(f"{split}/average", math.nan),
            "run_id": run_id, "items": int(items) if items else None}


def _test_scores(client: MlflowClient, run_id: str, path: Path, test_eval: HFEvaluator) -> dict[str, float]:
    """The run's ``test/*`` metrics, evaluating ``path`` once when the run has none yet."""
    metrics = client.get_run(run_id).data.metrics
    if "test/average" not in metrics:
        res = test_eval(path, TASKS, "test")
        metrics = {**metrics, **log_eval(client, run_id, res)}
        client.set_tag(run_id, TEST_ITEMS_TAG, str(len(res.records)))
    return metrics


def promote_once(name: str, version: str, store: Store, test_eval: OnceEvaluator, out: SettingResult,
                 log: Callable[[str], None], tasks: Sequence[str] = TASKS) -> dict[str, Any]:
    """Promote ``version`` (evaluated on ``tasks``) unless it was already compared with the champion that holds
    the alias now."""
    client = store.client()
    tags = client.get_model_version(name, version).tags
    champ = current_champion(client, name)
    done = tags.get("promotion.decision")
    if champ == version or (done and tags.get("promotion.champion_version") == (champ or "")):
        out.skipped.append(f"promotion of v{version}: already {done or 'champion'} against champion v{champ}")
        return {"candidate": version, "champion_before": champ, "decision": done or "already_champion",
                "reason": tags.get("promotion.reason", "already champion"), "skipped": True}
    d = promote(name, version=version, tasks=tasks, evaluator=test_eval, store=store)
    log(f"      v{version}: {d.decision}: {d.reason}")
    return {"candidate": d.candidate, "champion_before": d.champion, "decision": d.decision, "delta": d.delta,
            "ci": [d.ci_low, d.ci_high], "reason": d.reason, "test_items": d.test_items, "skipped": False}


@contextlib.contextmanager
def comparison_run(client: MlflowClient, exp_id: str, run_name: str, setting: str) -> Iterator[str]:
    """The comparison's parent run (its id), FINISHED after the block or ended with the block's failure."""
    pid = client.create_run(exp_id, run_name=run_name, tags={TAG_ROLE: "comparison", TAG_CAMPAIGN: "demo-comparison",
                                                             "mergelab.setting": setting}).info.run_id
    try:
        yield pid
        client.set_terminated(pid, "FINISHED")
    except BaseException as e:
        client.set_terminated(pid, end_status(e))
        raise


@dataclass
class Sweep:
    """One comparison's lambda sweeps (:meth:`select`, one method at a time) under its parent run ``pid``: merges
    already tracked are reused (``reused`` counts them), ``best`` is the best method so far by val
    ``(val, method, params, run id, merged uri)``, ``lams`` each method's val-selected lambda and ``vals`` its val
    average there."""

    client: MlflowClient
    exp_id: str
    store: Store
    experiment: str
    pid: str
    template: MergeRecipe
    setting: str
    evaluator: HFEvaluator
    reference: dict[str, float]
    tasks: Sequence[str] = TASKS
    tags: Callable[[str, float | None], dict[str, str]] | None = None
    reused: int = 0
    best: tuple[float, str, dict[str, Any], str, str] | None = None
    lams: dict[str, float | None] = field(default_factory=dict)
    vals: dict[str, float] = field(default_factory=dict)

    def select(self, method: str, lam_grid: Sequence[float]) -> tuple[float | None, float, str, str]:
        """Merge ``method`` at each lambda of ``lam_grid`` (its own scale if it has none), score each on val and tag
        the best run ``mergelab.selected``; returns ``(lambda, val average, run id, merged uri)`` of that run."""
        params = METHODS[method].setting_params(self.setting)
        scored: list[tuple[float | None, float, dict[str, Any], str, str]] = []
        for lam in lam_candidates(method, lam_grid):
            p = dict(params) if lam is None else {**params, "lam": lam}
            recipe = self.template.replace(method=method, params=p)
            rid, uri, (val, again) = merged_run(self.client, self.exp_id, recipe, self.store, self.experiment,
                                                self.pid, self.evaluator, self.reference, self.tasks,
                                                self.tags(method, lam) if self.tags else None)  # fmt: skip
            self.reused += again
            scored.append((lam, val, p, rid, uri))
        lam, val = choose_lam((s[0], s[1]) for s in scored)
        _, _, p, rid, uri = next(s for s in scored if s[0] == lam)
        self.client.set_tag(rid, "mergelab.selected", "val-selected lambda")
        self.lams[method], self.vals[method] = lam, val
        if self.best is None or val > self.best[0]:
            self.best = (val, method, p, rid, uri)
        return lam, val, rid, uri

    def register_best(self, name: str, test_eval: OnceEvaluator, out: SettingResult,
                      log: Callable[[str], None]) -> None:
        """Register the best merge by val as a version of ``name`` and promote it (the first ``champion`` when there
        is none); ``out.champion`` says what happened."""
        assert self.best is not None, "no method was compared"
        val, method, params, rid, uri = self.best
        log(f"[{out.setting}] registering the comparison's best ({method}, val {val:.2f}) as '{name}'")
        mv = register_run(self.client, name, rid, uri, score=val,
                          tags={"method": method, "eval.tasks": json.dumps(list(self.tasks)),
                                "campaign": "demo-comparison", **{f"hp.{k}": v for k, v in params.items()},
                                "val/average": f"{val:.4f}"})  # fmt: skip
        first = promote_once(name, str(mv.version), self.store, test_eval, out, log, self.tasks)
        out.champion = {"version": str(mv.version), "method": method, **first}

    def note_reused(self, out: SettingResult) -> None:
        """Say in ``out.skipped`` how many merges were reused."""
        if self.reused:
            out.skipped.append(f"comparison: {self.reused} merges already tracked (same recipe digest), not merged "
                               "again")


def run_setting(setting: str, *, zoo_dir: Path, data_dir: Path, store: Store, seed: int, tiny: bool,
                methods: Sequence[str], lam_grid: Sequence[float], trials: int, limit: int | None,
                test_limit: int | None, device: str, log: Callable[[str], None]) -> SettingResult:
    """One setting of :func:`run_demo` (see the module docstring)."""
    t0 = time.perf_counter()
    suffix = "-tiny" if tiny else ""
    experiment, name = f"{EXPERIMENT}-{setting}{suffix}", f"mergelab-demo-{setting}{suffix}"
    out = SettingResult(setting=setting, experiment=experiment)
    base_cfg = dict(name=f"demo-optmerge-{setting}-s{seed}{suffix}",
                    experts={"zoo": str(zoo_dir), "kind": setting, "seed": seed}, method="optmerge",
                    policy="qwen2_vl", device=device, seed=seed,
                    eval={"tasks": list(TASKS), "data_root": str(data_dir), "limit": limit},
                    tracking={"experiment": experiment})  # fmt: skip
    template, reference = recipe_template(CampaignConfig.model_validate(base_cfg))
    evaluator = HFEvaluator(data_root=str(data_dir), limit=limit, device=device)
    table_eval = HFEvaluator(data_root=str(data_dir), limit=test_limit, device=device)
    whole_test = OnceEvaluator(HFEvaluator(data_root=str(data_dir), limit=None, device=device))
    client = store.client()
    exp_id = store.experiment_id(experiment, client)

    log(f"[{setting}] reference runs: base, experts, mixture (test split)")
    refs = [("base", template.base)] + [(f"expert {e.name}", e.path) for e in template.experts]
    refs.append(("mixture", str(zoo_dir / f"seed{seed}" / "mixture")))
    for label, path in refs:
        run = finished_run(client, exp_id, f"tags.`{TAG_ROLE}` = 'reference' and tags.`mergelab.reference` = "
                                            f"'{label}'", "test/average")
        if run is None:
            run = client.create_run(exp_id, run_name=label, tags={TAG_ROLE: "reference", "mergelab.reference": label,
                                                                  "mergelab.path": str(path)})
            res = table_eval(Path(path), TASKS, "test")  # a LoRA adapter loads onto its base (mergelab.hf)
            metrics = log_eval(client, run.info.run_id, res)
            client.set_tag(run.info.run_id, TEST_ITEMS_TAG, str(len(res.records)))
            client.set_terminated(run.info.run_id, "FINISHED")
        else:
            metrics = run.data.metrics
            out.skipped.append(f"reference {label}: run {run.info.run_id[:8]} reused")
        out.rows.append(_row(label, None, metrics, run.info.run_id, items_tag(client, run.info.run_id)))

    log(f"[{setting}] comparing {len(methods)} methods, lambda on val ({list(lam_grid)})")
    with comparison_run(client, exp_id, f"demo-comparison-{setting}-s{seed}", setting) as pid:
        sweep = Sweep(client, exp_id, store, experiment, pid, template, setting, evaluator, reference)
        for method in methods:
            lam, avg, rid, uri = sweep.select(method, lam_grid)
            metrics = _test_scores(client, rid, Path(local_path(uri)), table_eval)
            out.rows.append(_row(method, lam, metrics, rid, items_tag(client, rid)))
            log(f"      {method:<22} lam {lam}: val {avg:.2f}, test {metrics['test/average']:.2f}")
        log_comparison(client, pid, out.rows, TASKS, title=f"{setting}: test split, lambda selected on val")
    sweep.note_reused(out)

    sweep.register_best(name, whole_test, out, log)
    optmerge_lam = sweep.lams.get("optmerge")

    if trials > 0:
        log(f"[{setting}] Optuna campaign over OptMerge with coefficients ({trials} trials, TPE, val only)")
        default_lam = template.replace(params={"variant": setting}).hyperparameters.get("lam")
        enqueue = [{"lam": optmerge_lam}] if optmerge_lam not in (None, default_lam) else []  # else trial 0 is it
        space, start = start_from_best_default(sweep.vals, sweep.lams)
        if start is not None:
            log(f"[{setting}] start point: OptMerge from the {start['init']} merge (lam {start['lam']}; the best on "
                f"val of the compared methods OptMerge can start from)")
            enqueue.append(start)
        cfg = CampaignConfig.model_validate({
            **base_cfg, "params": {"variant": setting}, "search_space": space,
            "coefficients": {"low": 0.5, "high": 1.5}, "enqueue": enqueue,
            # TPE draws its first n_startup_trials (10 by default) at random: in an 8-trial campaign it would never
            # model anything
            "sampler": {"name": "tpe", "seed": seed, "options": {"n_startup_trials": 4}},
            "budget": {"n_trials": trials}, "registry": {"name": name, "register": "top_k", "top_k": 2}})
        before = n_trials(cfg, store)
        camp = run_campaign(cfg, store=store, evaluator=evaluator, test_evaluator=whole_test)
        if before >= trials:
            out.skipped.append(f"campaign {cfg.name}: its {before} trials are done (budget {trials}); nothing run")
        out.campaign = {"study": camp.study_name, "run_id": camp.parent_run_id, "complete": camp.n_complete,
                        "failed": camp.n_failed, "best": camp.best, "registered": camp.registered}  # fmt: skip
        if camp.registered:
            best_version = camp.registered[0][0]
            log(f"[{setting}] promotion: campaign best v{best_version} vs champion on the whole test split")
            out.promotion = promote_once(name, best_version, store, whole_test, out, log)
            tags = client.get_model_version(name, best_version).tags
            if "test/average" in tags:
                metrics = {k: float(v) for k, v in tags.items() if k.startswith("test/")}
                hp = camp.best["params"] if camp.best else {}
                out.rows.append(_row(f"optmerge tuned (trial {tags.get('trial', '?')}, whole test)",
                                     hp.get("lam"), metrics, tags.get("run_id"), tags.get(TEST_ITEMS_TAG)))
    champ = current_champion(client, name)
    if champ is not None:
        t = client.get_model_version(name, champ).tags
        out.champion = {**(out.champion or {}), "holder": champ, "holder_method": t.get("method", "?"),
                        "holder_test_average": t.get("test/average", "")}
    out.seconds = time.perf_counter() - t0
    log_metrics(client, pid, {"demo/seconds": out.seconds})
    return out


def items_tag(client: MlflowClient, run_id: str) -> str | None:
    """The run's ``test.items`` tag: how many test items its ``test/*`` scores average over (None: not scored)."""
    return client.get_run(run_id).data.tags.get(TEST_ITEMS_TAG)


def local_path(uri: str) -> str:
    """The local path of a ``file://`` artifact URI (the embedded store's)."""
    return uri.removeprefix("file://")


def merged_run(client: MlflowClient, exp_id: str, recipe: MergeRecipe, store: Store, experiment: str, pid: str,
               evaluator: HFEvaluator, reference: dict[str, float], tasks: Sequence[str] = TASKS,
               tags: dict[str, str] | None = None) -> tuple[str, str, tuple[float, int]]:
    """``(run id, merged uri, (val average, reused))``: the experiment's finished comparison run of this recipe (same
    digest, weights present; never a campaign's trial of the same merge) or a new tracked merge under the comparison
    run ``pid``, scored on ``tasks`` (val split), with ``tags`` added to the run. The val average is the logged one
    (4 decimals) either way, so a re-run selects the same lambda among near-ties."""
    run = finished_run(client, exp_id, f"tags.`{TAG_RECIPE}` = '{recipe.digest}' and "
                                       f"tags.`{TAG_CAMPAIGN}` = 'demo-comparison'", "val/average")
    if run is not None and run.data.tags.get("mergelab.weights") != "deleted":
        uri = run.data.tags.get("mergelab.merged_uri", f"{run.info.artifact_uri}/merged")
        if Path(local_path(uri)).is_dir():
            return run.info.run_id, uri, (run.data.metrics["val/average"], 1)
    lam = recipe.params.get("lam")
    tm = tracked_merge(recipe, store=store, experiment=experiment, parent_run_id=pid,
                       run_name=f"{recipe.method_name}" + ("" if lam is None else f"-lam{lam:g}"),
                       tags={TAG_CAMPAIGN: "demo-comparison", **(tags or {})}, tasks=tasks, evaluator=evaluator,
                       reference_scores=reference)  # fmt: skip
    assert tm.val is not None
    return tm.run_id, tm.merged_uri, (round(tm.val.average, 4), 0)


def n_trials(cfg: CampaignConfig, store: Store) -> int:
    """How many trials the campaign's study holds already (0: no study yet)."""
    import optuna

    try:
        return len(optuna.load_study(study_name=cfg.study_name, storage=store.optuna_storage).trials)
    except KeyError:
        return 0


def run_demo(
    *,
    zoo: str | Path | None = None,
    settings: Sequence[str] = SETTINGS,
    seed: int = 0,
    tiny: bool = False,
    methods: Sequence[str] = PAPER_METHODS,
    lam_grid: Sequence[float] = LAM_GRID,
    trials: int = 8,
    limit: int | None = 100,
    test_limit: int | None = 300,
    root: str | Path | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
    data_sizes: dict[str, int] | None = None,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo (see the module docstring) and return its numbers.

    Args:
        zoo: the model zoo (default: the one shipped in the package; ``tiny`` builds ``<root>/zoo-tiny``).
        settings: ``"full"`` and/or ``"lora"``.
        seed: which zoo seed's base and experts to merge.
        tiny: use a seconds-to-build tiny zoo (for tests and smoke runs).
        methods: merging methods to compare.
        lam_grid: lambda values swept on val for methods that have a lambda.
        trials: Optuna trials of each OptMerge campaign (0 skips the campaigns).
        limit: val items per task for the lambda sweep and the campaign (None: the whole split).
        test_limit: test items per task for the table's rows (None: the whole split; the item count is the
            runs' ``test.items`` tag); promotion always evaluates the whole test split.
        root: the embedded store's directory (default ``./mlruns`` or ``$MERGELAB_ROOT``).
        data_root: the benchmark data's root (default ``$MERGELAB_DATA`` or ``~/.cache/mergelab/data``).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        data_sizes: samples per split to generate (default: the benchmark's sizes; smaller for smoke tests).
        log: one-line logger.
    """
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings:
        raise ValueError(f"settings must be among {SETTINGS}, got {list(settings)}")
    t0 = time.perf_counter()
    store = Store.resolve(root)
    zoo_dir = Path(zoo) if zoo is not None else (Path(store.tracking_uri.removeprefix("sqlite:///")).parent /
                                                 "zoo-tiny" if tiny else DEFAULT_ZOO)  # fmt: skip
    log(f"data and zoo ({zoo_dir})")
    data_dir = ensure_data(data_root, tasks=TASKS, splits=("val", "test"), sizes=data_sizes)
    _ensure_zoo(zoo_dir, tiny, seed, settings, log)
    result = DemoResult()
    for setting in settings:
        result.settings.append(run_setting(
            setting, zoo_dir=zoo_dir, data_dir=data_dir, store=store, seed=seed, tiny=tiny, methods=methods,
            lam_grid=lam_grid, trials=trials, limit=limit, test_limit=test_limit, device=device, log=log))
    result.seconds = time.perf_counter() - t0
    return result
