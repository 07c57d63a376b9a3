"""A blocking juggler client on ``websocket-client``.

One :class:`Client` is one websocket connection. Calls and requests may be made from any
number of threads. Three threads per client, named ``juggler-client-<n>-...``: a reader that
routes ACK, NACK, RES and EVNT to whoever waits for them, a writer that sends (so no caller
ever blocks on a server that stops reading), and a timer that expires calls.

Every call ends exactly once: with its result, :class:`~juggler.exceptions.RemoteError` (an
error result), :class:`~juggler.exceptions.NackError`, :class:`~juggler.exceptions.CallExpired`
or :class:`~juggler.exceptions.ConnectionClosed`. A call is registered as pending *before* it
is sent, so a result that arrives before ``send`` returns is never lost.

With ``Client.connect(url, reconnect=True)`` a lost connection is replaced: the reader thread
dials again with capped exponential backoff and jitter, then renews every live subscription
(see :meth:`Client.connect`); a subscription of a channel with history recovers the events
published meanwhile, or reports the gap (:mod:`juggler.resume`).

Nothing grows without bound, whatever the server does: the writer's queue holds at most
``outbox_size`` messages (a caller waits for room, a call at most until its timeout; a call
that ended while it waited there is never sent), each subscription keeps at most
``sub_queue_size`` events (past it the oldest are dropped and counted, or the reader waits:
``sub_overflow``), and a message from the server over ``read_limit`` bytes closes the
connection (1009).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import websocket

from .deadline import Deadline
from .exceptions import (
    AckTimeout,
    CallExpired,
    ConnectionClosed,
    HandshakeError,
    NackError,
    ProtocolError,
    RemoteError,
)
from .message import (
    DEFAULT_CALL_TIMEOUT,
    SUBPROTOCOL,
    Ack,
    Call,
    Evnt,
    Message,
    Nack,
    Pub,
    Request,
    Res,
    Sub,
    Unsb,
    decode,
    encode,
    result_error_message,
)
from .client_queues import Expiries, Outbox
from .dial import Redial, backoff_delays, check_url, dial_until, open_websocket
from .frames import OP_TEXT, CloseCode
from .resume import Resume
from .peer import CLOSE, FAIL, OP_PONG, SEND, Peer
from .transport import SocketIO, SocketReader, Stopped

__all__ = ["Client", "Subscription"]

_END = object()  # writer queue: send the close frame, then stop
_STOP = object()  # writer queue: stop without sending
_counter = itertools.count(1)

#: Defaults of :class:`Client`'s bounds.
OUTBOX_SIZE = 1024
READ_LIMIT = 16 << 20
SUB_QUEUE_SIZE = 1024
_OVERFLOWS = ("drop_oldest", "block")


def _check_queue(size_name: str, size: int, overflow_name: str, overflow: str) -> None:
    if size < 1:
        raise ValueError(f"{size_name} must be at least 1, got {size!r}")
    if overflow not in _OVERFLOWS:
        raise ValueError(f"{overflow_name} must be one of {', '.join(_OVERFLOWS)}, got {overflow!r}")


class Subscription:
    """Events of one SUB (a channel, or a pattern when ``pattern`` is true).

    Iterate over it to get :class:`~juggler.message.Evnt` messages as they arrive; the
    iteration ends when the subscription is undone with :meth:`Client.unsb` or the client is
    closed, and raises :class:`~juggler.exceptions.ConnectionClosed` if the connection is lost
    (with ``reconnect``, it goes on over the new connection instead).

    At most ``maxsize`` events wait to be read. With ``overflow="drop_oldest"`` (the default)
    one more drops the oldest, counted in :attr:`dropped`; with ``"block"`` the client's reader
    waits for room, which holds up everything the server sends on this connection (and a
    server disconnects a client that stops reading for long).

    On a channel with history (see :mod:`juggler.history`), a client with ``reconnect``
    recovers the events published while it was reconnecting; when it cannot, the gap is
    counted in :attr:`gaps`, logged (WARNING) and ``on_gap(subscription)`` is called, on the
    client's reader thread (see :mod:`juggler.resume`).
    """

    def __init__(self, client: "Client", channel: str, pattern: bool, maxsize: int = SUB_QUEUE_SIZE,
                 overflow: str = "drop_oldest", on_gap: Optional[Callable[["Subscription"], None]] = None) -> None:  # fmt: skip
        _check_queue("maxsize", maxsize, "overflow", overflow)
        self.client = client
        self.channel = channel
        self.pattern = pattern
        self.maxsize = maxsize
        self.overflow = overflow
        #: Events dropped because the queue was full (``overflow="drop_oldest"``).
        self.dropped = 0
        self._items: deque[Evnt] = deque()
        self._cond = threading.Condition()
        self._error: Optional[BaseException] = None
        self._ended = False
        self._released = False  # a blocked reader gives up (the client is closing)
        self._leaving = 0  # UNSBs waiting for their ACK: a full "block" queue drops meanwhile
        #: Its place in the channel's history (:class:`~juggler.resume.Resume`).
        self.resume = Resume(on_gap)

    @property
    def gaps(self) -> int:
        """Reconnects after which the events published meanwhile could not be recovered."""
        return self.resume.gaps

    def __repr__(self) -> str:
        kind = "pattern" if self.pattern else "channel"
        return f"<Subscription {kind}={self.channel!r}{' ended' if self._ended else ''}>"

    def get(self, timeout: Optional[float] = None) -> Optional[Evnt]:
        """The next event; ``None`` once the subscription has ended normally.

        Raises :class:`TimeoutError` when no event came within ``timeout`` seconds, and
        :class:`~juggler.exceptions.ConnectionClosed` when the connection was lost.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._ended, timeout):
                raise TimeoutError(f"no event on {self.channel!r} within {timeout} s")
            if self._items:
                self._cond.notify_all()  # room for a reader waiting to put one
                return self._items.popleft()
        return self._end()

    def _end(self) -> None:
        if self._error is not None:
            raise self._error
        return None

    def __iter__(self) -> Iterator[Evnt]:
        while True:
            ev = self.get()
            if ev is None:
                return
            yield ev

    def _put(self, evnt: Evnt) -> None:
        """Queue an event (on the client's reader thread)."""
        with self._cond:
            if self._ended:
                return
            if len(self._items) >= self.maxsize:
                if self.overflow == "block":
                    self._cond.wait_for(
                        lambda: len(self._items) < self.maxsize or self._ended or self._released or self._leaving
                    )
                    if self._ended or self._released:
                        return
                    if len(self._items) >= self.maxsize:  # still full: an UNSB waits for its ACK
                        self.dropped += 1
                        return
                else:
                    self._items.popleft()
                    self.dropped += 1
            self._items.append(evnt)
            self._cond.notify_all()

    def _leave(self, leaving: bool) -> None:
        """An UNSB of this subscription waits for its ACK (``leaving``), or is over: meanwhile a
        full ``"block"`` queue drops an event instead of holding up the reader, which must
        read the ACK."""
        with self._cond:
            self._leaving += 1 if leaving else -1
            self._cond.notify_all()

    def _release(self) -> None:
        """Let a reader waiting for room go on, dropping its event (the client closes)."""
        with self._cond:
            self._released = True
            self._cond.notify_all()

    def _finish(self, error: Optional[BaseException] = None) -> None:
        with self._cond:
            if not self._ended:
                self._ended = True
                self._error = error
                self._cond.notify_all()


class Client:
    """A juggler connection. Use :meth:`connect` to open one.

    ``call_timeout`` is the default timeout of :meth:`call` (seconds); ``ack_timeout`` how
    long :meth:`pub`, :meth:`sub` and :meth:`unsb` wait for the server's ACK or NACK.
    ``outbox_size`` (1024) messages at most wait for the writer; ``read_limit`` (16 MiB) is
    the largest message accepted from the server; ``sub_queue_size`` (1024) and
    ``sub_overflow`` (``"drop_oldest"`` or ``"block"``) are the defaults of each
    :class:`Subscription`.
    """

    def __init__(
        self,
        ws: websocket.WebSocket,
        *,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        ack_timeout: float = 10.0,
        close_timeout: float = 5.0,
        logger: Optional[logging.Logger] = None,
        outbox_size: int = OUTBOX_SIZE,
        read_limit: int = READ_LIMIT,
        sub_queue_size: int = SUB_QUEUE_SIZE,
        sub_overflow: str = "drop_oldest",
        _reconnect: Optional["Redial"] = None,
    ) -> None:
        for name, n in (("outbox_size", outbox_size), ("read_limit", read_limit)):
            if n < 1:
                raise ValueError(f"{name} must be at least 1, got {n!r}")
        _check_queue("sub_queue_size", sub_queue_size, "sub_overflow", sub_overflow)
        self.sub_queue_size = sub_queue_size
        self.sub_overflow = sub_overflow
        # websocket-client made the connection and the handshake; the frames are ours, read
        # and written through SocketIO, which keeps the reader's and the writer's calls into
        # a TLS socket apart (websocket-client's recv and send would not).
        self._ws = ws
        self._io = SocketIO(ws.sock)
        self._socket_reader = SocketReader(self._io)
        # the websocket protocol; a result that comes after our close frame is still taken
        self._peer = Peer(client=True, limit=read_limit, read_after_close=True)
        self._close_sent = False
        self.call_timeout = call_timeout
        self.ack_timeout = ack_timeout
        self.close_timeout = close_timeout
        self.logger = logger or logging.getLogger(__name__)
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self.id = next(_counter)
        #: Messages received, by type name ("ACK", "NACK", "RES", "EVNT"); written only by the
        #: reader thread.
        self.received: Counter[str] = Counter()

        self._lock = threading.Lock()
        self._calls: dict[str, Future] = {}
        self._acks: dict[str, Future] = {}
        self._subs: dict[tuple[str, bool], Subscription] = {}
        self._expiries = Expiries()
        self._closed: Optional[ConnectionClosed] = None
        self._closing = False
        self._close_lock = threading.Lock()
        self._outbox = Outbox(outbox_size)
        # reconnecting (see _reader_run): how to dial again, None when off
        self._reconnect = _reconnect
        self._ended = (CloseCode.ABNORMAL_CLOSURE, "connection lost")  # close code and reason of the last connection
        self._down: Optional[ConnectionClosed] = None  # lost, and not reconnected yet
        self._ready = threading.Event()  # connected, every subscription renewed (or closed)
        self._ready.set()
        self._wake = threading.Event()  # close(): stop waiting to reconnect
        # Daemon threads: a script that forgets close() must still be able to exit. close()
        # (and the context manager) stops and joins all three.
        name = f"juggler-client-{self.id}"
        self._reader = threading.Thread(target=self._reader_run, name=f"{name}-reader", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name=f"{name}-writer", daemon=True)
        self._timer = threading.Thread(target=self._timer_loop, name=f"{name}-timer", daemon=True)
        # The reader last: when it ends, it joins the writer.
        self._writer.start()
        self._timer.start()
        self._reader.start()

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        allowed_messages: Union[str, Iterable[str], None] = None,
        headers: Optional[dict[str, str]] = None,
        connect_timeout: float = 10.0,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        ack_timeout: float = 10.0,
        logger: Optional[logging.Logger] = None,
        reconnect: bool = False,
        max_reconnect_delay: float = 10.0,
        on_reconnect: Optional[Callable[["Client", Optional[ConnectionClosed]], None]] = None,
        outbox_size: int = OUTBOX_SIZE,
        read_limit: int = READ_LIMIT,
        sub_queue_size: int = SUB_QUEUE_SIZE,
        sub_overflow: str = "drop_oldest",
        **ws_options: Any,
    ) -> "Client":
        """Open a connection to the juggler server at ``url`` (``ws://host:port/ws``).

        ``allowed_messages`` (e.g. ``["call", "sub"]``) is sent as the
        ``Juggler-Allowed-Messages`` header. Raises :class:`~juggler.exceptions.HandshakeError`
        when the server refuses the handshake, :class:`OSError` when it cannot be reached.
        Extra keyword arguments go to ``websocket.create_connection`` (e.g. ``sslopt``).
        A ``url`` that is not a websocket URL raises :class:`ValueError` (see :func:`~juggler.dial.check_url`).

        ``reconnect=True``: the first connect is retried too, with the same backoff, until
        ``connect_timeout`` has passed in all (so a service may start before its server); a
        refusal another try will not change (HTTP 400, 401, 403, 404, 405, 426) raises at once.
        When the connection is lost (not by :meth:`close`), the client dials ``url`` again, with the same headers, until it succeeds or :meth:`close` is
        called: after 0.05 to 0.1 s, then twice as long each time (each delay drawn between
        half and all of it, so that many clients do not come back at once), up to
        ``max_reconnect_delay`` seconds. Calls and requests pending at the loss end with
        :class:`~juggler.exceptions.ConnectionClosed`, and so do those made until the
        connection is back (see :attr:`connected`, :meth:`wait_connected`). Every
        :class:`Subscription` still live is subscribed again, and its iteration goes on
        (events published during the gap are lost); one the server now refuses (NACK) ends
        with :class:`~juggler.exceptions.NackError`. The loss is logged (WARNING) and so is
        the return (INFO); ``on_reconnect(client, error)`` is called with the
        :class:`~juggler.exceptions.ConnectionClosed` at the loss and with ``None`` once the
        connection is back with its subscriptions renewed. It runs on the client's reader
        thread: it must return quickly and not call the client's blocking methods.
        """
        check_url(url)
        if not max_reconnect_delay > 0:
            raise ValueError(f"max_reconnect_delay must be a positive number of seconds, got {max_reconnect_delay!r}")
        headers = dict(headers or {})
        if allowed_messages is not None:
            value = allowed_messages if isinstance(allowed_messages, str) else ",".join(allowed_messages)
            headers["Juggler-Allowed-Messages"] = value
        redial = None
        if reconnect:
            ws = dial_until(url, headers, connect_timeout, max_reconnect_delay,
                             logger or logging.getLogger(__name__), ws_options)  # fmt: skip
            # headers is the copy made above: a caller's later change does not reach a redial
            dial = functools.partial(open_websocket, url, [SUBPROTOCOL], headers, connect_timeout, **ws_options)
            redial = Redial(url, dial, max_reconnect_delay, on_reconnect)
        else:
            ws = open_websocket(url, [SUBPROTOCOL], headers, connect_timeout, **ws_options)
        return cls(ws, call_timeout=call_timeout, ack_timeout=ack_timeout, logger=logger, outbox_size=outbox_size,
                   read_limit=read_limit, sub_queue_size=sub_queue_size, sub_overflow=sub_overflow,
                   _reconnect=redial)  # fmt: skip

    @property
    def connected(self) -> bool:
        """Whether the connection is up: not closed, and (with ``reconnect``) not lost."""
        return self._closed is None and self._down is None

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Block until the connection is up with every subscription renewed (with ``reconnect``,
        after a loss); ``False`` if the client is closed or ``timeout`` passes first."""
        self._ready.wait(timeout)
        return self._ready.is_set() and self._closed is None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "reconnecting" if self._down else "open"
        return f"<juggler.Client {self.id} {state}>"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def pending_calls(self) -> int:
        """Calls sent that have not ended yet."""
        with self._lock:
            return len(self._calls)

    # -- RPC --

    def call_async(self, uri: str, args: Any = None, timeout: Optional[float] = None) -> "Future[Any]":
        """Send a CALL; the returned future gets the result, or the call's exception."""
        timeout = self.call_timeout if timeout is None else timeout
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        msg = Call(uri=uri, args=args, timeout=timeout)
        data = encode(msg)  # a TypeError/ValueError for unencodable args surfaces here
        fut: Future = Future()
        fut.set_running_or_notify_cancel()  # a call cannot be taken back once sent
        with self._lock:
            if self._closed is not None or self._down is not None:
                fut.set_exception(self._closed or self._down)
                return fut
            self._calls[msg.uuid] = fut
            if len(self._expiries) > 1024 and len(self._expiries) > 4 * len(self._calls):
                self._expiries.compact(self._calls)
        deadline = time.monotonic() + timeout
        self._expiries.add(deadline, msg.uuid)
        # a full outbox: wait for room, until the call expires at the latest (the timer ends it,
        # and the writer does not send a call that ended)
        self._outbox.put((msg.uuid, data), deadline - time.monotonic())
        return fut

    def call(self, uri: str, args: Any = None, timeout: Optional[float] = None) -> Any:
        """Call ``uri`` with ``args`` and block for the result (``timeout`` in seconds)."""
        return self.call_async(uri, args, timeout).result()

    # -- pub-sub --

    def pub(self, channel: str, args: Any = None) -> Ack:
        """Publish ``args`` on ``channel``; blocks until the server ACKs it."""
        return self._request(Pub(channel=channel, args=args))

    def sub(self, channel: str, pattern: bool = False, *, queue_size: Optional[int] = None,
            overflow: Optional[str] = None, on_gap: Optional[Callable[[Subscription], None]] = None) -> Subscription:  # fmt: skip
        """Subscribe to ``channel`` (a redis glob pattern when ``pattern``); blocks until ACKed.
        ``queue_size`` and ``overflow`` override the client's ``sub_queue_size`` and
        ``sub_overflow``; ``on_gap`` is told of events lost across a reconnect (see
        :class:`Subscription`)."""
        key = (channel, pattern)
        with self._lock:
            sub = self._subs.get(key)
            if sub is None:
                sub = self._subs[key] = Subscription(
                    self, channel, pattern, queue_size or self.sub_queue_size, overflow or self.sub_overflow, on_gap
                )
        try:
            self._request(Sub(channel=channel, pattern=pattern), on_ack=sub.resume.started)
        except BaseException:
            with self._lock:
                if self._subs.get(key) is sub:
                    del self._subs[key]
            raise
        return sub

    def unsb(self, channel: str, pattern: bool = False) -> Ack:
        """Undo :meth:`sub`; blocks until ACKed, then ends the :class:`Subscription`.

        While the UNSB waits for its ACK, an event that finds a full ``"block"`` queue is
        dropped (counted in :attr:`Subscription.dropped`) instead of holding up the client's
        reader, which must read the ACK: so the thread that reads the subscription may UNSB
        it. If the UNSB fails, the subscription goes on."""
        with self._lock:
            sub = self._subs.get((channel, pattern))
        if sub is not None:
            sub._leave(True)
        try:
            ack = self._request(Unsb(channel=channel, pattern=pattern))
        finally:
            if sub is not None:
                sub._leave(False)
        with self._lock:
            sub = self._subs.pop((channel, pattern), None)
        if sub is not None:
            sub._finish()
        return ack

    def _request(self, msg: Request, on_ack: Optional[Callable[[Ack], None]] = None) -> Ack:
        data = encode(msg)
        fut: Future = Future()
        if on_ack is not None:  # (run by the reader, before it reads on)
            fut.add_done_callback(lambda f: f.exception() is None and on_ack(f.result()))
        with self._lock:
            if self._closed is not None or self._down is not None:
                raise self._closed or self._down  # type: ignore[misc]
            self._acks[msg.uuid] = fut
        deadline = Deadline.after(self.ack_timeout)
        try:
            if not self._outbox.put((msg.uuid, data), self.ack_timeout):
                if self._closed is not None:
                    raise self._closed
                raise FutureTimeout
            return fut.result(deadline.remaining())
        except FutureTimeout:
            raise AckTimeout(f"no ACK for {msg.type.name} {msg.uuid} within {self.ack_timeout} s") from None
        finally:
            with self._lock:
                self._acks.pop(msg.uuid, None)

    def _write_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is _STOP:
                return
            try:
                if item is _END:
                    self._send_close(CloseCode.NORMAL_CLOSURE)
                    return
                if self._close_sent:
                    return  # nothing may follow a close frame (the reader answered the server's)
                if isinstance(item, bytes):  # a pong
                    self._io.sendall(item)
                    continue
                if not self._pending(item[0]):
                    continue  # it ended before it could be sent: expired, or lost with a connection
                self._io.sendall(self._peer.frame(OP_TEXT, item[1].encode("utf-8")))
            except OSError as exc:
                if not self._closing:
                    self.logger.debug("client %d: send failed: %s", self.id, exc)
                # A frame may be half written: the connection is unusable. The reader ends,
                # and every pending request ends with ConnectionClosed.
                self._kill_socket()
                return

    def _pending(self, msg_uuid: str) -> bool:
        """Whether a call or request is still waiting for its answer."""
        with self._lock:
            return msg_uuid in self._calls or msg_uuid in self._acks

    # -- routing --

    def _resolve(self, msg_uuid: str, result: Any = None, exc: Optional[BaseException] = None) -> bool:
        """End call ``msg_uuid`` once; ``False`` if it had already ended."""
        with self._lock:
            fut = self._calls.pop(msg_uuid, None)
        if fut is None:
            return False
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
        return True

    def _fail_ack(self, msg_uuid: str, exc: BaseException) -> None:
        with self._lock:
            fut = self._acks.get(msg_uuid)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, Res):
            message = result_error_message(msg.args)
            if message is not None:
                resolved = self._resolve(msg.for_uuid, exc=RemoteError(message, msg.args))
            else:
                resolved = self._resolve(msg.for_uuid, result=msg.args)
            if not resolved:
                self.logger.debug("client %d: RES for %s after its call ended", self.id, msg.for_uuid)
        elif isinstance(msg, Evnt):
            key = (msg.pattern, True) if msg.pattern else (msg.channel, False)
            with self._lock:
                sub = self._subs.get(key)
            if sub is not None:
                sub.resume.seen(msg)
                sub._put(msg)
        elif isinstance(msg, (Ack, Nack)):
            err = NackError(msg.code, msg.message, msg) if isinstance(msg, Nack) else None
            with self._lock:
                fut = self._acks.get(msg.for_uuid)
            if fut is not None:
                if not fut.done():
                    fut.set_exception(err) if err else fut.set_result(msg)
            elif err is not None:
                self._resolve(msg.for_uuid, exc=err)
        else:
            self.logger.warning("client %d: ignoring client-side message %s from server", self.id, msg.type.name)

    def _send_close(self, code: int) -> None:
        """Send a close frame, once (the writer's, or the reply to the server's)."""
        with self._close_lock:
            if self._close_sent:
                return
            self._close_sent = True
        self._io.sendall(self._peer.close_frame(code))

    def _read_loop(self) -> None:
        code, reason = CloseCode.ABNORMAL_CLOSURE, "connection lost"
        reader, peer = self._socket_reader, self._peer
        try:
            while True:
                try:
                    data = reader.read_some()
                except Stopped as exc:
                    if self._closing:
                        code, reason = CloseCode.NORMAL_CLOSURE, "client closed"
                    else:
                        reason = f"connection lost: {exc}"
                    return
                for kind, value in peer.receive_data(data):
                    if kind == OP_TEXT:
                        try:
                            msg = decode(value)
                        except ProtocolError as exc:
                            self.logger.warning("client %d: ignoring invalid message from server: %s", self.id, exc)
                            continue
                        self.received[msg.type.name] += 1
                        self._dispatch(msg)
                    elif kind == SEND:  # a pong; never waits: with the outbox full, the server will ping again
                        self._outbox.put(value, 0)
                    elif kind == CLOSE:
                        code, reason = value
                        self._reply_close(value.answer)  # echo it, as RFC 6455 suggests
                        return
                    elif kind == FAIL:
                        if self._closing:
                            code, reason = CloseCode.NORMAL_CLOSURE, "client closed"
                            return
                        self.logger.warning("client %d: server broke the websocket protocol: %s", self.id, value.reason)
                        code, reason = value.close_code, f"protocol error: {value.reason}"
                        self._reply_close(value.close_code)
                        return
                    elif kind != OP_PONG:
                        self.logger.warning("client %d: ignoring non-text frame (opcode %d)", self.id, kind)
        finally:
            self._ended = (code, reason)

    def _timer_loop(self) -> None:
        while True:
            due = self._expiries.next_expired()
            if due is None:
                return
            for msg_uuid in due:
                self._resolve(msg_uuid, exc=CallExpired(f"call {msg_uuid} expired"))

    # -- reconnecting --

    def _reader_run(self) -> None:
        """The reader thread: reads the connection until it ends; with ``reconnect``, then
        dials again and reads the new one, until :meth:`close`."""
        try:
            while True:
                self._read_loop()
                if self._reconnect is None or self._closing or not self._reconnected(*self._ended):
                    return
        finally:
            self._shutdown(*self._ended)

    def _reconnected(self, code: int, reason: str) -> bool:
        """After a loss: end what was pending, dial again (backing off) and renew the
        subscriptions. ``False`` if :meth:`close` was called first."""
        assert self._reconnect is not None
        lost = ConnectionClosed(code, reason)
        with self._lock:
            self._down = lost
            self._ready.clear()
            calls, self._calls = self._calls, {}
            acks = list(self._acks.values())
        self._drop_connection()
        for fut in calls.values():
            fut.set_exception(lost)
        for fut in acks:
            if not fut.done():
                fut.set_exception(lost)
        url = self._reconnect.url
        self.logger.warning("client %d: connection to %s lost (%d %s): reconnecting; %d call(s) in flight ended",
                            self.id, url, code, reason, len(calls))  # fmt: skip
        self._reconnect.notify(self, lost)
        started = time.monotonic()
        for attempt, delay in enumerate(backoff_delays(0.1, self._reconnect.max_delay), 1):
            if self._wake.wait(delay):
                return False  # close() was called
            try:
                ws = self._reconnect.dial()
            except (HandshakeError, OSError) as exc:
                self.logger.info("client %d: reconnecting to %s failed (attempt %d): %s", self.id, url, attempt, exc)
                continue
            if self._closing:
                ws.shutdown()
                return False
            break
        self._attach(ws)
        with self._lock:
            self._down = None
            subs = list(self._subs.values())
        self.logger.info("client %d: reconnected to %s after %d attempt(s) in %.1f s; renewing %d subscription(s)",
                         self.id, url, attempt, time.monotonic() - started, len(subs))  # fmt: skip
        self._resubscribe(subs)
        return True

    def _drop_connection(self) -> None:
        """Stop the writer of the lost connection and forget what it had not sent."""
        self._outbox.put_last(_STOP)
        self._kill_socket()
        self._writer.join()
        self._ws.shutdown()
        self._outbox.clear()  # the calls and requests those were for have ended (pongs: for the old socket)

    def _attach(self, ws: websocket.WebSocket) -> None:
        """Read and write ``ws`` from now on: a new writer thread for it."""
        io = SocketIO(ws.sock)
        self._socket_reader = SocketReader(io)
        self._peer = Peer(client=True, limit=self._peer.limit, read_after_close=True)
        self._ws, self._io = ws, io
        with self._close_lock:
            self._close_sent = False
        self._writer = threading.Thread(target=self._write_loop, name=f"juggler-client-{self.id}-writer", daemon=True)
        self._writer.start()

    def _resubscribe(self, subs: list[Subscription]) -> None:
        """SUB again for each live subscription, without waiting (the ACKs come through this
        thread); once all have answered, the client is ready again."""
        left = [len(subs)]

        def answered(sub: Subscription, msg: Sub, fut: Future) -> None:
            msg_uuid = msg.uuid
            with self._lock:
                self._acks.pop(msg_uuid, None)
                left[0] -= 1
                done = left[0] == 0
            exc = fut.exception()
            if isinstance(exc, NackError):
                self.logger.warning("client %d: renewing the subscription to %r failed: %s", self.id, sub.channel, exc)
                with self._lock:
                    if self._subs.get((sub.channel, sub.pattern)) is sub:
                        del self._subs[(sub.channel, sub.pattern)]
                sub._finish(exc)
            elif exc is None:
                sub.resume.resumed(sub, msg.since, fut.result(), self.logger)
            if done and not isinstance(exc, ConnectionClosed):  # (lost again: the next one renews them)
                self._back()

        if not subs:
            self._back()
        for sub in subs:
            msg = Sub(channel=sub.channel, pattern=sub.pattern, since=sub.resume.since())
            fut: Future = Future()
            with self._lock:
                self._acks[msg.uuid] = fut
            fut.add_done_callback(functools.partial(answered, sub, msg))
            # on the reader thread, which must not wait: one each, whatever the outbox's bound
            self._outbox.put_last((msg.uuid, encode(msg)))

    def _back(self) -> None:
        self._ready.set()
        assert self._reconnect is not None
        self._reconnect.notify(self, None)

    # -- closing --

    def _shutdown(self, code: int, reason: str) -> None:
        """Runs once, on the reader thread, when the connection is over."""
        closed = ConnectionClosed(code, reason)
        with self._lock:
            self.close_code, self.close_reason = code, reason
            self._closed = closed
            calls, self._calls = self._calls, {}
            subs, self._subs = list(self._subs.values()), {}
            acks = list(self._acks.values())
        self._expiries.stop()
        self._outbox.put_last(_STOP, close=True)
        for fut in calls.values():
            fut.set_exception(closed)
        for fut in acks:
            if not fut.done():
                fut.set_exception(closed)
        normal = self._closing or code in (CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY)
        for sub in subs:
            sub._finish(None if normal else closed)
        self._kill_socket()
        self._writer.join()  # it ends: _STOP is queued and the socket is shut down
        self._ws.shutdown()  # closes the socket, now that nothing uses it
        self._ready.set()  # wakes wait_connected(), which sees the client closed

    def _reply_close(self, code: int) -> None:
        try:
            self._send_close(code)
        except OSError:
            pass  # the server is gone already

    def _kill_socket(self) -> None:
        """Shut the socket down: the reader and the writer wake and end."""
        self._io.shutdown()

    def close(self) -> None:
        """Close the connection (code 1000) and join the client's threads. Idempotent.

        Waits up to ``close_timeout`` for the server to answer the close frame, then cuts the
        connection."""
        with self._close_lock:
            first = not self._closing
            self._closing = True
        self._wake.set()  # a reader waiting to reconnect stops waiting
        if first and not self.closed:
            self._outbox.put_last(_END)  # the writer sends the close frame after what is queued
        me = threading.current_thread()
        if me is not self._reader:
            self._reader.join(self.close_timeout)
            if self._reader.is_alive():  # the server did not answer, or the writer is stuck
                self._kill_socket()
                with self._lock:
                    subs = list(self._subs.values())
                for sub in subs:  # or the reader waits for room in a full subscription
                    sub._release()
                self._reader.join()
        for t in (self._writer, self._timer):
            if me is not t:
                t.join()

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Block until the server closes the connection; whether it did within ``timeout``."""
        self._reader.join(timeout)
        return not self._reader.is_alive()
