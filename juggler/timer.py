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
from typing import Callable, Optional, Protocol

__all__ = ["Timer", "TimerHandle", "Keepalive"]


class TimerHandle:
    """A scheduled callback; :meth:`cancel` it to drop it."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Drop the callback if it has not run yet. Idempotent; safe from any thread. The
        callback is let go at once: the handle waits in the heap until its deadline (a closed
        connection's close deadline, its keepalive), and must not keep the connection alive."""
        self.cancelled = True
        self.callback = _nothing


def _nothing() -> None:
    """What a cancelled handle holds instead of its callback (and a cancelled keepalive
    instead of ``ping``)."""


def _ignore(reason: str) -> None:
    """What a cancelled keepalive holds instead of ``idle``."""


def _yes() -> bool:
    """What a cancelled keepalive holds instead of ``closed``."""
    return True


class Timer:
    """Runs callbacks at ``time.monotonic()`` deadlines on a thread of its own.

    Callbacks run one at a time on that thread and must be quick (queue a frame, shut a socket
    down); an exception is logged and the timer goes on. :meth:`start` and :meth:`stop` are
    idempotent; ``stop`` joins the thread and drops what is still scheduled.
    """

    def __init__(self, name: str = "juggler-timer", logger: Optional[logging.Logger] = None) -> None:
        self.name = name
        self.logger = logger or logging.getLogger(__name__)
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


class _LastRecv(Protocol):
    last_recv: float  # time.monotonic() of the last bytes received


class Keepalive:
    """A connection's keepalive, as entries in a :class:`Timer` (no thread of its own).

    After ``ping_interval`` seconds without bytes from the peer (``reader.last_recv``) it calls
    ``ping()``, once per silence; after ``idle_timeout`` seconds without any, pongs included,
    it calls ``idle(reason)`` and stops. 0 turns either off. It stops when ``closed()`` is
    true, or on :meth:`cancel`. The callbacks run on the timer's thread and must not wait.
    """

    __slots__ = ("timer", "reader", "ping_interval", "idle_timeout", "_ping", "_idle", "_closed", "_pinged_at",
                 "_handle", "_cancelled")  # fmt: skip

    def __init__(self, timer: Timer, reader: _LastRecv, ping_interval: float, idle_timeout: float,
                 ping: Callable[[], None], idle: Callable[[str], None], closed: Callable[[], bool]) -> None:  # fmt: skip
        self.timer, self.reader = timer, reader
        self.ping_interval, self.idle_timeout = ping_interval, idle_timeout
        self._ping, self._idle, self._closed = ping, idle, closed
        self._pinged_at = 0.0
        self._handle: Optional[TimerHandle] = None
        self._cancelled = False

    def start(self) -> "Keepalive":
        self._schedule()
        return self

    def cancel(self) -> None:
        """Stop; idempotent, from any thread. It lets go of its callbacks: bound methods of
        the connection that holds it, a cycle that kept each closed connection (its objects,
        its writer's Thread) until the garbage collector ran."""
        self._cancelled = True
        self._ping, self._idle, self._closed = _nothing, _ignore, _yes
        handle = self._handle
        if handle is not None:
            handle.cancel()

    def _schedule(self) -> None:
        if self._cancelled or self._closed() or not (self.ping_interval or self.idle_timeout):
            return
        now = time.monotonic()
        last = self.reader.last_recv
        due = []
        if self.idle_timeout:
            due.append(last + self.idle_timeout)
        if self.ping_interval:
            ping_at = last + self.ping_interval
            due.append(ping_at if ping_at > now else now + self.ping_interval)
        self._handle = self.timer.call_at(min(due), self._check)
        if self._cancelled:  # cancel() ran between the check and the new handle
            self._handle.cancel()

    def _check(self) -> None:
        if self._cancelled or self._closed():
            return
        now = time.monotonic()
        last = self.reader.last_recv
        idle = now - last
        if self.idle_timeout and idle >= self.idle_timeout:
            self._idle(f"idle timeout: nothing received for {self.idle_timeout:g} s")
            return
        if self.ping_interval and idle >= self.ping_interval and self._pinged_at < last:
            self._pinged_at = now
            self._ping()
        self._schedule()
