"""Model families: one module per family, each one frozen :class:`Family`, and the table of them.

The merge-policy presets (:mod:`mergelab.engine.policy`), the processor loader (:mod:`mergelab.hf`), the prompt
builder (:mod:`mergelab.evaluators.runner`) and the lm-eval adapter (:mod:`mergelab.evaluators.lmeval`) read their
per-family facts from here. Adding a family is one module beside these and one line in :data:`FAMILIES`::

    # mergelab/families/pixtral.py
    PIXTRAL = Family(name="pixtral", model_types=("pixtral",), modules=(...), kept_at_base=("vision_tower",),
                     lmeval_model="hf-multimodal")

This package is pure data: it imports nothing of the engine, the evaluators or the platform.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from mergelab.families.base import LMEVAL_MODELS, ChatFacts, Family, Prefixes, ProcessorFacts
from mergelab.families.idefics2 import IDEFICS2
from mergelab.families.internvl2_5 import INTERNVL2_5
from mergelab.families.llama import LLAMA
from mergelab.families.llava import LLAVA
from mergelab.families.omni_thinker import OMNI_THINKER
from mergelab.families.qwen2_5_vl import QWEN2_5_VL
from mergelab.families.qwen2_vl import QWEN2_VL
from mergelab.families.qwen3_vl import QWEN3_VL
from mergelab.families.smolvlm import SMOLVLM

__all__ = [
    "FAMILIES",
    "LMEVAL_MODELS",
    "ChatFacts",
    "Family",
    "Prefixes",
    "ProcessorFacts",
    "end_of_turn_tokens",
    "family_for_config",
    "family_for_model_type",
    "family_table",
]


def family_table(*families: Family) -> Mapping[str, Family]:
    """A read-only ``name -> Family`` table, in the given order.

    Raises:
        ValueError: two families share a name or a model type.
    """
    table: dict[str, Family] = {}
    owner: dict[str, str] = {}
    for f in families:
        if f.name in table:
            raise ValueError(f"family {f.name!r} is listed twice")
        for mt in f.model_types:
            if mt in owner:
                raise ValueError(f"model_type {mt!r} is claimed by families {owner[mt]!r} and {f.name!r}")
            owner[mt] = f.name
        table[f.name] = f
    return MappingProxyType(table)


FAMILIES: Mapping[str, Family] = family_table(
    QWEN2_VL,
    QWEN2_5_VL,
    QWEN3_VL,
    INTERNVL2_5,
    LLAVA,
    LLAMA,
    SMOLVLM,
    IDEFICS2,
    OMNI_THINKER,
)
"""Every known family by name; a family's position orders the architecture-name lookup."""


def family_for_model_type(model_type: str, families: Iterable[Family] | None = None) -> Family | None:
    """The family claiming ``model_type`` (a ``config.json`` ``model_type``), or None."""
    for f in FAMILIES.values() if families is None else families:
        if model_type in f.model_types:
            return f
    return None


def family_for_config(config: Mapping[str, Any], families: Iterable[Family] | None = None) -> Family | None:
    """The family of a Hugging Face ``config.json``: by ``model_type`` first, then by ``architectures``.

    For each architecture name in turn, every family's :attr:`Family.architecture_keys` are tried (in table
    order), then every family's :attr:`Family.architecture_suffixes`.

    Args:
        config: The parsed ``config.json``.
        families: The families to choose among (default: all of :data:`FAMILIES`).

    Returns:
        The family, or None when none matches.
    """
    pool = tuple(FAMILIES.values() if families is None else families)
    found = family_for_model_type(str(config.get("model_type", "")), pool)
    if found is not None:
        return found
    for arch in config.get("architectures") or []:
        for matches in (Family.matches_architecture_key, Family.matches_architecture_suffix):
            for f in pool:
                if matches(f, str(arch)):
                    return f
    return None


def end_of_turn_tokens(families: Iterable[Family] | None = None) -> tuple[str, ...]:
    """Every family's end-of-turn tokens, once each, in table order."""
    seen: dict[str, None] = {}
    for f in FAMILIES.values() if families is None else families:
        seen.update(dict.fromkeys(f.chat.end_of_turn))
    return tuple(seen)
