"""Socket calls that cannot block, made without letting go of the GIL.

CPython lets go of the GIL around every socket call, even one that cannot wait (a send with
``MSG_DONTWAIT``). When other threads wait for the GIL, which is always the case on a busy
server with a few threads per connection, letting go hands it to one of them: the kernel wakes
that thread, and the caller, back from a send of a few microseconds, must wait its turn and be
woken in its turn. Measured on the server at 100 connections, those wake-ups (``futex`` and the
scheduler) took half of its CPU time, more than the Python code did.

:func:`send_nowait`, :func:`recv_nowait` and :func:`readable_nowait` call the C library's
``send`` and ``recv`` through ``ctypes.PyDLL``, which keeps the GIL for the call: a syscall of
a few microseconds that cannot wait is cheaper than two thread switches. Anything that may wait (a socket with
nothing to read, a full send buffer) still goes through Python's socket methods, which let go
of the GIL as they should.

Where ``ctypes`` cannot reach the C library's ``send`` (not a POSIX system), :data:`AVAILABLE`
is false and the callers use the socket methods.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import socket
from typing import Optional

__all__ = ["AVAILABLE", "send_nowait", "recv_nowait", "recv_into_nowait", "readable_nowait", "sendall", "setsockopt",
           "shutdown_and_close"]  # fmt: skip

_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_SEND_FLAGS = _DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
_PEEK_FLAGS = _DONTWAIT | getattr(socket, "MSG_PEEK", 0)
_AGAIN = {_errno.EAGAIN, _errno.EWOULDBLOCK, _errno.EINTR}

try:
    if not _DONTWAIT:
        raise OSError("no MSG_DONTWAIT on this system")
    _libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL is kept during the call
    _send = _libc.send
    _send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
    _send.restype = ctypes.c_ssize_t
    _recv = _libc.recv
    _recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _recv.restype = ctypes.c_ssize_t
    _peek_buf = ctypes.create_string_buffer(1)  # MSG_PEEK of one byte: its content is unused
    _shutdown = _libc.shutdown
    _shutdown.argtypes = [ctypes.c_int, ctypes.c_int]
    _shutdown.restype = ctypes.c_int
    _close = _libc.close
    _close.argtypes = [ctypes.c_int]
    _close.restype = ctypes.c_int
    _setsockopt = _libc.setsockopt
    _setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    _setsockopt.restype = ctypes.c_int
    AVAILABLE = True
except (OSError, AttributeError):  # pragma: no cover - not a POSIX system
    AVAILABLE = False


def send_nowait(fd: int, data: bytes) -> int:
    """Send what the socket ``fd`` takes now of ``data`` (``bytes``); how many bytes (0 when
    its buffer is full). :class:`OSError` when the connection failed. Only where
    :data:`AVAILABLE`."""
    n = _send(fd, data, len(data), _SEND_FLAGS)
    if n >= 0:
        return n
    _would_wait()
    return 0


def _would_wait() -> None:
    """After a failed call: return if it failed only because it would have had to wait
    (``EAGAIN``, ``EINTR``); else raise the :class:`OSError`."""
    err = ctypes.get_errno()
    if err not in _AGAIN:
        raise OSError(err, os.strerror(err))


def readable_nowait(fd: int) -> Optional[bool]:
    """Whether the socket ``fd`` has bytes to read or its peer closed (a peek, nothing is
    taken); ``None`` on an error, such as a closed descriptor. Only where :data:`AVAILABLE`."""
    n = _recv(fd, _peek_buf, 1, _PEEK_FLAGS)
    if n >= 0:
        return True  # bytes, or 0: the end of the stream
    if ctypes.get_errno() in _AGAIN:
        return False
    return None


def recv_nowait(fd: int, buf: "ctypes.Array[ctypes.c_char]") -> Optional[bytes]:
    """The bytes the socket ``fd`` has for us now, up to ``len(buf)`` (read through ``buf``,
    a ``ctypes.create_string_buffer``); ``b""`` at the end of the stream, ``None`` when none
    are there yet. :class:`OSError` when the connection failed. Only where
    :data:`AVAILABLE`."""
    n = _recv(fd, buf, len(buf), _DONTWAIT)
    if n > 0:
        return ctypes.string_at(buf, n)
    if n == 0:
        return b""
    _would_wait()
    return None


def recv_into_nowait(fd: int, buf: "ctypes.Array[ctypes.c_char]") -> Optional[int]:
    """:func:`recv_nowait` into ``buf`` itself: how many bytes came (0 at the end of the
    stream), ``None`` when none are there yet; no ``bytes`` is made (``hiredis.Reader.feed``
    takes ``buf, 0, n``)."""
    n = _recv(fd, buf, len(buf), _DONTWAIT)
    if n >= 0:
        return n
    _would_wait()
    return None


def setsockopt(sock: socket.socket, level: int, option: int, value: bytes) -> None:
    """``sock.setsockopt(level, option, value)`` for a ``bytes`` value (a ``struct timeval``),
    straight to the C library: Python's method first tries two other forms of its arguments,
    and formats an error for each (for one, with ``sprintf``, whose stack use alone gives
    every connection's reader thread one more page of stack to keep)."""
    if not AVAILABLE:
        sock.setsockopt(level, option, value)
        return
    if _setsockopt(sock.fileno(), level, option, value, len(value)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def sendall(sock: socket.socket, data: bytes) -> None:
    """``sock.sendall(data)`` for a blocking socket, its first send made without letting go of
    the GIL (the usual case: the buffer takes all of a small message). A socket that is not a
    plain ``socket.socket`` (TLS: the bytes must go through OpenSSL) takes its own
    ``sendall``."""
    if AVAILABLE and type(data) is bytes and type(sock) is socket.socket:
        n = _send(sock.fileno(), data, len(data), _SEND_FLAGS)  # (send_nowait's call, inline)
        if n == len(data):
            return
        if n > 0:
            data = memoryview(data)[n:]  # type: ignore[assignment]
        elif n < 0:
            _would_wait()
    sock.sendall(data)


def shutdown_and_close(sock: socket.socket, how: int = socket.SHUT_WR) -> None:
    """``sock.shutdown(how)``, its error ignored (the peer may be gone), then ``sock.close()``.
    For a plain ``socket.socket`` both are made without letting go of the GIL: neither waits,
    since juggler never sets ``SO_LINGER`` on its sockets (closing then hands what is unsent
    to the kernel) nor makes ``makefile()`` objects of them (which ``close()`` would wait for);
    it is not for sockets that do either.

    When 10,000 websockets close at once, letting go of the GIL twice more per connection, with
    thousands of threads waiting for it, made two more thread hand-offs each. A socket already
    closed or detached (a TLS socket took its descriptor) is left as it is."""
    if not (AVAILABLE and type(sock) is socket.socket):
        try:
            sock.shutdown(how)
        except OSError:
            pass
        sock.close()
        return
    fd = sock.detach()  # the object is closed from here on; the descriptor is ours to close
    if fd >= 0:
        _shutdown(fd, how)
        _close(fd)
