"""juggler.gilsend: non-blocking socket calls made without letting go of the GIL."""

import contextlib
import socket
import threading

import pytest

from juggler import gilsend

pytestmark = [
    pytest.mark.timeout(20),
    pytest.mark.skipif(not gilsend.AVAILABLE, reason="no C library send through ctypes here"),
]


@pytest.fixture
def pair():
    with contextlib.ExitStack() as stack:
        yield tuple(stack.enter_context(s) for s in socket.socketpair())


def test_send_nowait_sends_and_the_peer_reads_it(pair):
    a, b = pair
    assert gilsend.send_nowait(a.fileno(), b"hello") == 5
    assert b.recv(16) == b"hello"


def test_send_nowait_takes_what_fits_then_zero_when_full(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    chunk = b"x" * 65536
    sent = gilsend.send_nowait(a.fileno(), chunk)
    assert 0 < sent < len(chunk)  # part of it: the buffer is smaller
    while gilsend.send_nowait(a.fileno(), chunk):
        pass
    assert gilsend.send_nowait(a.fileno(), b"more") == 0  # full: nothing taken, no wait


def test_send_nowait_raises_when_the_peer_is_gone(pair):
    a, b = pair
    b.close()
    with pytest.raises(OSError):
        for _ in range(3):  # the first send may still be accepted
            gilsend.send_nowait(a.fileno(), b"x")


def test_readable_nowait_says_whether_bytes_or_the_end_wait(pair):
    a, b = pair
    assert gilsend.readable_nowait(a.fileno()) is False
    b.sendall(b"z")
    assert gilsend.readable_nowait(a.fileno()) is True
    assert a.recv(1) == b"z"  # the peek took nothing
    b.shutdown(socket.SHUT_WR)
    assert gilsend.readable_nowait(a.fileno()) is True  # the end of the stream


def test_readable_nowait_is_none_for_a_closed_descriptor():
    a, b = socket.socketpair()
    fd = a.fileno()
    a.close()
    b.close()
    assert gilsend.readable_nowait(fd) is None


def test_sendall_finishes_what_the_first_send_left(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 4096  # 1 MiB: far more than the buffer takes at once
    got = bytearray()

    def read():
        while len(got) < len(data):
            chunk = b.recv(65536)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=read, name="test-gilsend-reader")
    t.start()
    gilsend.sendall(a, data)
    t.join(10)
    assert bytes(got) == data


def test_shutdown_and_close_sends_what_was_written_then_the_end(pair):
    a, b = pair
    a.sendall(b"last words")
    gilsend.shutdown_and_close(a)
    assert a.fileno() == -1  # the object is closed: nothing can use the number again
    assert b.recv(64) == b"last words"
    assert b.recv(64) == b""  # then the end of the stream
    with pytest.raises(BrokenPipeError):
        b.send(b"x")  # and the descriptor is closed, not only shut down for writing
    gilsend.shutdown_and_close(a)  # a closed socket: nothing happens


def test_shutdown_and_close_of_a_socket_that_is_not_plain(pair):
    class Wrapped(socket.socket):  # stands for a TLS socket: its own shutdown and close
        pass

    a, b = pair
    w = Wrapped(fileno=a.detach())
    gilsend.shutdown_and_close(w)
    assert w.fileno() == -1
    assert b.recv(64) == b""


def test_recv_nowait_reads_what_is_there_and_never_waits(pair):
    import ctypes

    a, b = pair
    buf = ctypes.create_string_buffer(4)
    assert gilsend.recv_nowait(b.fileno(), buf) is None  # nothing yet: no wait
    a.sendall(b"hello")
    assert gilsend.recv_nowait(b.fileno(), buf) == b"hell"  # at most the buffer
    assert gilsend.recv_nowait(b.fileno(), buf) == b"o"
    a.shutdown(socket.SHUT_WR)
    assert gilsend.recv_nowait(b.fileno(), buf) == b""  # the end of the stream
