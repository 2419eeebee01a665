"""Registry: zero-copy versions, top-k pruning with no dangling version, promotion rules, `models:/NAME@champion`
loading into a working model, the `registry` CLI, and the import rule's counterpart (platform owns mlflow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest_platform import TableEvaluator

from mergelab.platform import promotion
from mergelab.platform import registry as reg
from mergelab.platform.store import TAG_WEIGHTS, Store, local_path


def _run_with_weights(store: Store, payload: bytes = b"w") -> tuple[str, str, Path]:
    client = store.client()
    run = client.create_run(store.experiment_id("reg", client), tags={"mergelab.role": "trial"})
    uri = f"{run.info.artifact_uri}/merged"
    path = local_path(uri)
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload)
    client.log_param(run.info.run_id, "method", "ties")
    return run.info.run_id, uri, path


def test_top_k_pruning_deletes_weights_with_versions_and_leaves_none_dangling(platform_store: Store) -> None:
    client = platform_store.client()
    made = []
    for score in (3.0, 1.0, 4.0, 1.5, 5.0):
        rid, uri, path = _run_with_weights(platform_store)
        mv = reg.register_run(client, "m", rid, uri, tags={"campaign": "c", "method": "ties"}, score=score)
        assert mv.source == uri  # zero-copy: the version points at the run's own directory
        made.append((str(mv.version), rid, path, score))
    client.set_registered_model_alias("m", "challenger", made[1][0])  # an aliased version is never pruned
    assert reg.would_enter_top_k(client, "m", "c", 4.5, "maximize", 2)
    assert not reg.would_enter_top_k(client, "m", "c", 3.5, "maximize", 2)
    deleted = reg.prune_campaign(client, "m", "c", keep=2)
    assert sorted(deleted) == sorted([made[0][0], made[3][0]])
    left = {str(v.version): v for v in reg.campaign_versions(client, "m", "c")}
    assert set(left) == {made[1][0], made[2][0], made[4][0]}
    for v in left.values():
        assert local_path(v.source).is_dir() and (local_path(v.source) / "model.safetensors").exists()
    for version, rid, path, _ in (made[0], made[3]):
        assert not path.exists() and client.get_run(rid).data.tags[TAG_WEIGHTS] == "deleted"
        with pytest.raises(ValueError, match="no such registered model version"):
            reg.get_version(client, f"models:/m/{version}")
    assert [str(v.version) for v in reg.ranked(list(left.values()))] == [made[4][0], made[2][0], made[1][0]]


def test_promotion_moves_champion_only_on_a_real_win(platform_store: Store) -> None:
    client = platform_store.client()
    table: dict[str, dict[str, float]] = {}
    versions = []
    for scores in ({"vqa": 50.0, "ocr": 50.0}, {"vqa": 50.3, "ocr": 50.1}, {"vqa": 60.0, "ocr": 45.0},
                   {"vqa": 53.0, "ocr": 49.0}):
        rid, uri, _ = _run_with_weights(platform_store)
        table[rid] = scores
        versions.append(str(reg.register_run(client, "p", rid, uri, tags={"eval.tasks": '["vqa", "ocr"]'}).version))
    ev = TableEvaluator(table)
    kw = dict(margin=0.5, max_task_drop=2.0, evaluator=ev, store=platform_store)  # no records: zero-width interval

    d1 = promotion.promote("p", version=versions[0], **kw)
    assert d1.decision == "champion" and d1.champion is None
    d2 = promotion.promote("p", version=versions[1], **kw)  # +0.2 on average: below the margin
    assert d2.decision == "challenger" and d2.delta == pytest.approx(0.2) and "margin" in d2.reason
    d3 = promotion.promote("p", version=versions[2], **kw)  # +2.5 on average but OCR drops 5 points
    assert d3.decision == "challenger" and d3.worst_task == "ocr" and d3.worst_drop == pytest.approx(5.0)
    assert str(client.get_model_version_by_alias("p", "champion").version) == versions[0]
    assert str(client.get_model_version_by_alias("p", "challenger").version) == versions[2]
    d4 = promotion.promote("p", version=versions[3], **kw)  # +1.0, worst drop 1.0: a real win
    assert d4.decision == "champion" and d4.promoted and d4.champion == versions[0]
    assert str(client.get_model_version_by_alias("p", "champion").version) == versions[3]
    tags = client.get_model_version("p", versions[3]).tags
    assert tags["promotion.decision"] == "champion" and float(tags["promotion.delta"]) == pytest.approx(1.0)
    assert float(tags["test/vqa"]) == 53.0 and tags["promotion.champion_version"] == versions[0]
    assert client.get_model_version("p", versions[0]).tags["promotion.replaced_by"] == versions[3]
    assert client.get_model_version("p", versions[1]).tags["promotion.decision"] == "challenger"
    assert {split for _, split in ev.calls} == {"test"}  # promotion evaluates on TEST only
    assert promotion.promote("p", version=versions[3], **kw).decision == "already_champion"
    with pytest.raises(ValueError, match="has no version 99"):
        promotion.promote("p", version=99, **kw)


def test_models_champion_loads_into_a_working_model(platform_store: Store) -> None:
    from mergelab.bench.modeling import build_model, build_processor, build_tokenizer
    from mergelab.hf import save_model

    tok = build_tokenizer(["what colour is the square", "red", "blue", "green"], vocab_size=300)
    model = build_model(tok, seed=0)
    client = platform_store.client()
    run = client.create_run(platform_store.experiment_id("reg", client))
    uri = f"{run.info.artifact_uri}/merged"
    save_model(model, build_processor(tok), local_path(uri))
    client.log_param(run.info.run_id, "method", "optmerge")
    mv = reg.register_run(client, "vlm", run.info.run_id, uri)
    client.set_registered_model_alias("vlm", "champion", mv.version)
    assert reg.resolve_model_dir(platform_store, "models:/vlm@champion") == local_path(uri)  # no copy
    loaded, processor = reg.load_registered(platform_store, "models:/vlm@champion")
    ref = dict(model.named_parameters())
    for k, v in loaded.named_parameters():
        assert torch.equal(v, ref[k]), k
    ids = processor.tokenizer("what colour", return_tensors="pt").input_ids
    with torch.no_grad():
        assert loaded(input_ids=ids).logits.shape[-1] == model.config.text_config.vocab_size


def test_registry_cli_lists_versions_with_aliases(platform_store: Store) -> None:
    from click.testing import CliRunner

    from mergelab.platform.cli import main

    client = platform_store.client()
    rid, uri, _ = _run_with_weights(platform_store)
    mv = reg.register_run(client, "cli-model", rid, uri, tags={"method": "ties", "val/average": "42.0000",
                                                                "campaign": "c", "trial": "3"})
    client.set_registered_model_alias("cli-model", "champion", mv.version)
    out = CliRunner().invoke(main, ["registry", "cli-model", "--root", str(local_path(
        platform_store.artifact_root).parent)])
    assert out.exit_code == 0, out.output
    line = out.output.splitlines()[1]
    assert "cli-model" in line and "champion" in line and "42.0000" in line and "ties" in line


def test_the_same_merge_is_registered_once(platform_store: Store) -> None:
    """Two runs of one recipe (same ``mergelab.recipe`` digest) share one version; another recipe gets its own."""
    from mergelab.platform.store import TAG_RECIPE

    client = platform_store.client()
    runs = [_run_with_weights(platform_store) for _ in range(3)]
    for (rid, _, _), digest in zip(runs, ["aaa", "aaa", "bbb"], strict=True):
        client.set_tag(rid, TAG_RECIPE, digest)
    v1 = reg.register_run(client, "dedup", runs[0][0], runs[0][1], score=1.0)
    v2 = reg.register_run(client, "dedup", runs[1][0], runs[1][1], score=2.0)
    v3 = reg.register_run(client, "dedup", runs[2][0], runs[2][1], score=3.0)
    assert v2.version == v1.version and v2.run_id == runs[0][0] and v3.version != v1.version
    assert [v.tags[TAG_RECIPE] for v in reg.campaign_versions(client, "dedup")] == ["bbb", "aaa"]


class _ItemEvaluator:
    """Per-item test scores (0/1) per model directory: ``{run_id: {task: [item scores]}}``."""

    def __init__(self, table: dict[str, dict[str, list[float]]]) -> None:
        self.table = table
        self.calls: list[tuple[str, str]] = []

    def __call__(self, model_dir, tasks, split, on_task=None):  # noqa: ANN001, ANN204
        from mergelab.evaluators import EvalResult

        self.calls.append((str(model_dir), split))
        items = self.table[Path(model_dir).parent.parent.name]
        scores = {t: 100.0 * sum(items[t]) / len(items[t]) for t in tasks}
        records = [{"task": t, "id": f"{t}-{i}", "score": v} for t in tasks for i, v in enumerate(items[t])]
        return EvalResult(split=split, scores=scores, records=records)


def test_promotion_needs_a_gain_whose_paired_interval_excludes_zero(platform_store: Store) -> None:
    """Same items, same process: a 2-point gain on 100 noisy items is not enough, a 20-point one is; the decision
    and its numbers land on both versions, and test/* with the item count on each."""
    client = platform_store.client()
    base = {"vqa": [1.0, 0.0] * 50, "ocr": [1.0, 1.0, 0.0, 0.0] * 25}
    ocr = list(base["ocr"])  # 12 items won, 8 lost: +4 on OCR, +2 on average, with the noise of 20 flips
    for i in [i for i, v in enumerate(ocr) if v == 0.0][:12]:
        ocr[i] = 1.0
    for i in [i for i, v in enumerate(base["ocr"]) if v == 1.0][:8]:
        ocr[i] = 0.0
    flip2 = {"vqa": base["vqa"], "ocr": ocr}
    better = {"vqa": [1.0] * 70 + [0.0] * 30, "ocr": [1.0] * 80 + [0.0] * 20}  # +20, +30
    table, versions = {}, []
    for items in (base, flip2, better):
        rid, uri, _ = _run_with_weights(platform_store)
        table[rid] = items
        versions.append(str(reg.register_run(client, "boot", rid, uri, tags={"eval.tasks": '["vqa", "ocr"]'}).version))
    ev = _ItemEvaluator(table)
    assert promotion.promote("boot", version=versions[0], evaluator=ev, store=platform_store).decision == "champion"
    small = promotion.promote("boot", version=versions[1], evaluator=ev, store=platform_store)
    assert small.decision == "challenger" and small.delta == pytest.approx(2.0)
    assert small.ci_low < 0 < small.ci_high and "does not clear the margin" in small.reason
    big = promotion.promote("boot", version=versions[2], evaluator=ev, store=platform_store)
    assert big.decision == "champion" and big.ci_low > 0 and big.delta == pytest.approx(25.0)
    assert big.test_items == 200
    cand, champ = (client.get_model_version("boot", v).tags for v in (versions[2], versions[0]))
    assert float(cand["promotion.ci_low"]) == pytest.approx(big.ci_low, abs=1e-3)
    assert cand["test.items"] == "200" and float(cand["test/average"]) == pytest.approx(75.0)
    assert champ["test.items"] == "200" and float(champ["test/average"]) == pytest.approx(50.0)
    assert champ["promotion.defended.by"] == versions[2] and champ["promotion.defended.decision"] == "champion"
    assert champ["promotion.replaced_by"] == versions[2]
    assert {split for _, split in ev.calls} == {"test"}


def test_alias_history_and_rollback_restore_the_previous_champion(platform_store: Store) -> None:
    from click.testing import CliRunner

    from mergelab.platform.cli import main
    from mergelab.platform.promotion import champion_history, rollback

    client = platform_store.client()
    table, versions = {}, []
    for avg in (40.0, 50.0, 60.0):
        rid, uri, _ = _run_with_weights(platform_store)
        table[rid] = {"vqa": avg, "ocr": avg}
        versions.append(str(reg.register_run(client, "hist", rid, uri, tags={"eval.tasks": '["vqa", "ocr"]'}).version))
    ev = TableEvaluator(table)
    for v in versions:
        assert promotion.promote("hist", version=v, evaluator=ev, store=platform_store).decision == "champion"
    history = champion_history(client, "hist")
    assert [(e["version"], e["previous"], e["action"]) for e in history] == [
        (versions[0], None, "promote"), (versions[1], versions[0], "promote"), (versions[2], versions[1], "promote")]
    assert "clears the margin" in history[2]["reason"]
    root = str(local_path(platform_store.artifact_root).parent)
    out = CliRunner().invoke(main, ["rollback", "hist", "--root", root, "--reason", "bad in production"])
    assert out.exit_code == 0, out.output
    assert f"champion back to v{versions[1]}" in out.output and "bad in production" in out.output
    assert str(client.get_model_version_by_alias("hist", "champion").version) == versions[1]
    assert "promotion.rolled_back" in client.get_model_version("hist", versions[2]).tags
    rollback(client, "hist")  # a second rollback goes one further back, not back and forth
    assert str(client.get_model_version_by_alias("hist", "champion").version) == versions[0]
    with pytest.raises(ValueError, match="no previous champion"):
        rollback(client, "hist")
