"""What the MLflow UI shows (without a browser): links with the model-training view, experiments tagged as classic ML
experiments, the comparison's table and chart, the campaign's offline plots and per-trial series, and the champion
visible on its run and the registered model."""

from __future__ import annotations

import math

import pytest
from conftest_platform import TableEvaluator, fluent_uris

from mergelab.platform import promotion, ui
from mergelab.platform import registry as reg
from mergelab.platform.promotion import TAG_CHAMPION_RUN, rollback
from mergelab.platform.store import EXPERIMENT_KIND, TAG_DESCRIPTION, TAG_EXPERIMENT_KIND, Store, local_path

TASKS = ("vqa", "ocr")


def test_every_link_opens_the_model_training_view(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MERGELAB_UI_URL", raising=False)
    local = Store(tracking_uri="sqlite:////x/mlflow.db", artifact_root=None, optuna_storage="sqlite:////x/o.db")
    base = ui.ui_base(local)
    assert base == "http://127.0.0.1:5000" and ui.ui_base(local, port=5055) == "http://127.0.0.1:5055"
    server = Store(tracking_uri="http://mlflow:5000/", artifact_root=None, optuna_storage="sqlite:////x/o.db")
    assert ui.ui_base(server) == "http://mlflow:5000"
    urls = [ui.experiments_url(base), ui.experiment_url(base, "3"), ui.run_url(base, "3", "abc"),
            ui.model_url(base, "my model"), ui.model_url(base, "m", 2)]
    assert all(u.endswith("?workflowType=machine_learning") for u in urls)
    assert urls[2] == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert urls[3].startswith("http://127.0.0.1:5000/#/models/my%20model?") and "/versions/2?" in urls[4]
    monkeypatch.setenv("MERGELAB_UI_URL", "https://ui.example/")
    assert ui.ui_base(local) == "https://ui.example"


def test_experiments_are_classic_ml_experiments_with_a_description(platform_store: Store) -> None:
    client = platform_store.client()
    exp = client.get_experiment(platform_store.experiment_id("kinds", client))
    assert exp.tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND == "custom_model_development"
    assert "reference" in exp.tags[TAG_DESCRIPTION]
    old = client.create_experiment("made-by-an-older-mergelab")  # no tags: they are added when mergelab uses it
    assert platform_store.experiment_id("made-by-an-older-mergelab", client) == old
    assert client.get_experiment(old).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND


def _rows() -> list[dict]:
    return [{"name": "base", "lam": None, "scores": {"vqa": 20.0, "ocr": 30.0}, "average": 25.0},
            {"name": "expert vqa", "lam": None, "scores": {"vqa": 80.0, "ocr": 25.0}, "average": 52.5},
            {"name": "expert ocr", "lam": None, "scores": {"vqa": 22.0, "ocr": 70.0}, "average": 46.0},
            {"name": "mixture", "lam": None, "scores": {"vqa": 60.0, "ocr": 55.0}, "average": 57.5},
            {"name": "ties", "lam": 0.7, "scores": {"vqa": 61.0, "ocr": 52.0}, "average": 56.5},
            {"name": "optmerge", "lam": 1.0, "scores": {"vqa": 64.0, "ocr": math.nan}, "average": 64.0}]


def test_the_comparison_run_holds_the_table_and_the_chart(platform_store: Store) -> None:
    client = platform_store.client()
    run = client.create_run(platform_store.experiment_id("cmp", client)).info.run_id
    ui.log_comparison(client, run, _rows(), TASKS, title="full: test")
    files = {f.path for f in client.list_artifacts(run, "comparison")}
    assert files == {"comparison/table.md", "comparison/table.html", "comparison/chart.png"}
    folder = local_path(client.get_run(run).info.artifact_uri) / "comparison"
    md = (folder / "table.md").read_text()
    assert md.splitlines()[0] == "| model | lam | vqa | ocr | avg |"
    assert "| ties | 0.70 | 61.0 | 52.0 | 56.5 |" in md and "| optmerge | 1.00 | 64.0 |  | 64.0 |" in md
    page = (folder / "table.html").read_text()
    assert "<script" not in page and "http" not in page  # standalone: renders offline
    assert '<tr class="ref"><td>base</td>' in page and "<b>61.0</b>" not in page and "<b>64.0</b>" in page
    assert (folder / "chart.png").read_bytes()[:4] == b"\x89PNG" and (folder / "chart.png").stat().st_size > 5000
    assert client.get_run(run).data.tags[TAG_DESCRIPTION].startswith("**full: test**")


def test_the_comparison_saves_a_test_scores_view_and_links_its_compare_page(platform_store: Store) -> None:
    import json

    client = platform_store.client()
    exp = platform_store.experiment_id("cmp-view", client)
    rows = _rows()
    ids = {}
    for r in rows:  # merges first: the compare page must still list the references first
        ids[r["name"]] = r["run_id"] = client.create_run(exp, run_name=r["name"]).info.run_id
    run = client.create_run(exp, run_name="cmp").info.run_id
    ui.log_comparison(client, run, [*rows[4:], *rows[:4]], TASKS, title="full: test")
    ui.log_comparison(client, run, rows, TASKS)  # again: the view is refreshed, keeping its creation time
    tag = client.get_experiment(exp).tags[ui.VIEW_TAG_PREFIX + ui.SCORES_VIEW]
    envelope = json.loads(tag)
    assert envelope["name"] == ui.SCORES_VIEW_NAME and envelope["createdAt"] <= envelope["updatedAt"]
    state = json.loads(envelope["state"])
    assert state["orderByKey"] == "metrics.`test/average`" and state["orderByAsc"] is False
    assert state["selectedColumns"][:3] == ["metrics.`test/average`", "metrics.`test/vqa`", "metrics.`test/ocr`"]
    assert [c["metricKey"] for c in state["compareRunCharts"]] == ["test/average", "test/vqa", "test/ocr"]
    assert {c["type"] for c in state["compareRunCharts"]} == {"BAR"}
    order = ["base", "expert vqa", "expert ocr", "mixture", "ties", "optmerge"]
    assert json.loads(client.get_run(run).data.tags[ui.COMPARE_TAG]) == [ids[n] for n in order]
    note = client.get_run(run).data.tags[TAG_DESCRIPTION]
    assert f"(#/experiments/{exp}/runs?viewStateShareKey={ui.SCORES_VIEW}&{ui.VIEW})" in note
    assert "(#/compare-runs?runs=" in note
    lines = ui.experiment_lines(client, "http://h", exp, "cmp-view")
    assert lines[0] == f"cmp-view: {ui.experiment_url('http://h', exp)}"
    assert lines[1] == f"  test scores (table): {ui.scores_view_url('http://h', exp)}"
    assert ui.scores_view_url("http://h", exp).endswith(f"runs?viewStateShareKey={ui.SCORES_VIEW}&{ui.VIEW}")
    assert "compareRunsMode=CHART" in lines[2]
    assert lines[3] == f"  compare cmp: {ui.compare_url('http://h', exp, [ids[n] for n in order])}"
    assert len(lines) == 4


def test_an_evaluation_logs_the_average_and_task_scores_first(platform_store: Store) -> None:
    from mergelab.evaluators import EvalResult
    from mergelab.platform.evaluation import log_eval

    client = platform_store.client()
    run = client.create_run(platform_store.experiment_id("order", client)).info.run_id
    res = EvalResult(split="test", scores={"vqa": 50.0, "ocr": 70.0},
                     metrics={"vqa/accuracy": 50.0, "ocr/accuracy": 70.0})
    log_eval(client, run, res, chart=False)
    assert list(client.get_run(run).data.metrics)[:3] == ["test/average", "test/vqa", "test/ocr"]


def test_the_demo_summary_prints_the_test_scores_view_and_the_compare_page(
    platform_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from mergelab.platform import demo
    from mergelab.platform.cli import main

    client = platform_store.client()
    exp = platform_store.experiment_id("mergelab-demo-full", client)
    rows = _rows()
    for r in rows:
        r["run_id"] = client.create_run(exp, run_name=r["name"]).info.run_id
    run = client.create_run(exp, run_name="demo-comparison-full-s0").info.run_id
    ui.log_comparison(client, run, rows, TASKS)
    result = demo.DemoResult([demo.SettingResult("full", "mergelab-demo-full", rows=rows)])
    monkeypatch.setattr(demo, "run_demo", lambda **kw: result)
    root = str(local_path(platform_store.artifact_root).parent)
    out = CliRunner().invoke(main, ["demo", "--setting", "full", "--root", root])
    assert out.exit_code == 0, out.output
    base = ui.ui_base(platform_store)
    ids = [r["run_id"] for r in rows]
    assert f"test scores (table): {ui.scores_view_url(base, exp)}" in out.output.splitlines()
    assert f"test scores (charts): {ui.scores_view_url(base, exp, charts=True)}" in out.output.splitlines()
    assert f"compare demo-comparison-full-s0: {ui.compare_url(base, exp, ids)}" in out.output.splitlines()


def _version(store: Store, name: str, table: dict) -> str:
    client = store.client()
    run = client.create_run(store.experiment_id("champ", client), tags={"mergelab.role": "trial"})
    path = local_path(f"{run.info.artifact_uri}/merged")
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w")
    avg = 40.0 + 10 * len(table)
    table[run.info.run_id] = {"vqa": avg, "ocr": avg + 1}
    mv = reg.register_run(client, name, run.info.run_id, f"{run.info.artifact_uri}/merged",
                          tags={"eval.tasks": '["vqa", "ocr"]', "method": "ties", "val/average": "48.0000"})
    return str(mv.version)


def test_the_champion_is_visible_on_its_run_and_the_registered_model(platform_store: Store) -> None:
    client = platform_store.client()
    table: dict = {}
    v1, v2 = _version(platform_store, "vis", table), _version(platform_store, "vis", table)
    ev = TableEvaluator(table)
    promotion.promote("vis", version=v1, evaluator=ev, store=platform_store)
    run1, run2 = (client.get_model_version("vis", v).run_id for v in (v1, v2))
    assert client.get_run(run1).data.tags[TAG_CHAMPION_RUN] == "true"
    assert promotion.promote("vis", version=v2, evaluator=ev, store=platform_store).decision == "champion"
    assert TAG_CHAMPION_RUN not in client.get_run(run1).data.tags  # the tag moved with the alias
    assert client.get_run(run2).data.tags[TAG_CHAMPION_RUN] == "true"
    desc = client.get_registered_model("vis").description
    assert desc.startswith(f"**champion: v{v2}** (`ties`") and "test average **50.50**" in desc
    assert "ocr 51.0, vqa 50.0" in desc and "clears the margin" in desc and "val average 48.00" in desc
    rollback(client, "vis", "bad in production")
    assert client.get_run(run1).data.tags[TAG_CHAMPION_RUN] == "true"
    assert TAG_CHAMPION_RUN not in client.get_run(run2).data.tags
    desc = client.get_registered_model("vis").description
    assert desc.startswith(f"**champion: v{v1}**") and "rollback" in desc and "bad in production" in desc


def test_run_link_finds_the_runs_experiment(platform_store: Store) -> None:
    client = platform_store.client()
    exp = platform_store.experiment_id("links", client)
    run = client.create_run(exp).info.run_id
    assert ui.run_link(run, platform_store) == \
        f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run}?workflowType=machine_learning"
    assert ui.experiment_link("links", platform_store).endswith(f"/#/experiments/{exp}?workflowType=machine_learning")
    assert ui.experiment_link("none-such", platform_store).endswith("/#/experiments?workflowType=machine_learning")


def test_loading_a_model_prints_no_transformers_bar_unless_verbose(
    tiny_models, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    import transformers

    from mergelab.hf import VERBOSE_ENV, quiet_transformers

    base, _ = tiny_models("llama")  # weights only (load_model also loads a processor: the same block covers it)
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    transformers.utils.logging.enable_progress_bar()
    with quiet_transformers():
        transformers.LlamaForCausalLM.from_pretrained(base)
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled()  # the setting comes back after the load
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with quiet_transformers():
        transformers.LlamaForCausalLM.from_pretrained(base)
    assert "Loading weights" in capfd.readouterr().err


def test_mergelab_ui_prints_a_model_training_link_per_experiment(platform_store: Store,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from click.testing import CliRunner

    from mergelab.platform.cli import main

    exp = platform_store.experiment_id("ui-cmd")
    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execvpe", lambda file, args, env: calls.append(list(args)))
    monkeypatch.setenv("MERGELAB_VERBOSE", "")  # restored after the test (-v sets it in this process)
    root = str(local_path(platform_store.artifact_root).parent)
    out = CliRunner().invoke(main, ["-v", "ui", "--root", root, "--port", "5077"])
    assert out.exit_code == 0, out.output
    assert f"ui-cmd: http://127.0.0.1:5077/#/experiments/{exp}?workflowType=machine_learning" in out.output
    assert "http://127.0.0.1:5077/#/experiments?workflowType=machine_learning" in out.output
    assert calls and "--port" in calls[0] and os.environ.get("MERGELAB_VERBOSE") == "1"  # -v: libraries' output


def test_a_registered_text_lm_loads_with_mlflow_transformers_and_its_weights_stay_put(
    platform_store: Store,
) -> None:
    import mlflow
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    client = platform_store.client()
    run = client.create_run(platform_store.experiment_id("served", client))
    uri = f"{run.info.artifact_uri}/merged"
    folder = local_path(uri)
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate("the a cat dog sat on mat".split())}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="</s>",
                                               pad_token="</s>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    weights = {p.name: p.stat().st_ino for p in folder.glob("*.safetensors")}
    mv = reg.register_run(client, "served", run.info.run_id, uri)
    client.set_registered_model_alias("served", "champion", mv.version)
    assert (folder / "MLmodel").is_file() and mv.source == uri
    with fluent_uris(platform_store.tracking_uri):
        pipe = mlflow.transformers.load_model("models:/served@champion")
        assert isinstance(pipe, transformers.TextGenerationPipeline)
        assert pipe("the cat", max_new_tokens=2)[0]["generated_text"].startswith("the cat")
        assert mlflow.artifacts.download_artifacts("models:/served@champion") == str(folder)  # no copy
    assert {p.name: p.stat().st_ino for p in folder.rglob("*.safetensors")} == weights  # stored once
