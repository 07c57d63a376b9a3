"""Whether redis answers, as one server or callee process sees it, and the backoff that all of
its reconnects share.

Every redis listener of a process (a websocket's results listener, the pub-sub hub's reader, a
callee worker) reports what it sees to the process' one :class:`RedisHealth`:
:meth:`~RedisHealth.failed` when redis fails it, :meth:`~RedisHealth.succeeded` when a command
went through. The first failure marks redis down and is logged once (``redis unavailable``);
the first success after it marks redis up and is logged once (``redis is back``). While redis is
down:

- requests need not wait for redis to fail them: :attr:`~RedisHealth.up` says so at once (a
  request may still try, e.g. when it has its own short deadline: :meth:`~RedisHealth.try_turn`
  lets one through per turn of the backoff, so that requests find redis back even when no
  listener is reconnecting);
- a listener that wants to reconnect calls :meth:`~RedisHealth.wait_turn` first. The attempts of
  all the process' listeners are spaced out by one capped exponential backoff with jitter
  (:data:`BACKOFF_BASE` doubling up to :data:`BACKOFF_CAP`): one attempt per turn, whatever the
  number of listeners, so a redis that is down sees a handful of connects per second from a
  server, not one storm per websocket. When an attempt succeeds, every waiting listener goes at
  once.

What counts as evidence: a reply read after redis was marked down may have been sent before
(it waited in a socket buffer while redis stalled), and a request that failed after redis was
seen back may have started before. So a listener or request takes :attr:`~RedisHealth.epoch`
when it begins (before it connects, or before it sends), and reports with ``since=`` that
token: a report counts only if redis' state has not changed since the request began (a success
on a connection made, or a command sent, after the failure was recorded; a failure of a
request that began after redis was last seen back). Without ``since``, a report always counts.

A listener whose connection redis closed while it looked up (an idle client's timeout, or the
first sign of an outage) may find out with an attempt of its own, inside :meth:`~RedisHealth.probe`:
one listener at a time, so that when redis has just died, one connect finds it out and the
others take their turns in the backoff, rather than all trying at once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from typing import Callable, Iterator, Optional

__all__ = ["RedisHealth", "BACKOFF_BASE", "BACKOFF_CAP"]

#: The first wait between two reconnect attempts while redis is down, in seconds.
BACKOFF_BASE = 0.05

#: The longest wait between two reconnect attempts while redis is down, in seconds: redis is
#: seen back within this (plus a connect) after it returns.
BACKOFF_CAP = 0.5


class RedisHealth:
    """Redis' state as one process sees it; see the module's documentation.

    :param name: who sees it, in the log lines (e.g. ``"server 127.0.0.1:9000"``).
    :param logger: where the two log lines go.
    :param base: :data:`BACKOFF_BASE`.
    :param cap: :data:`BACKOFF_CAP`.
    :param on_change: called with the new state (``True``: up) once per change, outside the lock.
    """

    def __init__(
        self,
        name: str = "juggler",
        *,
        logger: Optional[logging.Logger] = None,
        base: float = BACKOFF_BASE,
        cap: float = BACKOFF_CAP,
        on_change: Optional[Callable[[bool], None]] = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < base <= cap:
            raise ValueError("the backoff needs 0 < base <= cap")
        self.name = name
        self.logger = logger or logging.getLogger(__name__)
        self.base = base
        self.cap = cap
        self.on_change = on_change
        self._clock = clock
        self._jitter = jitter
        self._cond = threading.Condition()
        self._up = True
        self._down_since: Optional[float] = None
        self._delay = base  # the wait before the next turn, doubled after each failed one
        self._next_turn = 0.0  # when the next attempt may go (while down)
        self._closed = False
        self._epoch = 0  # (epoch) how many times the state changed
        self._probe_lock = threading.Lock()  # (probe)
        #: How many times redis was seen to go away.
        self.outages = 0
        #: How many reconnect attempts :meth:`wait_turn` let through while redis was down.
        self.attempts = 0
        #: How many reconnects :meth:`wait_turn` let through, while redis was down or after it
        #: came back (the ``juggler_redis_reconnects_total`` metric).
        self.reconnects = 0

    @property
    def up(self) -> bool:
        """Whether redis answered the last time anyone asked (``True`` before anyone did)."""
        return self._up

    @property
    def epoch(self) -> int:
        """A token for a request about to try redis, to report its outcome with
        (``since=``): it changes each time redis is marked down or up."""
        return self._epoch

    def failed(self, exc: BaseException, since: Optional[int] = None) -> None:
        """Redis failed a command or a connect: the first failure marks it down (logged once).
        ``since``: the :attr:`epoch` when the request began; a request that began before redis
        was last seen back does not count (its failure is old news)."""
        with self._cond:
            if not self._up or (since is not None and since != self._epoch):
                return
            self._up = False
            self._epoch += 1
            self._down_since = self._clock()
            self._delay = self.base
            self._next_turn = self._down_since + self._turn_wait()
            self.outages += 1
        self.logger.error("%s: redis unavailable (%s); reconnecting with backoff", self.name, exc)
        if self.on_change is not None:
            self.on_change(False)

    def succeeded(self, since: Optional[int] = None) -> None:
        """Redis answered: the first success after a failure marks it up (logged once) and
        lets every waiting listener go. ``since``: the :attr:`epoch` when the request began
        (before its connect, or its command); a request that began before the latest failure
        was recorded proves nothing (its reply may have been sent before redis stalled)."""
        if self._up:  # (the common case, without the lock)
            return
        with self._cond:
            if self._up or (since is not None and since != self._epoch):
                return
            self._up = True
            self._epoch += 1
            down_for = self._clock() - (self._down_since or self._clock())
            self._down_since = None
            self._cond.notify_all()
        self.logger.warning("%s: redis is back (after %.1f s)", self.name, down_for)
        if self.on_change is not None:
            self.on_change(True)

    def wait_turn(self, stop: Optional[threading.Event] = None) -> bool:
        """Block until this caller may try to reach redis: at once while redis is up; while it
        is down, until this caller's turn in the shared backoff or until someone else's
        attempt succeeded. ``False`` when :meth:`close` was called or ``stop`` is set (the
        caller gives up); ``stop`` is looked at on each wake-up: set it, then :meth:`wake`."""
        with self._cond:
            while True:
                if self._closed or (stop is not None and stop.is_set()):
                    return False
                if self._up:
                    self.reconnects += 1
                    return True
                now = self._clock()
                if self._take_turn(now):
                    self.reconnects += 1
                    return True
                self._cond.wait(self._next_turn - now)

    def try_turn(self) -> bool:
        """:meth:`wait_turn` without the wait, for a request: whether it may try redis now
        (redis up, or down and a turn is due: the one after it comes later, as for
        :meth:`wait_turn`); ``False``: fail at once. Report the outcome either way."""
        if self._up:
            return True
        with self._cond:
            if self._up:
                return True
            return not self._closed and self._take_turn(self._clock())

    @contextlib.contextmanager
    def probe(self) -> Iterator[bool]:
        """For a listener whose connection was closed while redis looked up: one such listener
        at a time, it finds out whether redis answers with an attempt of its own. Yields whether
        to try now (redis still looks up); ``False``: redis was found down meanwhile, take a turn
        with :meth:`wait_turn` instead. Report the attempt's outcome inside the block."""
        with self._probe_lock:
            yield self._up

    def wake(self) -> None:
        """Wake every :meth:`wait_turn`, to look at its ``stop`` again."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Make every :meth:`wait_turn`, now and later, return ``False``. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _take_turn(self, now: float) -> bool:
        """(Under ``_cond``.) Whether a turn of the backoff is due at ``now``; if so it is
        taken (counted in :attr:`attempts`), and the next one comes after a longer wait."""
        if now < self._next_turn:
            return False
        self._delay = min(self._delay * 2, self.cap)
        self._next_turn = now + self._turn_wait()
        self.attempts += 1
        return True

    def _turn_wait(self) -> float:
        # "equal jitter": half the delay, plus up to as much again at random, so that servers
        # that saw redis go at the same moment do not come back in step
        return self._delay / 2 + self._jitter() * self._delay / 2

    def request_turn(self, timeout: float) -> bool:
        """For a request that must be answered soon (a websocket's SUB or PUB): ``True`` at
        once while redis is up. While it is down, wait up to ``timeout`` seconds for a turn
        of the backoff (the request's own attempt is then the turn's: ``True``) or for someone
        else's attempt to succeed (``True``); ``False`` when neither came, or after
        :meth:`close`: refuse the request without trying redis. Not a reconnect: it counts in
        :attr:`attempts` only."""
        if self._up:  # (the common case, without the lock)
            return not self._closed
        with self._cond:
            deadline = self._clock() + timeout
            while True:
                if self._closed:
                    return False
                if self._up:
                    return True
                now = self._clock()
                if self._take_turn(now):
                    return True
                if now >= deadline:
                    return False
                self._cond.wait(min(self._next_turn, deadline) - now)
