"""The Client's own frame handling, against a fake server that speaks raw websocket frames."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest

from juggler import AckTimeout, Client, ConnectionClosed
from juggler.frames import OP_PING, OP_PONG, OP_TEXT, encode_close, encode_frame
from juggler.handshake import accept_key
from juggler.message import new_uuid
from juggler.peer import CLOSE

from .conftest import PeerReader, T


class FakeServer:
    """Accepts one websocket handshake, then lets the test write and read raw frames."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}/ws"
        self.sock: socket.socket | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="juggler-test-fake-server")
        self.thread.start()

    def _accept(self) -> None:
        sock, _ = self.listener.accept()
        sock.settimeout(T(10))
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        key = next(line.split(":", 1)[1].strip() for line in head.decode().split("\r\n") if line.lower().startswith("sec-websocket-key:"))
        sock.sendall(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept_key(key)}\r\nSec-WebSocket-Protocol: juggler.0\r\n\r\n"
            ).encode()
        )
        self.sock = sock
        self.ready.set()

    def frames(self) -> PeerReader:
        assert self.ready.wait(T(10))
        return PeerReader(self.sock)

    def close(self) -> None:
        self.thread.join(T(10))
        if self.sock is not None:
            self.sock.close()
        self.listener.close()


@pytest.fixture
def fake():
    f = FakeServer()
    yield f
    f.close()


def test_server_closing_right_after_the_handshake(fake):
    c = Client.connect(fake.url, connect_timeout=T(10))
    assert fake.ready.wait(T(10))
    fake.sock.sendall(encode_close(1001, "going away"))  # before the client sent anything
    assert c.wait_closed(T(10))
    assert (c.close_code, c.close_reason) == (1001, "going away")
    assert fake.frames().read() == (CLOSE, (1001, ""))  # echoed, masked (the Peer checks)
    with pytest.raises(ConnectionClosed):
        c.call("test.echo", 1, timeout=T(5))
    c.close()


def test_client_answers_pings_and_sends_one_close_frame(fake):
    c = Client.connect(fake.url, connect_timeout=T(10))
    frames = fake.frames()
    fake.sock.sendall(encode_frame(OP_PING, b"are you there"))
    assert frames.read() == (OP_PONG, b"are you there")
    fut = c.call_async("test.echo", "hi", timeout=T(10))
    opcode, data = frames.read()
    assert opcode == OP_TEXT and b'"test.echo"' in data
    closer = threading.Thread(target=c.close, name="juggler-test-closer")
    closer.start()
    assert frames.read() == (CLOSE, (1000, ""))
    fake.sock.sendall(encode_close(1000))
    closer.join(T(10))
    assert not closer.is_alive()
    assert (c.close_code, c.close_reason) == (1000, "")  # the server's answer, as it sent it
    with pytest.raises(ConnectionClosed):
        fut.result(T(5))
    fake.sock.settimeout(T(5))
    assert fake.sock.recv(100) == b""  # nothing after the one close frame, then the socket closed


def test_protocol_error_from_the_server_closes_with_1002(fake):
    c = Client.connect(fake.url, connect_timeout=T(10))
    frames = fake.frames()
    fake.sock.sendall(encode_frame(OP_TEXT, b"masked", b"abcd"))  # servers must not mask
    assert c.wait_closed(T(10))
    assert c.close_code == 1002 and "must not be masked" in c.close_reason
    assert frames.read() == (CLOSE, (1002, ""))
    c.close()


# -- bounds against a hostile or slow server (issue 9) ---------------------------------------------


def _evnt(channel: str, args) -> bytes:
    import json

    from juggler.message import new_uuid

    msg = {"meta": {"type": 10, "uuid": new_uuid()}, "payload": {"for": new_uuid(), "channel": channel, "args": args}}
    return encode_frame(OP_TEXT, json.dumps(msg).encode())


def _ack_next_request(fake, frames, before=None) -> None:
    """Read the client's next request and ACK it (after sending ``before``'s bytes)."""
    opcode, data = frames.read()
    req = json.loads(data)
    if before is not None:
        fake.sock.sendall(before)
    ack = {"meta": {"type": 8, "uuid": new_uuid()}, "payload": {"for": req["meta"]["uuid"], "for_type": req["meta"]["type"]}}
    fake.sock.sendall(encode_frame(OP_TEXT, json.dumps(ack).encode()))


def _wait_queued(sub, n) -> None:
    """Wait until ``n`` events wait in ``sub``'s queue."""
    with sub._cond:
        assert sub._cond.wait_for(lambda: len(sub._items) == n, T(10))


def _unsb_acked(c, fake, frames, channel, before=None) -> float:
    """``c.unsb(channel)`` on this thread, ACKed by the fake server from another (after
    ``before``'s bytes); the seconds it took."""
    acker = threading.Thread(target=_ack_next_request, args=(fake, frames, before), name="juggler-test-acker")
    acker.start()
    started = time.monotonic()
    c.unsb(channel)
    took = time.monotonic() - started
    acker.join(T(10))
    return took


def _assert_ended_with(sub, args, dropped) -> None:
    """``sub`` holds the events of ``args``, then has ended, having dropped ``dropped``."""
    assert [sub.get(0).args for _ in args] == list(args)
    assert sub.get(0) is None
    assert sub.dropped == dropped


def _sub_acked(c, fake, frames, channel):
    """``c.sub(channel)`` on a thread, ACKed by the fake server; the Subscription."""
    subs: list = []
    t = threading.Thread(target=lambda: subs.append(c.sub(channel)), name="juggler-test-sub")
    t.start()
    _ack_next_request(fake, frames)
    t.join(T(10))
    (sub,) = subs
    return sub


def test_a_message_over_the_read_limit_closes_with_1009_before_it_is_read(fake):
    from juggler.client import READ_LIMIT

    assert READ_LIMIT == 16 << 20
    c = Client.connect(fake.url, connect_timeout=T(10))
    frames = fake.frames()
    fut = c.call_async("test.echo", 1, timeout=T(30))
    frames.read()
    # a header that announces 1 GiB: refused at once, nothing allocated for it
    fake.sock.sendall(bytes([0x81, 127]) + struct.pack(">Q", 1 << 30))
    assert c.wait_closed(T(10))
    assert c.close_code == 1009 and "read limit" in c.close_reason
    assert frames.read() == (CLOSE, (1009, ""))
    with pytest.raises(ConnectionClosed):
        fut.result(T(5))
    c.close()


def test_a_smaller_read_limit(fake):
    c = Client.connect(fake.url, connect_timeout=T(10), read_limit=1000)
    fake.frames()
    fake.sock.sendall(_evnt("x", "y" * 2000))
    assert c.wait_closed(T(10))
    assert c.close_code == 1009
    c.close()


def test_a_full_subscription_drops_its_oldest_events_and_counts_them(fake):
    from juggler.client import SUB_QUEUE_SIZE

    assert SUB_QUEUE_SIZE == 1024
    c = Client.connect(fake.url, connect_timeout=T(10))
    frames = fake.frames()
    subs = {name: _sub_acked(c, fake, frames, name) for name in ("flood", "marker")}
    n = 3000
    fake.sock.sendall(b"".join(_evnt("flood", i) for i in range(n)) + _evnt("marker", "done"))
    assert subs["marker"].get(T(10)).args == "done"  # every flood event was handled before it
    flood = subs["flood"]
    assert flood.dropped == n - 1024
    assert [flood.get(0).args for _ in range(1024)] == list(range(n - 1024, n))
    with pytest.raises(TimeoutError):
        flood.get(0)
    c.close_timeout = T(0.5)  # (the fake server does not answer the close frame)
    c.close()


def test_a_full_blocking_subscription_holds_the_reader_until_there_is_room(fake):
    c = Client.connect(fake.url, connect_timeout=T(10), sub_queue_size=2, sub_overflow="block")
    frames = fake.frames()
    sub = _sub_acked(c, fake, frames, "slow")
    fake.sock.sendall(b"".join(_evnt("slow", i) for i in range(10)))
    assert [sub.get(T(10)).args for _ in range(10)] == list(range(10))
    assert sub.dropped == 0
    # the reader waits for room: close() still returns, and ends the subscription
    fake.sock.sendall(b"".join(_evnt("slow", i) for i in range(5)))
    closer = threading.Thread(target=c.close, name="juggler-test-closer")
    c.close_timeout = T(0.5)
    closer.start()
    closer.join(T(10))
    assert not closer.is_alive()


def test_unsb_from_the_reading_thread_of_a_full_blocking_subscription_is_not_held_up(fake):
    """The thread that should read a "block" subscription UNSBs it while the client's reader
    waits for room in its queue: the reader must let go, or the ACK could not be read."""
    c = Client.connect(fake.url, connect_timeout=T(10), sub_queue_size=2, sub_overflow="block", ack_timeout=T(10))
    frames = fake.frames()
    sub = _sub_acked(c, fake, frames, "full")
    # 2 fill the queue, the 3rd holds the reader, the 4th waits behind it in the socket
    fake.sock.sendall(b"".join(_evnt("full", i) for i in range(4)))
    _wait_queued(sub, 2)  # the queue is full: the reader holds the 3rd, or is about to
    assert _unsb_acked(c, fake, frames, "full") < T(5)  # on this thread, the subscription's only reader
    _assert_ended_with(sub, [0, 1], dropped=2)
    c.close_timeout = T(0.5)
    c.close()


def test_events_before_the_unsb_ack_still_reach_a_drop_oldest_subscription(fake):
    """Only a full "block" queue drops while an UNSB waits: an event the server sent before
    its ACK is kept."""
    c = Client.connect(fake.url, connect_timeout=T(10), ack_timeout=T(10))
    frames = fake.frames()
    sub = _sub_acked(c, fake, frames, "keep")
    fake.sock.sendall(_evnt("keep", 0))
    _wait_queued(sub, 1)
    # the UNSB's ACK, after an event published before redis took the UNSUBSCRIBE
    _unsb_acked(c, fake, frames, "keep", before=_evnt("keep", 1))
    _assert_ended_with(sub, [0, 1], dropped=0)
    c.close_timeout = T(0.5)
    c.close()


def test_a_failed_unsb_leaves_the_subscription_going(fake):
    c = Client.connect(fake.url, connect_timeout=T(10), ack_timeout=0.3)
    frames = fake.frames()
    sub = _sub_acked(c, fake, frames, "kept")
    with pytest.raises(AckTimeout):
        c.unsb("kept")  # the fake server never answers it
    frames.read()  # the UNSB
    fake.sock.sendall(_evnt("kept", "still"))
    assert sub.get(T(5)).args == "still"
    c.close_timeout = T(0.5)
    c.close()


def test_calls_that_expire_in_a_full_outbox_are_never_sent(fake):
    """The server stops reading: the writer blocks on a big frame, the outbox fills up to its
    bound, a caller waits for room (a call at most until its timeout, a request until
    ack_timeout), and calls whose timeout passed in the outbox are dropped, not sent."""
    import json
    import time

    from juggler import AckTimeout, CallExpired

    fake.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (accepted sockets inherit it)
    c = Client.connect(fake.url, connect_timeout=T(10), outbox_size=4, ack_timeout=0.3,
                       sockopt=((socket.SOL_SOCKET, socket.SO_SNDBUF, 4096),))  # fmt: skip
    frames = fake.frames()
    holder = c.call_async("hold", "x" * 900_000, timeout=T(60))  # the writer blocks on it
    short = [c.call_async("short", i, timeout=0.3) for i in range(4)]  # they wait in the outbox
    started = time.monotonic()
    one_more = c.call_async("short", 4, timeout=0.3)  # waits for room until its timeout
    assert time.monotonic() - started >= 0.25
    assert len(c._outbox._items) <= 4
    with pytest.raises(AckTimeout):
        c.pub("x", 1)
    for f in short + [one_more]:
        with pytest.raises(CallExpired):
            f.result(T(10))
    opcode, data = frames.read()  # the server reads again
    assert json.loads(data)["payload"]["uri"] == "hold"
    after = c.call_async("after", 1, timeout=T(10))
    opcode, data = frames.read()
    assert json.loads(data)["payload"]["uri"] == "after"  # none of the expired ones came first
    c.close_timeout = T(0.5)
    c.close()
    for f in (holder, after):
        with pytest.raises(ConnectionClosed):
            f.result(T(5))
