"""Unit tests of juggler.peer: the websocket peer state machine, fed bytes directly (no sockets).

The frame syntax, its errors and the read limit are tested over a socket pair in
tests/test_frames.py; here: how bytes cut anywhere are put together, the events of each side,
closing, and what follows a close frame or a protocol error.
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from juggler.exceptions import ProtocolError
from juggler.frames import FRAGMENT_COST, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, CloseCode, encode_close, encode_frame, unmask
from juggler.peer import CLOSE, FAIL, SEND, Close, Peer

MASK = b"\x37\xfa\x21\x3d"


def masked(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    frame = encode_frame(opcode, payload, MASK)
    return frame if fin else bytes([frame[0] & 0x7F]) + frame[1:]


def read_frame(data: bytes) -> tuple[int, bytes]:
    """The opcode and payload of one final frame, masked or not (for what a Peer sends)."""
    assert data[0] & 0x80
    n, pos = data[1] & 0x7F, 2
    if n == 126:
        n, pos = struct.unpack(">H", data[2:4])[0], 4
    if data[1] & 0x80:
        return data[0] & 0x0F, unmask(data[pos + 4 : pos + 4 + n], data[pos : pos + 4])
    return data[0] & 0x0F, data[pos : pos + n]


BIG = os.urandom(70000)  # a 64-bit length
STREAM = (
    masked(OP_TEXT, b"x" * 300)
    + masked(OP_PING, b"ping")
    + masked(OP_TEXT, b"ab", fin=False)
    + masked(OP_PONG, b"pong")
    + masked(OP_CONT, b"cd", fin=False)
    + masked(OP_CONT, b"", fin=True)
    + masked(OP_BINARY, BIG)
    + encode_close(1001, "bye", MASK)
)
EXPECTED = [
    (OP_TEXT, b"x" * 300),
    (SEND, encode_frame(OP_PONG, b"ping")),
    (OP_PONG, b"pong"),
    (OP_TEXT, b"abcd"),
    (OP_BINARY, BIG),
    (CLOSE, (1001, "bye")),
]


def feed(peer: Peer, data: bytes, sizes: list[int]) -> list:
    events: list = []
    pos = 0
    for size in sizes:
        events += peer.receive_data(data[pos : pos + size])
        pos += size
    events += peer.receive_data(data[pos:])
    return events


def test_one_read_of_everything():
    assert Peer().receive_data(STREAM) == EXPECTED


def test_bytes_one_at_a_time():
    assert feed(Peer(), STREAM, [1] * len(STREAM)) == EXPECTED


@pytest.mark.parametrize("seed", range(20))
def test_bytes_cut_anywhere(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([1, 2, 3, 7, 100, 4096, 65536]) for _ in range(200)]
    assert feed(Peer(), STREAM, sizes) == EXPECTED


def test_a_frame_cut_in_its_head_waits_for_the_rest():
    peer = Peer()
    frame = masked(OP_TEXT, b"y" * 200)  # 16-bit length, then the mask
    for cut in (1, 3, 6, len(frame) - 1):
        assert not peer.receive_data(frame[:cut])
        assert peer.receive_data(frame[cut:]) == [(OP_TEXT, b"y" * 200)]


def test_client_side_reads_unmasked_frames_and_masks_its_own():
    peer = Peer(client=True)
    (text, (kind, frame)) = peer.receive_data(encode_frame(OP_TEXT, b"hi") + encode_frame(OP_PING, b"p"))
    assert text == (OP_TEXT, b"hi") and kind == SEND
    assert frame[1] & 0x80, "a client's frames are masked"
    assert read_frame(frame) == (OP_PONG, b"p")
    assert read_frame(peer.frame(OP_TEXT, b"x" * 200)) == (OP_TEXT, b"x" * 200)
    ((kind, exc),) = Peer(client=True).receive_data(masked(OP_TEXT, b"m"))
    assert kind == FAIL and exc.close_code == 1002 and "must not be masked" in exc.reason


def test_server_side_frames_are_not_masked():
    peer = Peer()
    assert peer.frame(OP_TEXT, b"hi") == encode_frame(OP_TEXT, b"hi")
    assert peer.close_frame(1000, "bye") == encode_close(1000, "bye")


@pytest.mark.parametrize(
    "payload, close",
    [(b"", (1005, "")), (b"\x03\xe8", (1000, "")), (b"\x03\xe9going", (1001, "going")), (b"\x0f\xa0", (4000, ""))],
)
def test_close_events_and_their_answer(payload, close):
    ((kind, event),) = Peer().receive_data(masked(OP_CLOSE, payload))
    assert kind == CLOSE and event == close and isinstance(event, Close)
    assert event.answer == (1000 if close[0] == 1005 else close[0])  # echoed; none: 1000


@pytest.mark.parametrize(
    "payload, code", [(b"\x03", 1002), (b"\x03\xed", 1002), (b"\x00\x00", 1002), (b"\x03\xe8\xff", 1007)]
)
def test_a_broken_close_frame_fails(payload, code):
    ((kind, exc),) = Peer().receive_data(masked(OP_CLOSE, payload))
    assert kind == FAIL and isinstance(exc, ProtocolError) and exc.close_code == code


def test_nothing_after_a_close_frame():
    peer = Peer()
    events = peer.receive_data(masked(OP_CLOSE) + masked(OP_TEXT, b"late"))
    assert events == [(CLOSE, (1005, ""))] and peer.ended
    assert not peer.receive_data(masked(OP_TEXT, b"later"))


def test_a_protocol_error_fails_once_and_the_rest_is_discarded():
    peer = Peer()
    events = peer.receive_data(masked(OP_TEXT, b"ok") + masked(OP_CONT, b"orphan") + masked(OP_TEXT, b"after"))
    assert events[0] == (OP_TEXT, b"ok")
    (kind, exc) = events[1]
    assert kind == FAIL and exc.close_code == CloseCode.PROTOCOL_ERROR and "continuation" in exc.reason
    assert len(events) == 2 and peer.ended
    assert not peer.receive_data(masked(OP_CLOSE))


def test_the_read_limit_fails_with_1009_from_the_head_alone():
    peer = Peer(limit=100)
    ((kind, exc),) = peer.receive_data(struct.pack(">BBQ", 0x81, 0xFF, 1 << 40) + MASK)
    assert kind == FAIL and exc.close_code == CloseCode.MESSAGE_TOO_BIG


def test_closing_drops_messages_and_answers_no_ping():
    peer = Peer()
    frame = peer.close_frame(CloseCode.GOING_AWAY, "shutting down")
    assert peer.closing and frame == encode_close(1001, "shutting down")
    events = peer.receive_data(masked(OP_TEXT, b"a") + masked(OP_TEXT, b"b", fin=False) + masked(OP_CONT, b"c")
                               + masked(OP_PING, b"p") + masked(OP_PONG, b"q") + masked(OP_CLOSE, b"\x03\xe9"))  # fmt: skip
    assert events == [(OP_PONG, b"q"), (CLOSE, (1001, ""))]


def test_read_after_close_keeps_messages_but_answers_no_ping():
    peer = Peer(client=True, read_after_close=True)
    peer.closing = True
    events = peer.receive_data(encode_frame(OP_TEXT, b"result") + encode_frame(OP_PING, b"p") + encode_close(1000))
    assert events == [(OP_TEXT, b"result"), (CLOSE, (1000, ""))]


def test_a_fragmented_message_resets_for_the_next():
    peer = Peer(limit=10 + FRAGMENT_COST)  # one continuation frame of 10 bytes in all
    one = masked(OP_TEXT, b"x" * 6, fin=False) + masked(OP_CONT, b"y" * 4)
    events = peer.receive_data(one + masked(OP_BINARY, b"z" * 10) + one)
    assert events == [(OP_TEXT, b"x" * 6 + b"y" * 4), (OP_BINARY, b"z" * 10), (OP_TEXT, b"x" * 6 + b"y" * 4)]
