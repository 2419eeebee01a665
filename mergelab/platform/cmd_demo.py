"""`mergelab demo`: the paper's comparison and a promotion end to end on the embedded default store."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option("--setting", type=click.Choice(["lora", "full"]), default="lora", show_default=True,
              help="Which experts to merge: LoRA adapters (the paper's Qwen2-VL setting) or full fine-tunes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Zoo seed whose base and experts are merged.")
@click.option("--trials", type=int, default=6, show_default=True, help="Optuna trials over OptMerge (0: skip).")
@click.option("--limit", type=int, default=100, show_default=True,
              help="Val samples per task for the comparison and the campaign (0: all); promotion uses all of test.")
@click.option("--quick", is_flag=True, help="Smoke run: lambda grid {0.3, 1.0}, 50 val samples per task, 3 trials.")
@click.option("--tiny", is_flag=True, help="Use a tiny zoo that builds in seconds (numbers are meaningless).")
@click.option("--zoo", type=click.Path(path_type=Path), default=None, help="Model zoo directory.")
@click.option("--root", type=click.Path(path_type=Path), default=None, help="Embedded store (default ./mlruns).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
def demo(setting: str, seed: int, trials: int, limit: int | None, quick: bool, tiny: bool, zoo: Path | None,
         root: Path | None, device: str) -> None:
    """Merge the offline benchmark's experts with the paper's methods, tune OptMerge, promote a champion."""
    from mergelab.platform.demo import LAM_GRID, format_rows, run_demo

    lam_grid = LAM_GRID
    limit = limit or None
    if quick:
        lam_grid, limit, trials = (0.3, 1.0), min(limit or 50, 50), min(trials, 3)
    res = run_demo(zoo=zoo, setting=setting, seed=seed, tiny=tiny, lam_grid=lam_grid, trials=trials, limit=limit,
                   root=root, device=device, log=click.echo)  # fmt: skip
    click.echo("")
    click.echo(f"val scores (percent), {setting} experts, seed {seed}; merges at their best lambda on val:")
    click.echo(format_rows(res.rows))
    if res.champion:
        click.echo(f"\nchampion after the comparison: version {res.champion['version']} ({res.champion['method']})")
    if res.promotion:
        click.echo(f"campaign promotion: {res.promotion['reason']}")
    click.echo(f"\ndone in {res.seconds:.0f} s. Browse the runs, the campaign and the registry: make ui")


COMMANDS = [demo]
