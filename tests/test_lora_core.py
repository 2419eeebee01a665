"""Core-space merging of LoRA adapters (``lora_merge: core``, arXiv 2509.17786): exactness of the core
representation, which methods equal the delta mode (orthogonal invariance, measured), the engine's full and adapter
outputs (the adapter loads with ``PeftModel.from_pretrained`` and gives the full weights' logits), the config field,
the digest and ``--dry-run``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergelab.engine import MergeError, MergeRecipe, run_merge
from mergelab.engine.adapters import LoraAdapter
from mergelab.engine.core_space import LazyCoreUpdates, core_space, core_updates, merge_cores, span_basis
from mergelab.engine.factors import LowRank
from mergelab.engine.io import CheckpointReader
from mergelab.engine.loop import preflight
from mergelab.methods import METHODS
from mergelab.methods.base import MergeContext, tensor_generator
from mergelab.platform.merge_config import load_recipe
from tests.test_engine_lora import save_adapter


def _factors(ranks: list[int], m: int = 48, n: int = 40, seed: int = 0) -> tuple[list[torch.Tensor],
                                                                                  list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(m, r, generator=g) for r in ranks], [torch.randn(r, n, generator=g) / 4 for r in ranks])


def test_cores_represent_every_delta_exactly_and_drop_null_directions() -> None:
    bs, as_ = _factors([4, 3, 5])
    sp = core_space(bs, as_)
    assert sp.cores.shape == (3, 12, 12)
    torch.testing.assert_close(sp.u.T @ sp.u, torch.eye(12), atol=1e-5, rtol=0)
    for b, a, core in zip(bs, as_, sp.cores, strict=True):
        torch.testing.assert_close(sp.u @ core @ sp.v.T, b @ a, atol=1e-5, rtol=1e-5)
    # the same adapter twice spans r directions, not 2r; an all-zero stack spans none
    twice = core_space([bs[0], 2 * bs[0]], [as_[0], as_[0]])
    assert twice.cores.shape == (2, 4, 4)
    assert span_basis(torch.zeros(10, 3))[0].shape == (10, 0)
    q, c = span_basis(torch.cat([bs[0], bs[0]], dim=1))  # rank-deficient: the SVD route
    assert q.shape == (48, 4) and c.shape == (4, 8)
    torch.testing.assert_close(q @ c, torch.cat([bs[0], bs[0]], dim=1), atol=1e-5, rtol=1e-5)


def test_an_expert_without_the_module_has_a_zero_core() -> None:
    bs, as_ = _factors([4, 4])
    sp = core_space([bs[0], bs[1][:, :0]], [as_[0], as_[1][:0]])
    assert sp.cores.shape == (2, 4, 4) and not sp.cores[1].any()


# (method, params, ranks, same as the delta mode): see mergelab/engine/core_space.py for why
INVARIANCE = [
    ("task_arithmetic", {}, [4, 4, 4], True),
    ("weight_average", {}, [2, 6, 4], True),
    ("tsv", {}, [4, 4, 4], True),  # k = 40 // 3 there, 12 // 3 = 4 here: every direction kept in both
    ("tsv", {}, [2, 6, 4], False),  # k = 4 < 6 here: the second task is truncated in core space only
    ("iso_c", {"span_only": True}, [2, 6, 4], True),
    ("iso_c", {}, [4, 4, 4], False),  # flat over all 40 directions there, 12 here
    ("iso_cts", {}, [4, 4, 4], False),
    ("wudi", {"optimizer": "sgd", "steps": 50}, [2, 6, 4], True),
    ("wudi", {"steps": 50}, [4, 4, 4], False),  # Adam: per-coordinate steps
    ("optmerge", {"variant": "lora", "steps": 50}, [4, 4, 4], True),
    ("optmerge", {"variant": "full", "steps": 50}, [4, 4, 4], False),
    ("swudi", {"rank_ratio": None}, [4, 4, 4], True),
    ("swudi", {}, [4, 4, 4], False),  # keeps 65% of n = 40 eigendirections there, of 12 here
    ("swudi_a", {}, [2, 6, 4], True),
    ("ties", {}, [4, 4, 4], False),  # element-wise: another basis, other entries
    ("dare_task_arithmetic", {}, [4, 4, 4], False),
    ("dare_ties", {}, [4, 4, 4], False),
]


def test_the_invariance_table_covers_every_method() -> None:
    assert {m for m, *_ in INVARIANCE} == set(METHODS)


@pytest.mark.parametrize(("method", "params", "ranks", "same"), INVARIANCE,
                         ids=[f"{m}-{'-'.join(map(str, r))}-{p}" for m, p, r, _ in INVARIANCE])
def test_core_mode_equals_delta_mode_exactly_for_rotation_invariant_methods(
        method: str, params: dict[str, Any], ranks: list[int], same: bool) -> None:
    bs, as_ = _factors(ranks)
    deltas = torch.stack([b @ a for b, a in zip(bs, as_, strict=True)])
    spec = METHODS[method]
    cfg = spec.make_config(params)
    stats = spec.make_stats(cfg, len(ranks)) if spec.make_stats else None
    while stats is not None:
        stats.update("w", deltas)
        if not stats.finish_pass():
            break
    full = spec.fn(torch.zeros(48, 40), deltas, cfg, MergeContext(name="w", generator=tensor_generator(0, "w"),
                                                                   stats=stats))
    core = merge_cores({"w": core_space(bs, as_)}, {"w": "merge"}, spec, cfg, seed=0, lam=1.0)["w"].dense()
    rel = float((full - core).norm() / full.norm())
    if same:
        assert rel < 1e-4, rel
    else:
        assert rel > 2e-4, rel


def test_low_rank_svd_equals_the_dense_svd() -> None:
    bs, as_ = _factors([3, 3], m=30, n=20)
    sp = core_space(bs, as_)
    for lr in (sp.lift(sp.cores.sum(0)), LowRank(bs[0], as_[0], None, 2.0, True)):
        u, s, vh = lr.svd()
        dense = lr.dense()
        dense = dense.T if lr.transpose else dense
        torch.testing.assert_close(u * s @ vh, dense, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s, torch.linalg.svdvals(dense)[: s.numel()], atol=1e-4, rtol=1e-4)


# --- through the engine on a tiny Llama ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loras(tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    """The tiny Llama base, two LoRA adapters (other ranks, scalings and targets; rsLoRA) and one full expert."""
    base, full = tiny_models("llama")
    root = tmp_path_factory.mktemp("core")
    save_adapter("llama", base, root / "a1", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    save_adapter("llama", base, root / "a2", 2, r=2, lora_alpha=16, use_rslora=True,
                 target_modules=["q_proj", "down_proj"])
    return base, [root / "a1", root / "a2"], full[0]


def _logits(model: Any) -> torch.Tensor:
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(("method", "params"), [("task_arithmetic", {"lam": 0.8}),
                                                ("iso_c", {"span_only": True})])
def test_core_mode_full_output_equals_delta_mode(loras: tuple[Path, list[Path], Path], tmp_path: Path,
                                                 method: str, params: dict[str, Any]) -> None:
    base, ads, _ = loras
    recipe = MergeRecipe.build(base=base, experts=[{"path": ads[0], "coefficient": 0.5}, ads[1]], method=method,
                               params=params, device="cpu")
    run_merge(recipe, tmp_path / "delta")
    rep = run_merge(recipe.replace(lora_merge="core"), tmp_path / "core")
    rules = {t.name: t.rule for t in rep.tensors}
    assert sum(r == "core" for r in rules.values()) == 6 and "factors" not in rules.values()  # q, v, down x 2
    want = load_file(str(tmp_path / "delta" / "model.safetensors"))
    got = load_file(str(tmp_path / "core" / "model.safetensors"))
    b0 = load_file(str(base / "model.safetensors"))
    for k, v in want.items():  # the same update up to float32 rounding
        assert float((got[k] - v).norm()) <= 1e-5 * float((v - b0[k]).norm()), k


def test_core_mode_adapter_output_is_exact_and_loads_with_peft(loras: tuple[Path, list[Path], Path],
                                                               tmp_path: Path) -> None:
    import peft
    import transformers

    base, ads, _ = loras
    recipe = MergeRecipe.build(base=base, experts=ads, method="task_arithmetic", device="cpu", lora_merge="core")
    run_merge(recipe, tmp_path / "full")
    rep = run_merge(recipe.replace(output="adapter"), tmp_path / "adapter")
    a = rep.adapter
    assert a["rank"] == 6 and a["exact"] and a["max_rel_error"] == 0.0 and a["written_from"] == "core space"
    assert {v["rank"] for v in a["tensors"].values()} == {2, 4, 6}  # v: r1, down: r2, q: r1 + r2
    assert "core space" in rep.summary()
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 6
    want = _logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "full"))
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), tmp_path / "adapter")
    torch.testing.assert_close(_logits(pm), want, rtol=1e-4, atol=1e-5)


def test_core_mode_truncated_adapter_is_the_optimal_truncation(loras: tuple[Path, list[Path], Path],
                                                               tmp_path: Path) -> None:
    base, ads, _ = loras
    recipe = MergeRecipe.build(base=base, experts=ads, method="task_arithmetic", device="cpu", lora_merge="core",
                               output="adapter", adapter_rank=3)
    rep = run_merge(recipe, tmp_path / "adapter")
    assert rep.adapter["rank"] == 3 and not rep.adapter["exact"]
    full = run_merge(recipe.replace(output="full", adapter_rank=None), tmp_path / "full")
    merged, b0 = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(base / "model.safetensors"))
    q = next(k for k in rep.adapter["tensors"] if "q_proj" in k)
    s = torch.linalg.svdvals((merged[q] - b0[q]).double())
    assert rep.adapter["tensors"][q]["rel_error"] == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-3)
    assert len(full.tensors) > 0


def test_core_mode_computes_in_float32_under_a_bf16_compute_dtype(loras: tuple[Path, list[Path], Path],
                                                                  tmp_path: Path) -> None:
    base, ads, _ = loras
    recipe = MergeRecipe.build(base=base, experts=ads, method="task_arithmetic", device="cpu",
                               compute_dtype="bfloat16")
    run_merge(recipe, tmp_path / "delta")
    run_merge(recipe.replace(lora_merge="core"), tmp_path / "core")
    want = load_file(str(tmp_path / "delta" / "model.safetensors"))
    got = load_file(str(tmp_path / "core" / "model.safetensors"))
    b0 = load_file(str(base / "model.safetensors"))
    for k, v in want.items():  # bf16 task vectors there, float32 cores here
        assert float((got[k] - v).norm()) <= 1e-2 * float((v - b0[k]).norm()) + 1e-6, k


def test_core_mode_runs_global_statistics_over_the_cores(loras: tuple[Path, list[Path], Path],
                                                         tmp_path: Path) -> None:
    base, ads, _ = loras
    recipe = MergeRecipe.build(base=base, experts=ads, method="ties", params={"scope": "global", "density": 0.5},
                               device="cpu", lora_merge="core")
    rep = run_merge(recipe, tmp_path / "out")
    assert rep.counts["core"] == 6 and "factors" not in rep.counts
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "out" / "model.safetensors")).values())


def test_per_tensor_methods_compute_each_update_on_demand(loras: tuple[Path, list[Path], Path]) -> None:
    """The engine holds one tensor's bases at a time unless a global method needs every core first."""
    base, ads, _ = loras
    reader = CheckpointReader(base)
    adapters = [LoraAdapter(p, reader.keys()) for p in ads]
    rules = {k: "merge" for k in sorted(set(adapters[0].modules) | set(adapters[1].modules))}
    kw = {"seed": 0, "lam": 1.0, "device": torch.device("cpu"), "dtype": torch.float32}
    ta = METHODS["task_arithmetic"]
    lazy = core_updates(adapters, rules, ta, ta.make_config({}), **kw)
    assert isinstance(lazy, LazyCoreUpdates) and len(lazy) == 6 and set(lazy) == set(rules)
    k = next(iter(rules))
    torch.testing.assert_close(lazy[k].dense(), lazy[k].dense())
    ties = METHODS["ties"]
    eager = core_updates(adapters, rules, ties, ties.make_config({"scope": "global"}), **kw)
    assert isinstance(eager, dict) and set(eager) == set(rules)
    reader.close()


def test_core_mode_is_a_config_field_in_the_digest_and_the_dry_run(loras: tuple[Path, list[Path], Path],
                                                                   tmp_path: Path) -> None:
    from mergelab.platform.cli import main

    base, ads, full = loras
    with pytest.raises(MergeError, match="lora_merge: 'core' needs every expert to be a LoRA adapter"):
        MergeRecipe.build(base=base, experts=[ads[0], full], method="task_arithmetic", lora_merge="core")
    y = tmp_path / "m.yaml"
    y.write_text(f"base: {base}\nexperts: [{ads[0]}, {ads[1]}]\nmethod: task_arithmetic\npolicy: auto\n"
                 "lora_merge: core\n")
    r = load_recipe(y)
    assert r.lora_merge == "core" and r.identity()["lora_merge"] == "core"
    assert r.digest not in (r.replace(lora_merge="delta").digest, r.replace(lora_merge="factors").digest)
    res = CliRunner().invoke(main, ["merge", str(y), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "lora_merge: core" in res.output and "core 6" in res.output and "factors" not in res.output


def test_lazy_updates_are_a_mapping_of_the_planned_tensors_only(loras: tuple[Path, list[Path], Path]) -> None:
    """``key in updates`` and ``updates.get(key)`` answer for any key without reading factors (a tensor no adapter
    changes raised StopIteration, an adapted one the plan keeps at the base was computed, then refused)."""
    base, ads, _ = loras
    reader = CheckpointReader(base)
    adapters = [LoraAdapter(p, reader.keys()) for p in ads]
    adapted = sorted(set(adapters[0].modules) | set(adapters[1].modules))
    rules = {k: "merge" for k in adapted[1:]}
    ta = METHODS["task_arithmetic"]
    lazy = core_updates(adapters, rules, ta, ta.make_config({}), seed=0, lam=1.0, device=torch.device("cpu"),
                        dtype=torch.float32)
    for key in ("model.embed_tokens.weight", adapted[0], "no.such.tensor"):
        assert key not in lazy and lazy.get(key) is None
        with pytest.raises(KeyError):
            lazy[key]
    assert adapted[1] in lazy and isinstance(lazy.get(adapted[1]), LowRank)
    reader.close()


def _with_q_factor(adapter: Path, out: Path, factor: str, change: Any) -> Path:
    """A copy of ``adapter`` whose first ``q_proj`` ``factor`` (``lora_A`` or ``lora_B``) is ``change(tensor)``."""
    shutil.copytree(adapter, out)
    sd = load_file(str(out / "adapter_model.safetensors"))
    key = next(k for k in sd if f".{factor}." in k and "q_proj" in k)
    sd[key] = change(sd[key])
    save_file(sd, str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_core_mode_refuses_factors_whose_product_does_not_fit_the_base_tensor(
        loras: tuple[Path, list[Path], Path], tmp_path: Path, factor: str) -> None:
    """The delta mode names the adapter and the shapes; the core mode did not check them (a torch error deep in the
    merge). Now both say which adapter and tensor, and the core mode says it before any work (``--dry-run``)."""
    base, ads, _ = loras
    grow = (3, 0) if factor == "lora_B" else (0, 3)
    bad = _with_q_factor(ads[0], tmp_path / "bad", factor, lambda t: torch.randn(t.shape[0] + grow[0],
                                                                                  t.shape[1] + grow[1]))
    recipe = MergeRecipe.build(base=base, experts=[bad, ads[1]], method="task_arithmetic", device="cpu",
                               lora_merge="core")
    with pytest.raises(MergeError, match=r"bad: LoRA update for model\.layers\.\d\.self_attn\.q_proj\.weight has "
                                         r"shape \(\d+, \d+\), base has \(64, 64\)"):
        preflight(recipe, None)
    with pytest.raises(MergeError, match="LoRA update for .*q_proj"):
        run_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_core_mode_refuses_factors_that_do_not_multiply(loras: tuple[Path, list[Path], Path], tmp_path: Path) -> None:
    base, ads, _ = loras
    bad = _with_q_factor(ads[0], tmp_path / "bad", "lora_B", lambda t: t[:, :-1].contiguous())  # B (m, r - 1)
    with pytest.raises(MergeError, match=r"bad: LoRA factors of .*q_proj.* do not multiply: B \(64, 3\), A \(4, 64\)"):
        run_merge(MergeRecipe.build(base=base, experts=[bad], method="task_arithmetic", device="cpu",
                                    lora_merge="core"), tmp_path / "out")


def test_core_mode_refuses_a_module_transposed_in_some_experts_only_before_any_work(
        loras: tuple[Path, list[Path], Path], tmp_path: Path) -> None:
    base, ads, _ = loras
    flipped = tmp_path / "fan"
    shutil.copytree(ads[0], flipped)
    cfg = json.loads((flipped / "adapter_config.json").read_text())
    (flipped / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": True}))  # q_proj is square
    recipe = MergeRecipe.build(base=base, experts=[flipped, ads[1]], method="task_arithmetic", device="cpu",
                               lora_merge="core")
    with pytest.raises(MergeError, match=r"q_proj\.weight is a transposed LoRA module in some experts only"):
        preflight(recipe, None)
