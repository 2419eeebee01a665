"""Qwen2-VL (Wang et al. 2024, arXiv:2409.12191): a ViT with a ``merger`` projector in front of a Qwen2 LM.

The whole vision tower, its ``merger`` included, stays at the base in the paper's merge scripts. On disk
(transformers 4.x) the tower is ``visual.*`` and the LM ``model.layers.*``; in memory (5.x) they are
``model.visual.*`` and ``model.language_model.*``. Its processor's video part needs torchvision, so the processor
is rebuilt from the PIL image processor.
"""

from __future__ import annotations

from mergelab.families.base import ChatFacts, Family, Prefixes, ProcessorFacts

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
"""The text standing for one image in a Qwen2-VL prompt."""

QWEN2_VL = Family(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    architecture_keys=("qwen2vl",),
    modules=(
        Prefixes("vision_tower", disk=("visual.",), memory=("model.visual.",)),
        Prefixes("language_model", disk=("model.",), memory=("model.language_model.",)),
    ),
    kept_at_base=("vision_tower",),
    processor=ProcessorFacts(
        image_processor="transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil",
        processor_class="Qwen2VLProcessor",
    ),
    chat=ChatFacts(
        # Qwen2-VL-Instruct's chat format, with its default system turn.
        template="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{image}{text}"
        "<|im_end|>\n<|im_start|>assistant\n",
        image_placeholder=QWEN_IMAGE,
        end_of_turn=("<|im_end|>", "<|endoftext|>"),
    ),
    lmeval_model="hf-multimodal",
    lmeval_image_string=QWEN_IMAGE,
)
