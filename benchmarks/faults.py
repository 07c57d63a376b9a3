"""Fault soak: RPC and pub-sub traffic on 1,000 websockets while redis is killed, restarted and
stalled. What must hold: no websocket is closed because redis went away, every call ends
exactly once, calls succeed again within a second of redis' return, every subscriber gets
events again after each return (the server resubscribes on its own), and the server's and
callees' threads, fds and redis clients are back to their baseline at the end.

It starts its own redis-server on a free port, one ``juggler server`` process and
``--callees`` (2) ``juggler callee --demo`` processes, then ``--load-processes`` (2) load driver
processes (raw, selector-based websocket clients: no thread per connection, no ``juggler``
import) open ``--websockets`` N websockets:

- ``--callers`` (default N/5) call ``test.echo`` in a closed loop, one call in flight each, with
  a timeout of ``--call-timeout`` (0.5) s. A call ends at its RES or its NACK, or expires at the
  client's timer: ``--call-timeout`` + ``--grace`` (0.25) s after it was sent (the protocol has
  no "expired" message; the grace keeps a RES that is merely late from counting twice). After a
  NACK a caller waits ``--nack-pause`` s before its next call, so an outage is not a storm of
  NACKs. The calls redis takes with it can only expire: with a timeout + grace shorter than an
  outage (the defaults), their callers are calling again when redis returns, so the time to the
  first RES measures the server, not the callers' timers (the report says when it does not);
- the others each SUB one of ``--channels`` (10) channels (``faults.K``), and one more websocket
  (the publisher, not one of the N) PUBs numbered events round-robin over them at ``--rate``
  (200) events/s, but with no more than ``--pubs-in-flight`` (a second's worth) unanswered: a
  PUB due beyond that is skipped (and counted), so a server that falls behind builds no backlog
  in which the events published after a return would wait. An event counts in the window of
  the fault it was published after.

After ``--warmup`` s it takes the baseline readings, then spreads the faults evenly over
``--duration`` s: ``--restarts`` (5) times redis is killed (SIGKILL), stays down ``--down`` s and
is started again on the same port; once (``--stall`` s, 3; 0: never) it is stopped (SIGSTOP) and
continued (SIGCONT) in the middle of them. "Redis' return" is the first moment the new redis
accepts a TCP connection, or the SIGCONT. Then it stops sending, lets the calls in flight end,
reads the load, closes every websocket and waits (up to ``--settle`` s) for the processes to get
back to their idle baseline (taken before the websockets opened, after one warm-up call and SUB).

A websocket the server closes is opened again by its driver (paced, with backoff, as a client
with ``reconnect=True`` would), so that every fault is measured; a subscriber on a reopened
websocket subscribes again, and is counted apart from those the server kept open, since only
those show that the server restores subscriptions by itself.

Reported: per fault, the websockets the server closed, the time from redis' return to the first
RES, the subscribers that got events again (kept open / reopened), the fewest events one got,
the longest wait from the return to a subscriber's first event, and the calls that ended
otherwise than by a RES, or twice; the calls' outcomes (a second one: how late after the
client's timer), the PUBs left with no ACK or NACK; the readings (threads and fds of the server
and each callee from /proc, redis' connections and clients) at each stage; the lines each
process logged, the most frequent ones. Gates (the exit status is 1 when one fails):

- websockets closed by the server: 0 (the publisher's included);
- calls without exactly one outcome: 0 (closed with their websocket, a second RES or NACK, a RES
  after the call expired, or still pending at the end);
- the longest time from a return to the first RES: at most ``--max-first-res`` s (1);
- subscribers the server kept open that got no event after a return: 0;
- threads, fds and redis clients over their idle baseline once it settled: 0;
- the server and the callee processes still running at the end.

``--against REV`` also runs the whole soak on a git revision (a temporary ``git worktree add
--detach``, removed at the end; its server and callees run with PYTHONPATH set to it), after the
current tree's, and prints both; the exit status is the current tree's. Usage::

    python benchmarks/faults.py                                  # 1,000 websockets, 60 s
    python benchmarks/faults.py --websockets 200 --duration 30 --restarts 2 --stall 1
    python benchmarks/faults.py --against main --json

A short run is in the test suite: ``tests/test_fault_soak.py``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import multiprocessing
import os
import queue
import re
import resource
import selectors
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from array import array
from collections import Counter
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402

SERVER_CMD = ("{python} -m juggler server --redis {redis} --host 127.0.0.1 --port {port} "
              "--max-connections {max_connections} --log-level warning")  # fmt: skip
CALLEE_CMD = "{python} -m juggler callee --redis {redis} --demo --grace 0 --log-level warning"
OPTIONAL_FLAGS = ("--max-connections", "--log-level", "--host", "--grace")
T_PUB, T_SUB, T_NACK, T_ACK, T_RES, T_EVNT = 2, 3, 7, 8, 9, 10  # message types
CALL = '{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"test.echo","timeout":%d,"args":"x"}}'
SUB = '{"meta":{"type":3,"uuid":"%s"},"payload":{"channel":"faults.%d","pattern":false}}'
PUB = '{"meta":{"type":2,"uuid":"%s"},"payload":{"channel":"faults.%d","args":{"seq":%d,"t":%.6f}}}'
REOPEN_FIRST, REOPEN_CAP = 0.2, 2.0  # a closed websocket's reopen backoff (s)
SUB_RETRY = 0.5  # a NACKed SUB is sent again after this (s)
TICK = 0.01  # the driver's select timeout (s)

CALLER, SUBSCRIBER, PUBLISHER = "caller", "subscriber", "publisher"
#: The outcomes other than a RES, shortened for the per-fault table (by their first word).
MARKS = {"nack": "nack", "expired": "exp", "closed": "closed", "still": "pending", "error": "err"}


# -- the load driver (one process) --------------------------------------------------------------


class Ws:
    """One websocket of a driver and what it saw, across the connections that replace it."""

    __slots__ = ("role", "index", "sock", "parser", "out", "opens", "backoff", "reopen_at", "opening", "call",
                 "deadline", "next_call", "sub_uuid", "sub_retry_at", "times", "pub_times", "last_seq", "ooo")  # fmt: skip

    def __init__(self, role: str, index: int) -> None:
        self.role, self.index = role, index
        self.sock: Optional[socket.socket] = None
        self.parser: Optional[c.FrameParser] = None
        self.out = b""
        self.opens: list[float] = []  # when each of its connections opened (monotonic)
        self.backoff = REOPEN_FIRST
        self.reopen_at = 0.0
        self.opening = False  # queued for the driver's opener thread
        self.call: Optional[str] = None  # the caller's call in flight
        self.deadline = 0.0
        self.next_call = 0.0
        self.sub_uuid: Optional[str] = None  # the subscriber's SUB awaiting its ACK
        self.sub_retry_at: Optional[float] = None
        self.times = array("d")  # a subscriber's event arrivals (monotonic)
        self.pub_times = array("d")  # and when each of those events was sent by the publisher
        self.last_seq = -1
        self.ooo = 0  # events that came twice or out of order


class Driver:
    """Some of the callers and subscribers (and maybe the publisher) in one selector. Closed
    websockets are opened again by a thread of its own (:meth:`opener`), so that a slow
    handshake holds up no reading."""

    def __init__(self, port: int, path: str, roles: list[tuple[str, int]], a: argparse.Namespace) -> None:
        self.port, self.path, self.a = port, path, a
        self.sel = selectors.DefaultSelector()
        self.ws = [Ws(role, i) for role, i in roles]
        self.sending = False
        self.timeout_ns = int(a.call_timeout * 1e9)
        self.outcomes: Counter[str] = Counter()
        self.ended: dict[str, tuple[str, float]] = {}  # call uuid -> (its first outcome, the client's deadline)
        self.latest_second = 0.0  # the latest second outcome, in s past the client's deadline
        self.second: Counter[str] = Counter()  # "res after expired", ...
        self.marks: list[tuple[float, str]] = []  # (when, MARKS[outcome]) of the calls that got no RES, and second outcomes
        self.late: list[tuple[float, float]] = []  # (when, how long after the client's timer) of the second outcomes
        self.sent = 0
        self.res_times = array("d")
        self.closes: list[tuple[float, str, int, str]] = []  # (when, role, index, why)
        self.open_failures: Counter[str] = Counter()
        self.reopens = 0
        self.pub_seq = 0
        self.pub_sent = 0
        self.pubs_lost = 0
        self.pub_due = 0  # PUBs --rate asked for, over the traffic
        self.pub_start = 0.0
        self.pubs: dict[str, float] = {}  # PUB uuid -> when sent
        self.pub_times = array("d")  # when each PUB was sent
        self.pub_acked = array("d")  # how long each ACKed PUB waited for its ACK
        self.pub_nacks: Counter[str] = Counter()
        self.sub_nacks: Counter[str] = Counter()
        self.pings = 0
        self.to_open: queue.SimpleQueue[Optional[Ws]] = queue.SimpleQueue()
        self.opened: queue.SimpleQueue[tuple[Ws, Any]] = queue.SimpleQueue()  # (ws, (sock, parser) or why not)
        self.stopping = threading.Event()
        self.opener_thread = threading.Thread(target=self.opener, name="faults-opener")

    # sockets

    def opener(self) -> None:
        """Handshakes, one at a time, for the websockets put in ``to_open`` (None: stop)."""
        while True:
            w = self.to_open.get()
            if w is None or self.stopping.is_set():
                return
            try:
                self.opened.put((w, c.ws_connect(self.port, self.path, self.a.handshake_timeout)))
            except (OSError, ConnectionError) as exc:
                self.opened.put((w, c.errname(exc) if isinstance(exc, OSError) else str(exc)))

    def open(self, w: Ws, got: Any) -> bool:
        """``w`` on the socket (and parser) of a handshake, or ``got`` says why there is none."""
        w.opening = False
        if isinstance(got, str):
            self.open_failures[got] += 1
            w.reopen_at = time.monotonic() + w.backoff
            w.backoff = min(REOPEN_CAP, w.backoff * 2)
            return False
        w.sock, w.parser = got
        w.out = b""
        w.opens.append(time.monotonic())
        self.sel.register(w.sock, selectors.EVENT_READ, w)
        if w.role == SUBSCRIBER:
            self.subscribe(w)
        elif w.role == CALLER:
            w.next_call = 0.0
        return True

    def write(self, w: Ws, frame: bytes) -> None:
        if w.sock is None:
            return
        waiting = bool(w.out)
        try:
            w.out = c.send_or_queue(w.sock, w.out, frame)
        except OSError as exc:
            return self.lost(w, c.errname(exc))
        if w.out and not waiting:
            self.sel.modify(w.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, w)

    def lost(self, w: Ws, why: str) -> None:
        """The server closed ``w`` (or it broke): record it, end its call, plan its reopening."""
        now = time.monotonic()
        assert w.sock is not None
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(w.sock)
        w.sock.close()
        w.sock = None
        self.closes.append((now, w.role, w.index, why))
        if w.call is not None:
            self.end_call(w, "closed with its websocket")
        w.sub_uuid = w.sub_retry_at = None
        if w.role == PUBLISHER:
            self.pubs_lost += len(self.pubs)  # no ACK or NACK can come for them now
            self.pubs.clear()
        if w.opens and now - w.opens[-1] > 5.0:
            w.backoff = REOPEN_FIRST  # it had lived a while: this is a new trouble
        w.reopen_at = now + w.backoff
        w.backoff = min(REOPEN_CAP, w.backoff * 2)

    # traffic

    def subscribe(self, w: Ws) -> None:
        w.sub_uuid = str(uuid.uuid4())
        w.sub_retry_at = None
        self.write(w, c.encode_frame(c.OP_TEXT, (SUB % (w.sub_uuid, w.index % self.a.channels)).encode()))

    def send_call(self, w: Ws, now: float) -> None:
        u = str(uuid.uuid4())
        w.call = u
        w.deadline = now + self.a.call_timeout + self.a.grace
        self.sent += 1
        self.write(w, c.encode_frame(c.OP_TEXT, (CALL % (u, self.timeout_ns)).encode()))

    def end_call(self, w: Ws, kind: str) -> None:
        assert w.call is not None
        self.outcomes[kind] += 1
        self.ended[w.call] = (kind, w.deadline)
        w.call = None
        if kind != "res":
            self.marks.append((time.monotonic(), MARKS[kind.split(" ")[0]]))

    def publish(self, w: Ws, now: float) -> None:
        """The PUBs due at ``--rate``, but never more than ``--pubs-in-flight`` unanswered: those
        over it are skipped (the report counts them), so that a server that falls behind holds
        no backlog that would make the events after a return stale."""
        due = int((now - self.pub_start) * self.a.rate)
        while self.pub_seq < due and w.sock is not None:
            if len(self.pubs) >= self.a.pubs_in_flight:
                self.pub_seq = due
                return
            u = str(uuid.uuid4())
            self.pubs[u] = now
            self.pub_times.append(now)
            self.write(w, c.encode_frame(c.OP_TEXT, (PUB % (u, self.pub_seq % self.a.channels, self.pub_seq, now)).encode()))
            self.pub_seq += 1
            self.pub_sent += 1

    def tick(self, now: float) -> None:
        while True:
            try:
                self.open(*self.opened.get_nowait())
            except queue.Empty:
                break
        for w in self.ws:
            if w.sock is None:
                if not w.opening and now >= w.reopen_at and (self.sending or w.role == SUBSCRIBER):
                    w.opening = True
                    self.reopens += 1
                    self.to_open.put(w)
                continue
            if w.role == CALLER:
                if w.call is not None and now >= w.deadline:
                    self.end_call(w, "expired")
                if w.call is None and self.sending and now >= w.next_call:
                    self.send_call(w, now)
            elif w.role == SUBSCRIBER:
                if w.sub_retry_at is not None and now >= w.sub_retry_at:
                    self.subscribe(w)
            elif self.sending:
                self.publish(w, now)

    def message(self, w: Ws, payload: bytes, now: float) -> None:
        msg = json.loads(payload)
        t = msg["meta"]["type"]
        p = msg["payload"]
        if t == T_EVNT:
            w.times.append(now)
            w.pub_times.append(p["args"]["t"])
            seq = p["args"]["seq"]
            if seq <= w.last_seq:
                w.ooo += 1
            else:
                w.last_seq = seq
            return
        ft = p.get("for_type")
        if t == T_ACK:
            if ft == T_SUB and p.get("for") == w.sub_uuid:
                w.sub_uuid = None
            elif ft == T_PUB and p.get("for") in self.pubs:
                self.pub_acked.append(now - self.pubs.pop(p["for"]))
            return
        if t == T_NACK and ft == T_SUB:
            if p.get("for") == w.sub_uuid:
                self.sub_nacks[f"{p.get('code')} {str(p.get('message')).split(':')[0]}"] += 1
                w.sub_uuid, w.sub_retry_at = None, now + SUB_RETRY
            return
        if t == T_NACK and ft == T_PUB:
            self.pubs.pop(p.get("for"), None)
            self.pub_nacks[f"{p.get('code')} {str(p.get('message')).split(':')[0]}"] += 1
            return
        if t in (T_RES, T_NACK):
            kind = "res" if t == T_RES else f"nack {p.get('code')} {str(p.get('message')).split(':')[0]}"
            if t == T_RES and isinstance(p.get("args"), dict) and "error" in p["args"]:
                kind = "error res"
            if w.call is not None and p.get("for") == w.call:
                self.end_call(w, kind)
                if t == T_RES:
                    self.res_times.append(now)
                    w.next_call = 0.0
                else:
                    w.next_call = now + self.a.nack_pause
                if self.sending and now >= w.next_call:
                    self.send_call(w, now)
            else:
                first, deadline = self.ended.get(p.get("for"), ("no call of ours", now))
                self.second[f"{kind.split(' ')[0]} after {first}"] += 1
                self.marks.append((now, "2nd"))
                self.late.append((now, now - deadline))
                self.latest_second = max(self.latest_second, now - deadline)

    def readable(self, w: Ws, now: float) -> None:
        assert w.sock is not None and w.parser is not None
        try:
            data = w.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            return self.lost(w, c.errname(exc))
        if not data:
            return self.lost(w, "EOF without a close frame")
        for opcode, payload in w.parser.feed(data):
            if opcode == c.OP_CLOSE:
                code = c.answer_close(w.sock, payload)
                return self.lost(w, f"{code} {payload[2:].decode('utf-8', 'replace')}".strip())
            if opcode == c.OP_PING:
                self.pings += 1
                self.write(w, c.encode_frame(c.OP_PONG, payload))
            elif opcode == c.OP_TEXT:
                self.message(w, payload, now)
            if w.sock is None:  # a write failed
                return

    def writable(self, w: Ws) -> None:
        assert w.sock is not None
        try:
            k = w.sock.send(w.out)
        except BlockingIOError:
            return
        except OSError as exc:
            return self.lost(w, c.errname(exc))
        w.out = w.out[k:]
        if not w.out:
            self.sel.modify(w.sock, selectors.EVENT_READ, w)

    def run(self, pipe: Any) -> None:
        """Open, report ready, then serve the parent's orders ("start", "stop", "finish")."""
        for w in self.ws:
            self.to_open.put(w)
        self.opener_thread.start()
        for _ in self.ws:
            self.open(*self.opened.get())
        pipe.send(("ready", sum(1 for w in self.ws if w.sock is not None and w.role != PUBLISHER), dict(self.open_failures)))
        self.sel.register(pipe, selectors.EVENT_READ, None)
        hard_end = time.monotonic() + 3600  # whatever the parent does
        next_tick = 0.0
        while time.monotonic() < hard_end:
            for key, mask in self.sel.select(TICK):
                w = key.data
                if w is None:
                    while pipe.poll():
                        order = pipe.recv()
                        if order[0] == "start":
                            self.sending, self.pub_start = True, time.monotonic()
                        elif order[0] == "stop":
                            self.sending = False
                            self.pub_due = int((time.monotonic() - self.pub_start) * self.a.rate)
                        elif order[0] == "finish":
                            self.sel.unregister(pipe)
                            pipe.send(("result", self.result(*order[1:])))
                            return
                    continue
                now = time.monotonic()
                if w.sock is not None and mask & selectors.EVENT_WRITE and w.out:
                    self.writable(w)
                if w.sock is not None and mask & selectors.EVENT_READ:
                    self.readable(w, now)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                self.tick(now)

    def close_all(self) -> None:
        if self.opener_thread.is_alive():
            self.stopping.set()
            self.to_open.put(None)
            self.opener_thread.join()
        while not self.opened.empty():  # opened after the end
            _, got = self.opened.get()
            if not isinstance(got, str):
                got[0].close()
        for w in self.ws:
            if w.sock is not None:
                with contextlib.suppress(OSError):
                    w.sock.send(c.close_frame(1000))
                w.sock.close()
        self.sel.close()

    # the figures, once the parent says when the faults were

    def result(self, faults: list[dict[str, Any]], t_warm: float, t_end: float) -> dict[str, Any]:
        for w in self.ws:  # calls still in flight now have been pending past the drain
            if w.call is not None:
                self.end_call(w, "still pending at the end")
        windows = [(t_warm, faults[0]["down"] if faults else t_end, t_warm)]
        for i, f in enumerate(faults):
            windows.append((f["back"], faults[i + 1]["down"] if i + 1 < len(faults) else t_end, f["down"]))
        out: dict[str, Any] = {"windows": []}
        subs = [w for w in self.ws if w.role == SUBSCRIBER]
        for start, end, down in windows:
            k = bisect.bisect_left(self.res_times, start)
            first_res = self.res_times[k] - start if k < len(self.res_times) and self.res_times[k] < end else None
            # Per subscriber, the events published in the window (an event published before the
            # fault that comes after the return proves nothing): (how many, when the first came
            # after the return, on a connection opened before the fault).
            per_sub = []
            for w in subs:
                lo, hi = bisect.bisect_left(w.pub_times, start), bisect.bisect_left(w.pub_times, end)
                if hi > lo:
                    first = w.times[lo]
                    opened = w.opens[bisect.bisect_right(w.opens, first) - 1]
                    per_sub.append((hi - lo, first - start, opened <= down))
                else:
                    per_sub.append((0, None, False))
            published = bisect.bisect_left(self.pub_times, end) - bisect.bisect_left(self.pub_times, start)
            out["windows"].append({"first_res": first_res, "subs": per_sub, "published": published})
        out.update(
            sent=self.sent,
            outcomes=dict(self.outcomes),
            second=dict(self.second),
            closes=self.closes,
            marks=self.marks,
            late=self.late,
            reopens=self.reopens,
            open_failures=dict(self.open_failures),
            pub_acks=len(self.pub_acked),
            pub_ack_waits=sorted(self.pub_acked),
            pub_sent=self.pub_sent,
            pub_due=self.pub_due,
            pub_unanswered=len(self.pubs) + self.pubs_lost,
            latest_second=self.latest_second,
            pub_nacks=dict(self.pub_nacks),
            sub_nacks=dict(self.sub_nacks),
            ooo=sum(w.ooo for w in subs),
            events=sum(len(w.times) for w in subs),
            pings=self.pings,
            cpu=resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime,
        )
        return out


def driver_process(port: int, path: str, roles: list[tuple[str, int]], a: argparse.Namespace, pipe: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    d = Driver(port, path, roles, a)
    try:
        d.run(pipe)
    except (BrokenPipeError, EOFError):
        pass
    finally:
        d.close_all()
        pipe.close()


# -- the processes of one tree: redis, server, callees ------------------------------------------


class Stack:
    def __init__(self, tree: str, a: argparse.Namespace, logdir: str) -> None:
        self.tree, self.logdir = tree, logdir
        self.callees: list[c.Proc] = []
        self.server: Optional[c.Proc] = None
        self.redis, self.redis_url, self.redis_port = c.start_redis(logdir)
        try:
            self.port = c.free_port()
            values = {"python": sys.executable, "redis": self.redis_url, "port": self.port,
                      "max_connections": a.websockets + 200}  # fmt: skip
            env = c.tree_env(tree)
            argv, self.notes = c.build_cmd(SERVER_CMD, values, c.juggler_flags(sys.executable, tree, "server"), OPTIONAL_FLAGS)
            self.server = c.Proc("server", argv, logdir, env=env, cwd=tree)
            m = self.server.wait_for(r"websocket: wss?://[^/\s]+(/\S*)", 30, port=self.port)
            self.path = m.group(1) if m else "/ws"
            argv, dropped = c.build_cmd(CALLEE_CMD, values, c.juggler_flags(sys.executable, tree, "callee"), OPTIONAL_FLAGS)
            self.notes += dropped
            self.callees = [c.Proc(f"callee{i}", argv, logdir, env=env, cwd=tree) for i in range(a.callees)]
            for p in self.callees:
                p.wait_for(r"callee: serving", 30)
        except BaseException:
            self.stop()
            raise

    def pids(self) -> dict[str, int]:
        assert self.server is not None
        return {"server": self.server.pid, **{p.name: p.pid for p in self.callees}}

    def alive(self) -> dict[str, bool]:
        return {name: p.popen.poll() is None for name, p in (("server", self.server), *((p.name, p) for p in self.callees)) if p}

    def kill_redis(self) -> None:
        self.redis.popen.kill()
        self.redis.popen.wait()
        self.redis.stop()

    def start_redis(self) -> None:
        """Redis again on its port (its argv is the same); returns once it accepts."""
        self.redis = c.Proc("redis", self.redis.argv, self.logdir)
        deadline = time.monotonic() + 30
        while not c.port_open(self.redis_port):
            if self.redis.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis did not come back on port {self.redis_port}:\n{self.redis.tail()}")
            time.sleep(0.002)  # polling the port: the first accepted connect is the return

    def stop(self) -> None:
        for p in self.callees:
            p.stop()
        if self.server is not None:
            self.server.stop(30)
        self.redis.stop()


def redis_client_kinds(port: int) -> dict[str, int]:
    """``CLIENT LIST`` of redis as "cmd" -> clients, without our own connection."""
    import redis

    r = redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=5)
    try:
        me = r.client_id()
        return dict(Counter(cl.get("cmd", "?") for cl in r.client_list() if int(cl["id"]) != me))
    except redis.RedisError:
        return {}
    finally:
        r.close()


def redis_sockets(pid: int, redis_port: int) -> tuple[int, int, int]:
    """(fds, established TCP connections to redis, other ones) of process ``pid``, from
    /proc/PID/fd and /proc/PID/net/tcp. A connection to a redis that is gone lingers (in
    CLOSE_WAIT) until its owner closes it: a leak if it is still there at the end."""
    inodes = set()
    fds = os.listdir(f"/proc/{pid}/fd")
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    up = other = 0
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[9] in inodes and int(parts[2].rsplit(":", 1)[1], 16) == redis_port:
                up += parts[3] == "01"  # TCP_ESTABLISHED
                other += parts[3] != "01"
    return len(fds), up, other


#: What each reading is held to at the end (idle, once the websockets are closed): threads and
#: the fds other than redis connections, to the idle baseline; a process' redis connections (a
#: pool keeps what the load made it open; dead ones, whose redis is gone, included) and redis'
#: clients, to what they were under load before the first fault. (A connection a pool holds idle
#: when redis goes stays dead until its next use: shown, not held to anything.)
BASELINE = {"threads": "idle before", "fds": None, "other fds": "idle before", "redis conns": "loaded before",
            "dead redis conns": None, "redis clients": "loaded before"}  # fmt: skip


def readings(stack: Stack) -> dict[str, Any]:
    """Per process (the server, each callee): threads (/proc/PID/task), fds (/proc/PID/fd), of
    them the redis connections (and of those, the dead ones) and the others; redis' connected
    clients (ours left out)."""
    out: dict[str, Any] = {}
    for name, pid in stack.pids().items():
        try:
            threads = len(os.listdir(f"/proc/{pid}/task"))
            fds, up, dead = redis_sockets(pid, stack.redis_port)
            figures = {"threads": threads, "fds": fds, "other fds": fds - up - dead, "redis conns": up + dead, "dead redis conns": dead}
        except OSError:
            figures = dict.fromkeys(("threads", "fds", "other fds", "redis conns", "dead redis conns"))
        out.update({f"{name} {k}": v for k, v in figures.items()})
    n = c.redis_clients(stack.redis_port)
    out["redis clients"] = None if n is None else n - 1
    return out


def over_baseline(r: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """The readings in ``now`` above what :data:`BASELINE` holds them to (or missing)."""
    over: dict[str, Any] = {}
    for key, v in now.items():
        stage = next(BASELINE[k] for k in sorted(BASELINE, key=len, reverse=True) if key.endswith(k))
        base = r[stage].get(key) if stage else None
        if v is None:
            over[key] = "no reading"
        elif base is not None and v > base:
            over[key] = v - base
    return over


def steady(stack: Stack) -> dict[str, Any]:
    """Readings once two in a row, 0.2 s apart, agree (at most 5 s): the threads of a closed
    websocket take a moment to end."""
    last = readings(stack)
    for _ in range(25):
        time.sleep(0.2)
        now = readings(stack)
        if now == last:
            break
        last = now
    return last


def prime(stack: Stack, a: argparse.Namespace) -> None:
    """One websocket that SUBs and makes a call, closed: what the server makes once, on first
    use, is then in the idle baseline."""
    sock, parser = c.ws_connect(stack.port, stack.path, a.handshake_timeout)
    try:
        sock.setblocking(True)
        sock.settimeout(10)
        sock.sendall(c.encode_frame(c.OP_TEXT, (SUB % (uuid.uuid4(), 0)).encode()))
        call = str(uuid.uuid4())
        sock.sendall(c.encode_frame(c.OP_TEXT, (CALL % (call, 5_000_000_000)).encode()))
        data, done = b"", False
        while not done:
            for op, payload in parser.feed(data):
                msg = json.loads(payload) if op == c.OP_TEXT else {"meta": {}, "payload": {}}
                done = done or (msg["payload"].get("for") == call and msg["meta"].get("type") in (T_RES, T_NACK))
            data = b"" if done else sock.recv(65536)
            if not done and not data:
                raise RuntimeError("the server closed the priming websocket")
        sock.sendall(c.close_frame(1000))
    finally:
        sock.close()


def settle(stack: Stack, r: dict[str, Any], seconds: float) -> tuple[dict[str, Any], float]:
    """Readings once none is over its baseline, or after ``seconds``; and how long it took."""
    t0 = time.monotonic()
    while True:
        now = readings(stack)
        if not over_baseline(r, now) or time.monotonic() - t0 > seconds:
            return now, time.monotonic() - t0
        time.sleep(0.25)  # waiting for threads to end in another process: nothing to block on


TIMESTAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ "


def log_summary(proc: c.Proc, most: int = 4) -> dict[str, Any]:
    """How many lines a process logged, and its most frequent ones (numbers and uuids masked)."""
    lines = proc.output().splitlines()
    masked = Counter(re.sub(r"\d+", "N", re.sub(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "UUID", re.sub(TIMESTAMP, "", line)))[:160]
                     for line in lines)  # fmt: skip
    return {"lines": len(lines), "most frequent": masked.most_common(most), "log": proc.log_path}


def fault_plan(a: argparse.Namespace) -> list[str]:
    plan = ["restart"] * a.restarts
    if a.stall > 0:
        plan.insert(len(plan) // 2, "stall")
    return plan


def run_soak(tree: str, a: argparse.Namespace, logdir: str, log: Callable[..., None] = c.log) -> dict[str, Any]:
    """The whole soak against ``tree``'s server and callees: the report (see :func:`judge`)."""
    callers = a.callers if a.callers is not None else a.websockets // 5
    roles = [(CALLER, i) for i in range(callers)] + [(SUBSCRIBER, i) for i in range(a.websockets - callers)]
    k = max(1, a.load_processes)
    shares = [[(PUBLISHER, 0)] if j == 0 else [] for j in range(k)]
    for n, role in enumerate(roles):
        shares[n % k].append(role)
    stack = Stack(tree, a, logdir)
    r: dict[str, Any] = {"tree": tree, "rev": c.describe_tree(tree), "callers": callers, "subscribers": len(roles) - callers,
                         "notes": stack.notes, "faults": []}  # fmt: skip
    ctx = multiprocessing.get_context("fork")
    workers: list[tuple[Any, Any]] = []
    results: list[dict[str, Any]] = []
    try:
        prime(stack, a)
        r["idle before"] = steady(stack)
        for share in shares:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=driver_process, args=(stack.port, stack.path, share, a, child), daemon=True)
            p.start()
            child.close()
            workers.append((p, parent))
        opened, failures = 0, Counter()
        for p, pipe in workers:
            if not pipe.poll(120):
                raise RuntimeError("a load driver did not open its websockets within 120 s")
            _, n, f = pipe.recv()
            opened += n
            failures.update(f)
        r["opened"], r["open failures"] = opened, dict(failures)
        log(f"  {opened} websockets open (+ the publisher){f', failures {dict(failures)}' if failures else ''}")
        t_warm = time.monotonic()
        cpu0 = {name: c.cpu_seconds(pid) for name, pid in stack.pids().items()}
        for _, pipe in workers:
            pipe.send(("start",))
        time.sleep(a.warmup)
        r["loaded before"] = readings(stack)
        r["redis clients by command, loaded"] = redis_client_kinds(stack.redis_port)
        plan = fault_plan(a)
        gap = a.duration / (len(plan) + 1)
        t0 = time.monotonic()
        for i, kind in enumerate(plan):
            time.sleep(max(0.0, t0 + (i + 1) * gap - time.monotonic()))
            f: dict[str, Any] = {"kind": kind, "down": time.monotonic()}
            if kind == "restart":
                stack.kill_redis()
                time.sleep(a.down)
                stack.start_redis()
            else:
                os.kill(stack.redis.pid, signal.SIGSTOP)
                try:
                    time.sleep(a.stall)
                finally:
                    os.kill(stack.redis.pid, signal.SIGCONT)
            f["back"] = time.monotonic()
            r["faults"].append(f)
            log(f"  {f['down'] - t_warm:6.1f} s: redis {'killed' if kind == 'restart' else 'stopped'}, back after"
                f" {f['back'] - f['down']:.2f} s")  # fmt: skip
        time.sleep(max(0.0, t0 + a.duration - time.monotonic()))
        r["loaded after"] = readings(stack)
        r["redis clients by command, loaded after"] = redis_client_kinds(stack.redis_port)
        t_end = time.monotonic()
        r["cpu % of a core"] = {name: round(100 * (c.cpu_seconds(pid) - cpu0[name]) / (t_end - t_warm))
                                for name, pid in stack.pids().items()}  # fmt: skip
        for _, pipe in workers:
            pipe.send(("stop",))
        time.sleep(a.call_timeout + a.grace + 0.5)  # every call in flight ends by then
        for _, pipe in workers:
            pipe.send(("finish", r["faults"], t_warm, t_end))
        for _, pipe in workers:
            if not pipe.poll(60):
                raise RuntimeError("a load driver did not report within 60 s")
            results.append(pipe.recv()[1])
        for p, _ in workers:
            p.join(30)
        r["alive"] = stack.alive()
        r["idle after"], r["settle seconds"] = settle(stack, r, a.settle)
        r["redis clients by command, idle after"] = redis_client_kinds(stack.redis_port)
        r["traffic seconds"] = t_end - t_warm
    finally:
        for p, pipe in workers:
            if p.is_alive():
                p.terminate()
                p.join(5)
            pipe.close()
        stack.stop()
        r["logs"] = {p.name: log_summary(p) for p in (stack.server, *stack.callees) if p is not None}
    merge(r, results, a)
    judge(r, a)
    for f in r["faults"]:
        f["down"] -= t_warm
        f["back"] -= t_warm
    return r


def merge(r: dict[str, Any], results: list[dict[str, Any]], a: argparse.Namespace) -> None:
    """The drivers' figures as one."""
    outcomes: Counter[str] = Counter()
    second: Counter[str] = Counter()
    for key in ("pub_nacks", "sub_nacks", "open_failures"):
        r[key] = dict(sum((Counter(x[key]) for x in results), Counter()))
    for x in results:
        outcomes.update(x["outcomes"])
        second.update(x["second"])
    r["calls sent"] = sum(x["sent"] for x in results)
    r["outcomes"] = dict(outcomes.most_common())
    r["second outcomes"] = dict(second)
    r["latest second outcome"] = max(x["latest_second"] for x in results)
    waits = sorted(v for x in results for v in x.pop("pub_ack_waits"))
    r["PUB ACK wait s (p50, p99, max)"] = [round(c.percentile(waits, p), 3) for p in (50, 99, 100)]
    for key in ("reopens", "pub_due", "pub_sent", "pub_acks", "pub_unanswered", "ooo", "events", "pings"):
        r[key] = sum(x[key] for x in results)
    r["driver cpu seconds"] = [round(x["cpu"], 1) for x in results]
    closes = sorted(cl for x in results for cl in x["closes"])
    marks = [m for x in results for m in x["marks"]]
    late = [m for x in results for m in x["late"]]
    r["closes"] = dict(Counter(f"{role}: {why}" for _, role, _, why in closes).most_common())
    r["closed websockets"] = sum(1 for _, role, _, _ in closes if role != PUBLISHER)
    r["distinct websockets closed"] = len({(role, i) for _, role, i, _ in closes if role != PUBLISHER})
    r["publisher closed"] = sum(1 for _, role, _, _ in closes if role == PUBLISHER)
    faults = r["faults"]
    bounds = [f["down"] for f in faults] + [float("inf")]
    windows = []
    for i in range(len(faults) + 1):
        subs = [s for x in results for s in x["windows"][i]["subs"]]
        firsts = [x["windows"][i]["first_res"] for x in results if x["windows"][i]["first_res"] is not None]
        with_events = [s for s in subs if s[0]]
        lo = bounds[i - 1] if i else float("-inf")
        windows.append({
            "first_res": min(firsts) if firsts else None,
            "published": sum(x["windows"][i]["published"] for x in results),
            "subs with events": len(with_events),
            "kept open with events": sum(1 for s in with_events if s[2]),
            "fewest events": min((s[0] for s in subs), default=0),
            "median events": statistics.median([s[0] for s in subs]) if subs else 0,
            "longest wait for an event": max((s[1] for s in with_events), default=None),
            "closed": sum(1 for t, role, _, _ in closes if lo <= t < bounds[i] and role != PUBLISHER),
            "calls": dict(Counter(kind for t, kind in marks if lo <= t < bounds[i])),
            "latest second outcome": max((s for t, s in late if lo <= t < bounds[i]), default=None),
        })  # fmt: skip
    r["before faults"] = windows[0]
    for f, w in zip(faults, windows[1:]):
        f.update(w)


def judge(r: dict[str, Any], a: argparse.Namespace) -> None:
    """The gates: ``r["checks"]`` (name -> (figure, passed)) and ``r["ok"]``."""
    faults = r["faults"]
    bad_calls = sum(v for k, v in r["outcomes"].items() if k in ("closed with its websocket", "still pending at the end"))
    bad_calls += sum(r["second outcomes"].values())
    firsts = [f["first_res"] for f in faults]
    longest = None if None in firsts else max(firsts, default=0.0)
    missing = sum(r["subscribers"] - f["kept open with events"] for f in faults)
    over = r["over baseline"] = over_baseline(r, r["idle after"])
    dead = [name for name, up in r["alive"].items() if not up]
    r["checks"] = {
        "websockets closed by the server": (r["closed websockets"] + r["publisher closed"], r["closed websockets"] + r["publisher closed"] == 0),
        "calls without exactly one outcome": (bad_calls, bad_calls == 0),
        f"longest return -> first RES (s, at most {a.max_first_res:g})": (longest, longest is not None and longest <= a.max_first_res),
        "kept-open subscribers with no event after a return": (missing, missing == 0),
        "threads/fds/redis clients over their baseline at the end": (sum(v if isinstance(v, int) else 1 for v in over.values()), not over),
        "processes that died": (len(dead), not dead),
    }  # fmt: skip
    r["ok"] = all(ok for _, ok in r["checks"].values())


# -- report -------------------------------------------------------------------------------------


def _s(v: Optional[float], fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def format_report(r: dict[str, Any], a: argparse.Namespace) -> str:
    lines = [f"{r['rev']}  ({r['tree']})" + (f"  (this tree lacks: {', '.join(r['notes'])})" if r["notes"] else ""),
             f"{r['opened']} of {a.websockets} websockets opened ({r['callers']} calling, {r['subscribers']} subscribed"
             f" to {a.channels} channels) + 1 publisher; {r['traffic seconds']:.0f} s of traffic", "",
             f"{'fault':<12}{'at s':>7}{'back after':>11}{'closed':>8}{'1st RES s':>10}{'PUBs sent':>10}"
             f"{'subs w/ events: kept + reopened':>33}{'fewest':>7}{'median':>7}{'longest wait s':>15}"
             "  calls without a RES (and second outcomes)"]  # fmt: skip
    rows = [("before", None, r["before faults"])] + [(f"{i + 1} {f['kind']}", f, f) for i, f in enumerate(r["faults"])]
    for name, f, w in rows:
        subs = f"{w['kept open with events']} + {w['subs with events'] - w['kept open with events']} of {r['subscribers']}"
        lines.append(f"{name:<12}{_s(f and f['down'], '.1f'):>7}{_s(f and f['back'] - f['down']):>11}{w['closed']:>8}"
                     f"{_s(w['first_res'], '.3f'):>10}{w['published']:>10}{subs:>33}{w['fewest events']:>7}"
                     f"{w['median events']:>7g}{_s(w['longest wait for an event'], '.3f'):>15}  "
                     + (" ".join(f"{k} {v}" for k, v in sorted(w["calls"].items())) or "-")
                     + (f" (the latest {w['latest second outcome']:.2f} s after the client's timer)"
                        if w["latest second outcome"] is not None else ""))  # fmt: skip
    if a.call_timeout + a.grace >= min(a.down, a.stall or a.down):
        lines.append(f"(an outage is no longer than a call's timeout + grace, {a.call_timeout + a.grace:g} s: the time to the"
                     " first RES includes the callers' wait for their lost calls to expire)")  # fmt: skip
    lines += ["", f"calls: {r['calls sent']} sent; " + ", ".join(f"{k} {v}" for k, v in r["outcomes"].items())]
    if r["second outcomes"]:
        lines.append("  second outcomes: " + ", ".join(f"{k} {v}" for k, v in r["second outcomes"].items())
                     + f"; the latest {r['latest second outcome']:.2f} s after the client's timer")
    lines.append(f"events: {r['events']} delivered, {r['ooo']} twice or out of order; PUBs sent {r['pub_sent']} of {r['pub_due']} due"
                 f" (the others skipped: {a.pubs_in_flight} unanswered, or no publisher), ACKed {r['pub_acks']}"
                 + f" (waited p50/p99/max {'/'.join(map(str, r['PUB ACK wait s (p50, p99, max)']))} s)"
                 + (f", unanswered at the end {r['pub_unanswered']}" if r["pub_unanswered"] else "")
                 + (f", NACKed {r['pub_nacks']}" if r["pub_nacks"] else "") + (f"; SUB NACKs {r['sub_nacks']}" if r["sub_nacks"] else ""))  # fmt: skip
    if r["closes"]:
        lines.append(f"closed by the server: {r['closed websockets']} times, {r['distinct websockets closed']} distinct websockets"
                     f" of {r['opened']}, the publisher {r['publisher closed']} times: "
                     + "; ".join(f"{v} x {k}" for k, v in r["closes"].items()))  # fmt: skip
        lines.append(f"  reopened by the drivers: {r['reopens']} times" + (f" (failed: {r['open_failures']})" if r["open_failures"] else ""))
    lines.append(f"CPU over the traffic (% of a core): {r['cpu % of a core']}; the drivers' CPU s: {r['driver cpu seconds']};"
                 f" server pings answered {r['pings']}")  # fmt: skip
    stages = ("idle before", "loaded before", "loaded after", "idle after")
    lines += ["", f"{'reading':<28}" + "".join(f"{s:>15}" for s in stages) + "  at the end, at most"]
    for key in r["idle before"]:
        stage = next(BASELINE[k] for k in sorted(BASELINE, key=len, reverse=True) if key.endswith(k))
        lines.append(f"{key:<28}" + "".join(f"{_s(r[s].get(key), 'd'):>15}" for s in stages) + f"  {stage or '(shown)'}")
    lines.append(f"(idle after: settled in {r['settle seconds']:.1f} s)  redis clients by command: loaded"
                 f" {r['redis clients by command, loaded']}, loaded after {r['redis clients by command, loaded after']},"
                 f" idle after {r['redis clients by command, idle after']}")  # fmt: skip
    for name, s in r.get("logs", {}).items():
        lines.append(f"{name} log: {s['lines']} lines" + (f" ({s['log']})" if a.logdir else "") + "".join(f"\n    {n} x {line}" for n, line in s["most frequent"]))
    lines += ["", "gates:"]
    for name, (figure, ok) in r["checks"].items():
        lines.append(f"  {name:<58}{_s(figure, '.3f') if isinstance(figure, float) else _s(figure, 'd'):>8}  {'ok' if ok else 'FAIL'}")
    if r["over baseline"]:
        lines.append(f"  over their baseline: {r['over baseline']}")
    return "\n".join(lines)


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--websockets", type=int, default=1000, help="websockets that call or subscribe (default 1000)")
    ap.add_argument("--callers", type=int, help="of them, how many call (default a fifth)")
    ap.add_argument("--channels", type=int, default=10, help="channels the others subscribe to, one each (default 10)")
    ap.add_argument("--rate", type=float, default=200.0, help="events published per second, over all channels (default 200)")
    ap.add_argument("--pubs-in-flight", type=int, help="PUBs unanswered at once, at the most (default: a second's worth of --rate)")
    ap.add_argument("--callees", type=int, default=2, help="callee processes (default 2)")
    ap.add_argument("--restarts", type=int, default=5, help="times redis is killed and started again (default 5)")
    ap.add_argument("--down", type=float, default=1.0, help="seconds redis stays down at each restart (default 1)")
    ap.add_argument("--stall", type=float, default=3.0, help="seconds of the one SIGSTOP of redis (default 3; 0: none)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds over which the faults are spread (default 60)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of traffic before the first reading (default 5)")
    ap.add_argument("--call-timeout", type=float, default=0.5, help="each CALL's timeout in seconds (default 0.5)")
    ap.add_argument("--grace", type=float, default=0.25, help="a call expires at the client this long after its timeout (default 0.25)")
    ap.add_argument("--nack-pause", type=float, default=0.05, help="a caller's pause after a NACK (default 0.05 s)")
    ap.add_argument("--max-first-res", type=float, default=1.0, help="the gate on return -> first RES (default 1 s)")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds for the processes to get back to baseline (default 20)")
    ap.add_argument("--handshake-timeout", type=float, default=5.0, help="seconds for a websocket's handshake (default 5)")
    ap.add_argument("--load-processes", type=int, default=2, help="load driver processes (default 2)")
    ap.add_argument("--against", metavar="REV", help="also run the soak on this git revision, after the current tree")
    ap.add_argument("--logdir", help="keep the processes' logs there (default: a temporary directory, removed)")
    ap.add_argument("--json", action="store_true", help="print the reports as JSON")
    a = ap.parse_args(argv)
    if a.websockets < 2 or a.channels < 1 or a.rate <= 0 or a.restarts < 0 or a.callees < 1 or a.load_processes < 1:
        ap.error("--websockets at least 2; --channels, --callees, --load-processes at least 1; --rate above 0")
    if a.callers is not None and not 0 < a.callers < a.websockets:
        ap.error("--callers must be between 0 and --websockets, both excluded")
    if a.pubs_in_flight is None:
        a.pubs_in_flight = max(1, int(a.rate))
    if not fault_plan(a):
        ap.error("no faults: give --restarts or --stall")
    return a


def main(argv: Optional[list[str]] = None) -> int:
    a = parse(argv)
    c.sigterm_as_interrupt()
    c.raise_nofile()
    reports = []
    try:
        with contextlib.ExitStack() as cleanup:
            logdir = a.logdir or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="juggler-faults-"))
            trees = [("A", c.REPO)]
            if a.against:
                wt, _ = cleanup.enter_context(c.worktree(a.against))
                trees.append(("B", wt))
            for label, tree in trees:
                c.log(f"{label}: soak of {tree}")
                reports.append(run_soak(tree, a, logdir))
                if not a.json:
                    print(f"{label}: " + format_report(reports[-1], a) + "\n", flush=True)
    except KeyboardInterrupt:
        c.log("interrupted: everything started was stopped")
        return 130
    if a.json:
        print(json.dumps({"args": vars(a), "reports": reports}, indent=1, default=str))
    return 0 if reports[0]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
