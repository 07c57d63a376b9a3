"""Unit tests of juggler.frames, juggler.peer, juggler.transport and juggler.handshake: RFC
6455 framing.

Frame reading runs over a real ``socket.socketpair()``: the tests write masked client frames
(built here, independently of the module) into one end and read them with a SocketReader
feeding a Peer on the other (:class:`tests.conftest.PeerReader`). Every read is bounded: the
reader has a deadline, so a bug makes a test fail with :class:`Stopped` instead of hanging.
(tests/test_peer.py feeds a Peer bytes directly.)
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import socket
import ssl
import struct
import threading
import time

import pytest

from juggler.exceptions import ProtocolError
from juggler.frames import FRAGMENT_COST, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, encode_close, encode_frame, parse_close, unmask
from juggler.handshake import HandshakeRequest, accept_key, http_response
from juggler.peer import CLOSE, SEND
from juggler.transport import SocketIO, SocketReader, Stopped

from .conftest import PeerReader

READ_BOUND = 10.0  # seconds any single test may spend blocked in a read
MASK = b"\x37\xfa\x21\x3d"


# --- helpers ----------------------------------------------------------------------------------


def naive_xor(data: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
    length: int | None = None,
    with_payload: bool = True,
) -> bytes:
    """A client frame. ``mask=None`` sends it unmasked; ``length`` overrides the declared length
    (its encoding follows the declared length); ``with_payload=False`` sends the head only."""
    n = len(payload) if length is None else length
    b1 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head = struct.pack(">BB", b1, mbit | n)
    elif n < 65536:
        head = struct.pack(">BBH", b1, mbit | 126, n)
    else:
        head = struct.pack(">BBQ", b1, mbit | 127, n)
    if mask is not None:
        head += mask
        payload = naive_xor(payload, mask)
    return head + payload if with_payload else head


def deadline(seconds: float = READ_BOUND) -> float:
    """A reader's deadline ``seconds`` from now."""
    return time.monotonic() + seconds


@pytest.fixture
def pair():
    client, server = socket.socketpair()
    yield client, server
    client.close()
    server.close()


def frames(sock: socket.socket, limit: int = 1 << 20, until: float | None = None) -> PeerReader:
    return PeerReader(SocketReader(sock, deadline=until or deadline()), limit=limit)


def pong(payload: bytes) -> tuple[int, bytes]:
    """The event of a ping from the client: the server's pong, to send."""
    return SEND, encode_frame(OP_PONG, payload)


class Sender:
    """Writes ``data`` from a thread, for payloads larger than a socket buffer may hold."""

    def __init__(self, sock: socket.socket, data: bytes):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(sock, data), name="test-sender", daemon=True)
        self.thread.start()

    def _run(self, sock, data):
        try:
            sock.sendall(data)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self):
        self.thread.join(READ_BOUND)
        assert not self.thread.is_alive()
        assert self.error is None


def expect_protocol_error(reader: PeerReader, close_code: int = 1002) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        reader.read()
    assert info.value.close_code == close_code, str(info.value)
    assert str(info.value)
    return info.value


# --- unmask -----------------------------------------------------------------------------------

MASKS = [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x02\x03\x04", MASK, b"\x80\x00\x00\x01", bytes(random.Random(1).randrange(256) for _ in range(4))]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.hex())
@pytest.mark.parametrize("n", range(21))
def test_unmask_matches_naive_xor(n, mask):
    rng = random.Random(n)
    for data in (bytes(rng.randrange(256) for _ in range(n)), b"\x00" * n, b"\xff" * n, (mask * 6)[:n]):
        got = unmask(data, mask)
        assert isinstance(got, bytes)
        assert got == naive_xor(data, mask)
        assert len(got) == n
        assert unmask(got, mask) == data


def test_unmask_of_mask_is_zeros():
    # leading/trailing zero bytes must survive the int round trip
    assert unmask(MASK * 5, MASK) == b"\x00" * 20
    assert unmask(MASK * 5 + MASK[:3], MASK) == b"\x00" * 23


@pytest.mark.parametrize("n", [1 << 20, (1 << 20) + 3, 65537])
def test_unmask_large_random_payload(n):
    data = os.urandom(n)
    mask = os.urandom(4)
    assert unmask(data, mask) == naive_xor(data, mask)


# --- encode_frame -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, length_bytes",
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (125, b"\x7d"),
        (126, b"\x7e\x00\x7e"),
        (127, b"\x7e\x00\x7f"),
        (65535, b"\x7e\xff\xff"),
        (65536, b"\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (70000, b"\x7f" + (70000).to_bytes(8, "big")),
    ],
)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG])
def test_encode_frame_header(opcode, n, length_bytes):
    payload = bytes(i % 251 for i in range(n))
    frame = encode_frame(opcode, payload)
    # FIN set, no reserved bits, the opcode; unmasked (server frames are never masked)
    assert frame[0] == 0x80 | opcode
    assert frame[1] & 0x80 == 0
    assert frame[1 : 1 + len(length_bytes)] == length_bytes
    assert frame[1 + len(length_bytes) :] == payload
    assert len(frame) == 1 + len(length_bytes) + n


def test_encode_frame_exact_bytes():
    assert encode_frame(OP_TEXT, b"hello") == b"\x81\x05hello"
    assert encode_frame(OP_PONG, b"") == b"\x8a\x00"


# --- encode_close / parse_close ---------------------------------------------------------------


def test_encode_close_exact_bytes():
    assert encode_close(1000) == b"\x88\x02\x03\xe8"
    assert encode_close(1002, "bad") == b"\x88\x05\x03\xeabad"
    assert encode_close(4000, "é") == b"\x88\x04\x0f\xa0\xc3\xa9"


@pytest.mark.parametrize(
    "reason",
    [
        "",
        "short",
        "a" * 123,
        "a" * 124,
        "a" * 500,
        "é" * 61,  # 122 bytes: fits
        "é" * 62,  # 124 bytes: one 2-byte char cut in half at 123
        "a" + "é" * 100,  # 123 bytes fit exactly at the cut
        "€" * 41,  # 123 bytes: fits exactly
        "€" * 42,
        "ab" + "€" * 50,  # the cut falls inside a 3-byte char (after its first byte)
        "a" + "€" * 50,  # the cut falls inside a 3-byte char (after its second byte)
        "😀" * 40,  # 4-byte chars: 123 = 30*4 + 3
        "abc" + "😀" * 40,
        "ab" + "😀" * 40,
        "x" * 120 + "😀",
    ],
)
@pytest.mark.parametrize("code", [1000, 1002, 1007, 1011, 4000])
def test_encode_close_reason_cut_to_fit(code, reason):
    frame = encode_close(code, reason)
    assert frame[0] == 0x88
    n = frame[1]
    assert n <= 125
    payload = frame[2:]
    assert len(payload) == n
    assert struct.unpack(">H", payload[:2])[0] == code
    sent = payload[2:].decode("utf-8")  # valid UTF-8: no character split
    assert reason.startswith(sent)
    assert len(sent.encode("utf-8")) <= 123
    # the longest prefix that fits: nothing dropped that would have fitted
    if sent != reason:
        assert len(reason[: len(sent) + 1].encode("utf-8")) > 123
    assert parse_close(payload) == (code, sent)


def test_parse_close_empty_is_1005():
    assert parse_close(b"") == (1005, "")


def test_parse_close_one_byte():
    with pytest.raises(ProtocolError) as info:
        parse_close(b"\x03")
    assert info.value.close_code == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999])
def test_parse_close_valid_codes(code):
    assert parse_close(struct.pack(">H", code)) == (code, "")
    assert parse_close(struct.pack(">H", code) + "bye é".encode()) == (code, "bye é")


@pytest.mark.parametrize("code", [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_parse_close_invalid_codes(code):
    with pytest.raises(ProtocolError) as info:
        parse_close(struct.pack(">H", code) + b"reason")
    assert info.value.close_code == 1002


@pytest.mark.parametrize("reason", [b"\xff", b"ok\xc3", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"])
def test_parse_close_invalid_utf8_reason(reason):
    with pytest.raises(ProtocolError) as info:
        parse_close(b"\x03\xe8" + reason)
    assert info.value.close_code == 1007


# --- handshake pieces ------------------------------------------------------------------------


def test_accept_key_rfc6455_sample():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_accept_key_other_keys():
    for _ in range(20):
        key = base64.b64encode(os.urandom(16)).decode()
        want = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        assert accept_key(key) == want
        assert len(accept_key(key)) == 28


HEAD = (
    b"GET /ws?x=1 HTTP/1.1\r\n"
    b"Host: example.com:8080\r\n"
    b"Upgrade: websocket\r\n"
    b"connection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"SEC-WEBSOCKET-PROTOCOL: chat\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol:juggler.0  \r\n"
    b"Juggler-Allowed-Messages:   call , SUB  \r\n"
    b"X-Empty:\r\n"
    b"\r\n"
)


@pytest.mark.parametrize("head", [HEAD, HEAD[:-2], HEAD[:-4]], ids=["with-blank-line", "one-crlf", "no-crlf"])
def test_handshake_parse(head):
    req = HandshakeRequest.parse(head)
    assert (req.method, req.path, req.version) == ("GET", "/ws?x=1", "HTTP/1.1")
    assert req.headers == {
        "host": "example.com:8080",
        "upgrade": "websocket",
        "connection": "keep-alive, Upgrade",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        "sec-websocket-protocol": "chat, juggler.0",
        "sec-websocket-version": "13",
        "juggler-allowed-messages": "call , SUB",
        "x-empty": "",
    }
    assert req.tokens("sec-websocket-protocol") == ["chat", "juggler.0"]
    assert req.tokens("connection") == ["keep-alive", "Upgrade"]
    assert req.tokens("juggler-allowed-messages") == ["call", "SUB"]
    assert req.tokens("x-empty") == []
    assert req.tokens("absent") == []


def test_handshake_parse_repeated_headers_in_order():
    req = HandshakeRequest.parse(b"GET / HTTP/1.1\r\nA: 1\r\nB: x\r\na: 2\r\nA: 3, 4\r\n\r\n")
    assert req.headers == {"a": "1, 2, 3, 4", "b": "x"}
    assert req.tokens("a") == ["1", "2", "3", "4"]


def test_handshake_parse_latin1_value():
    req = HandshakeRequest.parse(b"GET / HTTP/1.1\r\nX-Name: caf\xe9\r\n\r\n")
    assert req.headers["x-name"] == "caf\xe9"


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /ws\r\n\r\n",
        b"GET /ws HTTP/1.1 extra\r\n\r\n",
        b"GET  /ws HTTP/1.1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nNo-Colon-Here\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\n: empty-name\r\n\r\n",
        b"GET /ws HTTP/1.1\r\n   : blank-name\r\n\r\n",
    ],
)
def test_handshake_parse_malformed(head):
    with pytest.raises(ProtocolError):
        HandshakeRequest.parse(head)


def test_http_response_101():
    got = http_response(
        101,
        "Switching Protocols",
        {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Accept": "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="},
    )
    assert got == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"\r\n"
    )


def parse_response(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for ln in lines[1:]:
        name, _, value = ln.partition(": ")
        assert name not in headers
        headers[name] = value
    return lines[0], headers, body


def test_http_response_error_with_body():
    status, headers, body = parse_response(http_response(400, "Bad Request", body="no juggler.0 subprotocol: é"))
    assert status == "HTTP/1.1 400 Bad Request"
    assert body == "no juggler.0 subprotocol: é".encode("utf-8")
    assert headers == {
        "Content-Type": "text/plain; charset=utf-8",
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    assert headers["Content-Length"] == str(len("no juggler.0 subprotocol: é") + 1)  # bytes, not chars


def test_http_response_error_keeps_given_headers():
    raw = http_response(426, "Upgrade Required", {"Sec-WebSocket-Version": "13", "Content-Type": "text/html"}, "<b>x</b>")
    status, headers, body = parse_response(raw)
    assert status == "HTTP/1.1 426 Upgrade Required"
    assert headers == {"Sec-WebSocket-Version": "13", "Content-Type": "text/html", "Content-Length": "8", "Connection": "close"}
    assert body == b"<b>x</b>"


def test_http_response_empty_body_and_no_headers_mutation():
    given = {"X-A": "1"}
    status, headers, body = parse_response(http_response(503, "Service Unavailable", given))
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert headers["Content-Length"] == "0" and body == b""
    assert given == {"X-A": "1"}


# --- SocketReader ------------------------------------------------------------------------------


def test_read_until_then_frames_from_the_same_buffer(pair):
    client, server = pair
    head = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"
    client.sendall(head + client_frame(OP_TEXT, b"first") + client_frame(OP_TEXT, b"second"))
    sr = SocketReader(server, deadline=deadline())
    assert sr.read_until(b"\r\n\r\n", 16384) == head
    fr = PeerReader(sr)
    assert fr.read() == (OP_TEXT, b"first")
    assert fr.read() == (OP_TEXT, b"second")


def test_read_until_over_limit(pair):
    client, server = pair
    client.sendall(b"GET /ws HTTP/1.1\r\n" + b"X: " + b"y" * 300)
    sr = SocketReader(server, deadline=deadline())
    with pytest.raises(ProtocolError) as info:
        sr.read_until(b"\r\n\r\n", 100)
    assert info.value.close_code == 1009


def test_read_until_peer_closes(pair):
    client, server = pair
    client.sendall(b"GET /ws HTTP/1.1\r\n")
    client.close()
    with pytest.raises(Stopped):
        SocketReader(server, deadline=deadline()).read_until(b"\r\n\r\n", 16384)


def test_read_exact_across_many_small_receives(pair):
    """Bytes trickle in one at a time: each is sent only once the reader has taken the one
    before it, so every read sees a single byte."""
    client, server = pair
    data = (
        client_frame(OP_TEXT, b"x" * 300)  # 16-bit length
        + client_frame(OP_PING, b"ping")
        + client_frame(OP_TEXT, b"ab", fin=False)
        + client_frame(OP_CONT, b"cd")
    )
    sr = SocketReader(server, deadline=deadline())
    taken = threading.Semaphore(0)
    recv = sr._recv

    def recv_one() -> bytes:
        data = recv()
        taken.release()
        return data

    sr._recv = recv_one
    errors: list[BaseException] = []

    def trickle() -> None:
        try:
            for i in range(len(data)):
                client.sendall(data[i : i + 1])
                assert taken.acquire(timeout=READ_BOUND), "the reader did not take the byte"
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=trickle, name="juggler-test-trickle")
    t.start()
    fr = PeerReader(sr)
    assert fr.read() == (OP_TEXT, b"x" * 300)
    assert fr.read() == pong(b"ping")
    assert fr.read() == (OP_TEXT, b"abcd")
    t.join(READ_BOUND)
    assert not t.is_alive() and errors == []


# --- Peer over a SocketReader: messages -------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 1000, 65535, 65536, 200000])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_single_frame_message(pair, opcode, n):
    client, server = pair
    payload = os.urandom(n)
    sender = Sender(client, client_frame(opcode, payload, mask=os.urandom(4)))
    assert frames(server).read() == (opcode, payload)
    sender.join()


def test_messages_in_one_write_come_out_in_order(pair):
    client, server = pair
    client.sendall(
        client_frame(OP_TEXT, '{"a":"é"}'.encode())
        + client_frame(OP_PING, b"")
        + client_frame(OP_BINARY, b"\x00\x01")
        + client_frame(OP_PONG, b"pong")
        + client_frame(OP_TEXT, b"")
        + client_frame(OP_CLOSE, b"\x03\xe8bye")
    )
    fr = frames(server)
    assert fr.read() == (OP_TEXT, '{"a":"é"}'.encode())
    assert fr.read() == pong(b"")
    assert fr.read() == (OP_BINARY, b"\x00\x01")
    assert fr.read() == (OP_PONG, b"pong")
    assert fr.read() == (OP_TEXT, b"")
    assert fr.read() == (CLOSE, (1000, "bye"))


def test_fragmented_message_with_interleaved_ping(pair):
    client, server = pair
    client.sendall(
        client_frame(OP_TEXT, b"Hel", fin=False)
        + client_frame(OP_PING, b"are you there")
        + client_frame(OP_CONT, b"lo ", fin=False, mask=b"\x00\x00\x00\x00")
        + client_frame(OP_CONT, b"world", mask=b"\xaa\xbb\xcc\xdd")
        + client_frame(OP_TEXT, b"next")
    )
    fr = frames(server)
    # the ping arrives in the middle of the message and is returned first
    assert fr.read() == pong(b"are you there")
    assert fr.read() == (OP_TEXT, b"Hello world")
    # the state is reset: the next message is a fresh one
    assert fr.read() == (OP_TEXT, b"next")


def test_fragmented_message_with_all_control_frames_interleaved(pair):
    """Pings and pongs inside a fragmented message; a close frame inside one ends the stream
    (nothing may follow it)."""
    client, server = pair
    client.sendall(
        client_frame(OP_BINARY, b"", fin=False)
        + client_frame(OP_PONG, b"1")
        + client_frame(OP_CONT, b"\x00\x01", fin=False)
        + client_frame(OP_PING, b"2")
        + client_frame(OP_CONT, b"\x02")
        + client_frame(OP_TEXT, b"a", fin=False)
        + client_frame(OP_CLOSE, b"")
        + client_frame(OP_CONT, b"b")
    )
    client.close()
    fr = frames(server)
    assert fr.read() == (OP_PONG, b"1")
    assert fr.read() == pong(b"2")
    assert fr.read() == (OP_BINARY, b"\x00\x01\x02")
    assert fr.read() == (CLOSE, (1005, ""))
    with pytest.raises(Stopped):
        fr.read()


def test_many_fragments_with_large_ones(pair):
    client, server = pair
    parts = [os.urandom(n) for n in (0, 1, 125, 126, 65535, 65536, 3, 0)]
    data = client_frame(OP_TEXT, parts[0], fin=False)
    data += b"".join(client_frame(OP_CONT, p, fin=False, mask=os.urandom(4)) for p in parts[1:-1])
    data += client_frame(OP_CONT, parts[-1])
    sender = Sender(client, data)
    assert frames(server).read() == (OP_TEXT, b"".join(parts))
    sender.join()


# --- Peer over a SocketReader: protocol errors -------------------------------------------------------------


@pytest.mark.parametrize("fin", [True, False])
def test_continuation_without_start(pair, fin):
    client, server = pair
    client.sendall(client_frame(OP_CONT, b"orphan", fin=fin))
    expect_protocol_error(frames(server))


def test_continuation_after_a_complete_message(pair):
    client, server = pair
    client.sendall(client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_CONT, b"b") + client_frame(OP_CONT, b"c"))
    fr = frames(server)
    assert fr.read() == (OP_TEXT, b"ab")
    expect_protocol_error(fr)


@pytest.mark.parametrize("first", [OP_TEXT, OP_BINARY])
@pytest.mark.parametrize("second", [OP_TEXT, OP_BINARY])
@pytest.mark.parametrize("second_fin", [True, False])
def test_new_data_frame_inside_fragmented_message(pair, first, second, second_fin):
    client, server = pair
    client.sendall(client_frame(first, b"a", fin=False) + client_frame(second, b"b", fin=second_fin))
    expect_protocol_error(frames(server))


def test_new_data_frame_after_continuation_inside_fragmented_message(pair):
    client, server = pair
    client.sendall(
        client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_CONT, b"b", fin=False) + client_frame(OP_PING) + client_frame(OP_TEXT, b"c")
    )
    fr = frames(server)
    assert fr.read() == pong(b"")
    expect_protocol_error(fr)


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_PING, OP_PONG, OP_CLOSE])
def test_unmasked_frame(pair, opcode):
    client, server = pair
    client.sendall(client_frame(opcode, b"hi", mask=None))
    expect_protocol_error(frames(server))


def test_unmasked_continuation(pair):
    client, server = pair
    client.sendall(client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_CONT, b"b", mask=None))
    expect_protocol_error(frames(server))


@pytest.mark.parametrize("rsv", [1, 2, 4, 3, 7])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_PING, OP_CLOSE])
def test_reserved_bits(pair, opcode, rsv):
    client, server = pair
    client.sendall(client_frame(opcode, b"hi", rsv=rsv))
    expect_protocol_error(frames(server))


def test_reserved_bits_on_continuation(pair):
    client, server = pair
    client.sendall(client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_CONT, b"b", rsv=4))
    expect_protocol_error(frames(server))


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcode(pair, opcode):
    client, server = pair
    client.sendall(client_frame(opcode, b"hi"))
    expect_protocol_error(frames(server))


@pytest.mark.parametrize("n", [126, 127, 1000, 65536])
@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frame_too_long(pair, opcode, n):
    client, server = pair
    # head only: the reader must refuse before waiting for the payload
    client.sendall(client_frame(opcode, length=n, with_payload=False))
    expect_protocol_error(frames(server))


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frame_not_final(pair, opcode):
    client, server = pair
    client.sendall(client_frame(opcode, b"x", fin=False))
    expect_protocol_error(frames(server))


def test_control_frame_of_125_bytes_is_fine(pair):
    client, server = pair
    client.sendall(client_frame(OP_PING, b"p" * 125) + client_frame(OP_CLOSE, b"\x03\xe8" + b"r" * 123))
    fr = frames(server)
    assert fr.read() == pong(b"p" * 125)
    assert fr.read() == (CLOSE, (1000, "r" * 123))


def test_64bit_length_with_high_bit(pair):
    client, server = pair
    client.sendall(struct.pack(">BBQ", 0x80 | OP_BINARY, 0x80 | 127, 1 << 63) + MASK)
    expect_protocol_error(frames(server, limit=1 << 62), 1002)


# --- Peer over a SocketReader: read limit -------------------------------------------------------------------


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_single_frame_at_limit_is_fine(pair, opcode):
    client, server = pair
    client.sendall(client_frame(opcode, b"x" * 100))
    assert frames(server, limit=100).read() == (opcode, b"x" * 100)


@pytest.mark.parametrize("declared", [101, 126, 65536, 1 << 40, (1 << 63) - 1])
def test_single_frame_over_limit(pair, declared):
    client, server = pair
    # head only: the limit is checked before the payload is waited for
    client.sendall(client_frame(OP_TEXT, length=declared, with_payload=False))
    expect_protocol_error(frames(server, limit=100), 1009)


def test_default_limit_is_one_mib(pair):
    client, server = pair
    client.sendall(client_frame(OP_BINARY, length=(1 << 20) + 1, with_payload=False))
    expect_protocol_error(frames(server), 1009)


def test_fragments_over_limit(pair):
    client, server = pair
    client.sendall(client_frame(OP_TEXT, b"x" * 6, fin=False) + client_frame(OP_CONT, b"y" * 4, fin=False) + client_frame(OP_CONT, b"z"))
    expect_protocol_error(frames(server, limit=10), 1009)


def test_fragments_over_limit_declared_only(pair):
    client, server = pair
    client.sendall(client_frame(OP_BINARY, b"x" * 60, fin=False) + client_frame(OP_CONT, length=1 << 32, with_payload=False))
    expect_protocol_error(frames(server, limit=100), 1009)


def test_fragments_at_limit_and_limit_is_per_message(pair):
    client, server = pair
    one = client_frame(OP_TEXT, b"x" * 6, fin=False) + client_frame(OP_PING, b"p" * 50) + client_frame(OP_CONT, b"y" * 4)
    client.sendall(one + one + client_frame(OP_TEXT, b"z" * 10))
    fr = frames(server, limit=10 + FRAGMENT_COST)  # one continuation frame: 10 bytes + its cost
    for _ in range(2):
        # control frames do not count towards the limit
        assert fr.read() == pong(b"p" * 50)
        assert fr.read() == (OP_TEXT, b"x" * 6 + b"y" * 4)
    assert fr.read() == (OP_TEXT, b"z" * 10)


def test_each_continuation_frame_costs_against_the_limit(pair):
    client, server = pair
    # 10 payload bytes in two fragments fit a limit of 10 + one fragment's cost, not one less
    client.sendall(client_frame(OP_TEXT, b"x" * 6, fin=False) + client_frame(OP_CONT, b"y" * 4))
    with pytest.raises(ProtocolError) as info:
        frames(server, limit=9 + FRAGMENT_COST).read()
    assert info.value.close_code == 1009


def test_flood_of_empty_continuation_frames_hits_the_limit(pair):
    client, server = pair
    n = 1024 // FRAGMENT_COST + 1
    client.sendall(client_frame(OP_TEXT, b"", fin=False) + client_frame(OP_CONT, b"", fin=False) * n)
    with pytest.raises(ProtocolError) as info:
        frames(server, limit=1024).read()
    assert info.value.close_code == 1009


def test_control_frames_do_not_count_against_a_small_limit(pair):
    client, server = pair
    client.sendall(client_frame(OP_PING, b"p" * 125) + client_frame(OP_CLOSE, b"\x03\xe8" + b"r" * 100))
    fr = frames(server, limit=1)
    assert fr.read() == pong(b"p" * 125)
    assert fr.read() == (CLOSE, (1000, "r" * 100))


# --- Peer over a SocketReader: stopping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [
        b"",
        client_frame(OP_TEXT, b"hello")[:1],  # half the 2-byte head
        client_frame(OP_TEXT, b"x" * 200)[:3],  # inside the extended length
        client_frame(OP_TEXT, b"hello")[:4],  # inside the mask
        client_frame(OP_TEXT, b"hello")[:-1],  # inside the payload
        client_frame(OP_TEXT, b"a", fin=False),  # inside a fragmented message
    ],
    ids=["nothing", "head", "ext-length", "mask", "payload", "fragment"],
)
@pytest.mark.parametrize("how", ["close", "shutdown"])
def test_peer_closing_the_socket_stops(pair, partial, how):
    client, server = pair
    client.sendall(partial)
    if how == "close":
        client.close()
    else:
        client.shutdown(socket.SHUT_WR)
    until = deadline()
    with pytest.raises(Stopped):
        frames(server, until=until).read()
    assert time.monotonic() < until, "stopped by the deadline, not by the peer closing"


def test_complete_frames_before_peer_close_are_read_first(pair):
    client, server = pair
    client.sendall(client_frame(OP_TEXT, b"last words") + client_frame(OP_CLOSE, b"\x03\xe8"))
    client.close()
    fr = frames(server)
    assert fr.read() == (OP_TEXT, b"last words")
    assert fr.read() == (CLOSE, (1000, ""))
    with pytest.raises(Stopped):
        fr.read()


def test_a_passed_deadline_stops_at_once(pair):
    client, server = pair
    started = time.monotonic()
    with pytest.raises(Stopped, match="timed out"):
        frames(server, until=started - 1).read()
    assert time.monotonic() - started < READ_BOUND / 2


def test_a_passed_deadline_stops_even_with_data_waiting(pair):
    client, server = pair
    client.sendall(client_frame(OP_TEXT, b"unread"))
    with pytest.raises(Stopped, match="timed out"):
        frames(server, until=time.monotonic() - 1).read()


def test_the_deadline_ends_a_wait_for_silence(pair):
    """Nothing arrives: the reader waits until its deadline, not longer, and not forever."""
    client, server = pair
    started = time.monotonic()
    with pytest.raises(Stopped, match="timed out"):
        frames(server, until=started + 0.2).read()
    assert 0.2 <= time.monotonic() - started < READ_BOUND / 2


def test_no_deadline_waits_until_the_socket_is_shut_down(pair):
    """With no deadline the reader blocks with no timeout (it does not poll); shutting the
    socket down from another thread wakes it, mid-message too."""
    client, server = pair
    client.sendall(client_frame(OP_TEXT, b"whole") + client_frame(OP_TEXT, b"a", fin=False))
    io = SocketIO(server)
    fr = PeerReader(SocketReader(io))
    assert fr.read() == (OP_TEXT, b"whole")
    errors: list[BaseException] = []

    def read() -> None:
        try:
            fr.read()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=read, name="juggler-test-r")
    t.start()
    t.join(0.2)
    assert t.is_alive(), "the reader returned without data, a shutdown or a deadline"
    io.shutdown()
    t.join(READ_BOUND)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], Stopped)


# --- client frames ----------------------------------------------------------------------------


def test_masked_frames_from_encode_frame_read_back(pair):
    client, server = pair
    payload = os.urandom(70000)
    client.sendall(encode_frame(OP_TEXT, payload, MASK) + encode_close(1000, "bye", MASK))
    assert encode_frame(OP_TEXT, b"hi", MASK) == client_frame(OP_TEXT, b"hi")
    reader = frames(server, limit=1 << 20)
    assert reader.read() == (OP_TEXT, payload)
    assert reader.read() == (CLOSE, (1000, "bye"))


def test_client_side_reader_takes_unmasked_frames_and_refuses_masked_ones(pair):
    client, server = pair
    reader = PeerReader(SocketReader(server, deadline=deadline()), client=True)
    client.sendall(encode_frame(OP_TEXT, b"from the server"))
    assert reader.read() == (OP_TEXT, b"from the server")
    client.sendall(encode_frame(OP_TEXT, b"masked", MASK))
    with pytest.raises(ProtocolError, match="server frames must not be masked"):
        reader.read()


# --- SocketIO over TLS ------------------------------------------------------------------------

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture
def tls_pair():
    """Two connected TLS sockets on loopback, wrapped in SocketIO (write timeout 5 s)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(os.path.join(DATA, "localhost.crt"), os.path.join(DATA, "localhost.key"))
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(os.path.join(DATA, "localhost.crt"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        accepted: list[ssl.SSLSocket] = []
        t = threading.Thread(
            target=lambda: accepted.append(server_ctx.wrap_socket(listener.accept()[0], server_side=True)),
            name="juggler-test-tls-accept",
        )
        t.start()
        raw = socket.create_connection(listener.getsockname(), timeout=READ_BOUND)
        a = client_ctx.wrap_socket(raw, server_hostname="localhost")
        t.join(READ_BOUND)
    b = accepted[0]
    b.settimeout(READ_BOUND)
    ios = SocketIO(a, write_timeout=5.0), SocketIO(b, write_timeout=5.0)
    yield ios
    for io in ios:
        io.shutdown()
        io.sock.close()


def _pump(io: SocketIO, out: bytes, expect: int, got: list[bytes], errors: list[BaseException]) -> list[threading.Thread]:
    """A writer thread sending ``out`` in uneven pieces and a reader thread collecting
    ``expect`` bytes, both on ``io`` at once."""

    def write() -> None:
        try:
            rng = random.Random(len(out))
            pos = 0
            while pos < len(out):
                n = rng.randint(1, 40000)
                io.sendall(out[pos : pos + n])
                pos += n
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    def read() -> None:
        try:
            reader = SocketReader(io, deadline=deadline())
            got.append(reader.read_exact(expect))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, name="juggler-test-w"), threading.Thread(target=read, name="juggler-test-r")]
    for t in threads:
        t.start()
    return threads


class OverlapGuard:
    """Counts calls into an SSL socket that start while another is still running."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.busy = threading.Lock()
        self.calls = self.overlaps = 0
        for name in ("recv", "send", "pending", "shutdown"):
            setattr(sock, name, self._guard(getattr(sock, name)))

    def _guard(self, real):
        def guarded(*args, **kw):
            if not self.busy.acquire(blocking=False):
                self.overlaps += 1
                return real(*args, **kw)
            try:
                self.calls += 1
                result = real(*args, **kw)
                time.sleep(0)  # let the other thread run while this call counts as busy
                return result
            finally:
                self.busy.release()

        return guarded


def test_tls_socketio_reads_and_writes_at_once_both_ways(tls_pair):
    a, b = tls_pair
    guards = [OverlapGuard(a.sock), OverlapGuard(b.sock)]
    a_out, b_out = os.urandom(3 << 20), os.urandom(3 << 20)
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    errors: list[BaseException] = []
    threads = _pump(a, a_out, len(b_out), got_a, errors) + _pump(b, b_out, len(a_out), got_b, errors)
    for t in threads:
        t.join(READ_BOUND * 2)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert got_a == [b_out] and got_b == [a_out]
    assert [g.overlaps for g in guards] == [0, 0] and all(g.calls > 100 for g in guards)


def test_tls_socketio_write_times_out_when_the_peer_does_not_read(tls_pair):
    a, _ = tls_pair
    a.write_timeout = 0.3
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="write timed out"):
        a.sendall(os.urandom(64 << 20))
    assert time.monotonic() - started < READ_BOUND


def test_tls_socketio_shutdown_wakes_the_reader(tls_pair):
    a, _ = tls_pair
    reader = SocketReader(a, deadline=deadline())
    errors: list[BaseException] = []

    def read() -> None:
        try:
            reader.read_exact(1)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=read, name="juggler-test-r")
    t.start()
    a.shutdown()
    t.join(READ_BOUND)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], Stopped) and "stopped" not in str(errors[0])
