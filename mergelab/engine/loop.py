"""The streaming merge engine: base + N experts on disk -> merged checkpoint on disk, one tensor at a time.

The engine walks the base checkpoint's tensors, reads each one from memory-mapped safetensors (base and every
expert; LoRA experts give ``scaling * B @ A``), forms the stacked task vectors ``(N, *S)`` in the compute dtype on the compute device, asks the merge policy what
to do (keep the base, hand the tensor to the method, or average it, as the official scripts do), and streams
``theta_0 + lam * tau_m`` into bounded output shards. A background reader thread with a bounded queue reads and
subtracts the next tensor while the current one is merged, so peak memory is about ``(N + 2) x`` the largest
tensor, never the model. Global methods (TIES ``scope="global"``) get extra statistics passes first.

Output goes to a temporary directory beside the target and is renamed into place only when complete; nothing is
left behind on failure. Every bad input raises :class:`MergeError` (a ``ValueError``) with one line naming the
culprit. Randomness is a ``torch.Generator`` per tensor seeded from ``(seed, tensor name)``, so results do not
depend on processing order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mergelab
from mergelab import _signals
from mergelab._device import resolve_device as _resolve_device
from mergelab._dtypes import parse_dtype as _parse_dtype
from mergelab.engine.adapter_out import merge_to_adapter
from mergelab.engine.cache import process_cache
from mergelab.engine.core_space import core_updates, to_core_items
from mergelab.engine.factors import LowRank, factor_updates
from mergelab.engine.fused import Chunks, fused_merge, mean_tau, method_tau, native_kinds, native_ties
from mergelab.engine.io import CheckpointReader, MergeError
from mergelab.engine.plan import (
    Expert,
    PlanItem,
    account,
    add_base_,
    check_keys,
    check_lineage,
    fill_deltas,
    has_nonfinite,
    make_plan,
    to_factor_items,
    untouched,
)
from mergelab.engine.policy import resolve_policy
from mergelab.engine.recipe import ExpertSpec, MergeRecipe
from mergelab.engine.report import MergeReport, TensorRecord
from mergelab.engine.stream import BufferPool, Loaded, PeakMemory, TensorStream
from mergelab.engine.writer import OutSpec, ShardWriter, copy_side_files, write_model_card
from mergelab.methods.base import MergeContext, MethodSpec, tensor_seed

__all__ = ["ExpertSpec", "MergeError", "merge", "parse_dtype", "preflight", "resolve_device", "run_merge"]

PROVENANCE_FILE = "mergelab_merge.json"
_FUSED = os.environ.get("MERGELAB_FUSED", "1").strip().lower() not in ("0", "off", "false", "no")
"""The fused CPU path of methods with a chunked form (engine/fused.py); ``MERGELAB_FUSED=0`` turns it off (the
stacked path, bit-identical: for comparisons)."""
_NATIVE_WAIT = os.environ.get("MERGELAB_NATIVE", "").strip().lower() == "wait"
"""TIES's compiled kernels (engine/ties_native.py) start compiling or loading in the background when a merge
begins, and the torch form merges the tensors that come before they are ready; ``MERGELAB_NATIVE=wait`` waits for
them instead (tests, benchmarks of the kernels), ``MERGELAB_NATIVE=0`` turns them off."""
_PREFETCH_BYTES = 256 * 2**20  # read-ahead budget (raised to the largest tensor's footprint)


def parse_dtype(value: str | torch.dtype | None, field: str = "dtype") -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` -> ``torch.bfloat16``; None or ``"auto"`` -> None
    (:func:`mergelab._dtypes.parse_dtype`, raising :class:`MergeError`)."""
    try:
        return _parse_dtype(value, field)
    except ValueError as e:
        raise MergeError(str(e)) from None


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without CUDA is an error (:class:`MergeError`)."""
    try:
        return _resolve_device(device)
    except ValueError as e:
        raise MergeError(str(e)) from None


# --------------------------------------------------------------------------------------------------------------
# Checks before work, and the merge loop


@dataclass
class _Opened:
    """A recipe's inputs opened and checked, ready to stream (what :func:`preflight` proves possible)."""

    out: Path
    dev: torch.device
    cdtype: torch.dtype
    odtype: torch.dtype | None
    base: CheckpointReader
    experts: list[Expert]
    pol: Any
    items: list[PlanItem]
    accounting: dict[str, Any]
    factor_rules: dict[str, str] = field(default_factory=dict)  # lora_merge: factors: tensor -> policy rule

    def close(self) -> None:
        self.base.close()
        for e in self.experts:
            (e.full or (e.lora.reader if e.lora else self.base)).close()


def _open(recipe: MergeRecipe, out: str | Path | None, overwrite: bool, allow_base_mismatch: bool) -> _Opened:
    """Every check that can run before any work: output free and writable (unless ``out`` is None), no overlap with
    the inputs, device, dtypes, readable checkpoints, keys and shapes, lineage, policy, plan and tensor accounting."""
    out = Path(out if out is not None else os.devnull).absolute()
    if out != Path(os.devnull):
        if (out.exists() or out.is_symlink()) and not overwrite:
            raise MergeError(f"out: {out} already exists (pass overwrite=True / --overwrite to replace it)")
        parent = next((p for p in out.parents if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise MergeError(f"out: cannot create {out}: {parent} is not a writable directory")
    dev = resolve_device(recipe.device)
    cdtype = parse_dtype(recipe.compute_dtype, "compute_dtype")
    assert cdtype is not None  # the recipe checked it
    odtype = parse_dtype(recipe.dtype, "dtype")
    for p in [Path(recipe.base), *(Path(e.path) for e in recipe.experts)]:
        rp = p.absolute()
        if out == rp or out in rp.parents or rp in out.parents:
            raise MergeError(f"out: {out} overlaps input {p}")
    base_reader = CheckpointReader(recipe.base)
    ex: list[Expert] = []
    try:
        for e in recipe.experts:
            ex.append(Expert(e, base_reader))
        carry = check_keys(base_reader, ex, recipe.carry_unique)
        if not allow_base_mismatch:
            check_lineage(base_reader, ex)
        try:
            pol = resolve_policy(recipe.policy, base_reader.config())
        except ValueError as e:
            raise MergeError(str(e)) from None
        items = make_plan(base_reader, ex, carry, pol, recipe.spec, odtype)
        factor_rules = (to_factor_items(items, ex) if recipe.lora_merge == "factors"
                        else to_core_items(items, ex) if recipe.lora_merge == "core" else {})
        accounting = account(base_reader, ex, items)
    except BaseException:
        _Opened(out, dev, cdtype, odtype, base_reader, ex, None, [], {}).close()
        raise
    return _Opened(out, dev, cdtype, odtype, base_reader, ex, pol, items, accounting, factor_rules)


def preflight(recipe: MergeRecipe, out: str | Path | None, *, overwrite: bool = False,
              allow_base_mismatch: bool = False) -> dict[str, Any]:
    """Run every check of :func:`run_merge` that needs no work (headers only; nothing is written); ``out=None``
    skips the output directory's checks (a tracked merge's run directory does not exist yet).

    Returns:
        The plan's counts: ``{"device", "tensors": {rule: n}, "bytes_out", "accounting"}`` (``--dry-run``).

    Raises:
        MergeError: the first bad input, one line naming it.
    """
    opened = _open(recipe, out, overwrite, allow_base_mismatch)
    try:
        rules: dict[str, int] = {}
        for it in opened.items:
            rules[it.rule] = rules.get(it.rule, 0) + 1
        return {"device": str(opened.dev), "tensors": dict(sorted(rules.items())),
                "bytes_out": sum(math.prod(it.shape) * it.out_dtype.itemsize for it in opened.items),
                "accounting": opened.accounting}
    finally:
        opened.close()


def run_merge(recipe: MergeRecipe, out: str | Path, *, overwrite: bool = False, progress: bool = False,
              allow_base_mismatch: bool = False) -> MergeReport:
    """Merge a recipe's experts into its base checkpoint, streaming tensor by tensor.

    Runs as a :func:`mergelab._signals.deferred` region: a SIGTERM/SIGINT is acted on between tensors.

    Args:
        recipe: the validated :class:`~mergelab.engine.recipe.MergeRecipe`.
        out: output directory (written beside itself in a temporary directory, renamed when complete).
        overwrite: replace an existing ``out``.
        progress: show a tqdm bar over tensors.
        allow_base_mismatch: merge experts whose adapter config or model config names another base.

    Returns:
        The :class:`MergeReport`.

    Raises:
        MergeError: any bad input (one line naming the culprit); ``out`` is left untouched.
        Terminated: a stop request, acted on between tensors; nothing is left behind.
    """
    with _signals.deferred():
        if recipe.output == "adapter":  # LoRA in, LoRA out: the full merge, then factored into one adapter
            return merge_to_adapter(recipe, out, overwrite=overwrite, full_merge=lambda r, o, sink: _run_merge(
                r, o, False, progress, allow_base_mismatch, sink))
        return _run_merge(recipe, out, overwrite, progress, allow_base_mismatch)


def _run_merge(recipe: MergeRecipe, out: str | Path, overwrite: bool, progress: bool,
               allow_base_mismatch: bool, low_rank: dict[str, LowRank] | None = None) -> MergeReport:
    t_start = time.perf_counter()
    name, spec, cfg, lam, seed = recipe.method_name, recipe.spec, recipe.config, recipe.lam, int(recipe.seed)
    opened = _open(recipe, out, overwrite, allow_base_mismatch)
    out, dev, cdtype, odtype = opened.out, opened.dev, opened.cdtype, opened.odtype
    base_reader, ex, pol, items = opened.base, opened.experts, opened.pol, opened.items
    report = MergeReport(
        out=str(out),
        method=name,
        params=recipe.hyperparameters,
        policy=pol.to_dict(),
        experts=[
            {"path": str(e.path), "name": e.name, "coefficient": e.spec.coefficient, "kind": e.spec.kind}
            for e in ex
        ],
        device=str(dev),
        dtype=str(odtype).removeprefix("torch.") if odtype else None,
        compute_dtype=str(cdtype).removeprefix("torch."),
        seed=seed,
        accounting=opened.accounting,
    )
    factors = _merge_lora_factors(recipe, ex, opened.factor_rules, dev, cdtype) if opened.factor_rules else {}
    # the fused CPU path (engine/fused.py): full experts; "merge" items when the method is elementwise or has a
    # chunked form under its config, "average" items always
    fused = dev.type == "cpu" and bool(ex) and all(e.full is not None for e in ex) and _FUSED
    elementwise = spec.make_stats is None and spec.elementwise is not None and spec.elementwise(cfg)
    chunked = spec.chunked(cfg) if spec.chunked is not None and not elementwise else None

    def is_fused(it: PlanItem) -> bool:
        if not fused or untouched(ex, it.name):
            return False
        if it.rule == "average" or (it.rule == "merge" and elementwise):
            return True
        # A multi-pass chunked form (TIES) forms every chunk again in each pass: it pays for 16-bit inputs (about
        # the stacked path's time, 30-35% less peak memory) and saves a large stack, but costs float32 inputs of
        # modest size time (150M Llama, fp32, N = 3: 3.2-3.6 s against 2.6-2.7 s stacked).
        return (it.rule == "merge" and chunked is not None
                and (base_reader.infos[it.name].dtype.itemsize <= 2
                     or math.prod(it.shape) * cdtype.itemsize * len(ex) > _PREFETCH_BYTES))

    native_rank = getattr(chunked, "native_rank", None)
    if native_rank is not None and fused:  # TIES's compiled kernels: load them while the merge starts, if they pay
        from mergelab.engine import ties_native

        entries: dict[tuple[str, str], int] = {}
        for it in items:
            if it.rule == "merge" and is_fused(it):
                kinds = native_kinds(base_reader.infos[it.name].dtype,
                                     [e.full.infos[it.name].dtype for e in ex],  # type: ignore[union-attr]
                                     it.out_dtype, cdtype)
                if kinds is not None:
                    entries[kinds] = entries.get(kinds, 0) + math.prod(it.shape)
        for kinds, n in entries.items():
            if ties_native.pays(n):  # else loading them would cost more than they save: the torch form merges
                ties_native.warm_up(len(ex), *kinds)

    def load(it: PlanItem) -> Loaded:
        if it.rule == "carry":
            e = ex[it.owner]
            assert e.full is not None
            t = e.full.view(it.name)
            return Loaded(it, t, None, t.numel() * t.element_size())
        b = base_reader.view(it.name)
        if it.rule == "owner" and it.owner >= 0:
            t, n = ex[it.owner].value(it.name, b, dev, cdtype)
            return Loaded(it, t, None, n)
        nbytes = b.numel() * b.element_size()
        if it.rule in ("base", "owner"):
            return Loaded(it, b, None, nbytes)
        if it.rule in ("factors", "core"):  # the update from the merged factors or cores (lam already in them)
            lr = factors[it.name]
            if low_rank is not None:  # output: adapter writes these factors as they are
                low_rank[it.name] = lr
            upd = lr.dense().to(device=dev, dtype=cdtype)
            return Loaded(it, b.to(dev), upd.unsqueeze(0), nbytes)
        b_dev = b.to(dev)
        if untouched(ex, it.name):  # LoRA adapters that all leave this tensor alone: zero task vectors, not built
            return Loaded(it, b_dev, None, nbytes, True, [0.0] * len(ex))
        if is_fused(it):
            # every entry read once, merged and finished in the cache: no stack (engine/fused.py)
            chunks = Chunks(it, b_dev, ex, cdtype)

            done = [0]  # entries released so far in this pass

            def release(upto: int) -> None:  # the inputs' pages behind the stream, since the last call of this pass
                start = done[0] if upto > done[0] else 0  # (a new pass starts from the tensor's first entry)
                base_reader.release(it.name, upto, start)
                for e in ex:
                    e.full.release(it.name, upto, start)  # type: ignore[union-attr]
                done[0] = upto

            chunks.readers = (base_reader, [e.full for e in ex])
            buf = pool.take((math.prod(it.shape),), it.out_dtype, dev)
            res = None
            if native_rank is not None and it.rule == "merge":  # TIES's compiled kernels, when they apply and are ready
                res = native_ties(chunks, native_rank(chunks.n), lam, release=release, out=buf, wait=_NATIVE_WAIT)
            if res is None:
                if it.rule == "average":
                    method = mean_tau()
                elif elementwise:
                    method = method_tau(spec.fn, cfg, MergeContext(name=it.name, compute_dtype=cdtype))
                else:
                    assert chunked is not None
                    method = chunked(chunks.n, len(ex), cdtype, dev, chunks.sample, chunks.step)
                res = fused_merge(chunks, method, lam, release=release, out=buf)
                del method
            release(chunks.n)  # the result is final: the inputs' pages are not needed any more
            del chunks
            nbytes += sum(e.full.infos[it.name].nbytes for e in ex)  # type: ignore[union-attr]
            return Loaded(it, b_dev, None, nbytes, fused=res)
        deltas = pool.take((len(ex), *b.shape), cdtype, dev)
        nbytes += fill_deltas(ex, it.name, deltas, b_dev, dev, cdtype)
        base_reader.release(it.name)  # read again to finish the merge: not resident while the method runs
        # one pass gives the report's norms, the NaN/Inf check (a non-finite entry makes the norm non-finite) and
        # the all-zero test; the exact checks run only when a norm says so
        norms = torch.linalg.vector_norm(deltas.reshape(len(ex), -1), dim=1).tolist()
        for i, nrm in enumerate(norms):
            if not math.isfinite(nrm):
                ex[i].check_finite(it.name)
        zero = all(nrm == 0.0 for nrm in norms) and not bool(deltas.any())
        return Loaded(it, b_dev, None if zero else deltas, nbytes, zero, norms)

    def cost(it: PlanItem) -> int:  # bytes a loaded item holds: base (+ N task vectors in the compute dtype)
        n = math.prod(it.shape)
        if it.rule in ("base", "carry", "owner"):
            return n * it.out_dtype.itemsize
        if it.rule in ("factors", "core"):
            return n * (it.out_dtype.itemsize + cdtype.itemsize)
        if is_fused(it):  # the finished tensor only (the stack is a few chunk-sized buffers)
            return n * it.out_dtype.itemsize
        return n * cdtype.itemsize * (len(ex) + 1)

    budget = max(_PREFETCH_BYTES, max((cost(it) for it in items), default=0))

    def stack_bytes(rules: tuple[str, ...]) -> list[int]:  # the task-vector stacks a pass over these rules builds
        return [math.prod(it.shape) * cdtype.itemsize * len(ex) for it in items
                if it.rule in rules and not untouched(ex, it.name) and not is_fused(it)]

    # the stacks and the fused path's finished tensors, reused from tensor to tensor
    pool = BufferPool(stack_bytes(("merge", "average")) + [math.prod(it.shape) * it.out_dtype.itemsize
                                                          for it in items if is_fused(it)], budget)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    writer = ShardWriter(tmp, [OutSpec(i.name, i.out_dtype, i.shape) for i in items], int(recipe.shard_size))
    try:
        with PeakMemory() as mem:
            stats = spec.make_stats(cfg, len(ex)) if spec.make_stats is not None else None
            if stats is not None:
                report.stats_passes, report.bytes_read = _stats_passes(stats, items, load, cost, budget, progress,
                                                                       pool, stack_bytes)
            bar = _progress(progress, len(items), "merge")
            for ld in TensorStream(items, load, cost, budget):
                _signals.check()  # a safe point: between tensors
                t0 = time.perf_counter()
                rec, value = _merge_one(ld, spec, cfg, lam, stats, seed, cdtype, dev, len(ex), pool)
                if ld.item.rule in ("owner", "carry") and ld.item.owner >= 0:
                    rec.owner = ex[ld.item.owner].name
                writer.write(ld.item.name, value)
                if is_fused(ld.item):
                    pool.give(value)  # the fused path's finished tensor: its buffer serves a later one
                del value  # before the reader, released by the next step, allocates the next tensor
                rec.seconds += time.perf_counter() - t0
                report.tensors.append(rec)
                report.bytes_read += ld.nbytes
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            writer.close()
        report.shards = list(writer.names)
        report.bytes_written = writer.bytes_written
        report.peak_rss_bytes = mem.peak
        if dev.type == "cuda":
            report.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(dev))
        base_dir = base_reader.path if base_reader.path.is_dir() else base_reader.path.parent
        report.copied_files = copy_side_files(base_dir, tmp)
        write_model_card(tmp, recipe)
        if odtype is not None:
            _set_config_dtype(tmp / "config.json", odtype)
        report.wall_seconds = time.perf_counter() - t_start
        _signals.check()  # the last safe point before the output appears
        (tmp / PROVENANCE_FILE).write_text(json.dumps(_provenance(report), indent=2))
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # parents this call created, deepest first
            try:
                p.rmdir()
            except OSError:
                break
        raise
    finally:
        opened.close()
    report.wall_seconds = time.perf_counter() - t_start
    return report


def merge(
    *,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = False,
    max_shard_bytes: int | None = None,
    **recipe_fields: Any,
) -> MergeReport:
    """:func:`run_merge` of ``MergeRecipe.build(**recipe_fields)``: a merge from plain Python values.

    ``recipe_fields`` are the :class:`~mergelab.engine.recipe.MergeRecipe` fields (``base``, ``experts`` as paths,
    dicts or :class:`ExpertSpec`, ``method``, ``params``, ``policy``, ``device``, ``dtype``, ``compute_dtype``,
    ``seed``, ``carry_unique``); ``max_shard_bytes`` is the recipe's ``shard_size``.
    """
    if max_shard_bytes is not None:
        recipe_fields["shard_size"] = max_shard_bytes
    return run_merge(MergeRecipe.build(**recipe_fields), out, overwrite=overwrite, progress=progress)


def _stats_passes(
    stats: Any, items: Sequence[PlanItem], load: Any, cost: Any, budget: int, progress: bool, pool: BufferPool,
    stack_bytes: Callable[[tuple[str, ...]], list[int]],
) -> tuple[int, int]:
    passes, nbytes = 0, 0
    targets = [it for it in items if it.rule == "merge"]
    add_zeros = getattr(stats, "add_zeros", None)
    while True:
        passes += 1
        pool.expect(stack_bytes(("merge",)))  # this pass builds the merged tensors' stacks again
        bar = _progress(progress, len(targets), f"statistics pass {passes}")
        for ld in TensorStream(targets, load, cost, budget):
            _signals.check()
            nbytes += ld.nbytes
            if ld.deltas is not None:
                deltas, ld.deltas = ld.deltas, None
                stats.update(ld.item.name, deltas)
                pool.give(deltas)  # for the next tensor (kept only when the statistics hold no view of it)
                del deltas
            elif ld.zero and add_zeros is not None:
                # all-zero task vectors skip the method but their zeros count toward the global rank, as the
                # official InternVL script flattens every merged parameter
                add_zeros(math.prod(ld.item.shape))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if not stats.finish_pass():
            return passes, nbytes


def _merge_one(
    ld: Loaded,
    spec: MethodSpec,
    cfg: Any,
    lam: float,
    stats: Any,
    seed: int,
    cdtype: torch.dtype,
    dev: torch.device,
    n_experts: int,
    pool: BufferPool | None = None,
) -> tuple[TensorRecord, torch.Tensor]:
    it = ld.item
    rec = TensorRecord(it.name, it.rule, it.shape)
    if ld.fused is not None:  # merged by the reader (engine/fused.py): only the record is left to fill
        res, ld.fused = ld.fused, None
        rec.seconds = res.seconds
        if res.zero:
            rec.rule, rec.expert_norms = "zero", [0.0] * n_experts
        else:
            rec.expert_norms, rec.merged_norm = list(res.norms), res.merged_norm
        return rec, res.value
    if it.rule in ("base", "carry", "owner") or ld.deltas is None:
        if ld.zero:
            rec.rule = "zero"
            rec.expert_norms = [0.0] * n_experts
        return rec, ld.base  # the writer converts it to the output dtype
    deltas = ld.deltas
    rec.expert_norms = list(ld.norms or [])
    if it.rule == "merge":
        gen = torch.Generator(device=dev)
        gen.manual_seed(tensor_seed(seed, it.name))
        # the stack was built for this call alone: the method may overwrite it (TIES trims in place)
        ctx = MergeContext(
            name=it.name, generator=gen, stats=stats, compute_dtype=cdtype, inplace=True, cache=process_cache()
        )
        tau = spec.fn(ld.base, deltas, cfg, ctx)
        if tuple(tau.shape) != it.shape:
            raise MergeError(f"method returned shape {tuple(tau.shape)} for tensor {it.name} of shape {it.shape}")
    elif it.rule in ("factors", "core"):  # the low-rank update (B_m A_m or U M V^T), lambda already applied
        tau, lam = deltas[0], 1.0
    else:
        tau = deltas.mean(dim=0)
    # The engine owns the returned tensor and finishes it in place (theta_0 + lam * tau_m) to save a copy.
    upd = tau.to(cdtype)
    if (
        not upd.is_contiguous()
        or 0 in upd.stride()
        or upd.untyped_storage().data_ptr() == ld.base.untyped_storage().data_ptr()
    ):
        upd = upd.clone()
    if lam != 1.0:
        upd.mul_(lam)
    rec.merged_norm = float(torch.linalg.vector_norm(upd))  # non-finite when an entry is (or the squares overflow)
    if not math.isfinite(rec.merged_norm) and has_nonfinite(upd):
        raise MergeError(f"tensor {it.name}: the merged task vector contains NaN or Inf (rule {it.rule})")
    ld.deltas = None  # the stack is no longer needed: reused or freed before the output is formed (unless tau views it)
    if pool is not None:
        pool.give(deltas)
    del deltas
    return rec, add_base_(upd, ld.base)  # theta_0 + lam * tau_m in the compute dtype; the writer converts it


def _merge_lora_factors(recipe: MergeRecipe, ex: Sequence[Expert], rules: dict[str, str], dev: torch.device,
                        cdtype: torch.dtype) -> Mapping[str, LowRank]:
    """The low-rank update of every tensor planned as ``factors`` or ``core``: ``lora_merge: factors`` merges the
    raw ``lora_A`` and ``lora_B`` stacks (:func:`mergelab.engine.factors.factor_updates`), ``lora_merge: core``
    the experts' cores (:func:`mergelab.engine.core_space.core_updates`); lambda is applied."""
    adapters = [e.lora for e in ex if e.lora is not None]
    if recipe.lora_merge == "core":
        return core_updates(adapters, rules, recipe.spec, recipe.config, seed=int(recipe.seed), lam=recipe.lam,
                            device=dev, dtype=cdtype, cache=process_cache())
    params = dict(recipe.to_dict()["params"])
    coefs = [e.spec.coefficient for e in ex]
    if any(c is not None for c in coefs):
        params["coefficients"] = tuple(1.0 if c is None else float(c) for c in coefs)
    return factor_updates(adapters, rules, recipe.method_name, params, seed=int(recipe.seed), lam=recipe.lam)


def _progress(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", dynamic_ncols=True)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    if not path.exists():
        return
    cfg = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for d in [cfg, *(v for v in cfg.values() if isinstance(v, dict))]:
        for key in ("dtype", "torch_dtype"):
            if key in d:
                d[key] = name
    path.write_text(json.dumps(cfg, indent=2))


def _provenance(report: MergeReport) -> dict[str, Any]:
    d = report.to_dict()
    d.pop("tensors")
    d["mergelab_version"] = mergelab.__version__
    d["torch_version"] = torch.__version__
    return d


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temporary directory onto ``out`` (replacing it only when ``overwrite``)."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise MergeError(f"out: {out} already exists (pass overwrite=True / --overwrite to replace it)")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
        return
    os.replace(tmp, out)
