"""Weight Average (model soup, Wortsman et al. 2022, arXiv:2203.05482). Granularity: per tensor (element-wise).

``theta_m = (1/N) sum_i theta_i = theta_0 + (1/N) sum_i tau_i`` (the authors' later ``baseline_merging.py``).
Per-expert coefficients ``c_i`` are the weights of the soup: ``tau_m = sum_i c_i tau_i / sum_i c_i`` (each
``c_i >= 0``, positive sum; all ones is the paper's uniform mean). There is no lambda: the engine scales by 1.
Deterministic; dtype follows the deltas (the compute dtype); the inputs are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mergelab.methods._linalg import check_coefficients, coefficients_or_none
from mergelab.methods.base import MergeContext
from mergelab.methods.task_arithmetic import combine


@dataclass(frozen=True, kw_only=True)
class WeightAverageConfig:
    """Weight average hyperparameters (``lam`` is fixed to 1 by the method's definition).

    Attributes:
        coefficients: per-expert weights ``c_i >= 0`` of the mean (N floats), or None for the uniform mean.
    """

    coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "coefficients", check_coefficients(name, self.coefficients, weights=True))


def weight_average(base: Tensor, deltas: Tensor, cfg: WeightAverageConfig, ctx: MergeContext) -> Tensor:
    """Mean task vector, weighted by the coefficients when given.

    Args:
        base: base tensor (unused: the mean of the deltas is the merged task vector).
        deltas: stacked task vectors ``(N, *S)`` (not modified).
        cfg: :class:`WeightAverageConfig`.
        ctx: merge context (the name is used in errors).

    Returns:
        ``sum_i c_i tau_i / sum_i c_i`` (``mean_i tau_i`` without coefficients) with shape ``S`` in the deltas'
        dtype.
    """
    return combine(deltas, coefficients_or_none(cfg.coefficients, deltas, ctx.name), mean=True)
