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

    def _add(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                setattr(self, name, getattr(self, name) + n)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[["CalleeStats"], bool], timeout: Optional[float] = None) -> bool:
        """Block until ``predicate(stats)`` holds (re-checked on every change); its last value."""
        with self._lock:
            return self._changed.wait_for(lambda: predicate(self), timeout)

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
        name: str = "juggler-callee",
        logger: Optional[logging.Logger] = None,
        health: Optional[RedisHealth] = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if not block > 0:
            raise ValueError(f"block must be a positive number of seconds, got {block!r}")
        if not max_backoff > 0:
            raise ValueError(f"max_backoff must be a positive number of seconds, got {max_backoff!r}")
        self.broker = broker
        self.workers = workers
        self.block = block
        self.max_backoff = max_backoff
        self.batch = batch
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
            for i in range(max(self.workers, len(groups))):
                t = threading.Thread(target=self._work, args=(groups[i % len(groups)],), name=f"{self.name}-{i}")
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

    def _work(self, uris: list[str]) -> None:
        if hasattr(self.broker, "call_popper"):
            self._work_batched(uris)
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

    def _work_batched(self, uris: list[str]) -> None:
        health = self.health
        failures = 0  # this worker's failed connections in a row
        popper: Any = None
        results: list[tuple[ResultPayload, float, str]] = []  # run, to be stored
        calls: list[Popped] = []
        slow = False  # the last calls took over 1 ms each: take one at a time
        full = False  # the last batch was as large as asked for
        try:
            while True:
                if popper is None:
                    if self._stop.is_set() or (failures and not self._turn(failures)):
                        break
                    since = health.epoch  # (what its outcome proves: see RedisHealth)
                    try:
                        # (on a cluster, after a failure: its slot's node may have changed)
                        popper = self.broker.call_popper(uris, refresh=failures > 0)
                    except BrokerError as exc:
                        health.failed(exc, since)
                        failures += 1
                        continue
                    health.succeeded(since)
                    failures = 0
                    with self._lock:
                        self._poppers.add(popper)
                n = 0 if self._stop.is_set() else 1 if slow else self.batch
                if not (n or results):
                    break  # stopping, with nothing left to store
                batch, results = results, []
                since = health.epoch
                try:
                    if n and not full:
                        # store the results and wait for the next call, in one write
                        calls = popper.pop(n, batch, partial(self._stored, batch))
                    else:
                        # the last batch was full (more calls are likely waiting), or stopping
                        calls = popper.exchange(batch, n, partial(self._stored, batch))
                except BrokerError as exc:
                    with self._lock:
                        self._poppers.discard(popper)
                    popper.close()
                    moved, popper = popper.moved, None
                    if moved:  # its slot moved (MOVED, ASK, UNBLOCKED): redis answers, go to its node
                        failures = 0
                        continue
                    if not self._stop.is_set():  # (not woken on purpose)
                        health.failed(exc, since)
                    failures = 1
                    continue
                if n == 0:
                    break
                full = bool(calls) and len(calls) >= n
                if calls:
                    popped_at = time.monotonic()
                    for popped in calls:
                        try:
                            stored = self._run_one(popped, popped_at)
                        except Exception:  # a bug here must not cost the pool a worker
                            self.logger.exception("callee %s: error handling call %s", self.name, popped.payload.msg_uuid)
                            continue
                        if stored is not None:
                            results.append(stored)
                    slow = time.monotonic() - popped_at > 0.001 * len(calls)
                    calls = []
        finally:
            if popper is not None:
                with self._lock:
                    self._poppers.discard(popper)
                popper.close()

    def _run_one(self, popped: Popped, popped_at: float) -> Optional[tuple[ResultPayload, float, str]]:
        """Run one call taken at ``popped_at``; its result to store (payload, seconds left,
        JSON), or ``None`` when there is none (expired, not ours: counted here)."""
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
        self.stats._add(busy=1)
        try:
            result = fn(call.args)
        except (Exception, SystemExit) as exc:  # sys.exit() in a function must not end the worker
            self.logger.exception("callee %s: function for %s raised", self.name, call.uri)
            result = error_result(str(exc) or type(exc).__name__, type(exc).__name__)
            self.stats._add(errors=1)
        finally:
            self.stats._add(busy=-1)
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
        stored = self._run_one(popped, time.monotonic())
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


def _lost_level(exc: BrokerError) -> int:
    """The level of the line about results that could not be stored: INFO when redis could not
    be reached (the outage has its one ERROR line, from the callee's
    :class:`~juggler.health.RedisHealth`, and these callers get their expiry), ERROR when redis
    refused them (a result list over its capacity, an error reply)."""
    return logging.INFO if unavailable(exc) else logging.ERROR
