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

When the redis pub-sub connection fails, every connection with a subscription is told
(:meth:`Subscriber.pubsub_failed`) and the hub starts afresh on the next SUB.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional, Protocol

from .broker import Broker, BrokerError, PubSubConn, PubSubEvent

__all__ = ["PubSubHub", "Subscriber", "SubKey"]

#: ``(pattern, channel)``: a subscription as redis knows it.
SubKey = tuple[bool, str]


class Subscriber(Protocol):
    """What the hub needs of a connection."""

    def deliver(self, key: SubKey, event: PubSubEvent) -> None:
        """Queue ``event`` (of subscription ``key``) for the client; must not block."""

    def pubsub_failed(self, exc: BrokerError) -> None:
        """The redis pub-sub connection failed: the subscriptions are gone."""


class PubSubHub:
    """The pub-sub of one server: see the module's documentation.

    :param broker: the pub-sub broker; :meth:`~juggler.broker.RedisBroker.pubsub` gives the
        redis connection.
    :param confirm_timeout: how long a SUB or UNSB waits for redis' confirmation.
    :param on_bad_event: called (on the hub's thread) for an event whose payload is not a
        juggler event; it is dropped.
    """

    def __init__(
        self,
        broker: Broker,
        confirm_timeout: float = 5.0,
        *,
        name: str = "juggler-server-pubsub",
        logger: Optional[logging.Logger] = None,
        on_bad_event: Any = None,
    ) -> None:
        self.broker = broker
        self.confirm_timeout = confirm_timeout
        self.name = name
        self.logger = logger or logging.getLogger("juggler.server")
        self.on_bad_event = on_bad_event
        # _lock guards the maps below; it is held while an event is handed out, so that an
        # unsubscribe that returned cannot be followed by an event of it.
        self._lock = threading.Lock()
        self._subs: dict[SubKey, set[Subscriber]] = {}  # subscribed in redis, with members
        self._by_sub: dict[Subscriber, set[SubKey]] = {}
        # _control serializes what changes redis' subscriptions (first SUB, last UNSB), so a
        # SUBSCRIBE and an UNSUBSCRIBE of one channel can never cross.
        self._control = threading.Lock()
        self._ps: Optional[PubSubConn] = None
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    # -- subscriptions --

    def subscriptions(self, sub: Optional[Subscriber] = None) -> set[SubKey]:
        """The subscriptions of ``sub``, or every subscription the server holds in redis."""
        with self._lock:
            if sub is None:
                return {k for k, members in self._subs.items() if members}
            return set(self._by_sub.get(sub, ()))

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
        with self._control:
            if self._join(sub, key):  # subscribed by another connection meanwhile
                return
            ps = self._connection()
            try:
                ps.subscribe(channel, pattern)
            except BrokerError:
                self._undo(ps, key)
                raise
            with self._lock:
                self._subs[key] = {sub}
                self._by_sub.setdefault(sub, set()).add(key)

    def _join(self, sub: Subscriber, key: SubKey) -> bool:
        with self._lock:
            members = self._subs.get(key)
            if not members:
                return False
            members.add(sub)
            self._by_sub.setdefault(sub, set()).add(key)
            return True

    def _undo(self, ps: PubSubConn, key: SubKey) -> None:
        """A SUBSCRIBE that failed or was not confirmed in time may still take effect in redis:
        take it back, best effort, so redis does not stream events nobody wants."""
        try:
            ps.unsubscribe(key[1], key[0])
        except BrokerError as exc:
            self.logger.debug("could not take back an unconfirmed subscription %r: %s", key, exc)

    def unsubscribe(self, sub: Subscriber, channel: str, pattern: bool) -> None:
        """Unsubscribe ``sub`` (nothing happens if it is not subscribed). Once this returns,
        no event of the subscription reaches ``sub``. Raises :class:`BrokerError` if redis
        cannot be told, but ``sub`` is unsubscribed all the same."""
        key = (pattern, channel)
        with self._lock:
            members = self._subs.get(key)
            if not members or sub not in members:
                return
            members.discard(sub)
            self._forget(sub, key)
            if members:
                return
        self._release(key)

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
        """UNSUBSCRIBE ``key`` in redis if no connection holds it any more."""
        with self._control:
            with self._lock:
                if self._subs.get(key):  # subscribed again meanwhile
                    return
                self._subs.pop(key, None)
                ps = self._ps
            if ps is not None:
                ps.unsubscribe(key[1], key[0])

    # -- the redis connection and its reader --

    def _connection(self) -> PubSubConn:
        assert self._control.locked()
        with self._lock:
            if self._closed:
                raise BrokerError("server shutting down")
            if self._ps is not None:
                return self._ps
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
                self._failed(ps, exc)
                return
            except Exception as exc:  # a bug: the subscriptions cannot be served any more
                self.logger.error("pub-sub reader crashed", exc_info=exc)
                self._failed(ps, BrokerError(f"pub-sub reader crashed: {exc}"))
                return
            if event is None:  # woken by close()
                return
            try:
                event.evnt_frame  # made once for all: an event JSON cannot carry fails here
            except (TypeError, ValueError) as exc:  # NaN, a lone surrogate (foreign publishers)
                self.logger.warning("dropping event on %r: cannot encode it: %s", event.channel, exc)
                if self.on_bad_event is not None:
                    self.on_bad_event()
                continue
            key = (True, event.pattern) if event.pattern else (False, event.channel)
            with self._lock:
                members = self._subs.get(key)
                if members:
                    for sub in tuple(members):
                        try:
                            sub.deliver(key, event)
                        except Exception:  # a bug must not end every subscription of the server
                            self.logger.exception("pub-sub: delivering an event on %r failed", event.channel)

    def _failed(self, ps: PubSubConn, exc: BrokerError) -> None:
        with self._control:
            with self._lock:
                if self._ps is not ps:
                    return
                self._ps = self._thread = None
                subs = list(self._by_sub)
                self._subs.clear()
                self._by_sub.clear()
            if not self._closed:
                self.logger.error("pub-sub connection to redis failed: %s", exc)
            _close_quietly(ps, self.logger)
        for sub in subs:
            sub.pubsub_failed(exc)

    def close(self) -> None:
        """Stop the reader, join it and close the redis connection. Idempotent."""
        with self._control:
            with self._lock:
                self._closed = True
                ps, thread = self._ps, self._thread
                self._ps = self._thread = None
                self._subs.clear()
                self._by_sub.clear()
        if ps is None:
            return
        ps.wake()
        if thread is not None:
            thread.join()
        _close_quietly(ps, self.logger)


def _close_quietly(ps: PubSubConn, logger: logging.Logger) -> None:
    try:
        ps.close()
    except Exception:
        logger.exception("could not close the pub-sub redis connection")

