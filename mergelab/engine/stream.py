"""The tensor stream: a background reader that loads and subtracts the next tensors while one is merged.

Read-ahead is bounded by bytes, so peak memory stays at about one tensor's ``(N + 1)`` copies plus the method's
temporaries; :class:`BufferPool` reuses the stacks of task vectors from one tensor to the next (a fresh tensor-sized
buffer's page faults cost more than the arithmetic it holds); :class:`PeakMemory` samples the process's resident
memory while a merge runs.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergelab.engine.plan import PlanItem


class PeakMemory:
    """Samples the process's anonymous RSS (``/proc/self/status`` RssAnon, psutil RSS elsewhere)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="mergelab-rss", daemon=True)

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except Exception:  # pragma: no cover - best effort only
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakMemory:
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def _unshared(t: torch.Tensor) -> bool:
    """True when no other tensor (a view) uses ``t``'s storage (its Python storage object counts once)."""
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2
    except (AttributeError, RuntimeError):  # pragma: no cover - another torch: never reuse
        return False


class BufferPool:
    """Reuses the engine's tensor-sized CPU buffers (the stacks of task vectors) from one tensor to the next.

    A fresh buffer of that size costs a page fault and a zeroed page per 4 KiB on first touch, several times the
    arithmetic it then holds (measured: 67 ms to allocate and fill 136 MB, 7 ms to fill it again). The pool knows the
    sizes the plan will still ask for, so it keeps a buffer given back only when a later request can use it (at most
    twice that request's size, so a small tensor never pins a large buffer) and no view of it survives, and never
    more than ``cap`` bytes; a request takes the smallest kept buffer that fits. Other devices allocate directly.

    Args:
        sizes: the bytes of every stack the plan will request, in any order (a pass streamed again, such as a global
            method's statistics pass, adds its requests with :meth:`expect`).
        cap: the most bytes kept unused (the stream's read-ahead budget: what the stacks in flight may hold).

    Attributes:
        reused: requests served from a kept buffer so far.
    """

    def __init__(self, sizes: Sequence[int], cap: int) -> None:
        self._cap = cap
        self._wanted: dict[int, int] = {}  # bytes -> requests still to come
        self._free: list[torch.Tensor] = []  # flat uint8 buffers, largest first
        self._lock = threading.Lock()
        self.reused = 0
        self.expect(sizes)

    def expect(self, sizes: Sequence[int]) -> None:
        """Count ``sizes`` (bytes) among the requests still to come: without them a buffer given back is not kept
        for a request the pool was not told of."""
        with self._lock:
            for n in sizes:
                self._wanted[n] = self._wanted.get(n, 0) + 1

    def _useful(self, size: int) -> bool:
        return any(n <= size <= 2 * n for n in self._wanted)

    def take(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` on ``device`` (a kept buffer's prefix on the CPU)."""
        need = math.prod(shape) * dtype.itemsize
        if device.type != "cpu" or need == 0:
            return torch.empty(tuple(shape), dtype=dtype, device=device)
        with self._lock:
            left = self._wanted.get(need, 0) - 1
            if left > 0:
                self._wanted[need] = left
            else:
                self._wanted.pop(need, None)
            fits = [i for i, b in enumerate(self._free) if need <= b.numel() <= 2 * need]
            buf = self._free.pop(fits[-1]) if fits else None
            self.reused += buf is not None
            self._free = [b for b in self._free if self._useful(b.numel())]
        if buf is None:
            buf = torch.empty(need, dtype=torch.uint8)
        # a plain tensor over the buffer's storage, not a view of it: a view would keep the buffer as its base
        return torch.empty(0, dtype=dtype).set_(buf.untyped_storage(), 0, tuple(shape))

    def give(self, t: torch.Tensor | None) -> None:
        """Keep ``t``'s buffer for a later request, unless none can use it, another tensor still views it or it is
        not a CPU buffer."""
        if t is None or t.device.type != "cpu" or not _unshared(t):
            return
        buf = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
        with self._lock:
            if not self._useful(buf.numel()):
                return
            self._free.append(buf)
            self._free.sort(key=lambda b: -b.numel())
            while self._free and sum(b.numel() for b in self._free) > self._cap:
                self._free.pop()  # the smallest

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


@dataclass
class Loaded:
    item: PlanItem
    base: torch.Tensor  # on the device, original dtype (carry: the owner's tensor)
    deltas: torch.Tensor | None  # (N, *S) compute dtype, None when not read or all zero
    nbytes: int
    zero: bool = False
    norms: list[float] | None = None  # per-expert Frobenius norms of the task vectors
    fused: Any = None  # engine.fused.FusedResult: the tensor merged by the reader (no stack), or None


_DONE = object()


class TensorStream:
    """Background thread reading and subtracting tensors ahead of the compute loop.

    Read-ahead is bounded by bytes, not only by count: the reader starts loading the next tensor only while the
    tensors loaded but not yet consumed (queued or being merged and written) plus the next one fit in ``budget``
    bytes, or when nothing is in flight. Small and medium tensors (every layer of a transformer) are therefore read
    while the previous one is merged, whereas the largest ones (embeddings, ``lm_head``) are never held two at a
    time, so peak memory stays at about one tensor's ``(N + 1)`` copies plus the method's temporaries.
    """

    def __init__(self, items: Sequence[PlanItem], load: Any, cost: Any, budget: int, depth: int = 2) -> None:
        self._items = items
        self._load = load
        self._cost = cost
        self._budget = budget
        self._inflight = 0
        self._cond = threading.Condition()
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mergelab-reader", daemon=True)

    def _put(self, obj: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _reserve(self, c: int) -> bool:
        with self._cond:
            while self._inflight > 0 and self._inflight + c > self._budget:
                if self._stop.is_set():
                    return False
                self._cond.wait(0.1)
            self._inflight += c
        return not self._stop.is_set()

    def _release(self, c: int) -> None:
        with self._cond:
            self._inflight -= c
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            for it in self._items:
                if not self._reserve(self._cost(it)) or not self._put(self._load(it)):
                    return
        except BaseException as e:  # forwarded to the consumer
            self._put(e)
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[Loaded]:
        self._thread.start()
        try:
            while True:
                obj = self._q.get()
                if obj is _DONE:
                    return
                if isinstance(obj, BaseException):
                    raise obj
                yield obj
                obj.base = obj.deltas = obj.fused = None  # type: ignore[assignment]  # consumed: drop before the next load
                self._release(self._cost(obj.item))
        finally:
            self._stop.set()
            with self._cond:
                self._cond.notify_all()
            self._thread.join()

