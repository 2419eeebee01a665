"""Screen omni expert-training plans: experts from a copied base, a restricted Table 5, the targets, delta norms.

A screen changes only how the experts train (:class:`mergelab.bench.omni.build.OmniPlan` fields given with
``--set``), so it reuses a base already built with the same base plan (``--base-from``: a zoo root holding
``omni/seed<k>/base``; copied, never modified) and costs the three experts plus the table. Per seed it prints the
table (:func:`mergelab.bench.omni.table.run_seed`), the issue's targets (:func:`~mergelab.bench.omni.table.targets`)
and each expert's LLM delta norm (the LoRA delta ``scaling * B @ A`` summed over tensors), and writes everything
with the plan, the wall time and the load average to ``--json-out``.

Example (seed 0, a connector-only alignment stage of 100 of the 300 steps, the connector at 5x the LoRA lr)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/omni_screen.py --base-from /tmp/base_zoo --zoo /tmp/s1 \\
        --seeds 0 --jobs 2 --set align_steps=100 --set connector_lr=5 --json-out s1.json

A plan with the base's connector alignment (``--set base_align_steps=300``, docs/omni.md screen 6) copies an
unaligned base and aligns its connectors in the new zoo (61 s), as :func:`~mergelab.bench.omni.build.build_base`
would have after the base's text-only run; a base aligned with other settings is refused.

``--set`` takes ``field=value`` for a plan field, ``lora.<field>=value`` / ``full.<field>=value`` for the
setting's :class:`~mergelab.bench.train.TrainConfig`, and ``expert_steps=video:450,image:300``. Screens of one plan
run apart (other seeds, other methods on the same zoo) are united with ``--combine A.json B.json --json-out F``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from mergelab.bench.omni import analysis, data, table
from mergelab.bench.omni.build import OmniPlan, seed_dir

BASE_KEYS = ("size", "described", "base", "vocab_size")
"""Plan fields the base depends on: a copied base must have been built with the same values."""
ALIGN_KEYS = tuple(f.name for f in fields(OmniPlan) if f.name.startswith("base_align_"))
"""Plan fields of the base's connector alignment: a copied base built without one is aligned after the copy."""


def parse_value(text: str, like: Any) -> Any:
    """``text`` converted to the type of ``like``."""
    if isinstance(like, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    return text


def apply_overrides(plan: OmniPlan, sets: Sequence[str]) -> OmniPlan:
    """``plan`` with each ``key=value`` of ``sets`` applied (see the module docstring)."""
    for item in sets:
        key, _, value = item.partition("=")
        if key == "expert_steps":
            pairs = tuple((m, int(n)) for m, n in (p.split(":") for p in value.split(",") if p))
            plan = replace(plan, expert_steps=pairs)
        elif "." in key:
            sub, field = key.split(".", 1)
            cfg = getattr(plan, sub)
            plan = replace(plan, **{sub: replace(cfg, **{field: parse_value(value, getattr(cfg, field))})})
        else:
            plan = replace(plan, **{key: parse_value(value, getattr(plan, key))})
    return plan


def copy_base(src_zoo: Path, zoo: Path, seed: int, plan: OmniPlan) -> None:
    """Copy seed ``seed``'s base (and its stripped copy) from ``src_zoo`` unless ``zoo`` has one."""
    src, dst = seed_dir(src_zoo, seed), seed_dir(zoo, seed)
    if (dst / "base" / "model.safetensors").is_file():
        return
    built = json.loads((src / "build.json").read_text())["plan"]
    want = json.loads(json.dumps(plan.to_dict()))
    diff = [k for k in BASE_KEYS if built.get(k) != want.get(k)]
    if diff:
        raise SystemExit(f"{src}: its base was built with other {diff}")
    align = [k for k in ALIGN_KEYS if built.get(k) != want.get(k)]
    if align and any(k in built for k in ALIGN_KEYS):
        raise SystemExit(f"{src}: its base was aligned with other {align}")
    for part in ("base", "merge/base"):
        shutil.copytree(src / part, dst / part)
    if align:  # the copied base's LLM is this plan's; align its connectors now, as build_base would have
        from mergelab.bench.omni.build import _strip, align_connectors
        from mergelab.bench.omni.classes import OmniProcessor, OmniThinkerForConditionalGeneration

        processor = OmniProcessor.from_pretrained(dst / "base")
        model = OmniThinkerForConditionalGeneration.from_pretrained(dst / "base", use_safetensors=True)
        res = align_connectors(model, processor, plan, seed, "cpu")
        print(f"seed {seed}: base connectors aligned in {res.seconds:.0f} s (loss {res.losses[-1]:.3f})", flush=True)
        shutil.rmtree(dst / "merge" / "base")
        res.model.save_pretrained(dst / "base")
        _strip(dst / "base", dst / "merge" / "base", None)


def delta_norms(root: Path, setting: str) -> dict[str, float]:
    """Each expert's LLM delta: the Frobenius norm over every changed 2-D tensor, and the mean |cosine| of pairs."""
    rows = analysis.delta_interference(analysis.deltas(root, setting))
    out = {f"norm/{m}": sum(r[f"norm/{m}"] ** 2 for r in rows) ** 0.5 for m in data.MODALITIES}
    cos = [abs(v) for r in rows for k, v in r.items() if k.startswith("cos/")]
    out["mean_abs_cos"] = statistics.fmean(cos) if cos else 0.0
    return out


def combine(paths: Sequence[str]) -> dict[str, Any]:
    """One result from several screens' JSON of the same plan: the models of one seed are united, seeds listed in
    order; the aggregate and the targets recomputed."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    if any(r["plan"] != runs[0]["plan"] for r in runs):
        raise SystemExit("combine: the screens were run with different plans")
    by_seed: dict[int, dict[str, Any]] = {}
    for r in runs:
        for seed, res in zip(r["seeds"], r["per_seed"], strict=True):
            cur = by_seed.setdefault(seed, {"models": {}, "lam": {}, "seconds": 0.0, "build": res.get("build", {})})
            cur["models"].update(res["models"])
            cur["lam"].update(res["lam"])
            cur["seconds"] += res["seconds"]
        for seed, norms in r.get("delta_norms", {}).items():
            runs[0].setdefault("delta_norms", {})[seed] = norms
    seeds = sorted(by_seed)
    per_seed = [by_seed[s] for s in seeds]
    agg = table.aggregate(per_seed)
    settings = runs[0]["plan"]["settings"]
    return {"sources": list(paths), "plan": runs[0]["plan"], "seeds": seeds, "lam_grid": runs[0]["lam_grid"],
            "aggregate": agg, "per_seed": per_seed, "delta_norms": runs[0].get("delta_norms", {}),
            "targets": {s: table.targets(agg, s) for s in settings}}


def report(result: dict[str, Any]) -> str:
    """The tables and targets of a result, per setting."""
    return "\n".join(table.format_table(result["aggregate"], s) + "\n" + table.format_targets(t)
                     for s, t in result["targets"].items())


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, build the experts, run the restricted table, print and write the results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True, help="zoo root of this screen (experts are built here)")
    ap.add_argument("--base-from", default=None, help="zoo root whose omni/seed<k>/base is copied")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--settings", default="lora")
    ap.add_argument("--methods", default="weight_average,task_arithmetic,ties,tsv,iso_c,optmerge",
                    help="comma-separated methods, or 'all' (every paper method)")
    ap.add_argument("--lam", default="0.5,1,1.5")
    ap.add_argument("--set", action="append", default=[], help="plan override key=value (repeatable)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="only unite these screens' JSON (same plan) into --json-out and print the tables")
    a = ap.parse_args(argv)
    if a.combine:
        result = combine(a.combine)
        print(report(result))
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(result, indent=1, sort_keys=True))
        return 0
    torch.set_num_threads(1)
    plan = apply_overrides(replace(OmniPlan(), settings=tuple(a.settings.split(","))), a.set)
    methods = None if a.methods == "all" else a.methods.split(",")
    grid = tuple(float(x) for x in a.lam.split(","))
    t0, load0 = time.perf_counter(), os.getloadavg()
    per_seed, norms = [], {}
    for seed in (int(s) for s in a.seeds.split(",")):
        if a.base_from:
            copy_base(Path(a.base_from), Path(a.zoo), seed, plan)
        res = table.run_seed(a.zoo, seed, plan=plan, methods=methods, lam_grid=grid, jobs=a.jobs)
        res["build"] = json.loads((seed_dir(a.zoo, seed) / "build.json").read_text()).get("experts", {})
        per_seed.append(res)
        norms[seed] = {s: delta_norms(seed_dir(a.zoo, seed), s) for s in plan.settings}
        print(f"seed {seed}: delta norms {json.dumps(norms[seed])}", flush=True)
    agg = table.aggregate(per_seed)
    out: dict[str, Any] = {"argv": list(sys.argv[1:] if argv is None else argv), "plan": plan.to_dict(),
                           "seeds": [int(s) for s in a.seeds.split(",")], "lam_grid": list(grid),
                           "aggregate": agg, "per_seed": per_seed, "delta_norms": norms,
                           "seconds": time.perf_counter() - t0, "loadavg_start": load0, "loadavg_end": os.getloadavg()}
    out["targets"] = {setting: table.targets(agg, setting) for setting in plan.settings}
    print(report(out), flush=True)
    print(f"{out['seconds']:.0f} s, load average {load0[0]:.1f} -> {out['loadavg_end'][0]:.1f}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
