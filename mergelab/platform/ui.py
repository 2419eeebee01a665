"""What the MLflow UI shows of mergelab: links that open its model-training view, and the comparison's table and
chart on a parent run.

Links. MLflow 3.17-3.18's UI chooses between its GenAI (traces) and model-training views with a switch kept in the
browser (``workflowType``, default GenAI); the experiment-kind tag alone does not flip it for a new browser. A URL
sets it with ``?workflowType=machine_learning``, so every link mergelab prints or documents is built here, with that
parameter: :func:`experiment_url`, :func:`run_url`, :func:`model_url`. The UI's address is ``$MERGELAB_UI_URL``, else
the tracking URI when it is a server (``http(s)://``), else ``http://127.0.0.1:5000`` (``mergelab ui``'s default).

The comparison (:func:`log_comparison`): the paper's table layout (one row per model or merge, one column per task
and the average) as ``comparison/table.md`` and ``comparison/table.html``, and ``comparison/chart.png``: per task,
one bar per method beside the base, the task's own expert and the mixture.

Defaults the UI would otherwise get wrong (read from MLflow 3.17's UI code): the runs table shows no metric column
until one is picked, its chart view lays out one section per metric prefix in alphabetical order (``best``,
``merge/...`` before ``test``), and the compare page's parallel-coordinates plot starts on the alphabetically first
three parameters that differ (``base.path``, ...) and lists ``merge/*`` metrics before ``test/*``. None of that is
configurable per experiment except through a *saved view*: an experiment tag ``mlflow.sharedViewState.<id>``
holding ``{name, createdAt, updatedAt, state}`` (``state``: the runs page's search facets and UI state as JSON),
listed under the runs page's "Views" menu and opened by ``?viewStateShareKey=<id>``. :func:`save_scores_view`
writes one per comparison experiment, "mergelab: test scores": only the runs with test scores (references and the
val-selected merges), sorted by ``test/average``, with ``test/average`` and ``test/<task>`` as columns and as bar
charts first (:func:`scores_view_url`). The compare page takes its runs from the URL (:func:`compare_url`,
references first); the comparison run's description links both.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mlflow import MlflowClient

from mergelab.platform.store import Store

DEFAULT_UI = "http://127.0.0.1:5000"
"""Where ``mergelab ui`` serves the embedded store by default."""

VIEW = "workflowType=machine_learning"
"""The query parameter that opens MLflow's model-training (not GenAI) view."""

COMPARISON_DIR = "comparison"

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
"""The experiment-tag prefix of the runs page's saved views (MLflow 3.17's UI)."""
SCORES_VIEW = "mergelab-test-scores"
"""The id of the saved view :func:`save_scores_view` writes (``?viewStateShareKey=``)."""
SCORES_VIEW_NAME = "mergelab: test scores"
COMPARE_TAG = "mergelab.compare"
"""A comparison run's tag: the JSON list of its rows' run ids (references first) for :func:`compare_url`."""


def ui_base(store: Store | None = None, port: int | None = None) -> str:
    """The MLflow UI's root URL for ``store`` (see the module docstring); ``port`` overrides the default's port."""
    env = os.environ.get("MERGELAB_UI_URL")
    if env:
        return env.rstrip("/")
    uri = store.tracking_uri if store is not None else os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return DEFAULT_UI if port is None else f"http://127.0.0.1:{port}"


def _url(base: str, route: str, query: str = "") -> str:
    return f"{base.rstrip('/')}/#/{route}?{query + '&' if query else ''}{VIEW}"


def experiments_url(base: str) -> str:
    """The experiment list, in the model-training view."""
    return _url(base, "experiments")


def experiment_url(base: str, experiment_id: str) -> str:
    """An experiment's runs table, in the model-training view."""
    return _url(base, f"experiments/{experiment_id}")


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """A run's page, in the model-training view."""
    return _url(base, f"experiments/{experiment_id}/runs/{run_id}")


def scores_view_url(base: str, experiment_id: str, charts: bool = False) -> str:
    """The experiment's runs page in the saved view "mergelab: test scores" (:func:`save_scores_view`); ``charts``:
    its chart view (bar charts of ``test/average`` and each task first) instead of its table."""
    mode = "&compareRunsMode=CHART" if charts else ""
    return _url(base, f"experiments/{experiment_id}/runs", f"viewStateShareKey={SCORES_VIEW}{mode}")


def compare_url(base: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """MLflow's compare page for ``run_ids`` (in that order: the parallel-coordinates plot starts on the first run's
    first metric shared by all, so put a reference run first)."""
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
    exps = quote(json.dumps([experiment_id], separators=(",", ":")))
    return _url(base, "compare-runs", f"runs={runs}&experiments={exps}")


def model_url(base: str, name: str, version: str | int | None = None) -> str:
    """A registered model's page (its versions and aliases), or one version's page."""
    route = f"models/{quote(name, safe='')}"
    return _url(base, route if version is None else f"{route}/versions/{version}")


def run_link(run_id: str, store: Store | None = None) -> str:
    """The UI link of ``run_id`` (its experiment looked up in ``store``, default the resolved store)."""
    store = store or Store.resolve()
    return run_url(ui_base(store), store.client().get_run(run_id).info.experiment_id, run_id)


def experiment_link(name: str, store: Store | None = None) -> str:
    """The UI link of experiment ``name`` (the experiment list when it does not exist)."""
    store = store or Store.resolve()
    exp = store.client().get_experiment_by_name(name)
    base = ui_base(store)
    return experiment_url(base, exp.experiment_id) if exp is not None else experiments_url(base)


def scores_view_state(tasks: Sequence[str], split: str = "test") -> dict[str, Any]:
    """The runs page's state of the "test scores" view: runs with ``<split>/average`` only, sorted by it (best
    first), ``<split>/average`` and ``<split>/<task>`` as columns beside ``method`` and ``hp.lam``, and as bar
    charts in the first chart section (every other metric keeps its generated chart, in sections after it)."""
    keys = [f"{split}/average", *(f"{split}/{t}" for t in tasks)]
    section = f"mergelab-{split}"
    charts = [{"uuid": f"mergelab-{k}", "type": "BAR", "runsCountToCompare": 50, "metricSectionId": section,
               "deleted": False, "isGenerated": False, "metricKey": k, "displayName": k} for k in keys]
    return {
        "searchFilter": f"metrics.`{split}/average` >= 0", "orderByKey": f"metrics.`{split}/average`",
        "orderByAsc": False, "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": [*(f"metrics.`{k}`" for k in keys), "params.`method`", "params.`hp.lam`"],
        "runsHiddenMode": "SHOW_ALL", "compareRunCharts": charts,
        "compareRunSections": [{"uuid": section, "name": f"{split} scores", "display": True, "isReordered": True}],
        "isAccordionReordered": True, "hideEmptyCharts": True, "useGroupedValuesInCharts": True, "groupBy": None,
        "viewMaximized": False, "runListHidden": False,
    }


def save_scores_view(client: MlflowClient, experiment_id: str, tasks: Sequence[str]) -> None:
    """Save (or refresh) the experiment's "mergelab: test scores" view (:func:`scores_view_state`) as the experiment
    tag MLflow's UI reads its saved views from; it keeps its creation time when refreshed."""
    key = VIEW_TAG_PREFIX + SCORES_VIEW
    now = int(time.time() * 1000)
    created = now
    old = client.get_experiment(experiment_id).tags.get(key)
    if old:
        try:
            created = int(json.loads(old).get("createdAt", now))
        except (ValueError, TypeError, AttributeError):
            pass
    envelope = {"name": SCORES_VIEW_NAME, "createdAt": created, "updatedAt": now,
                "state": json.dumps(scores_view_state(tasks), separators=(",", ":"))}
    client.set_experiment_tag(experiment_id, key, json.dumps(envelope, separators=(",", ":")))


def experiment_lines(client: MlflowClient, base: str, experiment_id: str, name: str) -> list[str]:
    """What ``mergelab ui`` prints for one experiment: its link, then (comparison experiments) the "test scores"
    view as table and charts and each comparison's compare page."""
    lines = [f"{name}: {experiment_url(base, experiment_id)}"]
    if VIEW_TAG_PREFIX + SCORES_VIEW in client.get_experiment(experiment_id).tags:
        lines.append(f"  test scores (table): {scores_view_url(base, experiment_id)}")
        lines.append(f"  test scores (charts): {scores_view_url(base, experiment_id, charts=True)}")
    runs = client.search_runs([experiment_id], f"tags.`{COMPARE_TAG}` != ''", max_results=20)
    for run in runs:
        ids = json.loads(run.data.tags[COMPARE_TAG])
        lines.append(f"  compare {run.info.run_name}: {compare_url(base, experiment_id, ids)}")
    return lines


# --------------------------------------------------------------------------------------------------------------
# The comparison's table and chart
# --------------------------------------------------------------------------------------------------------------


def _cell(x: Any) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def is_reference(row: Mapping[str, Any]) -> bool:
    """A reference row (not a merge): ``row["reference"]``, or named ``base``, ``mixture`` or ``expert ...``."""
    name = str(row["name"])
    return bool(row.get("reference")) or name in ("base", "mixture") or name.startswith("expert ")


def _lam(r: Mapping[str, Any]) -> str:
    lam = r.get("lam")
    return "" if lam is None else f"{lam:.2f}"


def table_markdown(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """The paper's layout as a markdown table: ``rows`` are ``{"name", "lam", "scores": {task: pct}, "average"}``."""
    head = ["model", "lam", *tasks, "avg"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["name"]), _lam(r), *(_cell(r["scores"].get(t)) for t in tasks), _cell(r.get("average"))]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def table_html(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], title: str = "") -> str:
    """The same table as a standalone HTML page (no scripts, no external resources); reference rows
    (:func:`is_reference`) are shaded and each column's best merge is bold."""
    refs = {r["name"] for r in rows if is_reference(r)}
    merges = [r for r in rows if r["name"] not in refs]
    cols = [*tasks, "avg"]

    def value(r: Mapping[str, Any], c: str) -> float:
        v = r.get("average") if c == "avg" else r["scores"].get(c)
        return -math.inf if v is None or math.isnan(v) else float(v)

    best = {c: max((value(r, c) for r in merges), default=-math.inf) for c in cols}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["model", "lam", *cols])
    body = []
    for r in rows:
        cells = []
        for c in cols:
            text = _cell(r.get("average") if c == "avg" else r["scores"].get(c))
            bold = r["name"] not in refs and value(r, c) == best[c] and text
            cells.append(f"<td>{'<b>' + text + '</b>' if bold else text}</td>")
        style = ' class="ref"' if r["name"] in refs else ""
        body.append(f"<tr{style}><td>{html.escape(str(r['name']))}</td><td>{_lam(r)}</td>{''.join(cells)}</tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}td,th{padding:3px 8px;text-align:right;"
            "border-bottom:1px solid #ddd}td:first-child,th:first-child{text-align:left}tr.ref{color:#555;"
            "background:#f6f6f6}</style></head><body>" + (f"<h3>{html.escape(title)}</h3>" if title else "")
            + f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></body></html>\n")


def chart_png(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], path: Path, title: str = "") -> Path:
    """Per task (and the average), one bar per row: the base, the task's own expert (``expert <task>``; the best
    expert on the average), the mixture, then every merge."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    experts = {str(r["name"]).removeprefix("expert "): r for r in rows if str(r["name"]).startswith("expert ")}
    others = [r for r in rows if not str(r["name"]).startswith("expert ")]
    cols = [*tasks, "avg"]

    def score(r: Mapping[str, Any], c: str) -> float:
        v = r.get("average") if c == "avg" else r["scores"].get(c)
        return math.nan if v is None else float(v)

    series: list[tuple[str, list[float]]] = []
    for r in others:
        series.append((str(r["name"]), [score(r, c) for c in cols]))
        if r["name"] == "base" and experts:
            own = [score(experts[c], c) if c in experts else math.nan for c in tasks]
            series.append(("expert (own task)",
                           [*own, max(score(e, "avg") for e in experts.values())]))
    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(cols) * n / 4), 4.8))
    x = np.arange(len(cols))
    cmap = plt.get_cmap("tab20")
    for i, (label, ys) in enumerate(series):
        ax.bar(x - 0.4 + width * (i + 0.5), [0.0 if math.isnan(y) else y for y in ys], width, label=label,
               color=cmap(i % 20))
    ax.set_xticks(x, cols)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "per-task scores: merges vs base and experts")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def compare_ids(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The run ids of a comparison's rows that have one, references first (:func:`compare_url`)."""
    ordered = sorted(rows, key=lambda r: not is_reference(r))
    return list(dict.fromkeys(str(r["run_id"]) for r in ordered if r.get("run_id")))


def log_comparison(client: MlflowClient, run_id: str, rows: Sequence[Mapping[str, Any]], tasks: Sequence[str],
                   title: str = "") -> None:
    """Log the comparison's table (markdown and HTML) and chart to ``run_id`` under ``comparison/``; the markdown
    table also becomes the run's description (shown on its page), followed by links (relative to the UI) to the
    compare page of its rows' runs and to the experiment's "test scores" view, which is saved here
    (:func:`save_scores_view`). The rows' run ids go to the tag ``mergelab.compare`` (JSON list)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        md = table_markdown(rows, tasks)
        (d / "table.md").write_text(md)
        (d / "table.html").write_text(table_html(rows, tasks, title))
        chart_png(rows, tasks, d / "chart.png", title)
        for name in ("table.md", "table.html", "chart.png"):
            client.log_artifact(run_id, str(d / name), COMPARISON_DIR)
    exp = client.get_run(run_id).info.experiment_id
    save_scores_view(client, exp, tasks)
    ids = compare_ids(rows)
    links = [f"[these runs side by side (compare page)]({compare_url('', exp, ids).lstrip('/')})"] if ids else []
    links.append(f"[every run's test scores, sorted (table)]({scores_view_url('', exp).lstrip('/')}), "
                 f"[as charts]({scores_view_url('', exp, charts=True).lstrip('/')})")
    if ids:
        client.set_tag(run_id, COMPARE_TAG, json.dumps(ids, separators=(",", ":")))
    note = (f"**{title}**\n\n" if title else "") + md + "\n" + " · ".join(links) + "\n"
    client.set_tag(run_id, "mlflow.note.content", note)
