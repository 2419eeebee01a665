"""`mergelab` command line: a thin layer that parses, validates and calls one library function per command.

Each command lives in its own module (``cmd_*.py``) and is attached here, so features land without touching each
other's code. Heavy imports (torch, transformers, mlflow, optuna) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import click

from mergelab.platform import cmd_bench, cmd_demo, cmd_eval, cmd_merge, cmd_tracking


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C."""


def raise_on_sigterm() -> bool:
    """Turn SIGTERM into :class:`Terminated` (a ``KeyboardInterrupt``), as Ctrl-C already is.

    By default SIGTERM (``kill``, ``docker stop``, a batch scheduler's preemption) ends Python without running
    ``except``/``finally`` blocks: a tracked merge's run would stay RUNNING in MLflow and its partial weights
    would stay on disk. Raised instead, it goes through the same handlers as Ctrl-C: the run ends KILLED, partial
    outputs are removed, an Optuna trial ends FAIL. Installed only from the main thread and only over the default
    handler (an embedding application's own handler is left alone). Returns whether it was installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False

    def _raise(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, _raise)
    return True


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergelab")
def main() -> None:
    """Merge fine-tuned LLM/MLLM experts, evaluate, tune with Optuna, track in MLflow, promote via the registry."""
    raise_on_sigterm()


# One line per command module; the modules import only click at the top (their work is imported when a command
# runs), so `mergelab --help` stays fast.
for _commands in (cmd_merge.COMMANDS, cmd_bench.COMMANDS, cmd_eval.COMMANDS, cmd_tracking.COMMANDS, cmd_demo.COMMANDS):
    for _cmd in _commands:
        main.add_command(_cmd)

if __name__ == "__main__":
    main()
