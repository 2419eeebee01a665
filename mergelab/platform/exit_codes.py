"""Exit codes of the ``mergelab`` commands and the bad-input error the command modules raise.

======  =====================================================================================================
code    meaning
======  =====================================================================================================
0       success
1       a failure while working (the MLflow run, if any, ends FAILED); one line, the traceback with ``--debug``
2       bad input, found before any work: no MLflow run was created and nothing was written; one line naming
        the culprit (also click's usage errors: unknown option, missing argument)
130     stopped by SIGINT (Ctrl-C): runs end KILLED, partial outputs removed
143     stopped by SIGTERM (``kill``, ``docker stop``): the same
======  =====================================================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

OK, FAILED, BAD_INPUT = 0, 1, 2

# What a check that runs before work raises for bad input (MergeError is a ValueError; pydantic's
# ValidationError too).
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, NotADirectoryError,
                                                 IsADirectoryError, PermissionError)


class BadInput(click.ClickException):
    """Bad input found before any work: one line, exit status 2."""

    exit_code = BAD_INPUT


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (a ``KeyError``'s quotes removed)."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return (msg.strip().splitlines() or [type(e).__name__])[0]


@contextlib.contextmanager
def bad_input() -> Iterator[None]:
    """Checks before work: any input error inside becomes :class:`BadInput` (exit 2, one line)."""
    try:
        yield
    except click.ClickException:
        raise
    except INPUT_ERRORS as e:
        raise BadInput(one_line(e)) from None
