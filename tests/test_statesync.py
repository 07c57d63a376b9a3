"""juggler.statesync, our client with our server: data sync and flush semantics, messages, RPC,
closing, malformed input, limits, static files and TLS."""

from __future__ import annotations

import http.client
import json
import logging
import queue
import socket
import threading
import time
from pathlib import Path

import pytest
import websocket

from juggler import statesync

from .conftest import T
from .statesync_util import Watch, WireTap, get, same

DATA = Path(__file__).parent / "data"


@pytest.fixture
def serve():
    """``serve(**listen_kw)``: a started server whose connections arrive in ``server.conns``
    (a queue); every server and client made is closed at teardown."""
    servers, clients = [], []

    def start(on_connection=None, **kw):
        conns: "queue.Queue" = queue.Queue()

        def accept(conn):
            conns.put(conn)
            if on_connection is not None:
                on_connection(conn)

        server = statesync.listen("127.0.0.1", 0, accept, **kw)
        server.conns = conns
        servers.append(server)
        return server

    def connect(url, **kw):
        kw.setdefault("connect_timeout", T(10))
        conn = statesync.connect(url, **kw)
        clients.append(conn)
        return conn

    start.connect = connect
    yield start
    for c in clients:
        c.close()
    for s in servers:
        s.close()


def pair(serve, server_kw=None, client_kw=None):
    """A server and one client of it: (server, server-side conn, client conn)."""
    server = serve(**(server_kw or {}))
    client = serve.connect(server.url, **(client_kw or {}))
    return server, get(server.conns), client


def raw(url: str, **kw) -> websocket.WebSocket:
    return websocket.create_connection(url, timeout=T(10), suppress_origin=True, **kw)


def close_frame(ws: websocket.WebSocket) -> tuple[int, str]:
    """Read until the server's close frame: its code and reason."""
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(data[:2], "big"), data[2:].decode()


def never_reads(server) -> socket.socket:
    """A websocket client that sends its handshake and then reads nothing, ever."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
    return sock


# -- data -----------------------------------------------------------------------------------------


def test_the_issue_example(serve):
    def on_connection(conn):
        conn.set_local_data({"count": 0})

    server = serve(on_connection, ws_path="/ws", static_dir=None, index_path="/index.html", certfile=None,
                   keyfile=None, autoflush_delay=0.2)  # fmt: skip
    assert server.url == f"ws://127.0.0.1:{server.port}/ws"
    conn = serve.connect(server.url, autoflush_delay=0.2)
    assert conn.local_data is None
    Watch(conn).equals({"count": 0})
    peer = get(server.conns)
    watch = Watch(peer)
    conn.set_local_data({"a": [1, 2]})
    conn.flush_local_data()
    assert watch.equals({"a": [1, 2]}) == conn.local_data
    calls = []
    handle = conn.register_change_cb(lambda: calls.append(conn.remote_data))
    peer.set_local_data({"count": 1})
    Watch(conn).equals({"count": 1})
    handle.cancel()
    handle.cancel()  # idempotent
    peer.set_local_data({"count": 2})
    Watch(conn).equals({"count": 2})
    assert calls == [{"count": 1}]
    conn.send({"any": "json"})
    assert peer.receive(timeout=T(5)) == {"any": "json"}
    rpc = statesync.RpcConnection(peer, actions={"add": lambda a, b: a + b})
    assert statesync.RpcConnection(conn).call("add", 1, 2, timeout=T(5)) == 3
    conn.close()
    conn.close()
    assert rpc.wait_closed(T(5))
    server.close()
    server.close()


def test_local_data_is_taken_as_it_is_and_must_be_json(serve, caplog):
    _, peer, conn = pair(serve, client_kw={"autoflush_delay": 0})
    data = {"a": [1]}
    conn.set_local_data(data)
    assert conn.local_data is data  # not copied: the caller must not change it any more
    Watch(peer).equals({"a": [1]})
    # what is not JSON itself is refused at once
    with pytest.raises(TypeError, match="not JSON"):
        conn.set_local_data({1, 2})
    with pytest.raises(ValueError, match="JSON"):
        conn.set_local_data(float("nan"))
    with pytest.raises(TypeError, match="not JSON"):
        conn.set_local_data(object())
    with pytest.raises(TypeError):
        conn.send(object())
    assert conn.local_data is data
    # what is inside is checked when it is sent: logged, not sent, and flush says why
    with caplog.at_level(logging.ERROR, logger="juggler.statesync"):
        conn.set_local_data({"a": [1], "b": {1, 2}})
        with pytest.raises(TypeError, match="not JSON"):
            conn.flush_local_data()
        conn.set_local_data({"a": [float("inf")]})
        with pytest.raises(ValueError, match="not JSON"):
            conn.flush_local_data()
    logged = [r.getMessage() for r in caplog.records if r.name == "juggler.statesync.client"]
    assert logged[0] == "statesync: local data not sent: data is not JSON: Object of type set is not JSON serializable"
    # (Python 3.12 and later add the value: "... not JSON compliant: inf")
    assert logged[1].startswith("statesync: local data not sent: data is not JSON: Out of range float values are not "
                                "JSON compliant") and len(logged) == 2  # fmt: skip
    assert same(peer.remote_data, {"a": [1]})  # the peer keeps what it had
    conn.set_local_data({"a": [1, 2]})  # and the next change that is JSON goes from there
    Watch(peer).equals({"a": [1, 2]})


def test_autoflush_none_sends_only_on_flush(serve):
    _, peer, conn = pair(serve, client_kw={"autoflush_delay": None})
    conn.set_local_data({"x": 1})
    conn.send("after the change")  # a DATA sent at set_local_data would arrive before this
    assert peer.receive(T(5)) == "after the change"
    assert peer.remote_data is None
    conn.flush_local_data()
    Watch(peer).equals({"x": 1})
    assert conn.data_sent == 1
    conn.flush_local_data()  # nothing changed: nothing sent
    conn.send("again")
    assert peer.receive(T(5)) == "again"
    assert conn.data_sent == 1


def test_autoflush_zero_sends_every_change(serve):
    server = serve()
    tap = WireTap(server.port)
    try:
        conn = serve.connect(f"ws://127.0.0.1:{tap.port}/ws", autoflush_delay=0)
        peer = get(server.conns)
        watch = Watch(peer)
        for i in range(20):
            conn.set_local_data({"i": i})
        watch.equals({"i": 19})
        assert len(tap.messages("up", "DATA")) == 20
        assert watch.changes == 20
    finally:
        tap.close()


def test_changes_within_the_delay_go_out_as_one_patch_after_it(serve):
    server = serve()
    tap = WireTap(server.port)
    try:
        conn = serve.connect(f"ws://127.0.0.1:{tap.port}/ws", autoflush_delay=T(1.0))
        peer = get(server.conns)
        watch = Watch(peer)
        started = time.monotonic()
        for i in range(50):
            conn.set_local_data({"i": i})
        conn.send("sent after the changes")
        assert peer.receive(T(5)) == "sent after the changes"
        assert peer.remote_data is None  # the patch waits for the delay
        watch.equals({"i": 49})
        assert time.monotonic() - started >= T(1.0) * 0.9
        assert len(tap.messages("up", "DATA")) == 1
        # the next change starts a new delay, and goes out as a patch of its own
        conn.set_local_data({"i": 50})
        watch.equals({"i": 50})
        assert tap.messages("up", "DATA")[-1]["payload"] == [{"op": "replace", "path": "/i", "value": 50}]
    finally:
        tap.close()


def test_setting_the_same_data_again_sends_nothing(serve):
    _, peer, conn = pair(serve, client_kw={"autoflush_delay": 0})
    conn.set_local_data({"a": 1})
    conn.set_local_data({"a": 1})
    conn.flush_local_data()
    Watch(peer).equals({"a": 1})
    assert conn.data_sent == 1


def test_close_sends_pending_changes_first(serve):
    _, peer, conn = pair(serve, client_kw={"autoflush_delay": T(60)})
    conn.set_local_data({"pending": True})
    conn.close()
    assert peer.wait_closed(T(5))
    assert peer.remote_data == {"pending": True}


def test_a_failing_change_callback_is_logged_and_the_connection_goes_on(serve, caplog):
    _, peer, conn = pair(serve)

    def bad():
        raise RuntimeError("callback bug")

    conn.register_change_cb(bad)
    watch = Watch(conn)
    with caplog.at_level(logging.ERROR, "juggler.statesync"):
        peer.set_local_data(1)
        watch.equals(1)
        peer.set_local_data(2)
        watch.equals(2)
    assert sum("change callback" in r.getMessage() for r in caplog.records) == 2
    assert not conn.closed


# -- messages and closing -------------------------------------------------------------------------


def test_receive_times_out_and_iteration_ends_on_a_normal_close(serve):
    _, peer, conn = pair(serve)
    with pytest.raises(TimeoutError):
        conn.receive(timeout=0.05)
    got = []
    reader = threading.Thread(target=lambda: got.extend(conn), name="test-iterate")
    reader.start()
    for i in range(3):
        peer.send(i)
    peer.close()
    reader.join(T(10))
    assert not reader.is_alive()
    assert got == [0, 1, 2]


def test_iteration_raises_when_the_connection_is_lost(serve):
    server = serve()
    tap = WireTap(server.port)
    try:
        conn = serve.connect(f"ws://127.0.0.1:{tap.port}/ws")
        get(server.conns)
        tap.cut()
        with pytest.raises(statesync.ConnectionClosed) as info:
            list(conn)
        assert info.value.code == 1006
    finally:
        tap.close()


def test_everything_raises_connection_closed_after_close(serve):
    _, peer, conn = pair(serve)
    conn.close()
    for op in (lambda: conn.send(1), lambda: conn.set_local_data(1), conn.flush_local_data, conn.receive):
        with pytest.raises(statesync.ConnectionClosed) as info:
            op()
        assert info.value.code == 1000
    assert peer.wait_closed(T(5)) and peer.close_code == 1000


def test_close_from_many_threads_at_once(serve):
    _, peer, conn = pair(serve)
    threads = [threading.Thread(target=conn.close, name=f"test-close-{i}") for i in range(4)]
    for t in threads:
        t.start()
    peer.close()
    for t in threads:
        t.join(T(10))
        assert not t.is_alive()


def test_flush_to_a_peer_that_never_reads_raises_connection_closed(serve):
    server = serve(write_queue_size=1, write_timeout=0.3, close_timeout=0.3)
    sock = never_reads(server)
    try:
        conn = get(server.conns)
        with pytest.raises(statesync.ConnectionClosed) as info:
            for i in range(10_000):  # a peer that never reads: the socket buffers fill up
                conn.set_local_data({"big": f"{i}" + "x" * 200_000})
                conn.flush_local_data()
        assert info.value.code == 1008
        assert "too slow" in conn.close_reason
    finally:
        sock.close()


def test_a_slow_peer_is_closed_and_the_others_go_on(serve):
    server = serve(write_queue_size=4, write_timeout=0.3, close_timeout=0.3)
    sock = never_reads(server)
    try:
        stalled = get(server.conns)
        good = serve.connect(server.url)
        good_peer = get(server.conns)
        with pytest.raises(statesync.ConnectionClosed):
            for _ in range(100_000):
                stalled.send("x" * 10_000)
        assert stalled.wait_closed(T(10))
        assert stalled.close_code == 1008
        good_peer.send("still here")
        assert good.receive(T(5)) == "still here"
    finally:
        sock.close()


# -- malformed input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame, code, reason",
    [
        ("{not json", 1007, "not valid JSON"),
        ('"a string"', 1007, "not a JSON object"),
        ('{"type": "HELLO", "payload": 1}', 1002, "unknown message type"),
        ('{"type": "DATA", "payload": {"op": "add"}}', 1007, "not a JSON Patch"),
        ('{"type": "DATA", "payload": [{"op": "remove", "path": "/missing"}]}', 1007, "patch does not apply"),
        ('{"type": "MESSAGE"}', 1007, "no 'payload'"),
        ('{"type": "MESSAGE", "payload": {"type": "rpc", "id": 1, "direction": "up"}}', 1007, "rpc message"),
        (b"\x00\x01binary", 1003, "binary messages are not supported"),
    ],
)
def test_malformed_input_closes_that_connection_only(serve, caplog, frame, code, reason):
    server = serve(on_connection=lambda conn: statesync.RpcConnection(conn))
    bystander = serve.connect(server.url, autoflush_delay=0)
    bystander_peer = get(server.conns)
    ws = raw(server.url)
    try:
        victim = get(server.conns)
        with caplog.at_level(logging.INFO, "juggler.statesync"):
            if isinstance(frame, bytes):
                ws.send_binary(frame)
            else:
                ws.send(frame)
            got_code, got_reason = close_frame(ws)
            assert got_code == code and reason in got_reason
            assert victim.wait_closed(T(5))
        assert victim.close_code == code
        assert sum(reason in r.getMessage() for r in caplog.records) == 1  # logged once
    finally:
        ws.close()
    # the other connection is unaffected
    bystander.set_local_data({"still": "synced"})
    Watch(bystander_peer).equals({"still": "synced"})
    assert server.connections == [bystander_peer]


def test_a_message_over_the_read_limit_closes_with_1009(serve):
    server = serve(read_limit=1000)
    ws = raw(server.url)
    try:
        conn = get(server.conns)
        ws.send(json.dumps({"type": "MESSAGE", "payload": "x" * 2000}))
        code, reason = close_frame(ws)
        assert code == 1009 and "read limit" in reason
        assert conn.wait_closed(T(5))
    finally:
        ws.close()


def test_ping_is_answered_with_pong(serve):
    server = serve()
    ws = raw(server.url)
    try:
        conn = get(server.conns)
        ws.send('{"type": "PING"}')
        assert json.loads(ws.recv()) == {"type": "PONG", "payload": {}}
        ws.send('{"type": "PING", "payload": {"any": 1}}')
        assert json.loads(ws.recv()) == {"type": "PONG", "payload": {}}
        ws.send('{"type": "PONG", "payload": {}}')  # ignored
        ws.send('{"type": "MESSAGE", "payload": "after"}')
        assert conn.receive(T(5)) == "after"
    finally:
        ws.close()


def test_keepalive_pings_and_closes_a_silent_peer(serve):
    server = serve(ping_interval=0.05, idle_timeout=0.5)
    ws = raw(server.url)
    try:
        conn = get(server.conns)
        opcode, _ = ws.recv_data(control_frame=True)  # a ping (websocket-client answers it)
        assert opcode == websocket.ABNF.OPCODE_PING
        # from now on the client reads nothing and answers no ping: idle past idle_timeout
        assert conn.wait_closed(T(10))
        assert conn.close_code == 1001 and "idle timeout" in conn.close_reason
    finally:
        ws.close()


def test_on_connection_failing_closes_that_connection_with_1011(serve, caplog):
    first = threading.Event()

    def on_connection(conn):
        if not first.is_set():  # only the first connection meets the bug
            first.set()
            raise RuntimeError("handler bug")
        conn.set_local_data({"served": True})

    server = serve(on_connection)
    with caplog.at_level(logging.ERROR, "juggler.statesync"):
        conn = serve.connect(server.url)
        assert conn.wait_closed(T(10))
    assert conn.close_code == 1011
    assert sum("on_connection failed" in r.getMessage() for r in caplog.records) == 1
    good = serve.connect(server.url)
    Watch(good).equals({"served": True})
    assert not good.closed


def test_max_connections_refuses_with_503(serve):
    server = serve(max_connections=1)
    serve.connect(server.url)
    get(server.conns)
    with pytest.raises(statesync.HandshakeError) as info:
        serve.connect(server.url)
    assert info.value.status == 503


# -- RPC ------------------------------------------------------------------------------------------


def test_a_slow_action_does_not_stop_the_reader_and_a_late_response_is_dropped(serve):
    release = threading.Event()
    started = threading.Event()

    def slow():
        started.set()
        release.wait(T(10))
        return "late"

    server = serve(on_connection=lambda conn: statesync.RpcConnection(conn, {"slow": slow, "add": lambda a, b: a + b}))
    conn = serve.connect(server.url, autoflush_delay=0)
    peer = get(server.conns)
    rpc = statesync.RpcConnection(conn)
    with pytest.raises(statesync.CallExpired):
        rpc.call("slow", timeout=0.2)
    assert started.is_set()
    # the slow action still runs; data, messages and other calls go on meanwhile
    conn.set_local_data({"during": "slow"})
    Watch(peer).equals({"during": "slow"})
    assert rpc.call("add", 2, 2, timeout=T(5)) == 4
    release.set()
    assert rpc.call("add", 1, 1, timeout=T(5)) == 2  # the late response was dropped on the way
    assert not conn.closed


def test_calls_end_with_connection_closed_when_the_connection_closes(serve):
    release, started = threading.Event(), threading.Event()

    def wait():
        started.set()
        return release.wait(T(10))

    server = serve(on_connection=lambda conn: statesync.RpcConnection(conn, {"wait": wait}))
    conn = serve.connect(server.url)
    rpc = statesync.RpcConnection(conn)
    errors: "queue.Queue" = queue.Queue()

    def call():
        try:
            rpc.call("wait", timeout=T(10))
        except Exception as exc:
            errors.put(exc)

    t = threading.Thread(target=call, name="test-call")
    t.start()
    assert started.wait(T(10))  # the call is pending: close the connection under it
    conn.close()
    t.join(T(10))
    assert isinstance(get(errors), statesync.ConnectionClosed)
    release.set()
    with pytest.raises(statesync.ConnectionClosed):
        rpc.call("wait")


def test_rpc_failures(serve):
    def default(name, *args):
        if name == "shout":
            return [a.upper() for a in args]
        raise KeyError(name)

    actions = {"not_json": lambda: {1, 2}, "add": lambda a, b: a + b}
    server = serve(on_connection=lambda conn: statesync.RpcConnection(conn, actions, default, max_pending=1))
    conn = serve.connect(server.url)
    rpc = statesync.RpcConnection(conn)
    assert rpc.call("shout", "a", "b", timeout=T(5)) == ["A", "B"]
    with pytest.raises(statesync.RemoteError, match="'nope'"):
        rpc.call("nope", timeout=T(5))
    with pytest.raises(statesync.RemoteError, match="result is not JSON"):
        rpc.call("not_json", timeout=T(5))
    with pytest.raises(statesync.RemoteError, match="unsupported operand") as info:
        rpc.call("add", 1, "a", timeout=T(5))
    assert info.value.result == info.value.message
    with pytest.raises(ValueError, match="already has an RpcConnection"):
        statesync.RpcConnection(conn)
    with pytest.raises(TypeError):
        rpc.call("add", {1}, 2)


def test_calls_over_max_pending_are_refused_at_once(serve):
    release = threading.Event()
    server = serve(on_connection=lambda conn: statesync.RpcConnection(conn, {"wait": lambda: release.wait(T(10))},
                                                                      max_workers=1, max_pending=2))  # fmt: skip
    conn = serve.connect(server.url)
    rpc = statesync.RpcConnection(conn)
    results: "queue.Queue" = queue.Queue()

    def call():
        try:
            results.put(rpc.call("wait", timeout=T(10)))
        except Exception as exc:
            results.put(exc)

    threads = [threading.Thread(target=call, name=f"test-call-{i}") for i in range(3)]
    for t in threads:
        t.start()
    refused = get(results)  # the third one, at once, while two are pending
    assert isinstance(refused, statesync.RemoteError) and "too many calls" in refused.message
    release.set()
    assert [get(results), get(results)] == [True, True]
    for t in threads:
        t.join()


def test_an_action_may_close_its_own_connection(serve):
    def bye():
        peer.close()
        return "bye"

    server = serve(on_connection=lambda conn: statesync.RpcConnection(conn, {"bye": bye}))
    conn = serve.connect(server.url)
    peer = get(server.conns)
    rpc = statesync.RpcConnection(conn)
    try:
        assert rpc.call("bye", timeout=T(5)) == "bye"
    except statesync.ConnectionClosed:
        pass  # the close may overtake the response
    assert conn.wait_closed(T(10)) and peer.wait_closed(T(10))


# -- HTTP: static files and the redirect ---------------------------------------------------------


def get_http(server, method: str, path: str) -> http.client.HTTPResponse:
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=T(10))
    c.request(method, path)
    r = c.getresponse()
    r.body = r.read()
    c.close()
    return r


def test_static_dir_and_the_index_redirect(serve, tmp_path):
    (tmp_path / "index.html").write_text("<title>hi</title>")
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "app.js").write_text("let x = 1;")
    (tmp_path.parent / "secret.txt").write_text("no")
    server = serve(static_dir=tmp_path)
    r = get_http(server, "GET", "/")
    assert r.status == 302 and r.getheader("Location") == "/index.html"
    r = get_http(server, "GET", "/index.html")
    assert r.status == 200 and r.body == b"<title>hi</title>"
    assert r.getheader("Content-Type") == "text/html; charset=utf-8"
    r = get_http(server, "GET", "/js/app.js?v=1")
    assert r.status == 200 and r.body == b"let x = 1;"
    r = get_http(server, "HEAD", "/js/app.js")
    assert r.status == 200 and r.body == b"" and r.getheader("Content-Length") == "10"
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/js/../../secret.txt", "/missing", "/js", "/%00"):
        assert get_http(server, "GET", path).status == 404, path
    assert get_http(server, "POST", "/index.html").status == 405
    r = get_http(server, "GET", "/ws")  # not an upgrade
    assert r.status == 426


def test_no_static_dir_and_no_redirect(serve):
    server = serve(index_path=None)
    assert get_http(server, "GET", "/").status == 404
    server = serve()
    assert get_http(server, "GET", "/").status == 302
    assert get_http(server, "GET", "/index.html").status == 404


def test_bad_arguments():
    with pytest.raises(ValueError, match="autoflush_delay"):
        statesync.listen("127.0.0.1", 0, print, autoflush_delay=-1)
    with pytest.raises(ValueError, match="certfile and keyfile"):
        statesync.listen("127.0.0.1", 0, print, certfile="x.pem")
    with pytest.raises(ValueError, match="not a directory"):
        statesync.listen("127.0.0.1", 0, print, static_dir="/no/such/dir")
    with pytest.raises(ValueError, match="write_queue_size"):
        statesync.listen("127.0.0.1", 0, print, write_queue_size=0)
    with pytest.raises(ValueError, match="patch_cache_size"):
        statesync.listen("127.0.0.1", 0, print, patch_cache_size=0)


def test_wss_with_certfile_and_keyfile(serve, tmp_path):
    (tmp_path / "index.html").write_text("secure")
    server = serve(on_connection=lambda conn: conn.set_local_data({"tls": True}), static_dir=tmp_path,
                   certfile=str(DATA / "localhost.crt"), keyfile=str(DATA / "localhost.key"))  # fmt: skip
    assert server.url.startswith("wss://")
    conn = serve.connect(server.url, sslopt={"ca_certs": str(DATA / "localhost.crt")})
    Watch(conn).equals({"tls": True})
    peer = get(server.conns)
    conn.set_local_data([1, 2, 3])
    Watch(peer).equals([1, 2, 3])
    conn.send("over tls")
    assert peer.receive(T(5)) == "over tls"
    import ssl

    ctx = ssl.create_default_context(cafile=str(DATA / "localhost.crt"))
    c = http.client.HTTPSConnection("localhost", server.port, timeout=T(10), context=ctx)
    c.request("GET", "/index.html")
    assert c.getresponse().read() == b"secure"
    c.close()


def test_the_server_closes_its_connections_with_1001(serve):
    server, peer, conn = pair(serve)
    server.close()
    assert conn.wait_closed(T(10))
    assert conn.close_code == 1001 and peer.close_code == 1001
    assert list(conn) == []
