"""Online composition of the omni experts (ModelCompose's NaiveMC and DAMC, :mod:`mergelab.bench.omni.compose`):
a hand-computed layer, then the composed thinker on the quick zoo against its experts and the weight-average merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoProcessor

from mergelab.bench.omni import data
from mergelab.bench.omni.build import OmniPlan, build, seed_dir
from mergelab.bench.omni.compose import (
    DeltaHook,
    Routing,
    compose,
    compose_seed,
    llm_deltas,
    parse_modes,
    read_weights,
)
from mergelab.bench.omni.data import render
from mergelab.bench.omni.table import _load, merge_experts, run
from mergelab.bench.omni.train import TOWERS, answers, batch
from mergelab.hf import quiet_transformers

torch.set_num_threads(1)


def test_a_layer_averages_the_experts_outputs_or_routes_each_token_by_hand() -> None:
    """One linear layer ``W0 = 0``, ``b0 = 0``, input ``x = 1`` (2 features), two experts: expert 0's delta maps x to
    ``(2, 0)``, expert 1's (bias delta included) to ``(0, 4) + (0, 2)``. NaiveMC: every token gets the mean
    ``(1, 3)``; DAMC: a token owned by expert i gets its delta alone, the others (-1) the mean."""
    layer = nn.Linear(2, 2)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    dw = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [2.0, 2.0]]])
    db = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    x = torch.ones(1, 3, 2)
    routing = Routing()
    h = layer.register_forward_hook(DeltaHook(dw, db, torch.tensor([0.5, 0.5]), "naivemc", routing))
    routing.owner = torch.tensor([[0, -1, 1]])  # NaiveMC ignores the routing
    torch.testing.assert_close(layer(x), torch.tensor([[[1.0, 3.0]] * 3]))
    h.remove()
    layer.register_forward_hook(DeltaHook(dw, db, torch.tensor([0.5, 0.5]), "damc", routing))
    torch.testing.assert_close(layer(x), torch.tensor([[[2.0, 0.0], [1.0, 3.0], [0.0, 6.0]]]))
    routing.owner = None  # no input_ids (e.g. inputs_embeds): every token gets the mean
    torch.testing.assert_close(layer(x), torch.tensor([[[1.0, 3.0]] * 3]))
    assert parse_modes("naivemc,damc") == ("naivemc", "damc") and parse_modes("none") == parse_modes("") == ()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    zoo = tmp_path_factory.mktemp("omni_zoo")
    build(zoo, 0, OmniPlan.quick(), device="cpu", log=lambda _: None)
    return seed_dir(zoo, 0)


@pytest.fixture(scope="module")
def inputs(root: Path) -> dict[str, torch.Tensor]:
    """Cross-modal val items with all three media, as the table feeds a merge."""
    processor = AutoProcessor.from_pretrained(root / "base")
    items = data.cross_samples("music_avqa", "val", 3, 0)
    return batch(processor, items, [render(s) for s in items], with_answers=False)


@torch.no_grad()
def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


@pytest.mark.parametrize("mode", ["naivemc", "damc"])
def test_one_composed_expert_is_that_expert(root: Path, inputs: dict[str, torch.Tensor], mode: str) -> None:
    """Composed alone, an expert's delta is the whole mean and owns its tokens: the expert's own logits."""
    with quiet_transformers():
        composed = compose(root / "base", {"audio": root / "experts" / "lora" / "audio"}, mode)
        expert = _load(root / "experts" / "lora" / "audio")
    assert composed.experts == ("audio",) and composed.weights == (1.0,) and composed.layers
    torch.testing.assert_close(_logits(composed.model, inputs), _logits(expert, inputs), atol=1e-5, rtol=1e-5)


def test_naivemc_is_the_weight_average_computed_online_and_damc_routes_media_tokens(
        root: Path, inputs: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """NaiveMC's layer outputs are linear in the deltas: the delta-mode weight-average merge's logits. DAMC differs
    where media tokens are (and downstream of them), equals NaiveMC on a text-only prompt, and generates."""
    with quiet_transformers():
        merge_experts(root, "lora", "weight_average", None, tmp_path / "wa")
        averaged = _load(tmp_path / "wa")
        naive = compose_seed(root, "lora", "naivemc")
        damc = compose_seed(root, "lora", "damc")
    assert naive.stored == 3 * sum(dw[0].numel() + (0 if db is None else db[0].numel())
                                   for dw, db in llm_deltas(naive.model, read_weights(root / "base"),
                                                            [read_weights(root / "experts" / "lora" / m)
                                                             for m in data.MODALITIES]).values())
    torch.testing.assert_close(_logits(naive.model, inputs), _logits(averaged, inputs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(damc.model, inputs), _logits(naive.model, inputs), atol=1e-4)
    cfg = damc.model.config
    media = torch.isin(inputs["input_ids"], torch.tensor([cfg.image_token_id, cfg.audio_token_id, cfg.video_token_id]))
    assert media.any()  # the prompt carried media tokens; the same prompt without them (and no media) is text only
    text = {"input_ids": inputs["input_ids"].masked_fill(media, 0), "attention_mask": inputs["attention_mask"]}
    torch.testing.assert_close(_logits(damc.model, text), _logits(naive.model, text))
    processor = AutoProcessor.from_pretrained(root / "base")
    items = data.cross_samples("avqa", "val", 2, 0)
    assert len(answers(damc.model, processor, items)) == 2
    damc.remove()  # the hooks gone: the base with the owned towers
    with quiet_transformers():
        base = _load(root / "base")
    base.load_state_dict({k: v for k, v in damc.model.state_dict().items() if k.startswith(tuple(TOWERS.values()))},
                         strict=False)
    torch.testing.assert_close(_logits(damc.model, inputs), _logits(base, inputs))


def test_each_tower_comes_from_its_expert_bit_for_bit(root: Path) -> None:
    with quiet_transformers():
        composed = compose_seed(root, "lora", "naivemc")
    state = composed.model.state_dict()
    base = read_weights(root / "base")
    for m, prefix in TOWERS.items():
        owner = read_weights(root / "experts" / "lora" / m)
        names = [k for k in owner if k.startswith(prefix)]
        assert names and all(torch.equal(state[k], owner[k]) for k in names), m
        assert any(not torch.equal(owner[k], base[k]) for k in names), m  # the expert trained its connector
    assert all(torch.equal(state[k], base[k]) for k in base if not k.startswith(tuple(TOWERS.values())))


def test_composition_refuses_what_it_cannot_do(root: Path) -> None:
    """A changed norm (not a linear layer), an unknown mode or modality, wrong weights, an unknown table mode."""
    with quiet_transformers():
        composed = compose_seed(root, "lora", "naivemc", modalities=("image",))
    base = read_weights(root / "base")
    norm = next(k for k in base if k.startswith("model.language_model.") and "norm" in k)
    changed = {**base, norm: base[norm] + 1}
    with pytest.raises(ValueError, match=f"outside linear layers \\({norm}"):
        llm_deltas(composed.model, base, [changed])
    experts = {"image": root / "experts" / "lora" / "image"}
    with pytest.raises(ValueError, match="unknown composition mode 'soup'"):
        compose(root / "base", experts, "soup")
    with pytest.raises(ValueError, match="experts by modality"):
        compose(root / "base", {"text": root / "experts" / "lora" / "image"})
    with pytest.raises(ValueError, match="2 weights for 1 experts"):
        compose(root / "base", experts, weights=(0.5, 0.5))
    with pytest.raises(ValueError, match="unknown composition modes \\['soup'\\]"):
        run(root.parent.parent, quick=True, compose=("soup",))
