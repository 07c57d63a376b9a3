"""Prometheus metrics of servers and callees (``prometheus_client``).

Each :class:`~juggler.Server` and :class:`~juggler.Callee` has a registry of its own (so that
several in one process do not collide); counters are read from their thread-safe stats at
scrape time, latencies are histograms. A server serves them at ``GET /metrics`` on its own
port; ``juggler callee --metrics-port`` serves a callee's.
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:  # pragma: no cover
    from .callee import Callee
    from .server import Server

__all__ = ["ServerMetrics", "CalleeMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _ServerCollector:
    def __init__(self, server: "Server") -> None:
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
            ("juggler_expired_results", "expired_results", "Results dropped because their call had expired."),
            ("juggler_failed_event_decodes", "failed_event_decodes", "Pub-sub payloads that were not juggler events."),
            ("juggler_slow_messages", "slow_messages", "Requests whose processing took longer than slow_threshold."),
            ("juggler_oversized_messages", "oversized_messages", "Messages over write_limit (RES sent as an error)."),
        ):
            yield CounterMetricFamily(name, help_text, value=stats.get(key, 0))
        conns = s.connections
        yield GaugeMetricFamily("juggler_connections_active", "Open websocket connections.", value=len(conns))
        yield GaugeMetricFamily(
            "juggler_connection_threads_active",
            "Threads serving connections (reader, writer, results, pub-sub, and handshakes).",
            value=s.connection_thread_count(),
        )


class ServerMetrics:
    """The metrics of one server."""

    def __init__(self, server: "Server") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.call_ack = Histogram(
            "juggler_call_ack_seconds",
            "From reading a CALL to queueing its ACK or NACK (storing the call in redis).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.result_delivery = Histogram(
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


class CalleeMetrics:
    """The metrics of callees, served over HTTP by :meth:`serve` (``GET /metrics``)."""

    def __init__(self, *callees: "Callee") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        for callee in callees:
            self.registry.register(_CalleeCollector(callee))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve ``/metrics`` on ``host:port`` in a thread; returns the port. :meth:`close` stops it."""
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        metrics = self

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = metrics.render()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
                pass

        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True  # scrapes are short; close() stops the listener
        self._thread = threading.Thread(target=_accept, args=(self._server,), name="juggler-callee-metrics")
        self._thread.start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            try:
                self._server.socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            except OSError:
                pass
            assert self._thread is not None
            self._thread.join()
            self._server.server_close()
            self._server = None


def _accept(server: Any) -> None:
    """socketserver's loop without its poll: block in accept() until the socket is shut down."""
    while True:
        try:
            request, address = server.get_request()
        except OSError:
            return
        if server.verify_request(request, address):
            server.process_request(request, address)
        else:
            server.shutdown_request(request)
