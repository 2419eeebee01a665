"""`mergelab` command line: a thin layer that parses, validates and calls one library function per command.

Each command lives in its own module (``cmd_*.py``) and is attached here, so features land without touching each
other's code. Heavy imports (torch, transformers, mlflow, optuna) happen inside the commands, so ``--help`` is fast.

Every command: SIGTERM and SIGINT are recorded and acted on at safe points (:mod:`mergelab._signals`); errors print
one line (the traceback with ``--debug``); the exit status is one of :mod:`mergelab.platform.exit_codes` (0 success,
1 failure while working, 2 bad input before any work, 130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
import warnings
from typing import Any

import click

from mergelab import _signals
from mergelab._signals import Terminated
from mergelab.platform import cmd_bench, cmd_demo, cmd_eval, cmd_merge, cmd_methods, cmd_tracking
from mergelab.platform.exit_codes import FAILED, one_line

__all__ = ["Terminated", "main", "raise_on_sigterm"]


def raise_on_sigterm() -> bool:
    """Install the stop handlers of :mod:`mergelab._signals` (SIGTERM and SIGINT recorded in a flag, acted on at
    safe points; raised at once outside them), as every ``mergelab`` command does. Returns whether installed."""
    return _signals.install()


class _Main(click.Group):
    """The ``mergelab`` group: one line per error, the documented exit codes, no stop request lost."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get("MERGELAB_DEBUG", "") not in ("", "0")
        try:
            rv = super().invoke(ctx)
            _signals.check()  # a stop recorded but swallowed somewhere still ends the command as a stop
            return rv
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Terminated as e:
            if debug:
                traceback.print_exc()
            click.echo(f"mergelab: stopped by {signal_name(e.signum)}; runs ended KILLED", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:  # a Ctrl-C raised before the handler was installed
            click.echo("mergelab: stopped by SIGINT", err=True)
            ctx.exit(130)
        except Exception as e:  # noqa: BLE001 - the last resort: one line, exit 1
            if debug:
                traceback.print_exc()
            name = ctx.invoked_subcommand or "mergelab"
            click.echo(f"Error: {name}: {type(e).__name__}: {one_line(e)}"
                       + ("" if debug else " (rerun with --debug for the traceback)"), err=True)
            ctx.exit(FAILED)


def signal_name(signum: int) -> str:
    """``15`` -> ``SIGTERM``."""
    return signal.Signals(signum).name


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Print tracebacks of errors (also MERGELAB_DEBUG=1).")
@click.option("-v", "--verbose", is_flag=True, help="More output: the full merge summary and the libraries' own "
              "(transformers' per-load progress bars and logs, MLflow's and Optuna's INFO lines, library warnings; "
              "also MERGELAB_VERBOSE=1).")
@click.version_option(package_name="mergelab")
def main(debug: bool, verbose: bool) -> None:
    """Merge fine-tuned LLM/MLLM experts, evaluate, tune with Optuna, track in MLflow, promote via the registry."""
    if verbose:
        os.environ["MERGELAB_VERBOSE"] = "1"
    if not verbose and os.environ.get("MERGELAB_VERBOSE", "") in ("", "0"):
        quiet_libraries(click.get_current_context().invoked_subcommand)
    raise_on_sigterm()


#: Libraries whose Python warnings (deprecations, "parameter importances will be equal", ...) only ``-v`` shows.
QUIET_WARNINGS = r"(optuna|mlflow|transformers|peft|torch|torchvision|alembic|sqlalchemy|pydantic|matplotlib|pandas" \
                 r"|huggingface_hub|accelerate|safetensors|lm_eval|datasets|plotly)(\.|$)"

#: The commands that import optuna anyway (campaigns): they also get its per-trial log lines silenced.
OPTUNA_COMMANDS = frozenset({"campaign", "worker", "demo"})


def quiet_libraries(command: str | None) -> None:
    """The default output: mergelab's own lines and one progress bar per merge or evaluation. MLflow logs warnings
    only (not "Creating initial MLflow database tables..."), the libraries' Python warnings are not shown, and for
    campaigns Optuna's "Trial N finished" lines are not either; ``-v`` (or ``MERGELAB_VERBOSE=1``) keeps them all.
    Transformers' per-load bars and logs are silenced where models load (:func:`mergelab.hf.quiet_transformers`).

    Args:
        command: the subcommand about to run.
    """
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read by mlflow when it is imported
    if "mlflow" in sys.modules:  # already imported (mergelab used as a library, then its CLI called)
        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])
    warnings.filterwarnings("ignore", module=QUIET_WARNINGS)
    if command in OPTUNA_COMMANDS:
        # imported here, not at the top: importing optuna costs half a second, and only these commands need it
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)


# One line per command module; the modules import only click at the top (their work is imported when a command
# runs), so `mergelab --help` stays fast.
for _commands in (cmd_merge.COMMANDS, cmd_bench.COMMANDS, cmd_eval.COMMANDS, cmd_tracking.COMMANDS, cmd_demo.COMMANDS,
                  cmd_methods.COMMANDS):
    for _cmd in _commands:
        main.add_command(_cmd)

if __name__ == "__main__":
    sys.exit(main())
