"""benchmarks/omni_screen.py's base copy: a copied unaligned base gets the plan's connector alignment, only once."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergelab.bench.omni.build import OmniPlan, build_base, seed_dir
from mergelab.bench.omni.train import CONNECTORS, TOWERS

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def _screen():
    spec = importlib.util.spec_from_file_location("omni_screen", REPO / "benchmarks" / "omni_screen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_copy_base_aligns_an_unaligned_base_and_refuses_another_alignment(tmp_path: Path) -> None:
    screen = _screen()
    plan = OmniPlan.quick()
    src = seed_dir(tmp_path / "src", 0)
    build_base(src, plan, 0, "cpu")
    (src / "build.json").write_text(json.dumps({"plan": plan.to_dict()}))
    aligned = replace(plan, base_align_steps=2, base_align_per_task=4)
    screen.copy_base(tmp_path / "src", tmp_path / "dst", 0, aligned)
    dst = seed_dir(tmp_path / "dst", 0)
    before = load_file(str(src / "base" / "model.safetensors"))
    after = load_file(str(dst / "base" / "model.safetensors"))
    prefixes = tuple(m + "." for ms in CONNECTORS.values() for m in ms)
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert changed and all(k.startswith(prefixes) for k in changed)  # the connectors, nothing else
    stripped = load_file(str(dst / "merge" / "base" / "model.safetensors"))
    assert not any(k.startswith(tuple(TOWERS.values())) for k in stripped)
    assert all(torch.equal(stripped[k], after[k]) for k in stripped)
    # a base aligned with other settings is not copied
    (dst / "build.json").write_text(json.dumps({"plan": aligned.to_dict()}))
    with pytest.raises(SystemExit, match="aligned with other"):
        screen.copy_base(tmp_path / "dst", tmp_path / "other", 0, replace(aligned, base_align_steps=3))
