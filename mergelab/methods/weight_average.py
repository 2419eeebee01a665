"""Weight Average (model soup, Wortsman et al. 2022, arXiv:2203.05482). Granularity: per tensor (element-wise).

``theta_m = (1/N) sum_i theta_i = theta_0 + (1/N) sum_i tau_i`` (spec section 2, later ``baseline_merging.py``).
There is no lambda: the engine scales by 1. Deterministic; dtype follows the deltas (the compute dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mergelab.methods.base import MergeContext


@dataclass(frozen=True, kw_only=True)
class WeightAverageConfig:
    """Weight average has no hyperparameters (``lam`` is fixed to 1 by the method's definition)."""


def weight_average(base: Tensor, deltas: Tensor, cfg: WeightAverageConfig, ctx: MergeContext) -> Tensor:
    """Mean task vector.

    Args:
        base: base tensor (unused: the mean of the deltas is the merged task vector).
        deltas: stacked task vectors ``(N, *S)``.
        cfg: the (empty) config.
        ctx: merge context (unused).

    Returns:
        ``mean_i tau_i`` with shape ``S`` in the deltas' dtype.
    """
    return deltas.mean(dim=0)
