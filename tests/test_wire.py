"""The juggler.0 wire format, pinned against a live server with no juggler client in the way.

Every test talks to a real :class:`juggler.Server` (the ``stack`` / ``make_stack`` fixtures, over
fakeredis and a real redis-server) with plain ``websocket-client`` connections, or with raw
sockets where the HTTP handshake or the frames themselves are under test. Messages are written
as literal JSON text and answers are parsed and compared as whole dicts, so any drift in field
names, types or presence shows up here.

Every read is bounded by a socket timeout, so a server that fails to answer fails the test
rather than hanging it; nothing sleeps to wait for anything.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import struct
import time
import uuid
from typing import Any, Optional
from urllib.parse import urlparse

import pytest
import websocket
from websocket import ABNF

from .conftest import T

TIMEOUT = T(10)
SUBPROTOCOL = "juggler.0"

CALL, PUB, SUB, UNSB, NACK, ACK, RES, EVNT = 1, 2, 3, 4, 7, 8, 9, 10

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# --- building messages as literal wire text ----------------------------------------------------


def new_id() -> str:
    return str(uuid.uuid4())


def wire(mtype: int, muuid: str, payload: dict[str, Any]) -> str:
    return json.dumps(
        {"meta": {"type": mtype, "uuid": muuid}, "payload": payload}, separators=(",", ":"), ensure_ascii=False
    )


def call_text(muuid: str, uri: str, args: Any, timeout_ns: int = 10_000_000_000) -> str:
    return wire(CALL, muuid, {"uri": uri, "timeout": timeout_ns, "args": args})


def sub_text(muuid: str, channel: str, pattern: bool = False, mtype: int = SUB) -> str:
    return wire(mtype, muuid, {"channel": channel, "pattern": pattern})


def pub_text(muuid: str, channel: str, args: Any) -> str:
    return wire(PUB, muuid, {"channel": channel, "args": args})


# --- reading and checking server messages ------------------------------------------------------


def parse_server_msg(data: bytes | str) -> dict[str, Any]:
    """A server message, checked for the envelope: exactly meta{type,uuid} and payload."""
    if isinstance(data, bytes):
        data = data.decode("utf-8")
    msg = json.loads(data)  # the reference ends frames with "\n": json.loads accepts both
    assert isinstance(msg, dict) and set(msg) == {"meta", "payload"}, msg
    meta = msg["meta"]
    assert set(meta) == {"type", "uuid"}, msg
    assert type(meta["type"]) is int, msg
    assert isinstance(meta["uuid"], str) and len(meta["uuid"]) == 36 and UUID_RE.match(meta["uuid"]), msg
    assert isinstance(msg["payload"], dict), msg
    return msg


def recv_msg(ws: websocket.WebSocket) -> dict[str, Any]:
    """The next message from the server; fails on anything but a text frame."""
    opcode, data = ws.recv_data()
    if opcode == ABNF.OPCODE_CLOSE:
        code = struct.unpack(">H", data[:2])[0] if len(data) >= 2 else None
        pytest.fail(f"expected a message, the server closed: {code} {data[2:]!r}")
    assert opcode == ABNF.OPCODE_TEXT, f"expected a text frame, got opcode {opcode}: {data!r}"
    return parse_server_msg(data)


def expect(ws: websocket.WebSocket, mtype: int, payload: dict[str, Any]) -> dict[str, Any]:
    """Read one message and check its type and its payload exactly."""
    msg = recv_msg(ws)
    assert msg["meta"]["type"] == mtype, msg
    assert msg["payload"] == payload, msg
    return msg


def expect_close(ws: websocket.WebSocket) -> tuple[int, str]:
    """Read the server's close frame (nothing else may come first), answer it, and check the
    server then ends the TCP connection. Returns (code, reason)."""
    while True:
        frame = ws.recv_frame()
        if frame.opcode in (ABNF.OPCODE_PING, ABNF.OPCODE_PONG):
            continue
        if frame.opcode != ABNF.OPCODE_CLOSE:
            pytest.fail(f"expected a close frame, got opcode {frame.opcode}: {frame.data!r}")
        break
    data = frame.data
    assert len(data) >= 2, f"close frame without a code: {data!r}"
    code = struct.unpack(">H", data[:2])[0]
    reason = data[2:].decode("utf-8")
    assert len(data) <= 125
    try:  # complete the closing handshake, as a well-behaved client does
        ws.send(struct.pack(">H", code), ABNF.OPCODE_CLOSE)
    except OSError:
        pass
    assert_tcp_closed(ws.sock)
    ws.shutdown()
    return code, reason


def assert_tcp_closed(sock: socket.socket) -> None:
    """The server ends the TCP connection (EOF or reset) within the timeout."""
    sock.settimeout(TIMEOUT)
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return
            pytest.fail(f"data after the close frame: {chunk!r}")
    except ConnectionResetError:
        return
    except socket.timeout:
        pytest.fail("the server did not close the TCP connection after the close handshake")


def assert_echo_works(ws: websocket.WebSocket, args: Any = "still here") -> None:
    """A CALL to test.echo on ``ws`` gets its ACK and then its RES."""
    cid = new_id()
    ws.send(call_text(cid, "test.echo", args))
    expect(ws, ACK, {"for": cid, "for_type": CALL, "uri": "test.echo"})
    expect(ws, RES, {"for": cid, "uri": "test.echo", "args": args})


# --- raw sockets -------------------------------------------------------------------------------


class RawConn:
    """A TCP connection speaking HTTP and websocket frames by hand."""

    def __init__(self, url: str) -> None:
        u = urlparse(url)
        self.host, self.port, self.path = u.hostname, u.port, u.path
        self.sock = socket.create_connection((self.host, self.port), timeout=TIMEOUT)
        self.buf = b""
        self.key = ""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _more(self) -> bytes:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return chunk

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise ConnectionError(f"EOF after {len(self.buf)} of {n} bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_to_eof(self) -> bytes:
        while self._more():
            pass
        out, self.buf = self.buf, b""
        return out

    def handshake(
        self,
        path: Optional[str] = None,
        protocol: Optional[str] = SUBPROTOCOL,
        extra: tuple[str, ...] = (),
        method: str = "GET",
    ) -> tuple[int, str, dict[str, str]]:
        """Send a websocket upgrade request; returns (status, status line, lower-cased headers)."""
        self.key = base64.b64encode(os.urandom(16)).decode("ascii")
        lines = [
            f"{method} {path or self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self.key}",
            "Sec-WebSocket-Version: 13",
        ]
        if protocol is not None:
            lines.append(f"Sec-WebSocket-Protocol: {protocol}")
        lines += list(extra)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        while b"\r\n\r\n" not in self.buf:
            if not self._more():
                raise ConnectionError(f"EOF before the end of the response head: {self.buf!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            assert sep, f"malformed response header line {line!r}"
            headers[name.strip().lower()] = value.strip()
        version, status, *_ = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        return int(status), status_line, headers

    def refused_body(self, headers: dict[str, str]) -> str:
        """The body of a refusal: exactly Content-Length bytes, then the server closes."""
        rest = self.read_to_eof()
        assert "content-length" in headers, headers
        n = int(headers["content-length"])
        assert len(rest) == n, f"body {rest!r} is not {n} bytes"
        return rest.decode("utf-8")

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        """A masked client frame."""
        mask = os.urandom(4)
        n = len(payload)
        b1 = (0x80 if fin else 0) | opcode
        if n < 126:
            head = struct.pack(">BB", b1, 0x80 | n)
        elif n < 65536:
            head = struct.pack(">BBH", b1, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", b1, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def recv_frame(self) -> tuple[bool, int, bytes]:
        """One server frame; server frames must be unmasked and use no reserved bits."""
        b1, b2 = self.read_exact(2)
        assert not b1 & 0x70, "server frame has reserved bits set"
        assert not b2 & 0x80, "server frames must not be masked"
        n = b2 & 0x7F
        if n == 126:
            (n,) = struct.unpack(">H", self.read_exact(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", self.read_exact(8))
        return bool(b1 & 0x80), b1 & 0x0F, self.read_exact(n)


# --- fixtures ----------------------------------------------------------------------------------


class Conns:
    """Opens websockets and raw sockets to a stack's server and closes them all at teardown."""

    def __init__(self) -> None:
        self.opened: list[websocket.WebSocket] = []
        self.raws: list[RawConn] = []

    def ws(self, stack: Any, *, headers: Optional[list[str]] = None, subprotocols: Any = (SUBPROTOCOL,)) -> websocket.WebSocket:
        ws = websocket.create_connection(
            stack.server.url,
            subprotocols=list(subprotocols) if subprotocols else None,
            header=headers or [],
            timeout=TIMEOUT,
        )
        self.opened.append(ws)
        return ws

    def raw(self, stack: Any) -> RawConn:
        r = RawConn(stack.server.url)
        self.raws.append(r)
        return r

    def close_all(self) -> None:
        for ws in self.opened:
            try:
                ws.close(timeout=TIMEOUT)
            except Exception:
                pass
            try:
                ws.shutdown()
            except Exception:
                pass
        for r in self.raws:
            r.close()


@pytest.fixture
def conns():
    c = Conns()
    try:
        yield c
    finally:
        c.close_all()


# --- handshake ---------------------------------------------------------------------------------


def test_handshake_echoes_subprotocol(stack, conns):
    ws = conns.ws(stack)
    assert ws.getsubprotocol() == SUBPROTOCOL
    assert ws.getheaders()["sec-websocket-protocol"] == SUBPROTOCOL
    assert_echo_works(ws)


def test_handshake_picks_juggler_among_offered_subprotocols(stack, conns):
    ws = conns.ws(stack, subprotocols=("chat", SUBPROTOCOL, "superchat"))
    assert ws.getsubprotocol() == SUBPROTOCOL
    assert ws.getheaders()["sec-websocket-protocol"] == SUBPROTOCOL
    assert_echo_works(ws)


def test_raw_handshake_response(stack, conns):
    raw = conns.raw(stack)
    status, line, headers = raw.handshake()
    assert status == 101, line
    assert headers["upgrade"].lower() == "websocket"
    assert "upgrade" in [t.strip().lower() for t in headers["connection"].split(",")]
    expected_accept = base64.b64encode(hashlib.sha1(raw.key.encode("ascii") + WS_GUID).digest()).decode("ascii")
    assert headers["sec-websocket-accept"] == expected_accept
    assert headers["sec-websocket-protocol"] == SUBPROTOCOL
    assert "sec-websocket-extensions" not in headers  # no extension is negotiated: RSV bits stay 0

    # A CALL over hand-made frames; each answer is one final, unmasked text frame.
    cid = new_id()
    raw.send_frame(ABNF.OPCODE_TEXT, call_text(cid, "test.echo", "raw").encode())
    fin, op, data = raw.recv_frame()
    assert (fin, op) == (True, ABNF.OPCODE_TEXT)
    ack = parse_server_msg(data)
    assert ack["meta"]["type"] == ACK and ack["payload"] == {"for": cid, "for_type": CALL, "uri": "test.echo"}
    fin, op, data = raw.recv_frame()
    assert (fin, op) == (True, ABNF.OPCODE_TEXT)
    res = parse_server_msg(data)
    assert res["meta"]["type"] == RES and res["payload"] == {"for": cid, "uri": "test.echo", "args": "raw"}

    raw.send_frame(ABNF.OPCODE_CLOSE, struct.pack(">H", 1000))
    fin, op, data = raw.recv_frame()
    assert (fin, op) == (True, ABNF.OPCODE_CLOSE)
    assert struct.unpack(">H", data[:2])[0] == 1000
    assert raw.read_to_eof() == b""


def test_handshake_without_subprotocol_is_refused_400(stack, conns):
    raw = conns.raw(stack)
    status, line, headers = raw.handshake(protocol=None)
    assert status == 400, line
    assert line.startswith("HTTP/1.1 400 ")
    assert headers["content-type"].startswith("text/plain")
    assert "sec-websocket-accept" not in headers
    body = raw.refused_body(headers)
    assert SUBPROTOCOL in body, body


def test_handshake_with_other_subprotocol_is_refused_400(stack, conns):
    raw = conns.raw(stack)
    status, line, headers = raw.handshake(protocol="chat, superchat")
    assert status == 400, line
    assert SUBPROTOCOL in raw.refused_body(headers)


def test_handshake_without_subprotocol_allowed_when_configured(make_stack, conns):
    s = make_stack(allow_empty_subprotocol=True)
    raw = conns.raw(s)
    status, line, headers = raw.handshake(protocol=None)
    assert status == 101, line
    expected_accept = base64.b64encode(hashlib.sha1(raw.key.encode("ascii") + WS_GUID).digest()).decode("ascii")
    assert headers["sec-websocket-accept"] == expected_accept
    # RFC 6455: the server must not select a subprotocol the client did not offer.
    assert "sec-websocket-protocol" not in headers

    cid = new_id()
    raw.send_frame(ABNF.OPCODE_TEXT, call_text(cid, "test.reverse", "abc").encode())
    _, op, data = raw.recv_frame()
    assert op == ABNF.OPCODE_TEXT
    assert parse_server_msg(data)["payload"] == {"for": cid, "for_type": CALL, "uri": "test.reverse"}
    _, op, data = raw.recv_frame()
    assert op == ABNF.OPCODE_TEXT
    assert parse_server_msg(data)["payload"] == {"for": cid, "uri": "test.reverse", "args": "cba"}
    raw.send_frame(ABNF.OPCODE_CLOSE, struct.pack(">H", 1000))
    _, op, data = raw.recv_frame()
    assert op == ABNF.OPCODE_CLOSE and struct.unpack(">H", data[:2])[0] == 1000
    assert raw.read_to_eof() == b""

    # With websocket-client too, offering nothing.
    ws = conns.ws(s, subprotocols=None)
    assert ws.getsubprotocol() is None
    assert_echo_works(ws)


def test_handshake_with_other_subprotocol_refused_even_when_empty_allowed(make_stack, conns):
    s = make_stack(allow_empty_subprotocol=True)
    raw = conns.raw(s)
    status, line, headers = raw.handshake(protocol="chat")
    assert status == 400, line
    assert SUBPROTOCOL in raw.refused_body(headers)


def test_handshake_wrong_path_404(stack, conns):
    raw = conns.raw(stack)
    status, line, headers = raw.handshake(path="/not-the-ws-path")
    assert status == 404, line
    assert headers["content-type"].startswith("text/plain")
    assert "sec-websocket-accept" not in headers
    raw.refused_body(headers)


def test_handshake_path_with_query_string_is_accepted(stack, conns):
    raw = conns.raw(stack)
    status, line, _ = raw.handshake(path=urlparse(stack.server.url).path + "?token=abc")
    assert status == 101, line


def test_handshake_unknown_allowed_message_400(stack, conns):
    raw = conns.raw(stack)
    status, line, headers = raw.handshake(extra=("Juggler-Allowed-Messages: call, bogus",))
    assert status == 400, line
    assert headers["content-type"].startswith("text/plain")
    assert "sec-websocket-accept" not in headers
    body = raw.refused_body(headers)
    assert "bogus" in body, body


# --- exact JSON --------------------------------------------------------------------------------


def test_call_ack_res_exact_json(stack, conns):
    ws = conns.ws(stack)
    cid = new_id()
    # Byte for byte the CALL of protocol.md, with our uuid.
    ws.send('{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"test.echo","timeout":1000000000,"args":"hello"}}' % cid)
    ack = recv_msg(ws)
    res = recv_msg(ws)
    assert ack["meta"]["type"] == 8
    assert ack["payload"] == {"for": cid, "for_type": 1, "uri": "test.echo"}
    assert res["meta"]["type"] == 9
    assert res["payload"] == {"for": cid, "uri": "test.echo", "args": "hello"}
    assert len({cid, ack["meta"]["uuid"], res["meta"]["uuid"]}) == 3  # a fresh uuid per message


def test_call_args_round_trip_any_json(stack, conns):
    ws = conns.ws(stack)
    args = {"n": 1, "f": 1.5, "s": "héllo ✓", "l": [None, True, False, {"x": []}]}
    assert_echo_works(ws, args)
    assert_echo_works(ws, None)
    assert_echo_works(ws, [])


def test_escaped_surrogate_pair_is_one_character(stack, conns):
    ws = conns.ws(stack)
    cid = new_id()
    ws.send('{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"test.echo","args":"\\ud83d\\ude00"}}' % cid)
    expect(ws, ACK, {"for": cid, "for_type": CALL, "uri": "test.echo"})
    expect(ws, RES, {"for": cid, "uri": "test.echo", "args": "\U0001F600"})


def test_call_without_timeout_and_args(stack, conns):
    ws = conns.ws(stack)
    cid = new_id()
    ws.send(wire(CALL, cid, {"uri": "test.echo"}))  # timeout missing: the default applies
    expect(ws, ACK, {"for": cid, "for_type": CALL, "uri": "test.echo"})
    expect(ws, RES, {"for": cid, "uri": "test.echo", "args": None})


def test_call_error_result(stack, conns):
    ws = conns.ws(stack)
    cid = new_id()
    ws.send(call_text(cid, "test.fail", "boom"))
    expect(ws, ACK, {"for": cid, "for_type": CALL, "uri": "test.fail"})
    # the reference's {"error": {"message": ...}}, with the exception's type beside the message
    expect(ws, RES, {"for": cid, "uri": "test.fail", "args": {"error": {"message": "failed on purpose: boom", "type": "RuntimeError"}}})


def test_sub_pattern_and_pub_exact_json(stack, conns):
    sub_ws = conns.ws(stack)
    pub_ws = conns.ws(stack)
    sid = new_id()
    sub_ws.send('{"meta":{"type":3,"uuid":"%s"},"payload":{"channel":"chan.*","pattern":true}}' % sid)
    expect(sub_ws, ACK, {"for": sid, "for_type": 3, "channel": "chan.*"})

    pid = new_id()
    pub_ws.send('{"meta":{"type":2,"uuid":"%s"},"payload":{"channel":"chan.a","args":{"x":1}}}' % pid)
    expect(pub_ws, ACK, {"for": pid, "for_type": 2, "channel": "chan.a"})
    evnt = expect(sub_ws, EVNT, {"for": pid, "channel": "chan.a", "pattern": "chan.*", "args": {"x": 1}})
    assert evnt["meta"]["uuid"] != pid


def test_sub_plain_channel_event_has_no_pattern(stack, conns):
    sub_ws = conns.ws(stack)
    pub_ws = conns.ws(stack)
    sid = new_id()
    sub_ws.send(sub_text(sid, "plain.a"))
    expect(sub_ws, ACK, {"for": sid, "for_type": SUB, "channel": "plain.a"})
    pid = new_id()
    pub_ws.send(pub_text(pid, "plain.a", [1, "two"]))
    expect(pub_ws, ACK, {"for": pid, "for_type": PUB, "channel": "plain.a"})
    expect(sub_ws, EVNT, {"for": pid, "channel": "plain.a", "args": [1, "two"]})


def test_unsb_ack_and_no_more_events(stack, conns):
    sub_ws = conns.ws(stack)
    pub_ws = conns.ws(stack)
    marker_sub, sid, uid = new_id(), new_id(), new_id()
    sub_ws.send(sub_text(marker_sub, "marker"))
    expect(sub_ws, ACK, {"for": marker_sub, "for_type": SUB, "channel": "marker"})
    sub_ws.send(sub_text(sid, "gone.*", pattern=True))
    expect(sub_ws, ACK, {"for": sid, "for_type": SUB, "channel": "gone.*"})
    sub_ws.send(sub_text(uid, "gone.*", pattern=True, mtype=UNSB))
    expect(sub_ws, ACK, {"for": uid, "for_type": UNSB, "channel": "gone.*"})

    # Events reach one subscriber in publish order: had the UNSB not worked, the first
    # event would arrive before the marker's.
    p1, p2 = new_id(), new_id()
    pub_ws.send(pub_text(p1, "gone.x", "should not arrive"))
    expect(pub_ws, ACK, {"for": p1, "for_type": PUB, "channel": "gone.x"})
    pub_ws.send(pub_text(p2, "marker", "marker"))
    expect(pub_ws, ACK, {"for": p2, "for_type": PUB, "channel": "marker"})
    expect(sub_ws, EVNT, {"for": p2, "channel": "marker", "args": "marker"})


def test_nack_list_capacity_exceeded(make_stack, conns):
    s = make_stack(call_cap=1)
    ws = conns.ws(s)
    first, second = new_id(), new_id()
    ws.send(call_text(first, "nobody.home", 1))
    expect(ws, ACK, {"for": first, "for_type": CALL, "uri": "nobody.home"})
    ws.send(call_text(second, "nobody.home", 2))
    expect(
        ws,
        NACK,
        {"for": second, "for_type": 1, "uri": "nobody.home", "code": 500, "message": "list capacity exceeded"},
    )
    assert_echo_works(ws)  # a NACK does not close the connection


def test_nack_empty_uri(stack, conns):
    ws = conns.ws(stack)
    cid = new_id()
    ws.send(call_text(cid, "", "x"))
    msg = recv_msg(ws)
    assert msg["meta"]["type"] == NACK, msg
    p = msg["payload"]
    assert set(p) == {"for", "for_type", "code", "message"}, p  # uri omitted when empty
    assert p["for"] == cid and p["for_type"] == CALL and p["code"] == 400
    assert isinstance(p["message"], str) and p["message"], p
    assert_echo_works(ws)


@pytest.mark.parametrize("mtype", [PUB, SUB, UNSB])
def test_nack_empty_channel(stack, conns, mtype):
    ws = conns.ws(stack)
    mid = new_id()
    ws.send(wire(mtype, mid, {"channel": ""}))
    msg = recv_msg(ws)
    assert msg["meta"]["type"] == NACK, msg
    p = msg["payload"]
    assert set(p) == {"for", "for_type", "code", "message"}, p  # channel omitted when empty
    assert p["for"] == mid and p["for_type"] == mtype and p["code"] == 400
    assert isinstance(p["message"], str) and p["message"], p
    assert_echo_works(ws)


# --- malformed input closes only that connection -----------------------------------------------

UUID = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"

BAD_TEXT = {
    "not-json": ("this is not json", 1007),
    "truncated-json": ('{"meta":{"type":1,', 1007),
    "json-array": ("[1, 2, 3]", 1007),
    "json-string": ('"hello"', 1007),
    "empty-object": ("{}", 1007),
    "meta-not-object": ('{"meta":1,"payload":{}}', 1007),
    "type-is-string": ('{"meta":{"type":"1","uuid":"%s"},"payload":{"uri":"test.echo"}}' % UUID, 1007),
    "no-uuid": ('{"meta":{"type":1},"payload":{"uri":"test.echo"}}', 1007),
    "bad-uuid": ('{"meta":{"type":1,"uuid":"not-a-uuid"},"payload":{"uri":"test.echo"}}', 1007),
    "payload-not-object": ('{"meta":{"type":1,"uuid":"%s"},"payload":[1]}' % UUID, 1007),
    "uri-not-string": ('{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":5}}' % UUID, 1007),
    "nan-args": ('{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"test.echo","args":NaN}}' % UUID, 1007),
    "infinity-args": ('{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"test.echo","args":-Infinity}}' % UUID, 1007),
    "lone-surrogate": ('{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"test.echo","args":"\\ud800"}}' % UUID, 1007),
    "timeout-over-int64": (
        '{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"test.echo","timeout":%d}}' % (UUID, 1 << 63),
        1007,
    ),
    "uuid-not-canonical": ('{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"test.echo"}}' % UUID.replace("-", ""), 1007),
    "deeply-nested": ('{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"test.echo","args":%s}}' % (UUID, "[" * 100000 + "]" * 100000), 1007),
    "unknown-type-42": ('{"meta":{"type":42,"uuid":"%s"},"payload":{}}' % UUID, 1002),
    "server-type-ack": (wire(ACK, UUID, {"for": new_id(), "for_type": CALL, "uri": "test.echo"}), 1002),
    "server-type-nack": (
        wire(NACK, UUID, {"for": new_id(), "for_type": CALL, "uri": "x", "code": 500, "message": "m"}),
        1002,
    ),
    "server-type-res": (wire(RES, UUID, {"for": new_id(), "uri": "test.echo", "args": 1}), 1002),
    "server-type-evnt": (wire(EVNT, UUID, {"for": new_id(), "channel": "c", "args": 1}), 1002),
}


@pytest.mark.parametrize("case", list(BAD_TEXT))
def test_malformed_text_closes_only_that_connection(stack, conns, case):
    text, code = BAD_TEXT[case]
    bad = conns.ws(stack)
    good = conns.ws(stack)
    bad.send(text)
    got_code, reason = expect_close(bad)
    assert got_code == code, (got_code, reason)
    assert reason, "the close frame should say why"
    assert_echo_works(good)


def test_server_type_without_payload_is_protocol_error(stack, conns):
    # A client may never send an ACK: the type alone breaks the protocol (1002), whatever the
    # payload holds (here none at all, which is also not a valid ACK).
    bad = conns.ws(stack)
    good = conns.ws(stack)
    bad.send(wire(ACK, new_id(), {}))
    code, reason = expect_close(bad)
    assert code == 1002, (code, reason)
    assert reason
    assert_echo_works(good)


def test_binary_frame_closes_1003(stack, conns):
    bad = conns.ws(stack)
    good = conns.ws(stack)
    bad.send_binary(call_text(new_id(), "test.echo", "a valid message, but binary").encode())
    code, reason = expect_close(bad)
    assert code == 1003, (code, reason)
    assert reason
    assert_echo_works(good)


def test_invalid_utf8_text_closes_1007(stack, conns):
    bad = conns.ws(stack)
    good = conns.ws(stack)
    payload = call_text(new_id(), "test.echo", "XX").encode().replace(b"XX", b"\xff\xfe")
    bad.send(payload, opcode=ABNF.OPCODE_TEXT)
    code, reason = expect_close(bad)
    assert code == 1007, (code, reason)
    assert reason
    assert_echo_works(good)


def _call_of_size(size: int) -> str:
    cid = new_id()
    base = call_text(cid, "test.echo", "")
    text = call_text(cid, "test.echo", "a" * (size - len(base)))
    assert len(text.encode()) == size
    return text


def test_message_over_read_limit_closes_1009(make_stack, conns):
    s = make_stack(read_limit=1024)
    bad = conns.ws(s)
    good = conns.ws(s)
    # Exactly the limit is fine...
    text = _call_of_size(1024)
    good.send(text)
    cid = json.loads(text)["meta"]["uuid"]
    expect(good, ACK, {"for": cid, "for_type": CALL, "uri": "test.echo"})
    expect(good, RES, {"for": cid, "uri": "test.echo", "args": json.loads(text)["payload"]["args"]})
    # ...one byte more is not.
    bad.send(_call_of_size(1025))
    code, reason = expect_close(bad)
    assert code == 1009, (code, reason)
    assert reason
    assert_echo_works(good)


def test_fragmented_message_over_read_limit_closes_1009(make_stack, conns):
    s = make_stack(read_limit=1024)
    bad = conns.ws(s)
    good = conns.ws(s)
    data = _call_of_size(1500).encode()
    bad.send_frame(ABNF.create_frame(data[:700], ABNF.OPCODE_TEXT, fin=0))
    bad.send_frame(ABNF.create_frame(data[700:], ABNF.OPCODE_CONT, fin=1))
    code, reason = expect_close(bad)
    assert code == 1009, (code, reason)
    assert_echo_works(good)


def test_breaking_allowed_messages_closes_1008(stack, conns):
    bad = conns.ws(stack, headers=["Juggler-Allowed-Messages: pub"])
    good = conns.ws(stack)
    pid = new_id()
    bad.send(pub_text(pid, "some.channel", 1))  # allowed
    expect(bad, ACK, {"for": pid, "for_type": PUB, "channel": "some.channel"})
    bad.send(sub_text(new_id(), "some.channel"))
    code, reason = expect_close(bad)
    assert code == 1008, (code, reason)
    assert reason
    assert_echo_works(good)


# --- framing -----------------------------------------------------------------------------------


def test_fragmented_message_is_reassembled(stack, conns):
    ws = conns.ws(stack)
    cid = new_id()
    args = "héllo wörld ✓ fragmented"
    data = call_text(cid, "test.echo", args).encode("utf-8")
    # Cut inside multi-byte characters: only the whole message must be valid UTF-8.
    i = data.index("é".encode()) + 1
    j = data.index("✓".encode()) + 2
    ws.send_frame(ABNF.create_frame(data[:i], ABNF.OPCODE_TEXT, fin=0))
    ws.ping(b"between fragments")  # control frames may come between fragments
    ws.send_frame(ABNF.create_frame(data[i:j], ABNF.OPCODE_CONT, fin=0))
    ws.send_frame(ABNF.create_frame(data[j:], ABNF.OPCODE_CONT, fin=1))
    opcode, payload = ws.recv_data(control_frame=True)
    assert (opcode, payload) == (ABNF.OPCODE_PONG, b"between fragments")
    expect(ws, ACK, {"for": cid, "for_type": CALL, "uri": "test.echo"})
    expect(ws, RES, {"for": cid, "uri": "test.echo", "args": args})


@pytest.mark.parametrize("payload", [b"juggler-ping", b""])
def test_ping_gets_pong_with_same_payload(stack, conns, payload):
    ws = conns.ws(stack)
    ws.ping(payload)
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == ABNF.OPCODE_PONG
    assert data == payload
    assert_echo_works(ws)


def test_client_close_1000_is_echoed(stack, conns):
    ws = conns.ws(stack)
    assert_echo_works(ws)
    ws.send(struct.pack(">H", 1000) + b"bye", ABNF.OPCODE_CLOSE)
    frame = ws.recv_frame()
    assert frame.opcode == ABNF.OPCODE_CLOSE
    assert struct.unpack(">H", frame.data[:2])[0] == 1000
    assert_tcp_closed(ws.sock)
    ws.shutdown()


# --- allowed messages --------------------------------------------------------------------------


def test_allowed_call_only(stack, conns):
    ws = conns.ws(stack, headers=["Juggler-Allowed-Messages: call"])
    good = conns.ws(stack)
    assert_echo_works(ws)
    ws.send(sub_text(new_id(), "chan.x"))
    code, reason = expect_close(ws)
    assert code == 1008, (code, reason)
    assert reason
    assert_echo_works(good)


@pytest.mark.parametrize("forbidden", ["call", "pub", "unsb"])
def test_allowed_list_is_case_insensitive_and_ignores_spaces(stack, conns, forbidden):
    allowed = {"call": "CALL", "pub": " Pub", "sub": "sub ", "unsb": " UNSB "}
    del allowed[forbidden]
    ws = conns.ws(stack, headers=["Juggler-Allowed-Messages: " + ",".join(allowed.values())])
    # Everything in the list works...
    if "call" in allowed:
        assert_echo_works(ws)
    sid = new_id()
    ws.send(sub_text(sid, "case.chan"))
    expect(ws, ACK, {"for": sid, "for_type": SUB, "channel": "case.chan"})
    # ...and the one left out closes the connection with 1008.
    if forbidden == "call":
        ws.send(call_text(new_id(), "test.echo", 1))
    elif forbidden == "pub":
        ws.send(pub_text(new_id(), "case.chan", 1))
    else:
        ws.send(sub_text(new_id(), "case.chan", mtype=UNSB))
    code, reason = expect_close(ws)
    assert code == 1008, (code, reason)


@pytest.mark.parametrize("value", ["*", "", "call,pub,sub,unsb"])
def test_allowed_all(stack, conns, value):
    ws = conns.ws(stack, headers=[f"Juggler-Allowed-Messages: {value}"])
    assert_echo_works(ws)
    sid, pid, uid = new_id(), new_id(), new_id()
    ws.send(sub_text(sid, "all.chan"))
    expect(ws, ACK, {"for": sid, "for_type": SUB, "channel": "all.chan"})
    ws.send(pub_text(pid, "all.chan", {"k": "v"}))
    # The ACK and the EVNT race (different threads write them): take both, in either order.
    got = sorted((recv_msg(ws) for _ in range(2)), key=lambda m: m["meta"]["type"])
    assert got[0]["meta"]["type"] == ACK and got[0]["payload"] == {"for": pid, "for_type": PUB, "channel": "all.chan"}
    assert got[1]["meta"]["type"] == EVNT and got[1]["payload"] == {"for": pid, "channel": "all.chan", "args": {"k": "v"}}
    ws.send(sub_text(uid, "all.chan", mtype=UNSB))
    expect(ws, ACK, {"for": uid, "for_type": UNSB, "channel": "all.chan"})


def test_every_call_ack_precedes_its_res_under_load(stack):
    """200 CALLs in one burst, twice: each gets exactly one ACK, then exactly one RES. (In the
    second burst, on real redis, the first CALL may be stored through the idle results
    listener and the others the usual way, while its BRPOP waits.)"""
    import uuid as uuidlib

    ws = websocket.create_connection(stack.server.url, subprotocols=["juggler.0"], timeout=T(10))
    try:
        for _ in range(2):
            ids = [str(uuidlib.uuid4()) for _ in range(200)]
            for i in ids:
                ws.send(json.dumps({"meta": {"type": 1, "uuid": i}, "payload": {"uri": "test.echo", "timeout": 10**10, "args": i}}))
            seen: dict[str, list[int]] = {i: [] for i in ids}
            for _ in range(400):
                msg = json.loads(ws.recv())
                seen[msg["payload"]["for"]].append(msg["meta"]["type"])
                if msg["meta"]["type"] == 9:
                    assert msg["payload"]["args"] == msg["payload"]["for"]
            assert all(types == [8, 9] for types in seen.values()), {k: v for k, v in seen.items() if v != [8, 9]}
    finally:
        ws.close()


def test_a_call_stored_through_the_results_listener_is_acked_or_nacked_as_any_other(make_stack, conns):
    # On real redis, once a connection's results listener has no call in flight, the next
    # CALL is stored through the listener's own redis connection, the reader not waiting for
    # redis: the listener ACKs it, or NACKs it when redis refuses it, as the reader would.
    s = make_stack(call_cap=1)
    stored_by_reader = []
    store_call = s.broker.store_call
    s.broker.store_call = lambda payload, timeout: (stored_by_reader.append(payload.msg_uuid), store_call(payload, timeout))
    ws = conns.ws(s)
    assert_echo_works(ws)  # its listener runs, and now waits for its next call
    (conn,) = s.server.connections
    deadline = time.monotonic() + T(5)
    while conn._results is not None and getattr(conn._results, "_expect", None):
        assert time.monotonic() < deadline, "the listener is still busy"  # (a bounded wait for it)
        time.sleep(0.005)
    filler = conns.ws(s)
    full, refused = new_id(), new_id()
    filler.send(call_text(full, "nobody.home", 1))
    expect(filler, ACK, {"for": full, "for_type": CALL, "uri": "nobody.home"})
    ws.send(call_text(refused, "nobody.home", 2))
    nack = {"for": refused, "for_type": 1, "uri": "nobody.home", "code": 500, "message": "list capacity exceeded"}
    expect(ws, NACK, nack)
    assert_echo_works(ws)
    real = "fakeredis" not in type(s.redis).__module__
    assert (refused in stored_by_reader) is not real
    assert conn._ahead is real


def test_non_finite_number_closes_1007(stack):
    ws = websocket.create_connection(stack.server.url, subprotocols=["juggler.0"], timeout=TIMEOUT)
    try:
        ws.send('{"meta":{"type":2,"uuid":"797b5a8e-1b6d-4a4e-9a3b-0a6f1f0f7c11"},"payload":{"channel":"c","args":1e999}}')
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == ABNF.OPCODE_CLOSE and struct.unpack(">H", data[:2])[0] == 1007
    finally:
        ws.close()


@pytest.mark.parametrize("key", ["dGhlIHNhbXBsZSBub25jZQ", "\u00e9\u00e9\u00e9\u00e9", "c2hvcnQ="])
def test_invalid_websocket_key_gets_400(stack, key):
    host, port = urlparse(stack.server.url).hostname, urlparse(stack.server.url).port
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(
            (f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
             f"Sec-WebSocket-Protocol: juggler.0\r\n\r\n").encode("utf-8")
        )  # fmt: skip
        data = b""
        while not data.endswith(b"\n") or b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"Sec-WebSocket-Key" in data
