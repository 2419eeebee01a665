"""The contract between the streaming engine and the merging algorithms.

A merging method is one pure tensor function plus a frozen dataclass config, registered with one line in
``mergelab/methods/__init__.py``. Methods never see files, never log, never seed globals and never move
tensors between devices: the engine hands them tensors already placed and typed.

Call convention (per tensor key)::

    tau_m = spec.fn(base, deltas, cfg, ctx)

* ``base``   -- the base model's tensor (original dtype, on the compute device), shape ``S``.
* ``deltas`` -- stacked task vectors ``theta_i - theta_0``, shape ``(N, *S)``, in ``ctx.compute_dtype`` on the
  same device. For LoRA experts these are ``scaling * B @ A`` (zeros for untouched tensors). The buffer belongs
  to the method for the duration of the call: it may be modified in place (the engine never reuses it), which
  saves a full-size copy in trimming/dropping methods.
* ``cfg``    -- the method's config dataclass instance.
* ``ctx``    -- :class:`MergeContext`: tensor name, seeded generator, global statistics, compute dtype.
* returns the merged task vector ``tau_m`` (shape ``S``, compute dtype), **not** scaled by ``lam``.

The engine then writes ``theta_0 + lam * tau_m`` cast to the output dtype, where ``lam`` is ``cfg.lam`` when the
config has that field and 1 otherwise. Tensors whose task vectors are all zero never reach a method: the engine
passes the base tensor through untouched.

Methods whose ``matrix_only`` flag is set (TSV, Iso-C, WUDI, OptMerge: they need a 2-D matrix) receive only 2-D
weights; every other non-excluded tensor is averaged by the engine (``lam * mean_i tau_i``), exactly as the
official scripts do (spec section 1.6). Element-wise methods (weight average, task arithmetic, TIES, DARE) receive
every non-excluded tensor.

Global methods (TIES with ``scope="global"``) expose ``make_stats(cfg, n_experts)``; the engine streams the
to-be-merged tensors through ``stats.update(name, deltas)`` once per pass until ``stats.finish_pass()`` returns
False, then runs the merge pass with ``ctx.stats`` set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


class GlobalStats(Protocol):
    """Statistics a global method gathers over all merged tensors before merging (two-pass streaming)."""

    def update(self, name: str, deltas: Tensor) -> None: ...

    def finish_pass(self) -> bool:
        """Close the current pass; return True when another streaming pass is needed."""
        ...


@dataclass(frozen=True)
class MergeContext:
    """Per-tensor context the engine hands to a method."""

    name: str = ""
    generator: torch.Generator | None = None
    stats: Any = None
    compute_dtype: torch.dtype = torch.float32
    inplace: bool = False


MethodFn = Callable[[Tensor, Tensor, Any, MergeContext], Tensor]

LAM_GRID: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 1.0, 1.5)
"""The paper's lambda grid "for all methods", searched on the val split (the benchmark and the demo sweep it)."""


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry."""

    fn: MethodFn
    config_cls: type
    matrix_only: bool = False
    make_stats: Callable[[Any, int], GlobalStats | None] | None = None
    description: str = ""
    paper: bool = True
    """A row of the OptMerge paper's Tables 2 and 3 (the demo compares these)."""
    setting_field: str | None = None
    """The config field set to the experts' setting, ``"full"`` or ``"lora"`` (OptMerge's ``variant``)."""

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
