"""Channel history and recovery under resets, a failover and a server kill (issue 21).

It starts its own redis-server and two ``juggler server`` processes with ``--history`` on one
channel, opens ``--subscribers`` raw juggler.0 websockets spread over the two (one selector,
no thread per connection), each recovering by itself as the Python client and juggler.js do:
it remembers the last event's offset and epoch and, after a loss, subscribes again with
``since``. A publisher thread publishes ``--rate`` events per second for ``--duration``
seconds from a backend (:func:`juggler.publish`, the same script as a PUB), each carrying its
sequence number. Meanwhile:

- every ``--reset-every`` seconds a random ``--reset-fraction`` of the subscribers' connections
  are reset (RST: ``SO_LINGER`` 0) and reconnect after a moment, half of them to the other
  server;
- at ``--kill-at`` seconds server 0 is killed (SIGKILL) and restarted ``--restart-after`` later;
  its subscribers reconnect to whichever server answers.

Reported: events lost, duplicated and out of order over all subscribers (each must have every
event exactly once, in order: 0, 0, 0 is the only good answer), recoveries that the server
ACKed ``"recovered": false``, the resets and reconnects made, and the time to recover
``--catchup`` missed events (a subscriber away while they were published, from its SUB with
``since`` until the last of them arrived; ``--catchup-runs`` times; target under 100 ms).
``--fanout N`` also runs ``benchmarks/fanout.py -n N --history ... --against HEAD``: the CPU
per delivery and p99 with history on (A) against off (B).

Usage::

    python benchmarks/recovery.py                      # 200 subscribers, 500 events/s, 20 s
    python benchmarks/recovery.py --subscribers 40 --rate 200 --duration 10 --json
    python benchmarks/recovery.py --fanout 200

The issue's full size (200 x 500 = 100,000 deliveries/s) needs more CPU than a loaded 2-core
machine has: the report says when the subscribers could not keep up (their CPU %).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402

CHANNEL = "bench.recovery"
T_ACK, T_NACK, T_EVNT = 8, 7, 10
DOWN, CONNECTING, HANDSHAKE, SUBSCRIBING, SUBSCRIBED = range(5)
SERVER_CMD = ("{python} -m juggler server --redis {redis} --host 127.0.0.1 --port {port} --history {history} "
              "--max-connections 5000 --cpu none --log-level warning")  # fmt: skip
_RST = struct.pack("ii", 1, 0)


def _sub_frame(sub_uuid: str, channel: str, since: Optional[tuple[str, str]]) -> bytes:
    payload: dict[str, Any] = {"channel": channel, "pattern": False}
    if since is not None:
        payload["since"] = {"offset": since[0], "epoch": since[1]}
    text = json.dumps({"meta": {"type": 3, "uuid": sub_uuid}, "payload": payload}, separators=(",", ":"))
    return c.encode_frame(c.OP_TEXT, text.encode())


class Sub:
    """One recovering subscriber."""

    __slots__ = ("i", "server", "sock", "state", "out", "head", "accept", "parser", "sub_uuid", "since",
                 "seen", "count", "top", "dups", "ooo", "not_recovered", "reconnect_at", "retries")  # fmt: skip

    def __init__(self, i: int, server: int, events: int) -> None:
        self.i, self.server = i, server
        self.sock: Optional[socket.socket] = None
        self.state = DOWN
        self.out = b""
        self.head = bytearray()
        self.accept = ""
        self.parser: Optional[c.FrameParser] = None
        self.sub_uuid = ""
        self.since: Optional[tuple[str, str]] = None  # the last event's (offset, epoch), or the SUB ACK's
        self.seen = bytearray(events)
        self.count = 0
        self.top = -1
        self.dups = self.ooo = self.not_recovered = 0
        self.reconnect_at = 0.0
        self.retries = 0


class Subscribers:
    """Every subscriber, in one selector."""

    def __init__(self, ports: list[int], n: int, events: int) -> None:
        self.ports = ports
        self.sel = selectors.DefaultSelector()
        self.subs = [Sub(i, i % len(ports), events) for i in range(n)]
        self.counts: Counter[str] = Counter()

    def connect(self, sub: Sub) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        port = self.ports[sub.server]
        sub.out, sub.accept = c.handshake_request("127.0.0.1", port, "/ws")
        sub.sock, sub.state, sub.head, sub.parser = sock, CONNECTING, bytearray(), None
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            return self.lost(sub, f"connect: {errno.errorcode.get(err, err)}")
        self.sel.register(sock, selectors.EVENT_WRITE, sub)

    def lost(self, sub: Sub, why: str, rst: bool = False, other: bool = False) -> None:
        """Drop the connection; reconnect soon (to the other server when ``other``, or when
        it failed before subscribing: that one may be down)."""
        if sub.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sub.sock)
            if rst:
                with contextlib.suppress(OSError):
                    sub.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
            sub.sock.close()
            sub.sock = None
        if sub.state == SUBSCRIBED or rst:
            self.counts["reconnects"] += 1
            sub.retries = 0
        else:
            sub.retries += 1
        self.counts[why] += 1
        if other or sub.retries:  # (a server that refused may be down: try the other)
            sub.server = (sub.server + 1) % len(self.ports)
        sub.state = DOWN
        sub.reconnect_at = time.monotonic() + random.uniform(0.01, 0.05) * min(8, 2 ** sub.retries)

    def reset(self, fraction: float) -> None:
        live = [s for s in self.subs if s.state == SUBSCRIBED]
        for k, sub in enumerate(random.sample(live, int(len(live) * fraction))):
            self.lost(sub, "resets (RST)", rst=True, other=k % 2 == 0)

    def tick(self, timeout: float) -> None:
        now = time.monotonic()
        for sub in self.subs:
            if sub.state == DOWN and sub.reconnect_at <= now:
                self.connect(sub)
        for key, mask in self.sel.select(timeout):
            sub = key.data
            if sub.sock is None:
                continue
            if mask & selectors.EVENT_WRITE:
                self._writable(sub)
            if mask & selectors.EVENT_READ and sub.sock is not None:
                self._readable(sub)

    def _writable(self, sub: Sub) -> None:
        assert sub.sock is not None
        failed = c.write_queued(self.sel, sub, CONNECTING, HANDSHAKE)
        if failed is not None:
            self.lost(sub, failed[1])

    def _readable(self, sub: Sub) -> None:
        assert sub.sock is not None
        try:
            data = sub.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            return self.lost(sub, f"recv: {c.errname(exc)}")
        if not data:
            return self.lost(sub, "EOF")
        if sub.state == HANDSHAKE:
            sub.head += data
            end = sub.head.find(b"\r\n\r\n")
            if end < 0:
                return
            problem = c.check_handshake_response(bytes(sub.head[:end]), sub.accept)
            if problem:
                return self.lost(sub, problem)
            data = bytes(sub.head[end + 4 :])
            sub.parser = c.FrameParser()
            sub.state = SUBSCRIBING
            sub.sub_uuid = str(uuid.uuid4())
            sub.sock.send(_sub_frame(sub.sub_uuid, CHANNEL, sub.since))  # (a small frame on a fresh socket)
        assert sub.parser is not None
        for opcode, payload in sub.parser.feed(data):
            if opcode == c.OP_TEXT:
                self._message(sub, json.loads(payload))
            elif opcode == c.OP_PING:
                with contextlib.suppress(OSError):
                    sub.sock.send(c.encode_frame(c.OP_PONG, payload))
            elif opcode == c.OP_CLOSE:
                c.answer_close(sub.sock, payload)
                return self.lost(sub, f"closed by the server: {c.close_code(payload)}")
            if sub.sock is None:
                return

    def _message(self, sub: Sub, msg: dict) -> None:
        t, p = msg["meta"]["type"], msg["payload"]
        if t == T_EVNT:
            seq = p["args"]["seq"]
            if sub.seen[seq]:
                sub.dups += 1
            else:
                sub.seen[seq] = 1
                sub.count += 1
                if seq < sub.top:
                    sub.ooo += 1
                sub.top = max(sub.top, seq)
            if p.get("offset"):
                sub.since = (p["offset"], p["epoch"])
        elif t in (T_ACK, T_NACK) and p.get("for") == sub.sub_uuid:
            if t == T_NACK:
                return self.lost(sub, f"SUB NACK {p.get('code')}")
            if sub.since is not None and p.get("recovered") is not True:
                sub.not_recovered += 1
            if sub.since is None and p.get("offset"):
                sub.since = (p["offset"], p["epoch"])
            sub.state = SUBSCRIBED


class Publisher(threading.Thread):
    def __init__(self, redis_url: str, history: str, rate: float, events: int) -> None:
        super().__init__(name="publisher", daemon=True)
        import redis

        self.client = redis.Redis.from_url(redis_url)
        self.history, self.rate, self.events = history, rate, events
        self.published = 0
        self.errors: Counter[str] = Counter()

    def run(self) -> None:
        import juggler

        start = time.monotonic()
        for i in range(self.events):
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            while True:
                try:
                    juggler.publish(self.client, CHANNEL, {"seq": i}, history=[self.history])
                    break
                except Exception as exc:  # (redis is never restarted here: report it)
                    self.errors[type(exc).__name__] += 1
                    time.sleep(0.01)
            self.published = i + 1


class Bench:
    def __init__(self, args: argparse.Namespace, logdir: str, log: Callable[[str], None]) -> None:
        self.a, self.logdir, self.log = args, logdir, log
        self.history = f"bench.*={args.size},60s"
        self.procs: list[c.Proc] = []
        self.servers: list[Optional[c.Proc]] = [None, None]

    def _server(self, k: int, port: int) -> c.Proc:
        argv = SERVER_CMD.format(python=sys.executable, redis=self.redis_url, port=port, history=self.history).split()
        proc = c.Proc(f"server{k}", argv, self.logdir, env=c.tree_env(c.REPO), cwd=c.REPO)
        self.procs.append(proc)
        proc.wait_for(r"websocket: ", 30, port=port)
        return proc

    def run(self) -> dict[str, Any]:
        redis_proc, self.redis_url, _ = c.start_redis(self.logdir)
        self.procs.append(redis_proc)
        try:
            ports = [c.free_port(), c.free_port()]
            self.servers = [self._server(k, p) for k, p in enumerate(ports)]
            report = self._storm(ports)
            report["catch-up ms"] = self._catchups(ports[1])
            return report
        finally:
            for p in reversed(self.procs):
                p.stop()

    def _storm(self, ports: list[int]) -> dict[str, Any]:
        a = self.a
        events = int(a.rate * a.duration)
        subs = Subscribers(ports, a.subscribers, events)
        deadline = time.monotonic() + 30
        while any(s.state != SUBSCRIBED for s in subs.subs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"subscribers not all subscribed in 30 s: {dict(subs.counts)}")
            subs.tick(0.02)
        cpu0 = time.process_time()
        pub = Publisher(self.redis_url, self.history, a.rate, events)
        start = time.monotonic()
        pub.start()
        next_reset, killed, restarted = start + a.reset_every, False, False
        resets = 0
        while True:
            now = time.monotonic()
            if now >= next_reset and pub.is_alive():
                subs.reset(a.reset_fraction)
                resets += 1
                next_reset += a.reset_every
            if not killed and now >= start + a.kill_at:
                killed = True
                self.servers[0].popen.kill()  # type: ignore[union-attr]
            if killed and not restarted and now >= start + a.kill_at + a.restart_after:
                restarted = True
                self.servers[0] = self._server(0, ports[0])
            done = not pub.is_alive() and all(s.count >= events for s in subs.subs)
            if done or now > start + a.duration + a.drain:
                break
            subs.tick(0.01)
        elapsed = time.monotonic() - start
        cpu = time.process_time() - cpu0
        pub.join(5)
        all_subs = subs.subs
        return {
            "subscribers": a.subscribers,
            "events published": pub.published,
            "deliveries": sum(s.count for s in all_subs),
            "lost": sum(pub.published - s.count for s in all_subs),
            "duplicated": sum(s.dups for s in all_subs),
            "out of order": sum(s.ooo for s in all_subs),
            "recovered false": sum(s.not_recovered for s in all_subs),
            "reset rounds": resets,
            "reconnects": subs.counts["reconnects"],
            "losses by cause": {k: v for k, v in subs.counts.items() if k != "reconnects"},
            "server killed and restarted": killed and restarted,
            "publish errors": dict(pub.errors),
            "seconds": round(elapsed, 2),
            "subscriber CPU %": round(100 * cpu / elapsed),
        }

    def _catchups(self, port: int) -> list[float]:
        """Milliseconds from a SUB with since until the ``--catchup`` events missed arrived."""
        import juggler
        import redis

        r = redis.Redis.from_url(self.redis_url)
        out = []
        for run in range(self.a.catchup_runs):
            channel = f"bench.catchup{run}"
            since = self._subscribe_once(port, channel)
            for i in range(self.a.catchup):
                juggler.publish(r, channel, {"seq": i}, history=[self.history])
            sock, parser = c.ws_connect(port, "/ws", 10)
            try:
                sock.setblocking(True)
                sock.settimeout(10)
                t0 = time.perf_counter()
                sock.sendall(_sub_frame(str(uuid.uuid4()), channel, since))
                got, recovered = 0, None
                while got < self.a.catchup:
                    for opcode, payload in parser.feed(sock.recv(262144)):
                        msg = json.loads(payload) if opcode == c.OP_TEXT else {}
                        t = msg.get("meta", {}).get("type")
                        if t == T_ACK:
                            recovered = msg["payload"].get("recovered")
                        elif t == T_EVNT:
                            assert msg["payload"]["args"]["seq"] == got, "catch-up out of order"
                            got += 1
                ms = (time.perf_counter() - t0) * 1000
                if recovered is not True:
                    raise RuntimeError(f"catch-up of {self.a.catchup} events was not recovered (SIZE too small?)")
                out.append(round(ms, 1))
            finally:
                sock.close()
        r.close()
        return out

    @staticmethod
    def _subscribe_once(port: int, channel: str) -> tuple[str, str]:
        sock, parser = c.ws_connect(port, "/ws", 10)
        try:
            sock.setblocking(True)
            sock.settimeout(10)
            sock.sendall(_sub_frame(str(uuid.uuid4()), channel, None))
            while True:
                for opcode, payload in parser.feed(sock.recv(65536)):
                    msg = json.loads(payload)
                    if msg["meta"]["type"] == T_ACK:
                        return msg["payload"]["offset"], msg["payload"]["epoch"]
        finally:
            sock.close()


def fanout(n: int, size: int) -> dict[str, Any]:
    """benchmarks/fanout.py with history on (A) and off (B): its ratios A/B."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fanout.py"), "-n", str(n),
           "--events", "300", "--rate", "100", "--runs", "3", "--history", f"bench={size},60s", "--against", "HEAD",
           "--json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800).stdout
    summary = json.loads(out)["summary"][0]
    return {"medians": summary["median"], "ratio history on/off": summary["ratio_A_over_B"]}


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subscribers", type=int, default=200, help="subscribers over the two servers (default 200)")
    ap.add_argument("--rate", type=float, default=500.0, help="events per second (default 500)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of publishing (default 20)")
    ap.add_argument("--reset-every", type=float, default=2.0, help="seconds between two rounds of resets (default 2)")
    ap.add_argument("--reset-fraction", type=float, default=0.2, help="subscribers reset per round (default 0.2)")
    ap.add_argument("--kill-at", type=float, default=10.0, help="seconds in when server 0 is killed (default 10)")
    ap.add_argument("--restart-after", type=float, default=1.0, help="seconds until it is restarted (default 1)")
    ap.add_argument("--size", type=int, default=5000, help="history SIZE of the channel (default 5000)")
    ap.add_argument("--drain", type=float, default=15.0, help="seconds after publishing for the last deliveries")
    ap.add_argument("--catchup", type=int, default=1000, help="missed events a catch-up recovers (default 1000)")
    ap.add_argument("--catchup-runs", type=int, default=5, help="catch-ups measured (default 5)")
    ap.add_argument("--fanout", type=int, default=0, metavar="N", help="also run fanout.py with N subscribers")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap.parse_args(argv)


def main() -> int:
    args = parse()
    c.sigterm_as_interrupt()
    c.raise_nofile()
    with tempfile.TemporaryDirectory(prefix="juggler-recovery-") as logdir:
        report = Bench(args, logdir, c.log).run()
    if args.fanout:
        report["fanout"] = fanout(args.fanout, args.size)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for key, value in report.items():
            print(f"{key:>28}: {value}")
    ok = report["lost"] == report["duplicated"] == report["out of order"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
