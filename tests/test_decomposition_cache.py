"""The decomposition cache: hits give bit-identical merges, the byte bound holds, a changed input misses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mergelab.engine import CheckpointReader, merge
from mergelab.engine.cache import (
    CACHE_ENV,
    DecompositionLRU,
    cache_bytes_from_env,
    default_cache_bytes,
    process_cache,
    value_bytes,
)
from mergelab.methods import METHODS, MergeContext

# (method, params of a first trial, params of a second trial that shares the cached decompositions)
TRIALS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("optmerge", {"variant": "full"}, {"variant": "full", "steps": 7, "lr": 1e-3, "rank_ratio": 0.2}),
    ("optmerge", {"variant": "lora", "svd": "gram"}, {"variant": "lora", "svd": "gram", "init": "mean"}),
    ("optmerge", {"variant": "full", "svd": "lapack"}, {"variant": "full", "svd": "lapack", "steps": 3}),
    ("optmerge", {"variant": "full", "optimizer": "adam", "steps": 5}, {"variant": "full", "optimizer": "adam"}),
    ("optmerge", {"variant": "lora"}, {"variant": "lora", "coefficients": (1.0, 0.0, 2.0)}),
    ("optmerge", {"variant": "full", "projector": "centred"}, {"variant": "full", "projector": "centred"}),
    ("wudi", {}, {"steps": 11, "lr": 5e-3}),
    ("swudi", {}, {"rank_ratio": 0.5, "init": "zero"}),
    ("swudi_a", {}, {"rank_scale": 0.5}),
    ("tsv", {}, {"rank_ratio": 0.5}),
    ("iso_c", {}, {"span_only": True}),
    ("iso_cts", {}, {"common_space_fraction": 0.5}),
    ("iso_cts", {}, {"lam": 0.3}),
]


def stack(seed: int = 0, m: int = 12, n: int = 20, n_exp: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_exp, m, n, generator=g) * 0.01


def run(method: str, params: dict[str, Any], deltas: torch.Tensor, cache: Any) -> torch.Tensor:
    spec = METHODS[method]
    cfg = spec.make_config(params)
    ctx = MergeContext(name="layer.w", generator=torch.Generator().manual_seed(0), cache=cache)
    return spec.fn(torch.zeros(deltas.shape[1:]), deltas.clone(), cfg, ctx)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
@pytest.mark.parametrize("method,first,second", TRIALS)
def test_cache_hits_are_bit_identical(
    method: str, first: dict[str, Any], second: dict[str, Any], shape: tuple[int, int]
) -> None:
    d = stack(m=shape[0], n=shape[1])
    cache = DecompositionLRU(1 << 30)
    for params in (first, second):
        assert torch.equal(run(method, params, d, cache), run(method, params, d, None)), params
    misses, hits = cache.misses, cache.hits
    assert misses >= 1 and hits >= 1  # the second trial reused part of the first one's work at least
    assert torch.equal(run(method, first, d, cache), run(method, first, d, None))
    assert cache.misses == misses and cache.hits > hits  # a repeated trial only hits


def test_changed_input_misses_and_stays_exact() -> None:
    d = stack()
    cache = DecompositionLRU(1 << 30)
    run("optmerge", {"variant": "full"}, d, cache)
    misses = cache.misses
    d2 = d.clone()
    d2[1, 3, 4] += 1e-6
    assert torch.equal(run("optmerge", {"variant": "full"}, d2, cache), run("optmerge", {"variant": "full"}, d2, None))
    assert cache.misses == 2 * misses and cache.hits == 0
    d3 = d.to(torch.float64)  # the same values in another dtype: another key
    run("optmerge", {"variant": "full"}, d3, cache)
    assert cache.misses == 3 * misses


def test_lru_respects_the_byte_bound() -> None:
    one = torch.zeros(256)  # 1 KiB
    cache = DecompositionLRU(3 * 1024)
    for i in range(3):
        cache.get_or_compute(("k", i), lambda: one.clone())
    assert cache.nbytes == 3 * 1024 and len(cache) == 3
    cache.get_or_compute(("k", 0), lambda: pytest.fail("a hit recomputed"))  # 0 is now the most recent
    cache.get_or_compute(("k", 3), lambda: (one.clone(), [one.clone()]))  # 2 KiB: evicts 1 and 2
    assert cache.nbytes <= cache.max_bytes and [k[1] for k in cache.keys()] == [0, 3]
    assert cache.evictions == 2 and cache.hits == 1
    big = cache.get_or_compute(("big",), lambda: torch.zeros(4096))  # larger than the bound: returned, not kept
    assert big.numel() == 4096 and ("big",) not in set(cache.keys())
    cache.resize(1024)
    assert cache.nbytes <= 1024 and len(cache) == 0
    assert value_bytes((one, "x", [one, None])) == 2048


def test_env_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_bytes_from_env() == default_cache_bytes() and 0 < default_cache_bytes() <= 2048 * 2**20
    monkeypatch.setenv(CACHE_ENV, "0")
    assert process_cache() is None
    monkeypatch.setenv(CACHE_ENV, "1.5")
    assert cache_bytes_from_env() == int(1.5 * 2**20) and process_cache().max_bytes == int(1.5 * 2**20)
    monkeypatch.setenv(CACHE_ENV, "lots")
    with pytest.raises(ValueError, match=CACHE_ENV):
        cache_bytes_from_env()


def read_all(path: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {k: reader.get(k) for k in reader.keys()}


@pytest.mark.parametrize("method,trials", [
    ("optmerge", [{"variant": "full", "lam": 1.0}, {"variant": "full", "lam": 0.5, "steps": 4, "rank_ratio": 0.3}]),
    ("tsv", [{"lam": 1.0}, {"lam": 0.3}]),
])
def test_run_merge_trials_reuse_the_cache(
    method: str, trials: list[dict[str, Any]], tiny_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_dir, experts = tiny_models("llama")
    monkeypatch.setenv(CACHE_ENV, "64")
    cache = process_cache()
    assert cache is not None
    cache.clear()
    cached, misses = [], []
    for i, params in enumerate(trials):
        merge(base=base_dir, experts=experts, method=method, params=params, out=tmp_path / f"c{i}", device="cpu")
        cached.append(read_all(tmp_path / f"c{i}"))
        misses.append(cache.misses)
    assert misses[0] > 0 and cache.hits > 0 and misses[1] - misses[0] < misses[0]  # the second trial reused work
    monkeypatch.setenv(CACHE_ENV, "0")
    for i, params in enumerate(trials):
        merge(base=base_dir, experts=experts, method=method, params=params, out=tmp_path / f"n{i}", device="cpu")
        fresh = read_all(tmp_path / f"n{i}")
        assert fresh.keys() == cached[i].keys()
        assert all(torch.equal(fresh[k], cached[i][k]) for k in fresh), params
