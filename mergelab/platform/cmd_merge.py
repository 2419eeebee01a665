"""`mergelab merge CONFIG.yaml --out DIR`: validate the recipe, stream the merge, print the summary.

As thin as mergekit's ``run_yaml.py``: YAML -> :class:`~mergelab.engine.recipe.MergeRecipe`
(:func:`~mergelab.platform.merge_config.load_recipe`) -> every check that needs no work
(:func:`mergelab.engine.loop.preflight`: paths, output directory, shapes, lineage, plan, tensor accounting) ->
:func:`mergelab.engine.run_merge` (inside an MLflow run unless ``--no-track``; a child process imports mlflow and
opens the store while it merges, and records the run after it: this process never imports mlflow) with a progress
bar over tensors -> print the essential lines of :meth:`MergeReport.summary` (all
of it with ``mergelab -v``). ``--eval TASKS`` evaluates the merge in the same MLflow run (scores in the run and the
model card); ``--dry-run`` stops after the checks and prints the recipe, its digest and the plan's counts.
CONFIG may also be a mergekit YAML (:mod:`mergelab.platform.mergekit_yaml`). Bad input exits with status 2 and one
line naming the culprit, before any MLflow run exists; nothing is written to ``--out``. A failure during the merge
exits 1, its run FAILED.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mergelab.platform.exit_codes import bad_input

if TYPE_CHECKING:
    from mergelab.platform.track_child import TrackingChild


@click.command("merge")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="output directory (required unless --dry-run)")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory")
@click.option("--device", default=None, help="override the config's device: auto | cpu | cuda[:i]")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="also write the full MergeReport (per tensor) as JSON here")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--allow-base-mismatch", is_flag=True,
              help="merge experts whose adapter/model config names another base than BASE")
@click.option("--track/--no-track", default=True, show_default=True, envvar="MERGELAB_TRACK",
              help="record the merge as an MLflow run (store: ./mlruns or $MLFLOW_TRACKING_URI; env MERGELAB_TRACK)")
@click.option("--eval", "eval_tasks", default=None,
              help="evaluate the merge on these tasks (comma-separated or a suite) in the same tracked run")
@click.option("--dry-run", is_flag=True, help="validate, print the recipe, its digest and the plan; merge nothing")
def merge(config: Path, out: Path | None, overwrite: bool, device: str | None, report_path: Path | None, quiet: bool,
          allow_base_mismatch: bool, track: bool, eval_tasks: str | None, dry_run: bool) -> None:
    """Merge the experts of CONFIG (a mergelab recipe or a mergekit YAML) into OUT."""
    # imported here, as the other work of the commands (`mergelab --help` stays fast)
    from mergelab.platform.track_child import TrackingChild

    # a tracked merge into OUT records its run from a child process: started first, so that it imports mlflow while
    # this process imports torch and checks the input (it opens the store only once the checks passed)
    child = TrackingChild() if track and out is not None and not dry_run and not eval_tasks else None
    try:
        _merge(config, out, overwrite, device, report_path, quiet, allow_base_mismatch, track, eval_tasks, dry_run,
               child)
    finally:
        if child is not None:
            child.close()


def _merge(config: Path, out: Path | None, overwrite: bool, device: str | None, report_path: Path | None,
           quiet: bool, allow_base_mismatch: bool, track: bool, eval_tasks: str | None, dry_run: bool,
           child: TrackingChild | None) -> None:
    """:func:`merge`'s work; ``child``: the tracking child started for it (``None``: untracked, a dry run or --eval)."""
    from mergelab.engine import run_merge
    from mergelab.engine.loop import preflight
    from mergelab.platform.merge_config import load_recipe

    with bad_input():
        recipe = load_recipe(config)
        if device is not None:
            recipe = recipe.replace(device=device)
        if out is None and not dry_run:
            raise click.UsageError("Missing option '--out' (only --dry-run runs without it)")
        plan = preflight(recipe, out, overwrite=overwrite, allow_base_mismatch=allow_base_mismatch)
        if report_path is not None and not report_path.absolute().parent.is_dir():
            raise FileNotFoundError(f"--report: directory {report_path.absolute().parent} does not exist")
        tasks = task_list(eval_tasks) if eval_tasks else []
        if tasks and not track:
            raise click.UsageError("--eval logs its scores in the merge's MLflow run; drop --no-track")
    if dry_run:
        click.echo(dry_run_text(recipe, plan))
        return
    assert out is not None
    if track:  # the same engine call, as an MLflow run
        from mergelab.platform.merge_run import tracked_merge

        tracked = tracked_merge(recipe, out=out, overwrite=overwrite, progress=not quiet, run_name=config.stem,
                                allow_base_mismatch=allow_base_mismatch, tasks=tasks, child=child)
        report = tracked.report
        click.echo(f"MLflow run {tracked.run_id}")
        click.echo(f"  in the UI: {tracked.link or _run_link(tracked.run_id)}")
        if tracked.val is not None:
            scores = tracked.val.scores
            click.echo("val: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items())
                       + (f"; average {sum(scores.values()) / len(scores):.1f}" if scores else ""))
    else:
        report = run_merge(recipe, out, overwrite=overwrite, progress=not quiet,
                           allow_base_mismatch=allow_base_mismatch)
    click.echo(report.summary() if verbose() else brief_summary(report))
    if report_path is not None:
        report_path.write_text(json.dumps(report.to_dict(), indent=2))


def _run_link(run_id: str) -> str:
    """The run's UI link, looked up in the store (--eval: the run was recorded in this process)."""
    # imported here: the ui module imports mlflow, which a merge recorded by a child process never needs
    from mergelab.platform.ui import run_link

    return run_link(run_id)


#: The lines of ``MergeReport.summary()`` printed without ``-v``: where the merge went, the method, the tensor
#: counts, bytes, time and memory, the global passes and an adapter's rank and error (``-v`` adds the policy, the
#: experts, the per-input accounting, the slowest tensors and the largest update).
BRIEF_LINES = ("merged -> ", "method ", "tensors: ", "read ", "global statistics", "adapter: ")


def verbose() -> bool:
    """Whether ``mergelab -v`` (or ``MERGELAB_VERBOSE=1``) asked for the full output."""
    return os.environ.get("MERGELAB_VERBOSE", "") not in ("", "0")


def brief_summary(report: Any) -> str:
    """The summary's essential lines (:data:`BRIEF_LINES`)."""
    return "\n".join(line for line in report.summary().splitlines() if line.startswith(BRIEF_LINES))


def task_list(tasks: str) -> list[str]:
    """``"vqa,ocr"`` or a suite name -> task names."""
    from mergelab.evaluators import SUITES, TASKS, get_suite

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    names = list(get_suite(names[0]).tasks) if len(names) == 1 and names[0] in SUITES else names
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise click.BadParameter(f"unknown task(s) {unknown}; known: {sorted(TASKS)}, suites {sorted(SUITES)}",
                                 param_hint="--eval")
    return names


def dry_run_text(recipe: Any, plan: dict[str, Any]) -> str:
    """The validated recipe as YAML, its digest and the plan's counts."""
    import yaml

    lines = ["# recipe (validated)", yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip(),
             f"digest: {recipe.digest}", f"device: {plan['device']}",
             "plan: " + ", ".join(f"{k} {v}" for k, v in plan["tensors"].items())
             + f" (total {sum(plan['tensors'].values())}; {plan['bytes_out'] / 2**30:.3f} GiB out)"]
    acc = plan.get("accounting") or {}
    if acc.get("base"):
        lines.append("base tensors: " + ", ".join(f"{k} {v}" for k, v in acc["base"].items()))
    lines += [f"expert {n}: " + ", ".join(f"{k} {v}" for k, v in c.items())
              for n, c in (acc.get("experts") or {}).items()]
    lines.append("dry run: nothing merged, nothing written")
    return "\n".join(lines)


COMMANDS = [merge]
