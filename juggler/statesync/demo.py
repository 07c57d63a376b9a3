"""``juggler statesync-demo``: a counter shared by every open page, kept in sync with DATA.

Each connection's local data (what its page shows) is ``{"counter": N, "clients": [{"id": ID,
"name": NAME}, ...], "you": ID}``; a page's own local data is ``{"name": NAME}``, and its RPC
actions are ``increment(by)`` and ``reset()``. The page is ``static/index.html`` beside this
module: plain JavaScript that applies the patches and makes its own.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

from ..exceptions import ConnectionClosed
from .connection import Connection
from .rpc import RpcConnection
from .server import Server, listen

__all__ = ["STATIC_DIR", "Demo", "serve_demo"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_NAME = 40


class Demo:
    """The demo's shared state and what each connection does with it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counter = 0
        self._conns: dict[Connection, str] = {}

    def on_connection(self, conn: Connection) -> None:
        RpcConnection(conn, {"increment": self.increment, "reset": self.reset})
        with self._lock:
            self._conns[conn] = ""
        conn.register_change_cb(lambda: self._renamed(conn))
        conn.add_close_hook(lambda: self._left(conn))
        self.publish()

    def increment(self, by: Any = 1) -> int:
        if isinstance(by, bool) or not isinstance(by, int) or not -1000 <= by <= 1000:
            raise ValueError("increment takes a whole number from -1000 to 1000")
        with self._lock:
            self.counter += by
        self.publish()
        return self.counter

    def reset(self) -> int:
        with self._lock:
            self.counter = 0
        self.publish()
        return 0

    def _renamed(self, conn: Connection) -> None:
        data = conn.remote_data
        name = data.get("name") if isinstance(data, dict) else None
        name = name[:MAX_NAME] if isinstance(name, str) else ""
        with self._lock:
            if conn not in self._conns or self._conns[conn] == name:
                return
            self._conns[conn] = name
        self.publish()

    def _left(self, conn: Connection) -> None:
        with self._lock:
            self._conns.pop(conn, None)
        self.publish()

    def publish(self) -> None:
        """Give every connection the current state (each page sees which client it is). Under
        the lock, so that an older state never overwrites a newer one; set_local_data does not
        wait (autoflush_delay > 0: the writer sends the patch)."""
        with self._lock:
            clients = [{"id": c.id, "name": name} for c, name in sorted(self._conns.items(), key=lambda item: item[0].id)]
            for conn in self._conns:
                try:
                    conn.set_local_data({"counter": self.counter, "clients": clients, "you": conn.id})
                except ConnectionClosed:
                    pass


def serve_demo(host: str = "127.0.0.1", port: int = 0, *, ws_path: str = "/ws", certfile: Optional[str] = None,
               keyfile: Optional[str] = None, **kwargs: Any) -> Server:  # fmt: skip
    """Start the demo's server: the page at ``/`` (redirected to ``/index.html``), the
    websocket at ``ws_path`` (the page finds it with ``?ws=PATH``, default ``/ws``)."""
    demo = Demo()
    server = listen(host, port, demo.on_connection, ws_path=ws_path, static_dir=STATIC_DIR,
                    index_path=f"/index.html?ws={ws_path}" if ws_path != "/ws" else "/index.html",
                    certfile=certfile, keyfile=keyfile, autoflush_delay=0.05, **kwargs)  # fmt: skip
    server.demo = demo  # type: ignore[attr-defined]
    return server
