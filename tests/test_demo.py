"""`mergelab demo` end to end on a tiny zoo: comparison runs, registration, campaign, promotion."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("mlflow")


@pytest.mark.slow
def test_demo_end_to_end_on_tiny_zoo(tmp_path: Path, tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from mlflow import MlflowClient

    from mergelab.platform.demo import format_rows, run_demo

    torch.set_num_threads(1)
    monkeypatch.setenv("MERGELAB_DATA", str(tmp_path / "data"))
    for var in ("MLFLOW_TRACKING_URI", "MERGELAB_OPTUNA_STORAGE", "MERGELAB_ROOT", "MERGELAB_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    logs: list[str] = []
    res = run_demo(tiny=True, zoo=tiny_zoo, root=tmp_path / "mlruns",
                   methods=("weight_average", "task_arithmetic", "optmerge"), lam_grid=(0.5, 1.0), trials=2, limit=4,
                   device="cpu", data_sizes={"val": 4, "test": 4}, log=logs.append)  # fmt: skip

    names = [r["name"] for r in res.rows]
    assert names[:6] == ["base", "expert vqa", "expert geometry", "expert chart", "expert ocr", "expert grounding"]
    assert {"weight_average", "task_arithmetic", "optmerge"} <= set(names)
    for r in res.rows:
        assert math.isfinite(r["average"]) and 0.0 <= r["average"] <= 100.0
    table = format_rows(res.rows)
    assert "task_arithmetic" in table and "avg" in table.splitlines()[0]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mergelab-demo")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    comparison = [r for r in runs if r.data.tags.get("mergelab.role") == "comparison"]
    assert len(comparison) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == comparison[0].info.run_id]
    # weight_average has no lambda: 1 run; the others one run per lambda
    assert len(children) == 1 + 2 + 2
    assert all(r.info.status == "FINISHED" for r in children)
    assert all("val/average" in r.data.metrics for r in children)

    # the registry: the comparison's winner became champion; the campaign's top versions exist
    name = "mergelab-demo-lora-tiny"
    champ = client.get_model_version_by_alias(name, "champion")
    assert champ is not None and res.champion is not None
    assert res.champion["decision"] == "champion"
    assert res.campaign is not None and res.campaign["complete"] == 2
    assert res.promotion is not None and res.promotion["decision"] in {"champion", "challenger", "already_champion"}
    for mv in client.search_model_versions(f"name='{name}'"):
        src = mv.source.removeprefix("file://")
        assert Path(src).is_dir(), f"version {mv.version} points at nothing: {mv.source}"
