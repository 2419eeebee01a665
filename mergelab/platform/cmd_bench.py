"""``mergelab bench``: build the offline benchmark's model zoo and print its tables (mergelab.bench.zoo_*), and run
the omni (modality-merging) experiment (mergelab.bench.omni)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


@click.group("bench")
def bench() -> None:
    """The offline MLLM-merging benchmark: a zoo of tiny Qwen2-VL experts and its tables."""


@bench.command("build")
@click.option("--zoo", "zoo_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Zoo directory (default: the zoo shipped inside the package).")
@click.option("--rebuild", is_flag=True, help="Retrain every model, even those the manifest says are up to date.")
@click.option("--tiny", is_flag=True, help="A seconds-long toy zoo (smaller model, few steps, one seed).")
@click.option("--seeds", default=None, help="Comma-separated seeds overriding the plan's (e.g. 0,1).")
@click.option("--device", default="auto", show_default=True, help="Training device: auto, cpu, cuda.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Benchmark data for scoring (default: the evaluators' default root).")
@click.option("--no-eval", is_flag=True, help="Skip scoring the models into the manifest.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train each seed's experts and mixture in this many processes (the torch threads are split "
                   "among them; 2 on a 2-core machine).")
def build(zoo_dir: Path | None, rebuild: bool, tiny: bool, seeds: str | None, device: str, data_root: Path | None,
          no_eval: bool, jobs: int) -> None:
    """Train (or complete) the zoo: base, 5 full-FT + 5 LoRA experts and a mixture model per seed."""
    from mergelab.bench.zoo_build import build_zoo
    from mergelab.bench.zoo_plan import DEFAULT_ZOO

    seed_list = [int(s) for s in seeds.split(",")] if seeds else None
    t0 = time.perf_counter()
    manifest = build_zoo(zoo_dir or DEFAULT_ZOO, rebuild=rebuild, tiny=tiny, progress=True, seeds=seed_list,
                         device=device, evaluate=not no_eval, data_root=data_root, jobs=jobs)
    click.echo(f"zoo: {len(manifest['models'])} models in {zoo_dir or DEFAULT_ZOO} "
               f"({time.perf_counter() - t0:.0f} s this run)")


@bench.command("table")
@click.option("--zoo", "zoo_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Zoo directory (default: the shipped zoo).")
@click.option("--merges/--no-merges", default=True, show_default=True,
              help="Also merge the experts with every method (lambda picked on val) and score the merges.")
@click.option("--settings", default="full,lora", show_default=True, help="Expert settings: full, lora.")
@click.option("--methods", default=None, help="Comma-separated methods (default: the whole registry).")
@click.option("--val-limit", type=int, default=100, show_default=True, help="Val items per task for lambda.")
@click.option("--test-limit", type=int, default=None, help="Test items per task (default: all).")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the raw results as JSON.")
def table(zoo_dir: Path | None, merges: bool, settings: str, methods: str | None, val_limit: int,
          test_limit: int | None, data_root: Path | None, json_out: Path | None) -> None:
    """Print the benchmark tables (test split; shifted variant, then generic for forgetting)."""
    from mergelab.bench.zoo_plan import DEFAULT_ZOO
    from mergelab.bench.zoo_table import benchmark, check_targets, format_table, slowest_merge

    result = benchmark(zoo_dir or DEFAULT_ZOO, settings=settings.split(","),
                       methods=(methods.split(",") if methods else ([] if not merges else None)),
                       val_limit=val_limit, test_limit=test_limit, data_root=data_root, log=click.echo)
    for setting in settings.split(","):
        for variant in ("shifted", "generic"):
            click.echo("\n" + format_table(result, setting, variant))
        for name, ok, detail in check_targets(result, setting):
            click.echo(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
        line = slowest_merge(result, setting)
        if line:
            click.echo(f"  {line}")
    if json_out:
        json_out.write_text(json.dumps(result, indent=1, default=str))



@bench.command("omni")
@click.option("--zoo", "zoo_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Zoo root; <zoo>/omni/seed<k> (base, experts, merge layout) is built when missing.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated zoo seeds.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Processes (one torch thread each) for the expert training and then the evaluations; the scores "
                   "equal one process's [default: the usable cores].")
@click.option("--device", default="cpu", show_default=True, help="Training, merge and evaluation device.")
@click.option("--settings", default=None, help="Expert settings: lora, full (default: both).")
@click.option("--methods", default=None, help="Comma-separated methods (default: every paper method).")
@click.option("--lam", "lam_grid", default=None, help="Comma-separated lambda grid swept on val (default 0.5,1,1.5).")
@click.option("--lora-merge", "lora_modes", default="delta", show_default=True,
              help="LoRA merge modes, comma-separated: delta (scaling * B @ A), factors (A and B merged separately, "
                   "as the official modality script; models lora/<method>/factors).")
@click.option("--compose", "compose_modes", default="naivemc,damc", show_default=True,
              help="Online composition references (the paper's 'online composing' columns, not merges): naivemc "
                   "(activation averaging), damc (each medium's tokens through its expert's delta), comma-separated, "
                   "or none; models compose/<mode>/<setting>.")
@click.option("--quick", is_flag=True, help="Test-sized models and evaluation (about a minute on 2 cores).")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON.")
@click.option("--track", is_flag=True, help="Each merge an MLflow run (the store of MERGELAB_ROOT / "
                                            "MLFLOW_TRACKING_URI); the chosen merges get their test scores; the "
                                            "base and each expert are reference runs.")
@click.option("--experiment", default="omni", show_default=True, help="MLflow experiment of the tracked merges.")
def omni(zoo_dir: Path, seeds: str, jobs: int | None, device: str, settings: str | None, methods: str | None,
         lam_grid: str | None, lora_modes: str, compose_modes: str, quick: bool, json_out: Path | None,
         track: bool, experiment: str) -> None:
    """Modality merging (the paper's Table 5): vision, audio and video experts merged into one omni model."""
    from mergelab.bench.omni.compose import parse_modes
    from mergelab.bench.omni.table import run

    merger, on_scores = _omni_tracking(experiment) if track else (None, None)
    result = run(zoo_dir, [int(s) for s in seeds.split(",")], jobs=jobs, device=device, json_out=json_out,
                 quick=quick, methods=methods.split(",") if methods else None,
                 lam_grid=[float(x) for x in lam_grid.split(",")] if lam_grid else None,
                 settings=settings.split(",") if settings else None, log=click.echo, merger=merger,
                 on_scores=on_scores, lora_modes=lora_modes.split(","), compose=parse_modes(compose_modes))
    if track:  # the base and each expert as reference runs beside the merges (mergelab.platform.omni)
        from mergelab.platform.omni import log_omni_references
        from mergelab.platform.store import Store

        log_omni_references(Store.resolve(), experiment, result, zoo_dir, quick=quick, device=device, log=click.echo)


def _omni_tracking(experiment: str) -> tuple[Callable[[Any, Path, str], Any], Callable[[str, dict[str, float]], None]]:
    """A merger making each omni merge an MLflow run in ``experiment`` (run name ``seed<k>/<setting>/<method>/
    lam<lam>``), and a callback logging a chosen merge's test scores (``test/<metric>``) to its run, the last one
    of that name."""
    from mergelab.platform.merge_run import tracked_merge
    from mergelab.platform.store import Store, log_scores

    store = Store.resolve()
    last: dict[str, str] = {}

    def merger(recipe: Any, out: Path, name: str) -> Any:  # a MergeRecipe (the engine is imported lazily)
        # child=False: many merges in one process, the store opened once here costs less than a child per merge
        tm = tracked_merge(recipe, store=store, experiment=experiment, run_name=name, out=out, overwrite=True,
                           tags={"mergelab.omni": name}, child=False)
        last[name.rsplit("/lam", 1)[0]] = tm.run_id
        return tm.report

    def on_scores(name: str, scores: dict[str, float]) -> None:
        log_scores(store.client(), last[name], {f"test/{k}": v for k, v in scores.items()})

    return merger, on_scores


COMMANDS = [bench]
