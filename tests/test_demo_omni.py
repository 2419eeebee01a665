"""`mergelab demo`'s omni section on the quick omni zoo (built in seconds) in a fresh store: its experiment,
reference runs, merges with test metrics, a campaign, a champion; a second run reuses everything. And the shipped
omni zoo: it records the current default plan, holds what the demo reads, and its ship command's copy loads."""

from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mergelab.bench.omni import ship  # noqa: E402
from mergelab.platform.demo_omni import demo_zoo  # noqa: E402
from mergelab.platform.store import Store  # noqa: E402


def test_the_shipped_omni_zoo_records_the_current_default_plan() -> None:
    """Fails when the default :class:`OmniPlan` changed after the zoo was shipped: regenerate it with
    ``python -m mergelab.bench.omni.ship`` (about 8 minutes on 2 cores)."""
    recorded = ship.recorded_plan()
    assert recorded is not None, f"no shipped omni zoo under {ship.SHIPPED_OMNI_ZOO}"
    want = json.loads(json.dumps(ship.shipped_plan().to_dict()))
    changed = sorted(k for k in set(want) | set(recorded) if want.get(k) != recorded.get(k))
    assert not changed, (f"the shipped omni zoo was built with another plan (fields {changed}); regenerate it: "
                         "python -m mergelab.bench.omni.ship")
    assert ship.is_current()


def test_the_shipped_omni_zoo_holds_what_the_demo_reads() -> None:
    """The base and each modality's adapter, its base named relatively (the campaign's template and the adapter's
    loader resolve it wherever the package is installed); nothing else is shipped."""
    from mergelab.platform.campaign_config import CampaignConfig
    from mergelab.platform.omni import omni_template

    root = ship.SHIPPED_OMNI_ZOO / "omni" / "seed0"
    for m in ("image", "audio", "video"):
        cfg = json.loads((root / "experts" / "lora" / m / "adapter" / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == ship.ADAPTER_BASE
        assert (root / "experts" / "lora" / m / "adapter" / cfg["base_model_name_or_path"] / "config.json").is_file()
    assert {p.name for p in root.iterdir()} == {"base", "experts", "build.json"}
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size < 20e6, f"the shipped omni zoo grew to {size / 1e6:.1f} MB"
    cfg = CampaignConfig.model_validate({"name": "t", "method": "optmerge", "params": {"variant": "lora"},
                                         "experts": {"omni_zoo": str(ship.SHIPPED_OMNI_ZOO), "kind": "lora"}})
    recipe, _ = omni_template(cfg)  # built: no OmniZooMissing, nothing to build
    assert [e.name for e in recipe.experts] == ["image", "audio", "video"]


def test_the_shipped_omni_zoo_is_package_data() -> None:
    """Every shipped file matches pyproject's package-data patterns (as the capability zoo's do), so a wheel holds
    the omni zoo."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()  # no tomllib on Python 3.10
    section = re.search(r'\[tool\.setuptools\.package-data\]\s*"\*" = \[([^\]]*)\]', text)
    assert section is not None
    patterns = re.findall(r'"([^"]+)"', section.group(1))
    files = [f for f in ship.SHIPPED_OMNI_ZOO.rglob("*") if f.is_file()]
    assert files and all(any(fnmatch.fnmatch(f.name, p) for p in patterns) for f in files)


def test_ship_writes_a_zoo_whose_adapters_load_from_their_new_place(tmp_path: Path) -> None:
    """:func:`ship.ship` with the quick plan: built in ``work``, copied to ``dest`` (an old copy replaced); the
    copied adapter loads onto the copied base with the built expert's weights."""
    import torch

    from mergelab.bench.omni.build import OmniPlan
    from mergelab.hf import load_model

    torch.set_num_threads(1)
    (tmp_path / "dest" / "omni" / "seed0" / "stale").mkdir(parents=True)
    dest = ship.ship(tmp_path / "dest", work=tmp_path / "work", jobs=1, plan=OmniPlan.quick(), log=lambda _: None)
    assert dest == tmp_path / "dest" / "omni" / "seed0" and not (dest / "stale").exists()
    assert ship.recorded_plan(tmp_path / "dest") == json.loads(json.dumps(OmniPlan.quick().to_dict()))
    model, _ = load_model(dest / "experts" / "lora" / "audio" / "adapter")
    want, _ = load_model(tmp_path / "work" / "omni" / "seed0" / "experts" / "lora" / "audio")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), want.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    with pytest.raises(SystemExit) as e:
        ship.main(["--help"])
    assert e.value.code == 0


@pytest.mark.slow
def test_omni_section_on_the_quick_zoo_then_again_idempotent(platform_store, tmp_path: Path) -> None:
    import torch

    from mergelab.bench.omni.table import EvalSizes
    from mergelab.platform.demo_omni import OmniDemo, run_omni

    torch.set_num_threads(1)
    spec = OmniDemo(methods=("weight_average", "optmerge"), lam_grid=(0.5, 1.0), trials=2,
                    sizes=EvalSizes(cross_val=7, task_val=0, cross_test=7, task_test=4))
    logs: list[str] = []
    res = run_omni(store=platform_store, tiny=True, spec=spec, device="cpu", log=logs.append)

    client = platform_store.client()
    assert res.experiment == "mergelab-demo-omni-tiny"
    exp = client.get_experiment_by_name(res.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    refs = {r.data.tags["mergelab.omni"]: r for r in runs if r.data.tags.get("mergelab.role") == "reference"}
    assert set(refs) == {"seed0/base", *(f"seed0/expert/{m}/lora" for m in ("image", "audio", "video"))}
    assert {"test/cross_avg", "test/music_avqa/qtype/audio_beeps", "test/own/audio"} <= set(
        refs["seed0/expert/audio/lora"].data.metrics)
    assert "test/own/image" not in refs["seed0/expert/audio/lora"].data.metrics  # its own medium only
    assert refs["seed0/base"].data.tags["test.items"] == str(2 * 7 + 6 * 4)
    comparison = [r for r in runs if r.data.tags.get("mergelab.role") == "comparison"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == comparison[0].info.run_id]
    assert len(children) == 1 + 2  # weight_average has no lambda; optmerge one run per lambda
    selected = [r for r in children if r.data.tags.get("mergelab.selected")]
    assert len(selected) == 2
    for r in selected:  # per set, per question type, per task, per modality, the cross-modal average
        m = r.data.metrics
        assert {"val/average", "test/cross_avg", "test/average", "test/music_avqa", "test/avqa",
                "test/task/video_motion", "test/own/video"} <= set(m)
        assert any(k.startswith("test/avqa/qtype/") for k in m)
        assert all(0.0 <= m[k] <= 100.0 for k in m if k.startswith("test/"))
    names = [r["name"] for r in res.rows]
    assert names[:6] == ["base", "expert image", "expert audio", "expert video", "weight_average", "optmerge"]
    assert all(math.isfinite(r["average"]) for r in res.rows)
    assert "MUSIC-AVQA" in res.table and "own audio" in res.table and "252 per set" in res.table
    assert res.campaign is not None and res.campaign["complete"] == 2
    # the campaign also starts from OptMerge started from the comparison's best init-able method
    assert any("[omni] start point: OptMerge from the weight_average merge (lam 1.0;" in x for x in logs)
    assert res.champion is not None and res.champion["holder"] is not None
    assert res.promotion is not None and res.promotion["decision"] in {"champion", "challenger", "already_champion"}
    versions = client.search_model_versions("name='mergelab-demo-omni-tiny'")
    assert len({v.tags.get("mergelab.recipe") for v in versions}) == len(versions)
    for v in versions:
        assert Path(v.source.removeprefix("file://")).is_dir(), f"v{v.version} points at nothing"

    # a second run: nothing merged or scored again, no trial run, no promotion repeated, the same champion
    again = run_omni(store=platform_store, tiny=True, spec=spec, device="cpu", log=logs.append)
    assert again.champion["holder"] == res.champion["holder"]
    assert any("reference seed0/base" in x for x in again.skipped)
    assert any("not merged again" in x for x in again.skipped)
    assert any("nothing run" in x for x in again.skipped)
    assert any(x.startswith("promotion of") for x in again.skipped)
    assert [r["scores"] for r in again.rows[:4]] == [r["scores"] for r in res.rows[:4]]  # the references
    for before, after in zip(res.rows[4:6], again.rows[4:6], strict=True):  # the table's items, not promotion's
        assert {k: after["scores"][k] for k in before["scores"]} == before["scores"]
    assert len(client.search_runs([exp.experiment_id], max_results=500)) == len(runs) + 1  # the comparison run


def test_demo_cli_has_the_omni_setting() -> None:
    from click.testing import CliRunner

    from mergelab.platform.cli import main

    out = CliRunner().invoke(main, ["demo", "--help"]).output
    assert "omni" in out and "--omni-trials" in out


def test_demo_zoo_never_builds_inside_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Seed 0 reads the shipped zoo; another seed goes to the data root's omni-zoo; tiny beside the store."""
    monkeypatch.setenv("MERGELAB_DATA", str(tmp_path / "data"))
    store = Store.resolve(tmp_path / "mlruns")
    assert demo_zoo(store, ship.SHIPPED_SEED, tiny=False) == ship.SHIPPED_OMNI_ZOO
    assert demo_zoo(store, 1, tiny=False) == tmp_path / "data" / "omni-zoo"
    assert demo_zoo(store, 1, tiny=True).parent == Path(store.tracking_uri.removeprefix("sqlite:///")).parent
