"""Compiled TIES per tensor (numba), for the engine's fused CPU path (:func:`mergelab.engine.fused.native_ties`).

The chunked torch form (:class:`~mergelab.methods.ties.TiesChunked`) pays for every elementwise step as a separate
kernel over a chunk: forming the ``(N, k)`` stack in float32 in each of its three or four passes, the radix
histograms (bool and integer kernels, several times the cost of a float add per entry on this torch build), the
sums, the disjoint mean. These kernels do each pass as one loop over the inputs as stored (bf16 as its bits, or
float32), with the same float32 arithmetic in the same order, so the merged tensor is bit-identical. The kernels
(:mod:`mergelab.engine.ties_kernels`):

1. ``bracket_pass``: per expert, how many ``|expert - base|`` (float32) lie below a bracket around its trimming
   threshold (from a sample), the few inside it (whose radix select gives the threshold), its sum of squares (the
   report's norm) and whether any entry is non-zero. When a bracket misses, ``high_pass`` and ``low_pass``
   histogram the magnitudes' high and low 16 bits instead (the radix select of :mod:`mergelab.methods._sparsify`).
2. ``merge_pass``: trim, sum, elect the sign, the disjoint mean, ``* lam``, ``+ base``, the conversion to the
   output dtype, in one loop; the majority sign (for entries whose sum is exactly 0) is known only after the whole
   tensor, so those entries, where some trimmed value is non-zero, are set aside with their values and finished by
   ``patch_pass`` (one pass where the torch form needs two: sums, then merge).

This module holds what needs no numba: whether the kernels can run (:func:`available`; ``MERGELAB_NATIVE=0`` turns
them off) and their background start (:func:`warm_up`, :func:`ready`, :func:`pays`, :func:`worth_waiting`:
importing numba and loading the compiled code take about a second, during which the engine merges with the torch
form). numba caches the compiled code next to the kernels' file, so only a first run compiles (about ten seconds,
in the background thread).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import time
from typing import Any


def available() -> bool:
    """Whether the compiled kernels can be used (numba is installed; ``MERGELAB_NATIVE`` is not 0/off/false/no)."""
    if os.environ.get("MERGELAB_NATIVE", "1").strip().lower() in ("0", "off", "false", "no"):
        return False
    return importlib.util.find_spec("numba") is not None


_warm: dict[tuple[int, str, str], threading.Event] = {}
_started: dict[tuple[int, str, str], float] = {}
_failed: set[tuple[int, str, str]] = set()
WARM_SECONDS = 0.8
"""About how long the warm-up takes from its start (importing numba about 0.2 s, loading the cached kernels about
0.35 s, beside the merge's own threads on a 2-core EPYC)."""
SAVED_PER_ENTRY = 1.4e-8
"""About what the kernels save per entry against the torch form (Qwen2-VL-2B's embedding matrix, 233M entries, N =
2: 4.4 s against 1.1 s)."""
_warm_lock = threading.Lock()


def warm_up(n_experts: int, kind_in: str, kind_out: str) -> None:
    """Compile (or load) the kernels for ``n_experts`` inputs of ``kind_in`` (``"bf16"``/``"f32"``) merged into
    ``kind_out`` in a background thread; :func:`ready` says when they can be called. Importing numba and loading
    its cache take about a second: the engine merges with the torch form meanwhile (bit-identical)."""
    key = (n_experts, kind_in, kind_out)
    with _warm_lock:
        if key in _warm or not available():
            return
        done = _warm[key] = threading.Event()
        _started[key] = time.perf_counter()

    def run() -> None:
        try:
            importlib.import_module("mergelab.engine.ties_kernels").warm(*key)
        except Exception:  # noqa: BLE001 - a kernel that does not compile is not used: the torch form merges
            _failed.add(key)
        finally:
            done.set()  # also on failure: nobody waits for ever

    threading.Thread(target=run, name="mergelab-ties-kernels", daemon=True).start()


def ready(n_experts: int, kind_in: str, kind_out: str, wait: bool = False) -> bool:
    """Whether :func:`warm_up` finished for these types. ``wait``: start it if it has not started, and block until
    it ends; without, a warm-up nobody started (the engine starts it only when it pays, :func:`pays`) is not."""
    if wait:
        warm_up(n_experts, kind_in, kind_out)
    ev = _warm.get((n_experts, kind_in, kind_out))
    if ev is None:
        return False
    if wait:
        ev.wait()
    return ev.is_set() and (n_experts, kind_in, kind_out) not in _failed


def pays(numel: int) -> bool:
    """Whether loading the kernels pays for a merge whose tensors they would merge hold ``numel`` entries in all
    (what they save on them exceeds the load, about :data:`WARM_SECONDS` of a core); else the torch form merges."""
    return numel * SAVED_PER_ENTRY > WARM_SECONDS


def worth_waiting(n_experts: int, kind_in: str, kind_out: str, numel: int) -> bool:
    """Whether a tensor of ``numel`` entries should wait for the warm-up still running rather than merge with the
    torch form: what the kernels save on it exceeds the warm-up's expected remaining time."""
    key = (n_experts, kind_in, kind_out)
    if key not in _started or _warm[key].is_set():  # not started, or nothing left to wait for
        return False
    left = max(0.0, WARM_SECONDS - (time.perf_counter() - _started[key]))
    return numel * SAVED_PER_ENTRY > left


def kernels() -> Any:
    """The compiled kernels' module (:mod:`mergelab.engine.ties_kernels`); ImportError without numba."""
    return importlib.import_module("mergelab.engine.ties_kernels")


__all__ = ["available", "kernels", "pays", "ready", "warm_up", "worth_waiting"]
