"""Socket I/O for websockets, shared by the server, the client, statesync and the load tool.

``websocket-server`` reads a frame with a Python loop per byte, rejects fragmented messages,
has no read limit and writes with ``socket.send`` (which may write part of a frame). These are
the pieces our :class:`~juggler.server.Server` uses instead: :class:`SocketIO`, which keeps a
TLS connection's reads and writes apart and bounds writes; :class:`SocketReader`, a
buffered reader that blocks with no timeout and is stopped by shutting its socket down (so
nothing polls, and no read timeout can corrupt a half-read frame); and :class:`WriteQueue`,
which orders what several threads write through one writer thread. What is read goes to a
:class:`~juggler.peer.Peer`, the websocket protocol without I/O (:func:`peer_events` joins
the two); the :class:`~juggler.client.Client` reads and writes its frames the same way, after
``websocket-client`` has made the connection and the handshake (:mod:`juggler.dial`).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, Iterator

from . import gilsend
from .exceptions import ProtocolError, Stopped
from .frames import CloseCode
from .peer import Peer

__all__ = ["Stopped", "SocketIO", "SocketReader", "WriteQueue", "peer_events", "RECV_SIZE"]

#: The most bytes one read asks the socket for.
RECV_SIZE = 262144
#: Seconds: a blocking read that waited longer found its connection idle, and the next one
#: waits without a buffer (see :meth:`SocketReader._recv`).
IDLE_WAIT = 0.05
_MSG_PEEK = getattr(socket, "MSG_PEEK", None)  # (without it, no peek: a recv(1) would take a byte)
_NO_LOCK = contextlib.nullcontext()  # (reusable, and shared)


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
        # one OpenSSL call at a time (TLS only; a plain socket's shutdown needs none)
        self._tls_lock: Any = threading.Lock() if self.tls else _NO_LOCK
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
            timeval = struct.pack("ll", seconds, max(micros, 0 if seconds else 1000))
            gilsend.setsockopt(sock, socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            self.blocking = True
        self._readable: Any = None  # a select.poll of the socket, made by the first wait_readable

    def wait_readable(self, timeout_ms: int = -1) -> bool:
        """Whether a :meth:`recv` may have something, waiting up to ``timeout_ms`` (-1: with
        no timeout, until bytes come, the peer closes, or :meth:`shutdown`)."""
        if self.tls:
            with self._tls_lock:
                if self._shut or self.sock.pending():  # pending: decrypted bytes poll cannot see
                    return True
        readable = self._readable
        if readable is None:
            if self.sock.fileno() < 0:  # closed: the read fails at once
                return True
            readable = self._readable = select.poll()
            readable.register(self.sock.fileno(), select.POLLIN | select.POLLPRI)
        return bool(readable.poll(timeout_ms))

    def untimed_reads(self) -> None:
        """Reads no longer wait with a timeout (the handshake is over): a plain socket's reads
        block in ``recv``, so the poll object made for the timed ones goes."""
        if self.blocking:
            self._readable = None

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
                self.sendall_claimed(data)
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
            return self._send_nowait(data)

    def _send_nowait(self, data: bytes) -> int:
        try:
            if gilsend.AVAILABLE and type(data) is bytes:
                return gilsend.send_nowait(self.sock.fileno(), data)
            return self.sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0

    # -- for a caller that alone writes now --
    #
    # The write lock keeps apart the frames of threads that write at once. A writer that
    # proves itself the only one (a server's Conn writes only with its WriteQueue's socket
    # claimed: claim() or get_batch(), then release(); tests/test_results_batch.py checks it)
    # may skip it: one lock taken and released less per message.

    def sendall_claimed(self, data: bytes) -> None:
        """:meth:`sendall`, by the only thread writing to the socket now, without the lock."""
        if self.tls:
            self.sendall(data)  # (its OpenSSL calls take their own lock)
            return
        try:
            gilsend.sendall(self.sock, data)
        except BlockingIOError:  # SO_SNDTIMEO passed with no progress
            raise TimeoutError(f"write timed out after {self.write_timeout:g} s") from None

    def send_nowait_claimed(self, data: bytes) -> int:
        """:meth:`send_nowait`, by the only thread writing to the socket now, without the lock."""
        return 0 if self.tls else self._send_nowait(data)

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
        self._idle = True  # whether the last blocking read waited long (see _recv)

    def read_some(self) -> bytes:
        """The next bytes: those left buffered by :meth:`read_until`, else what one read
        brings (at most :data:`RECV_SIZE`); :class:`Stopped` as described above."""
        if self._pos < len(self._buf):
            data = bytes(self._buf[self._pos :])
            self._buf.clear()
            self._pos = 0
            return data
        return self._recv()

    def _recv(self) -> bytes:
        io = self.io
        if io.blocking and self.deadline is None:
            # One recv that sleeps until bytes come, the peer closes, or a shutdown wakes it.
            # Python's recv allocates its whole buffer before it sleeps: a connection that is
            # idle (its last read waited long, or none came yet) first waits with a peek of
            # one byte instead, so that it holds no RECV_SIZE buffer while it stays idle.
            sock = io.sock
            started = time.monotonic()
            try:
                if self._idle and _MSG_PEEK is not None and not sock.recv(1, _MSG_PEEK):
                    raise Stopped("peer closed the connection")
                data = sock.recv(RECV_SIZE)
            except OSError as exc:
                raise Stopped(f"read failed: {exc}") from None
            if not data or io._shut:
                raise Stopped("peer closed the connection")
            self.last_recv = now = time.monotonic()
            self._idle = now - started > IDLE_WAIT
            return data
        while True:
            wait_ms = -1
            if self.deadline is not None:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise Stopped("timed out")
                wait_ms = max(1, int(remaining * 1000))
            if not io.wait_readable(wait_ms):
                continue
            try:
                data = io.recv(RECV_SIZE)
            except OSError as exc:
                raise Stopped(f"read failed: {exc}") from None
            if data is None:
                continue
            if not data:
                raise Stopped("peer closed the connection")
            self.last_recv = time.monotonic()
            return data

    def _fill(self) -> None:
        data = self._recv()
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def read_exact(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n:
            self._fill()
        start = self._pos
        self._pos += n
        data = bytes(self._buf[start : self._pos])
        if self._pos == len(self._buf):  # all read: an idle connection keeps no buffer
            self._buf.clear()
            self._pos = 0
        return data

    def read_until(self, marker: bytes, limit: int) -> bytes:
        """Bytes up to and including ``marker``; :class:`ProtocolError` (1009) when they are
        more than ``limit`` bytes, however they arrive (in one read or many)."""
        start = searched = self._pos
        while True:
            idx = self._buf.find(marker, max(start, searched - len(marker) + 1))
            end = idx + len(marker) if idx >= 0 else len(self._buf)
            if end - start > limit:
                raise ProtocolError(f"request head over {limit} bytes", CloseCode.MESSAGE_TOO_BIG)
            if idx >= 0:
                return self.read_exact(end - start)
            searched = len(self._buf)
            self._fill()
            if self._pos != start:  # _fill compacted the buffer
                searched -= start
                start = self._pos


class WriteQueue:
    """A bounded FIFO from any thread to one writer thread, and who may write to the socket.

    :meth:`put` waits up to a timeout for room; :meth:`close` always gets its marker in (making
    room if it must), and nothing is queued after it. :meth:`get_batch` blocks, with no timeout,
    until something is queued and nobody else is writing; the writer then holds the socket until
    :meth:`release`. A sender may instead :meth:`claim` the socket to write a message itself,
    which it gets only when nothing is queued and nobody writes: so messages go out in the
    order they were sent, whichever thread writes them.

    One thread, the writer, calls :meth:`get_batch`: it sleeps on a lock of its own, which
    whoever queues for it releases (no :class:`threading.Condition`, whose waiters' deque and
    a new lock per wait an idle connection would pay for). The condition that a :meth:`put`
    waits for room on is made the first time the queue is full.
    """

    __slots__ = ("maxsize", "_items", "_lock", "_wake", "_sleeping", "_not_full", "_closed", "_busy")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: list[Any] = []  # (a list: short, and a deque costs ~600 bytes idle)
        self._lock = threading.Lock()
        self._wake: Any = None  # the writer's lock, held but while a wake-up is due (get_batch)
        self._sleeping = False  # the writer sleeps on _wake (or is about to)
        self._not_full: Any = None  # a Condition on _lock, once a put waits for room
        self._closed = False
        self._busy = False  # a thread is writing to the socket

    def __len__(self) -> int:
        return len(self._items)

    def _notify_writer(self) -> None:
        """(Under the lock.) Wake the writer if it sleeps."""
        if self._sleeping:
            self._sleeping = False
            self._wake.release()

    def _notify_room(self) -> None:
        """(Under the lock.) Wake the puts waiting for room."""
        if self._not_full is not None:
            self._not_full.notify_all()

    def put(self, item: Any, timeout: float = 0.0) -> bool:
        """Queue ``item``; ``False`` if the queue stayed full for ``timeout`` seconds, or is
        closed."""
        with self._lock:
            if len(self._items) >= self.maxsize:
                if timeout <= 0:
                    return False
                if self._not_full is None:
                    self._not_full = threading.Condition(self._lock)
                if not self._not_full.wait_for(lambda: len(self._items) < self.maxsize or self._closed, timeout):
                    return False
            if self._closed:
                return False
            self._items.append(item)
            if self._sleeping:
                self._sleeping = False
                self._wake.release()
            return True

    def close(self, marker: Any, discard: bool = False) -> None:
        """Queue ``marker`` last, whatever the bound, after what is queued (the writer drains
        it first); with ``discard``, drop what is queued, but for bytes at its head: the rest
        of a frame already begun on the socket (see :meth:`put_first`), which must be
        finished or what follows would land inside it."""
        with self._lock:
            if discard:
                items = self._items
                head = items[0] if items and isinstance(items[0], (bytes, bytearray, memoryview)) else None
                items.clear()
                if head is not None:
                    items.append(head)
            self._closed = True
            self._items.append(marker)
            self._notify_writer()
            self._notify_room()

    def get_batch(self, most: int) -> list[Any]:
        """Up to ``most`` items, in order, and the socket (:meth:`release` it); blocks until
        there is at least one and nobody else writes. (The writer thread only.)"""
        lock = self._lock
        lock.acquire()
        try:
            while not self._items or self._busy:
                wake = self._wake
                if wake is None:
                    wake = self._wake = threading.Lock()
                    wake.acquire()
                self._sleeping = True
                lock.release()
                try:
                    wake.acquire()  # released by _notify_writer
                finally:
                    lock.acquire()
            items = self._items
            if len(items) <= most:
                self._items = []
                batch = items
            else:
                batch = items[:most]
                del items[:most]
            self._busy = True
            self._notify_room()
            return batch
        finally:
            lock.release()

    def claim(self) -> bool:
        """Take the socket to write one message now: only if nothing is queued, nobody
        writes and the queue is open. :meth:`release` it after."""
        with self._lock:
            if self._items or self._busy or self._closed:
                return False
            self._busy = True
            return True

    def release(self) -> None:
        with self._lock:
            self._busy = False
            if self._items and self._sleeping:
                self._sleeping = False
                self._wake.release()

    def put_first(self, item: Any, last: bool = False) -> bool:
        """Queue ``item`` whatever the bound: first in line (the unwritten rest of a frame,
        by the thread that claimed the socket), or with ``last`` at the end (a place kept for a thread
        not done yet: see :meth:`juggler.Conn.ordered`). ``False`` if the queue is closed, but
        for the rest of a frame: that goes ahead of the close marker even when a close came while
        its first part was written, or the close frame would land inside it."""
        with self._lock:
            if self._closed and last:
                return False
            if last:
                self._items.append(item)
            else:
                self._items.insert(0, item)
            self._notify_writer()
            return True


def peer_events(reader: SocketReader, peer: Peer) -> Iterator[tuple[int, Any]]:
    """The events of ``peer`` (see :mod:`juggler.peer`) from what ``reader`` reads, in order,
    until the stream ends (:class:`Stopped` ends the iteration). Once the peer's close frame or
    a protocol error came, no event follows: what comes after is read and dropped until the
    peer hangs up or the socket is shut down (closing with unread bytes would reset the
    connection, and the peer could lose our close frame)."""
    read, receive = reader.read_some, peer.receive_data
    while True:
        try:
            data = read()
        except Stopped:
            return
        yield from receive(data)
