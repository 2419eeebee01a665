"""`mergelab merge CONFIG.yaml --out DIR` end to end, and MergeConfig field errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import tiny_state, write_sharded

from mergelab.engine import CheckpointReader
from mergelab.platform.cli import main
from mergelab.platform.merge_config import MergeConfigError, load_recipe, parse_size


def _recipe(tmp_path: Path, **over: Any) -> Path:
    for i in range(2):
        write_sharded(tmp_path / f"e{i}", {k: v + 0.1 * (i + 1) for k, v in tiny_state(0).items()}, n_shards=1)
    cfg = {"base": "base", "experts": ["e0", {"path": "e1", "coefficient": 0.5, "name": "second"}],
           "method": "task_arithmetic", "params": {"lam": 0.5}, "policy": "auto", "seed": 1, **over}
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_cli_merge_end_to_end(tiny_checkpoint: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, shard_size="1KB")
    runner = CliRunner()
    res = runner.invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "m"), "--report", str(tmp_path / "r.json"),
                              "--no-track"])
    assert res.exit_code == 0, res.output
    assert "method task_arithmetic" in res.output and "tensors: base 7, merge 4" in res.output
    r = CheckpointReader(tmp_path / "m")
    k = "model.layers.0.mlp.up_proj.weight"
    want = tiny_state(0)[k] + 0.5 * (0.1 + 0.5 * 0.2)
    torch.testing.assert_close(r.get(k), want, rtol=0, atol=1e-6)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["params"]["coefficients"] == [1.0, 0.5] and len(rep["tensors"]) == 11 and len(rep["shards"]) > 1
    # existing output: refused, then replaced with --overwrite
    res = runner.invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "m"), "--quiet", "--no-track"])
    assert res.exit_code != 0 and "already exists" in res.output and "--overwrite" in res.output
    res = runner.invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "m"), "--overwrite", "--device", "cpu",
                               "--no-track"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("over,pattern", [
    ({"params": {"density": 2.0}, "method": "ties", "experts": ["e0", "e1"]}, r"recipe\.yaml: params \(ties\): TiesConfig\.density must be in"),
    ({"method": "nope"}, r"recipe\.yaml: method: unknown method 'nope'"),
    ({"experts": []}, r"recipe\.yaml: experts: List should have at least 1 item"),
    ({"experts": [{"coefficient": 1.0}]}, r"recipe\.yaml: experts\.0\.path: Field required"),
    ({"device": "gpu"}, r"recipe\.yaml: device: unknown device 'gpu'"),
    ({"dtype": "fp12"}, r"recipe\.yaml: dtype: unknown dtype 'fp12'"),
    ({"seeed": 3}, r"recipe\.yaml: seeed: unknown key 'seeed' \(did you mean 'seed'\?\) \(line \d+\)"),
    ({"policy": {"rules": [{"pattern": "(", "action": "base"}]}}, r"recipe\.yaml: policy\.rules\.0\.pattern: invalid regex"),
    ({"policy": "qwen9"}, r"recipe\.yaml: policy: unknown preset 'qwen9'"),
    ({"experts": ["e0", {"path": "e1", "coefficient": 2}], "params": {"coefficients": [1, 2]}}, r"recipe\.yaml: experts: coefficients given both"),
    ({"shard_size": "lots"}, r"recipe\.yaml: shard_size: .*cannot parse size 'lots'"),
])
def test_config_errors_name_the_field(over: dict[str, Any], pattern: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, **over)
    with pytest.raises(MergeConfigError, match=pattern):
        load_recipe(recipe)
    res = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "m"), "--no-track"])
    assert res.exit_code != 0 and "Error:" in res.output and not (tmp_path / "m").exists()
    assert "Traceback" not in res.output


def test_config_resolves_paths_and_policy_forms(tiny_checkpoint: Path, tmp_path: Path) -> None:
    r = load_recipe(_recipe(tmp_path, policy={"preset": "llama", "rules": [{"pattern": "lm_head", "action": "average"}]}))
    assert r.base == str(tmp_path / "base") and r.experts[1].coefficient == 0.5
    assert r.experts[1].name == "second" and r.experts[0].name == "e0" and r.policy["preset"] == "llama"
    assert r.shard_size == 2_000_000_000 and r.experts[0].kind == "full"
    assert r.to_dict()["policy"]["rules"] == [{"pattern": "lm_head", "action": "average"}]
    assert parse_size("500MiB") == 500 * 2**20 and parse_size("2GB") == 2 * 10**9 and parse_size(7) == 7
