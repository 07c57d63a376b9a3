"""The juggler server: websocket connections in, redis out.

Its connections come from a :class:`~juggler.listener.Listener` (the accept loop, a thread
per TCP connection, their shutdown), each served by a request handler, ``websocket-server``'s,
extended where juggler needs more than it has (see :mod:`juggler.transport`,
:mod:`juggler.frames` and :mod:`juggler.handshake`): the handshake checks the path and
negotiates the ``juggler.0`` subprotocol, frames are read with fragmentation and a read limit,
written with ``sendall``, and connections are closed with proper close codes.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import functools
import json
import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable, Optional

from .broker import Broker
from .conn import Conn, ConnServices
from .exceptions import ProtocolError, Refusal, RefuseConnection
from .frames import CloseCode
from .message import SUBPROTOCOL, Ack, MessageType, Nack, Res, encode, error_result
from .metrics import CONTENT_TYPE, HttpEndpoints, ServerMetrics, ThreadCounters
from .middleware import Handler, HandlerSlot, process_msg
from .health import RedisHealth
from .history import History, record_history
from .pubsub import PubSubHub
from .settings import ServerSettings, parse_host_port
from .redisconn import REDIS_FAILURES
from .timer import Timer
from .tuning import default_max_connections
from .handshake import HandshakeRequest, check_upgrade, http_response, switching_protocols
from .listener import AT_LIMIT, OUT_OF_THREADS, Listener, shut
from .transport import SocketIO, SocketReader, Stopped
from .web import WebRoutes


def _import_websocket_server() -> Any:
    # websocket_server calls logging.basicConfig() when imported; a library must not install
    # handlers on its users' root logger, so undo that if it was this import that did it.
    root = logging.getLogger()
    before = list(root.handlers)
    import websocket_server

    if not before:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
    return websocket_server


websocket_server = _import_websocket_server()

__all__ = [
    "Server",
    "ConnState",
    "SUBPROTOCOL",
    "ALLOWED_MESSAGES_HEADER",
    "ALLOWED_MESSAGES_PARAM",
    "parse_allowed_messages",
    "process_msg",
]

ALLOWED_MESSAGES_HEADER = "Juggler-Allowed-Messages"
#: The same list as a query parameter of the handshake, for browsers (they cannot send headers
#: with a websocket); when both come, a connection may send what both allow.
ALLOWED_MESSAGES_PARAM = "juggler-allowed-messages"

_REQUEST_TYPES = {
    "call": MessageType.CALL,
    "pub": MessageType.PUB,
    "sub": MessageType.SUB,
    "unsb": MessageType.UNSB,
}
ALL_REQUESTS = frozenset(_REQUEST_TYPES.values())


def parse_allowed_messages(value: Optional[str]) -> frozenset[MessageType]:
    """The request types a ``Juggler-Allowed-Messages`` header value allows.

    Empty, missing or ``*`` allows all; otherwise a comma-separated list of ``call``, ``sub``,
    ``unsb``, ``pub``, case-insensitive. Raises :class:`ValueError` naming an unknown entry.
    """
    if value is None:
        return ALL_REQUESTS
    tokens = [t.strip().lower() for t in value.split(",")]
    tokens = [t for t in tokens if t]
    if not tokens or tokens == ["*"]:
        return ALL_REQUESTS
    allowed = set()
    for t in tokens:
        if t not in _REQUEST_TYPES:
            raise ValueError(f"unknown message type {t!r} in {ALLOWED_MESSAGES_HEADER}")
        allowed.add(_REQUEST_TYPES[t])
    return frozenset(allowed)


class Stats(ThreadCounters):
    """Thread-safe counters of a server (see :attr:`Server.stats`): ``incr(name, n=1)`` takes
    no lock (each thread counts apart), ``snapshot()`` sums them."""


class ConnState(enum.Enum):
    """What :class:`Server`'s ``on_state`` hook is told about a connection."""

    #: The handshake is valid; the hook may still refuse it by raising
    #: :class:`~juggler.exceptions.RefuseConnection`.
    ACCEPTING = "accepting"
    #: The websocket is open and its threads run.
    CONNECTED = "connected"
    #: The connection is over (``conn.close_code``, ``conn.close_reason`` say why) and every
    #: thread and redis connection of it is released. Every connection the hook accepted
    #: ends with CLOSED, also one that never opened (the 101 could not be written, or the
    #: server began shutting down just after it): it skips CONNECTED.
    CLOSED = "closed"


StateHook = Callable[[Conn, ConnState], None]


class _Handler(websocket_server.WebSocketHandler):
    """One TCP connection: TLS and the HTTP request, then :meth:`Conn.run` on this thread."""

    disable_nagle_algorithm = True

    def __init__(self, request: socket.socket, client_address: Any, server: "Server") -> None:
        # Not WebSocketHandler.__init__, which would wrap the socket in its own TLS: ours is
        # Server.ssl_context, in handle(). Nor BaseRequestHandler.__init__, which would serve
        # the whole connection inside __init__: Server._serve_conn calls handle() itself, one
        # C stack frame less on the reader's thread (its idle stack fits in two pages).
        self.request = request
        self.client_address = client_address
        self.server = server

    def setup(self) -> None:
        # No rfile/wfile: reads go through SocketReader, writes through sendall.
        self.connection = self.request
        self.keep_alive = False

    def finish(self) -> None:  # the base class would call server._client_left_
        pass

    def handle(self) -> None:
        jserver: Server = self.server
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if jserver.ssl_context is not None:
            sock.settimeout(jserver.settings.handshake_timeout)
            raw = sock
            if not jserver._handshake_started(raw):
                return
            try:
                sock = jserver.ssl_context.wrap_socket(sock, server_side=True)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                jserver.logger.info("TLS handshake with %s failed: %s", self.client_address, exc)
                return
            finally:
                jserver._handshake_ended(raw)
        try:
            self._serve(jserver, sock)
        finally:
            if sock is not self.request:  # the TLS socket took over the descriptor
                sock.close()

    def _serve(self, jserver: "Server", sock: socket.socket) -> None:
        io = SocketIO(sock, jserver.settings.write_timeout)  # from here on, every read and write goes through it
        reader = SocketReader(io, deadline=time.monotonic() + jserver.settings.handshake_timeout)
        if not jserver._handshake_started(io):
            return
        try:
            try:
                head = reader.read_until(b"\r\n\r\n", HEAD_LIMIT)
            except ProtocolError as exc:
                self._refuse(io, Refusal(431, "Request Header Fields Too Large", exc.reason))
                return
            request = HandshakeRequest.parse(head)
            del head  # (this frame lasts as long as the connection)
            if jserver._serve_web(io, request) or jserver._serve_http(io, request):
                return
            allowed, protocol = jserver._check_handshake(request)
        except Stopped:
            return
        except ProtocolError as exc:
            self._refuse(io, Refusal(400, "Bad Request", f"bad handshake: {exc.reason}"))
            return
        except Refusal as exc:
            self._refuse(io, exc, request)
            return
        finally:
            jserver._handshake_ended(io)
        conn = self._open(jserver, io, request, reader, allowed, protocol)
        if conn is not None:
            conn.run()  # its teardown gives the slot back (Server._conn_closed)

    def _open(self, jserver: "Server", io: SocketIO, request: HandshakeRequest, reader: SocketReader,
              allowed: frozenset[MessageType], protocol: Optional[str]) -> Optional[Conn]:  # fmt: skip
        """Finish the handshake: the connection to run (already closing if the 101 could not be
        written: its run tears it down), or ``None`` (refused: by the hook, at the connection
        limit, or for want of a thread for its writer). Unless it returns a connection, it
        gives back the connection slot and the connection's redis resources, and a connection
        the hook accepted is announced CLOSED."""
        try:
            conn = Conn(jserver._services, io, self.client_address, request, allowed, reader)
        except BaseException:
            jserver._release_slot()
            raise
        accepted = handed_over = False
        try:
            accepted = self._accepted(jserver, io, conn, request)
            if not accepted:
                return None
            try:
                conn.start()  # its writer, before the 101: a process out of threads refuses with 503
            except (RuntimeError, MemoryError) as exc:  # "can't start new thread"
                jserver._listener.out_of_threads(self.client_address, exc)
                self._refuse(io, Refusal(503, "Service Unavailable", OUT_OF_THREADS), request)
                return None
            handed_over = True  # from here on, conn.run() tears it all down
            if not self._switch_protocols(io, request, protocol):
                conn.close(CloseCode.ABNORMAL_CLOSURE, "connection lost during the handshake")
                io.shutdown()  # its reader ends at once, and its teardown joins the writer
                return conn
            if not jserver._conn_opened(conn):
                # Shutdown began between the 101 and registering the connection, so
                # shutdown() did not see it: it closes like the others, with 1001 and the
                # close handshake, and its teardown gives the slot back and announces CLOSED.
                conn.close(CloseCode.GOING_AWAY, "server shutting down")
            reader.deadline = None  # from now on, reads wait for as long as the peer is silent
            io.untimed_reads()
            return conn
        finally:
            if not handed_over:
                try:
                    conn.release()
                finally:
                    jserver._release_slot()
                    if accepted:  # the hook let it in: it hears how it ended, as for any other
                        jserver._notify(conn, ConnState.CLOSED)

    def _accepted(self, jserver: "Server", io: SocketIO, conn: Conn, request: HandshakeRequest) -> bool:
        """The ACCEPTING hook; whether it let the connection in (if not, the refusal is sent)."""
        try:
            jserver._notify(conn, ConnState.ACCEPTING)
        except RefuseConnection as exc:
            self._refuse(io, Refusal(exc.status, exc.status_text, exc.reason), request)
            return False
        except Exception:
            jserver.logger.exception("on_state hook failed accepting %s", self.client_address)
            self._refuse(io, Refusal(500, "Internal Server Error", "internal server error"), request)
            return False
        return True

    @staticmethod
    def _switch_protocols(io: SocketIO, request: HandshakeRequest, protocol: Optional[str]) -> bool:
        """Send the 101 response; whether it went out."""
        try:
            io.sendall(switching_protocols(request, protocol))
        except OSError:
            return False
        return True

    def _refuse(self, io: SocketIO, exc: Refusal, request: Optional[HandshakeRequest] = None) -> None:
        jserver: Server = self.server
        jserver.stats.incr(f"refused_{exc.status}")
        jserver.logger.info("refused handshake from %s: %d %s", self.client_address, exc.status, exc.text)
        if request is not None:  # before the response: a browser asks for the reason once it has it
            jserver.web.refused(request, exc.status, exc.text)
        try:
            io.sendall(http_response(exc.status, exc.reason, exc.headers, exc.text + "\n"))
        except OSError:
            pass


class Server:
    """A juggler server.

    It runs two or three threads per connection, and changes no setting of the whole process:
    a program serving many connections may tune its process first with one call,
    :func:`juggler.tuning.tune_process`, as ``juggler server`` does (small thread stacks, the
    GIL switch interval, the futex table, one CPU, the open-file limit).

    :param broker: the broker for RPC (calls and results).
    :param pubsub_broker: the broker for pub-sub; ``None`` means ``broker``.
    :param handler: what to do with each message read or sent (see :mod:`juggler.middleware`);
        ``None`` means :func:`~juggler.process_msg`.
    :param on_state: ``on_state(conn, state)`` is called with each :class:`ConnState` of each
        connection; raising :class:`~juggler.exceptions.RefuseConnection` at ACCEPTING refuses
        the handshake.
    :param ssl_context: serve TLS (``wss://``) with this context (or give ``certfile`` and
        ``keyfile``).
    :param settings: a :class:`~juggler.settings.ServerSettings`; the keyword arguments below
        replace its fields.
    :param kwargs: any field of :class:`~juggler.settings.ServerSettings` (``host``, ``port``,
        ``path``, ``max_connections``, ``read_limit``, ``write_timeout``, ...: each field's
        text says its default and what it does). :class:`ValueError` names a bad value,
        :class:`TypeError` an unknown name. Each is also an attribute of the server
        (``server.read_limit``), but for ``host`` and ``port``, which are the address it
        listens on.
    :param logger: defaults to ``logging.getLogger("juggler.server")``.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        pubsub_broker: Optional[Broker] = None,
        handler: Optional[Handler] = None,
        on_state: Optional[StateHook] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        settings: Optional[ServerSettings] = None,
        logger: Optional[logging.Logger] = None,
        **kwargs: Any,
    ) -> None:
        #: The server's :class:`~juggler.settings.ServerSettings` (also its connections').
        self.settings = settings = _settings(settings, kwargs)
        self.broker = broker
        self.pubsub_broker = pubsub_broker if pubsub_broker is not None else broker
        self._handler = HandlerSlot(handler or process_msg)  # (the connections share it)
        self.on_state = on_state
        origins = settings.allowed_origins
        self.allowed_origins = [o.lower() for o in origins] if origins is not None else None
        self.ssl_context = _tls_context(settings, ssl_context)
        self.web = WebRoutes(settings.path, serve_client=settings.serve_client, demo_page=settings.demo_page)
        self.logger = logger or logging.getLogger("juggler.server")
        self.stats = Stats()

        self._lock = threading.Lock()
        # Handshakes past their checks plus open connections: what max_connections bounds.
        self._slots = 0
        most = settings.max_connections
        # A thread per TCP connection: its handshake, then its websocket's reader. Handshakes
        # in progress are capped too, so a flood of idle TCP connections cannot spawn threads
        # without bound: they are refused on the accept thread, at once. The registered: the
        # sockets in their handshake (shut down at shutdown) and the open connections (closed
        # with 1001).
        self._listener = Listener(settings.host, settings.port, self._serve_conn, name="juggler-server-accept",
                                  conn_name="juggler-conn-{host}:{port}", logger=self.logger,
                                  max_threads=most + _HANDSHAKE_HEADROOM if most else 0,
                                  tls=self.ssl_context is not None, reuse_port=settings.reuse_port,
                                  on_refused=lambda how: self.stats.incr(f"refused_{how}"),
                                  helper_threads=True)  # (each websocket's writer)  # fmt: skip
        self.host, self.port = self._listener.host, self._listener.port
        self.timer = Timer("juggler-server-timer", self.logger)
        self._init_redis_side()
        self.metrics = ServerMetrics(self)  # last: registering it collects once
        self._health_lock = threading.Condition()
        self._health_answer: Optional[tuple[float, tuple[int, str, str]]] = None  # (when, answer)
        self._health_checking = False  # a thread PINGs redis for the next answer
        self._http = self._metrics_endpoints(settings.metrics_listen)
        self._services = self._conn_services()

    @property
    def handler(self) -> Handler:
        """What runs each message read or sent (see :mod:`juggler.middleware`); replacing it
        takes effect on every connection at once."""
        return self._handler.handler

    @handler.setter
    def handler(self, handler: Handler) -> None:
        self._handler.set(handler)

    def __getattr__(self, name: str) -> Any:
        # the settings as attributes (server.read_limit); only called for what is not found
        settings = self.__dict__.get("settings")
        if settings is not None and name in _SETTING_NAMES:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _init_redis_side(self) -> None:
        """The views of redis' health, and the pub-sub hub."""
        #: How this server sees its redis (:class:`~juggler.health.RedisHealth`): its results
        #: listeners report to it, take their reconnect turns from it, and log the outage once.
        self.redis_health = RedisHealth(f"server {self.host}:{self.port}", logger=self.logger)
        #: The same for the pub-sub redis: :attr:`redis_health` itself when pub-sub uses the
        #: same broker, else one of its own (a pub-sub redis down must not fail the calls).
        self.pubsub_health = (
            self.redis_health
            if self.pubsub_broker is self.broker
            else RedisHealth(f"server {self.host}:{self.port} pub-sub", logger=self.logger)
        )
        # on a Redis Cluster, the results listeners' view of each node (node_health)
        self._node_healths: dict[str, RedisHealth] = {}
        self.hub = PubSubHub(
            self.pubsub_broker,
            # a subscribe waits for redis behind whatever the hub's reader is handing out
            confirm_timeout=max(5.0, self.settings.write_timeout),
            logger=self.logger,
            on_bad_event=lambda: self.stats.incr("failed_event_decodes"),
            health=self.pubsub_health,
            history=History.of(self.settings.history),
        )

    def _metrics_endpoints(self, listen: Optional[str]) -> Optional[HttpEndpoints]:
        """The endpoints of ``metrics_listen``, if given."""
        if listen is None:
            return None
        host, port = parse_host_port(listen)
        routes = {
            "/healthz": lambda: self._encoded(self._health()),
            "/metrics": lambda: (200, self.metrics.render(), CONTENT_TYPE),
        }
        return HttpEndpoints(host, port, routes, name="juggler-server-metrics", logger=self.logger)

    def _conn_services(self) -> ConnServices:
        return ConnServices(
            settings=self.settings,
            broker=self.broker,
            pubsub_broker=self.pubsub_broker,
            hub=self.hub,
            timer=self.timer,
            health=self.redis_health,
            listener_health=self.node_health,
            handler=self._handler,  # (Server.handler may be replaced)
            encode=self.encode,
            event_write_limit=self._event_write_limit,
            incr=self.stats.incr,
            observe_call_ack=self.metrics.call_ack.observe,
            observe_result_delivery=self.metrics.result_delivery.observe,
            on_closed=self._conn_closed,
            logger=self.logger,
            reply_limit=self.settings.write_limit if type(self).encode is Server.encode else None,
        )

    def __repr__(self) -> str:
        return f"<juggler.Server {self.url}>"

    def node_health(self, results: Any) -> RedisHealth:
        """The :class:`~juggler.health.RedisHealth` a results listener on the dedicated broker
        ``results`` reports to: :attr:`redis_health`, or on a Redis Cluster one per node (one
        node down is not the cluster down: its listeners take turns, and log, on their own)."""
        if not getattr(self.broker, "cluster", False):
            return self.redis_health
        kwargs = getattr(getattr(getattr(results, "client", None), "connection_pool", None), "connection_kwargs", {})
        node = f"{kwargs.get('host')}:{kwargs.get('port')}"
        with self._lock:
            health = self._node_healths.get(node)
            if health is None:
                name = f"server {self.host}:{self.port} (redis node {node})"
                health = self._node_healths[node] = RedisHealth(name, logger=self.logger)
            return health

    def redis_healths(self) -> list[RedisHealth]:
        """Every :class:`~juggler.health.RedisHealth` of this server: its redis', its pub-sub
        redis' (when another), its cluster nodes'."""
        with self._lock:
            nodes = list(self._node_healths.values())
        healths = [self.redis_health] + nodes
        if self.pubsub_health is not self.redis_health:
            healths.append(self.pubsub_health)
        return healths

    def redis_up(self) -> bool:
        """Whether this server sees all of its redis up (``juggler_redis_up``): its redis, its
        pub-sub redis, and on a Redis Cluster the nodes that serve slots now, by the cluster
        client's slot map. (A master that a failover replaced serves none: its listeners
        moved to the promoted replica, and the view they left of it counts no more.)"""
        with self._lock:
            nodes = dict(self._node_healths)
        healths = [self.redis_health, self.pubsub_health]
        if nodes:  # (a cluster's broker: its client's map, read with no I/O)
            serving = {node.name for node in self.broker.client.get_primaries()}  # type: ignore[attr-defined]
            healths += [health for name, health in nodes.items() if name in serving]
        return all(health.up for health in healths)

    @property
    def url(self) -> str:
        """The websocket URL clients connect to, e.g. ``ws://127.0.0.1:PORT/ws``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{host}:{self.port}{self.settings.path}"

    @property
    def metrics_url(self) -> Optional[str]:
        """``http://HOST:PORT`` of the ``metrics_listen`` endpoints, or ``None``."""
        if self._http is None:
            return None
        host = f"[{self._http.host}]" if ":" in self._http.host else self._http.host
        return f"http://{host}:{self._http.port}"

    @property
    def connections(self) -> list[Conn]:
        """The open connections (a snapshot)."""
        return [m for m in self._listener.members() if isinstance(m, Conn)]

    def connection_thread_count(self) -> int:
        """Threads serving connections: one per TCP connection, plus each open connection's
        writer and results threads."""
        return self._listener.thread_count() + sum(c.helper_thread_count() for c in self.connections)

    # -- lifecycle --

    def start(self) -> "Server":
        """Serve in a background thread (``juggler-server-accept``); returns at once."""
        if not self._listener.start(before=self._start_threads):
            return self
        self.logger.info("juggler server listening on %s", self.url)
        if self.hub.history is not None:
            self._record_history(self.hub.history)
        if self._http is not None:
            self.logger.info("health and metrics at %s/healthz and %s/metrics", self.metrics_url, self.metrics_url)
        return self

    def _record_history(self, history: History) -> None:
        try:
            record_history(getattr(self.pubsub_broker, "client"), history)
        except (REDIS_FAILURES + (AttributeError,)) as exc:
            self.logger.warning("could not record the history rules in redis for publishers: %s", exc)
        else:
            self.logger.info("channel history: %s", ", ".join(str(r) for r in history.rules))

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` is called from another thread (or a signal handler)."""
        self.start()
        try:
            self._listener.wait_closed()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop accepting, close every connection with 1001 and join every thread. Idempotent."""
        # Each connection ends within its close_timeout: its close deadline shuts the socket
        # of a peer that does not answer.
        if self._listener.close(before_join=self._close_healths, after_join=self._stop_threads):
            self.logger.info("juggler server on %s stopped", self.url)

    def _start_threads(self) -> None:
        self.timer.start()
        if self._http is not None:
            self._http.start()

    def _stop_threads(self) -> None:
        self.hub.close()
        self.timer.stop()
        if self._http is not None:
            self._http.close()

    def _close_healths(self) -> None:
        # listeners waiting for their turn to reconnect give up (their connections close)
        for health in self.redis_healths():
            health.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- connection bookkeeping --

    def _serve_conn(self, sock: socket.socket, client_address: Any) -> None:
        """One TCP connection, on its thread (the listener closes its socket after)."""
        handler = _Handler(sock, client_address, self)
        handler.setup()
        handler.handle()

    def _handshake_started(self, sock: Any) -> bool:
        """Register a socket in its handshake, so that shutdown can wake its reads; ``False``
        if the server is stopping (then it is not registered)."""
        stop = sock.shutdown if isinstance(sock, SocketIO) else functools.partial(shut, sock)
        return self._listener.register(sock, stop)

    def _handshake_ended(self, sock: Any) -> None:
        self._listener.unregister(sock)

    def _conn_opened(self, conn: Conn) -> bool:
        if not self._listener.register(conn, functools.partial(conn.close, CloseCode.GOING_AWAY, "server shutting down")):
            return False
        threading.current_thread().name = f"juggler-conn-{conn.id}-reader"
        self.stats.incr("connections_total")
        self.logger.debug("connection %s opened from %s", conn.uuid, conn.remote_addr)
        self._notify(conn, ConnState.CONNECTED)
        return True

    def _conn_closed(self, conn: Conn) -> None:
        self._listener.unregister(conn)
        with self._lock:
            self._slots -= 1  # before CLOSED is announced: a hook may count on the free slot
        self.stats.incr(f"close_{conn.close_code}")
        self.logger.debug("connection %s closed: %s %s", conn.uuid, conn.close_code, conn.close_reason)
        self._notify(conn, ConnState.CLOSED)

    def _notify(self, conn: Conn, state: ConnState) -> None:
        if self.on_state is None:
            return
        if state is ConnState.ACCEPTING:
            self.on_state(conn, state)  # its exceptions refuse the handshake: the caller handles them
            return
        try:
            self.on_state(conn, state)
        except Exception:
            self.logger.exception("on_state hook failed for connection %s (%s)", conn.uuid, state.value)

    def _check_handshake(self, req: HandshakeRequest) -> tuple[frozenset[MessageType], Optional[str]]:
        if req.method != "GET":
            raise Refusal(405, "Method Not Allowed", "only GET can open a websocket", {"Allow": "GET"})
        path = req.path.split("?", 1)[0]
        if path != self.settings.path:
            raise Refusal(404, "Not Found", f"no websocket endpoint at {path}")
        check_upgrade(req)
        origin = req.headers.get("origin")
        if self.allowed_origins is not None and origin is not None:
            if not any(fnmatch.fnmatchcase(origin.lower(), pattern) for pattern in self.allowed_origins):
                raise Refusal(403, "Forbidden", f"origin {origin} is not allowed")
        offered = req.tokens("sec-websocket-protocol")
        if SUBPROTOCOL in offered:
            protocol: Optional[str] = SUBPROTOCOL
        elif not offered and self.settings.allow_empty_subprotocol:
            protocol = None
        else:
            raise Refusal(400, "Bad Request", f"the {SUBPROTOCOL} websocket subprotocol is required")
        try:
            allowed = parse_allowed_messages(req.headers.get(ALLOWED_MESSAGES_HEADER.lower()))
            for value in req.query(ALLOWED_MESSAGES_PARAM):
                allowed &= parse_allowed_messages(value)
        except ValueError as exc:
            raise Refusal(400, "Bad Request", str(exc)) from None
        with self._lock:
            # Take the slot now, so handshakes in flight (a slow on_state hook) cannot together
            # exceed max_connections. A handshake that does not open gives it back
            # (_release_slot); an open connection gives it back when it closes.
            most = self.settings.max_connections
            if most and self._slots >= most:
                raise Refusal(503, "Service Unavailable", AT_LIMIT)
            self._slots += 1
        return allowed, protocol

    def _release_slot(self) -> None:
        with self._lock:
            self._slots -= 1

    # -- plain HTTP: health and metrics --

    def _serve_web(self, io: SocketIO, req: HandshakeRequest) -> bool:
        """Answer what :attr:`web` serves (the browser client, ...); whether it did."""
        response = self.web.respond(req)
        if response is None:
            return False
        try:
            io.sendall(response)
        except OSError:
            pass
        return True

    def _serve_http(self, io: SocketIO, req: HandshakeRequest) -> bool:
        """Answer ``GET /healthz`` and ``GET /metrics`` (not websocket upgrades); whether it did."""
        path = req.path.split("?", 1)[0]
        if not self.settings.http_endpoints or self._http is not None:  # off, or off the public port
            return False
        if req.method not in ("GET", "HEAD") or path not in ("/healthz", "/metrics"):
            return False
        if path == "/healthz":
            status, body, ctype = self._health()
        else:
            status, body, ctype = 200, self.metrics.render().decode("utf-8"), CONTENT_TYPE
        text = {200: "OK", 503: "Service Unavailable"}[status]
        response = http_response(status, text, {"Content-Type": ctype}, body)
        if req.method == "HEAD":
            response = response[: response.index(b"\r\n\r\n") + 4]
        try:
            io.sendall(response)
        except OSError:
            pass
        return True

    def _health(self) -> tuple[int, str, str]:
        """The health answer, made at most once a second (it PINGs redis): a burst of health
        checks costs redis one PING. While one thread PINGs, the others get the last answer
        at once (they wait only for the very first), so a redis that hangs holds up one health
        request, not all of them."""
        with self._health_lock:
            while True:
                last = self._health_answer
                if last is not None and (self._health_checking or time.monotonic() - last[0] < HEALTH_CACHE_SECONDS):
                    return last[1]
                if not self._health_checking:
                    break
                self._health_lock.wait()  # the first answer is on its way
            self._health_checking = True
        answer = None
        try:
            answer = self._check_health()
            return answer
        finally:
            with self._health_lock:
                self._health_checking = False
                if answer is not None:
                    self._health_answer = (time.monotonic(), answer)
                self._health_lock.notify_all()

    @staticmethod
    def _encoded(answer: tuple[int, str, str]) -> tuple[int, bytes, str]:
        status, body, ctype = answer
        return status, body.encode("utf-8"), ctype

    def _check_health(self) -> tuple[int, str, str]:
        brokers = {"redis": self.broker}
        if self.pubsub_broker is not self.broker:
            brokers["pubsub_redis"] = self.pubsub_broker
        checks = {name: ("ok" if _ping(b) else "unreachable") for name, b in brokers.items()}
        healthy = all(v == "ok" for v in checks.values())
        body = {"status": "ok" if healthy else "unavailable", **checks, "connections": len(self.connections)}
        return (200 if healthy else 503), json.dumps(body) + "\n", "application/json"

    # -- messages --

    def _event_write_limit(self) -> Optional[int]:
        """See ConnServices.event_write_limit: the write limit, unless the handler (which may
        be replaced) or a subclass's encode must see every EVNT."""
        if type(self).encode is Server.encode and self._handler.writes_as_sent:
            return self.settings.write_limit
        return None

    def encode(self, conn: Conn, msg: Any) -> Optional[bytes]:
        """The bytes of a message about to be written to ``conn``; ``None`` to drop it (an
        EVNT over ``write_limit``)."""
        data = encode(msg).encode("utf-8")
        if len(data) > self.settings.write_limit:
            self.stats.incr("oversized_messages")
            self.logger.warning("connection %s: %s for %s is %d bytes, over the write limit", conn.uuid,
                                msg.type.name, getattr(msg, "for_uuid", msg.uuid), len(data))  # fmt: skip
            if isinstance(msg, Res):  # the call still ends: with an error result
                msg = Res(msg.for_uuid, "", error_result(f"result larger than the server's write limit of {self.settings.write_limit} bytes"))
            elif isinstance(msg, (Ack, Nack)):  # every request is answered: without its long uri/channel
                msg = dataclasses.replace(msg, uri="", channel="")
            else:  # an EVNT: dropped
                return None
            data = encode(msg).encode("utf-8")
        return data


#: How long a ``/healthz`` answer is reused (seconds).
HEALTH_CACHE_SECONDS = 1.0

#: The longest HTTP request head (request line and headers) a handshake may send; over it:
#: HTTP 431.
HEAD_LIMIT = 16384

_HANDSHAKE_HEADROOM = 128  # TCP connections still in their handshake, beyond max_connections



_SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(ServerSettings))


def _settings(settings: Optional[ServerSettings], kwargs: dict[str, Any]) -> ServerSettings:
    """``settings`` (or the defaults) with ``kwargs`` replacing its fields, and
    ``max_connections=None`` made what this process can hold."""
    unknown = sorted(set(kwargs) - _SETTING_NAMES)
    if unknown:
        raise TypeError(f"Server() got unexpected keyword arguments: {', '.join(unknown)} (not settings of "
                        "juggler.settings.ServerSettings)")  # fmt: skip
    settings = dataclasses.replace(settings, **kwargs) if settings is not None else ServerSettings(**kwargs)
    if settings.max_connections is None:
        settings = dataclasses.replace(settings, max_connections=default_max_connections())
    return settings


def _tls_context(settings: ServerSettings, ssl_context: Optional[ssl.SSLContext]) -> Optional[ssl.SSLContext]:
    """``ssl_context``, or one made of ``certfile`` and ``keyfile``."""
    if ssl_context is not None:
        return ssl_context
    if (settings.certfile is None) != (settings.keyfile is None):
        raise ValueError("certfile and keyfile go together")
    if settings.certfile is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(settings.certfile, settings.keyfile)
    return context


def _ping(broker: Any) -> bool:
    ping = getattr(broker, "ping", None)
    try:
        return bool(ping()) if ping is not None else True
    except Exception:
        return False
