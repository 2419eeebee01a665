"""Core-space merging of LoRA adapters (``lora_merge: core``) against the delta mode, on one weight: speed, memory,
agreement.

For one weight of shape ``out x in`` (default 896x4864, the InternVL2.5-1B MLP's ``down_proj``) and ``T`` random
LoRA adapters of rank ``r`` (default five, r=128), each method merges

* in the **delta** mode, as the engine does today: the ``T`` task vectors ``scaling * B_i @ A_i`` (m x n each),
  the method on them; ``output: adapter`` then factors the merged update by SVD at rank ``sum r``
  (:func:`mergelab.engine.adapter_out.factor`);
* in **core** space (:mod:`mergelab.engine.core_space`): the bases of the factors' spans and the ``T`` cores
  (``sum r`` square), the method on the cores; a full checkpoint expands ``U M V^T`` (m x n), ``output: adapter``
  splits it by the SVD of the core (:func:`mergelab.engine.adapter_out.split`).

It prints one row per method: seconds of each step, the ratios delta/core for the merge and for the adapter output,
the peak anonymous RSS growth of each mode (sampled; MiB), and the relative Frobenius difference of the two modes'
updates (about 1e-6 for methods invariant to orthogonal changes of basis, larger by design for the others).

``--engine`` instead runs whole merges through :func:`mergelab.engine.run_merge` on a random-weight InternVL2.5-1B
checkpoint (``benchmarks/realistic.py``'s builder: published shapes, ``--engine-layers`` LLM layers, a 1% vocabulary)
with its five rank-128 LoRA adapters on every LLM linear layer: delta and core modes, full and adapter outputs; it
prints wall seconds, the engine's peak anonymous RSS, the adapter's exactness and the core outputs' difference from
the delta mode's.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/lora_core.py                       # 896x4864, 5 x r=128
    OMP_NUM_THREADS=1 python benchmarks/lora_core.py --engine --engine-layers 1 --methods task_arithmetic,optmerge
    OMP_NUM_THREADS=1 python benchmarks/lora_core.py --shape 224x1216 --rank 32 --methods task_arithmetic,tsv
    OMP_NUM_THREADS=1 python benchmarks/lora_core.py --out benchmarks/results/lora_core_cpu.txt
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergelab.engine import CheckpointReader, MergeRecipe, run_merge
from mergelab.engine.adapter_out import factor, split
from mergelab.engine.core_space import core_space, merge_cores
from mergelab.engine.stream import PeakMemory
from mergelab.methods import METHODS
from mergelab.methods.base import MergeContext, tensor_generator

DEFAULT_METHODS = "task_arithmetic,weight_average,ties,tsv,iso_c,optmerge"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_method(name: str, bs: list[Tensor], as_: list[Tensor], steps: int) -> dict[str, Any]:
    """Both modes of one method on the same factors: times, peak memory and agreement."""
    spec = METHODS[name]
    params = {**spec.setting_params("lora"), **({"steps": steps} if name in ("optmerge", "wudi") else {})}
    cfg = spec.make_config(params)
    m, n, rank = bs[0].shape[0], as_[0].shape[1], sum(b.shape[1] for b in bs)
    row: dict[str, Any] = {"method": name}

    def delta_merge() -> Tensor:
        deltas = torch.stack([b @ a for b, a in zip(bs, as_, strict=True)])
        stats = spec.make_stats(cfg, len(bs)) if spec.make_stats else None
        while stats is not None:
            stats.update("w", deltas)
            if not stats.finish_pass():
                break
        return spec.fn(torch.zeros(m, n), deltas, cfg, MergeContext(name="w", generator=tensor_generator(0, "w"),
                                                                      stats=stats, inplace=True))

    with PeakMemory(interval=0.005) as mem:
        start = mem.current()
        tau, row["delta merge"] = timed(delta_merge)
        _, row["delta adapter"] = timed(lambda: factor(tau, rank))
    row["delta MiB"] = (mem.peak - start) / 2**20
    with PeakMemory(interval=0.005) as mem:
        start = mem.current()
        sp, row["core bases"] = timed(lambda: core_space(bs, as_))
        lr, row["core merge"] = timed(lambda: merge_cores({"w": sp}, {"w": "merge"}, spec, cfg, seed=0, lam=1.0)["w"])
        dense, row["core full"] = timed(lr.dense)
        _, row["core adapter"] = timed(lambda: split(lr, rank))
    row["core MiB"] = (mem.peak - start) / 2**20
    row["merge x"] = row["delta merge"] / (row["core bases"] + row["core merge"] + row["core full"])
    row["adapter x"] = (row["delta merge"] + row["delta adapter"]) / (
        row["core bases"] + row["core merge"] + row["core adapter"])
    row["rel diff"] = float((tau - dense).norm() / tau.norm())
    return row


COLUMNS = ["method", "delta merge", "delta adapter", "core bases", "core merge", "core full", "core adapter",
           "merge x", "adapter x", "delta MiB", "core MiB", "rel diff"]


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table."""
    def cell(k: str, v: Any) -> str:
        if k == "method":
            return f"{v:<16}"
        return f"{v:>14.1e}" if k == "rel diff" else f"{v:>14.0f}" if k.endswith("MiB") else f"{v:>14.2f}"

    return "\n".join([f"{'method':<16}" + "".join(f"{c:>14}" for c in COLUMNS[1:]),
                      *("".join(cell(k, r[k]) for k in COLUMNS) for r in rows)])


def release_freed_memory() -> None:
    """Make glibc return every large freed block to the system at once (a fixed mmap threshold), so that the
    sampled RSS growth of one mode does not hide in blocks the previous one left in the heap."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: the numbers are upper-bounded by reuse, no more
        pass


def engine_rows(methods: list[str], layers: int, steps: int) -> tuple[list[str], dict[str, Any]]:
    """Whole merges (delta / core x full / adapter) of the realistic InternVL2.5-1B LoRA adapters, one row each."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from realistic import build_family  # noqa: PLC0415  (a sibling script, importable only from here)

    root = Path(tempfile.mkdtemp(prefix="lora-core-"))
    lines = [f"{'method':<16}{'mode':>8}{'output':>9}{'wall s':>10}{'peak MiB':>10}{'adapter':>22}{'vs delta':>10}"]
    try:
        fam = build_family(root, "internvl2_5_1b", layers / 24, 5, 0, "cpu", vocab_scale=0.01)
        for name in methods:
            spec = METHODS[name]
            params = {**spec.setting_params("lora"), **({"steps": steps} if name in ("optmerge", "wudi") else {})}
            recipe = MergeRecipe.build(base=fam["base"], experts=fam["loras"], method=name, params=params,
                                       device="cpu", dtype="float32")  # float32 out: agreement beyond bf16 rounding
            outs: dict[tuple[str, str], Path] = {}
            for mode in ("delta", "core"):
                for output in ("full", "adapter"):
                    d = root / f"{name}-{mode}-{output}"
                    before = PeakMemory.current()
                    t0 = time.perf_counter()
                    rep = run_merge(recipe.replace(lora_merge=mode, output=output), d)
                    wall = time.perf_counter() - t0
                    grown = (rep.peak_rss_bytes - before) / 2**20
                    outs[mode, output] = d
                    a = getattr(rep, "adapter", None)
                    ad = f"r {a['rank']}, err {a['max_rel_error']:.1e}" if a else ""
                    diff = ""
                    if mode == "core" and output == "full":
                        diff = f"{_compare(fam['base'], outs['delta', 'full'], d):.1e}"
                    lines.append(f"{name:<16}{mode:>8}{output:>9}{wall:>10.2f}{grown:>10.0f}{ad:>22}{diff:>10}")
                    print(lines[-1], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return lines, fam


def _compare(base: str, a: Path, b: Path) -> float:
    """The largest relative Frobenius difference of two merges' updates ``|x - y| / |x - base|`` over the tensors
    the first one changed."""
    r0, ra, rb = CheckpointReader(base), CheckpointReader(a), CheckpointReader(b)
    try:
        rel = 0.0
        for k in ra.keys():
            x0, x, y = r0.get(k).float(), ra.get(k).float(), rb.get(k).float()
            change = float((x - x0).norm())
            if change > 0:
                rel = max(rel, float((x - y).norm()) / change)
        return rel
    finally:
        for r in (r0, ra, rb):
            r.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="896x4864", help="out x in of the weight")
    p.add_argument("--experts", type=int, default=5)
    p.add_argument("--rank", type=int, default=128, help="each adapter's rank")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--steps", type=int, default=300, help="OptMerge / WUDI steps")
    p.add_argument("--out", help="also write the table (with the machine's description) to this file")
    p.add_argument("--engine", action="store_true", help="whole merges of a realistic InternVL2.5-1B checkpoint")
    p.add_argument("--engine-layers", type=int, default=1, help="LLM layers of that checkpoint (of 24)")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    release_freed_memory()
    if a.engine:
        lines, fam = engine_rows(a.methods.split(","), a.engine_layers, a.steps)
        load = os.getloadavg()
        text = "\n".join([
            f"lora_core --engine: InternVL2.5-1B shapes, {fam['llm_layers']} LLM layer(s), 5 LoRA adapters of rank "
            f"128 on every LLM linear layer (bf16 inputs, float32 output); run_merge wall seconds, peak anonymous "
            f"RSS growth of the merge (MiB; the adapter rows: of its inner full merge), adapter rank and worst "
            f"relative error, and the core full output's worst relative difference of the updates from the delta "
            f"mode's",
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, {torch.get_num_threads()} thread(s); load average {load[0]:.1f} {load[1]:.1f} "
            f"{load[2]:.1f} at the end", *lines])
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text + "\n")
        return
    m, n = (int(x) for x in a.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    scaling = 2.0  # lora_alpha = 2 r
    bs = [scaling * torch.randn(m, a.rank, generator=g) / a.rank**0.5 for _ in range(a.experts)]
    as_ = [torch.randn(a.rank, n, generator=g) / n**0.5 for _ in range(a.experts)]
    rows = []
    for name in a.methods.split(","):
        rows.append(run_method(name, bs, as_, a.steps))
        print(table(rows[-1:]).splitlines()[1], flush=True)
    load = os.getloadavg()
    text = "\n".join([
        f"lora_core: one {m}x{n} weight, {a.experts} LoRA adapters of rank {a.rank} (R = {a.experts * a.rank}); "
        f"seconds, peak anonymous RSS growth in MiB; OptMerge variant lora, {a.steps} steps",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s); load average {load[0]:.1f} {load[1]:.1f} "
        f"{load[2]:.1f} at the end",
        "delta merge: T task vectors + the method; delta adapter: SVD of the update at rank sum r; core bases: QR of "
        "the factor stacks + cores; core full: U M V^T; core adapter: SVD of the core; merge x = delta merge / "
        "(core bases + merge + full); adapter x = (delta merge + adapter) / (core bases + merge + adapter)",
        table(rows),
    ])
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
