"""`mergelab demo`: the paper's comparison in both settings, an OptMerge campaign and an earned promotion, on the
embedded default store."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option("--setting", type=click.Choice(["both", "full", "lora"]), default="both", show_default=True,
              help="Which experts to merge: full fine-tunes, LoRA adapters (the paper's Qwen2-VL setting), or both.")
@click.option("--seed", type=int, default=0, show_default=True, help="Zoo seed whose base and experts are merged.")
@click.option("--trials", type=int, default=8, show_default=True, help="Optuna trials over OptMerge (0: skip).")
@click.option("--limit", type=int, default=100, show_default=True,
              help="Val items per task for the lambda sweep and the campaign (0: all).")
@click.option("--test-limit", type=int, default=300, show_default=True,
              help="Test items per task for the table rows (0: all); promotion always uses the whole test split.")
@click.option("--quick", is_flag=True, help="Smoke run: lambda grid {0.3, 1.0}, 50 val / 100 test items per task.")
@click.option("--tiny", is_flag=True, help="Use a tiny zoo that builds in seconds (numbers are meaningless).")
@click.option("--zoo", type=click.Path(path_type=Path), default=None, help="Model zoo directory.")
@click.option("--root", type=click.Path(path_type=Path), default=None, help="Embedded store (default ./mlruns).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
def demo(setting: str, seed: int, trials: int, limit: int, test_limit: int, quick: bool, tiny: bool,
         zoo: Path | None, root: Path | None, device: str) -> None:
    """Merge the offline benchmark's experts with the paper's methods, tune OptMerge, promote a champion."""
    from mergelab.platform.demo import LAM_GRID, format_rows, run_demo
    from mergelab.platform.store import Store
    from mergelab.platform.ui import experiment_lines, experiment_link, model_url, ui_base

    lam_grid = LAM_GRID
    val_limit, t_limit = limit or None, test_limit or None
    if quick:
        lam_grid, val_limit, t_limit = (0.3, 1.0), min(val_limit or 50, 50), min(t_limit or 100, 100)
    settings = ("full", "lora") if setting == "both" else (setting,)
    res = run_demo(zoo=zoo, settings=settings, seed=seed, tiny=tiny, lam_grid=lam_grid, trials=trials,
                   limit=val_limit, test_limit=t_limit, root=root, device=device, log=click.echo)  # fmt: skip
    for s in res.settings:
        click.echo("")
        first = "all" if t_limit is None else t_limit
        click.echo(f"test split (first {first} items per task; a promoted version's row: the whole split; "
                   "items: each row's test items), "
                   f"{s.setting} experts, seed {seed}; merges at their val-selected lambda "
                   f"(MLflow experiment {s.experiment}):")
        click.echo(format_rows(s.rows))
        if s.champion:
            c = s.champion
            click.echo(f"champion: v{c.get('holder')} ({c.get('holder_method')}, whole-split test average "
                       f"{c.get('holder_test_average')})")
        if s.promotion:
            click.echo(f"campaign promotion: {s.promotion['decision']}: {s.promotion['reason']}")
        for line in s.skipped:
            click.echo(f"skipped: {line}")
        store = Store.resolve(root)
        click.echo(f"runs: {experiment_link(s.experiment, store)}")
        client = store.client()
        if (exp := client.get_experiment_by_name(s.experiment)) is not None:  # the test scores view, compare page
            for line in experiment_lines(client, ui_base(store), exp.experiment_id, s.experiment)[1:]:
                click.echo(line.strip())
        click.echo(f"registry: {model_url(ui_base(store), s.experiment)}")  # the model is named like the experiment
    click.echo(f"\ndone in {res.seconds:.0f} s. Serve the UI for the links above: mergelab ui (or make ui)")


COMMANDS = [demo]
