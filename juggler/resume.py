"""A client subscription's place in its channel's history, to recover after a reconnect.

A :class:`~juggler.Subscription` of a channel with history (see :mod:`juggler.history`)
remembers the position (offset and epoch) of the last event it got, or the one its SUB's ACK
gave. After a reconnect, :class:`~juggler.Client` subscribes again with ``since`` that
position: the server sends what was missed, then the live events. When it cannot (the
history lost or trimmed past it, a pattern subscription), the ACK says ``"recovered":
false`` and the gap is reported: :attr:`Resume.gaps` counts it, a WARNING line on the
client's logger says it, and ``on_gap(subscription)`` is called.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

from .message import Ack, Evnt, Position

__all__ = ["Resume"]


class Resume:
    """The recovery state of one subscription (its client's reader thread updates it)."""

    __slots__ = ("position", "gaps", "on_gap", "_lock")

    def __init__(self, on_gap: Optional[Callable[[Any], None]] = None) -> None:
        #: The last event's position, or the subscription's start; ``None``: no history.
        self.position: Optional[Position] = None
        #: How many times a reconnect could not recover the events missed meanwhile.
        self.gaps = 0
        self.on_gap = on_gap
        self._lock = threading.Lock()

    def started(self, ack: Ack) -> None:
        """The SUB was ACKed: where the subscription starts, unless an event came first."""
        if ack.position is not None:
            with self._lock:
                if self.position is None:
                    self.position = ack.position

    def seen(self, evnt: Evnt) -> None:
        """(The reader.) An event of the subscription arrived."""
        if evnt.offset:
            with self._lock:
                self.position = Position(evnt.offset, evnt.epoch)

    def since(self) -> Optional[Position]:
        """What to resubscribe with after a reconnect."""
        with self._lock:
            return self.position

    def resumed(self, sub: Any, since: Optional[Position], ack: Ack, logger: logging.Logger) -> None:
        """(The reader.) The SUB sent after a reconnect, with ``since``, was ACKed."""
        if since is None or ack.recovered:
            self.started(ack)
            return
        with self._lock:
            self.gaps += 1
            self.position = ack.position
        logger.warning("subscription to %r: events published while reconnecting are lost (the server could not "
                       "recover them from offset %s of epoch %s)", sub.channel, since.offset, since.epoch)  # fmt: skip
        if self.on_gap is not None:
            try:
                self.on_gap(sub)
            except Exception:  # the application's bug must not stop the client's reader
                logger.exception("subscription to %r: on_gap callback failed", sub.channel)
