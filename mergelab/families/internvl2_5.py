"""InternVL2.5 (arXiv:2412.05271): InternViT, an MLP projector (``mlp1``) and an InternLM2 / Qwen2 LM.

InternViT stays at the base; the projector is merged (its Linear weights by the method, its LayerNorm averaged:
``mlp1.0.weight`` is not matched by the LM's ``.*norm.*`` rule under the original names, so the HF-native
``multi_modal_projector.layer_norm.*`` is explicitly averaged to keep the paper script's behaviour). The original
repository names the tower ``vision_model.*``, transformers' native port ``vision_tower.*`` on disk and
``model.vision_tower.*`` in memory.
"""

from __future__ import annotations

from mergelab.families.base import Family, Prefixes

INTERNVL2_5 = Family(
    name="internvl2_5",
    model_types=("internvl", "internvl_chat"),
    architecture_keys=("internvl",),
    modules=(
        Prefixes("vision_tower", disk=("vision_model.", "vision_tower."), memory=("model.vision_tower.",)),
        Prefixes("projector", disk=("mlp1.", "multi_modal_projector."), memory=("model.multi_modal_projector.",)),
    ),
    kept_at_base=("vision_tower",),
    averaged=(r"(model\.)?multi_modal_projector\.layer_norm\..*", r"mlp1\.0\..*"),
    lmeval_model="hf-multimodal",
)
