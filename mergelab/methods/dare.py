"""DARE: Drop And REscale (Yu et al. 2024, "Language Models are Super Mario", arXiv:2311.03099).

Granularity: per tensor (element-wise). Per expert and per entry, drop with probability ``p`` and rescale the
survivors by ``1/(1-p)`` (``E[DARE(tau)] = tau``), then merge with Task Arithmetic or TIES. DARE is not a method of
its own here: it is the ``drop_rate`` knob of :class:`TaskArithmeticConfig` and :class:`TiesConfig`
(the math lives once in :func:`mergelab.methods._sparsify.dare_drop`); the method table's ``dare_task_arithmetic`` and
``dare_ties`` entries are those methods with the official default ``p = 0.2``. Randomness comes
from ``ctx.generator`` (the official 2025 scripts drew unseeded masks).

Per-expert coefficients ``c_i`` keep the meaning of the method DARE feeds: in ``dare_task_arithmetic`` ``c_i``
scales expert i's sparsified, rescaled task vector in the sum; in ``dare_ties`` it weighs it in the sign election
and the disjoint mean. Dropping never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergelab.methods._sparsify import dare_drop
from mergelab.methods.task_arithmetic import TaskArithmeticConfig
from mergelab.methods.ties import TiesConfig


@dataclass(frozen=True, kw_only=True)
class DareTaskArithmeticConfig(TaskArithmeticConfig):
    """Task Arithmetic w/ DARE: :class:`TaskArithmeticConfig` with ``drop_rate`` defaulting to 0.2."""

    drop_rate: float = 0.2


@dataclass(frozen=True, kw_only=True)
class DareTiesConfig(TiesConfig):
    """TIES w/ DARE: :class:`TiesConfig` with ``drop_rate`` defaulting to 0.2."""

    drop_rate: float = 0.2


__all__ = ["DareTaskArithmeticConfig", "DareTiesConfig", "dare_drop"]
