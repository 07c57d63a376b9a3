"""The redis broker: calls, results and pub-sub, in the redis layout of juggler.0.

:class:`RedisBroker` is the one implementation; :class:`Broker` is the interface a
:class:`~juggler.server.Server` and a :class:`~juggler.callee.Callee` need, so a server can use
one broker for RPC and another (another redis) for pub-sub.

Keys (the braces are literal: redis cluster hash tags, so a script's keys share a slot)::

    juggler:calls:{URI}                         list of pending call payloads
    juggler:calls:timeout:{URI}:MSGUUID         expires with the call
    juggler:results:{CONNUUID}                  list of results for one connection
    juggler:results:timeout:{CONNUUID}:MSGUUID  expires with the result

Unlike the reference, the lists themselves carry a TTL that is never shorter than the
longest timeout pushed into them, so calls to a URI that no callee serves, and results for a
connection that is gone, do not stay in redis forever.

The client may be a ``redis.Redis`` or a ``redis.cluster.RedisCluster``: on Redis Cluster every
command and script touches keys of one slot (the hash tag is the URI or the connection's
uuid), a callee pops its URIs one slot group at a time (:meth:`RedisBroker.call_groups`), and
pub-sub runs on plain connections to one node each (``PUBLISH`` reaches every node).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import logging
import math
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Union

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster, key_slot
from redis.retry import Retry

from . import gilsend, resp
from .exceptions import BrokerError, CapacityExceeded, PayloadTooLarge
from .frames import OP_TEXT, frame_header
from .message import CallPayload, EventPayload, Evnt, ResultPayload, encode_payload, new_uuid

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
]

logger = logging.getLogger("juggler.broker")

CAPACITY_ERROR = "list capacity exceeded"


def calls_key(uri: str) -> str:
    return f"juggler:calls:{{{uri}}}"


def call_timeout_key(uri: str, msg_uuid: str) -> str:
    return f"juggler:calls:timeout:{{{uri}}}:{msg_uuid}"


def results_key(conn_uuid: str) -> str:
    return f"juggler:results:{{{conn_uuid}}}"


def result_timeout_key(conn_uuid: str, msg_uuid: str) -> str:
    return f"juggler:results:timeout:{{{conn_uuid}}}:{msg_uuid}"


def call_slot(uri: str) -> int:
    """The Redis Cluster hash slot of ``uri``'s call list (and of its calls' timeout keys)."""
    return key_slot(calls_key(uri).encode("utf-8"))


# What redis-py raises when redis fails: RedisClusterException (a node cannot be reached while
# the topology is refreshed, keys in different slots) does not derive from RedisError.
_REDIS_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)

# redis-py can also fail with OSError, ValueError or AttributeError while it reads or writes,
# when one thread disconnects a connection another thread is using (a family of known
# redis-py races; seen in our tests with redis-py 8.1, a BlockingConnectionPool per cluster
# node, and a node that went down). For juggler that is a redis failure like any other: the
# request gets a NACK or the listener's connection is closed, never a thread lost.
_REDIS_FAILURES = _REDIS_ERRORS + (OSError, ValueError, AttributeError)


def _broker_error(exc: BaseException) -> BrokerError:
    """The :class:`BrokerError` for an exception raised by a redis-py call."""
    if isinstance(exc, redis.exceptions.ResponseError) and not isinstance(exc, redis.exceptions.ClusterDownError):
        if CAPACITY_ERROR in str(exc):
            return CapacityExceeded(CAPACITY_ERROR)
        return BrokerError(f"redis error: {exc}")
    if isinstance(exc, redis.exceptions.RedisClusterException) and "same key slot" in str(exc):
        # refused by the cluster client itself: a URI that starts with '}' has an empty hash
        # tag, so its call list and timeout keys hash to different slots
        return BrokerError(f"redis error: {exc}")
    if not isinstance(exc, _REDIS_ERRORS):
        logger.warning("the redis client failed unexpectedly (taken as redis unavailable)", exc_info=exc)
        return BrokerError(f"redis unavailable: connection broken ({type(exc).__name__}: {exc})")
    return BrokerError(f"redis unavailable: {exc}")


# KEYS[1] timeout key, KEYS[2] list; ARGV[1] timeout in ms, ARGV[2] payload, ARGV[3] capacity
# (0: none). The element just pushed is trimmed off again when the list is over capacity. The
# list's own TTL is raised (never lowered) to the timeout, so an unconsumed list goes away once
# every element in it has expired. A list that exists without a TTL was filled by a server that
# does not set one (the Go reference): it is left alone, so none of its calls expire early.
STORE_SCRIPT = """
local before = redis.call('PTTL', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[1])
local n = redis.call('LPUSH', KEYS[2], ARGV[2])
local cap = tonumber(ARGV[3])
if cap > 0 and n > cap then
  redis.call('LTRIM', KEYS[2], 1, -1)
  redis.call('DEL', KEYS[1])
  return redis.error_reply('list capacity exceeded')
end
local ms = tonumber(ARGV[1])
if before == -2 or (before >= 0 and before < ms) then
  redis.call('PEXPIRE', KEYS[2], ms)
end
return n
"""

#: How much time a call must have left, by its connection's own count, for its result to be
#: handed over before redis has answered the script that takes the result's timeout key
#: (:meth:`RedisBroker.pop_result`). The key expires with the call, at or after that count.
RESULT_SURE_MARGIN = 0.05

#: How long after a call's deadline (by its connection's count) a results listener that
#: stores its connection's calls (:meth:`RedisBroker.follow_calls`) keeps a BRPOP waiting for
#: its result: redis expires the call a little after that count, which is taken first.
AWAIT_GRACE = 1.0

# what a listener's own connection waits for (RedisBroker._expect), beside a callback for a
# call stored ahead: a BRPOP's reply, a timeout-key script's reply to drop, or one to read
_AWAIT_BRPOP, _AWAIT_SKIP, _AWAIT_TTL = "brpop", "skip", "ttl"

#: Pushed onto a connection's results list to wake its listener (:meth:`RedisBroker.wake_results`);
#: never a result payload, which is a JSON object.
WAKE_MARKER = b"juggler:wake"

# KEYS[1] timeout key. Returns its remaining ms (<= 0: expired or missing) and deletes it.
CONSUME_SCRIPT = """
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
return ttl
"""

_STORE = resp.Script(STORE_SCRIPT)
_CONSUME = resp.Script(CONSUME_SCRIPT)


# A callee worker's batch pop. KEYS: the call lists of the worker's URIs (one slot on a
# cluster); ARGV[1] how many calls to return at most, ARGV[2] a payload the worker already took
# off a list with BRPOP ('' for none), ARGV[3..] the URIs whose timeout keys it may consume.
# Pops further payloads (RPOP, lists in order, as BRPOP picks them) and, for each payload whose
# uri is one of ARGV[3..], reads the PTTL of its timeout key and deletes it, as CONSUME_SCRIPT
# does for one. Returns payload, ttl, payload, ttl, ...; ttl -3 means "not consumed" (the
# payload is not JSON Lua can read, or names another URI): the caller decides.
POP_CALLS_SCRIPT = """
local out = {}
local ours = {}
for i = 3, #ARGV do ours[ARGV[i]] = true end
local function take(payload)
  local ok, call = pcall(cjson.decode, payload)
  local ttl = -3
  if ok and type(call) == 'table' and type(call.uri) == 'string' and type(call.msg_uuid) == 'string'
      and ours[call.uri] then
    local key = 'juggler:calls:timeout:{' .. call.uri .. '}:' .. call.msg_uuid
    ttl = redis.call('PTTL', key)
    redis.call('DEL', key)
  end
  out[#out + 1] = payload
  out[#out + 1] = ttl
end
if ARGV[2] ~= '' then take(ARGV[2]) end
local n = tonumber(ARGV[1])
local i = 1
while #out < 2 * n and i <= #KEYS do
  local payload = redis.call('RPOP', KEYS[i])
  if payload then take(payload) else i = i + 1 end
end
return out
"""


@dataclass(frozen=True)
class Popped:
    """A call or result taken off its list, with the seconds it has left (<= 0: expired)."""

    payload: Union[CallPayload, ResultPayload]
    remaining: float

    @property
    def expired(self) -> bool:
        return self.remaining <= 0


@dataclass(frozen=True)
class PubSubEvent:
    """An event read from a pub-sub connection."""

    channel: str
    pattern: str
    payload: EventPayload

    @functools.cached_property
    def evnt_payload(self) -> str:
        """The JSON of the EVNT payload every subscriber of this event gets: made once (see
        :meth:`~juggler.message.Evnt.sharing`)."""
        return encode_payload(Evnt(self.payload.msg_uuid, self.channel, self.payload.args, self.pattern, uuid=""))

    @functools.cached_property
    def evnt_frame(self) -> tuple[bytes, bytes, int]:
        """``(head, tail, size)``: the websocket frame of this event's EVNT is ``head``, the
        message's 36-character UUID, then ``tail``; ``size`` is the EVNT's JSON length. The
        same bytes as :func:`~juggler.message.encode` and
        :func:`~juggler.frames.encode_frame` make, built once for every subscriber."""
        before = b'{"meta":{"type":10,"uuid":"'
        after = b'"},"payload":' + self.evnt_payload.encode("utf-8") + b"}"
        size = len(before) + 36 + len(after)
        return frame_header(OP_TEXT, size) + before, after, size


class PubSubConn(Protocol):
    """One redis pub-sub connection's subscriptions."""

    def subscribe(self, channel: str, pattern: bool) -> None: ...

    def unsubscribe(self, channel: str, pattern: bool) -> None: ...

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

    def pubsub(self, confirm_timeout: float = 5.0) -> PubSubConn: ...

    def dedicated(self, key: Optional[str] = None) -> "Broker": ...

    def interrupt(self) -> None: ...

    def call_groups(self, uris: Sequence[str]) -> list[list[str]]: ...

    def close(self) -> None: ...


def _ms(seconds: float) -> int:
    """Whole milliseconds for a PX, at least 1."""
    return max(1, int(math.ceil(seconds * 1000)))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _result_payload(popped: Optional[bytes]) -> Optional[ResultPayload]:
    """The result a results list gave, or ``None``: nothing came, a wake-up marker, or a
    payload that cannot be decoded (logged, and dropped)."""
    if popped is None or popped == WAKE_MARKER:
        return None
    try:
        return ResultPayload.from_json(popped)
    except ValueError as exc:
        logger.warning("dropping undecodable result payload: %s", exc)
        return None


def _check_skipped(reply: Any, conn_uuid: str) -> None:
    """The reply of the timeout-key script of a result handed over before it came (see
    :meth:`RedisBroker.pop_result`): an error, or a key that was already gone (evicted by
    ``maxmemory``, lost in a failover), is worth a line in the log."""
    if isinstance(reply, Exception):
        logger.warning("connection %s: taking a result's timeout key failed: %s", conn_uuid, reply)
    elif isinstance(reply, int) and reply <= 0:
        logger.info("connection %s: a result was handed over whose timeout key redis no longer had", conn_uuid)


def _is_fakeredis(client: Any) -> bool:
    pool = getattr(client, "connection_pool", None)
    return pool is not None and pool.connection_class.__module__.startswith("fakeredis")


def _make_fake_db(client: Any) -> None:
    """fakeredis makes a server's database the first time a connection asks for it, with no
    lock: connections made at once on a fresh server (a callee's workers starting together)
    could each make one of their own and never see each other's writes, so a worker's BRPOP
    never saw its wake-up marker and stop() waited forever. One command here, on one thread,
    makes it before any of them. (A server that is down stays so: nothing is made.)"""
    try:
        client.ping()
    except _REDIS_FAILURES:
        pass


class RedisBroker:
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
        if _is_fakeredis(client):
            _make_fake_db(client)
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
        self._tls = False  # its connections are TLS (one SSL object: one thread at a time)
        #: A results listener's view of its connection's calls in flight: ``msg_uuid`` to
        #: ``time.monotonic()`` deadline (see :meth:`pop_result`); ``None``: not known.
        self.call_deadlines: Optional[Mapping[str, float]] = None
        self._own: Optional[resp.RespConnection] = None
        self._own_lock = threading.Lock()

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
        """
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        options: dict[str, Any] = {
            "socket_connect_timeout": 5.0,
            "socket_timeout": 30.0,
            "retry": Retry(ExponentialBackoff(cap=0.1, base=0.05), 2),
        }
        options.update(redis_options)
        if cluster is None:
            cluster = _is_cluster(url, options)
        if cluster:
            if max_connections is not None:
                raise ValueError("max_connections does not apply to a Redis Cluster: its node pools are not capped")
            try:
                client: Any = RedisCluster.from_url(url, **options)
            except _REDIS_ERRORS as exc:
                raise BrokerError(f"cannot reach redis cluster at {url}: {exc}") from exc
        else:
            options = {"max_connections": 64 if max_connections is None else max_connections, "timeout": 5.0, **options}
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
        connection to the node that serves ``key``.
        """
        if self.cluster:
            cluster = self.client
            node = cluster.get_node_from_key(key) if key is not None else cluster.get_default_node()
            base = cluster.get_redis_connection(node)
        else:
            base = self.client
        other = RedisBroker(_one_connection_client(base, blocking=True), self.call_cap, self.result_cap, self.max_args_size)
        other._owns_client = True
        other._dedicated = True
        other._cluster_node = self.cluster  # (a call's keys may live on another node)
        pool = getattr(base, "connection_pool", None)
        if pool is not None:
            other.reply_timeout = pool.connection_kwargs.get("socket_timeout")
            other._tls = issubclass(pool.connection_class, redis.connection.SSLConnection)
        return other

    def interrupt(self, why: str = "") -> None:
        """Wake a blocking read of this (dedicated) broker from another thread, by shutting its
        socket down: the read fails with :class:`BrokerError` (saying ``why``, when given),
        and so does any later one on the fast path. How a listener that :meth:`follow_calls`
        is stopped (it may wait with no BRPOP for :meth:`wake_results` to answer); for the
        others, a fallback for when :meth:`wake_results` cannot reach redis."""
        with self._own_lock:
            self._interrupted = True
            self._interrupt_why = why
            own = self._own
        if own is not None:
            own.interrupt()
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

    def close(self) -> None:
        """Close the client if this broker made it (:meth:`from_url`, :meth:`dedicated`), and
        the fast path's connections."""
        with self._own_lock:
            own, self._own = self._own, None
        if own is not None:
            own.close()
        if self._fast is not None:
            self._fast.close()
        if self._owns_client:
            _close_client(self.client)

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

    def call_popper(self, uris: Sequence[str]) -> "CallPopper":
        """A :class:`CallPopper` for one callee worker serving ``uris`` (one of
        :meth:`call_groups`); ``close()`` it when done. Raises :class:`BrokerError` when redis
        cannot be reached."""
        return CallPopper(self, uris)

    # -- RPC --

    def store_call(self, payload: CallPayload, timeout: float) -> None:
        """Queue a call for its URI's callees; it expires after ``timeout`` seconds.
        :class:`~juggler.exceptions.PayloadTooLarge` when its args are over ``max_args_size``."""
        data = self._call_data(payload)
        self._run_store(call_timeout_key(payload.uri, payload.msg_uuid), calls_key(payload.uri), timeout, data, self.call_cap)

    def _call_data(self, payload: CallPayload) -> bytes:
        """The call's payload as stored; :class:`PayloadTooLarge` past ``max_args_size``."""
        data = payload.to_json().encode("utf-8")  # bytes: the command would encode it anyway
        most = self.max_args_size
        if most and len(data) > most:
            # The args may be over: they are the payload less the rest of it and ',"args":'
            # (8 bytes). Measured only for a payload that long: no cost for the others.
            rest = CallPayload(payload.conn_uuid, payload.msg_uuid, payload.uri).to_json()
            size = len(data) - len(rest.encode("utf-8")) - 8
            if size > most:
                raise PayloadTooLarge(f"call args of {size} bytes, over the server's maximum of {most}")
        return data

    def follow_calls(self, deadlines: Mapping[str, float]) -> bool:
        """Make this results listener (a :meth:`dedicated` broker) its connection's way to
        store calls too, where it can (the fast path: not fakeredis, not a cluster, not TLS,
        whose connection one thread at a time may use); whether it can.

        ``deadlines`` is the connection's count of its calls in flight (``msg_uuid`` to
        ``time.monotonic()`` deadline; see :attr:`call_deadlines`), kept by the caller, who
        takes a call out once :meth:`pop_result` has handed its result over. From
        then on :meth:`pop_result` keeps a BRPOP waiting only while a call there may still
        bring a result (until :data:`AWAIT_GRACE` after its deadline), and otherwise waits
        for what :meth:`store_call_ahead` sends; a result for a call it was not told of waits
        in the list until the next call's BRPOP takes it.
        """
        if not self._dedicated or self._fast is None or self._cluster_node or self._tls:
            return False
        self.call_deadlines = deadlines
        self._ahead = True
        return True

    def store_call_ahead(self, payload: CallPayload, timeout: float, done: Callable[[Optional[BrokerError]], None]) -> bool:
        """Store a call on this listener's connection, with the BRPOP for its result in the
        same write, without waiting for redis: the listener's thread reads redis' answer
        inside :meth:`pop_result` and calls ``done(None)`` once the call is stored, or
        ``done(error)`` (a :class:`BrokerError`) if it was not; the call's result can only
        come after that, on the same connection. One write, and no wait on the calling thread.

        ``False`` (nothing sent) when it cannot: not :meth:`follow_calls`, the connection is
        not made yet or broken, or a BRPOP already waits on it (redis would run the call's
        script only once that BRPOP returned): store it with :meth:`store_call` instead.
        :class:`PayloadTooLarge` as :meth:`store_call`.

        If the connection fails first (or its owner, seeing :meth:`unanswered_since` older
        than :attr:`reply_timeout`, calls :meth:`interrupt`), ``done`` gets the error and
        :meth:`pop_result` raises it.
        """
        if not self._ahead:
            return False
        data = self._call_data(payload)
        # (EVAL, not EVALSHA: a NOSCRIPT could not be answered with the BRPOP behind it)
        store = ("EVAL", _STORE.source, 2, call_timeout_key(payload.uri, payload.msg_uuid), calls_key(payload.uri),
                 _ms(timeout), data, self.call_cap)  # fmt: skip
        with self._own_lock:
            own = self._own
            if self._brpop_sent or own is None or own.broken:
                return False
            try:
                own.send([store, ("BRPOP", results_key(payload.conn_uuid), 0)])
            except _REDIS_FAILURES:
                return False  # (broken now: the listener's read fails too, and says so)
            self._expect.extend(((done, time.monotonic()), _AWAIT_BRPOP))
            self._brpop_sent = True
        return True

    def unanswered_since(self) -> Optional[float]:
        """When (``time.monotonic()``) the oldest call stored ahead that redis has not
        answered yet was sent; ``None``: none waits. For a watchdog: the listener itself waits
        for redis with no timeout (see :attr:`reply_timeout`)."""
        with self._own_lock:
            return next((kind[1] for kind in self._expect if type(kind) is tuple), None)

    def _awaiting(self, other_than: str) -> bool:
        """Whether a result may still come: always, unless :meth:`follow_calls`; then whether
        a call of :attr:`call_deadlines` (other than ``other_than``) may still bring one."""
        deadlines = self.call_deadlines
        if not self._ahead or deadlines is None:
            return True
        after = time.monotonic() - AWAIT_GRACE
        for msg_uuid, deadline in list(deadlines.items()):  # (a copy: the reader adds meanwhile)
            if deadline > after and msg_uuid != other_than:
                return True
        return False

    def store_result(self, payload: ResultPayload, timeout: float) -> None:
        """Queue a result for its connection; it expires after ``timeout`` seconds."""
        self._run_store(
            result_timeout_key(payload.conn_uuid, payload.msg_uuid),
            results_key(payload.conn_uuid),
            timeout,
            payload.to_json(),
            self.result_cap,
        )

    def _on_fast(self, use: Callable[[resp.RespConnection], Any]) -> Any:
        """``use(connection)`` on the fast path: the dedicated connection, or one from the
        pool."""
        if self._dedicated:
            # (replies a results listener left in flight would answer this command: start over)
            return use(self._own_connection(fresh=bool(self._expect)))
        assert self._fast is not None
        conn = self._fast.get()
        try:
            return use(conn)
        finally:
            self._fast.put(conn)

    def _own_connection(self, fresh: bool = False) -> resp.RespConnection:
        """A dedicated broker's connection: a new one when there is none, it broke, or
        ``fresh`` (the old one is closed)."""
        with self._own_lock:
            own = self._own
        if own is not None and not own.broken and not fresh:
            return own
        if own is not None:
            own.close()
        own = resp.connect(self.client)
        assert own is not None
        with self._own_lock:
            if self._interrupted:  # (interrupted while it connected: nothing to wake it later)
                own.close()
                raise redis.exceptions.ConnectionError("the listener was interrupted")
            self._own = own
            self._expect.clear()
            self._brpop_sent = False
        return own

    def _command(self, *args: Any) -> Any:
        """One command on the fast path."""
        return self._on_fast(lambda conn: conn.command(*args))

    def _eval(self, script: resp.Script, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script, sent once (EVALSHA, then EVAL on NOSCRIPT): on the fast path, or
        with :meth:`_once`."""
        if self._fast is None:
            try:
                return self._once(keys[0], "EVALSHA", script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                return self._once(keys[0], "EVAL", script.source, len(keys), *keys, *args)
        return self._on_fast(lambda conn: conn.evalsha(script, keys, args))

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

    def _run_store(self, timeout_key: str, list_key: str, timeout: float, data: Union[str, bytes], cap: int) -> None:
        args = [_ms(timeout), data, cap]
        try:
            self._eval(_STORE, [timeout_key, list_key], args)
        except _REDIS_FAILURES as exc:
            error = _broker_error(exc)
            if isinstance(error, CapacityExceeded):
                raise error from None
            raise error from exc

    def pop_call(self, uris: Sequence[str], block: float) -> Optional[Popped]:
        """Wait up to ``block`` seconds for a call to any of ``uris``; ``None`` if none came.

        An undecodable payload is logged and dropped (``None`` is returned).
        """
        popped = self._brpop([calls_key(u) for u in uris], block)
        if popped is None:
            return None
        try:
            payload = CallPayload.from_json(popped)
        except ValueError as exc:
            logger.warning("dropping undecodable call payload: %s", exc)
            return None
        return Popped(payload, self._take(call_timeout_key(payload.uri, payload.msg_uuid)))

    def pop_result(self, conn_uuid: str, block: Optional[float]) -> Optional[Popped]:
        """Wait up to ``block`` seconds (``None``: until one comes or :meth:`wake_results`)
        for a result for ``conn_uuid``; ``None`` if none came."""
        if block is None and self._dedicated and self._fast is not None:
            return self._pop_result_ahead(conn_uuid)
        payload = _result_payload(self._brpop([results_key(conn_uuid)], block))
        if payload is None:
            return None
        return Popped(payload, self._take(result_timeout_key(conn_uuid, payload.msg_uuid)))

    def _pop_result_ahead(self, conn_uuid: str) -> Optional[Popped]:
        """:meth:`pop_result` with no timeout, on a listener's own connection: the script that
        takes a result's timeout key goes in one write with the next BRPOP, so each result
        costs one write to redis, not two. (EVAL, not EVALSHA: a NOSCRIPT could not be
        answered on a connection that is blocked in the BRPOP behind it.)

        When :attr:`call_deadlines` says the result's call has more than
        :data:`RESULT_SURE_MARGIN` seconds left, its timeout key cannot have expired (the
        callee stores the result to expire with the call, which was stored after its deadline
        was noted), so the result is returned at once and the script's reply is dropped on
        the next turn: the listener waits for redis once per result, for the BRPOP.

        After :meth:`follow_calls`, the replies to the calls stored ahead come here too, in
        their order, and go to their callbacks."""
        key = results_key(conn_uuid)
        own: Optional[resp.RespConnection] = None
        try:
            own = self._own_connection()
            while True:
                with self._own_lock:
                    if not self._brpop_sent and self._awaiting(""):
                        own.send([("BRPOP", key, 0)])
                        self._expect.append(_AWAIT_BRPOP)
                        self._brpop_sent = True
                    idle = not self._expect
                try:
                    reply = own.read_reply()
                except redis.exceptions.ConnectionError:
                    with self._own_lock:  # (own is broken now: nothing more is sent on it)
                        idle = idle and not self._expect  # a call may have been sent meanwhile
                    if not idle or not self._may_reconnect():
                        raise
                    # redis closed it while nothing was asked (its idle-client timeout, a
                    # proxy's): nothing is lost, take a new one
                    own = self._own_connection(fresh=True)
                    continue
                with self._own_lock:
                    if not self._expect:
                        raise redis.exceptions.ConnectionError(f"a reply nobody asked for: {reply!r:.100}")
                    kind = self._expect.popleft()
                if kind is _AWAIT_SKIP:
                    _check_skipped(reply, conn_uuid)
                elif type(kind) is tuple:  # a call stored ahead: (its callback, when it was sent)
                    kind[0](_broker_error(reply) if isinstance(reply, Exception) else None)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    # (_brpop_sent stays set until the next one is decided: nothing may be sent
                    # on the connection meanwhile, so the script's reply comes first)
                    payload = _result_payload(None if reply is None else reply[1])
                    if payload is not None:
                        return self._consume_ahead(own, key, payload)
                    with self._own_lock:
                        self._brpop_sent = False
                    return None
        except _REDIS_FAILURES as exc:
            if own is not None:
                own.close()  # what it still has in flight must not answer a later command
            error = _broker_error(exc)
            if self._interrupt_why:
                error = BrokerError(f"redis unavailable: {self._interrupt_why}")
            with self._own_lock:
                left, self._expect = self._expect, deque()
                self._brpop_sent = False
            for kind in left:  # the calls whose store is unanswered: each gets its NACK
                if type(kind) is tuple:
                    kind[0](error)
            raise error from exc

    def _may_reconnect(self) -> bool:
        """Whether a listener whose idle connection redis closed may take a new one: at most
        once a second, so that a redis that keeps closing it is a failure, not a loop."""
        now = time.monotonic()
        if now - self._reconnected < 1.0 or self._interrupted:
            return False
        self._reconnected = now
        return True

    def _consume_ahead(self, own: resp.RespConnection, key: str, payload: ResultPayload) -> Popped:
        """Take the timeout key of a result just popped, with the next BRPOP in the same
        write while a result may still come; the result, handed over before redis answers
        when its call is sure to have time left (see :meth:`_pop_result_ahead`)."""
        deadlines = self.call_deadlines
        deadline = deadlines.get(payload.msg_uuid) if deadlines is not None else None
        left = deadline - time.monotonic() if deadline is not None else 0.0
        sure = left > RESULT_SURE_MARGIN
        consume = ("EVAL", _CONSUME.source, 1, result_timeout_key(payload.conn_uuid, payload.msg_uuid))
        with self._own_lock:
            if self._awaiting(payload.msg_uuid):
                own.send([consume, ("BRPOP", key, 0)])
                self._expect.extend((_AWAIT_SKIP if sure else _AWAIT_TTL, _AWAIT_BRPOP))
            else:
                own.send([consume])
                self._expect.append(_AWAIT_SKIP if sure else _AWAIT_TTL)
                self._brpop_sent = False
        if sure:
            return Popped(payload, left)
        reply = own.read_reply()
        with self._own_lock:
            self._expect.popleft()  # (_AWAIT_TTL: the first reply awaited after a BRPOP's)
        if isinstance(reply, Exception):
            raise reply
        ttl_ms = int(reply)
        return Popped(payload, ttl_ms / 1000.0 if ttl_ms > 0 else 0.0)

    def wake_results(self, conn_uuid: str) -> None:
        """Wake the :meth:`pop_result` that waits on ``conn_uuid``'s list (it returns ``None``).

        When the shared pool has no connection to spare (many connections closing at once), a
        connection of its own carries the marker."""
        key = results_key(conn_uuid)
        try:
            self._push_wake(key)
            return
        except _REDIS_FAILURES as exc:
            first = exc
        own = self.dedicated(key)
        try:
            own._push_wake(key)
        except _REDIS_FAILURES as exc:
            raise _broker_error(exc) from first
        finally:
            own.close()

    def _push_wake(self, key: str) -> None:
        if self._fast is not None:
            self._command("RPUSH", key, WAKE_MARKER)
        else:
            self.client.rpush(key, WAKE_MARKER)

    def discard_results(self, conn_uuid: str) -> None:
        """Delete a closed connection's result list (results that arrive later expire)."""
        try:
            if self._fast is not None:
                self._command("DEL", results_key(conn_uuid))
            else:
                self.client.delete(results_key(conn_uuid))
        except _REDIS_FAILURES as exc:
            raise _broker_error(exc) from exc

    def _brpop(self, keys: list[str], block: Optional[float]) -> Optional[bytes]:
        try:
            # BRPOP's timeout 0 means "forever": that is what block=None asks for.
            timeout = 0 if block is None else max(block, 0.01)
            if self._fast is not None:
                item = self._command("BRPOP", *keys, timeout)
            else:
                item = self.client.brpop(keys, timeout=timeout)
        except _REDIS_FAILURES as exc:
            raise _broker_error(exc) from exc
        if item is None:
            return None
        return item[1]

    def _take(self, timeout_key: str) -> float:
        try:
            ttl_ms = int(self._eval(_CONSUME, [timeout_key], []))
        except _REDIS_FAILURES as exc:
            raise _broker_error(exc) from exc
        return ttl_ms / 1000.0 if ttl_ms > 0 else 0.0

    # -- pub-sub --

    def publish(self, channel: str, payload: EventPayload) -> int:
        """Publish an event; returns the number of redis subscribers that got it."""
        data = payload.to_json()
        try:
            if self._fast is not None:
                return int(self._command("PUBLISH", channel, data))
            return int(self._once(channel, "PUBLISH", channel, data))
        except _REDIS_FAILURES as exc:
            raise _broker_error(exc) from exc

    def pubsub(self, confirm_timeout: float = 5.0) -> "RedisPubSub":
        """A new pub-sub connection, on a redis connection of its own (made on first subscribe).

        Someone must be reading its events (:meth:`RedisPubSub.get_event`, as a server
        connection's pub-sub thread does) for its subscribe calls to be confirmed.

        On a cluster the connection goes to the primaries in turn, as a plain connection:
        ``PUBLISH`` reaches the subscribers of every node, and the cluster client's own pools
        are not used, since a topology refresh marks their connections for reconnecting (a
        pub-sub connection would silently re-subscribe, losing events published in between).
        If that node fails, :meth:`RedisPubSub.get_event` raises :class:`BrokerError`, as on a
        standalone redis.
        """
        if self.cluster:
            cluster = self.client
            nodes = cluster.get_primaries() or cluster.get_nodes()
            node = nodes[next(self._pubsub_turn) % len(nodes)]
            client = _one_connection_client(cluster.get_redis_connection(node), blocking=True)
        else:
            client = _one_connection_client(self.client, blocking=True)
        return RedisPubSub(client.pubsub(), confirm_timeout, owner=client)

    def ping(self) -> bool:
        """Whether redis answers (on a cluster: the cluster client's default node)."""
        try:
            return bool(self.client.ping())
        except _REDIS_FAILURES:
            return False


class _Waiter:
    """A pub-sub request waiting for redis' confirmation."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


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

    def subscribe(self, channel: str, pattern: bool) -> None:
        if pattern:
            self._confirm("psubscribe", channel, self._pubsub.psubscribe)
        else:
            self._confirm("subscribe", channel, self._pubsub.subscribe)

    def unsubscribe(self, channel: str, pattern: bool) -> None:
        if pattern:
            self._confirm("punsubscribe", channel, self._pubsub.punsubscribe)
        else:
            self._confirm("unsubscribe", channel, self._pubsub.unsubscribe)

    def _confirm(self, kind: str, channel: str, command: Any) -> None:
        key = (kind, channel)
        active = ("p" if kind.startswith("p") else "", channel)
        with self._cond:
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
                except _REDIS_FAILURES:
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
        except _REDIS_FAILURES as exc:
            raise _broker_error(exc) from exc
        with self._cond:
            if not self._cond.wait_for(lambda: waiter.done, self.confirm_timeout):
                # It stays in line: its confirmation, when it comes, is taken for it (and not
                # for a later request of the same channel).
                raise BrokerError(f"redis did not confirm {kind} {channel!r} within {self.confirm_timeout} s")

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
            try:
                if deadline is None:
                    if not self._sent.is_set():
                        self._sent.wait()  # no connection before the first command
                        continue
                    msg = self._pubsub.handle_message(self._pubsub.parse_response(block=True))
                else:
                    msg = self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            except _REDIS_FAILURES as exc:
                if self._stopped:
                    return None
                raise _broker_error(exc) from exc
            if msg is not None:
                kind = msg.get("type")
                if kind in ("message", "pmessage"):
                    break
                if kind in ("subscribe", "psubscribe", "unsubscribe", "punsubscribe") and msg.get("channel"):
                    key = (kind, _text(msg["channel"]))
                    with self._cond:
                        # A confirmation nobody waits for is dropped: redis-py re-subscribes by
                        # itself after a reconnect, and those confirmations must not stand in
                        # for a later request's.
                        line = self._waiting.get(key)
                        if line:
                            line.popleft().done = True
                            if not line:
                                del self._waiting[key]
                            self._cond.notify_all()
                    continue
            if deadline is not None and time.monotonic() >= deadline:
                return None
        channel = _text(msg["channel"])
        pattern = _text(msg["pattern"]) if kind == "pmessage" and msg.get("pattern") else ""
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
        except _REDIS_FAILURES as exc:  # the read fails too, and sees it was stopped
            logger.debug("waking a pub-sub reader: %s", exc)

    def close(self) -> None:
        try:
            self._pubsub.close()
            if self._owner is not None:
                _close_client(self._owner)
        except _REDIS_FAILURES as exc:  # closing a broken connection
            logger.debug("closing pub-sub connection: %s", exc)


def _close_client(client: Any) -> None:
    """Close a client we made, and its pool's connections now.

    redis-py's ``Redis.close()`` leaves a pool passed in with ``connection_pool=`` alone: its
    sockets would stay open until the garbage collector found them."""
    client.close()
    pool = getattr(client, "connection_pool", None)  # a RedisCluster has none
    if pool is not None:
        pool.disconnect()


def _one_connection_client(client: Any, blocking: bool = False) -> Any:
    """A client like ``client`` (same class, server, options) with a pool of one connection.

    ``blocking``: for a listener that blocks in a read with no timeout: no socket timeout, TCP
    keepalive, and no retries."""
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    if blocking:
        kwargs["socket_timeout"] = None
        kwargs["retry"] = Retry(NoBackoff(), 0)
        if "socket_keepalive" in _connection_params(pool.connection_class):
            kwargs["socket_keepalive"] = True
    one = redis.ConnectionPool(connection_class=pool.connection_class, max_connections=1, **kwargs)
    return type(client)(connection_pool=one)


def _connection_params(cls: Any) -> set[str]:
    try:
        return set(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        return set()


def _is_cluster(url: str, options: dict[str, Any]) -> bool:
    """Whether the redis at ``url`` runs in cluster mode; :class:`BrokerError` if it does not
    answer."""
    client = redis.Redis.from_url(url, **{k: v for k, v in options.items() if k not in ("max_connections", "timeout")})
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except redis.exceptions.ResponseError:
        return False  # no INFO (juggler's embedded redis, some proxies): not a cluster node
    except _REDIS_ERRORS as exc:
        raise BrokerError(f"cannot reach redis at {url} to ask whether it is a cluster: {exc}") from exc
    finally:
        client.close()


# TCP keepalive for a callee worker's connection, which blocks with no read timeout: a redis
# host that vanished without closing the connection is noticed in about a minute.
_KEEPALIVE = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}


Stored = Optional[Callable[[list[Optional[BrokerError]]], None]]


def _reply_error(reply: Any) -> Optional[BrokerError]:
    if isinstance(reply, BrokerError):
        return reply
    if isinstance(reply, redis.exceptions.ResponseError):
        return _broker_error(reply)
    return None


def _report(stored: Stored, results: Sequence[Any], errors: list[Optional[BrokerError]]) -> None:
    if stored is not None and results:
        stored(errors)


class CallPopper:
    """A callee worker's own redis connection: it takes calls in batches and stores results.

    :meth:`pop` waits with ``BRPOP`` and no timeout (so an idle worker costs redis and Python
    nothing) until a call comes or :meth:`wake` is called from another thread, which unblocks
    it with ``CLIENT UNBLOCK``. Once a call comes, one script (:data:`POP_CALLS_SCRIPT`) takes
    up to ``n - 1`` more already waiting and consumes every one's timeout key.
    :meth:`exchange` stores results (each with the store script, as
    :meth:`RedisBroker.store_result` does) and takes the next batch, all in one round trip.

    The commands go straight to the connection, without redis-py's pool, retries and
    per-command bookkeeping: a worker is their only user, and a failed command must not be
    re-sent behind its back (a re-sent BRPOP would block again after :meth:`wake`). Any
    failure raises :class:`BrokerError`; the connection is then unusable: close it and make
    a new one. On a cluster the connection goes to the primary of the URIs' slot.
    """

    def __init__(self, broker: "RedisBroker", uris: Sequence[str]) -> None:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._broker = broker
        self.uris = list(uris)
        if not self.uris:
            raise ValueError("no URI to pop calls for")
        self._keys = [calls_key(u) for u in self.uris]
        self._result_cap = broker.result_cap
        client = broker.client
        try:
            if broker.cluster:
                node = client.nodes_manager.get_node_from_slot(call_slot(self.uris[0]))
                if node is None:
                    raise BrokerError(f"redis unavailable: no cluster node serves the slot of {self.uris[0]!r}")
                client = client.get_redis_connection(node)
            # CLIENT UNBLOCK goes through the shared client (on a cluster: the node's pool)
            self._control = client
            pool = client.connection_pool
            kwargs = dict(pool.connection_kwargs, socket_timeout=None, retry=Retry(NoBackoff(), 0))
            cls = pool.connection_class
            # A real connection (TCP, TLS or unix socket); fakeredis runs a blocking command in
            # the write itself, so the results before a BRPOP are sent on their own there.
            self._pipelined = cls.__module__.startswith("redis.") and issubclass(cls, redis.connection.AbstractConnection)
            if self._pipelined and issubclass(cls, redis.connection.Connection):  # TCP (or TLS)
                kwargs.update(socket_keepalive=True, socket_keepalive_options=_KEEPALIVE)
            if not self._pipelined and kwargs.get("server") is None:
                # fakeredis finds a client's in-memory server by host and port, and workers
                # starting at once can each make one (a check-then-set): join the pool's.
                shared = pool.get_connection()
                try:
                    kwargs["server"] = getattr(shared, "_server", None)
                finally:
                    pool.release(shared)
            self._conn = pool.connection_class(**kwargs)
            self._conn.send_command("CLIENT", "ID")
            self.client_id = int(self._conn.read_response())
        except _REDIS_FAILURES as exc:
            self._close_quietly()
            raise _broker_error(exc) from exc
        self._lock = threading.Lock()
        # a plain TCP or unix socket with no Python timeout (SSL and stand-ins go through
        # redis-py)
        sock = getattr(self._conn, "_sock", None)
        self._plain_socket = gilsend.AVAILABLE and type(sock) is socket.socket and sock.gettimeout() is None
        self._blocked = False  # a BRPOP is (about to be) sent and not answered yet
        self._woken = False
        self._store_sha = hashlib.sha1(STORE_SCRIPT.encode()).hexdigest()
        self._consume_sha = hashlib.sha1(CONSUME_SCRIPT.encode()).hexdigest()
        self._pop_sha = hashlib.sha1(POP_CALLS_SCRIPT.encode()).hexdigest()
        self._store_body = STORE_SCRIPT.encode()
        # fakeredis only (see _fake_brpop); the hash tag of the first URI keeps it in its slot
        self._wake_key = f"juggler:callee:wake:{{{self.uris[0]}}}:{new_uuid()}"

    def __repr__(self) -> str:
        return f"<CallPopper {self.uris} client_id={getattr(self, 'client_id', None)}>"

    def pop(self, n: int, results: Sequence[tuple[ResultPayload, float, str]] = (), stored: Stored = None) -> list[Popped]:
        """Store ``results`` (payload, seconds left, its JSON), then wait for a call and take
        up to ``n`` in all; ``[]`` after :meth:`wake`.

        ``stored`` is called once, as soon as the results are stored, with one entry per
        result: ``None`` or the :class:`BrokerError` (e.g. :class:`CapacityExceeded`) that
        kept it from being stored (each gets the error when the connection failed). Raises
        :class:`BrokerError` when redis fails; the connection is then unusable.

        On a standalone redis the results go in the same write as the BRPOP, and the call
        that comes is taken with the others waiting by one script: two round trips. On a
        cluster the results go through the cluster client (each result list lives on the node
        of its connection's slot).
        """
        with self._lock:
            woken = self._woken
        if woken or not self._pipelined or self._broker.cluster:
            self.exchange(results, 0, stored)
            commands: list[tuple[Any, ...]] = []
            results = ()
        else:
            # EVAL, not EVALSHA: a NOSCRIPT could only be handled after the BRPOP returns
            commands = self._store_commands(results, eval_=True)
        with self._lock:
            if self._woken:
                return []
            self._blocked = True
        try:
            if not self._pipelined:
                item = self._fake_brpop()
            else:
                try:
                    self._write(commands + [("BRPOP", *self._keys, 0)])
                    replies = [self._read() for _ in commands]
                except BrokerError as exc:
                    _report(stored, results, [exc] * len(results))
                    raise
                _report(stored, results, [_reply_error(r) for r in replies])
                item = self._read()
        finally:
            with self._lock:
                self._blocked = False
        if isinstance(item, Exception):
            if isinstance(item, (redis.exceptions.MovedError, redis.exceptions.AskError)):
                self._refresh_topology()
            raise _broker_error(item)
        if item is None:  # unblocked
            return []
        popped = self._run([self._pop_command(n, item[1])])[0]
        if isinstance(popped, BrokerError):
            raise popped
        return popped

    def _fake_brpop(self) -> Any:
        """fakeredis: BRPOP with no timeout on the call lists and this popper's own wake list,
        onto which :meth:`wake` pushes a marker (fakeredis wakes a blocked command on any write).
        Its CLIENT IDs are not unique across the connections of one ``FakeRedis()`` made
        without a shared ``FakeServer`` (each connection gets a server object of its own), so
        CLIENT UNBLOCK could wake another client. ``None`` once woken."""
        self._write([("BRPOP", *self._keys, self._wake_key, 0)])
        item = self._read()
        if isinstance(item, (list, tuple)) and _text(item[0]) == self._wake_key:
            return None
        return item

    def exchange(self, results: Sequence[tuple[ResultPayload, float, str]], n: int, stored: Stored = None) -> list[Popped]:
        """As :meth:`pop`, but without waiting: takes up to ``n`` calls already waiting (none
        when ``n`` is 0). On a standalone redis it is one round trip."""
        if self._broker.cluster:
            errors: list[Optional[BrokerError]] = []
            for p, remaining, data in results:
                try:
                    self._broker._run_store(result_timeout_key(p.conn_uuid, p.msg_uuid), results_key(p.conn_uuid),
                                            remaining, data, self._result_cap)  # fmt: skip
                    errors.append(None)
                except BrokerError as exc:
                    errors.append(exc)
            _report(stored, results, errors)
            commands: list[tuple[Any, ...]] = []
            results = ()
        else:
            commands = self._store_commands(results, eval_=False)
        if n > 0:
            commands.append(self._pop_command(n, ""))
        if not commands:
            return []
        try:
            replies = self._run(commands)
        except BrokerError as exc:
            _report(stored, results, [exc] * len(results))
            raise
        _report(stored, results, [_reply_error(r) for r in replies[: len(results)]])
        if n == 0:
            return []
        if isinstance(replies[-1], BrokerError):
            raise replies[-1]
        return replies[-1]

    def _store_commands(self, results: Sequence[tuple[ResultPayload, float, str]], eval_: bool) -> list[tuple[Any, ...]]:
        script = self._store_body if eval_ else self._store_sha
        command = "EVAL" if eval_ else "EVALSHA"
        cap = self._result_cap
        return [
            (command, script, 2, result_timeout_key(p.conn_uuid, p.msg_uuid), results_key(p.conn_uuid), _ms(left), data, cap)
            for p, left, data in results
        ]  # fmt: skip

    def wake(self) -> bool:
        """Make :meth:`pop` return ``[]`` now and from now on (from any thread). Returns
        ``False`` when a ``BRPOP`` may be on its way to redis: call it again a little later."""
        with self._lock:
            self._woken = True
            blocked = self._blocked
        if not self._pipelined:  # fakeredis: the marker ends the BRPOP now or the next one at once
            try:
                self._control.rpush(self._wake_key, WAKE_MARKER)
            except _REDIS_FAILURES as exc:
                logger.debug("waking a fakeredis callee worker failed: %s", exc)
            return True
        if not blocked:
            return True
        try:
            return bool(self._control.client_unblock(self.client_id))
        except _REDIS_FAILURES as exc:
            # redis is unreachable: end the BRPOP by shutting its socket down
            logger.debug("CLIENT UNBLOCK failed (%s): closing the blocked connection", exc)
            sock = getattr(self._conn, "_sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return True

    def close(self) -> None:
        if not getattr(self, "_pipelined", True):  # fakeredis: drop a marker nobody popped
            try:
                self._control.delete(self._wake_key)
            except _REDIS_FAILURES:
                pass
        self._close_quietly()

    def _refresh_topology(self) -> None:
        """After MOVED: the slot moved to another node; learn the cluster's new layout so that
        the next connection goes to the right node."""
        if self._broker.cluster:
            try:
                self._broker.client.nodes_manager.initialize()
            except _REDIS_FAILURES as exc:
                logger.debug("refreshing the cluster topology failed: %s", exc)

    def _close_quietly(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            try:
                conn.disconnect()
            except _REDIS_FAILURES:
                pass

    def _pop_command(self, n: int, first: Any) -> tuple[Any, ...]:
        return ("EVALSHA", self._pop_sha, len(self._keys), *self._keys, max(1, n), first, *self.uris)

    def _run(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write, read every reply; the replies of the pop script are
        made :class:`Popped` lists, error replies :class:`BrokerError`. A script redis does
        not know (NOSCRIPT) is loaded and its command sent again."""
        replies = self._send(commands)
        again = [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]
        if again:
            sent = self._send([("SCRIPT", "LOAD", s) for s in (STORE_SCRIPT, POP_CALLS_SCRIPT)] + [commands[i] for i in again])
            for err in sent[:2]:
                if isinstance(err, Exception):
                    raise _broker_error(err)
            for i, r in zip(again, sent[2:]):
                replies[i] = r
        out: list[Any] = []
        for command, reply in zip(commands, replies):
            if isinstance(reply, redis.exceptions.ResponseError):
                if isinstance(reply, (redis.exceptions.MovedError, redis.exceptions.AskError)):
                    self._refresh_topology()
                out.append(_broker_error(reply))
            elif command[1] == self._pop_sha:
                out.append(self._popped(reply))
            else:
                out.append(reply)
        return out

    def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        self._write(commands)
        return [self._read() for _ in commands]

    def _write(self, commands: list[tuple[Any, ...]]) -> None:
        conn = self._conn
        try:
            sock = conn._sock
            if self._plain_socket and sock is not None:
                # what send_packed_command does, less its overhead, in a send that keeps
                # the GIL when the socket takes it all (see juggler.gilsend)
                data = b"".join(resp.pack(c) for c in commands)
                try:
                    gilsend.sendall(sock, data)
                except BaseException:  # (as redis-py: a command half sent ends the connection)
                    conn.disconnect()
                    raise
            else:
                conn.send_packed_command(conn.pack_commands(commands))
        except _REDIS_FAILURES as exc:
            raise _broker_error(exc) from exc

    def _read(self) -> Any:
        """The next reply; an error reply is returned (read in full: the next one follows)."""
        try:
            return self._conn.read_response()
        except redis.exceptions.ResponseError as exc:
            return exc
        except _REDIS_FAILURES as exc:
            raise _broker_error(exc) from exc

    def _popped(self, reply: list[Any]) -> list[Popped]:
        out = []
        for data, ttl in zip(reply[::2], reply[1::2]):
            try:
                payload = CallPayload.from_json(data)
            except ValueError as exc:
                logger.warning("dropping undecodable call payload: %s", exc)
                continue
            ttl = int(ttl)
            if ttl == -3:  # the script did not consume its timeout key
                if payload.uri not in self.uris:
                    # not ours: the callee drops it; its timeout key (if any) expires by itself
                    out.append(Popped(payload, math.inf))
                    continue
                reply = self._send([("EVALSHA", self._consume_sha, 1, call_timeout_key(payload.uri, payload.msg_uuid))])[0]
                if isinstance(reply, redis.exceptions.NoScriptError):
                    reply = self._send([("EVAL", CONSUME_SCRIPT, 1, call_timeout_key(payload.uri, payload.msg_uuid))])[0]
                if isinstance(reply, Exception):
                    raise reply if isinstance(reply, BrokerError) else _broker_error(reply)
                ttl = int(reply)
            out.append(Popped(payload, ttl / 1000.0 if ttl > 0 else 0.0))
        return out
