"""Redis commands on the hot paths, spoken directly over the socket.

redis-py spends 50-80 µs of CPU on each command here (its retry wrapper, pool bookkeeping,
health checks, observability hooks, command packing and a pure-Python parser); the same
command packed here and parsed by ``hiredis`` costs about 11 µs. A call crosses redis six
times (server, callee, server again), so the server's and the callee's per-call commands go
through a :class:`RespConnection` where they can (a callee worker's connection is one too:
:func:`wrap`, from :mod:`juggler.popper`):

- the connection is made by redis-py (its ``Connection.connect()``: host or unix socket, TLS,
  AUTH, SELECT, client name are what the application's client says), then spoken to here;
- it applies to a plain ``redis.Redis`` client with a real socket (not fakeredis, not the
  cluster client, which routes by slot, not a client made with ``protocol=3``: those keep
  redis-py's path), and only when ``hiredis`` is installed;
- its connections speak RESP2 (redis-py makes them with ``protocol=2``): redis-py 8 asks for
  RESP3 (``HELLO 3``) when the client names no protocol, and RESP3 replies differ in shape
  (maps, sets, booleans, doubles) from what the callers here read;
- errors are redis-py's exceptions (``ResponseError`` for an error reply, ``ConnectionError``
  and ``TimeoutError`` for the socket), so callers handle both paths alike; a reply that
  cannot be parsed, or one of the wrong type (:meth:`RespConnection.integer`,
  :meth:`RespConnection.popped`), means the connection is out of step with redis: it is marked
  broken (never used again: a :class:`RespPool` closes it) and the error is a
  ``ConnectionError``;
- nothing is retried: a command that may have run is never sent twice.
"""

from __future__ import annotations

import ctypes
import hashlib
import select
import socket
import struct
import threading
import time
from typing import Any, Callable, Optional, Sequence

import redis
import redis.connection
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import gilsend

try:  # the C parser; without it the fast path is off
    import hiredis
except ImportError:  # pragma: no cover - hiredis is a dependency
    hiredis = None  # type: ignore[assignment]

__all__ = ["RespConnection", "RespPool", "Script", "pack", "applies", "connect", "wrap"]

_pack_command = getattr(hiredis, "pack_command", None)
_NO_RETRY = Retry(NoBackoff(), 0)
_REAL_CONNECTIONS = (redis.connection.Connection, redis.connection.UnixDomainSocketConnection)
_READY_SIZE = 4096  # (RespConnection.read_reply's buffer for what is there already)


def pack(args: Sequence[Any]) -> bytes:
    """One command in RESP: an array of bulk strings (``str`` is UTF-8, numbers as text).
    hiredis' ``pack_command`` makes the same bytes in C (1.5 µs for a 10-argument EVALSHA,
    against 4.5 µs for the loop below, which remains for what it refuses, e.g. a bool)."""
    if _pack_command is not None:
        try:
            return _pack_command(tuple(args))
        except TypeError:
            pass
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode("utf-8")
        elif isinstance(a, (int, float)):
            a = str(a).encode("ascii")
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def _timeval(seconds: float, none: bool = False) -> bytes:
    """A ``struct timeval`` for ``SO_RCVTIMEO``/``SO_SNDTIMEO``; zero means no limit there, so
    0 becomes a microsecond, unless ``none`` (no limit) is meant."""
    whole = int(seconds)
    micros = int(round((seconds - whole) * 1e6))
    return struct.pack("ll", whole, micros if whole or micros or none else 1)


class Script:
    """A Lua script run with EVALSHA, falling back to EVAL once redis says NOSCRIPT."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()


class RespConnection:
    """One redis connection made by redis-py and then spoken to directly (see the module).

    Not thread-safe: one thread at a time (a :class:`RespPool` hands it out), except
    :meth:`interrupt`, which any thread may call to wake a blocked read.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn  # owns the socket; disconnect() closes it
        sock: socket.socket = conn._sock
        timeout = sock.gettimeout()
        if timeout is not None:
            # Python polls before every send and recv of a socket with a timeout: two system
            # calls more per command. The kernel's own timeouts bound them the same way.
            sock.settimeout(None)
            tv = _timeval(timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._sock = sock
        self._reader = hiredis.Reader()
        self._ready_buf: Optional[ctypes.Array[ctypes.c_char]] = None  # (read_reply)
        # read_reply may look without letting go of the GIL (a plain socket, not TLS)
        self._nowait = gilsend.AVAILABLE and type(sock) is socket.socket
        self._sent_at = 0.0  # (command_within)
        self.broken = False
        #: Whether redis on this connection takes ``CLIENT REPLY SKIP`` (``None``: not known
        #: yet); for its user, which finds out (see ``RpcSide._consume_ahead``).
        self.reply_skip: Optional[bool] = None

    def _fail(self, exc: BaseException) -> redis.exceptions.RedisError:
        self.broken = True
        if isinstance(exc, (socket.timeout, BlockingIOError)):  # (SO_RCVTIMEO, SO_SNDTIMEO)
            return redis.exceptions.TimeoutError(f"Timeout talking to redis: {exc}")
        return redis.exceptions.ConnectionError(f"Error while talking to redis: {exc}")

    def _wrong(self, what: str) -> redis.exceptions.ConnectionError:
        """A reply that cannot be what was asked: the connection is out of step with redis
        (or the peer is not redis), and is never used again."""
        self.broken = True
        return redis.exceptions.ConnectionError(f"Protocol error from redis: {what}")

    def _read(self, deadline: Optional[float] = None) -> Any:
        """The next reply; with ``deadline`` (``time.monotonic()``), a ``TimeoutError`` (the
        connection broken) if it has not come by then."""
        reader = self._reader
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                raise self._wrong(str(exc)) from exc
            if reply is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise redis.exceptions.ResponseError(str(reply))
                return reply
            if deadline is not None:
                self._wait_readable(deadline)
            try:
                data = self._sock.recv(65536)
            except OSError as exc:
                raise self._fail(exc) from exc
            if not data:
                self.broken = True
                raise redis.exceptions.ConnectionError("Connection closed by server.")
            reader.feed(data)

    def _wait_readable(self, deadline: float) -> None:
        left = max(deadline - time.monotonic(), 0.0)
        try:
            poller = select.poll()  # (not select(): descriptors past 1024)
            poller.register(self._sock, select.POLLIN)
            ready = poller.poll(left * 1000.0)
        except (OSError, ValueError) as exc:
            raise self._fail(exc) from exc
        if not ready:
            self.broken = True  # (its reply may still come: nothing else may be read here)
            raise redis.exceptions.TimeoutError(f"no answer in {deadline - self._sent_at:.2g} s")

    def _send(self, data: bytes) -> None:
        try:
            gilsend.sendall(self._sock, data)
        except OSError as exc:
            raise self._fail(exc) from exc

    def command(self, *args: Any) -> Any:
        """Run one command; its reply (bytes, int, list, None)."""
        self._send(pack(args))
        return self._read()

    def command_within(self, seconds: Optional[float], *args: Any) -> Any:
        """:meth:`command`, its reply awaited ``seconds`` at most (``None``: the socket's
        own timeout): a ``TimeoutError`` after, the connection broken. (For the commands of a
        thread that must not wait long, e.g. a websocket's reader storing a CALL on a redis
        that stalls; a select() before the read, so not for the others.)"""
        if seconds is None:
            return self.command(*args)
        self._sent_at = time.monotonic()
        self._send(pack(args))
        return self._read(self._sent_at + seconds)

    def integer(self, reply: Any) -> int:
        """``reply``, which must be an integer reply: else the connection is broken and the
        error a ``ConnectionError`` (see the module)."""
        if type(reply) is int:
            return reply
        raise self._wrong(f"an integer was due, not {reply!r:.60}")

    def popped(self, reply: Any) -> Optional[bytes]:
        """The item of a ``BRPOP``'s ``reply`` (``None``: it timed out), which must be a pair
        of bulk strings: else as :meth:`integer`."""
        if reply is None:
            return None
        if type(reply) is list and len(reply) == 2 and type(reply[1]) is bytes:
            return reply[1]
        raise self._wrong(f"a BRPOP reply was due, not {reply!r:.60}")

    def set_timeouts(self, read: Optional[float], send: Optional[float]) -> None:
        """The kernel's timeouts for a wait to read and to send (``None``: no limit)."""
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(read or 0.0, none=True))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send or 0.0, none=True))

    def send(self, commands: Sequence[Sequence[Any]]) -> None:
        """Send ``commands`` in one write without reading their replies (:meth:`read_reply`
        them, in order)."""
        self._send(b"".join(pack(c) for c in commands))

    def send_packed(self, data: bytes) -> None:
        """:meth:`send` of commands already packed (:func:`pack`)."""
        self._send(data)

    def read_reply(self, wait: bool = False, before_wait: Optional[Callable[[], None]] = None) -> Any:
        """The next reply, an error reply returned (a ``ResponseError``) rather than raised:
        what is already there is read without letting go of the GIL (see
        :mod:`juggler.gilsend`), and only a reply still on its way is waited for, after
        ``before_wait()``. ``wait``: the caller expects none to be there yet (nothing it asked
        is due), so the look without waiting, a system call that would find nothing, is
        skipped."""
        reader = self._reader
        try:
            reply = reader.gets()
            if reply is False and not wait and self._nowait:
                buf = self._ready_buf
                if buf is None:
                    buf = self._ready_buf = ctypes.create_string_buffer(_READY_SIZE)
                try:
                    n = gilsend.recv_into_nowait(self._sock.fileno(), buf)  # (-1 once closed: an error)
                except OSError as exc:
                    raise self._fail(exc) from exc
                if n == 0:
                    self.broken = True
                    raise redis.exceptions.ConnectionError("Connection closed by server.")
                if n is not None:
                    reader.feed(buf, 0, n)
                    reply = reader.gets()
        except hiredis.ProtocolError as exc:
            raise self._wrong(str(exc)) from exc
        if reply is False:
            if before_wait is not None:
                before_wait()
            return self._reply()  # on its way: wait for it
        if isinstance(reply, hiredis.ReplyError):
            return redis.exceptions.ResponseError(str(reply))
        return reply

    def _reply(self) -> Any:
        """The next reply, an error reply returned rather than raised."""
        try:
            return self._read()
        except redis.exceptions.ResponseError as exc:
            return exc

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send several commands in one write and read their replies; an error reply is
        returned in its place (a ``ResponseError``), not raised."""
        self.send(commands)
        return [self._reply() for _ in commands]

    def evalsha(self, script: Script, keys: Sequence[Any], args: Sequence[Any], within: Optional[float] = None) -> Any:
        """Run ``script`` (EVALSHA, then EVAL on NOSCRIPT); ``within``: as
        :meth:`command_within`, for each of the two."""
        try:
            return self.command_within(within, "EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return self.command_within(within, "EVAL", script.source, len(keys), *keys, *args)

    def alive(self) -> bool:
        """Whether the connection still looks usable (redis has not closed it while it sat
        idle): a non-blocking peek, no command."""
        if self.broken:
            return False
        if gilsend.AVAILABLE:  # a peek that keeps the GIL (see juggler.gilsend)
            readable = gilsend.readable_nowait(self._sock.fileno())
            return readable is False
        # (not recv with MSG_DONTWAIT: on a socket with a timeout Python first waits for it)
        try:
            readable = select.select([self._sock], [], [], 0)[0]
        except (OSError, ValueError):
            return False
        return not readable  # readable while idle: EOF, or bytes nobody asked for

    def interrupt(self) -> None:
        """Wake a read blocked in another thread (it fails with ``ConnectionError``)."""
        self.broken = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.broken = True
        self._conn.disconnect()


def applies(client: Any) -> bool:
    """Whether the fast path applies to redis-py ``client`` (see the module)."""
    pool = getattr(client, "connection_pool", None)
    if hiredis is None or pool is None:
        return False
    cls = pool.connection_class
    protocol = str(pool.connection_kwargs.get("protocol", 2))
    return issubclass(cls, _REAL_CONNECTIONS) and cls.__module__.startswith("redis.") and protocol in ("2", "None")


def connect(client: Any, **overrides: Any) -> Optional[RespConnection]:
    """A new :class:`RespConnection` with the settings of redis-py ``client``'s pool (and
    ``overrides``, e.g. ``socket_timeout=None``), speaking RESP2; ``None`` where the fast
    path does not apply (see the module). Raises redis-py's errors when redis cannot be reached."""
    if not applies(client):
        return None
    pool = client.connection_pool
    conn = pool.connection_class(**{**pool.connection_kwargs, "protocol": 2, **overrides})
    conn.connect()
    if not isinstance(conn._sock, socket.socket):  # pragma: no cover - a stand-in socket
        conn.disconnect()
        return None
    return RespConnection(conn)


def wrap(conn: Any) -> Optional[RespConnection]:
    """A :class:`RespConnection` over redis-py connection ``conn`` (connected, speaking RESP2,
    no reply left unread), or ``None`` where the fast path does not apply to it (RESP3, a
    stand-in socket, no ``hiredis``). It then owns ``conn``: its
    :meth:`~RespConnection.close` disconnects it. (For a connection whose user routes by slot
    itself, e.g. a callee worker's on a cluster node: MOVED and ASK are error replies here.)"""
    if hiredis is None or str(getattr(conn, "protocol", None)) != "2":
        return None
    if not isinstance(getattr(conn, "_sock", None), socket.socket):  # pragma: no cover - a stand-in
        return None
    return RespConnection(conn)


class RespPool:
    """Idle :class:`RespConnection` s to the redis of ``client``, for short commands from any
    thread: :meth:`get` one, use it, :meth:`put` it back (a broken one is closed instead). At
    most ``max_idle`` wait idle; more are made when more threads need one at once.

    ``RespPool.applies(client)`` says whether the fast path applies at all.
    """

    def __init__(self, client: Any, max_idle: int = 64) -> None:
        self.client = client
        self.max_idle = max_idle
        self._idle: list[RespConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    @staticmethod
    def applies(client: Any) -> bool:
        return applies(client)

    def get(self, within: Optional[float] = None) -> RespConnection:
        """An idle connection, or a new one; ``within``: a new one's handshake may take that
        long at most, and a refused connect is not tried again (for a thread that must not
        wait long on a redis that stalls or is down), its timeouts the client's after it."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                if within is None:
                    made = connect(self.client)
                else:
                    made = connect(self.client, socket_timeout=within, retry=_NO_RETRY)
                    if made is not None:
                        timeout = self.client.connection_pool.connection_kwargs.get("socket_timeout")
                        made.set_timeouts(timeout, timeout)
                if made is None:  # pragma: no cover - applies() said it would
                    raise redis.exceptions.ConnectionError("the fast path does not apply to this client")
                return made
            if conn.alive():
                return conn
            conn.close()

    def put(self, conn: RespConnection) -> None:
        if not conn.broken:
            with self._lock:
                if not self._closed and len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
