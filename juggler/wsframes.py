"""Websocket framing (RFC 6455) and socket I/O for the server, and the client's frames.

``websocket-server`` reads a frame with a Python loop per byte, rejects fragmented messages,
has no read limit and writes with ``socket.send`` (which may write part of a frame). These are
the pieces our :class:`~juggler.server.Server` uses instead: a buffered reader that blocks with
no timeout and is stopped by shutting its socket down (so nothing polls, and no read timeout
can corrupt a half-read frame);
reassembly of fragmented messages under a size limit; a word-wide unmask; and frame encoding.
:class:`SocketIO` keeps a TLS connection's reads and writes apart. The
:class:`~juggler.client.Client` reads and writes its frames with the same pieces, after
``websocket-client`` has made the connection and the handshake.
"""

from __future__ import annotations

import base64
import hashlib
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from .exceptions import ProtocolError

__all__ = [
    "OP_CONT",
    "OP_TEXT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "Stopped",
    "SocketIO",
    "SocketReader",
    "FRAGMENT_COST",
    "FrameReader",
    "HandshakeRequest",
    "unmask",
    "encode_frame",
    "encode_close",
    "parse_close",
    "valid_close_code",
    "valid_key",
    "accept_key",
    "http_response",
]

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_DATA_OPS = (OP_TEXT, OP_BINARY)
_CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: What each continuation frame counts against the read limit, besides its payload (a message
#: in one frame gets its full limit).
FRAGMENT_COST = 64


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
                    self.sock.sendall(data)
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
        """Bytes up to and including ``marker``; :class:`ProtocolError` past ``limit`` bytes."""
        while True:
            idx = self._buf.find(marker, self._pos)
            if idx >= 0:
                return self.read_exact(idx + len(marker) - self._pos)
            if len(self._buf) - self._pos > limit:
                raise ProtocolError("request head too large", 1009)
            self._fill()


def unmask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask``, a machine word at a time (via Python ints)."""
    n = len(data)
    if n == 0:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


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
            if opcode in _CONTROL_OPS:
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
        if opcode not in _DATA_OPS and opcode not in _CONTROL_OPS and opcode != OP_CONT:
            raise ProtocolError(f"unknown opcode {opcode:#x}")
        if bool(b2 & 0x80) != self.masked:
            raise ProtocolError("client frames must be masked" if self.masked else "server frames must not be masked")
        length = b2 & 0x7F
        if opcode in _CONTROL_OPS:
            if not fin or length > 125:
                raise ProtocolError("control frames must be final and at most 125 bytes")
        elif length == 126:
            (length,) = struct.unpack(">H", self.reader.read_exact(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", self.reader.read_exact(8))
            if length >> 63:
                raise ProtocolError("frame length has its high bit set")
        cost = length + (FRAGMENT_COST if opcode == OP_CONT else 0)
        if opcode not in _CONTROL_OPS and self._size + cost > self.limit:
            raise ProtocolError(f"message larger than the read limit of {self.limit} bytes", 1009)
        if not self.masked:
            return fin, opcode, self.reader.read_exact(length)
        mask = self.reader.read_exact(4)
        return fin, opcode, unmask(self.reader.read_exact(length), mask)


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame: unmasked (from a server), or masked with the 4-byte ``mask`` (from a
    client)."""
    n = len(payload)
    b1 = 0x80 | opcode
    bit = 0x80 if mask is not None else 0
    if n < 126:
        header = struct.pack(">BB", b1, bit | n)
    elif n < 65536:
        header = struct.pack(">BBH", b1, bit | 126, n)
    else:
        header = struct.pack(">BBQ", b1, bit | 127, n)
    if mask is None:
        return header + payload
    return header + mask + unmask(payload, mask)


def encode_close(code: int, reason: str = "", mask: bytes | None = None) -> bytes:
    """A close frame; ``reason`` is cut to fit the 125-byte control frame limit."""
    raw = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, struct.pack(">H", code) + raw, mask)


_RESERVED_CLOSE_CODES = {1004, 1005, 1006, 1015}


def valid_close_code(code: int) -> bool:
    """Whether ``code`` may be sent in a close frame (RFC 6455, 7.4)."""
    return 1000 <= code < 5000 and code not in _RESERVED_CLOSE_CODES and not 1016 <= code < 3000


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame (1005 when it has none)."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise ProtocolError("close frame payload of one byte")
    (code,) = struct.unpack(">H", payload[:2])
    if not valid_close_code(code):
        raise ProtocolError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("close reason is not valid UTF-8", 1007) from None
    return code, reason


def valid_key(key: str) -> bool:
    """Whether ``key`` is a ``Sec-WebSocket-Key``: base64 of 16 bytes."""
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


@dataclass
class HandshakeRequest:
    """The HTTP request head of a handshake. Header names are lower-cased; repeated headers
    are joined with ``", "`` as RFC 9110 allows."""

    method: str
    path: str
    version: str
    headers: dict[str, str]

    @classmethod
    def parse(cls, head: bytes) -> "HandshakeRequest":
        try:
            text = head.decode("latin-1")
            lines = text.split("\r\n")
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise ProtocolError("malformed HTTP request line") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise ProtocolError("malformed HTTP header line")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return cls(method, target, version, headers)

    def tokens(self, name: str) -> list[str]:
        """The comma-separated, trimmed, non-empty values of header ``name``."""
        return [t.strip() for t in self.headers.get(name, "").split(",") if t.strip()]


def http_response(status: int, reason: str, headers: dict[str, str] | None = None, body: str = "") -> bytes:
    """An HTTP/1.1 response with a plain-text body."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    hdrs = dict(headers or {})
    if status != 101:
        data = body.encode("utf-8")
        hdrs.setdefault("Content-Type", "text/plain; charset=utf-8")
        hdrs["Content-Length"] = str(len(data))
        hdrs.setdefault("Connection", "close")
    else:
        data = b""
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data

