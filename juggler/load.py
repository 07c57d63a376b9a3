"""``juggler load``: a load tester for juggler servers.

Opens ``connections`` clients; each sends calls to ``uri`` for ``duration``, either at a fixed
``rate`` per connection or, with rate 0, auto-regulated (the next call leaves when the previous
one has ended). Every call's latency runs from just before it is sent to its RES. When the
duration is over it waits for every call still in flight to end, so each call is counted with
exactly one outcome: result, NACK, expired or closed. Unlike the reference tool, latency is
measured from the send, and no RES that arrives before ``send`` returns is lost.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Optional

from .client import Client
from .exceptions import CallExpired, ConnectionClosed, HandshakeError, NackError, RemoteError

__all__ = ["LoadRun", "run_load", "percentile"]


def percentile(sorted_values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of already sorted values; 0 for none."""
    if not sorted_values:
        return 0.0
    rank = max(1, int(-(-p * len(sorted_values) // 100)))  # ceil(p/100 * n)
    return sorted_values[min(rank, len(sorted_values)) - 1]


class LoadRun:
    """One load test; :meth:`run` returns the report as a dict."""

    def __init__(
        self,
        url: str,
        connections: int,
        rate: float,
        duration: float,
        timeout: float,
        uri: str,
        args: Any,
        progress: Optional[Any] = None,
        stop: Optional[threading.Event] = None,
    ) -> None:
        self.url = url
        self.connections = connections
        self.rate = rate
        self.duration = duration
        self.timeout = timeout
        self.uri = uri
        self.args = args
        self.progress = progress
        self.stop = stop or threading.Event()  # set it to end the run early
        self._lock = threading.Lock()
        self._all_done = threading.Condition(self._lock)
        self.calls = self.results = self.errors = self.nacks = self.expired = self.closed = 0
        self.latencies: list[float] = []
        self._in_flight = 0

    def _record(self, fut: Any, start: float) -> None:
        elapsed = time.perf_counter() - start
        try:
            fut.result()
            outcome = "results"
        except RemoteError:
            outcome = "errors"
        except NackError:
            outcome = "nacks"
        except CallExpired:
            outcome = "expired"
        except ConnectionClosed:
            outcome = "closed"
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
            if outcome in ("results", "errors"):
                self.latencies.append(elapsed)
            self._in_flight -= 1
            self._all_done.notify_all()

    def _send(self, client: Client) -> Any:
        with self._lock:
            self.calls += 1
            self._in_flight += 1
        start = time.perf_counter()  # before the send: the reference measured from after it
        fut = client.call_async(self.uri, self.args, timeout=self.timeout)
        fut.add_done_callback(lambda f: self._record(f, start))
        return fut

    def _drive(self, client: Client, end: float) -> None:
        if self.rate > 0:
            interval = 1.0 / self.rate
            next_at = time.monotonic()
            while not self.stop.is_set() and next_at < end:
                delay = next_at - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    break
                if client.closed:
                    break
                self._send(client)
                next_at = max(next_at + interval, time.monotonic() - interval)  # no catch-up burst
        else:
            while not self.stop.is_set() and time.monotonic() < end and not client.closed:
                fut = self._send(client)
                try:
                    fut.exception()  # wait for this call to end, whatever its outcome
                except Exception:  # pragma: no cover - futures here are never cancelled
                    pass

    def _report_progress(self, started: float, end: float) -> None:
        assert self.progress is not None
        while not self.stop.wait(1.0) and time.monotonic() < end + self.timeout:
            with self._lock:
                line = (
                    f"\r{time.monotonic() - started:6.1f} s  calls {self.calls}  results {self.results + self.errors}"
                    f"  nacks {self.nacks}  expired {self.expired}  in flight {self._in_flight}  "
                )
            self.progress.write(line)
            self.progress.flush()

    def run(self) -> dict[str, Any]:
        clients = [Client.connect(self.url) for _ in range(self.connections)]
        ticker = None
        try:
            started = time.monotonic()
            end = started + self.duration
            if self.progress is not None:
                ticker = threading.Thread(target=self._report_progress, args=(started, end), name="juggler-load-progress")
                ticker.start()
            drivers = [
                threading.Thread(target=self._drive, args=(c, end), name=f"juggler-load-{i}")
                for i, c in enumerate(clients)
            ]
            for t in drivers:
                t.start()
            for t in drivers:
                t.join()
            sending = time.monotonic() - started
            with self._lock:  # every call ends: its result, NACK, expiry or a closed connection
                self._all_done.wait_for(lambda: self._in_flight == 0)
            total = time.monotonic() - started
        finally:
            self.stop.set()
            if ticker is not None:
                ticker.join()
                self.progress.write("\n")
            acks = sum(c.received["ACK"] for c in clients)
            for c in clients:
                c.close()
        lat = sorted(x * 1000 for x in self.latencies)
        return {
            "url": self.url,
            "uri": self.uri,
            "connections": self.connections,
            "rate": self.rate,
            "calls": self.calls,
            "acks": acks,
            "nacks": self.nacks,
            "results": self.results + self.errors,
            "error_results": self.errors,
            "expired": self.expired,
            "closed": self.closed,
            "duration": round(total, 3),
            "sending": round(sending, 3),
            "calls_per_second": round(self.calls / sending, 1) if sending > 0 else 0.0,
            "latency_ms": {
                "min": round(lat[0], 3) if lat else 0.0,
                "p50": round(percentile(lat, 50), 3),
                "p75": round(percentile(lat, 75), 3),
                "p90": round(percentile(lat, 90), 3),
                "p99": round(percentile(lat, 99), 3),
                "max": round(lat[-1], 3) if lat else 0.0,
            },
        }


def format_report(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    mode = f"{r['rate']:g}/s per connection" if r["rate"] else "auto-regulated"
    return "\n".join(
        [
            f"target:    {r['url']}  uri {r['uri']}  {r['connections']} connections, {mode}",
            f"calls:     {r['calls']}",
            f"acks:      {r['acks']}",
            f"nacks:     {r['nacks']}",
            f"results:   {r['results']}  (error results: {r['error_results']})",
            f"expired:   {r['expired']}",
            f"closed:    {r['closed']}",
            f"duration:  {r['duration']:.2f} s  (sending for {r['sending']:.2f} s)",
            f"calls/s:   {r['calls_per_second']:.1f}",
            "latency:   min {min:.2f} ms  p50 {p50:.2f}  p75 {p75:.2f}  p90 {p90:.2f}  p99 {p99:.2f}  max {max:.2f}".format(**lat),
        ]
    )


def scrape(metrics_url: str) -> dict[str, float]:
    """Counter-like samples (``*_total``, ``*_count``, ``*_sum``) of a Prometheus endpoint."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode("utf-8")
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_total", "_count", "_sum")):
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What changed between two scrapes (new series count from zero)."""
    deltas = {}
    for name, value in sorted(after.items()):
        delta = value - before.get(name, 0.0)
        if delta:
            deltas[name] = round(delta, 6)
    return deltas


def run_load(url: str, cfg: dict[str, Any], as_json: bool = False, progress: bool = True) -> int:
    from .cli import StopSignal

    try:
        args = json.loads(cfg["payload"])
    except ValueError as exc:
        print(f"juggler load: --payload must be JSON: {exc}", file=sys.stderr)
        return 2
    show = sys.stderr if progress and sys.stderr.isatty() else None
    stop = StopSignal().install()  # Ctrl-C ends the run early, with a report
    run = LoadRun(url, cfg["connections"], cfg["rate"], cfg["duration"], cfg["timeout"], cfg["uri"], args, show, stop.event)
    metrics_url = cfg.get("metrics")
    before: dict[str, float] = {}
    if metrics_url:
        try:
            before = scrape(metrics_url)
        except (OSError, ValueError) as exc:
            print(f"juggler load: cannot read metrics at {metrics_url}: {exc}", file=sys.stderr)
            return 5
    try:
        report = run.run()
    except (HandshakeError, OSError) as exc:
        print(f"juggler load: cannot connect to {url}: {exc}", file=sys.stderr)
        return 5
    if metrics_url:
        try:
            report["server_metrics"] = metric_deltas(before, scrape(metrics_url))
        except (OSError, ValueError) as exc:
            print(f"juggler load: cannot read metrics at {metrics_url}: {exc}", file=sys.stderr)
    if as_json:
        print(json.dumps(report), flush=True)
    else:
        text = format_report(report)
        if "server_metrics" in report:
            text += "\nserver metrics over the run:\n" + "\n".join(
                f"  {name} +{delta:g}" for name, delta in report["server_metrics"].items()
            )
        print(text, flush=True)
    return 0
