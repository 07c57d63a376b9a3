"""Prometheus metrics of servers and callees (``prometheus_client``).

Each :class:`~juggler.Server` and :class:`~juggler.Callee` has a registry of its own (so that
several in one process do not collide); counters are read from their thread-safe stats at
scrape time, latencies are histograms. A server's counters and histograms are kept per thread
(:class:`ThreadCounters`, :class:`ThreadHistogram`): a connection's threads count each
message without taking a lock, and a scrape sums them. A server serves them at ``GET /metrics`` on its own
port, or on its ``metrics_listen`` address (:class:`HttpEndpoints`, on a
:class:`~juggler.listener.Listener`); ``juggler callee
--metrics-port`` serves a callee's.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import socket
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, Optional, Protocol, Sized, TypeVar

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .listener import Listener, shut

if TYPE_CHECKING:  # pragma: no cover
    from .callee import Callee


class _Snapshot(Protocol):
    def snapshot(self) -> dict[str, int]: ...


class MeteredServer(Protocol):
    """What :class:`ServerMetrics` reads of a server (:class:`~juggler.Server` has it): this
    module does not import the server's, which imports it."""

    @property
    def stats(self) -> _Snapshot: ...

    @property
    def connections(self) -> Sized: ...

    def connection_thread_count(self) -> int: ...

__all__ = ["ServerMetrics", "CalleeMetrics", "HttpEndpoints", "ThreadCounters", "ThreadHistogram", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


T = TypeVar("T")


class _PerThread(Generic[T]):
    """A value per thread (made by ``make``), written by its thread alone and without a lock;
    :meth:`total` adds them up (``add(into, shard)`` must copy ``shard`` in one C call, as
    ``dict.copy()`` or ``list[:]`` do: its thread may be writing it meanwhile). The values of
    threads that ended are folded into one, at a read or when their number has doubled."""

    def __init__(self, make: Callable[[], T], add: Callable[[T, T], None]) -> None:
        self._make = make
        self._add = add
        #: ``local.shard``: the calling thread's value, once :meth:`mine` made it
        self.local = threading.local()
        self._lock = threading.Lock()
        self._live: list[tuple[weakref.ref[threading.Thread], T]] = []
        self._ended = make()  # the sum of the threads that ended
        self._fold_at = 64

    def mine(self) -> T:
        """The calling thread's value."""
        try:
            return self.local.shard  # type: ignore[no-any-return]
        except AttributeError:
            return self._register()

    def _register(self) -> T:
        shard = self._make()
        thread = weakref.ref(threading.current_thread())
        with self._lock:
            if len(self._live) >= self._fold_at:
                self._fold_ended()
                self._fold_at = max(64, 2 * len(self._live))
            self._live.append((thread, shard))
        self.local.shard = shard
        return shard

    def _fold_ended(self) -> None:
        assert self._lock.locked()
        live = []
        for thread, shard in self._live:
            t = thread()
            if t is not None and t.is_alive():
                live.append((thread, shard))
            else:  # (it writes no more)
                self._add(self._ended, shard)
        self._live = live

    def total(self) -> T:
        """The sum of every thread's value."""
        total = self._make()
        with self._lock:
            self._fold_ended()
            self._add(total, self._ended)
            for _, shard in self._live:
                self._add(total, shard)
        return total


def _add_counts(into: dict[str, int], shard: dict[str, int]) -> None:
    for name, n in shard.copy().items():
        into[name] = into.get(name, 0) + n


class ThreadCounters:
    """Named counters, counted per thread without a lock, summed by :meth:`snapshot` (a
    server's :attr:`~juggler.Server.stats`)."""

    def __init__(self) -> None:
        self._counts: _PerThread[dict[str, int]] = _PerThread(dict, _add_counts)
        self._local = self._counts.local

    def incr(self, name: str, n: int = 1) -> None:
        try:
            counts = self._local.shard
        except AttributeError:
            counts = self._counts.mine()
        counts[name] = counts.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        return self._counts.total()


class ThreadHistogram(Histogram):
    """A :class:`prometheus_client.Histogram` (no labels) whose observations are kept per
    thread without a lock and summed when it is collected: the same samples, the same text."""

    def _metric_init(self) -> None:
        super()._metric_init()
        n = len(self._upper_bounds)
        self._bounds = list(self._upper_bounds)
        # per thread: the count in each bucket, then the sum of the observations
        self._shards: _PerThread[list[float]] = _PerThread(lambda: [0] * n + [0.0], _add_lists)
        self._local = self._shards.local  # (observe reads it without a call to mine())

    def observe(self, amount: float, exemplar: Optional[dict[str, str]] = None) -> None:
        if exemplar:  # (not on juggler's path)
            raise ValueError("ThreadHistogram keeps no exemplars")
        try:
            shard = self._local.shard
        except AttributeError:
            shard = self._shards.mine()
        if amount == amount:  # (NaN: in no bucket, as in Histogram)
            shard[bisect.bisect_left(self._bounds, amount)] += 1
        shard[-1] += amount

    def _child_samples(self) -> Any:
        # the library's samples (which, in its order and format), with the threads' sums
        total = self._shards.total()
        cumulative = list(itertools.accumulate(total[:-1]))
        values = {"_count": float(cumulative[-1]), "_sum": float(total[-1])}
        samples, bucket = [], 0
        for sample in super()._child_samples():
            if sample.name == "_bucket":
                sample = sample._replace(value=float(cumulative[bucket]))
                bucket += 1
            elif sample.name in values:
                sample = sample._replace(value=values[sample.name])
            samples.append(sample)
        return tuple(samples)


def _add_lists(into: list[float], shard: list[float]) -> None:
    for i, v in enumerate(shard[:]):
        into[i] += v


class _ServerCollector:
    def __init__(self, server: MeteredServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        s = self.server
        stats = s.stats.snapshot()
        read = CounterMetricFamily("juggler_messages_read", "Messages read from clients, by type.", labels=["type"])
        written = CounterMetricFamily("juggler_messages_written", "Messages written to clients, by type.", labels=["type"])
        closes = CounterMetricFamily("juggler_connections_closed", "Connections closed, by close code.", labels=["code"])
        refused = CounterMetricFamily("juggler_handshakes_refused", "Handshakes refused, by HTTP status.", labels=["status"])
        for key, value in sorted(stats.items()):
            prefix, _, rest = key.partition("_")
            if prefix == "read":
                read.add_metric([rest], value)
            elif prefix == "write":
                written.add_metric([rest], value)
            elif prefix == "close":
                closes.add_metric([rest], value)
            elif prefix == "refused":
                refused.add_metric([rest], value)
        yield from (read, written, closes, refused)
        for name, key, help_text in (
            ("juggler_connections", "connections_total", "Websocket connections accepted."),
            ("juggler_expired_results", "expired_results", "Results dropped because their call had expired (by redis' count or the connection's) or was NACKed."),
            ("juggler_failed_event_decodes", "failed_event_decodes", "Pub-sub payloads that were not juggler events."),
            ("juggler_slow_messages", "slow_messages", "Requests whose processing took longer than slow_threshold."),
            ("juggler_oversized_messages", "oversized_messages", "Messages over write_limit (RES sent as an error)."),
        ):
            yield CounterMetricFamily(name, help_text, value=stats.get(key, 0))
        healths = s.redis_healths()
        yield GaugeMetricFamily("juggler_redis_up", "1 while the server sees its redis (each of them) up, 0 while "
                                "its listeners reconnect.", value=int(s.redis_up()))  # fmt: skip
        yield CounterMetricFamily("juggler_redis_reconnects", "Reconnects of the server's redis listeners after "
                                  "redis failed them.", value=sum(h.reconnects for h in healths))  # fmt: skip
        conns = s.connections
        yield GaugeMetricFamily("juggler_connections_active", "Open websocket connections.", value=len(conns))
        yield GaugeMetricFamily(
            "juggler_connection_threads_active",
            "Threads serving connections (reader, writer, results, pub-sub, and handshakes).",
            value=s.connection_thread_count(),
        )


class ServerMetrics:
    """The metrics of one server."""

    def __init__(self, server: MeteredServer) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.call_ack = ThreadHistogram(
            "juggler_call_ack_seconds",
            "From reading a CALL to queueing its ACK or NACK (storing the call in redis).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.result_delivery = ThreadHistogram(
            "juggler_result_delivery_seconds",
            "From taking a result off redis to writing its RES to the client.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ServerCollector(server))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CalleeCollector:
    def __init__(self, callee: "Callee") -> None:
        self.callee = callee

    def collect(self) -> Iterator[Any]:
        snap = self.callee.stats.snapshot()
        labels = ["callee"]
        name = [self.callee.name]
        for metric, key, help_text in (
            ("juggler_callee_calls", "calls", "Calls run to the end (result stored or dropped)."),
            ("juggler_callee_expired_calls", "expired", "Calls skipped, or results dropped, because the call expired."),
            ("juggler_callee_errors", "errors", "Calls whose function raised or returned non-JSON."),
        ):
            c = CounterMetricFamily(metric, help_text, labels=labels)
            c.add_metric(name, snap[key])
            yield c
        busy = GaugeMetricFamily("juggler_callee_busy_workers", "Workers running a function now.", labels=labels)
        busy.add_metric(name, snap["busy"])
        yield busy
        workers = GaugeMetricFamily("juggler_callee_workers", "Worker threads of the pool.", labels=labels)
        workers.add_metric(name, self.callee.workers)
        yield workers
        # the same two as a server's, for what the callee's process sees of redis
        health = self.callee.health
        up = GaugeMetricFamily("juggler_redis_up", "Whether redis answers (1) or not (0), as this process sees it.", labels=labels)
        up.add_metric(name, 1 if health.up else 0)
        yield up
        reconnects = CounterMetricFamily(
            "juggler_redis_reconnects", "Reconnects to redis let through by the shared backoff.", labels=labels
        )
        reconnects.add_metric(name, health.reconnects)
        yield reconnects


class CalleeMetrics:
    """The metrics of callees, served over HTTP by :meth:`serve` (``GET /metrics``)."""

    def __init__(self, *callees: "Callee") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        for callee in callees:
            self.registry.register(_CalleeCollector(callee))
        self._http: HttpEndpoints | None = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve ``/metrics`` on ``host:port`` in a thread; returns the port. :meth:`close` stops it."""
        routes = {"/metrics": lambda: (200, self.render(), CONTENT_TYPE)}
        self._http = HttpEndpoints(host, port, routes, name="juggler-callee-metrics").start()
        return self._http.port

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


Route = Callable[[], "tuple[int, bytes, str]"]


class HttpEndpoints:
    """A small HTTP server for operators (health checks, metrics scrapes): ``GET`` and
    ``HEAD`` of the paths in ``routes``, each a function that returns ``(status, body,
    content type)``; other paths get 404.

    Its accept thread is named ``name``; each request runs on a thread of its own
    (``name-N``), at most ``max_clients`` at once (one more gets 503 at once), and has
    ``timeout`` seconds to send its request. :meth:`close` stops and joins them all. Its
errors (accept failing, no thread for a request) go to ``logger``, by default
``juggler.metrics``.
    """

    def __init__(self, host: str, port: int, routes: dict[str, Route], *, name: str, max_clients: int = 8,
                 timeout: float = 5.0, logger: Optional[logging.Logger] = None) -> None:  # fmt: skip
        from http.server import BaseHTTPRequestHandler

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._answer(head=False)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(head=True)

            def _answer(self, head: bool) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404, f"only {', '.join(sorted(routes))} here")
                    return
                status, body, ctype = route()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
                pass

        _Handler.timeout = timeout  # a socket timeout for each request
        self.name = name
        self._handler = _Handler
        self._listener = Listener(host, port, self._serve, name=name, conn_name=name + "-{n}",
                                  logger=logger or logging.getLogger(__name__), max_threads=max_clients)  # fmt: skip
        self.host, self.port = self._listener.host, self._listener.port

    def start(self) -> "HttpEndpoints":
        self._listener.start()
        return self

    def _serve(self, sock: socket.socket, address: Any) -> None:
        """One request, on its thread (the listener closes the socket after)."""
        if not self._listener.register(sock, functools.partial(shut, sock)):  # close() shuts it: no wait
            return
        try:
            self._handler(sock, address, self)
        except OSError:  # a client that went away mid-answer, or sent nothing in time
            pass
        finally:
            self._listener.unregister(sock)

    def close(self) -> None:
        """Stop accepting, end the requests under way (their sockets shut down) and join every
        thread. Idempotent."""
        self._listener.close()
