"""The state-sync server: websockets on ``ws_path``, static files and a redirect on the rest.

It speaks HTTP/1.1 through the websocket layer the juggler server uses
(:mod:`juggler.transport`, :mod:`juggler.handshake`): one request per TCP connection, then
either a websocket (a :class:`~juggler.statesync.connection.Connection` served on that
connection's thread) or a plain response and the end of the connection.

Threads, named ``juggler-statesync-...``: the accept loop (blocks in ``accept()``) and one
thread per TCP connection (its reader, once it is a websocket), both a
:class:`~juggler.listener.Listener`'s; the server's timer; and per websocket a writer and a
thread that runs ``on_connection``. :meth:`Server.close` stops and joins them all.
"""

from __future__ import annotations

import functools
import logging
import mimetypes
import os
import socket
import ssl
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..exceptions import ProtocolError, Refusal
from ..handshake import HandshakeRequest, check_upgrade, http_response, switching_protocols
from ..listener import Listener, shut
from ..timer import Timer
from ..transport import SocketIO, SocketReader, Stopped
from ..frames import CloseCode
from .connection import Connection, PatchCache, Settings, check_autoflush_delay

__all__ = ["Server", "listen"]

_REQUEST_HEAD_LIMIT = 16384
_FILE_CHUNK = 65536
_STATUS_TEXT = {200: "OK", 302: "Found", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                503: "Service Unavailable"}  # fmt: skip


class Server:
    """A state-sync server; :func:`listen` makes and starts one.

    ``on_connection(conn)`` is called with each new :class:`Connection`, on a thread of that
    connection (so it may block, e.g. iterating over ``conn`` for its messages; the connection
    ends only when it has returned too). An exception in it is logged and closes that
    connection with 1011.
    """

    def __init__(
        self,
        host: str,
        port: int,
        on_connection: Callable[[Connection], Any],
        *,
        ws_path: str = "/ws",
        static_dir: Union[str, os.PathLike, None] = None,
        index_path: Optional[str] = "/index.html",
        certfile: Optional[str] = None,
        keyfile: Optional[str] = None,
        autoflush_delay: Optional[float] = 0.2,
        max_connections: int = 1024,
        handshake_timeout: float = 10.0,
        patch_cache_size: int = 16,
        logger: Optional[logging.Logger] = None,
        **settings: Any,
    ) -> None:
        if not ws_path.startswith("/"):
            raise ValueError(f"ws_path must start with '/', got {ws_path!r}")
        if index_path is not None and not index_path.startswith("/"):
            raise ValueError(f"index_path must start with '/', got {index_path!r}")
        if (certfile is None) != (keyfile is None):
            raise ValueError("certfile and keyfile go together")
        if max_connections < 0:
            raise ValueError(f"max_connections must be >= 0 (0: no limit), got {max_connections!r}")
        if not handshake_timeout > 0:
            raise ValueError(f"handshake_timeout must be a positive number of seconds, got {handshake_timeout!r}")
        self.settings = Settings(**settings)
        self.autoflush_delay = check_autoflush_delay(autoflush_delay)
        self.on_connection = on_connection
        self.ws_path = ws_path
        self.static_dir = Path(static_dir).resolve() if static_dir is not None else None
        if self.static_dir is not None and not self.static_dir.is_dir():
            raise ValueError(f"static_dir {static_dir} is not a directory")
        self.index_path = index_path
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.logger = logger or logging.getLogger(__name__)
        #: the DATA patches the connections send, each made once (see the PatchCache)
        self.patches = PatchCache(patch_cache_size, frames=True, logger=self.logger)
        self.ssl_context: Optional[ssl.SSLContext] = None
        if certfile is not None:
            self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ssl_context.load_cert_chain(certfile, keyfile)

        # a thread per TCP connection; registered: the sockets in their handshake (shut down
        # at close) and the open connections (closed with 1001)
        self._listener = Listener(host, port, self._serve_socket, name="juggler-statesync-accept",
                                  conn_name="juggler-statesync-conn-{host}:{port}", logger=self.logger,
                                  max_threads=max_connections, tls=self.ssl_context is not None)  # fmt: skip
        self.host, self.port = host, self._listener.port
        self.timer = Timer("juggler-statesync-timer", self.logger)

    def __repr__(self) -> str:
        return f"<statesync.Server {self.url}>"

    @property
    def url(self) -> str:
        """The websocket URL, e.g. ``ws://127.0.0.1:PORT/ws``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{host}:{self.port}{self.ws_path}"

    @property
    def http_url(self) -> str:
        """The server's root over HTTP(S), e.g. ``http://127.0.0.1:PORT/``."""
        return self.url.replace("ws", "http", 1)[: -len(self.ws_path)] + "/"

    @property
    def connections(self) -> list[Connection]:
        """The open websocket connections (a snapshot)."""
        return [m for m in self._listener.members() if isinstance(m, Connection)]

    def start(self) -> "Server":
        """Accept connections on a thread of its own; returns at once."""
        if self._listener.start(before=self.timer.start):
            self.logger.info("statesync server listening on %s", self.url)
        return self

    def close(self) -> None:
        """Stop accepting, close every connection with 1001 and join every thread. Idempotent."""
        if self._listener.close(after_join=self.timer.stop):
            self.logger.info("statesync server on %s stopped", self.url)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- connections --

    def _serve_socket(self, sock: socket.socket, addr: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            sock.settimeout(self.handshake_timeout)
            if not self._listener.register(sock, functools.partial(shut, sock)):
                return
            try:
                tls = self.ssl_context.wrap_socket(sock, server_side=True)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                self.logger.info("TLS handshake with %s failed: %s", addr, exc)
                return
            finally:
                self._listener.unregister(sock)
            try:
                self._serve_http(tls, addr)
            finally:
                _close(tls)
        else:
            self._serve_http(sock, addr)

    def _serve_http(self, sock: socket.socket, addr: Any) -> None:
        io = SocketIO(sock, self.settings.write_timeout)
        reader = SocketReader(io, deadline=time.monotonic() + self.handshake_timeout)
        if not self._listener.register(io, io.shutdown):
            return
        try:
            try:
                request = HandshakeRequest.parse(reader.read_until(b"\r\n\r\n", _REQUEST_HEAD_LIMIT))
            except Stopped:
                return
            except ProtocolError as exc:
                self._respond(io, 400, f"bad request: {exc.reason}")
                return
            path = urllib.parse.unquote(request.path.split("?", 1)[0])
            if path != self.ws_path:
                self._serve_file(io, request, path)
                return
            try:
                if request.method != "GET":
                    raise Refusal(405, "Method Not Allowed", "only GET can open a websocket", {"Allow": "GET"})
                check_upgrade(request)
            except Refusal as exc:
                self.logger.info("statesync: refused handshake from %s: %d %s", addr, exc.status, exc.text)
                _send_quietly(io, http_response(exc.status, exc.reason, exc.headers, exc.text + "\n"))
                return
            # No subprotocol: hat-juggler's peers neither offer nor expect one.
            if not _send_quietly(io, switching_protocols(request)):
                return
        finally:
            self._listener.unregister(io)
        reader.deadline = None  # from now on, reads wait for as long as the peer is silent
        del request  # its headers would stay alive in this frame for as long as the connection
        conn = Connection(io, reader, client=False, settings=self.settings, timer=self.timer,
                          autoflush_delay=self.autoflush_delay, remote_addr=addr, logger=self.logger,
                          patches=self.patches)  # fmt: skip
        if not self._listener.register(conn, lambda: conn._start_close(CloseCode.GOING_AWAY, "server shutting down")):
            conn._start_close(CloseCode.GOING_AWAY, "server shutting down")
        handler = threading.Thread(target=self._run_handler, args=(conn,), name=f"juggler-statesync-{conn.id}-handler",
                                   daemon=True)  # fmt: skip  (joined below all the same)
        handler.start()
        try:
            conn.run()
        finally:
            self._listener.unregister(conn)
            handler.join()
            self.logger.debug("statesync connection %d from %s closed: %s %s", conn.id, addr, conn.close_code, conn.close_reason)

    def _run_handler(self, conn: Connection) -> None:
        try:
            self.on_connection(conn)
        except Exception:
            if not conn.closed:
                self.logger.exception("statesync: on_connection failed for connection %d", conn.id)
                conn._start_close(CloseCode.INTERNAL_ERROR, "internal server error")

    # -- plain HTTP --

    def _respond(self, io: SocketIO, status: int, text: str, headers: Optional[dict[str, str]] = None) -> None:
        _send_quietly(io, http_response(status, _STATUS_TEXT[status], headers, text + "\n"))

    def _serve_file(self, io: SocketIO, request: HandshakeRequest, path: str) -> None:
        """``/`` redirects to ``index_path``; other paths are files of ``static_dir``."""
        if request.method not in ("GET", "HEAD"):
            self._respond(io, 405, "only GET and HEAD", {"Allow": "GET, HEAD"})
            return
        if path == "/" and self.index_path:
            self._respond(io, 302, f"see {self.index_path}", {"Location": self.index_path})
            return
        file = self._static_file(path)
        if file is None:
            self._respond(io, 404, f"no such file: {path}")
            return
        try:
            f = open(file, "rb")
        except OSError:
            self._respond(io, 404, f"no such file: {path}")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
                ctype += "; charset=utf-8"
            head = http_response(200, "OK", {"Content-Type": ctype, "Content-Length": str(size)}, b"")
            if not _send_quietly(io, head) or request.method == "HEAD":
                return
            while True:
                chunk = f.read(_FILE_CHUNK)
                if not chunk or not _send_quietly(io, chunk):
                    return

    def _static_file(self, path: str) -> Optional[Path]:
        """The file of ``static_dir`` that ``path`` names; ``None`` for none, or for a path
        that would lead out of it."""
        if self.static_dir is None or "\0" in path:
            return None
        file = (self.static_dir / path.lstrip("/")).resolve()
        if file != self.static_dir and self.static_dir not in file.parents:
            return None
        return file if file.is_file() else None


def listen(
    host: str,
    port: int,
    on_connection: Callable[[Connection], Any],
    *,
    ws_path: str = "/ws",
    static_dir: Union[str, os.PathLike, None] = None,
    index_path: Optional[str] = "/index.html",
    certfile: Optional[str] = None,
    keyfile: Optional[str] = None,
    autoflush_delay: Optional[float] = 0.2,
    **kwargs: Any,
) -> Server:
    """Listen on ``host:port`` (``port`` 0: any free one; see :attr:`Server.url`) and call
    ``on_connection(conn)`` for each websocket opened on ``ws_path``.

    ``static_dir`` is served over HTTP on the other paths, and ``/`` is redirected to
    ``index_path`` (``None``: no redirect). With ``certfile`` and ``keyfile`` (PEM) it serves
    ``https``/``wss``. ``autoflush_delay`` is every connection's (see
    :meth:`Connection.set_local_data`). Other keyword arguments: ``max_connections`` (1024;
    0: no limit; over it: HTTP 503), ``handshake_timeout`` (10 s), ``patch_cache_size`` (16:
    the patches kept for connections that go from the same data to the same data, see
    :class:`~juggler.statesync.connection.PatchCache`), ``logger``, and the limits of
    :class:`~juggler.statesync.connection.Settings`.
    """
    return Server(host, port, on_connection, ws_path=ws_path, static_dir=static_dir, index_path=index_path,
                  certfile=certfile, keyfile=keyfile, autoflush_delay=autoflush_delay, **kwargs).start()  # fmt: skip


def _send_quietly(io: SocketIO, data: bytes) -> bool:
    try:
        io.sendall(data)
        return True
    except OSError:
        return False


def _close(sock: socket.socket) -> None:
    shut(sock)
    sock.close()
