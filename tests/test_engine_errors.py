"""Bad input: each case is one MergeError line naming the culprit, and nothing is left in the output path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_state, write_sharded

from mergelab.engine import ExpertSpec, MergeError, merge


def _expert(root: Path, edit: Callable[[dict[str, torch.Tensor]], None], name: str = "bad") -> Path:
    sd = {k: v + 0.01 for k, v in tiny_state(0).items()}
    edit(sd)
    return write_sharded(root / name, sd, n_shards=2)


def _truncate(root: Path) -> Path:
    d = _expert(root, lambda sd: None)
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    return d


CASES: dict[str, tuple[Callable[[Path], dict], str]] = {
    "shape": (
        lambda r: {"experts": [_expert(r, lambda sd: sd.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(24, 8)))]},
        r"tensor model\.layers\.1\.mlp\.up_proj\.weight: expert .*bad/model-0000\d-of-00002\.safetensors has shape "
        r"\(24, 8\), base has shape \(24, 16\)",
    ),
    "missing": (
        lambda r: {"experts": [_expert(r, lambda sd: sd.pop("model.layers.0.self_attn.q_proj.weight"))]},
        r"expert .*bad: tensor model\.layers\.0\.self_attn\.q_proj\.weight is missing",
    ),
    "renamed": (
        lambda r: {"experts": [_expert(r, lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))]},
        r"tensor model\.layers\.0\.extra\.weight is not in base",
    ),
    "nan": (
        lambda r: {"experts": [_expert(r, lambda sd: sd["model.layers.1.mlp.up_proj.weight"].__setitem__((3, 4), float("nan")))]},
        r"bad/model-00002-of-00002\.safetensors: tensor model\.layers\.1\.mlp\.up_proj\.weight contains NaN or Inf",
    ),
    "inf": (
        lambda r: {"experts": [r / "ok", _expert(r, lambda sd: sd["model.norm.weight"].__setitem__(0, float("inf")))],
                   "policy": []},
        r"bad/model-0000\d-of-00002\.safetensors: tensor model\.norm\.weight contains NaN or Inf \(expert bad\)",
    ),
    "truncated": (lambda r: {"experts": [_truncate(r)]}, r"bad/model-00002-of-00002\.safetensors: truncated"),
    "unknown_method": (lambda r: {"method": "tiez"}, r"method: unknown method 'tiez'; known: \[.*'ties'"),
    "out_of_range": (lambda r: {"method": "ties", "params": {"density": 1.5}}, r"params \(ties\): .*density"),
    "unknown_param": (lambda r: {"params": {"lamda": 1.0}}, r"params \(task_arithmetic\): unknown parameter.*lamda"),
    "coefficients": (
        lambda r: {"method": "ties", "experts": [ExpertSpec(r / "ok", coefficient=0.5)],
                   "params": {"coefficients": [0.5]}},
        r"experts: coefficients given both per expert and in params\.coefficients",
    ),
    "device": (lambda r: {"device": "tpu"}, r"device: "),
    "dtype": (lambda r: {"dtype": "float13"}, r"dtype: unknown dtype 'float13'"),
    "base_missing": (lambda r: {"base": r / "nope"}, r"nope: checkpoint directory not found"),
    "policy": (lambda r: {"policy": "qwen9"}, r"policy: unknown preset 'qwen9'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_the_culprit(case: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    write_sharded(tmp_path / "ok", {k: v + 0.02 for k, v in tiny_state(0).items()}, n_shards=1)
    make, pattern = CASES[case]
    kw = {"base": tiny_checkpoint, "experts": [tmp_path / "ok"], "method": "task_arithmetic", "policy": "llama",
          "device": "cpu", **make(tmp_path)}
    out = tmp_path / "out" / "merged"
    with pytest.raises(MergeError) as ei:
        merge(out=out, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    assert pytest.importorskip("re").search(pattern, msg), msg
    assert not out.exists() and not out.parent.exists()  # not even the parent this call would have created


def test_existing_output_is_refused_without_overwrite(tiny_checkpoint: Path, tmp_path: Path) -> None:
    e = write_sharded(tmp_path / "ok", {k: v + 0.02 for k, v in tiny_state(0).items()}, n_shards=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match=r"out: .*out already exists \(pass overwrite=True / --overwrite"):
        merge(base=tiny_checkpoint, experts=[e], method="task_arithmetic", policy="llama", out=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and len(list(tmp_path.iterdir())) == 3
    with pytest.raises(MergeError, match="overlaps input"):
        merge(base=tiny_checkpoint, experts=[e], method="task_arithmetic", policy="llama", out=e / "sub")


def test_failure_mid_stream_leaves_nothing_behind(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from mergelab.methods.base import MethodSpec

    e = write_sharded(tmp_path / "ok", {k: v + 0.02 for k, v in tiny_state(0).items()}, n_shards=1)
    calls = []

    def boom(b: torch.Tensor, d: torch.Tensor, cfg: object, ctx: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return d.sum(0)

    spec = MethodSpec(boom, type("Cfg", (), {"__dataclass_fields__": {}}))
    (tmp_path / "dst").mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        merge(base=tiny_checkpoint, experts=[e], method=spec, policy=[], out=tmp_path / "dst" / "m")
    assert list((tmp_path / "dst").iterdir()) == []
