"""Streaming engine: sharded IO, exact results, policy routing, determinism, zero pass-through, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_state, write_sharded
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergelab.engine import CheckpointReader, ExpertSpec, merge, tensor_seed
from mergelab.engine.io import NameResolver, canonical_name
from mergelab.engine.policy import PRESETS, MergePolicy, Rule, preset_for_config, resolve_policy
from mergelab.engine.writer import OutSpec, ShardWriter
from mergelab.methods.base import MergeContext, MethodSpec


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader(d)
    return {k: r.get(k) for k in r.keys()}


def make_experts(root: Path, n: int = 2, scale: float = 0.1) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    base = tiny_state(0)
    paths, states = [], []
    for i in range(n):
        g = torch.Generator().manual_seed(10 + i)
        sd = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(write_sharded(root / f"e{i}", sd, n_shards=1 + i))  # different shard layouts
        states.append(sd)
    return paths, states


def no_leftovers(parent: Path) -> bool:
    return not any(p.name.startswith(".") and ".tmp-" in p.name for p in parent.iterdir())


def test_sharded_in_and_out_task_arithmetic_is_exact(tiny_checkpoint: Path, tmp_path: Path) -> None:
    paths, states = make_experts(tmp_path)
    base = tiny_state(0)
    out = tmp_path / "out"
    rep = merge(
        base=tiny_checkpoint,
        experts=[ExpertSpec(paths[0], coefficient=0.7), paths[1]],
        method="task_arithmetic",
        params={"lam": 0.5},
        policy="llama",
        out=out,
        device="cpu",
        max_shard_bytes=2_000,
    )
    assert len(rep.shards) > 2 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base) and set(index["weight_map"].values()) == set(rep.shards)
    got = load_dir(out)
    for k, v in base.items():
        if PRESETS["llama"].action(k) == "base":
            assert torch.equal(got[k], v), k  # excluded: bit-identical to base
        else:
            want = v + 0.5 * (0.7 * (states[0][k] - v) + (states[1][k] - v))
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
    assert rep.counts == {"base": 7, "merge": 4}
    assert (out / "tokenizer_config.json").exists() and (out / "config.json").exists()
    assert rep.bytes_written == sum(f.stat().st_size for f in out.iterdir() if "safetensors" in f.name)
    assert no_leftovers(tmp_path)


def test_shard_writer_roundtrip_and_single_file(tmp_path: Path) -> None:
    sd = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).to(torch.bfloat16)}
    w = ShardWriter(tmp_path, [OutSpec(k, v.dtype, tuple(v.shape)) for k, v in sd.items()], 10**9)
    for k, v in sd.items():
        w.write(k, v)
    w.close()
    assert w.names == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    got = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    w2 = ShardWriter(tmp_path, [OutSpec("x", torch.float32, (2,))], 10**9)
    with pytest.raises(ValueError, match="expected x"):
        w2.write("y", torch.zeros(2))


def test_zero_task_vectors_pass_through_untouched(tiny_checkpoint: Path, tmp_path: Path) -> None:
    base = tiny_state(0)
    same = write_sharded(tmp_path / "same", base, n_shards=1)

    def nan_if_called(b: torch.Tensor, d: torch.Tensor, cfg: object, ctx: MergeContext) -> torch.Tensor:
        return d.sum(0) / (d.norm() ** 2)  # 0/0 = NaN if the engine ever handed it zeros

    spec = MethodSpec(nan_if_called, type("Cfg", (), {"__dataclass_fields__": {}}))
    rep = merge(base=tiny_checkpoint, experts=[same, same], method=spec, policy=[], out=tmp_path / "o", device="cpu")
    got = load_dir(tmp_path / "o")
    assert all(torch.equal(got[k], v) for k, v in base.items())
    assert rep.counts == {"zero": len(base)}


def test_matrix_only_methods_get_2d_weights_and_engine_averages_the_rest(tiny_checkpoint: Path, tmp_path: Path) -> None:
    paths, states = make_experts(tmp_path)
    seen: list[str] = []

    def first_expert(b: torch.Tensor, d: torch.Tensor, cfg: object, ctx: MergeContext) -> torch.Tensor:
        assert d.dim() == 3 and d.dtype == torch.float64 and ctx.compute_dtype == torch.float64
        seen.append(ctx.name)
        return d[0]

    spec = MethodSpec(first_expert, type("Cfg", (), {"__dataclass_fields__": {}}), matrix_only=True)
    policy = MergePolicy("t", (Rule(r".*embed_tokens.*", "base"),))
    rep = merge(base=tiny_checkpoint, experts=paths, method=spec, policy=policy, out=tmp_path / "o", device="cpu",
                compute_dtype="float64")
    base = tiny_state(0)
    got = load_dir(tmp_path / "o")
    assert sorted(seen) == sorted(k for k, v in base.items() if v.dim() == 2 and "lm_head" not in k and "embed" not in k)
    for k in ("lm_head.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"):
        want = base[k] + (states[0][k] - base[k] + states[1][k] - base[k]) / 2
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["model.layers.1.mlp.up_proj.weight"], states[0]["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert rep.counts == {"average": 6, "base": 1, "merge": 4}


def test_dare_is_seeded_per_tensor_independent_of_order(tiny_checkpoint: Path, tmp_path: Path) -> None:
    paths, _ = make_experts(tmp_path)
    kw = dict(experts=paths, method="dare_task_arithmetic", params={"drop_rate": 0.5}, policy=[], device="cpu")
    merge(base=tiny_checkpoint, out=tmp_path / "a", seed=3, **kw)
    merge(base=tiny_checkpoint, out=tmp_path / "b", seed=3, **kw)
    merge(base=tiny_checkpoint, out=tmp_path / "c", seed=4, **kw)
    # the same base written in reverse order and in one shard: per-tensor generators make the order irrelevant
    rev = dict(reversed(list(tiny_state(0).items())))
    reordered = write_sharded(tmp_path / "rev", rev, n_shards=1)
    merge(base=reordered, out=tmp_path / "d", seed=3, **kw)
    a, b, c, d = (load_dir(tmp_path / x) for x in "abcd")
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], d[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert tensor_seed(3, "x") != tensor_seed(3, "y") and tensor_seed(3, "x") == tensor_seed(3, "x")


def test_global_ties_runs_statistics_passes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    paths, _ = make_experts(tmp_path, n=3)
    rep = merge(base=tiny_checkpoint, experts=paths, method="ties", params={"scope": "global", "density": 0.3},
                policy="llama", out=tmp_path / "o", device="cpu")
    assert rep.stats_passes >= 1 and rep.counts["merge"] == 4
    rep2 = merge(base=tiny_checkpoint, experts=paths, method="ties", params={"density": 0.3}, policy="llama",
                 out=tmp_path / "o2", device="cpu")
    assert rep2.stats_passes == 0
    a, b = load_dir(tmp_path / "o"), load_dir(tmp_path / "o2")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # global and per-tensor thresholds differ


def test_output_dtype_overwrite_and_report(tiny_checkpoint: Path, tmp_path: Path) -> None:
    paths, _ = make_experts(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    rep = merge(base=tiny_checkpoint, experts=paths, method="weight_average", policy="llama", out=out, device="cpu",
                dtype="bf16", overwrite=True)
    assert not (out / "stale.txt").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    d = rep.to_dict()
    json.dumps(d)
    assert d["counts"] == rep.counts and len(d["tensors"]) == 11 and d["dtype"] == "bfloat16"
    merged = [t for t in rep.tensors if t.rule == "merge"]
    assert all(len(t.expert_norms) == 2 and t.expert_norms[0] > 0 and t.merged_norm > 0 for t in merged)
    assert rep.bytes_read > 0 and rep.peak_rss_bytes > 0 and rep.wall_seconds > 0
    s = rep.summary()
    assert "weight_average" in s and "merge 4" in s and len(s.splitlines()) < 25
    prov = json.loads((out / "mergelab_merge.json").read_text())
    assert prov["method"] == "weight_average" and prov["seed"] == 0


def test_carry_unique_copies_tensors_only_one_expert_owns(tiny_checkpoint: Path, tmp_path: Path) -> None:
    base = tiny_state(0)
    enc = torch.randn(5, 3)
    e = write_sharded(tmp_path / "audio", {**base, "audio_tower.w": enc}, n_shards=1)
    plain = write_sharded(tmp_path / "plain", base, n_shards=1)
    with pytest.raises(ValueError, match=r"audio_tower\.w is not in base"):
        merge(base=tiny_checkpoint, experts=[e, plain], method="task_arithmetic", policy="llama", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    rep = merge(base=tiny_checkpoint, experts=[e, plain], method="task_arithmetic", policy="llama",
                out=tmp_path / "o", carry_unique=True)
    assert torch.equal(load_dir(tmp_path / "o")["audio_tower.w"], enc) and rep.counts["carry"] == 1


def test_policy_presets_cover_both_naming_schemes() -> None:
    q = PRESETS["qwen2_vl"]
    for name in ("visual.blocks.0.attn.qkv.weight", "model.visual.merger.mlp.0.weight", "model.embed_tokens.weight",
                 "lm_head.weight", "model.layers.0.self_attn.q_proj.bias", "model.language_model.norm.weight"):
        assert q.action(name) == "base", name
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.language_model.layers.1.mlp.down_proj.weight"):
        assert q.action(name) == "merge", name
    lv = PRESETS["llava"]
    assert lv.action("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == "base"
    assert lv.action("model.multi_modal_projector.linear_1.weight") == "base"
    assert lv.action("language_model.model.layers.0.mlp.up_proj.weight") == "merge"
    iv = PRESETS["internvl2_5"]
    assert iv.action("vision_model.encoder.layers.0.attn.qkv.weight") == "base"
    assert iv.action("mlp1.1.weight") == "merge" and iv.action("mlp1.0.weight") == "average"
    assert iv.action("model.multi_modal_projector.layer_norm.weight") == "average"
    assert preset_for_config({"model_type": "qwen2_5_vl"}) == "qwen2_5_vl"
    assert preset_for_config({"model_type": "qwen2"}) == "llama"
    assert preset_for_config({"architectures": ["LlavaForConditionalGeneration"]}) == "llava"
    with pytest.raises(ValueError, match="no preset for model_type 'bert'"):
        preset_for_config({"model_type": "bert"})
    p = resolve_policy({"preset": "llama", "rules": [{"pattern": r"lm_head\..*", "action": "average"}]}, {})
    assert p.action("lm_head.weight") == "average" and p.action("model.norm.weight") == "base"
    with pytest.raises(ValueError, match="action must be one of"):
        resolve_policy([["x", "drop"]], {})


def test_name_resolution_across_schemes() -> None:
    assert canonical_name("model.language_model.layers.0.q.weight") == "layers.0.q.weight"
    assert canonical_name("language_model.model.layers.0.q.weight") == "layers.0.q.weight"
    assert canonical_name("model.visual.blocks.0.w") == canonical_name("visual.blocks.0.w")
    r = NameResolver(["model.layers.0.q.weight", "visual.x.weight", "language_model.lm_head.weight"])
    assert r.resolve("model.language_model.layers.0.q.weight") == "model.layers.0.q.weight"
    assert r.resolve("model.visual.x.weight") == "visual.x.weight"
    assert r.resolve("lm_head.weight") == "language_model.lm_head.weight"
    assert r.resolve("model.layers.9.q.weight") is None
    amb = NameResolver(["model.norm.weight", "language_model.norm.weight"])
    assert amb.resolve("model.language_model.norm.weight") is None  # ambiguous, never guessed


def test_safetensors_written_by_engine_load_with_safe_open(tiny_checkpoint: Path, tmp_path: Path) -> None:
    f = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(f))
    paths, _ = make_experts(tmp_path, n=1)
    merge(base=tiny_checkpoint, experts=paths, method="task_arithmetic", policy="llama", out=tmp_path / "o",
          max_shard_bytes=1)
    idx = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) == 11  # one tensor per shard when the bound is below every tensor


def test_reader_views_are_zero_copy_and_headers_are_validated(tmp_path: Path) -> None:
    sd = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).to(torch.bfloat16),
          "s": torch.tensor(2.5)}
    save_file(sd, str(tmp_path / "x.safetensors"))
    r = CheckpointReader(tmp_path / "x.safetensors")
    for k, v in sd.items():
        assert torch.equal(r.view(k), v) and torch.equal(r.get(k), v) and r.view(k).dtype == v.dtype
    raw = bytearray((tmp_path / "x.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["a"]["shape"] = [3, 6]  # claims more data than its byte span
    hb = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(hb) == n
    (tmp_path / "y.safetensors").write_bytes(bytes(raw[:8]) + hb + bytes(raw[8 + n :]))
    with pytest.raises(ValueError, match=r"y\.safetensors: tensor a spans 60 bytes, its shape and dtype need 72"):
        CheckpointReader(tmp_path / "y.safetensors")


def test_peak_memory_follows_the_largest_tensor_not_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.engine import loop as engine
    from mergelab.engine.stream import PeakMemory

    monkeypatch.setattr(engine, "_PREFETCH_BYTES", 0)  # read-ahead budget = the largest tensor's footprint

    big = 2**21  # 8 MiB per fp32 tensor; 16 of them = 128 MiB per model, 512 MiB for base + 3 experts
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(big // 512, 512, generator=g) for i in range(16)}
    bdir = write_sharded(tmp_path / "base", base, n_shards=2)
    experts = [write_sharded(tmp_path / f"e{j}", {k: v + 0.01 for k, v in base.items()}, n_shards=1) for j in range(3)]
    del base
    before = PeakMemory.current()
    rep = merge(base=bdir, experts=experts, method="weight_average", policy=[], out=tmp_path / "o", device="cpu")
    grown = rep.peak_rss_bytes - before
    # N task vectors + their mean (+ one small read-ahead), plus slack; holding the task vectors needs 384 MiB
    assert grown < (3 + 1) * big * 4 + 48 * 2**20, grown / 2**20
