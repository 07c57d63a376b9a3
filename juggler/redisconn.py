"""Redis clients made the way juggler needs them, and redis failures as :class:`BrokerError`.

A URL names a standalone redis (``redis://``, ``rediss://``, ``unix://``: redis-py reads it)
or a master behind Redis Sentinel (``redis+sentinel://``, ``rediss+sentinel://``: the form of
the ``redis-sentinel-url`` convention, read by :func:`parse_sentinel_url`; redis-py's
:class:`redis.sentinel.Sentinel` finds the master, at each new connection).

Shared by the three jobs of the redis broker (:mod:`juggler.rpc`, :mod:`juggler.popper`,
:mod:`juggler.redis_pubsub`) and by :class:`~juggler.broker.RedisBroker`, which puts them
together.
"""

from __future__ import annotations

import inspect
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import parse_qsl, unquote

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

from .exceptions import BrokerError, CapacityExceeded
from .layout import CAPACITY_ERROR

__all__ = [
    "REDIS_ERRORS",
    "REDIS_FAILURES",
    "broker_error",
    "timed_out",
    "text",
    "is_fakeredis",
    "make_fake_db",
    "close_client",
    "one_connection_client",
    "is_cluster",
    "unavailable",
    "SENTINEL_SCHEMES",
    "SENTINEL_PORT",
    "SENTINEL_TIMEOUT",
    "SentinelURL",
    "is_sentinel_url",
    "parse_sentinel_url",
    "sentinel_client",
    "client_from_url",
]

logger = logging.getLogger(__name__)

# What redis-py raises when redis fails: RedisClusterException (a node cannot be reached while
# the topology is refreshed, keys in different slots) does not derive from RedisError.
REDIS_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)

# redis-py can also fail with OSError, ValueError or AttributeError while it reads or writes,
# when one thread disconnects a connection another thread is using (a family of known
# redis-py races; seen in our tests with redis-py 8.1, a BlockingConnectionPool per cluster
# node, and a node that went down). For juggler that is a redis failure like any other: the
# request gets a NACK or the listener's connection is closed, never a thread lost.
REDIS_FAILURES = REDIS_ERRORS + (OSError, ValueError, AttributeError)


# Error replies of a redis that cannot serve now but will (loading its data after a restart, a
# cluster whose node has just come back), or that is no longer the master (a failover made it a
# replica: its blocked clients get UNBLOCKED, its writers READONLY): redis unavailable, not a
# refusal of the command.
_NOT_NOW = ("LOADING", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "UNBLOCKED", "READONLY")


def broker_error(exc: BaseException) -> BrokerError:
    """The :class:`BrokerError` for an exception raised by a redis-py call."""
    if isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(_NOT_NOW):
        return BrokerError(f"redis unavailable: {exc}")
    if isinstance(exc, redis.exceptions.ResponseError) and not isinstance(exc, redis.exceptions.ClusterDownError):
        if CAPACITY_ERROR in str(exc):
            return CapacityExceeded(CAPACITY_ERROR)
        return BrokerError(f"redis error: {exc}")
    if isinstance(exc, redis.exceptions.RedisClusterException) and "same key slot" in str(exc):
        # refused by the cluster client itself: a URI that starts with '}' has an empty hash
        # tag, so its call list and timeout keys hash to different slots
        return BrokerError(f"redis error: {exc}")
    if not isinstance(exc, REDIS_ERRORS):
        logger.warning("the redis client failed unexpectedly (taken as redis unavailable)", exc_info=exc)
        return BrokerError(f"redis unavailable: connection broken ({type(exc).__name__}: {exc})")
    return BrokerError(f"redis unavailable: {exc}")

def unavailable(error: BaseException) -> bool:
    """Whether ``error`` (a :class:`BrokerError`) says redis could not be reached, rather than
    that it refused a command (an error reply, a list over its capacity)."""
    return str(error).startswith("redis unavailable")


def timed_out(error: BaseException) -> bool:
    """Whether ``error`` (a :class:`BrokerError` raised from a redis-py one) is redis not
    answering in time, rather than refusing or closing a connection: what is worth failing
    fast for, since each request would wait as long again."""
    cause = error.__cause__
    return isinstance(cause, (redis.exceptions.TimeoutError, TimeoutError))


def text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

def is_fakeredis(client: Any) -> bool:
    pool = getattr(client, "connection_pool", None)
    return pool is not None and pool.connection_class.__module__.startswith("fakeredis")


def make_fake_db(client: Any) -> None:
    """fakeredis makes a server's database the first time a connection asks for it, with no
    lock: connections made at once on a fresh server (a callee's workers starting together)
    could each make one of their own and never see each other's writes, so a worker's BRPOP
    never saw its wake-up marker and stop() waited forever. One command here, on one thread,
    makes it before any of them. (A server that is down stays so: nothing is made.)"""
    try:
        client.ping()
    except REDIS_FAILURES:
        pass


def close_client(client: Any) -> None:
    """Close a client we made, and its pool's connections now.

    redis-py's ``Redis.close()`` leaves a pool passed in with ``connection_pool=`` alone: its
    sockets would stay open until the garbage collector found them."""
    client.close()
    pool = getattr(client, "connection_pool", None)  # a RedisCluster has none
    if pool is not None:
        pool.disconnect()
        manager = getattr(pool, "sentinel_manager", None)  # (sentinel_client: its own Sentinel)
        if manager is not None:
            manager.close()


def one_connection_client(client: Any, blocking: bool = False) -> Any:
    """A client like ``client`` (same class, server, options) with a pool of one connection.

    Behind Sentinel too: a ``SentinelManagedConnection`` finds its pool (the sentinels, the
    service) in the kwargs copied here, so each of its connects asks for the current master.

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


def is_cluster(url: str, options: dict[str, Any]) -> bool:
    """Whether the redis at ``url`` runs in cluster mode; :class:`BrokerError` if it does not
    answer."""
    client = redis.Redis.from_url(url, **{k: v for k, v in options.items() if k not in ("max_connections", "timeout")})
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except redis.exceptions.ResponseError:
        return False  # no INFO (juggler's embedded redis, some proxies): not a cluster node
    except REDIS_ERRORS as exc:
        raise BrokerError(f"cannot reach redis at {url} to ask whether it is a cluster: {exc}") from exc
    finally:
        client.close()


# -- Redis Sentinel ------------------------------------------------------------------------------

#: The URL schemes of a master behind Redis Sentinel: plain TCP, and TLS (to the sentinels and
#: to the redis servers alike).
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")

#: A sentinel's port when its URL names a host alone.
SENTINEL_PORT = 26379

#: How long a sentinel may take to accept a connection, and to answer, when the client's
#: options give no ``socket_connect_timeout`` (seconds): a sentinel that does not answer is
#: passed over for the next one.
SENTINEL_TIMEOUT = 5.0

# The options a sentinel URL's query may carry besides redis-py's own (db, socket_timeout, ...):
# how to authenticate to the sentinels, and the service name (the convention allows it there).
_SENTINEL_QUERY = ("sentinel_username", "sentinel_password", "service_name")


@dataclass(frozen=True)
class SentinelURL:
    """A ``redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service_name[/db]``
    URL, parsed (see :func:`parse_sentinel_url`)."""

    #: ``(host, port)`` of each sentinel, in the URL's order.
    sentinels: tuple[tuple[str, int], ...]
    #: The name the sentinels monitor the master under (``sentinel monitor NAME ...``).
    service_name: str
    db: int = 0
    #: ``rediss+sentinel``: TLS to the sentinels and the redis servers.
    tls: bool = False
    #: Options of the connections to the master: username and password from the URL, and
    #: redis-py's URL options from its query (``socket_timeout``, ``ssl_cert_reqs``, ...).
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Options of the connections to the sentinels: ``sentinel_username``,
    #: ``sentinel_password`` from the query (without the prefix).
    sentinel_options: Mapping[str, Any] = field(default_factory=dict)


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` names a master behind Redis Sentinel (by its scheme alone)."""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read a ``redis+sentinel://`` (or ``rediss+sentinel://``) URL; :class:`ValueError`
    naming what is wrong with it.

    ``redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service_name[/db][?options]``:
    the sentinels (port 26379 when not given; an IPv6 address in brackets), the service name
    the sentinels know the master by, the database (0 when not given). The user name and
    password are the redis servers'; the sentinels' go in the query (``sentinel_username``,
    ``sentinel_password``). Other query options are redis-py's URL options (``db``,
    ``socket_timeout``, ``ssl_cert_reqs``, ...); ``db`` and ``service_name`` there win over
    the path, as in the convention.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://, not {scheme!r}")
    tls = scheme.lower() == "rediss+sentinel"
    rest, _, query = rest.partition("#")[0].partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    options: dict[str, Any] = {}
    if at:
        username, colon, password = userinfo.partition(":")
        if not colon:
            raise ValueError("the user info of a Sentinel URL is [username]:password, with a ':'")
        if username:
            options["username"] = unquote(username)
        options["password"] = unquote(password)
    sentinels = tuple(_sentinel_address(item) for item in hosts.split(","))
    service, _, db_text = path.partition("/")
    service = unquote(service)
    db_text = db_text.rstrip("/")
    if "/" in db_text:
        raise ValueError(f"a Sentinel URL's path is /service_name[/db], not /{path}")
    db = _number("database", db_text) if db_text else 0
    sentinel_options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "service_name":
            service = value
        elif name in _SENTINEL_QUERY:
            sentinel_options[name[len("sentinel_"):]] = value
        elif name == "db":
            db = _number("database", value)
        elif name in redis.connection.URL_QUERY_ARGUMENT_PARSERS:
            try:
                options[name] = redis.connection.URL_QUERY_ARGUMENT_PARSERS[name](value)
            except (TypeError, ValueError):
                raise ValueError(f"the option {name}={value!r} of the Sentinel URL is not valid") from None
        elif tls and name.startswith("ssl_"):
            options[name] = value
        else:
            raise ValueError(f"unknown option {name!r} in the Sentinel URL")
    if not service:
        raise ValueError("a Sentinel URL names the service after the sentinels: redis+sentinel://host:port/service_name")
    return SentinelURL(sentinels, service, db, tls, options, sentinel_options)


def _sentinel_address(item: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, bracket, port = item[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ValueError(f"the sentinel address {item!r} is not [IPv6 address]:port")
        port = port[1:]
    else:
        host, _, port = item.partition(":")
    if not host:
        raise ValueError(f"a sentinel without a host in the Sentinel URL ({item!r}); hosts are separated by ','")
    if not port:
        return unquote(host), SENTINEL_PORT
    number = _number(f"port of sentinel {item!r}", port)
    if not 0 < number < 65536:
        raise ValueError(f"the port of sentinel {item!r} is not from 1 to 65535")
    return unquote(host), number


def _number(what: str, text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"the {what} in the Sentinel URL is not a number: {text!r}")
    return int(text)


class _Sentinel(Sentinel):
    """redis-py's :class:`~redis.sentinel.Sentinel`, with a master discovery many threads may
    run at once.

    Each new connection to the master asks the sentinels where it is (after a failover, every
    listener of a server does at once). redis-py's ``discover_master`` moves the sentinel that
    answered to the front of its list with an unlocked swap: two threads swapping at once can
    leave one sentinel in the list twice and another not at all, for good. Here the list is
    read and reordered under a lock (the sentinels are asked outside it); the error names
    what each sentinel said.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._order_lock = threading.Lock()

    def discover_master(self, service_name: str) -> tuple[str, int]:
        with self._order_lock:
            sentinels = list(self.sentinels)
        said = []
        for sentinel in sentinels:
            where = "{host}:{port}".format_map(sentinel.connection_pool.connection_kwargs)
            try:
                masters = sentinel.sentinel_masters()
            except (redis.exceptions.ConnectionError, redis.exceptions.ResponseError,
                    redis.exceptions.TimeoutError) as exc:  # fmt: skip
                said.append(f"{where}: {exc}")
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                with self._order_lock:  # the one that answered, first next time
                    if sentinel in self.sentinels:
                        self.sentinels.remove(sentinel)
                        self.sentinels.insert(0, sentinel)
                return state["ip"], state["port"]
            said.append(f"{where}: {'no master up' if state else 'does not know it'}")
        raise MasterNotFoundError(f"no master found for {service_name!r} ({'; '.join(said)})")


class _BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """redis-py's pool for the master behind Sentinel, capped the way
    :meth:`~juggler.broker.RedisBroker.from_url` caps a standalone redis' pool: at
    ``max_connections``, a request waiting up to ``timeout`` for a connection. (Each new
    connection asks the sentinels for the master; one that ends up connected to a former
    master is dropped on release.)"""


def sentinel_client(url: str, **options: Any) -> redis.Redis:
    """A ``redis.Redis`` client of the master behind Sentinel that ``url`` names (see
    :func:`parse_sentinel_url`); ``options`` are the redis connections' (the URL's own win),
    plus ``max_connections`` and ``timeout``: with ``max_connections`` its pool is capped and
    blocking, like :meth:`~juggler.broker.RedisBroker.from_url`'s, else uncapped, like
    ``redis.Redis.from_url``'s. Close it with :func:`close_client` (which closes its
    connections to the sentinels too).

    Every new connection asks the sentinels where the master is (``SENTINEL MASTERS``, one
    round trip to the first sentinel that answers), so after a failover connections go to
    the new master. The sentinels are asked with the connect timeout
    (``socket_connect_timeout``, else :data:`SENTINEL_TIMEOUT`) for connecting and reading
    alike, and never retried (the next sentinel is asked instead).
    """
    parsed = parse_sentinel_url(url)
    options = {**options, **parsed.options, "db": parsed.db}
    quick = options.get("socket_connect_timeout") or SENTINEL_TIMEOUT
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": quick, "socket_timeout": quick,
                                       **parsed.sentinel_options}  # fmt: skip
    if parsed.tls:
        options["ssl"] = True
        sentinel_kwargs.update({k: v for k, v in options.items() if k.startswith("ssl")})
    manager = _Sentinel(parsed.sentinels, sentinel_kwargs=sentinel_kwargs)
    pool_class = _BlockingSentinelPool if options.get("max_connections") else SentinelConnectionPool
    if pool_class is SentinelConnectionPool:
        options.pop("timeout", None)  # (the blocking pool's wait)
    return manager.master_for(parsed.service_name, connection_pool_class=pool_class, **options)


def client_from_url(url: str, **options: Any) -> Any:
    """A ``redis.Redis`` client for ``url``: ``redis://``, ``rediss://`` and ``unix://`` as
    ``redis.Redis.from_url`` reads them, ``redis+sentinel://`` and ``rediss+sentinel://`` with
    :func:`sentinel_client`. Close it with :func:`close_client`."""
    if is_sentinel_url(url):
        return sentinel_client(url, **options)
    return redis.Redis.from_url(url, **options)
