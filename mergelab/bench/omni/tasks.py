"""The omni benchmark's evaluation tasks by name: what the evaluators register, without importing the model code.

The evaluators' task table (:data:`mergelab.evaluators.tasks.TASKS`) is built when :mod:`mergelab.evaluators` is
imported, and that import must stay light (no transformers, no Qwen2.5-Omni modelling code: ``mergelab merge``
imports the evaluators and never generates). So the names live here, as plain data; the definitions themselves
(questions, answer words, generators) stay in :mod:`mergelab.bench.omni.data`, the metrics in
:mod:`mergelab.bench.omni.metrics`, and ``tests/test_omni_platform.py`` checks that these names are exactly theirs.
"""

from __future__ import annotations

from types import MappingProxyType

SINGLE_TASKS = MappingProxyType({
    "image_color": "image",
    "image_shape": "image",
    "audio_pitch": "audio",
    "audio_beeps": "audio",
    "video_motion": "video",
    "video_speed": "video",
})
"""Single-modality task -> its modality (the keys of :data:`mergelab.bench.omni.data.TASKS`, in their order)."""

CROSS_SETS: tuple[str, ...] = ("music_avqa", "avqa")
"""The cross-modal sets (MUSIC-AVQA style, AVQA style): :data:`mergelab.bench.omni.data.CROSS_SETS`."""

CROSS_QTYPES = MappingProxyType({
    "music_avqa": (*SINGLE_TASKS, "composite"),
    "avqa": tuple(SINGLE_TASKS),
})
"""The question types of each cross-modal set (one per single-modality fact; MUSIC-AVQA adds ``composite``)."""

OMNI_TASKS: tuple[str, ...] = (*CROSS_SETS, *SINGLE_TASKS)
"""Every omni evaluation task: the two cross-modal sets, then each modality's own tasks."""

MAX_NEW_TOKENS = 6
"""Generation budget of every omni task (answers are one word or one letter; the table's ``answers`` default)."""

DATA_SEED = 0
"""The seed of the evaluators' omni items (the splits are disjoint by scene, whatever the zoo's seed)."""


def qtypes(task: str) -> tuple[str, ...]:
    """The question types of ``task`` (a single-modality task has one: itself)."""
    return CROSS_QTYPES.get(task, (task,))
