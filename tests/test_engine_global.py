"""Engine integration of global TIES: all-zero tensors count toward the global rank; DARE-TIES global masks follow
the merge seed."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_state, write_sharded

from mergelab.engine import CheckpointReader, merge
from mergelab.methods._sparsify import disjoint_merge, trim_to_threshold

ZERO = "model.layers.0.mlp.up_proj.weight"  # identical in base and every expert: an all-zero task vector


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader(d)
    return {k: r.get(k) for k in r.keys()}


def experts_with_a_zero_tensor(root: Path, n: int = 3) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    base = tiny_state(0)
    paths, states = [], []
    for i in range(n):
        g = torch.Generator().manual_seed(20 + i)
        sd = {
            k: (v.clone() if k == ZERO else v + 0.1 * torch.randn(v.shape, generator=g))
            for k, v in base.items()
        }
        paths.append(write_sharded(root / f"e{i}", sd, n_shards=1))
        states.append(sd)
    return paths, states


def test_global_ties_counts_all_zero_tensors_in_the_rank(tiny_checkpoint: Path, tmp_path: Path) -> None:
    paths, states = experts_with_a_zero_tensor(tmp_path)
    base = tiny_state(0)
    density = 0.3
    rep = merge(
        base=tiny_checkpoint,
        experts=paths,
        method="ties",
        params={"scope": "global", "density": density},
        policy=[],
        out=tmp_path / "o",
        device="cpu",
    )
    assert rep.stats_passes == 2 and rep.counts.get("zero") == 1
    got = load_dir(tmp_path / "o")
    deltas = {k: torch.stack([s[k] - v for s in states]) for k, v in base.items()}
    flat = torch.cat([d.reshape(3, -1) for d in deltas.values()], dim=1).abs()  # the zero tensor included
    thr = flat.kthvalue(int(flat.shape[1] * (1 - density)), dim=1).values
    nonzero = torch.cat([d.reshape(3, -1) for k, d in deltas.items() if k != ZERO], dim=1).abs()
    thr_without = nonzero.kthvalue(int(nonzero.shape[1] * (1 - density)), dim=1).values
    assert (thr < thr_without).all()  # the zeros move the rank: the test tells the two apart
    assert torch.equal(got[ZERO], base[ZERO])
    for k, v in base.items():
        if k != ZERO:
            want = v + disjoint_merge(trim_to_threshold(deltas[k], thr))
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6, msg=k)


def test_dare_ties_global_masks_follow_the_merge_seed(tiny_checkpoint: Path, tmp_path: Path) -> None:
    paths, _ = experts_with_a_zero_tensor(tmp_path)
    kw = dict(base=tiny_checkpoint, experts=paths, method="dare_ties", policy=[], device="cpu")
    glob = {"scope": "global", "density": 0.4, "drop_rate": 0.5}
    ra = merge(out=tmp_path / "a", seed=1, params=glob, **kw)
    merge(out=tmp_path / "b", seed=1, params=glob, **kw)
    merge(out=tmp_path / "c", seed=2, params=glob, **kw)
    assert ra.params["seed"] == 1 and ra.stats_passes == 2
    a, b, c = (load_dir(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # a seed the user sets in params wins over the merge seed
    fixed = {**glob, "seed": 7}
    rd = merge(out=tmp_path / "d", seed=1, params=fixed, **kw)
    merge(out=tmp_path / "e", seed=2, params=fixed, **kw)
    d, e = load_dir(tmp_path / "d"), load_dir(tmp_path / "e")
    assert rd.params["seed"] == 7 and all(torch.equal(d[k], e[k]) for k in d)
