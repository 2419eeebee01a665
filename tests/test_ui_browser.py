"""The MLflow UI in a real browser: headless Chromium driven by Playwright over a store that mergelab's own demo
wrote.

The store is made by the real code path, :func:`mergelab.platform.demo.run_demo` on the tiny zoo (one setting, two
methods, a two-trial campaign, registration and promotion), with one stand-in: a fast evaluator whose scores are a
hash of the model directory and task (no generation; the UI needs numbers, not good ones). ``mlflow server`` serves
it on loopback (``tests/pg.py``'s starter, on SQLite). A new, empty browser profile then follows mergelab's own
links (:mod:`mergelab.platform.ui`, all with ``?workflowType=machine_learning``: MLflow 3.17's UI otherwise keeps the
GenAI-or-training choice in the browser and defaults to GenAI) and checks what a user must see: the experiment list;
the experiment, opened from the list, in the model-training view with the reference runs (base, experts, mixture)
beside the merges; the comparison run's page with its table and chart; a compare view of references and merges on
the same ``test/*`` metrics, opened from the comparison run's own link (the ``test/average`` and ``test/vqa`` rows of the compare
page's metrics grid hold a number for every run); the experiment's saved view "mergelab: test scores" as table (only the
runs with test scores, the val-selected merges among them) and as charts; the registered model's page with the
``champion`` alias. A screenshot of each page is saved under the test's tmp dir (and ``$MERGELAB_TEST_ARTIFACTS``
when set).

The browser is the system's Chromium (Debian's ``chromium`` package, ``/usr/bin/chromium``; ``$MERGELAB_CHROMIUM``
overrides), never a browser download. Without Chromium or Playwright the test skips with the reason; under CI
(``CI=true``, where ``.ci/run`` installs Chromium) that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from tests import pg
except ImportError:  # tests/ is not a package: pytest puts it on sys.path itself
    import pg  # type: ignore[no-redef]

SETTING = "full"
EXPERIMENT = MODEL = f"mergelab-demo-{SETTING}-tiny"
ALIAS = "champion"
REFERENCES = ["base", "expert vqa", "expert ocr", "mixture"]  # some of the seven reference runs
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
    runs: dict[str, str]  # run name -> run id
    comparison: str  # the comparison's parent run id
    merges: list[str]  # names of the comparison's val-selected merges (with test/* metrics)
    compare: list[str]  # the run ids the comparison links on the compare page (references first)


class HashEvaluator:
    """A fast stand-in for the demo's evaluator: scores in [20, 80) from a hash of (model directory, task), with
    per-item records so promotion's paired bootstrap has items to draw."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.limit = kwargs.get("limit")

    def __call__(self, model_dir: Path, tasks: list[str], split: str, on_task: object = None) -> object:
        from mergelab.evaluators import EvalResult

        total = EvalResult(split=split, scores={})
        for task in tasks:
            h = zlib.crc32(f"{Path(model_dir).resolve()}/{task}".encode())
            score = 20.0 + (h % 6000) / 100.0
            part = EvalResult(split=split, scores={task: score}, metrics={f"{task}/accuracy": score},
                              records=[{"task": task, "id": f"{task}-{j}", "prediction": "x", "references": ["x"],
                                        "score": float((h >> j) % 100 < score)} for j in range(20)])
            total.update(part)
            if on_task is not None:
                on_task(task, total)  # type: ignore[operator]
        return total


@pytest.fixture(scope="module")
def ui_store(tmp_path_factory: pytest.TempPathFactory, tiny_zoo: Path, mlflow_template: Path) -> UiStore:
    """The tiny demo's store: one setting, weight_average and optmerge, a two-trial campaign, a promotion."""
    from mlflow.tracking import MlflowClient

    from mergelab.platform import demo, ui

    root = tmp_path_factory.mktemp("ui-store")
    (root / "mlruns").mkdir()
    shutil.copy(mlflow_template, root / "mlruns" / "mlflow.db")  # a migrated DB: no 7 s of migrations
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MERGELAB_OPTUNA_STORAGE", "MERGELAB_ARTIFACT_ROOT", "MERGELAB_ROOT"):
            mp.delenv(var, raising=False)
        mp.setattr(demo, "HFEvaluator", HashEvaluator)
        demo.run_demo(tiny=True, zoo=tiny_zoo, root=root / "mlruns", settings=(SETTING,),
                      methods=("weight_average", "optmerge"), lam_grid=(0.5, 1.0), trials=2, limit=4, test_limit=4,
                      device="cpu", data_root=root / "data", data_sizes={"val": 4, "test": 4}, log=lambda _: None)
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([exp], max_results=200)
    comparison = next(r.info.run_id for r in runs if r.data.tags.get("mergelab.role") == "comparison")
    merges = [r.info.run_name for r in runs if r.data.tags.get("mergelab.selected")]
    compare = json.loads(client.get_run(comparison).data.tags[ui.COMPARE_TAG])
    return UiStore(uri=uri, experiment_id=exp, runs={r.info.run_name: r.info.run_id for r in runs},
                   comparison=comparison, merges=merges, compare=compare)


# The compare page's metrics table is a virtualised grid (a name column beside a value grid, both rendering only the
# rows in view): scroll both to each height until the metric's row shows, then read the value cells at its height.
_ROW_JS = """async ([key, n]) => {
    const link = [...document.querySelectorAll('a')].find(a => a.textContent.trim().startsWith('merge/'));
    const box = link && link.closest('.du-bois-light-collapse-content-box');
    if (!box) return null;
    const grids = [...box.querySelectorAll('.ReactVirtualized__Grid')];
    const height = Math.max(...grids.map(g => g.scrollHeight));
    for (let top = 0; top <= height; top += 100) {
        grids.forEach(g => { g.scrollTop = top; });
        await new Promise(r => setTimeout(r, 200));
        const a = [...box.querySelectorAll('a')].find(x => x.textContent.trim() === key);
        if (!a) continue;
        let cell = a;
        while (cell.parentElement && !cell.parentElement.classList.contains(
            'ReactVirtualized__Grid__innerScrollContainer')) cell = cell.parentElement;
        const row = [...box.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer')]
            .flatMap(c => [...c.children].filter(x => x.style.top === cell.style.top && x !== cell))
            .map(x => x.textContent.trim());
        if (row.length >= n) return row;
    }
    return null;
}"""


def _compare_row(page: object, key: str, n: int) -> list[str]:
    """The values of metric ``key`` on the compare page, one per run (retried: the grid renders late when busy)."""
    for _ in range(5):
        row = page.evaluate(_ROW_JS, [key, n])  # type: ignore[attr-defined]
        if row:
            return row
        page.wait_for_timeout(1000)  # type: ignore[attr-defined]
    return []


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def ui_server(ui_store: UiStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[pg.MlflowServer]:
    root = tmp_path_factory.mktemp("ui-server")
    server = pg.start_mlflow_server(ui_store.uri, root / "artifacts", root)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_mlflow_ui_shows_the_comparison_references_and_the_champion(
    chromium: str, ui_store: UiStore, ui_server: pg.MlflowServer, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    from mergelab.platform import ui

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
    assert len(ui_store.merges) == 2, ui_store.merges
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000},
        )
        context.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            # The experiment list. (Its links open MLflow's GenAI view: the UI remembers no choice, so mergelab
            # prints and documents links to each experiment, which carry the model-training view.)
            page.goto(ui.experiments_url(base))
            expect(page.get_by_test_id("experiment-list-item-link").filter(has_text=EXPERIMENT)).to_be_visible()
            shot(page, "1-experiments")

            # mergelab's link to the experiment: the model-training view's runs table, the reference runs beside the
            # comparison and campaign runs (whose merges are nested under them).
            page.goto(ui.experiment_url(base, exp))
            expect(page.get_by_text("matching runs").first).to_be_visible()
            expect(page.get_by_text("Overview").first).not_to_be_visible()  # the GenAI view opens on "Overview"
            for name in [*REFERENCES, "demo-comparison-full-s0"]:
                expect(page.get_by_role("link", name=name, exact=True).first).to_be_visible()
            assert "workflowType=machine_learning" in page.url, page.url
            shot(page, "2-runs")

            # The comparison's parent run: its description is the paper-layout table; the chart is an artifact.
            page.goto(ui.run_url(base, exp, ui_store.comparison))
            expect(page.get_by_text("lambda selected on val").first).to_be_visible()
            more = page.get_by_text("Show more", exact=True)
            if more.count():
                more.first.click()
            for name in ["base", "mixture", "optmerge"]:
                expect(page.get_by_role("cell", name=name, exact=True).first).to_be_visible()
            shot(page, "3-comparison-run")

            # The comparison's description links the compare page of its rows' runs (references first): the
            # metrics table holds every test/* metric of references and merges side by side.
            n_runs = len(ui_store.compare)
            page.set_viewport_size({"width": 3000, "height": 1000})  # the table renders only visible columns
            href = page.get_by_role("link", name="these runs side by side (compare page)").first.get_attribute("href")
            assert href == ui.compare_url("", exp, ui_store.compare).lstrip("/"), href  # (the link opens a new tab)
            page.goto(f"{base}/{href}")
            expect(page.get_by_text(f"Comparing {n_runs} Runs").first).to_be_visible()
            # the parallel-coordinates plot starts on the first run's (base's) first logged metric: test/average
            expect(page.get_by_text("test/average", exact=True).first).to_be_visible()
            for name in ["base", "mixture", *ui_store.merges]:
                expect(page.get_by_role("cell", name=name, exact=True).first).to_be_attached()
            for key in ["test/average", "test/vqa"]:
                values = _compare_row(page, key, n_runs)
                assert len(values) == n_runs and all(_is_number(v) for v in values), (key, values)
            page.get_by_role("link", name="test/vqa", exact=True).first.scroll_into_view_if_needed()  # in the shot
            shot(page, "4-compare")
            page.set_viewport_size({"width": 1600, "height": 1000})

            # The experiment's saved view "mergelab: test scores": references and the val-selected merges, best
            # test/average first, the test/* metrics as columns, then as the first chart section.
            page.goto(ui.scores_view_url(base, exp))
            expect(page.get_by_text(ui.SCORES_VIEW_NAME).first).to_be_visible()
            expect(page.get_by_text("test/average", exact=True).first).to_be_visible()
            for name in ["base", "mixture", *ui_store.merges]:
                expect(page.get_by_role("link", name=name, exact=True).first).to_be_visible()
            unscored = next(n for n in ui_store.runs if n.startswith("optmerge-lam") and n not in ui_store.merges)
            expect(page.get_by_role("link", name=unscored, exact=True)).to_have_count(0)  # a lambda not selected
            shot(page, "5-test-scores")
            page.goto(ui.scores_view_url(base, exp, charts=True))
            expect(page.get_by_text("test scores", exact=True).first).to_be_visible()
            expect(page.get_by_text("test/average", exact=True).first).to_be_visible()
            shot(page, "6-test-charts")

            # The registered model's page shows the champion alias.
            page.goto(ui.model_url(base, MODEL))
            expect(page.get_by_text("Version 1").first).to_be_visible()
            alias = page.get_by_role("status").filter(has_text=f"@ {ALIAS}").first  # the alias tag on its version
            expect(alias).to_be_visible()
            alias.scroll_into_view_if_needed()  # into the screenshot (the page scrolls inside a panel)
            expect(page.get_by_text(f"{ALIAS}: v").first).to_be_visible()  # the description names the holder
            shot(page, "7-model")
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
    assert [p.name for p in saved] == ["1-experiments.png", "2-runs.png", "3-comparison-run.png", "4-compare.png",
                                       "5-test-scores.png", "6-test-charts.png", "7-model.png"]
    assert all(p.stat().st_size > 10_000 for p in saved), "a screenshot is suspiciously small (blank page?)"
