"""A TCP proxy for fault tests: it sits between juggler and redis and can hold back or drop
what redis answers.

- :meth:`Proxy.hold` / :meth:`Proxy.release`: redis' replies wait in the proxy (commands still
  reach redis), e.g. to make a SUBSCRIBE's confirmation late;
- :meth:`Proxy.drop_reply_after`: the next command that contains some bytes reaches redis, and
  redis runs it, but its reply is dropped and that connection is cut: a reply lost after the
  command ran, the case where a retried command would run twice.

``with Proxy(port) as proxy:`` listens on a free port of 127.0.0.1 (``proxy.url``); leaving the
block closes every connection and joins every thread.
"""

from __future__ import annotations

import socket
import threading
from typing import Optional


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.drop_next_reply = False

    def cut(self) -> None:
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Proxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._lock = threading.Lock()
        self._flowing = threading.Event()  # replies pass (cleared by hold())
        self._flowing.set()
        self._drop_marker: Optional[bytes] = None
        self.dropped = threading.Event()  # set once a reply was dropped
        self._pairs: list[_Pair] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._start(self._accept, "proxy-accept")

    def __enter__(self) -> "Proxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hold(self) -> None:
        """Keep redis' replies in the proxy until :meth:`release`."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def drop_reply_after(self, marker: bytes) -> None:
        """Let the next command containing ``marker`` through, drop its reply and cut its
        connection (once)."""
        with self._lock:
            self._drop_marker = marker
            self.dropped.clear()

    def cut_all(self) -> None:
        """Cut every connection now (as a redis restart would)."""
        with self._lock:
            pairs = list(self._pairs)
        for p in pairs:
            p.cut()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._flowing.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.cut_all()
        while True:
            with self._lock:
                threads, self._threads = self._threads, []
            if not threads:
                break
            for t in threads:
                t.join()
        self._listener.close()
        with self._lock:
            for p in self._pairs:
                p.client.close()
                p.upstream.close()
            self._pairs.clear()

    # -- threads --

    def _start(self, target, name: str, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                if self._closed:
                    pair.cut()
                    client.close()
                    upstream.close()
                    return
                self._pairs.append(pair)
            self._start(self._pump, "proxy-commands", pair, True)
            self._start(self._pump, "proxy-replies", pair, False)

    def _pump(self, pair: _Pair, commands: bool) -> None:
        """Forward client -> redis (``commands``) or redis -> client, until either side ends."""
        src, dst = (pair.client, pair.upstream) if commands else (pair.upstream, pair.client)
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                pair.cut()
                return
            if commands:
                with self._lock:
                    marker = self._drop_marker
                    if marker is not None and marker in data:
                        self._drop_marker = None
                        pair.drop_next_reply = True
            else:
                self._flowing.wait()
                if pair.drop_next_reply:
                    self.dropped.set()
                    pair.cut()
                    return
            try:
                dst.sendall(data)
            except OSError:
                pair.cut()
                return
