"""`mergelab` command line: a thin layer that parses, validates and calls one library function per command.

Each command lives in its own module and is attached here with one line, so features land without touching
each other's code.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import click


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


def _attach() -> None:
    # One line per command module. Imports are local to keep `mergelab --help` fast and independent.
    import importlib

    for mod in (
        "mergelab.platform.cmd_merge",
        "mergelab.platform.cmd_bench",
        "mergelab.platform.cmd_eval",
        "mergelab.platform.cmd_tracking",
        "mergelab.platform.cmd_demo",
    ):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a command module not written yet
            if e.name == mod:
                continue
            raise
        for cmd in getattr(m, "COMMANDS", ()):
            main.add_command(cmd)


_attach()

if __name__ == "__main__":
    main()
