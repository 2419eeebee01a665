"""SmolVLM / Idefics3 (arXiv:2504.05299): a SigLIP tower, a pixel-shuffle connector and a Llama-style LM.

No merge-policy preset (give explicit rules). Its processor's video part needs torchvision (rebuilt from the PIL
image processor), and it takes one list of images per prompt.
"""

from __future__ import annotations

from mergelab.families.base import ChatFacts, Family, ProcessorFacts

SMOLVLM = Family(
    name="smolvlm",
    model_types=("smolvlm", "idefics3"),
    has_preset=False,
    processor=ProcessorFacts(
        image_processor="transformers.models.smolvlm.image_processing_pil_smolvlm.SmolVLMImageProcessorPil",
        processor_class="SmolVLMProcessor",
        nested_images=True,
    ),
    chat=ChatFacts(
        template="<|im_start|>User:{image}{text}<end_of_utterance>\nAssistant:",
        image_placeholder="<image>",
        end_of_turn=("<end_of_utterance>",),
    ),
    lmeval_model="hf-multimodal",
)
