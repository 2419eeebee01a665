"""Qwen3-VL (Qwen team, 2025): a ViT with a ``merger`` and DeepStack mergers in front of a Qwen3 LM.

As in Qwen2-VL's paper scripts, the whole vision tower stays at the base: its blocks, the ``merger`` projector and the
``deepstack_merger_list`` that feeds visual features into the first LM layers. Qwen3-VL checkpoints are saved with
transformers 5's names on disk as in memory (``model.visual.*``, ``model.language_model.*``, ``lm_head``);
``visual.*`` covers exports in the 4.x style of Qwen2-VL. The chat format is Qwen2-VL's without the default system
turn; the processor is rebuilt from the PIL image processor (its video part needs torchvision), and the dense and
MoE variants (``Qwen3VLMoeForConditionalGeneration``) share the layout.
"""

from __future__ import annotations

from mergelab.families.base import ChatFacts, Family, Prefixes, ProcessorFacts
from mergelab.families.qwen2_vl import QWEN_IMAGE

QWEN3_VL = Family(
    name="qwen3_vl",
    model_types=("qwen3_vl", "qwen3_vl_moe"),
    architecture_keys=("qwen3vl", "qwen3_vl"),
    modules=(
        Prefixes("vision_tower", disk=("visual.",), memory=("model.visual.",)),
        Prefixes("language_model", disk=("model.language_model.",), memory=("model.language_model.",)),
    ),
    kept_at_base=("vision_tower",),
    processor=ProcessorFacts(
        image_processor="transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil",
        processor_class="Qwen3VLProcessor",
    ),
    chat=ChatFacts(
        template="<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n",
        image_placeholder=QWEN_IMAGE,
        end_of_turn=("<|im_end|>", "<|endoftext|>"),
    ),
    lmeval_model="hf-multimodal",
    lmeval_image_string=QWEN_IMAGE,
)
