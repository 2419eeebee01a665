"""`mergelab eval MODEL_DIR`: evaluate a checkpoint (or LoRA adapter) directory on registered tasks."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("eval")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tasks", default="vqa,geometry,chart,ocr,grounding", show_default=True,
              help="Comma-separated task names or a suite name (offline, paper).")
@click.option("--split", default="val", show_default=True, help="Split of the offline benchmark (train/val/test).")
@click.option("--data-root", type=click.Path(path_type=Path), default=None, help="Data root (default per task).")
@click.option("--limit", type=int, default=None, help="Evaluate the first N samples of each task.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:i]")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the metrics and per-sample records to this JSON file.")
def eval_cmd(model_dir: Path, tasks: str, split: str, data_root: Path | None, limit: int | None,
             batch_size: int, device: str, json_out: Path | None) -> None:
    """Evaluate MODEL_DIR and print one line per task plus the average (percent)."""
    from mergelab.evaluators import SUITES, evaluate_path, get_suite

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if len(names) == 1 and names[0] in SUITES:
        names = list(get_suite(names[0]).tasks)
    try:
        res = evaluate_path(model_dir, tasks=names, split=split, data_root=data_root, limit=limit,
                            batch_size=batch_size, progress=True, device=device)
    except (KeyError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e).strip("'\"")) from None
    click.echo(res.summary())
    if json_out is not None:
        res.save(json_out)


COMMANDS = [eval_cmd]
