"""Socket I/O for websockets, shared by the server and the client.

``websocket-server`` reads a frame with a Python loop per byte, rejects fragmented messages,
has no read limit and writes with ``socket.send`` (which may write part of a frame). These are the pieces our :class:`~juggler.server.Server` uses instead: :class:`SocketIO`, which keeps a
TLS connection's reads and writes apart and bounds writes; :class:`SocketReader`, a buffered
reader that blocks with no timeout and is stopped by shutting its socket down (so nothing
polls, and no read timeout can corrupt a half-read frame); and :class:`FrameReader`, which
reassembles fragmented messages under a size limit. The :class:`~juggler.client.Client` reads
and writes its frames with the same pieces, after ``websocket-client`` has made the connection
and the handshake. The frames themselves are :mod:`juggler.frames`.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from . import gilsend
from .exceptions import ProtocolError
from .frames import CONTROL_OPS, DATA_OPS, FRAGMENT_COST, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, parse_close, unmask

__all__ = ["Stopped", "SocketIO", "SocketReader", "FrameReader", "FrameLoop"]


class Stopped(Exception):
    """The socket was shut down, its deadline passed, or the peer went away."""


class SocketIO:
    """Reads and writes on one socket, from a reader thread and a writer thread at once.

    On a plain socket the kernel keeps a concurrent ``recv`` and ``send`` apart. Given a
    ``write_timeout``, the socket is put in blocking mode with the kernel's send timeout
    (``SO_SNDTIMEO``) set to it, so a read is one ``recv`` that sleeps until bytes come (no
    ``poll`` first, as Python does for a socket with a timeout) and a write that makes no
    progress for ``write_timeout`` fails with :class:`TimeoutError`. A TLS connection cannot be read and written at once:
    OpenSSL forbids concurrent ``SSL_read`` and ``SSL_write`` on one connection, and doing it
    corrupts the stream now and then (spurious EOFs, "bad write retry"). So on a TLS socket
    every call into OpenSSL takes one lock, the socket is non-blocking, and the lock is never
    held while waiting for the network: neither side can block the other for longer than one
    call takes.
    """

    def __init__(self, sock: socket.socket, write_timeout: float | None = None) -> None:
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.write_timeout = write_timeout
        self._write_lock = threading.Lock()  # one frame at a time
        self._tls_lock = threading.Lock()  # one OpenSSL call at a time (TLS only)
        # Set by shutdown(). SSLSocket.shutdown drops its SSL object: later reads would return
        # raw ciphertext still queued in the kernel, so they end here instead.
        self._shut = False
        #: Whether a read may simply block in ``recv`` (plain socket in blocking mode).
        self.blocking = False
        if self.tls:
            sock.setblocking(False)
        elif write_timeout is not None:
            sock.settimeout(None)
            seconds = int(write_timeout)
            micros = int(round((write_timeout - seconds) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, max(micros, 0 if seconds else 1000)))
            self.blocking = True
        self._readable = select.poll()
        self._readable.register(sock.fileno(), select.POLLIN | select.POLLPRI)

    def wait_readable(self, timeout_ms: int = -1) -> bool:
        """Whether a :meth:`recv` may have something, waiting up to ``timeout_ms`` (-1: with
        no timeout, until bytes come, the peer closes, or :meth:`shutdown`)."""
        if self.tls:
            with self._tls_lock:
                if self._shut or self.sock.pending():  # pending: decrypted bytes poll cannot see
                    return True
        return bool(self._readable.poll(timeout_ms))

    def recv(self, n: int) -> bytes | None:
        """Up to ``n`` bytes (``b""`` when the peer closed); ``None`` if none are ready yet."""
        if not self.tls:
            try:
                return self.sock.recv(n)
            except (BlockingIOError, InterruptedError):
                return None
        with self._tls_lock:
            if self._shut:
                return b""
            try:
                return self.sock.recv(n)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return None  # a TLS record not all here yet

    def sendall(self, data: bytes) -> None:
        """Write all of ``data``; :class:`TimeoutError` past ``write_timeout``, or
        :class:`OSError`."""
        with self._write_lock:
            if not self.tls:
                try:
                    gilsend.sendall(self.sock, data)
                except BlockingIOError:  # SO_SNDTIMEO passed with no progress
                    raise TimeoutError(f"write timed out after {self.write_timeout:g} s") from None
                return
            view = memoryview(data)
            deadline = None if self.write_timeout is None else time.monotonic() + self.write_timeout
            poller = select.poll()
            registered = False
            while view:
                with self._tls_lock:
                    if self._shut:
                        raise BrokenPipeError("the socket was shut down")
                    try:
                        view = view[self.sock.send(view) :]
                        continue
                    except ssl.SSLWantReadError:
                        events = select.POLLIN
                    except (ssl.SSLWantWriteError, BlockingIOError):
                        events = select.POLLOUT
                wait = 0.05  # short: the reader may take the bytes a POLLIN wait is for
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"write timed out after {self.write_timeout:g} s")
                    wait = min(wait, remaining)
                if registered:
                    poller.modify(self.sock.fileno(), events)
                else:
                    poller.register(self.sock.fileno(), events)
                    registered = True
                poller.poll(max(1, int(wait * 1000)))

    def send_nowait(self, data: bytes) -> int:
        """Write what the socket takes of ``data`` without waiting; how many bytes. (0 on a
        TLS socket: its writes take the careful path of :meth:`sendall`.)"""
        if self.tls:
            return 0
        with self._write_lock:
            try:
                if gilsend.AVAILABLE and type(data) is bytes:
                    return gilsend.send_nowait(self.sock.fileno(), data)
                return self.sock.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return 0

    def shutdown(self) -> None:
        """Shut both directions down, waking a blocked reader or writer; never raises."""
        with self._tls_lock:  # SSLSocket.shutdown drops the SSL object a call may be using
            self._shut = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class SocketReader:
    """Buffered reads from a :class:`SocketIO` (a socket given instead is wrapped in one, which
    makes a TLS socket non-blocking).

    A read blocks, with no timeout, until bytes come, the peer closes the TCP connection, or
    the socket is shut down (:meth:`SocketIO.shutdown`, which is how another thread stops it);
    the last two raise :class:`Stopped`. ``deadline`` (a ``time.monotonic()`` value, e.g. for
    the HTTP handshake) bounds the wait: past it a read raises :class:`Stopped` too.
    """

    def __init__(self, io: SocketIO | socket.socket, deadline: float | None = None):
        self.io = io if isinstance(io, SocketIO) else SocketIO(io)
        self.deadline = deadline
        self._buf = bytearray()
        self._pos = 0
        #: time.monotonic() of the last bytes received (for idle detection)
        self.last_recv = time.monotonic()

    def _fill(self) -> None:
        io = self.io
        if io.blocking and self.deadline is None:
            # one recv that sleeps until bytes come, the peer closes, or a shutdown wakes it
            try:
                chunk = io.sock.recv(262144)
            except OSError as exc:
                raise Stopped(f"read failed: {exc}") from None
            if not chunk or io._shut:
                raise Stopped("peer closed the connection")
            self._append(chunk)
            return
        while True:
            wait_ms = -1
            if self.deadline is not None:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise Stopped("timed out")
                wait_ms = max(1, int(remaining * 1000))
            if not self.io.wait_readable(wait_ms):
                continue
            try:
                chunk = self.io.recv(262144)
            except OSError as exc:
                raise Stopped(f"read failed: {exc}") from None
            if chunk is None:
                continue
            if not chunk:
                raise Stopped("peer closed the connection")
            self._append(chunk)
            return

    def _append(self, chunk: bytes) -> None:
        self.last_recv = time.monotonic()
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += chunk

    def discard(self) -> None:
        """Read and drop everything until the stream ends (:class:`Stopped`, not raised)."""
        try:
            while True:
                self._buf.clear()
                self._pos = 0
                self._fill()
        except Stopped:
            pass

    def read_exact(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n:
            self._fill()
        start = self._pos
        self._pos += n
        return bytes(self._buf[start : self._pos])

    def read_until(self, marker: bytes, limit: int) -> bytes:
        """Bytes up to and including ``marker``; :class:`ProtocolError` (1009) when they are
        more than ``limit`` bytes, however they arrive (in one read or many)."""
        start = searched = self._pos
        while True:
            idx = self._buf.find(marker, max(start, searched - len(marker) + 1))
            end = idx + len(marker) if idx >= 0 else len(self._buf)
            if end - start > limit:
                raise ProtocolError(f"request head over {limit} bytes", 1009)
            if idx >= 0:
                return self.read_exact(end - start)
            searched = len(self._buf)
            self._fill()
            if self._pos != start:  # _fill compacted the buffer
                searched -= start
                start = self._pos


@dataclass
class FrameReader:
    """Reads frames (a client's, or with ``masked=False`` a server's) and reassembles
    fragmented messages.

    :meth:`read` returns ``(opcode, payload)`` for each control frame (close, ping, pong) and for
    each complete data message (text or binary), as soon as it has one. It raises
    :class:`ProtocolError` (1002, or 1009 over ``limit``) for what RFC 6455 forbids.
    """

    reader: SocketReader
    limit: int = 1 << 20
    #: Whether frames arrive masked: from a client (the server side) they must be, from a
    #: server (the client side) they must not be.
    masked: bool = True
    _op: int | None = None
    _data: bytearray = field(default_factory=bytearray)
    _size: int = 0

    def read(self) -> tuple[int, bytes]:
        while True:
            fin, opcode, payload = self._read_frame()
            if opcode in CONTROL_OPS:
                return opcode, payload
            if opcode == OP_CONT:
                if self._op is None:
                    raise ProtocolError("continuation frame without a message to continue")
            elif self._op is not None:
                raise ProtocolError("new message started inside a fragmented message")
            else:
                self._op = opcode
            self._data += payload
            # Each continuation frame also costs FRAGMENT_COST against the limit, so a flood of
            # tiny or empty fragments cannot keep a connection busy for free.
            self._size += len(payload) + (FRAGMENT_COST if opcode == OP_CONT else 0)
            if fin:
                op, data = self._op, bytes(self._data)
                self._op, self._data, self._size = None, bytearray(), 0
                return op, data

    def _read_frame(self) -> tuple[bool, int, bytes]:
        b1, b2 = self.reader.read_exact(2)
        fin = bool(b1 & 0x80)
        opcode = b1 & 0x0F
        if b1 & 0x70:
            raise ProtocolError("reserved bits set without a negotiated extension")
        if opcode not in DATA_OPS and opcode not in CONTROL_OPS and opcode != OP_CONT:
            raise ProtocolError(f"unknown opcode {opcode:#x}")
        if bool(b2 & 0x80) != self.masked:
            raise ProtocolError("client frames must be masked" if self.masked else "server frames must not be masked")
        length = b2 & 0x7F
        if opcode in CONTROL_OPS:
            if not fin or length > 125:
                raise ProtocolError("control frames must be final and at most 125 bytes")
        elif length == 126:
            (length,) = struct.unpack(">H", self.reader.read_exact(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", self.reader.read_exact(8))
            if length >> 63:
                raise ProtocolError("frame length has its high bit set")
        cost = length + (FRAGMENT_COST if opcode == OP_CONT else 0)
        if opcode not in CONTROL_OPS and self._size + cost > self.limit:
            raise ProtocolError(f"message larger than the read limit of {self.limit} bytes", 1009)
        if not self.masked:
            return fin, opcode, self.reader.read_exact(length)
        mask = self.reader.read_exact(4)
        return fin, opcode, unmask(self.reader.read_exact(length), mask)


class FrameLoop:
    """The part of a websocket peer's read loop that is the same for every protocol on it
    (the juggler server's connections and :mod:`juggler.statesync`'s): control frames, a
    broken stream and the peer's close. :meth:`_data_frames` yields the text and binary
    frames that remain while the connection is open.

    The subclass has ``_frames`` (a :class:`FrameReader`), ``_socket_reader``, ``_peer_gone``,
    ``closed``, ``_fail(code, reason)`` (close for the peer's fault), ``_answer_close(code,
    reason)`` (start closing in answer to the peer) and ``_send_pong(data)``.
    """

    _frames: "FrameReader"
    _socket_reader: "SocketReader"
    _peer_gone: bool
    closed: bool

    def _fail(self, code: int, reason: str) -> None:
        raise NotImplementedError

    def _answer_close(self, code: int, reason: str) -> Any:
        raise NotImplementedError

    def _send_pong(self, data: bytes) -> None:
        raise NotImplementedError

    def _data_frames(self) -> "Iterator[tuple[int, bytes]]":
        while True:
            try:
                opcode, data = self._frames.read()
            except Stopped:
                self._peer_gone = self._peer_gone or not self.closed
                return
            except ProtocolError as exc:
                if self.closed:
                    # What follows a broken frame cannot be framed any more. Take it all in
                    # until the peer hangs up or the close deadline: closing with unread
                    # bytes would reset the connection, and the peer could lose our close frame.
                    self._socket_reader.discard()
                    return
                self._fail(exc.close_code, exc.reason)
                continue
            if opcode == OP_CLOSE:
                self._peer_closed(data)
                return
            if opcode == OP_PING:
                if not self.closed:
                    self._send_pong(data)
                continue
            if opcode == OP_PONG or self.closed:
                continue
            yield opcode, data

    def _peer_closed(self, data: bytes) -> None:
        try:
            code, reason = parse_close(data)
        except ProtocolError as exc:
            self._fail(exc.close_code, exc.reason)
            return
        # Echo the peer's code, as RFC 6455 suggests; 1005 (no code) is answered with 1000.
        self._answer_close(1000 if code == 1005 else code, reason)
