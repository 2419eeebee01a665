"""Print the offline MLLM-merging benchmark's tables (issue 3) from the model zoo.

For each expert setting (full fine-tuning, LoRA) and each seed of the zoo: the base, every expert, the mixture
model and every registered merging method with its defaults (lambda chosen on the val split from the paper's grid
{0.1, 0.3, 0.5, 0.7, 1.0, 1.5}, spec section 1.7), scored on the test split; mean +- sd over the seeds. The first
table per setting is the benchmark (shifted variants), the second the base's original generic variants
(forgetting). The design targets of the issue are checked at the end, and the cost of one merge plus evaluation is
reported.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/offline_benchmark.py                 # shipped zoo, everything
    .venv/bin/python benchmarks/offline_benchmark.py --zoo /tmp/zoo --settings full --methods ties,optmerge
    .venv/bin/python benchmarks/offline_benchmark.py --build                           # build the zoo first
    .venv/bin/python benchmarks/offline_benchmark.py --combine s0full.json s0lora.json s1full.json s1lora.json

``--combine`` joins the ``--json-out`` files of runs split by seed and setting (one process per core) and prints
the tables and the targets over all of them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mergelab.bench.zoo_build import build_zoo
from mergelab.bench.zoo_plan import DEFAULT_ZOO
from mergelab.bench.zoo_table import benchmark, check_targets, combine_results, format_table, slowest_merge


def report(result: dict, settings: list[str]) -> None:
    """Print both tables per setting, the targets and the slowest merge + evaluation."""
    for setting in settings:
        for variant in ("shifted", "generic"):
            print("\n" + format_table(result, setting, variant))
        print()
        for name, ok, detail in check_targets(result, setting):
            print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
        line = slowest_merge(result, setting)
        if line:
            print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=DEFAULT_ZOO, help="zoo directory (default: the shipped zoo)")
    ap.add_argument("--build", action="store_true", help="build (or complete) the zoo first")
    ap.add_argument("--settings", default="full,lora")
    ap.add_argument("--methods", default=None, help="comma-separated (default: the whole registry)")
    ap.add_argument("--seeds", default=None, help="comma-separated (default: the zoo's)")
    ap.add_argument("--val-limit", type=int, default=100, help="val items per task for the lambda search")
    ap.add_argument("--test-limit", type=int, default=None, help="test items per task (default: all)")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="print the tables of these --json-out files joined (no merging or scoring)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.combine:
        result = combine_results([json.loads(p.read_text()) for p in args.combine])
        report(result, [s for s in ("full", "lora") if s in result["rows"]])
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=1, default=str))
        return 0

    if args.build:
        t0 = time.perf_counter()
        build_zoo(args.zoo, progress=True, data_root=args.data_root)
        print(f"zoo built in {time.perf_counter() - t0:.0f} s")
    settings = args.settings.split(",")
    result = benchmark(
        args.zoo,
        settings=settings,
        methods=args.methods.split(",") if args.methods else None,
        seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
        val_limit=args.val_limit,
        test_limit=args.test_limit,
        data_root=args.data_root,
    )
    report(result, settings)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
