"""SIGTERM and SIGINT recorded in a flag and acted on at safe points, so that a stop request is never lost.

Raising from a signal handler raises inside whatever Python code runs at that moment: a garbage-collector callback
or a ``finally`` block swallows the exception (the stop is lost), and a half-done ``finally`` may leave debris.
Instead, :func:`install` (every ``mergelab`` command calls it) makes SIGTERM and SIGINT set a process-wide flag;
code with natural safe points -- the merge engine between tensors and statistics passes, the evaluators between
batches, a campaign between trials, a tracked merge between its phases -- runs inside :func:`deferred` and calls
:func:`check`, which raises :class:`Terminated` (a ``KeyboardInterrupt``) there. The usual handlers then run: the
MLflow run ends KILLED, partial outputs are removed, an Optuna trial ends FAIL.

Outside a :func:`deferred` region (e.g. a zoo build's training loop) the first signal raises at once, as Ctrl-C
always did. Inside one, a second signal raises at once (the user insists) and a third exits the process
immediately with ``128 + signal number``. The flag stays set once raised, so a stop swallowed by some
``except BaseException`` is raised again at the next safe point, and the CLI checks it before exiting.

Exit codes of an interrupted ``mergelab`` command: ``128 + signal number``: 130 for SIGINT (Ctrl-C), 143 for
SIGTERM (``kill``, ``docker stop``), the shells' convention.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["Terminated", "check", "clear", "deferred", "install", "pending", "sleep"]


class Terminated(KeyboardInterrupt):
    """A stop request (SIGTERM or SIGINT) acted on; ``exit_code`` is ``128 + signal number``."""

    def __init__(self, message: str = "signal SIGTERM", signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The process exit status for this signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


_lock = threading.Lock()
_pending: int | None = None
_count = 0
_depth = 0


def _terminated(signum: int) -> Terminated:
    return Terminated(f"signal {signal.Signals(signum).name}", signum)


def _handler(signum: int, frame: Any) -> None:
    global _pending, _count
    _count += 1
    if _pending is None:
        _pending = signum
    if _count >= 3:
        os._exit(128 + signum)  # third signal: the user wants out now, cleanup or not
    if _depth == 0 or _count >= 2:
        raise _terminated(signum)


def install() -> bool:
    """Route SIGTERM and SIGINT through the flag; only from the main thread, and only over the default handlers
    (an embedding application's own handlers are left alone). Returns whether anything was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    done = False
    for sig, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
        current = signal.getsignal(sig)
        if current is default or current is _handler:
            signal.signal(sig, _handler)
            done = True
    return done


def pending() -> int | None:
    """The signal number of a stop request not yet acted on (or acted on but still set), else ``None``."""
    return _pending


def check() -> None:
    """A safe point: raise :class:`Terminated` when a stop was requested."""
    sig = _pending
    if sig is not None:
        raise _terminated(sig)


def clear() -> None:
    """Forget a stop request (tests, or an application that handled it)."""
    global _pending, _count
    with _lock:
        _pending, _count = None, 0


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A region with safe points: the first signal only sets the flag, acted on by :func:`check`. Leaving the region
    does not check: a stop that came after the last safe point stays pending for the caller's next safe point
    (the CLI checks before exiting), so a finished result is never thrown away after the fact."""
    global _depth
    with _lock:
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1


def sleep(seconds: float, step: float = 0.1) -> None:
    """``time.sleep`` that is a safe point every ``step`` seconds."""
    end = time.monotonic() + seconds
    while True:
        check()
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(step, left))
