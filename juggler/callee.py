"""Callees: thread pools that serve calls to URIs from redis.

A :class:`Callee` registers Python functions at URIs and runs ``workers`` threads; each pops
the next call to any of its URIs (BRPOP), skips it if it has expired, runs the function and
stores the result with the time the call has left. Callees depend on redis only: start and stop
them independently of any server.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from typing import Any, Callable, Optional

from .broker import Broker, Popped
from .exceptions import BrokerError
from .health import BACKOFF_BASE, BACKOFF_CAP, RedisHealth
from .message import ResultPayload, error_result
from .redisconn import unavailable

__all__ = ["Callee", "CalleeStats"]

Function = Callable[[Any], Any]


class CalleeStats:
    """Counters of a callee: ``calls`` run to the end (result stored or dropped), ``expired``
    calls and results dropped, ``errors`` (functions that raised or returned non-JSON), and
    ``busy`` workers running a function right now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.expired = 0
        self.errors = 0
        self.busy = 0
        self._changed = threading.Condition(self._lock)
        self._waiting = 0  # threads in wait_for: a change wakes them, else it notifies no one

    def _add(self, calls: int = 0, expired: int = 0, errors: int = 0, busy: int = 0) -> None:
        with self._lock:
            self.calls += calls
            self.expired += expired
            self.errors += errors
            self.busy += busy
            if self._waiting:
                self._changed.notify_all()

    def wait_for(self, predicate: Callable[["CalleeStats"], bool], timeout: Optional[float] = None) -> bool:
        """Block until ``predicate(stats)`` holds (re-checked on every change); its last value."""
        with self._lock:
            self._waiting += 1
            try:
                return self._changed.wait_for(lambda: predicate(self), timeout)
            finally:
                self._waiting -= 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"calls": self.calls, "expired": self.expired, "errors": self.errors, "busy": self.busy}


class Callee:
    """A pool of ``workers`` threads serving calls to the registered URIs.

    On a :class:`~juggler.broker.RedisBroker`, each worker has a redis connection of its own
    (:meth:`~juggler.broker.RedisBroker.call_popper`) and waits on it with a BRPOP that never
    times out; :meth:`stop` wakes it with ``CLIENT UNBLOCK``. Once a call comes, the worker
    takes up to ``batch`` calls already waiting (one script, which also consumes their timeout
    keys), runs them one after the other, and stores their results together with taking the
    next batch (one round trip). A worker whose calls took more than a millisecond each takes
    one at a time, so slow calls do not queue behind each other while other workers are free.
    While the calls are quick, only ``waiting`` workers (default 2; ``None``: all of them)
    wait on redis at once and the others are parked, so that calls which come together are
    taken together (fewer wake-ups per call: about half the callee's CPU per call at a few
    thousand calls a second); a worker that takes calls and leaves none waiting wakes a
    parked one, and the first call over 10 ms sends every worker back to waiting (see
    ``_WaitSlots`` in the source for the price).
    With any other :class:`~juggler.broker.Broker`, a worker pops one call at a time and
    ``block`` is how long (seconds) one pop waits before checking for :meth:`stop`.

    When redis goes away, the workers' connections fail together: the callee's
    :class:`~juggler.health.RedisHealth` (``health``, one per process: by default the callee's
    own) logs one line (ERROR ``callee NAME: redis unavailable``), and the workers reconnect
    through its shared backoff, one attempt at a time, spaced by a capped exponential backoff
    with jitter from 0.05 s up to ``max_backoff`` seconds (a handful of connects per second
    while redis is down, whatever the number of workers). The first connect that succeeds logs
    one line (WARNING ``callee NAME: redis is back``) and lets every worker go. A call popped
    before the outage is not popped again: it runs, and if its result cannot be stored (redis
    is still down) that is logged, and the caller gets its expiry.

    A function gets the call's decoded ``args`` and returns any JSON value. If it raises, the
    caller gets ``{"error": {"message": str(exc), "type": "IndexError"}}`` (the exception's
    class name; the reference sends only ``message``), the exception is logged once and the
    worker goes on.

    Each worker waits for the calls of all its URIs with a single BRPOP. On Redis Cluster one
    BRPOP can only wait on keys of one hash slot, so the URIs are split into slot groups
    (:meth:`~juggler.broker.RedisBroker.call_groups`) and the workers are shared out among
    the groups, at least one each: ``workers=8`` with URIs in 3 slots runs 3, 3 and 2 workers
    (and ``workers=2`` with URIs in 3 slots runs 3 threads). See docs/deployment.rst.
    """

    def __init__(
        self,
        broker: Broker,
        workers: int = 8,
        *,
        block: float = 1.0,
        max_backoff: float = BACKOFF_CAP,
        batch: int = 16,
        waiting: Optional[int] = 2,
        name: str = "juggler-callee",
        logger: Optional[logging.Logger] = None,
        health: Optional[RedisHealth] = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if waiting is not None and waiting < 1:
            raise ValueError(f"waiting must be at least 1 (or None), got {waiting}")
        if not block > 0:
            raise ValueError(f"block must be a positive number of seconds, got {block!r}")
        if not max_backoff > 0:
            raise ValueError(f"max_backoff must be a positive number of seconds, got {max_backoff!r}")
        self.broker = broker
        self.workers = workers
        self.block = block
        self.max_backoff = max_backoff
        self.batch = batch
        self.waiting = waiting
        self.name = name
        self.logger = logger or logging.getLogger(__name__)
        #: What this callee's process sees of redis: its workers' reconnects share its backoff.
        self.health = health or RedisHealth(
            f"callee {name}", logger=self.logger, base=min(BACKOFF_BASE, max_backoff), cap=max_backoff
        )
        self.stats = CalleeStats()
        self._functions: dict[str, Function] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._poppers: set[Any] = set()  # the workers' CallPoppers, woken by stop()
        self._slots: list[_WaitSlots] = []  # one per slot group (see start)

    def __repr__(self) -> str:
        return f"<juggler.Callee {self.name} uris={sorted(self._functions)} workers={self.workers}>"

    @property
    def uris(self) -> list[str]:
        return list(self._functions)

    def register(self, uri: str, fn: Function) -> Function:
        """Serve ``uri`` with ``fn``; before :meth:`start`. Returns ``fn`` (usable as a decorator
        through ``functools.partial(callee.register, uri)``)."""
        if not isinstance(uri, str) or not uri:
            raise ValueError("uri must be a non-empty string")
        if not callable(fn):
            raise TypeError(f"the function for {uri!r} is not callable: {fn!r}")
        with self._lock:
            if self._started:
                raise RuntimeError("register URIs before start()")
            self._functions[uri] = fn
        return fn

    def start(self) -> "Callee":
        """Start the worker threads; returns at once."""
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("callee was stopped")
            if self._started:
                return self
            if not self._functions:
                raise RuntimeError("no URI registered: call register() first")
            uris = list(self._functions)
            groups = self.broker.call_groups(uris)
            self._started = True
            threads = max(self.workers, len(groups))
            self._slots = [_WaitSlots(len(range(g, threads, len(groups))), self.waiting) for g in range(len(groups))]
            for i in range(threads):
                g = i % len(groups)
                t = threading.Thread(target=self._work, args=(groups[g], self._slots[g]), name=f"{self.name}-{i}")
                self._threads.append(t)
            for t in self._threads:
                t.start()
        self.logger.info("callee %s serving %s with %d workers", self.name, ", ".join(uris), len(self._threads))
        if len(groups) > 1:
            self.logger.info(
                "callee %s: its URIs are in %d redis cluster slots, each served by its own workers: %s",
                self.name, len(groups), "; ".join(", ".join(g) for g in groups),
            )  # fmt: skip
        return self

    def serve_forever(self) -> None:
        """Start, then block until :meth:`stop` is called (from another thread or a signal
        handler)."""
        self.start()
        try:
            self._stop.wait()
        finally:
            self.stop()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop taking calls, let running calls finish, join the workers. Idempotent.

        With ``timeout``, wait at most that long; returns whether every worker ended.
        """
        self._stop.set()
        self.health.wake()  # workers waiting for their turn to reconnect
        for slots in self._slots:
            slots.wake_all()  # workers parked while others wait on redis
        deadline = None if timeout is None else time.monotonic() + timeout
        others = [t for t in self._threads if t is not threading.current_thread()]
        # A worker registers its popper before it looks at _stop, so every worker that could
        # block is in _poppers now or will see _stop and not block.
        with self._lock:
            retry = list(self._poppers)
        while retry:
            # A worker may be sending its BRPOP just as we unblock it (CLIENT UNBLOCK of a
            # client not blocked yet does nothing): wake those again a moment later.
            retry = [p for p in retry if not p.wake()]
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if retry:
                time.sleep(0.005 if left is None else min(0.005, left))
        # a worker that was woken ends at once; one running calls ends when they are done
        for t in others:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            t.join(left)
        return not any(t.is_alive() for t in others)

    def __enter__(self) -> "Callee":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- workers --

    def _work(self, uris: list[str], slots: "_WaitSlots") -> None:
        if hasattr(self.broker, "call_popper"):
            self._work_batched(uris, slots)
        else:
            self._work_polling(uris)

    def _turn(self, failures: int) -> bool:
        """Wait until a worker whose connection failed ``failures`` times in a row may try
        redis again: its turn in the shared backoff (:meth:`RedisHealth.wait_turn`). ``False``
        once stopping. A worker that fails while redis answers the others (a cluster node that
        is down) backs off on its own too, since the shared backoff does not wait then."""
        health = self.health
        if failures and health.up and self._stop.wait(min(health.cap, health.base * 2**failures)):
            return False
        return health.wait_turn(self._stop)

    def _work_batched(self, uris: list[str], slots: "_WaitSlots") -> None:
        worker = _BatchWorker(self, uris, slots)
        try:
            worker.run()
        finally:
            worker.drop_popper()

    def _run_one(self, popped: Popped, popped_at: float) -> Optional[tuple[ResultPayload, float, str]]:
        """Run one call taken at ``popped_at``; its result to store (payload, seconds left,
        JSON), or ``None`` when there is none (expired, not ours: counted here). The caller
        counts the worker ``busy``."""
        call = popped.payload
        if popped.expired:
            self.logger.debug("skipping expired call %s to %s", call.msg_uuid, call.uri)
            self.stats._add(expired=1)
            return None
        fn = self._functions.get(call.uri)
        if fn is None:  # a payload whose uri is not its list's: not ours to run
            self.logger.warning("callee %s: dropping call %s for unknown uri %r", self.name, call.msg_uuid, call.uri)
            return None
        self.logger.debug("running call %s to %s (%.3f s left)", call.msg_uuid, call.uri, popped.remaining)
        try:
            result = fn(call.args)
        except (Exception, SystemExit) as exc:  # sys.exit() in a function must not end the worker
            self.logger.exception("callee %s: function for %s raised", self.name, call.uri)
            result = error_result(str(exc) or type(exc).__name__, type(exc).__name__)
            self.stats._add(errors=1)
        remaining = popped.remaining - (time.monotonic() - popped_at)
        if remaining <= 0:
            self.logger.debug("result of call %s to %s expired; dropped", call.msg_uuid, call.uri)
            self.stats._add(expired=1, calls=1)
            return None
        payload = ResultPayload(call.conn_uuid, call.msg_uuid, call.uri, result)
        try:
            data = payload.to_json()
        except (TypeError, ValueError, RecursionError) as exc:
            self.logger.error("callee %s: result of %s is not JSON: %s", self.name, call.uri, exc)
            self.stats._add(errors=1)
            payload = ResultPayload(call.conn_uuid, call.msg_uuid, call.uri, error_result(f"result is not JSON-serializable: {exc}"))
            data = payload.to_json()
        return payload, remaining, data

    def _stored(self, results: list[tuple[ResultPayload, float, str]], errors: list[Optional[BrokerError]]) -> None:
        failed = [(payload, exc) for (payload, _, _), exc in zip(results, errors) if exc is not None]
        if failed:  # one line for the batch: its callers get their expiry
            self.logger.log(
                _lost_level(failed[0][1]), "callee %s: could not store %d result(s) (%s): %s", self.name, len(failed),
                ", ".join(f"{p.uri} {p.msg_uuid}" for p, _ in failed), failed[0][1],
            )  # fmt: skip
        self.stats._add(calls=len(results))  # counted once its result is stored or dropped

    def _work_polling(self, uris: list[str]) -> None:
        failures = 0
        while not self._stop.is_set():
            if failures and not self._turn(failures):
                break
            since = self.health.epoch
            try:
                popped = self.broker.pop_call(uris, self.block)
            except BrokerError as exc:
                self.health.failed(exc, since)
                failures += 1
                continue
            self.health.succeeded(since)
            failures = 0
            if popped is not None:
                try:
                    self._run(popped)
                except Exception:  # a bug here must not cost the pool a worker
                    self.logger.exception("callee %s: error handling call %s", self.name, popped.payload.msg_uuid)

    def _run(self, popped: Popped) -> None:
        self.stats._add(busy=1)
        try:
            stored = self._run_one(popped, time.monotonic())
        finally:
            self.stats._add(busy=-1)
        if stored is None:
            return
        payload, remaining, _ = stored
        try:
            self._store(payload, remaining)
        finally:
            self.stats._add(calls=1)  # counted once its result is stored or dropped

    def _store(self, payload: ResultPayload, remaining: float) -> None:
        try:
            self.broker.store_result(payload, remaining)
        except BrokerError as exc:
            self.logger.log(_lost_level(exc), "callee %s: could not store result of %s: %s", self.name, payload.uri, exc)


class _BatchWorker:
    """One worker of a :class:`Callee` on a :class:`~juggler.broker.RedisBroker` (see the
    class): its popper (its own redis connection), the results it has yet to store, and how
    many calls it asks for next."""

    def __init__(self, callee: Callee, uris: list[str], slots: "_WaitSlots") -> None:
        self.callee = callee
        self.uris = uris
        self.slots = slots
        self.popper: Any = None
        self.failures = 0  # failed connections in a row
        self.results: list[tuple[ResultPayload, float, str]] = []  # run, to be stored
        self.slow = False  # the last calls took over 1 ms each: take one at a time
        self.full = False  # the last batch was as large as asked for

    def run(self) -> None:
        callee = self.callee
        while self._connected():
            n = 0 if callee._stop.is_set() else 1 if self.slow else callee.batch
            if not (n or self.results):
                return  # stopping, with nothing left to store
            calls = self._exchange(n)
            if n == 0:
                return  # stopping: the results are stored (or their loss logged)
            if calls:
                self._run_batch(calls)

    def _connected(self) -> bool:
        """Make a popper if there is none; ``False`` once stopping."""
        callee, health = self.callee, self.callee.health
        while self.popper is None:
            if callee._stop.is_set() or (self.failures and not callee._turn(self.failures)):
                return False
            since = health.epoch  # (what its outcome proves: see RedisHealth)
            try:
                # (on a cluster, after a failure: its slot's node may have changed)
                popper = callee.broker.call_popper(self.uris, refresh=self.failures > 0)
            except BrokerError as exc:
                health.failed(exc, since)
                self.failures += 1
                continue
            health.succeeded(since)
            self.failures = 0
            with callee._lock:
                callee._poppers.add(popper)
            self.popper = popper
        return True

    def _exchange(self, n: int) -> list[Popped]:
        """Store the results, take up to ``n`` calls (waiting for one unless the last batch
        was full, or parked while others wait: see :class:`_WaitSlots`); ``[]`` when the
        popper failed (it is dropped) or was woken."""
        batch, self.results = self.results, []
        stored = partial(self.callee._stored, batch)
        since = self.callee.health.epoch
        try:
            calls = self._take(n, batch, stored)
        except BrokerError as exc:
            self._failed(exc, since)
            return []
        if calls is None:
            return []  # stopping while parked
        self.full = bool(calls) and len(calls) >= n
        return calls

    def _take(self, n: int, batch: list[tuple[ResultPayload, float, str]], stored: Any) -> Optional[list[Popped]]:
        if n == 0 or self.full:
            # stopping, or the last batch was full (more calls are likely waiting)
            return self.popper.exchange(batch, n, stored)
        if not self.slots.enter(None):  # enough workers wait on redis already
            if batch:  # store the results and take what waits (parked next time if nothing)
                return self.popper.exchange(batch, n, stored)
            if not self.slots.enter(self.callee._stop):  # parked until one takes calls
                return None
        try:
            # store the results and wait for the next call, in one write
            return self.popper.pop(n, batch, stored)
        finally:
            self.slots.leave()

    def _failed(self, exc: BrokerError, since: int) -> None:
        moved = self.popper.moved
        self.drop_popper()
        if moved:  # its slot moved (MOVED, ASK, UNBLOCKED): redis answers, go to its node
            self.failures = 0
            return
        if not self.callee._stop.is_set():  # (not woken on purpose)
            self.callee.health.failed(exc, since)
        self.failures = 1

    def _run_batch(self, calls: list[Popped]) -> None:
        callee, slots = self.callee, self.slots
        popped_at = time.monotonic()
        callee.stats._add(busy=1)
        try:
            for i, popped in enumerate(calls, 1):
                try:
                    stored = callee._run_one(popped, popped_at)
                except Exception:  # a bug here must not cost the pool a worker
                    callee.logger.exception("callee %s: error handling call %s", callee.name, popped.payload.msg_uuid)
                    continue
                if stored is not None:
                    self.results.append(stored)
                if not slots.slow and time.monotonic() - popped_at > _SLOW * i:
                    slots.ran(slow=True)  # at once: the parked workers wait for the next calls
        finally:
            callee.stats._add(busy=-1)
        took = time.monotonic() - popped_at
        self.slow = took > 0.001 * len(calls)
        slots.ran(slow=took > _SLOW * len(calls))

    def drop_popper(self) -> None:
        popper, self.popper = self.popper, None
        if popper is not None:
            with self.callee._lock:
                self.callee._poppers.discard(popper)
            popper.close()


#: A call slower than this (wall clock) sends every parked worker back to waiting on redis
#: (:class:`_WaitSlots`). Not the 1 ms past which a worker takes one call at a time: on a
#: loaded machine a quick call often spends a millisecond waiting for the GIL or a CPU, and
#: a worker that takes one call at a time takes none into its batch anyway.
_SLOW = 0.010


class _WaitSlots:
    """How many workers of one slot group may wait on redis (a ``BRPOP``) at once.

    Every worker that waits gets the next call alone: redis hands a call to a blocked client
    as soon as it is stored. With all eight workers waiting, calls that come a few thousand a
    second go one per worker, and each costs its worker three wake-ups (the call, the pop
    script's reply, the reply to its result's store). So while the calls are quick (the last
    batches took under :data:`_SLOW` per call), only ``waiting`` workers wait (the
    :class:`Callee`'s, default 2) and the others are parked here: calls that come while
    none waits are taken together by the next (one pop script, one write of their results).
    When a worker takes calls and leaves no other waiting, it wakes a parked one to wait in
    its place, so new calls never wait in redis while a worker is free. A pool starts with
    every worker waiting, and goes back to that as soon as a call takes over :data:`_SLOW`
    (the pool as it was before, where slow calls spread over the workers), until as many
    quick batches in a row as there are workers.

    The price: calls that come while the pool is in its quick mode and turn out slow can be
    taken in one batch and run one after the other (as a batch of calls already waiting
    always could), until the first of them has run."""

    def __init__(self, workers: int, waiting: Optional[int]) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.workers = workers
        self.quick_cap = workers if waiting is None else waiting
        self.waiting = 0  # workers in (or on their way to) a BRPOP
        self.parked = 0
        self.slow = True  # every worker waits (until quick batches prove the calls quick)
        self.quick_runs = 0  # quick batches in a row while slow

    def enter(self, stop: Optional[threading.Event]) -> bool:
        """Count this worker among the waiting ones. With ``stop``, park until there is room
        (``False``: stopping); without, ``False`` at once when there is none."""
        with self._cond:
            while self.waiting >= (self.workers if self.slow else self.quick_cap):
                if stop is None or stop.is_set():
                    return False
                self.parked += 1
                try:
                    self._cond.wait()
                finally:
                    self.parked -= 1
            self.waiting += 1
            return True

    def leave(self) -> None:
        """This worker waits no more (it took calls, or failed): when none waits now, a parked
        worker comes to wait in its place."""
        with self._cond:
            self.waiting -= 1
            if self.waiting == 0 and self.parked:
                self._cond.notify()

    def ran(self, slow: bool) -> None:
        """A worker ran a batch, ``slow`` or not: a slow one lets every parked worker wait at
        once; as many quick ones in a row as there are workers bring the quick mode back."""
        with self._cond:
            if slow:
                self.quick_runs = 0
                if not self.slow:
                    self.slow = True
                    self._cond.notify_all()
            elif self.slow:
                self.quick_runs += 1
                self.slow = self.quick_runs < self.workers

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()


def _lost_level(exc: BrokerError) -> int:
    """The level of the line about results that could not be stored: INFO when redis could not
    be reached (the outage has its one ERROR line, from the callee's
    :class:`~juggler.health.RedisHealth`, and these callers get their expiry), ERROR when redis
    refused them (a result list over its capacity, an error reply)."""
    return logging.INFO if unavailable(exc) else logging.ERROR
