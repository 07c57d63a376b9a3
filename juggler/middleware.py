"""Handlers and middleware: what a server does with each message.

Every message a connection reads (CALL, PUB, SUB, UNSB) and every message sent to it (ACK,
NACK, RES, EVNT) goes through the server's *handler*, a function ``handler(conn, msg)``. The
standard handler is :func:`juggler.process_msg`: it runs a request against the broker and
answers it, and writes an outgoing message. A handler may instead answer a request itself::

    def deny_pub(next_handler):
        def handle(conn, msg):
            if isinstance(msg, juggler.Pub):
                conn.send(juggler.Nack(msg, 403, "publishing is not allowed"))
            else:
                next_handler(conn, msg)
        return handle

    server = Server(broker, handler=chain(recover(), log_messages(), deny_pub))

A *middleware* is a function that takes the next handler and returns a handler;
:func:`chain` composes them in order, ending with :func:`~juggler.process_msg`.

While a server's handler is :func:`~juggler.process_msg`, alone or behind :func:`recover`
(which would do nothing with a message to send but write it), its connections write the
messages to send themselves: the same outcome, in fewer steps.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import TYPE_CHECKING, Callable, Optional

from . import history
from .frames import CloseCode
from .exceptions import BrokerError
from .redisconn import unavailable
from .message import (
    CLIENT_TYPES,
    SERVER_TYPES,
    Ack,
    Call,
    CallPayload,
    EventPayload,
    Message,
    MessageType,
    Nack,
    Pub,
    Request,
    Sub,
    Unsb,
    effective_timeout,
)

if TYPE_CHECKING:  # pragma: no cover
    from .conn import Conn

__all__ = ["Handler", "Middleware", "HandlerSlot", "chain", "log_messages", "recover", "process_msg",
           "writes_events_as_sent"]  # fmt: skip

Handler = Callable[["Conn", Message], None]
Middleware = Callable[[Handler], Handler]


def chain(*middlewares: Middleware, handler: Optional[Handler] = None) -> Handler:
    """One handler: ``middlewares[0]`` sees a message first, then the next, then ``handler``
    (default :func:`juggler.process_msg`)."""
    if handler is None:
        handler = process_msg
    for middleware in reversed(middlewares):
        handler = middleware(handler)
    return handler


#: The handlers made by recover() in front of a handler that writes EVNTs as sent. A set, not
#: a mark on the function: functools.wraps copies a function's __dict__ to its wrapper.
_PASS_EVENTS: "weakref.WeakSet[Handler]" = weakref.WeakSet()


def writes_events_as_sent(handler: Handler) -> bool:
    """Whether ``handler`` does nothing with an EVNT but write it (:func:`process_msg`, maybe
    behind :func:`recover`): then a server may write an event's frame to its subscribers
    without making a message object for each (see ``Conn.deliver``)."""
    return handler is process_msg or handler in _PASS_EVENTS


class HandlerSlot:
    """A server's handler as its connections see it: ``slot(conn, msg)`` runs it, and
    :meth:`set` replaces it for all of them at once (``Server.handler``). ``writes_as_sent``:
    whether it does nothing with a message to send (ACK, NACK, RES, EVNT) but write it (see
    :func:`writes_events_as_sent`): then a connection writes those without calling it."""

    __slots__ = ("handler", "writes_as_sent")

    def __init__(self, handler: Handler) -> None:
        self.set(handler)

    def set(self, handler: Handler) -> None:
        self.writes_as_sent = False  # (not for a moment with the next handler)
        self.handler = handler
        self.writes_as_sent = writes_events_as_sent(handler)

    def __call__(self, conn: "Conn", msg: Message) -> None:
        self.handler(conn, msg)


def _describe(msg: Message) -> str:
    target = getattr(msg, "uri", "") or getattr(msg, "channel", "")
    if hasattr(msg, "for_uuid"):
        extra = f" for {msg.for_uuid}"  # type: ignore[union-attr]
        if hasattr(msg, "code"):
            extra += f" {msg.code} {msg.message}"  # type: ignore[union-attr]
    else:
        extra = ""
    return f"{msg.type.name} {msg.uuid} {target}{extra}".rstrip()


def log_messages(logger: Optional[logging.Logger] = None, level: int = logging.INFO) -> Middleware:
    """Log every message read from and written to a connection (``juggler.messages``)."""
    log = logger or logging.getLogger("juggler.messages")

    def middleware(next_handler: Handler) -> Handler:
        def handle(conn: "Conn", msg: Message) -> None:
            if log.isEnabledFor(level):
                direction = "<-" if msg.type in CLIENT_TYPES else "->"
                log.log(level, "conn %s %s %s", conn.uuid, direction, _describe(msg))
            next_handler(conn, msg)

        return handle

    return middleware


def recover(logger: Optional[logging.Logger] = None) -> Middleware:
    """Turn an exception raised further down the chain into a 1011 close of that connection
    only, logged once with its traceback (``juggler.middleware``)."""
    log = logger or logging.getLogger(__name__)

    def middleware(next_handler: Handler) -> Handler:
        def handle(conn: "Conn", msg: Message) -> None:
            try:
                next_handler(conn, msg)
            except Exception as exc:
                if isinstance(exc, RecursionError) and msg.type in CLIENT_TYPES:
                    raise  # a too-deeply nested request: the connection closes it with 1007
                if not conn.closed:  # logged before the close, so it is there when the peer sees it
                    log.exception("conn %s: handler failed on %s; closing the connection", conn.uuid, _describe(msg))
                conn.close(CloseCode.INTERNAL_ERROR, "internal server error")

        if writes_events_as_sent(next_handler):
            _PASS_EVENTS.add(handle)
        return handle

    return middleware


def process_msg(conn: "Conn", msg: Message) -> None:
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
        most = conn.settings.max_call_timeout
        if timeout > most:
            conn.send(Nack.to(msg, 400, f"timeout over the server's maximum of {most:g} s"))
            return
        if not conn.call_started(msg.uuid, timeout):
            most = conn.settings.max_calls_in_flight
            conn.send(Nack.to(msg, 429, f"too many calls in flight: at most {most} per connection"))
            return
        payload = CallPayload(conn.uuid, msg.uuid, msg.uri, msg.args)
        since = conn.redis_epoch()  # (what the outcome proves depends on when it began)
        try:
            # (started first: while the server knows redis is down, its listeners find out
            # when it is back, and the CALL gets NACK 500 at once)
            if not conn.listen_for_results():  # closing, or out of threads: no result could reach it
                conn.call_ended(msg.uuid)
                conn.send(Nack.to(msg, 503, "server out of threads"))
                conn.close(CloseCode.TRY_AGAIN_LATER, "server out of threads")
                return
            probe = conn.check_redis()
            stored = functools.partial(_call_stored, conn, msg, probe=probe, since=since)
            if conn.store_call_ahead(payload, timeout, stored):
                return  # its ACK (or NACK) comes from the results listener, once redis answered
            with conn.ack_lock:
                conn.broker.store_call(payload, timeout)
                conn.send(Ack.to(msg))
            if probe:
                conn.redis_answered(since)
        except BrokerError as exc:
            _call_stored(conn, msg, exc, since=since)
        return
    if not msg.channel:
        conn.send(Nack.to(msg, 400, f"{msg.type.name} has no channel"))
        return
    try:
        if isinstance(msg, Pub):
            # its ACK keeps its place ahead of the EVNT the PUB causes, if this connection is
            # subscribed to the channel too
            with conn.ordered():
                conn.publish(msg.channel, EventPayload(msg.uuid, msg.args))
                conn.send(Ack.to(msg))
            return
        elif isinstance(msg, Sub):
            if not _subscribe(conn, msg):
                return
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


def _subscribe(conn: "Conn", msg: Sub) -> bool:
    """Run a SUB; ``False`` when it was answered here (the ACK to send otherwise)."""
    most = conn.settings.max_subscriptions
    if most and conn.subscription_count() >= most and (msg.pattern, msg.channel) not in conn.subscriptions():
        conn.send(Nack.to(msg, 429, f"too many subscriptions: at most {most} per connection"))
        return False
    if msg.since is not None or history.rule_for(conn, msg) is not None:
        history.subscribe(conn, msg)  # its ACK, then the events it recovers
        return False
    conn.subscribe(msg.channel, msg.pattern)
    return True


def _call_stored(conn: "Conn", msg: Call, error: Optional[BrokerError], probe: bool = False,
                 since: Optional[int] = None) -> None:  # fmt: skip
    """A CALL was stored (ACK), or not (NACK, and it is no longer in flight: no RES may
    follow); ``probe``: it tried redis while the server saw it down (see ``Conn.check_redis``);
    ``since``: ``Conn.redis_epoch()`` before it tried."""
    if error is None:
        if probe:
            conn.redis_answered(since)
        conn.send(Ack.to(msg))
        return
    conn.redis_failed(error, since)
    conn.call_ended(msg.uuid)
    _nack_broker(conn, msg, error)


def _nack_broker(conn: "Conn", msg: Request, exc: BrokerError) -> None:
    # a refusal for the client's fault (413) at INFO: a client cannot flood the log with
    # WARNINGs; nor can an outage, logged once by the server's RedisHealth: DEBUG meanwhile,
    # and INFO for the requests that fail as it begins, before the health knows (redis
    # unavailable: its one line follows, if redis is gone)
    level = logging.WARNING if exc.nack_code >= 500 else logging.INFO
    if not conn.redis_up():
        level = logging.DEBUG
    elif level == logging.WARNING and unavailable(exc):
        level = logging.INFO
    conn.logger.log(level, "connection %s: %s %s failed: %s", conn.uuid, msg.type.name, msg.uuid, exc)
    conn.send(Nack.to(msg, exc.nack_code, str(exc)))
