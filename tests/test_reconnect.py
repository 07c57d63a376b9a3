"""Client.connect(url, reconnect=True): a server restarted on the same port mid-subscription."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from juggler import Callee, Client, ConnectionClosed, HandshakeError, Nack, NackError, RedisBroker, Server, Sub, chain, recover
from juggler.dial import backoff_delays

from .conftest import T, free_port

__all__: list[str] = []


class Events:
    """What the on_reconnect hook was called with, in order."""

    def __init__(self) -> None:
        self.seen: list = []
        self.cond = threading.Condition()

    def __call__(self, client, lost) -> None:
        with self.cond:
            self.seen.append(lost)
            self.cond.notify_all()

    def wait(self, n: int) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.seen) >= n, T(20)), self.seen
            return list(self.seen)


@pytest.fixture
def broker(redis_client):
    return RedisBroker(redis_client)


@pytest.fixture
def servers(broker):
    """Start servers on one port, one after the other; all shut down at the end."""
    port = free_port()
    started: list[Server] = []

    def start(**kw) -> Server:
        s = Server(broker, port=port, **kw).start()
        started.append(s)
        return s

    start.port = port
    yield start
    for s in started:
        s.shutdown()


@pytest.fixture
def gate(broker):
    """A callee serving "slow" (waits for the gate) and "echo"; the gate opens at the end."""
    opened = threading.Event()
    callee = Callee(broker, workers=2, block=0.05)
    callee.register("slow", lambda a: opened.wait(T(30)) and a)
    callee.register("echo", lambda a: a)
    callee.start()
    yield opened
    opened.set()
    callee.stop()


def test_server_restart_mid_subscription(servers, gate, caplog):
    caplog.set_level("INFO", logger="juggler.client")
    server = servers()
    events = Events()
    client = Client.connect(server.url, reconnect=True, on_reconnect=events, connect_timeout=T(10))
    try:
        sub = client.sub("news")
        pattern = client.sub("news.*", pattern=True)
        it = iter(sub)
        with Client.connect(server.url) as publisher:
            publisher.pub("news", 1)
        assert next(it).args == 1
        slow = client.call_async("slow", "x", timeout=T(30))  # in flight when the server goes

        server.shutdown()  # closes every connection with 1001, and stops listening
        with pytest.raises(ConnectionClosed) as info:
            slow.result(T(10))
        assert info.value.code == 1001
        lost = events.wait(1)[0]
        assert isinstance(lost, ConnectionClosed) and lost.code == 1001
        # while it is down: calls fail at once, the client is not closed
        assert not client.closed
        with pytest.raises(ConnectionClosed):
            client.call("echo", 1, timeout=T(5))

        server = servers()  # the same port
        assert client.wait_connected(T(20))
        assert events.wait(2)[1] is None  # back, with its subscriptions renewed
        assert client.connected and not client.closed
        with Client.connect(server.url) as publisher:
            publisher.pub("news", 2)
            publisher.pub("news.today", 3)
        assert next(it).args == 2  # the same iteration, across the gap
        assert pattern.get(T(5)).args == 3
        assert client.call("echo", "back", timeout=T(5)) == "back"
    finally:
        client.close()
    assert client.closed and not client.wait_connected(0)
    assert list(it) == []  # close() ends the iteration
    messages = [r.getMessage() for r in caplog.records if r.name == "juggler.client"]
    assert any("lost (1001" in m and "reconnecting; 1 call(s) in flight ended" in m for m in messages), messages
    assert any("reconnected to" in m and "renewing 2 subscription(s)" in m for m in messages), messages


def test_close_while_waiting_to_reconnect_stops_it_and_joins_its_threads(servers):
    server = servers()
    events = Events()
    client = Client.connect(server.url, reconnect=True, max_reconnect_delay=30.0, on_reconnect=events,
                            connect_timeout=T(10))  # fmt: skip
    sub = client.sub("news")
    server.shutdown()
    events.wait(1)  # lost
    assert not client.connected
    assert not client.wait_connected(0.3)  # nothing listens: it keeps trying
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < T(2)
    assert not any(t.name.startswith(f"juggler-client-{client.id}-") for t in threading.enumerate())
    assert sub.get(T(1)) is None  # ended normally by close()


def test_a_subscription_the_new_server_refuses_ends_with_the_nack(servers):
    def no_subs(next_handler):
        def handle(conn, msg):
            if isinstance(msg, Sub):
                conn.send(Nack(msg, 403, "no more subscriptions"))
                return
            next_handler(conn, msg)

        return handle

    server = servers()
    events = Events()
    client = Client.connect(server.url, reconnect=True, on_reconnect=events, connect_timeout=T(10))
    try:
        sub = client.sub("news")
        server.shutdown()
        events.wait(1)
        servers(handler=chain(recover(), no_subs))
        assert client.wait_connected(T(20))
        with pytest.raises(NackError, match="no more subscriptions"):
            sub.get(T(5))
    finally:
        client.close()


def test_without_reconnect_a_lost_connection_closes_the_client(servers):
    server = servers()
    client = Client.connect(server.url, connect_timeout=T(10))
    sub = client.sub("news")
    server.shutdown()
    assert client.wait_closed(T(10)) and client.closed
    servers()  # back on the same port: this client stays closed
    assert sub.get(T(1)) is None  # 1001 going away: the iteration ends
    assert not client.wait_connected(0)
    client.close()


def test_backoff_doubles_up_to_the_cap_with_jitter():
    low = backoff_delays(0.1, 1.0, rng=lambda: 0.0)
    high = backoff_delays(0.1, 1.0, rng=lambda: 0.999999)
    assert [round(next(low), 4) for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    assert [round(next(high), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    drawn = backoff_delays(0.1, 1.0)
    firsts = [next(drawn) for _ in range(4)]
    assert all(0.05 * 2**i <= d <= 0.1 * 2**i for i, d in enumerate(firsts))
    later = [next(drawn) for _ in range(50)]
    assert all(0.5 <= d <= 1.0 for d in later) and len(set(later)) > 1  # capped, and jittered


def test_bad_reconnect_delay_is_refused():
    with pytest.raises(ValueError, match="max_reconnect_delay"):
        Client.connect("ws://127.0.0.1:1/ws", reconnect=True, max_reconnect_delay=0)


# -- the first connect (issue 22) ----------------------------------------------------------------


class Attempts(logging.Handler):
    """Counts the failed first-connect attempts logged; ``failed`` is set at the first."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.failed = threading.Event()

    def emit(self, record) -> None:
        if "failed (attempt" in record.getMessage():
            self.count += 1
            self.failed.set()


@pytest.fixture
def attempts():
    logger = logging.getLogger("test.first-connect")
    handler = Attempts()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, handler
    logger.removeHandler(handler)


def test_a_reconnecting_client_waits_for_a_server_not_up_yet(servers, attempts):
    logger, seen = attempts
    url = f"ws://127.0.0.1:{servers.port}/ws"
    started: list[Server] = []

    def start_late() -> None:
        if seen.failed.wait(T(20)):  # the client has tried once, and failed: now start it
            started.append(servers())

    t = threading.Thread(target=start_late, name="test-start-late")
    t.start()
    try:
        with Client.connect(url, reconnect=True, connect_timeout=T(20), logger=logger) as client:
            assert client.connected and seen.count >= 1
    finally:
        t.join()
    assert started


def test_a_reconnecting_client_gives_up_after_connect_timeout(attempts):
    logger, seen = attempts
    begin = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        Client.connect(f"ws://127.0.0.1:{free_port()}/ws", reconnect=True, connect_timeout=0.5, logger=logger)
    assert 0.5 <= time.monotonic() - begin < T(5)
    assert seen.count >= 2  # it tried again


def test_a_reconnecting_client_does_not_retry_a_final_refusal(servers, attempts):
    logger, seen = attempts
    server = servers()
    with pytest.raises(HandshakeError) as info:
        Client.connect(server.url.replace("/ws", "/nowhere"), reconnect=True, connect_timeout=T(20), logger=logger)
    assert info.value.status == 404 and seen.count == 0


def test_without_reconnect_the_first_connect_fails_at_once():
    with pytest.raises(ConnectionRefusedError):
        Client.connect(f"ws://127.0.0.1:{free_port()}/ws", connect_timeout=T(20))
