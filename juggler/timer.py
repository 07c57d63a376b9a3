"""One thread that runs callbacks at their deadlines.

A :class:`~juggler.server.Server` has one :class:`Timer`: keepalive pings, idle timeouts and
close deadlines of all its connections are entries in one heap, so an idle connection costs
no wake-up until one of its deadlines comes. The thread sleeps until the earliest deadline (or
until an earlier one is added); nothing polls.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable, Optional

__all__ = ["Timer", "TimerHandle"]


class TimerHandle:
    """A scheduled callback; :meth:`cancel` it to drop it."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Drop the callback if it has not run yet. Idempotent; safe from any thread."""
        self.cancelled = True


class Timer:
    """Runs callbacks at ``time.monotonic()`` deadlines on a thread of its own.

    Callbacks run one at a time on that thread and must be quick (queue a frame, shut a socket
    down); an exception is logged and the timer goes on. :meth:`start` and :meth:`stop` are
    idempotent; ``stop`` joins the thread and drops what is still scheduled.
    """

    def __init__(self, name: str = "juggler-timer", logger: Optional[logging.Logger] = None) -> None:
        self.name = name
        self.logger = logger or logging.getLogger("juggler.server")
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self._pops = 0

    def __len__(self) -> int:
        with self._cond:
            return sum(not h.cancelled for _, _, h in self._heap)

    def start(self) -> "Timer":
        with self._cond:
            if self._stopped:
                raise RuntimeError("timer was stopped")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name)
                self._thread.start()
        return self

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback()`` at ``when`` (a ``time.monotonic()`` value)."""
        handle = TimerHandle(when, callback)
        with self._cond:
            if self._stopped:
                handle.cancelled = True
                return handle
            heapq.heappush(self._heap, (when, next(self._seq), handle))
            if self._heap[0][2] is handle:  # the new earliest deadline: the thread must know
                self._cond.notify()
        return handle

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback()`` in ``delay`` seconds."""
        return self.call_at(time.monotonic() + delay, callback)

    def stop(self) -> None:
        """Stop the thread and join it; pending callbacks never run."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    heap = self._heap
                    while heap and heap[0][2].cancelled:
                        heapq.heappop(heap)
                    if heap:
                        wait = heap[0][0] - time.monotonic()
                        if wait <= 0:
                            handle = heapq.heappop(heap)[2]
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                self._pops += 1
                if self._pops % 4096 == 0 and len(heap) > 1024:
                    # cancelled entries of closed connections wait for their deadline: drop
                    # them now and then, so churn cannot grow the heap
                    self._heap = [e for e in heap if not e[2].cancelled]
                    heapq.heapify(self._heap)
            if handle.cancelled:
                continue
            try:
                handle.callback()
            except Exception:
                self.logger.exception("timer callback %r failed", handle.callback)
