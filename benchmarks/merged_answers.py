"""What a merged zoo model answers when it is wrong: the most common wrong answers per task.

Merges one seed's experts of the zoo with one method at one lambda (the engine's lam = 1 merge, scaled), scores the
first ``--limit`` test items of each task's shifted variant and prints each task's score with its most common wrong
answers. A merge that answers every task with one expert's words ("90" to a colour question) shows that expert's
answer prior leaking through the merge (docs/benchmark-zoo.md, "a base that already knows the experts' words").

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/merged_answers.py --setting lora --seed 1 --method tsv --lam 0.5
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import torch

from mergelab.bench.tasks import TASKS
from mergelab.bench.zoo_plan import DEFAULT_ZOO, expert_names
from mergelab.bench.zoo_table import LamScan
from mergelab.engine import merge
from mergelab.evaluators import evaluate
from mergelab.methods import METHODS


def wrong_answers(model, processor, task: str, limit: int, top: int) -> tuple[float, list[tuple[str, int]]]:
    """The task's score on its first ``limit`` test items and its ``top`` most common wrong answers."""
    res = evaluate(model, processor, tasks=[task], split="test", limit=limit, batch_size=64)
    wrong = collections.Counter(r["prediction"].strip()[:24] for r in res.records if r["score"] < 1)
    return float(res.scores[task]), wrong.most_common(top)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=DEFAULT_ZOO)
    ap.add_argument("--setting", choices=("full", "lora"), default="lora")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="tsv")
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int, default=200, help="test items per task")
    ap.add_argument("--top", type=int, default=8, help="wrong answers shown per task")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = args.zoo / f"seed{args.seed}" / "base"
    experts = [str(args.zoo / n) for n in expert_names(args.seed, args.setting)]
    with tempfile.TemporaryDirectory(prefix="mergelab-answers-") as tmp:
        out = Path(tmp) / "merged"
        merge(base=base, experts=experts, method=args.method,
              params={**METHODS[args.method].setting_params(args.setting), "lam": 1.0}, policy="qwen2_vl", out=out,
              device="cpu", seed=args.seed)
        scan = LamScan(base, out)
        model = scan.set(args.lam)
        print(f"{args.setting} seed {args.seed} {args.method} lam {args.lam}, first {args.limit} test items per task")
        for task in args.tasks.split(","):
            score, wrong = wrong_answers(model, scan.processor, task, args.limit, args.top)
            shown = ", ".join(f"{a!r} x{n}" for a, n in wrong)
            print(f"  {task:<10} {score:5.1f}  wrong: {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
