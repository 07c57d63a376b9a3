"""Idle connections cost nothing (issue 8): no wake-ups, no redis connections and commands, at
most two threads each, and nothing left behind once they close.

Connections here are raw sockets opened from the test thread through one selector, as a load
tool would, so the test process holds no thread per connection of its own.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time

import fakeredis
import pytest
import redis

from juggler import Client, RedisBroker, Server
from juggler.server import ConnState

from .conftest import T, start_redis_server, stop_redis_server

HANDSHAKE = (
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Protocol: juggler.0\r\n\r\n"
).encode("ascii")


def open_idle(server: Server, n: int, in_flight: int = 200) -> list[socket.socket]:
    """Open ``n`` websockets to ``server`` and return them once every one got its 101."""
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, bytearray] = {}
    done: list[socket.socket] = []
    started = 0
    deadline = time.monotonic() + T(60)
    try:
        while len(done) < n:
            while started < n and len(pending) < in_flight:
                s = socket.create_connection((server.host, server.port), timeout=T(10))
                s.sendall(HANDSHAKE)
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
                pending[s] = bytearray()
                started += 1
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {len(done)} of {n} connections opened in time"
            for key, _ in sel.select(remaining):
                s = key.fileobj
                data = s.recv(4096)
                assert data, "the server closed a connection during its handshake"
                buf = pending[s]
                buf += data
                if b"\r\n\r\n" in buf:
                    assert buf.startswith(b"HTTP/1.1 101 "), bytes(buf)
                    sel.unregister(s)
                    del pending[s]
                    done.append(s)
    except BaseException:
        for s in list(pending) + done:
            s.close()
        raise
    finally:
        sel.close()
    return done


class Counter:
    """An ``on_state`` hook that counts CONNECTED and CLOSED, and waits for counts."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.connected = self.closed = 0

    def __call__(self, conn, state) -> None:
        with self.cond:
            if state is ConnState.CONNECTED:
                self.connected += 1
            elif state is ConnState.CLOSED:
                self.closed += 1
            self.cond.notify_all()

    def wait(self, connected: int = 0, closed: int = 0, timeout: float = 30) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: self.connected >= connected and self.closed >= closed, T(timeout))
        assert ok, f"connected {self.connected}/{connected}, closed {self.closed}/{closed}"


def switches(thread: threading.Thread) -> int:
    """How often ``thread`` has been switched out (it slept, or was preempted)."""
    total = 0
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        for line in f:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def conn_threads(conn_id: int) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"juggler-conn-{conn_id}-")]


def listeners(r: redis.Redis) -> tuple[int, int]:
    """Redis' count of its pub-sub connections and of its clients blocked in BRPOP."""
    clients = r.client_list()
    return sum("P" in c["flags"] for c in clients), sum(c["cmd"] == "brpop" for c in clients)


def redis_clients(r: redis.Redis) -> int:
    return int(r.info("clients")["connected_clients"])


@pytest.fixture
def own_redis():
    """A redis-server of this test's own, so that its clients and commands are the test's."""
    rp = start_redis_server()
    client = redis.Redis.from_url(rp.url)
    yield client
    client.close()
    stop_redis_server(rp)


@pytest.mark.realredis
def test_idle_connections_sleep_and_send_redis_nothing(own_redis):
    counter = Counter()
    broker = RedisBroker(redis.Redis.from_url(f"redis://127.0.0.1:{own_redis.connection_pool.connection_kwargs['port']}/0"))
    with Server(broker, on_state=counter) as server:
        socks = open_idle(server, 20)
        try:
            counter.wait(connected=20)
            conns = server.connections
            threads = [t for c in conns for t in conn_threads(c.id)]
            assert len(threads) == 40  # a reader and a writer each, nothing else
            # Let each thread finish going to sleep (CONNECTED is announced just before the
            # reader enters its first read): settled once a fifth of a second passes quietly.
            deadline = time.monotonic() + T(10)
            before_switches = [switches(t) for t in threads]
            while True:
                time.sleep(0.2)  # part of the measurement: a quiet interval
                now = [switches(t) for t in threads]
                if now == before_switches or time.monotonic() > deadline:
                    break
                before_switches = now
            before = own_redis.info("commandstats")
            time.sleep(1.5)  # the quiet interval being measured: nothing may happen in it
            after = own_redis.info("commandstats")
            woke = {t.name: switches(t) - n for t, n in zip(threads, before_switches) if switches(t) != n}
            assert woke == {}, f"idle connection threads woke up: {woke}"
            changed = {k: (before.get(k, {}).get("calls", 0), v["calls"]) for k, v in after.items()
                       if v["calls"] != before.get(k, {}).get("calls", 0)}  # fmt: skip
            assert set(changed) <= {"cmdstat_info"}, f"redis commands while idle: {changed}"
        finally:
            for s in socks:
                s.close()
        counter.wait(closed=20)
    broker.client.close()


def test_listeners_start_with_the_first_call_and_sub(make_stack):
    """(The redis connections they take are counted on a redis of the test's own, below: here
    the callee's and the pool's come and go.)"""
    counter = Counter()
    stack = make_stack(on_state=counter)
    c = stack.client()
    counter.wait(connected=1)  # the client may see the 101 before the server registers it
    (conn,) = stack.server.connections
    assert sorted(t.name.rsplit("-", 1)[1] for t in conn_threads(conn.id)) == ["reader", "writer"]
    assert conn._results is None  # no redis connection for it yet
    assert not [t for t in threading.enumerate() if t.name == "juggler-server-pubsub"]
    assert c.call("test.echo", "x", timeout=T(5)) == "x"
    assert sorted(t.name.rsplit("-", 1)[1] for t in conn_threads(conn.id)) == ["reader", "results", "writer"]
    assert conn._results is not None
    c.sub("a")
    c.sub("b.*", pattern=True)
    other = stack.client()
    other.sub("a")
    # one pub-sub reader and one redis pub-sub connection for the whole server
    assert len([t for t in threading.enumerate() if t.name == "juggler-server-pubsub"]) == 1
    assert stack.server.hub.subscriptions() == {(False, "a"), (True, "b.*")}
    assert sorted(t.name.rsplit("-", 1)[1] for t in conn_threads(conn.id)) == ["reader", "results", "writer"]


@pytest.mark.realredis
def test_a_call_and_subscriptions_take_one_redis_connection_each_plus_one_per_server(own_redis):
    port = own_redis.connection_pool.connection_kwargs["port"]
    broker = RedisBroker(redis.Redis.from_url(f"redis://127.0.0.1:{port}/0"))
    broker.client.ping()  # the pool's connection, made now
    with Server(broker) as server:
        clients = [Client.connect(server.url, connect_timeout=T(10)) for _ in range(3)]
        try:
            assert listeners(own_redis) == (0, 0)
            for c in clients:
                c.sub("news")
            assert listeners(own_redis) == (1, 0)  # the server's one pub-sub connection
            for i, c in enumerate(clients):
                c.call_async("nobody.serves", i, timeout=T(30))
            deadline = time.monotonic() + T(5)
            while listeners(own_redis) != (1, 3) and time.monotonic() < deadline:
                time.sleep(0.01)  # a bounded poll of redis' view of its clients
            assert listeners(own_redis) == (1, 3)  # and a results connection per caller
        finally:
            for c in clients:
                c.close()
    broker.client.close()


def _fake(client) -> bool:
    return "fakeredis" in type(client).__module__


@pytest.mark.realredis
def test_two_thousand_connections_leave_nothing_behind(own_redis):
    n = 2000
    port = own_redis.connection_pool.connection_kwargs["port"]
    counter = Counter()
    broker = RedisBroker(redis.Redis.from_url(f"redis://127.0.0.1:{port}/0"))
    with Server(broker, on_state=counter, max_connections=n) as server:
        # a few connections call and subscribe, so there are listeners to give back too
        with Client.connect(server.url, connect_timeout=T(10)) as c:
            c.sub("news")
        counter.wait(connected=1, closed=1)
        baseline_clients = redis_clients(own_redis)  # first: it opens the test's own connection
        baseline_threads = {t.name for t in threading.enumerate()}
        baseline_fds = len(os.listdir("/proc/self/fd"))
        started = time.monotonic()
        socks = open_idle(server, n)
        try:
            counter.wait(connected=n + 1)
            opened = time.monotonic() - started
            assert len(server.connections) == n
            assert server.connection_thread_count() == 2 * n
            assert redis_clients(own_redis) == baseline_clients  # idle: no redis connection
        finally:
            for s in socks:
                s.close()
        counter.wait(closed=n + 1)
        gone = time.monotonic()
        # Everything is given back by the time CLOSED is announced; allow the threads a moment
        # to finish returning (bounded, and checked as soon as they are done).
        deadline = gone + T(3)
        while time.monotonic() < deadline and (
            {t.name for t in threading.enumerate()} - baseline_threads or len(os.listdir("/proc/self/fd")) > baseline_fds
        ):
            time.sleep(0.01)  # a bounded poll of observable state, not a guess
        assert {t.name for t in threading.enumerate()} - baseline_threads == set()
        assert len(os.listdir("/proc/self/fd")) <= baseline_fds
        assert redis_clients(own_redis) == baseline_clients
    broker.client.close()
    print(f"{n} connections opened in {opened:.2f} s")


def test_shutdown_with_many_idle_connections_is_prompt(redis_client):
    broker = RedisBroker(redis_client)
    counter = Counter()
    server = Server(broker, on_state=counter, close_timeout=0.5).start()
    socks = open_idle(server, 300)
    try:
        counter.wait(connected=300)
        started = time.monotonic()
        server.shutdown()
        took = time.monotonic() - started
        # the peers never answer the close frame: each connection waits its close_timeout
        assert took < 0.5 + T(3), f"shutdown took {took:.2f} s"
        assert counter.closed == 300
        assert not [t for t in threading.enumerate() if t.name.startswith("juggler-")]
    finally:
        for s in socks:
            s.close()
