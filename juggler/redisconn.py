"""Redis clients made the way juggler needs them, and redis failures as :class:`BrokerError`.

Shared by the three jobs of the redis broker (:mod:`juggler.rpc`, :mod:`juggler.popper`,
:mod:`juggler.redis_pubsub`) and by :class:`~juggler.broker.RedisBroker`, which puts them
together.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

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
]

logger = logging.getLogger("juggler.broker")

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
# cluster whose node has just come back): redis unavailable, not a refusal of the command.
_NOT_NOW = ("LOADING", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN")


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


def one_connection_client(client: Any, blocking: bool = False) -> Any:
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
