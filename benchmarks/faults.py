"""Fault matrix for campaigns, merges and promotion (issue 20): inject faults, then check that nothing is lost, left
RUNNING, orphaned or half-written.

Cases (``--quick``: the embedded store only, one random point per case):

* store: the embedded SQLite store, and PostgreSQL (MLflow's SQL store and Optuna's RDB storage on a throwaway
  server from ``tests/pg.py``; skipped when PostgreSQL is not installed);
* 1 and 3 workers (``mergelab worker`` processes on one study, budget 4 trials, top-2 registry, heartbeat 1 s,
  grace 3 s);
* ``kill -9`` and SIGTERM sent to a random worker at a random moment (whatever it is doing: merging, evaluating,
  registering); workers that are left finish the budget, and when none is left a fresh worker does;
* promotion stopped by ``kill -9`` or SIGTERM at a random moment of its test evaluation;
* a full disk: the artifact root on a 1 MiB tmpfs (a size-limited directory when mounting is not allowed);
* an unreachable tracking server.

Checks per case (printed, and the table written with ``--out``): every trial complete exactly once (COMPLETE count
equals the budget, each a distinct FINISHED run), no RUNNING run or trial left, no orphan weights (only registered,
FINISHED runs keep ``merged/``), no orphan model versions (each points at existing weights of a FINISHED run), no
partial output directories (``.*.tmp-*``), the champion alias unchanged or moved to a valid version, and the exit
code of a stopped process (143 for SIGTERM).

    OMP_NUM_THREADS=1 python benchmarks/faults.py --out benchmarks/results/faults.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["vqa", "geometry", "ocr"]
BUDGET = 4

# A worker process: the CLI's handlers, the fault matrix's evaluator (scores from the weights, slowed down so that
# faults land inside the work), the same loop as `mergelab worker`; exit codes as the CLI's.
_WORKER = """
import sys
sys.path.insert(0, {bench!r})
import faults
sys.exit(faults.worker_main(sys.argv[1], sys.argv[2]))
"""


# --------------------------------------------------------------------------------------------------------------
# The model family and the evaluator
# --------------------------------------------------------------------------------------------------------------


def build_family(root: Path, width: int = 32, n: int = 3) -> tuple[Path, list[Path]]:
    """A tiny Llama-named base and ``n`` full experts around it (``width`` sets the size)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(width, width, generator=g) for i in range(4)}
    base["model.norm.weight"] = torch.ones(width)
    cfg = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    dirs = []
    for i, sd in enumerate([base] + [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
                                     for _ in range(n)]):
        d = root / ("base" if i == 0 else TASKS[i - 1])
        d.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(cfg)
        dirs.append(d)
    return dirs[0], dirs[1:]


class WeightScore:
    """Scores a checkpoint per task by its distance to that task's expert (base 0, expert 100), ``delay`` seconds
    per task; the evaluator signature of the platform: ``(model_dir, tasks, split, on_task)``."""

    def __init__(self, family: Path, delay: float = 0.0) -> None:
        self.family, self.delay = family, delay

    def _load(self, d: Path) -> dict[str, Any]:
        from mergelab.engine import CheckpointReader

        r = CheckpointReader(d)
        return {k: r.get(k).float() for k in r.keys()}

    def __call__(self, model_dir: Path, tasks: Sequence[str], split: str, on_task: Any = None) -> Any:
        from mergelab import _signals
        from mergelab.evaluators import EvalResult

        if os.environ.get("FAULTS_TRACE"):
            print(f"evaluating {split}", file=sys.stderr, flush=True)
        theta, base = self._load(Path(model_dir)), self._load(self.family / "base")
        total = EvalResult(split=split, scores={})
        for task in tasks:
            _signals.sleep(self.delay)
            ex = self._load(self.family / task)
            num = sum(float((theta[k] - ex[k]).pow(2).sum()) for k in ex) ** 0.5
            den = sum(float((base[k] - ex[k]).pow(2).sum()) for k in ex) ** 0.5
            score = max(0.0, 100.0 * (1.0 - num / den))
            total.update(EvalResult(split=split, scores={task: score}, metrics={f"{task}/accuracy": score},
                                    records=[{"task": task, "id": f"{task}-0", "prediction": "x",
                                              "references": ["x"], "score": score / 100}]))
            if on_task is not None:
                on_task(task, total)
        return total


def worker_main(config: str, delay: str) -> int:
    """One worker process (see ``_WORKER``); returns the exit code the CLI would."""
    from mergelab import _signals
    from mergelab.platform.campaign_config import load_campaign
    from mergelab.platform.worker import run_worker

    _signals.install()
    cfg = load_campaign(config)
    ev = WeightScore(Path(cfg.base).parent, float(delay))
    try:
        run_worker(config, evaluator=ev)
    except _signals.Terminated as e:
        print(f"stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - one line, exit 1, as the CLI
        print(f"Error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1
    return 0


def promote_main(name: str, delay: str) -> int:
    """A promotion process with the slow evaluator."""
    from mergelab import _signals
    from mergelab.platform.promotion import promote

    _signals.install()
    try:
        promote(name, campaign=name, evaluator=WeightScore(Path(os.environ["FAULTS_FAMILY"]), float(delay)),
                tasks=TASKS)
    except _signals.Terminated as e:
        return e.exit_code
    return 0


# --------------------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------------------


def write_campaign(case: Path, family: Path, experts: list[Path], name: str = "faults") -> Path:
    import yaml

    cfg = {"name": name, "base": str(family / "base"), "method": "task_arithmetic", "policy": "llama",
           "device": "cpu", "experts": [{"path": str(p), "name": p.name, "score": 100.0} for p in experts],
           "search_space": {"lam": {"type": "float", "low": 0.1, "high": 1.2}},
           "sampler": {"name": "random", "seed": 0}, "budget": {"n_trials": BUDGET}, "eval": {"tasks": TASKS},
           "registry": {"name": name, "register": "top_k", "top_k": 2},
           "tracking": {"heartbeat_interval": 1, "grace_period": 3, "experiment": "faults"}}
    p = case / "campaign.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def wait_busy(env: dict[str, str], procs: list[subprocess.Popen], name: str = "faults", timeout: float = 120) -> None:
    """Until a trial of the study runs (the workers are past their imports and at work)."""
    import optuna

    storage = env.get("MERGELAB_OPTUNA_STORAGE") or f"sqlite:///{Path(env['MERGELAB_ROOT']) / 'optuna.db'}"
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        with contextlib.suppress(Exception):
            study = optuna.load_study(study_name=name, storage=storage)
            if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                return
        time.sleep(0.2)


def start_worker(config: Path, env: dict[str, str], delay: float = 0.3) -> subprocess.Popen:
    code = _WORKER.format(bench=str(Path(__file__).parent))
    return subprocess.Popen([sys.executable, "-c", code, str(config), str(delay)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def check(env: dict[str, str], case: Path, name: str = "faults", budget: int | None = BUDGET,
          champion_before: str | None = None) -> dict[str, Any]:
    """The checks of the matrix, on the store the case used."""
    import optuna

    from mergelab.platform.store import Store, local_path

    store = Store.resolve(env.get("MERGELAB_ROOT"), tracking_uri=env.get("MLFLOW_TRACKING_URI"),
                          artifact_root=env.get("MERGELAB_ARTIFACT_ROOT"),
                          optuna_storage=env.get("MERGELAB_OPTUNA_STORAGE"))
    client = store.client()
    exp = client.get_experiment_by_name("faults")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    study = optuna.load_study(study_name=name, storage=store.optuna_storage)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    by_id = {r.info.run_id: r for r in runs}
    done_runs = [by_id.get(t.user_attrs.get("mlflow_run_id")) for t in complete]
    out: dict[str, Any] = {}
    if budget is not None:
        out["exactly_once"] = (len(complete) == budget and len({r.info.run_id for r in done_runs if r}) == budget
                               and all(r is not None and r.info.status == "FINISHED" for r in done_runs))
    out["no_running"] = (not any(r.info.status == "RUNNING" for r in runs)
                         and not any(t.state.name == "RUNNING" for t in trials))
    versions = client.search_model_versions(f"name = '{name}'") if client.search_registered_models() else []
    sources = {str(local_path(v.source)) for v in versions}
    orphan_w = []
    for r in runs:
        m = local_path(r.info.artifact_uri) / "merged" if local_path(r.info.artifact_uri) else None
        if m is not None and m.exists() and (r.info.status != "FINISHED" or str(m) not in sources):
            orphan_w.append(r.info.run_id)
    out["no_orphan_weights"] = not orphan_w
    out["no_orphan_versions"] = all(local_path(v.source) is not None and local_path(v.source).exists()
                                    and by_id.get(v.run_id) is not None
                                    and by_id[v.run_id].info.status == "FINISHED" for v in versions)
    out["no_partial_dirs"] = not [p for p in case.rglob(".*tmp-*")]
    if champion_before is not None:
        try:
            champ = client.get_model_version_by_alias(name, "champion")
            ok = local_path(champ.source).exists()
            out["champion_valid"] = ok and (champion_before in ("", champ.version) or champ.version != "")
        except Exception:  # noqa: BLE001 - no champion
            out["champion_valid"] = champion_before == ""
    out["n_complete"], out["n_trials"] = len(complete), len(trials)
    return out


def campaign_case(work: Path, env: dict[str, str], n_workers: int, fault: str, rng: random.Random) -> dict[str, Any]:
    """Workers on one study, one of them killed (``kill9``) or stopped (``sigterm``) at a random moment."""
    case = Path(tempfile.mkdtemp(prefix=f"{fault}-{n_workers}w-", dir=work))
    family = case / "family"
    base, experts = build_family(family)
    config = write_campaign(case, family, experts)  # the workers create the fresh store's schema (Store.client)
    procs = [start_worker(config, env) for _ in range(n_workers)]
    t0 = time.monotonic()
    wait_busy(env, procs)
    delay = rng.uniform(0.0, 3.0)  # a random moment of the work: merging, evaluating, registering
    time.sleep(delay)
    victim = rng.choice([p for p in procs if p.poll() is None] or procs)
    busy = victim.poll() is None
    victim.send_signal(signal.SIGKILL if fault == "kill9" else signal.SIGTERM)
    delay = time.monotonic() - t0
    codes = [p.wait(timeout=300) for p in procs]
    others = [p for p in procs if p is not victim]
    errors = [(p.stderr.read() if p.stderr else "").strip().splitlines()[-1:] for p in others]
    if n_workers == 1 or fault == "kill9":
        codes.append(start_worker(config, env).wait(timeout=300))  # a fresh worker finishes the budget
    res = check(env, case)
    if others:
        res["others_exit_0"] = all(p.returncode == 0 for p in others)
        if not res["others_exit_0"]:
            res["others_error"] = [e[0][:120] for e in errors if e]
    res["victim_exit"], res["hit_while_working"] = victim.returncode, busy
    if fault == "sigterm":
        res["sigterm_exit_143"] = victim.returncode == 143
    res["at_s"] = round(delay, 2)
    return res


def promotion_case(work: Path, env: dict[str, str], fault: str, rng: random.Random) -> dict[str, Any]:
    """A clean campaign, then a promotion killed or stopped during its test evaluation, then a clean promotion."""
    case = Path(tempfile.mkdtemp(prefix=f"promote-{fault}-", dir=work))
    family = case / "family"
    base, experts = build_family(family)
    config = write_campaign(case, family, experts)
    start_worker(config, env).wait(timeout=300)
    env2 = {**env, "FAULTS_FAMILY": str(family), "FAULTS_TRACE": "1"}
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import faults; " \
           "sys.exit(faults.promote_main('faults', '0.5'))"
    p = subprocess.Popen([sys.executable, "-c", code], env=env2, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    assert p.stderr is not None
    while p.poll() is None and "evaluating" not in p.stderr.readline():  # past the imports, at work
        pass
    time.sleep(rng.uniform(0.0, 2.5))  # a random moment of the two models' test evaluations (3 s)
    delay = time.monotonic() - t0
    busy = p.poll() is None
    p.send_signal(signal.SIGKILL if fault == "kill9" else signal.SIGTERM)
    p.wait(timeout=120)
    res = check(env, case, budget=None, champion_before="")
    p2 = subprocess.run([sys.executable, "-c", code.replace("'0.5'", "'0'")], env=env2, capture_output=True,
                        text=True, timeout=300)
    res["promote_again_ok"] = p2.returncode == 0 and check(env, case, budget=None, champion_before="")[
        "champion_valid"]
    res["victim_exit"], res["at_s"], res["hit_while_working"] = p.returncode, round(delay, 2), busy
    if fault == "sigterm":
        res["sigterm_exit_143"] = p.returncode == 143
    return res


def full_disk_case(work: Path, env: dict[str, str]) -> dict[str, Any]:
    """The artifact root on a 1 MiB tmpfs: every merge fails with ENOSPC; nothing may stay half-written."""
    case = Path(tempfile.mkdtemp(prefix="fulldisk-", dir=work))
    family = case / "family"
    base, experts = build_family(family, width=256)  # ~1 MiB per checkpoint
    disk = case / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    try:
        env2 = {**env, "MERGELAB_ARTIFACT_ROOT": disk.as_uri()}
        config = write_campaign(case, family, experts)
        code = start_worker(config, env2).wait(timeout=300)
        res = check(env2, case, budget=None)
        import optuna

        from mergelab.platform.store import Store

        st = Store.resolve(env.get("MERGELAB_ROOT"), optuna_storage=env.get("MERGELAB_OPTUNA_STORAGE"))
        trials = optuna.load_study(study_name="faults", storage=st.optuna_storage).get_trials()
        res["trials_failed_by_error"] = bool(trials) and all(t.state.name == "FAIL" and t.user_attrs.get(
            "mergelab.error") for t in trials)
        res["disk_emptied"] = sum(f.stat().st_size for f in disk.rglob("*") if f.is_file()) < 64 * 1024
        res["worker_exit"] = code
        res["tmpfs"] = mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], capture_output=True)
    return res


def unreachable_case(work: Path) -> dict[str, Any]:
    """MLFLOW_TRACKING_URI points at a closed port: the worker fails fast, one line, leaves nothing."""
    case = Path(tempfile.mkdtemp(prefix="unreachable-", dir=work))
    family = case / "family"
    base, experts = build_family(family)
    config = write_campaign(case, family, experts)
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MERGELAB_OPTUNA_STORAGE": f"sqlite:///{case / 'optuna.db'}"}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "mergelab.platform.cli", "worker", str(config)], env=env,
                       capture_output=True, text=True, timeout=300)
    err = [line for line in p.stderr.splitlines() if line.strip() and not line.startswith("[I ")]  # Optuna logs
    return {"exit_1": p.returncode == 1, "one_line": len(err) == 1 and "Traceback" not in p.stderr,
            "fast_s": round(time.monotonic() - t0, 1), "no_partial_dirs": not list(case.rglob(".*tmp-*")),
            "message": (err[-1][:90] if err else "")}


# --------------------------------------------------------------------------------------------------------------


def _stores(work: Path, with_pg: bool) -> list[tuple[str, Any]]:
    stores: list[tuple[str, Any]] = [("sqlite", None)]
    if with_pg:
        sys.path.insert(0, str(ROOT / "tests"))
        try:
            import pg

            stores.append(("postgres", pg))
        except ImportError as e:  # pragma: no cover
            print(f"PostgreSQL skipped: {e}")
    return stores


def _env_for(kind: str, pgmod: Any, server: Any, case_root: Path, i: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MERGELAB_OPTUNA_STORAGE", "MERGELAB_ARTIFACT_ROOT")}
    env.update({"OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONWARNINGS": "ignore"})
    if kind == "sqlite":
        env["MERGELAB_ROOT"] = str(case_root / f"store{i}")
    else:
        env["MLFLOW_TRACKING_URI"] = server.create_database(f"mlflow{i}")
        env["MERGELAB_OPTUNA_STORAGE"] = server.create_database(f"optuna{i}")
        env["MERGELAB_ARTIFACT_ROOT"] = (case_root / f"artifacts{i}").as_uri()
        env["MERGELAB_ROOT"] = str(case_root / f"store{i}")
    return env


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="embedded store only, fewer cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the table here")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="mergelab-faults-"))
    rows: list[tuple[str, dict[str, Any]]] = []
    i = 0
    try:
        for kind, pgmod in _stores(work, not args.quick):
            server = None
            if pgmod is not None:
                try:
                    server = pgmod.start_postgres(databases=())
                except Exception as e:  # noqa: BLE001
                    print(f"PostgreSQL unavailable: {e}")
                    continue
            try:
                for n_workers in ([1] if args.quick else [1, 3]):
                    for fault in ("kill9", "sigterm"):
                        i += 1
                        env = _env_for(kind, pgmod, server, work, i)
                        rows.append((f"{kind} {n_workers}w {fault}", campaign_case(work, env, n_workers, fault, rng)))
                        print(rows[-1][0], rows[-1][1], flush=True)
            finally:
                if server is not None:
                    server.stop()
        for fault in ("kill9", "sigterm"):
            i += 1
            rows.append((f"sqlite promote {fault}", promotion_case(work, _env_for("sqlite", None, None, work, i),
                                                                  fault, rng)))
            print(rows[-1][0], rows[-1][1], flush=True)
        i += 1
        rows.append(("sqlite full disk", full_disk_case(work, _env_for("sqlite", None, None, work, i))))
        print(rows[-1][0], rows[-1][1], flush=True)
        rows.append(("unreachable tracking server", unreachable_case(work)))
        print(rows[-1][0], rows[-1][1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = format_table(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0 if all(v is not False for _, r in rows for k, v in r.items() if isinstance(v, bool)) else 1


def format_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    lines = [f"fault matrix (budget {BUDGET} trials, top-2 registry, heartbeat 1 s, grace 3 s); "
             "PASS/FAIL per check, numbers as measured"]
    for name, r in rows:
        checks = ", ".join(f"{k} {'PASS' if v else 'FAIL'}" if isinstance(v, bool) else f"{k} {v}"
                           for k, v in r.items())
        lines.append(f"{name:30s} {checks}")
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
