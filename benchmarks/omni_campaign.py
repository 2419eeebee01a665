"""Optuna campaigns on the omni experts, and their best merges against the default merges and the experts.

Runs each ``--config`` (default ``examples/campaign-omni.yaml``; one per method, e.g. the
``examples/campaign-omni-*.yaml``) with :func:`mergelab.platform.campaign.run_campaign` (the code ``mergelab
campaign`` runs) on a throwaway store (``--root``, default a temporary directory), on the omni zoo ``--zoo``
(built first when missing) for each seed of ``--seeds`` (default: the config's), ``--trials`` trials each (default:
the config's budget). The search sees only val (the config's objective). Then, on the omni table's test items of
each seed (:func:`mergelab.bench.omni.table.eval_items`, :class:`~mergelab.bench.omni.table.EvalSizes`), it scores
each campaign's best trial (its registered version, named ``<kind>/<method>+tuned``; ``--tag`` renames it) and
takes the references:

* with ``--reference-json`` (a ``mergelab bench omni`` JSON of the same zoo, e.g.
  ``benchmarks/results/omni/screen5_E_lora.json``): each expert (``expert/<m>/<kind>``, only its own medium) and
  every method's default merge at its val-selected lambda (``<kind>/<method>``), as that table scored them;
* without: each expert with only its own medium (the table's expert columns) and each campaign's template default
  (the method's defaults, every coefficient 1: trial 0's recipe), scored here.

It prints, per seed and over the seeds (mean +- population spread), the cross-modal sets, their average and each
modality's own tasks, each model's own-task delta against each modality's expert, and the issue's targets
(:func:`mergelab.bench.omni.table.targets`) for the default merges, the tuned ones, both together and each tuned
merge alone; the JSON also holds every trial's val scores. ``--val-only`` runs the campaigns and prints each trial's
val scores (no test: e.g. ``examples/campaign-omni-audio-probe.yaml``); ``--combine`` unites this script's JSONs
and reports them together. Set OMP_NUM_THREADS=1:

    .venv/bin/python benchmarks/omni_campaign.py --zoo data/omni-zoo --trials 8 --json-out campaign.json
    .venv/bin/python benchmarks/omni_campaign.py --zoo Z --seeds 0,1,2 --config examples/campaign-omni-ta.yaml \\
        --config examples/campaign-omni-tsv.yaml --trials 20 --reference-json REF.json --json-out tuned.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from mergelab.bench.omni import data, table
from mergelab.bench.omni.tasks import CROSS_SETS, SINGLE_TASKS
from mergelab.engine import run_merge
from mergelab.hf import load_model
from mergelab.platform.campaign import run_campaign
from mergelab.platform.campaign_config import CampaignConfig, OmniZooRef, load_campaign
from mergelab.platform.campaign_space import recipe_template
from mergelab.platform.omni import omni_paths
from mergelab.platform.registry import resolve_model_dir
from mergelab.platform.store import Store

REPO = Path(__file__).resolve().parents[1]
ROWS = ("music_avqa", "avqa", "cross_avg", "own/image", "own/audio", "own/video")


def _score(path: Path, items: Any, only: str | None) -> dict[str, float]:
    model, processor = load_model(path, device="cpu")
    return {k: v for k, v in table.evaluate(model, processor, items, only=only).items() if k in ROWS}


def _for_seed(cfg: CampaignConfig, zoo: Path, seed: int, trials: int | None) -> CampaignConfig:
    """The config on ``zoo``'s seed ``seed``, its campaign, study and registered model named per seed."""
    cfg = cfg.model_copy(deep=True)
    assert isinstance(cfg.experts, OmniZooRef), f"{cfg.name}: experts is not an omni zoo reference"
    cfg.experts.omni_zoo, cfg.experts.seed, cfg.device = str(zoo.resolve()), seed, "cpu"
    if trials is not None:
        cfg.budget.n_trials = trials
    cfg.name = cfg.study_name = f"{cfg.name}-seed{seed}"
    cfg.registry.name = f"{cfg.registry.name}-seed{seed}"
    return cfg


def val_trials(store: Store, cfg: CampaignConfig) -> list[dict[str, Any]]:
    """Every complete trial of ``cfg``'s study: number, objective value, params, val scores, and their cross-modal
    average and own-task mean per modality (``cross_avg``, ``own/<m>``; val items: the table's)."""
    study = optuna.load_study(study_name=cfg.study_name or cfg.name, storage=store.optuna_storage)
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        val = dict(t.user_attrs.get("val_scores", {}))
        if all(s in val for s in CROSS_SETS):
            val["cross_avg"] = sum(val[s] for s in CROSS_SETS) / len(CROSS_SETS)
        for m in data.MODALITIES:
            own = [val[k] for k, of in SINGLE_TASKS.items() if of == m and k in val]
            if own:
                val[f"own/{m}"] = sum(own) / len(own)
        out.append({"number": t.number, "value": t.values[0], "params": dict(t.params), "val": val})
    return out


def format_trials(trials: list[dict[str, Any]]) -> str:
    """One line per trial: objective, val cross-modal average, own-task means, params."""
    lines = []
    for t in trials:
        v = t["val"]
        cells = " ".join(f"{k} {v[k]:5.1f}" for k in ("cross_avg", *(f"own/{m}" for m in data.MODALITIES)) if k in v)
        params = " ".join(f"{k.removeprefix('coef.')}={x:.2f}" if isinstance(x, float) else f"{k}={x}"
                          for k, x in t["params"].items())
        lines.append(f"  trial {t['number']:2d} objective {t['value']:5.1f} | val {cells} | {params}")
    return "\n".join(lines)


def run_seed(cfgs: list[CampaignConfig], zoo: Path, seed: int, store: Store, work: Path, trials: int | None,
             reference: dict[str, Any] | None, val_only: bool = False, tag: str = "tuned") -> dict[str, Any]:
    """One seed: every campaign, then (unless ``val_only``) the test scores of the tuned merges (``<kind>/<method>+
    <tag>``) and the references."""
    items = table.eval_items("test", table.EvalSizes(), seed)
    out: dict[str, Any] = {"seed": seed, "models": {}, "campaigns": {}}
    kind = ""
    for cfg0 in cfgs:
        cfg = _for_seed(cfg0, zoo, seed, trials)
        assert isinstance(cfg.experts, OmniZooRef)
        kind = cfg.experts.kind
        t0 = time.perf_counter()
        res = run_campaign(cfg, store=store, summarize=False)
        seconds = time.perf_counter() - t0
        out["campaigns"][cfg0.name] = {"method": cfg.method, "n_complete": res.n_complete, "best": res.best,
                                       "objective": cfg.objective.names[0], "seconds_campaign": seconds,
                                       "trials": val_trials(store, cfg)}
        print(f"seed {seed} {cfg.method}: {res.n_complete} trials in {seconds:.0f} s; best trial "
              f"{res.best['number']} {cfg.objective.names[0]} {res.best['values'][0]:.2f} "
              f"{json.dumps(res.best['params'])}", flush=True)
        if val_only:
            print(format_trials(out["campaigns"][cfg0.name]["trials"]), flush=True)
            continue
        best_dir = resolve_model_dir(store, f"models:/{cfg.registry.name}/{res.registered[0][0]}")
        out["models"][f"{kind}/{cfg.method}+{tag}"] = _score(best_dir, items, None)
        if reference is None:
            template, _ = recipe_template(cfg)
            run_merge(template, work / f"default-{cfg.method}-{seed}", overwrite=True)
            out["models"][f"{kind}/{cfg.method}"] = _score(work / f"default-{cfg.method}-{seed}", items, None)
    if val_only:
        return out
    if reference is not None:
        ref = next(r for s, r in zip(reference["seeds"], reference["per_seed"], strict=True) if s == seed)
        wanted = [n for n in ref["models"] if (n.startswith("expert/") and n.endswith(f"/{kind}"))
                  or (n.startswith(f"{kind}/") and n.count("/") == 1)]  # not factor-mode merges, compositions
        out["models"].update({n: {k: v for k, v in ref["models"][n].items() if k in ROWS} for n in wanted})
        out["lam"] = ref.get("lam", {})
    else:
        cfg = _for_seed(cfgs[0], zoo, seed, trials)
        assert isinstance(cfg.experts, OmniZooRef)
        base, experts = omni_paths(cfg.experts)
        for m, _ in experts:
            out["models"][f"expert/{m}/{kind}"] = _score(base.parent / "experts" / kind / m, items, m)
    return out


def own_deltas(models: dict[str, dict[str, float]], kind: str) -> dict[str, dict[str, float]]:
    """Each merge's own-task score minus the modality's expert's (negative: the merge lost that much)."""
    experts = {m: models[f"expert/{m}/{kind}"][f"own/{m}"] for m in data.MODALITIES if f"expert/{m}/{kind}" in models}
    return {n: {m: s[f"own/{m}"] - e for m, e in experts.items() if f"own/{m}" in s}
            for n, s in models.items() if not n.startswith("expert/")}


def _only(agg: dict[str, Any], keep: Any) -> dict[str, Any]:
    return {n: v for n, v in agg.items() if n.startswith("expert/") or keep(n)}


def report(per_seed: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Print the seeds' table (mean +- spread) and the targets; returns ``{"aggregate", "targets"}``.

    Targets (:func:`mergelab.bench.omni.table.targets`, on the seed means) for the default merges, the tuned ones,
    both, and each tuned method alone (``tuned/<method>``: no choice among methods on test).
    """
    agg = table.aggregate(per_seed)
    targets = {"default": table.targets(_only(agg, lambda n: "+" not in n), kind),
               "tuned": table.targets(_only(agg, lambda n: "+" in n), kind),
               "all": table.targets(agg, kind)}
    for name in [n for n in agg if "+" in n]:
        targets[f"tuned/{name.split('/', 1)[1]}"] = table.targets(
            _only(agg, lambda n, name=name: n == name), kind)
    print(f"{len(per_seed)} seed(s), test, mean +- spread")
    print(table.format_table(agg, kind))
    for name, t in targets.items():
        print(f"[{name}] " + table.format_targets(t))
    return {"aggregate": agg, "targets": targets}


def combine(paths: list[Path]) -> dict[str, Any]:
    """Unite the per-seed models and campaigns of several JSONs of this script (the same seeds)."""
    runs = [json.loads(p.read_text()) for p in paths]
    per_seed = runs[0]["per_seed"]
    for run in runs[1:]:
        assert run["seeds"] == runs[0]["seeds"], f"seeds differ: {run['seeds']} vs {runs[0]['seeds']}"
        for mine, other in zip(per_seed, run["per_seed"], strict=True):
            mine["models"].update(other["models"])
            mine["campaigns"].update(other["campaigns"])
            mine["own_deltas"].update(other["own_deltas"])
    return {"configs": [c for r in runs for c in r["configs"]], "zoo": runs[0]["zoo"], "seeds": runs[0]["seeds"],
            "trials": [r["trials"] for r in runs], "reference_json": runs[0]["reference_json"],
            "combined": [str(p) for p in paths], "test_items": runs[0]["test_items"], "per_seed": per_seed,
            "seconds": sum(r["seconds"] for r in runs)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, action="append", default=None,
                    help="a campaign YAML over omni experts (repeat: one campaign each; default the shipped example)")
    ap.add_argument("--zoo", type=Path, default=None, help="the omni zoo root (<zoo>/omni/seed<k>)")
    ap.add_argument("--seeds", default=None, help="comma-separated zoo seeds (default: the first config's)")
    ap.add_argument("--trials", type=int, default=None, help="trials per campaign (default: the config's budget)")
    ap.add_argument("--reference-json", type=Path, default=None,
                    help="a `mergelab bench omni` JSON of this zoo: its experts and default merges are the references")
    ap.add_argument("--root", type=Path, default=None, help="MLflow/Optuna store (default: a temporary directory)")
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="no campaign: unite JSONs of this script (same seeds) and report them together")
    ap.add_argument("--kind", default="lora", help="with --combine: the experts' setting")
    ap.add_argument("--tag", default="tuned", help="the tuned merges' names: <kind>/<method>+<tag>")
    ap.add_argument("--val-only", action="store_true",
                    help="run the campaigns and print every trial's val scores; no test scoring, no references")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.combine:
        out = combine(args.combine)
        out.update(report(out["per_seed"], args.kind))
    else:
        if args.zoo is None:
            ap.error("--zoo is required (unless --combine)")
        out = run_campaigns(args)
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1, default=str))
    return out


def run_campaigns(args: argparse.Namespace) -> dict[str, Any]:
    """The campaigns of ``args.config`` on each seed, the test scores, the report."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    paths = args.config or [REPO / "examples" / "campaign-omni.yaml"]
    cfgs = [load_campaign(p) for p in paths]
    first = cfgs[0].experts
    assert isinstance(first, OmniZooRef), f"{paths[0]}: experts is not an omni zoo reference"
    kind = first.kind
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [first.seed]
    reference = json.loads(args.reference_json.read_text()) if args.reference_json else None
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.resolve(args.root or Path(tmp) / "mlruns")
        for seed in seeds:
            per_seed.append(run_seed(cfgs, args.zoo, seed, store, Path(tmp), args.trials, reference, args.val_only,
                                     args.tag))
            if args.val_only:
                continue
            per_seed[-1]["own_deltas"] = own_deltas(per_seed[-1]["models"], kind)
            print(f"seed {seed} (test)")
            print(table.format_table(table.aggregate([per_seed[-1]]), kind))
            print("own-task delta against each expert: " + "; ".join(
                f"{n.split('/', 1)[1]} " + " ".join(f"{m} {d:+.1f}" for m, d in ds.items())
                for n, ds in per_seed[-1]["own_deltas"].items()), flush=True)
    out = {"configs": [str(p) for p in paths], "zoo": str(args.zoo), "seeds": seeds, "trials": args.trials,
           "reference_json": str(args.reference_json) if args.reference_json else None,
           "test_items": table.EvalSizes().__dict__, "per_seed": per_seed}
    if not args.val_only:
        out.update(report(per_seed, kind))
    out["seconds"] = time.perf_counter() - t0
    return out


if __name__ == "__main__":
    main()
