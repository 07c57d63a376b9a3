"""One state-sync connection (either side of it) and its threads.

A :class:`Connection` is symmetric: the server's and the client's differ only in who masks
frames and who owns the threads around them. It runs on two threads, named
``juggler-statesync-<id>-<role>``:

- the reader: reads frames, applies ``DATA`` patches to :attr:`Connection.remote_data` and
  calls the change callbacks, queues ``MESSAGE`` payloads for :meth:`Connection.receive`,
  answers ``PING``. It owns the connection: when it ends, it stops and joins the writer. On a
  server it is the thread of the TCP connection; a client starts its own.
- the writer: drains a bounded queue of frames onto the socket. It also gets the ``DATA``
  patches, between the data last sent and the current local data, so they go out in the
  order they were made and never block whoever changed the data. It gets them from a
  :class:`PatchCache` (a server's connections share one), so connections that go from the same
  data to the same data send one patch, computed and encoded once. When the autoflush delay
  ends and the socket is free, the timer thread sends the patch itself (see
  ``Connection._flush_due``), then a PING: the next autoflush DATA waits for its PONG
  (flow control: a peer that lags gets fewer, fresher patches; ``Connection._answered``).

Timed things (the autoflush delay, keepalive pings, the idle timeout, the close deadline) are
entries in a :class:`~juggler.timer.Timer`: the server's, shared by its connections, or one a
client connection owns. Nothing polls.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from ..exceptions import ConnectionClosed, JugglerTimeout, ProtocolError
from ..frames import OP_PING, OP_TEXT, CloseCode, encode_frame
from ..peer import CLOSE, FAIL, OP_BINARY, SEND, Peer
from ..timer import Keepalive, Timer, TimerHandle
from ..transport import SocketIO, SocketReader, WriteQueue, peer_events
from . import protocol
from .patches import PatchCache

__all__ = ["Connection", "Settings", "ChangeHandle", "PatchCache"]

_WRITE_BATCH = 64  # queue items the writer takes for one socket write, at most
_ids = itertools.count(1)
_local = threading.local()  # .inside: the connection whose action or callback this thread runs


@dataclass(frozen=True)
class Settings:
    """The limits of a state-sync connection; ``listen`` and ``connect`` take each as a keyword
    argument of the same name."""

    #: largest message read, in bytes, after reassembly (over it: close 1009). hat-juggler's
    #: server takes up to 4 MiB (aiohttp's default).
    read_limit: int = 4 << 20
    #: frames queued for the writer; a sender waits up to ``write_timeout`` for room, then the
    #: peer is deemed too slow and the connection closed (1008)
    write_queue_size: int = 256
    #: seconds a sender waits on a full queue, and a socket write may take
    write_timeout: float = 10.0
    #: ``MESSAGE`` payloads received and not yet taken by :meth:`Connection.receive`; when it
    #: is full, the reader waits (and so does the peer, through TCP) until one is taken
    receive_queue_size: int = 1024
    #: ping the peer after this many seconds without a frame from it (0: never)
    ping_interval: float = 30.0
    #: close (1001) after this many seconds without any frame from the peer (0: never)
    idle_timeout: float = 60.0
    #: seconds to wait for the peer's close frame once closing starts
    close_timeout: float = 2.0
    #: flow control: an autoflush DATA waits (its changes coalescing) until the peer answered
    #: the ``PING`` sent after the previous one, at most this many seconds (0: no flow control)
    flow_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("read_limit", "write_queue_size", "receive_queue_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("write_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")
        for name in ("ping_interval", "idle_timeout", "flow_timeout"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 seconds (0: off), got {getattr(self, name)!r}")


def check_autoflush_delay(delay: Optional[float]) -> Optional[float]:
    if delay is not None and (isinstance(delay, bool) or not delay >= 0):
        raise ValueError(f"autoflush_delay must be None or >= 0 seconds, got {delay!r}")
    return delay


class ChangeHandle:
    """What :meth:`Connection.register_change_cb` returns: :meth:`cancel` unregisters the
    callback (idempotent)."""

    __slots__ = ("_conn", "_cb")

    def __init__(self, conn: "Connection", cb: Callable[[], None]) -> None:
        self._conn, self._cb = conn, cb

    def cancel(self) -> None:
        self._conn._unregister(self)


class _Inbox:
    """The bounded FIFO of received ``MESSAGE`` payloads: the reader puts (waiting while it is
    full), :meth:`Connection.receive` gets. :meth:`close` wakes both; what is queued can still
    be taken after it."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Any] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    def put(self, item: Any) -> None:
        with self._cond:
            while len(self._items) >= self.maxsize and not self._closed:
                self._cond.wait()
            if not self._closed:
                self._items.append(item)
                self._cond.notify_all()

    def get(self, timeout: Optional[float]) -> tuple[bool, Any]:
        """``(True, item)``, or ``(False, None)`` when closed and empty; :class:`TimeoutError`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                raise JugglerTimeout(f"no message within {timeout:g} s")
            if not self._items:
                return False, None
            item = self._items.popleft()
            self._cond.notify_all()
            return True, item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _NotJSON(Exception):
    """The local data to send is not JSON: nothing sent, the peer keeps the data it has."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Flush:
    """A flush_local_data() waiting in the write queue: ``done`` is set once the patch it
    asked for is written (or the connection failed: ``failed``; or the local data was not
    JSON: ``error``)."""

    __slots__ = ("done", "failed", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.failed = False
        self.error: Optional[Exception] = None


class _Snapshot:
    """Local data to send as it is (autoflush_delay 0: every change is a DATA of its own)."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data


_AUTOFLUSH = object()  # write queue marker: send what changed since the last DATA
_PING = protocol.encode(protocol.PING, {})  # flow control's probe, after an autoflush DATA
_PING_FRAME = encode_frame(OP_TEXT, _PING, None)  # a server's (unmasked)
_PROBE_INTERVAL = 1.0  # seconds between PINGs to a peer that keeps up
_CLOSE = object()  # write queue marker: send the close frame and stop


class Connection:
    """A state-sync connection: local and remote JSON data kept in sync with the peer's, and
    messages both ways.

    Get one from :func:`~juggler.statesync.connect` or in the ``on_connection`` callback of
    :func:`~juggler.statesync.listen`. Every method may be called from any thread. After the
    connection closed, :meth:`send`, :meth:`set_local_data` and :meth:`flush_local_data` raise
    :class:`~juggler.exceptions.ConnectionClosed`, and so does :meth:`receive` once the
    messages that came before the close are taken. ``close_code`` and ``close_reason`` say
    why it closed.
    """

    def __init__(
        self,
        io: SocketIO,
        reader: SocketReader,
        *,
        client: bool,
        settings: Settings,
        timer: Timer,
        autoflush_delay: Optional[float],
        remote_addr: Any = None,
        logger: Optional[logging.Logger] = None,
        release: Optional[Callable[[], None]] = None,
        patches: Optional[PatchCache] = None,
    ) -> None:
        self.id = next(_ids)
        self.remote_addr = remote_addr
        self.settings = settings
        self.autoflush_delay = check_autoflush_delay(autoflush_delay)
        self.logger = logger or logging.getLogger(__name__)
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self._client = client
        self._io = io
        self._socket_reader = reader
        # the websocket protocol: a server reads a client's masked frames, a client masks its own
        self._peer = Peer(client=client, limit=settings.read_limit)
        self._timer = timer
        self._release = release
        self._queue = WriteQueue(settings.write_queue_size)
        self._inbox = _Inbox(settings.receive_queue_size)

        self._lock = threading.Lock()  # callbacks, filters, pending flushes, close hooks
        self._callbacks: tuple[ChangeHandle, ...] = ()
        self._filters: tuple[Callable[[Any], bool], ...] = ()
        self._close_hooks: list[Callable[[], None]] = []
        self._flushes: set[_Flush] = set()
        self._rpc: Any = None  # the RpcConnection on it, at most one

        self._data_lock = threading.Lock()  # local data and the autoflush timer
        self._local: Any = None
        self._remote: Any = None  # the reader's
        self._synced: Any = None  # the writer's: the local data the peer has
        self._autoflush: Optional[TimerHandle] = None
        self._unanswered = 0  # flow control: our PINGs the peer has not answered yet
        self._probe_at = float("-inf")  # when the last of them went out
        self._held = False  # an autoflush came due meanwhile: its DATA waits for the PONG
        self._lagging = False  # the last PONG took longer than the autoflush delay
        self._patches = patches if patches is not None else PatchCache(2, frames=not client, logger=self.logger)
        if self._patches.frames == client:
            raise ValueError("a client connection needs a PatchCache of messages, a server one of frames")

        self._close_lock = threading.Lock()
        self._closing_since: Optional[float] = None
        self._peer_gone = False
        self._done = threading.Event()
        self._reader_ident: Optional[int] = None
        self._writer: Optional[threading.Thread] = None
        self._keepalive: Optional[Keepalive] = None
        self._close_deadline: Optional[TimerHandle] = None
        #: ``DATA`` messages sent (one per flush that found a change); the writer's
        self.data_sent = 0
        #: the reader thread, when the connection owns it (a client's): close() joins it
        self.owned_reader: Optional[threading.Thread] = None
        self._mask = os.urandom if client else None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<statesync.Connection {self.id} {self.remote_addr} {state}>"

    # -- data --

    @property
    def local_data(self) -> Any:
        """The local data last set (the very object given); ``None`` at first. Read-only (see
        :meth:`set_local_data`)."""
        return self._local

    @property
    def remote_data(self) -> Any:
        """The peer's data as synced so far; ``None`` at first. A new value after each change
        (so a value once read does not change under its reader); treat it as read-only."""
        return self._remote

    def set_local_data(self, data: Any) -> None:
        """Make ``data`` (any JSON value) the local data; the peer gets the change within
        ``autoflush_delay`` seconds (``0``: at once, as a ``DATA`` of its own; ``None``: at the
        next :meth:`flush_local_data`). Changes within the delay go out as one patch.

        ``data`` is taken as it is, not copied (O(1), whatever its size): from now on it, and
        every list and dict inside it, must not change. To change the data, build a new value,
        which may share the parts that did not change with the old one (the patch is then
        made from the changed parts only). A value changed in place after it was handed over
        may reach the peer, or not, or break later patches (see docs/statesync.rst).

        :class:`TypeError` or :class:`ValueError` when ``data`` itself is not JSON (a set,
        NaN); what is inside is checked when it is sent: a change that is not JSON is logged
        (ERROR) and not sent, and :meth:`flush_local_data` raises its error.
        :class:`~juggler.exceptions.ConnectionClosed` when the connection is closed.
        """
        protocol.check_data(data)
        self._check_open()
        delay = self.autoflush_delay
        with self._data_lock:
            self._local = data
            if delay == 0:
                # under the lock: the snapshots reach the queue in the order they were set
                self._put(_Snapshot(data))
            elif delay is not None and self._autoflush is None:
                self._autoflush = self._timer.call_later(delay, self._autoflush_due)

    def flush_local_data(self) -> None:
        """Send what changed in the local data now, and block until it is written to the
        socket (at once when nothing changed). :class:`~juggler.exceptions.ConnectionClosed`
        when the connection closes first; :class:`TypeError` or :class:`ValueError` when the
        local data is not JSON (nothing was sent: the peer keeps the data it had)."""
        self._check_open()
        flush = _Flush()
        with self._lock:
            self._flushes.add(flush)
        try:
            self._put(flush)
            flush.done.wait()
        finally:
            with self._lock:
                self._flushes.discard(flush)
        if flush.failed:
            raise self._closed_error()
        if flush.error is not None:
            raise type(flush.error)(str(flush.error))

    def register_change_cb(self, cb: Callable[[], None]) -> ChangeHandle:
        """Call ``cb()`` after each change of :attr:`remote_data`, on the reader thread (so it
        should be quick; an exception is logged and the connection goes on). Returns a handle
        whose ``cancel()`` unregisters it."""
        handle = ChangeHandle(self, cb)
        with self._lock:
            self._callbacks = (*self._callbacks, handle)
        return handle

    def _unregister(self, handle: ChangeHandle) -> None:
        with self._lock:
            self._callbacks = tuple(h for h in self._callbacks if h is not handle)

    # -- messages --

    def send(self, msg: Any) -> None:
        """Send ``msg`` (any JSON value) as a ``MESSAGE``. Returns once it is queued for the
        writer (it waits up to ``write_timeout`` for room; past that the peer is too slow and
        the connection is closed with 1008). :class:`TypeError` or :class:`ValueError` when
        ``msg`` is not JSON; :class:`~juggler.exceptions.ConnectionClosed`."""
        data = protocol.encode(protocol.MESSAGE, msg)
        self._check_open()
        self._put(self._frame(data))

    def receive(self, timeout: Optional[float] = None) -> Any:
        """The next ``MESSAGE`` payload, waiting up to ``timeout`` seconds (``None``: for as
        long as it takes) and raising :class:`TimeoutError` (a
        :class:`~juggler.exceptions.JugglerTimeout`) past it. Once the connection is closed,
        the messages it received before are still returned, then
        :class:`~juggler.exceptions.ConnectionClosed` is raised."""
        ok, item = self._inbox.get(timeout)
        if not ok:
            raise self._closed_error()
        return item

    def __iter__(self) -> Iterator[Any]:
        """Every ``MESSAGE`` payload, as it comes; the iteration ends when the connection
        closes normally (1000 or 1001) and raises
        :class:`~juggler.exceptions.ConnectionClosed` otherwise."""
        while True:
            try:
                yield self.receive()
            except ConnectionClosed as exc:
                if exc.code in (CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY):
                    return
                raise

    # -- closing --

    @property
    def closed(self) -> bool:
        """Whether closing started (the connection may still be finishing)."""
        return self._closing_since is not None

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Close the connection: pending local data changes and queued messages go out, then
        the close frame; waits for the peer's answer (up to ``close_timeout``) and for the
        connection's threads to end. Idempotent. Called from the connection's own threads (a
        change callback, an RPC action) it only starts closing."""
        with self._data_lock:
            if self._autoflush is not None and not self.closed:
                self._autoflush.cancel()
                self._queue.put_first(_AUTOFLUSH, last=True)
        self._start_close(code, reason)
        if threading.get_ident() == self._reader_ident or threading.current_thread() is self._writer:
            return
        if getattr(_local, "inside", None) is self:
            return
        self._done.wait()
        if self.owned_reader is not None:
            self.owned_reader.join()

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Block until the connection is over (its threads ended); whether it was within
        ``timeout`` seconds."""
        return self._done.wait(timeout)

    def _start_close(self, code: int, reason: str) -> bool:
        """Start closing: the close frame goes out after what is queued; the reader ends when
        the peer answers or ``close_timeout`` passes. Only the first call counts (``True``)."""
        with self._close_lock:
            if self._closing_since is not None:
                return False
            self._closing_since = time.monotonic()
            self.close_code, self.close_reason = code, reason
            self._peer.closing = True  # from now on, what the peer sends is dropped
        self._queue.close(_CLOSE)
        self._close_deadline = self._timer.call_later(self.settings.close_timeout, self._io.shutdown)
        return True

    def _fail(self, code: int, reason: str) -> None:
        """Close because of the peer's fault (or a slow peer); logged once, here."""
        if self._start_close(code, reason):
            self.logger.info("statesync connection %d from %s closed: %d %s", self.id, self.remote_addr, code, reason)

    def _check_open(self) -> None:
        if self.closed:
            raise self._closed_error()

    def _closed_error(self) -> ConnectionClosed:
        return ConnectionClosed(self.close_code or CloseCode.ABNORMAL_CLOSURE, self.close_reason)

    # -- hooks for the server and RpcConnection --

    def add_message_filter(self, fn: Callable[[Any], bool]) -> None:
        """``fn(payload)`` sees each ``MESSAGE`` first, on the reader thread; when it returns
        true the message is consumed and :meth:`receive` never gets it."""
        with self._lock:
            self._filters = (*self._filters, fn)

    def add_close_hook(self, fn: Callable[[], None]) -> None:
        """``fn()`` runs on the reader thread once the connection is over (at once if it is)."""
        with self._lock:
            if not self._done.is_set():
                self._close_hooks.append(fn)
                return
        fn()

    # -- threads --

    def run(self) -> None:
        """Serve the connection on the calling thread (the reader) until it is over."""
        self._reader_ident = threading.get_ident()
        try:
            # a daemon thread, joined by _teardown all the same (see juggler.conn.CONN_THREAD_DAEMON)
            writer = threading.Thread(target=self._write_loop, name=f"juggler-statesync-{self.id}-writer", daemon=True)
            writer.start()
            self._writer = writer
            s = self.settings
            self._keepalive = Keepalive(
                self._timer, self._socket_reader, s.ping_interval, s.idle_timeout,
                ping=lambda: self._queue.put(self._peer.frame(OP_PING, b"juggler")),  # not worth waiting for room
                idle=lambda reason: self._fail(CloseCode.GOING_AWAY, reason),
                closed=lambda: self.closed,
            ).start()  # fmt: skip
            self._read_loop()
        finally:
            self._teardown()

    def _teardown(self) -> None:
        if not self.closed:
            self._peer_gone = True
            self._start_close(CloseCode.ABNORMAL_CLOSURE, "connection lost")
        try:
            if self._keepalive is not None:
                self._keepalive.cancel()
            with self._data_lock:
                if self._autoflush is not None:
                    self._autoflush.cancel()
            writer = self._writer
            if writer is not None:
                writer.join(self.settings.close_timeout)
                if writer.is_alive():  # stuck writing to a peer that does not read
                    self._io.shutdown()
                writer.join()
            self._io.shutdown()
        finally:
            if self._close_deadline is not None:
                self._close_deadline.cancel()
            self._inbox.close()
            with self._lock:
                flushes, self._flushes = list(self._flushes), set()
                hooks, self._close_hooks = self._close_hooks, []
            for f in flushes:
                if not f.done.is_set():
                    f.failed = True
                    f.done.set()
            for hook in hooks:
                try:
                    hook()
                except Exception:
                    self.logger.exception("statesync connection %d: close hook failed", self.id)
            if self._release is not None:
                self._release()
            self._done.set()

    def _read_loop(self) -> None:
        peer = self._peer
        for kind, value in peer_events(self._socket_reader, peer):
            if kind != OP_TEXT or peer.closing:  # (closing: since a message read with this one)
                if kind == SEND:  # a pong
                    self._queue.put(value)  # not worth waiting for room
                elif kind == CLOSE:
                    self._start_close(value.answer, value.reason)
                    return
                elif kind == FAIL:
                    self._fail(value.close_code, value.reason)
                elif kind == OP_BINARY:
                    self._fail(CloseCode.UNSUPPORTED_DATA, "binary messages are not supported")
                continue  # (OP_PONG: nothing to do; and _fail is a no-op once closing)
            try:
                self._handle(protocol.decode(value))
            except ProtocolError as exc:
                self._fail(exc.close_code, exc.reason)
            except ConnectionClosed:
                pass  # a reply could not be queued: closing already
        # the stream ended: without our close frame first, the peer went away
        self._peer_gone = self._peer_gone or not self.closed

    def _handle(self, msg: protocol.Message) -> None:
        if msg.type == protocol.DATA:
            self._remote = protocol.apply(self._remote, msg.payload)
            for handle in self._callbacks:
                try:
                    handle._cb()
                except Exception:
                    self.logger.exception("statesync connection %d: change callback %r failed", self.id, handle._cb)
        elif msg.type == protocol.MESSAGE:
            for fn in self._filters:
                if fn(msg.payload):
                    return
            self._inbox.put(msg.payload)
        elif msg.type == protocol.PING:
            self._put(self._frame(protocol.encode(protocol.PONG, {})))
        else:  # PONG
            self._answered()

    # -- writing --

    def _frame(self, data: bytes) -> bytes:
        return encode_frame(OP_TEXT, data, self._mask(4) if self._mask else None)

    def _put(self, item: Any) -> None:
        """Queue ``item`` for the writer, waiting up to ``write_timeout`` for room; a peer that
        leaves the queue full that long is closed (1008). :class:`ConnectionClosed` if the
        item cannot be queued."""
        if self._queue.put(item, self.settings.write_timeout):
            return
        if not self.closed:
            self._fail(CloseCode.POLICY_VIOLATION, "peer too slow: write queue full")
        raise self._closed_error()

    def _autoflush_due(self) -> None:
        """On the timer thread, when the autoflush delay ends (or the wait for a PONG does):
        the DATA goes out now, unless flow control holds it (see :meth:`_answered`)."""
        with self._data_lock:
            if self._unanswered and not self.closed:
                until = self._probe_at + self.settings.flow_timeout
                if time.monotonic() < until:
                    self._held = True
                    self._autoflush = self._timer.call_at(until, self._autoflush_due)
                    return
            self._held = False
        self._flush_due()

    def _answered(self) -> None:
        """A PONG (reader thread): the peer handled what came before our PING. A held DATA
        goes now: one patch, from what the peer had to the newest data, when it is ready for
        it, instead of a backlog of stale ones piling up in the buffers ahead of it."""
        with self._data_lock:
            if self._unanswered:
                self._unanswered -= 1
                self._lagging = time.monotonic() - self._probe_at > (self.autoflush_delay or 0.0)
            if self._unanswered or not self._held:
                return
            self._held = False
            if self._autoflush is not None:
                self._autoflush.cancel()  # the flow_timeout; not None: no new delay meanwhile
        self._flush_due()

    def _flush_due(self) -> None:
        """Send the autoflush DATA, never waiting. With the socket free (nothing queued,
        nobody writing) from this thread (the timer's; the reader's on a PONG), the rest of
        what the socket does not take left to the writer: so one thread sends a change to all
        the connections due at once, without waking a writer per connection (at 500, those
        GIL hand-overs were most of the server's CPU). Else the writer sends it after what is
        queued; at most one marker is queued at a time."""
        if self._queue.claim():
            try:
                self._flush_now()
            finally:
                self._queue.release()
        else:
            self._queue.put_first(_AUTOFLUSH, last=True)

    def _probe(self) -> bytes:
        """The PING that follows an autoflush DATA, counted unanswered until its PONG: after
        every DATA to a peer that lags, else once in ``_PROBE_INTERVAL`` (a PONG costs the
        server a reader wake-up); ``b""`` when none is due."""
        with self._data_lock:
            now = time.monotonic()
            if not (self._lagging or self._unanswered or now - self._probe_at >= _PROBE_INTERVAL):
                return b""
            self._unanswered += 1
            self._probe_at = now
        return self._frame(_PING) if self._mask else _PING_FRAME

    def _flush_now(self) -> None:
        """Send what changed without waiting (with the socket claimed)."""
        try:
            frame = self._current_data_frame()
        except _NotJSON:  # logged by the PatchCache
            return
        except Exception:  # a bug in making a patch must not leave the peer out of sync
            self.logger.exception("statesync connection %d: cannot make a DATA patch", self.id)
            self._start_close(CloseCode.INTERNAL_ERROR, "internal error")
            return
        if frame is None:
            return
        if self.settings.flow_timeout:
            frame += self._probe()
        try:
            n = self._io.send_nowait(frame)
        except OSError as exc:
            self._write_failed(exc)
            return
        if n < len(frame):  # the rest of the frame (all of it on TLS), first in line for the writer
            self._queue.put_first(frame[n:] if n else frame)

    def _data_frame(self, data: Any) -> Optional[bytes]:
        """The DATA frame that brings the peer from the last data sent to ``data``; ``None``
        when nothing changed (the writer's). :class:`_NotJSON` when ``data`` is not JSON."""
        if data is self._synced:
            return None
        patch = self._patches.get(self._synced, data)
        if patch.error is not None:
            if isinstance(patch.error, (TypeError, ValueError)):
                raise _NotJSON(patch.error)
            raise patch.error  # a bug, raised on the thread that computed it: 1011 here too
        self._synced = data
        if patch.data is None:
            return None
        self.data_sent += 1
        return self._frame(patch.data) if self._mask else patch.data

    def _current_data_frame(self) -> Optional[bytes]:
        with self._data_lock:
            if self._autoflush is not None:
                self._autoflush.cancel()
                self._autoflush = None
            self._held = False
            data = self._local
        return self._data_frame(data)

    def _write_loop(self) -> None:
        out: list[bytes] = []
        flushes: list[_Flush] = []
        while True:
            try:
                closing = self._frames_of(self._queue.get_batch(_WRITE_BATCH), out, flushes)
            except Exception:  # a bug in making a patch must not leave the peer out of sync
                self.logger.exception("statesync connection %d: cannot make a DATA patch", self.id)
                self._start_close(CloseCode.INTERNAL_ERROR, "internal error")
                closing = True
            if closing and not self._peer_gone:
                out.append(self._peer.close_frame(self.close_code or CloseCode.NORMAL_CLOSURE, self.close_reason))
            sent = not out or self._send(b"".join(out))
            out.clear()
            for f in flushes:
                f.failed = not sent
                f.done.set()
            flushes.clear()
            if closing or not sent:
                return
            self._queue.release()

    def _frames_of(self, items: list[Any], out: list[bytes], flushes: list[_Flush]) -> bool:
        """The frames of a batch of queued items, onto ``out`` (the writer's); whether the
        batch ends with the close."""
        for item in items:
            if item is _CLOSE:
                return True
            if isinstance(item, bytes):
                out.append(item)
                continue
            if isinstance(item, _Flush):
                flushes.append(item)
            try:  # a _Snapshot, or what changed since the last DATA (_AUTOFLUSH, a _Flush)
                frame = self._data_frame(item.data) if isinstance(item, _Snapshot) else self._current_data_frame()
            except _NotJSON as exc:  # logged by the PatchCache, once for all connections
                if isinstance(item, _Flush):
                    item.error = exc.error
                continue
            if frame is not None:
                out.append(frame)
                if item is _AUTOFLUSH and self.settings.flow_timeout and not self.closed:
                    out.append(self._probe())  # (not after the DATA close() sends)
        return False

    def _send(self, data: bytes) -> bool:
        try:
            self._io.sendall(data)
            return True
        except TimeoutError:
            if not self.closed:
                self._peer_gone = True
                self._fail(CloseCode.POLICY_VIOLATION, f"peer too slow: a write took over {self.settings.write_timeout:g} s")
        except OSError as exc:
            self._write_failed(exc)
            return False
        self._io.shutdown()
        return False

    def _write_failed(self, exc: OSError) -> None:
        if not self.closed:
            self.logger.info("statesync connection %d: write failed: %s", self.id, exc)
            self._peer_gone = True
            self._start_close(CloseCode.ABNORMAL_CLOSURE, "write failed")
        self._io.shutdown()


def run_inside(conn: Connection, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` marked as the connection's own code: a ``conn.close()`` in it only
    starts closing instead of waiting for the connection to end (which may wait for it)."""
    _local.inside = conn
    try:
        return fn(*args)
    finally:
        _local.inside = None
