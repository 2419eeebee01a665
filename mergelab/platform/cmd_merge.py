"""`mergelab merge CONFIG.yaml --out DIR`: validate the recipe, stream the merge, print the summary.

As thin as mergekit's ``run_yaml.py``: YAML -> :class:`~mergelab.engine.recipe.MergeRecipe`
(:func:`~mergelab.platform.merge_config.load_recipe`) -> :func:`mergelab.engine.run_merge` (inside an MLflow run
unless ``--no-track``) with a progress bar over tensors -> print :meth:`MergeReport.summary`.
Bad input exits with status 2 and one line naming the culprit; nothing is written to ``--out``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("merge")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="output directory")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory")
@click.option("--device", default=None, help="override the config's device: auto | cpu | cuda[:i]")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="also write the full MergeReport (per tensor) as JSON here")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--track/--no-track", default=True, show_default=True, envvar="MERGELAB_TRACK",
              help="record the merge as an MLflow run (store: ./mlruns or $MLFLOW_TRACKING_URI; env MERGELAB_TRACK)")
def merge(config: Path, out: Path, overwrite: bool, device: str | None, report_path: Path | None, quiet: bool,
          track: bool) -> None:
    """Merge the experts of CONFIG (YAML: base, experts, method, params, policy, device, dtype, seed) into OUT."""
    from mergelab.engine import MergeError, run_merge
    from mergelab.platform.merge_config import load_recipe

    try:
        recipe = load_recipe(config)
        if device is not None:
            recipe = recipe.replace(device=device)
        if track:  # the same engine call, as an MLflow run
            from mergelab.platform.merge_run import tracked_merge

            tracked = tracked_merge(recipe, out=out, overwrite=overwrite, progress=not quiet, run_name=config.stem)
            report = tracked.report
            click.echo(f"MLflow run {tracked.run_id}")
        else:
            report = run_merge(recipe, out, overwrite=overwrite, progress=not quiet)
    except MergeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(report.summary())
    if report_path is not None:
        report_path.write_text(json.dumps(report.to_dict(), indent=2))


COMMANDS = [merge]
