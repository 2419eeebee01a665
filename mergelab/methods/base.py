"""The contract between the streaming engine and the merging algorithms: the life cycle of a method.

A merging method is one pure tensor function plus a frozen dataclass config, registered with one line in
``mergelab/methods/__init__.py`` (:data:`~mergelab.methods.METHODS`). Methods never see files, never log, never seed
globals and never move tensors between devices: the engine hands them tensors already placed and typed.

Life cycle of one merge (what the engine calls, in order)
---------------------------------------------------------

1. **Configure.** ``cfg = spec.make_config(params)``; the engine adds ``coefficients`` (one per expert, from the
   experts' ``coefficient``) and fills a ``seed`` field the user left unset with the merge seed. The config's
   ``__post_init__`` validates every field (one-line ``ValueError`` naming it). Every method has ``coefficients``.
2. **Statistics passes** (global methods only, e.g. TIES with ``scope="global"``). ``stats =
   spec.make_stats(cfg, n_experts)``; when it is not None the engine streams every to-be-merged tensor through
   the :class:`GlobalStats` hooks: ``stats.update(name, deltas)`` for each tensor with a non-zero task vector,
   ``stats.add_zeros(numel)`` (optional hook) for each tensor whose task vectors are all zero, then
   ``stats.finish_pass()``; it repeats the pass while ``finish_pass`` returns True. ``update`` must not modify
   ``deltas``. Randomness in a stats pass (DARE before a global threshold) must come from
   :func:`tensor_generator` seeded with ``(cfg.seed, name)``, so that every pass, and the merge pass, see the same
   draws.
3. **Prepare** (inside the merge pass, per tensor, method-side): a global method turns the raw task vectors into
   what its statistics described (``GlobalMagnitudeThreshold.prepare``: the same DARE masks as in the passes).
4. **Per-tensor merge.** For each tensor key::

       tau_m = spec.fn(base, deltas, cfg, ctx)

   * ``base``   -- the base model's tensor (original dtype, on the compute device), shape ``S``; never modified.
   * ``deltas`` -- stacked task vectors ``theta_i - theta_0``, shape ``(N, *S)``, in ``ctx.compute_dtype`` on the
     same device. For LoRA experts these are ``scaling * B @ A`` (zeros for untouched tensors).
   * ``cfg``    -- the method's config dataclass instance.
   * ``ctx``    -- :class:`MergeContext`: tensor name, seeded generator, finished statistics, compute dtype, and
     ``inplace`` (who owns ``deltas``, below).
   * returns the merged task vector ``tau_m`` (shape ``S``, compute dtype), **not** scaled by ``lam``. It may not
     alias ``base`` or ``deltas`` unless it is a fresh tensor the caller then owns.

   The engine then writes ``theta_0 + lam * tau_m`` cast to the output dtype, where ``lam`` is ``cfg.lam`` when
   the config has that field and 1 otherwise (:func:`scale_of`). Tensors whose task vectors are all zero never
   reach a method: the engine passes the base tensor through untouched.

Who owns the buffers
--------------------

The caller owns ``base`` and ``deltas``. With ``ctx.inplace=False`` (the default, and what every library caller
gets) a method leaves both untouched: it copies what it must modify. With ``ctx.inplace=True`` the caller hands
``deltas`` over for the duration of the call and never reads it again; a method may then overwrite it (TIES trims
in place, saving a full-size copy of the stack). Only the engine passes ``inplace=True``. The conformance suite
(``tests/test_methods_conformance.py``) checks every registered method for both rules and for determinism given a
generator.

Randomness
----------

Per tensor, ``ctx.generator`` is seeded from ``(merge seed, tensor name)`` by :func:`tensor_seed` (independent of
the processing order). Methods draw from it (DARE) and never from the global RNG.

Which tensors a method sees
---------------------------

Methods whose ``matrix_only`` flag is set (TSV, Iso-C, WUDI, OptMerge, SWUDI: they need a 2-D matrix) receive only
2-D weights; every other non-excluded tensor is averaged by the engine (``lam * mean_i tau_i``), exactly as the
official scripts do. Element-wise methods (weight average, task arithmetic, TIES, DARE) receive
every non-excluded tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


class GlobalStats(Protocol):
    """Statistics a global method gathers over all merged tensors before merging (multi-pass streaming).

    The engine calls exactly these hooks, in this order, once per pass: :meth:`update` for each merged tensor with
    a non-zero task vector, :meth:`add_zeros` (when the object has it) for each merged tensor whose task vectors are
    all zero, then :meth:`finish_pass`. The finished object reaches the method as ``ctx.stats``.
    """

    def update(self, name: str, deltas: Tensor) -> None:
        """Add one tensor's stacked task vectors ``(N, *S)`` to the current pass (``deltas`` is not modified)."""
        ...

    def add_zeros(self, numel: int) -> None:
        """Count ``numel`` all-zero entries per expert (a tensor the engine does not stream); optional hook."""
        ...

    def finish_pass(self) -> bool:
        """Close the current pass; return True when another streaming pass is needed."""
        ...


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from ``(seed, tensor name)``: independent of processing order (blake2b).

    This is the one per-tensor seed scheme: the engine seeds ``ctx.generator`` with it, and statistics passes that
    draw random numbers use it through :func:`tensor_generator`.
    """
    h = hashlib.blake2b(f"{int(seed)}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def tensor_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with :func:`tensor_seed` ``(seed, name)``: the engine's ``ctx.generator``."""
    return torch.Generator(device=device).manual_seed(tensor_seed(seed, name))


@dataclass(frozen=True)
class MergeContext:
    """Per-tensor context the engine hands to a method.

    Attributes:
        name: the tensor's key (used in error messages and per-tensor seeds).
        generator: the tensor's seeded generator (:func:`tensor_generator` of the merge seed and ``name``).
        stats: the finished :class:`GlobalStats` of a global method, else None.
        compute_dtype: dtype of ``deltas``.
        inplace: True when the caller hands ``deltas`` over (the method may overwrite it); False leaves the
            inputs untouched. Only the engine sets it.
        cache: a :class:`DecompositionCache` shared across merges (a campaign's trials), or None: every
            decomposition is computed afresh (library calls). See :func:`cached`.
    """

    name: str = ""
    generator: torch.Generator | None = None
    stats: Any = None
    compute_dtype: torch.dtype = torch.float32
    inplace: bool = False
    cache: DecompositionCache | None = None


class DecompositionCache(Protocol):
    """A store of trial-independent per-layer decompositions (SVDs, Gram eigendecompositions), shared by merges.

    Keys are built by :func:`cached` from the content of the decomposed tensors, so a hit is always the value
    the computation would return. Cached values are read-only: a method never modifies what it gets back.
    """

    def get_or_compute(self, key: tuple[Any, ...], fn: Callable[[], Any]) -> Any:
        """The value stored under ``key``, else ``fn()`` (stored when it fits the cache's bound)."""
        ...


def tensor_digest(t: Tensor) -> str:
    """A content hash of ``t``: blake2b of its bytes plus its dtype and shape (a CPU copy for device tensors)."""
    h = hashlib.blake2b(f"{t.dtype}\x00{tuple(t.shape)}\x00{t.device}".encode(), digest_size=20)
    h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cached(ctx: MergeContext, kind: str, inputs: Tensor | str, fn: Callable[[], Any], *params: Any) -> Any:
    """``fn()``, through ``ctx.cache`` when there is one.

    The key is ``(kind, tensor name, content digest of inputs, *params)``: ``inputs`` is the tensor ``fn``
    decomposes (or a digest of it from :func:`tensor_digest`, to hash a stack once for several decompositions);
    ``params`` are every other value ``fn`` depends on (its rank, centring, solver, dtype). Without a cache nothing
    is hashed.
    """
    if ctx.cache is None:
        return fn()
    digest = inputs if isinstance(inputs, str) else tensor_digest(inputs)
    return ctx.cache.get_or_compute((kind, ctx.name, digest, *params), fn)


MethodFn = Callable[[Tensor, Tensor, Any, MergeContext], Tensor]

LAM_GRID: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5)
"""The paper's lambda grid "for all methods", searched on the val split (the benchmark and the demo sweep it)."""


class ChunkedMerge(Protocol):
    """A method's merge of one tensor as passes over the column chunks of its ``(N, M)`` stack of task vectors, for
    a caller that forms the chunks itself instead of the whole stack (the engine's fused CPU path,
    :mod:`mergelab.engine.fused`). The caller visits every chunk of a pass in order, ``a`` being its first column,
    then calls :meth:`end_pass`; in the pass where :attr:`final` is True each visit returns the chunk's merged task
    vector (``k`` entries), which must equal the per-tensor function's result on those columns bit for bit.
    ``base`` is the base's chunk in its stored dtype; ``d`` is overwritten after the visit (a result must not be
    a view of it)."""

    final: bool

    def visit(self, a: int, base: Tensor, d: Tensor) -> Tensor | None: ...

    def end_pass(self) -> None: ...


def always(cfg: Any) -> bool:
    """``MethodSpec.elementwise`` of a method that is elementwise under every config."""
    return True


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method table :data:`~mergelab.methods.METHODS`: the function, its config and its facts.

    Attributes:
        fn: the per-tensor function ``fn(base, deltas, cfg, ctx) -> tau_m`` (life cycle step 4).
        config_cls: the frozen dataclass config; it has a ``coefficients`` field (per-expert, None = all ones).
        matrix_only: the method needs 2-D weights (the engine averages every other tensor).
        make_stats: ``make_stats(cfg, n_experts) -> GlobalStats | None`` for global methods (step 2), else None.
        description: one line for listings.
        paper: a row of the OptMerge paper's Tables 2 and 3.
        setting_field: the config field set to the experts' setting (``"full"`` / ``"lora"``).
        single_expert: parameters under which merging one expert returns that expert unchanged (checked by the
            conformance suite on an isotropic task vector); ``{}`` when the defaults do, None when no setting does.
    """

    fn: MethodFn
    config_cls: type
    matrix_only: bool = False
    make_stats: Callable[[Any, int], GlobalStats | None] | None = None
    description: str = ""
    paper: bool = True
    """A row of the OptMerge paper's Tables 2 and 3 (the demo compares these)."""
    setting_field: str | None = None
    """The config field set to the experts' setting, ``"full"`` or ``"lora"`` (OptMerge's ``variant``)."""
    single_expert: Mapping[str, Any] | None = field(default_factory=dict, compare=False)
    """Parameters under which one expert comes back unchanged (``{}``: the defaults; None: no setting does)."""
    elementwise: Callable[[Any], bool] | None = None
    """``elementwise(cfg)``: whether ``fn`` under ``cfg`` is elementwise (entry j of the result depends only on entry
    j of each task vector and of the base, and the stack may be split along its flattened entries), so that the
    engine may apply it chunk by chunk without building the stack (:mod:`mergelab.engine.fused`); None: never."""
    chunked: Callable[[Any], Callable[..., ChunkedMerge] | None] | None = None
    """``chunked(cfg)``: the factory of the method's multi-pass :class:`ChunkedMerge` under ``cfg``, or None when
    ``cfg`` has no chunked form; None: the method has none. The factory is called per tensor as ``factory(m,
    n_experts, dtype, device, sample, size)``: ``m`` entries per expert, the compute dtype and device, ``sample(row,
    index)`` giving expert ``row``'s task vector at ``index`` (for decisions made before the first pass) and the
    most columns a chunk will have."""

    @property
    def has_lam(self) -> bool:
        """Whether the config scales the merged task vector by ``lam`` (swept over :data:`LAM_GRID`)."""
        return "lam" in getattr(self.config_cls, "__dataclass_fields__", {})

    def setting_params(self, setting: str) -> dict[str, Any]:
        """The parameters for experts of ``setting`` (``"full"`` or ``"lora"``): the defaults, plus the setting."""
        return {self.setting_field: setting} if self.setting_field else {}

    def make_config(self, params: dict[str, Any] | None = None) -> Any:
        """Build the config from a plain dict, naming the unknown field on error."""
        params = dict(params or {})
        fields = getattr(self.config_cls, "__dataclass_fields__", {})
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for {self.config_cls.__name__}; known: {sorted(fields)}"
            )
        return self.config_cls(**params)


def scale_of(cfg: Any) -> float:
    """The lambda applied by the engine: ``cfg.lam`` when present, else 1."""
    return float(getattr(cfg, "lam", 1.0))
