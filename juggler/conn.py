"""One websocket connection to a juggler server, and its threads.

A :class:`Conn` runs on at most three threads, all named ``juggler-conn-<id>-<role>``:

- the reader (the server's thread for the TCP connection): hands the bytes it reads to the
  connection's :class:`~juggler.peer.Peer` (frames, pings, the close handshake), decodes the
  requests and runs them through the server's handler; it owns the connection and, when it ends, stops and
  joins the others and gives back the redis resources;
- the writer: drains a bounded queue of outgoing messages onto the socket, as many as are
  waiting in one write. A message sent while nothing waits and nobody writes is written by the
  thread that sends it (an ACK by the reader, a RES by the results thread), so the writer only
  wakes for a backlog. The results thread keeps what it sends until it is about to wait for
  redis (:meth:`Conn._flush_batch`): an ACK and the RES of a result redis gave with it go out
  in one write;
- the results thread, started by the first CALL (never for a connection that does not CALL):
  ``BRPOP`` with no timeout on the connection's results list, on a redis connection of its own.
  When redis fails it, it reports to the server's :class:`~juggler.health.RedisHealth`, takes
  its turn in the backoff that all of the server's listeners share, and connects again: the
  websocket stays open (its calls stored and unanswered get their NACK). On a Redis Cluster it
  first finds its key's node again (a failover, a ``MOVED`` reply: see
  :meth:`~juggler.broker.RedisBroker.follow_slot`), and takes turns in that node's backoff.
  Its code, and the count of the connection's calls in flight, are :mod:`juggler.conn_calls`.

Pub-sub has no thread per connection: the server's :class:`~juggler.pubsub.PubSubHub` reads
redis once and hands each event to the subscribed connections (:meth:`Conn.deliver`), which
write it without waiting, queueing for the writer only what the socket does not take.

Nothing polls. Each thread sleeps in a blocking call with no timeout and is woken by an event:
bytes or the end of the stream (reader), a message or the close marker in the queue (writer),
a result or a wake-up marker pushed onto the results list (results). Keepalive pings, the idle
timeout and the close deadline are entries in the server's :class:`~juggler.timer.Timer`.

Whoever closes a connection (the peer, a protocol error, the server's shutdown) calls
:meth:`Conn.close`; the reader notices and tears everything down.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from .broker import Broker, PubSubEvent
from .conn_calls import ConnCalls
from .exceptions import BrokerError, ProtocolError
from .health import RedisHealth
from .history import Held, History
from .message import CLIENT_TYPES, SERVER_TYPES, EventPayload, Message, MessageType, decode, new_uuid
from .pubsub import PubSubHub, SubKey
from .timer import Keepalive, Timer, TimerHandle
from .frames import OP_PING, OP_TEXT, CloseCode, encode_frame
from .handshake import HandshakeRequest
from .listener import helper_thread, start_thread
from .middleware import HandlerSlot
from .settings import ConnSettings
from .replies import reply_frame
from .peer import CLOSE, FAIL, OP_BINARY, SEND, Peer
from .transport import SocketIO, SocketReader, WriteQueue, peer_events

__all__ = ["Conn", "ConnSettings", "ConnServices"]

_CLOSE = object()  # writer queue marker: send the close frame and stop
# the server's counter of each message type read and written (Enum.name is slow on a hot path)
_READ_KEY = {t: f"read_{t.name}" for t in MessageType}
_WRITE_KEY = {t: f"write_{t.name}" for t in MessageType}
_local = threading.local()  # .nonblocking: this thread's writes must not wait (the hub's)
_WRITE_BATCH = 64  # messages the writer takes off its queue for one socket write, at most


@dataclass(frozen=True)
class ConnServices:
    """What a connection uses of its server, handed over instead of the server itself."""

    settings: ConnSettings
    broker: Broker
    pubsub_broker: Broker
    hub: PubSubHub
    timer: Timer
    #: the server's view of its (RPC) redis: the results listeners report to it and take their
    #: reconnect turns from it; a CALL is NACKed at once while it says redis is down
    health: RedisHealth
    #: ``listener_health(results_broker)``: the one a results listener reports to: ``health``,
    #: or on a Redis Cluster the server's view of the listener's node
    listener_health: Callable[[Broker], RedisHealth]
    #: ``handler(conn, msg)``: what runs each message read or sent (see juggler.middleware);
    #: while its ``writes_as_sent``, a message to send is written without it
    handler: HandlerSlot
    #: ``encode(conn, msg)``: the bytes to write for ``msg``, or ``None`` to drop it
    encode: Callable[["Conn", Message], Optional[bytes]]
    #: ``event_write_limit()``: the largest EVNT to write straight from an event's shared frame
    #: (``PubSubEvent.evnt_frame``), or ``None`` when each EVNT must go through the handler
    #: and ``encode`` as a message (a custom handler or encoder)
    event_write_limit: Callable[[], Optional[int]]
    #: ``incr(name, n=1)``: the server's counters
    incr: Callable[..., None]
    #: ``observe_call_ack(seconds)``, ``observe_result_delivery(seconds)``: latency metrics
    observe_call_ack: Callable[[float], None]
    observe_result_delivery: Callable[[float], None]
    #: called on the reader thread once the connection is over and its resources released
    on_closed: Callable[["Conn"], None]
    logger: logging.Logger
    #: the write limit when the server's own ``encode`` is the encoder: then ACK, NACK and RES
    #: frames are built directly (:func:`~juggler.replies.reply_frame`, the same bytes);
    #: ``None``: every message goes through ``encode``
    reply_limit: Optional[int] = None


class _Slot:
    """A place in the write queue kept by a thread inside :meth:`Conn.ordered`: the writer
    waits there until the thread is done, then writes what it wrote meanwhile."""

    __slots__ = ("owner", "msgs", "done")

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self.msgs: list[Message] = []
        self.done = threading.Event()


class Conn(ConnCalls):
    """A juggler connection on a :class:`~juggler.server.Server`.

    Attributes a handler may read: ``uuid`` (also the key of its results list),
    ``remote_addr``, ``request`` (the handshake's :class:`~juggler.handshake.HandshakeRequest`,
    headers lower-cased), ``allowed`` (the message types it may send), ``broker`` and
    ``pubsub_broker`` (the server's), ``settings`` (a :class:`ConnSettings`) and ``state``, a
    dict the application may use freely. After close, ``close_code`` and ``close_reason`` say
    why.
    """

    # Slots, not a dict: an idle connection is mostly this object. (Its base keeps a __dict__,
    # so an application may still set attributes of its own.)
    __slots__ = (
        "id", "uuid", "remote_addr", "request", "allowed", "state", "close_code", "close_reason", "settings",
        "broker", "pubsub_broker", "logger", "ack_lock", "_svc", "_io", "_socket_reader", "_peer", "_queue",
        "_close_lock", "_closing_since", "_peer_gone", "_writer", "_holder", "_slot", "_out", "_out_msgs",
        "_keepalive", "_close_deadline", "_held", "_held_lock",
        # (juggler.conn_calls)
        "_calls", "_calls_next_deadline", "_calls_count_at", "_results", "_results_thread", "_results_stop",
        "_results_stopping", "_health", "_listener_health", "_fail_fast", "_ahead", "_store_watch", "_watch_lock",
        "_read_at", "_ack_deferred", "_batcher", "_batch",
    )  # fmt: skip
    _ids = 0
    _ids_lock = threading.Lock()

    def __init__(
        self,
        services: ConnServices,
        io: SocketIO,
        remote_addr: Any,
        request: HandshakeRequest,
        allowed: frozenset[MessageType],
        reader: SocketReader,
    ) -> None:
        with Conn._ids_lock:
            Conn._ids += 1
            self.id = Conn._ids
        self.uuid = new_uuid()
        self.remote_addr = remote_addr
        self.request = request
        self.allowed = allowed
        self.state: dict[str, Any] = {}
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self.settings = services.settings
        self.broker = services.broker
        self.pubsub_broker = services.pubsub_broker
        self.logger = services.logger

        self._svc = services
        self._io = io
        self._socket_reader = reader
        self._peer = Peer(limit=self.settings.read_limit)  # the websocket protocol, fed by the reader
        self._queue = WriteQueue(self.settings.write_queue_size)
        self._close_lock = threading.Lock()
        # Held from storing a CALL until its ACK is queued, and while queueing a RES: so a
        # CALL's ACK is always written before its RES, however fast the callee. (A call stored
        # through the results listener needs none: that thread sends both, in redis' order.)
        self.ack_lock = threading.Lock()
        self._closing_since: Optional[float] = None
        self._peer_gone = False
        self._writer: Optional[threading.Thread] = None
        self._holder: Optional[int] = None  # the thread inside ordered(), holding the socket
        self._slot: Optional[_Slot] = None  # or keeping a place in the queue
        self._out: list[bytes] = []  # the batch of frames of the thread holding the socket's claim
        self._out_msgs: list[Message] = []  # the messages among them, counted once written
        self._keepalive: Optional[Keepalive] = None
        self._close_deadline: Optional[TimerHandle] = None
        self._init_calls(services)
        self._held: Optional[dict[SubKey, Held]] = None  # subscriptions recovering history
        self._held_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Conn {self.id} {self.uuid} {self.remote_addr}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the connection may still be finishing)."""
        return self._closing_since is not None

    # -- sending --

    def send(self, msg: Message) -> None:
        """Send ``msg`` to the client through the server's handler (which, by default, writes
        it: :func:`~juggler.process_msg`; while the handler does nothing else with an ACK,
        NACK, RES or EVNT, it is written without calling the handler)."""
        if self._svc.handler.writes_as_sent and msg.type in SERVER_TYPES:
            try:
                self.write(msg)
            except Exception as exc:
                self._handler_failed(msg, exc)
            return
        self._flush_batch()  # (on the results thread: what it kept goes ahead of the handler's doings)
        self.handle(msg)

    def handle(self, msg: Message) -> None:
        """Run ``msg`` (read or to send) through the server's handler. An exception closes
        this connection only, with 1011, and is logged once."""
        try:
            self._svc.handler.handler(self, msg)
        except Exception as exc:
            self._handler_failed(msg, exc)

    def _handler_failed(self, msg: Message, exc: Exception) -> None:
        """An exception of the handler (or of the write of a message to send): it closes this
        connection only, with 1011, and is logged once."""
        if isinstance(exc, RecursionError) and msg.type in CLIENT_TYPES:
            # JSON that decodes just under the recursion limit cannot be encoded again to
            # store or publish it: the peer's message, refused as decode refuses deeper ones.
            self._fail(CloseCode.INVALID_DATA, "message nested too deeply")
            return
        if not self.closed:
            self.logger.exception("connection %s: error handling %s %s", self.uuid, msg.type.name, msg.uuid)
        self.close(CloseCode.INTERNAL_ERROR, "internal server error")

    def write(self, msg: Message) -> bool:
        """Write ``msg`` to the client, bypassing the handler; ``False`` if the connection is
        closing.

        It is written by the calling thread when nothing waits and nobody writes (sparing the
        writer thread a wake-up), else queued for the writer. When the queue stays full for
        the server's ``write_timeout`` (a client that does not read), the connection is closed
        with 1008 and the message dropped. On the server's pub-sub thread nothing waits: the
        write is non-blocking, and a full queue closes the connection at once.
        """
        if self._closing_since is not None:  # (self.closed)
            return False
        me = threading.get_ident()
        if me == self._holder:  # inside ordered(): this thread holds the socket
            self._write_now(msg)
            return True
        slot = self._slot
        if slot is not None and slot.owner == me:  # inside ordered(): its place in the queue
            slot.msgs.append(msg)
            return True
        if me == self._batcher:  # the results thread: written before it waits for redis
            if self._svc.handler.writes_as_sent:
                self._batch.append(msg)  # type: ignore[union-attr]
                return True
            self._flush_batch()  # (a handler that does more: nothing kept, in order)
        return self._write_msgs((msg,), getattr(_local, "nonblocking", False))

    def _write_msgs(self, msgs: Sequence[Message], nonblocking: bool = False) -> bool:
        """Write ``msgs``, in order: by this thread, in one socket write, when nothing waits
        and nobody writes, else queued for the writer (see :meth:`write`)."""
        if self._queue.claim():
            try:
                if len(msgs) == 1:
                    self._write_now(msgs[0], nonblocking)
                else:
                    self._send_joined(msgs)
            finally:
                self._queue.release()
            return True
        timeout = 0 if nonblocking else self.settings.write_timeout
        for msg in msgs:
            if not self._queue.put(msg, timeout):
                # a client that does not read has lost what is queued: the close frame goes first
                self._fail(CloseCode.POLICY_VIOLATION, "client too slow: write queue full", discard=True)
                return False
        return True

    def _send_joined(self, msgs: Sequence[Message]) -> None:
        """(With the socket claimed.) The frames of ``msgs`` in one write, gathered as the
        writer gathers its batch (the claim makes this thread the only one using it)."""
        try:
            for msg in msgs:
                self._encode_into_batch(msg)
        except BaseException:  # (an encoder's bug: nothing of it left for the writer to send)
            self._out.clear()
            self._out_msgs.clear()
            raise
        self._send_out()

    def _flush_batch(self) -> None:
        """Write what the results thread sent since it last waited for redis (an ACK, the RES
        of a result that came with it), in one socket write when the socket is free. The
        results thread calls it before each wait (its broker's ``before_wait``), when it
        enters :meth:`ordered`, when its broker gives up a connection (the NACKs of the calls
        it had stored), before it waits for the ACK lock, and as it ends: so what it sends keeps
        its order, and waits only for the thread's work at hand, never for redis or another
        thread. (Only that thread's call writes: from any other, it does nothing.)"""
        msgs = self._batch
        if msgs and threading.get_ident() == self._batcher:
            self._batch = []
            try:
                self._write_msgs(msgs)
            except Exception as exc:  # (a server's encode that raises: as send() has it)
                self._handler_failed(msgs[0], exc)

    @contextlib.contextmanager
    def ordered(self) -> Iterator[None]:
        """Within this block, what the calling thread writes keeps its place ahead of what
        other threads write meanwhile: ``process_msg`` publishes a PUB inside it, so the PUB's
        ACK precedes the EVNT it causes on the same connection. The thread holds the socket
        for the block (others queue behind it), or, when it is busy, a place in the queue."""
        me = threading.get_ident()
        if me == self._holder or (self._slot is not None and self._slot.owner == me):
            yield  # nested
            return
        if me == self._batcher:
            self._flush_batch()  # (what the results thread sent before stays ahead)
        if self._queue.claim():
            self._holder = me
            try:
                yield
            finally:
                self._holder = None
                self._queue.release()
            return
        slot = _Slot(me)
        if not self._queue.put_first(slot, last=True):  # closed: nothing will be written
            yield
            return
        self._slot = slot
        try:
            yield
        finally:
            self._slot = None
            slot.done.set()

    # -- pub-sub (the server's hub calls these) --

    def subscribe(self, channel: str, pattern: bool) -> None:
        """Subscribe this connection; returns once redis confirmed it (:class:`BrokerError`
        if not)."""
        self._svc.hub.subscribe(self, channel, pattern)

    def unsubscribe(self, channel: str, pattern: bool) -> None:
        """Unsubscribe this connection; no event of the subscription follows."""
        self._svc.hub.unsubscribe(self, channel, pattern)

    def publish(self, channel: str, payload: EventPayload) -> None:
        """Publish an event through the server's hub (:class:`BrokerError` at once while redis
        is known to be down)."""
        self._svc.hub.publish(channel, payload)

    def subscriptions(self) -> set[SubKey]:
        """This connection's subscriptions, as ``(pattern, channel)`` pairs."""
        return self._svc.hub.subscriptions(self)

    def subscription_count(self) -> int:
        """How many subscriptions this connection holds."""
        return self._svc.hub.count(self)

    @property
    def history(self) -> Optional[History]:
        """The channels whose events the server keeps for recovery (:mod:`juggler.history`)."""
        return self._svc.hub.history

    def hold_events(self, key: SubKey, held: Held) -> None:
        """(The reader, recovering a subscription's history.) Its live events go through
        ``held`` until one passes it (:attr:`~juggler.history.Held.passed`)."""
        with self._held_lock:
            self._held = {**(self._held or {}), key: held}

    def release_events(self, key: SubKey, held: Held) -> None:
        with self._held_lock:
            if self._held is not None and self._held.get(key) is held:
                self._held = {k: v for k, v in self._held.items() if k != key} or None

    def deliver(self, key: SubKey, event: PubSubEvent) -> None:
        """Send an event (on the server's pub-sub thread), through the handler, without
        blocking: written at once when the socket takes it, else queued for the writer; a
        connection whose queue is full is closed (1008) rather than delaying the others."""
        if self.closed:
            return
        held = self._held
        if held is not None and key in held:
            h = held[key]
            if h.hold(event):
                return
            if h.passed:
                self.release_events(key, h)
        limit = self._svc.event_write_limit()
        if limit is not None:
            # The handler would only write it: write the event's frame, made once for all
            # subscribers, with this message's UUID, when the socket is free (else queue it
            # as a message, below, behind what waits).
            head, tail, size = event.evnt_frame
            sent = self._send_if_free(head + new_uuid().encode("ascii") + tail) if size <= limit else None
            if sent is not None:
                if sent:
                    self._svc.incr(_WRITE_KEY[MessageType.EVNT])
                return
        _local.nonblocking = True
        try:
            self.handle(event.evnt().sharing(event.evnt_payload))
        finally:
            _local.nonblocking = False

    # -- closing --

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> bool:
        """Start closing: the close frame goes out after what is queued (the writer drains it,
        however full the queue), and the connection ends when the peer answers or
        ``close_timeout`` passes. Idempotent: only the first call counts, and returns
        ``True``."""
        return self._close(code, reason)

    def _close(self, code: int, reason: str, discard: bool = False) -> bool:
        if not discard:
            self._flush_batch()  # (closed by the results thread: what it kept goes before the close frame)
        with self._close_lock:
            if self._closing_since is not None:
                return False
            self._closing_since = time.monotonic()
            self.close_code = code
            self.close_reason = reason
            self._peer.closing = True  # from now on, what the peer sends is dropped
        self._queue.close(_CLOSE, discard)
        # Past the deadline, shut the socket down: it wakes a reader still waiting for the
        # peer's close frame and a writer stuck on a peer that does not read.
        self._close_deadline = self._svc.timer.call_later(self.settings.close_timeout, self._io.shutdown)
        return True

    def _fail(self, code: int, reason: str, discard: bool = False) -> None:
        """Close because of the peer's or the broker's fault; logged once, here."""
        if self._close(code, reason, discard):
            self.logger.info("closed connection %s from %s: %d %s", self.uuid, self.remote_addr, code, reason)

    def helper_thread_count(self) -> int:
        """This connection's live writer and results threads."""
        return sum(t is not None and t.is_alive() for t in (self._writer, self._results_thread))

    def release(self) -> None:
        """Give back the connection's redis resources (its results connection, its
        subscriptions). Never raises: a failure is logged."""
        try:
            self._svc.hub.drop(self)
        except Exception:
            self.logger.exception("connection %s: could not drop its subscriptions", self.uuid)
        if self._results is not None:
            try:
                self._results.close()
            except Exception:
                self.logger.exception("connection %s: could not close its results redis connection", self.uuid)

    # -- threads --

    def start(self) -> None:
        """Start the writer and the keepalive (once the handshake's 101 went out); :meth:`run`
        must follow."""
        if self._writer is None:
            # (a daemon thread, as juggler.conn_calls.CONN_THREAD_DAEMON says why; joined by _teardown)
            t = helper_thread(self._write_loop, f"juggler-conn-{self.id}-writer")
            start_thread(t)
            self._writer = t  # only once started: teardown joins what runs
            s = self.settings
            self._keepalive = Keepalive(self._svc.timer, self._socket_reader, s.ping_interval, s.idle_timeout,
                                        ping=self._ping, idle=self._idle_timeout, closed=self._is_closed).start()  # fmt: skip

    # (the keepalive's callbacks: bound methods cost an idle connection less than closures)
    def _ping(self) -> None:
        self._queue_frame(self._peer.frame(OP_PING, b"juggler"))

    def _idle_timeout(self, reason: str) -> None:
        self._fail(CloseCode.GOING_AWAY, reason)

    def _is_closed(self) -> bool:
        return self._closing_since is not None

    def run(self) -> None:
        """Serve the connection on the calling (reader) thread until it closes."""
        try:
            self.start()
            self._read_loop()
        finally:
            self._teardown()

    def _teardown(self) -> None:
        if not self.closed:
            self._peer_gone = True
            self.close(CloseCode.ABNORMAL_CLOSURE, "connection lost")
        try:
            if self._keepalive is not None:
                self._keepalive.cancel()
            writer = self._writer
            if writer is not None:
                writer.join(self.settings.close_timeout)
                if writer.is_alive():  # stuck writing to a peer that does not read: cut it off
                    self._io.shutdown()
                writer.join()
            self._stop_results()
        finally:
            try:
                self.release()
                if self._results is not None and self._listener_health.up:  # (down: its results expire)
                    self.broker.discard_results(self.uuid)
            except BrokerError as exc:
                self.logger.warning("connection %s: could not delete its result list: %s", self.uuid, exc)
            finally:
                if self._close_deadline is not None:
                    self._close_deadline.cancel()
                with self._watch_lock:
                    if self._store_watch is not None:
                        self._store_watch.cancel()
                self._svc.on_closed(self)

    def _read_loop(self) -> None:
        svc = self._svc
        slow = self.settings.slow_threshold
        peer = self._peer
        for kind, value in peer_events(self._socket_reader, peer):
            if kind != OP_TEXT or peer.closing:  # (closing: since a message read with this one)
                if kind == SEND:  # a pong
                    self._queue_frame(value)
                elif kind == CLOSE:
                    self.close(value.answer, value.reason)
                    return
                elif kind == FAIL:
                    self._fail(value.close_code, value.reason)
                elif kind == OP_BINARY:
                    self._fail(CloseCode.UNSUPPORTED_DATA, "binary messages are not supported")
                continue  # (OP_PONG: nothing to do; and _fail, close are no-ops once closing)
            try:
                msg = decode(value, CLIENT_TYPES)
                if msg.type not in self.allowed:
                    raise ProtocolError(f"{msg.type.name} is not allowed on this connection", CloseCode.POLICY_VIOLATION)
            except ProtocolError as exc:
                self._fail(exc.close_code, exc.reason)
                continue
            except Exception:  # a decoder bug must not kill the reader
                self.logger.exception("connection %s: could not decode a message", self.uuid)
                self._fail(CloseCode.INVALID_DATA, "invalid message")
                continue
            svc.incr(_READ_KEY[msg.type])
            self._read_at = started = time.monotonic()
            self.handle(msg)
            took = time.monotonic() - started
            if msg.type is MessageType.CALL:
                if self._ack_deferred:  # observed when its ACK (or NACK) goes
                    self._ack_deferred = False
                else:
                    svc.observe_call_ack(took)
            if took > slow:
                svc.incr("slow_messages")
                self.logger.debug("connection %s: %s %s took %.3f s", self.uuid, msg.type.name, msg.uuid, took)
        # the stream ended: without our close frame first, the peer went away
        self._peer_gone = self._peer_gone or not self.closed

    def _queue_frame(self, frame: bytes) -> None:
        """A ping or a pong: written at once if the socket is free and takes it, else queued
        (not worth waiting for room)."""
        if self._send_if_free(frame) is None:
            self._queue.put(frame)

    def _send_if_free(self, frame: bytes) -> Optional[bool]:
        """Write ``frame`` without waiting if nothing is queued and nobody writes (what the
        socket does not take goes first in the queue): whether the connection is still up;
        ``None`` if the socket was not free (nothing done)."""
        if not self._queue.claim():
            return None
        try:
            return self._send_nowait(frame)
        finally:
            self._queue.release()

    # -- the writer --

    def _frame(self, msg: Message) -> Optional[bytes]:
        """The text frame of ``msg``; ``None`` to drop it (the server's encode says so, or it
        cannot be encoded: logged, and the connection goes on)."""
        svc = self._svc
        try:
            if svc.reply_limit is not None:
                frame = reply_frame(msg, svc.reply_limit)
                if frame is not None:
                    return frame
            data = svc.encode(self, msg)
        except (TypeError, ValueError) as exc:
            self.logger.error("connection %s: cannot encode %r: %s", self.uuid, msg, exc)
            return None
        return None if data is None else encode_frame(OP_TEXT, data)

    def _encode_into_batch(self, msg: Message) -> None:
        frame = self._frame(msg)
        if frame is not None:
            self._out.append(frame)
            self._out_msgs.append(msg)

    def _write_now(self, msg: Message, nonblocking: bool = False) -> None:
        """(With the socket claimed.) Frame ``msg`` and write it: all of it, or (``nonblocking``)
        what the socket takes now, the rest queued first for the writer."""
        frame = self._frame(msg)
        if frame is not None and (self._send_nowait(frame) if nonblocking else self._send(frame)):
            self._count_one(msg)

    # Every write to the socket is made by a thread that holds the WriteQueue's claim on it
    # (claim() or get_batch(), until release()): the only one writing, so without SocketIO's
    # write lock (its *_claimed methods).

    def _send_nowait(self, frame: bytes) -> bool:
        """Write what the socket takes now of ``frame`` (with the socket claimed); the rest
        goes first in the queue, for the writer. ``False`` if the connection failed."""
        try:
            n = self._io.send_nowait_claimed(frame)
        except OSError as exc:
            self._write_failed(exc)
            return False
        if n < len(frame):
            self._queue.put_first(frame[n:])
        return True

    def _send(self, data: bytes) -> bool:
        """Write ``data``; ``False`` if the connection failed."""
        try:
            self._io.sendall_claimed(data)
            return True
        except OSError as exc:
            self._write_failed(exc)
            return False

    def _write_failed(self, exc: OSError) -> None:
        """Close the connection (1006, logged once) and shut the socket down."""
        if not self.closed:
            self.logger.info("connection %s: write failed: %s", self.uuid, exc)
            self._peer_gone = True
            self.close(CloseCode.ABNORMAL_CLOSURE, "write failed")
        self._io.shutdown()

    def _write_loop(self) -> None:
        out = self._out
        while True:
            closing = False
            for item in self._queue.get_batch(_WRITE_BATCH):
                if item is _CLOSE:
                    closing = True
                    break
                if isinstance(item, bytes):
                    out.append(item)
                elif isinstance(item, _Slot):
                    item.done.wait()  # the sender is inside ordered(): its messages go here
                    for msg in item.msgs:
                        self._encode_into_batch(msg)
                else:
                    self._encode_into_batch(item)
            if closing and not self._peer_gone:
                out.append(self._peer.close_frame(self.close_code or CloseCode.NORMAL_CLOSURE, self.close_reason))
            if not self._send_out():
                return
            if closing:
                return
            self._queue.release()

    def _send_out(self) -> bool:
        """(With the socket claimed.) Write the frames gathered in ``_out`` in one write, and
        count their messages (``_out_msgs``); both left empty. ``False`` if the connection
        failed."""
        out, msgs = self._out, self._out_msgs
        if not out:
            return True
        sent = self._send(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        if sent:
            self._count_written(msgs)
        else:
            msgs.clear()
        return sent

    def _count_written(self, msgs: list[Message]) -> None:
        for msg in msgs:
            self._count_one(msg)
        msgs.clear()

    def _count_one(self, msg: Message) -> None:
        """Count a message that went out (and, for a RES, its delivery time)."""
        svc = self._svc
        svc.incr(_WRITE_KEY[msg.type])
        if msg.type is MessageType.RES:
            popped = msg.__dict__.get("_popped")
            if popped is not None:
                svc.observe_result_delivery(time.monotonic() - popped)
