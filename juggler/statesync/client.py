"""Connecting to a state-sync server (hat-juggler's ``connect``), and waiting for the peer's
data (:func:`wait_remote_data`)."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Callable, Optional

from ..dial import open_websocket
from ..exceptions import ConnectionClosed, JugglerTimeout
from ..frames import CloseCode
from ..timer import Timer
from ..transport import SocketIO, SocketReader
from .connection import Connection, Settings, check_autoflush_delay

__all__ = ["connect", "wait_remote_data"]


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
    logger = logger or logging.getLogger(__name__)
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


def wait_remote_data(
    conn: Connection, until: Optional[Callable[[Any], Any]] = None, timeout: Optional[float] = None
) -> Any:
    """Block until ``conn.remote_data`` is what ``until(data)`` accepts (default: any data, not
    ``None``, which it is until the peer's first ``DATA``) and return it, waiting up to
    ``timeout`` seconds (``None``: for as long as it takes).

    Raises :class:`~juggler.exceptions.JugglerTimeout` (a :class:`TimeoutError`) when
    ``timeout`` passes first, :class:`~juggler.exceptions.ConnectionClosed` when the
    connection is over first. Any connection will do, a client's or one a server was given;
    ``until`` runs on the calling thread and on the connection's reader thread, so it should
    be quick.
    """
    test = until or (lambda data: data is not None)
    watch = _RemoteWatch.of(conn)
    if conn.closed:
        # Closing: a close hook registered now may miss the teardown that runs them (it takes
        # them all before the connection is over), so wait for the end itself; data that comes
        # meanwhile is there then.
        in_time = test(conn.remote_data) or conn.wait_closed(timeout)
        data = conn.remote_data
    else:  # open when the hook was registered: it runs, and wakes us, once the connection is over
        with watch.cond:
            in_time = watch.cond.wait_for(lambda: test(conn.remote_data) or watch.over, timeout)
            data = conn.remote_data
    if test(data):
        return data
    if not in_time:
        raise JugglerTimeout(f"no such remote data within {timeout} s: {data!r}")
    raise ConnectionClosed(conn.close_code or CloseCode.ABNORMAL_CLOSURE, conn.close_reason)


class _RemoteWatch:
    """Wakes the threads waiting in :func:`wait_remote_data` on one connection: at each change
    of its remote data, and once it is over. One per connection (a change callback and a close
    hook of its own), made at the first wait and gone with the connection."""

    _all: "weakref.WeakKeyDictionary[Connection, _RemoteWatch]" = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.over = False

    @classmethod
    def of(cls, conn: Connection) -> "_RemoteWatch":
        with cls._lock:
            watch = cls._all.get(conn)
            if watch is None:
                watch = cls._all[conn] = cls()
                conn.register_change_cb(watch._changed)
                conn.add_close_hook(watch._ended)  # at once if it is over already
        return watch

    def _changed(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _ended(self) -> None:
        with self.cond:
            self.over = True
            self.cond.notify_all()
