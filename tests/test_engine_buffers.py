"""The engine's CPU memory paths: chunked task vectors, the writer's chunked dtype conversion, the buffer pool."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab.engine import MergeRecipe, loop, plan, run_merge, writer
from mergelab.engine.io import CheckpointReader
from mergelab.engine.plan import Expert, add_base_, fill_deltas
from mergelab.engine.recipe import ExpertSpec
from mergelab.engine.stream import BufferPool
from mergelab.engine.writer import OutSpec, ShardWriter

CPU = torch.device("cpu")


def _ckpt(d: Path, tensors: dict[str, torch.Tensor]) -> Path:
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    return d


def test_fill_deltas_chunked_equals_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan, "CHUNK", 7)  # chunks that split rows, and a short last chunk
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(5, 9, generator=g).to(torch.bfloat16), "f": torch.randn(13, generator=g)}
    base_r = CheckpointReader(_ckpt(tmp_path / "base", base))
    ex = []
    for i in range(2):
        e = {k: v + 0.1 * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in base.items()}
        ex.append(Expert(ExpertSpec(path=str(_ckpt(tmp_path / f"e{i}", e))), base_r))
    for name, t in base.items():
        deltas = torch.empty((2, *t.shape))
        nbytes = fill_deltas(ex, name, deltas, base_r.view(name), CPU, torch.float32)
        want = torch.stack([e.full.view(name).float() - t.float() for e in ex if e.full is not None])
        assert torch.equal(deltas, want)
        assert nbytes == 2 * t.numel() * t.element_size()


def test_add_base_chunked_equals_mixed_add(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan, "CHUNK", 5)
    g = torch.Generator().manual_seed(1)
    upd, base = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g).to(torch.bfloat16)
    want = upd.clone().add_(base)
    assert torch.equal(add_base_(upd, base), want)


def test_writer_converts_floating_tensors_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "_CHUNK", 4)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 5, generator=g), torch.randn(2, generator=g).to(torch.bfloat16)
    w = ShardWriter(tmp_path, [OutSpec("a", torch.bfloat16, (3, 5)), OutSpec("b", torch.float32, (2,))], 1 << 20)
    w.write("a", a)
    w.write("b", b)
    w.close()
    got = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(got["a"], a.to(torch.bfloat16)) and torch.equal(got["b"], b.float())
    w2 = ShardWriter(tmp_path / "x", [OutSpec("i", torch.int64, (2,))], 1 << 20)
    with pytest.raises(ValueError, match="writer expected"):
        w2.write("i", torch.zeros(2, dtype=torch.int32))  # integers are never converted


def test_buffer_pool_reuses_only_unshared_buffers() -> None:
    pool = BufferPool([128, 128, 96, 96], cap=1 << 20)
    t = pool.take((4, 8), torch.float32, CPU)  # 128 bytes
    ptr = t.data_ptr()
    pool.give(t)
    del t
    u = pool.take((4, 8), torch.float32, CPU)  # served from the kept buffer
    assert u.data_ptr() == ptr and u.shape == (4, 8) and u.is_contiguous()
    view = u[0]
    pool.give(u)  # a view survives: not kept
    v = pool.take((3, 8), torch.float32, CPU)  # 96 bytes: would fit, but nothing was kept
    assert v.data_ptr() != ptr
    del view


def test_buffer_pool_keeps_only_what_a_later_request_can_use() -> None:
    pool = BufferPool([400, 128, 40, 128], cap=1 << 20)
    big = pool.take((100,), torch.float32, CPU)  # 400 bytes: no later request of 200 to 400 bytes
    pool.give(big)
    del big
    assert pool.take((32,), torch.float32, CPU) is not None and not pool._free  # dropped, not pinned by 128 bytes
    a = pool.take((10,), torch.float32, CPU)  # 40 bytes
    pool.give(a)  # no 40-byte request left: dropped
    assert not pool._free


def test_buffer_pool_keeps_at_most_cap_bytes() -> None:
    pool = BufferPool([128, 64, 64, 128], cap=150)
    a, b = pool.take((32,), torch.float32, CPU), pool.take((16,), torch.float32, CPU)  # 128 and 64 bytes
    pa = a.data_ptr()
    pool.give(a)
    pool.give(b)  # 192 bytes kept would pass the cap: the smallest is dropped
    del a, b
    assert pool.take((32,), torch.float32, CPU).data_ptr() == pa
    assert not pool._free


def test_a_global_methods_statistics_passes_reuse_the_stacks_too(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """TIES ``scope: global`` streams the merged tensors once more per statistics pass: those passes used up the
    pool's count of requests (sized for the merge pass only) and gave nothing back, so neither they nor the merge
    pass after them reused a stack. The merged weights do not change."""
    pools: list[BufferPool] = []

    class Recording(BufferPool):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, **kw)  # type: ignore[arg-type]
            pools.append(self)

    g = torch.Generator().manual_seed(0)
    layers = {f"model.layers.{i}.mlp.{p}.weight": torch.randn(24, 16, generator=g) for i in range(8)
              for p in ("up_proj", "gate_proj")}
    base = _ckpt(tmp_path / "base", layers)
    experts = [_ckpt(tmp_path / f"e{j}", {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in layers.items()})
               for j in range(3)]
    recipe = MergeRecipe.build(base=base, experts=experts, method="ties", params={"scope": "global", "density": 0.3},
                               policy=[], device="cpu")
    want = run_merge(recipe, tmp_path / "plain")
    monkeypatch.setattr(loop, "BufferPool", Recording)
    rep = run_merge(recipe, tmp_path / "pooled")
    stacked = [t for t in rep.tensors if t.rule in ("merge", "average")]
    takes = rep.stats_passes * sum(t.rule == "merge" for t in stacked) + len(stacked)
    assert rep.stats_passes >= 1 and takes >= 32
    # only the first requests of each size allocate (as many as are in flight at once: the one being merged, two
    # queued, one being read):
    # the statistics passes and the merge pass after them reuse the rest
    assert pools[0].reused >= takes - 4 * len({t.shape for t in stacked})
    assert want.stats_passes == rep.stats_passes
    for shard in rep.shards:
        got, same = load_file(str(tmp_path / "pooled" / shard)), load_file(str(tmp_path / "plain" / shard))
        assert got.keys() == same.keys() and all(torch.equal(v, same[k]) for k, v in got.items())
