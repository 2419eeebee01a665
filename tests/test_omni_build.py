"""The omni plan's expert-training levers: the plan's dict, per-expert steps, the connector-only alignment stage."""

from __future__ import annotations

import pytest
import torch

from mergelab.bench.omni import data
from mergelab.bench.omni.build import OmniPlan, align_connectors, align_samples
from mergelab.bench.omni.modeling import OmniSize, build_model, build_processor, build_tokenizer
from mergelab.bench.omni.train import train
from mergelab.bench.train import TrainConfig

torch.set_num_threads(1)


def test_the_quick_plan_keeps_its_dict_and_expert_steps_override_one_modality() -> None:
    """Fields added later are left out of the dict at their old defaults, so zoos built before them still match."""
    quick = OmniPlan.quick().to_dict()
    assert not {"lettered", "align_steps", "connector_lr", "expert_steps", "base_align_steps", "base_align_per_task",
                "base_align_lr"} & set(quick)
    assert quick["other_media"] == 0.5
    plan = OmniPlan(expert_steps=(("video", 450),))
    assert plan.to_dict()["expert_steps"] == [["video", 450]]
    assert plan.expert_config("lora", "video", 1).steps == 450
    assert plan.expert_config("lora", "audio", 1).steps == plan.lora.steps
    assert plan.expert_config("lora", "audio", 1).seed == 101


@pytest.fixture(scope="module")
def tiny() -> tuple:
    tok = build_tokenizer(data.corpus(0), 400)
    return tok, build_processor(tok), data.task_samples("image_color", "train", 12, 0, leads=True)


def test_alignment_stage_trains_only_the_connector(tiny) -> None:
    """With ``align_steps`` the LoRA factors get no update during the stage, while the connector trains: here only
    the last of 3 steps updates them, one Adam step of ``lr`` times the cosine factor 0.25, so no LoRA B entry
    moves further. ``connector_lr=0`` freezes the connector instead."""
    tok, proc, samples = tiny
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=0, lora_r=4, lora_alpha=8)
    model = build_model(tok, OmniSize.tiny(), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("model.visual.merger.")}
    res = train(model, proc, samples, cfg, connector="image", device="cpu", align_steps=2)
    state = res.model.state_dict()
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and max(float(v.abs().max()) for v in lora_b) == pytest.approx(0.0025, rel=1e-3)
    moved = [k for k, v in before.items() if not torch.equal(state[k.replace("model.visual.merger.", "base_model.model."
                                                                               "model.visual.merger.modules_to_save."
                                                                               "default.")], v)]
    assert moved
    frozen = train(build_model(tok, OmniSize.tiny(), seed=0), proc, samples, cfg, connector="image", device="cpu",
                   connector_lr=0.0).model.state_dict()
    assert all(torch.equal(frozen[k.replace("model.visual.merger.", "base_model.model.model.visual.merger."
                                            "modules_to_save.default.")], v) for k, v in before.items())
    assert any(float(v.abs().max()) > 0 for k, v in frozen.items() if "lora_B" in k)
    with pytest.raises(ValueError, match="align_steps"):
        train(build_model(tok, OmniSize.tiny(), seed=0), proc, samples, cfg, connector="image", align_steps=3)


def test_base_alignment_trains_the_three_connectors_and_nothing_else(tiny) -> None:
    """The base's connector stage (``base_align_steps``): every connector moves, every other tensor (the LLM, the
    tower bodies) stays bit for bit; its items ask every task with all three media."""
    from dataclasses import replace

    from mergelab.bench.omni.train import CONNECTORS

    tok, proc, _ = tiny
    plan = replace(OmniPlan.quick(), base_align_steps=2, base_align_per_task=4)
    assert plan.to_dict()["base_align_steps"] == 2
    items = align_samples(plan, 0)
    assert len(items) == 4 * len(data.TASKS) and {s.task for s in items} == set(data.TASKS)
    assert all(set(s.scene) == set(data.MODALITIES) for s in items)
    model = build_model(tok, OmniSize.tiny(), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = align_connectors(model, proc, plan, 0, "cpu").model.state_dict()
    prefixes = tuple(m + "." for ms in CONNECTORS.values() for m in ms)
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert changed and all(k.startswith(prefixes) for k in changed)
    assert {p for p in prefixes if any(k.startswith(p) for k in changed)} == set(prefixes)
