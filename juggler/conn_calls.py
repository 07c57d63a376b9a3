"""The calls of a juggler connection: the count of its calls in flight, and its results
listener (the thread that takes the connection's results off redis and sends them as RES).

:class:`ConnCalls` is a base class of :class:`~juggler.conn.Conn` (the rest of the
connection: its reader, its writer, pub-sub and closing is there); its methods run on the
connection's threads as :mod:`juggler.conn` describes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

from .broker import SLOT_REFRESH_INTERVAL, Broker, RedisBroker, results_key
from .exceptions import BrokerError
from .frames import CloseCode
from .message import CallPayload, Res
from .redisconn import timed_out, unavailable
from .timer import TimerHandle

if TYPE_CHECKING:
    from .conn import ConnServices, ConnSettings

__all__ = ["ConnCalls", "CONN_THREAD_DAEMON"]

#: Connection threads are daemon threads, and their owner joins them all the same (the reader
#: joins the writer and results threads; Server.shutdown() joins the readers). Python keeps a
#: lock per non-daemon thread in a list it scans whenever one of them ends: with 10,000
#: connections closing, that scan made teardown quadratic (minutes instead of seconds).
CONN_THREAD_DAEMON = True
# with no max_calls_in_flight, a connection's count of its calls in flight drops those whose
# deadline passed when it reaches this size (then twice the size left): its bound
_CALLS_COUNT_AT = 1024


class _UntilMoved:
    """What a results listener on a Redis Cluster waits for its turn with (the ``stop`` of
    :meth:`RedisHealth.wait_turn`): its own end, or its key's node moved in the slot map (a
    failover found by another listener), after which it looks again."""

    __slots__ = ("stopping", "broker")

    def __init__(self, stopping: threading.Event, broker: RedisBroker) -> None:
        self.stopping = stopping
        self.broker = broker

    def is_set(self) -> bool:
        return self.stopping.is_set() or self.broker.slot_moved()


class ConnCalls:
    """A connection's calls in flight and its results listener (see the module's docstring)."""

    # (the Conn's, used here)
    id: int
    uuid: str
    broker: Broker
    settings: "ConnSettings"
    logger: logging.Logger
    ack_lock: threading.Lock
    _svc: "ConnServices"
    _close_lock: threading.Lock

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def send(self, msg: Any) -> None:
        raise NotImplementedError

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> bool:
        raise NotImplementedError

    def _flush_batch(self) -> None:
        raise NotImplementedError

    def _init_calls(self, services: "ConnServices") -> None:
        # Calls in flight: msg uuid -> deadline (monotonic, this connection's own count); a
        # call leaves when its result is taken off redis, its store is NACKed, or (found at
        # the next count) its deadline passes. Only a call still here, before its deadline,
        # gets a RES (_results_loop): a store or result that a stalled redis ran late must
        # not bring one after the call expired or was NACKed.
        self._calls: dict[str, float] = {}
        self._calls_next_deadline = math.inf  # none of _calls ends before this
        self._calls_count_at = _CALLS_COUNT_AT  # (no max_calls_in_flight) drop ended calls at this size
        # The results listener, started by the first CALL (listen_for_results).
        self._results: Optional[Broker] = None
        self._results_thread: Optional[threading.Thread] = None
        self._results_stop = False
        self._results_stopping: Optional[threading.Event] = None  # (the same, for RedisHealth.wait_turn; made with the thread)
        self._health = services.health
        self._listener_health = services.health  # (its node's, on a cluster: listen_for_results)
        # a CALL fails fast while the health says redis is down; not on a Redis Cluster, where
        # one node down leaves the others' URIs working
        self._fail_fast = not getattr(services.broker, "cluster", False)
        self._ahead = False  # calls stored through the results listener (store_call_ahead)
        self._store_watch: Optional[TimerHandle] = None  # (_watch_stores)
        self._watch_lock = threading.Lock()
        self._read_at = 0.0  # when the message being handled was read (reader thread)
        self._ack_deferred = False  # and its ACK will come from the results thread
        # The results thread, while it keeps what it sends until it waits for redis (see
        # _results_loop), and what it kept: written by Conn._flush_batch.
        self._batcher: Optional[int] = None
        self._batch: Optional[list[Any]] = None

    # -- calls --

    def redis_up(self) -> bool:
        """Whether the server sees its redis up (see :meth:`check_redis`)."""
        return self._health.up

    def redis_epoch(self) -> int:
        """The server's view of redis' :attr:`~juggler.health.RedisHealth.epoch`, taken by a
        request before it tries redis, for :meth:`redis_answered` and :meth:`redis_failed`."""
        return self._health.epoch

    def check_redis(self) -> bool:
        """:class:`BrokerError` (``redis unavailable``) at once, without trying redis, while
        the server knows its redis is down (its :class:`~juggler.health.RedisHealth`), but for
        one request per turn of the backoff (:meth:`~juggler.health.RedisHealth.try_turn`),
        which tries: a request need not wait for a connect to fail, and a redis that is down
        sees no connect per request. Whether this request tries while redis is down (then
        :meth:`redis_answered` or :meth:`redis_failed` must follow). Not on a Redis Cluster,
        where one node down leaves the others' URIs working."""
        health = self._health
        if health.up or not self._fail_fast:
            return False
        if not health.try_turn():
            raise BrokerError("redis unavailable: the server is reconnecting")
        return True

    def redis_answered(self, since: Optional[int] = None) -> None:
        """A request went through redis: if the server saw it down, it is back (``since``: the
        :meth:`redis_epoch` when the request began; see :meth:`~juggler.health.RedisHealth.succeeded`)."""
        self._health.succeeded(since)

    def redis_failed(self, exc: BrokerError, since: Optional[int] = None) -> None:
        """A request failed: if redis did not answer in time, the server's view of redis says
        it is down (logged once per outage), and its next requests fail fast rather than each
        wait as long. (A refused or closed connection fails fast anyway, and the results
        listeners find out whether redis is down.) ``since``: as for :meth:`redis_answered`."""
        if self._fail_fast and timed_out(exc):
            self._health.failed(exc, since)

    def listen_for_results(self) -> bool:
        """Start the results listener, if it does not run yet (before the first CALL is
        stored); whether it runs. ``False`` when the connection is closing, or when no thread
        could be started for it (the process is out of threads: logged, and its redis
        connection given back); the CALL then gets its NACK, and the connection is closed."""
        if self._results_thread is not None:
            return True
        with self._close_lock:
            if self._results_thread is not None:
                return True
            if self.closed:
                return False
            self._results = results = self.broker.dedicated(results_key(self.uuid))
            self._listener_health = self._svc.listener_health(results)
            if isinstance(results, RedisBroker):  # it may hand a result over sooner
                results.health = self._listener_health
                results.call_deadlines = self._calls
                # and, knowing which calls are in flight, store them (store_call_ahead), each
                # with the script taking the timeout key of the result before it
                self._ahead = bool(self.settings.max_calls_in_flight) and results.follow_calls(self._calls)
                results.keys_taken_later = self._ahead
            self._results_stopping = threading.Event()
            t = threading.Thread(
                target=self._results_loop, name=f"juggler-conn-{self.id}-results", daemon=CONN_THREAD_DAEMON
            )
            try:
                t.start()
            except (RuntimeError, MemoryError) as exc:  # "can't start new thread"
                self._results, self._ahead, self._listener_health = None, False, self._svc.health
                # its text, not the exception: kept in this frame, which its traceback holds, it
                # made a cycle keeping the reader's frames, and so its Thread, until the garbage
                # collector ran; from Python 3.13 the stack of a thread never joined (the reader)
                # is given back only once its Thread is freed
                error = str(exc)
            else:
                self._results_thread = t
                return True
        self.logger.error("connection %s: cannot start its results listener: %s", self.uuid, error)
        try:
            results.close()
        except Exception:
            self.logger.exception("connection %s: could not close its results redis connection", self.uuid)
        return False

    def store_call_ahead(self, payload: CallPayload, timeout: float, done: Callable[[Optional[BrokerError]], None]) -> bool:
        """Store a call through the results listener's own redis connection, where it can:
        the reader does not wait for redis, and the listener calls ``done(None)`` (the call is
        stored: ACK it) or ``done(error)`` on its thread, before the call's result can come.
        ``False`` when it cannot (:meth:`RedisBroker.store_call_ahead`): store it with the
        broker and ACK it the usual way. On the reader thread, after
        :meth:`listen_for_results`."""
        results = self._results
        if not self._ahead or results is None or self._results_stop:
            return False
        read_at, observe = self._read_at, self._svc.observe_call_ack

        def stored(error: Optional[BrokerError]) -> None:  # (on the results thread)
            observe(time.monotonic() - read_at)  # CALL read to ACK or NACK, as for the others
            done(error)

        if not results.store_call_ahead(payload, timeout, stored):  # type: ignore[attr-defined]
            return False
        self._ack_deferred = True
        if self._store_watch is None:
            with self._watch_lock:
                if self._store_watch is None:
                    self._watch_stores_locked()
        return True

    def _watch_stores(self) -> None:
        """Check, on the server's timer, that redis answers the calls stored ahead within the
        broker's ``reply_timeout``: the listener waits for that answer with no timeout of its
        own. Past it, redis counts as failed: the listener's connection is given up
        (:meth:`RedisBroker.abandon`, which never waits), those calls get their NACK and the
        listener connects again. One chain of checks at a time, while stores are
        unanswered."""
        with self._watch_lock:
            self._watch_stores_locked()

    def _watch_stores_locked(self) -> None:
        self._store_watch = None
        results = self._results
        limit = getattr(results, "reply_timeout", None)
        if results is None or limit is None or self._results_stop:
            return
        since = results.unanswered_since()  # type: ignore[attr-defined]
        if since is None:
            return  # the next store ahead starts a new watch
        late = time.monotonic() - since - limit
        if late >= 0:
            self.logger.debug("connection %s: redis has not answered a CALL's store in %g s", self.uuid, limit)
            results.abandon(f"no answer in {limit:g} s")  # type: ignore[attr-defined]
            return
        self._store_watch = self._svc.timer.call_later(-late, self._watch_stores)

    def call_started(self, msg_uuid: str, timeout: float) -> bool:
        """Count a call in flight until its result comes or ``timeout`` seconds pass; ``False``
        (not counted) when ``max_calls_in_flight`` are already. On the reader thread."""
        most = self.settings.max_calls_in_flight
        calls = self._calls
        now = time.monotonic()
        if not most:  # no limit: the count only says which calls may still get a RES
            if len(calls) >= self._calls_count_at:
                self._drop_ended_calls(now)
                self._calls_count_at = max(_CALLS_COUNT_AT, 2 * len(calls))  # (amortized)
        elif len(calls) >= most and (now < self._calls_next_deadline or not self._drop_ended_calls(now)):
            return False
        deadline = now + timeout
        calls[msg_uuid] = deadline
        if deadline < self._calls_next_deadline:
            self._calls_next_deadline = deadline
        return True

    def call_ended(self, msg_uuid: str) -> None:
        """A call counted by :meth:`call_started` is over (it was not stored: NACKed): no RES
        may follow, even if a redis that stalled stores it after all."""
        self._calls.pop(msg_uuid, None)

    def _drop_ended_calls(self, now: float) -> bool:
        """Forget the calls whose deadline passed; whether there is room for one more."""
        calls = self._calls
        left = []
        for msg_uuid, deadline in list(calls.items()):  # (the results thread pops meanwhile)
            if deadline <= now:
                calls.pop(msg_uuid, None)
            else:
                left.append(deadline)
        self._calls_next_deadline = min(left, default=math.inf)
        return len(calls) < self.settings.max_calls_in_flight

    def _stop_results(self) -> None:
        thread, results = self._results_thread, self._results
        if thread is None or results is None:
            return
        self._results_stop = True
        assert self._results_stopping is not None
        self._results_stopping.set()
        health = self._listener_health
        if not health.up:  # it may be waiting for its turn to reconnect
            health.wake()
        if self._ahead or not health.up:  # it may wait with no BRPOP, for what the reader sends: a marker cannot wake it
            results.interrupt()
        else:
            try:
                self.broker.wake_results(self.uuid)
            except BrokerError:
                results.interrupt()
        thread.join(self.settings.close_timeout)
        if thread.is_alive():
            results.interrupt()
            thread.join()


    # -- the results listener --

    def _results_loop(self) -> None:
        broker = self._results
        assert broker is not None
        # What this thread sends (a CALL's ACK once redis stored it, a RES) is kept until it
        # is about to wait for redis: an ACK and the RES of a result that came with it (a
        # quick callee) go out in one write, which wakes the client once. Its broker says
        # when it waits (before_wait); a broker that cannot gets each message written at once.
        batching = isinstance(broker, RedisBroker) and broker.call_before_wait(self._flush_batch)
        if batching:
            self._batch = []
            self._batcher = threading.get_ident()
        try:
            self._listen(broker)
        finally:
            try:
                self._flush_batch()
            finally:
                self._batcher = None  # (before the thread ends: a later thread may get its ident)

    def _listen(self, broker: Broker) -> None:
        # started while redis is down (the CALL that started it gets its NACK): its first
        # connect takes a turn like a reconnect. (So the server finds redis back even when the
        # listeners that saw it go are gone with their connections.)
        if not self._results_turn(broker, None):
            return
        while True:
            # (a failure of a read that began before redis was seen back is old news)
            since = self._listener_health.epoch
            try:
                popped = broker.pop_result(self.uuid, None)
            except Exception as exc:
                if self._results_stop:
                    return
                if not (isinstance(exc, BrokerError) and unavailable(exc)):
                    self._listener_failed("results", exc)  # (redis' refusal, or a bug)
                    return
                # redis went away (its calls stored and unanswered got their NACK): say so
                # once per server, and connect again in turn; results stored meanwhile wait in
                # their list for the next BRPOP
                self._flush_batch()
                self.logger.debug("connection %s: results listener lost redis: %s", self.uuid, exc)
                if not self._results_turn(broker, exc, since):
                    return
                continue
            if self._results_stop:
                return
            if popped is None:
                continue
            p = popped.payload
            # by this connection's own count: a call NACKed, or past its deadline, ended
            # already (its client's timer ran out): no RES, whatever redis' TTL says (a
            # redis that stalled runs a store late, and counts its TTL from then)
            deadline = self._calls.pop(p.msg_uuid, None)
            if popped.expired or deadline is None or deadline <= time.monotonic():
                why = "expired" if popped.expired or deadline is not None else "not in flight (NACKed, or expired)"
                self.logger.debug("connection %s: dropping the result for %s: %s", self.uuid, p.msg_uuid, why)
                self._svc.incr("expired_results")
                continue
            res = Res(for_uuid=p.msg_uuid, uri=p.uri, args=p.args)
            # when its result left redis, for the delivery metric: on the message itself, so
            # that a RES never written (a handler drops it) leaves nothing behind
            object.__setattr__(res, "_popped", time.monotonic())
            lock = self.ack_lock
            if not lock.acquire(False):  # the reader holds it while redis stores a call:
                self._flush_batch()  # what this thread kept goes out first, not after that wait
                lock.acquire()
            try:
                self.send(res)
            finally:
                lock.release()

    def _results_turn(self, broker: Broker, exc: Optional[BrokerError], since: Optional[int] = None) -> bool:
        """Before the results listener connects: the first time (``exc`` is ``None``), or
        again after redis failed it with ``exc``. On a Redis Cluster it first finds its key's
        node again (a failover, a ``MOVED`` reply, may have moved it:
        :meth:`RedisBroker.follow_slot`), and takes that node's view
        (:attr:`_listener_health`). ``exc`` is reported to the node that still serves the key
        (redis down: said once per server and node; ``since``: the epoch of that node's view
        when the failed read began, see :meth:`RedisHealth.failed`), then the listener waits for its turn in
        that node's backoff, while it is down; when another listener finds the key's node
        moved meanwhile, it looks again rather than wait for turns of a node that is gone.
        ``False``: the listener stops."""
        follow = broker.follow_slot if isinstance(broker, RedisBroker) else None
        stopping = cast(threading.Event, self._results_stopping)  # (made before this thread started)
        look = exc is not None  # (look up the key's node: refreshing the slot map after a failure)
        # its node answered MOVED, ASK or UNBLOCKED: not down (see RedisBroker.moved)
        answered = exc is not None and getattr(broker, "moved", False)
        while True:
            health = self._listener_health
            followed = look and follow is not None and follow(exc is not None)
            if followed:
                # its key is on another node now (the one it left was found down, or answered
                # MOVED): that node's view; the others waiting for the node it left look again
                health.wake()
                health = self._listener_health = self._svc.listener_health(broker)
                broker.health = health  # type: ignore[attr-defined]
                exc = None
            # (after a move it could not follow, it waits for its turn: no loop on the move)
            stuck = look and exc is None and not followed
            until: Any = stopping if follow is None or stuck else _UntilMoved(stopping, broker)
            if exc is not None and answered:
                # a node that answers and serves the key's slot still, by the map (a slot
                # migrating, a map not refreshed yet): try again after a pause, not a turn
                if stopping.wait(SLOT_REFRESH_INTERVAL):
                    return False
            elif exc is not None:
                health.failed(exc, since)
            elif not look and health.up:
                return True  # (the first connect, redis up: no turn to take)
            exc = None
            if health.wait_turn(until):
                return True
            if self._results_stop or until is stopping:
                return False
            look = True  # its key's node moved while it waited

    def _listener_failed(self, role: str, exc: Exception) -> None:
        """A redis listener cannot go on (redis refused its command, or a bug; not redis gone
        away, which it waits out): close the connection with 1011, logged once. (A connection
        without its listener could only let its calls expire.)"""
        if self.closed:
            return  # closing anyway: the error is the close
        if isinstance(exc, BrokerError):
            self.logger.error("connection %s: %s listener failed: %s", self.uuid, role, exc)
            self.close(CloseCode.INTERNAL_ERROR, f"{role} listener failed: redis error")
        else:  # a bug
            self.logger.error("connection %s: %s listener crashed", self.uuid, role, exc_info=exc)
            self.close(CloseCode.INTERNAL_ERROR, f"{role} listener failed: internal error")
