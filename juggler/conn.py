"""One websocket connection to a juggler server, and its threads.

Each :class:`Conn` runs on four threads, all named ``juggler-conn-<id>-<role>``:

- the reader (the server's thread for the TCP connection): reads frames, decodes requests and
  runs them against the broker (:func:`process_msg`); it owns the connection and, when it ends,
  stops and joins the other three and releases the redis resources;
- the writer: drains a bounded queue of outgoing messages onto the socket;
- the results thread (only when CALL is allowed): BRPOP on the connection's results list;
- the pub-sub listener (only when SUB is allowed): reads the connection's redis pub-sub.

Whoever closes a connection (the peer, a protocol error, a redis failure, the server's
shutdown) calls :meth:`Conn.close`; the reader notices and tears everything down.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from .broker import BrokerError
from .exceptions import ProtocolError
from .message import (
    CLIENT_TYPES,
    SERVER_TYPES,
    Ack,
    Call,
    CallPayload,
    EventPayload,
    Evnt,
    Message,
    MessageType,
    Nack,
    Pub,
    Request,
    Res,
    Sub,
    Unsb,
    decode,
    effective_timeout,
    encode,
)
from .wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    HandshakeRequest,
    SocketIO,
    SocketReader,
    Stopped,
    encode_close,
    encode_frame,
    parse_close,
)

if TYPE_CHECKING:  # pragma: no cover
    from .server import Server

__all__ = ["Conn", "process_msg"]

# Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_INTERNAL_ERROR = 1011

_CLOSE = object()  # writer queue sentinel: send the close frame and stop


class Conn:
    """A juggler connection on a :class:`~juggler.server.Server`.

    Attributes a handler may read: ``uuid`` (also the key of its results list),
    ``remote_addr``, ``request`` (the handshake's :class:`~juggler.wsframes.HandshakeRequest`,
    headers lower-cased), ``allowed`` (the message types it may send) and ``state``, a dict the
    application may use freely. After close, ``close_code`` and ``close_reason`` say why.
    """

    _ids = 0
    _ids_lock = threading.Lock()

    def __init__(
        self,
        server: "Server",
        io: SocketIO,
        remote_addr: Any,
        request: HandshakeRequest,
        allowed: frozenset[MessageType],
        reader: SocketReader,
    ) -> None:
        from .message import new_uuid

        with Conn._ids_lock:
            Conn._ids += 1
            self.id = Conn._ids
        self.uuid = new_uuid()
        self.server = server
        self.remote_addr = remote_addr
        self.request = request
        self.allowed = allowed
        self.state: dict[str, Any] = {}
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self.logger = server.logger

        self._io = io
        self._socket_reader = reader
        self._frames = FrameReader(reader, server.read_limit)
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=server.write_queue_size)
        self._close_lock = threading.Lock()
        # Held from storing a CALL until its ACK is queued, and while queueing a RES: so a
        # CALL's ACK is always written before its RES, however fast the callee.
        self.ack_lock = threading.Lock()
        self._closing_since: Optional[float] = None
        self._pinged_at = 0.0
        self._res_popped: dict[str, float] = {}  # RES uuid -> when its result left redis
        self._close_frame_sent = False
        self._peer_gone = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Blocking redis reads hold their connection: each listener gets one of its own.
        self._results = server.broker.dedicated() if MessageType.CALL in allowed else None
        # A pub-sub thread blocked on a full write queue cannot read confirmations: wait longer.
        confirm = server.write_timeout + server.redis_poll + 1.0
        self._pubsub = server.pubsub_broker.pubsub(confirm) if MessageType.SUB in allowed else None

    def __repr__(self) -> str:
        return f"<Conn {self.id} {self.uuid} {self.remote_addr}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the connection may still be finishing)."""
        return self._closing_since is not None

    # -- sending --

    def send(self, msg: Message) -> None:
        """Send ``msg`` to the client through the server's handler (which, by default, writes
        it: :func:`process_msg`)."""
        self.handle(msg)

    def handle(self, msg: Message) -> None:
        """Run ``msg`` (read or to send) through the server's handler. An exception closes
        this connection only, with 1011, and is logged once."""
        try:
            self.server.handler(self, msg)
        except Exception as exc:
            if isinstance(exc, RecursionError) and msg.type in CLIENT_TYPES:
                # JSON that decodes just under the recursion limit cannot be encoded again to
                # store or publish it: the peer's message, refused as decode refuses deeper ones.
                self._fail(CLOSE_INVALID_DATA, "message nested too deeply")
                return
            if not self.closed:
                self.logger.exception("connection %s: error handling %s %s", self.uuid, msg.type.name, msg.uuid)
            self.close(CLOSE_INTERNAL_ERROR, "internal server error")

    def write(self, msg: Message) -> bool:
        """Queue ``msg`` for the writer thread, bypassing the handler; ``False`` if the
        connection is closing.

        When the queue stays full for the server's ``write_timeout`` (a client that does not
        read), the connection is closed with 1008 and the message dropped.
        """
        if self.closed:
            return False
        try:
            self._queue.put(msg, timeout=self.server.write_timeout)
            return True
        except queue.Full:
            self.close(CLOSE_POLICY, "client too slow: write queue full")
            return False

    def _write(self, data: bytes) -> None:
        self._io.sendall(data)

    # -- closing --

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> bool:
        """Start closing: the close frame goes out after what is queued. Idempotent: only the
        first call counts, and returns ``True``."""
        with self._close_lock:
            if self._closing_since is not None:
                return False
            self._closing_since = time.monotonic()
            self.close_code = code
            self.close_reason = reason
        self._stop.set()
        try:
            self._queue.put_nowait(_CLOSE)
        except queue.Full:
            # The client is not reading: what it has not taken is lost anyway. (If a sender
            # takes the freed slot first, the writer still sees the close when it polls.)
            self._drain_queue()
            try:
                self._queue.put_nowait(_CLOSE)
            except queue.Full:
                pass
        return True

    def _drain_queue(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _fail(self, code: int, reason: str) -> None:
        """Close because of the peer's or the broker's fault; logged once, here."""
        if self.close(code, reason):
            self.logger.info("closed connection %s from %s: %d %s", self.uuid, self.remote_addr, code, reason)

    def keep_reading(self) -> bool:
        """For the reader's poll (every ``poll_interval``): keepalive pings, the idle timeout,
        and no waiting for the peer's close frame past ``close_timeout``."""
        now = time.monotonic()
        since = self._closing_since
        if since is not None:
            return now - since < self.server.close_timeout
        idle = now - self._socket_reader.last_recv
        srv = self.server
        if srv.idle_timeout and idle >= srv.idle_timeout:
            self._fail(CLOSE_GOING_AWAY, f"idle timeout: nothing received for {srv.idle_timeout:g} s")
        elif srv.ping_interval and idle >= srv.ping_interval and self._pinged_at < self._socket_reader.last_recv:
            self._pinged_at = now
            self._queue_frame(encode_frame(OP_PING, b"juggler"))
        return True

    def helper_thread_count(self) -> int:
        """This connection's live writer, results and pub-sub threads."""
        return sum(t.is_alive() for t in self._threads)

    def release(self) -> None:
        """Close this connection's redis connections (its own results and pub-sub ones).
        Never raises: a failure to close one is logged and the other is still closed."""
        for what, resource in (("pub-sub", self._pubsub), ("results", self._results)):
            if resource is None:
                continue
            try:
                resource.close()
            except Exception:
                self.logger.exception("connection %s: could not close its %s redis connection", self.uuid, what)

    # -- threads --

    def _start(self, role: str, target: Any) -> None:
        t = threading.Thread(target=target, name=f"juggler-conn-{self.id}-{role}")
        t.start()
        self._threads.append(t)  # only once started: teardown joins what runs

    def run(self) -> None:
        """Serve the connection on the calling (reader) thread until it closes."""
        try:
            self._start("writer", self._write_loop)
            if MessageType.CALL in self.allowed:
                self._start("results", self._results_loop)
            if self._pubsub is not None:
                self._start("pubsub", self._pubsub_loop)
            self._read_loop()
        finally:
            self._teardown()

    def _teardown(self) -> None:
        if not self.closed:
            self._peer_gone = True
            self.close(CLOSE_ABNORMAL, "connection lost")
        self._stop.set()
        try:
            for t in self._threads:
                if t.name.endswith("-writer"):
                    t.join(self.server.close_timeout)
                    if t.is_alive():  # stuck writing to a peer that does not read: cut it off
                        self._shutdown_socket()
                t.join()
        finally:
            try:
                self.release()
                if self._results is not None:
                    self.server.broker.discard_results(self.uuid)
            except BrokerError as exc:
                self.logger.warning("connection %s: could not delete its result list: %s", self.uuid, exc)
            finally:
                self.server._conn_closed(self)

    def _shutdown_socket(self) -> None:
        self._io.shutdown()

    def _read_loop(self) -> None:
        while True:
            try:
                opcode, data = self._frames.read()
            except Stopped:
                self._peer_gone = self._peer_gone or not self.closed
                return
            except ProtocolError as exc:
                if self.closed:
                    return
                self._fail(exc.close_code, exc.reason)
                continue
            if opcode == OP_CLOSE:
                self._peer_closed(data)
                return
            if opcode == OP_PING:
                if not self.closed:
                    self._queue_frame(encode_frame(OP_PONG, data))
                continue
            if opcode == OP_PONG or self.closed:
                continue
            if opcode == OP_BINARY:
                self._fail(CLOSE_UNSUPPORTED_DATA, "binary messages are not supported")
                continue
            assert opcode == OP_TEXT
            try:
                msg = decode(data, CLIENT_TYPES)
                self._check_allowed(msg)
            except ProtocolError as exc:
                self._fail(exc.close_code, exc.reason)
                continue
            except Exception:  # a decoder bug must not kill the reader
                self.logger.exception("connection %s: could not decode a message", self.uuid)
                self._fail(CLOSE_INVALID_DATA, "invalid message")
                continue
            self.server.stats.incr(f"read_{msg.type.name}")
            started = time.monotonic()
            self.handle(msg)
            took = time.monotonic() - started
            if msg.type is MessageType.CALL:
                self.server.metrics.call_ack.observe(took)
            if took > self.server.slow_threshold:
                self.server.stats.incr("slow_messages")
                self.logger.debug("connection %s: %s %s took %.3f s", self.uuid, msg.type.name, msg.uuid, took)

    def _check_allowed(self, msg: Message) -> None:
        if msg.type not in self.allowed:
            raise ProtocolError(f"{msg.type.name} is not allowed on this connection", CLOSE_POLICY)

    def _peer_closed(self, data: bytes) -> None:
        try:
            code, reason = parse_close(data)
        except ProtocolError as exc:
            self._fail(exc.close_code, exc.reason)
            return
        # Echo the peer's code, as RFC 6455 suggests; 1005 (no code) is answered with 1000.
        self.close(CLOSE_NORMAL if code == 1005 else code, reason)

    def _queue_frame(self, frame: bytes) -> None:
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            pass  # a pong is not worth blocking the reader for

    def _write_loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.server.poll_interval)
            except queue.Empty:
                if not self.closed:
                    continue
                item = _CLOSE  # close() could not queue its marker: the queue was full
            try:
                if item is _CLOSE:
                    if not self._peer_gone:
                        self._write(encode_close(self.close_code or CLOSE_NORMAL, self.close_reason))
                    return
                if isinstance(item, bytes):
                    self._write(item)
                    continue
                data = self.server.encode(self, item)
                if data is None:
                    continue
                self._write(encode_frame(OP_TEXT, data))
                self.server.stats.incr(f"write_{item.type.name}")  # counted once it went out
                popped = self._res_popped.pop(item.uuid, None) if item.type is MessageType.RES else None
                if popped is not None:
                    self.server.metrics.result_delivery.observe(time.monotonic() - popped)
            except OSError as exc:
                if not self.closed:
                    self.logger.info("connection %s: write failed: %s", self.uuid, exc)
                    self._peer_gone = True
                    self.close(CLOSE_ABNORMAL, "write failed")
                self._shutdown_socket()
                return
            except (TypeError, ValueError) as exc:  # an unencodable message: drop it, keep going
                self.logger.error("connection %s: cannot encode %r: %s", self.uuid, item, exc)

    def _results_loop(self) -> None:
        broker = self._results
        assert broker is not None
        while not self._stop.is_set():
            try:
                popped = broker.pop_result(self.uuid, self.server.redis_poll)
            except Exception as exc:
                self._listener_failed("results", exc)
                return
            if popped is None:
                continue
            p = popped.payload
            if popped.expired:
                self.logger.debug("connection %s: dropping expired result for %s", self.uuid, p.msg_uuid)
                self.server.stats.incr("expired_results")
                continue
            res = Res(for_uuid=p.msg_uuid, uri=p.uri, args=p.args)
            self._res_popped[res.uuid] = time.monotonic()
            with self.ack_lock:
                self.send(res)
            if self.closed:
                self._res_popped.clear()

    def _pubsub_loop(self) -> None:
        assert self._pubsub is not None
        while not self._stop.is_set():
            try:
                ev = self._pubsub.get_event(self.server.redis_poll)
            except BrokerError as exc:
                self._listener_failed("pub-sub", exc)
                return
            except ValueError as exc:
                self.logger.warning("connection %s: dropping event: %s", self.uuid, exc)
                self.server.stats.incr("failed_event_decodes")
                continue
            except Exception as exc:
                self._listener_failed("pub-sub", exc)
                return
            if ev is not None:
                p = ev.payload
                self.send(Evnt(for_uuid=p.msg_uuid, channel=ev.channel, pattern=ev.pattern, args=p.args))

    def _listener_failed(self, role: str, exc: Exception) -> None:
        """A redis listener cannot go on: close the connection with 1011, logged once. (A
        connection without its listener could only let its calls expire.)"""
        if self._stop.is_set():
            return  # closing anyway: the error is the close
        if isinstance(exc, BrokerError):
            self.logger.error("connection %s: %s listener failed: %s", self.uuid, role, exc)
            self.close(CLOSE_INTERNAL_ERROR, f"{role} listener failed: redis unavailable")
        else:  # a bug
            self.logger.error("connection %s: %s listener crashed", self.uuid, role, exc_info=exc)
            self.close(CLOSE_INTERNAL_ERROR, f"{role} listener failed: internal error")

    # -- pub-sub for process_msg --

    def subscribe(self, channel: str, pattern: bool) -> None:
        assert self._pubsub is not None, "SUB is not allowed on this connection"
        self._pubsub.subscribe(channel, pattern)

    def unsubscribe(self, channel: str, pattern: bool) -> None:
        assert self._pubsub is not None, "UNSB needs SUB to be allowed on this connection"
        self._pubsub.unsubscribe(channel, pattern)


def process_msg(conn: Conn, msg: Message) -> None:
    """The standard handler: run a request (CALL, PUB, SUB, UNSB) against the broker and ACK or
    NACK it; write a message to send (ACK, NACK, RES, EVNT) to the connection."""
    if msg.type in SERVER_TYPES:
        conn.write(msg)
        return
    if isinstance(msg, Call):
        if not msg.uri:
            conn.send(Nack.to(msg, 400, "call has no uri"))
            return
        timeout = effective_timeout(msg.timeout)
        if timeout > conn.server.max_call_timeout:
            conn.send(Nack.to(msg, 400, f"timeout over the server's maximum of {conn.server.max_call_timeout:g} s"))
            return
        payload = CallPayload(conn.uuid, msg.uuid, msg.uri, msg.args)
        with conn.ack_lock:
            try:
                conn.server.broker.store_call(payload, timeout)
            except BrokerError as exc:
                _nack_broker(conn, msg, exc)
                return
            conn.send(Ack.to(msg))
        return
    if not msg.channel:
        conn.send(Nack.to(msg, 400, f"{msg.type.name} has no channel"))
        return
    try:
        if isinstance(msg, Pub):
            conn.server.pubsub_broker.publish(msg.channel, EventPayload(msg.uuid, msg.args))
        elif isinstance(msg, Sub):
            conn.subscribe(msg.channel, msg.pattern)
        elif isinstance(msg, Unsb):
            if MessageType.SUB not in conn.allowed:
                conn.send(Nack.to(msg, 400, "not subscribed: SUB is not allowed on this connection"))
                return
            conn.unsubscribe(msg.channel, msg.pattern)
        else:  # pragma: no cover - decode() only yields the four request types here
            raise TypeError(f"not a request: {msg!r}")
    except BrokerError as exc:
        _nack_broker(conn, msg, exc)
        return
    conn.send(Ack.to(msg))


def _nack_broker(conn: Conn, msg: Request, exc: BrokerError) -> None:
    conn.logger.warning("connection %s: %s %s failed: %s", conn.uuid, msg.type.name, msg.uuid, exc)
    conn.send(Nack.to(msg, exc.nack_code, str(exc)))
