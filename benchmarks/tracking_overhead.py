"""Benchmark: what MLflow tracking adds to `mergelab merge` (issue 22's target: tracked at most 1.15x untracked).

Builds the ~150M-parameter Llama-style base and 3 experts of ``merge_vs_mergekit.py`` (fp32, one safetensors shard
each; or reuses ``--ckpt DIR`` from an earlier ``--keep``), then runs the same task_arithmetic recipe with
``mergelab merge --quiet``, each in a fresh process, interleaved and in alternating order per repeat:

- ``untracked``: ``--no-track``;
- ``tracked, fresh store``: a new empty store per run (``MERGELAB_ROOT``): importing mlflow, creating the database
  (a copy of the schema template; MLflow's migrations before it) in the tracking child process beside the merge,
  hashing the inputs for the recipe's digest;
- ``tracked, existing store``: one store made before the timings and reused (a user's everyday case);
- ``fresh store, no template``: a new empty store per run with the store templates off
  (``MERGELAB_STORE_TEMPLATES=off``): MLflow's migrations run on the new database, as they did for every fresh
  store before ``mergelab/platform/store_template.py`` (and still do for the first store of a newly installed
  MLflow); the other tracked variants copy the schema template, built in the work directory before the timings;
- with ``--before DIR``, the two tracked variants again with the mergelab of source tree ``DIR``.

Every variant runs from an empty working directory with its source tree first on ``PYTHONPATH`` (this repository's,
or ``DIR``): ``python -c`` puts the working directory first on ``sys.path``, so run from the repository root the
``--before`` variants used to import this repository's mergelab, not ``DIR``'s.

It prints every run's wall and CPU seconds (user + system of the process, all threads and the child processes it
waited for: the tracking child included) and the merging process's own CPU seconds (without its children), the
medians, the ratios of the medians to the untracked ones, and the
load average before and after (other work on the machine slows every variant alike; the order alternates so that
no variant always runs first).

Usage::

    python benchmarks/tracking_overhead.py [--repeats 3] [--threads 1] [--keep DIR | --ckpt DIR] [--before DIR]
                                           [--store-splits N]

``--store-splits N`` first prints, N times each way, where a fresh store's time goes in one process: importing
mlflow, MLflow's initial tables and alembic migrations (its own path) or the template's check and copy, opening the
tracking store and the registry, creating an experiment.

Recorded: ``benchmarks/results/tracking_overhead.txt``; summary in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_vs_mergekit  # noqa: E402  (the 150M Llama builder)

VARIANTS = ("untracked", "tracked, fresh store", "tracked, existing store", "fresh store, no template")
NO_TEMPLATE = "fresh store, no template"
TEMPLATES = "MERGELAB_STORE_TEMPLATES"
"""The environment variable naming the store templates' directory (``off``: none)."""
BEFORE = ("before: fresh store", "before: existing store")
TARGET = 1.15
SELF_CPU_FILE = "TRACKING_OVERHEAD_SELF_CPU"
"""The environment variable naming the file where a merge writes its own CPU seconds (without its children)."""


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def merge_once(cli: list[str], recipe: Path, out: Path, variant: str, root: Path,
               env: dict[str, str]) -> dict[str, float]:
    """One ``mergelab merge`` in a fresh process: its wall and CPU seconds (``merge_vs_mergekit.run``)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*cli, "merge", str(recipe), "--out", str(out), "--quiet"]
    run_env = dict(env)
    if variant == "untracked":
        cmd.append("--no-track")
    else:
        run_env["MERGELAB_ROOT"] = str(root)
    self_file = out.parent / "self-cpu.txt"
    r = merge_vs_mergekit.run(cmd, {**run_env, SELF_CPU_FILE: str(self_file)})
    r["self"] = float(self_file.read_text())
    shutil.rmtree(out, ignore_errors=True)
    return r


def with_source(env: dict[str, str], src: Path) -> dict[str, str]:
    """``env`` running the mergelab of source tree ``src``."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(src.resolve()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


SPLITS = """
import sys, tempfile, time, uuid
from pathlib import Path
mode, work = sys.argv[1], Path(sys.argv[2])
t = [("start", time.perf_counter())]
from mlflow import MlflowClient
t.append(("import mlflow", time.perf_counter()))
import mlflow.store.db.utils as u
t.append(("import mlflow.store.db.utils", time.perf_counter()))
d = Path(tempfile.mkdtemp(prefix="split-", dir=work))
uri = f"sqlite:///{d}/mlflow.db"
if mode == "migrate":
    e = u.create_sqlalchemy_engine_with_retry(uri)
    t.append(("engine", time.perf_counter()))
    u.InitialBase.metadata.create_all(e)
    t.append(("create_all", time.perf_counter()))
    u._upgrade_db(e)
    t.append(("alembic migrations", time.perf_counter()))
    e.dispose()
else:
    from mergelab.platform import store_template as st
    t.append(("import store_template", time.perf_counter()))
    st.ready_template(st.template_dir())
    t.append(("head + check template", time.perf_counter()))
    assert st.seed(d / "mlflow.db")
    t.append(("copy", time.perf_counter()))
c = MlflowClient(uri, uri)
c.search_experiments(max_results=1)
t.append(("open tracking store", time.perf_counter()))
c.search_registered_models(max_results=1)
t.append(("open registry", time.perf_counter()))
c.create_experiment("e" + uuid.uuid4().hex, artifact_location=(d / "a").as_uri())
t.append(("create experiment", time.perf_counter()))
print(f"{mode:>8s}: " + ", ".join(f"{n} {b - a:.3f}" for (_, a), (n, b) in zip(t, t[1:]))
      + f"; total {t[-1][1] - t[0][1]:.2f}", flush=True)
"""
"""One fresh store opened in a fresh process, each step timed (``time.perf_counter``): ``migrate`` is MLflow's own
path (its initial tables, then its alembic migrations), ``template`` the copy of the schema template."""


def store_splits(n: int, work: Path, env: dict[str, str]) -> None:
    """Print where a fresh store's time goes, ``n`` times each way (MLflow's migrations, the template's copy)."""
    print("where a fresh store's time goes (seconds, one process each):", flush=True)
    subprocess.run([sys.executable, "-c", SPLITS, "template", str(work)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # builds the template, untimed
    for _ in range(n):
        for mode in ("migrate", "template"):
            subprocess.run([sys.executable, "-c", SPLITS, mode, str(work)], env=env, check=True,
                           stderr=subprocess.DEVNULL)
    print(flush=True)


def report(runs: dict[str, list[dict[str, float]]], load_before: str) -> None:
    """The medians, the load and the ratios to the untracked merge."""
    med = {v: {k: statistics.median(x[k] for x in rs) for k in ("wall", "cpu", "self")} for v, rs in runs.items()}
    print(f"{'median':>6s}  " + "  ".join(cell(med[v]) for v in runs))
    print(f"\nload average (1/5/15 min): before {load_before}, after {load()}")
    for v in list(runs)[1:]:
        ratio = med[v]["wall"] / med["untracked"]["wall"]
        print(f"{v} / untracked: wall {ratio:.2f}x (target <= {TARGET}x: {'met' if ratio <= TARGET else 'MISSED'})"
              f", CPU {med[v]['cpu'] / med['untracked']['cpu']:.2f}x"
              f", merging process CPU {med[v]['self'] / med['untracked']['self']:.2f}x")


def cell(r: dict[str, float]) -> str:
    """``wall (CPU / merging process CPU)`` of one run or of the medians."""
    return f"{r['wall']:12.1f} ({r['cpu']:4.1f}/{r['self']:4.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch/OMP threads of the merges")
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--store-splits", type=int, default=0, metavar="N",
                    help="first print where a fresh store's time goes, N times each way (MLflow's migrations, the "
                         "template's copy)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--keep", type=Path, default=None, help="build the checkpoints here and keep them")
    group.add_argument("--ckpt", type=Path, default=None, help="reuse checkpoints built by an earlier --keep")
    ap.add_argument("--before", type=Path, default=None,
                    help="also time the tracked merges of this source tree, interleaved (e.g. an extracted "
                         "`git archive REV mergelab`)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tracking-overhead-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MERGELAB_TRACK", None)
    env[TEMPLATES] = str(work / "templates")  # built by the first tracked merge below, before the timings
    here = with_source(env, Path(__file__).resolve().parents[1])
    envs = {v: here for v in VARIANTS} | ({v: with_source(env, args.before) for v in BEFORE} if args.before else {})
    envs[NO_TEMPLATE] = {**here, TEMPLATES: "off"}
    # `mergelab merge` as a user runs it (torch's threads from OMP_NUM_THREADS: importing torch first to set them
    # would delay what the command does before torch's import, e.g. starting its tracking child), noting its own CPU
    # (RUSAGE_SELF, written at its very end: the first exit hook registered runs last)
    cli = [sys.executable, "-c", "import atexit, os, resource\n"
           f"atexit.register(lambda: open(os.environ[{SELF_CPU_FILE!r}], 'w').write("
           "str(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]))))\n"
           "from mergelab.platform.cli import main; main()"]
    for name in ("before", "ckpt", "keep"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    cwd = os.getcwd()
    os.chdir(work)  # `python -c` puts the working directory first on sys.path: an empty one, not a source tree
    try:
        ckpt = args.ckpt or args.keep or work / "ckpt"
        if args.ckpt is None:
            ckpt.mkdir(parents=True, exist_ok=True)
            merge_vs_mergekit.build_models(ckpt, args.layers, args.hidden, 2048, 32000, args.experts)
        base, experts = ckpt / "base", sorted(ckpt.glob("expert*"))
        recipe = work / "merge.yaml"
        recipe.write_text(json.dumps({"base": str(base), "experts": [str(e) for e in experts],
                                      "method": "task_arithmetic", "params": {"lam": 1.0}, "policy": [],
                                      "device": "cpu"}))
        nbytes = sum(f.stat().st_size for d in (base, *experts) for f in d.glob("*.safetensors"))
        print(f"recipe: task_arithmetic, base + {len(experts)} experts, {nbytes / 2**30:.2f} GiB of inputs; "
              f"threads={args.threads}; {os.cpu_count()} CPUs" + (f"; before: {args.before}" if args.before else ""))
        if args.store_splits:
            store_splits(args.store_splits, work, here)
        for v in envs:  # the existing stores, made before the timings
            if v.endswith("existing store"):
                merge_once(cli, recipe, work / "out", v, work / v, envs[v])
        load_before = load()
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in envs}
        print(f"\nwall (CPU / merging process CPU) seconds per run\n{'repeat':>6s}  "
              + "  ".join(f"{v:>24s}" for v in envs))
        for r in range(args.repeats):
            for v in list(envs) if r % 2 == 0 else list(envs)[::-1]:
                root = work / v if v.endswith("existing store") else work / f"store-{r}-{v}"
                runs[v].append(merge_once(cli, recipe, work / "out", v, root, envs[v]))
            print(f"{r:6d}  " + "  ".join(cell(runs[v][-1]) for v in envs),
                  flush=True)
        report(runs, load_before)
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
