"""The streaming merge engine: base + N experts on disk -> merged checkpoint on disk, one tensor at a time.

Modules, in the order a merge flows through them:

* :mod:`~mergelab.engine.recipe`   -- the validated, hashed :class:`MergeRecipe` every layer receives
* :mod:`~mergelab.engine.io`       -- checkpoint reading (safetensors headers, lazy tensors, naming schemes)
* :mod:`~mergelab.engine.adapters` -- PEFT LoRA adapters as task vectors ``scaling * B @ A``
* :mod:`~mergelab.engine.factors`, :mod:`~mergelab.engine.core_space` -- the other LoRA modes (``lora_merge``):
  raw factors merged as the official modality script does, or cores in the span of the factors (arXiv 2509.17786)
* :mod:`~mergelab.engine.policy`   -- which tensors are merged, averaged or kept (presets per model family)
* :mod:`~mergelab.engine.plan`     -- experts, key/shape checks, one planned action per tensor
* :mod:`~mergelab.engine.stream`   -- background read-ahead of task vectors, bounded by bytes
* :mod:`~mergelab.engine.loop`     -- the merge loop: method per tensor, ``theta_0 + lam * tau_m`` to the writer
* :mod:`~mergelab.engine.writer`   -- bounded output shards written as tensors are produced
* :mod:`~mergelab.engine.report`   -- the :class:`MergeReport` handed to the platform
* :mod:`~mergelab.engine.adapter_out` -- ``output: adapter``: the merge of LoRA experts as one PEFT adapter

The engine imports :mod:`mergelab.methods` (pure tensor algorithms); methods import nothing of the engine, and the
engine never imports mlflow or optuna.
"""

from __future__ import annotations

from mergelab.engine.io import CheckpointReader, MergeError
from mergelab.engine.loop import PROVENANCE_FILE, merge, parse_dtype, resolve_device, run_merge, tensor_seed
from mergelab.engine.policy import MergePolicy, resolve_policy
from mergelab.engine.recipe import ExpertSpec, MergeRecipe
from mergelab.engine.report import MergeReport, TensorRecord

__all__ = [
    "PROVENANCE_FILE",
    "CheckpointReader",
    "ExpertSpec",
    "MergeError",
    "MergePolicy",
    "MergeRecipe",
    "MergeReport",
    "TensorRecord",
    "merge",
    "parse_dtype",
    "resolve_device",
    "resolve_policy",
    "run_merge",
    "tensor_seed",
]
