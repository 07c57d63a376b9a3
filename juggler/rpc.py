"""The RPC side of the redis broker: storing calls and results, and the results listener.

:class:`RpcSide` holds :class:`~juggler.broker.RedisBroker`'s methods for calls and results;
the broker's connections (its pool of fast-path connections, a listener's own connection)
belong to :class:`~juggler.broker.RedisBroker` itself. Keys and scripts: :mod:`juggler.layout`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import redis
import redis.exceptions

from . import resp
from .exceptions import BrokerError, CapacityExceeded, PayloadTooLarge
from .layout import (
    CONSUME,
    STORE,
    WAKE_MARKER,
    call_timeout_key,
    calls_key,
    ms,
    result_timeout_key,
    results_key,
)
from .message import CallPayload, ResultPayload
from .redisconn import REDIS_FAILURES, broker_error

__all__ = ["Popped", "RpcSide", "RESULT_SURE_MARGIN", "AWAIT_GRACE", "STORE_WAIT"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Popped:
    """A call or result taken off its list, with the seconds it has left (<= 0: expired)."""

    payload: Union[CallPayload, ResultPayload]
    remaining: float

    @property
    def expired(self) -> bool:
        return self.remaining <= 0


#: How much time a call must have left, by its connection's own count, for its result to be
#: handed over before redis has answered the script that takes the result's timeout key
#: (:meth:`RedisBroker.pop_result`). The key expires with the call, at or after that count.
RESULT_SURE_MARGIN = 0.05

#: How long :meth:`RedisBroker.store_call` waits for redis' answer at most, in seconds.
STORE_WAIT = 0.75

#: How long after a call's deadline (by its connection's count) a results listener that
#: stores its connection's calls (:meth:`RedisBroker.follow_calls`) keeps a BRPOP waiting for
#: its result: redis expires the call a little after that count, which is taken first.
AWAIT_GRACE = 1.0

# what a listener's own connection waits for (RedisBroker._expect), beside a callback for a
# call stored ahead: a BRPOP's reply, a timeout-key script's reply to drop, or one to read, or
# the replies to _PROBE (whether redis leaves a command's reply out: _consume_ahead)
_AWAIT_BRPOP, _AWAIT_SKIP, _AWAIT_TTL = "brpop", "skip", "ttl"
_AWAIT_PROBE, _AWAIT_PROBE_FIRST, _AWAIT_PROBE_MARK = "probe", "probe-first", "probe-mark"
_REPLY_SKIP = ("CLIENT", "REPLY", "SKIP")  # (no reply, and none for the next command)
# Whether redis leaves replies out as asked: CLIENT REPLY SKIP, ECHO a first mark, ECHO the
# mark. Where it does, the mark is the only reply; where it does not, CLIENT's (+OK, or an
# error) comes first, then the two marks. Any other sequence (an ECHO refused, say) leaves the
# count of replies to come unknown: the connection is given up (RpcSide._probed).
_PROBE_FIRST = b"juggler:reply-skip:1"
_PROBE_MARK = b"juggler:reply-skip"
_PROBE = (_REPLY_SKIP, ("ECHO", _PROBE_FIRST), ("ECHO", _PROBE_MARK))
_PROBE_KINDS = (_AWAIT_PROBE, _AWAIT_PROBE_FIRST, _AWAIT_PROBE_MARK)


class NoReplySkip:
    """Shared by a broker and its dedicated listeners: set once redis was found not to leave
    a reply out as asked (``CLIENT REPLY SKIP``), so that no listener asks again."""

    __slots__ = ("found",)

    def __init__(self) -> None:
        self.found = False

def _result_payload(popped: Optional[bytes]) -> Optional[ResultPayload]:
    """The result a results list gave, or ``None``: nothing came, a wake-up marker, or a
    payload that cannot be decoded (logged, and dropped)."""
    if popped is None or popped == WAKE_MARKER:
        return None
    try:
        return ResultPayload.from_json(popped)
    except ValueError as exc:
        logger.warning("dropping undecodable result payload: %s", exc)
        return None


def _none_there_yet(expect: deque[Any]) -> bool:
    """Whether the next reply a listener awaits (``_expect``) cannot be there yet, so that it
    waits without a look first (see ``RespConnection.read_reply``): a script's reply may be
    there already; a BRPOP's waits for a callee, and with nothing awaited, only a call stored
    ahead brings one."""
    return not expect or expect[0] is _AWAIT_BRPOP


def _check_skipped(reply: Any, conn_uuid: str) -> None:
    """The reply of the timeout-key script of a result handed over before it came (see
    :meth:`RedisBroker.pop_result`): an error, or a key that was already gone (evicted by
    ``maxmemory``, lost in a failover), is worth a line in the log."""
    if isinstance(reply, Exception):
        logger.warning("connection %s: taking a result's timeout key failed: %s", conn_uuid, reply)
    elif isinstance(reply, int) and reply <= 0:
        logger.info("connection %s: a result was handed over whose timeout key redis no longer had", conn_uuid)



# the start of the store that store_call_ahead sends: an EVAL of 8 arguments, its first 3
_STORE_AHEAD_HEAD = b"*8\r\n" + resp.pack(("EVAL", STORE.source, 2))[4:]
# what _consume_ahead sends, packed once: the start of its script (an EVAL of 4 arguments),
# and what goes before it where redis is to leave its reply out, or is asked whether it can
_CONSUME_HEAD = b"*4\r\n" + resp.pack(("EVAL", CONSUME.source, 1))[4:]
_REPLY_SKIP_PACKED = resp.pack(_REPLY_SKIP)
_PROBE_PACKED = b"".join(resp.pack(c) for c in _PROBE)


def _consume_command(conn_uuid: str, msg_uuid: str) -> bytes:
    """``pack(("EVAL", CONSUME.source, 1, result_timeout_key(conn_uuid, msg_uuid)))``, from
    :data:`_CONSUME_HEAD` (tests/test_incoming_bytes.py compares them)."""
    key = result_timeout_key(conn_uuid, msg_uuid).encode("utf-8")
    return b"%b$%d\r\n%b\r\n" % (_CONSUME_HEAD, len(key), key)


class RpcSide:
    """:class:`~juggler.broker.RedisBroker`'s calls and results (a mix-in: the state it uses is
    made by the broker's ``__init__``)."""

    # (store_call_ahead) the end of its command for (conn_uuid, call_cap): that cap and the BRPOP
    _ahead_tail: tuple[str, int, bytes] = ("", -1, b"")
    # and for (uri, timeout): the start of its timeout key, then its list key and ttl, packed
    _ahead_uri: tuple[str, float, bytes, bytes] = ("", -1.0, b"", b"")

    #: Called on the listener's thread before :meth:`pop_result` (with no timeout) waits for
    #: redis (see :meth:`call_before_wait`).
    before_wait: Optional[Callable[[], None]] = None
    #: Whether the script that takes the timeout key of a result handed over at once, with no
    #: reply to read, may wait for the next command sent on the listener's connection (see
    #: :meth:`_consume_ahead`); set by its owner.
    keys_taken_later = False
    # (that script, and the connection it waits for: sent first with its next command)
    _later: tuple[Any, bytes] = (None, b"")

    # (set by RedisBroker.__init__)
    _fast: Optional[resp.RespPool]
    _dedicated: bool
    _ahead: bool
    _interrupted: bool
    _interrupt_why: str
    _reconnected: float
    _expect: deque[Any]
    _brpop_sent: bool
    _own_lock: Any
    _own: Optional[resp.RespConnection]
    _sending: bool
    _close_after_send: Optional[resp.RespConnection]
    _abandon_why: str
    _no_reply_skip: NoReplySkip
    health: Any
    _cluster_node: bool
    _tls: bool
    call_deadlines: Optional[Mapping[str, float]]
    _moved_error: Callable[[BaseException], Optional[BrokerError]]
    call_cap: int
    result_cap: int
    max_args_size: int
    client: Any

    def store_call(self, payload: CallPayload, timeout: float) -> None:
        """Queue a call for its URI's callees; it expires after ``timeout`` seconds.
        :class:`~juggler.exceptions.PayloadTooLarge` when its args are over ``max_args_size``.

        On the fast path, redis' answer is awaited :data:`STORE_WAIT` at most (or ``timeout``
        when shorter): the thread storing it is a websocket's reader, which a redis that
        stalls must not hold. Past it the call gets :class:`BrokerError` (it may still be
        stored once redis wakes up, as any call whose reply was lost)."""
        data = self._call_data(payload)
        self._run_store(call_timeout_key(payload.uri, payload.msg_uuid), calls_key(payload.uri), timeout, data,
                        self.call_cap, min(timeout, STORE_WAIT))  # fmt: skip

    def _call_data(self, payload: CallPayload) -> bytes:
        """The call's payload as stored; :class:`PayloadTooLarge` past ``max_args_size``."""
        data = payload.to_json().encode("utf-8")  # bytes: the command would encode it anyway
        most = self.max_args_size
        if most and len(data) > most:
            # The args may be over: they are the payload less the rest of it and ',"args":'
            # (8 bytes). Measured only for a payload that long: no cost for the others.
            rest = CallPayload(payload.conn_uuid, payload.msg_uuid, payload.uri).to_json()
            size = len(data) - len(rest.encode("utf-8")) - 8
            if size > most:
                raise PayloadTooLarge(f"call args of {size} bytes, over the server's maximum of {most}")
        return data

    def follow_calls(self, deadlines: Mapping[str, float]) -> bool:
        """Make this results listener (a :meth:`dedicated` broker) its connection's way to
        store calls too, where it can (the fast path: not fakeredis, not a cluster, not TLS,
        whose connection one thread at a time may use); whether it can.

        ``deadlines`` is the connection's count of its calls in flight (``msg_uuid`` to
        ``time.monotonic()`` deadline; see :attr:`call_deadlines`), kept by the caller, who
        takes a call out once :meth:`pop_result` has handed its result over. From
        then on :meth:`pop_result` keeps a BRPOP waiting only while a call there may still
        bring a result (until :data:`AWAIT_GRACE` after its deadline), and otherwise waits
        for what :meth:`store_call_ahead` sends; a result for a call it was not told of waits
        in the list until the next call's BRPOP takes it.
        """
        if not self._dedicated or self._fast is None or self._cluster_node or self._tls:
            return False
        self.call_deadlines = deadlines
        self._ahead = True
        return True

    def store_call_ahead(self, payload: CallPayload, timeout: float, done: Callable[[Optional[BrokerError]], None]) -> bool:
        """Store a call on this listener's connection, with the BRPOP for its result in the
        same write, without waiting for redis: the listener's thread reads redis' answer
        inside :meth:`pop_result` and calls ``done(None)`` once the call is stored, or
        ``done(error)`` (a :class:`BrokerError`) if it was not; the call's result can only
        come after that, on the same connection. One write, and no wait on the calling thread.

        ``False`` (nothing sent) when it cannot: not :meth:`follow_calls`, the connection is
        not made yet or broken, or a BRPOP already waits on it (redis would run the call's
        script only once that BRPOP returned): store it with :meth:`store_call` instead.
        :class:`PayloadTooLarge` as :meth:`store_call`.

        If the connection fails first (or its owner, seeing :meth:`unanswered_since` older
        than :attr:`reply_timeout`, calls :meth:`abandon`), ``done`` gets the error and
        :meth:`pop_result` raises it. The send waits for redis to take the bytes no longer than
        the connection's send timeout (:data:`~juggler.broker.SEND_TIMEOUT`): past it, ``done``
        gets the error (on this thread) and the listener's connection is given up. It is made
        with no lock held that another thread needs.
        """
        if not self._ahead:
            return False
        command = self._store_ahead_command(payload, timeout)
        with self._own_lock:
            own = self._own
            if self._brpop_sent or own is None or own.broken:
                return False
            # the replies awaited, in the order of the bytes: no other thread sends on the
            # connection until the BRPOP's reply came (see _brpop_sent)
            entry = (done, time.monotonic())
            self._expect.extend((entry, _AWAIT_BRPOP))
            self._brpop_sent = True
            self._sending = True
            later = self._take_later(own)
        failed: Optional[BaseException] = None
        try:
            own.send_packed(later + command if later else command)
        except REDIS_FAILURES as exc:
            failed = exc
        with self._own_lock:
            self._sending = False
            closing, self._close_after_send = self._close_after_send, None
            mine = False
            if failed is not None:
                # broken now: the listener's read fails too, and what it awaits with it; this
                # call's NACK comes from here unless the listener has already sent it
                expect = self._expect
                for i, kind in enumerate(expect):
                    if kind is entry:
                        del expect[i]
                        mine = True
                        break
                if self._own is own:
                    self._abandon_why = f"sending a call: {failed}"
                    own.interrupt()
        if closing is not None:
            closing.close()  # (the listener lost it while this thread sent on it)
        if mine:
            assert failed is not None
            done(broker_error(failed))
        return True

    def _store_ahead_command(self, payload: CallPayload, timeout: float) -> bytes:
        """The bytes :meth:`store_call_ahead` writes: the call's store, then the BRPOP for its
        result, as :func:`~juggler.resp.pack` packs ``("EVAL", STORE.source, 2, timeout key,
        list key, ms(timeout), payload, call_cap)`` and ``("BRPOP", results key, 0)`` (EVAL,
        not EVALSHA: a NOSCRIPT could not be answered with the BRPOP behind it). What is the
        same for every call of the connection is packed once (tests/test_incoming_bytes.py
        compares them)."""
        data = self._call_data(payload)
        tail = self._ahead_tail
        if tail[0] != payload.conn_uuid or tail[1] != self.call_cap:
            cap = resp.pack((self.call_cap,))[4:]  # (less its "*1\r\n")
            tail = (payload.conn_uuid, self.call_cap, cap + resp.pack(("BRPOP", results_key(payload.conn_uuid), 0)))
            self._ahead_tail = tail
        uri = self._ahead_uri  # (and for the last URI and timeout: from the list key to the ttl)
        if uri[0] != payload.uri or uri[1] != timeout:
            list_key = calls_key(payload.uri).encode("utf-8")
            ttl = b"%d" % ms(timeout)
            uri = (payload.uri, timeout, call_timeout_key(payload.uri, "").encode("utf-8"),
                   b"\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(list_key), list_key, len(ttl), ttl))  # fmt: skip
            self._ahead_uri = uri
        msg_uuid = payload.msg_uuid.encode("utf-8")
        return b"%b$%d\r\n%b%b%b$%d\r\n%b\r\n%b" % (
            _STORE_AHEAD_HEAD, len(uri[2]) + len(msg_uuid), uri[2], msg_uuid, uri[3], len(data), data, tail[2])

    def unanswered_since(self) -> Optional[float]:
        """When (``time.monotonic()``) the oldest call stored ahead that redis has not
        answered yet was sent; ``None``: none waits. For a watchdog: the listener itself waits
        for redis with no timeout (see :attr:`reply_timeout`)."""
        with self._own_lock:
            return next((kind[1] for kind in self._expect if type(kind) is tuple), None)

    def _awaiting(self, other_than: str) -> bool:
        """Whether a result may still come: always, unless :meth:`follow_calls`; then whether
        a call of :attr:`call_deadlines` (other than ``other_than``) may still bring one."""
        deadlines = self.call_deadlines
        if not self._ahead or deadlines is None:
            return True
        n = len(deadlines)
        if n == 0 or (n == 1 and other_than in deadlines):  # (the usual case: no look at the clock)
            return False
        after = time.monotonic() - AWAIT_GRACE
        for msg_uuid, deadline in list(deadlines.items()):  # (a copy: the reader adds meanwhile)
            if deadline > after and msg_uuid != other_than:
                return True
        return False

    def store_result(self, payload: ResultPayload, timeout: float) -> None:
        """Queue a result for its connection; it expires after ``timeout`` seconds."""
        self._run_store(
            result_timeout_key(payload.conn_uuid, payload.msg_uuid),
            results_key(payload.conn_uuid),
            timeout,
            payload.to_json(),
            self.result_cap,
        )

    def _run_store(self, timeout_key: str, list_key: str, timeout: float, data: Union[str, bytes], cap: int,
                   within: Optional[float] = None) -> None:  # fmt: skip
        args = [ms(timeout), data, cap]
        try:
            self._eval(STORE, [timeout_key, list_key], args, within)
        except REDIS_FAILURES as exc:
            error = broker_error(exc)
            if isinstance(error, CapacityExceeded):
                raise error from None
            raise error from exc

    def pop_call(self, uris: Sequence[str], block: float) -> Optional[Popped]:
        """Wait up to ``block`` seconds for a call to any of ``uris``; ``None`` if none came.

        An undecodable payload is logged and dropped (``None`` is returned).
        """
        popped = self._brpop([calls_key(u) for u in uris], block)
        if popped is None:
            return None
        try:
            payload = CallPayload.from_json(popped)
        except ValueError as exc:
            logger.warning("dropping undecodable call payload: %s", exc)
            return None
        return Popped(payload, self._take(call_timeout_key(payload.uri, payload.msg_uuid)))

    def pop_result(self, conn_uuid: str, block: Optional[float]) -> Optional[Popped]:
        """Wait up to ``block`` seconds (``None``: until one comes or :meth:`wake_results`)
        for a result for ``conn_uuid``; ``None`` if none came."""
        if block is None and self._dedicated and self._fast is not None:
            if self.before_wait is not None:  # (what the last result brought: out before a connect)
                self.before_wait()
            return self._pop_result_ahead(conn_uuid)
        payload = _result_payload(self._brpop([results_key(conn_uuid)], block))
        if payload is None:
            return None
        return Popped(payload, self._take(result_timeout_key(conn_uuid, payload.msg_uuid)))

    def call_before_wait(self, hook: Callable[[], None]) -> bool:
        """Have :meth:`pop_result` with no timeout call ``hook`` (on its thread) each time
        before it waits for redis, with nothing of redis' at hand: whether it will (a
        :meth:`dedicated` listener on the fast path). Else nothing is set: its caller does
        what the hook would, after each :meth:`pop_result`."""
        if not self._dedicated or self._fast is None:
            return False
        self.before_wait = hook
        return True

    def _pop_result_ahead(self, conn_uuid: str) -> Optional[Popped]:
        """:meth:`pop_result` with no timeout, on a listener's own connection: the script that
        takes a result's timeout key goes in one write with the next BRPOP, so each result
        costs one write to redis, not two. (EVAL, not EVALSHA: a NOSCRIPT could not be
        answered on a connection that is blocked in the BRPOP behind it.)

        When :attr:`call_deadlines` says the result's call has more than
        :data:`RESULT_SURE_MARGIN` seconds left, its timeout key cannot have expired (the
        callee stores the result to expire with the call, which was stored after its deadline
        was noted), so the result is returned at once and the script's reply is left out by
        redis (``CLIENT REPLY SKIP``, where redis takes it: see :meth:`_consume_ahead`), or
        else dropped on the next turn: the listener waits for redis once per result, for the
        BRPOP.

        After :meth:`follow_calls`, the replies to the calls stored ahead come here too, in
        their order, and go to their callbacks."""
        key = results_key(conn_uuid)
        own: Optional[resp.RespConnection] = None
        try:
            own = self._own_connection()
            while True:
                with self._own_lock:
                    brpop = not self._brpop_sent and self._awaiting("")
                    if brpop:
                        self._expect.append(_AWAIT_BRPOP)
                        self._brpop_sent = True
                        later = self._take_later(own)
                    idle = not self._expect
                    wait = _none_there_yet(self._expect)
                if brpop:  # (sent with no lock held: redis may be slow to take it)
                    own.send_packed(later + resp.pack(("BRPOP", key, 0)))
                try:
                    reply = own.read_reply(wait, self.before_wait)
                except redis.exceptions.ConnectionError:
                    with self._own_lock:  # (own is broken now: nothing more is sent on it)
                        idle = idle and not self._expect  # a call may have been sent meanwhile
                    if not idle or not self._may_reconnect():
                        raise
                    # redis closed it while nothing was asked (its idle-client timeout, a
                    # proxy's): nothing is lost, take a new one
                    own = self._reconnect_idle(own)
                    continue
                with self._own_lock:
                    if not self._expect:
                        raise redis.exceptions.ConnectionError(f"a reply nobody asked for: {reply!r:.100}")
                    kind = self._expect.popleft()
                if kind is _AWAIT_SKIP:
                    _check_skipped(reply, conn_uuid)
                elif kind in _PROBE_KINDS:
                    self._probed(own, reply, kind)
                elif type(kind) is tuple:  # a call stored ahead: (its callback, when it was sent)
                    kind[0](broker_error(reply) if isinstance(reply, Exception) else None)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    # (_brpop_sent stays set until the next one is decided: nothing may be sent
                    # on the connection meanwhile, so the script's reply comes first)
                    payload = _result_payload(own.popped(reply))
                    if payload is not None:
                        return self._consume_ahead(own, key, payload)
                    with self._own_lock:
                        self._brpop_sent = False
                    return None
        except REDIS_FAILURES as exc:
            error = self._moved_error(exc) or broker_error(exc)  # (MOVED: see RedisBroker.follow_slot)
            why = self._interrupt_why or self._abandon_why
            if why:
                error = BrokerError(f"redis unavailable: {why}")
            # what it still has in flight must not answer a later command: closed, and the
            # calls stored ahead unanswered get their NACK
            self._lose_own(own, error)
            raise error from exc

    def _reconnect_idle(self, own: resp.RespConnection) -> resp.RespConnection:
        """A new connection for a listener whose idle one redis closed: at once, if redis
        looks up (:attr:`health`; one such listener at a time finds out, see
        :meth:`~juggler.health.RedisHealth.probe`); else it fails, and the listener takes its
        turn in the backoff."""
        health = self.health
        if health is None:
            return self._own_connection(fresh=True)
        with health.probe() as up:
            if not up:
                raise redis.exceptions.ConnectionError("Connection closed by server, and redis is down.")
            since = health.epoch
            try:
                return self._own_connection(fresh=True)
            except REDIS_FAILURES as exc:
                health.failed(broker_error(exc), since)
                raise

    def _may_reconnect(self) -> bool:
        """Whether a listener whose idle connection redis closed may take a new one: at most
        once a second, so that a redis that keeps closing it is a failure, not a loop."""
        now = time.monotonic()
        if now - self._reconnected < 1.0 or self._interrupted:
            return False
        self._reconnected = now
        return True

    def _consume_ahead(self, own: resp.RespConnection, key: str, payload: ResultPayload) -> Popped:
        """Take the timeout key of a result just popped, with the next BRPOP in the same
        write while a result may still come; the result, handed over before redis answers
        when its call is sure to have time left (see :meth:`_pop_result_ahead`).

        Then the script's reply is of no use: redis is asked to leave it out (``CLIENT REPLY
        SKIP``), so that the listener neither reads it nor wakes for it alone. Whether redis
        can is found out along with the first such script on each connection (:data:`_PROBE`:
        a server that refuses it, or answers anyway, gets the replies, read and dropped)."""
        deadlines = self.call_deadlines
        deadline = deadlines.get(payload.msg_uuid) if deadlines is not None else None
        left = deadline - time.monotonic() if deadline is not None else 0.0
        sure = left > RESULT_SURE_MARGIN
        consume = _consume_command(payload.conn_uuid, payload.msg_uuid)
        awaited: tuple[Any, ...]
        if not sure:
            awaited = (_AWAIT_TTL,)
        elif own.reply_skip:
            consume, awaited = _REPLY_SKIP_PACKED + consume, ()
        elif own.reply_skip is None and not self._no_reply_skip.found:
            consume, awaited = _PROBE_PACKED + consume, (_AWAIT_PROBE, _AWAIT_SKIP)
        else:
            awaited = (_AWAIT_SKIP,)
        with self._own_lock:
            again = self._awaiting(payload.msg_uuid)
            if not again and not awaited and self.keys_taken_later:
                # nothing to send but this script, which has no reply: it goes first with the
                # next command on the connection (the reader's next store, most often), one
                # write less; a connection lost meanwhile leaves the key to expire with its call
                self._later = (own, self._take_later(own) + consume)
                self._brpop_sent = False
                return Popped(payload, left)
            self._expect.extend(awaited)
            if again:
                self._expect.append(_AWAIT_BRPOP)
            consume = self._take_later(own) + consume
        # (sent with no lock held; _brpop_sent is still set, so no other thread sends meanwhile)
        own.send_packed(consume + resp.pack(("BRPOP", key, 0)) if again else consume)
        if not again:
            with self._own_lock:
                self._brpop_sent = False
        if sure:
            return Popped(payload, left)
        reply = own.read_reply(False, self.before_wait)
        with self._own_lock:
            self._expect.popleft()  # (_AWAIT_TTL: the first reply awaited after a BRPOP's)
        if isinstance(reply, Exception):
            raise reply
        ttl_ms = own.integer(reply)
        return Popped(payload, ttl_ms / 1000.0 if ttl_ms > 0 else 0.0)

    def _take_later(self, own: resp.RespConnection) -> bytes:
        """(Under the lock, by the thread about to send on ``own``.) The scripts left to go
        first with the next command on ``own`` (:attr:`keys_taken_later`); none for another
        connection (those of a connection lost: their keys expire with their calls)."""
        later = self._later
        if later[0] is None:
            return b""
        self._later = (None, b"")
        return later[1] if later[0] is own else b""

    def _probed(self, own: resp.RespConnection, reply: Any, kind: str) -> None:
        """A reply to :data:`_PROBE`. First (``kind`` :data:`_AWAIT_PROBE`): the mark alone
        says redis leaves replies out as asked; CLIENT's +OK or error says it does not, and
        the two marks follow, to be checked. Anything else, or a mark out of its place (an
        ECHO refused: how many replies are still to come is unknown), gives the connection up
        as out of step (its calls stored ahead get their NACK; the listener connects again),
        and no listener of this broker's family asks again."""
        if kind is _AWAIT_PROBE:
            if reply == _PROBE_MARK:
                if own.reply_skip is None:
                    own.reply_skip = True
                return
            own.reply_skip = False
            self._no_reply_skip.found = True
            if reply == b"OK" or isinstance(reply, Exception):
                with self._own_lock:
                    self._expect.extendleft((_AWAIT_PROBE_MARK, _AWAIT_PROBE_FIRST))
                return
        elif reply == (_PROBE_FIRST if kind is _AWAIT_PROBE_FIRST else _PROBE_MARK):
            return
        self._no_reply_skip.found = True
        raise redis.exceptions.ConnectionError(f"replies out of step after CLIENT REPLY SKIP: {reply!r:.100}")

    def wake_results(self, conn_uuid: str) -> None:
        """Wake the :meth:`pop_result` that waits on ``conn_uuid``'s list (it returns ``None``).

        When the shared pool has no connection to spare (many connections closing at once), a
        connection of its own carries the marker."""
        key = results_key(conn_uuid)
        try:
            self._push_wake(key)
            return
        except REDIS_FAILURES as exc:
            first = exc
        own = self.dedicated(key)
        try:
            own._push_wake(key)
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from first
        finally:
            own.close()

    def _push_wake(self, key: str) -> None:
        if self._fast is not None:  # (on a websocket's reader: a redis that stalls must not hold it)
            self._on_fast(lambda conn: conn.command_within(STORE_WAIT, "RPUSH", key, WAKE_MARKER), STORE_WAIT)
        else:
            self.client.rpush(key, WAKE_MARKER)

    def discard_results(self, conn_uuid: str) -> None:
        """Delete a closed connection's result list (results that arrive later expire)."""
        try:
            if self._fast is not None:  # (as _push_wake)
                self._on_fast(lambda conn: conn.command_within(STORE_WAIT, "DEL", results_key(conn_uuid)), STORE_WAIT)
            else:
                self.client.delete(results_key(conn_uuid))
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc

    def _brpop(self, keys: list[str], block: Optional[float]) -> Optional[bytes]:
        try:
            # BRPOP's timeout 0 means "forever": that is what block=None asks for.
            timeout = 0 if block is None else max(block, 0.01)
            if self._fast is not None:
                return self._on_fast(lambda conn: conn.popped(conn.command("BRPOP", *keys, timeout)))
            item = self.client.brpop(keys, timeout=timeout)
            if item is None:
                return None
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], bytes)):
                raise redis.exceptions.ConnectionError(f"Protocol error from redis: a BRPOP reply was due, not {item!r:.60}")
            return item[1]
        except REDIS_FAILURES as exc:
            raise (self._moved_error(exc) or broker_error(exc)) from exc

    def _take(self, timeout_key: str) -> float:
        try:
            ttl_ms = self._eval(CONSUME, [timeout_key], [], integer=True)
        except REDIS_FAILURES as exc:
            raise broker_error(exc) from exc
        return ttl_ms / 1000.0 if ttl_ms > 0 else 0.0
