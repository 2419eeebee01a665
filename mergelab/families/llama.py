"""Llama / Qwen2-style text LMs: every decoder-only causal LM mergelab merges without a vision part.

The preset is the paper's list without a vision tower (only the rules every preset shares). Any architecture
ending in ``ForCausalLM`` that no other family claims falls here. Llama-3 and Phi-3 end turns with their own
tokens; Qwen2's are Qwen2-VL's.
"""

from __future__ import annotations

from mergelab.families.base import ChatFacts, Family, Prefixes

LLAMA = Family(
    name="llama",
    model_types=("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "internlm2", "qwen2_moe", "olmo2"),
    architecture_suffixes=("forcausallm",),
    modules=(Prefixes("language_model", disk=("model.",), memory=("model.",)),),
    chat=ChatFacts(end_of_turn=("<|eot_id|>", "<|end|>")),
)
