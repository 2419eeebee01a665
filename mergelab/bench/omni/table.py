"""The omni experiment: single-modality experts vs every merging method on the cross-modal sets (paper Table 5).

For each seed: build what is missing (:func:`mergelab.bench.omni.build.build`), score each expert with only its
own modality (the paper's "individual" columns), merge the three experts with every registered method through the
engine (``carry_unique=True``: each tower comes from its one owner, bit for bit; with ``lora_modes`` ``factors``
also the LoRA adapters themselves on their raw factors, connectors owned), pick lambda on the val split by
the cross-modal average, and score the chosen merge on the test split. Rows: the two cross-modal sets and their
average, then each modality's own tasks; columns: the three experts, every method and, as the paper's "online
composing" reference, the experts composed at inference without merging (``compose``: NaiveMC and DAMC,
:mod:`mergelab.bench.omni.compose`; not merges, so never the targets' best merge); mean and spread over seeds.

Entry point: :func:`run` (``mergelab bench omni``, ``python -m mergelab.bench.omni``). Every merge goes through a
:data:`Merger` (default: the engine's :func:`~mergelab.engine.run_merge`); ``mergelab bench omni --track`` passes
one that makes each merge an MLflow run, and gets each chosen merge's test scores through ``on_scores``.
"""

from __future__ import annotations

import functools
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mergelab.bench.omni import data, metrics
from mergelab.bench.omni.build import OmniPlan, build, usable_jobs
from mergelab.bench.omni.compose import MODES as COMPOSE_MODES
from mergelab.bench.omni.compose import compose_seed
from mergelab.bench.omni.train import answers
from mergelab.engine import MergeRecipe, run_merge
from mergelab.hf import quiet_transformers, resolve_device
from mergelab.methods import METHODS
from mergelab.methods.base import LAM_GRID

MODALITY_NAMES = {"image": "vision", "audio": "audio", "video": "video"}
"""Table column names of the experts (the paper's Vision / Audio / Video)."""


@dataclass(frozen=True)
class EvalSizes:
    """Items per evaluation: each cross-modal set and each single-modality task, on val and on test.

    The test sizes make one cell's binomial standard error at most about 3 points (252 items) and the
    cross-modal average's about 2, so a 5-point difference is measurable; 252 is a multiple of both sets'
    question-type counts (7 and 6), so every type has the same number of items.
    """

    cross_val: int = 84
    task_val: int = 30
    cross_test: int = 252
    task_test: int = 120

    @classmethod
    def quick(cls) -> EvalSizes:
        return cls(cross_val=14, task_val=6, cross_test=14, task_test=6)


def eval_items(split: str, sizes: EvalSizes, seed: int) -> tuple[dict[str, list[data.OmniSample]], ...]:
    """``(cross sets, tasks)`` of ``split``: ``{name: items}`` each."""
    nc, nt = (sizes.cross_val, sizes.task_val) if split == "val" else (sizes.cross_test, sizes.task_test)
    cross = {c: data.cross_samples(c, split, nc, seed) for c in data.CROSS_SETS}
    tasks = {t: data.task_samples(t, split, nt, seed) for t in data.TASKS}
    return cross, tasks


def score_cross(model: Any, processor: Any, cross: dict[str, list[data.OmniSample]],
                only: str | None = None) -> dict[str, float]:
    """Scores of ``model`` on each cross-modal set (and per question type) and their average ``cross_avg``: the
    first part of :func:`evaluate`, and all that the val split's lambda choice reads."""
    out: dict[str, float] = {}
    for name, samples in cross.items():
        shown = [s.only((only,)) for s in samples] if only else samples
        for k, v in metrics.score(samples, answers(model, processor, shown)).items():
            out[name if k == "accuracy" else f"{name}/{k}"] = v
    out["cross_avg"] = statistics.fmean(out[c] for c in data.CROSS_SETS)
    return out


def evaluate(model: Any, processor: Any, items: tuple[dict[str, list[data.OmniSample]], ...],
             only: str | None = None) -> dict[str, float]:
    """Scores of ``model``: each cross-modal set (and per question type), their average ``cross_avg``, each task
    and each modality's mean ``own/<modality>``. ``only``: feed only that modality (an expert; its own tasks)."""
    cross, tasks = items
    out = score_cross(model, processor, cross, only)
    for modality in data.MODALITIES if only is None else (only,):
        names = [t for t, (m, _, _) in data.TASKS.items() if m == modality]
        for t in names:
            out[f"task/{t}"] = metrics.score(tasks[t], answers(model, processor, tasks[t]))["accuracy"]
        out[f"own/{modality}"] = statistics.fmean(out[f"task/{t}"] for t in names)
    return out


def _load(path: Path) -> Any:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True).eval()


Merger = Callable[[MergeRecipe, Path, str], Any]
"""Runs one merge: ``merger(recipe, out, name)`` writes the merged model to ``out`` (``name``:
``seed<k>/<setting>/<method>/lam<lam>``) and returns the engine's report."""


def engine_merger(recipe: MergeRecipe, out: Path, name: str) -> Any:
    """The default :data:`Merger`: the engine alone (``overwrite``: the table reuses one output directory)."""
    return run_merge(recipe, out, overwrite=True)


def merge_experts(root: Path, setting: str, method: str, lam: float | None, out: Path, device: str = "cpu",
                  merger: Merger | None = None, name: str = "", lora_merge: str = "delta") -> Any:
    """Merge seed directory ``root``'s three ``setting`` experts with ``method`` at ``lam`` into ``out``.

    ``lora_merge="delta"`` merges the stripped ``merge/`` layout (towers carried from their one holder);
    ``"factors"`` (LoRA experts only) merges the peft adapters themselves on their raw factors, the connectors taken
    from each adapter's ``modules_to_save`` (policy ``auto``: the ``omni_thinker`` preset's ``owner`` rules).
    """
    spec = METHODS[method]
    if lora_merge == "factors":
        if setting != "lora":
            raise ValueError(f"lora_merge 'factors' merges LoRA experts, not the {setting!r} setting")
        # the factor mode adds the method's LoRA settings (OptMerge: the official script's) itself
        recipe = MergeRecipe.build(base=root / "base", method=method, params={} if lam is None else {"lam": lam},
                                   experts=[{"path": root / "experts" / "lora" / m / "adapter", "name": m}
                                            for m in data.MODALITIES],
                                   policy="auto", lora_merge="factors", device=device)
    else:
        params = spec.setting_params(setting)
        if lam is not None:
            params["lam"] = lam
        recipe = MergeRecipe.build(base=root / "merge" / "base", method=method, params=params, policy="llama",
                                   experts=[{"path": root / "merge" / setting / m, "name": m}
                                            for m in data.MODALITIES],
                                   carry_unique=True, device=device)
    return (merger or engine_merger)(recipe, out, name or f"{setting}/{method}/lam{lam}")


def methods_to_run(names: Sequence[str] | None = None) -> list[str]:
    """The methods of the table: ``names`` or every registered paper method."""
    if names:
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {sorted(METHODS)}")
        return list(names)
    return [n for n, s in METHODS.items() if s.paper]


@dataclass(frozen=True)
class EvalJob:
    """One evaluation of the table, run by :func:`run_eval` in a worker process or in place.

    Attributes:
        root: the seed directory (its base's processor; the experts of a composition).
        split: ``val`` or ``test``.
        sizes: items per evaluation.
        seed: the zoo seed (the items' seed).
        model: the model directory to load; empty for a composition.
        only: feed only this modality (an expert, scored on its own tasks).
        compose: ``(setting, mode)`` of an online composition (:func:`~mergelab.bench.omni.compose.compose_seed`).
        device: the composition's device.
        cross_only: score only the cross-modal sets (:func:`score_cross`: all that the val split's lambda choice
            reads), not each modality's tasks.
    """

    root: str
    split: str
    sizes: EvalSizes
    seed: int
    model: str = ""
    only: str | None = None
    compose: tuple[str, str] | None = None
    device: str = "cpu"
    cross_only: bool = False


@functools.lru_cache(maxsize=4)
def _items(split: str, sizes: EvalSizes, seed: int) -> tuple[dict[str, list[data.OmniSample]], ...]:
    """:func:`eval_items`, made once per process (the table's parent makes them before its workers fork)."""
    return eval_items(split, sizes, seed)


@functools.lru_cache(maxsize=4)
def _processor(root: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(Path(root) / "base")


def run_eval(job: EvalJob) -> tuple[dict[str, float], str]:
    """Run one :class:`EvalJob` on one torch thread: its :func:`evaluate` scores and a note (for a composition:
    how many deltas it keeps on how many layers; else empty)."""
    torch.set_num_threads(1)
    note = ""
    if job.compose is not None:
        composed = compose_seed(job.root, *job.compose, device=job.device)
        model, note = composed.model, f"{len(composed.experts)} deltas kept on {len(composed.layers)} layers"
    else:
        model = _load(Path(job.model))
    items = _items(job.split, job.sizes, job.seed)
    if job.cross_only:
        return score_cross(model, _processor(job.root), items[0], job.only), note
    return evaluate(model, _processor(job.root), items, only=job.only), note


class InPlace(Executor):
    """An executor that runs each job when it is submitted, in this process (the table with one job)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


@dataclass
class _Results:
    """The test scores of one seed's table, taken in the table's order as they finish (:meth:`take`)."""

    seed: int
    order: list[str]
    tests: dict[str, Future[tuple[dict[str, float], str]]]
    chosen: dict[str, float | None]
    log: Callable[[str], None]
    on_scores: Callable[[str, dict[str, float]], None] | None
    models: dict[str, dict[str, float]] = field(default_factory=dict)

    def take(self, wait: bool) -> None:
        """Take the next models' scores while they are done (every one, waiting, with ``wait``): log a merge's or
        a composition's line, pass a merge's scores to ``on_scores``."""
        while len(self.models) < len(self.order):
            name = self.order[len(self.models)]
            future = self.tests.get(name)
            if future is None or not (wait or future.done()):
                return
            self.models[name], note = future.result()
            cross = self.models[name]["cross_avg"]
            if name.startswith("compose/"):
                self.chosen[name] = None
                self.log(f"omni seed {self.seed}: {name} (online, {note}) cross avg {cross:.1f}")
            elif not name.startswith("expert/"):
                if self.on_scores is not None:
                    self.on_scores(f"seed{self.seed}/{name}", self.models[name])
                self.log(f"omni seed {self.seed}: {name} lam {self.chosen[name]} cross avg {cross:.1f}")


def run_seed(zoo: str | Path, seed: int, *, plan: OmniPlan | None = None, sizes: EvalSizes | None = None,
             methods: Sequence[str] | None = None, lam_grid: Sequence[float] = (0.5, 1.0, 1.5),
             jobs: int | None = 1, device: str = "cpu", log: Callable[[str], None] = print,
             merger: Merger | None = None, on_scores: Callable[[str, dict[str, float]], None] | None = None,
             lora_modes: Sequence[str] = ("delta",), compose: Sequence[str] = ()) -> dict[str, Any]:
    """One seed of the experiment: ``{"models": {name: scores}, "lam": {name: chosen}, "seconds": ...}``.

    ``lora_modes``: how LoRA experts are merged, ``delta`` (model ``lora/<method>``) and/or ``factors`` (model
    ``lora/<method>/factors``, :func:`merge_experts`). ``compose``: online composition modes (``naivemc``,
    ``damc``; model ``compose/<mode>/<setting>``, :func:`~mergelab.bench.omni.compose.compose_seed`), scored on
    test with every medium like the merges (no lambda: chosen ``None``).

    ``jobs``: processes for the expert training (:func:`~mergelab.bench.omni.build.build`) and then for the
    evaluations (one torch thread each; None: the usable cores, :func:`~mergelab.bench.omni.build.usable_jobs`;
    on CUDA the evaluations stay in this process). This process runs every merge, each at every lambda into its
    own directory, and hands each evaluation to a worker; the results are gathered in a fixed order, so the
    scores, the log lines and the returned dict equal those of ``jobs=1``.

    ``merger`` runs each merge (:data:`Merger`), always in this process; ``on_scores(f"seed<k>/<setting>/<method>",
    test scores)`` is called, in the table's order, once the chosen merge (the last one of that name, merged again
    at its lambda after the val sweep) is scored on test.

    Model names: ``expert/<modality>/<setting>``, ``<setting>/<method>``, ``lora/<method>/factors`` and
    ``compose/<mode>/<setting>``.
    """
    t0 = time.perf_counter()
    plan = plan or OmniPlan()
    sizes = sizes or EvalSizes()
    root = build(zoo, seed, plan, jobs=jobs, device=device, log=log)
    for split in ("val", "test"):
        _items(split, sizes, seed)
    _processor(str(root))
    job = functools.partial(EvalJob, str(root), sizes=sizes, seed=seed, device=device)
    merges = [(setting, method, mode, f"{setting}/{method}" + ("/factors" if mode == "factors" else ""))
              for setting in plan.settings for method in methods_to_run(methods)
              for mode in (lora_modes if setting == "lora" else ("delta",))]
    grids = {name: (tuple(lam_grid) if METHODS[method].has_lam else (None,)) for _, method, _, name in merges}
    order = [n for setting in plan.settings for n in [f"expert/{m}/{setting}" for m in data.MODALITIES]
             + [n for s, _, _, n in merges if s == setting] + [f"compose/{mode}/{setting}" for mode in compose]]
    workers = usable_jobs(jobs, len(order)) if resolve_device(device).type == "cpu" else 1
    tests: dict[str, Future[tuple[dict[str, float], str]]] = {}
    chosen: dict[str, float | None] = {}
    results = _Results(seed, order, tests, chosen, log, on_scores)
    with tempfile.TemporaryDirectory() as tmp, (ProcessPoolExecutor(workers) if workers > 1 else InPlace()) as pool:
        for setting in plan.settings:
            for m in data.MODALITIES:
                tests[f"expert/{m}/{setting}"] = pool.submit(
                    run_eval, job("test", model=str(root / "experts" / setting / m), only=m))
            for mode in compose:
                tests[f"compose/{mode}/{setting}"] = pool.submit(run_eval, job("test", compose=(setting, mode)))
        vals: dict[tuple[str, float | None], Future[tuple[dict[str, float], str]]] = {}
        for i, (setting, method, mode, name) in enumerate(merges):  # every merge first, its val scoring queued
            for lam in grids[name]:
                out = Path(tmp) / str(i) / f"lam{lam}"
                merge_experts(root, setting, method, lam, out, device, merger, f"seed{seed}/{name}/lam{lam}", mode)
                if len(grids[name]) > 1:
                    vals[name, lam] = pool.submit(run_eval, job("val", model=str(out), cross_only=True))
        for i, (setting, method, mode, name) in enumerate(merges):  # lambda on val, then the chosen merge on test
            best: tuple[float, float | None] = (-1.0, None)
            for lam in grids[name]:
                score = vals[name, lam].result()[0]["cross_avg"] if len(grids[name]) > 1 else 0.0
                best = max(best, (score, lam), key=lambda x: x[0])
                shutil.rmtree(Path(tmp) / str(i) / f"lam{lam}")
            out = Path(tmp) / str(i) / "chosen"
            merge_experts(root, setting, method, best[1], out, device, merger, f"seed{seed}/{name}/lam{best[1]}", mode)
            tests[name], chosen[name] = pool.submit(run_eval, job("test", model=str(out))), best[1]
            results.take(wait=False)
        results.take(wait=True)
    return {"models": results.models, "lam": {n: chosen[n] for n in order if n in chosen},
            "seconds": time.perf_counter() - t0}


def aggregate(per_seed: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {metric: {"mean", "std", "n"}}}`` over seeds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in per_seed[0]["models"]:
        for metric in per_seed[0]["models"][name]:
            values = [r["models"][name][metric] for r in per_seed if metric in r["models"].get(name, {})]
            out.setdefault(name, {})[metric] = {"mean": statistics.fmean(values), "n": len(values),
                                               "std": statistics.pstdev(values) if len(values) > 1 else 0.0}
    return out


def format_table(agg: dict[str, dict[str, dict[str, float]]], setting: str) -> str:
    """Table 5's layout for one expert setting: rows = cross-modal sets, their average, each modality's tasks;
    columns under the paper's headings: the experts ("individual"), the merges ("static merging") and the online
    compositions ("online composing", ``compose/<mode>``)."""
    groups = [("individual", [(MODALITY_NAMES[m], f"expert/{m}/{setting}") for m in data.MODALITIES]),
              ("static merging", [(n.split("/", 1)[1], n) for n in agg if n.startswith(f"{setting}/")]),
              ("online composing", [("/".join(n.split("/")[:2]), n) for n in agg
                                    if n.startswith("compose/") and n.endswith(f"/{setting}")])]
    cols = [c for _, g in groups for c in g]
    rows = [("MUSIC-AVQA", "music_avqa"), ("AVQA", "avqa"), ("Avg.", "cross_avg")]
    rows += [(f"own {m}", f"own/{m}") for m in data.MODALITIES]
    width = max(12, *(len(c) for c, _ in cols))
    heading = "".ljust(12)
    for label, g in groups:
        span = len(g) * (width + 1)
        label = label if len(label) + 2 < span else label.split()[-1]
        heading += f" {label} ".center(span - 1, "-").rjust(span) if g else ""
    lines = [f"omni table ({setting} experts; test split; mean ± spread over seeds)", heading,
             "dataset".ljust(12) + "".join(c.rjust(width + 1) for c, _ in cols)]
    for label, key in rows:
        cells = []
        for _, name in cols:
            v = agg.get(name, {}).get(key)
            cells.append((f"{v['mean']:.1f}±{v['std']:.1f}" if v else "-").rjust(width + 1))
        lines.append(label.ljust(12) + "".join(cells))
    return "\n".join(lines)


def targets(agg: dict[str, dict[str, dict[str, float]]], setting: str) -> dict[str, Any]:
    """The experiment's targets on the seed means of one expert setting.

    ``best``: the method with the highest mean cross-modal average; ``margin``: its lead over the best expert on
    that average (target >= 5); ``own_loss/<m>``: how much the best merge's own-task mean of modality ``m`` is below
    that modality's expert (target <= 5 each); ``spread``: the highest minus the lowest method's cross-modal
    average (target >= 5). Only merges (``<setting>/...``) count: the experts and the online compositions
    (``compose/...``, which keep every expert's delta) are not merges.
    """
    merges = {n: v for n, v in agg.items() if n.startswith(f"{setting}/")}
    if not merges:
        return {}
    cross = {n: v["cross_avg"]["mean"] for n, v in merges.items()}
    best = max(cross, key=lambda n: cross[n])
    experts = {m: agg[f"expert/{m}/{setting}"] for m in data.MODALITIES if f"expert/{m}/{setting}" in agg}
    out: dict[str, Any] = {"best": best, "best_cross_avg": cross[best],
                           "margin": cross[best] - max(e["cross_avg"]["mean"] for e in experts.values()),
                           "spread": max(cross.values()) - min(cross.values())}
    for m, e in experts.items():
        out[f"own_loss/{m}"] = e[f"own/{m}"]["mean"] - merges[best][f"own/{m}"]["mean"]
    return out


def format_targets(t: dict[str, Any]) -> str:
    """One line per target of :func:`targets`, with met / not met."""
    if not t:
        return ""
    losses = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("own_loss/")}
    lines = [f"targets (seed means): best merge {t['best']} {t['best_cross_avg']:.1f}",
             f"  beats every expert on the cross-modal average by {t['margin']:+.1f} (>= 5: "
             f"{'met' if t['margin'] >= 5 else 'not met'})",
             "  own-task loss against each expert: " + ", ".join(f"{m} {v:+.1f}" for m, v in losses.items())
             + f" (<= 5 each: {'met' if all(v <= 5 for v in losses.values()) else 'not met'})",
             f"  methods spread {t['spread']:.1f} (>= 5: {'met' if t['spread'] >= 5 else 'not met'})"]
    return "\n".join(lines)


def run(zoo: str | Path, seeds: Sequence[int] = (0,), *, jobs: int | None = None, device: str = "cpu",
        json_out: str | Path | None = None, quick: bool = False, methods: Sequence[str] | None = None,
        lam_grid: Sequence[float] | None = None, settings: Sequence[str] | None = None,
        log: Callable[[str], None] = print, merger: Merger | None = None,
        on_scores: Callable[[str, dict[str, float]], None] | None = None,
        lora_modes: Sequence[str] = ("delta",), compose: Sequence[str] = COMPOSE_MODES) -> dict[str, Any]:
    """The whole omni experiment over ``seeds``; prints the tables and returns (and optionally writes) the JSON.

    Transformers' per-load progress bars and logs are off while it runs unless ``$MERGELAB_VERBOSE`` is set
    (:func:`mergelab.hf.quiet_transformers`; the expert-training processes inherit the setting).

    Args:
        zoo: zoo root (``<zoo>/omni/seed<k>`` is built when missing).
        seeds: zoo seeds.
        jobs: processes for the expert training and then the evaluations (default None: the usable cores,
            :func:`~mergelab.bench.omni.build.usable_jobs`); every score equals the one-process run's
            (:func:`run_seed`).
        device: ``cpu``, ``cuda`` or ``auto``.
        json_out: where to write the result JSON.
        quick: the test-sized plan and evaluation (:meth:`OmniPlan.quick`, :meth:`EvalSizes.quick`).
        methods: method names (default: every paper method of :data:`mergelab.methods.METHODS`).
        lam_grid: lambda values swept on val (default (0.5, 1.0, 1.5), a subset of the paper's grid).
        settings: expert settings (default: the plan's, ``lora`` and ``full``).
        log: called with each progress line and table.
        merger, on_scores: passed to :func:`run_seed` (each merge as an MLflow run, from the platform).
        lora_modes: ``delta`` and/or ``factors``: the LoRA merge modes (:func:`run_seed`).
        compose: online composition references, ``naivemc`` and/or ``damc`` (default both; ``()`` for none): the
            models ``compose/<mode>/<setting>``, two test-split evaluations per setting (:func:`run_seed`).

    Raises:
        ValueError: an unknown composition mode.
    """
    unknown = [m for m in compose if m not in COMPOSE_MODES]
    if unknown:
        raise ValueError(f"unknown composition modes {unknown}; known: {list(COMPOSE_MODES)}")
    plan = OmniPlan.quick() if quick else OmniPlan()
    plan = replace(plan, settings=tuple(settings)) if settings else plan
    sizes = EvalSizes.quick() if quick else EvalSizes()
    grid = tuple(lam_grid) if lam_grid else ((1.0,) if quick else (0.5, 1.0, 1.5))
    if not set(grid) <= set(LAM_GRID):
        log(f"note: lambda grid {grid} leaves the paper's grid {LAM_GRID}")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with quiet_transformers():
        per_seed = [run_seed(zoo, s, plan=plan, sizes=sizes, methods=methods, lam_grid=grid, jobs=jobs,
                             device=device, log=log, merger=merger, on_scores=on_scores, lora_modes=lora_modes,
                             compose=compose) for s in seeds]
    agg = aggregate(per_seed)
    result = {"seeds": list(seeds), "plan": plan.to_dict(), "lam_grid": list(grid), "aggregate": agg,
              "per_seed": per_seed, "compose": list(compose), "seconds": time.perf_counter() - t0}
    for setting in plan.settings:
        result.setdefault("targets", {})[setting] = targets(agg, setting)
        log(format_table(agg, setting) + "\n" + format_targets(result["targets"][setting]))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1, sort_keys=True))
    return result

