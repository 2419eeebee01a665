"""Does a tuned OptMerge beat the best default-lambda method? Issue 19's campaign result over seeds and settings.

For each seed and setting (full fine-tunes, LoRA adapters) of the model zoo it runs a real Optuna campaign over
OptMerge (:func:`mergelab.platform.campaign.run_campaign`, the code ``mergelab campaign`` runs, on a throwaway store:
a temporary directory or ``--root``): the demo's search space (:data:`mergelab.platform.demo.OPTMERGE_SPACE`) plus
one coefficient per expert, trial 0 the paper's OptMerge, trial 1 OptMerge at its val-selected lambda (then the
``--enqueue`` points, if any; with ``--init-from-default VALSELECT.json``, OptMerge started from the merge of the
default method a ``--val-select`` run picked by val, its lambda, lr 1e-6 and 50 steps), TPE seeded
with the zoo seed, the objective ``val/average`` on the whole val split. The campaign's best trial (by val, the
only split the search sees) is then scored once on the whole test split and compared with the best default-lambda
method of the same seed and setting: every registered method with its defaults, its lambda chosen on val from the
paper's grid (the offline benchmark's rows). Those rows are read from ``--defaults``
(``benchmarks/results/offline_benchmark_3seeds.json``, the shipped zoo on the whole test split) when they are for
this zoo, and the best of them is re-merged and re-scored here as a check (``--no-check``: not); otherwise (another zoo, ``--quick``)
they are computed with :func:`mergelab.bench.zoo_table.benchmark`. Prints per seed and mean +- sd over seeds: the
best default (name, test average), the tuned OptMerge (val and test average, its parameters) and the difference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/campaign_vs_defaults.py --seeds 0,1,2 --settings full,lora \\
        --trials 12 --json-out benchmarks/results/campaign_3seeds.json
    .venv/bin/python benchmarks/campaign_vs_defaults.py --quick --root /tmp/cvd     # tiny zoo, seconds

``--combine a.json b.json`` joins the ``--json-out`` files of runs split by setting or seed (one process each) and
prints the table over all of them. ``--quick`` builds a tiny zoo under the root, generates 4 val and 4 test items per task, runs 2 trials per campaign
and computes the defaults for two methods on a two-value lambda grid: a smoke test of the pipeline, not a result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mergelab.bench.data import ensure_data
from mergelab.bench.tasks import TASKS
from mergelab.bench.zoo_build import build_zoo
from mergelab.bench.zoo_plan import DEFAULT_ZOO
from mergelab.bench.zoo_table import benchmark
from mergelab.engine import run_merge
from mergelab.methods import METHODS
from mergelab.methods.base import LAM_GRID
from mergelab.platform.campaign import run_campaign
from mergelab.platform.campaign_config import CampaignConfig
from mergelab.platform.campaign_space import recipe_template
from mergelab.platform.demo import OPTMERGE_SPACE, start_from_best_default
from mergelab.platform.evaluation import HFEvaluator
from mergelab.platform.store import Store

DEFAULTS_JSON = Path(__file__).parent / "results" / "offline_benchmark_3seeds.json"
QUICK_METHODS = ("task_arithmetic", "optmerge")
CHECK_TOLERANCE = 0.05  # test-average points: a re-scored default must match the shipped row this closely


def defaults_from_json(path: Path, setting: str, seed: int) -> tuple[dict[str, float], dict[str, float]] | None:
    """``({method: whole-split test average}, {method: val-selected lambda})`` of one seed and setting from an
    offline-benchmark ``--json-out`` file, or None when it has no whole-test-split rows for them."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if (data.get("limits") or {}).get("test") is not None:
        return None
    rows = data.get("rows", {}).get(setting, {})
    key = str(seed)
    scores = {name.removeprefix("merge:"): float(r[key]["shifted"]["average"])
              for name, r in rows.items() if name.startswith("merge:") and key in r}
    lams = {m: float(v[key]) for m, v in data.get("lam", {}).get(setting, {}).items() if key in v}
    return (scores, lams) if scores else None


def compute_defaults(zoo: Path, setting: str, seed: int, *, methods: tuple[str, ...], lams: tuple[float, ...],
                     data_root: Path, data_sizes: dict[str, int] | None, val_limit: int | None,
                     test_limit: int | None) -> tuple[dict[str, float], dict[str, float]]:
    """The default-lambda rows computed by the offline benchmark's own code (lambda on val, scored on test)."""
    res = benchmark(zoo, settings=[setting], methods=methods, seeds=[seed], lams=lams, val_limit=val_limit,
                    test_limit=test_limit, data_root=data_root, data_sizes=data_sizes, fixed_rows=False,
                    log=lambda _: None)
    rows = res["rows"][setting]
    scores = {m: float(rows[f"merge:{m}"][seed]["shifted"]["average"]) for m in methods}
    return scores, {m: float(res["lam"][setting][m][seed]) for m in methods}


def score_test(template: Any, method: str, params: dict[str, Any], evaluator: HFEvaluator,
               split: str = "test") -> float:
    """Merge ``template`` with ``method``/``params`` into a temporary directory and score it on ``split``."""
    with tempfile.TemporaryDirectory(prefix="cvd-") as tmp:
        out = Path(tmp) / "merged"
        run_merge(template.replace(method=method, params=params), out)
        return float(evaluator(out, TASKS, split).average)


def init_from_default(path: Path, setting: str, seed: int, lams: dict[str, float]
                      ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The search space and start point of :func:`mergelab.platform.demo.start_from_best_default` from a
    ``--val-select`` JSON's val averages of the default rows: OptMerge started from the merge of the best default on
    val that can start it (lr 1e-6, 50 steps, its lambda), that method added to ``init``'s choices."""
    rows = json.loads(path.read_text())["rows"]
    row = next((r for r in rows if r["setting"] == setting and int(r["seed"]) == seed), None)
    if row is None:
        raise SystemExit(f"{path}: no --val-select row for {setting} seed {seed}")
    return start_from_best_default(row["val"], dict(lams))


def default_params(method: str, setting: str, lams: dict[str, float]) -> dict[str, Any]:
    """A default row's parameters: the method's defaults for the setting, and its val-selected lambda if it has one."""
    scaled = METHODS[method].has_lam and method in lams
    return {**METHODS[method].setting_params(setting), **({"lam": lams[method]} if scaled else {})}


def default_vals(setting: str, seed: int, args: argparse.Namespace, data_root: Path
                 ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """``(val, test, lambdas)`` by default method of one seed and setting: every shipped default row (its lambda)
    merged and scored on the whole val split, beside its shipped whole-test-split score."""
    shipped = defaults_from_json(args.defaults, setting, seed)
    if shipped is None:
        raise SystemExit(f"{args.defaults}: no whole-test-split default rows for {setting} seed {seed}")
    scores, lams = shipped
    cfg = CampaignConfig.model_validate({
        "name": f"cvd-valselect-{setting}-s{seed}", "experts": {"zoo": str(args.zoo or DEFAULT_ZOO), "kind": setting,
                                                               "seed": seed},
        "method": "optmerge", "policy": "qwen2_vl", "device": args.device, "seed": seed,
        "eval": {"tasks": list(TASKS), "data_root": str(data_root)}})
    template, _ = recipe_template(cfg)
    val_eval = HFEvaluator(data_root=str(data_root), limit=args.val_limit, device=args.device)
    vals = {m: score_test(template, m, default_params(m, setting, lams), val_eval, "val") for m in scores}
    return vals, scores, lams


def val_select(result: dict[str, Any], vals: dict[str, float], scores: dict[str, float],
               lams: dict[str, float]) -> dict[str, Any]:
    """The best default as a user picks it, by val (``vals``, from :func:`default_vals`), with its shipped
    whole-test-split score, compared with the tuned OptMerge of ``result`` (the campaign, too, chose by val)."""
    by_val = max(vals, key=vals.__getitem__)
    by_test = max(scores, key=scores.__getitem__)
    tuned = result["tuned"]
    return {"label": result.get("label", result["setting"]), "setting": result["setting"], "seed": int(result["seed"]),
            "val": vals, "test": scores, "lams": lams,
            "by_val": {"method": by_val, "val_average": vals[by_val], "test_average": scores[by_val]},
            "by_test": {"method": by_test, "val_average": vals[by_test], "test_average": scores[by_test]},
            "tuned": {"val_average": tuned["val_average"], "test_average": tuned["test_average"]},
            "difference_by_val": tuned["test_average"] - scores[by_val],
            "difference_by_test": tuned["test_average"] - scores[by_test],
            "val_difference": tuned["val_average"] - vals[by_val]}


def format_val_select(rows: list[dict[str, Any]]) -> str:
    """Per seed and setting: the default chosen by val and the one best on test, against the tuned OptMerge."""
    head = (f"{'setting':<12}{'seed':>5}  {'default best on val: val / test':<36}{'best on test: val / test':<30}"
            f"{'tuned: val / test':<20}{'diff (by val)':>14}{'diff (by test)':>15}")
    lines = [head, "-" * len(head)]
    for r in rows:
        v, t, u = r["by_val"], r["by_test"], r["tuned"]
        best_val = f"{v['method']} {v['val_average']:.2f} / {v['test_average']:.2f}"
        best_test = f"{t['method']} {t['val_average']:.2f} / {t['test_average']:.2f}"
        tuned = f"{u['val_average']:.2f} / {u['test_average']:.2f}"
        lines.append(f"{r['label']:<12}{r['seed']:>5}  {best_val:<36}{best_test:<30}{tuned:<20}"
                     f"{r['difference_by_val']:>+14.2f}{r['difference_by_test']:>+15.2f}")
    lines.append("")
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == label]
        (dv, sv), (dt, st), (vv, vs) = (_mean_sd([r[k] for r in rs]) for k in
                                        ("difference_by_val", "difference_by_test", "val_difference"))
        lines.append(f"{label:<12} mean +- sd over seeds: tuned - default chosen by val {dv:+.2f} +- {sv:.2f} (test),"
                     f" {vv:+.2f} +- {vs:.2f} (val); tuned - best default on test {dt:+.2f} +- {st:.2f}")
    return "\n".join(lines)


def run_one(setting: str, seed: int, args: argparse.Namespace, store: Store, zoo: Path, data_root: Path,
            data_sizes: dict[str, int] | None) -> dict[str, Any]:
    """One seed and setting: the best default, the campaign, the campaign's best on the whole test split."""
    t0 = time.perf_counter()
    base_cfg: dict[str, Any] = {
        "name": f"cvd-optmerge-{setting}-s{seed}", "experts": {"zoo": str(zoo), "kind": setting, "seed": seed},
        "method": "optmerge", "policy": "qwen2_vl", "device": args.device, "seed": seed,
        "eval": {"tasks": list(TASKS), "data_root": str(data_root), "limit": args.val_limit},
        "tracking": {"experiment": f"campaign-vs-defaults-{setting}"}}
    template, _ = recipe_template(CampaignConfig.model_validate(base_cfg))
    test_eval = HFEvaluator(data_root=str(data_root), limit=args.test_limit, device=args.device)

    shipped = None if args.quick or zoo.resolve() != DEFAULT_ZOO.resolve() else \
        defaults_from_json(args.defaults, setting, seed)
    source, check = "computed", None
    if shipped is not None:
        scores, lams = shipped
        best = max(scores, key=scores.__getitem__)
        source = str(args.defaults)
        if not args.no_check:
            check = score_test(template, best, default_params(best, setting, lams), test_eval)
        if check is not None and abs(check - scores[best]) > CHECK_TOLERANCE:  # the shipped rows are stale for this code or data
            print(f"  [{setting} seed {seed}] {best}: shipped {scores[best]:.2f}, re-scored {check:.2f}: recomputing",
                  flush=True)
            shipped = None
    if shipped is None:
        methods = QUICK_METHODS if args.quick else tuple(m for m in METHODS if METHODS[m].paper) + ("optmerge",)
        scores, lams = compute_defaults(zoo, setting, seed, methods=tuple(dict.fromkeys(methods)),
                                        lams=(0.5, 1.0) if args.quick else LAM_GRID, data_root=data_root,
                                        data_sizes=data_sizes, val_limit=4 if args.quick else 100,
                                        test_limit=args.test_limit)
        source = "computed"
    best = max(scores, key=scores.__getitem__)
    t_defaults = time.perf_counter() - t0

    enqueue = ([{"lam": lams["optmerge"]}] if "optmerge" in lams else []) + list(args.enqueue)
    space, start = (init_from_default(args.init_from_default, setting, seed, lams) if args.init_from_default
                    else (OPTMERGE_SPACE, None))
    if start is not None:  # OptMerge started from the default a user picks by val: a choice of init, and a start
        enqueue.append(start)
    cfg = CampaignConfig.model_validate({
        **base_cfg, "params": {"variant": setting}, "search_space": space,
        "coefficients": {"low": 0.5, "high": 1.5}, "enqueue": enqueue,
        "sampler": {"name": "tpe", "seed": seed, "options": {"n_startup_trials": 4}},
        "budget": {"n_trials": args.trials}, "registry": {"name": f"cvd-{setting}-s{seed}", "register": "best"}})
    val_eval = HFEvaluator(data_root=str(data_root), limit=args.val_limit, device=args.device)
    camp = run_campaign(cfg, store=store, evaluator=val_eval, test_evaluator=test_eval)
    t_campaign = time.perf_counter() - t0 - t_defaults
    if not camp.registered or camp.best is None:
        raise RuntimeError(f"{cfg.name}: no completed trial ({camp.n_failed} failed)")
    mv = store.client().get_model_version(cfg.registry.name, camp.registered[0][0])
    tuned_test = float(test_eval(Path(mv.source.removeprefix("file://")), TASKS, "test").average)
    return {
        "setting": setting, "label": args.label or setting, "seed": seed, "enqueue": enqueue, "defaults": scores, "default_lams": lams, "defaults_source": source,
        "best_default": {"method": best, "lam": lams.get(best), "test_average": scores[best], "rescored": check},
        "tuned": {"trial": camp.best["number"], "val_average": camp.best["values"][0],
                  "params": camp.best["params"], "test_average": tuned_test, "version": mv.version},
        "difference": tuned_test - scores[best], "trials": {"complete": camp.n_complete, "failed": camp.n_failed},
        "seconds": {"defaults": round(t_defaults, 1), "campaign": round(t_campaign, 1),
                    "total": round(time.perf_counter() - t0, 1)}}


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting: mean and sd over seeds of the best default, the tuned OptMerge and their difference; the target
    (the difference's mean above 0 by more than its sd over seeds) met or not."""
    out: dict[str, Any] = {}
    for setting in dict.fromkeys(r.get("label", r["setting"]) for r in results):
        rs = [r for r in results if r.get("label", r["setting"]) == setting]
        d = _mean_sd([r["difference"] for r in rs])
        out[setting] = {"best_default": _mean_sd([r["best_default"]["test_average"] for r in rs]),
                        "tuned": _mean_sd([r["tuned"]["test_average"] for r in rs]), "difference": d,
                        "target_met": d[0] > 0 and d[0] > d[1] and all(r["difference"] > 0 for r in rs)}
    return out


def _params(p: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(p.items()))


def format_report(results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The table: one line per seed and setting, then mean +- sd per setting, then each tuned trial's params."""
    head = (f"{'setting':<12}{'seed':>5}  {'best default (test)':<26}{'tuned val':>10}{'tuned test':>11}"
            f"{'diff':>8}  trial")
    lines = [head, "-" * len(head)]
    for r in results:
        b, t = r["best_default"], r["tuned"]
        name = f"{b['method']} (lam {b['lam']:g}) {b['test_average']:.2f}"
        lines.append(f"{r.get('label', r['setting']):<12}{r['seed']:>5}  {name:<26}{t['val_average']:>10.2f}{t['test_average']:>11.2f}"
                     f"{r['difference']:>+8.2f}  {t['trial']}")
    lines.append("")
    for setting, s in summary.items():
        (bm, bs), (tm, ts), (dm, ds) = s["best_default"], s["tuned"], s["difference"]
        lines.append(f"{setting:<12} mean +- sd: best default {bm:.2f} +- {bs:.2f}, tuned OptMerge {tm:.2f} +- {ts:.2f},"
                     f" difference {dm:+.2f} +- {ds:.2f}: target {'MET' if s['target_met'] else 'NOT met'}")
    lines.append("")
    lines += [f"{r.get('label', r['setting'])} seed {r['seed']} trial {r['tuned']['trial']}: {_params(r['tuned']['params'])}"
              for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=None, help="model zoo (default: the shipped one; --quick: a tiny one)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--settings", default="full,lora")
    ap.add_argument("--trials", type=int, default=12, help="trials per campaign (the study's budget)")
    ap.add_argument("--val-limit", type=int, default=None, help="val items per task for the objective (default all)")
    ap.add_argument("--test-limit", type=int, default=None, help="test items per task (default: the whole split)")
    ap.add_argument("--defaults", type=Path, default=DEFAULTS_JSON, help="offline benchmark JSON with default rows")
    ap.add_argument("--root", type=Path, default=None, help="the campaigns' store (default: a temporary directory)")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--enqueue", type=json.loads, default=[],
                    help="JSON list of extra start points (hyperparameters; keys left out take the defaults)")
    ap.add_argument("--init-from-default", type=Path, default=None,
                    help="a --val-select JSON: add the default picked by val to init's choices and enqueue OptMerge "
                         "started from its merge (lr 1e-6, 50 steps, its lambda)")
    ap.add_argument("--label", default=None, help="the results' row label (default: the setting)")
    ap.add_argument("--no-check", action="store_true",
                    help="take the shipped default rows without re-scoring the best one (runs split by seed)")
    ap.add_argument("--quick", action="store_true", help="tiny zoo, tiny data, 2 trials: a smoke run")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--val-select", type=Path, default=None,
                    help="a --json-out file of campaigns: score every default row on the whole val split and compare "
                         "the tuned OptMerge with the default a user picks by val (and with the best one on test)")
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="print the table of these --json-out files joined (runs split by setting or seed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.combine:
        parts = [json.loads(p.read_text()) for p in args.combine]
        results = [r for part in parts for r in part["results"]]
        print(format_report(results, summary := summarize(results)))
        if args.json_out:
            args.json_out.write_text(json.dumps({"commands": [p["command"] for p in parts], "results": results,
                                                 "summary": summary, "parts": [{k: v for k, v in p.items()
                                                                                 if k != "results"} for p in parts]},
                                                indent=1, default=str))
        return 0
    if args.val_select:
        results = json.loads(args.val_select.read_text())["results"]
        wanted = {int(x) for x in args.seeds.split(",")}, set(args.settings.split(","))
        data_root = ensure_data(args.data_root, tasks=TASKS, splits=("val", "test"),
                                sizes={"val": 4, "test": 4} if args.quick else None)
        rows, scored = [], {}
        for r in results:
            if int(r["seed"]) not in wanted[0] or r["setting"] not in wanted[1]:
                continue
            key = (r["setting"], int(r["seed"]))  # a label sharing a setting and seed reuses its default rows' scores
            if key not in scored:
                scored[key] = default_vals(*key, args, data_root)
            row = val_select(r, *scored[key])
            rows.append(row)
            print(f"  [{row['label']} seed {row['seed']}] by val: {row['by_val']['method']} "
                  f"{row['by_val']['val_average']:.2f} / {row['by_val']['test_average']:.2f}", flush=True)
        print("\n" + format_val_select(rows))
        if args.json_out:
            args.json_out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name, *(
                argv if argv is not None else sys.argv[1:])]), "rows": rows}, indent=1, default=str))
        return 0
    tmp = None
    root = args.root or Path(tmp := tempfile.mkdtemp(prefix="campaign-vs-defaults-"))
    data_sizes = None
    if args.quick:
        args.seeds = "0"
        args.trials = min(args.trials, 2)
        args.val_limit, args.test_limit, data_sizes = 4, 4, {"val": 4, "test": 4}
    data_root = ensure_data(args.data_root or (root / "data" if args.quick else None), tasks=TASKS,
                            splits=("val", "test"), sizes=data_sizes)
    zoo = args.zoo or (root / "zoo-tiny" if args.quick else DEFAULT_ZOO)
    if args.quick and not (zoo / "manifest.json").is_file():
        build_zoo(zoo, tiny=True, progress=False, evaluate=False, device="cpu")
    root = root.resolve()
    store = Store.resolve(root, tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                          artifact_root=(root / "artifacts").as_uri(), optuna_storage=f"sqlite:///{root / 'optuna.db'}")
    t0 = time.perf_counter()
    results = []
    try:
        for seed in (int(s) for s in args.seeds.split(",")):
            for setting in args.settings.split(","):
                r = run_one(setting, seed, args, store, zoo, data_root, data_sizes)
                print(f"  [{setting} seed {seed}] best default {r['best_default']['method']} "
                      f"{r['best_default']['test_average']:.2f}; tuned OptMerge trial {r['tuned']['trial']} val "
                      f"{r['tuned']['val_average']:.2f} test {r['tuned']['test_average']:.2f} "
                      f"({r['difference']:+.2f}); {r['seconds']['total']:.0f} s", flush=True)
                results.append(r)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(results)
    print("\n" + format_report(results, summary))
    seconds = time.perf_counter() - t0
    print(f"\n{seconds:.0f} s; load average at the end {os.getloadavg()[0]:.2f} (1 min)")
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "seeds": args.seeds, "settings": args.settings, "trials": args.trials, "limits":
                {"val": args.val_limit, "test": args.test_limit}, "results": results, "summary": summary,
            "seconds": round(seconds, 1), "loadavg_end": os.getloadavg()}, indent=1, default=str))
    return 0 if all(math.isfinite(r["difference"]) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
