"""Omni thinkers (Qwen2.5-Omni's thinker and mergelab's three-tower subclass): towers and connectors owned.

In modality merging (OptMerge, section 5.1) the experts share one LLM and each brings its own encoder and connector
(image, audio, video). The preset takes every tower, connector included, bit for bit from the one expert that
changes it (policy action ``owner``: a LoRA expert's ``modules_to_save`` connector, a full expert's trained
connector; the base's value where no expert changes a tower; an error when two do), then the LLM rules every preset
shares. Names: the stock thinker on disk (``thinker.visual.*`` in a whole Qwen2.5-Omni checkpoint, ``visual.*`` and
``audio_tower.*`` in a thinker saved alone) and in memory (``model.visual.*``, ``model.audio_tower.*``); mergelab's
subclass ``mergelab_omni_thinker`` adds the video tower ``model.video_visual.*`` and keeps its in-memory names on
disk. The image tower's role is ``image_tower``, not ``vision_tower``: the paper's capability-merging scripts keep a
``vision_tower`` at the base, modality merging takes it from its owner.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergelab.families.base import Family, Prefixes


@dataclass(frozen=True)
class OwnedTowersFamily(Family):
    """A :class:`Family` whose preset gives some sub-models the policy action ``owner``.

    Attributes:
        owned: Roles of the sub-models taken from the one expert that changes them (tried before the other rules).
    """

    owned: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        roles = [m.role for m in self.modules]
        unknown = [r for r in self.owned if r not in roles]
        if unknown:
            raise ValueError(f"family {self.name!r}: owned names unknown roles {unknown}; modules: {roles}")

    def policy_rules(self) -> tuple[tuple[str, str], ...]:
        """The owned sub-models' rules (disk names, then memory names), then :meth:`Family.policy_rules`."""
        owned = dict.fromkeys(p for m in self.modules if m.role in self.owned for p in m.patterns())
        return (*((p, "owner") for p in owned), *super().policy_rules())


OMNI_THINKER = OwnedTowersFamily(
    name="omni_thinker",
    model_types=("mergelab_omni_thinker", "qwen2_5_omni_thinker"),
    architecture_keys=("omnithinker",),
    modules=(
        Prefixes("image_tower", disk=("thinker.visual.", "visual."), memory=("model.visual.",)),
        Prefixes("video_tower", disk=("model.video_visual.",), memory=("model.video_visual.",)),
        Prefixes("audio_tower", disk=("thinker.audio_tower.", "audio_tower."), memory=("model.audio_tower.",)),
        Prefixes("language_model", disk=("thinker.model.", "model."), memory=("model.language_model.",)),
    ),
    owned=("image_tower", "video_tower", "audio_tower"),
    lmeval_model="hf-multimodal",
)
