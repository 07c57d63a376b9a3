"""Opening a client's websocket: the URL check, the handshake (made by ``websocket-client``),
and dialing again with capped exponential backoff.

:class:`~juggler.client.Client`, ``juggler.statesync.connect`` and ``juggler load`` open their
connections here; once open, their frames are read and written by juggler's own
:class:`~juggler.peer.Peer` and :mod:`juggler.transport`.
"""

from __future__ import annotations

import logging
import random
import time
import urllib.parse
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import websocket

from .deadline import Deadline
from .exceptions import ConnectionClosed, HandshakeError
from .message import SUBPROTOCOL

if TYPE_CHECKING:
    from .client import Client

__all__ = ["check_url", "open_websocket", "dial_until", "Redial", "backoff_delays", "FINAL_REFUSALS"]


def check_url(url: str) -> str:
    """``url`` when it is a websocket URL (``ws://HOST[:PORT]/PATH`` or ``wss://...``);
    otherwise :class:`ValueError`, with what is wrong and what the URL probably should be."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a websocket URL: {exc}") from None
    if parts.scheme in ("http", "https") and parts.hostname:
        scheme = "wss" if parts.scheme == "https" else "ws"
        raise ValueError(f"{url!r} is an HTTP URL: a juggler server's websocket URL starts with {scheme}://, "
                         f"e.g. {scheme}://{parts.netloc}{parts.path or '/ws'}")  # fmt: skip
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        hint = f"ws://{url}/ws" if "//" not in url and ":" in url else "ws://127.0.0.1:9000/ws"
        raise ValueError(f"{url!r} is not a websocket URL (ws://HOST:PORT/PATH or wss://...), e.g. {hint}")
    return url


def open_websocket(
    url: str,
    subprotocols: Optional[list[str]] = None,
    headers: Optional[dict[str, str]] = None,
    connect_timeout: float = 10.0,
    **ws_options: Any,
) -> websocket.WebSocket:
    """Connect to ``url`` and make the handshake with ``websocket-client``; the socket is left
    blocking with no timeout, for :class:`~juggler.transport.SocketIO` to read and write.

    Raises :class:`~juggler.exceptions.HandshakeError` when the server refuses the handshake,
    :class:`OSError` when it cannot be reached. ``ws_options`` go to
    ``websocket.create_connection`` (e.g. ``sslopt``).
    """
    # websocket-client invents an Origin header unless told not to: a script is no
    # browser, so send one only when the caller gives it.
    origin = None
    header = []
    for k, v in (headers or {}).items():
        if k.lower() == "origin":
            origin = v
        else:
            header.append(f"{k}: {v}")
    if origin is not None:
        ws_options.setdefault("origin", origin)
    else:
        ws_options.setdefault("suppress_origin", True)
    if subprotocols:
        ws_options["subprotocols"] = subprotocols
    try:
        ws = websocket.create_connection(url, timeout=connect_timeout, header=header, enable_multithread=True, **ws_options)
    except websocket.WebSocketBadStatusException as exc:
        body = exc.resp_body.decode("utf-8", "replace").strip() if exc.resp_body else ""
        raise HandshakeError(f"server refused the handshake: {exc.status_code} {body}".strip(), exc.status_code) from None
    except websocket.WebSocketException as exc:
        raise HandshakeError(f"websocket handshake failed: {exc}") from None
    ws.settimeout(None)  # the reader blocks; closing shuts the socket down
    return ws


#: Handshake refusals that another try will not change (as juggler.js has them): the first
#: connect of a reconnecting client does not retry them.
FINAL_REFUSALS = frozenset({400, 401, 403, 404, 405, 426})


def dial_until(url: str, headers: dict[str, str], timeout: float, max_delay: float, logger: logging.Logger,
                ws_options: dict[str, Any]) -> websocket.WebSocket:  # fmt: skip
    """The first connect of ``Client.connect(reconnect=True)``: dial, backing off as a
    reconnect does, until ``timeout`` seconds have passed; then the last error is raised."""
    deadline = Deadline.after(timeout)
    for attempt, delay in enumerate(backoff_delays(0.1, max_delay), 1):
        try:
            return open_websocket(url, [SUBPROTOCOL], headers, max(0.001, deadline.remaining()), **ws_options)
        except (HandshakeError, OSError) as exc:
            left = deadline.remaining()
            if isinstance(exc, HandshakeError) and exc.status in FINAL_REFUSALS or left <= 0:
                raise
            logger.info("client: connecting to %s failed (attempt %d): %s; trying again for %.1f s",
                        url, attempt, exc, left)  # fmt: skip
        time.sleep(min(delay, left))  # nothing to wake it: no client exists yet to close
    raise AssertionError("unreachable")  # pragma: no cover - backoff_delays never ends


class Redial:
    """What a reconnecting client needs: where and how to dial again, and whom to tell."""

    def __init__(
        self,
        url: str,
        dial: Callable[[], websocket.WebSocket],
        max_delay: float,
        hook: Optional[Callable[["Client", Optional[ConnectionClosed]], None]],
    ) -> None:
        self.url = url
        self.dial = dial
        self.max_delay = max_delay
        self.hook = hook

    def notify(self, client: "Client", lost: Optional[ConnectionClosed]) -> None:
        if self.hook is not None:
            try:
                self.hook(client, lost)
            except Exception:  # the hook's bug must not stop the reconnecting
                client.logger.exception("client %d: on_reconnect hook failed", client.id)


def backoff_delays(first: float, cap: float, rng: Callable[[], float] = random.random) -> Iterator[float]:
    """Capped exponential backoff with jitter: ``first``, doubling up to ``cap``, each delay
    drawn between half and all of it (``rng()`` in [0, 1))."""
    delay = min(first, cap)
    while True:
        yield delay * (0.5 + rng() / 2)
        delay = min(cap, delay * 2)
