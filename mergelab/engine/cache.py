"""The process-wide decomposition cache: trial-independent per-layer SVDs and eigendecompositions, reused.

A campaign's trials merge the same experts again and again with other ``lam``, ``steps``, ``rank_ratio`` or
coefficients; the per-layer decompositions those settings only slice or weigh (each task vector's spectrum, the
Gram eigendecompositions of OptMerge and WUDI, the moments of SWUDI, the SVDs of TSV and Iso-C/CTS) are the same
in every trial. :func:`process_cache` is the one in-memory store :func:`~mergelab.engine.loop.run_merge` hands to
every method through ``MergeContext.cache``; methods key it by the content of the tensors they decompose
(:func:`mergelab.methods.base.cached`), so a hit is always the value a fresh computation would return, bit for bit.

The store is a least-recently-used map bounded in bytes: ``MERGELAB_DECOMP_CACHE_MB`` (read at every merge;
default 2048 MiB or a quarter of the physical memory, whichever is smaller; ``0`` turns it off). A value larger than
the bound is computed and not kept.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch

#: Environment variable bounding the process cache, in MiB (0 disables it).
CACHE_ENV = "MERGELAB_DECOMP_CACHE_MB"
DEFAULT_CACHE_MB = 2048


def value_bytes(value: Any) -> int:
    """Bytes held by the tensors in ``value`` (a tensor, or nested tuples/lists of them; anything else is 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(value_bytes(v) for v in value)
    return 0


class DecompositionLRU:
    """A thread-safe LRU map from keys to decompositions, bounded by the bytes of the tensors it holds.

    Implements :class:`mergelab.methods.base.DecompositionCache`. ``hits``, ``misses`` and ``evictions`` count
    lookups since creation (or :meth:`clear`).

    Args:
        max_bytes: the bound; a value larger than it is returned but not stored.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple[Any, ...], tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> Iterable[tuple[Any, ...]]:
        """The stored keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def get_or_compute(self, key: tuple[Any, ...], fn: Callable[[], Any]) -> Any:
        """The value under ``key`` (now the most recently used), else ``fn()``, stored when it fits the bound."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
            self.misses += 1
        value = fn()  # outside the lock: a long decomposition does not block other lookups
        size = value_bytes(value)
        if size > self.max_bytes:
            return value
        with self._lock:
            if key not in self._items:
                self._items[key] = (value, size)
                self.nbytes += size
            self._evict()
        return value

    def resize(self, max_bytes: int) -> None:
        """Set the bound, evicting the least recently used values down to it."""
        with self._lock:
            self.max_bytes = int(max_bytes)
            self._evict()

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.nbytes -= old
            self.evictions += 1

    def clear(self) -> None:
        """Drop every value and reset the counters."""
        with self._lock:
            self._items.clear()
            self.nbytes = self.hits = self.misses = self.evictions = 0


_PROCESS: DecompositionLRU | None = None
_PROCESS_LOCK = threading.Lock()


def default_cache_bytes() -> int:
    """2048 MiB, or a quarter of the physical memory when that is less (2048 MiB where it cannot be read)."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        ram = 0
    limit = DEFAULT_CACHE_MB * 2**20
    return min(limit, ram // 4) if ram > 0 else limit


def cache_bytes_from_env() -> int:
    """The bound from ``MERGELAB_DECOMP_CACHE_MB`` (MiB; default :func:`default_cache_bytes`).

    Raises:
        ValueError: when the variable is not a non-negative number.
    """
    raw = os.environ.get(CACHE_ENV, "").strip()
    if not raw:
        return default_cache_bytes()
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{CACHE_ENV} must be a number of MiB, got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"{CACHE_ENV} must be >= 0, got {raw!r}")
    return int(mb * 2**20)


def process_cache() -> DecompositionLRU | None:
    """The process-wide cache every :func:`~mergelab.engine.loop.run_merge` shares; None when the bound is 0.

    Created on first use with the bound of :func:`cache_bytes_from_env`; a later change of the variable resizes
    it (evicting down to the new bound) or, at 0, turns it off.
    """
    global _PROCESS
    max_bytes = cache_bytes_from_env()
    with _PROCESS_LOCK:
        if max_bytes == 0:
            _PROCESS = None
            return None
        if _PROCESS is None:
            _PROCESS = DecompositionLRU(max_bytes)
        elif _PROCESS.max_bytes != max_bytes:
            _PROCESS.resize(max_bytes)
        return _PROCESS
