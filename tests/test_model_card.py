"""Merged outputs carry a model card (README.md) and keep a remote-code checkpoint's ``*.py`` files, whose loading
stays behind ``trust_remote_code``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from mergelab.engine import MergeRecipe, run_merge
from mergelab.engine.writer import write_model_card
from tests.conftest import save_model_family

CONFIGURATION = '''from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tinycustom"
'''
MODELING = '''from transformers import LlamaForCausalLM

from .configuration_tiny import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''
AUTO_MAP = {"AutoConfig": "configuration_tiny.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"}


@pytest.fixture(scope="module")
def remote_code_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny Llama saved as an InternVL-style remote-code checkpoint (custom model_type, auto_map, *.py)."""
    base, experts = save_model_family(tmp_path_factory.mktemp("rc"), "llama", n_experts=2)
    for d in (base, *experts):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type="tinycustom", auto_map=AUTO_MAP, architectures=["TinyCustomForCausalLM"])
        (d / "config.json").write_text(json.dumps(cfg))
    (base / "configuration_tiny.py").write_text(CONFIGURATION)
    (base / "modeling_tiny.py").write_text(MODELING)
    (base / "README.md").write_text("# the base's own card\n")
    return base, experts


def test_remote_code_kept_and_card_written(remote_code_family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = remote_code_family
    recipe = MergeRecipe.build(base=base, experts=[{"path": experts[0], "coefficient": 0.5}, experts[1]],
                               method="task_arithmetic", params={"lam": 0.7}, device="cpu")
    digest = recipe.digest  # computed before the merge: the card names it
    out = tmp_path / "merged"
    run_merge(recipe, out)
    assert {"configuration_tiny.py", "modeling_tiny.py"} <= {f.name for f in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "the base's own card" not in card
    for text in ("`task_arithmetic`", str(base), digest, experts[0].name, "| 0.5 |", "| lam | 0.7 |",
                 "trust_remote_code=True", "modeling_tiny.py", "method: task_arithmetic"):
        assert text in card, text

    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM"


def test_card_scores(remote_code_family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = remote_code_family
    recipe = MergeRecipe.build(base=base, experts=experts, method="ties", params={"density": 0.5})
    write_model_card(tmp_path, recipe, digest="abc123", scores={"vqa": 71.234, "ocr": 40.0})
    card = (tmp_path / "README.md").read_text()
    assert "## Evaluation" in card and "| vqa | 71.23 |" in card and "`abc123`" in card
    assert "| density | 0.5 |" in card and "trust_remote_code" not in card  # no config.json here
