"""The fused CPU path for elementwise merges (engine/fused.py): bit-identical to the stacked path, same checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab.engine import MergeError, fused, loop, merge

SHAPES = {"model.layers.0.mlp.up_proj.weight": (37, 29), "model.norm.weight": (29,), "lm_head.weight": (61, 29),
          "model.embed_tokens.weight": (300, 64)}  # 19,200 entries: TIES's radix select (from 2^14) in both paths


def _ckpt(d: Path, tensors: dict[str, torch.Tensor]) -> Path:
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
    return d


def _family(root: Path, n: int, dtype: torch.dtype, seed: int = 0) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    base_dir = _ckpt(root / "base", base)
    experts = []
    for i in range(n):
        e = {k: (v.float() + 0.05 * (i + 1) * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        experts.append(_ckpt(root / f"e{i}", e))
    return base_dir, experts


def _run(monkeypatch: pytest.MonkeyPatch, on: bool, out: Path, native: bool = False,
         **kw: object) -> tuple[dict[str, torch.Tensor], object]:
    """Merge with the fused path on or off; ``calls`` names the tensors it merged (the torch form or, with
    ``native``, TIES's compiled kernels, waited for; without, they are not used)."""
    monkeypatch.setattr(loop, "_FUSED", on)
    monkeypatch.setattr(loop, "_NATIVE_WAIT", native)
    calls = []
    real, real_native = loop.fused_merge, loop.native_ties

    def spy(*a: object, **k: object) -> object:
        calls.append(a[0].item.name)  # type: ignore[attr-defined]
        return real(*a, **k)

    def spy_native(*a: object, **k: object) -> object:
        res = real_native(*a, **k) if native else None
        if res is not None:
            calls.append(a[0].item.name)  # type: ignore[attr-defined]
        return res

    monkeypatch.setattr(loop, "fused_merge", spy)
    monkeypatch.setattr(loop, "native_ties", spy_native)
    rep = merge(out=out, policy=[], **kw)  # type: ignore[arg-type]
    return load_file(str(out / "model.safetensors")), (rep, calls)


CASES = [
    ("task_arithmetic", {"lam": 1.0}, 2, torch.bfloat16, None),
    ("task_arithmetic", {"lam": 0.7}, 5, torch.bfloat16, None),
    ("task_arithmetic", {"lam": 0.3, "coefficients": [1.5, -0.5, 0.25]}, 3, torch.float32, None),
    ("task_arithmetic", {"lam": 1.0}, 1, torch.float16, None),
    ("weight_average", {}, 4, torch.bfloat16, None),
    ("weight_average", {"coefficients": [2.0, 1.0]}, 2, torch.float32, "float64"),
    ("tsv", {"lam": 0.5}, 3, torch.bfloat16, None),  # matrix-only: its "average" tensors take the fused path
    ("ties", {"lam": 1.0, "density": 0.2}, 2, torch.bfloat16, None),  # bf16-exact deltas: one select pass
    ("ties", {"lam": 0.6, "density": 0.5}, 5, torch.float32, None),  # float32 deltas: the low-half pass too
    ("ties", {"density": 0.3, "topk": "exact"}, 3, torch.bfloat16, None),
    ("ties", {"density": 1.0}, 2, torch.float16, None),  # nothing trimmed: the select skipped
    ("dare_ties", {"drop_rate": 0.0, "density": 0.4}, 4, torch.bfloat16, "float64"),
]


@pytest.mark.parametrize(("method", "params", "n", "dtype", "cdtype"), CASES)
def test_fused_equals_stacked_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
                                          params: dict, n: int, dtype: torch.dtype, cdtype: str | None) -> None:
    monkeypatch.setattr(fused, "_CHUNK", 64)  # many chunks per tensor and a short last one
    monkeypatch.setattr(loop, "_PREFETCH_BYTES", 1)  # every stack counts as large: TIES fused for float32 inputs too
    base, experts = _family(tmp_path / "in", n, dtype)
    kw = dict(base=base, experts=experts, method=method, params=params)
    if cdtype:
        kw["compute_dtype"] = cdtype
    got, (rep, calls) = _run(monkeypatch, True, tmp_path / "fused", **kw)
    want, (rep0, calls0) = _run(monkeypatch, False, tmp_path / "stacked", **kw)
    assert calls0 == []
    if method == "tsv":  # only the tensors the engine averages; the decoder's matrices go to TSV
        averaged = [r.name for r in rep.tensors if r.rule == "average"]  # type: ignore[attr-defined]
        assert "model.norm.weight" in averaged and "model.layers.0.mlp.up_proj.weight" not in averaged
        assert calls == averaged
    else:
        assert sorted(calls) == sorted(SHAPES)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k  # bits, signed zeros included
    for r, r0 in zip(rep.tensors, rep0.tensors, strict=True):  # type: ignore[attr-defined]
        assert (r.name, r.rule) == (r0.name, r0.rule)
        assert r.expert_norms == pytest.approx(r0.expert_norms, rel=1e-5)
        assert r.merged_norm == pytest.approx(r0.merged_norm, rel=1e-5)


def test_dare_and_global_methods_keep_the_stacked_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, experts = _family(tmp_path / "in", 2, torch.bfloat16)
    for i, (method, params) in enumerate([("dare_task_arithmetic", {"drop_rate": 0.2}), ("ties", {"scope": "global"}),
                                          ("dare_ties", {"drop_rate": 0.2}), ("ties", {"coefficients": [1.0, 2.0]}),
                                          ("ties", {"normalize": False})]):
        _, (_, calls) = _run(monkeypatch, True, tmp_path / f"o{i}", base=base, experts=experts, method=method,
                             params=params)
        assert calls == [], method


def test_ties_keeps_the_stacked_path_for_small_float32_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # its passes form every chunk again: worth it for 16-bit inputs or a stack above the read-ahead budget only
    for dtype, fused_names in ((torch.float32, []), (torch.bfloat16, sorted(SHAPES))):
        base, experts = _family(tmp_path / str(dtype), 2, dtype)
        _, (_, calls) = _run(monkeypatch, True, tmp_path / f"o-{dtype}", base=base, experts=experts, method="ties")
        assert sorted(calls) == fused_names, dtype


def test_zero_task_vectors_give_the_base_with_its_signed_zeros(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "_CHUNK", 8)
    w = torch.tensor([[-0.0, 0.0, 1.5], [2.0, -0.0, -3.0]] * 5)
    base = _ckpt(tmp_path / "base", {"w": w})
    experts = [_ckpt(tmp_path / f"e{i}", {"w": w.clone()}) for i in range(2)]
    got, (rep, calls) = _run(monkeypatch, True, tmp_path / "out", base=base, experts=experts,
                             method="task_arithmetic", params={"lam": 0.5})
    assert calls == ["w"]
    assert torch.equal(got["w"].view(torch.int32), w.view(torch.int32))  # -0.0 stays -0.0 (0 + -0.0 would not)
    (rec,) = rep.tensors  # type: ignore[attr-defined]
    assert rec.rule == "zero" and rec.expert_norms == [0.0, 0.0]


def test_a_tiny_delta_whose_norm_underflows_is_not_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.zeros(6)
    e = w.clone()
    e[3] = 1e-45  # the smallest float32 subnormal: its square is 0
    base = _ckpt(tmp_path / "base", {"w": w})
    experts = [_ckpt(tmp_path / "e0", {"w": e})]
    got, (rep, _) = _run(monkeypatch, True, tmp_path / "out", base=base, experts=experts,
                         method="task_arithmetic", params={"lam": 1.0})
    assert rep.tensors[0].rule == "merge"  # type: ignore[attr-defined]
    assert torch.equal(got["w"], e)


def test_nan_in_an_expert_names_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "_CHUNK", 16)
    base, experts = _family(tmp_path / "in", 2, torch.float32)
    t = load_file(str(experts[1] / "model.safetensors"))
    t["lm_head.weight"][40, 3] = float("nan")
    save_file(t, str(experts[1] / "model.safetensors"))
    monkeypatch.setattr(loop, "_FUSED", True)
    with pytest.raises(MergeError, match=r"e1/model.safetensors: tensor lm_head.weight contains NaN or Inf \(expert e1\)"):
        merge(out=tmp_path / "out", base=base, experts=experts, method="task_arithmetic", policy=[])
    assert not (tmp_path / "out").exists()


def test_an_overflowing_merge_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.zeros(4, 4)
    e = torch.full((4, 4), 3e38)  # finite, but the sum of two overflows float32
    base = _ckpt(tmp_path / "base", {"w": w})
    experts = [_ckpt(tmp_path / f"e{i}", {"w": e}) for i in range(2)]
    monkeypatch.setattr(loop, "_FUSED", True)
    with pytest.raises(MergeError, match="tensor w: the merged task vector contains NaN or Inf"):
        merge(out=tmp_path / "out", base=base, experts=experts, method="task_arithmetic", policy=[])


def test_huge_finite_values_are_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the squares overflow (the norm is inf) but every entry is finite: the chunk is formed again and passes
    w = torch.zeros(8)
    e = torch.full((8,), 1e20)
    base = _ckpt(tmp_path / "base", {"w": w})
    experts = [_ckpt(tmp_path / "e0", {"w": e})]
    got, (rep, calls) = _run(monkeypatch, True, tmp_path / "out", base=base, experts=experts,
                             method="task_arithmetic", params={"lam": 1.0})
    assert calls == ["w"] and torch.equal(got["w"], e)


# TIES's compiled kernels (engine/ties_kernels.py, numba): the same bits as the stacked path
NATIVE_CASES = [c for c in CASES if c[0] == "ties"]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("bracket", ["sampled", "missed", "shifted"])
@pytest.mark.parametrize(("method", "params", "n", "dtype", "cdtype"), NATIVE_CASES)
def test_ties_compiled_kernels_equal_the_stacked_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
                                                      params: dict, n: int, dtype: torch.dtype, cdtype: str | None,
                                                      bracket: str, threads: int) -> None:
    """Bit for bit, in one thread and in rounds of three (each with its own candidates and sums)."""
    pytest.importorskip("numba")
    monkeypatch.setattr(fused, "_NATIVE_SLAB", 1000)  # several slabs per tensor and a short last one
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the kernels' slots; torch itself unchanged
    monkeypatch.setattr(loop, "_PREFETCH_BYTES", 1)  # float32 inputs take the fused path too
    if bracket == "missed":  # a bracket that never holds the threshold: the histogram passes select it
        monkeypatch.setattr(fused, "_bracket", lambda chunks, row, rank, *a: (0.0, 0.0, 1) if rank else (1e9, 1e9, 0))
    if bracket == "shifted":  # a bracket around another rank: decided entries merged wrongly, then merged again
        real = fused._bracket
        monkeypatch.setattr(fused, "_bracket", lambda chunks, row, rank, *a: real(chunks, row, rank // 2, *a))
    base, experts = _family(tmp_path / "in", n, dtype)
    kw = dict(base=base, experts=experts, method=method, params=params)
    got, (rep, calls) = _run(monkeypatch, True, tmp_path / "native", native=True, **kw)
    native = [c for c in calls]
    want, (rep0, calls0) = _run(monkeypatch, False, tmp_path / "stacked", **kw)
    assert calls0 == [] and sorted(native) == sorted(SHAPES)
    for k in want:
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
    for r, r0 in zip(rep.tensors, rep0.tensors, strict=True):  # type: ignore[attr-defined]
        assert r.expert_norms == pytest.approx(r0.expert_norms, rel=1e-5)
        assert r.merged_norm == pytest.approx(r0.merged_norm, rel=1e-5)


def test_ties_kernels_a_threshold_value_repeated_past_the_candidates_buffer(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit task vectors repeat values: when the sample brackets one value and the tensor holds more entries of it
    than the candidates' buffer, that value is the threshold, found without the histogram passes."""
    pytest.importorskip("numba")
    from mergelab.engine import ties_kernels

    def no_histograms(*a: object) -> None:
        raise AssertionError("histogram pass")

    monkeypatch.setattr(ties_kernels, "high_pass", no_histograms)
    monkeypatch.setattr(loop, "_PREFETCH_BYTES", 1)
    g = torch.Generator().manual_seed(5)
    n = 40_000  # two magnitudes of about 20,000 entries each: more than the buffer's 2^14
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    mags = torch.tensor([2.0**-6, 2.0**-5])
    ex = [(base.float() + mags[torch.randint(0, 2, (n,), generator=g)]
           * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)).to(torch.bfloat16) for _ in range(2)]
    b = _ckpt(tmp_path / "q" / "base", {"w": base})
    experts = [_ckpt(tmp_path / "q" / f"e{i}", {"w": e}) for i, e in enumerate(ex)]
    seen = []
    real = fused._bracket

    def spy(chunks: object, row: int, rank: int, *a: object) -> tuple[float, float, int]:
        seen.append(real(chunks, row, rank, *a))  # type: ignore[arg-type]
        return seen[-1]

    monkeypatch.setattr(fused, "_bracket", spy)
    kw = dict(base=b, experts=experts, method="ties", params={"density": 0.2})
    got, (_, calls) = _run(monkeypatch, True, tmp_path / "native", native=True, **kw)
    want, _ = _run(monkeypatch, False, tmp_path / "stacked", **kw)
    assert calls == ["w"] and seen and all(lo == hi for lo, hi, _ in seen)
    assert torch.equal(got["w"].view(torch.int16), want["w"].view(torch.int16))


def test_ties_kernels_sampled_while_they_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor that waits for the kernels takes its sample while they load (as in a new process), same bits."""
    pytest.importorskip("numba")
    import threading

    from mergelab.engine import ties_kernels, ties_native

    monkeypatch.setattr(ties_native, "_warm", {})
    monkeypatch.setattr(ties_native, "_started", {})
    sampled = threading.Event()
    real_warm = ties_kernels.warm

    def slow_warm(*key: object) -> None:  # the load ends only after the first tensor's two samples
        sampled.wait(10)
        real_warm(*key)

    monkeypatch.setattr(ties_kernels, "warm", slow_warm)
    early = []
    real = fused._bracket

    def spy(chunks: object, row: int, rank: int, *a: object) -> tuple[float, float, int]:
        early.append(not ties_native.ready(2, "bf16", "bf16"))
        if len(early) == 2:
            sampled.set()
        return real(chunks, row, rank, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(fused, "_bracket", spy)
    base, experts = _family(tmp_path / "in", 2, torch.bfloat16)
    kw = dict(base=base, experts=experts, method="ties", params={"density": 0.3})
    got, (_, calls) = _run(monkeypatch, True, tmp_path / "native", native=True, **kw)
    want, _ = _run(monkeypatch, False, tmp_path / "stacked", **kw)
    assert sorted(calls) == sorted(SHAPES) and early[:2] == [True, True] and not any(early[2:])
    for k in want:
        assert torch.equal(got[k].view(torch.int16), want[k].view(torch.int16)), k


def test_ties_kernels_sample_a_large_tensor_with_plain_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large tensor's sample is read with plain reads (through the map, each of its runs would map a whole folio),
    the same values: same bits as the torch form."""
    pytest.importorskip("numba")
    from mergelab.engine import io

    monkeypatch.setattr(loop, "_NATIVE_WAIT", True)
    monkeypatch.setattr(fused, "_UNMAPPED_SAMPLE_BYTES", 1)
    g = torch.Generator().manual_seed(9)
    base = torch.randn(400, 300, generator=g).to(torch.bfloat16)  # 120,000 entries: more than the sample's 65,536
    ex = [(base.float() + 0.05 * torch.randn(base.shape, generator=g)).to(torch.bfloat16) for _ in range(2)]
    b = _ckpt(tmp_path / "s" / "base", {"w": base})
    experts = [_ckpt(tmp_path / "s" / f"e{i}", {"w": e}) for i, e in enumerate(ex)]
    reads = []
    real_read = io.CheckpointReader.read_runs

    def spy(self: io.CheckpointReader, name: str, starts: object, run: int) -> torch.Tensor:
        got = real_read(self, name, starts, run)
        flat = self.view(name).reshape(-1)
        want = torch.cat([flat[int(s) : int(s) + run] for s in starts])  # type: ignore[attr-defined]
        reads.append(torch.equal(got.view(torch.int16), want.view(torch.int16)))
        return got

    monkeypatch.setattr(io.CheckpointReader, "read_runs", spy)
    kw = dict(base=b, experts=experts, method="ties", params={"density": 0.2})
    got, (_, calls) = _run(monkeypatch, True, tmp_path / "native", native=True, **kw)
    want, _ = _run(monkeypatch, False, tmp_path / "stacked", **kw)
    assert calls == ["w"] and len(reads) == 4 and all(reads)  # each expert's runs and the base's
    assert torch.equal(got["w"].view(torch.int16), want["w"].view(torch.int16))
    with pytest.raises(MergeError, match="cannot read tensor w"):
        io.CheckpointReader(b).read_runs("w", [119_990], 64)  # past the file's end


def test_the_bracket_sample_grows_with_the_tensor() -> None:
    sizes = [fused.bracket_sample(n) for n in (1_000, 10**6, 14 * 10**6, 233 * 10**6, 10**10)]
    assert sizes[0] == sizes[1] == fused._BRACKET_SAMPLE and sizes[-1] == 1 << 21
    assert sizes == sorted(sizes) and sizes[2] > fused._BRACKET_SAMPLE and all(s % 256 == 0 for s in sizes)


def test_ties_compiled_kernels_only_for_bf16_and_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numba")
    used = []
    real = fused.native_ties

    def spy(*a: object, **k: object) -> object:
        res = real(*a, **k)
        used.append(res is not None)
        return res

    monkeypatch.setattr(loop, "_NATIVE_WAIT", True)
    monkeypatch.setattr(loop, "native_ties", spy)
    base, experts = _family(tmp_path / "in", 2, torch.float16)
    merge(out=tmp_path / "out", base=base, experts=experts, method="ties", policy=[])
    assert used and not any(used)  # float16: the torch form


def test_ties_compiled_kernels_signed_zeros_nan_and_overflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numba")
    monkeypatch.setattr(loop, "_NATIVE_WAIT", True)
    monkeypatch.setattr(loop, "_PREFETCH_BYTES", 1)
    w = torch.tensor([[-0.0, 0.0, 1.5], [2.0, -0.0, -3.0]] * 5).to(torch.bfloat16)
    base = _ckpt(tmp_path / "z" / "base", {"w": w})
    experts = [_ckpt(tmp_path / "z" / f"e{i}", {"w": w.clone()}) for i in range(2)]
    rep = merge(out=tmp_path / "z-out", base=base, experts=experts, method="ties", policy=[])
    got = load_file(str(tmp_path / "z-out" / "model.safetensors"))["w"]
    assert torch.equal(got.view(torch.int16), w.view(torch.int16)) and rep.tensors[0].rule == "zero"

    base, experts = _family(tmp_path / "in", 2, torch.bfloat16)
    t = load_file(str(experts[1] / "model.safetensors"))
    t["lm_head.weight"][40, 3] = float("nan")
    save_file(t, str(experts[1] / "model.safetensors"))
    with pytest.raises(MergeError, match=r"e1/model.safetensors: tensor lm_head.weight contains NaN or Inf"):
        merge(out=tmp_path / "nan-out", base=base, experts=experts, method="ties", policy=[])
    assert not (tmp_path / "nan-out").exists()

    w = torch.zeros(4, 4)
    e = torch.full((4, 4), 3e38)  # finite; the disjoint mean's sum of the two overflows float32
    base = _ckpt(tmp_path / "o" / "base", {"w": w})
    experts = [_ckpt(tmp_path / "o" / f"e{i}", {"w": e}) for i in range(2)]
    with pytest.raises(MergeError, match="tensor w: the merged task vector contains NaN or Inf"):
        merge(out=tmp_path / "o-out", base=base, experts=experts, method="ties", policy=[])


def test_threshold_selection_from_the_histograms() -> None:
    """The kernels' histograms (2^16 counts, bf16-exact magnitudes apart) go through the radix select's own
    ``locate`` and ``low_bits``."""
    from mergelab.methods._sparsify import locate, low_bits

    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(5000, generator=g).to(torch.bfloat16).float(), torch.randn(5000, generator=g)):
        a = x.abs()
        bits = a.view(torch.int32).numpy()
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        key = (a.view(torch.int32) >> 16) + (a.view(torch.int32) & 0xFFFF).clamp(max=1) * (1 << 15)
        hist += torch.bincount(key, minlength=1 << 16)
        for j in (1, 7, 2500, 4000, 5000):
            want = int(a.kthvalue(j).values.view(torch.int32))
            bucket, rank, found = locate(hist, True, j)
            if found is None:
                low = torch.bincount(torch.from_numpy(bits[(bits >> 16) == bucket] & 0xFFFF), minlength=1 << 16)
                found = low_bits(low, bucket, rank)
            assert found == want, j


def test_the_kernels_load_only_for_merges_they_pay_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine starts loading the compiled kernels (about a second of a core) only when the entries they would
    merge are enough to save that; a merge that does not start them merges with the torch form throughout."""
    from mergelab.engine import ties_native

    started: list[tuple[int, str, str]] = []
    monkeypatch.setattr(ties_native, "_warm", {})  # as in a new process: no warm-up started or finished
    monkeypatch.setattr(ties_native, "_started", {})
    monkeypatch.setattr(ties_native, "warm_up", lambda *key: started.append(key))
    monkeypatch.setattr(loop, "_NATIVE_WAIT", False)
    base, experts = _family(tmp_path / "in", 2, torch.bfloat16)
    merge(out=tmp_path / "small", base=base, experts=experts, method="ties", policy=[])
    assert started == []  # 22,000 entries: the torch form
    monkeypatch.setattr(ties_native, "pays", lambda numel: numel == sum(math.prod(s) for s in SHAPES.values()))
    merge(out=tmp_path / "paid", base=base, experts=experts, method="ties", policy=[])
    assert started == [(2, "bf16", "bf16")]


def test_a_warm_up_that_fails_leaves_the_torch_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that does not compile is not used, and nobody waits for it for ever."""
    pytest.importorskip("numba")
    from mergelab.engine import ties_kernels, ties_native

    def broken(*key: object) -> None:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(ties_native, "_warm", {})
    monkeypatch.setattr(ties_native, "_started", {})
    monkeypatch.setattr(ties_kernels, "warm", broken)
    assert ties_native.ready(11, "bf16", "f32", wait=True) is False
    assert ties_native.ready(11, "bf16", "f32") is False


def test_the_fixed_count_blocks_are_the_generators_output() -> None:
    """The kernels' generated section is what ``python -m mergelab.engine.ties_fixed_gen`` writes (edit the
    generator, not the section)."""
    from mergelab.engine import ties_fixed_gen

    assert ties_fixed_gen.section(ties_fixed_gen.TARGET.read_text()) == ties_fixed_gen.source()


@pytest.mark.parametrize("n", [2, 3, 5, 8, 9])
def test_fixed_count_blocks_equal_the_generic_block(n: int) -> None:
    """The merge pass with the fixed-count blocks (2 to 8 experts; 9 takes the generic block) equals the generic
    block run over the same blocks: outputs, balance, non-finite count, norms, the entries waiting for the majority
    sign and their stored values."""
    pytest.importorskip("numba")
    import numpy as np

    from mergelab.engine import ties_kernels as tk

    rng = np.random.default_rng(n)
    size = 5000  # several blocks and a short last one
    base = (rng.standard_normal(size) * 0.02).astype(np.float32)
    es = [(base + rng.standard_normal(size).astype(np.float32) * 0.002).astype(np.float32) for _ in range(n)]
    es[0][:300] = base[:300]  # zero deltas
    es[1][300:600] = base[300:600] - (es[0][300:600] - base[300:600])  # opposite deltas: sums of 0, entries waiting
    for e in es[2:]:
        e[300:600] = base[300:600]
    b16 = (base.view(np.uint32) >> 16).astype(np.uint16)  # bf16 by truncation
    e16 = tuple((e.view(np.uint32) >> 16).astype(np.uint16) for e in es)
    th, lam = np.full(n, 0.0015, np.float32), np.float32(0.7)
    out = np.zeros(size, np.uint16)
    amb, ambx = np.zeros(size, np.int64), np.zeros((size, n + 1), np.float32)
    state, acc = np.zeros(2, np.int64), np.zeros(2)
    tk.merge_pass(b16, e16, 0, size, th, lam, size, out, amb, ambx, state, acc)
    ref = np.zeros(size, np.uint16)
    bufs = [np.empty(1024, np.float32), np.empty((n, 1024), np.float32), np.empty(1024, np.float32),
            np.empty(1024, np.int32), np.empty(1024, np.float32), np.empty(1024, np.float32),
            np.empty(1024, np.float32), np.zeros(1024, np.uint8)]
    bal = bad = 0
    sq = 0.0
    waiting: list[int] = []
    stored: list[np.ndarray] = []
    for i0 in range(0, size, 1024):
        m = min(1024, size - i0)
        bl, _, bd, s2 = tk._block(b16, e16, i0, m, th, lam, size, ref, *bufs)
        bal, bad, sq = bal + bl, bad + bd, sq + s2
        for t in np.flatnonzero(bufs[7][:m]):
            waiting.append(i0 + t)
            stored.append(np.concatenate([[bufs[0][t]], bufs[1][:, t]]))
    assert np.array_equal(out, ref)
    assert (state[1], acc[1]) == (bal, bad) and acc[0] == pytest.approx(sq, rel=1e-12)
    assert state[0] == len(waiting) > 0 and np.array_equal(amb[: state[0]], waiting)
    assert np.array_equal(ambx[: state[0]].view(np.uint32), np.array(stored, np.float32).view(np.uint32))
