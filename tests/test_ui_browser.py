"""The MLflow UI in a real browser: headless Chromium driven by Playwright over a small store made by the test.

A fresh store (one experiment with two finished runs with a metric, a registered model whose version 1 carries the
alias ``champion``) is served by ``mlflow server`` on loopback (``tests/pg.py``'s starter, on SQLite). A new, empty
browser profile then opens the experiment list, the experiment in the model-training view
(``?workflowType=machine_learning``: MLflow 3.17's UI otherwise keeps the GenAI-or-training choice in the browser and
defaults to GenAI), one run's page, and the registered model's page, checking what a user must see on each and saving
a screenshot of each under the test's tmp dir (and ``$MERGELAB_TEST_ARTIFACTS`` when set).

The browser is the system's Chromium (Debian's ``chromium`` package, ``/usr/bin/chromium``; ``$MERGELAB_CHROMIUM``
overrides), never a browser download. Without Chromium or Playwright the test skips with the reason; under CI
(``CI=true``, where ``.ci/run`` installs Chromium) that is a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from tests import pg
except ImportError:  # tests/ is not a package: pytest puts it on sys.path itself
    import pg  # type: ignore[no-redef]

EXPERIMENT, MODEL, ALIAS = "ui-check", "ui-merged", "champion"
RUNS = {"merge-ties": 0.6125, "merge-task_arithmetic": 0.5475}
# Flags for a root user on a machine without a network: no sandbox (root), no GPU, and none of Chromium's background
# connections (refused here, many at a time, and slow to give up on).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # a loaded 2-core machine renders MLflow's UI in seconds; allow for it


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run installs Chromium and `make setup` Playwright)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> str:
    """The system Chromium's path ($MERGELAB_CHROMIUM, else chromium on PATH), once Playwright imports."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    for candidate in (os.environ.get("MERGELAB_CHROMIUM"), "chromium", "chromium-browser"):
        path = candidate and shutil.which(candidate)
        if path:
            return path
    _unavailable("no Chromium found (apt-get install chromium, or set MERGELAB_CHROMIUM)")
    raise AssertionError("unreachable")


@dataclass
class UiStore:
    uri: str
    experiment_id: str
    run_ids: dict[str, str]


@pytest.fixture(scope="module")
def ui_store(tmp_path_factory: pytest.TempPathFactory) -> UiStore:
    """An experiment with two finished runs (metric ``avg_score``) and a registered version aliased ``champion``."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    run_ids = {}
    for name, score in RUNS.items():
        run = client.create_run(exp, run_name=name)
        client.log_param(run.info.run_id, "method", name.removeprefix("merge-"))
        client.log_metric(run.info.run_id, "avg_score", score)
        client.set_terminated(run.info.run_id)
        run_ids[name] = run.info.run_id
    best = client.get_run(run_ids["merge-ties"]).info.artifact_uri
    weights = Path(best.removeprefix("file://")) / "merged"
    weights.mkdir(parents=True)
    (weights / "model.safetensors").write_bytes(b"not real weights")
    client.create_registered_model(MODEL)
    mv = client.create_model_version(MODEL, source=f"{best}/merged", run_id=run_ids["merge-ties"])
    client.set_registered_model_alias(MODEL, ALIAS, mv.version)
    return UiStore(uri=uri, experiment_id=exp, run_ids=run_ids)


@pytest.fixture(scope="module")
def ui_server(ui_store: UiStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[pg.MlflowServer]:
    root = tmp_path_factory.mktemp("ui-server")
    server = pg.start_mlflow_server(ui_store.uri, root / "artifacts", root)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_mlflow_ui_shows_runs_and_the_champion(
    chromium: str, ui_store: UiStore, ui_server: pg.MlflowServer, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    # A fresh browser profile: no workflowType remembered from an earlier visit.
    profile = tmp_path / "profile"
    profile.mkdir()
    saved: list[Path] = []

    def shot(page: object, name: str) -> None:
        path = shots / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
        saved.append(path)

    base = ui_server.uri
    exp = ui_store.experiment_id
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        context.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            # The experiment list.
            page.goto(f"{base}/#/experiments")
            expect(page.get_by_role("link", name=EXPERIMENT)).to_be_visible()
            shot(page, "1-experiments")

            # The experiment in the model-training view: the runs table with both runs.
            page.goto(f"{base}/#/experiments/{exp}?workflowType=machine_learning")
            for name in RUNS:
                expect(page.get_by_role("link", name=name)).to_be_visible()
            expect(page.get_by_text(f"{len(RUNS)} matching runs")).to_be_visible()
            assert "workflowType=machine_learning" in page.url, page.url
            shot(page, "2-runs")

            # One run's page shows its metric.
            run_id = ui_store.run_ids["merge-ties"]
            page.goto(f"{base}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning")
            expect(page.get_by_text("avg_score").first).to_be_visible()
            expect(page.get_by_text(str(RUNS["merge-ties"])).first).to_be_visible()
            shot(page, "3-run")

            # The registered model's page shows the champion alias on version 1.
            page.goto(f"{base}/#/models/{MODEL}?workflowType=machine_learning")
            expect(page.get_by_text("Version 1").first).to_be_visible()
            expect(page.get_by_role("status", name=ALIAS)).to_contain_text(f"@ {ALIAS}")  # the alias tag
            shot(page, "4-model")
            assert not errors, f"JavaScript errors: {errors}"
        except Exception:
            shot(page, "failure")
            raise
        finally:
            context.close()
            target = os.environ.get("MERGELAB_TEST_ARTIFACTS")
            if target and saved:
                out = Path(target) / "ui_browser"
                out.mkdir(parents=True, exist_ok=True)
                for path in saved:
                    shutil.copy(path, out / path.name)
    assert [p.name for p in saved] == ["1-experiments.png", "2-runs.png", "3-run.png", "4-model.png"]
    assert all(p.stat().st_size > 10_000 for p in saved), "a screenshot is suspiciously small (blank page?)"
