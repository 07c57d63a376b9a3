"""An in-memory redis served over TCP, for demos, tests and single-process deployments.

:class:`EmbeddedRedis` serves a fakeredis server on ``127.0.0.1`` so that callees and servers in
*other processes* can join it with an ordinary ``redis://`` URL. It keeps nothing on disk and
is gone when the process stops: use a real redis for anything that must survive a restart.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import fakeredis
from fakeredis import TcpFakeServer

__all__ = ["EmbeddedRedis"]


class EmbeddedRedis:
    """A fakeredis server on ``host:port`` (0: a free port), started by :meth:`start`.

    ``url`` is its ``redis://`` URL. :meth:`client` gives an in-process client that shares its
    data without going through TCP. ``close()`` is idempotent.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        # TcpFakeServer's connection threads stop when it shuts down, and server_close() joins
        # them, so close() leaves no thread behind even with clients still connected.
        self._tcp = TcpFakeServer((host, port), server_type="redis")
        self.host, self.port = self._tcp.server_address[:2]
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> "EmbeddedRedis":
        with self._lock:
            if self._closed:
                raise RuntimeError("embedded redis was closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._tcp.serve_forever, kwargs={"poll_interval": 0.1}, name="juggler-embedded-redis"
                )
                self._thread.start()
        return self

    def client(self, **kwargs: Any) -> "fakeredis.FakeRedis":
        """An in-process client of the same data (no TCP round trips)."""
        return fakeredis.FakeRedis(server=self._tcp.fake_server, **kwargs)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._tcp.shutdown()
            thread.join()
        self._tcp.server_close()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
