"""`mergelab demo`: the paper's comparison in both capability settings and in modality merging (omni), an OptMerge
campaign and an earned promotion in each, on the embedded default store."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click


@click.command("demo")
@click.option("--setting", type=click.Choice(["all", "both", "full", "lora", "omni"]), default="all",
              show_default=True,
              help="Which experts to merge: full fine-tunes, LoRA adapters (the paper's Qwen2-VL setting), both, "
                   "the omni zoo's vision/audio/video LoRA experts (modality merging), or all three.")
@click.option("--seed", type=int, default=0, show_default=True, help="Zoo seed whose base and experts are merged.")
@click.option("--trials", type=int, default=8, show_default=True, help="Optuna trials over OptMerge (0: skip).")
@click.option("--omni-trials", type=int, default=None,
              help="Optuna trials of the omni section's campaign (default 4; --quick/--tiny 2; 0: skip).")
@click.option("--limit", type=int, default=100, show_default=True,
              help="Val items per task for the lambda sweep and the campaign (0: all).")
@click.option("--test-limit", type=int, default=300, show_default=True,
              help="Test items per task for the table rows (0: all); promotion always uses the whole test split.")
@click.option("--quick", is_flag=True, help="Smoke run: lambda grid {0.3, 1.0}, 50 val / 100 test items per task "
                                            "(omni: lambda {0.5, 1.0}, 14 val / 84 test items per set, 2 trials).")
@click.option("--tiny", is_flag=True, help="Use a tiny zoo that builds in seconds (numbers are meaningless).")
@click.option("--zoo", type=click.Path(path_type=Path), default=None, help="Model zoo directory.")
@click.option("--root", type=click.Path(path_type=Path), default=None, help="Embedded store (default ./mlruns).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
def demo(setting: str, seed: int, trials: int, omni_trials: int | None, limit: int, test_limit: int, quick: bool,
         tiny: bool, zoo: Path | None, root: Path | None, device: str) -> None:
    """Merge the offline benchmark's experts with the paper's methods, tune OptMerge, promote a champion."""
    from mergelab.platform.demo import LAM_GRID, SettingResult, format_rows, run_demo
    from mergelab.platform.store import Store
    from mergelab.platform.ui import experiment_lines, experiment_link, model_url, ui_base

    t0 = time.perf_counter()
    lam_grid = LAM_GRID
    val_limit, t_limit = limit or None, test_limit or None
    if quick:
        lam_grid, val_limit, t_limit = (0.3, 1.0), min(val_limit or 50, 50), min(t_limit or 100, 100)
    settings = {"all": ("full", "lora", "omni"), "both": ("full", "lora")}.get(setting, (setting,))
    results: list[SettingResult] = []
    if capability := [s for s in settings if s != "omni"]:
        results += run_demo(zoo=zoo, settings=capability, seed=seed, tiny=tiny, lam_grid=lam_grid, trials=trials,
                            limit=val_limit, test_limit=t_limit, root=root, device=device,
                            log=click.echo).settings  # fmt: skip
    if "omni" in settings:
        from mergelab.platform.demo_omni import OmniDemo, run_omni

        spec = OmniDemo.tiny() if tiny else OmniDemo.quick() if quick else OmniDemo()
        spec = spec if omni_trials is None else dataclasses.replace(spec, trials=omni_trials)
        results.append(run_omni(store=Store.resolve(root), seed=seed, tiny=tiny, spec=spec, device=device,
                                log=click.echo))
    for s in results:
        click.echo("")
        first = "all" if t_limit is None else t_limit
        if s.table:
            click.echo(f"test split, omni zoo's LoRA experts (vision, audio, video), seed {seed}: each expert with "
                       f"its own medium, merges at their val-selected lambda (MLflow experiment {s.experiment}):")
            click.echo(s.table)
        else:
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
    click.echo(f"\ndone in {time.perf_counter() - t0:.0f} s. Serve the UI for the links above: mergelab ui (or make ui)")


COMMANDS = [demo]
