"""OptMerge started from another method's merge, through the engine on the shipped zoo: with a negligible step it
writes the model that method writes (every tensor), so a campaign's start point can be the best default's merge."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mergelab.engine import merge

ZOO = Path(__file__).resolve().parents[1] / "mergelab" / "bench" / "zoo" / "seed0"
TASKS = ("vqa", "geometry", "ocr")


def test_optmerge_from_tsv_with_a_negligible_step_is_the_tsv_merge(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    experts = [str(ZOO / "lora" / t) for t in TASKS]
    common = {"base": str(ZOO / "base"), "experts": experts, "policy": "qwen2_vl", "device": "cpu"}
    merge(**common, method="tsv", params={"lam": 0.5}, out=tmp_path / "tsv")
    rep = merge(**common, method="optmerge", out=tmp_path / "om",
                params={"variant": "lora", "init": "tsv", "lam": 0.5, "lr": 1e-12, "steps": 1})
    a, b = load_file(tmp_path / "tsv" / "model.safetensors"), load_file(tmp_path / "om" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert worst < 1e-6, (worst, changed[:3])  # float32 weights: equal but for the optimiser's 1e-12 step
    merge(**common, method="optmerge", params={"variant": "lora", "lam": 0.5}, out=tmp_path / "om_mean")
    c = load_file(tmp_path / "om_mean" / "model.safetensors")
    assert sum(not torch.equal(a[k], c[k]) for k in a) >= 20  # the paper's mean init is another merge (28 matrices)
    assert rep.device == "cpu"
