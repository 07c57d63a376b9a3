"""The redis broker: calls, results and pub-sub, in the redis layout of juggler.0.

:class:`RedisBroker` is the one implementation; :class:`Broker` is the interface a
:class:`~juggler.server.Server` and a :class:`~juggler.callee.Callee` need, so a server can use
one broker for RPC and another (another redis) for pub-sub.

Its three jobs live in modules of their own, named for them, with the redis keys and Lua
scripts in one place (:mod:`juggler.layout`):

- :mod:`juggler.rpc`: storing calls and results, and the results listener of a connection;
- :mod:`juggler.popper`: the callee worker's connection, which pops calls in batches;
- :mod:`juggler.redis_pubsub`: publishing, and the redis side of pub-sub;
- :mod:`juggler.redisconn`: the redis clients they run on, and redis failures as
  :class:`BrokerError`.

The client may be a ``redis.Redis`` or a ``redis.cluster.RedisCluster``: on Redis Cluster every
command and script touches keys of one slot (the hash tag is the URI or the connection's
uuid), a callee pops its URIs one slot group at a time (:meth:`RedisBroker.call_groups`), and
pub-sub runs on plain connections to one node each (``PUBLISH`` reaches every node).

The blocking listeners (a websocket's results listener, a callee worker, the pub-sub
connection) run on plain connections to one node. When their node fails or answers ``MOVED``
(a failover promoted a replica, a slot migrated), they find their key's node again in the
cluster client's slot map, refreshed (:meth:`RedisBroker.refresh_slots`) or corrected by the
``MOVED`` reply itself (:meth:`RedisBroker.redirected`).
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

import redis
import redis.exceptions
from redis.cluster import RedisCluster

from . import resp
from .exceptions import BrokerError
from .health import RedisHealth
from .layout import call_slot, call_timeout_key, calls_key, result_timeout_key, results_key
from .history import HistoryRead, HistoryRule
from .message import CallPayload, EventPayload, Position, ResultPayload
from .popper import CallPopper
from .redis_pubsub import PubSubEvent, PubSubSide, RedisPubSub
from .redisconn import (
    REDIS_ERRORS,
    REDIS_FAILURES,
    close_client,
    is_cluster,
    is_fakeredis,
    is_sentinel_url,
    make_fake_db,
    one_connection_client,
    sentinel_client,
)
from .rpc import NoReplySkip, Popped, RpcSide

__all__ = [
    "Broker",
    "RedisBroker",
    "PubSubConn",
    "RedisPubSub",
    "Popped",
    "PubSubEvent",
    "calls_key",
    "call_timeout_key",
    "results_key",
    "result_timeout_key",
    "call_slot",
    "CallPopper",
]

logger = logging.getLogger(__name__)

#: How long a listener's connection may take to connect and to answer its handshake when the
#: client says nothing (its ``socket_connect_timeout``), in seconds.
CONNECT_TIMEOUT = 5.0

#: On a Redis Cluster, the least time between two refreshes of the cluster client's slot map
#: that juggler's listeners ask for (:meth:`RedisBroker.refresh_slots`), in seconds: a failover
#: is found by the first refresh after the promotion, whatever the number of listeners.
SLOT_REFRESH_INTERVAL = 0.2

#: How long a send on a results listener's connection may wait for redis to take the bytes
#: (a redis that stalls with its buffers full), in seconds: past it the connection counts as
#: failed, its unanswered calls get their NACK and the listener takes a new one.
SEND_TIMEOUT = 0.75


class PubSubConn(Protocol):
    """One redis pub-sub connection's subscriptions."""

    def subscribe(self, channel: str, pattern: bool, timeout: Optional[float] = None) -> None: ...

    def unsubscribe(self, channel: str, pattern: bool, timeout: Optional[float] = None) -> None: ...

    def connect(self) -> None: ...

    def restore(self, keys: Iterable[tuple[bool, str]], done: Callable[[], None]) -> None: ...

    def get_event(self, timeout: Optional[float]) -> Optional[PubSubEvent]: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


class Broker(Protocol):
    """What servers and callees need from a broker."""

    def store_call(self, payload: CallPayload, timeout: float) -> None: ...

    def pop_call(self, uris: Sequence[str], block: float) -> Optional[Popped]: ...

    def store_result(self, payload: ResultPayload, timeout: float) -> None: ...

    def pop_result(self, conn_uuid: str, block: Optional[float]) -> Optional[Popped]: ...

    def wake_results(self, conn_uuid: str) -> None: ...

    def discard_results(self, conn_uuid: str) -> None: ...

    def publish(self, channel: str, payload: EventPayload) -> int: ...

    def publish_history(self, channel: str, payload: EventPayload, rule: HistoryRule) -> tuple[int, Position]: ...

    def read_history(self, channel: str, rule: HistoryRule, since: Optional[Position]) -> HistoryRead: ...

    def pubsub(self, confirm_timeout: float = 5.0) -> PubSubConn: ...

    def dedicated(self, key: Optional[str] = None) -> "Broker": ...

    def interrupt(self) -> None: ...

    def call_groups(self, uris: Sequence[str]) -> list[list[str]]: ...

    def close(self) -> None: ...


class RedisBroker(RpcSide, PubSubSide):
    """A :class:`Broker` on a redis-py client: :class:`redis.Redis` (or a fakeredis one), or
    :class:`redis.cluster.RedisCluster`.

    ``call_cap`` caps each URI's call list and ``result_cap`` each connection's result list;
    0 means no cap. A request over a cap gets NACK 500 "list capacity exceeded".
    ``max_args_size`` (bytes, default 64 KiB; 0: no limit) is the largest args of a call it
    stores, as JSON: a call over it raises :class:`~juggler.exceptions.PayloadTooLarge`
    (NACK 413) and nothing reaches redis.
    The client is passed in and never closed by the broker: its owner closes it.

    A ``RedisCluster`` client takes a node connection from that node's pool for each command
    and gives it back after it; so its node pools must not be capped below the number of
    blocking listeners (one per websocket, one per callee worker) plus the requests in
    flight. redis-py's default pool has no cap; do not give it a ``BlockingConnectionPool``
    class either: in redis-py 8 that pool races with the cluster client's handling of a
    failed node and breaks connections other threads are using.
    """

    def __init__(self, client: Any, call_cap: int = 0, result_cap: int = 0, max_args_size: int = 64 * 1024) -> None:
        if call_cap < 0 or result_cap < 0 or max_args_size < 0:
            raise ValueError("call_cap, result_cap and max_args_size must be >= 0 (0: no cap)")
        self.client = client
        self.call_cap = call_cap
        self.max_args_size = max_args_size
        self.result_cap = result_cap
        #: Whether the client is a ``RedisCluster``.
        self.cluster = isinstance(client, RedisCluster)
        self._owns_client = False
        self._pubsub_turn = itertools.count()  # on a cluster: the node of the next pubsub()
        # The fast path (juggler.resp) for the per-call commands, where it applies: the shared
        # broker's short commands go through a pool of its own connections; a dedicated
        # (listener) broker blocks on one connection of its own.
        self._fast = resp.RespPool(client) if not self.cluster and resp.RespPool.applies(client) else None
        if is_fakeredis(client):
            make_fake_db(client)
        self._dedicated = False
        # A listener's own connection: the replies it waits for, in order (_AWAIT_*, or for a
        # call stored ahead its callback and when it was sent), and whether a BRPOP is among
        # them.
        # Both change under _own_lock, which also orders the writes of the two threads that
        # may send on it (see store_call_ahead).
        self._expect: deque[Any] = deque()
        self._brpop_sent = False
        self._ahead = False  # follow_calls(): calls may be stored on the listener's connection
        self._interrupted = False  # interrupt(): no more blocking reads
        self._interrupt_why = ""
        self._reconnected = -math.inf  # when a listener last replaced its idle connection
        #: How long redis may take to answer a call stored ahead before its connection counts
        #: as failed: the socket timeout of the client a listener was made from (30 s with
        #: :meth:`from_url`); ``None``: no limit. The listener's own read cannot have one (it
        #: may wait in a BRPOP for ever): its owner watches :meth:`unanswered_since`.
        self.reply_timeout: Optional[float] = None
        self._cluster_node = False  # a dedicated broker on one node of a cluster
        self._parent: Optional[RedisBroker] = None  # (then) the cluster's broker it was made from
        #: A listener on a cluster node: its last failure was a reply of its node (``MOVED``,
        #: ``ASK``, ``UNBLOCKED``): redis answers, the key's slot is elsewhere or moving.
        self.moved = False
        self._node = ""  # (then) its node, "host:port"
        self._refresh_lock = threading.Lock()  # a cluster's broker: one slot map refresh at a time
        self._refreshed_at = -math.inf  # when the last one ended
        self._tls = False  # its connections are TLS (one SSL object: one thread at a time)
        #: A results listener's view of its connection's calls in flight: ``msg_uuid`` to
        #: ``time.monotonic()`` deadline (see :meth:`pop_result`); ``None``: not known.
        self.call_deadlines: Optional[Mapping[str, float]] = None
        self._own: Optional[resp.RespConnection] = None
        # Guards _own, _expect, _brpop_sent and the fields below, never held while waiting on
        # a socket (the server's timer takes it: see unanswered_since, interrupt, abandon).
        self._own_lock = threading.Lock()
        # The reader is sending a call stored ahead on _own (outside the lock): the listener
        # does not close that connection meanwhile, it leaves it here for the sender to close
        # (a raw descriptor must never be used after its socket may have been closed).
        self._sending = False
        self._close_after_send: Optional[resp.RespConnection] = None
        self._abandon_why = ""  # abandon(): why the connection was given up
        self._key: Optional[str] = None  # a dedicated broker's key (dedicated())
        # shared by a broker and its dedicated listeners: whether redis was found not to leave
        # replies out as asked (CLIENT REPLY SKIP; RpcSide._probed): no listener asks again
        self._no_reply_skip = NoReplySkip()
        #: The process' :class:`~juggler.health.RedisHealth` a results listener reports to (set
        #: by its owner): a connection made while it says redis is down is reported as redis
        #: back once redis answered a command on it. ``None``: nobody to tell.
        self.health: Optional[RedisHealth] = None

    def __repr__(self) -> str:
        return (f"RedisBroker({self.client!r}, call_cap={self.call_cap}, result_cap={self.result_cap}, "
                f"max_args_size={self.max_args_size})")

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        call_cap: int = 0,
        result_cap: int = 0,
        max_args_size: int = 64 * 1024,
        max_connections: Optional[int] = None,
        cluster: Optional[bool] = False,
        **redis_options: Any,
    ) -> "RedisBroker":
        """A broker on a new client for ``url``, made the way juggler needs it; ``close()``
        closes it.

        Its pool is a ``BlockingConnectionPool`` of ``max_connections`` (default 64: a burst
        of requests waits for a connection, up to 5 s, instead of failing), connects and reads
        time out (5 s, 30 s) and a failed command is retried twice within about 0.2 s, so a
        redis outage turns into a prompt NACK rather than a hang. The commands that must not
        run twice (storing a call or a result, PUBLISH) are never retried: their reply can be
        lost after redis ran them. ``redis_options`` override
        these and go to ``redis.BlockingConnectionPool.from_url``.

        ``cluster=True``: ``url`` is any node of a Redis Cluster (the others are discovered
        now, so an unreachable cluster raises :class:`BrokerError`). The client is a
        ``RedisCluster`` with the same timeouts and retries (applied by the cluster client,
        which refreshes its view of the topology between attempts) and redis-py's uncapped
        node pools (see the class docstring); ``max_connections`` does not apply.
        ``cluster=None`` asks the server at ``url`` (``INFO cluster``), so it too raises
        :class:`BrokerError` when redis cannot be reached.

        ``redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service_name[/db]``
        (``rediss+sentinel://`` for TLS): the master that these sentinels monitor as
        ``service_name``, found by redis-py's ``Sentinel`` at each new connection, so that
        after a failover the connections go to the new master (see
        :func:`~juggler.redisconn.parse_sentinel_url`). Its pool is capped and blocking as
        above; ``cluster=True`` does not apply. A malformed URL raises :class:`ValueError`.
        """
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        options: dict[str, Any] = {
            "socket_connect_timeout": 5.0,
            "socket_timeout": 30.0,
            "retry": Retry(ExponentialBackoff(cap=0.1, base=0.05), 2),
        }
        options.update(redis_options)
        sentinel = is_sentinel_url(url)
        if sentinel and cluster:
            raise ValueError("a redis+sentinel:// URL names a master behind Sentinel, not a Redis Cluster")
        if cluster is None:
            cluster = not sentinel and is_cluster(url, options)
        if cluster:
            if max_connections is not None:
                raise ValueError("max_connections does not apply to a Redis Cluster: its node pools are not capped")
            try:
                client: Any = RedisCluster.from_url(url, **options)
            except REDIS_ERRORS as exc:
                raise BrokerError(f"cannot reach redis cluster at {url}: {exc}") from exc
        else:
            options = {"max_connections": 64 if max_connections is None else max_connections, "timeout": 5.0, **options}
            if sentinel:
                client = sentinel_client(url, **options)
            else:
                client = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(url, **options))
        broker = cls(client, call_cap=call_cap, result_cap=result_cap, max_args_size=max_args_size)
        broker._owns_client = True
        return broker

    def dedicated(self, key: Optional[str] = None) -> "RedisBroker":
        """A broker for one blocking listener, on a redis connection of its own; ``close()``
        it when done. ``key`` is the key it will block on (on a cluster: its node).

        A BRPOP holds its connection for as long as it blocks: taking it from the shared
        pool would let a few hundred websockets exhaust the pool and fail everyone's requests.
        The listener's connection has no socket timeout (a blocking read waits for as long as
        it must, with TCP keepalive to notice a dead peer) and no retries (a read woken on
        purpose, see :meth:`interrupt`, must not be sent again). On a cluster it is a plain
        connection to the node that serves ``key``; when that node fails or moves the key's
        slot, :meth:`follow_slot` finds its new node.
        """
        node = None
        if self.cluster:
            cluster = self.client
            node = cluster.get_node_from_key(key) if key is not None else cluster.get_default_node()
            base = cluster.get_redis_connection(node)
        else:
            base = self.client
        other = RedisBroker(one_connection_client(base, blocking=True), self.call_cap, self.result_cap, self.max_args_size)
        other._owns_client = True
        other._dedicated = True
        other._key = key
        other._no_reply_skip = self._no_reply_skip
        other._cluster_node = self.cluster  # (a call's keys may live on another node)
        if node is not None:
            other._parent = self
            other._node = node.name
        pool = getattr(base, "connection_pool", None)
        if pool is not None:
            other.reply_timeout = pool.connection_kwargs.get("socket_timeout")
            other._tls = issubclass(pool.connection_class, redis.connection.SSLConnection)
        return other

    # -- Redis Cluster: finding a key's node again --

    def refresh_slots(self) -> None:
        """Refresh this cluster broker's view of the cluster (the client's slot map: redis-py's
        ``nodes_manager.initialize()``), for a listener whose node failed: after a failover it
        names the promoted replica. At most once per :data:`SLOT_REFRESH_INTERVAL`, by one
        thread at a time: a caller that finds one running, or done within the interval, goes
        on with the map as it is (a refresh may wait for a node that stalls, up to the client's
        socket timeout). A refresh that fails leaves the map as it was (logged at debug
        level). Nothing on a standalone redis."""
        if not self.cluster or time.monotonic() - self._refreshed_at < SLOT_REFRESH_INTERVAL:
            return
        if not self._refresh_lock.acquire(blocking=False):
            return
        try:
            if time.monotonic() - self._refreshed_at < SLOT_REFRESH_INTERVAL:
                return
            try:
                self.client.nodes_manager.initialize()
            except REDIS_FAILURES as exc:
                logger.debug("refreshing the redis cluster's slot map failed: %s", exc)
            self._refreshed_at = time.monotonic()
        finally:
            self._refresh_lock.release()

    def redirected(self, error: BaseException) -> bool:
        """Whether ``error`` (an error reply of a cluster node, as redis-py's or the fast
        path's exception) is ``MOVED`` or ``ASK``: the key's slot is served by another node
        now, or is migrating. ``MOVED`` names the slot's node: the slot map takes it at once;
        ``ASK`` asks for a refresh (:meth:`refresh_slots`). On a cluster's broker."""
        if isinstance(error, redis.exceptions.AskError):  # (MovedError is one)
            kind = "MOVED" if isinstance(error, redis.exceptions.MovedError) else "ASK"
            where = f"{error.slot_id} {error.host}:{error.port}"
        elif isinstance(error, redis.exceptions.ResponseError):
            kind, _, where = str(error).partition(" ")
            if kind not in ("MOVED", "ASK"):
                return False
        else:
            return False
        if not self.cluster:
            return True
        manager = self.client.nodes_manager
        try:
            if kind == "MOVED" and hasattr(manager, "move_slot"):
                manager.move_slot(redis.exceptions.MovedError(where))
                return True
        except (ValueError, *REDIS_FAILURES) as exc:  # (a reply that is not "SLOT HOST:PORT")
            logger.debug("could not take %s %s into the slot map: %s", kind, where, exc)
        self.refresh_slots()
        return True

    def follow_slot(self, refresh: bool = True) -> bool:
        """A listener on one node of a cluster (:meth:`dedicated`), whose node failed or
        answered ``MOVED``: look up the node that serves its key now, in the cluster client's
        slot map (refreshed first with ``refresh``, see :meth:`refresh_slots`); when it is
        another one, the listener's connection goes there from now on (the current one is
        closed, as after a failure). Whether the node changed. On the listener's thread."""
        parent, key = self._parent, self._key
        if parent is None or key is None:
            return False
        if refresh:
            parent.refresh_slots()
        try:
            node = parent.client.get_node_from_key(key)
            if node is None or node.name == self._node:
                return False
            client = one_connection_client(parent.client.get_redis_connection(node), blocking=True)
        except REDIS_FAILURES as exc:  # (a slot no node serves in the map, for now)
            logger.debug("looking up the redis cluster node of %s failed: %s", key, exc)
            return False
        with self._own_lock:
            own = self._own
            old, self.client = self.client, client
            self._node = node.name
        if own is not None:
            self._lose_own(own, BrokerError(f"redis unavailable: {key} is now on redis node {node.name}"))
        close_client(old)
        return True

    def slot_moved(self) -> bool:
        """Whether the cluster client's slot map, as it is now, puts this (dedicated) broker's
        key on another node than its own: :meth:`follow_slot` would move it."""
        parent, key = self._parent, self._key
        if parent is None or key is None:
            return False
        try:
            node = parent.client.get_node_from_key(key)
        except REDIS_FAILURES:
            return False
        return node is not None and node.name != self._node

    def _moved_error(self, exc: BaseException) -> Optional[BrokerError]:
        """A listener on a cluster node whose command got ``MOVED`` or ``ASK`` (the slot map is
        told: :meth:`redirected`), or ``UNBLOCKED`` (its node became a replica): the error is
        redis unavailable (the listener connects again, to the key's node), not a refusal that
        would end it, and :attr:`moved` says the node answered. ``None`` for another error."""
        parent = self._parent
        self.moved = parent is not None and (parent.redirected(exc) or str(exc).startswith("UNBLOCKED"))
        if not self.moved:
            return None
        return BrokerError(f"redis unavailable: redis node {self._node} no longer serves {self._key} ({exc})")

    def interrupt(self, why: str = "") -> None:
        """Wake a blocking read of this (dedicated) broker from another thread, by shutting its
        socket down: the read fails with :class:`BrokerError` (saying ``why``, when given),
        and so does any later one on the fast path. How a listener that :meth:`follow_calls`
        is stopped (it may wait with no BRPOP for :meth:`wake_results` to answer); for the
        others, a fallback for when :meth:`wake_results` cannot reach redis."""
        with self._own_lock:  # (a shutdown does not wait; under the lock, no close races it)
            self._interrupted = True
            self._interrupt_why = why
            if self._own is not None:
                self._own.interrupt()
        pool = getattr(self.client, "connection_pool", None)
        if pool is None:
            return
        for conn in list(getattr(pool, "_in_use_connections", ())):
            sock = getattr(conn, "_sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except Exception:  # (fakeredis' stand-in socket raises ValueError mid-read)
                    pass

    def abandon(self, why: str) -> None:
        """Give up on this (dedicated) broker's connection, from another thread, without
        stopping its listener: a read blocked on it fails with :class:`BrokerError`
        ``redis unavailable: <why>``, so do the calls stored ahead that redis has not answered
        yet, and the listener's next :meth:`pop_result` takes a new connection. For a
        watchdog that saw redis not answer in time (:meth:`unanswered_since`). Never waits."""
        with self._own_lock:
            if self._own is not None:
                self._abandon_why = why
                self._own.interrupt()

    def close(self) -> None:
        """Close the client if this broker made it (:meth:`from_url`, :meth:`dedicated`), and
        the fast path's connections."""
        with self._own_lock:
            own, self._own = self._own, None
            later = self._take_later(own) if own is not None else b""
        if own is not None:
            if later:  # the timeout key of the last result handed over: taken now, not left to expire
                try:
                    own.send_packed(later)  # (with CLIENT REPLY SKIP: no reply to wait for)
                except Exception as exc:  # (redis gone: the key expires with its call)
                    logger.debug("could not take a result's timeout key before closing: %s", exc)
            own.close()
        if self._fast is not None:
            self._fast.close()
        self._close_publishing()
        if self._owns_client:
            close_client(self.client)

    def call_groups(self, uris: Sequence[str]) -> list[list[str]]:
        """``uris`` split into groups that one :meth:`pop_call` can wait on together.

        One group on a standalone redis; on a cluster, one group per hash slot, since a
        ``BRPOP`` may only name keys of one slot. In order of first appearance.
        """
        if not self.cluster:
            return [list(uris)] if uris else []
        groups: dict[int, list[str]] = {}
        for uri in uris:
            groups.setdefault(call_slot(uri), []).append(uri)
        return list(groups.values())

    def call_popper(self, uris: Sequence[str], refresh: bool = False) -> "CallPopper":
        """A :class:`CallPopper` for one callee worker serving ``uris`` (one of
        :meth:`call_groups`); ``close()`` it when done. Raises :class:`BrokerError` when redis
        cannot be reached. ``refresh``: on a cluster, the worker's node failed: refresh the
        slot map first (:meth:`refresh_slots`)."""
        return CallPopper(self, uris, refresh)

    # -- RPC --

    def _on_fast(self, use: Callable[[resp.RespConnection], Any], within: Optional[float] = None) -> Any:
        """``use(connection)`` on the fast path: the dedicated connection, or one from the
        pool (``within``: see :meth:`resp.RespPool.get`)."""
        if self._dedicated:
            # (replies a results listener left in flight would answer this command: start over)
            return use(self._own_connection(fresh=bool(self._expect)))
        assert self._fast is not None
        conn = self._fast.get(within)
        try:
            return use(conn)
        finally:
            self._fast.put(conn)

    def _own_connection(self, fresh: bool = False) -> resp.RespConnection:
        """A dedicated broker's connection: a new one when there is none, it broke, or
        ``fresh`` (the old one is closed, and what it still awaited fails).

        The new connection's handshake may wait for redis no longer than the connect timeout
        (a redis that stalls must not hold a listener that its owner wants to stop); after
        it, reads wait for as long as they must, and sends at most :data:`SEND_TIMEOUT`. While
        :attr:`health` says redis is down, redis must first answer a command on its key there
        (``EXISTS``: a redis still loading its data, a cluster node still down, answer an error),
        and then it is reported back."""
        with self._own_lock:
            own = self._own
            if own is not None and not own.broken and not fresh:
                return own
        if own is not None:
            self._lose_own(own, BrokerError("redis unavailable: its connection was replaced"))
        health = self.health
        # (taken before the connect: a connect alone proves nothing, the kernel of a stopped
        # redis accepts it; its EXISTS, sent after the failure was recorded, does)
        since = health.epoch if health is not None and not health.up else None
        kwargs = getattr(getattr(self.client, "connection_pool", None), "connection_kwargs", {})
        made = resp.connect(self.client, socket_timeout=kwargs.get("socket_connect_timeout") or CONNECT_TIMEOUT)
        assert made is not None
        try:
            if since is not None:
                made.command(*(("EXISTS", self._key) if self._key is not None else ("PING",)))
            made.set_timeouts(None, SEND_TIMEOUT)
        except BaseException:
            made.close()
            raise
        with self._own_lock:
            if self._interrupted:  # (interrupted while it connected: nothing to wake it later)
                made.close()
                raise redis.exceptions.ConnectionError("the listener was interrupted")
            self._own = made
            self._expect.clear()
            self._brpop_sent = False
        if health is not None and since is not None:
            health.succeeded(since)
        return made

    def _lose_own(self, own: Optional[resp.RespConnection], error: BrokerError) -> None:
        """Drop the listener's connection ``own`` (on the listener's thread): what it still
        awaited is given up, each call stored ahead and unanswered gets ``error``; it is
        closed now, or by the reader once that is done sending on it."""
        with self._own_lock:
            if own is not None and self._own is own:
                self._own = None
            left, self._expect = self._expect, deque()
            self._brpop_sent = False
            self._abandon_why = ""
            if own is not None and self._sending:
                own.interrupt()  # (a shutdown: its descriptor stays open for the sender)
                self._close_after_send, own = own, None
        if own is not None:
            own.close()
        for kind in left:  # the calls whose store is unanswered: each gets its NACK
            if type(kind) is tuple:
                kind[0](error)
        if self.before_wait is not None:  # (those NACKs go out before the listener connects or waits)
            self.before_wait()

    def _command(self, *args: Any) -> Any:
        """One command on the fast path."""
        return self._on_fast(lambda conn: conn.command(*args))

    def _eval(self, script: resp.Script, keys: list[str], args: list[Any], within: Optional[float] = None,
              integer: bool = False) -> Any:  # fmt: skip
        """Run a Lua script, sent once (EVALSHA, then EVAL on NOSCRIPT): on the fast path, or
        with :meth:`_once`. ``within``: its reply awaited that long at most, on the fast path
        (:meth:`resp.RespConnection.command_within`); ``integer``: the reply must be one."""
        if self._fast is None:
            try:
                reply = self._once(keys[0], "EVALSHA", script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                reply = self._once(keys[0], "EVAL", script.source, len(keys), *keys, *args)
            if integer and type(reply) is not int:
                raise redis.exceptions.ConnectionError(f"Protocol error from redis: an integer was due, not {reply!r:.60}")
            return reply
        if integer:
            return self._on_fast(lambda conn: conn.integer(conn.evalsha(script, keys, args, within)), within)
        return self._on_fast(lambda conn: conn.evalsha(script, keys, args, within), within)

    def _once(self, key: str, *command: Any) -> Any:
        """Run ``command`` on the redis of ``key``, sent once: redis-py's retries would send it
        again when its reply is lost, and it may have run (a store script run twice stores a
        call or result twice, a PUBLISH twice sends its event twice). The fast path never
        re-sends either."""
        client = self.client
        if self.cluster:
            # One attempt of the cluster client: it follows MOVED and ASK (the command did not
            # run) and refreshes its view of the cluster on a connection error, then raises;
            # its public execute_command would retry that attempt.
            return client._execute_command(client.get_node_from_key(key), *command)
        pool = client.connection_pool
        try:
            conn = pool.get_connection()
        except TypeError:  # redis-py < 5.3 wants a command name
            conn = pool.get_connection(command[0])
        try:
            conn.send_command(*command)
            return conn.read_response()
        except redis.exceptions.ResponseError:
            raise
        except BaseException:
            conn.disconnect()  # a reply may still be on its way: the connection is unusable
            raise
        finally:
            pool.release(conn)

    def ping(self) -> bool:
        """Whether redis answers (on a cluster: the cluster client's default node)."""
        try:
            return bool(self.client.ping())
        except REDIS_FAILURES:
            return False
