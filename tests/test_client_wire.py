"""The Client's own frame handling, against a fake server that speaks raw websocket frames."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from juggler import Client, ConnectionClosed
from juggler.frames import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, encode_close, encode_frame
from juggler.handshake import accept_key
from juggler.transport import FrameReader, SocketReader

from .conftest import T


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

    def frames(self) -> FrameReader:
        assert self.ready.wait(T(10))
        return FrameReader(SocketReader(self.sock))

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
    assert fake.frames().read() == (OP_CLOSE, struct.pack(">H", 1001))  # echoed, masked (FrameReader checks)
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
    assert frames.read() == (OP_CLOSE, struct.pack(">H", 1000))
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
    assert frames.read() == (OP_CLOSE, struct.pack(">H", 1002))
    c.close()
