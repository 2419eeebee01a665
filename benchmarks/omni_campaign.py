"""An Optuna campaign over OptMerge on the omni experts, and its best merge against the default merge and the experts.

Runs ``examples/campaign-omni.yaml`` (or ``--config``) with :func:`mergelab.platform.campaign.run_campaign` (the
code ``mergelab campaign`` runs) on a throwaway store (``--root``, default a temporary directory), the omni zoo
given by ``--zoo`` (built first when missing), ``--trials`` trials; the objective is the cross-modal average on
val, the only split the search sees. Then, on the omni table's test items of the zoo's seed
(:func:`mergelab.bench.omni.table.eval_items`, :class:`~mergelab.bench.omni.table.EvalSizes`), it scores the
campaign's best trial (its registered version), the template's default merge (the method's defaults, every
coefficient 1: trial 0's recipe) and each expert with only its own medium (the table's expert columns), and prints
the cross-modal sets, their average and each modality's own tasks.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/omni_campaign.py --zoo data/omni-zoo --trials 8 \\
        --json-out benchmarks/results/omni/campaign_seed0_lora.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mergelab.bench.omni import table
from mergelab.engine import run_merge
from mergelab.hf import load_model
from mergelab.platform.campaign import run_campaign
from mergelab.platform.campaign_config import OmniZooRef, load_campaign
from mergelab.platform.campaign_space import recipe_template
from mergelab.platform.omni import omni_paths
from mergelab.platform.registry import resolve_model_dir
from mergelab.platform.store import Store

REPO = Path(__file__).resolve().parents[1]
ROWS = ("music_avqa", "avqa", "cross_avg", "own/image", "own/audio", "own/video")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "examples" / "campaign-omni.yaml")
    ap.add_argument("--zoo", type=Path, required=True, help="the omni zoo root (<zoo>/omni/seed<k>)")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--root", type=Path, default=None, help="MLflow/Optuna store (default: a temporary directory)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = load_campaign(args.config)
    assert isinstance(cfg.experts, OmniZooRef), f"{args.config}: experts is not an omni zoo reference"
    cfg.experts.omni_zoo, cfg.budget.n_trials, cfg.device = str(args.zoo.resolve()), args.trials, "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.resolve(args.root or Path(tmp) / "mlruns")
        res = run_campaign(cfg, store=store, summarize=False)
        seconds_campaign = time.perf_counter() - t0
        best_dir = resolve_model_dir(store, f"models:/{cfg.registry.name}/{res.registered[0][0]}")
        template, _ = recipe_template(cfg)
        run_merge(template, Path(tmp) / "default", overwrite=True)
        base, experts = omni_paths(cfg.experts)
        items = table.eval_items("test", table.EvalSizes(), cfg.experts.seed)
        models = [("campaign best", best_dir, None), ("default merge", Path(tmp) / "default", None)]
        models += [(f"{m} expert", base.parent / "experts" / cfg.experts.kind / m, m) for m, _ in experts]
        scores = {}
        for name, path, only in models:
            model, processor = load_model(path, device="cpu")
            scores[name] = {k: v for k, v in table.evaluate(model, processor, items, only=only).items()
                            if k in ROWS}
    print(f"campaign {cfg.name}: {res.n_complete} trials in {seconds_campaign:.0f} s; best trial "
          f"{res.best['number']} val {res.best['values'][0]:.2f} {json.dumps(res.best['params'])}")
    print("test".ljust(12) + "".join(n.rjust(15) for n in scores))
    for row in ROWS:
        print(row.ljust(12) + "".join((f"{s[row]:.2f}" if row in s else "-").rjust(15) for s in scores.values()))
    out = {"config": str(args.config), "zoo": str(args.zoo), "trials": args.trials, "best": res.best,
           "test_items": table.EvalSizes().__dict__, "scores": scores, "seconds": time.perf_counter() - t0,
           "seconds_campaign": seconds_campaign}
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
