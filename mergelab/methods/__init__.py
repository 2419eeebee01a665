"""Merging methods: the method table, one line per method (contract and life cycle: :mod:`mergelab.methods.base`).

Adding a method is one module (a config dataclass with a ``coefficients`` field and a per-tensor function) plus one
line here; ``tests/test_methods_conformance.py`` then covers it without any test-table edit.
"""

from __future__ import annotations

from types import MappingProxyType

from mergelab.methods import dare, iso, optmerge, swudi, task_arithmetic, ties, tsv, weight_average, wudi
from mergelab.methods.base import MergeContext, MethodSpec, always, scale_of

# fmt: off
METHODS: MappingProxyType[str, MethodSpec] = MappingProxyType({
    "weight_average": MethodSpec(weight_average.weight_average, weight_average.WeightAverageConfig, elementwise=always, description="mean of the experts (model soup)"),
    "task_arithmetic": MethodSpec(task_arithmetic.task_arithmetic, task_arithmetic.TaskArithmeticConfig, elementwise=task_arithmetic.is_elementwise, description="sum_i c_i tau_i, arXiv:2212.04089"),
    "ties": MethodSpec(ties.ties, ties.TiesConfig, make_stats=ties.make_stats, single_expert={"density": 1.0}, chunked=ties.chunked, description="trim, elect sign, disjoint mean; arXiv:2306.01708"),
    "dare_task_arithmetic": MethodSpec(task_arithmetic.task_arithmetic, dare.DareTaskArithmeticConfig, single_expert={"drop_rate": 0.0}, elementwise=task_arithmetic.is_elementwise, description="DARE p=0.2 then task arithmetic; arXiv:2311.03099"),
    "dare_ties": MethodSpec(ties.ties, dare.DareTiesConfig, make_stats=ties.make_stats, single_expert={"drop_rate": 0.0, "density": 1.0}, chunked=ties.chunked, description="DARE p=0.2 then TIES; arXiv:2311.03099"),
    "tsv": MethodSpec(tsv.tsv, tsv.TsvConfig, matrix_only=True, description="task singular vectors, orthogonalised; arXiv:2412.00081"),
    "iso_c": MethodSpec(iso.iso_c, iso.IsoCConfig, matrix_only=True, description="isotropic spectrum of the TA sum; arXiv:2502.04959"),
    "iso_cts": MethodSpec(iso.iso_cts, iso.IsoCtsConfig, matrix_only=True, paper=False, description="isotropic common + task-specific subspaces; arXiv:2502.04959"),
    "wudi": MethodSpec(wudi.wudi, wudi.WudiConfig, matrix_only=True, single_expert={"optimizer": "sgd", "lr": 1e-3}, description="data-free interference loss, Adam; arXiv:2503.08099"),
    "optmerge": MethodSpec(optmerge.optmerge, optmerge.OptMergeConfig, matrix_only=True, setting_field="variant", single_expert={"variant": "lora"}, description="OptMerge (full / lora variants); arXiv:2505.19892"),
    "swudi": MethodSpec(swudi.swudi, swudi.SwudiConfig, matrix_only=True, paper=False, description="closed-form spectral WUDI, fixed rank ratio; arXiv:2606.07289"),
    "swudi_a": MethodSpec(swudi.swudi_a, swudi.SwudiAConfig, matrix_only=True, paper=False, description="SWUDI with a per-layer adaptive rank (ASWUDI); arXiv:2606.07289"),
})
# fmt: on

__all__ = ["METHODS", "MergeContext", "MethodSpec", "scale_of"]
