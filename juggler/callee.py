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
from typing import Any, Callable, Optional

from .broker import Broker, Popped
from .exceptions import BrokerError
from .message import ResultPayload, error_result

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

    ``block`` is how long (seconds) one BRPOP waits before checking for :meth:`stop`; it
    bounds how long ``stop`` takes. When redis is unreachable, workers retry with exponential
    backoff from ``0.1`` s up to ``max_backoff`` seconds.

    A function gets the call's decoded ``args`` and returns any JSON value. If it raises, the
    caller gets ``{"error": {"message": str(exc)}}``, the exception is logged once and the
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
        max_backoff: float = 5.0,
        name: str = "juggler-callee",
        logger: Optional[logging.Logger] = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if not block > 0:
            raise ValueError(f"block must be a positive number of seconds, got {block!r}")
        self.broker = broker
        self.workers = workers
        self.block = block
        self.max_backoff = max_backoff
        self.name = name
        self.logger = logger or logging.getLogger("juggler.callee")
        self.stats = CalleeStats()
        self._functions: dict[str, Function] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False

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
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            if t is threading.current_thread():
                continue
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads if t is not threading.current_thread())

    def __enter__(self) -> "Callee":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- workers --

    def _work(self, uris: list[str]) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                popped = self.broker.pop_call(uris, self.block)
            except BrokerError as exc:
                backoff = min(self.max_backoff, backoff * 2 or 0.1)
                if backoff == 0.1:
                    self.logger.error("callee %s: %s; retrying", self.name, exc)
                self._stop.wait(backoff)
                continue
            if backoff:
                self.logger.info("callee %s: redis is back", self.name)
                backoff = 0.0
            if popped is not None:
                try:
                    self._run(popped)
                except Exception:  # a bug here must not cost the pool a worker
                    self.logger.exception("callee %s: error handling call %s", self.name, popped.payload.msg_uuid)

    def _run(self, popped: Popped) -> None:
        call = popped.payload
        if popped.expired:
            self.logger.debug("skipping expired call %s to %s", call.msg_uuid, call.uri)
            self.stats._add(expired=1)
            return
        fn = self._functions.get(call.uri)
        if fn is None:  # a payload whose uri is not its list's: not ours to run
            self.logger.warning("callee %s: dropping call %s for unknown uri %r", self.name, call.msg_uuid, call.uri)
            return
        self.logger.debug("running call %s to %s (%.3f s left)", call.msg_uuid, call.uri, popped.remaining)
        self.stats._add(busy=1)
        start = time.monotonic()
        try:
            result = fn(call.args)
        except (Exception, SystemExit) as exc:  # sys.exit() in a function must not end the worker
            self.logger.exception("callee %s: function for %s raised", self.name, call.uri)
            result = error_result(str(exc) or type(exc).__name__)
            self.stats._add(errors=1)
        finally:
            self.stats._add(busy=-1)
        try:
            remaining = popped.remaining - (time.monotonic() - start)
            if remaining <= 0:
                self.logger.debug("result of call %s to %s expired; dropped", call.msg_uuid, call.uri)
                self.stats._add(expired=1)
                return
            payload = ResultPayload(call.conn_uuid, call.msg_uuid, call.uri, result)
            try:
                self._store(payload, remaining)
            except (TypeError, ValueError, RecursionError) as exc:
                self.logger.error("callee %s: result of %s is not JSON: %s", self.name, call.uri, exc)
                self.stats._add(errors=1)
                message = error_result(f"result is not JSON-serializable: {exc}")
                self._store(ResultPayload(call.conn_uuid, call.msg_uuid, call.uri, message), remaining)
        finally:
            self.stats._add(calls=1)  # counted once its result is stored or dropped

    def _store(self, payload: ResultPayload, remaining: float) -> None:
        try:
            self.broker.store_result(payload, remaining)
        except BrokerError as exc:
            self.logger.error("callee %s: could not store result of %s: %s", self.name, payload.uri, exc)
