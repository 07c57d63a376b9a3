"""End to end through the juggler Client, on fakeredis and on a real redis-server."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import wait

import pytest

import juggler
from juggler import (
    Callee,
    CallExpired,
    Client,
    ConnectionClosed,
    HandshakeError,
    NackError,
    RedisBroker,
    RemoteError,
    Server,
)
from juggler.broker import calls_key, results_key
from juggler.message import ResultPayload

from .conftest import T, juggler_threads, make_redis_client


@pytest.fixture(params=["fake", "real", "cluster"])
def redis_client(request):
    """The end-to-end scenarios run on fakeredis, a redis-server and a Redis Cluster."""
    client = make_redis_client(request.param, request)
    yield client
    client.close()


def test_call_returns_result(stack):
    c = stack.client()
    assert c.call("test.echo", "hi", timeout=T(5)) == "hi"
    assert c.call("test.echo", {"a": [1, "x", None, 2.5]}, timeout=T(5)) == {"a": [1, "x", None, 2.5]}


def test_call_async_and_none_args(stack):
    c = stack.client()
    fut = c.call_async("test.echo", [1, 2], timeout=T(5))
    assert fut.result(T(5)) == [1, 2]
    assert c.call("test.echo", None, timeout=T(5)) is None


def test_reverse_returns_reversed_string(stack):
    c = stack.client()
    assert c.call("test.reverse", "abc", timeout=T(5)) == "cba"


def test_error_result_raises_remote_error_and_callee_keeps_serving(stack):
    c = stack.client()
    with pytest.raises(RemoteError) as info:
        c.call("test.fail", "boom", timeout=T(5))
    assert info.value.message == "failed on purpose: boom"
    assert info.value.result == {"error": {"message": "failed on purpose: boom", "type": "RuntimeError"}}
    assert info.value.type == "RuntimeError"
    assert str(info.value) == "RuntimeError: failed on purpose: boom"  # as Python's last traceback line
    assert c.call("test.echo", 1, timeout=T(5)) == 1
    assert stack.callee.stats.errors == 1


def test_nack_when_call_list_is_full(make_stack):
    stack = make_stack(call_cap=1)
    c = stack.client()
    first = c.call_async("nobody.home", 1, timeout=T(0.5))
    with pytest.raises(NackError) as info:
        c.call("nobody.home", 2, timeout=T(5))
    assert info.value.code == 500
    assert info.value.message == "list capacity exceeded"
    # the first call still ends, exactly once: nobody serves it, so it expires
    with pytest.raises(CallExpired):
        first.result(T(5))


def test_nack_for_call_without_uri(stack):
    c = stack.client()
    with pytest.raises(NackError) as info:
        c.call("", 1, timeout=T(5))
    assert info.value.code == 400


def written_so_far(c: Client) -> None:
    """Return once the server has counted every message it wrote to ``c`` before now: a
    message is counted just after it is written, and this PUB's ACK is written after them."""
    c.pub("test.sync", None)


def test_slow_callee_gives_call_expired_and_no_late_result(stack):
    c = stack.client()
    with pytest.raises(CallExpired):
        c.call("test.delay", 600, timeout=0.2)
    # wait until the callee has finished the slow call and dropped its result
    assert stack.callee.stats.wait_for(lambda s: s.expired >= 1 and s.busy == 0, T(5))
    # results are delivered in the order they were stored: a late RES would come first
    assert c.call("test.echo", "after", timeout=T(5)) == "after"
    written_so_far(c)
    assert stack.server.stats.snapshot().get("write_RES") == 1


def test_server_drops_expired_results(stack):
    c = stack.client()
    assert c.call("test.echo", "first", timeout=T(5)) == "first"  # the server has registered it
    conn = stack.server.connections[0]
    # a result whose timeout key is gone has expired: the server must not forward it
    stack.redis.lpush(results_key(conn.uuid), ResultPayload(conn.uuid, juggler.message.new_uuid(), "x", 1).to_json())
    assert c.call("test.echo", "fresh", timeout=T(5)) == "fresh"
    written_so_far(c)
    stats = stack.server.stats.snapshot()
    assert stats.get("expired_results") == 1
    assert stats.get("write_RES") == 2  # "first" and "fresh", not the expired one


@pytest.mark.parametrize("max_calls_in_flight", [1000, 0])
def test_server_drops_a_live_result_for_a_call_not_in_flight(make_stack, max_calls_in_flight):
    """A result redis still holds alive (its timeout key has time left) for a call the
    connection does not have in flight (NACKed, expired by its own count, or never made):
    no RES (issue 20: a redis that stalled stores late, and counts its TTL from then). With
    or without a limit on calls in flight, which is what the connection counts them for."""
    stack = make_stack(max_calls_in_flight=max_calls_in_flight)
    c = stack.client()
    assert c.call("test.echo", "first", timeout=T(5)) == "first"  # the server has registered it
    conn = stack.server.connections[0]
    stack.broker.store_result(ResultPayload(conn.uuid, juggler.message.new_uuid(), "x", 1), T(30))
    assert c.call("test.echo", "fresh", timeout=T(5)) == "fresh"
    written_so_far(c)
    stats = stack.server.stats.snapshot()
    assert stats.get("expired_results") == 1
    assert stats.get("write_RES") == 2  # "first" and "fresh", not the one not in flight
    assert c.received["RES"] == 2
    assert not conn._calls  # (each call left the count when its result came)


def test_many_concurrent_calls_from_many_clients(stack):
    clients = [stack.client() for _ in range(8)]
    futures = {}
    for i, c in enumerate(clients):
        for j in range(40):
            futures[(i, j)] = c.call_async("test.echo", {"client": i, "n": j}, timeout=T(20))
    done, not_done = wait(futures.values(), timeout=T(30))
    assert not not_done
    for (i, j), fut in futures.items():
        assert fut.result() == {"client": i, "n": j}


def test_calls_from_many_threads_on_one_client(stack):
    c = stack.client()
    results: dict[int, object] = {}

    def worker(n: int) -> None:
        for k in range(20):
            results[n * 100 + k] = c.call("test.echo", n * 100 + k, timeout=T(20))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T(30))
    assert results == {k: k for k in results} and len(results) == 120


def test_pubsub_channel_and_pattern_across_clients(stack):
    a = stack.client()
    b = stack.client()
    plain = a.sub("news.today")
    pat = b.sub("news.*", pattern=True)
    ack = a.pub("news.today", {"title": "x"})
    assert ack.channel == "news.today"
    ev = plain.get(T(5))
    assert (ev.channel, ev.pattern, ev.args) == ("news.today", "", {"title": "x"})
    ev = pat.get(T(5))
    assert (ev.channel, ev.pattern, ev.args) == ("news.today", "news.*", {"title": "x"})
    # the pattern also matches other channels, the plain subscription does not
    b.pub("news.sport", [1])
    ev = pat.get(T(5))
    assert (ev.channel, ev.pattern, ev.args) == ("news.sport", "news.*", [1])


def test_unsb_stops_delivery_and_ends_iteration(stack):
    a = stack.client()
    b = stack.client()
    sub = a.sub("chan.x")
    marker = a.sub("chan.marker")
    b.pub("chan.x", 1)
    assert sub.get(T(5)).args == 1
    a.unsb("chan.x")
    assert list(sub) == []  # iteration ends once unsubscribed
    b.pub("chan.x", 2)  # not delivered any more...
    b.pub("chan.marker", "m")  # ...and this one, published after it, proves it
    assert marker.get(T(5)).args == "m"
    assert sub.get(0) is None


def test_pattern_unsb(stack):
    a = stack.client()
    sub = a.sub("p.*", pattern=True)
    a.unsb("p.*", pattern=True)
    assert sub.get(T(1)) is None


def test_allowed_messages_enforced(stack):
    c = stack.client(allowed_messages=["call"])
    assert c.call("test.echo", 1, timeout=T(5)) == 1
    with pytest.raises(ConnectionClosed) as info:
        c.sub("not.allowed")
    assert info.value.code == 1008
    assert c.close_code == 1008
    # every other connection is untouched
    assert stack.client().call("test.echo", 2, timeout=T(5)) == 2


def test_pub_only_connection_has_no_redis_listeners(stack):
    c = stack.client(allowed_messages="pub")
    c.pub("x", 1)
    (conn,) = stack.server.connections
    roles = sorted(t.name.rsplit("-", 1)[1] for t in threading.enumerate() if t.name.startswith(f"juggler-conn-{conn.id}-"))
    assert roles == ["reader", "writer"]


def test_pending_call_gets_connection_closed_on_server_shutdown(stack):
    c = stack.client()
    fut = c.call_async("nobody.home", 1, timeout=T(30))
    stack.server.shutdown()
    with pytest.raises(ConnectionClosed) as info:
        fut.result(T(10))
    assert info.value.code == 1001
    with pytest.raises(ConnectionClosed):
        c.call("test.echo", 1)


def test_subscription_iteration_ends_on_close(stack):
    c = stack.client()
    sub = c.sub("a")
    c.close()
    assert list(sub) == []


def test_handshake_error_names_the_problem(stack):
    with pytest.raises(HandshakeError) as info:
        Client.connect(stack.server.url.replace("/ws", "/nope"), connect_timeout=T(5))
    assert info.value.status == 404
    with pytest.raises(HandshakeError) as info:
        Client.connect(stack.server.url, allowed_messages="call,dance", connect_timeout=T(5))
    assert info.value.status == 400
    assert "dance" in str(info.value)


def test_result_list_deleted_and_lists_expire(stack):
    c = stack.client()
    c.call_async("nobody.home", 1, timeout=T(30))
    assert c.call("test.echo", 1, timeout=T(5)) == 1  # the server has registered the connection
    conn = stack.server.connections[0]
    # a call to a URI nobody serves does not stay in redis forever
    ttl = stack.redis.pttl(calls_key("nobody.home"))
    assert 0 < ttl <= T(30) * 1000
    c.close()
    stack.server.shutdown()
    assert not stack.redis.exists(results_key(conn.uuid))


def test_two_servers_share_one_redis(stack):
    other = Server(stack.broker).start()
    try:
        b = Client.connect(other.url, connect_timeout=T(5))
        try:
            a = stack.client()
            sub = b.sub("shared")
            a.pub("shared", "from a")
            assert sub.get(T(5)).args == "from a"
            assert b.call("test.echo", "via b", timeout=T(5)) == "via b"
        finally:
            b.close()
    finally:
        other.shutdown()


def test_separate_pubsub_broker(redis_client):
    import fakeredis

    other = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    rpc, ps = RedisBroker(redis_client), RedisBroker(other)
    callee = Callee(rpc, workers=1, block=0.05)
    callee.register("test.echo", lambda a: a)
    with Server(rpc, pubsub_broker=ps) as server, callee:
        with Client.connect(server.url, connect_timeout=T(5)) as c:
            sub = c.sub("ch")
            assert other.pubsub_numsub("ch") == [(b"ch", 1)]
            c.pub("ch", 7)
            assert sub.get(T(5)).args == 7
            assert c.call("test.echo", 8, timeout=T(5)) == 8


def test_shutdown_joins_every_thread(redis_client):
    broker = RedisBroker(redis_client)
    server = Server(broker).start()
    callee = Callee(broker, workers=3, block=0.05)
    callee.register("test.echo", lambda a: a)
    callee.start()
    clients = [Client.connect(server.url, connect_timeout=T(5)) for _ in range(3)]
    for c in clients:
        c.sub("x")
        assert c.call("test.echo", 1, timeout=T(5)) == 1
    assert len(juggler_threads()) >= 3 * 4 + 3 + 1
    callee.stop()
    server.shutdown()
    for c in clients:
        assert c.wait_closed(T(5))
        assert c.close_code == 1001
        c.close()
    assert juggler_threads() == []
    # idempotent
    server.shutdown()
    callee.stop()
    clients[0].close()


def test_exports_match_the_docs():
    documented = {
        "RedisBroker", "Server", "Callee", "Client", "Subscription", "Conn", "process_msg", "Broker",
        "ConnState", "chain", "log_messages", "recover", "RefuseConnection",
        "MessageType", "Call", "Pub", "Sub", "Unsb", "Ack", "Nack", "Res", "Evnt", "Position", "HistoryRule", "publish",
        "JugglerError", "ProtocolError", "BrokerError", "CapacityExceeded", "PayloadTooLarge",
        "HandshakeError", "Refusal", "ConfigError",
        "ConnectionClosed", "NackError", "RemoteError", "JugglerTimeout", "CallExpired", "AckTimeout", "Stopped",
    }  # fmt: skip
    assert set(juggler.__all__) == documented
    for name in documented:
        assert getattr(juggler, name) is not None


def test_import_does_not_configure_logging():
    code = "import logging, juggler; assert logging.getLogger().handlers == [], logging.getLogger().handlers"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=T(30))


def test_quickstart_example_runs():
    """The README's "run it" command works (on fakeredis: no JUGGLER_REDIS_URL)."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "JUGGLER_REDIS_URL"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, str(root / "examples" / "quickstart.py")],
        check=True, capture_output=True, text=True, timeout=T(60), env=env,
    ).stdout  # fmt: skip
    assert "call test.echo -> hello" in out
    assert "call test.reverse -> relgguj" in out
    assert "event on news.today (pattern news.*): {'title': 'juggler 0.1'}" in out


def test_unsb_of_a_channel_never_subscribed_is_acked(stack):
    c = stack.client()
    assert c.unsb("never.subscribed").channel == "never.subscribed"
    assert c.unsb("never.*", pattern=True).channel == "never.*"
    c.sub("then.one")  # the connection's pub-sub still works afterwards
    c.pub("then.one", 1)


def test_more_connections_than_the_redis_pool_holds(stack):
    """Each connection's listeners (BRPOP, pub-sub) hold redis connections of their own, not
    the shared pool's (redis-py caps a pool at 100): with 110 connections open, idle listeners
    do not starve anyone's requests."""
    clients = [stack.client() for _ in range(110)]
    for i, c in enumerate(clients):
        assert c.call("test.echo", i, timeout=T(10)) == i
    for c in clients[:3]:
        c.sub("still.works")


def test_burst_of_calls_over_a_blocking_pool(redis_server):
    """A burst of concurrent requests larger than the pool waits for a connection instead of
    failing, with the BlockingConnectionPool the docs recommend (and the CLI uses)."""
    import redis

    client = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(redis_server.url, max_connections=8, timeout=T(10)))
    broker = RedisBroker(client)
    callee = Callee(broker, workers=4, block=0.05)
    callee.register("test.echo", lambda a: a)
    with Server(broker) as server, callee:
        clients = [Client.connect(server.url, connect_timeout=T(5)) for _ in range(40)]
        try:
            futures = [c.call_async("test.echo", i, timeout=T(30)) for i, c in enumerate(clients)]
            assert [f.result(T(30)) for f in futures] == list(range(40))
        finally:
            for c in clients:
                c.close()
    client.close()


def test_call_over_max_timeout_is_nacked(make_stack):
    stack = make_stack(max_call_timeout=5.0)
    c = stack.client()
    with pytest.raises(NackError) as info:
        c.call("test.echo", 1, timeout=6.0)
    assert info.value.code == 400 and "maximum of 5 s" in info.value.message
    assert c.call("test.echo", 1, timeout=5.0) == 1


def _silent_server():
    """A server that completes the websocket handshake, then never reads again."""
    import base64
    import hashlib
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    accepted = []

    def serve():
        conn, _ = srv.accept()
        accepted.append(conn)
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Protocol: juggler.0\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")  # fmt: skip

    t = threading.Thread(target=serve, name="test-silent-server")
    t.start()
    return srv, t, accepted


def test_client_calls_expire_and_close_returns_when_the_server_stops_reading():
    import time

    srv, t, accepted = _silent_server()
    try:
        c = Client.connect(f"ws://127.0.0.1:{srv.getsockname()[1]}/ws", connect_timeout=T(5))
        c.close_timeout = 0.5
        t.join(T(5))
        big = "x" * (1 << 20)  # fills the socket buffers: the writer blocks, callers must not
        futures = [c.call_async("x", big, timeout=0.5) for _ in range(20)]
        started = time.monotonic()
        with pytest.raises(CallExpired):
            c.call("x", 1, timeout=0.5)
        assert time.monotonic() - started < T(2)
        for f in futures:
            with pytest.raises(CallExpired):
                f.result(T(5))
        started = time.monotonic()
        c.close()
        assert time.monotonic() - started < T(3)
    finally:
        for s in accepted:
            s.close()
        srv.close()
