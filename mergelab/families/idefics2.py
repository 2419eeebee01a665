"""Idefics2 (arXiv:2405.02246): known to the evaluators only, which pass it one list of images per prompt.

No merge-policy preset and no fallback chat template (its processors ship one).
"""

from __future__ import annotations

from mergelab.families.base import Family, ProcessorFacts

IDEFICS2 = Family(
    name="idefics2",
    model_types=("idefics2",),
    has_preset=False,
    processor=ProcessorFacts(nested_images=True),
    lmeval_model="hf-multimodal",
)
