"""Model families: every family in the table is complete, the facts keep their values, and a new family (one module
plus one table line) is picked up by the policy presets, the loader's lookup, the prompt builder and lm-eval."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest

import mergelab.families as families
from mergelab.engine import policy
from mergelab.evaluators import lmeval, runner
from mergelab.families import (
    FAMILIES,
    LMEVAL_MODELS,
    ChatFacts,
    Family,
    Prefixes,
    ProcessorFacts,
    end_of_turn_tokens,
    family_for_config,
    family_for_model_type,
    family_table,
)

PKG = Path(families.__file__).parent

# A worked example of a new family: what its module would hold.
PIXTRAL = Family(
    name="pixtral",
    model_types=("pixtral",),
    architecture_keys=("pixtral",),
    modules=(
        Prefixes("vision_tower", disk=("vision_encoder.",), memory=("model.vision_tower.",)),
        Prefixes("language_model", disk=("language_model.",), memory=("model.language_model.",)),
    ),
    kept_at_base=("vision_tower",),
    chat=ChatFacts(template="[INST]{image}{text}[/INST]", image_placeholder="[IMG]", end_of_turn=("</s>",)),
    lmeval_model="hf-multimodal",
    lmeval_image_string="[IMG]",
)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_is_complete(name: str) -> None:
    f = FAMILIES[name]
    assert f.name == name and f.model_types
    # one module per family, named after it, holding the description
    module = importlib.import_module(f"mergelab.families.{name}")
    assert f in vars(module).values()
    assert module.__doc__ and module.__doc__.strip()
    assert f.lmeval_model in LMEVAL_MODELS
    roles = {m.role for m in f.modules}
    if f.has_preset:
        assert f.modules, f"{name}: a preset family must name its sub-models (naming schemes)"
        assert f.architecture_keys or f.architecture_suffixes, f"{name}: 'auto' could not find it by architecture"
        for m in f.modules:
            assert m.disk and m.memory, f"{name}/{m.role}: both naming schemes are needed"
    if "vision_tower" in roles:
        assert f.lmeval_model == "hf-multimodal"
        assert "vision_tower" in f.kept_at_base  # every paper script keeps the vision encoder at the base
    if f.processor.image_processor is not None:  # the rebuilt processor's classes exist
        import transformers

        mod, _, cls = f.processor.image_processor.rpartition(".")
        assert hasattr(importlib.import_module(mod), cls)
        assert hasattr(transformers, f.processor.processor_class or "")
    if f.chat.template is not None:
        assert f.chat.template.format(image="<I>", text="q?").count("q?") == 1


def test_model_types_belong_to_one_family_each_and_the_table_is_in_the_package() -> None:
    owners = [mt for f in FAMILIES.values() for mt in f.model_types]
    assert len(owners) == len(set(owners))
    modules = {p.stem for p in PKG.glob("*.py")} - {"__init__", "base"}
    assert modules == set(FAMILIES), "one module per family, one table line per module"
    with pytest.raises(ValueError, match="claimed by families"):
        family_table(*FAMILIES.values(), Family(name="dup", model_types=("llava",)))
    with pytest.raises(ValueError, match="listed twice"):
        family_table(FAMILIES["llava"], FAMILIES["llava"])


def test_families_are_pure_data() -> None:
    """Engine, evaluators and the loader import this package, so it imports none of them (nor torch)."""
    for path in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                assert n.split(".")[0] in {"__future__", "re", "dataclasses", "collections", "types", "typing",
                                           "mergelab"}, f"{path.name}: imports {n}"
                assert not n.startswith("mergelab.") or n.startswith("mergelab.families"), f"{path.name}: {n}"


def test_policy_rules_keep_the_paper_presets() -> None:
    """Rule order is part of a policy's identity (logged with every merge): pinned as before the family table."""
    assert FAMILIES["qwen2_vl"].policy_rules() == ((r"visual\..*", "base"), (r"model\.visual\..*", "base"))
    assert FAMILIES["qwen2_5_vl"].policy_rules() == FAMILIES["qwen2_vl"].policy_rules()
    assert FAMILIES["internvl2_5"].policy_rules() == (
        (r"(model\.)?multi_modal_projector\.layer_norm\..*", "average"),
        (r"mlp1\.0\..*", "average"),
        (r"vision_model\..*", "base"),
        (r"vision_tower\..*", "base"),
        (r"model\.vision_tower\..*", "base"),
    )
    assert FAMILIES["llava"].policy_rules() == (
        (r"vision_tower\..*", "base"),
        (r"model\.vision_tower\..*", "base"),
        (r"multi_modal_projector\..*", "base"),
        (r"model\.multi_modal_projector\..*", "base"),
    )
    assert FAMILIES["llama"].policy_rules() == ()
    assert list(policy.PRESETS) == ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl2_5", "llava", "llama", "omni_thinker"]
    shared = [r.pattern for r in policy.PRESETS["llama"].rules]
    assert shared == [r".*embed_tokens.*", r".*lm_head.*", r".*norm.*", r".*bias.*"]
    for name, preset in policy.PRESETS.items():
        assert [(r.pattern, r.action) for r in preset.rules] == [*FAMILIES[name].policy_rules(),
                                                                  *((p, "base") for p in shared)]


def test_lookups() -> None:
    assert family_for_model_type("qwen2") is FAMILIES["llama"]
    assert family_for_model_type("idefics3") is FAMILIES["smolvlm"]
    assert family_for_model_type("bert") is None
    assert family_for_config({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}).name == "qwen2_5_vl"
    assert family_for_config({"architectures": ["Qwen2VLForConditionalGeneration"]}).name == "qwen2_vl"
    # every family's keys are tried before any suffix: a LLaVA causal LM is LLaVA, not a text LM
    assert family_for_config({"architectures": ["LlavaForCausalLM"]}).name == "llava"
    assert family_for_config({"architectures": ["MistralForCausalLM"]}).name == "llama"
    assert family_for_config({"model_type": "bert", "architectures": ["BertModel"]}) is None
    # presets choose among preset families only: SmolVLM has none
    with pytest.raises(ValueError, match="no preset for model_type 'smolvlm'"):
        policy.preset_for_config({"model_type": "smolvlm"})
    assert end_of_turn_tokens() == ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_utterance>")
    assert runner.END_OF_TURN_TOKENS == end_of_turn_tokens()


def test_a_new_family_is_picked_up_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    table = family_table(*FAMILIES.values(), PIXTRAL)
    presets = policy.presets_from(table.values())
    assert list(presets) == [*policy.PRESETS, "pixtral"]
    px = presets["pixtral"]
    assert px.action("vision_encoder.blocks.0.w") == "base" and px.action("model.vision_tower.x") == "base"
    assert px.action("model.language_model.layers.0.mlp.up_proj.weight") == "merge"
    assert px.action("model.language_model.norm.weight") == "base"  # the shared LLM rules follow
    assert end_of_turn_tokens(table.values())[-1] == "</s>"

    monkeypatch.setattr(families, "FAMILIES", table)
    assert family_for_config({"architectures": ["PixtralForConditionalGeneration"]}) is PIXTRAL

    class NoTemplate:
        chat_template = None
        image_processor = object()
        tokenizer = SimpleNamespace(chat_template=None)

    assert runner.build_prompt(NoTemplate(), "q", with_image=True, model_type="pixtral") == "[INST][IMG]q[/INST]"
    model = SimpleNamespace(config=SimpleNamespace(model_type="pixtral"))
    assert lmeval.lmeval_model_type(model, NoTemplate()) == "hf-multimodal"
    assert lmeval.lmeval_model_type(model, SimpleNamespace()) == "hf"  # a bare tokenizer is always a text LM


def test_descriptions_validate_themselves() -> None:
    with pytest.raises(ValueError, match="unknown roles"):
        Family(name="x", model_types=("x",), kept_at_base=("vision_tower",))
    with pytest.raises(ValueError, match="lmeval_model"):
        Family(name="x", model_types=("x",), lmeval_model="vllm")
    with pytest.raises(ValueError, match="no model_types"):
        Family(name="x", model_types=())
    with pytest.raises(ValueError, match=r"\{image\}"):
        ChatFacts(template="{text}")
    with pytest.raises(ValueError, match="together"):
        ProcessorFacts(image_processor="a.B")
    assert Prefixes("v", disk=("visual.",), memory=("model.visual.",)).patterns() == (
        r"visual\..*", r"model\.visual\..*")
