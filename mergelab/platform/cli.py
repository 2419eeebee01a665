"""`mergelab` command line: a thin layer that parses, validates and calls one library function per command.

Each command lives in its own module and is attached here with one line, so features land without touching
each other's code.
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergelab")
def main() -> None:
    """Merge fine-tuned LLM/MLLM experts, evaluate, tune with Optuna, track in MLflow, promote via the registry."""


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
