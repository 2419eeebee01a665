"""`mergelab eval MODEL`: evaluate a checkpoint (or LoRA adapter) directory, or a registered model version
(``models:/NAME@champion``, ``models:/NAME/3``; resolved in the store of ``$MLFLOW_TRACKING_URI`` or ``./mlruns``
by :func:`mergelab.platform.registry.resolve_model_dir`, no copy for a local store), on registered tasks."""

from __future__ import annotations

from pathlib import Path

import click

from mergelab.platform.exit_codes import BadInput, one_line


@click.command("eval")
@click.argument("model")
@click.option("--tasks", default="offline", show_default=True,
              help="Comma-separated task names or a suite name (offline, paper).")
@click.option("--split", default="val", show_default=True, help="Split of the offline benchmark (train/val/test).")
@click.option("--data-root", type=click.Path(path_type=Path), default=None, help="Data root (default per task).")
@click.option("--limit", type=int, default=None, help="Evaluate the first N samples of each task.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:i]")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the metrics and per-sample records to this JSON file.")
def eval_cmd(model: str, tasks: str, split: str, data_root: Path | None, limit: int | None,
             batch_size: int, device: str, json_out: Path | None) -> None:
    """Evaluate MODEL (a directory or models:/NAME@ALIAS) and print one line per task plus the average (percent)."""
    from mergelab.evaluators import SUITES, TASKS, evaluate_path, get_suite
    from mergelab.platform.campaign_config import did_you_mean

    model_dir = model_path(model)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if len(names) == 1 and names[0] in SUITES:
        names = list(get_suite(names[0]).tasks)
    for t in names:  # before any model is loaded
        if t not in TASKS:
            raise BadInput(f"--tasks: unknown task {t!r}{did_you_mean(t, [*TASKS, *SUITES])}; "
                           f"known: {sorted(TASKS)}, suites {sorted(SUITES)}")
    if json_out is not None and not json_out.absolute().parent.is_dir():
        raise BadInput(f"--json-out: directory {json_out.absolute().parent} does not exist")
    try:
        res = evaluate_path(model_dir, tasks=names, split=split, data_root=data_root, limit=limit,
                            batch_size=batch_size, progress=True, device=device)
    except (KeyError, FileNotFoundError, ValueError) as e:
        raise BadInput(one_line(e).strip("'\"")) from None
    click.echo(res.summary())
    if json_out is not None:
        res.save(json_out)


def model_path(model: str) -> Path:
    """A directory as given, or the directory of a registered version (``models:/NAME@ALIAS`` | ``/VERSION``)."""
    if model.startswith("models:/"):
        from mergelab.platform.registry import resolve_model_dir
        from mergelab.platform.store import Store

        try:
            return resolve_model_dir(Store.resolve(), model)
        except ValueError as e:
            raise BadInput(one_line(e)) from None
    path = Path(model)
    if not path.is_dir():
        raise click.BadParameter(f"{model} is neither a directory nor a models:/ URI", param_hint="MODEL")
    return path


COMMANDS = [eval_cmd]
