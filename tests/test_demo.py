"""`mergelab demo` end to end on a tiny zoo: both settings in their own experiments, reference runs, the
comparison with test metrics at the val-selected lambda, registration, a campaign, promotion; a second run reuses
everything and reports the champion the registry holds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("mlflow")


@pytest.mark.slow
def test_demo_end_to_end_on_tiny_zoo_then_again_idempotent(tmp_path: Path, tiny_zoo: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from mlflow import MlflowClient

    from mergelab.platform.demo import format_rows, run_demo

    torch.set_num_threads(1)
    monkeypatch.setenv("MERGELAB_DATA", str(tmp_path / "data"))
    for var in ("MLFLOW_TRACKING_URI", "MERGELAB_OPTUNA_STORAGE", "MERGELAB_ROOT", "MERGELAB_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    kw = dict(tiny=True, zoo=tiny_zoo, root=tmp_path / "mlruns", methods=("weight_average", "optmerge"),
              lam_grid=(0.5, 1.0), trials=2, limit=4, test_limit=4, device="cpu",
              data_sizes={"val": 4, "test": 4})
    logs: list[str] = []
    res = run_demo(log=logs.append, **kw)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    assert [s.setting for s in res.settings] == ["full", "lora"]
    for s in res.settings:
        names = [r["name"] for r in s.rows]
        assert names[:7] == ["base", "expert vqa", "expert geometry", "expert chart", "expert ocr",
                             "expert grounding", "mixture"]
        assert names[7:9] == ["weight_average", "optmerge"]
        for r in s.rows[:9]:
            assert math.isfinite(r["average"]) and 0.0 <= r["average"] <= 100.0
            assert all(math.isfinite(v) for v in r["scores"].values())
        assert "optmerge" in format_rows(s.rows) and "items" in format_rows(s.rows).splitlines()[0]
        assert all(r["items"] == 20 for r in s.rows[:7])  # 4 test items x 5 tasks, said on every row
        exp = client.get_experiment_by_name(s.experiment)
        assert exp is not None and s.experiment == f"mergelab-demo-{s.setting}-tiny"
        runs = client.search_runs([exp.experiment_id], max_results=500)
        refs = [r for r in runs if r.data.tags.get("mergelab.role") == "reference"]
        assert len(refs) == 7 and all("test/vqa" in r.data.metrics and r.data.tags["test.items"] == "20"
                                      for r in refs)
        comparison = [r for r in runs if r.data.tags.get("mergelab.role") == "comparison"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == comparison[0].info.run_id]
        assert len(children) == 1 + 2  # weight_average has no lambda; optmerge one run per lambda
        selected = [r for r in children if r.data.tags.get("mergelab.selected")]
        assert len(selected) == 2 and all("test/average" in r.data.metrics for r in selected)
        # the registry: a champion, the campaign's versions, none pointing at nothing
        name = f"mergelab-demo-{s.setting}-tiny"
        assert s.champion is not None and s.champion["holder"] is not None
        assert s.campaign is not None and s.campaign["complete"] == 2
        # the campaign's start points include OptMerge started from the comparison's best init-able method on val
        assert any(f"[{s.setting}] start point: OptMerge from the weight_average merge" in x for x in logs)
        assert s.promotion is not None and s.promotion["decision"] in {"champion", "challenger", "already_champion"}
        for mv in client.search_model_versions(f"name='{name}'"):
            assert Path(mv.source.removeprefix("file://")).is_dir(), f"v{mv.version} points at nothing"
        assert len({mv.tags.get("mergelab.recipe") for mv in client.search_model_versions(f"name='{name}'")}) == \
            len(client.search_model_versions(f"name='{name}'"))

    # a second run: nothing merged again, no trial run, no promotion repeated, the same champion reported
    n_runs = {s.setting: len(client.search_runs([client.get_experiment_by_name(s.experiment).experiment_id],
                                                max_results=500)) for s in res.settings}
    again = run_demo(log=logs.append, **kw)
    for before, after in zip(res.settings, again.settings, strict=True):
        assert after.champion["holder"] == before.champion["holder"]
        assert any("reference base" in x for x in after.skipped)
        assert any("not merged again" in x for x in after.skipped)
        assert any("nothing run" in x for x in after.skipped)
        assert any(x.startswith("promotion of") for x in after.skipped)
        exp_id = client.get_experiment_by_name(after.experiment).experiment_id
        assert len(client.search_runs([exp_id], max_results=500)) == n_runs[after.setting] + 1  # the comparison run
