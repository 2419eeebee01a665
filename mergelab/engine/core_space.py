"""Core-space merging of LoRA adapters (``lora_merge: core``): Panariello et al., *Accurate and Efficient Low-Rank
Model Merging in Core Space*, NeurIPS 2025, arXiv 2509.17786.

Per LoRA-adapted weight, expert ``i`` brings ``B_i (m, r_i)`` (its scaling folded in) and ``A_i (r_i, n)``. Take
orthonormal bases ``U (m, R)`` of the span of ``[B_1 .. B_T]`` and ``V (n, R')`` of the span of
``[A_1^T .. A_T^T]`` (QR of the stack, then the SVD of its small triangular factor, null directions dropped;
``R, R' <= sum_i r_i``). Every delta lies in ``U``'s column span and ``V``'s, so ``B_i A_i = U M_i V^T`` exactly,
with the core ``M_i = (U^T B_i)(A_i V)`` of size ``(R, R')``, read off the triangular factors. The recipe's method, whatever it is, merges the cores
as its task vectors (global statistics included) and the result maps back as ``delta = lam * U M V^T`` -- held as a
:class:`~mergelab.engine.factors.LowRank`, so a full checkpoint expands it and ``output: adapter`` writes it at
rank ``R`` with no truncation and no ``m x n`` SVD.

Which methods give the delta mode's result: ``M -> U M V^T`` is a linear isometry (Frobenius inner products and
nonzero singular values are kept, singular vectors rotate), so a method gives the same update in both spaces when it
commutes with orthogonal changes of basis and its hyperparameters mean the same in both:

* the same (float rounding), measured: ``task_arithmetic``, ``weight_average`` (linear); ``iso_c`` with
  ``span_only: true``, ``swudi_a``, ``wudi`` with ``optimizer: sgd`` (a loss of Frobenius norms, SGD steps rotate
  with the basis); ``tsv``, ``optmerge`` ``variant: lora`` and ``swudi`` with ``rank_ratio: null`` when their
  truncation keeps every nonzero singular value of each task vector in both spaces (``k`` is a fraction of the
  matrix's shorter side: ``min(m, n)`` there, ``min(R, R')`` here; e.g. equal ranks ``r`` and ``k >= r``);
* different by design: element-wise methods (``ties``, ``dare_*``: magnitudes and signs are ranked per entry of
  another basis; DARE's masks fall on other entries), Adam (``wudi`` and ``optmerge`` ``variant: full`` by
  default: per-coordinate steps are not rotation-invariant; 3e-3 relative on a random case), ``iso_c`` /
  ``iso_cts`` (their flat spectrum spans all ``min(m, n)`` directions there, ``min(R, R')`` here), ``swudi`` with
  its default ``rank_ratio`` (a fraction of ``n`` eigendirections) and truncations that bind (unequal ranks).

``tests/test_lora_core.py`` checks each claim numerically. Cost per weight: two QRs of ``(m, sum r)`` and
``(n, sum r)`` stacks, ``T`` small products, the method on ``T`` cores of ``(sum r)^2`` entries instead of ``T``
full ``m x n`` task vectors, and one ``(m, R)(R, R')(R', n)`` product when a full checkpoint is written
(``benchmarks/lora_core.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mergelab.engine.adapters import LoraAdapter
from mergelab.engine.factors import LowRank
from mergelab.engine.io import MergeError
from mergelab.engine.plan import Expert, PlanItem
from mergelab.methods.base import DecompositionCache, MergeContext, MethodSpec, tensor_generator


def span_basis(stack: Tensor) -> tuple[Tensor, Tensor]:
    """An orthonormal basis ``Q (m, R)`` of the column span of ``stack (m, k)``, ``R`` its numerical rank, and the
    stack's coordinates in it, ``Q^T stack (R, k)``.

    QR of the stack, then the singular values of the small triangular factor: when every one is above
    ``max(s) * max(m, k) * eps(dtype)`` (full column rank, the usual case) ``Q`` is the basis and the triangular
    factor the coordinates; otherwise the SVD's left vectors ``P`` rotate both (``Q P``, ``P^T R``) and the
    directions below that bound are dropped (an all-zero stack gives ``R = 0``). No ``m x k`` product beyond the QR.
    """
    m, k = stack.shape
    if k == 0 or not bool(stack.any()):
        return stack.new_zeros(m, 0), stack.new_zeros(0, k)
    q, r = torch.linalg.qr(stack)
    s = torch.linalg.svdvals(r)
    tol = float(s.max()) * max(m, k) * torch.finfo(stack.dtype).eps
    if q.shape[1] == k and bool((s > tol).all()):
        return q, r
    p, s, _ = torch.linalg.svd(r, full_matrices=False)
    p = p[:, : int((s > tol).sum())]
    return q @ p, p.T @ r


@dataclass(frozen=True)
class CoreSpace:
    """One weight's experts in their shared core space: ``delta_i = U cores[i] V^T`` (untransposed LoRA layout).

    Attributes:
        u: ``(m, R)``, orthonormal columns spanning every ``B_i``.
        v: ``(n, R')``, orthonormal columns spanning every ``A_i^T``.
        cores: ``(T, R, R')``, one core per expert (zeros for an expert that does not adapt the weight).
        transpose: the base tensor is the transposed product (embeddings, ``fan_in_fan_out``).
    """

    u: Tensor
    v: Tensor
    cores: Tensor
    transpose: bool = False

    def lift(self, core: Tensor) -> LowRank:
        """The update ``U core V^T`` as factors."""
        return LowRank(self.u, self.v.T, core, 1.0, self.transpose)


def core_space(bs: Sequence[Tensor], as_: Sequence[Tensor], transpose: bool = False) -> CoreSpace:
    """The core space of one weight from its experts' factors.

    Args:
        bs: per expert ``B_i (m, r_i)``, scaling folded in (``r_i = 0`` for an expert without this module).
        as_: per expert ``A_i (r_i, n)``.
        transpose: recorded for :meth:`CoreSpace.lift`.
    """
    u, cb = span_basis(torch.cat(list(bs), dim=1))  # cb = U^T [B_1 .. B_T]
    v, ca = span_basis(torch.cat([a.T for a in as_], dim=1))  # ca = V^T [A_1^T .. A_T^T]
    ends = torch.tensor([b.shape[1] for b in bs]).cumsum(0).tolist()
    cores = torch.stack([cb[:, e - b.shape[1]:e] @ ca[:, e - b.shape[1]:e].T for b, e in zip(bs, ends, strict=True)])
    return CoreSpace(u, v, cores, transpose)


def merge_cores(spaces: Mapping[str, CoreSpace], rules: Mapping[str, str], spec: MethodSpec, cfg: Any, *,
                seed: int, lam: float, cache: DecompositionCache | None = None) -> dict[str, LowRank]:
    """Merge every weight's cores with the method (rule ``merge``) or their mean (``average``), times ``lam``.

    A global method's statistics passes run over the cores of every merged weight first, as the engine's run over
    task vectors. All-zero cores skip the method, as all-zero task vectors do in the engine.

    Returns:
        ``{weight: LowRank(U, V^T, lam * M)}``.
    """
    n = next(iter(spaces.values())).cores.shape[0] if spaces else 0
    merged = [k for k, r in rules.items() if r == "merge" and bool(spaces[k].cores.any())]
    merging = set(merged)
    stats = spec.make_stats(cfg, n) if spec.make_stats is not None and merged else None
    while stats is not None:
        for k in merged:
            stats.update(k, spaces[k].cores)
        if not stats.finish_pass():
            break
    out: dict[str, LowRank] = {}
    for k, rule in rules.items():
        sp = spaces[k]
        if rule == "average":
            core = sp.cores.mean(dim=0)
        elif k in merging:
            ctx = MergeContext(name=k, generator=tensor_generator(seed, k, sp.cores.device), stats=stats,
                               compute_dtype=sp.cores.dtype, cache=cache)
            core = spec.fn(torch.zeros_like(sp.cores[0]), sp.cores, cfg, ctx)
        else:
            core = torch.zeros_like(sp.cores[0])
        out[k] = sp.lift(core * lam)
    return out


def read_spaces(adapters: Sequence[LoraAdapter], keys: Sequence[str], device: torch.device,
                dtype: torch.dtype) -> dict[str, CoreSpace]:
    """The core space of every base tensor in ``keys`` from the adapters' factors (read on ``device`` in ``dtype``).

    Raises:
        MergeError: a non-finite factor, or adapters that store the same weight transposed and not.
    """
    out = {}
    for key in keys:
        mods = [(ad, ad.modules.get(key)) for ad in adapters]
        present = [(ad, m) for ad, m in mods if m is not None]
        if len({m.transpose for _, m in present}) > 1:
            raise MergeError(f"lora_merge: 'core': {key} is a transposed LoRA module in some experts only")
        factors: dict[int, tuple[Tensor, Tensor]] = {}
        for i, (ad, m) in enumerate(mods):
            if m is None:
                continue
            a, b = (ad.reader.get(k).to(device=device, dtype=dtype) for k in (m.a_key, m.b_key))
            if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
                raise MergeError(f"{ad.path}: LoRA factors of {key} contain NaN or Inf")
            factors[i] = (b * m.scaling, a)
        b0, a0 = next(iter(factors.values()))
        bs = [factors[i][0] if i in factors else b0.new_zeros(b0.shape[0], 0) for i in range(len(adapters))]
        as_ = [factors[i][1] if i in factors else a0.new_zeros(0, a0.shape[1]) for i in range(len(adapters))]
        out[key] = core_space(bs, as_, present[0][1].transpose)
    return out


class LazyCoreUpdates(Mapping[str, LowRank]):
    """The core-space update of one tensor, computed each time it is asked for and not kept (per-tensor methods):
    the engine asks once per tensor, so it holds one tensor's bases at a time, not the model's. Arguments as
    :func:`core_updates`."""

    def __init__(self, adapters: Sequence[LoraAdapter], rules: Mapping[str, str], spec: MethodSpec, cfg: Any,
                 **kw: Any) -> None:
        self._args = (adapters, spec, cfg)
        self._rules = dict(rules)
        self._kw = kw

    def __getitem__(self, key: str) -> LowRank:
        if key not in self._rules:  # before any read: ``in`` and ``get`` answer for every key (Mapping's contract)
            raise KeyError(key)
        adapters, spec, cfg = self._args
        kw = self._kw
        spaces = read_spaces(adapters, [key], kw["device"], kw["dtype"])
        return merge_cores(spaces, {key: self._rules[key]}, spec, cfg, seed=kw["seed"], lam=kw["lam"],
                           cache=kw["cache"])[key]

    def __contains__(self, key: object) -> bool:
        return key in self._rules

    def __iter__(self) -> Iterator[str]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)


def core_updates(adapters: Sequence[LoraAdapter], rules: Mapping[str, str], spec: MethodSpec, cfg: Any, *,
                 seed: int, lam: float, device: torch.device, dtype: torch.dtype,
                 cache: DecompositionCache | None = None) -> Mapping[str, LowRank]:
    """``lora_merge: core`` for the engine: :func:`read_spaces` then :func:`merge_cores` (``rules`` from
    :func:`to_core_items`), in ``dtype`` or float32 when that is narrower (QR needs it). A per-tensor method gets a
    :class:`LazyCoreUpdates` (one tensor at a time); a method with global statistics needs every core first, so
    every update is computed here and held until written."""
    work = torch.promote_types(dtype, torch.float32)
    if spec.make_stats is None or spec.make_stats(cfg, len(adapters)) is None:
        return LazyCoreUpdates(adapters, rules, spec, cfg, seed=seed, lam=lam, device=device, dtype=work,
                               cache=cache)
    return merge_cores(read_spaces(adapters, list(rules), device, work), rules, spec, cfg, seed=seed, lam=lam,
                       cache=cache)


def to_core_items(items: Sequence[PlanItem], experts: Sequence[Expert]) -> dict[str, str]:
    """``lora_merge: core``: turn every merged or averaged tensor that the experts change only through LoRA factors
    into rule ``core`` (a tensor some adapter saves as a full value, ``modules_to_save``, stays a task vector).

    Returns:
        ``{base tensor: the policy's rule}``.

    Raises:
        MergeError: an expert that is not a LoRA adapter, factors whose product does not have the base tensor's
            shape, or a module stored transposed in some adapters only (from the headers and configs: found before
            any work, where the delta mode finds a bad shape while merging).
    """
    adapters = []
    for e in experts:
        if e.lora is None:
            raise MergeError(f"lora_merge: 'core' needs every expert to be a LoRA adapter; {e.name} is not")
        adapters.append(e.lora)
    out = {}
    for it in items:
        if (it.rule in ("merge", "average") and any(it.name in ad.modules for ad in adapters)
                and not any(it.name in ad.full for ad in adapters)):
            for ad in adapters:
                _check_shape(ad, it.name, it.shape)
            if len({ad.modules[it.name].transpose for ad in adapters if it.name in ad.modules}) > 1:
                raise MergeError(f"lora_merge: 'core': {it.name} is a transposed LoRA module in some experts only")
            out[it.name] = it.rule
            it.rule = "core"
    return out


def _check_shape(adapter: LoraAdapter, key: str, shape: tuple[int, ...]) -> None:
    """``B (m, r) @ A (r, n)`` (transposed for embeddings and ``fan_in_fan_out``) has the base tensor's shape.

    Raises:
        MergeError: naming the adapter, the tensor and both shapes, as the delta mode does.
    """
    m = adapter.modules.get(key)
    if m is None:
        return
    a, b = adapter.reader.infos[m.a_key].shape, adapter.reader.infos[m.b_key].shape
    if len(b) != 2 or b[1] != a[0]:
        raise MergeError(f"{adapter.path}: LoRA factors of {key} do not multiply: B {tuple(b)}, A {tuple(a)}")
    product = (a[1], b[0]) if m.transpose else (b[0], a[1])
    if product != tuple(shape):
        raise MergeError(f"{adapter.path}: LoRA update for {key} has shape {product}, base has {tuple(shape)}")


__all__ = ["CoreSpace", "LazyCoreUpdates", "core_space", "core_updates", "merge_cores", "read_spaces", "span_basis",
           "to_core_items"]
