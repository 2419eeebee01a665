"""mergekit compatibility: `mergelab merge` reads mergekit's YAML and gives mergekit's weights (float32: to 1e-6).

mergekit itself (an optional test dependency, LGPL) runs in-process on a tiny real Llama checkpoint as the oracle.
DARE's random masks cannot be compared entry by entry (mergekit draws them from torch's global generator in its
executor's order); dare_ties and dare_linear are compared at density 1, where both are deterministic.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergelab.engine import CheckpointReader, run_merge
from mergelab.methods import METHODS
from mergelab.methods._sparsify import magnitude_threshold, trim_to_threshold
from mergelab.methods.base import MergeContext
from mergelab.platform.merge_config import MergeConfigError, load_recipe
from tests.conftest import save_model_family

mergekit = pytest.importorskip("mergekit", reason="mergekit (optional test oracle) is not installed")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import MergeOptions  # noqa: E402
from mergekit.merge import run_merge as mergekit_run_merge  # noqa: E402
from mergekit.sparsify import magnitude as mergekit_magnitude  # noqa: E402


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny Llama base and 3 full fine-tuned experts (float32, save_pretrained layout)."""
    return save_model_family(tmp_path_factory.mktemp("mk"), "llama", n_experts=3, scale=0.05)


@pytest.fixture(scope="module")
def llama3_bf16(llama3: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The same checkpoints stored in bfloat16."""
    root = tmp_path_factory.mktemp("mk-bf16")
    out = []
    for d in (llama3[0], *llama3[1]):
        shutil.copytree(d, root / d.name)
        f = root / d.name / "model.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, str(f), metadata={"format": "pt"})
        out.append(root / d.name)
    return out[0], out[1:]


def _both(tmp: Path, cfg: dict[str, Any]) -> tuple[CheckpointReader, CheckpointReader]:
    """Merge ``cfg`` with mergekit and with `mergelab merge`'s recipe loader; return both outputs."""
    src = tmp / "mergekit.yaml"
    src.write_text(yaml.safe_dump(cfg))
    mk_out = tmp / "mk"
    mergekit_run_merge(MergeConfiguration.model_validate(cfg), str(mk_out),
                       MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=0, quiet=True))
    ml_out = tmp / "ml"
    run_merge(load_recipe(src).replace(device="cpu"), ml_out)
    return CheckpointReader(mk_out), CheckpointReader(ml_out)


def _max_diff(a: CheckpointReader, b: CheckpointReader) -> float:
    assert set(a.keys()) == set(b.keys())
    return max(float((a.get(k).float() - b.get(k).float()).abs().max()) for k in a.keys())


def _models(experts: list[Path], weights: list[float], density: float | None = None) -> list[dict[str, Any]]:
    out = []
    for e, w in zip(experts, weights, strict=True):
        p: dict[str, Any] = {"weight": w}
        if density is not None:
            p["density"] = density
        out.append({"model": str(e), "parameters": p})
    return out


CASES = {
    "linear": dict(merge_method="linear", parameters={"normalize": True}, weights=[0.5, 1.0, 2.0], base_listed=True),
    "linear_base_by_global_weight": dict(merge_method="linear", parameters={"weight": 0.5}, weights=[1.0, 3.0, 2.0]),
    "task_arithmetic": dict(merge_method="task_arithmetic", parameters={"lambda": 0.7}, weights=[0.5, 1.0, -0.3]),
    "task_arithmetic_normalized": dict(merge_method="task_arithmetic", parameters={"normalize": True},
                                       weights=[0.5, 1.0, 2.0]),
    "ties": dict(merge_method="ties", parameters={"normalize": True, "lambda": 1.0, "int8_mask": True},
                 weights=[1.0, 0.5, 2.0], density=0.3, base_listed=True),
    "ties_unweighted": dict(merge_method="ties", parameters={}, weights=[1.0, 1.0, 1.0], density=0.2),
    "ties_sum": dict(merge_method="ties", parameters={"normalize": False, "lambda": 0.8}, weights=[1.0, 0.5, 2.0],
                     density=0.5),
    "dare_ties_density1": dict(merge_method="dare_ties", parameters={}, weights=[1.0, 0.5, 2.0], density=1.0),
    "dare_linear_density1": dict(merge_method="dare_linear", parameters={"normalize": True}, weights=[1.0, 0.5, 2.0],
                                 density=1.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_mergekit(case: str, llama3: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = llama3
    c = dict(CASES[case])
    models = _models(experts, c.pop("weights"), c.pop("density", None))
    if c.pop("base_listed", False):
        models.insert(0, {"model": str(base), "parameters": {"weight": 0.25}} if c["merge_method"] == "linear"
                      else {"model": str(base)})
    cfg = {"base_model": str(base), "dtype": "float32", "models": models, **c}
    mk, ml = _both(tmp_path, cfg)
    assert _max_diff(mk, ml) <= 1e-6


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_bfloat16_bit_for_bit(method: str, llama3_bf16: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """mergekit's dtype is the dtype of its math (linear: float32 always): computing in it gives its exact bits."""
    base, experts = llama3_bf16
    cfg = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16", "parameters": {"weight": 0.25},
           "models": _models(experts, [1.0, 0.5, 2.0])}
    mk, ml = _both(tmp_path, cfg)
    assert load_recipe(tmp_path / "mergekit.yaml").compute_dtype == ("float32" if method == "linear" else "bfloat16")
    assert all(torch.equal(mk.get(k), ml.get(k)) for k in mk.keys())


def test_exact_topk_equals_mergekit_magnitude() -> None:
    """Exact top-k keeps mergekit's entries on a tensor large enough for the radix select (20,000 entries)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 200, 100, generator=g)
    for density in (0.01, 0.2, 0.37, 0.9, 1.0):
        th = magnitude_threshold(x, density, exact_topk=True)
        ours = trim_to_threshold(x, th)
        for i in range(2):
            torch.testing.assert_close(ours[i], mergekit_magnitude(x[i], density), rtol=0, atol=0)


def test_ties_defaults_unchanged() -> None:
    """The paper's TIES (scripts' threshold, mean) is still the default; ``topk='exact'`` changes only the count."""
    cfg = METHODS["ties"].config_cls()
    assert (cfg.topk, cfg.normalize) == ("scripts", True)
    x = torch.randn(3, 40, 25, generator=torch.Generator().manual_seed(0))
    paper = METHODS["ties"].fn(x[0], x, METHODS["ties"].config_cls(density=0.25), MergeContext())
    exact = METHODS["ties"].fn(x[0], x, METHODS["ties"].config_cls(density=0.25, topk="exact"), MergeContext())
    kept_paper = (trim_to_threshold(x, magnitude_threshold(x, 0.25)) != 0).sum(dim=(1, 2))
    assert kept_paper.tolist() == [251] * 3  # numel - int(numel * 0.75) + 1
    assert not torch.equal(paper, exact)


@pytest.mark.parametrize("method", ["slerp", "della", "model_stock", "breadcrumbs"])
def test_methods_we_lack_are_one_line(method: str, llama3: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = llama3
    src = tmp_path / "m.yaml"
    src.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(base),
                                   "models": _models(experts, [1.0, 1.0, 1.0])}))
    with pytest.raises(MergeConfigError) as e:
        load_recipe(src)
    msg = str(e.value)
    assert "\n" not in msg and repr(method) in msg and "no mergelab equivalent" in msg


def test_unsupported_features_are_one_line(llama3: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = llama3
    src = tmp_path / "m.yaml"
    for cfg, word in (
        ({"models": [{"model": str(experts[0]), "parameters": {"weight": [0.1, 0.9]}}]}, "gradients"),
        ({"models": [{"model": f"{base}+{experts[0]}"}]}, r"model\+lora"),
        ({"models": _models(experts[:2], [1, 1], 0.5)[:1] + _models(experts[2:], [1], 0.3)}, "one density"),
        ({"models": _models(experts, [1, 1, 1], 0.5), "parameters": {"rescale": True}}, "rescale: true"),
    ):
        src.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base), **cfg}))
        with pytest.raises(MergeConfigError, match=word):
            load_recipe(src)


def test_recipe_from_mergekit_yaml(llama3: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """The translation is visible in the recipe: method, coefficients, params, empty policy, dtype."""
    base, experts = llama3
    src = tmp_path / "m.yaml"
    src.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(base), "dtype": "bfloat16",
                                   "models": [{"model": str(base)}, *_models(experts, [1.0, 0.5, 2.0], 0.4)]}))
    r = load_recipe(src)
    assert r.method == "dare_ties" and [e.coefficient for e in r.experts] == [1.0, 0.5, 2.0]
    assert r.config.drop_rate == pytest.approx(0.6) and r.config.density == 1.0 and r.config.normalize is False
    assert r.dtype == "bfloat16" and list(r.policy) == []
