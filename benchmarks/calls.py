"""Closed-loop CALL throughput, latency and CPU per call, each role in its own process.

Starts its own redis-server on a free port, ``juggler server`` and ``juggler callee --demo``
as separate processes, then, for each connection count (``--connections``, default 1,10,100),
drives calls of ``test.echo`` with a small payload: every connection keeps exactly one CALL
in flight (send the CALL, skip its ACK, wait for its RES, matched by ``for``, send the next).
After a warm-up (``--warmup``) it measures for ``--duration`` seconds and reports:
calls/s (RES received in the window), p50/p99 latency in ms (send to RES), and the CPU ms per
completed call of the server, the callee and redis (utime+stime from /proc/PID/stat, deltas
over the measured window only), the server's thread context switches per completed call (from
/proc/PID/task/*/status: each wake-up of a thread, and each wait for the GIL or a lock, is one;
the load driver keeps its connections open until they are read, since a thread that ends takes
its counts along), the time the server's threads waited on a run queue per call (schedstat),
plus the load driver's own CPU (% of one core), so a driver that is the bottleneck shows.

Where everything ran: over the window each process's threads are sampled every 20 ms (the CPU
each last ran on, stat field 39, credited with its run time since the sample before), and the
row ends with the server's CPU and the seconds each other process (callee, redis, the load
drivers, this script) ran there: ``server@1, on its CPU: callee 0.00/0.85s ...``. The JSON
also has the server's preemptions per call (``server_involuntary_per_call``, involuntary
switches: a thread that lost the CPU while it could run) and every CPU's /proc/stat ticks over
the window (``cpu_ticks``: what else the machine ran). Issue 23 and docs/deployment.rst
(one CPU per server process) tell what they showed.

The load driver is a raw, single-threaded, selector-based websocket client (no juggler
import); ``--load-processes K`` splits the connections over K driver processes and merges
their latencies. A call with no RES within its timeout + 1 s counts as expired and the
connection goes on; NACKs, error results and closed connections are counted and reported.

``--against REV`` also measures a git revision: a temporary ``git worktree add --detach``
(removed at the end) whose server AND callee run with ``PYTHONPATH`` set to it (and redis of
their own), interleaved with the current tree per connection count, alternating which goes
first, and prints the ratio A/B = new/old for each figure, so a change is judged by a ratio
measured in one run.

Usage::

    python benchmarks/calls.py                               # 1,10,100 connections, 5 s each
    python benchmarks/calls.py --duration 3 --connections 1,10
    python benchmarks/calls.py --against main --load-processes 2
    python benchmarks/calls.py --workers 16 --json

The server runs on the CPU named by ``--server-cpu`` (its ``--cpu``; by default the last CPU this
process may use), the same for both trees: with ``--cpu auto`` a side's server took whichever
CPU no other juggler process had claimed, and with another juggler server on the machine (a
test suite, another benchmark) one side ran pinned and the other free, a comparison of
pinning rather than of the trees (issue 23: one such run, the same server code on both sides,
read 0.74 times the calls/s and 0.89 times the server CPU per call at 100 connections). Redis,
the callee and the load drivers are left where the kernel puts them.

Templates (``--server-cmd``, ``--callee-cmd``) take {python} {redis} {port} {max_connections} {cpu};
they run with the tree as working directory and on PYTHONPATH. ``--workers N`` is appended to
the callee command when given (default: the CLI's default).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import selectors
import socket
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402

DEFAULT_SERVER_CMD = ("{python} -m juggler server --redis {redis} --host 127.0.0.1 --port {port} --cpu {cpu} "
                      "--max-connections {max_connections} --log-level warning")  # fmt: skip
DEFAULT_CALLEE_CMD = "{python} -m juggler callee --redis {redis} --demo --log-level warning"
OPTIONAL_FLAGS = ("--max-connections", "--log-level", "--host", "--cpu")
PLACEMENT_SAMPLE = 0.02  # seconds between two samples of where the threads of the stack run


# -- the load driver (one process) --------------------------------------------------------------


class _Conn:
    __slots__ = ("sock", "parser", "pending", "sent_at", "out")

    def __init__(self, sock: socket.socket, parser: c.FrameParser) -> None:
        self.sock = sock
        self.parser = parser
        self.pending: Optional[str] = None
        self.sent_at = 0.0
        self.out = b""


def _connect(port: int, path: str, timeout: float) -> _Conn:
    return _Conn(*c.ws_connect(port, path, timeout))


def driver(n: int, port: int, path: str, uri: str, args_json: str, call_timeout: float, pipe: Any) -> None:
    """Open ``n`` connections, report ready, get (t_start, t0, t1) and drive calls; send back
    the counts and the latencies (ms) of the calls that ended in [t0, t1), and close the
    connections once told to."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    conns: list[_Conn] = []
    try:
        try:
            for _ in range(n):
                conns.append(_connect(port, path, 10.0))
        except (OSError, ConnectionError) as exc:
            pipe.send(("error", f"connect: {exc}"))
            return
        pipe.send(("ready", len(conns)))
        if not pipe.poll(60):
            return
        t_start, t0, t1, drain = pipe.recv()
        timeout_ns = int(call_timeout * 1e9)
        template = ('{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":' + json.dumps(uri)
                    + ',"timeout":' + str(timeout_ns) + ',"args":' + args_json + "}}")  # fmt: skip
        sel = selectors.DefaultSelector()
        stats = {"sent": 0, "results": 0, "error_results": 0, "nacks": 0, "acks": 0, "expired": 0, "closed": 0,
                 "pings": 0, "other": 0, "in_window": 0}  # fmt: skip
        lat: list[float] = []
        perf = time.perf_counter
        mono = time.monotonic
        expire_after = call_timeout + 1.0

        def send_call(cn: _Conn) -> None:
            u = str(uuid.uuid4())
            frame = c.encode_frame(c.OP_TEXT, (template % u).encode())
            cn.pending = u
            cn.sent_at = perf()
            stats["sent"] += 1
            write(cn, frame)

        def write(cn: _Conn, frame: bytes) -> None:
            waiting = bool(cn.out)
            try:
                cn.out = c.send_or_queue(cn.sock, cn.out, frame)
            except OSError:
                return close(cn)
            if cn.out and not waiting:
                sel.modify(cn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, cn)

        def close(cn: _Conn) -> None:
            if cn in live:
                live.discard(cn)
                stats["closed"] += 1
                try:
                    sel.unregister(cn.sock)
                except (KeyError, ValueError):
                    pass
                cn.sock.close()

        live = set(conns)
        for cn in conns:
            sel.register(cn.sock, selectors.EVENT_READ, cn)
        while mono() < t_start:
            time.sleep(max(0.0, min(0.01, t_start - mono())))
        sending = True
        for cn in conns:
            send_call(cn)
        cpu0 = cpu1 = None
        next_check = 0.0
        stop_at = t1 + drain
        while True:
            now = mono()
            if cpu0 is None and now >= t0:
                cpu0 = (resource.getrusage(resource.RUSAGE_SELF), now)
            if sending and now >= t1:
                sending = False
                cpu1 = (resource.getrusage(resource.RUSAGE_SELF), now)
            if not sending and (now >= stop_at or not any(cn.pending for cn in live)):
                break
            if now >= next_check:  # expire calls with no RES
                next_check = now + 0.25
                p = perf()
                for cn in list(live):
                    if cn.pending and p - cn.sent_at > expire_after:
                        stats["expired"] += 1
                        cn.pending = None
                        if sending:
                            send_call(cn)
            for key, mask in sel.select(0.05):
                cn = key.data
                if mask & selectors.EVENT_WRITE and cn.out:
                    try:
                        k = cn.sock.send(cn.out)
                        cn.out = cn.out[k:]
                    except BlockingIOError:
                        pass
                    except OSError:
                        close(cn)
                        continue
                    if not cn.out:
                        sel.modify(cn.sock, selectors.EVENT_READ, cn)
                if not mask & selectors.EVENT_READ:
                    continue
                try:
                    data = cn.sock.recv(262144)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    close(cn)
                    continue
                for opcode, payload in cn.parser.feed(data):
                    if opcode == c.OP_TEXT:
                        msg = json.loads(payload)
                        t = msg["meta"]["type"]
                        if t == 8:
                            stats["acks"] += 1
                            continue
                        if t in (9, 7) and msg["payload"].get("for") == cn.pending:
                            end = perf()
                            when = mono()
                            if t == 9:
                                args = msg["payload"].get("args")
                                if isinstance(args, dict) and "error" in args:
                                    stats["error_results"] += 1
                                else:
                                    stats["results"] += 1
                                if t0 <= when < t1:
                                    stats["in_window"] += 1
                                    lat.append((end - cn.sent_at) * 1000.0)
                            else:
                                stats["nacks"] += 1
                            cn.pending = None
                            if sending:
                                send_call(cn)
                        else:
                            stats["other"] += 1
                    elif opcode == c.OP_PING:
                        stats["pings"] += 1
                        write(cn, c.encode_frame(c.OP_PONG, payload))
                    elif opcode == c.OP_CLOSE:
                        close(cn)
                        break
        stats["unfinished"] = sum(1 for cn in live if cn.pending)
        driver_cpu = None
        if cpu0 is not None and cpu1 is not None and cpu1[1] > cpu0[1]:
            used = (cpu1[0].ru_utime + cpu1[0].ru_stime) - (cpu0[0].ru_utime + cpu0[0].ru_stime)
            driver_cpu = 100.0 * used / (cpu1[1] - cpu0[1])
        pipe.send(("done", stats, lat, driver_cpu))
        # the connections stay open until the parent has read the server's threads: a thread
        # that ends takes its context switches and run time out of /proc/PID/task
        pipe.poll(60)
        for cn in list(live):
            try:
                cn.sock.send(c.close_frame(1000))
            except OSError:
                pass
    finally:
        for cn in conns:
            cn.sock.close()
        pipe.close()


# -- the stack (redis, server, callee) of one tree ------------------------------------------------


class Stack:
    def __init__(self, label: str, tree: str, rev: str, args: argparse.Namespace, logdir: str) -> None:
        self.label, self.tree, self.rev = label, tree, rev
        self.procs: list[c.Proc] = []
        self.notes: list[str] = []
        try:
            self.redis, self.redis_url, self.redis_port = c.start_redis(logdir)
            self.procs.append(self.redis)
            self.port = c.free_port()
            values = {"python": sys.executable, "redis": self.redis_url, "port": self.port, "cpu": args.server_cpu,
                      "max_connections": max(1000, max(args.conn_counts) + 100)}  # fmt: skip
            env = c.tree_env(tree)
            server_argv, dropped = self._cmd(args.server_cmd, DEFAULT_SERVER_CMD, values, "server")
            self.server = c.Proc("server", server_argv, logdir, env=env, cwd=tree)
            self.procs.append(self.server)
            m = self.server.wait_for(r"websocket: wss?://[^/\s]+(/\S*)", 30, port=self.port)
            self.path = m.group(1) if m else "/ws"
            callee_argv, dropped2 = self._cmd(args.callee_cmd, DEFAULT_CALLEE_CMD, values, "callee")
            if args.workers is not None:
                callee_argv += ["--workers", str(args.workers)]
            self.callee = c.Proc("callee", callee_argv, logdir, env=env, cwd=tree)
            self.procs.append(self.callee)
            self.callee.wait_for(r"callee: serving", 30)
            self.notes = dropped + dropped2
            self.server_argv, self.callee_argv = server_argv, callee_argv
        except BaseException:
            self.stop()
            raise

    def _cmd(self, template: Optional[str], default: str, values: dict[str, Any], command: str) -> tuple[list[str], list[str]]:
        if template:
            return c.build_cmd(template, values)
        return c.build_cmd(default, values, c.juggler_flags(sys.executable, self.tree, command), OPTIONAL_FLAGS)

    def cpu(self) -> dict[str, float]:
        return {"server": c.cpu_seconds(self.server.pid), "callee": c.cpu_seconds(self.callee.pid),
                "redis": c.cpu_seconds(self.redis.pid)}  # fmt: skip

    def alive(self) -> bool:
        return all(p.popen.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def measure(stack: Stack, conns: int, args: argparse.Namespace) -> dict[str, Any]:
    k = max(1, min(args.load_processes, conns))
    sizes = [conns // k + (1 if i < conns % k else 0) for i in range(k)]
    ctx = multiprocessing.get_context("fork")
    workers = []
    finished = False
    try:
        for size in sizes:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=driver, args=(size, stack.port, stack.path, args.uri, args.payload, args.call_timeout,
                                                 child), daemon=True)  # fmt: skip
            p.start()
            child.close()
            workers.append((p, parent))
        for p, pipe in workers:
            if not pipe.poll(60):
                raise RuntimeError("a load driver did not open its connections within 60 s")
            msg = pipe.recv()
            if msg[0] != "ready":
                raise RuntimeError(f"load driver: {msg[1]}")
        t_start = time.monotonic() + 0.05
        t0 = t_start + args.warmup
        t1 = t0 + args.duration
        for _, pipe in workers:
            pipe.send((t_start, t0, t1, args.drain))
        time.sleep(max(0.0, t0 - time.monotonic()))
        roles = {"server": stack.server.pid, "callee": stack.callee.pid, "redis": stack.redis.pid,
                 **{f"driver{i}": p.pid for i, (p, _) in enumerate(workers)}, "bench": os.getpid()}  # fmt: skip
        placement = c.Placement(roles)
        inv0, ticks0 = c.involuntary_switches(stack.server.pid), c.cpu_times()
        cpu0, sw0, m0 = stack.cpu(), c.context_switches(stack.server.pid), time.monotonic()
        while time.monotonic() < t1:
            time.sleep(max(0.0, min(PLACEMENT_SAMPLE, t1 - time.monotonic())))
            placement.sample()
        cpu1, sw1, m1 = stack.cpu(), c.context_switches(stack.server.pid), time.monotonic()
        inv1, ticks1 = c.involuntary_switches(stack.server.pid), c.cpu_times()
        placed = placement.finish()
        stats: dict[str, int] = {}
        lat: list[float] = []
        driver_cpu: list[float] = []
        for p, pipe in workers:
            if not pipe.poll(args.drain + args.call_timeout + 30):
                raise RuntimeError("a load driver did not report back in time")
            _, s, lt, dc = pipe.recv()
            for key, v in s.items():
                stats[key] = stats.get(key, 0) + v
            lat += lt
            if dc is not None:
                driver_cpu.append(dc)
        for _, pipe in workers:
            pipe.send("close")
        finished = True
    finally:
        for p, pipe in workers:
            if not finished:
                p.terminate()
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
            pipe.close()
    window = t1 - t0
    done = stats.get("in_window", 0)
    lat.sort()

    def per_call(role: str) -> Optional[float]:
        return 1000.0 * (cpu1[role] - cpu0[role]) / done if done else None

    return {
        "label": stack.label,
        "rev": stack.rev,
        "connections": conns,
        "load_processes": k,
        "window_seconds": round(window, 3),
        "calls_per_second": done / window,
        "p50_ms": c.percentile(lat, 50),
        "p99_ms": c.percentile(lat, 99),
        "max_ms": lat[-1] if lat else None,
        "server_cpu_ms_per_call": per_call("server"),
        "callee_cpu_ms_per_call": per_call("callee"),
        "redis_cpu_ms_per_call": per_call("redis"),
        "server_switches_per_call": (sw1 - sw0) / done if done else None,
        "server_cpu_percent": 100.0 * (cpu1["server"] - cpu0["server"]) / (m1 - m0),
        "callee_cpu_percent": 100.0 * (cpu1["callee"] - cpu0["callee"]) / (m1 - m0),
        "redis_cpu_percent": 100.0 * (cpu1["redis"] - cpu0["redis"]) / (m1 - m0),
        "driver_cpu_percent": driver_cpu,
        "server_wait_ms_per_call": 1000.0 * placed["server"]["wait"] / done if done else None,
        "server_involuntary_per_call": (inv1 - inv0) / done if done else None,
        "placement": placed,
        "cpu_ticks": {cpu: [b - a for a, b in zip(ticks0[cpu], ticks1[cpu])] for cpu in ticks1 if cpu in ticks0},
        "counts": stats,
        "stack_alive": stack.alive(),
    }


FIGURES = [
    ("calls/s", "calls_per_second", ".1f"),
    ("p50 ms", "p50_ms", ".2f"),
    ("p99 ms", "p99_ms", ".2f"),
    ("server ms/call", "server_cpu_ms_per_call", ".3f"),
    ("callee ms/call", "callee_cpu_ms_per_call", ".3f"),
    ("redis ms/call", "redis_cpu_ms_per_call", ".3f"),
    ("srv switch/call", "server_switches_per_call", ".1f"),
    ("srv wait ms/call", "server_wait_ms_per_call", ".3f"),
]


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_header() -> str:
    return (f"{'conns':>5} {'side':<5}" + "".join(f"{name:>17}" for name, _, _ in FIGURES)
            + f"{'driver CPU%':>13}  counts")  # fmt: skip


def format_row(r: dict[str, Any]) -> str:
    s = r["counts"]
    extra = [f"total res {s.get('results', 0)}"]
    for key in ("error_results", "nacks", "expired", "closed", "unfinished"):
        if s.get(key):
            extra.append(f"{key} {s[key]}")
    if not r["stack_alive"]:
        extra.append("A PROCESS OF THE STACK DIED")
    extra.append(format_placement(r["placement"]))
    dc = "+".join(f"{x:.0f}" for x in r["driver_cpu_percent"]) or "-"
    return (f"{r['connections']:>5} {r['label']:<5}" + "".join(f"{_f(r[key], fmt):>17}" for _, key, fmt in FIGURES)
            + f"{dc:>13}  {', '.join(extra)}")  # fmt: skip


def format_placement(placed: dict[str, dict[str, Any]]) -> str:
    """``server@0 | on it: driver0 0.41 redis 0.02 ...``: the server's CPU(s), and the CPU
    seconds each other process ran there over the window."""
    server = placed["server"]["affinity"]
    if len(server) != 1:
        cpus = placed["server"]["cpus"]
        return "server free (" + " ".join(f"cpu{k} {v:.2f}s" for k, v in cpus.items()) + ")"
    cpu = server[0]
    near = " ".join(f"{role} {p['cpus'].get(cpu, 0.0):.2f}/{sum(p['cpus'].values()):.2f}s"
                    for role, p in placed.items() if role != "server")  # fmt: skip
    return f"server@{cpu}, on its CPU: {near}"


def default_server_cpu() -> str:
    """The last CPU this process may use, as ``--cpu`` takes it (``auto`` where affinity is unknown)."""
    try:
        return str(max(os.sched_getaffinity(0)))
    except (AttributeError, OSError, ValueError):
        return "auto"


def _median(rows: list[dict[str, Any]], key: str) -> Optional[float]:
    vals = [r[key] for r in rows if r[key] is not None]
    return statistics.median(vals) if vals else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", default="1,10,100", help="connection counts, comma-separated (default 1,10,100)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per connection count (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of calls before measuring (default 1)")
    ap.add_argument("--drain", type=float, default=2.0, help="seconds to let calls in flight end after a window")
    ap.add_argument("--workers", type=int, help="callee --workers (default: the CLI's default)")
    ap.add_argument("--load-processes", type=int, default=1, help="driver processes to split connections over")
    ap.add_argument("--uri", default="test.echo")
    ap.add_argument("--payload", default='"hello"', help="the CALL's args, as JSON (default \"hello\")")
    ap.add_argument("--call-timeout", type=float, default=5.0, help="the CALL's timeout in seconds (default 5)")
    ap.add_argument("--server-cpu", default=default_server_cpu(),
                    help="the server's --cpu, the same on both sides (default: the last CPU this process may use,"
                         f" {default_server_cpu()}; auto lets other juggler processes' claims decide)")  # fmt: skip
    ap.add_argument("--server-cmd", help="server command template: {python} {redis} {port} {max_connections} {cpu}")
    ap.add_argument("--callee-cmd", help="callee command template: {python} {redis}")
    ap.add_argument("--against", metavar="REV", help="also measure this git revision (B), interleaved with the current tree (A)")
    ap.add_argument("--runs", type=int, default=1, help="measurements per side and connection count (default 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = ap.parse_args()
    try:
        args.conn_counts = [int(x) for x in args.connections.split(",") if x.strip()]
        json.loads(args.payload)
    except ValueError as exc:
        ap.error(str(exc))
    if not args.conn_counts or min(args.conn_counts) < 1 or args.runs < 1 or args.load_processes < 1:
        ap.error("connection counts, --runs and --load-processes must be at least 1")

    c.sigterm_as_interrupt()
    c.raise_nofile()
    stacks: list[Stack] = []
    results: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="juggler-bench-") as logdir:
            with contextlib.ExitStack() as cleanup:
                cleanup.callback(lambda: [s.stop() for s in stacks])
                stacks.append(Stack("A", c.REPO, "current tree " + c.describe_tree(c.REPO), args, logdir))
                if args.against:
                    wt, commit = cleanup.enter_context(c.worktree(args.against))
                    stacks.append(Stack("B", wt, f"{args.against} ({commit})", args, logdir))
                if not args.json:
                    for s in stacks:
                        print(f"{s.label}: {s.rev}  ({s.tree})")
                        print(f"   server: {' '.join(s.server_argv)}")
                        print(f"   callee: {' '.join(s.callee_argv)}")
                        if s.notes:
                            print(f"   (this tree lacks: {', '.join(s.notes)})")
                    print(f"uri {args.uri}, args {args.payload}, one call in flight per connection, warm-up"
                          f" {args.warmup:g} s, {args.duration:g} s measured per count, {args.load_processes} load"
                          f" process(es); CPU ms per completed call\n")  # fmt: skip
                    print(format_header(), flush=True)
                for i, n in enumerate(args.conn_counts):
                    rows = []
                    for run in range(args.runs):
                        order = stacks if (i + run) % 2 == 0 else stacks[::-1]
                        for s in order:
                            r = measure(s, n, args)
                            rows.append(r)
                            results.append(r)
                            if not args.json:
                                print(format_row(r), flush=True)
                    entry: dict[str, Any] = {"connections": n, "median": {}}
                    for s in stacks:
                        entry["median"][s.label] = {key: _median([r for r in rows if r["label"] == s.label], key)
                                                    for _, key, _ in FIGURES}  # fmt: skip
                    if len(stacks) == 2:
                        a, b = entry["median"]["A"], entry["median"]["B"]
                        entry["ratio_A_over_B"] = {key: c.ratio(a[key], b[key]) for _, key, _ in FIGURES}
                        if not args.json:
                            print(f"{n:>5} {'A/B':<5}" + "".join(f"{c.fmt_ratio(entry['ratio_A_over_B'][key]):>17}"
                                                               for _, key, _ in FIGURES))  # fmt: skip
                    summary.append(entry)
    except KeyboardInterrupt:
        c.log("interrupted: everything started was stopped")
        return 130
    if args.json:
        print(json.dumps({"args": {k: v for k, v in vars(args).items()},
                          "stacks": [{"label": s.label, "rev": s.rev, "tree": s.tree, "server": s.server_argv,
                                      "callee": s.callee_argv} for s in stacks],
                          "results": results, "summary": summary}, indent=1))  # fmt: skip
    elif len(stacks) == 2:
        print("\nA/B = new/old: calls/s above 1 is better; latency and CPU per call below 1 are better.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
