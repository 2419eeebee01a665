"""The offline benchmark's model zoo, part 2 of 3: building it (training jobs, worker processes, the manifest).

:func:`build_zoo` trains each seed's base from scratch and then its experts and mixture from the saved base, in
this process or in ``jobs`` spawned worker processes, and records every model in the zoo's manifest (the plan,
layout and fingerprints are :mod:`mergelab.bench.zoo_plan`). It is idempotent: a model whose directory, weights
hash and fingerprint match the manifest is reused, anything else is (re)built; the manifest is rewritten atomically
after every model, so an interrupted build resumes where it stopped. :func:`combine_zoos` joins zoos built in
parallel.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from mergelab.bench import modeling
from mergelab.bench.data import ensure_data, sha256_file
from mergelab.bench.train import Encoded, TrainConfig, train
from mergelab.bench.zoo_plan import (
    DEFAULT_ZOO,
    FORMAT_VERSION,
    KINDS,
    MANIFEST,
    TASKS,
    Job,
    ZooData,
    ZooPlan,
    base_config,
    base_fingerprint,
    expert_data,
    read_manifest,
    seed_jobs,
    tokenizer_fingerprint,
    weights_file,
    write_manifest,
)
from mergelab.bench.zoo_table import score_model
from mergelab.hf import load_model, replace_dir, resolve_device, save_model


@dataclass
class _Ctx:
    root: Path
    plan: ZooPlan
    manifest: dict[str, Any]
    data: ZooData
    progress: bool
    device: str
    evaluate: bool
    data_root: Path | None
    log: Callable[[str], None]
    kinds: tuple[str, ...] = KINDS
    only: frozenset[str] | None = None
    jobs: int = 1
    built: list[str] = field(default_factory=list)


def _valid(ctx: _Ctx, name: str, fingerprint: str) -> bool:
    """Whether ``name`` is up to date (directory, weights hash, fingerprint); if so, score it when unscored."""
    entry = ctx.manifest["models"].get(name)
    d = ctx.root / name
    if not entry or entry.get("fingerprint") != fingerprint or not d.is_dir():
        return False
    try:
        wf = weights_file(d)
    except FileNotFoundError:
        return False
    if entry.get("weights", {}).get(wf.name) != sha256_file(wf):
        return False
    ctx.log(f"{name}: reused")
    if ctx.evaluate and (not entry.get("scores") or entry.get("scores_limit") != ctx.plan.n_eval):
        model, processor = load_model(d, device="cpu")
        _score_into(ctx, name, entry, model, processor)
        write_manifest(ctx.root, ctx.manifest)
    return True


def _score_into(ctx: _Ctx, name: str, entry: dict[str, Any], model: Any, processor: Any) -> None:
    t0 = time.perf_counter()
    entry["scores"] = score_model(model, processor, limit=ctx.plan.n_eval, data_root=ctx.data_root)
    entry["scores_limit"] = ctx.plan.n_eval
    entry["eval_seconds"] = round(time.perf_counter() - t0, 1)
    ctx.log(_score_line(name, entry))


def _score_line(name: str, entry: dict[str, Any]) -> str:
    sh = entry.get("scores", {}).get("shifted")
    if not sh:
        return f"{name}: built"
    return f"{name}: shifted avg {sh['average']:.1f} " + " ".join(f"{t} {sh[t]:.1f}" for t in TASKS if t in sh)


def _bar(ctx: _Ctx, name: str, steps: int) -> tuple[Callable[[int, float], None] | None, Any]:
    if not ctx.progress:
        return None, None
    bar = tqdm(total=steps, desc=name, unit="step", leave=True, dynamic_ncols=True)

    def cb(step: int, loss: float) -> None:
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    return cb, bar


def _finish(ctx: _Ctx, name: str, entry: dict[str, Any], model: Any, processor: Any) -> dict[str, Any]:
    """Hash the saved weights and score the model into ``entry`` (no manifest write: a worker returns it)."""
    wf = weights_file(ctx.root / name)
    entry["weights"] = {wf.name: sha256_file(wf)}
    entry["weights_bytes"] = wf.stat().st_size
    if ctx.evaluate:
        _score_into(ctx, name, entry, model, processor)
    return entry


def _insert(ctx: _Ctx, name: str, entry: dict[str, Any]) -> None:
    ctx.manifest["models"][name] = entry
    write_manifest(ctx.root, ctx.manifest)
    ctx.built.append(name)


def _record(ctx: _Ctx, name: str, entry: dict[str, Any], model: Any, processor: Any) -> None:
    _insert(ctx, name, _finish(ctx, name, entry, model, processor))


def _train_and_save(ctx: _Ctx, name: str, model: Any, processor: Any, data: Encoded, cfg: TrainConfig,
                    entry: dict[str, Any], save: Callable[[Any, Path], None]) -> Any:
    cb, bar = _bar(ctx, name, cfg.steps)
    try:
        res = train(model, processor, data, cfg, device=ctx.device, progress=cb)
    finally:
        if bar is not None:
            bar.close()
    model = res.model.to("cpu")
    save(model, ctx.root / name)
    entry.update(train=cfg.to_dict(), train_seconds=round(res.seconds, 1), trainable_params=res.trainable_params,
                 final_loss=round(sum(res.losses[-10:]) / len(res.losses[-10:]), 4),
                 trained_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return model


def _save_full(processor: Any) -> Callable[[Any, Path], None]:
    def save(model: Any, path: Path) -> None:
        save_model(model, processor, path, overwrite=True)

    return save


def _save_lora(model: Any, path: Path) -> None:
    """Save a peft adapter atomically, pointing at the seed's base as ``../../base``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.peft_config["default"].base_model_name_or_path = "../../base"
        model.get_base_model().config._name_or_path = "../../base"  # peft's model card reads it
        model.save_pretrained(tmp, safe_serialization=True)
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _run_job(ctx: _Ctx, job: Job, processor: Any) -> dict[str, Any]:
    """Train ``job`` from its seed's saved base, save it under the zoo root, and return its manifest entry."""
    base_name = f"seed{job.seed}/base"
    entry = {"kind": job.kind, "task": job.task, "seed": job.seed, "variant": "shifted", "base": base_name,
             "fingerprint": job.fingerprint}
    base = load_model(ctx.root / base_name, device="cpu")[0]
    if job.task is None:
        data = ctx.data.mixture_data(processor)
    else:  # after loading the base: with replay_targets "base" it labels the replayed prompts
        data = expert_data(ctx.data, job.task, ctx.plan.replay(job.kind), processor, base=base)
    save = _save_lora if job.kind == "lora" else _save_full(processor)
    model = _train_and_save(ctx, job.name, base, processor, data, job.cfg, entry, save)
    if job.kind == "lora":
        entry["lora_base"] = "../../base"
        model = model.merge_and_unload()
    return _finish(ctx, job.name, entry, model, processor)


def _build_seed(ctx: _Ctx, seed: int, processor: Any, tok_fp: str) -> None:
    base_name = f"seed{seed}/base"
    base_fp = base_fingerprint(ctx.plan, seed, tok_fp, ctx.data.tasks)
    if not _valid(ctx, base_name, base_fp):
        model = modeling.build_model(processor.tokenizer, ctx.plan.size, seed=seed)
        entry = {"kind": "base", "task": None, "seed": seed, "variant": "generic", "fingerprint": base_fp}
        model = _train_and_save(ctx, base_name, model, processor, ctx.data.base_data(processor),
                                base_config(ctx.plan, seed), entry, _save_full(processor))
        _record(ctx, base_name, entry, model, processor)
    base_sha = ctx.manifest["models"][base_name]["weights"]["model.safetensors"]
    jobs = seed_jobs(ctx.plan, ctx.data.tasks, seed, base_sha, ctx.kinds, ctx.only)
    todo = [j for j in jobs if not _valid(ctx, j.name, j.fingerprint)]
    if ctx.jobs > 1 and len(todo) > 1:
        _run_parallel(ctx, todo)
        return
    for job in todo:
        _insert(ctx, job.name, _run_job(ctx, job, processor))


_WORKER: dict[str, Any] = {}
"""Per worker process: the training data and processor of the zoo it builds for (kept across its jobs)."""


def _load_processor(tok_dir: Path) -> Any:
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = tok.chat_template or modeling.QWEN2_VL_CHAT_TEMPLATE
    return modeling.build_processor(tok)


def _worker_job(root: str, plan: ZooPlan, tasks: tuple[str, ...], job: Job, device: str, evaluate: bool,
                data_root: str | None, threads: int) -> dict[str, Any]:
    """Run one job in a worker process (``build_zoo(jobs=N)``) and return its manifest entry."""
    torch.set_num_threads(threads)
    key = (root, json.dumps(plan.to_dict(), sort_keys=True), tasks)
    if _WORKER.get("key") != key:
        _WORKER.update(key=key, data=ZooData(plan, tasks), processor=_load_processor(Path(root) / "tokenizer"))
    ctx = _Ctx(Path(root), plan, {"models": {}}, _WORKER["data"], False, device, evaluate,
               Path(data_root) if data_root else None, lambda _msg: None)
    return _run_job(ctx, job, _WORKER["processor"])


def _exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """Pool initializer: end this worker when the building process is gone.

    A worker blocks on the pool's queue, whose pipe it holds both ends of, so it never sees the parent die: a
    building process killed without cleanup (SIGKILL, the OOM killer; or SIGTERM outside the ``mergelab`` CLI,
    which raises it as an interrupt) otherwise leaves the workers training and then waiting forever. A daemon
    thread polls the parent pid and exits the worker when it changes (the worker's own outputs go through a
    temporary directory, so nothing half-written is left in place)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_parallel(ctx: _Ctx, todo: Sequence[Job]) -> None:
    """Train ``todo`` in ``ctx.jobs`` spawned worker processes, longest first, sharing the CPU threads.

    Each worker trains from the saved base and writes its own model directory; this process alone writes the
    manifest, as each job completes (an interrupted build keeps what finished)."""
    threads = max(1, torch.get_num_threads() // ctx.jobs)
    order = sorted(todo, key=lambda j: -j.cost)
    ctx.log(f"training {len(order)} models in {min(ctx.jobs, len(order))} processes x {threads} thread(s)")
    pool = ProcessPoolExecutor(max_workers=min(ctx.jobs, len(order)), mp_context=mp.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))
    try:
        pending = {pool.submit(_worker_job, str(ctx.root), ctx.plan, ctx.data.tasks, job, ctx.device, ctx.evaluate,
                               str(ctx.data_root) if ctx.data_root else None, threads): job for job in order}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                job = pending.pop(fut)
                entry = fut.result()  # a failed job raises here; the rest are cancelled below
                _insert(ctx, job.name, entry)
                ctx.log(f"{_score_line(job.name, entry)} (trained in {entry['train_seconds']:.0f} s)")
    except BaseException:
        # A failed job, Ctrl-C or SIGTERM (raised by the CLI): stop the workers now rather than wait minutes for
        # the jobs they are training (their outputs go through temporary directories; the manifest keeps what
        # finished).
        _terminate_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _terminate_workers(pool: Any) -> None:
    """Terminate a ProcessPoolExecutor's workers (``terminate_workers`` from Python 3.14; before, its processes)."""
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.terminate()


def build_zoo(
    root: str | os.PathLike[str] = DEFAULT_ZOO,
    rebuild: bool = False,
    tiny: bool = False,
    progress: bool = True,
    *,
    plan: ZooPlan | None = None,
    tasks: Sequence[str] = TASKS,
    seeds: Sequence[int] | None = None,
    kinds: Sequence[str] = KINDS,
    only: Sequence[str] | None = None,
    jobs: int = 1,
    device: str = "auto",
    evaluate: bool = True,
    data_root: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build (or complete) the model zoo under ``root`` and return its manifest.

    Args:
        root: the zoo directory (created if needed).
        rebuild: retrain every model even when the manifest says it is up to date.
        tiny: use :meth:`ZooPlan.tiny` (seconds; for tests) unless ``plan`` is given.
        progress: show a tqdm bar per training run.
        plan: an explicit plan (overrides ``tiny``).
        tasks: the tasks to build experts for (default all five).
        seeds: override the plan's seeds.
        kinds: which models to build besides each seed's base (subset of ``KINDS``); lets several processes
            build one zoo's parts in parallel (each in its own root, then :func:`combine_zoos`).
        only: build only these models (manifest names such as ``"seed0/full/ocr"``; the seed's base is always
            built or reused), for the same purpose.
        jobs: train each seed's experts and mixture in this many worker processes, splitting the torch threads
            among them (the base trains first, in this process); on a CPU, two 1-thread processes train about
            15% faster than one 2-thread process, and on a many-core machine ``jobs`` scales the build.
        device: training device (``"auto"``: CUDA when present).
        evaluate: score every model into the manifest (needs :mod:`mergelab.evaluators`).
        data_root: where the evaluators find the benchmark data (their default when None).
        log: a one-line logger (default: print when ``progress``).

    Returns:
        The manifest dictionary (also written to ``root/manifest.json``).
    """
    plan = plan or (ZooPlan.tiny() if tiny else ZooPlan())
    if seeds is not None:
        plan = replace(plan, seeds=tuple(seeds))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {TASKS}")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown kind(s) {bad}; known: {KINDS}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    resolved = resolve_device(device)  # fails here, before anything is written, on a bad or missing device
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    log = log or (print if progress else (lambda _msg: None))
    try:
        manifest = read_manifest(root)
    except FileNotFoundError:
        manifest = {}
    plan_dict = plan.to_dict()
    if rebuild or manifest.get("format") != FORMAT_VERSION:
        manifest = {}
    manifest.setdefault("format", FORMAT_VERSION)
    manifest.setdefault("models", {})
    manifest["tasks"] = list(tasks)
    manifest["plan"] = plan_dict
    manifest["image_size"] = modeling.IMAGE_SIZE
    build_env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(resolved)}

    t_start = time.perf_counter()
    data = ZooData(plan, tasks)
    tok_fp = tokenizer_fingerprint(plan, data.corpus())
    tok_dir = root / "tokenizer"
    if not rebuild and manifest.get("tokenizer", {}).get("fingerprint") == tok_fp and tok_dir.is_dir():
        processor = _load_processor(tok_dir)
    else:
        tok = modeling.build_tokenizer(data.corpus(), vocab_size=plan.vocab_size)
        tmp = root / f".tokenizer.tmp-{uuid.uuid4().hex[:8]}"
        tok.save_pretrained(tmp)
        replace_dir(tmp, tok_dir)
        manifest["models"] = {}  # a new tokenizer invalidates every model
        manifest["tokenizer"] = {"fingerprint": tok_fp, "vocab_size": len(tok), "path": "tokenizer"}
        write_manifest(root, manifest)
        processor = modeling.build_processor(tok)
    if evaluate:
        data_root = ensure_data(data_root, tasks=tasks, splits=("val", "test"), seed=plan.data_seed)
    ctx = _Ctx(root, plan, manifest, data, progress, device, evaluate, Path(data_root) if data_root else None, log,
               tuple(kinds), frozenset(only) if only is not None else None, jobs)
    torch_threads = torch.get_num_threads()
    try:
        for seed in plan.seeds:
            _build_seed(ctx, seed, processor, tok_fp)
    finally:
        torch.set_num_threads(torch_threads)
    if ctx.built or "build_env" not in manifest:  # a run that reused everything leaves the build record alone
        manifest["build_env"] = build_env
        manifest["build_seconds_last"] = round(time.perf_counter() - t_start, 1)
    write_manifest(root, manifest)
    return manifest


def combine_zoos(dest: str | os.PathLike[str], sources: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Move the models of zoos built in parallel (same plan and tokenizer) into ``dest`` and merge their manifests.

    A source contributes the models of the seeds its last build was for (its manifest's ``plan.seeds``): a source
    made by copying a zoo and building one seed in it carries stale copies of the other seeds, which stay out. Of
    two different models under one name, the one trained last (``trained_at``; entries without it count as
    oldest) is kept, so a stale copy of a model that ``dest`` retrained does not overwrite it either.

    Raises:
        ValueError: a source has another tokenizer or plan than ``dest`` (named in the message).
    """
    dest = Path(dest)
    manifest = read_manifest(dest)
    for src in map(Path, sources):
        other = read_manifest(src)
        for key in ("tokenizer", "plan"):
            if {k: v for k, v in other[key].items() if k != "seeds"} != \
                    {k: v for k, v in manifest[key].items() if k != "seeds"}:
                raise ValueError(f"{src / MANIFEST}: {key} differs from {dest / MANIFEST}; cannot combine")
        built_for = {int(x) for x in other["plan"]["seeds"]}
        for name, entry in other["models"].items():
            if int(entry["seed"]) not in built_for:
                continue
            mine = manifest["models"].get(name)
            if mine is not None and mine["weights"] == entry["weights"]:
                manifest["models"][name] = entry  # same weights; the source may have rescored them
                continue
            if mine is not None and entry.get("trained_at", "") < mine.get("trained_at", ""):
                continue  # dest's model is newer: the source holds a stale copy
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
            shutil.copytree(src / name, tmp)
            replace_dir(tmp, target)
            manifest["models"][name] = entry
        manifest["plan"]["seeds"] = sorted({*manifest["plan"]["seeds"], *other["plan"]["seeds"]})
    manifest["models"] = dict(sorted(manifest["models"].items()))
    write_manifest(dest, manifest)
    return manifest

