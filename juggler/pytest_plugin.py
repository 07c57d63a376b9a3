"""pytest fixtures for code that uses juggler. A test suite loads them with
``pytest_plugins = ["juggler.pytest_plugin"]`` in its top-level ``conftest.py`` (or
``pytest -p juggler.pytest_plugin``); installing juggler does not load them into every pytest
run. See docs/testing.rst.

- ``juggler_redis``: a redis client. By default a fakeredis of its own, empty, per test; with
  ``--juggler-redis URL`` (or ``JUGGLER_TEST_REDIS_URL``) a real redis (``redis://``,
  ``rediss://``, ``unix://``, or ``redis+sentinel://``: the master behind Sentinel), from which
  the keys of juggler's layout (``juggler:*``) are deleted before and after each test.
- ``juggler_broker``: a :class:`~juggler.RedisBroker` on it.
- ``juggler_server``: a started :class:`~juggler.Server` on 127.0.0.1, port 0 (``.url``).
- ``juggler_callee``: a callee pool on the broker; ``juggler_callee.register(uri, fn)`` serves
  ``uri`` from then on.
- ``juggler_client``: a :class:`~juggler.Client` connected to ``juggler_server``.

Each is stopped, closed or shut down, and its threads joined, when the test ends.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Optional

import pytest

__all__ = ["CalleeFixture", "REDIS_URL_ENV"]

#: The environment variable that names a real redis for ``juggler_redis``.
REDIS_URL_ENV = "JUGGLER_TEST_REDIS_URL"


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("juggler")
    group.addoption(
        "--juggler-redis",
        metavar="URL",
        default=None,
        help=f"a real redis for the juggler_redis fixture (else ${REDIS_URL_ENV}, else a fakeredis per test); "
        "the keys under juggler: are deleted before and after each test",
    )


def _delete_juggler_keys(client: Any) -> None:
    keys = list(client.scan_iter(match="juggler:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


@pytest.fixture
def juggler_redis(request: Any) -> Iterator[Any]:
    """A redis client for the test: a fresh fakeredis, or the real redis given by
    ``--juggler-redis URL`` / ``JUGGLER_TEST_REDIS_URL`` with juggler's keys cleaned."""
    url = request.config.getoption("juggler_redis") or os.environ.get(REDIS_URL_ENV)
    if not url:
        import fakeredis

        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        yield client
        client.close()
        return
    from .redisconn import client_from_url, close_client

    client = client_from_url(url)  # (redis+sentinel:// too: the master its sentinels name)
    _delete_juggler_keys(client)
    try:
        yield client
    finally:
        try:
            _delete_juggler_keys(client)
        finally:
            close_client(client)


@pytest.fixture
def juggler_broker(juggler_redis: Any) -> Iterator[Any]:
    """A :class:`~juggler.RedisBroker` on ``juggler_redis``."""
    from .broker import RedisBroker

    broker = RedisBroker(juggler_redis)
    yield broker
    broker.close()


@pytest.fixture
def juggler_server(juggler_broker: Any) -> Iterator[Any]:
    """A started :class:`~juggler.Server` on 127.0.0.1 and a free port (``juggler_server.url``);
    shut down, every thread joined, after the test."""
    from .server import Server

    server = Server(juggler_broker, host="127.0.0.1", port=0).start()
    try:
        yield server
    finally:
        server.shutdown()


class CalleeFixture:
    """The ``juggler_callee`` fixture: a callee pool that serves each URI registered on it,
    at once.

    A :class:`~juggler.Callee` takes its URIs before it starts; this starts one (``workers``
    threads) at the first :meth:`register` and, at each later one, replaces it by a callee
    serving every URI so far: calls made meanwhile wait in redis and are served by the new
    one. :attr:`callee` is the one running (``None`` before the first register).
    """

    def __init__(self, broker: Any, workers: int = 4) -> None:
        self.broker = broker
        self.workers = workers
        self.callee: Optional[Any] = None
        self._functions: dict[str, Callable[[Any], Any]] = {}

    def register(self, uri: str, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Serve ``uri`` with ``fn`` from now on; returns ``fn``."""
        from .callee import Callee

        callee = Callee(self.broker, workers=self.workers, block=0.05, name="juggler-callee-fixture")
        for known, known_fn in {**self._functions, uri: fn}.items():
            callee.register(known, known_fn)  # checks uri and fn before anything changes
        self.stop()
        self._functions[uri] = fn
        self.callee = callee.start()
        return fn

    @property
    def uris(self) -> list[str]:
        return list(self._functions)

    @property
    def stats(self) -> Any:
        """The running callee's :class:`~juggler.callee.CalleeStats`."""
        if self.callee is None:
            raise RuntimeError("nothing registered yet: juggler_callee.register(uri, fn) first")
        return self.callee.stats

    def stop(self) -> None:
        """Stop the running callee (it finishes the calls it runs) and join its workers."""
        if self.callee is not None:
            self.callee.stop()


@pytest.fixture
def juggler_callee(juggler_broker: Any) -> Iterator[CalleeFixture]:
    """A callee pool on ``juggler_broker``: ``juggler_callee.register("math.add", add)``
    serves ``math.add`` at once. Stopped, its workers joined, after the test."""
    callee = CalleeFixture(juggler_broker)
    try:
        yield callee
    finally:
        callee.stop()


@pytest.fixture
def juggler_client(juggler_server: Any) -> Iterator[Any]:
    """A :class:`~juggler.Client` connected to ``juggler_server``; closed after the test."""
    from .client import Client

    client = Client.connect(juggler_server.url)
    try:
        yield client
    finally:
        client.close()
