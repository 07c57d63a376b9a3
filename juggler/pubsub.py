"""A server's pub-sub: one redis pub-sub connection, fanned out to its websocket connections.

Every SUB of every connection of a :class:`~juggler.server.Server` goes through its
:class:`PubSubHub`. The hub holds one redis pub-sub connection (made on the first SUB) and one
thread, ``juggler-server-pubsub``, blocked in a read of it with no timeout. Channels and
patterns are reference-counted: redis is asked to SUBSCRIBE when the first connection
subscribes and to UNSUBSCRIBE when the last one leaves, and a SUB of a channel the server is
already subscribed to is answered without a round trip. Each event is read and decoded once,
then handed to every subscribed connection (:meth:`Subscriber.deliver`), which must not block.

Guarantees, as with a redis connection of one's own:

- a SUB returns once redis has confirmed the server's subscription: an event published after
  its ACK reaches the connection;
- after an UNSB returns, no event of that subscription reaches the connection;
- a connection subscribed to a channel and to a pattern matching it gets the event twice, once
  through each (as redis sends it).

When redis goes away (the pub-sub connection fails), no connection is told (juggler.0 has no
message for it; the hub logs it at DEBUG, the process' health once at ERROR) and none is
closed: the subscriptions stay as they are, and the hub's thread reconnects, its attempts spaced by the
process' shared backoff (:class:`~juggler.health.RedisHealth`; the server's, or one of the
hub's own). Once connected, it subscribes again, in one SUBSCRIBE and one PSUBSCRIBE, to every
channel and pattern that connections hold, and events flow again with no client action. Events
published while the hub was not subscribed are lost, but on channels with history (see
:mod:`juggler.history`): those it reads from the history and hands out first, each once, to
the plain subscriptions it held before (a connection whose events cannot be recovered, the
history lost meanwhile, is closed with 1012, so that its client reconnects and is told of the
gap). Until redis has confirmed that restore:

- a SUB fails (:class:`BrokerError` ``redis unavailable``, a NACK 500) at once, whether or not
  another connection holds the same channel, and is not restored later (a SUB of what the
  connection holds already is ACKed);
- an UNSB takes the subscription away all the same (no event of it follows, and it is not
  restored), and fails while the hub has no connection;
- a connection that closes gives its subscriptions back: they are not restored.

A SUB or PUB that needs redis while the process' :class:`~juggler.health.RedisHealth` says it is
down waits for a turn of the shared backoff (at most its cap, half a second): the one that gets
it tries redis, and when that succeeds every waiting request goes; the others fail without
trying. So while redis is down they are answered within a second, and once it is back they
succeed again within one turn. A redis that stalls does not fail the connection: a SUB
waits for its confirmation up to ``confirm_timeout``, a PUB up to the broker's publish timeout,
then fails and marks redis down; events flow again when the stall ends.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Optional, Protocol, Sequence

from .broker import Broker, BrokerError, PubSubConn, PubSubEvent
from .deadline import Deadline
from .health import RedisHealth
from .history import Held, History
from .message import EventPayload, Position
from .redisconn import unavailable

__all__ = ["PubSubHub", "Subscriber", "SubKey"]

#: ``(pattern, channel)``: a subscription as redis knows it.
SubKey = tuple[bool, str]

#: What a SUB or UNSB is answered with while the hub's connection is down (NACK 500).
UNAVAILABLE = "redis unavailable: the server's pub-sub connection is reconnecting"


class Subscriber(Protocol):
    """What the hub needs of a connection."""

    def deliver(self, key: SubKey, event: PubSubEvent) -> None:
        """Queue ``event`` (of subscription ``key``) for the client; must not block."""


class PubSubHub:
    """The pub-sub of one server: see the module's documentation.

    :param broker: the pub-sub broker; :meth:`~juggler.broker.RedisBroker.pubsub` gives the
        redis connection.
    :param confirm_timeout: how long a SUB or UNSB waits for redis' confirmation.
    :param on_bad_event: called (on the hub's thread) for an event whose payload is not a
        juggler event; it is dropped.
    :param health: the process' view of this redis (the server's, when ``broker`` is the
        server's RPC broker too); ``None``: one of the hub's own.
    :param history: the channels whose events a PUB also keeps for recovery (see
        :mod:`juggler.history`); ``None``: none.
    """

    def __init__(
        self,
        broker: Broker,
        confirm_timeout: float = 5.0,
        *,
        name: str = "juggler-server-pubsub",
        logger: Optional[logging.Logger] = None,
        on_bad_event: Any = None,
        health: Optional[RedisHealth] = None,
        history: Optional[History] = None,
    ) -> None:
        self.broker = broker
        #: the channels whose events are kept for recovery (:mod:`juggler.history`), or None
        self.history = history
        self.confirm_timeout = confirm_timeout
        self.name = name
        self.logger = logger or logging.getLogger(__name__)
        self.on_bad_event = on_bad_event
        self.health = health if health is not None else RedisHealth(f"{name} (pub-sub redis)", logger=self.logger)
        # _lock guards the maps and the state below; it is held while an event is handed out,
        # so that an unsubscribe that returned cannot be followed by an event of it.
        self._lock = threading.Lock()
        # every subscription held by a connection, with its members: subscribed in redis, or
        # to be subscribed again once redis is back (reference counts stay through an outage)
        self._subs: dict[SubKey, set[Subscriber]] = {}
        self._by_sub: dict[Subscriber, set[SubKey]] = {}
        # _control serializes what changes redis' subscriptions (first SUB, last UNSB, the
        # restore after a reconnect), so a SUBSCRIBE and an UNSUBSCRIBE of one channel can
        # never cross. It is never held while connecting.
        self._control = threading.Lock()
        self._ps: Optional[PubSubConn] = None  # the connection requests go to; None while down
        self._down = False  # lost, and not restored yet: SUBs fail at once
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()  # close(): the reader's reconnects give up
        self._closed = False
        #: How many times the hub's connection failed, and how many times it was restored.
        self.failures = 0
        self.restores = 0
        # channels with history (the reader's): the last event handed out, and after a restore
        # what the replay handed out already (see _replay)
        self._positions: dict[str, Position] = {}
        self._seams: dict[str, Held] = {}

    # -- subscriptions --

    def subscriptions(self, sub: Optional[Subscriber] = None) -> set[SubKey]:
        """The subscriptions of ``sub``, or every subscription the server holds (in redis, or
        to restore once redis is back)."""
        with self._lock:
            if sub is None:
                return {k for k, members in self._subs.items() if members}
            return set(self._by_sub.get(sub, ()))

    @property
    def connected(self) -> bool:
        """Whether the hub has a redis connection with every subscription on it (or none yet)."""
        return not self._down

    def count(self, sub: Subscriber) -> int:
        """How many subscriptions ``sub`` holds."""
        with self._lock:
            return len(self._by_sub.get(sub, ()))

    def subscribe(self, sub: Subscriber, channel: str, pattern: bool) -> None:
        """Subscribe ``sub``; returns once redis confirmed the server's subscription. Raises
        :class:`BrokerError` (then ``sub`` is not subscribed)."""
        key = (pattern, channel)
        if self._join(sub, key):
            return
        # One deadline for all of it: behind a SUBSCRIBE that redis is slow to confirm (it
        # stalls), then for its own confirmation.
        deadline = Deadline.after(self.confirm_timeout)
        since = self.health.epoch  # (taken before it tries redis: see RedisHealth)
        if not self._control.acquire(timeout=self.confirm_timeout):
            raise BrokerError(f"redis unavailable: no answer to the server's subscriptions in {self.confirm_timeout:g} s")
        try:
            if self._join(sub, key):  # subscribed by another connection meanwhile
                return
            ps = self._connection()
            try:
                ps.subscribe(channel, pattern, timeout=deadline.remaining())
            except BrokerError as exc:
                self._undo(ps, key)
                self._failed_request(exc, since)
                raise
            with self._lock:
                self._subs[key] = {sub}
                self._by_sub.setdefault(sub, set()).add(key)
        finally:
            self._control.release()
        self.health.succeeded(since)  # (redis confirmed a SUBSCRIBE sent since)

    def _join(self, sub: Subscriber, key: SubKey) -> bool:
        with self._lock:
            members = self._subs.get(key)
            if not members:
                return False
            if sub in members:  # subscribed already (and restored with the rest)
                return True
            if self._down:  # held, but not in redis now
                raise BrokerError(UNAVAILABLE)
            members.add(sub)
            self._by_sub.setdefault(sub, set()).add(key)
            return True

    def _undo(self, ps: PubSubConn, key: SubKey) -> None:
        """A SUBSCRIBE that failed or was not confirmed in time may still take effect in redis:
        take it back, best effort, so redis does not stream events nobody wants."""
        try:
            ps.unsubscribe(key[1], key[0], timeout=0)  # (the SUB's NACK does not wait for it)
        except BrokerError as exc:
            self.logger.debug("could not take back an unconfirmed subscription %r: %s", key, exc)

    def unsubscribe(self, sub: Subscriber, channel: str, pattern: bool) -> None:
        """Unsubscribe ``sub`` (nothing happens if it is not subscribed). Once this returns,
        no event of the subscription reaches ``sub``. Raises :class:`BrokerError` if redis
        cannot be told, or the hub is reconnecting, but ``sub`` is unsubscribed all the same
        (and the subscription is not restored)."""
        key = (pattern, channel)
        with self._lock:
            members = self._subs.get(key)
            if not members or sub not in members:
                return
            members.discard(sub)
            self._forget(sub, key)
            last = not members
            reconnecting = self._ps is None and self._down
        if last:
            self._release(key)
        if reconnecting:
            raise BrokerError(UNAVAILABLE)

    def drop(self, sub: Subscriber) -> None:
        """Unsubscribe ``sub`` from everything (its connection closed). Never raises."""
        with self._lock:
            keys = self._by_sub.pop(sub, set())
            empty = []
            for key in keys:
                members = self._subs.get(key)
                if members is not None:
                    members.discard(sub)
                    if not members:
                        empty.append(key)
        for key in empty:
            try:
                self._release(key)
            except BrokerError as exc:
                self.logger.info("could not unsubscribe %r in redis: %s", key, exc)

    def _forget(self, sub: Subscriber, key: SubKey) -> None:
        assert self._lock.locked()
        keys = self._by_sub.get(sub)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_sub[sub]

    def _release(self, key: SubKey) -> None:
        """UNSUBSCRIBE ``key`` in redis if no connection holds it any more (while the hub is
        reconnecting, only forget it: it is not restored)."""
        with self._control:
            with self._lock:
                if self._subs.get(key):  # subscribed again meanwhile
                    return
                self._subs.pop(key, None)
                ps = self._ps
            if not key[0]:
                self._positions.pop(key[1], None)  # (else it keeps every channel ever held)
            if ps is not None:
                ps.unsubscribe(key[1], key[0])

    # -- publishing --

    def publish(self, channel: str, payload: EventPayload) -> int:
        """Publish through the broker, unless redis is known to be down (then
        :class:`BrokerError` at once, but when a turn of the shared backoff is due); what it
        sees of redis goes to :attr:`health`. The number of redis subscribers that got it."""
        health = self.health
        since = health.epoch
        if not health.request_turn(health.cap):
            raise BrokerError("redis unavailable (reconnecting)")
        rule = self.history.rule(channel) if self.history is not None else None
        try:
            if rule is None:
                n = self.broker.publish(channel, payload)
            else:
                n = self.broker.publish_history(channel, payload, rule)[0]
        except BrokerError as exc:
            self._failed_request(exc, since)
            raise
        health.succeeded(since)
        return n

    def _failed_request(self, exc: BrokerError, since: int) -> None:
        if unavailable(exc):
            self.health.failed(exc, since)

    # -- the redis connection and its reader --

    def _connection(self) -> PubSubConn:
        """The connection a SUBSCRIBE goes to: the reader's, or (the first time) a new one and
        its reader. Raises :class:`BrokerError` while redis is down."""
        assert self._control.locked()
        with self._lock:
            if self._closed:
                raise BrokerError("server shutting down")
            if self._down:
                raise BrokerError(UNAVAILABLE)
            ps = self._ps
        if not self.health.request_turn(self.health.cap):  # known to be down: do not wait for it to fail
            raise BrokerError("redis unavailable (reconnecting)")
        if ps is not None:
            return ps
        ps = self.broker.pubsub(self.confirm_timeout)
        thread = threading.Thread(target=self._read, args=(ps,), name=self.name)
        with self._lock:
            self._ps, self._thread = ps, thread
        try:
            thread.start()
        except (RuntimeError, MemoryError) as exc:  # out of threads: this SUB fails, the next one tries again
            with self._lock:
                self._ps = self._thread = None
            ps.close()
            raise BrokerError(f"cannot start the pub-sub reader: {exc}") from exc
        return ps

    def _read(self, ps: PubSubConn) -> None:
        while True:
            try:
                event = ps.get_event(None)
            except ValueError as exc:  # not a juggler event payload
                self.logger.warning("dropping event: %s", exc)
                if self.on_bad_event is not None:
                    self.on_bad_event()
                continue
            except BrokerError as exc:
                next_ps = self._reconnect(ps, exc)
                if next_ps is None:
                    return
                ps = next_ps
                continue
            except Exception as exc:  # a bug: start afresh on a new connection
                self.logger.error("pub-sub reader crashed", exc_info=exc)
                next_ps = self._reconnect(ps, BrokerError(f"pub-sub reader crashed: {exc}"))
                if next_ps is None:
                    return
                ps = next_ps
                continue
            if event is None:  # woken by close()
                return
            # (an event is no sign that redis is back when it was marked down: it may have
            # waited in the socket's buffer while redis stalled. The requests and listeners
            # that try redis in turn find out.)
            try:
                event.evnt_frame  # made once for all: an event JSON cannot carry fails here
            except (TypeError, ValueError) as exc:  # NaN, a lone surrogate (foreign publishers)
                self.logger.warning("dropping event on %r: cannot encode it: %s", event.channel, exc)
                if self.on_bad_event is not None:
                    self.on_bad_event()
                continue
            key = (True, event.pattern) if event.pattern else (False, event.channel)
            if event.payload.offset and not event.pattern and self._replayed(event):
                continue
            with self._lock:
                members = self._subs.get(key)
                if members:
                    for sub in tuple(members):
                        try:
                            sub.deliver(key, event)
                        except Exception:  # a bug must not end every subscription of the server
                            self.logger.exception("pub-sub: delivering an event on %r failed", event.channel)

    def _reconnect(self, ps: PubSubConn, exc: BrokerError) -> Optional[PubSubConn]:
        """(The reader, when ``ps`` failed.) Connect again, with the shared backoff, and
        restore every subscription held; the new connection, or ``None`` once closed."""
        with self._control:  # (a SUB waiting on ps was woken by its failure)
            with self._lock:
                if self._closed:
                    return None  # close() closes ps
                self._ps = None
                self._down = True
                self.failures += 1
                held = sum(1 for members in self._subs.values() if members)
        _close_quietly(ps, self.logger)
        # the process' one log line for the outage is the health's
        self.logger.debug("pub-sub connection to redis failed (%s): %d subscriptions to restore", exc, held)
        self.health.failed(exc)
        health = self.health
        tries = 0
        while True:
            if tries and health.up:
                # redis answers others, not this connection (a cluster node that is down, an
                # error reply): a backoff of its own, since wait_turn would not wait
                if self._stop.wait(min(health.cap, health.base * 2**tries)):
                    return None
            if not health.wait_turn(self._stop):
                return None
            tries += 1
            since = health.epoch
            new = self.broker.pubsub(self.confirm_timeout)
            try:
                new.connect()  # (not under _control: a SUB or UNSB does not wait for it)
            except BrokerError as exc:
                _close_quietly(new, self.logger)
                health.failed(exc, since)
                continue
            with self._control:
                with self._lock:
                    if self._closed:
                        _close_quietly(new, self.logger)
                        return None
                    self._ps = new
                    keys = [k for k, members in self._subs.items() if members]
                try:
                    new.restore(keys, functools.partial(self._restored, new, len(keys), since))
                except BrokerError as exc:
                    with self._lock:
                        self._ps = None
                    _close_quietly(new, self.logger)
                    health.failed(exc, since)
                    continue
            return new

    def _restored(self, ps: PubSubConn, n: int, since: int) -> None:
        """(The reader.) Redis confirmed every subscription the reconnect restored, on a
        connection made at ``since`` (:attr:`RedisHealth.epoch`)."""
        with self._lock:
            if self._ps is not ps:
                return
            self._down = False
            self.restores += 1
        if n:  # (with none to restore, nothing was awaited: the PING's answer is not read yet)
            self.health.succeeded(since)
        self.logger.debug("pub-sub connection to redis restored, with %d subscriptions", n)
        if self._positions:
            self._replay()

    def _replayed(self, event: PubSubEvent) -> bool:
        """(The reader, for an event of a channel with history.) Whether the replay after a
        restore handed it out already; else it is the channel's last position."""
        if self.history is None:
            return False
        seam = self._seams.get(event.channel)
        if seam is not None:
            if seam.behind(event):
                return True
            if seam.passed:
                del self._seams[event.channel]
        self._positions[event.channel] = Position(event.payload.offset, event.payload.epoch)
        return False

    def _replay(self) -> None:
        """(The reader, once a reconnect restored the subscriptions.) Hand the events of the
        channels with history published while the hub was not subscribed to the connections
        that hold them, from the history. When they cannot be recovered, those connections are
        closed (1012), so that their clients reconnect and are told of the gap."""
        assert self.history is not None
        with self._lock:
            held = {k[1]: tuple(m) for k, m in self._subs.items() if m and not k[0] and k[1] in self._positions}
        for channel in set(self._positions) - set(held):  # (given back meanwhile)
            del self._positions[channel]
        for channel, members in held.items():
            rule = self.history.rule(channel)
            try:
                read = self.broker.read_history(channel, rule, self._positions[channel]) if rule else None
            except BrokerError as exc:
                read = None
                self.logger.info("pub-sub: reading the history of %r after a reconnect failed: %s", channel, exc)
            if read is None or not read.recovered:
                self.logger.warning("pub-sub: events of %r published while reconnecting to redis cannot be recovered: "
                                    "closing its %d subscribed connection(s) (1012)", channel, len(members))  # fmt: skip
                for sub in members:
                    getattr(sub, "close", lambda *a: None)(1012, "events lost while the server reconnected to redis")
                continue
            self._hand_out(channel, read.events)
            seam = Held(0)
            seam.take()
            seam.read(read.position)
            self._seams[channel] = seam
            self._positions[channel] = read.position

    def _hand_out(self, channel: str, events: Sequence[EventPayload]) -> None:
        key = (False, channel)
        for payload in events:
            event = PubSubEvent(channel, "", payload)
            with self._lock:
                for sub in tuple(self._subs.get(key, ())):
                    try:
                        sub.deliver(key, event)
                    except Exception:  # a bug must not end every subscription of the server
                        self.logger.exception("pub-sub: delivering an event on %r failed", channel)

    def close(self) -> None:
        """Stop the reader, join it and close the redis connection. Idempotent."""
        with self._control:
            with self._lock:
                self._closed = True
                ps, thread = self._ps, self._thread
                self._ps = self._thread = None
                self._subs.clear()
                self._by_sub.clear()
        self._stop.set()
        self.health.wake()  # a reader waiting for its turn to reconnect
        if ps is not None:
            ps.wake()
        if thread is not None:
            thread.join()
        if ps is not None:
            _close_quietly(ps, self.logger)


def _close_quietly(ps: PubSubConn, logger: logging.Logger) -> None:
    try:
        ps.close()
    except Exception:
        logger.exception("could not close the pub-sub redis connection")

