"""``juggler load``: a load tester for juggler servers.

Opens ``connections`` clients; each sends calls to ``uri`` for ``duration``, either at a fixed
``rate`` per connection or, with rate 0, auto-regulated (the next call leaves when the previous
one has ended). Every call's latency runs from just before it is sent to its RES. When the
duration is over it waits for every call still in flight to end, so each call is counted with
exactly one outcome: result, NACK, expired or closed. Unlike the reference tool, latency is
measured from the send, and no RES that arrives before ``send`` returns is lost.

Auto-regulated connections do not use :class:`~juggler.client.Client`: with one call in flight
there is nothing for its reader, writer and timer threads to do concurrently, and handing each
call from thread to thread (caller, writer, reader, caller) took about half of the load tool's
CPU per call, which made it, not the server, the bottleneck. A :class:`_Connection` sends a
call and reads until its RES, NACK or deadline, all on one thread. At a fixed rate calls
overlap, so those connections are Clients.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from array import array
from collections import deque
from typing import Any, Callable, Optional

from .client import READ_LIMIT, Client
from .dial import open_websocket
from .deadline import Deadline
from .exceptions import CallExpired, ConnectionClosed, HandshakeError, NackError, ProtocolError, RemoteError
from .message import SUBPROTOCOL, Ack, Call, Nack, Res, decode, encode, result_error_message
from .frames import OP_TEXT, CloseCode
from .peer import CLOSE, FAIL, SEND, Peer
from .signals import StopSignal
from .transport import RECV_SIZE, SocketIO

__all__ = ["LoadRun", "run_load", "run_processes", "build_report", "percentile", "EXIT_NO_RESULT"]

#: Exit status of a run in which no call got a result (all expired, NACKed or closed): the
#: report has no latency, and a script must not take it for a good run.
EXIT_NO_RESULT = 4


def percentile(sorted_values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of already sorted values; 0 for none."""
    if not sorted_values:
        return 0.0
    rank = max(1, int(-(-p * len(sorted_values) // 100)))  # ceil(p/100 * n)
    return sorted_values[min(rank, len(sorted_values)) - 1]


class _Connection:
    """One auto-regulated connection of the load tool: :meth:`call` sends a CALL and reads
    on the calling thread until its RES or NACK, or until its timeout passes. What it reads
    goes through a :class:`~juggler.peer.Peer`, as a :class:`Client`'s does."""

    def __init__(self, url: str, connect_timeout: float = 10.0) -> None:
        ws = open_websocket(url, [SUBPROTOCOL], None, connect_timeout)  # as Client.connect does it
        self._ws = ws
        self._io = SocketIO(ws.sock)
        self._peer = Peer(client=True, limit=READ_LIMIT, read_after_close=True)
        self._events: deque[tuple[int, Any]] = deque()  # the peer's, not acted on yet
        self.closed = False
        self.acks = 0

    def call(self, data: bytes, msg_uuid: str, timeout: float) -> str:
        """Send one CALL (its JSON ``data``); its outcome: results, errors, nacks, expired or
        closed. A late RES of an earlier, expired call is skipped."""
        deadline = Deadline.after(timeout)
        try:
            self._io.sendall(self._peer.frame(OP_TEXT, data))
            while True:
                msg = self._next(deadline)
                if msg is None:
                    return "expired"
                if isinstance(msg, Ack):
                    self.acks += 1
                elif isinstance(msg, Nack) and msg.for_uuid == msg_uuid:
                    return "nacks"
                elif isinstance(msg, Res) and msg.for_uuid == msg_uuid:
                    return "errors" if result_error_message(msg.args) is not None else "results"
        except (ConnectionClosed, OSError):
            self._abort()
            return "closed"

    def _next(self, deadline: Deadline) -> Any:
        """The next message from the server; ``None`` once ``deadline`` has passed.
        :class:`ConnectionClosed` when the server closed or broke the protocol."""
        while True:
            while self._events:
                kind, value = self._events.popleft()
                if kind == OP_TEXT:
                    try:
                        return decode(value)
                    except ProtocolError:
                        continue  # as Client does: an invalid message is skipped
                if kind == SEND:  # a pong
                    self._io.sendall(value)
                elif kind == CLOSE:
                    if not self._peer.closing:
                        try:
                            self._io.sendall(self._peer.close_frame(value.answer))
                        except OSError:
                            pass
                    raise ConnectionClosed(*value)
                elif kind == FAIL:
                    raise ConnectionClosed(value.close_code, f"protocol error: {value.reason}")
            if not self._receive(deadline):
                return None

    def _receive(self, deadline: Deadline) -> bool:
        """Hand what the server sends next to the peer; ``False`` once ``deadline`` has passed."""
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                return False
            if not self._io.wait_readable(min(1000, int(remaining * 1000) + 1)):
                continue
            chunk = self._io.recv(RECV_SIZE)
            if chunk is None:
                continue
            if not chunk:
                raise ConnectionClosed(CloseCode.ABNORMAL_CLOSURE, "connection lost")
            self._events.extend(self._peer.receive_data(chunk))
            return True

    def close(self) -> None:
        """The close handshake (code 1000), waiting up to 2 s for the server's answer."""
        if not self.closed:
            try:
                self._io.sendall(self._peer.close_frame(CloseCode.NORMAL_CLOSURE))
                deadline = Deadline.after(2.0)
                while self._next(deadline) is not None:
                    pass  # (what comes before the server's close frame)
            except (ConnectionClosed, OSError):
                pass
        self._abort()

    def _abort(self) -> None:
        self.closed = True
        self._io.shutdown()
        self._ws.shutdown()


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
        ticker: Optional[Callable[[dict[str, Any]], None]] = None,
        on_connected: Optional[Callable[[], None]] = None,
    ) -> None:
        self.url = url
        self.connections = connections
        self.rate = rate
        self.duration = duration
        self.timeout = timeout
        self.uri = uri
        self.args = args
        self.progress = progress  # a stream for the progress line, or None
        self.ticker = ticker  # or a function given a snapshot() every second
        self.on_connected = on_connected  # called once connected, before the clock starts
        self.stop = stop or threading.Event()  # set it to end the run early
        self._lock = threading.Lock()
        self._all_done = threading.Condition(self._lock)
        self.calls = self.results = self.errors = self.nacks = self.expired = self.closed = 0
        self.latencies: list[float] = []
        self._in_flight = 0

    def _count(self, outcome: str, elapsed: float) -> None:
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
            if outcome in ("results", "errors"):
                self.latencies.append(elapsed)
            self._in_flight -= 1
            self._all_done.notify_all()

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
        self._count(outcome, elapsed)

    def _send(self, client: Client) -> Any:
        with self._lock:
            self.calls += 1
            self._in_flight += 1
        start = time.perf_counter()  # before the send: the reference measured from after it
        fut = client.call_async(self.uri, self.args, timeout=self.timeout)
        fut.add_done_callback(lambda f: self._record(f, start))
        return fut

    def _drive(self, client: Client, end: float) -> None:
        """A fixed rate: a call every 1/rate seconds, whether or not the last one has ended."""
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

    def _drive_auto(self, conn: _Connection, end: float) -> None:
        """Auto-regulated: the next call leaves when the previous one has ended."""
        while not self.stop.is_set() and time.monotonic() < end and not conn.closed:
            msg = Call(uri=self.uri, args=self.args, timeout=self.timeout)
            data = encode(msg).encode("utf-8")
            with self._lock:
                self.calls += 1
                self._in_flight += 1
            start = time.perf_counter()
            outcome = conn.call(data, msg.uuid, self.timeout)
            self._count(outcome, time.perf_counter() - start)

    def snapshot(self) -> dict[str, int]:
        """The counts so far, for a progress line."""
        with self._lock:
            return {"calls": self.calls, "results": self.results + self.errors, "nacks": self.nacks,
                    "expired": self.expired, "in_flight": self._in_flight}  # fmt: skip

    def _tick(self, started: float, end: float) -> None:
        while not self.stop.wait(1.0) and time.monotonic() < end + self.timeout:
            snap = self.snapshot()
            if self.ticker is not None:
                self.ticker(snap)
            if self.progress is not None:
                self.progress.write(progress_line(time.monotonic() - started, snap))
                self.progress.flush()

    def run(self) -> dict[str, Any]:
        """Run the test; the report."""
        return build_report(self.url, self.uri, self.connections, self.rate, [self.measure()])

    def measure(self) -> dict[str, Any]:
        """Run the test; its raw counts and latencies (seconds), which :func:`build_report`
        turns into a report, merged with those of other processes."""
        clients: list[Any] = []  # Clients at a fixed rate, _Connections auto-regulated
        connect = Client.connect if self.rate > 0 else _Connection
        try:
            for _ in range(self.connections):
                clients.append(connect(self.url))
        except BaseException:
            for c in clients:
                c.close()
            raise
        ticker = None
        try:
            if self.on_connected is not None:
                self.on_connected()
            started = time.monotonic()
            end = started + self.duration
            if self.progress is not None or self.ticker is not None:
                ticker = threading.Thread(target=self._tick, args=(started, end), name="juggler-load-progress")
                ticker.start()
            drive = self._drive if self.rate > 0 else self._drive_auto
            drivers = [
                threading.Thread(target=drive, args=(c, end), name=f"juggler-load-{i}")
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
                if self.progress is not None:
                    self.progress.write("\n")
            acks = sum(c.received["ACK"] if isinstance(c, Client) else c.acks for c in clients)
            for c in clients:
                c.close()
        return {
            "connections": self.connections,
            "calls": self.calls,
            "acks": acks,
            "nacks": self.nacks,
            "results": self.results,
            "errors": self.errors,
            "expired": self.expired,
            "closed": self.closed,
            "duration": total,
            "sending": sending,
            "latencies": array("d", self.latencies),
        }


def progress_line(elapsed: float, snap: dict[str, int]) -> str:
    return (
        f"\r{elapsed:6.1f} s  calls {snap['calls']}  results {snap['results']}"
        f"  nacks {snap['nacks']}  expired {snap['expired']}  in flight {snap['in_flight']}  "
    )


def build_report(url: str, uri: str, connections: int, rate: float, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The report of one or more :meth:`LoadRun.measure` parts that ran at the same time (one
    per process): counts add up, the latency percentiles are those of all the samples, the
    duration and sending time are the longest."""
    lat = sorted(x * 1000 for p in parts for x in p["latencies"])
    calls = sum(p["calls"] for p in parts)
    errors = sum(p["errors"] for p in parts)
    sending = max(p["sending"] for p in parts)
    report = {
        "url": url,
        "uri": uri,
        "connections": connections,
        "rate": rate,
        "calls": calls,
        "acks": sum(p["acks"] for p in parts),
        "nacks": sum(p["nacks"] for p in parts),
        "results": sum(p["results"] for p in parts) + errors,
        "error_results": errors,
        "expired": sum(p["expired"] for p in parts),
        "closed": sum(p["closed"] for p in parts),
        "duration": round(max(p["duration"] for p in parts), 3),
        "sending": round(sending, 3),
        "calls_per_second": round(calls / sending, 1) if sending > 0 else 0.0,
        # None when no call got a result: there is no latency to report (not a latency of 0)
        "latency_ms": {
            "min": round(lat[0], 3),
            "p50": round(percentile(lat, 50), 3),
            "p75": round(percentile(lat, 75), 3),
            "p90": round(percentile(lat, 90), 3),
            "p99": round(percentile(lat, 99), 3),
            "max": round(lat[-1], 3),
        }
        if lat
        else None,
    }
    if len(parts) > 1:
        report["processes"] = len(parts)
        report["per_process"] = [{"connections": p["connections"], "calls": p["calls"]} for p in parts]
    return report


def format_report(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    mode = f"{r['rate']:g}/s per connection" if r["rate"] else "auto-regulated"
    if r.get("processes", 1) > 1:
        mode += f", over {r['processes']} processes"
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
            "latency:   min {min:.2f} ms  p50 {p50:.2f}  p75 {p75:.2f}  p90 {p90:.2f}  p99 {p99:.2f}  max {max:.2f}".format(**lat)
            if lat is not None
            else "latency:   n/a (no call got a result)",
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


def shares(connections: int, processes: int) -> list[int]:
    """The connections of each of ``processes`` processes: as even as can be."""
    base, extra = divmod(connections, processes)
    return [base + (i < extra) for i in range(processes)]


class _LoadFailed(Exception):
    """A load process failed: the line to print, and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _worker(
    index: int,
    connections: int,
    params: tuple[Any, ...],
    results: Any,
    go: Any,
    stop: Any,
    progress: bool,
    log_level: str,
) -> None:  # pragma: no cover - runs in a child process (tests/test_cli.py runs it)
    """One load process of ``juggler load --processes N``: connects its share of the
    connections, says so, waits for the go, runs, and sends back its raw part."""
    import logging

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    url, rate, duration, timeout, uri, args = params
    local = threading.Event()
    signals = [0]

    def handle(signum: int, frame: Any) -> None:  # Ctrl-C reaches every process of the group
        signals[0] += 1
        if signals[0] > 1:
            os._exit(1)
        local.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    parent = os.getppid()

    def watch() -> None:  # the parent's stop reaches this process; an orphan exits
        while not local.wait(0.1):
            if stop.is_set():
                local.set()
            elif os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="juggler-load-watch", daemon=True).start()

    def connected() -> None:
        results.put(("ready", index))
        while not go.wait(0.1) and not local.is_set():
            pass

    ticker = (lambda snap: results.put(("tick", index, snap))) if progress else None
    run = LoadRun(url, connections, rate, duration, timeout, uri, args, None, local, ticker=ticker, on_connected=connected)
    try:
        part = run.measure()
    except (HandshakeError, OSError) as exc:
        results.put(("error", index, f"cannot connect to {url}: {exc}"))
        return
    results.put(("done", index, part))


def run_processes(
    url: str, cfg: dict[str, Any], args: Any, processes: int, show: Optional[Any], stop: threading.Event
) -> dict[str, Any]:
    """Run the test over ``processes`` processes, each with its share of the connections, all
    starting together once all are connected; one report of them all. Setting ``stop`` stops
    them all. Raises :class:`_LoadFailed`."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may have threads
    results = ctx.Queue()
    go, all_stop = ctx.Event(), ctx.Event()
    params = (url, cfg["rate"], cfg["duration"], cfg["timeout"], cfg["uri"], args)
    procs = [
        ctx.Process(target=_worker, args=(i, n, params, results, go, all_stop, show is not None, cfg["log_level"]),
                    name=f"juggler-load-{i + 1}", daemon=True)  # fmt: skip
        for i, n in enumerate(shares(cfg["connections"], processes))
    ]
    parent = _Parent(procs, show, stop, go, all_stop)
    try:
        _start_with_signals_ignored(procs)
        while len(parent.ended) < processes:
            if stop.is_set():
                all_stop.set()
            try:
                msg = results.get(timeout=0.2)
            except queue.Empty:
                parent.reap_dead()
                continue
            parent.handle(msg)
    finally:
        all_stop.set()
        for p in procs:
            p.join(5.0)
            if p.is_alive():
                p.terminate()
                p.join()
        results.close()
        if show is not None and parent.ticks:
            show.write("\n")
    if parent.failure is not None:
        raise parent.failure
    if not parent.parts:
        raise _LoadFailed("stopped before any load process reported", 1)
    parts = [parent.parts[i] for i in sorted(parent.parts)]
    return build_report(url, cfg["uri"], cfg["connections"], cfg["rate"], parts)


def _start_with_signals_ignored(procs: list[Any]) -> None:
    """Start the processes with SIGINT and SIGTERM ignored (that survives the exec of spawn)
    until _worker handles them: a Ctrl-C while a process imports reaches it as all_stop."""
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


class _Parent:
    """What :func:`run_processes` knows of its load processes, from their messages: who is
    ready (all of them: ``go``), their progress, their parts of the report, who ended (reported
    a part, failed, or died) and the first failure."""

    def __init__(self, procs: list[Any], show: Optional[Any], stop: threading.Event, go: Any, all_stop: Any) -> None:
        self.procs, self.show, self.stop, self.go, self.all_stop = procs, show, stop, go, all_stop
        self.parts: dict[int, dict[str, Any]] = {}
        self.ended: set[int] = set()
        self.ready: set[int] = set()
        self.ticks: dict[int, dict[str, int]] = {}
        self.silent: dict[int, int] = {}
        self.failure: Optional[_LoadFailed] = None
        self.started = self.shown = 0.0

    def handle(self, msg: tuple[Any, ...]) -> None:
        kind, i = msg[0], msg[1]
        if kind == "ready":
            self.ready.add(i)
            if len(self.ready) == len(self.procs):
                self.started = time.monotonic()
                self.go.set()
        elif kind == "tick":
            self._tick(i, msg[2])
        elif kind == "done":
            self.parts[i] = msg[2]
            self.ended.add(i)
        elif kind == "error":
            self.ended.add(i)
            self._fail(_LoadFailed(msg[2], 5))

    def _tick(self, i: int, snap: dict[str, int]) -> None:
        self.ticks[i] = snap
        if self.show is not None and time.monotonic() - self.shown >= 0.9:
            self.shown = time.monotonic()
            total = {k: sum(t[k] for t in self.ticks.values()) for k in snap}
            self.show.write(progress_line(self.shown - self.started, total))
            self.show.flush()

    def reap_dead(self) -> None:
        """Nothing came for a while: a process that exited twice in a row without a word is
        dead, and nothing of it is left in the queue."""
        for i, p in enumerate(self.procs):
            if i not in self.ended and p.exitcode is not None:
                self.silent[i] = self.silent.get(i, 0) + 1
                if self.silent[i] > 1:
                    self.ended.add(i)
                    failure = _LoadFailed(f"load process {i + 1} failed (exit status {p.exitcode})", 1)
                    self._fail(None if self.stop.is_set() else failure)

    def _fail(self, failure: Optional[_LoadFailed]) -> None:
        """Stop them all; the first failure is the one reported."""
        self.all_stop.set()
        if self.failure is None:
            self.failure = failure


def run_load(url: str, cfg: dict[str, Any], as_json: bool = False, progress: bool = True) -> int:
    try:
        args = json.loads(cfg["payload"])
    except ValueError as exc:
        print(f"juggler load: --payload must be JSON: {exc}", file=sys.stderr)
        return 2
    processes = cfg.get("processes", 1)
    if processes > cfg["connections"]:
        print(f"juggler load: --processes ({processes}) is more than --connections ({cfg['connections']})", file=sys.stderr)
        return 2
    show = sys.stderr if progress and sys.stderr.isatty() else None
    stop = StopSignal().install()  # Ctrl-C ends the run early, with a report
    metrics_url = cfg.get("metrics")
    before: dict[str, float] = {}
    if metrics_url:
        try:
            before = scrape(metrics_url)
        except (OSError, ValueError) as exc:
            print(f"juggler load: cannot read metrics at {metrics_url}: {exc}", file=sys.stderr)
            return 5
    try:
        if processes > 1:
            report = run_processes(url, cfg, args, processes, show, stop.event)
        else:
            run = LoadRun(url, cfg["connections"], cfg["rate"], cfg["duration"], cfg["timeout"], cfg["uri"], args, show, stop.event)
            report = run.run()
    except (HandshakeError, OSError) as exc:
        print(f"juggler load: cannot connect to {url}: {exc}", file=sys.stderr)
        return 5
    except _LoadFailed as exc:
        print(f"juggler load: {exc}", file=sys.stderr)
        return exc.status
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
    if not report["results"]:
        print(f"juggler load: no call got a result ({report['calls']} calls: {report['expired']} expired, "
              f"{report['nacks']} NACKed, {report['closed']} closed)", file=sys.stderr)  # fmt: skip
        return EXIT_NO_RESULT
    return 0
