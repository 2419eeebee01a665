"""LLaVA (1.5, NeXT, OneVision; not in the paper's tables): a CLIP tower, an MLP projector and a text LM.

The CLIP tower and the projector stay at the base, as Qwen2-VL's ``merger``. On disk (4.x) they are
``vision_tower.*`` and ``multi_modal_projector.*``; in memory (5.x) ``model.vision_tower.*`` and
``model.multi_modal_projector.*``.
"""

from __future__ import annotations

from mergelab.families.base import ChatFacts, Family, Prefixes

LLAVA = Family(
    name="llava",
    model_types=("llava", "llava_next", "llava_onevision"),
    architecture_keys=("llava",),
    modules=(
        Prefixes("vision_tower", disk=("vision_tower.",), memory=("model.vision_tower.",)),
        Prefixes("projector", disk=("multi_modal_projector.",), memory=("model.multi_modal_projector.",)),
        Prefixes("language_model", disk=("language_model.",), memory=("model.language_model.",)),
    ),
    kept_at_base=("vision_tower", "projector"),
    chat=ChatFacts(template="USER: {image}\n{text} ASSISTANT:", image_placeholder="<image>"),
    lmeval_model="hf-multimodal",
)
