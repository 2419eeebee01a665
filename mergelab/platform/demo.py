"""`mergelab demo`: the paper's comparison and a promotion, end to end, on the embedded default store.

What it does, all tracked in MLflow (``mlruns/`` by default; ``mergelab ui`` shows it):

1. makes sure the offline benchmark's data and model zoo exist (the zoo ships with the package; a ``--tiny`` zoo
   builds in seconds);
2. merges the zoo's experts (LoRA or full fine-tuning setting) with each of the paper's methods, sweeping the
   paper's lambda grid on the **val** split, one MLflow run per merge, nested under one comparison run;
3. registers the best merge of the comparison and promotes it (test split) as the first ``champion`` if there is
   none yet;
4. runs an Optuna campaign over OptMerge's rank ratio, step count and lambda (one child run per trial, top-k
   registered);
5. promotes the campaign's best version: ``champion`` moves only if it beats the current one on the test split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.bench.data import ensure_data
from mergelab.bench.tasks import TASKS
from mergelab.bench.zoo_build import build_zoo
from mergelab.bench.zoo_plan import DEFAULT_ZOO, SETTINGS, expert_names, read_manifest
from mergelab.bench.zoo_table import choose_lam, lam_candidates
from mergelab.methods import METHODS
from mergelab.methods.base import LAM_GRID
from mergelab.platform.campaign import recipe_template, run_campaign
from mergelab.platform.campaign_config import CampaignConfig
from mergelab.platform.evaluation import HFEvaluator
from mergelab.platform.merge_run import tracked_merge
from mergelab.platform.registry import promote, register_run
from mergelab.platform.store import TAG_CAMPAIGN, TAG_ROLE, Store, end_status

PAPER_METHODS: tuple[str, ...] = tuple(name for name, spec in METHODS.items() if spec.paper)
"""The nine merging rows of the paper's Tables 2 and 3, in its order (the method table's order)."""

EXPERIMENT = "mergelab-demo"


@dataclass
class DemoResult:
    """What :func:`run_demo` returns (also printed as a table)."""

    setting: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    champion: dict[str, Any] | None = None
    campaign: dict[str, Any] | None = None
    promotion: dict[str, Any] | None = None
    seconds: float = 0.0


def _ensure_zoo(zoo: Path, tiny: bool, seed: int, setting: str, log: Callable[[str], None]) -> None:
    try:
        models = read_manifest(zoo).get("models", {})
    except FileNotFoundError:
        models = {}
    needed = [f"seed{seed}/base", *expert_names(seed, setting)]
    if all(n in models and (zoo / n).is_dir() for n in needed):
        return
    log(f"building the model zoo under {zoo} ({'tiny, seconds' if tiny else 'about 20 minutes on 2 CPU cores'})")
    build_zoo(zoo, tiny=tiny, progress=True, seeds=[seed])


def format_rows(rows: Sequence[dict[str, Any]], tasks: Sequence[str] = TASKS) -> str:
    """A fixed-width table: one row per model/merge, one column per task and the average (percent)."""
    head = f"{'model':<34}{'lam':>5} " + "".join(f"{t[:9]:>10}" for t in tasks) + f"{'avg':>8}"
    out = [head, "-" * len(head)]
    for r in rows:
        lam = r.get("lam")
        lam_s = "" if lam is None else f"{lam:.2f}"
        cells = "".join(f"{r['scores'].get(t, math.nan):>10.1f}" for t in tasks)
        out.append(f"{r['name'][:34]:<34}{lam_s:>5} {cells}{r['average']:>8.1f}")
    return "\n".join(out)


def run_demo(
    *,
    zoo: str | Path | None = None,
    setting: str = "lora",
    seed: int = 0,
    tiny: bool = False,
    methods: Sequence[str] = PAPER_METHODS,
    lam_grid: Sequence[float] = LAM_GRID,
    trials: int = 6,
    limit: int | None = 100,
    root: str | Path | None = None,
    data_root: str | Path | None = None,
    registry_name: str | None = None,
    device: str = "auto",
    data_sizes: dict[str, int] | None = None,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo (see the module docstring) and return its numbers.

    Args:
        zoo: the model zoo (default: the one shipped in the package; ``tiny`` builds ``<root>/zoo-tiny``).
        setting: ``"lora"`` (Qwen2-VL-style LoRA experts) or ``"full"`` (full fine-tuning experts).
        seed: which zoo seed's base and experts to merge.
        tiny: use a seconds-to-build tiny zoo (for tests and smoke runs).
        methods: merging methods to compare.
        lam_grid: lambda values swept on val for methods that have a lambda.
        trials: Optuna trials of the OptMerge campaign (0 skips the campaign).
        limit: val samples per task for the comparison and the campaign (None: the whole split); promotion
            always evaluates the whole test split.
        root: the embedded store's directory (default ``./mlruns`` or ``$MERGELAB_ROOT``).
        data_root: the benchmark data's root (default ``$MERGELAB_DATA`` or ``~/.cache/mergelab/data``).
        registry_name: registered model name (default ``mergelab-demo-<setting>``).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        data_sizes: samples per split to generate (default: the benchmark's sizes; smaller for smoke tests).
        log: one-line logger.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    t0 = time.perf_counter()
    store = Store.resolve(root)
    zoo_dir = Path(zoo) if zoo is not None else (Path(store.tracking_uri.removeprefix("sqlite:///")).parent /
                                                 "zoo-tiny" if tiny else DEFAULT_ZOO)  # fmt: skip
    name = registry_name or f"mergelab-demo-{setting}{'-tiny' if tiny else ''}"
    log(f"[1/5] data and zoo ({zoo_dir})")
    data_dir = ensure_data(data_root, tasks=TASKS, splits=("val", "test"), sizes=data_sizes)
    _ensure_zoo(zoo_dir, tiny, seed, setting, log)

    base_cfg = dict(name=f"demo-optmerge-{setting}-s{seed}{'-tiny' if tiny else ''}",
                    experts={"zoo": str(zoo_dir), "kind": setting, "seed": seed}, method="optmerge",
                    policy="qwen2_vl", device=device, seed=seed,
                    eval={"tasks": list(TASKS), "data_root": str(data_dir), "limit": limit},
                    tracking={"experiment": EXPERIMENT})  # fmt: skip
    template, reference = recipe_template(CampaignConfig.model_validate(base_cfg))
    evaluator = HFEvaluator(data_root=str(data_dir), limit=limit, device=device)
    result = DemoResult(setting=setting)

    # ---- reference rows: base and experts on val (evaluated here, same evaluator as the merges)
    log(f"[2/5] comparing {len(methods)} methods on val ({setting} experts, lambda grid {list(lam_grid)})")
    for label, path in [("base", template.base)] + [(f"expert {e.name}", e.path) for e in template.experts]:
        summary = evaluator(Path(path), TASKS, "val")  # a LoRA adapter loads onto its base (mergelab.hf)
        result.rows.append({"name": label, "lam": None, "scores": dict(summary.scores),
                            "average": summary.average, "run_id": None})  # fmt: skip

    client = store.client()
    exp_id = store.experiment_id(EXPERIMENT, client)
    parent = client.create_run(exp_id, run_name=f"demo-comparison-{setting}-s{seed}",
                               tags={TAG_ROLE: "comparison", TAG_CAMPAIGN: "demo-comparison",
                                     "mergelab.setting": setting})  # fmt: skip
    pid = parent.info.run_id
    best: tuple[float, str, dict[str, Any], Any] | None = None
    try:
        for method in methods:
            params = METHODS[method].setting_params(setting)
            runs: list[tuple[float | None, dict[str, Any], Any]] = []
            for lam in lam_candidates(method, lam_grid):
                p = dict(params) if lam is None else {**params, "lam": lam}
                runs.append((lam, p, tracked_merge(
                    template.replace(method=method, params=p), store=store, experiment=EXPERIMENT,
                    run_name=f"{method}" + ("" if lam is None else f"-lam{lam:g}"), parent_run_id=pid,
                    tags={TAG_CAMPAIGN: "demo-comparison"}, tasks=TASKS, evaluator=evaluator,
                    reference_scores=reference)))  # fmt: skip
            lam, avg = choose_lam((at, tm.val.average) for at, _, tm in runs)
            p, tm = next((p, tm) for at, p, tm in runs if at == lam)
            result.rows.append({"name": method, "lam": lam, "scores": dict(tm.val.scores), "average": avg,
                                "run_id": tm.run_id})  # fmt: skip
            if best is None or avg > best[0]:
                best = (avg, method, p, tm)
            log(f"      {method:<22} best lam {lam}: val avg {avg:.2f}")
        client.set_terminated(pid, "FINISHED")
    except BaseException as e:
        client.set_terminated(pid, end_status(e))
        raise

    # ---- the comparison's winner becomes the first champion (if the registry has none yet)
    assert best is not None
    avg, method, params, tm = best
    log(f"[3/5] registering the comparison's best merge ({method}, val avg {avg:.2f}) as '{name}'")
    mv = register_run(client, name, tm.run_id, tm.merged_uri,
                      tags={"method": method, "eval.tasks": ",".join(TASKS), "campaign": "demo-comparison",
                            **{f"hp.{k}": v for k, v in params.items()}, "val/average": f"{avg:.4f}"},
                      score=avg)  # fmt: skip
    first = promote(name, version=mv.version, tasks=TASKS, evaluator=_test_evaluator(evaluator), store=store)
    result.champion = {"version": mv.version, "method": method, "decision": first.decision, "reason": first.reason}
    log(f"      version {mv.version}: {first.reason}")

    # ---- an Optuna campaign over OptMerge, then a promotion that must beat the champion on test
    if trials > 0:
        log(f"[4/5] Optuna campaign over OptMerge ({trials} trials, TPE, val only)")
        cfg = CampaignConfig.model_validate({
            **base_cfg,
            "params": {"variant": setting},
            "search_space": {
                "rank_ratio": {"type": "float", "low": 0.05, "high": 0.5},
                "steps": {"type": "int", "low": 50, "high": 400, "step": 50},
                "lam": {"type": "float", "low": 0.3, "high": 1.5},
            },
            "budget": {"n_trials": trials},
            "registry": {"name": name, "register": "top_k", "top_k": 2},
        })
        camp = run_campaign(cfg, store=store, evaluator=evaluator, test_evaluator=_test_evaluator(evaluator))
        result.campaign = {"study": camp.study_name, "run_id": camp.parent_run_id, "complete": camp.n_complete,
                           "failed": camp.n_failed, "best": camp.best, "registered": camp.registered}  # fmt: skip
        if camp.best is not None:
            run_id = camp.best.get("run_id")
            metrics = client.get_run(run_id).data.metrics if run_id else {}
            result.rows.append({"name": f"optmerge (campaign trial {camp.best['number']})",
                                "lam": camp.best["params"].get("lam"),
                                "scores": {t: metrics.get(f"val/{t}", math.nan) for t in TASKS},
                                "average": camp.best["values"][0], "run_id": run_id})  # fmt: skip
        if camp.registered:
            log("[5/5] promotion: campaign best vs champion on the test split")
            dec = promote(name, campaign=cfg.name, tasks=TASKS, evaluator=_test_evaluator(evaluator), store=store)
            result.promotion = {"candidate": dec.candidate, "champion_before": dec.champion,
                                "decision": dec.decision, "delta": dec.delta, "reason": dec.reason}  # fmt: skip
            log(f"      {dec.reason}")
    result.seconds = time.perf_counter() - t0
    return result


def _test_evaluator(val_evaluator: HFEvaluator) -> HFEvaluator:
    """The same evaluator settings on the test split (the split is chosen by the caller: promote passes "test")."""
    return HFEvaluator(data_root=val_evaluator.data_root, limit=None, batch_size=val_evaluator.batch_size,
                       device=val_evaluator.device)  # fmt: skip
