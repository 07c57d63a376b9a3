"""The production server: middleware, state hook, limits, slow clients, keepalive, origin, TLS,
health and metrics."""

from __future__ import annotations

import importlib.util
import json
import logging
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import websocket
from prometheus_client.parser import text_string_to_metric_families

from juggler import (
    Callee,
    Client,
    ConnectionClosed,
    ConnState,
    Evnt,
    HandshakeError,
    Nack,
    NackError,
    Pub,
    RedisBroker,
    RefuseConnection,
    RemoteError,
    Server,
    chain,
    log_messages,
    recover,
)
from juggler.metrics import CalleeMetrics

from juggler import jsondepth
from juggler.jsondepth import MAX_JSON_DEPTH

from .conftest import T, free_port
from .test_out_of_threads import failing_thread_starts

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parent.parent


class StateLog:
    """An on_state hook that records every state and lets tests wait for closes."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ConnState, int | None, str]] = []
        self.cond = threading.Condition()

    def __call__(self, conn, state: ConnState) -> None:
        with self.cond:
            self.events.append((conn.uuid, state, conn.close_code, conn.close_reason))
            self.cond.notify_all()

    def wait_closed(self, n: int, timeout: float) -> list[tuple[int | None, str]]:
        """Wait for ``n`` CLOSED states; the (close code, reason) of each so far."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self._closed()) >= n, T(timeout)), self.events
            return self._closed()

    def _closed(self) -> list[tuple[int | None, str]]:
        return [(code, reason) for _, s, code, reason in self.events if s is ConnState.CLOSED]


def http_get(url: str, timeout: float = 10) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=T(timeout)) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def base_http(server: Server) -> str:
    return f"http://{server.host}:{server.port}"


def raw_ws(url: str, **kw) -> websocket.WebSocket:
    return websocket.create_connection(url, subprotocols=["juggler.0"], timeout=T(10), **kw)


def read_close(ws: websocket.WebSocket) -> tuple[int, str]:
    """Read frames until the server's close frame; its code and reason."""
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack(">H", data[:2])[0], data[2:].decode()


# -- middleware ------------------------------------------------------------------------------


def test_handler_answers_a_request_itself(make_stack):
    def no_pub(next_handler):
        def handle(conn, msg):
            if isinstance(msg, Pub):
                conn.send(Nack(msg, 403, "forbidden"))
            else:
                next_handler(conn, msg)

        return handle

    stack = make_stack(handler=chain(no_pub))
    c = stack.client()
    with pytest.raises(NackError) as info:
        c.pub("news", 1)
    assert (info.value.code, info.value.message) == (403, "forbidden")
    assert c.call("test.echo", 1, timeout=T(5)) == 1


def test_outgoing_messages_pass_through_the_handler(make_stack):
    seen: list[str] = []

    def censor(next_handler):
        def handle(conn, msg):
            seen.append(msg.type.name)
            if isinstance(msg, Evnt) and msg.channel == "secret":
                return  # dropped: never written
            next_handler(conn, msg)

        return handle

    stack = make_stack(handler=chain(censor))
    c = stack.client()
    assert c.call("test.echo", 1, timeout=T(5)) == 1
    secret, public = c.sub("secret"), c.sub("public")
    c.pub("secret", "s")
    c.pub("public", "p")
    assert public.get(T(5)).args == "p"  # published after the secret one: it came through
    with pytest.raises(TimeoutError):
        secret.get(0)
    assert {"CALL", "ACK", "RES", "SUB", "PUB", "EVNT"} <= set(seen)


def test_chain_runs_middlewares_in_order(make_stack):
    order: list[str] = []

    def mark(name):
        def middleware(next_handler):
            def handle(conn, msg):
                order.append(f"{name}:{msg.type.name}")
                next_handler(conn, msg)

            return handle

        return middleware

    stack = make_stack(handler=chain(mark("a"), mark("b")))
    stack.client().pub("x", 1)
    assert order[:2] == ["a:PUB", "b:PUB"] and order[2:4] == ["a:ACK", "b:ACK"]


def test_log_messages_logs_both_directions(make_stack, caplog):
    stack = make_stack(handler=chain(log_messages()))
    with caplog.at_level(logging.INFO, logger="juggler.messages"):
        assert stack.client().call("test.echo", 1, timeout=T(5)) == 1
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "juggler.messages")
    assert "<- CALL" in text and "test.echo" in text
    assert "-> ACK" in text and "-> RES" in text


def test_a_handler_set_on_a_running_server_sees_what_its_connections_send(make_stack, caplog):
    # the default handler lets a connection write ACK and RES itself (HandlerSlot.writes_as_sent);
    # one set later, on the server, sees them on the connections already open
    stack = make_stack()
    client = stack.client()
    assert client.call("test.echo", 1, timeout=T(5)) == 1
    stack.server.handler = chain(recover(), log_messages())
    with caplog.at_level(logging.INFO, logger="juggler.messages"):
        assert client.call("test.echo", 2, timeout=T(5)) == 2
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "juggler.messages")
    assert "-> ACK" in text and "-> RES" in text
    stack.server.handler = chain(recover())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="juggler.messages"):
        assert client.call("test.echo", 3, timeout=T(5)) == 3
    assert not [r for r in caplog.records if r.name == "juggler.messages"]


def test_recover_closes_only_that_connection_with_1011_logged_once(make_stack, caplog):
    def explode(next_handler):
        def handle(conn, msg):
            if getattr(msg, "uri", "") == "boom":
                raise RuntimeError("handler bug")
            next_handler(conn, msg)

        return handle

    stack = make_stack(handler=chain(recover(), explode))
    bad, good = stack.client(), stack.client()
    with caplog.at_level(logging.ERROR, logger="juggler.middleware"):
        with pytest.raises(ConnectionClosed) as info:
            bad.call("boom", 1, timeout=T(5))
    assert info.value.code == 1011 and info.value.reason == "internal server error"
    assert sum("handler failed" in r.getMessage() for r in caplog.records) == 1
    assert good.call("test.echo", 2, timeout=T(5)) == 2


def test_unrecovered_handler_error_is_contained_too(make_stack):
    def explode(next_handler):
        def handle(conn, msg):
            if getattr(msg, "channel", "") == "boom":
                raise RuntimeError("handler bug")
            next_handler(conn, msg)

        return handle

    stack = make_stack(handler=chain(explode))
    bad, good = stack.client(), stack.client()
    with pytest.raises(ConnectionClosed) as info:
        bad.pub("boom", 1)
    assert info.value.code == 1011
    assert good.call("test.echo", 2, timeout=T(5)) == 2


def test_handlers_see_headers_address_and_keep_state(make_stack):
    seen = []

    def count(next_handler):
        def handle(conn, msg):
            if msg.type.name in ("CALL", "PUB"):
                conn.state["n"] = conn.state.get("n", 0) + 1
                seen.append((conn.request.headers.get("x-team"), conn.remote_addr[0], conn.state["n"]))
            next_handler(conn, msg)

        return handle

    stack = make_stack(handler=chain(count))
    a = stack.client(headers={"X-Team": "red"})
    b = stack.client(headers={"X-Team": "blue"})
    a.pub("x", 1)
    a.pub("x", 2)
    b.pub("x", 3)
    assert seen == [("red", "127.0.0.1", 1), ("red", "127.0.0.1", 2), ("blue", "127.0.0.1", 1)]


# -- connection states -------------------------------------------------------------------------


def test_state_hook_sees_accepting_connected_closed_with_reason(make_stack):
    log = StateLog()
    stack = make_stack(on_state=log)
    c = stack.client()
    c.close()
    ws = raw_ws(stack.server.url)
    try:
        ws.send("not json")
        assert read_close(ws)[0] == 1007
    finally:
        ws.close()
    log.wait_closed(2, 10)
    by_conn: dict[str, list] = {}
    for uuid, state, code, reason in log.events:
        by_conn.setdefault(uuid, []).append((state, code, reason))
    first, second = by_conn.values()  # (dicts keep insertion order: first accepted first)
    assert [s for s, _, _ in first] == [ConnState.ACCEPTING, ConnState.CONNECTED, ConnState.CLOSED]
    assert first[-1][1:] == (1000, "")
    assert [s for s, _, _ in second] == [ConnState.ACCEPTING, ConnState.CONNECTED, ConnState.CLOSED]
    assert second[-1][1] == 1007 and "JSON" in second[-1][2]


def test_state_hook_can_refuse_the_handshake(make_stack):
    def refuse(conn, state):
        if state is ConnState.ACCEPTING and conn.request.headers.get("x-token") != "let-me-in":
            raise RefuseConnection(401, "token required")

    stack = make_stack(on_state=refuse)
    with pytest.raises(HandshakeError) as info:
        stack.client()
    assert info.value.status == 401 and "token required" in str(info.value)
    assert stack.client(headers={"X-Token": "let-me-in"}).call("test.echo", 1, timeout=T(5)) == 1


def test_connection_opened_during_shutdown_still_gets_going_away(make_stack):
    # Shutdown begins between the ACCEPTING hook and the 101: shutdown() cannot see the
    # connection yet, but its client must still get 1001, not a bare end of stream.
    stack = None
    stopper: list[threading.Thread] = []
    log = StateLog()

    def shut_down_now(conn, state):
        log(conn, state)
        if state is ConnState.ACCEPTING:
            t = threading.Thread(target=stack.server.shutdown, name="juggler-test-shutdown")
            t.start()
            stopper.append(t)
            deadline = time.monotonic() + T(10)
            while not stack.server._listener.closing:  # shutdown() sets it first thing, then blocks
                assert time.monotonic() < deadline, "shutdown did not start"
                time.sleep(0.001)

    stack = make_stack(on_state=shut_down_now)
    ws = raw_ws(stack.server.url)
    try:
        assert read_close(ws) == (1001, "server shutting down")
    finally:
        ws.close()
        stopper[0].join(T(10))
    assert not stopper[0].is_alive()
    assert stack.server._slots == 0
    # The hook accepted it, so it hears how it ended, though it never saw CONNECTED.
    assert [e[1:] for e in log.events] == [
        (ConnState.ACCEPTING, None, ""),
        (ConnState.CLOSED, 1001, "server shutting down"),
    ]


def failing_close(close, closed: list[str]):
    """``close``, recording that it ran, then raising."""

    def wrapper() -> None:
        close()
        closed.append("closed")
        raise RuntimeError("cannot close")

    return wrapper


def test_connection_lost_before_the_101_is_announced_closed(make_stack):
    log = StateLog()
    held: list = []

    def cut_off(conn, state):
        log(conn, state)
        if state is ConnState.ACCEPTING and len(log.events) == 1:
            held.append(conn._results)  # a handshake takes no redis connection
            conn._io.sock.shutdown(socket.SHUT_WR)  # the first connection's 101 cannot be sent

    stack = make_stack(on_state=cut_off, max_connections=1)  # the client below needs its slot back
    with pytest.raises(websocket.WebSocketException):
        raw_ws(stack.server.url)
    assert log.wait_closed(1, 10) == [(1006, "connection lost during the handshake")]
    assert [e[1] for e in log.events] == [ConnState.ACCEPTING, ConnState.CLOSED]
    assert held == [None]
    assert stack.server.connections == []
    assert stack.client().call("test.echo", "still serving", timeout=T(5)) == "still serving"


def test_a_failure_to_release_is_logged_once_and_the_rest_is_released(make_stack, caplog):
    log = StateLog()
    stack = make_stack(on_state=log)
    c = stack.client()
    assert c.call("test.echo", 1, timeout=T(5)) == 1
    c.sub("released")
    (conn,) = stack.server.connections
    closed: list[str] = []
    conn._results.close = failing_close(conn._results.close, closed)
    c.close()
    assert log.wait_closed(1, 10) == [(1000, "")]
    assert closed == ["closed"]
    assert [r.getMessage() for r in caplog.records if "could not close" in r.getMessage()] == [
        f"connection {conn.uuid}: could not close its results redis connection"
    ]
    assert stack.server.hub.subscriptions() == set()  # its subscription was dropped all the same
    assert stack.client().call("test.echo", "still serving", timeout=T(5)) == "still serving"


def test_auth_example(make_stack):
    spec = importlib.util.spec_from_file_location("auth_example", ROOT / "examples" / "auth.py")
    auth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auth)
    stack = make_stack(on_state=auth.authenticate, handler=chain(recover(), auth.authorize))
    with pytest.raises(HandshakeError) as info:
        stack.client()
    assert info.value.status == 401
    with pytest.raises(HandshakeError):
        stack.client(headers={"Authorization": "Bearer wrong"})
    bob = stack.client(headers={"Authorization": "Bearer bob-token"})
    assert bob.call("test.echo", "hi", timeout=T(5)) == "hi"
    with pytest.raises(NackError) as info:
        bob.call("test.reverse", "hi", timeout=T(5))
    assert (info.value.code, info.value.message) == (403, "bob may not call test.reverse")
    with pytest.raises(NackError):
        bob.pub("news.today", 1)
    news = bob.sub("news.*", pattern=True)
    alice = stack.client(headers={"Authorization": "Bearer alice-token"})
    assert alice.call("test.reverse", "ab", timeout=T(5)) == "ba"
    alice.pub("news.today", {"by": "alice"})
    assert news.get(T(5)).args == {"by": "alice"}


# -- limits ------------------------------------------------------------------------------------


def test_write_limit_turns_a_large_result_into_an_error_and_drops_large_events(make_stack):
    stack = make_stack(write_limit=2048)
    c = stack.client()
    with pytest.raises(RemoteError) as info:
        c.call("test.echo", "x" * 4096, timeout=T(5))
    assert "write limit of 2048 bytes" in info.value.message
    assert c.call("test.echo", "small", timeout=T(5)) == "small"
    sub = c.sub("big")
    c.pub("big", "y" * 4096)
    c.pub("big", "marker")
    assert sub.get(T(5)).args == "marker"


def test_read_limit_default_is_one_mib(stack):
    assert stack.server.read_limit == 1 << 20
    ws = raw_ws(stack.server.url)
    try:
        ws.send("x" * ((1 << 20) + 1))
        assert read_close(ws)[0] == 1009
    finally:
        ws.close()


def test_idle_connection_is_closed(make_stack):
    stack = make_stack(idle_timeout=0.3, ping_interval=0)
    ws = raw_ws(stack.server.url)
    try:
        code, reason = read_close(ws)
        assert code == 1001 and "idle timeout" in reason
    finally:
        ws.close()


def test_keepalive_pings_keep_an_answering_client(make_stack):
    stack = make_stack(idle_timeout=0.6, ping_interval=0.15)
    ws = raw_ws(stack.server.url)
    try:
        pings = 0
        while pings < 6:  # ~0.9 s, longer than idle_timeout: websocket-client answers each ping
            opcode, data = ws.recv_data(control_frame=True)
            assert opcode == websocket.ABNF.OPCODE_PING, (opcode, data)
            pings += 1
        assert len(stack.server.connections) == 1
    finally:
        ws.close()


def test_juggler_client_answers_keepalive_pings(make_stack):
    stack = make_stack(idle_timeout=0.5, ping_interval=0.1)
    c = stack.client()
    assert not c.wait_closed(T(1.5))  # three idle timeouts without a message of its own
    assert c.call("test.echo", "alive", timeout=T(5)) == "alive"


def test_client_that_does_not_answer_pings_is_closed(make_stack):
    log = StateLog()
    stack = make_stack(idle_timeout=0.5, ping_interval=0.1, on_state=log)
    ws = raw_ws(stack.server.url)
    try:  # never read: pings go unanswered
        assert log.wait_closed(1, 10)[0][0] == 1001
    finally:
        ws.close()


def test_handshake_timeout(make_stack):
    stack = make_stack(handshake_timeout=0.3)
    host, port = stack.server.host, stack.server.port
    with socket.create_connection((host, port), timeout=T(10)) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\n")  # ...and never the rest
        assert s.recv(100) == b""  # the server hung up


def test_max_connections_gets_503(make_stack):
    log = StateLog()
    stack = make_stack(max_connections=2, on_state=log)
    a = stack.client()
    stack.client()
    with pytest.raises(HandshakeError) as info:
        stack.client()
    assert info.value.status == 503 and "connection limit" in str(info.value)
    a.close()
    log.wait_closed(1, 10)
    assert stack.client().call("test.echo", 1, timeout=T(5)) == 1


def test_slow_client_is_disconnected_and_others_do_not_suffer(make_stack):
    log = StateLog()
    stack = make_stack(write_queue_size=8, write_timeout=0.5, on_state=log)
    # A client that subscribes, then never reads again, with small socket buffers.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect((stack.server.host, stack.server.port))
    slow_ws = websocket.WebSocket()
    slow_ws.sock_opt.timeout = T(10)
    slow_ws.connect(stack.server.url, socket=slow, subprotocols=["juggler.0"])
    slow_ws.send(json.dumps({"meta": {"type": 3, "uuid": "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c"}, "payload": {"channel": "flood"}}))
    assert json.loads(slow_ws.recv())["meta"]["type"] == 8
    publisher, caller = stack.client(), stack.client()
    try:
        payload = "z" * 65536
        latencies = []
        for i in range(60):
            publisher.pub("flood", payload)
            started = time.monotonic()
            assert caller.call("test.echo", i, timeout=T(5)) == i
            latencies.append(time.monotonic() - started)
        code, reason = log.wait_closed(1, 10)[0]
        assert code in (1008, 1006), (code, reason)  # queue full past write_timeout, or a write timed out
        assert max(latencies) < T(1.0), latencies  # the caller never waited on the slow client
    finally:
        slow_ws.shutdown()


# -- security ----------------------------------------------------------------------------------


def test_origin_allowlist(make_stack):
    stack = make_stack(allowed_origins=["https://app.example.com", "https://*.example.org"])
    assert stack.client(headers={"Origin": "https://app.example.com"}).call("test.echo", 1, timeout=T(5)) == 1
    assert stack.client(headers={"Origin": "https://eu.example.org"}).call("test.echo", 2, timeout=T(5)) == 2
    assert stack.client().call("test.echo", 3, timeout=T(5)) == 3  # no Origin: not a browser
    with pytest.raises(HandshakeError) as info:
        stack.client(headers={"Origin": "https://evil.example.net"})
    assert info.value.status == 403 and "not allowed" in str(info.value)


def test_tls(redis_client):
    broker = RedisBroker(redis_client)
    callee = Callee(broker, workers=1, block=0.05)
    callee.register("test.echo", lambda a: a)
    server = Server(broker, certfile=str(DATA / "localhost.crt"), keyfile=str(DATA / "localhost.key"))
    assert server.url.startswith("wss://127.0.0.1:")
    with server, callee:
        with Client.connect(server.url, sslopt={"ca_certs": str(DATA / "localhost.crt")}, connect_timeout=T(10)) as c:
            assert c.call("test.echo", "secure", timeout=T(5)) == "secure"
            c.sub("tls")
            c.pub("tls", 1)
        with pytest.raises((HandshakeError, ssl.SSLError, OSError)):  # an untrusted certificate
            Client.connect(server.url, connect_timeout=T(10))
        with pytest.raises((HandshakeError, OSError)):  # plain ws:// to a TLS port
            Client.connect(server.url.replace("wss://", "ws://"), connect_timeout=T(5))


def test_tls_full_duplex_traffic(redis_client):
    # Calls stream out while their results and events stream in, on both ends of each TLS
    # connection at once: reads and writes of one TLS socket must never run concurrently.
    broker = RedisBroker(redis_client)
    callee = Callee(broker, workers=4, block=0.05)
    callee.register("test.echo", lambda a: a)
    server = Server(broker, certfile=str(DATA / "localhost.crt"), keyfile=str(DATA / "localhost.key"))
    payloads = [f"{i}:" + "x" * (i * 997 % 60000) for i in range(150)]
    with server, callee:
        clients = [
            Client.connect(server.url, sslopt={"ca_certs": str(DATA / "localhost.crt")}, connect_timeout=T(10)) for _ in range(3)
        ]
        try:
            sub = clients[0].sub("tls.events")
            futures = [(p, c.call_async("test.echo", p, timeout=T(20))) for p in payloads for c in clients]
            for p in payloads[:50]:
                clients[1].pub("tls.events", p)
            assert all(f.result() == p for p, f in futures)
            assert [sub.get(T(10)).args for _ in payloads[:50]] == payloads[:50]
        finally:
            for c in clients:
                c.close()
    assert [c.close_code for c in clients] == [1000, 1000, 1000]


# -- health and metrics --------------------------------------------------------------------------


def test_healthz(stack):
    status, ctype, body = http_get(base_http(stack.server) + "/healthz")
    assert status == 200 and ctype == "application/json"
    assert json.loads(body) == {"status": "ok", "redis": "ok", "connections": 0}


def test_healthz_when_redis_is_down():
    dead = RedisBroker.from_url(f"redis://127.0.0.1:{free_port()}/0")
    with Server(dead) as server:
        status, _, body = http_get(base_http(server) + "/healthz")
    dead.close()
    assert status == 503
    assert json.loads(body)["status"] == "unavailable" and json.loads(body)["redis"] == "unreachable"


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics(stack):
    c = stack.client()
    for i in range(5):
        c.call("test.echo", i, timeout=T(5))
    sub = c.sub("m")
    c.pub("m", 1)
    sub.get(T(5))
    # Messages are counted once written; this ACK is written after the EVNT, so by the time
    # it arrives the EVNT and every RES before it are counted.
    c.unsb("m")
    status, ctype, body = http_get(base_http(stack.server) + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    m = metric_samples(body)
    assert m[("juggler_messages_read_total", (("type", "CALL"),))] == 5
    assert m[("juggler_messages_read_total", (("type", "PUB"),))] == 1
    assert m[("juggler_messages_written_total", (("type", "RES"),))] == 5
    assert m[("juggler_messages_written_total", (("type", "EVNT"),))] == 1
    assert m[("juggler_connections_active", ())] == 1
    assert m[("juggler_connections_total", ())] == 1
    # the websocket's reader, writer and results threads (pub-sub has none per websocket), and
    # the one serving this scrape
    assert m[("juggler_connection_threads_active", ())] == 4
    assert m[("juggler_call_ack_seconds_count", ())] == 5
    assert m[("juggler_result_delivery_seconds_count", ())] == 5
    for name in ("juggler_expired_results_total", "juggler_failed_event_decodes_total", "juggler_slow_messages_total"):
        assert (name, ()) in m
    c.close()


def test_callee_metrics_endpoint(redis_client):
    broker = RedisBroker(redis_client)
    callee = Callee(broker, workers=2, block=0.05, name="juggler-callee-m")
    callee.register("test.echo", lambda a: a)
    metrics = CalleeMetrics(callee)
    port = metrics.serve(port=0)
    try:
        with Server(broker) as server, callee:
            with Client.connect(server.url, connect_timeout=T(5)) as c:
                for i in range(3):
                    c.call("test.echo", i, timeout=T(5))
            callee.stats.wait_for(lambda s: s.calls == 3, T(5))
            status, _, body = http_get(f"http://127.0.0.1:{port}/metrics")
        m = metric_samples(body)
        assert status == 200
        assert m[("juggler_callee_calls_total", (("callee", "juggler-callee-m"),))] == 3
        assert m[("juggler_callee_workers", (("callee", "juggler-callee-m"),))] == 2
        assert ("juggler_callee_busy_workers", (("callee", "juggler-callee-m"),)) in m
        assert http_get(f"http://127.0.0.1:{port}/other")[0] == 404
    finally:
        metrics.close()


def test_plain_http_to_the_websocket_path_is_426(stack):
    status, _, body = http_get(base_http(stack.server) + "/ws")
    assert status == 426 and "websocket endpoint" in body


def _deep_pub(depth: int) -> str:
    return ('{"meta":{"type":2,"uuid":"797b5a8e-1b6d-4a4e-9a3b-0a6f1f0f7c11"},"payload":{"channel":"c",'
            '"args":' + "[" * depth + "]" * depth + "}}")  # fmt: skip


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5000, 30000])
def test_a_request_nested_deeper_than_the_limit_closes_1007_on_every_python(make_stack, caplog, depth):
    """JSON nested deeper than MAX_JSON_DEPTH is refused before it is decoded: on Python 3.13,
    whose C decoder goes 10,000 levels deep, a 5,000-deep PUB crashed the server (SIGSEGV in a
    512 KiB thread stack); 3.12 decoded it. The connection closes with 1007, nothing is logged
    as an error, and the server serves on."""
    stack = make_stack(handler=chain(recover()), read_limit=1 << 16)
    ws = raw_ws(stack.server.url)
    try:
        with caplog.at_level(logging.ERROR, logger="juggler"):
            ws.send(_deep_pub(depth))
            assert read_close(ws) == (1007, "message is nested too deeply")
    finally:
        ws.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert stack.client().call("test.echo", [[[1]]], timeout=T(5)) == [[[1]]]


def test_a_request_nested_as_deep_as_the_limit_is_served(make_stack):
    """args MAX_JSON_DEPTH - 2 deep: the CALL and the RES are MAX_JSON_DEPTH deep, their
    payloads in redis one level less; all within the limits."""
    stack = make_stack(read_limit=1 << 16)
    nested = json.loads("[" * (MAX_JSON_DEPTH - 2) + "]" * (MAX_JSON_DEPTH - 2))
    assert stack.client().call("test.echo", nested, timeout=T(5)) == nested


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="from Python 3.12 the recursion limit does not bound "
                    "JSON's C recursion: the decode-then-encode gap this looks for is 3.11's and older")  # fmt: skip
def test_deeply_nested_request_closes_1007_even_through_recover(make_stack, caplog, monkeypatch):
    """recover() lets a RecursionError of a request pass to the connection, which closes with
    1007, not 1011. Reached with juggler's own limit lifted (MAX_JSON_DEPTH), as a process
    with a lower recursion limit reaches it with the limit in place."""
    monkeypatch.setattr(jsondepth, "MAX_JSON_DEPTH", 10**9)
    stack = make_stack(handler=chain(recover()), read_limit=1 << 16)
    # The deepest PUB that decodes on the reader's thread, but cannot be encoded again to
    # publish it (the publish runs frames deeper): found from the recursion limit down, since
    # how many frames the reader runs under varies (each deeper one is refused by decode).
    limit = sys.getrecursionlimit()
    for depth in range(limit, limit - 200, -1):
        ws = raw_ws(stack.server.url)
        try:
            with caplog.at_level(logging.ERROR, logger="juggler.middleware"):
                ws.send(_deep_pub(depth))
                code, reason = read_close(ws)
        finally:
            ws.close()
        assert code == 1007 and "nested too deeply" in reason
        if reason != "message is nested too deeply":  # (decode's refusal: one level less)
            break
    assert reason == "message nested too deeply"  # decoded, then refused by the handler's publish
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_max_connections_holds_with_handshakes_in_flight(make_stack):
    """The limit counts handshakes that passed their checks too: a slow ACCEPTING hook (an
    auth lookup) cannot let concurrent handshakes through together."""
    gate = threading.Event()

    def slow_hook(conn, state):
        if state is ConnState.ACCEPTING:
            gate.wait(T(5))

    stack = make_stack(max_connections=2, on_state=slow_hook)
    results: list = []

    def connect():
        try:
            results.append(Client.connect(stack.server.url, connect_timeout=T(10)))
        except HandshakeError as exc:
            results.append(exc)

    threads = [threading.Thread(target=connect, name=f"test-connect-{i}") for i in range(6)]
    for t in threads:
        t.start()
    # the four over the limit are refused while the first two still wait in the hook
    deadline = time.monotonic() + T(10)
    while sum(isinstance(r, HandshakeError) for r in results) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # a bounded poll of the refusals, which arrive on their own threads
    gate.set()
    for t in threads:
        t.join(T(10))
    clients = [r for r in results if isinstance(r, Client)]
    refused = [r for r in results if isinstance(r, HandshakeError)]
    try:
        assert len(clients) == 2 and len(refused) == 4
        assert all(r.status == 503 for r in refused)
        # a connection is registered just after the 101 its client saw: a bounded wait
        deadline = time.monotonic() + T(5)
        while len(stack.server.connections) != 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(stack.server.connections) == 2
    finally:
        for c in clients:
            c.close()


def test_ack_over_the_write_limit_is_sent_without_its_channel(make_stack):
    stack = make_stack(write_limit=2000)
    c = stack.client()
    long_channel = "c" * 1950
    c.sub(long_channel)  # answered (it raises on NACK or no answer), though an ACK repeating
    c.pub(long_channel, 1)  # the channel would not fit; (its EVNT would not either: dropped)
    ws = raw_ws(stack.server.url)
    try:
        ws.send(json.dumps({"meta": {"type": 3, "uuid": "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0d"}, "payload": {"channel": long_channel}}))
        reply = json.loads(ws.recv())
        assert reply["meta"]["type"] == 8
        assert reply["payload"] == {"for": "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0d", "for_type": 3}
    finally:
        ws.close()


def test_failed_thread_start_does_not_leak_a_slot(make_stack):
    stack = make_stack()
    with failing_thread_starts(r"juggler-conn-127\.0\.0\.1.*") as failed:
        with pytest.raises(HandshakeError) as info:
            stack.client()
    assert info.value.status == 503 and failed
    assert stack.client().call("test.echo", 1, timeout=T(5)) == 1
    # the failed thread was not counted: reader, writer and results of the connection that called
    assert stack.server.connection_thread_count() == 3


def test_reuse_port_lets_two_servers_share_a_port(redis_client):
    broker = RedisBroker(redis_client)
    with Server(broker, reuse_port=True) as first:
        with pytest.raises(OSError):
            Server(broker, port=first.port)  # without SO_REUSEPORT the port is taken
        with Server(broker, port=first.port, reuse_port=True) as second:
            assert second.port == first.port
            # the kernel hands each new connection to one of them; both serve
            clients = [Client.connect(first.url, connect_timeout=T(5)) for _ in range(8)]
            try:
                for c in clients:
                    c.pub("reuse", 1)  # ACKed: the connection is registered by now
                assert len(first.connections) + len(second.connections) == 8
            finally:
                for c in clients:
                    c.close()


def test_max_connections_defaults_to_what_the_process_can_hold(redis_client):
    from juggler.tuning import default_max_connections

    with Server(RedisBroker(redis_client)) as server:
        assert server.max_connections == default_max_connections() > 0
