"""Per-layer OptMerge cost: mergelab's m x k form and exact SGD path against the official m x m formulation.

Prints a table (not a test). For each weight shape (out x in) and variant it times mergelab's ``optmerge`` (batched
thin SVDs, quadratic form; ``solver=auto`` = exact closed path for the SGD/LoRA variant, ``iterative`` = the
``torch.optim`` loop) and the official formulation of ``model_merging.py`` (spec 1.3/1.4/1.8: per-task full SVDs,
zero-padded m x n projector, one m x m product per task and step, autograd). The official loop is timed for
``--official-steps`` steps and extrapolated to 300 (marked ``~``). Times include the SVDs; on CUDA they are
synchronised and the peak allocated memory is reported.

Usage::

    python benchmarks/optmerge_cost.py --quick            # CPU-friendly shapes
    python benchmarks/optmerge_cost.py --device cuda      # 896x4864, 4864x896, 3584x18944, 18944x3584
    python benchmarks/optmerge_cost.py --device cuda --svd gram   # compare the SVD routes on a GPU
    python benchmarks/optmerge_cost.py --vs-swudi --device cpu --shapes 896x4864   # OptMerge against SWUDI

``--vs-swudi`` prints, per shape (default 896x4864 and 3584x18944, N = 5), our exact LoRA-variant OptMerge (closed
SGD path, 300 steps), the full variant's Adam cost per step (and its setup: spectra and factors) and SWUDI's total,
all in seconds on the same task vectors (``--timed-steps``: how many Adam steps the per-step cost is timed over,
default 10; fewer on CPU at the Qwen2-VL-7B shapes; 0 leaves the full variant out, its columns ``nan``).

``--per-step`` prints, per shape, the full (Adam) variant's setup (spectra, factors) and seconds per step against
the official form's (its setup incl. full SVDs, ``--official-steps`` steps timed), and both ratios::

    python benchmarks/optmerge_cost.py --per-step --device cpu --shapes 896x4864,4864x896 --timed-steps 10

``--per-step --layer internvl2_5_1b`` runs the same over one decoder layer's seven projections (shapes that
repeat are timed once) and adds a row for the whole layer; ``--flops`` prints the per-step FLOP model (official
``4 T m^2 n`` against mergelab's two m x n x R products) for every projection of both families, untimed::

    python benchmarks/optmerge_cost.py --per-step --device cpu --layer internvl2_5_1b --timed-steps 10 --official-steps 2
    python benchmarks/optmerge_cost.py --flops

``--cache`` prints, per shape, the seconds per trial of three OptMerge trials on the same task vectors (other
``steps``, ``lr``, ``rank_ratio``, coefficients, ``init``) without the decomposition cache and with it (the first
trial fills it, the next two hit it), and checks that the cached merges are bit-identical::

    python benchmarks/optmerge_cost.py --cache --device cpu --shapes 896x4864 --steps 300 --adam-steps 20

``--cache-zoo`` does the same through whole merges (``mergelab.engine.merge``) of the benchmark zoo's seed-0 LoRA
experts, OptMerge's full and lora variants, three trials each (other ``lam`` and ``steps``), with the process cache
off (``MERGELAB_DECOMP_CACHE_MB=0``) and on, and checks that every merged tensor is bit-identical.

``--eigh 1216,2432`` times one float32 and one float64 n x n ``eigh`` per size (SWUDI's cost at an n too large to
run, scaled by n^3).

``--trials K`` (1-3) and ``--variants lora,full`` restrict ``--cache`` to the first K trials and the named variants,
and ``--plain-last-only`` runs only the last of them without the cache too (the identity check's reference), for
the realistic shapes on CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from mergelab.engine import CheckpointReader, merge
from mergelab.engine.cache import CACHE_ENV, DecompositionLRU, process_cache
from mergelab.methods import MergeContext
from mergelab.methods._linalg import solve_iterative
from mergelab.methods.optmerge import OptMergeConfig, optmerge, optmerge_factors
from mergelab.methods.swudi import SwudiConfig, swudi

FULL_SHAPES = [(896, 4864), (4864, 896), (3584, 18944), (18944, 3584)]
SWUDI_SHAPES = [(896, 4864), (3584, 18944)]
QUICK_SHAPES = [(448, 2432), (2432, 448)]  # half the InternVL2.5-1B (Qwen2.5-0.5B) MLP shapes
# One decoder layer's linear weights (out x in) from the published configs: name -> [(proj, shape)]. InternVL2.5-1B's
# LLM is Qwen2.5-0.5B-Instruct (hidden 896, MLP 4864, 14 heads, 2 KV heads of 64); Qwen2-VL-7B's LLM has hidden
# 3584, MLP 18944, 28 heads, 4 KV heads of 128. OptMerge optimises every one of them (spec 1.6).
LAYERS: dict[str, list[tuple[str, tuple[int, int]]]] = {
    "internvl2_5_1b": [
        ("q_proj", (896, 896)), ("k_proj", (128, 896)), ("v_proj", (128, 896)), ("o_proj", (896, 896)),
        ("gate_proj", (4864, 896)), ("up_proj", (4864, 896)), ("down_proj", (896, 4864)),
    ],
    "qwen2_vl_7b": [
        ("q_proj", (3584, 3584)), ("k_proj", (512, 3584)), ("v_proj", (512, 3584)), ("o_proj", (3584, 3584)),
        ("gate_proj", (18944, 3584)), ("up_proj", (18944, 3584)), ("down_proj", (3584, 18944)),
    ],
}


def step_flops(m: int, n: int, experts: int) -> tuple[float, float]:
    """FLOPs (2 per multiply-add) of one full-variant step: (mergelab's, the official m x m form's).

    Official: per task, the forward ``(x - t_i) @ low_i^T`` (m x n x m) and the backward ``grad @ low_i``
    (m x m x n): ``4 T m^2 n``. mergelab (``_linalg._gradient_fn``): two m x n x R products (``R = T k``,
    ``k = min(m, n) // T``) when ``2 R < n``, else one m x n x n product.
    """
    r = experts * (min(m, n) // experts)
    ours = 4.0 * m * n * r if 2 * r < n else 2.0 * m * n * n
    return ours, 4.0 * experts * m * m * n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Seconds and peak allocated GiB (CUDA only; 0 on CPU) of one call."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return time.perf_counter() - t0, peak


def official(d: Tensor, variant: str, steps: int, device: torch.device) -> tuple[float, float, float]:
    """The official m x m formulation; returns (setup seconds, seconds per step, peak GiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    t_, m, n = d.shape
    k = min(m, n) // t_
    mean = d.mean(0)
    targets, lows, weights = [], [], []
    for i in range(t_):
        u, s, vh = torch.linalg.svd(d[i], full_matrices=True)
        low = torch.zeros(m, n, device=d.device)
        low[:k] = s[:k, None] * vh[:k]
        if variant == "full":
            uc, sc, vhc = torch.linalg.svd(d[i] - mean, full_matrices=False)
            targets.append((uc[:, :k] * sc[:k]) @ vhc[:k] + mean)
        else:
            targets.append((u[:, :k] * s[:k]) @ vh[:k])
        del u, s, vh
        lows.append(low)
        weights.append(1.0 / d[i].square().sum())
    x = (d.sum(0) if variant == "full" else d.mean(0)).clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=1e-5) if variant == "full" else torch.optim.SGD([x], lr=1e-4, momentum=0.9)
    sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        loss = sum(
            ((x - t) @ low.T).square().sum() * w for t, low, w in zip(targets, lows, weights, strict=True)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(device)
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return t1 - t0, (t2 - t1) / steps, peak


def full_step_cost(d: Tensor, steps: int, timed_steps: int, device: torch.device) -> tuple[float, float]:
    """Seconds of the full variant's setup (spectra, factors) and of one Adam step (mean of ``timed_steps``)."""
    cfg = OptMergeConfig(variant="full", steps=steps)
    out: dict[str, object] = {}
    setup, _ = timed(lambda: out.update(factors=optmerge_factors(d, cfg)), device)
    f, h = out["factors"]  # type: ignore[misc]
    x0 = d.sum(0)
    loop, _ = timed(
        lambda: solve_iterative(x0, f, h, optimizer="adam", lr=cfg.lr, steps=timed_steps, momentum=0.9),
        device,
    )
    return setup, loop / timed_steps


def vs_swudi_row(d: Tensor, steps: int, timed_steps: int, device: torch.device) -> tuple[float, ...]:
    """Seconds of: exact LoRA OptMerge; the full variant's setup (spectra, factors) and one Adam step (NaN for
    ``timed_steps=0``: not run); SWUDI."""
    ctx = MergeContext()
    lora, _ = timed(lambda: optmerge(None, d, OptMergeConfig(variant="lora", steps=steps), ctx), device)
    setup, per_step = full_step_cost(d, steps, timed_steps, device) if timed_steps else (math.nan, math.nan)
    sw, _ = timed(lambda: swudi(None, d, SwudiConfig(), ctx), device)
    return lora, setup, per_step, sw


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu`` with the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


def layer_stacks(
    title: str, head: str, shapes: list[tuple[int, int]], experts: int, device: torch.device
) -> Iterator[tuple[int, int, Tensor]]:
    """Print a table's title (with N, dtype, device, torch) and head, then yield ``(m, n, task vectors)`` per shape
    (seeded, after a warm-up merge)."""
    print(f"{title}, N={experts}, float32, {device_name(device)}, torch {torch.__version__}")
    print(head)
    print("-" * len(head))
    for m, n in shapes:
        g = torch.Generator().manual_seed(0)
        d = (1e-3 * torch.randn(experts, m, n, generator=g)).to(device)
        optmerge(None, d[:, :64, :64], OptMergeConfig(steps=2), MergeContext())  # warm-up
        yield m, n, d


def per_step_table(
    shapes: list[tuple[int, int]],
    experts: int,
    steps: int,
    official_steps: int,
    timed_steps: int,
    device: torch.device,
    counts: dict[tuple[int, int], tuple[str, ...]] | None = None,
) -> None:
    """The full (Adam) variant's setup and per-step cost against the official m x m form, same task vectors.

    ``counts`` (``--layer``): the projections each shape stands for; a last row sums one decoder layer (each shape
    times its count), which is what a whole-model merge pays per layer.
    """
    head = (
        f"{'shape (out x in)':>17} {'setup s':>8} {'s/step':>8} {'official setup s':>16} {'official s/step':>15} "
        f"{'step ratio':>10} {f'{steps}-step ratio':>14} {'FLOP ratio':>10}"
        + (f"  {'projections'}" if counts else "")
    )
    title = "OptMerge full variant per step vs the official m x m form"
    total = [0.0, 0.0, 0.0, 0.0]  # setup, step, official setup, official step, each times the shape's count
    flops = [0.0, 0.0]
    for m, n, d in layer_stacks(title, head, shapes, experts, device):
        setup, step = full_step_cost(d, steps, timed_steps, device)
        o_setup, o_step, _ = official(d, "full", official_steps, device)
        ratio = (o_setup + steps * o_step) / (setup + steps * step)
        ours_f, off_f = step_flops(m, n, experts)
        names = counts[(m, n)] if counts else ()
        for j, v in enumerate((setup, step, o_setup, o_step)):
            total[j] += len(names) * v
        flops[0] += len(names) * ours_f
        flops[1] += len(names) * off_f
        print(
            f"{f'{m}x{n}':>17} {setup:8.2f} {step:8.4f} {o_setup:16.2f} {o_step:15.4f} {o_step / step:9.1f}x "
            f"{ratio:13.1f}x {off_f / ours_f:9.1f}x" + (f"  {', '.join(names)}" if names else ""),
            flush=True,
        )
        del d
    if counts:
        setup, step, o_setup, o_step = total
        ratio = (o_setup + steps * o_step) / (setup + steps * step)
        print("-" * len(head))
        print(
            f"{'one layer':>17} {setup:8.2f} {step:8.4f} {o_setup:16.2f} {o_step:15.4f} {o_step / step:9.1f}x "
            f"{ratio:13.1f}x {flops[1] / flops[0]:9.1f}x  every projection once"
        )
    print(
        f"(mergelab: {timed_steps} Adam steps timed, official: {official_steps}; the {steps}-step ratio is "
        f"(setup + {steps} steps) of each; FLOP ratio: one step's FLOPs (--flops), official over mergelab)"
    )


def flop_table(experts: int) -> None:
    """The per-step FLOP model of every ``LAYERS`` family: each projection and one whole decoder layer."""
    head = f"{'family':>15} {'projection':>10} {'shape (out x in)':>17} {'mergelab GFLOP':>14} {'official GFLOP':>14} {'ratio':>7}"
    print(f"OptMerge full variant, FLOPs of one Adam step (2 per multiply-add), N={experts} (model, not timed)")
    print(head)
    print("-" * len(head))
    for family, projs in LAYERS.items():
        tot = [0.0, 0.0]
        for proj, (m, n) in projs:
            ours, off = step_flops(m, n, experts)
            tot[0] += ours
            tot[1] += off
            print(f"{family:>15} {proj:>10} {f'{m}x{n}':>17} {ours / 1e9:14.1f} {off / 1e9:14.1f} {off / ours:6.1f}x")
        print(f"{family:>15} {'one layer':>10} {'':>17} {tot[0] / 1e9:14.1f} {tot[1] / 1e9:14.1f} {tot[1] / tot[0]:6.1f}x")


def vs_swudi(
    shapes: list[tuple[int, int]], experts: int, steps: int, device: torch.device, timed_steps: int = 10
) -> None:
    """OptMerge (exact LoRA variant; full variant per Adam step, over ``timed_steps``) against SWUDI's total."""
    head = (
        f"{'shape (out x in)':>17} {'OptMerge lora exact s':>21} {'full setup s':>12} {'full s/step':>11} "
        f"{'full ' + str(steps) + ' steps s':>15} {'SWUDI s':>8} {'lora/SWUDI':>10} {'SWUDI/full step':>15}"
    )
    for m, n, d in layer_stacks("OptMerge vs SWUDI per layer", head, shapes, experts, device):
        lora, setup, per_step, sw = vs_swudi_row(d, steps, timed_steps, device)
        print(
            f"{f'{m}x{n}':>17} {lora:21.2f} {setup:12.2f} {per_step:11.4f} {setup + steps * per_step:15.1f} "
            f"{sw:8.2f} {lora / sw:9.2f}x {sw / per_step:14.0f}x",
            flush=True,
        )


def cache_trials(variant: str, steps: int, experts: int) -> list[OptMergeConfig]:
    """Three trials a campaign could draw: other steps and lr (trial 2), then another rank, coefficients and init
    (trial 3: the spectra are reused, the rank-k pieces are not)."""
    opt = {"optimizer": "adam"} if variant == "full" else {}
    coefs = tuple(1.0 + 0.5 * (i % 3) for i in range(experts))
    return [
        OptMergeConfig(variant=variant, steps=steps, **opt),
        OptMergeConfig(
            variant=variant, steps=max(1, steps // 2), lr=2e-5 if variant == "full" else 2e-4, **opt
        ),
        OptMergeConfig(variant=variant, steps=steps, rank_ratio=0.1, coefficients=coefs, init="mean", **opt),
    ]


def timed_merge(
    d: Tensor, cfg: OptMergeConfig, ctx: MergeContext, device: torch.device
) -> tuple[float, Tensor]:
    """Seconds of one OptMerge call, and its result."""
    out: list[Tensor] = []
    secs, _ = timed(lambda: out.append(optmerge(None, d, cfg, ctx)), device)
    return secs, out[0]


def cache_compare(
    shapes: list[tuple[int, int]],
    experts: int,
    steps: int,
    adam_steps: int,
    device: torch.device,
    trials: int = 3,
    variants: tuple[str, ...] = ("lora", "full"),
    plain_last_only: bool = False,
) -> None:
    """Seconds per OptMerge trial without and with the decomposition cache (the first ``trials`` of the three
    trials of :func:`cache_trials`, same task vectors) for each of ``variants``; with ``plain_last_only`` only the
    last trial also runs without the cache (``-`` for the others), its merge the reference of the identity check.
    Each trial's seconds also go to stderr as they come."""
    head = (
        f"{'shape (out x in)':>17} {'variant':7} {'steps':>5} {'no cache s: trial 1 / 2 / 3':>27} "
        f"{'cache s: trial 1 / 2 / 3':>24} {'identical':>9}"
    )
    title = "OptMerge trials with/without the decomposition cache"
    for m, n, d in layer_stacks(title, head, shapes, experts, device):
        for variant in variants:
            n_steps = adam_steps if variant == "full" else steps
            plain: list[str] = []
            with_cache: list[str] = []
            same = True
            cache = DecompositionLRU(8 << 30)
            for i, cfg in enumerate(cache_trials(variant, n_steps, experts)[:trials]):
                plain_out = None
                if not plain_last_only or i == trials - 1:
                    secs, plain_out = timed_merge(d, cfg, MergeContext(name="w"), device)
                    print(
                        f"# {m}x{n} {variant} trial {i + 1} no cache: {secs:.2f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                plain.append("-" if plain_out is None else f"{secs:.2f}")
                secs, cached_out = timed_merge(d, cfg, MergeContext(name="w", cache=cache), device)
                print(f"# {m}x{n} {variant} trial {i + 1} cache: {secs:.2f} s", file=sys.stderr, flush=True)
                with_cache.append(f"{secs:.2f}")
                same = same and (plain_out is None or torch.equal(plain_out, cached_out))
            print(
                f"{f'{m}x{n}':>17} {variant:7} {n_steps:5} {' / '.join(plain):>27} "
                f"{' / '.join(with_cache):>24} {str(same):>9}",
                flush=True,
            )


def eigh_times(sizes: list[int]) -> None:
    """Seconds of one float32 and one float64 ``torch.linalg.eigh`` of a random symmetric PSD n x n matrix (rank n/2),
    per size: SWUDI's cost at an ``n`` too large to run, scaled by ``n^3`` (float32 is what SWUDI runs for float32
    task vectors)."""
    print(f"torch.linalg.eigh, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for n in sizes:
        a = torch.randn(n, n // 2, generator=torch.Generator().manual_seed(0))
        c = a @ a.T
        for dtype in (torch.float32, torch.float64):
            x = c.to(dtype)
            secs, _ = timed(lambda x=x: torch.linalg.eigh(x), torch.device("cpu"))
            print(f"eigh n={n} {str(dtype).removeprefix('torch.')}: {secs:.2f} s", flush=True)


ZOO = Path(__file__).resolve().parents[1] / "mergelab" / "bench" / "zoo" / "seed0"
ZOO_TRIALS = [{"lam": 1.0}, {"lam": 0.5, "steps": 100}, {"lam": 0.7, "steps": 200}]


def zoo_trial(params: dict[str, object], out: Path, cache_mb: str) -> tuple[float, dict[str, Tensor]]:
    """Wall seconds of one whole merge of the zoo's LoRA experts, and its weights."""
    os.environ[CACHE_ENV] = cache_mb
    experts = sorted(p for p in (ZOO / "lora").iterdir() if p.is_dir())
    rep = merge(base=ZOO / "base", experts=experts, method="optmerge", params=params, out=out, device="cpu")
    reader = CheckpointReader(out)
    return rep.wall_seconds, {k: reader.get(k) for k in reader.keys()}


def cache_zoo() -> None:
    """Seconds per OptMerge trial on the zoo (seed 0, LoRA experts), without and with the process cache."""
    print(
        f"OptMerge trials on the zoo (seed 0, LoRA experts), {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    head = f"{'variant':7} {'trial':30} {'no cache s':>10} {'cache s':>8} {'identical':>9}"
    print(head)
    print("-" * len(head))
    before = os.environ.get(CACHE_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        zoo_trial({"variant": "lora", "steps": 2}, Path(tmp) / "warm-up", "0")
        for variant in ("full", "lora"):
            os.environ[CACHE_ENV] = "2048"
            process_cache().clear()  # type: ignore[union-attr]
            for i, trial in enumerate(ZOO_TRIALS):
                params = {"variant": variant, **trial}
                plain, a = zoo_trial(params, Path(tmp) / f"{variant}{i}n", "0")
                cached, b = zoo_trial(params, Path(tmp) / f"{variant}{i}c", "2048")
                same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                print(f"{variant:7} {str(trial):30} {plain:10.2f} {cached:8.2f} {str(same):>9}", flush=True)
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK_SHAPES}")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cpu, plus cuda when present)")
    ap.add_argument("--experts", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument(
        "--official-steps",
        type=int,
        default=None,
        help="official steps actually run (default 3 cpu, 10 cuda)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--svd", default="auto", choices=["auto", "lapack", "gram"], help="OptMergeConfig.svd")
    ap.add_argument("--shapes", default=None, help="comma-separated OUTxIN list, e.g. 896x4864,3584x18944")
    ap.add_argument(
        "--vs-swudi", action="store_true", help=f"OptMerge against SWUDI (default shapes {SWUDI_SHAPES})"
    )
    ap.add_argument(
        "--eigh", default=None, help="comma-separated sizes n: time a float32 and a float64 n x n eigh"
    )
    ap.add_argument(
        "--per-step",
        action="store_true",
        help="the full variant's setup and s/step against the official form's (--timed-steps, --official-steps)",
    )
    ap.add_argument(
        "--layer",
        default=None,
        choices=sorted(LAYERS),
        help="--per-step: one decoder layer's shapes of this family, with a row summing the layer",
    )
    ap.add_argument("--flops", action="store_true", help="print the per-step FLOP model of every --layer family")
    ap.add_argument(
        "--cache", action="store_true", help="seconds per trial without/with the decomposition cache"
    )
    ap.add_argument(
        "--adam-steps", type=int, default=20, help="--cache: Adam steps of the full variant's trials"
    )
    ap.add_argument(
        "--trials", type=int, default=3, choices=[1, 2, 3], help="--cache: how many of the 3 trials"
    )
    ap.add_argument(
        "--plain-last-only",
        action="store_true",
        help="--cache: only the last trial also runs without the cache (the identity check's reference)",
    )
    ap.add_argument("--variants", default="lora,full", help="--cache: comma-separated OptMerge variants")
    ap.add_argument(
        "--timed-steps",
        type=int,
        default=10,
        help="--vs-swudi: Adam steps timed for the full variant's s/step (0: leave the full variant out)",
    )
    ap.add_argument(
        "--cache-zoo", action="store_true", help="the same through whole merges of the zoo's LoRA experts"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cache_zoo:
        cache_zoo()
        return
    if args.eigh:
        eigh_times([int(v) for v in args.eigh.split(",")])
        return
    if args.cache:
        chosen = (
            [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
            if args.shapes
            else QUICK_SHAPES
        )
        cache_dev = torch.device("cpu" if args.device == "auto" else args.device)
        cache_compare(
            chosen,
            args.experts,
            args.steps,
            args.adam_steps,
            cache_dev,
            args.trials,
            tuple(args.variants.split(",")),
            args.plain_last_only,
        )
        return
    if args.vs_swudi:
        chosen = (
            [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
            if args.shapes
            else SWUDI_SHAPES
        )
        dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
        vs_swudi(
            chosen,
            args.experts,
            args.steps,
            torch.device("cpu") if args.device == "auto" and dev.type != "cuda" else dev,
            args.timed_steps,
        )
        return
    if args.flops:
        flop_table(args.experts)
        return
    if args.per_step:
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(auto if args.device == "auto" else args.device)
        counts: dict[tuple[int, int], tuple[str, ...]] | None = None
        if args.layer:
            counts = {}
            for proj, shape in LAYERS[args.layer]:
                counts[shape] = counts.get(shape, ()) + (proj,)
        per_step_table(
            list(counts)
            if counts
            else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
            if args.shapes
            else FULL_SHAPES,
            args.experts,
            args.steps,
            args.official_steps or (10 if dev.type == "cuda" else 3),
            args.timed_steps,
            dev,
            counts,
        )
        return
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if args.device != "auto":
        devices = [torch.device(args.device)]
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(
        f"OptMerge per-layer cost, N={args.experts} experts, {args.steps} steps, float32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    head = f"{'device':6} {'shape (out x in)':>17} {'variant':7} {'mergelab solver':16} {'mergelab s':>10} {'peak GiB':>8} {'official s':>11} {'peak GiB':>8} {'ratio':>7}"
    print(head)
    print("-" * len(head))
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        off_steps = args.official_steps or (10 if device.type == "cuda" else 3)
        for m, n in shapes:
            g = torch.Generator().manual_seed(0)
            d = (1e-3 * torch.randn(args.experts, m, n, generator=g)).to(device)
            optmerge(
                None, d[:, :64, :64], OptMergeConfig(steps=2), MergeContext()
            )  # warm-up (kernels, cuSOLVER)
            for variant in ("lora", "full"):
                setup, per_step, off_peak = official(d, variant, off_steps, device)
                off_total = setup + per_step * args.steps
                mark = "~" if off_steps < args.steps else " "
                solvers = ("auto (exact)", "iterative") if variant == "lora" else ("iterative (adam)",)
                for solver in solvers:
                    cfg = OptMergeConfig(
                        variant=variant, steps=args.steps, solver=solver.split()[0], svd=args.svd
                    )
                    secs, peak = timed(lambda d=d, cfg=cfg: optmerge(None, d, cfg, MergeContext()), device)
                    print(
                        f"{device.type:6} {f'{m}x{n}':>17} {variant:7} {solver:16} {secs:10.2f} {peak:8.2f} "
                        f"{mark}{off_total:10.1f} {off_peak:8.2f} {off_total / secs:6.1f}x",
                        flush=True,
                    )
            del d
        print(
            f"({device.type}: {name}; official = setup incl. full SVDs + {off_steps} timed steps extrapolated to "
            f"{args.steps}, '~' marks extrapolation)"
        )


if __name__ == "__main__":
    main()
