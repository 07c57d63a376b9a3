"""Pub-sub fan-out: delivery latency, deliveries/s and server CPU per delivery.

For each subscriber count N (``-n``/``--subscribers``, e.g. ``200,500,1000,2000``) it starts
its own redis-server on a free port and ONE ``juggler server`` process (fresh for every
measurement), then a subscriber process opens N raw juggler.0 websockets with ``selectors``
(non-blocking sockets, no thread per connection, ``--concurrency`` handshakes in flight), each
SUBs channel ``bench`` and waits for its ACK. One publisher websocket (in the main process)
then PUBs ``--events`` M events at ``--rate`` per second (0: as fast as it can); each PUB's
args carry its sequence number and its send time (``time.time_ns()``, the same clock in both
processes). Latency is the EVNT's read time (right after the ``recv`` that returned it) minus
the PUB's send time, over every delivery (N x M). Every subscriber must get every event exactly
once and in order: lost, duplicated and out-of-order events are counted and reported (all 0 is
the only good answer).

Reported per N: subscribed (of N), p50/p99/max latency (ms), deliveries/s over the burst (from
the first PUB to the last delivery), the server's CPU µs per delivery (utime+stime delta of the
server process from just before the first PUB until every event was delivered or ``--drain``
ran out, / deliveries), redis' too, redis ``connected_clients`` and the server's threads while
subscribed (the INFO connection itself counted), and the subscriber process's CPU (% of one
core over the burst: near 100 means the load side, not the server, is the limit).

``--stall K``: K subscribers (spread over the N) stop reading once subscribed. The figures
above are then the others'; afterwards the stalled sockets are read for up to ``--stall-read``
seconds and the report says how many were disconnected by the server (close 1008, "write queue
full") and how many events they held. A server disconnects a client only once its write queue
(``--write-queue-size``, default 256 messages) and the socket buffers are full: on loopback the
kernel buffers about a megabyte per connection (5000 events of ~200 bytes still fit), so with a
few events a stalled subscriber is simply not disconnected, and that is reported as such.

``--against REV`` also measures a git revision: a temporary ``git worktree add --detach``
(removed at the end) whose server runs with ``PYTHONPATH`` set to it, interleaved with the
current tree per N (alternating which goes first, ``--runs`` times each), and prints the ratio
A/B = new/old of the medians. A tree that cannot hold N subscribers shows it in its row
(subscribed < N and why, timeouts, a dead server) instead of hanging: every wait is bounded.

Usage::

    python benchmarks/fanout.py                                   # N=1000, 20 events at 20/s
    python benchmarks/fanout.py --subscribers 200,500,1000,2000
    python benchmarks/fanout.py -n 200,500 --against efa6e0d
    python benchmarks/fanout.py -n 1000 --stall 1
    python benchmarks/fanout.py -n 200 --events 2000 --rate 0 --json
    python benchmarks/fanout.py -n 200 --history 'bench=100,300s' --against HEAD   # history on/off

``--server-cmd`` placeholders: {python} {redis} {port} {max_connections} (N + 100); it runs with
the tree as working directory and on PYTHONPATH. Flags of the default command that a tree's
``juggler server --help`` does not list are dropped, with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import multiprocessing
import os
import select
import selectors
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402

DEFAULT_SERVER_CMD = ("{python} -m juggler server --redis {redis} --host 127.0.0.1 --port {port} "
                      "--max-connections {max_connections} --log-level warning")  # fmt: skip
OPTIONAL_FLAGS = ("--max-connections", "--log-level", "--host")
CHANNEL = "bench"
SUB_TEMPLATE = '{"meta":{"type":3,"uuid":"%s"},"payload":{"channel":"' + CHANNEL + '","pattern":false}}'
PUB_TEMPLATE = '{"meta":{"type":2,"uuid":"%s"},"payload":{"channel":"' + CHANNEL + '","args":{"seq":%d,"t":%d}}}'
T_ACK, T_NACK, T_EVNT = 8, 7, 10

CONNECTING, HANDSHAKE, SUBSCRIBING, SUBSCRIBED, CLOSED = range(5)


# -- the subscriber process ---------------------------------------------------------------------


class Sub:
    __slots__ = ("i", "sock", "state", "out", "head", "accept", "started", "parser", "sub_uuid", "stalled",
                 "was_subscribed", "seen", "last", "dups", "ooo", "close_code")  # fmt: skip

    def __init__(self, i: int, sock: socket.socket, req: bytes, accept: str, stalled: bool) -> None:
        self.i = i
        self.sock = sock
        self.state = CONNECTING
        self.out = req
        self.head = bytearray()
        self.accept = accept
        self.started = time.monotonic()
        self.parser: Optional[c.FrameParser] = None
        self.sub_uuid = str(uuid.uuid4())
        self.stalled = stalled
        self.was_subscribed = False
        self.seen: set[int] = set()
        self.last = -1
        self.dups = 0
        self.ooo = 0
        self.close_code: Optional[int] = None


class Subscribers:
    """N subscribers in one selector: open + SUB, then record every EVNT."""

    def __init__(self, port: int, path: str, n: int, stall: int, events: int, args: argparse.Namespace) -> None:
        self.addr = ("127.0.0.1", port)
        self.port, self.path, self.n, self.args = port, path, n, args
        self.events = events  # events to expect (updated to those actually published)
        self.stall_idx = {round(k * n / stall) for k in range(stall)} if stall else set()
        self.sel = selectors.DefaultSelector()
        self.subs: list[Sub] = []
        self.inflight: dict[Sub, None] = {}  # start order = deadline order
        self.failures: Counter[str] = Counter()  # connections that never got subscribed
        self.dropped: Counter[str] = Counter()  # subscribed connections the server closed or lost
        self.lat_ns: list[int] = []
        self.last_delivery_ns = 0
        self.pings = 0
        self.other = 0
        self.remaining = 0  # reading subscribers that lack events
        self.counting = False

    # socket plumbing

    def _send(self, sub: Sub, data: bytes) -> None:
        waiting = bool(sub.out)
        try:
            sub.out = c.send_or_queue(sub.sock, sub.out, data)
        except OSError as exc:
            return self._lost(sub, f"send: {c.errname(exc)}")
        if sub.out and not waiting:
            if not sub.stalled or sub.state != SUBSCRIBED:
                self.sel.modify(sub.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, sub)

    def _unregister(self, sub: Sub) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sub.sock)

    def _fail(self, sub: Sub, reason: str) -> None:
        self.inflight.pop(sub, None)
        self.failures[reason] += 1
        sub.state = CLOSED
        self._unregister(sub)
        sub.sock.close()

    def _lost(self, sub: Sub, reason: str) -> None:
        if sub.state != SUBSCRIBED:
            return self._fail(sub, reason)
        self.dropped[reason] += 1
        if self.counting and not sub.stalled and len(sub.seen) < self.events:
            self.remaining -= 1
        sub.state = CLOSED
        self._unregister(sub)
        sub.sock.close()

    def _start(self, i: int) -> None:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            self.failures[f"socket(): {c.errname(exc)}"] += 1
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req, accept = c.handshake_request("127.0.0.1", self.port, self.path)
        sub = Sub(i, sock, req, accept, i in self.stall_idx)
        self.subs.append(sub)
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            sub.state = CLOSED
            self.failures[f"connect: {errno.errorcode.get(err, err)}"] += 1
            sock.close()
            return
        self.inflight[sub] = None
        self.sel.register(sock, selectors.EVENT_WRITE, sub)

    def _writable(self, sub: Sub) -> None:
        failed = c.write_queued(self.sel, sub, CONNECTING, HANDSHAKE)
        if failed is not None:
            step, reason = failed
            (self._fail if step == "connect" else self._lost)(sub, reason)

    def _readable(self, sub: Sub) -> None:
        try:
            data = sub.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            return self._lost(sub, f"recv: {c.errname(exc)}")
        now = time.time_ns()
        if sub.state == HANDSHAKE:
            if not data:
                return self._fail(sub, "closed before the 101")
            sub.head += data
            end = sub.head.find(b"\r\n\r\n")
            if end < 0:
                if len(sub.head) > 16384:
                    return self._fail(sub, "response head too large")
                return
            problem = c.check_handshake_response(bytes(sub.head[:end]), sub.accept)
            if problem:
                return self._fail(sub, problem)
            data = bytes(sub.head[end + 4 :])
            sub.head = bytearray()
            sub.parser = c.FrameParser()
            sub.state = SUBSCRIBING
            self._send(sub, c.encode_frame(c.OP_TEXT, (SUB_TEMPLATE % sub.sub_uuid).encode()))
            if sub.state == CLOSED or not data:
                return
        if not data:
            return self._lost(sub, "EOF without a close frame" if sub.state == SUBSCRIBED else "closed before the ACK")
        assert sub.parser is not None
        for opcode, payload in sub.parser.feed(data):
            if opcode == c.OP_TEXT:
                self._message(sub, payload, now)
            elif opcode == c.OP_PING:
                self.pings += 1
                self._send(sub, c.encode_frame(c.OP_PONG, payload))
            elif opcode == c.OP_CLOSE:
                code = sub.close_code = c.answer_close(sub.sock, payload)
                return self._lost(sub, f"closed by the server: {code}")
            if sub.state == CLOSED:
                return

    def _message(self, sub: Sub, payload: bytes, now: int) -> None:
        msg = json.loads(payload)
        t = msg["meta"]["type"]
        p = msg["payload"]
        if t == T_EVNT and sub.state == SUBSCRIBED:
            args = p.get("args") or {}
            seq = args.get("seq")
            if seq in sub.seen:
                sub.dups += 1
                return
            if seq < sub.last:
                sub.ooo += 1
            else:
                sub.last = seq
            sub.seen.add(seq)
            if not sub.stalled:
                self.lat_ns.append(now - args["t"])
                if now > self.last_delivery_ns:
                    self.last_delivery_ns = now
                if self.counting and len(sub.seen) == self.events:
                    self.remaining -= 1
        elif sub.state == SUBSCRIBING and t in (T_ACK, T_NACK) and p.get("for") == sub.sub_uuid:
            if t == T_NACK:
                return self._fail(sub, f"SUB NACK {p.get('code')}: {p.get('message')}")
            del self.inflight[sub]
            sub.state = SUBSCRIBED
            sub.was_subscribed = True
            if sub.stalled:  # never read again (until the end)
                self._unregister(sub)
        else:
            self.other += 1

    def _dispatch(self, timeout: float) -> list[Any]:
        """One round of socket events; returns any messages that came from the parent."""
        from_parent = []
        for key, mask in self.sel.select(timeout):
            sub = key.data
            if sub is None:
                while key.fileobj.poll():  # type: ignore[union-attr]
                    from_parent.append(key.fileobj.recv())  # type: ignore[union-attr]
                continue
            if sub.state == CLOSED:
                continue
            if mask & selectors.EVENT_WRITE:
                self._writable(sub)
            if mask & selectors.EVENT_READ and sub.state != CLOSED:
                self._readable(sub)
        return from_parent

    # phases

    def open_all(self) -> float:
        a = self.args
        t0 = time.monotonic()
        deadline = t0 + a.open_timeout
        started = 0
        next_check = 0.0
        while started < self.n or self.inflight:
            now = time.monotonic()
            if now > deadline:
                break
            if now >= next_check:
                next_check = now + 0.25
                while self.inflight:
                    sub = next(iter(self.inflight))
                    if now - sub.started < a.handshake_timeout:
                        break
                    what = {CONNECTING: "connecting", HANDSHAKE: "waiting for the 101"}.get(sub.state, "waiting for the SUB ACK")
                    self._fail(sub, f"timeout {what}")
            while started < self.n and len(self.inflight) < a.concurrency:
                self._start(started)
                started += 1
            self._dispatch(0.05)
        for sub in list(self.inflight):
            self._fail(sub, "still opening when --open-timeout ran out")
        if started < self.n:
            self.failures["never started (--open-timeout)"] += self.n - started
        return time.monotonic() - t0

    def reading(self) -> list[Sub]:
        return [s for s in self.subs if s.state == SUBSCRIBED and not s.stalled]

    def start_counting(self, events: int) -> None:
        self.events = events
        self.counting = True
        self.remaining = sum(1 for s in self.reading() if len(s.seen) < events)

    def read_stalled(self, seconds: float) -> None:
        """Read the stalled subscribers now, until each has every event, is closed, or time is up."""
        stalled = [s for s in self.subs if s.stalled and s.state == SUBSCRIBED]
        for s in stalled:
            s.stalled = False  # from now on it reads; its latencies are not recorded though
            self.sel.register(s.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if s.out else 0), s)
        end = time.monotonic() + seconds
        lat_keep = len(self.lat_ns)
        last_keep = self.last_delivery_ns
        self.counting = False
        while time.monotonic() < end and any(s.state == SUBSCRIBED and len(s.seen) < self.events for s in stalled):
            self._dispatch(0.05)
        del self.lat_ns[lat_keep:]
        self.last_delivery_ns = last_keep
        for s in stalled:
            s.stalled = True

    def close_all(self) -> None:
        frame = c.close_frame(1000)
        for s in self.subs:
            if s.state != CLOSED:
                with contextlib.suppress(OSError):
                    s.sock.send(frame)
            s.sock.close()
        self.sel.close()


def subscriber_process(port: int, path: str, n: int, stall: int, events: int, args: argparse.Namespace,
                       pipe: Any) -> None:  # fmt: skip
    """Open and subscribe ``n`` websockets, report ready, then record events until the parent
    says how many were published and every reading subscriber has them (or the drain deadline
    passes); report ("delivered", ...), read the stalled ones, report ("result", ...)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    subs = Subscribers(port, path, n, stall, events, args)
    try:
        open_s = subs.open_all()
        subscribed = sum(1 for s in subs.subs if s.state == SUBSCRIBED)
        pipe.send(("ready", {"subscribed": subscribed, "failures": dict(subs.failures), "open_seconds": open_s,
                             "stalled": sum(1 for s in subs.subs if s.stalled and s.state == SUBSCRIBED)}))  # fmt: skip
        subs.sel.register(pipe, selectors.EVENT_READ, None)
        drain_until: Optional[float] = None  # time.time()
        hard_end = time.monotonic() + args.open_timeout + 3600  # never forever, whatever the parent does
        while time.monotonic() < hard_end:
            for msg in subs._dispatch(0.05):
                if msg[0] == "published":
                    subs.start_counting(msg[1])
                    drain_until = msg[2]
                elif msg[0] == "quit":
                    return
            if drain_until is not None and (subs.remaining <= 0 or time.time() >= drain_until):
                break
        subs.sel.unregister(pipe)
        pipe.send(("delivered", subs.last_delivery_ns, subs.remaining))
        if stall:
            subs.read_stalled(args.stall_read)
        subscribed_ones = [s for s in subs.subs if s.was_subscribed]
        readers = [s for s in subscribed_ones if not s.stalled]
        stalled = [s for s in subscribed_ones if s.stalled]
        gone = [s for s in readers if s.state == CLOSED]
        result = {
            "subscribed": subscribed,
            "lat_ns": subs.lat_ns,
            "last_delivery_ns": subs.last_delivery_ns,
            "lost": sum(subs.events - len(s.seen) for s in readers),
            "dups": sum(s.dups for s in readers),
            "ooo": sum(s.ooo for s in readers),
            "closed_while_reading": len(gone),
            "dropped": dict(subs.dropped),
            "pings": subs.pings,
            "other": subs.other,
            "stalled": len(stalled),
            "stalled_closed_1008": sum(1 for s in stalled if s.close_code == 1008),
            "stalled_closed_other": sum(1 for s in stalled if s.state == CLOSED and s.close_code != 1008),
            "stalled_open": sum(1 for s in stalled if s.state == SUBSCRIBED),
            "stalled_events": sorted(len(s.seen) for s in stalled),
            "stalled_dups": sum(s.dups for s in stalled),
            "stalled_ooo": sum(s.ooo for s in stalled),
        }
        pipe.send(("result", result))
    except (BrokenPipeError, EOFError):
        pass
    finally:
        subs.close_all()
        pipe.close()


# -- one measurement: redis + server of a tree, subscribers, publisher --------------------------


class Stack:
    """A fresh redis-server and ``juggler server`` of one tree."""

    def __init__(self, tree: str, n: int, args: argparse.Namespace, logdir: str, history: str = "") -> None:
        self.procs: list[c.Proc] = []
        try:
            self.redis, self.redis_url, self.redis_port = c.start_redis(logdir, maxclients=max(10000, 2 * n + 1000))
            self.procs.append(self.redis)
            self.port = c.free_port()
            values = {"python": sys.executable, "redis": self.redis_url, "port": self.port, "max_connections": n + 100}
            if args.server_cmd:
                self.argv, self.notes = c.build_cmd(args.server_cmd, values)
            else:
                self.argv, self.notes = c.build_cmd(DEFAULT_SERVER_CMD, values, _flags(tree), OPTIONAL_FLAGS)
            if history:  # (side A only: B is the same run without it)
                self.argv += ["--history", history]
            self.server = c.Proc("server", self.argv, logdir, env=c.tree_env(tree), cwd=tree)
            self.procs.append(self.server)
            m = self.server.wait_for(r"websocket: wss?://[^/\s]+(/\S*)", 30, port=self.port)
            self.path = m.group(1) if m else "/ws"
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        return all(p.popen.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


_flag_cache: dict[str, set[str]] = {}


def _flags(tree: str) -> set[str]:
    if tree not in _flag_cache:
        _flag_cache[tree] = c.juggler_flags(sys.executable, tree, "server")
    return _flag_cache[tree]


class Publisher:
    """One websocket that PUBs; reads its ACKs (and answers pings) between sends."""

    def __init__(self, port: int, path: str) -> None:
        self.sock, self.parser = c.ws_connect(port, path, 10.0)
        self.acks = self.nacks = 0
        self.nack_reasons: Counter[str] = Counter()
        self.closed: Optional[str] = None

    def _read(self, timeout: float) -> None:
        if self.closed:
            return
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.closed = c.errname(exc)
            return
        if not data:
            self.closed = "EOF"
            return
        for opcode, payload in self.parser.feed(data):
            if opcode == c.OP_TEXT:
                msg = json.loads(payload)
                t = msg["meta"]["type"]
                if t == T_ACK:
                    self.acks += 1
                elif t == T_NACK:
                    self.nacks += 1
                    self.nack_reasons[f"{msg['payload'].get('code')}: {msg['payload'].get('message')}"] += 1
            elif opcode == c.OP_PING:
                self._sendall(c.encode_frame(c.OP_PONG, payload))
            elif opcode == c.OP_CLOSE:
                self.closed = f"close {c.close_code(payload)}"

    def _sendall(self, frame: bytes) -> bool:
        end = time.monotonic() + 10.0
        while frame:
            try:
                k = self.sock.send(frame)
                frame = frame[k:]
            except BlockingIOError:
                if time.monotonic() > end:
                    self.closed = "send blocked for 10 s"
                    return False
                select.select([], [self.sock], [], 0.1)
            except OSError as exc:
                self.closed = c.errname(exc)
                return False
        return True

    def publish(self, events: int, rate: float) -> tuple[int, int]:
        """PUB ``events`` events at ``rate``/s: (events sent, time_ns of the first)."""
        interval = 1.0 / rate if rate > 0 else 0.0
        start = time.perf_counter()
        first_ns = 0
        sent = 0
        for i in range(events):
            due = start + i * interval
            while True:
                left = due - time.perf_counter()
                if left <= 0:
                    break
                self._read(left)
            if self.closed:
                break
            t = time.time_ns()
            if not first_ns:
                first_ns = t
            frame = c.encode_frame(c.OP_TEXT, (PUB_TEMPLATE % (uuid.uuid4(), i, t)).encode())
            if not self._sendall(frame):
                break
            sent += 1
            if not interval:
                self._read(0)
        return sent, first_ns

    def wait_acks(self, sent: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.acks + self.nacks < sent and not self.closed and time.monotonic() < end:
            self._read(end - time.monotonic())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(c.close_frame(1000))
        self.sock.close()


def measure(label: str, tree: str, n: int, args: argparse.Namespace, logdir: str) -> dict[str, Any]:
    r: dict[str, Any] = {"label": label, "subscribers": n, "events": args.events, "rate": args.rate, "stall": args.stall,
                         "subscribed": 0, "failures": {}, "problems": []}  # fmt: skip
    stack = Stack(tree, n, args, logdir, args.history if label == "A" else "")
    r["server_argv"], r["notes"] = stack.argv, stack.notes
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=subscriber_process, args=(stack.port, stack.path, n, args.stall, args.events, args, child),
                       daemon=True)  # fmt: skip
    pub: Optional[Publisher] = None
    try:
        proc.start()
        child.close()
        if not parent.poll(args.open_timeout + 30):
            raise RuntimeError("the subscriber process did not report within --open-timeout + 30 s")
        kind, info = parent.recv()
        r.update(subscribed=info["subscribed"], failures=info["failures"], open_seconds=info["open_seconds"])
        if not stack.alive():
            r["problems"].append("server died while subscribers connected")
            return r
        r["redis_clients"] = c.redis_clients(stack.redis_port)
        with contextlib.suppress(OSError):
            r["server_threads"] = c.proc_status(stack.server.pid).get("threads")
        if info["subscribed"] == 0:
            r["problems"].append("no subscriber subscribed")
            return r
        try:
            pub = Publisher(stack.port, stack.path)
        except (OSError, ConnectionError) as exc:
            r["problems"].append(f"publisher could not connect: {c.errname(exc) if isinstance(exc, OSError) else exc}")
            return r
        pids = {"server": stack.server.pid, "redis": stack.redis.pid, "subscribers": proc.pid}
        cpu0 = {k: c.cpu_seconds(p) for k, p in pids.items()}
        m0 = time.monotonic()
        sent, first_ns = pub.publish(args.events, args.rate)
        parent.send(("published", sent, time.time() + args.drain))
        if not parent.poll(args.drain + 30):
            raise RuntimeError("the subscriber process did not report deliveries within --drain + 30 s")
        _, last_ns, remaining = parent.recv()
        cpu1 = {k: c.cpu_seconds(p) for k, p in pids.items()}
        m1 = time.monotonic()
        pub.wait_acks(sent, 5.0)
        if not parent.poll(args.stall_read + 30):
            raise RuntimeError("the subscriber process did not send its result")
        _, res = parent.recv()
        lat = sorted(x / 1e6 for x in res.pop("lat_ns"))
        deliveries = len(lat)
        r.update(res)
        r.update(
            published=sent,
            pub_acks=pub.acks,
            pub_nacks=pub.nacks,
            pub_nack_reasons=dict(pub.nack_reasons),
            pub_closed=pub.closed,
            deliveries=deliveries,
            expected_deliveries=sent * (res["subscribed"] - res["stalled"]),
            incomplete_at_drain=remaining,
            p50_ms=c.percentile(lat, 50) if lat else None,
            p99_ms=c.percentile(lat, 99) if lat else None,
            max_ms=lat[-1] if lat else None,
            burst_seconds=(last_ns - first_ns) / 1e9 if deliveries and first_ns else None,
            window_seconds=m1 - m0,
        )
        r["deliveries_per_second"] = deliveries / r["burst_seconds"] if r["burst_seconds"] else None
        for role in ("server", "redis"):
            used = cpu1[role] - cpu0[role]
            r[f"{role}_cpu_seconds"] = used
            r[f"{role}_cpu_us_per_delivery"] = 1e6 * used / deliveries if deliveries else None
        r["subscriber_cpu_percent"] = 100.0 * (cpu1["subscribers"] - cpu0["subscribers"]) / (m1 - m0)
        if remaining:
            r["problems"].append(f"{remaining} subscribers lacked events when --drain ran out")
        return r
    finally:
        r["server_alive"] = stack.alive()
        if not r["server_alive"]:
            r["problems"].append("the server process died: " + stack.server.tail(3).replace("\n", " | ")[-300:])
        if pub is not None:
            pub.close()
        with contextlib.suppress(OSError, BrokenPipeError):
            parent.send(("quit",))
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        parent.close()
        stack.stop()


# -- report -------------------------------------------------------------------------------------

FIGURES = [
    ("p50 ms", "p50_ms", ".2f"),
    ("p99 ms", "p99_ms", ".2f"),
    ("max ms", "max_ms", ".2f"),
    ("deliv/s", "deliveries_per_second", ".0f"),
    ("srv us/dlv", "server_cpu_us_per_delivery", ".1f"),
    ("redis us/dlv", "redis_cpu_us_per_delivery", ".2f"),
    ("redis clients", "redis_clients", "d"),
    ("srv threads", "server_threads", "d"),
]


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_header() -> str:
    return (f"{'N':>5} {'side':<4} {'subscribed':>10}" + "".join(f"{name:>14}" for name, _, _ in FIGURES)
            + f"{'sub CPU%':>10}  checks")  # fmt: skip


def format_row(r: dict[str, Any]) -> str:
    checks = []
    if "deliveries" in r:
        checks.append(f"{r['deliveries']}/{r['expected_deliveries']} delivered, lost {r['lost']} dup {r['dups']}"
                      f" out-of-order {r['ooo']}")  # fmt: skip
        if r.get("closed_while_reading"):
            checks.append(f"{r['closed_while_reading']} closed by the server: {r['dropped']}")
        if r.get("pub_nacks") or r.get("pub_closed") or r.get("pub_acks") != r.get("published"):
            checks.append(f"PUB acks {r['pub_acks']}/{r['published']} nacks {r['pub_nacks']} {r['pub_nack_reasons'] or ''}"
                          + (f" publisher closed: {r['pub_closed']}" if r["pub_closed"] else ""))  # fmt: skip
    if r["failures"]:
        checks.append("not subscribed: " + ", ".join(f"{v} {k}" for k, v in sorted(r["failures"].items(), key=lambda kv: -kv[1])))
    if r.get("stall"):
        if "stalled" in r:
            ev = r["stalled_events"]
            checks.append(f"stalled {r['stalled']}: disconnected 1008 {r['stalled_closed_1008']}, other close"
                          f" {r['stalled_closed_other']}, still open {r['stalled_open']}, events they held"
                          f" {min(ev) if ev else 0}-{max(ev) if ev else 0} of {r['published']}")  # fmt: skip
    checks += r["problems"]
    sub = f"{r['subscribed']}/{r['subscribers']}"
    cpu = r.get("subscriber_cpu_percent")
    return (f"{r['subscribers']:>5} {r['label']:<4} {sub:>10}" + "".join(f"{_f(r.get(key), fmt):>14}" for _, key, fmt in FIGURES)
            + f"{_f(cpu, '.0f'):>10}  {'; '.join(checks)}")  # fmt: skip


def _median(rows: list[dict[str, Any]], key: str) -> Optional[float]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _counts(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--subscribers", default="1000", help="subscriber counts, comma-separated (default 1000)")
    ap.add_argument("--events", type=int, default=20, help="events published per measurement (default 20)")
    ap.add_argument("--rate", type=float, default=20.0, help="events per second (default 20; 0: as fast as possible)")
    ap.add_argument("--stall", type=int, default=0, metavar="K", help="K subscribers never read after subscribing")
    ap.add_argument("--stall-read", type=float, default=5.0, help="seconds to read the stalled sockets at the end (default 5)")
    ap.add_argument("--drain", type=float, default=30.0, help="seconds after the last PUB to wait for deliveries (default 30)")
    ap.add_argument("--concurrency", type=int, default=100, help="subscriber handshakes in flight at once (default 100)")
    ap.add_argument("--handshake-timeout", type=float, default=15.0, help="seconds for connect + 101 + SUB ACK (default 15)")
    ap.add_argument("--open-timeout", type=float, default=120.0, help="seconds to open all subscribers (default 120)")
    ap.add_argument("--server-cmd", help="server command template: {python} {redis} {port} {max_connections}")
    ap.add_argument("--against", metavar="REV", help="also measure this git revision (B), interleaved with the current tree (A)")
    ap.add_argument("--history", default="", metavar="RULE", help="run side A's server with --history RULE (e.g. "
                    "'bench=100,300s'); with --against HEAD, history on (A) against off (B)")
    ap.add_argument("--runs", type=int, default=1, help="measurements per side and N (default 1)")
    ap.add_argument("--warmup-runs", type=int, default=1,
                    help="measurements made and dropped before the first (default 1: the first run on a machine is"
                         " slow whichever tree makes it, p50 2-3x)")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = ap.parse_args()
    try:
        counts = _counts(args.subscribers)
    except ValueError as exc:
        ap.error(str(exc))
    if not counts or min(counts) < 1 or args.events < 1 or args.runs < 1 or args.concurrency < 1:
        ap.error("subscriber counts, --events, --runs and --concurrency must be at least 1")
    if args.warmup_runs < 0:
        ap.error("--warmup-runs must be at least 0")
    if not 0 <= args.stall < min(counts):
        ap.error("--stall must be at least 0 and below every subscriber count")

    c.sigterm_as_interrupt()
    c.raise_nofile()
    results: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="juggler-bench-") as logdir, contextlib.ExitStack() as cleanup:
            sides = [("A", c.REPO, "current tree " + c.describe_tree(c.REPO))]
            if args.against:
                wt, commit = cleanup.enter_context(c.worktree(args.against))
                sides.append(("B", wt, f"{args.against} ({commit})"))
            if not args.json:
                for label, tree, rev in sides:
                    print(f"{label}: {rev}  ({tree})")
                print(f"channel {CHANNEL!r}, {args.events} events at "
                      + (f"{args.rate:g}/s" if args.rate > 0 else "full speed")
                      + (f", {args.stall} stalled subscriber(s)" if args.stall else "")
                      + "; latency = EVNT read - PUB send over every delivery; CPU per delivery over first PUB .. last"
                      " delivery; a fresh redis + server per row\n")  # fmt: skip
                print(format_header(), flush=True)
            for _ in range(args.warmup_runs):  # (its figures dropped: see --warmup-runs)
                label, tree, _ = sides[0]
                with contextlib.suppress(RuntimeError):
                    measure(label, tree, counts[0], args, logdir)
                if not args.json:
                    print(f"      (a warm-up run of {label} with N={counts[0]}: not counted)", flush=True)
            for i, n in enumerate(counts):
                rows = []
                for run in range(args.runs):
                    order = sides if (i + run) % 2 == 0 else sides[::-1]
                    for label, tree, _ in order:
                        try:
                            r = measure(label, tree, n, args, logdir)
                        except RuntimeError as exc:
                            r = {"label": label, "subscribers": n, "subscribed": 0, "failures": {}, "stall": args.stall,
                                 "problems": [f"measurement failed: {exc}".replace("\n", " | ")]}  # fmt: skip
                        rows.append(r)
                        results.append(r)
                        if not args.json:
                            if r.get("notes"):
                                print(f"      ({label}'s tree lacks: {', '.join(r['notes'])})")
                            print(format_row(r), flush=True)
                entry: dict[str, Any] = {"subscribers": n, "median": {}}
                for label, _, _ in sides:
                    entry["median"][label] = {key: _median([r for r in rows if r["label"] == label], key)
                                              for _, key, _ in FIGURES}  # fmt: skip
                if len(sides) == 2:
                    a, b = entry["median"]["A"], entry["median"]["B"]
                    entry["ratio_A_over_B"] = {key: c.ratio(a[key], b[key]) for _, key, _ in FIGURES}
                    if not args.json:
                        print(f"{n:>5} {'A/B':<4} {'':>10}" + "".join(f"{c.fmt_ratio(entry['ratio_A_over_B'][key]):>14}"
                                                                  for _, key, _ in FIGURES))  # fmt: skip
                summary.append(entry)
            if args.json:
                print(json.dumps({"args": vars(args), "sides": [{"label": l, "tree": t, "rev": v} for l, t, v in sides],
                                  "results": results, "summary": summary}, indent=1))  # fmt: skip
            elif len(sides) == 2:
                print("\nA/B = new/old: deliveries/s above 1 is better; latency, CPU per delivery, redis clients and"
                      " threads below 1 are better.")  # fmt: skip
    except KeyboardInterrupt:
        c.log("interrupted: everything started was stopped")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
