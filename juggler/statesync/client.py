"""Connecting to a state-sync server (hat-juggler's ``connect``)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

from ..client import open_websocket
from ..timer import Timer
from ..transport import SocketIO, SocketReader
from .connection import Connection, Settings, check_autoflush_delay

__all__ = ["connect"]


def connect(
    url: str,
    *,
    autoflush_delay: Optional[float] = 0.2,
    connect_timeout: float = 10.0,
    headers: Optional[dict[str, str]] = None,
    logger: Optional[logging.Logger] = None,
    sslopt: Optional[dict[str, Any]] = None,
    **settings: Any,
) -> Connection:
    """Open a state-sync connection to ``url`` (``ws://host:port/path`` or ``wss://...``).

    ``autoflush_delay`` is as for :meth:`Connection.set_local_data`. ``sslopt`` goes to
    ``websocket-client`` (e.g. ``{"ca_certs": "server.pem"}``); other keyword arguments are
    the limits of :class:`~juggler.statesync.connection.Settings`. Raises
    :class:`~juggler.exceptions.HandshakeError` when the server refuses the websocket,
    :class:`OSError` when it cannot be reached.

    The connection runs a reader, a writer and a timer thread; :meth:`Connection.close`
    stops and joins them.
    """
    s = Settings(**settings)
    logger = logger or logging.getLogger("juggler.statesync")
    check_autoflush_delay(autoflush_delay)
    ws = open_websocket(url, None, headers, connect_timeout, **({"sslopt": sslopt} if sslopt else {}))
    io = SocketIO(ws.sock, s.write_timeout)
    timer = Timer("juggler-statesync-client-timer", logger)

    def release() -> None:
        timer.stop()
        ws.shutdown()  # closes the socket, now that nothing uses it

    conn = Connection(io, SocketReader(io), client=True, settings=s, timer=timer, autoflush_delay=autoflush_delay,
                      remote_addr=url, logger=logger, release=release)  # fmt: skip
    timer.name = f"juggler-statesync-{conn.id}-timer"
    timer.start()
    # A daemon thread: a script that forgets close() can still exit; close() joins it.
    reader = conn.owned_reader = threading.Thread(
        target=conn.run, name=f"juggler-statesync-{conn.id}-reader", daemon=True
    )
    reader.start()
    return conn
