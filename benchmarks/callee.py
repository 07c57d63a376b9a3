"""The callee alone: CPU per call of ``juggler callee`` driven straight through redis.

Starts its own redis-server on a free port and ``juggler callee --demo`` (as calls.py does),
but no juggler server: a load driver plays the servers. For each count (``--connections``,
default 1,10,100) it keeps that many calls of ``test.echo`` in flight, each from a connection
of its own with its own results list, exactly as a server stores them (the store script on
``juggler:calls:{URI}`` with its timeout key; BRPOP on ``juggler:results:{CONNUUID}``, then the
result's timeout key consumed). After a warm-up (``--warmup``) it measures for ``--duration``
seconds and reports calls/s, p50/p99 latency in ms (store to result), and the CPU ms per call
of the callee and of redis (utime+stime from /proc/PID/stat over the window), and the callee's
thread context switches per call. ``--think MS`` paces each connection (a pause between a
result and its next call): 100 connections at ``--think 15`` arrive at a few thousand calls/s,
mostly one at a time, as behind a juggler server at 100 websockets. Without the server's CPU and its variance in the way, a
change of the callee shows here first; calls.py judges the whole.

The driver is one process, single-threaded, over raw sockets with hiredis (no juggler import:
the same code whichever tree's callee it drives). ``--against REV`` also measures a git
revision's callee (a temporary worktree, its own redis), interleaved, alternating which goes
first, and prints the ratio A/B = new/old of each figure.

Usage::

    python benchmarks/callee.py                          # 1,10,100 calls in flight, 5 s each
    python benchmarks/callee.py --connections 100 --runs 3 --against main
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import json
import os
import selectors
import socket
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any, Optional

import hiredis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402

DEFAULT_CALLEE_CMD = "{python} -m juggler callee --redis {redis} --demo --log-level warning"

# The store and consume scripts of the redis layout (juggler/layout.py), as a server runs them.
STORE_SCRIPT = """
local before = redis.call('PTTL', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[1])
local n = redis.call('LPUSH', KEYS[2], ARGV[2])
local cap = tonumber(ARGV[3])
if cap > 0 and n > cap then
  redis.call('LTRIM', KEYS[2], 1, -1)
  redis.call('DEL', KEYS[1])
  return redis.error_reply('list capacity exceeded')
end
local ms = tonumber(ARGV[1])
if before == -2 or (before >= 0 and before < ms) then
  redis.call('PEXPIRE', KEYS[2], ms)
end
return n
"""
CONSUME_SCRIPT = """
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
return ttl
"""
STORE_SHA = hashlib.sha1(STORE_SCRIPT.encode()).hexdigest()
CONSUME_SHA = hashlib.sha1(CONSUME_SCRIPT.encode()).hexdigest()


class _Conn:
    """One emulated websocket connection of a server: one call in flight."""

    __slots__ = ("sock", "reader", "conn_uuid", "results_key", "pending", "sent_at", "replies")

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.reader = hiredis.Reader()
        self.conn_uuid = str(uuid.uuid4())
        self.results_key = f"juggler:results:{{{self.conn_uuid}}}"
        self.pending = ""
        self.sent_at = 0.0
        self.replies = 0  # replies due before the BRPOP's


def drive(port: int, n: int, uri: str, args_json: str, call_timeout: float, think: float, t0: float, t1: float,
          end: float) -> tuple[dict[str, int], list[float]]:  # fmt: skip
    """Keep ``n`` calls in flight until ``end``, each connection waiting ``think`` seconds
    between a result and its next call; counts and the latencies (ms) of the calls that ended
    in [t0, t1)."""
    conns = [_Conn(port) for _ in range(n)]
    sel = selectors.DefaultSelector()
    stats = {"sent": 0, "results": 0, "expired": 0, "errors": 0, "in_window": 0}
    lat: list[float] = []
    ttl_ms = int(call_timeout * 1000)
    calls_key = f"juggler:calls:{{{uri}}}"
    perf = time.perf_counter
    mono = time.monotonic
    wait = str(int(call_timeout) + 1)

    def send(cn: _Conn, consume: Optional[str]) -> None:
        msg = str(uuid.uuid4())
        payload = '{"conn_uuid":"%s","msg_uuid":"%s","uri":%s,"args":%s}' % (cn.conn_uuid, msg, json.dumps(uri), args_json)
        cmds = []
        if consume:
            cmds.append(("EVALSHA", CONSUME_SHA, "1", f"juggler:results:timeout:{{{cn.conn_uuid}}}:{consume}"))
        cmds.append(("EVALSHA", STORE_SHA, "2", f"juggler:calls:timeout:{{{uri}}}:{msg}", calls_key, str(ttl_ms),
                      payload, "0"))  # fmt: skip
        cmds.append(("BRPOP", cn.results_key, wait))
        cn.replies = len(cmds) - 1
        cn.pending = msg
        cn.sent_at = perf()
        stats["sent"] += 1
        cn.sock.sendall(b"".join(hiredis.pack_command(cmd) for cmd in cmds))  # (small: the buffer takes it)

    later: list[tuple[float, int, _Conn, Optional[str]]] = []  # (when, tie-break, conn, to consume)
    for cn in conns:
        sel.register(cn.sock, selectors.EVENT_READ, cn)
        send(cn, None)
    while mono() < end:
        now = mono()
        while later and later[0][0] <= now:
            _, _, cn, done = heapq.heappop(later)
            send(cn, done)
        timeout = min(0.5, max(0.0, later[0][0] - now)) if later else 0.5
        for key, _ in sel.select(timeout):
            cn = key.data
            cn.reader.feed(cn.sock.recv(65536))
            while True:
                reply = cn.reader.gets()
                if reply is False:
                    break
                if isinstance(reply, hiredis.ReplyError):
                    stats["errors"] += 1
                if cn.replies:
                    cn.replies -= 1
                    continue
                done = None
                if reply is None:
                    stats["expired"] += 1
                elif isinstance(reply, list):
                    got = json.loads(reply[1])
                    if got.get("msg_uuid") == cn.pending:
                        stats["results"] += 1
                        now = mono()
                        if t0 <= now < t1:
                            stats["in_window"] += 1
                            lat.append((perf() - cn.sent_at) * 1000.0)
                        done = cn.pending
                if think > 0:
                    heapq.heappush(later, (mono() + think, id(cn), cn, done))
                elif mono() < end:
                    send(cn, done)
    for cn in conns:
        cn.sock.close()
    return stats, lat


class Stack:
    def __init__(self, label: str, tree: str, rev: str, args: argparse.Namespace, logdir: str) -> None:
        self.label, self.tree, self.rev = label, tree, rev
        self.procs: list[c.Proc] = []
        try:
            self.redis, self.redis_url, self.redis_port = c.start_redis(logdir)
            self.procs.append(self.redis)
            argv, _ = c.build_cmd(args.callee_cmd or DEFAULT_CALLEE_CMD, {"python": sys.executable, "redis": self.redis_url})
            if args.workers is not None:
                argv += ["--workers", str(args.workers)]
            self.callee = c.Proc("callee", argv, logdir, env=c.tree_env(tree), cwd=tree)
            self.procs.append(self.callee)
            self.callee.wait_for(r"callee: serving", 30)
            self.callee_argv = argv
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=10) as s:
                s.sendall(hiredis.pack_command(("SCRIPT", "LOAD", STORE_SCRIPT))
                          + hiredis.pack_command(("SCRIPT", "LOAD", CONSUME_SCRIPT)))  # fmt: skip
                reader, got = hiredis.Reader(), []
                while len(got) < 2:
                    reader.feed(s.recv(4096))
                    while (r := reader.gets()) is not False:
                        got.append(r)
        except BaseException:
            self.stop()
            raise

    def cpu(self) -> dict[str, float]:
        return {"callee": c.cpu_seconds(self.callee.pid), "redis": c.cpu_seconds(self.redis.pid),
                "switches": float(c.context_switches(self.callee.pid))}  # fmt: skip

    def alive(self) -> bool:
        return all(p.popen.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def measure(stack: Stack, conns: int, args: argparse.Namespace) -> dict[str, Any]:
    import threading

    t_start = time.monotonic() + 0.05
    t0, t1 = t_start + args.warmup, t_start + args.warmup + args.duration
    out: dict[str, Any] = {}
    driver = threading.Thread(target=lambda: out.update(r=drive(stack.redis_port, conns, args.uri, args.payload,
                                                                  args.call_timeout, args.think / 1000.0, t0, t1,
                                                                  t1 + 0.2)))  # fmt: skip
    driver.start()
    time.sleep(max(0.0, t0 - time.monotonic()))
    cpu0, m0 = stack.cpu(), time.monotonic()
    time.sleep(max(0.0, t1 - time.monotonic()))
    cpu1, m1 = stack.cpu(), time.monotonic()
    driver.join()
    stats, lat = out["r"]
    done = stats["in_window"]
    lat.sort()

    def per_call(role: str, scale: float = 1000.0) -> Optional[float]:
        return scale * (cpu1[role] - cpu0[role]) / done if done else None

    return {
        "label": stack.label, "rev": stack.rev, "connections": conns,
        "calls_per_second": done / (t1 - t0),
        "p50_ms": c.percentile(lat, 50), "p99_ms": c.percentile(lat, 99),
        "callee_cpu_ms_per_call": per_call("callee"), "redis_cpu_ms_per_call": per_call("redis"),
        "callee_switches_per_call": per_call("switches", 1.0),
        "callee_cpu_percent": 100.0 * (cpu1["callee"] - cpu0["callee"]) / (m1 - m0),
        "counts": stats, "stack_alive": stack.alive(),
    }  # fmt: skip


FIGURES = [
    ("calls/s", "calls_per_second", ".1f"),
    ("p50 ms", "p50_ms", ".2f"),
    ("p99 ms", "p99_ms", ".2f"),
    ("callee ms/call", "callee_cpu_ms_per_call", ".4f"),
    ("redis ms/call", "redis_cpu_ms_per_call", ".4f"),
    ("switch/call", "callee_switches_per_call", ".2f"),
    ("callee CPU%", "callee_cpu_percent", ".0f"),
]


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_row(r: dict[str, Any]) -> str:
    s = r["counts"]
    extra = [f"{k} {s[k]}" for k in ("expired", "errors") if s.get(k)]
    if not r["stack_alive"]:
        extra.append("A PROCESS OF THE STACK DIED")
    return (f"{r['connections']:>5} {r['label']:<5}" + "".join(f"{_f(r[key], fmt):>15}" for _, key, fmt in FIGURES)
            + "  " + ", ".join(extra))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", default="1,10,100", help="calls in flight, comma-separated (default 1,10,100)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per count (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of calls before measuring (default 1)")
    ap.add_argument("--workers", type=int, help="callee --workers (default: the CLI's default)")
    ap.add_argument("--uri", default="test.echo")
    ap.add_argument("--payload", default='"hello"', help="the call's args, as JSON (default \"hello\")")
    ap.add_argument("--call-timeout", type=float, default=5.0, help="the call's timeout in seconds (default 5)")
    ap.add_argument("--think", type=float, default=0.0, help="ms each connection waits between a result and its next "
                    "call (default 0); e.g. 15 with 100 connections paces calls as a juggler server does")
    ap.add_argument("--callee-cmd", help="callee command template: {python} {redis}")
    ap.add_argument("--against", metavar="REV", help="also measure this git revision (B), interleaved with the current tree (A)")
    ap.add_argument("--runs", type=int, default=1, help="measurements per side and count (default 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = ap.parse_args()
    try:
        counts = [int(x) for x in args.connections.split(",") if x.strip()]
        json.loads(args.payload)
    except ValueError as exc:
        ap.error(str(exc))
    if not counts or min(counts) < 1 or args.runs < 1:
        ap.error("counts and --runs must be at least 1")
    c.sigterm_as_interrupt()
    c.raise_nofile()
    stacks: list[Stack] = []
    results: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="juggler-bench-") as logdir, contextlib.ExitStack() as cleanup:
            cleanup.callback(lambda: [s.stop() for s in stacks])
            stacks.append(Stack("A", c.REPO, "current tree " + c.describe_tree(c.REPO), args, logdir))
            if args.against:
                wt, commit = cleanup.enter_context(c.worktree(args.against))
                stacks.append(Stack("B", wt, f"{args.against} ({commit})", args, logdir))
            if not args.json:
                for s in stacks:
                    print(f"{s.label}: {s.rev}  ({s.tree})\n   callee: {' '.join(s.callee_argv)}")
                print(f"uri {args.uri}, args {args.payload}, calls in flight from as many emulated server connections,"
                      f" think {args.think:g} ms, warm-up {args.warmup:g} s, {args.duration:g} s measured per count; CPU ms per call\n")  # fmt: skip
                print(f"{'calls':>5} {'side':<5}" + "".join(f"{name:>15}" for name, _, _ in FIGURES), flush=True)
            for i, n in enumerate(counts):
                rows = []
                for run in range(args.runs):
                    for s in stacks if (i + run) % 2 == 0 else stacks[::-1]:
                        r = measure(s, n, args)
                        rows.append(r)
                        results.append(r)
                        if not args.json:
                            print(format_row(r), flush=True)
                entry: dict[str, Any] = {"connections": n, "median": {}}
                for s in stacks:
                    mine = [r for r in rows if r["label"] == s.label]
                    entry["median"][s.label] = {key: statistics.median([r[key] for r in mine if r[key] is not None] or [0])
                                                for _, key, _ in FIGURES}  # fmt: skip
                if len(stacks) == 2:
                    a, b = entry["median"]["A"], entry["median"]["B"]
                    entry["ratio_A_over_B"] = {key: c.ratio(a[key], b[key]) for _, key, _ in FIGURES}
                    if not args.json:
                        print(f"{n:>5} {'A/B':<5}" + "".join(f"{c.fmt_ratio(entry['ratio_A_over_B'][key]):>15}"
                                                           for _, key, _ in FIGURES))  # fmt: skip
                summary.append(entry)
    except KeyboardInterrupt:
        c.log("interrupted: everything started was stopped")
        return 130
    if args.json:
        print(json.dumps({"args": vars(args), "results": results, "summary": summary}, indent=1))
    elif len(stacks) == 2:
        print("\nA/B = new/old: calls/s above 1 is better; latency and CPU per call below 1 are better.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
