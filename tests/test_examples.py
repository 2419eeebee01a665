"""The shipped example recipes validate (and point at the shipped zoo when it is there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergelab.platform.merge_config import load_recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("merge-*.yaml")))
def test_merge_examples_validate(name: str) -> None:
    recipe = load_recipe(EXAMPLES / name)
    assert recipe.method in {"optmerge", "ties"}
    assert len(recipe.experts) == 5
    if Path(recipe.base).is_dir():  # the zoo ships with the package; paths resolve against the YAML
        assert all(Path(e.path).is_dir() for e in recipe.experts)


def test_campaign_example_validates() -> None:
    pytest.importorskip("optuna")
    from mergelab.platform.campaign_config import load_campaign

    cfg = load_campaign(EXAMPLES / "campaign-optmerge-lora.yaml")
    assert cfg.method == "optmerge" and cfg.objective.metrics == ["val/average"]
    assert set(cfg.search_space) == {"rank_ratio", "steps", "lr", "lam", "init"} and cfg.coefficients is not None
    assert cfg.eval.limit is None  # the objective sees the whole val split unless a limit is asked for
