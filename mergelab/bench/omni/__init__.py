"""Modality merging on the offline benchmark: a tiny three-tower omni model, image/audio/video tasks, experts.

Modules (import them directly; this package imports nothing so that ``import mergelab`` stays cheap):

* :mod:`~mergelab.bench.omni.classes`: the transformers classes (three-tower Qwen2.5-Omni thinker, processor) and
  their Auto registration; :mod:`~mergelab.bench.omni.hook` registers them on the first use of an Auto class.
* :mod:`~mergelab.bench.omni.modeling`: seeded builders (tokenizer, processor, config, model), tower probes.
* :mod:`~mergelab.bench.omni.data`: procedural tasks, cross-modal sets (MUSIC-AVQA / AVQA style), described items.
* :mod:`~mergelab.bench.omni.metrics`: the cross-modal metrics with a per-question-type breakdown.
"""
