"""The shape of a model family's description: what the merge policy, the loader and the evaluators need to know.

A :class:`Family` is frozen data plus tiny helpers; it imports nothing of mergelab, so the engine, the
evaluators and :mod:`mergelab.hf` can all read it. Every fact that used to be spread over the policy presets, the
processor loader, the prompt builder and the lm-eval adapter is one field here:

* **Naming schemes**: transformers 5 renames sub-models in memory (``model.visual.*``,
  ``model.language_model.*``) while checkpoints saved by 4.x (and the original repositories) keep the legacy
  names on disk (``visual.*``, ``model.layers.*``). :class:`Prefixes` lists one sub-model's prefixes under both,
  so a policy pattern built from it matches a checkpoint saved by either version.
* **Policy preset**: the sub-models kept at the base (by role) and the tensors always averaged, tried first.
* **Processor**: the PIL image processor and processor class used to rebuild a processor whose video part needs
  torchvision, and whether images are passed as one list per prompt.
* **Chat**: the fallback template (used only when neither the processor nor its tokenizer has one), its image
  placeholder, and the end-of-turn tokens generation stops at.
* **lm-eval**: the lm-eval model type (``hf`` or ``hf-multimodal``) and the image string of its prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LMEVAL_MODELS = ("hf", "hf-multimodal")
"""lm-eval model types: ``hf`` (``HFLM``, text) and ``hf-multimodal`` (``HFMultimodalLM``, generate-only)."""


@dataclass(frozen=True)
class Prefixes:
    """One sub-model's tensor-name prefixes under each naming scheme.

    Attributes:
        role: What the sub-model is (``vision_tower``, ``projector``, ``language_model`` ...); policy presets
            name sub-models by role.
        disk: Prefixes in checkpoints on disk (transformers 4.x names and the original repositories'), in order.
        memory: Prefixes of the same tensors in a transformers 5.x model's state dict.
    """

    role: str
    disk: tuple[str, ...]
    memory: tuple[str, ...] = ()

    def patterns(self) -> tuple[str, ...]:
        """Anchored regexes (for ``re.match``) of every tensor under these prefixes, disk first then memory."""
        return tuple(re.escape(p) + ".*" for p in (*self.disk, *self.memory))


@dataclass(frozen=True)
class ProcessorFacts:
    """How a family's processor is built and fed.

    Attributes:
        image_processor: Dotted path of the PIL image processor to rebuild the processor with when its video
            processor needs torchvision (transformers 5); None: ``AutoProcessor`` loads it as usual.
        processor_class: The ``transformers`` processor class rebuilt around that image processor.
        nested_images: The processor takes one list of images per prompt (Idefics / SmolVLM), not one image.
    """

    image_processor: str | None = None
    processor_class: str | None = None
    nested_images: bool = False

    def __post_init__(self) -> None:
        if (self.image_processor is None) != (self.processor_class is None):
            raise ValueError("ProcessorFacts: image_processor and processor_class are given together or not at all")


@dataclass(frozen=True)
class ChatFacts:
    """A family's chat format, for prompts of processors that carry no chat template.

    Attributes:
        template: One user turn and the assistant's opening, with ``{image}`` and ``{text}`` fields; None: the
            prompt is the image placeholder, the question and a newline.
        image_placeholder: The text standing for one image in ``template``; None: the processor's
            ``image_token`` (else ``<image>``).
        end_of_turn: Tokens that end the assistant's turn; generation stops at those the vocabulary holds.
    """

    template: str | None = None
    image_placeholder: str | None = None
    end_of_turn: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.template is not None and ("{text}" not in self.template or "{image}" not in self.template):
            raise ValueError("ChatFacts.template needs both an {image} and a {text} field")


@dataclass(frozen=True)
class Family:
    """Everything mergelab knows about one model family.

    Attributes:
        name: The family's name, also the name of its merge-policy preset (``qwen2_vl``).
        model_types: ``config.json`` ``model_type`` values of this family (each in one family only).
        architecture_keys: Lower-case substrings of a ``config.json`` architecture name (compared with and
            without underscores) that identify the family when the model type does not.
        architecture_suffixes: Lower-case endings of an architecture name that identify the family, tried after
            every family's keys (``forcausallm``: any causal text LM).
        modules: The sub-models and their names on disk and in memory.
        kept_at_base: Roles of the sub-models the policy preset keeps at the base model's values.
        averaged: Anchored regexes of tensors the preset always averages, whatever the method; tried first.
        has_preset: Whether the family has a merge-policy preset (families known only to the loader and the
            evaluators have none).
        processor: The processor facts.
        chat: The chat-format facts.
        lmeval_model: The lm-eval model type that runs the family (``hf`` or ``hf-multimodal``).
        lmeval_image_string: The image string of lm-eval prompts; None: lm-eval's default.
    """

    name: str
    model_types: tuple[str, ...]
    architecture_keys: tuple[str, ...] = ()
    architecture_suffixes: tuple[str, ...] = ()
    modules: tuple[Prefixes, ...] = ()
    kept_at_base: tuple[str, ...] = ()
    averaged: tuple[str, ...] = ()
    has_preset: bool = True
    processor: ProcessorFacts = field(default_factory=ProcessorFacts)
    chat: ChatFacts = field(default_factory=ChatFacts)
    lmeval_model: str = "hf"
    lmeval_image_string: str | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"family name {self.name!r}: must be an identifier")
        if not self.model_types:
            raise ValueError(f"family {self.name!r}: no model_types")
        if self.lmeval_model not in LMEVAL_MODELS:
            raise ValueError(f"family {self.name!r}: lmeval_model must be one of {LMEVAL_MODELS}")
        roles = [m.role for m in self.modules]
        unknown = [r for r in self.kept_at_base if r not in roles]
        if unknown:
            raise ValueError(f"family {self.name!r}: kept_at_base names unknown roles {unknown}; modules: {roles}")
        for p in self.averaged:
            re.compile(p)

    def policy_rules(self) -> tuple[tuple[str, str], ...]:
        """The preset's family-specific rules as ``(pattern, action)``: the averaged tensors, then the sub-models
        kept at the base (in :attr:`modules` order, each under its disk then its memory names)."""
        rules = [(p, "average") for p in self.averaged]
        rules += [(p, "base") for m in self.modules if m.role in self.kept_at_base for p in m.patterns()]
        return tuple(rules)

    def matches_architecture_key(self, architecture: str) -> bool:
        """Whether one of :attr:`architecture_keys` occurs in ``architecture`` (lower-cased, with or without
        underscores)."""
        a = architecture.lower()
        return any(k in a.replace("_", "") or k in a for k in self.architecture_keys)

    def matches_architecture_suffix(self, architecture: str) -> bool:
        """Whether ``architecture`` (lower-cased) ends with one of :attr:`architecture_suffixes`."""
        return architecture.lower().endswith(self.architecture_suffixes) if self.architecture_suffixes else False
