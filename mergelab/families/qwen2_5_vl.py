"""Qwen2.5-VL (arXiv:2502.13923): Qwen2-VL's layout, names, chat format and lm-eval facts, its own processor class."""

from __future__ import annotations

from dataclasses import replace

from mergelab.families.base import ProcessorFacts
from mergelab.families.qwen2_vl import QWEN2_VL

QWEN2_5_VL = replace(
    QWEN2_VL,
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    architecture_keys=("qwen2_5_vl",),
    processor=ProcessorFacts(
        image_processor="transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil",
        processor_class="Qwen2_5_VLProcessor",
    ),
)
