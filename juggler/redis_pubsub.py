"""The pub-sub side of the redis broker: publishing, and a redis pub-sub connection's
subscriptions and events (:class:`RedisPubSub`). The server's one pub-sub connection is shared
by all its websockets through :class:`juggler.pubsub.PubSubHub`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import resp
from .exceptions import BrokerError
from .history import HistoryRead, HistoryRule, publish_event, read_history
from .message import EventPayload, Evnt, Position, encode_payload, evnt_frame
from .redisconn import REDIS_FAILURES, broker_error, close_client, one_connection_client, text

__all__ = ["PubSubEvent", "PubSubSide", "RedisPubSub"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class PubSubEvent:
    """An event read from a pub-sub connection."""

    channel: str
    pattern: str
    payload: EventPayload

    def evnt(self, uuid: Optional[str] = None) -> Evnt:
        """The EVNT a subscriber gets (a new message, with its own UUID unless given)."""
        p = self.payload
        if uuid is None:
            return Evnt(p.msg_uuid, self.channel, p.args, self.pattern, offset=p.offset, epoch=p.epoch)
        return Evnt(p.msg_uuid, self.channel, p.args, self.pattern, uuid=uuid, offset=p.offset, epoch=p.epoch)

    @functools.cached_property
    def evnt_payload(self) -> str:
        """The JSON of the EVNT payload every subscriber of this event gets: made once (see
        :meth:`~juggler.message.Evnt.sharing`)."""
        return encode_payload(self.evnt(uuid=""))

    @functools.cached_property
    def evnt_frame(self) -> tuple[bytes, bytes, int]:
        """:func:`~juggler.message.evnt_frame` of this event, made once for every subscriber."""
        return evnt_frame(self.evnt_payload)


#: How long a ``PUBLISH`` waits for redis (to connect, and for its reply), in seconds, before
#: it fails with ``redis unavailable``: a redis that stalls fails a PUB in this time, not in the
#: client's socket timeout (30 s with :meth:`~juggler.broker.RedisBroker.from_url`). With the
#: wait for a turn of the backoff (:class:`~juggler.pubsub.PubSubHub`), a PUB is answered
#: within a second while redis is down or stalls.
PUBLISH_TIMEOUT = 0.5

_publish_pool_lock = threading.Lock()  # (making a broker's publish pool, once)


class PubSubSide:
    """:class:`~juggler.broker.RedisBroker`'s publishing and pub-sub connections (a mix-in)."""

    # (set by RedisBroker.__init__)
    _fast: Any
    _eval: Callable[..., Any]
    _pubsub_turn: itertools.count
    cluster: bool
    client: Any
    refresh_slots: Callable[[], None]
    #: :data:`PUBLISH_TIMEOUT`, for this broker (on the fast path: a plain redis with hiredis;
    #: elsewhere a PUBLISH waits as long as the client's socket timeout).
    publish_timeout: float = PUBLISH_TIMEOUT
    _publishing: Any = None  # the fast path's connections for PUBLISH, made on the first one

    def publish(self, channel: str, payload: EventPayload) -> int:
        """Publish an event; returns the number of redis subscribers that got it. Raises
        :class:`BrokerError`, within :attr:`publish_timeout` on the fast path."""
        data = payload.to_json()
        try:
            if self._fast is not None:
                pool = self._publishing or self._publish_pool()
                conn = pool.get()
                try:
                    return int(conn.command("PUBLISH", channel, data))
                finally:
                    pool.put(conn)
            return int(self._once(channel, "PUBLISH", channel, data))
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc

    def publish_history(self, channel: str, payload: EventPayload, rule: HistoryRule) -> tuple[int, Position]:
        """Publish an event on a channel with history (:func:`juggler.history.publish_event`):
        the number of redis subscribers that got it, and its position. Raises
        :class:`BrokerError`."""
        try:  # (its reply awaited within publish_timeout on the fast path, as a PUBLISH's)
            return publish_event(functools.partial(self._eval, within=self.publish_timeout), channel, payload, rule)
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc

    def read_history(self, channel: str, rule: HistoryRule, since: Optional[Position]) -> HistoryRead:
        """:func:`juggler.history.read_history`; raises :class:`BrokerError`."""
        try:
            return read_history(self._eval, channel, rule, since)
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc

    def _publish_pool(self) -> resp.RespPool:
        """Fast-path connections like the shared ones, but whose connects and reads give up
        after :attr:`publish_timeout` (a connection that timed out is closed, not reused)."""
        with _publish_pool_lock:
            if self._publishing is None:
                pool = self.client.connection_pool
                kwargs = dict(pool.connection_kwargs)
                for name in ("socket_timeout", "socket_connect_timeout"):
                    if name in kwargs or name == "socket_timeout":  # (not every class takes both)
                        given = kwargs.get(name)
                        kwargs[name] = self.publish_timeout if given is None else min(given, self.publish_timeout)
                kwargs["retry"] = Retry(NoBackoff(), 0)  # (a connect retried would take longer)
                # a client that is never used itself: its settings are what the pool's
                # connections are made with
                settings = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
                self._publishing = resp.RespPool(settings, max_idle=16)
            return self._publishing

    def _close_publishing(self) -> None:
        pool, self._publishing = self._publishing, None
        if pool is not None:
            pool.close()

    def pubsub(self, confirm_timeout: float = 5.0) -> "RedisPubSub":
        """A new pub-sub connection, on a redis connection of its own (made on first subscribe).

        Someone must be reading its events (:meth:`RedisPubSub.get_event`, as a server
        connection's pub-sub thread does) for its subscribe calls to be confirmed.

        On a cluster the connection goes to the primaries in turn, as a plain connection:
        ``PUBLISH`` reaches the subscribers of every node, and the cluster client's own pools
        are not used, since a topology refresh marks their connections for reconnecting (a
        pub-sub connection would silently re-subscribe, losing events published in between).
        If that node fails, :meth:`RedisPubSub.get_event` raises :class:`BrokerError`, as on a
        standalone redis, and the next connection goes to the next primary, in the slot map
        refreshed first (after a failover it has the promoted replica, not the failed master).

        Connecting (and redis-py's handshake on connect) waits at most ``confirm_timeout``
        for redis, so a redis that stalls cannot hold a SUB or a reconnect for ever; once
        connected, the connection waits with no timeout.
        """
        if self.cluster:
            turn = next(self._pubsub_turn)
            if turn:  # (a connection before this one may have failed with its node)
                self.refresh_slots()
            cluster = self.client
            nodes = cluster.get_primaries() or cluster.get_nodes()
            node = nodes[turn % len(nodes)]
            client = one_connection_client(cluster.get_redis_connection(node), blocking=True)
        else:
            client = one_connection_client(self.client, blocking=True)
        # (the pool is this connection's own: RedisPubSub lifts the timeout once connected)
        client.connection_pool.connection_kwargs["socket_timeout"] = confirm_timeout
        return RedisPubSub(client.pubsub(), confirm_timeout, owner=client)


class _Waiter:
    """A pub-sub request waiting for redis' confirmation (``restore``: one of a
    :meth:`RedisPubSub.restore`'s, which nobody waits for)."""

    __slots__ = ("done", "restore")

    def __init__(self, restore: bool = False) -> None:
        self.done = False
        self.restore = restore


class RedisPubSub:
    """A :class:`PubSubConn` over a redis-py ``PubSub``.

    ``subscribe``/``unsubscribe`` are called from one thread while another waits in
    ``get_event`` (as redis-py's own ``run_in_thread`` does). They return only once redis has
    confirmed them, which the ``get_event`` thread reads: so after a SUB's ACK, a PUB from
    anywhere reaches the subscriber, and after an UNSB's ACK no event of it follows.
    """

    def __init__(self, pubsub: Any, confirm_timeout: float = 5.0, owner: Any = None) -> None:
        self._pubsub = pubsub
        self._owner = owner  # the one-connection client it runs on, closed with it
        self.confirm_timeout = confirm_timeout
        self._cond = threading.Condition()
        # The requests sent and not confirmed yet, per (kind, channel), in the order they went
        # out: redis confirms them in that order. A key with none left is deleted, so this
        # holds nothing for the channels a connection once subscribed to.
        self._waiting: dict[tuple[str, str], deque[_Waiter]] = {}
        self._active: set[tuple[str, str]] = set()  # ("p" or "", channel) subscribed now
        self._send_lock = threading.Lock()  # one command at a time on the connection
        self._sent = threading.Event()  # a command went out: the connection exists
        self._stopped = False
        # Set (under _cond) when get_event saw the connection fail: for good, since redis-py
        # would reconnect behind our back and re-subscribe by itself. Requests fail at once.
        self._broken: Optional[BrokerError] = None
        self._restoring = 0  # restore()'s confirmations still to come
        self._on_restored: Optional[Callable[[], None]] = None

    def subscribe(self, channel: str, pattern: bool, timeout: Optional[float] = None) -> None:
        """Subscribe, and wait for redis' confirmation up to ``timeout`` seconds (``None``:
        :attr:`confirm_timeout`); :class:`BrokerError` if it does not come."""
        if pattern:
            self._confirm("psubscribe", channel, self._pubsub.psubscribe, timeout)
        else:
            self._confirm("subscribe", channel, self._pubsub.subscribe, timeout)

    def unsubscribe(self, channel: str, pattern: bool, timeout: Optional[float] = None) -> None:
        """As :meth:`subscribe` (``timeout=0``: send it, and do not wait)."""
        if pattern:
            self._confirm("punsubscribe", channel, self._pubsub.punsubscribe, timeout)
        else:
            self._confirm("unsubscribe", channel, self._pubsub.unsubscribe, timeout)

    def _confirm(self, kind: str, channel: str, command: Any, timeout: Optional[float] = None) -> None:
        timeout = self.confirm_timeout if timeout is None else timeout
        key = (kind, channel)
        active = ("p" if kind.startswith("p") else "", channel)
        with self._cond:
            if self._broken is not None:
                raise BrokerError(str(self._broken))
            was_active = active in self._active
            if kind.endswith("unsubscribe"):
                if not was_active:
                    # Not subscribed: nothing to undo. (redis-py does not even read the reply
                    # of a pub-sub with no subscriptions, so there would be no confirmation.)
                    return
                self._active.discard(active)
            else:
                self._active.add(active)
            waiter = _Waiter()
        try:
            with self._send_lock:
                with self._cond:  # in line before it is sent, in the order it is sent
                    self._waiting.setdefault(key, deque()).append(waiter)
                try:
                    command(channel)
                    self._connected()
                except REDIS_FAILURES:
                    # Not sent (redis-py keeps its own state unchanged too): undo, so that
                    # the same request can succeed on this connection once redis is back.
                    # The connection it failed on is gone (redis-py drops it, and connects
                    # again on the next command), and with it the confirmations of earlier
                    # requests that timed out and still wait in line for them: they never
                    # come, and a later request of the same channel would take the next one
                    # in their place. So the lines are emptied, before another request can
                    # go out on the new connection.
                    with self._cond:
                        self._waiting.clear()
                        (self._active.add if was_active else self._active.discard)(active)
                    raise
                self._sent.set()
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc
        with self._cond:
            if not self._cond.wait_for(lambda: waiter.done or self._broken is not None, timeout):
                # It stays in line: its confirmation, when it comes, is taken for it (and not
                # for a later request of the same channel).
                raise BrokerError(f"redis unavailable: redis did not confirm {kind} {channel!r} within {timeout:g} s")
            if not waiter.done:  # the connection failed: no confirmation will come
                raise BrokerError(str(self._broken))

    def connect(self) -> None:
        """Make the connection now, with a PING (its PONG is skipped by :meth:`get_event`):
        so that a reconnect can connect without holding up anyone, then :meth:`restore`.
        Raises :class:`BrokerError`."""
        try:
            with self._send_lock:
                self._pubsub.ping()
                self._connected()
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc
        self._sent.set()

    def _connected(self) -> None:
        """(Under _send_lock, once a command went out.) Connected, past redis-py's handshake,
        which waited at most the connect's timeout: from now on reads wait with none (the
        reader blocks until an event comes)."""
        conn = self._pubsub.connection
        if conn is not None and conn.socket_timeout is not None:
            conn.socket_timeout = None
            settimeout = getattr(getattr(conn, "_sock", None), "settimeout", None)  # (not fakeredis')
            if settimeout is not None:
                settimeout(None)

    def restore(self, keys: Iterable[tuple[bool, str]], done: Callable[[], None]) -> None:
        """Subscribe to every ``(pattern, channel)`` of ``keys`` in two commands (SUBSCRIBE
        and PSUBSCRIBE), without waiting: ``done()`` is called once redis confirmed them all,
        on the thread in :meth:`get_event` (at once when ``keys`` is empty). Requests made
        meanwhile wait in line behind them. Raises :class:`BrokerError` if they cannot be
        sent (the connection is then of no use)."""
        channels = [c for p, c in keys if not p]
        patterns = [c for p, c in keys if p]
        with self._send_lock:
            with self._cond:
                for kind, names in (("subscribe", channels), ("psubscribe", patterns)):
                    for name in names:
                        self._waiting.setdefault((kind, name), deque()).append(_Waiter(restore=True))
                        self._active.add(("p" if kind == "psubscribe" else "", name))
                self._restoring = len(channels) + len(patterns)
                self._on_restored = done if self._restoring else None
            try:
                if channels:
                    self._pubsub.subscribe(*channels)
                if patterns:
                    self._pubsub.psubscribe(*patterns)
                self._connected()
            except REDIS_FAILURES as exc:
                raise broker_error(exc) from exc
        self._sent.set()
        if not (channels or patterns):
            done()

    def get_event(self, timeout: Optional[float]) -> Optional[PubSubEvent]:
        """Wait up to ``timeout`` seconds (``None``: with no timeout, until an event comes or
        :meth:`wake` is called) for an event; ``None`` if none came.

        Reads (and signals) subscription confirmations on the way. Raises
        :class:`BrokerError` when the redis connection fails, and :class:`ValueError` (with the
        channel) for an event whose payload is not a juggler event payload.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._stopped:
                return None
            msg = self._read_message(deadline)
            if msg is not None:
                kind = msg.get("type")
                if kind in ("message", "pmessage"):
                    return self._event(msg, kind)
                if kind in ("subscribe", "psubscribe", "unsubscribe", "punsubscribe") and msg.get("channel"):
                    self._confirmed((kind, text(msg["channel"])))
                    continue
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _read_message(self, deadline: Optional[float]) -> Optional[dict]:
        """(get_event) The next message of the connection, or ``None`` (none by ``deadline``,
        no connection yet, or stopped); :class:`BrokerError` when the connection failed."""
        try:
            if deadline is None:
                if not self._sent.is_set():
                    self._sent.wait()  # no connection before the first command
                    return None
                return self._pubsub.handle_message(self._pubsub.parse_response(block=True))
            return self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
        except REDIS_FAILURES as exc:
            if self._stopped:
                return None
            error = broker_error(exc)
            with self._cond:  # the requests waiting for a confirmation fail now
                self._broken = error
                self._cond.notify_all()
            raise error from exc

    def _confirmed(self, key: tuple[str, str]) -> None:
        """(get_event) Redis confirmed a request of ``key``: the first waiting for it is done."""
        restored = None
        with self._cond:
            # A confirmation nobody waits for is dropped: redis-py re-subscribes by itself
            # after a reconnect, and those confirmations must not stand in for a later
            # request's.
            line = self._waiting.get(key)
            if line:
                waiter = line.popleft()
                waiter.done = True
                if not line:
                    del self._waiting[key]
                if waiter.restore:
                    self._restoring -= 1
                    if not self._restoring:
                        restored, self._on_restored = self._on_restored, None
                self._cond.notify_all()
        if restored is not None:
            restored()

    @staticmethod
    def _event(msg: dict, kind: str) -> PubSubEvent:
        channel = text(msg["channel"])
        pattern = text(msg["pattern"]) if kind == "pmessage" and msg.get("pattern") else ""
        try:
            payload = EventPayload.from_json(msg["data"])
        except ValueError as exc:
            raise ValueError(f"channel {channel!r}: {exc}") from None
        return PubSubEvent(channel, pattern, payload)

    def wake(self) -> None:
        """Make a :meth:`get_event` blocked in another thread return ``None``, now and from
        then on (a PING makes redis answer, which wakes the read). Never raises."""
        self._stopped = True
        self._sent.set()
        conn = self._pubsub.connection
        if conn is None:
            return
        try:
            with self._send_lock:
                # straight on the connection: PubSub.execute_command may read replies itself
                # (its health-check clean-up), racing the reader for them
                conn.send_command("PING")
        except REDIS_FAILURES as exc:  # the read fails too, and sees it was stopped
            logger.debug("waking a pub-sub reader: %s", exc)

    def close(self) -> None:
        try:
            self._pubsub.close()
            if self._owner is not None:
                close_client(self._owner)
        except REDIS_FAILURES as exc:  # closing a broken connection
            logger.debug("closing pub-sub connection: %s", exc)
