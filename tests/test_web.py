"""What a server answers browsers over plain HTTP (juggler/web.py), the handshake's query
parameters, and checks of the shipped JavaScript that need no browser (tests/test_browser.py
runs it in Chromium)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import fakeredis
import pytest
import websocket

from juggler import Client, ConnState, HandshakeError, RedisBroker, RefuseConnection, Server
from juggler.web import RefusalLog, static_path

from .conftest import T

STATIC = Path(static_path("juggler.js")).parent


@pytest.fixture
def make_server():
    servers: list[Server] = []

    def make(**kw) -> Server:
        broker = RedisBroker(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
        s = Server(broker, **kw).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.shutdown()


def get(server: Server, target: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=T(10))
    try:
        conn.request(method, target, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_client_module_is_served_with_an_etag(make_server):
    server = make_server()
    status, headers, body = get(server, "/juggler.js")
    assert status == 200
    assert body == (STATIC / "juggler.js").read_bytes()
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["content-length"] == str(len(body))
    assert headers["cache-control"] == "no-cache"
    assert headers["access-control-allow-origin"] == "*"  # module scripts load in CORS mode
    etag = headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)

    for value in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        status, h, body = get(server, "/juggler.js", headers={"If-None-Match": value})
        assert (status, body, h["etag"]) == (304, b"", etag), value
        assert "content-length" not in h
    status, _, body = get(server, "/juggler.js", headers={"If-None-Match": '"stale"'})
    assert status == 200 and len(body) > 1000

    status, h, body = get(server, "/juggler.js", method="HEAD")
    assert (status, body, h["content-length"], h["etag"]) == (200, b"", headers["content-length"], etag)

    status, h, body = get(server, "/juggler.d.ts")
    assert status == 200 and h["content-type"].startswith("application/typescript")
    assert body == (STATIC / "juggler.d.ts").read_bytes()
    # no demo page unless asked for
    assert get(server, "/")[0] == 404


def test_serve_client_false_turns_it_off(make_server):
    server = make_server(serve_client=False)
    for target in ("/juggler.js", "/juggler.d.ts"):
        status, _, body = get(server, target)
        assert status == 404 and b"no websocket endpoint" in body
    assert get(server, "/healthz")[0] == 200  # the other endpoints are not affected


def test_demo_page_connects_to_the_servers_path(make_server):
    server = make_server(demo_page=True, path="/jug")
    status, headers, body = get(server, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    page = body.decode()
    assert '<meta name="juggler-ws-path" content="/jug">' in page
    assert 'from "/juggler.js"' in page


def test_websocket_at_slash_still_upgrades_beside_the_demo_page(make_server):
    server = make_server(demo_page=True, path="/")
    assert get(server, "/")[0] == 200
    with Client.connect(server.url, connect_timeout=T(10)) as c:
        assert c.pub("x", 1).for_type.name == "PUB"


def handshake(server: Server, query: str = "", **kw) -> websocket.WebSocket:
    return websocket.create_connection(server.url + query, subprotocols=["juggler.0"], timeout=T(10), **kw)


def refusal(server: Server, handshake_id: str) -> tuple[int, dict, dict]:
    status, headers, body = get(server, f"{server.path}?juggler-refusal={handshake_id}")
    assert headers["access-control-allow-origin"] == "*"
    assert headers["cache-control"] == "no-store"
    return status, headers, json.loads(body)


def test_a_refused_handshake_can_be_explained_by_its_id(make_server):
    def hook(conn, state):
        if state is ConnState.ACCEPTING and "token=good" not in conn.request.path:
            raise RefuseConnection(401, "missing token")

    server = make_server(allowed_origins=["https://app.example"], on_state=hook, max_connections=1)
    cases = [
        ({"origin": "https://evil.example"}, "", 403, "origin https://evil.example is not allowed"),
        ({"origin": "https://app.example"}, "", 401, "missing token"),
    ]
    for kw, extra, status, reason in cases:
        hid = str(uuid.uuid4())
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            handshake(server, f"?juggler-handshake={hid}{extra}", **kw)
        assert info.value.status_code == status
        assert refusal(server, hid)[::2] == (200, {"status": status, "reason": reason})

    # 503: the one connection slot is taken
    with Client.connect(server.url + "?token=good", connect_timeout=T(10)):
        hid = str(uuid.uuid4())
        with pytest.raises(websocket.WebSocketBadStatusException):
            handshake(server, f"?token=good&juggler-handshake={hid}", suppress_origin=True)
        assert refusal(server, hid)[2] == {"status": 503, "reason": "server at its connection limit"}

    # a wrong path: its 404 is explained at that path, without the id in the reason
    hid = str(uuid.uuid4())
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(server.url.replace(server.path, "/wrong") + f"?juggler-handshake={hid}",
                                    subprotocols=["juggler.0"], timeout=T(10), suppress_origin=True)  # fmt: skip
    status, _, body = get(server, f"/wrong?juggler-refusal={hid}")
    assert (status, json.loads(body)) == (200, {"status": 404, "reason": "no websocket endpoint at /wrong"})

    # an id nobody used, and a handshake that was not refused
    assert refusal(server, str(uuid.uuid4()))[0] == 404
    hid = str(uuid.uuid4())
    handshake(server, f"?token=good&juggler-handshake={hid}", suppress_origin=True).close()
    assert refusal(server, hid)[0] == 404


def test_refusal_log_is_bounded_and_forgets():
    now = [0.0]
    log = RefusalLog(size=3, ttl=10.0, clock=lambda: now[0])
    for i in range(5):
        log.record(f"{i}-abc", 403, f"r{i}")
    assert len(log) == 3
    assert log.lookup("0-abc") is None and log.lookup("4-abc") == (403, "r4")
    log.record("not an id!", 400, "x")  # only ids made of hex digits and dashes are kept
    log.record("a" * 65, 400, "x")
    assert len(log) == 3
    now[0] = 10.5
    assert log.lookup("4-abc") is None and len(log) == 0


def test_allowed_messages_query_parameter_is_enforced(make_server):
    server = make_server()
    ws = handshake(server, "?juggler-allowed-messages=call,sub")
    try:
        ws.send(json.dumps({"meta": {"type": 2, "uuid": str(uuid.uuid4())}, "payload": {"channel": "c", "args": 1}}))
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert int.from_bytes(data[:2], "big") == 1008
        assert data[2:].decode() == "PUB is not allowed on this connection"
    finally:
        ws.close()
    # with the header too, the connection may send what both allow
    ws = handshake(server, "?juggler-allowed-messages=call,pub", header=["Juggler-Allowed-Messages: pub,sub"])
    try:
        ws.send(json.dumps({"meta": {"type": 2, "uuid": str(uuid.uuid4())}, "payload": {"channel": "c", "args": 1}}))
        assert json.loads(ws.recv())["meta"]["type"] == 8  # PUB: ACK
        ws.send(json.dumps({"meta": {"type": 3, "uuid": str(uuid.uuid4())}, "payload": {"channel": "c"}}))
        opcode, data = ws.recv_data(control_frame=True)
        assert (opcode, data[2:].decode()) == (websocket.ABNF.OPCODE_CLOSE, "SUB is not allowed on this connection")
    finally:
        ws.close()
    with pytest.raises(HandshakeError) as info:
        Client.connect(server.url + "?juggler-allowed-messages=call,jump", connect_timeout=T(10))
    assert info.value.status == 400 and "jump" in str(info.value)


def exports(text: str) -> set[str]:
    return set(re.findall(r"^export (?:const|class|function|async function|type|interface) (\w+)", text, re.M))


def test_types_declare_every_export_of_the_module():
    js = exports((STATIC / "juggler.js").read_text())
    ts = exports((STATIC / "juggler.d.ts").read_text())
    assert {"connect", "CallExpired", "NackError", "RemoteError", "ConnectionClosed", "HandshakeError"} <= js
    assert js <= ts, f"juggler.d.ts lacks {sorted(js - ts)}"


def test_node_accepts_the_module(tmp_path):
    """``node --check``: the module parses as an ES module (the browser tests run it)."""
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is not installed, and CI must check juggler.js with it")
        pytest.skip("node is not installed")
    module = tmp_path / "juggler.mjs"  # .mjs: parsed as an ES module by any node version
    shutil.copy(STATIC / "juggler.js", module)
    out = subprocess.run([node, "--check", str(module)], capture_output=True, text=True, timeout=T(30))
    assert out.returncode == 0, out.stderr
    # and a broken module is refused, so that the check means something
    module.write_text((STATIC / "juggler.js").read_text() + "\nexport function (\n")
    assert subprocess.run([node, "--check", str(module)], capture_output=True, timeout=T(30)).returncode != 0


def test_the_package_ships_every_static_file():
    """setup.cfg's package_data names every file of juggler/static/ (else a wheel lacks it)."""
    import configparser
    import fnmatch

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    globs = cfg["options.package_data"]["juggler"].split()
    for f in STATIC.iterdir():
        assert any(fnmatch.fnmatch(f"static/{f.name}", g) for g in globs), f.name


def fetch(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=T(10)) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize(
    "args, extra_env, served",
    [([], {}, True), (["--no-client"], {}, False), ([], {"JUGGLER_SERVE_CLIENT": "false"}, False)],
)
def test_server_command_serves_the_client_unless_told_not_to(args, extra_env, served):
    from .test_cli import Proc, env

    p = Proc("server", "--port", "0", "--log-level", "warning", *args, env=env(**extra_env))
    try:
        ws_url = p.expect(r"websocket: (ws://\S+)").group(1)
        base = ws_url.replace("ws://", "http://").rsplit("/", 1)[0]
        status, body = fetch(base + "/juggler.js")
        assert status == (200 if served else 404)
        assert fetch(base + "/")[0] == 404  # the demo page is the demo's
        assert p.stop() == 0
    finally:
        p.close()


def test_demo_command_prints_and_serves_its_page():
    from .test_cli import Proc

    p = Proc("demo", "--port", "0", "--log-level", "warning", "--path", "/demo-ws")
    try:
        page_url = p.expect(r"^browser: +(http://127\.0\.0\.1:\d+/) ").group(1)
        ws_url = p.expect(r"^websocket: (ws://\S+)").group(1)
        assert ws_url == page_url.replace("http://", "ws://") + "demo-ws"
        status, body = fetch(page_url)
        assert status == 200 and b'<meta name="juggler-ws-path" content="/demo-ws">' in body
        assert fetch(page_url + "juggler.js")[0] == 200
        assert p.stop() == 0
    finally:
        p.close()
