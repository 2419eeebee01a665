"""CLI commands of the platform: ``campaign``, ``worker``, ``promote``, ``registry``, ``ui`` (thin: parse, validate,
call one library function)."""

from __future__ import annotations

import json
import os
import sys

import click

from mergelab.platform.exit_codes import BadInput, one_line


def _fail(e: Exception) -> None:
    """Bad input found before work: one line, exit status 2 (docs/platform.md, exit codes)."""
    raise BadInput(one_line(e)) from None


def _store(root: str | None):  # noqa: ANN202 - imported lazily to keep `mergelab --help` fast
    from mergelab.platform.store import Store

    return Store.resolve(root)


@click.command("campaign")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--n-trials", type=int, default=None, help="Stop this process after N trials (the study budget holds).")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan (template recipe, digest, search space, "
              "start points); no study, no MLflow run.")
@click.option("--fresh", is_flag=True, help="Start over: delete the campaign's study (its MLflow run is kept, "
              "retagged as superseded). Needed when the objective or search space changed.")
def campaign_cmd(config: str, n_trials: int | None, dry_run: bool, fresh: bool) -> None:
    """Run (or resume) the Optuna campaign in CONFIG: one MLflow parent run, one nested run per trial."""
    from mergelab.platform.campaign import run_campaign
    from mergelab.platform.campaign_config import load_campaign
    from mergelab.platform.campaign_space import campaign_plan
    from mergelab.platform.ui import run_link

    try:
        cfg = load_campaign(config)
        if dry_run:
            click.echo(campaign_plan(cfg))
            click.echo("dry run: no study opened, no MLflow run")
            return
        res = run_campaign(cfg, n_trials=n_trials, fresh=fresh)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(e)
    click.echo(f"campaign {res.study_name}: {res.n_complete} complete, {res.n_failed} failed, "
               f"{res.n_pruned} pruned; parent run {res.parent_run_id}")
    click.echo(f"  in the UI: {run_link(res.parent_run_id)}")
    if res.best:
        values = ", ".join(f"{v:.2f}" for v in res.best["values"])
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.best["params"].items())
        click.echo(f"best trial {res.best['number']}: {values} ({params})")
    for version, trial in res.registered:
        click.echo(f"registered {cfg.registry.name} v{version} (trial {trial})")


@click.command("worker")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--n-trials", type=int, default=None, help="Stop this worker after N trials.")
@click.option("--dry-run", is_flag=True, help="Validate CONFIG and print the plan; attach to nothing.")
def worker_cmd(config: str, n_trials: int | None, dry_run: bool) -> None:
    """Attach to CONFIG's shared study and work trials until its budget is spent.

    There is no --fresh here: workers share one study, and each would delete it at its start. Start over once with
    `mergelab campaign CONFIG --fresh --n-trials 0`, then start the workers."""
    from mergelab.platform.campaign_config import load_campaign
    from mergelab.platform.campaign_space import campaign_plan
    from mergelab.platform.worker import run_worker

    try:
        if dry_run:
            click.echo(campaign_plan(load_campaign(config)))
            click.echo("dry run: no study opened, no MLflow run")
            return
        res = run_worker(config, n_trials=n_trials)
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(e)
    click.echo(f"worker {os.getpid()} done: study {res.study_name} has {res.n_complete} complete, "
               f"{res.n_failed} failed, {res.n_pruned} pruned trials")


@click.command("promote")
@click.argument("name")
@click.option("--version", "version", default=None, help="Candidate version (default: best of --campaign / newest).")
@click.option("--campaign", default=None, help="Pick the candidate among this campaign's versions.")
@click.option("--margin", type=float, default=0.0, show_default=True,
              help="The gain's 95% paired-bootstrap interval must lie above this (points; 0: it excludes 0).")
@click.option("--max-task-drop", type=float, default=2.0, show_default=True, help="Largest allowed task drop.")
@click.option("--tasks", default=None, help="Comma-separated tasks (default: the version's eval.tasks tag).")
@click.option("--data-root", default=None, help="Evaluators' data root.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--root", default=None, help="Embedded store directory (default ./mlruns or $MERGELAB_ROOT).")
def promote_cmd(name: str, version: str | None, campaign: str | None, margin: float, max_task_drop: float,
                tasks: str | None, data_root: str | None, batch_size: int, device: str, root: str | None) -> None:
    """Evaluate a candidate of NAME on the test split; move `champion` only on a real win, else `challenger`."""
    from mergelab.platform.evaluation import HFEvaluator
    from mergelab.platform.promotion import promote
    from mergelab.platform.ui import model_url, ui_base

    try:
        d = promote(name, version=version, campaign=campaign, margin=margin, max_task_drop=max_task_drop,
                    tasks=tasks.split(",") if tasks else None, store=_store(root),
                    evaluator=HFEvaluator(data_root=data_root, batch_size=batch_size, device=device))
    except (ValueError, KeyError, FileNotFoundError) as e:
        _fail(e)
    click.echo(f"{name} v{d.candidate}: {d.decision} ({d.reason})")
    click.echo(f"model: {model_url(ui_base(_store(root)), name, d.candidate)}")
    click.echo(f"test scores ({d.test_items} items): "
               + json.dumps({t: round(s, 2) for t, s in d.candidate_scores.items()}))


@click.command("rollback")
@click.argument("name")
@click.option("--reason", default="manual rollback", show_default=True, help="Recorded in the alias history.")
@click.option("--history", "show", is_flag=True, help="Only print who held champion when, and why.")
@click.option("--root", default=None, help="Embedded store directory (default ./mlruns or $MERGELAB_ROOT).")
def rollback_cmd(name: str, reason: str, show: bool, root: str | None) -> None:
    """Give NAME's `champion` back to the version that held it before the current one."""
    from mergelab.platform.promotion import history_rows, rollback

    client = _store(root).client()
    try:
        if not show:
            e = rollback(client, name, reason)
            click.echo(f"{name}: champion back to v{e['version']} (was v{e['previous']})")
        for row in history_rows(client, name):
            click.echo(row)
    except (ValueError, KeyError) as e:
        _fail(e)


@click.command("registry")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows.")
@click.option("--root", default=None, help="Embedded store directory (default ./mlruns or $MERGELAB_ROOT).")
def registry_cmd(name: str | None, as_json: bool, root: str | None) -> None:
    """List registered versions (of NAME, or all models) with their metrics and aliases."""
    from mergelab.platform.registry import list_versions

    rows = list_versions(_store(root), name)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no registered versions")
        return
    cols = ["name", "version", "aliases", "method", "campaign", "trial", "val/average", "test/average", "decision"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    click.echo("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        click.echo("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


@click.command("ui")
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--root", default=None, help="Embedded store directory (default ./mlruns or $MERGELAB_ROOT).")
def ui_cmd(port: int, root: str | None) -> None:
    """Serve the MLflow UI on the embedded store, on 127.0.0.1 only (the printed link opens the model-training
    view: MLflow 3.17's UI otherwise opens experiments in its GenAI view)."""
    from mergelab.platform.ui import experiment_lines, experiments_url

    store = _store(root)
    base = f"http://127.0.0.1:{port}"
    client = store.client()
    for exp in client.search_experiments(max_results=50):
        if exp.name != "Default":  # the list's own links open MLflow's GenAI view; these open the runs table
            for line in experiment_lines(client, base, exp.experiment_id, exp.name):
                click.echo(line)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store.tracking_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if store.artifact_root:
        cmd += ["--default-artifact-root", store.artifact_root]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    click.echo(f"MLflow UI on {experiments_url(base)} (store {store.tracking_uri})")
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)  # the server replaces this process: Ctrl-C / SIGTERM reach it directly


COMMANDS = [campaign_cmd, worker_cmd, promote_cmd, rollback_cmd, registry_cmd, ui_cmd]
