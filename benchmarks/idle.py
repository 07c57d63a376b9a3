"""What idle websocket connections cost a ``juggler server`` process.

Starts its own redis-server on a free port and a ``juggler server`` subprocess, records the
server's baseline (threads, RSS, open fds, idle CPU, redis clients), then opens N juggler.0
websockets to it from this one process (non-blocking sockets and ``selectors``: no thread per
connection; a raw HTTP upgrade offering ``juggler.0``, each 101 verified), with a bounded
number of handshakes in flight. It holds them open for a while, answering the server's pings
with pongs, and reports the server's threads, RSS (and its growth per connection), open fds,
idle CPU (% of one core) and redis clients while they are held; then it closes them all
(close handshake) and reports how long each figure took to return to its baseline, if it did
within ``--settle`` seconds.

Every wait is bounded: a handshake that gets no 101 within ``--handshake-timeout`` counts as
failed (with its reason: an HTTP status such as ``HTTP 503``, a socket error, or a timeout),
the whole open phase ends after ``--open-timeout``, and opening stops early when the server
has ``--thread-cap`` threads (default three quarters of what the machine allows, so a server
that spends threads per connection cannot exhaust the machine's pids; 10,000 connections at
two threads each fit under a ``pid_max`` of 32768); connections never started are reported
as such, and the open phase then ends as soon as the handshakes in flight do.

``--against REV`` also measures a git revision (a temporary ``git worktree add --detach``,
removed at the end): A is the current tree, B is REV; each runs its own ``python -m juggler``
with ``PYTHONPATH`` set to its tree, interleaved A, B, A, B (``--runs`` pairs), each run with a
fresh redis and server. It prints every run, the medians and the ratio A/B (new/old).

Usage::

    python benchmarks/idle.py                       # 10000 connections, 10 s hold
    python benchmarks/idle.py -n 2000 --hold 5
    python benchmarks/idle.py -n 1000 --against main --runs 2
    python benchmarks/idle.py -n 500 --json
    python benchmarks/idle.py --server-cmd '{python} -m juggler server --redis {redis} --port {port}'

``--server-cmd`` placeholders: {python} {redis} {port} {max_connections}; it runs with the
tree as working directory and on PYTHONPATH. Flags the default command uses that a tree's
``juggler server --help`` does not list (--max-connections, --log-level, --host) are dropped,
with a note.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402

DEFAULT_SERVER_CMD = ("{python} -m juggler server --redis {redis} --host 127.0.0.1 --port {port} "
                      "--max-connections {max_connections} --log-level warning")  # fmt: skip
OPTIONAL_SERVER_FLAGS = ("--max-connections", "--log-level", "--host")

CONNECTING, HANDSHAKE, OPEN, CLOSING = range(4)


class WS:
    __slots__ = ("sock", "state", "out", "head", "accept", "started", "parser")

    def __init__(self, sock: socket.socket, req: bytes, accept: str, started: float) -> None:
        self.sock = sock
        self.state = CONNECTING
        self.out = req
        self.head = bytearray()
        self.accept = accept
        self.started = started
        self.parser: Optional[c.FrameParser] = None


class Sample:
    """The server's figures at one moment."""

    def __init__(self, pid: int, redis_port: int) -> None:
        st = c.proc_status(pid)
        self.threads = st.get("threads")
        self.rss = st.get("rss")
        self.fds = c.fd_count(pid)
        self.redis_clients = c.redis_clients(redis_port)

    def as_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "rss_bytes": self.rss, "fds": self.fds, "redis_clients": self.redis_clients}


def cpu_percent(pid: int, seconds: float, pump: Any = None) -> float:
    """CPU of ``pid`` over ``seconds``, in % of one core; ``pump(deadline)`` keeps sockets
    served meanwhile (else we sleep)."""
    t0, c0 = time.monotonic(), c.cpu_seconds(pid)
    end = t0 + seconds
    if pump is not None:
        pump(end)
    else:
        time.sleep(seconds)
    return 100.0 * (c.cpu_seconds(pid) - c0) / (time.monotonic() - t0)


class Holder:
    """The benchmark's side of the connections: opens, holds and closes them in one selector."""

    def __init__(self, port: int, path: str, args: argparse.Namespace, server_pid: int) -> None:
        self.addr = ("127.0.0.1", port)
        self.port = port
        self.path = path
        self.args = args
        self.server_pid = server_pid
        self.sel = selectors.DefaultSelector()
        self.open: set[WS] = set()
        self.inflight: dict[WS, None] = {}  # insertion order = start order (one timeout for all)
        self.failures: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()  # open connections the server closed or lost
        self.pings = 0
        self.pong_failures = 0
        self.unexpected_messages = 0
        self.stopped_reason = ""

    # -- socket events --

    def _fail(self, ws: WS, reason: str) -> None:
        self.inflight.pop(ws, None)
        self.failures[reason] += 1
        self._drop(ws)

    def _drop(self, ws: WS) -> None:
        try:
            self.sel.unregister(ws.sock)
        except (KeyError, ValueError):
            pass
        ws.sock.close()

    def _start(self) -> None:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            self.failures[f"socket(): {c.errname(exc)}"] += 1
            return
        sock.setblocking(False)
        req, accept = c.handshake_request("127.0.0.1", self.port, self.path)
        ws = WS(sock, req, accept, time.monotonic())
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            self.failures[f"connect: {errno.errorcode.get(err, err)}"] += 1
            sock.close()
            return
        self.inflight[ws] = None
        self.sel.register(sock, selectors.EVENT_WRITE, ws)

    def _writable(self, ws: WS) -> None:
        if ws.state == CONNECTING:
            err = ws.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                return self._fail(ws, f"connect: {errno.errorcode.get(err, err)}")
            ws.state = HANDSHAKE
        try:
            n = ws.sock.send(ws.out)
        except BlockingIOError:
            return
        except OSError as exc:
            return self._fail(ws, f"send request: {c.errname(exc)}")
        ws.out = ws.out[n:]
        if not ws.out:
            self.sel.modify(ws.sock, selectors.EVENT_READ, ws)

    def _readable(self, ws: WS) -> None:
        try:
            data = ws.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if ws.state == HANDSHAKE:
                return self._fail(ws, f"recv: {c.errname(exc)}")
            self.dropped[f"recv: {c.errname(exc)}"] += 1
            self.open.discard(ws)
            return self._drop(ws)
        if ws.state == HANDSHAKE:
            if not data:
                return self._fail(ws, "closed before the 101")
            ws.head += data
            end = ws.head.find(b"\r\n\r\n")
            if end < 0:
                if len(ws.head) > 16384:
                    return self._fail(ws, "response head too large")
                return
            problem = c.check_handshake_response(bytes(ws.head[:end]), ws.accept)
            if problem:
                return self._fail(ws, problem)
            rest = bytes(ws.head[end + 4 :])
            ws.head = bytearray()
            ws.state = OPEN
            ws.parser = c.FrameParser()
            del self.inflight[ws]
            self.open.add(ws)
            data = rest
            if not data:
                return
        if not data:  # EOF on an open or closing connection
            if ws.state == OPEN:
                self.dropped["EOF without a close frame"] += 1
            self.open.discard(ws)
            return self._drop(ws)
        assert ws.parser is not None
        for opcode, payload in ws.parser.feed(data):
            if opcode == c.OP_PING:
                self.pings += 1
                try:
                    ws.sock.send(c.encode_frame(c.OP_PONG, payload))
                except OSError:
                    self.pong_failures += 1
            elif opcode == c.OP_CLOSE:
                if ws.state == OPEN:
                    self.dropped[f"closed by the server: {c.close_code(payload)}"] += 1
                    try:
                        ws.sock.send(c.close_frame(c.close_code(payload) if len(payload) >= 2 else 1000))
                    except OSError:
                        pass
                self.open.discard(ws)
                return self._drop(ws)
            elif opcode in (c.OP_TEXT, c.OP_BINARY):
                self.unexpected_messages += 1

    def pump(self, until: float) -> None:
        """Serve socket events until ``until`` (monotonic)."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            for key, mask in self.sel.select(min(left, 0.2)):
                ws = key.data
                if mask & selectors.EVENT_WRITE:
                    self._writable(ws)
                elif mask & selectors.EVENT_READ:
                    self._readable(ws)

    # -- phases --

    def open_all(self, n: int) -> tuple[float, int]:
        """Open ``n`` connections; (seconds taken, connections never started)."""
        a = self.args
        started = 0
        t0 = time.monotonic()
        deadline = t0 + a.open_timeout
        next_check = 0.0
        capped = False
        while (started < n and not capped) or self.inflight:  # capped: end once those in flight end
            now = time.monotonic()
            if now > deadline:
                self.stopped_reason = f"open phase ended after --open-timeout {a.open_timeout:g} s"
                break
            if now >= next_check:
                next_check = now + 0.25
                while self.inflight:  # oldest first: they share one timeout
                    ws = next(iter(self.inflight))
                    if now - ws.started < a.handshake_timeout:
                        break
                    self._fail(ws, "timeout connecting" if ws.state == CONNECTING else "timeout waiting for the 101")
                if not capped and started < n:
                    try:
                        threads = c.proc_status(self.server_pid).get("threads", 0)
                    except OSError:
                        self.stopped_reason = "the server process is gone"
                        break
                    if threads >= a.thread_cap:
                        capped = True
                        self.stopped_reason = (f"stopped opening: the server has {threads} threads "
                                               f"(--thread-cap {a.thread_cap})")  # fmt: skip
            while not capped and started < n and len(self.inflight) < a.concurrency:
                self._start()
                started += 1
            for key, mask in self.sel.select(0.05):
                ws = key.data
                if mask & selectors.EVENT_WRITE:
                    self._writable(ws)
                elif mask & selectors.EVENT_READ:
                    self._readable(ws)
        for ws in list(self.inflight):
            self._fail(ws, "still in handshake when the open phase ended")
        return time.monotonic() - t0, n - started

    def close_all(self, wait: float) -> tuple[int, int]:
        """Send a close frame on every open connection, wait up to ``wait`` s for the server's
        close frames, then close every socket: (closes sent, close replies seen)."""
        sent = 0
        closing = list(self.open)
        for ws in closing:
            ws.state = CLOSING
            try:
                ws.sock.send(c.close_frame(1000))
                sent += 1
            except OSError:
                pass
        self.open.clear()
        replies = 0
        end = time.monotonic() + wait
        pending = {ws.sock.fileno(): ws for ws in closing if ws.sock.fileno() >= 0}
        while pending and time.monotonic() < end:
            for key, mask in self.sel.select(min(0.2, max(0.0, end - time.monotonic()))):
                ws = key.data
                if ws.state != CLOSING:
                    continue
                try:
                    data = ws.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                got_close = not data or any(op == c.OP_CLOSE for op, _ in ws.parser.feed(data))
                if got_close:
                    replies += bool(data)
                    pending.pop(ws.sock.fileno(), None)
                    self._drop(ws)
        for ws in pending.values():
            self._drop(ws)
        self.sel.close()
        return sent, replies


def run_once(label: str, tree: str, rev: str, args: argparse.Namespace, logdir: str) -> dict[str, Any]:
    n = args.n
    procs: list[c.Proc] = []
    holder: Optional[Holder] = None
    try:
        redis, redis_url, redis_port = c.start_redis(logdir, maxclients=max(10000, 3 * n + 1000))
        procs.append(redis)
        port = c.free_port()
        values = {"python": sys.executable, "redis": redis_url, "port": port, "max_connections": n + 100}
        if args.server_cmd:
            argv, dropped_flags = c.build_cmd(args.server_cmd, values)
        else:
            argv, dropped_flags = c.build_cmd(DEFAULT_SERVER_CMD, values, c.juggler_flags(sys.executable, tree, "server"),
                                        OPTIONAL_SERVER_FLAGS)  # fmt: skip
        server = c.Proc("server", argv, logdir, env=c.tree_env(tree), cwd=tree)
        procs.append(server)
        m = server.wait_for(r"websocket: wss?://[^/\s]+(/\S*)", 30, port=port)
        path = m.group(1) if m else "/ws"
        pid = server.pid
        nofile = c.nofile_limit(pid)
        time.sleep(args.settle_start)
        base = Sample(pid, redis_port)
        base_cpu = cpu_percent(pid, args.baseline)
        c.log(f"[{label}] server pid {pid} ready on port {port}; opening {n} connections")

        holder = Holder(port, path, args, pid)
        cpu0 = c.cpu_split(pid)
        open_seconds, never_started = holder.open_all(n)
        open_user, open_sys = (b - a for a, b in zip(cpu0, c.cpu_split(pid)))
        open_cpu = open_user + open_sys
        failures = dict(holder.failures)
        opened = len(holder.open) + sum(holder.dropped.values())
        dropped_while_opening = dict(holder.dropped)
        c.log(f"[{label}] {len(holder.open)} open, {sum(failures.values())} failed, {never_started} not started"
              f" in {open_seconds:.1f} s; holding {args.hold:g} s")  # fmt: skip
        held_cpu = cpu_percent(pid, args.hold, holder.pump)
        held = Sample(pid, redis_port)
        still_open = len(holder.open)
        dropped = dict(holder.dropped)
        pings, pong_failures, unexpected = holder.pings, holder.pong_failures, holder.unexpected_messages
        stopped_reason = holder.stopped_reason

        close_start = time.monotonic()
        cpu0 = c.cpu_split(pid)
        closes_sent, close_replies = holder.close_all(args.close_wait)
        holder = None
        # Back to baseline? threads, fds and redis clients: at or under it; RSS: within
        # max(1 MiB, 10 % of its growth) of it (freed memory is not always given back).
        rss_slack = max(1 << 20, 0.1 * max(0, (held.rss or 0) - (base.rss or 0)))
        returned: dict[str, Optional[float]] = {"threads": None, "rss": None, "fds": None, "redis_clients": None}
        settle_end = time.monotonic() + args.settle
        while True:
            after = Sample(pid, redis_port)
            t = round(time.monotonic() - close_start, 2)
            checks = {
                "threads": after.threads is not None and base.threads is not None and after.threads <= base.threads,
                "rss": after.rss is not None and base.rss is not None and after.rss <= base.rss + rss_slack,
                "fds": after.fds <= base.fds,
                "redis_clients": after.redis_clients is not None and base.redis_clients is not None
                and after.redis_clients <= base.redis_clients,
            }
            for k, ok in checks.items():
                if ok and returned[k] is None:
                    returned[k] = t
            if all(v is not None for v in returned.values()) or time.monotonic() > settle_end:
                break
            time.sleep(0.1)
        close_user, close_sys = (b - a for a, b in zip(cpu0, c.cpu_split(pid)))  # (to the return to
        close_cpu = close_user + close_sys  # baseline, or the settle's end)
        after_cpu = cpu_percent(pid, args.after_cpu)
        server_alive = server.popen.poll() is None
    finally:
        if holder is not None:
            for ws in list(holder.open) + list(holder.inflight):
                holder._drop(ws)
            holder.sel.close()
        for p in reversed(procs):
            p.stop()

    growth = (held.rss - base.rss) if held.rss is not None and base.rss is not None else None
    return {
        "label": label,
        "tree": tree,
        "rev": rev,
        "server_cmd": argv,
        "dropped_flags": dropped_flags,
        "server_nofile_limit": nofile,
        "connections": n,
        "concurrency": args.concurrency,
        "opened": opened,
        "failed": sum(failures.values()),
        "failures": failures,
        "never_started": never_started,
        "stopped_reason": stopped_reason,
        "open_seconds": round(open_seconds, 3),
        "open_cpu_seconds": round(open_cpu, 3),
        "close_cpu_seconds": round(close_cpu, 3),
        "open_sys_seconds": round(open_sys, 3),  # (of open_cpu_seconds: in the kernel)
        "close_sys_seconds": round(close_sys, 3),
        "dropped_while_opening": dropped_while_opening,
        "hold_seconds": args.hold,
        "held_open": still_open,
        "dropped": dropped,
        "pings_answered": pings - pong_failures,
        "unexpected_messages": unexpected,
        "baseline": {**base.as_dict(), "cpu_percent": round(base_cpu, 2)},
        "held": {**held.as_dict(), "cpu_percent": round(held_cpu, 2)},
        "after": {**after.as_dict(), "cpu_percent": round(after_cpu, 2)},
        "rss_growth_per_conn_bytes": round(growth / still_open) if growth is not None and still_open else None,
        "returned_to_baseline_after_s": returned,
        "settle_seconds": args.settle,
        "closes_sent": closes_sent,
        "close_replies": close_replies,
        "server_alive_after": server_alive,
    }


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_run(r: dict[str, Any]) -> str:
    b, h, a, ret = r["baseline"], r["held"], r["after"], r["returned_to_baseline_after_s"]
    fails = ", ".join(f"{k} x{v}" for k, v in sorted(r["failures"].items(), key=lambda kv: -kv[1])) or "none"
    drops = ", ".join(f"{k} x{v}" for k, v in r["dropped"].items()) or "none"
    rate = r["opened"] / r["open_seconds"] if r["open_seconds"] else 0
    lines = [
        f"== {r['label']}: {r['rev']}  ({r['tree']})",
        f"server:   {' '.join(r['server_cmd'])}",
    ]
    if r["dropped_flags"]:
        lines.append(f"          (this tree's server lacks: {', '.join(r['dropped_flags'])})")
    lines += [
        f"          its RLIMIT_NOFILE soft limit: {r['server_nofile_limit']}",
        f"open:     {r['opened']} of {r['connections']} opened in {r['open_seconds']:.2f} s ({rate:.0f}/s,"
        f" {r['concurrency']} handshakes in flight); failed {r['failed']}: {fails}",
        f"          server CPU {r['open_cpu_seconds']:.2f} s opening ({_per_ms(r['open_cpu_seconds'], r['opened'])}"
        f" ms per connection), {r['close_cpu_seconds']:.2f} s closing ({_per_ms(r['close_cpu_seconds'], r['closes_sent'])}"
        " ms per connection, to the return to baseline)",
        f"          of which in the kernel: {_share(r.get('open_sys_seconds'), r['open_cpu_seconds'])} opening,"
        f" {_share(r.get('close_sys_seconds'), r['close_cpu_seconds'])} closing",
    ]
    if r["never_started"]:
        lines.append(f"          {r['never_started']} never started: {r['stopped_reason']}")
    lines += [
        f"hold:     {r['held_open']} still open after {r['hold_seconds']:g} s; dropped by the server: {drops};"
        f" pings answered {r['pings_answered']}",
        f"close:    {r['closes_sent']} close frames sent, {r['close_replies']} close replies",
        f"{'':22}{'baseline':>10}{'held':>12}{'after close':>13}  back to baseline",
    ]

    def row(name: str, key: str, conv: Any, fmt: str, ret_key: Optional[str]) -> None:
        vals = [conv(x[key]) if x[key] is not None else None for x in (b, h, a)]
        back = ""
        if ret_key:
            back = f"after {ret[ret_key]:.1f} s" if ret[ret_key] is not None else f"not within {r['settle_seconds']:g} s"
        lines.append(f"{name:<22}{_num(vals[0], fmt):>10}{_num(vals[1], fmt):>12}{_num(vals[2], fmt):>13}  {back}")

    row("threads", "threads", int, "d", "threads")
    row("RSS MiB", "rss_bytes", c.mib, ".1f", "rss")
    row("open fds", "fds", int, "d", "fds")
    row("redis clients", "redis_clients", int, "d", "redis_clients")
    row("CPU % of one core", "cpu_percent", float, ".1f", None)
    per = r["rss_growth_per_conn_bytes"]
    lines.append(f"RSS growth per held connection: {_num(per / 1024 if per is not None else None, '.1f')} KiB;"
                 f" threads per held connection: {_per(h['threads'], b['threads'], r['held_open'])};"
                 f" fds per held connection: {_per(h['fds'], b['fds'], r['held_open'])}")  # fmt: skip
    if not r["server_alive_after"]:
        lines.append("the server process had exited by the end of the run")
    return "\n".join(lines)


def _per_ms(seconds: float, n: int) -> str:
    return f"{1000 * seconds / n:.3f}" if n else "-"


def _per(held: Optional[int], base: Optional[int], n: int) -> str:
    if held is None or base is None or not n:
        return "-"
    return f"{(held - base) / n:.2f}"


def _share(part: Optional[float], whole: float) -> str:
    return "-" if part is None or not whole else f"{100 * part / whole:.0f}%"


SUMMARY = [
    ("opened", lambda r: r["opened"]),
    ("failed", lambda r: r["failed"]),
    ("open seconds", lambda r: r["open_seconds"]),
    ("open CPU ms/conn", lambda r: 1000 * r["open_cpu_seconds"] / r["opened"] if r["opened"] else None),
    ("close CPU ms/conn", lambda r: 1000 * r["close_cpu_seconds"] / r["closes_sent"] if r["closes_sent"] else None),
    ("open kernel ms/conn", lambda r: 1000 * r["open_sys_seconds"] / r["opened"] if r["opened"] and "open_sys_seconds" in r else None),
    ("close kernel ms/conn", lambda r: 1000 * r["close_sys_seconds"] / r["closes_sent"]
     if r["closes_sent"] and "close_sys_seconds" in r else None),
    ("back to baseline s", lambda r: _back(r["returned_to_baseline_after_s"])),
    ("held open", lambda r: r["held_open"]),
    ("threads held", lambda r: r["held"]["threads"]),
    ("RSS MiB held", lambda r: c.mib(r["held"]["rss_bytes"]) if r["held"]["rss_bytes"] else None),
    ("RSS KiB/conn", lambda r: r["rss_growth_per_conn_bytes"] / 1024 if r["rss_growth_per_conn_bytes"] else None),
    ("fds held", lambda r: r["held"]["fds"]),
    ("redis clients held", lambda r: r["held"]["redis_clients"]),
    ("idle CPU % held", lambda r: r["held"]["cpu_percent"]),
]


def _back(returned: dict[str, Optional[float]]) -> Optional[float]:
    """When threads and fds were both back to baseline after the close (``None``: not within
    the settle wait)."""
    t, f = returned["threads"], returned["fds"]
    return None if t is None or f is None else max(t, f)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    labels = list(dict.fromkeys(r["label"] for r in runs))
    med: dict[str, dict[str, Optional[float]]] = {}
    for label in labels:
        med[label] = {}
        for name, get in SUMMARY:
            vals = [get(r) for r in runs if r["label"] == label]
            vals = [v for v in vals if v is not None]
            med[label][name] = statistics.median(vals) if vals else None
    out: dict[str, Any] = {"median": med}
    if len(labels) == 2:
        a, b = labels
        out["ratio_A_over_B"] = {name: c.ratio(med[a][name], med[b][name]) for name, _ in SUMMARY}
    return out


def format_summary(s: dict[str, Any], labels: list[str], revs: dict[str, str]) -> str:
    lines = ["== summary (medians over runs)" + ("; ratio = A/B = new/old" if len(labels) == 2 else "")]
    head = f"{'':22}" + "".join(f"{lab + ' ' + revs[lab]:>28}" for lab in labels)
    if len(labels) == 2:
        head += f"{'ratio':>10}"
    lines.append(head)
    for name, _ in SUMMARY:
        fmt = ".3f" if "ms/conn" in name else ".1f"
        line = f"{name:<22}" + "".join(f"{_num(s['median'][lab][name], fmt):>28}" for lab in labels)
        if len(labels) == 2:
            line += f"{c.fmt_ratio(s['ratio_A_over_B'][name]):>10}"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10000, help="connections to open (default 10000)")
    ap.add_argument("--hold", type=float, default=10.0, help="seconds to hold them open, measuring CPU (default 10)")
    ap.add_argument("--concurrency", type=int, default=200, help="handshakes in flight at most (default 200)")
    ap.add_argument("--handshake-timeout", type=float, default=15.0, help="seconds for one connect + 101 (default 15)")
    ap.add_argument("--open-timeout", type=float, default=180.0, help="bound of the whole open phase (default 180)")
    ap.add_argument("--thread-cap", type=int, default=c.system_thread_limit() * 3 // 4,
                    help="stop opening when the server has this many threads (default: three quarters of"
                         " the machine's pid/thread limit)")  # fmt: skip
    ap.add_argument("--baseline", type=float, default=2.0, help="seconds of baseline CPU before connecting (default 2)")
    ap.add_argument("--settle-start", type=float, default=1.0, help="seconds after the server starts before the baseline")
    ap.add_argument("--close-wait", type=float, default=3.0, help="seconds to wait for the server's close frames")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds to wait for the figures to return to baseline")
    ap.add_argument("--after-cpu", type=float, default=2.0, help="seconds of CPU measured after the settle wait")
    ap.add_argument("--server-cmd", help="server command template: {python} {redis} {port} {max_connections}")
    ap.add_argument("--against", metavar="REV", help="also measure this git revision (B), interleaved with the current tree (A)")
    ap.add_argument("--runs", type=int, default=1, help="runs per side (interleaved A, B, A, B; default 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = ap.parse_args()
    if args.n < 1 or args.runs < 1 or args.concurrency < 1:
        ap.error("-n, --runs and --concurrency must be at least 1")

    c.sigterm_as_interrupt()
    soft, hard = c.raise_nofile()  # the server inherits it too
    if soft < args.n + 100:
        c.log(f"warning: RLIMIT_NOFILE is {soft} (hard {hard}): fewer than {args.n} sockets can be opened")
    runs: list[dict[str, Any]] = []
    revs = {"A": "current tree " + c.describe_tree(c.REPO)}
    try:
        with tempfile.TemporaryDirectory(prefix="juggler-bench-") as logdir:
            if args.against:
                with c.worktree(args.against) as (wt, commit):
                    revs["B"] = f"{args.against} ({commit})"
                    for i in range(args.runs):
                        for label, tree in (("A", c.REPO), ("B", wt)):
                            runs.append(run_once(label, tree, revs[label], args, logdir))
                            if not args.json:
                                print(format_run(runs[-1]) + "\n", flush=True)
            else:
                for i in range(args.runs):
                    runs.append(run_once("A", c.REPO, revs["A"], args, logdir))
                    if not args.json:
                        print(format_run(runs[-1]) + "\n", flush=True)
    except KeyboardInterrupt:
        c.log("interrupted: everything started was stopped")
        return 130
    summary = summarize(runs)
    if args.json:
        print(json.dumps({"connections": args.n, "hold": args.hold, "nofile_soft_limit": soft, "revs": revs,
                          "runs": runs, "summary": summary}, indent=1))  # fmt: skip
    elif args.against or args.runs > 1:
        print(format_summary(summary, list(revs), revs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
