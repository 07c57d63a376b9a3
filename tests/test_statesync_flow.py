"""juggler.statesync flow control: after an autoflush DATA a connection sends a PING, and its
next autoflush DATA waits for the PONG (at most ``flow_timeout``), so a peer that lags gets one
patch from what it had to the newest data instead of a backlog. The peer here is a raw
websocket client, so the test decides when (and whether) it answers."""

from __future__ import annotations

import json
import threading

import pytest
import websocket

from juggler import statesync
from juggler.statesync import connection

from .conftest import T
from .statesync_util import Watch, get
from .test_statesync import raw, serve  # noqa: F401  (serve: a fixture)

PONG = '{"type": "PONG", "payload": {}}'


def next_message(ws: websocket.WebSocket) -> dict:
    """The next state-sync message (text frame); websocket-level pings are answered on the way."""
    return json.loads(ws.recv())


def data_then_ping(ws: websocket.WebSocket) -> list:
    """An autoflush DATA and the PING after it: the DATA's patch."""
    data = next_message(ws)
    assert data["type"] == "DATA"
    assert next_message(ws) == {"type": "PING", "payload": {}}
    return data["payload"]


def timer_passed(server, delay: float) -> None:
    """Wait until the server's timer has run what was due within ``delay`` seconds from now
    (its callbacks run in the order of their deadlines)."""
    done = threading.Event()
    server.timer.call_later(delay, done.set)
    assert done.wait(T(10))


@pytest.fixture
def peer(serve, monkeypatch):
    """A server (autoflush 0.05 s), its connection and the raw client, which has had the first
    data ({"n": 0}) and the PING after it, and not answered yet. PINGs to a peer that keeps up
    go once a second: here after every DATA, so that each step is the test's."""
    monkeypatch.setattr(connection, "_PROBE_INTERVAL", 0.0)

    def start(**kw):
        kw.setdefault("flow_timeout", T(30))  # a hold lasts as long as the test needs it
        server = serve(autoflush_delay=0.05, **kw)
        ws = raw(server.url)
        conn = get(server.conns)
        conn.set_local_data({"n": 0})
        assert data_then_ping(ws) == [{"op": "replace", "path": "", "value": {"n": 0}}]
        return server, conn, ws

    yield start


def test_a_peer_that_has_not_answered_gets_one_patch_to_the_newest_data_when_it_does(peer):
    server, conn, ws = peer()
    try:
        for n in (1, 2, 3):
            conn.set_local_data({"n": n})
            timer_passed(server, 0.05)  # each autoflush came due, and was held
        conn.send("not held")  # MESSAGEs are not held: it comes first
        assert next_message(ws) == {"type": "MESSAGE", "payload": "not held"}
        ws.send(PONG)
        assert data_then_ping(ws) == [{"op": "replace", "path": "/n", "value": 3}]  # 0 -> 3 at once
        assert conn.data_sent == 2
        ws.send(PONG)
        conn.set_local_data({"n": 4})  # answered: the next goes after the delay, as always
        assert data_then_ping(ws) == [{"op": "replace", "path": "/n", "value": 4}]
    finally:
        ws.close()


def test_a_peer_that_never_answers_gets_the_data_after_flow_timeout(peer):
    server, conn, ws = peer(flow_timeout=0.2)
    try:
        conn.set_local_data({"n": 1})
        assert data_then_ping(ws) == [{"op": "replace", "path": "/n", "value": 1}]  # within T(10)
        conn.set_local_data({"n": 2})
        assert data_then_ping(ws) == [{"op": "replace", "path": "/n", "value": 2}]
    finally:
        ws.close()


def test_flush_local_data_is_not_held(peer):
    server, conn, ws = peer()
    try:
        conn.set_local_data({"n": 1})
        conn.flush_local_data()  # returns once written, PING unanswered or not
        assert next_message(ws) == {"type": "DATA", "payload": [{"op": "replace", "path": "/n", "value": 1}]}
        conn.send("after")  # no PING after a flush_local_data DATA
        assert next_message(ws) == {"type": "MESSAGE", "payload": "after"}
    finally:
        ws.close()


def test_close_sends_the_held_data(peer):
    server, conn, ws = peer()
    try:
        conn.set_local_data({"n": 1})
        timer_passed(server, 0.05)
        closing = threading.Thread(target=conn.close, name="test-close")  # waits for our answer
        closing.start()
        assert next_message(ws) == {"type": "DATA", "payload": [{"op": "replace", "path": "/n", "value": 1}]}
        opcode, _ = ws.recv_data(control_frame=True)  # the close frame, with no PING before it
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        ws.send_close()
        closing.join(T(10))
        assert not closing.is_alive() and conn.close_code == 1000
    finally:
        ws.close()


def test_flow_timeout_0_sends_no_ping(serve):
    server = serve(autoflush_delay=0.05, flow_timeout=0)
    ws = raw(server.url)
    try:
        conn = get(server.conns)
        for n in (1, 2):
            conn.set_local_data({"n": n})
            assert next_message(ws)["type"] == "DATA"
            conn.send(n)
            assert next_message(ws) == {"type": "MESSAGE", "payload": n}
    finally:
        ws.close()


def test_a_peer_that_keeps_up_is_pinged_once_in_a_while(serve, monkeypatch):
    monkeypatch.setattr(connection, "_PROBE_INTERVAL", 3600.0)
    server = serve(autoflush_delay=T(0.5))  # a PONG back within the delay: keeping up
    ws = raw(server.url)
    try:
        conn = get(server.conns)
        conn.set_local_data({"n": 0})
        data_then_ping(ws)  # the first DATA
        ws.send(PONG)
        conn.set_local_data({"n": 1})
        assert next_message(ws)["type"] == "DATA"
        conn.send("no PING before me")
        assert next_message(ws) == {"type": "MESSAGE", "payload": "no PING before me"}
    finally:
        ws.close()


def test_our_client_answers(serve, monkeypatch):
    monkeypatch.setattr(connection, "_PROBE_INTERVAL", 0.0)
    server = serve(autoflush_delay=0.01, flow_timeout=3600)  # unanswered, a DATA would wait an hour
    client = serve.connect(server.url)
    conn = get(server.conns)
    watch = Watch(client)
    for n in range(5):
        conn.set_local_data({"n": n})
        watch.equals({"n": n})


@pytest.mark.parametrize("value", [-1, float("nan")])
def test_flow_timeout_must_be_a_number_of_seconds(value):
    with pytest.raises(ValueError, match="flow_timeout"):
        statesync.Settings(flow_timeout=value)
