"""The juggler server: websocket connections in, redis out.

Built on ``websocket-server``'s TCP server and request handler (the listening socket, a
request handler per connection), extended where juggler needs more than it has (see
:mod:`juggler.transport`, :mod:`juggler.frames` and :mod:`juggler.handshake`): the handshake
checks the path and negotiates the ``juggler.0`` subprotocol, frames are read with
fragmentation and a read limit, written with ``sendall``, and connections are closed with
proper close codes.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import functools
import json
import logging
import math
import socket
import socketserver
import ssl
import threading
import time
from collections import Counter
from typing import Any, Callable, Optional, Sequence, Union

from . import gilsend
from .broker import Broker
from .conn import CONN_THREAD_DAEMON, Conn, ConnServices, ConnSettings
from .exceptions import ProtocolError, Refusal, RefuseConnection
from .frames import CloseCode
from .message import SUBPROTOCOL, Ack, MessageType, Nack, Res, encode, error_result
from .metrics import CONTENT_TYPE, HttpEndpoints, ServerMetrics
from .middleware import Handler, process_msg, writes_events_as_sent
from .health import RedisHealth
from .history import History, HistoryRule, record_history
from .pubsub import PubSubHub
from .redisconn import REDIS_FAILURES
from .timer import Timer
from .tuning import default_max_connections
from .handshake import HandshakeRequest, check_upgrade, http_response, switching_protocols
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

#: The reason of the HTTP 503 a connection gets at ``max_connections``.
AT_LIMIT = "server at its connection limit"
#: The reason of the HTTP 503 a connection gets when the process cannot start a thread for it
#: (``kernel.pid_max``, ``kernel.threads-max``, ``vm.max_map_count`` or memory).
OUT_OF_THREADS = "server out of threads"
#: Seconds between two ERROR lines about connections refused for want of a thread.
OUT_OF_THREADS_LOG_INTERVAL = 10.0

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


class Stats:
    """Thread-safe counters of a server (see :attr:`Server.stats`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def incr(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


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

    def setup(self) -> None:
        # No rfile/wfile: reads go through SocketReader, writes through sendall.
        self.connection = self.request
        self.keep_alive = False

    def finish(self) -> None:  # the base class would call server._client_left_
        pass

    def handle(self) -> None:
        jserver: Server = self.server.juggler
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if jserver.ssl_context is not None:
            sock.settimeout(jserver.handshake_timeout)
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
        io = SocketIO(sock, jserver.write_timeout)  # from here on, every read and write goes through it
        reader = SocketReader(io, deadline=time.monotonic() + jserver.handshake_timeout)
        if not jserver._handshake_started(io):
            return
        try:
            try:
                head = reader.read_until(b"\r\n\r\n", HEAD_LIMIT)
            except ProtocolError as exc:
                self._refuse(io, Refusal(431, "Request Header Fields Too Large", exc.reason))
                return
            request = HandshakeRequest.parse(head)
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
                jserver._out_of_threads(self.client_address, exc)
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
        jserver: Server = self.server.juggler
        jserver.stats.incr(f"refused_{exc.status}")
        jserver.logger.info("refused handshake from %s: %d %s", self.client_address, exc.status, exc.text)
        if request is not None:  # before the response: a browser asks for the reason once it has it
            jserver.web.refused(request, exc.status, exc.text)
        try:
            io.sendall(http_response(exc.status, exc.reason, exc.headers, exc.text + "\n"))
        except OSError:
            pass


class _TCPServer(websocket_server.WebsocketServer):
    """websocket-server's server socket, with our handler. Its accept loop is
    :meth:`Server._accept_loop`, which blocks in ``accept()`` rather than polling, and starts a
    thread per connection (joined by :meth:`Server.shutdown`)."""

    daemon_threads = False
    block_on_close = False  # we join connection threads ourselves, see Server.shutdown
    allow_reuse_address = True
    request_queue_size = socket.SOMAXCONN  # socketserver's 5 makes bursts of connects wait

    def __init__(self, juggler: "Server", host: str, port: int, reuse_port: bool = False) -> None:
        # Not WebsocketServer.__init__: it would set its logger's level and use its handler.
        self.reuse_port = reuse_port
        socketserver.TCPServer.__init__(self, (host, port), _Handler)
        self.juggler = juggler
        self.host = host
        self.port = self.socket.getsockname()[1]
        self.key = self.cert = None  # TLS is ours (Server.ssl_context), not the base class'
        self.clients: list[Any] = []
        self._deny_clients = False

    def server_bind(self) -> None:
        if self.reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise OSError("SO_REUSEPORT is not available on this system")
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.juggler.logger.exception("unexpected error serving %s", client_address)


class Server:
    """A juggler server.

    It runs two or three threads per connection, and changes no setting of the whole process:
    a program serving many connections may tune its process first with one call,
    :func:`juggler.tuning.tune_process`, as ``juggler server`` does (small thread stacks, the
    GIL switch interval, the futex table, one CPU, the open-file limit).

    :param broker: the broker for RPC (calls and results).
    :param pubsub_broker: the broker for pub-sub; ``None`` means ``broker``.
    :param host: address to listen on.
    :param port: port to listen on; 0 picks a free one (see :attr:`url`).
    :param path: the websocket path; other paths get HTTP 404 (but ``/healthz`` and
        ``/metrics``, see ``http_endpoints``).
    :param handler: what to do with each message read or sent (see :mod:`juggler.middleware`);
        ``None`` means :func:`~juggler.process_msg`.
    :param on_state: ``on_state(conn, state)`` is called with each :class:`ConnState` of each
        connection; raising :class:`~juggler.exceptions.RefuseConnection` at ACCEPTING refuses
        the handshake.
    :param allow_empty_subprotocol: accept handshakes that offer no subprotocol at all (the
        ones that offer others but not ``juggler.0`` are still refused).
    :param allowed_origins: if given, a handshake whose ``Origin`` header matches none of these
        (``fnmatch`` patterns such as ``https://*.example.com``) gets HTTP 403. Requests without
        ``Origin`` (not from a browser) are not affected.
    :param certfile, keyfile: serve TLS (``wss://``) with this certificate chain and key; or
        pass an ``ssl_context``.
    :param max_connections: open websockets at most; a handshake over it gets HTTP 503 (0: no
        limit; ``None``: what this machine can hold, see
        :func:`~juggler.tuning.default_max_connections`).
    :param read_limit: largest message (after reassembly) in bytes; over it: close 1009.
    :param write_limit: largest message written, in bytes: a RES over it is replaced by an
        error result (so its call still ends), an ACK or NACK is sent without its ``uri`` or
        ``channel``, an EVNT over it is dropped.
    :param write_queue_size: messages queued per connection before ``send`` blocks.
    :param write_timeout: seconds ``send`` waits on a full queue, and a socket write may take,
        before the client is deemed too slow and disconnected (1008).
    :param handshake_timeout: seconds a client has to complete TLS and the HTTP handshake.
    :param ping_interval: ping a connection after this many seconds without a frame from it
        (0: never).
    :param idle_timeout: close a connection (1001) after this many seconds without any frame
        from it, pongs included (0: never). With pings on, this closes the unresponsive ones.
    :param close_timeout: seconds to wait for the peer's close frame, or for the writer to
        flush, once closing starts.
    :param reuse_port: set ``SO_REUSEPORT`` on the listening socket, so that several server
        processes can listen on the same port (the kernel spreads connections among them).
    :param max_call_timeout: the longest timeout (seconds) a CALL may ask for; over it: NACK
        400. It bounds how long a call to a URI nobody serves stays in redis.
    :param max_subscriptions: subscriptions one connection may hold; a SUB over it gets NACK
        429 (0: no limit).
    :param max_calls_in_flight: calls one connection may have in flight (stored, and neither
        answered nor expired); a CALL over it gets NACK 429 (0: no limit). With the broker's
        ``max_args_size`` and ``max_call_timeout`` it bounds what one connection keeps in redis.
    :param slow_threshold: a request whose processing takes longer than this (seconds) is
        counted as slow (``juggler_slow_messages_total``) and logged at DEBUG.
    :param http_endpoints: serve ``GET /healthz`` and ``GET /metrics`` on the same port
        (unless ``metrics_listen`` is given).
    :param metrics_listen: ``"HOST:PORT"``: serve ``/healthz`` and ``/metrics`` there
        instead, off the public port (port 0: any free one, see :attr:`metrics_url`).
    :param serve_client: serve the browser client, ``GET /juggler.js`` (and its types,
        ``/juggler.d.ts``), on the same port (see :mod:`juggler.web`).
    :param demo_page: serve the demo page at ``GET /`` (``juggler demo`` does).
    :param history: keep the last events of the channels matching these rules for recovery
        (``"PATTERN=SIZE,TTL"`` strings or :class:`~juggler.history.HistoryRule`, first match
        wins; see :mod:`juggler.history`); ``None``: no channel has history, and pub-sub costs
        redis what it costs without the feature. Recorded in redis on :meth:`start` for
        :func:`juggler.publish`.
    :param logger: defaults to ``logging.getLogger("juggler.server")``.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        pubsub_broker: Optional[Broker] = None,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/ws",
        handler: Optional[Handler] = None,
        on_state: Optional[StateHook] = None,
        allow_empty_subprotocol: bool = False,
        allowed_origins: Optional[Sequence[str]] = None,
        certfile: Optional[str] = None,
        keyfile: Optional[str] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        max_connections: Optional[int] = None,
        read_limit: int = 1 << 20,
        write_limit: int = 1 << 20,
        write_queue_size: int = 256,
        write_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        ping_interval: float = 30.0,
        idle_timeout: float = 60.0,
        close_timeout: float = 2.0,
        reuse_port: bool = False,
        max_call_timeout: float = 600.0,
        max_subscriptions: int = 100,
        max_calls_in_flight: int = 1000,
        slow_threshold: float = 0.1,
        http_endpoints: bool = True,
        serve_client: bool = True,
        demo_page: bool = False,
        metrics_listen: Optional[str] = None,
        history: Union[None, History, Sequence[Union[HistoryRule, str]]] = None,
        logger: Optional[logging.Logger] = None,
    ) -> None:
        for name, count in (("read_limit", read_limit), ("write_limit", write_limit), ("write_queue_size", write_queue_size)):
            if count <= 0:
                raise ValueError(f"{name} must be positive, got {count!r}")
        if max_connections is None:
            max_connections = default_max_connections()
        for name, count in (("max_connections", max_connections), ("max_subscriptions", max_subscriptions),
                            ("max_calls_in_flight", max_calls_in_flight)):  # fmt: skip
            if count < 0:
                raise ValueError(f"{name} must be >= 0 (0: no limit), got {count!r}")
        for name, value in (
            ("write_timeout", write_timeout),
            ("handshake_timeout", handshake_timeout),
            ("close_timeout", close_timeout),
            ("max_call_timeout", max_call_timeout),
            ("slow_threshold", slow_threshold),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name, value in (("ping_interval", ping_interval), ("idle_timeout", idle_timeout)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 seconds (0: off), got {value!r}")
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        if (certfile is None) != (keyfile is None) and ssl_context is None:
            raise ValueError("certfile and keyfile go together")
        if certfile is not None and ssl_context is None:
            ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_context.load_cert_chain(certfile, keyfile)
        self.broker = broker
        self.pubsub_broker = pubsub_broker if pubsub_broker is not None else broker
        self.path = path
        self.handler: Handler = handler or process_msg
        self.on_state = on_state
        self.allow_empty_subprotocol = allow_empty_subprotocol
        self.allowed_origins = [o.lower() for o in allowed_origins] if allowed_origins is not None else None
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.read_limit = read_limit
        self.write_limit = write_limit
        self.write_queue_size = write_queue_size
        self.write_timeout = write_timeout
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.close_timeout = close_timeout
        self.max_call_timeout = max_call_timeout
        self.max_subscriptions = max_subscriptions
        self.max_calls_in_flight = max_calls_in_flight
        self.slow_threshold = slow_threshold
        self.http_endpoints = http_endpoints
        self.web = WebRoutes(path, serve_client=serve_client, demo_page=demo_page)
        self.logger = logger or logging.getLogger("juggler.server")
        self.stats = Stats()

        self._lock = threading.Lock()
        self._conns: dict[str, Conn] = {}
        self._conn_threads: set[threading.Thread] = set()
        # sockets in their handshake, by id, with what wakes their reads (shutdown calls it)
        self._handshakes: dict[int, Callable[[], None]] = {}
        # Handshakes past their checks plus open connections: what max_connections bounds.
        self._slots = 0
        self._accept_thread: Optional[threading.Thread] = None
        self._stopping = False
        self._thread_failures = 0  # connections refused for want of a thread (see _out_of_threads)
        self._thread_failure_logged = -math.inf
        self._shutdown_done = threading.Event()
        self._tcp = _TCPServer(self, host, port, reuse_port)
        self.host, self.port = self._tcp.server_address[:2]
        self.timer = Timer("juggler-server-timer", self.logger)
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
            confirm_timeout=max(5.0, write_timeout),
            logger=self.logger,
            on_bad_event=lambda: self.stats.incr("failed_event_decodes"),
            health=self.pubsub_health,
            history=History.of(history),
        )
        self.metrics = ServerMetrics(self)  # last: registering it collects once
        self._health_lock = threading.Condition()
        self._health_answer: Optional[tuple[float, tuple[int, str, str]]] = None  # (when, answer)
        self._health_checking = False  # a thread PINGs redis for the next answer
        self._http: Optional[HttpEndpoints] = None
        if metrics_listen is not None:
            mhost, mport = parse_host_port(metrics_listen)
            routes = {
                "/healthz": lambda: self._encoded(self._health()),
                "/metrics": lambda: (200, self.metrics.render(), CONTENT_TYPE),
            }
            self._http = HttpEndpoints(mhost, mport, routes, name="juggler-server-metrics")
        self.settings = ConnSettings(
            read_limit=read_limit,
            write_queue_size=write_queue_size,
            write_timeout=write_timeout,
            ping_interval=ping_interval,
            idle_timeout=idle_timeout,
            close_timeout=close_timeout,
            max_call_timeout=max_call_timeout,
            slow_threshold=slow_threshold,
            max_subscriptions=max_subscriptions,
            max_calls_in_flight=max_calls_in_flight,
        )
        self._services = ConnServices(
            settings=self.settings,
            broker=self.broker,
            pubsub_broker=self.pubsub_broker,
            hub=self.hub,
            timer=self.timer,
            health=self.redis_health,
            listener_health=self.node_health,
            handler=lambda conn, msg: self.handler(conn, msg),  # the attribute may be replaced
            encode=self.encode,
            event_write_limit=self._event_write_limit,
            incr=self.stats.incr,
            observe_call_ack=self.metrics.call_ack.observe,
            observe_result_delivery=self.metrics.result_delivery.observe,
            on_closed=self._conn_closed,
            logger=self.logger,
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
        return f"{scheme}://{host}:{self.port}{self.path}"

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
        with self._lock:
            return list(self._conns.values())

    def connection_thread_count(self) -> int:
        """Threads serving connections: one per TCP connection, plus each open connection's
        writer, results and pub-sub threads."""
        with self._lock:
            return len(self._conn_threads) + sum(c.helper_thread_count() for c in self._conns.values())

    # -- lifecycle --

    def start(self) -> "Server":
        """Serve in a background thread (``juggler-server-accept``); returns at once."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("server was shut down")
            if self._accept_thread is not None:
                return self
            self.timer.start()
            if self._http is not None:
                self._http.start()
            self._accept_thread = threading.Thread(target=self._accept_loop, name="juggler-server-accept")
            self._accept_thread.start()
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
            self._shutdown_done.wait()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop accepting, close every connection with 1001 and join every thread. Idempotent."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
            accept = self._accept_thread
            handshakes = list(self._handshakes.values())
        if not first:
            self._shutdown_done.wait()
            return
        try:
            try:
                # wakes the accept() of the accept loop (Linux: it fails with EINVAL)
                self._tcp.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if accept is not None:
                accept.join()
            self._tcp.server_close()
            for stop in handshakes:
                stop()
            for conn in self.connections:
                conn.close(CloseCode.GOING_AWAY, "server shutting down")
            # listeners waiting for their turn to reconnect give up (their connections close)
            for health in self.redis_healths():
                health.close()
            # Each connection ends within its close_timeout: its close deadline shuts the
            # socket of a peer that does not answer.
            with self._lock:
                threads = list(self._conn_threads)
            for t in threads:
                t.join()
            self.hub.close()
            self.timer.stop()
            if self._http is not None:
                self._http.close()
        finally:
            self._shutdown_done.set()
        self.logger.info("juggler server on %s stopped", self.url)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- connection bookkeeping --

    def _accept_loop(self) -> None:
        listener = self._tcp.socket
        while True:
            try:
                request, client_address = listener.accept()
            except OSError as exc:
                if self._stopping:
                    return
                # e.g. EMFILE, out of file descriptors: the pending connection stays in the
                # backlog; wait a little (or for shutdown) instead of spinning on the error
                self.logger.error("accept failed: %s", exc)
                self._shutdown_done.wait(0.1)
                continue
            try:
                self._spawn_conn_thread(request, client_address)
            except Exception:  # (MemoryError, say): that connection is lost, not the accept loop
                self.logger.exception("cannot serve %s", client_address)
                _close_quietly(request)

    def _spawn_conn_thread(self, request: socket.socket, client_address: Any) -> None:
        tcp = self._tcp

        def run() -> None:
            try:
                tcp.finish_request(request, client_address)
            except Exception:
                tcp.handle_error(request, client_address)
            finally:
                gilsend.shutdown_and_close(request)  # as tcp.shutdown_request, keeping the GIL
                with self._lock:
                    self._conn_threads.discard(threading.current_thread())

        # A daemon thread, though Server.shutdown() joins it like every other: CPython keeps a
        # lock per non-daemon thread and scans all of them whenever one ends, which made
        # closing 10,000 connections take minutes (quadratic). Likewise a connection's writer
        # and results threads (juggler.conn.CONN_THREAD_DAEMON).
        t = threading.Thread(
            target=run, name=f"juggler-conn-{client_address[0]}:{client_address[1]}", daemon=CONN_THREAD_DAEMON
        )
        with self._lock:
            if self._stopping:
                tcp.shutdown_request(request)
                return
            # Handshakes in progress are capped too, so a flood of idle TCP connections cannot
            # spawn threads without bound. They are refused here, on the accept thread, at once.
            if self.max_connections and len(self._conn_threads) >= self.max_connections + _HANDSHAKE_HEADROOM:
                overloaded = True
            else:
                overloaded = False
                self._conn_threads.add(t)
        if overloaded:
            self._refuse_overloaded(tcp, request)
            return
        try:
            t.start()
        except (RuntimeError, MemoryError) as exc:  # e.g. "can't start new thread": out of threads
            with self._lock:
                self._conn_threads.discard(t)
            self._out_of_threads(client_address, exc)
            self._refuse_overloaded(tcp, request, OUT_OF_THREADS)

    def _out_of_threads(self, client_address: Any, exc: BaseException) -> None:
        """A connection is refused (503) because no thread could be started for it: logged
        at ERROR once, then at most every :data:`OUT_OF_THREADS_LOG_INTERVAL` seconds with the
        count of refusals since (a process out of threads refuses every connection)."""
        now = time.monotonic()
        with self._lock:
            self._thread_failures += 1
            if now < self._thread_failure_logged + OUT_OF_THREADS_LOG_INTERVAL:
                return
            count, self._thread_failures = self._thread_failures, 0
            self._thread_failure_logged = now
        self.logger.error("cannot start a thread for %s (%s): refused with HTTP 503 (%d refused since the "
                          "last report); see kernel.pid_max, vm.max_map_count and memory",
                          client_address, exc, count)  # fmt: skip

    def _refuse_overloaded(self, tcp: _TCPServer, request: socket.socket, reason: str = AT_LIMIT) -> None:
        if self.ssl_context is not None:
            # No TLS handshake on the accept thread: a plain-text 503 would only read as
            # garbage to a TLS client. It gets the connection closed instead.
            self.stats.incr("refused_closed")
        else:
            self.stats.incr("refused_503")
            try:
                request.settimeout(0)  # never block the accept thread on a client
                request.send(http_response(503, "Service Unavailable", {}, reason + "\n"))
            except OSError:
                pass
        tcp.shutdown_request(request)

    def _handshake_started(self, sock: Any) -> bool:
        """Register a socket in its handshake, so that shutdown can wake its reads; ``False``
        if the server is stopping (then it is not registered)."""
        stop = sock.shutdown if isinstance(sock, SocketIO) else functools.partial(_shut, sock)
        with self._lock:
            if self._stopping:
                return False
            self._handshakes[id(sock)] = stop
        return True

    def _handshake_ended(self, sock: Any) -> None:
        with self._lock:
            self._handshakes.pop(id(sock), None)

    def _conn_opened(self, conn: Conn) -> bool:
        with self._lock:
            if self._stopping:
                return False
            self._conns[conn.uuid] = conn
        threading.current_thread().name = f"juggler-conn-{conn.id}-reader"
        self.stats.incr("connections_total")
        self.logger.debug("connection %s opened from %s", conn.uuid, conn.remote_addr)
        self._notify(conn, ConnState.CONNECTED)
        return True

    def _conn_closed(self, conn: Conn) -> None:
        with self._lock:
            self._conns.pop(conn.uuid, None)
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
        if path != self.path:
            raise Refusal(404, "Not Found", f"no websocket endpoint at {path}")
        check_upgrade(req)
        origin = req.headers.get("origin")
        if self.allowed_origins is not None and origin is not None:
            if not any(fnmatch.fnmatchcase(origin.lower(), pattern) for pattern in self.allowed_origins):
                raise Refusal(403, "Forbidden", f"origin {origin} is not allowed")
        offered = req.tokens("sec-websocket-protocol")
        if SUBPROTOCOL in offered:
            protocol: Optional[str] = SUBPROTOCOL
        elif not offered and self.allow_empty_subprotocol:
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
            if self.max_connections and self._slots >= self.max_connections:
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
        if not self.http_endpoints or self._http is not None:  # off, or off the public port
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
        if type(self).encode is Server.encode and writes_events_as_sent(self.handler):
            return self.write_limit
        return None

    def encode(self, conn: Conn, msg: Any) -> Optional[bytes]:
        """The bytes of a message about to be written to ``conn``; ``None`` to drop it (an
        EVNT over ``write_limit``)."""
        data = encode(msg).encode("utf-8")
        if len(data) > self.write_limit:
            self.stats.incr("oversized_messages")
            self.logger.warning("connection %s: %s for %s is %d bytes, over the write limit", conn.uuid,
                                msg.type.name, getattr(msg, "for_uuid", msg.uuid), len(data))  # fmt: skip
            if isinstance(msg, Res):  # the call still ends: with an error result
                msg = Res(msg.for_uuid, "", error_result(f"result larger than the server's write limit of {self.write_limit} bytes"))
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


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def parse_host_port(value: str) -> tuple[str, int]:
    """``("HOST", PORT)`` from ``"HOST:PORT"`` (``"[::1]:9100"`` for IPv6); :class:`ValueError`
    naming the problem."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:9100)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _ping(broker: Any) -> bool:
    ping = getattr(broker, "ping", None)
    try:
        return bool(ping()) if ping is not None else True
    except Exception:
        return False
