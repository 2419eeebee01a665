"""`mergelab demo`'s omni section: modality merging (the paper's Table 5) on the omni zoo shipped in the package.

In its own MLflow experiment (``mergelab-demo-omni``), on the omni zoo's seed-0 LoRA experts (vision, audio, video:
LoRA on the shared LLM, each with its own connector; :mod:`mergelab.bench.omni.ship`; ``tiny``: the quick zoo,
built in seconds):

1. reference runs: the base (all media) and each expert with only its own medium (the paper's "individual"
   columns), scored on the test items and tagged as ``mergelab bench omni --track`` tags them
   (``mergelab.omni`` = ``seed<k>/base``, ``seed<k>/expert/<m>/lora``; :mod:`mergelab.platform.omni`);
2. the comparison: a handful of methods merged at each lambda of a small grid, the adapters on the whole base with
   the ``omni_thinker`` preset (every tower and connector taken from its one owner), one run per merge under one
   comparison run, scored on the two cross-modal val sets (``val/average``: their mean, the campaign's objective);
   the val-selected lambda's merge is scored on the test items (``test/*``: each cross-modal set and its question
   types, their average ``cross_avg``, each task, each modality's own tasks ``own/<m>``) and the Table 5 layout is
   printed;
3. the comparison's best merge by val is registered as ``mergelab-demo-omni`` and promoted ``champion`` if there
   is none;
4. an Optuna campaign over OptMerge (lambda, rank ratio, init and one coefficient per expert) with the same YAML
   fields as a capability campaign (``experts: {omni_zoo: ..., kind: lora, seed: 0}``), starting from the paper's
   OptMerge and OptMerge at its val-selected lambda, top 2 registered;
5. its best version is promoted only if it beats the champion on the whole test split of both cross-modal sets
   (paired bootstrap, :func:`mergelab.platform.promotion.promote`).

Evaluation sizes (:class:`OmniDemo`; the omni table's full sizes are 84 val / 252 test items per cross-modal set
and 30 / 120 per task): the demo's defaults are :data:`DEMO_SIZES`. Re-running is idempotent like the capability
settings (:mod:`mergelab.platform.demo`): reference runs are reused (same build and sizes), merges by recipe
digest, test scores already logged, the campaign resumes with nothing to run, promotions already decided are
skipped, and the champion the registry holds is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from mergelab.bench.data import default_data_root
from mergelab.bench.omni import table
from mergelab.bench.omni.build import seed_dir
from mergelab.bench.omni.data import MODALITIES
from mergelab.bench.omni.ship import SHIPPED_OMNI_ZOO, SHIPPED_SEED
from mergelab.bench.omni.tasks import CROSS_SETS
from mergelab.hf import load_model
from mergelab.platform.campaign import run_campaign
from mergelab.platform.campaign_config import CampaignConfig
from mergelab.platform.campaign_space import recipe_template
from mergelab.platform.demo import (
    EXPERIMENT,
    OnceEvaluator,
    SettingResult,
    Sweep,
    comparison_run,
    items_tag,
    local_path,
    n_trials,
    promote_once,
    start_from_best_default,
)
from mergelab.platform.evaluation import HFEvaluator
from mergelab.platform.omni import TAG_OMNI, build_key, reference_run
from mergelab.platform.promotion import current_champion
from mergelab.platform.registry import TEST_ITEMS_TAG
from mergelab.platform.store import Store, log_scores
from mergelab.platform.ui import log_comparison

OMNI_SETS: tuple[str, ...] = tuple(CROSS_SETS)
"""The evaluator tasks of the val objective and of promotion: the two cross-modal sets (``music_avqa``, ``avqa``)."""

DEMO_SIZES = table.EvalSizes(cross_val=42, task_val=0, cross_test=252, task_test=40)
"""The demo's evaluation sizes: the lambda sweep and the campaign on the first 42 val items per cross-modal set,
the table on all 252 test items per set (promotion's whole split) and the first 40 per single-modality task."""

OMNI_SPACE: dict[str, dict[str, Any]] = {
    "lam": {"type": "float", "low": 0.5, "high": 1.5},
    "rank_ratio": {"type": "float", "low": 0.1, "high": 0.5},
    "steps": {"type": "int", "low": 50, "high": 400, "step": 50},
    "lr": {"type": "float", "low": 1.0e-6, "high": 1.0e-1, "log": True},
    "init": {"type": "categorical", "choices": ["mean", "sum"]},
}
"""The omni campaign's search space around the paper's OptMerge (``examples/campaign-omni.yaml``'s). ``steps`` and
``lr`` are searched so that the start from the comparison's best merge (``init: tsv``, lr 1e-6, 50 steps) is that
merge: at the paper's SGD (lr 1e-4, 300 steps) OptMerge from the TSV merge scored what it scores from the mean
(val 45.2 on the demo's seed-0 zoo, TSV 51.2)."""

COLUMNS: tuple[str, ...] = (*OMNI_SETS, *(f"own/{m}" for m in MODALITIES))
"""The comparison's table columns in MLflow (beside ``avg``, the cross-modal average)."""

SHORT = {"weight_average": "weight avg", "task_arithmetic": "TA", "tsv": "TSV", "optmerge": "OptMerge",
         "ties": "TIES", "dare_task_arithmetic": "DARE-TA", "dare_ties": "DARE-TIES", "iso_c": "Iso-C",
         "iso_cts": "Iso-CTS", "wudi": "WUDI"}
"""Column names of the printed table."""

ROWS = (("MUSIC-AVQA", "music_avqa"), ("AVQA", "avqa"), ("Avg.", "cross_avg"),
        *((f"own {m}", f"own/{m}") for m in MODALITIES))
"""Rows of the printed table (Table 5's): the two cross-modal sets, their average, each modality's own tasks."""


@dataclass(frozen=True)
class OmniDemo:
    """What the omni section runs.

    Attributes:
        zoo: the omni zoo root (default: the shipped one for its seed; another seed: ``<data root>/omni-zoo``, the
            benchmark data's root being ``$MERGELAB_DATA`` or ``~/.cache/mergelab/data``; ``tiny``:
            ``<store>/omni-zoo-quick``; built when missing).
        methods: merging methods of the comparison.
        lam_grid: lambdas swept on val (methods with a lambda).
        trials: Optuna trials over OptMerge (0 skips the campaign).
        sizes: items per evaluation (:class:`~mergelab.bench.omni.table.EvalSizes`; ``task_val`` is unused).
    """

    zoo: Path | None = None
    methods: tuple[str, ...] = ("weight_average", "task_arithmetic", "tsv", "optmerge")
    lam_grid: tuple[float, ...] = (0.5, 1.0, 1.5)
    trials: int = 4
    sizes: table.EvalSizes = DEMO_SIZES

    @classmethod
    def quick(cls) -> OmniDemo:
        """``mergelab demo --quick``: two lambdas, two trials, 14 val / 84 test items per set, 20 per task."""
        return cls(lam_grid=(0.5, 1.0), trials=2,
                   sizes=table.EvalSizes(cross_val=14, task_val=0, cross_test=84, task_test=20))

    @classmethod
    def tiny(cls) -> OmniDemo:
        """``mergelab demo --tiny`` (the quick zoo): two lambdas, two trials, the quick table's sizes."""
        return cls(lam_grid=(0.5, 1.0), trials=2, sizes=table.EvalSizes.quick())

    def describe(self) -> str:
        """The evaluation sizes in words (printed with the table)."""
        s = self.sizes
        return (f"lambda on the first {s.cross_val} val items per cross-modal set, table on the first {s.cross_test} "
                f"test items per set and {s.task_test} per single-modality task; promotion on the whole test split "
                f"({table.EvalSizes().cross_test} per set)")


def _scores_of(path: str | Path, items: Any, device: str, only: str | None = None) -> dict[str, float]:
    """The omni table's scores of the checkpoint or adapter at ``path`` on ``items`` (``only``: that medium), and
    ``average``: the cross-modal average again (as promotion's ``test/average`` over both sets)."""
    model, processor = load_model(path, device=device)
    scores = table.evaluate(model, processor, items, only=only)
    return {**scores, "average": scores["cross_avg"]}  # the name every demo experiment's scores view sorts by


def _first_test_scores(client: MlflowClient, run_id: str) -> dict[str, float]:
    """The run's ``test/*`` metrics as first logged (the table's items): a promotion later logs the whole test
    split's scores of both cross-modal sets under the same names on the registered run."""
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("test/")]
    firsts = {k: min(client.get_metric_history(run_id, k), key=lambda m: (m.timestamp, m.step)) for k in keys}
    return {k.removeprefix("test/"): m.value for k, m in firsts.items()}


def _n_items(sizes: table.EvalSizes, modalities: int) -> int:
    """Test items behind a row: both cross-modal sets and the tasks of ``modalities`` modalities (two each)."""
    return len(CROSS_SETS) * sizes.cross_test + 2 * modalities * sizes.task_test


def _references(client: MlflowClient, exp_id: str, root: Path, template: Any, seed: int, spec: OmniDemo,
                items: Any, device: str, out: SettingResult) -> dict[str, dict[str, float]]:
    """The base and each expert as reference runs (reused when logged for this build and these sizes)."""
    key = build_key(root, spec.sizes)
    refs: list[tuple[str, str, str, str | None]] = [("base", f"seed{seed}/base", template.base, None)]
    refs += [(table.MODALITY_NAMES[e.name], f"seed{seed}/expert/{e.name}/lora", e.path, e.name)
             for e in template.experts]
    scores: dict[str, dict[str, float]] = {}
    for column, label, path, only in refs:
        rid, reused = reference_run(client, exp_id, label, Path(path), key,
                                     lambda p=path, o=only: _scores_of(p, items, device, o))
        if reused:
            out.skipped.append(f"reference {label}: run {rid[:8]} reused")
        else:
            client.set_tag(rid, TEST_ITEMS_TAG, str(_n_items(spec.sizes, 3 if only is None else 1)))
        metrics = client.get_run(rid).data.metrics
        scores[column] = {k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}
        out.rows.append({"name": "base" if only is None else f"expert {only}", "lam": None, "scores": scores[column],
                         "average": scores[column].get("cross_avg"), "run_id": rid,
                         "items": int(items_tag(client, rid) or 0) or None})
    return scores


def format_omni(cols: Sequence[tuple[str, float | None, Mapping[str, float]]]) -> str:
    """Table 5's layout: one column per model (name, lambda, scores), rows :data:`ROWS` (percent)."""
    width = max(10, *(len(c) for c, _, _ in cols)) + 1
    lines = ["dataset".ljust(12) + "".join(c.rjust(width) for c, _, _ in cols),
             "lambda".ljust(12) + "".join(("" if lam is None else f"{lam:g}").rjust(width) for _, lam, _ in cols)]
    lines.append("-" * len(lines[0]))
    for label, key in ROWS:
        lines.append(label.ljust(12) + "".join((f"{s[key]:.1f}" if key in s else "-").rjust(width)
                                               for _, _, s in cols))
    return "\n".join(lines)


def _compare(client: MlflowClient, exp_id: str, template: Any, store: Store, experiment: str, seed: int,
             spec: OmniDemo, val_eval: HFEvaluator, items: Any, device: str, out: SettingResult,
             log: Callable[[str], None]) -> tuple[list[tuple[str, float | None, dict[str, float]]], Sweep]:
    """The comparison (step 2): the table's merge columns, and the sweep (its best merge, each lambda chosen)."""
    cols: list[tuple[str, float | None, dict[str, float]]] = []
    with comparison_run(client, exp_id, f"demo-comparison-omni-s{seed}", "omni") as pid:
        sweep = Sweep(client, exp_id, store, experiment, pid, template, "lora", val_eval, {}, OMNI_SETS,
                      lambda method, lam: {TAG_OMNI: f"seed{seed}/lora/{method}/lam{lam}"})
        for method in spec.methods:
            lam, val, rid, uri = sweep.select(method, spec.lam_grid)
            if "test/cross_avg" in client.get_run(rid).data.metrics:
                scores = _first_test_scores(client, rid)
            else:
                scores = _scores_of(local_path(uri), items, device)
                log_scores(client, rid, {f"test/{k}": v for k, v in scores.items()})
                client.set_tag(rid, TEST_ITEMS_TAG, str(_n_items(spec.sizes, 3)))
            cols.append((SHORT.get(method, method[:10]), lam, scores))
            out.rows.append({"name": method, "lam": lam, "scores": scores, "average": scores["cross_avg"],
                             "run_id": rid, "items": _n_items(spec.sizes, 3)})
            log(f"      {method:<22} lam {lam}: val {val:.2f}, test cross-modal avg {scores['cross_avg']:.2f}")
        log_comparison(client, pid, out.rows, COLUMNS, title="omni (LoRA experts): test split, lambda selected on val")
    sweep.note_reused(out)
    return cols, sweep


def demo_zoo(store: Store, seed: int, tiny: bool) -> Path:
    """The omni zoo the demo uses when its spec names none: the quick zoo beside the store (``tiny``), the zoo
    shipped in the package for its seed, else ``<data root>/omni-zoo`` (built there when missing: never inside the
    installed package)."""
    if tiny:
        return Path(store.tracking_uri.removeprefix("sqlite:///")).parent / "omni-zoo-quick"
    return SHIPPED_OMNI_ZOO if seed == SHIPPED_SEED else default_data_root() / "omni-zoo"


def run_omni(*, store: Store, seed: int = 0, tiny: bool = False, spec: OmniDemo | None = None,
             device: str = "auto", log: Callable[[str], None] = print) -> SettingResult:
    """The demo's omni section (see the module docstring); its numbers as a :class:`SettingResult` (``table``: the
    printed Table 5 layout, ``rows``: one per model with its test scores).

    Args:
        store: the store the demo tracks to.
        seed: the omni zoo's seed (the shipped zoo has seed 0).
        tiny: the quick zoo (:meth:`~mergelab.bench.omni.build.OmniPlan.quick`), built under the store's directory.
        spec: methods, lambda grid, trials, evaluation sizes (default :class:`OmniDemo`).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        log: one-line logger.
    """
    t0 = time.perf_counter()
    spec = spec or OmniDemo()
    suffix = "-tiny" if tiny else ""
    experiment = name = f"{EXPERIMENT}-omni{suffix}"
    out = SettingResult(setting="omni", experiment=experiment)
    zoo = spec.zoo or demo_zoo(store, seed, tiny)
    base_cfg = dict(name=f"demo-optmerge-omni-s{seed}{suffix}", method="optmerge", device=device, seed=seed,
                    experts={"omni_zoo": str(zoo), "kind": "lora", "seed": seed, "quick": tiny},
                    eval={"tasks": list(OMNI_SETS), "limit": spec.sizes.cross_val},
                    tracking={"experiment": experiment})  # fmt: skip
    log(f"[omni] omni zoo {zoo} (seed {seed}, LoRA experts{'; building the quick zoo if missing' if tiny else ''})")
    template, _ = recipe_template(CampaignConfig.model_validate(base_cfg), build_missing=True)
    val_eval = HFEvaluator(limit=spec.sizes.cross_val, device=device)
    whole_test = OnceEvaluator(HFEvaluator(limit=None, device=device))
    client = store.client()
    exp_id = store.experiment_id(experiment, client)
    items = table.eval_items("test", spec.sizes, seed)

    log("[omni] reference runs: base (all media), each expert with its own medium (test split)")
    refs = _references(client, exp_id, seed_dir(zoo, seed), template, seed, spec, items, device, out)
    log(f"[omni] comparing {len(spec.methods)} methods, lambda on val ({list(spec.lam_grid)})")
    cols, sweep = _compare(client, exp_id, template, store, experiment, seed, spec, val_eval, items, device, out, log)
    cols = [(c, None, s) for c, s in refs.items()] + cols

    sweep.register_best(name, whole_test, out, log)
    optmerge_lam = sweep.lams.get("optmerge")

    if spec.trials > 0:
        _campaign(base_cfg, template, spec, optmerge_lam, (sweep.vals, sweep.lams), name, store, val_eval,
                  whole_test, cols, out, log)
    champ = current_champion(client, name)
    if champ is not None:
        t = client.get_model_version(name, champ).tags
        out.champion = {**(out.champion or {}), "holder": champ, "holder_method": t.get("method", "?"),
                        "holder_test_average": t.get("test/average", "")}
    out.table = (f"{format_omni(cols)}\n({spec.describe()}; tuned: the campaign's best by val, on the whole test "
                 "split at promotion; test/average: the cross-modal average)")
    out.seconds = time.perf_counter() - t0
    return out


def _campaign(base_cfg: dict[str, Any], template: Any, spec: OmniDemo, optmerge_lam: float | None,
              compared: tuple[dict[str, float], dict[str, float | None]], name: str,
              store: Store, val_eval: HFEvaluator, whole_test: OnceEvaluator,
              cols: list[tuple[str, float | None, dict[str, float]]], out: SettingResult,
              log: Callable[[str], None]) -> None:
    """Steps 4 and 5: the OptMerge campaign, then its best version's promotion (its column added to ``cols``).
    ``compared``: the comparison's val averages and val-selected lambdas (the start from its best method)."""
    vals, lams = compared
    log(f"[omni] Optuna campaign over OptMerge with coefficients ({spec.trials} trials, TPE, val only)")
    default_lam = template.replace(method="optmerge", params={"variant": "lora"}).hyperparameters.get("lam")
    enqueue = [{"lam": optmerge_lam}] if optmerge_lam not in (None, default_lam) else []  # else trial 0 is it
    space, start = start_from_best_default(vals, lams, OMNI_SPACE)  # the comparison's val averages and lambdas
    if start is not None:
        log(f"[omni] start point: OptMerge from the {start['init']} merge (lam {start['lam']}; the best on val of "
            f"the compared methods OptMerge can start from)")
        enqueue.append(start)
    cfg = CampaignConfig.model_validate({
        **base_cfg, "params": {"variant": "lora"}, "search_space": space,
        "coefficients": {"low": 0.5, "high": 1.5}, "enqueue": enqueue,
        "sampler": {"name": "tpe", "seed": int(base_cfg["seed"]), "options": {"n_startup_trials": 2}},
        "budget": {"n_trials": spec.trials}, "registry": {"name": name, "register": "top_k", "top_k": 2}})
    before = n_trials(cfg, store)
    camp = run_campaign(cfg, store=store, evaluator=val_eval, test_evaluator=whole_test)
    if before >= spec.trials:
        out.skipped.append(f"campaign {cfg.name}: its {before} trials are done (budget {spec.trials}); nothing run")
    out.campaign = {"study": camp.study_name, "run_id": camp.parent_run_id, "complete": camp.n_complete,
                    "failed": camp.n_failed, "best": camp.best, "registered": camp.registered}
    if not camp.registered:
        return
    best_version = camp.registered[0][0]
    log(f"[omni] promotion: campaign best v{best_version} vs champion on the whole test split")
    out.promotion = promote_once(name, best_version, store, whole_test, out, log, tasks=OMNI_SETS)
    client = store.client()
    tags = client.get_model_version(name, best_version).tags
    if "test/average" in tags:
        scores = {k.removeprefix("test/"): float(v) for k, v in tags.items() if k.startswith("test/")}
        scores["cross_avg"] = scores["average"]
        hp = camp.best["params"] if camp.best else {}
        cols.append((f"tuned (t{tags.get('trial', '?')})", hp.get("lam"), scores))
        out.rows.append({"name": f"optmerge tuned (trial {tags.get('trial', '?')}, whole test)", "lam": hp.get("lam"),
                         "scores": scores, "average": scores["average"], "run_id": tags.get("run_id"),
                         "items": tags.get(TEST_ITEMS_TAG)})


__all__ = ["DEMO_SIZES", "OMNI_SPACE", "OmniDemo", "format_omni", "run_omni"]
