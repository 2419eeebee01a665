"""mergelab: merge fine-tuned (multimodal) LLM experts into one model, track it, tune it, promote it.

Subpackages:
    mergelab.engine      the MergeRecipe and the streaming merge engine: plan, tensor stream, merge loop, writer,
                         report, checkpoint and adapter I/O
    mergelab.methods     pure tensor merging algorithms (OptMerge and baselines) and their table, METHODS
    mergelab.families    one description per model family (naming schemes, policy presets, processor facts)
    mergelab.evaluators  metrics, task table, generation runner, lm-eval adapter
    mergelab.bench       offline benchmark: procedural tasks, tiny real VLMs, expert zoo, omni (modality) merging
    mergelab.platform    MLflow tracking, Optuna campaigns, model registry, CLI (the only place importing mlflow/optuna)
"""

from mergelab.bench.omni.hook import install as _install_omni

__version__ = "0.1.0"

_install_omni()  # the omni classes register with transformers' Auto classes on their first use (cheap until then)
