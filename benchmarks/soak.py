"""Soak test: N calls over M connections while redis restarts and callee processes are killed
(``kill -9``) at random moments, with SUB/PUB traffic alongside.

It starts its own redis-server on a free port, one ``juggler server`` process and
``--callees`` ``juggler callee --demo`` processes, then drives traffic from this process with
the blocking :class:`juggler.Client`:

- ``--connections`` M connections share ``--calls`` N calls (``test.echo``, and some
  ``test.delay``), each with up to ``--in-flight`` calls at once and a timeout drawn between
  ``--min-timeout`` and ``--max-timeout``; a connection that is closed (a redis restart
  closes the ones whose results listener it broke) is replaced by a new one;
- ``--publishers`` connections each PUB numbered events on a channel of their own, and
  ``--subscribers`` connections each subscribe to every one of those channels (and come back
  after a close);
- meanwhile redis is killed and started again on the same port every ``--redis-every``
  seconds (give or take half of it), down for ``--redis-down`` seconds, and a callee process
  is killed with SIGKILL every ``--kill-every`` seconds (a new one replaces it).

Once every call has ended, it stops the traffic, the server and the callees, and checks:

- every call ended exactly once at its client: a result (the right one), a NACK, expired or
  closed; no call is left pending, none ended twice, and no call got two results (a result
  stored twice, e.g. by a retried store);
- no subscriber got an event twice, or an event of one publisher out of order;
- redis holds no ``juggler:*`` key once the longest timeout has passed.

It prints the counts, and exits with status 1 if a check fails (a short run is part of the
test suite: ``tests/test_soak.py``). Usage::

    python benchmarks/soak.py                                  # 20,000 calls over 20 connections
    python benchmarks/soak.py --calls 100000 --connections 32 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import redis  # noqa: E402

from _common import REPO, Proc, start_redis, tree_env  # noqa: E402
from juggler import CallExpired, Client, ConnectionClosed, JugglerError, NackError, RemoteError  # noqa: E402
from juggler.message import Evnt, Res  # noqa: E402


class Soak:
    def __init__(self, args: argparse.Namespace, log: Any = print) -> None:
        self.args = args
        self.log = log
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.stop = threading.Event()  # stop the pub-sub traffic and the faults
        # The processes the faults thread starts die with it (PR_SET_PDEATHSIG is per
        # thread): it lives on, idle, until the run is over.
        self.finished = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.issued = 0
        self.ended_twice = 0
        self.calls: list[Future] = []
        self.res_per_call: Counter[str] = Counter()
        self.published: Counter[str] = Counter()  # channel -> events ACKed
        self.pub_outcomes: Counter[str] = Counter()
        self.events_received = 0
        self.event_duplicates = 0
        self.event_out_of_order = 0
        self.events_dropped = 0
        self.reconnects = 0
        self.faults: Counter[str] = Counter()
        self.threads: list[threading.Thread] = []
        self.redis: Optional[Proc] = None
        self.callees: list[Proc] = []
        self.next_callee_start = 0.0
        self.server: Optional[Proc] = None
        self.url = ""

    # -- processes --

    def start_processes(self) -> None:
        a = self.args
        self.redis, self.redis_url, self.redis_port = start_redis(a.logdir)
        if a.resp3:  # redis-py's own path for the per-call commands, not juggler.resp's
            self.redis_url += "?protocol=3"
        env = tree_env(REPO)
        self.server = Proc("server", [sys.executable, "-m", "juggler", "server", "--redis", self.redis_url, "--port", "0",
                                      "--log-level", "warning"], a.logdir, env=env)  # fmt: skip
        m = self.server.wait_for(r"websocket: (ws://\S+)", 30)
        assert m is not None
        self.url = m.group(1)
        for _ in range(a.callees):
            self.start_callee()

    def start_callee(self) -> None:
        a = self.args
        proc = Proc("callee", [sys.executable, "-m", "juggler", "callee", "--redis", self.redis_url, "--demo",
                               "--workers", str(a.workers), "--grace", "0", "--log-level", "error"], a.logdir,
                    env=tree_env(REPO))  # fmt: skip
        with self.lock:
            self.callees.append(proc)

    def restart_redis(self) -> None:
        assert self.redis is not None
        argv = self.redis.argv
        self.redis.popen.kill()
        self.redis.popen.wait()
        self.redis.stop()
        self.faults["redis restarts"] += 1
        self.stop.wait(self.args.redis_down)
        self.redis = Proc("redis", argv, self.args.logdir)
        self.redis.wait_for(r"Ready to accept connections", 30)

    def kill_callee(self) -> None:
        """kill -9 a callee; :meth:`keep_callees` starts another."""
        with self.lock:
            alive = [p for p in self.callees if p.popen.poll() is None]
        if alive:
            victim = self.rng.choice(alive)
            os.kill(victim.pid, signal.SIGKILL)
            victim.popen.wait()
            self.faults["callees killed"] += 1
        self.keep_callees()

    def keep_callees(self) -> None:
        """Replace the callees that are gone: killed, or exited (one cannot start while redis
        is down), at most one start every half second, so an outage is no storm of them."""
        with self.lock:
            dead = [p for p in self.callees if p.popen.poll() is not None]
            self.callees = [p for p in self.callees if p.popen.poll() is None]
            missing = self.args.callees - len(self.callees)
        for p in dead:
            p.stop()
        if missing > 0 and time.monotonic() >= self.next_callee_start:
            self.next_callee_start = time.monotonic() + 0.5
            self.start_callee()

    def stop_processes(self) -> None:
        for p in self.callees:
            p.stop()
        if self.server is not None:
            self.server.stop(30)
            if self.server.popen.returncode not in (0, None):
                self.faults["server exit status"] = self.server.popen.returncode

    # -- traffic --

    def connect(self) -> Client:
        """A new connection (retried, paced, while the server cannot be reached) that also
        counts the RES it gets for each call."""
        while True:
            try:
                client = Client.connect(self.url, connect_timeout=10)
                break
            except (OSError, JugglerError):
                time.sleep(0.05)
        dispatch = client._dispatch

        def counting(msg: Any) -> None:  # (no call is made before it is in place)
            if isinstance(msg, Res):
                self.count_res(msg.for_uuid)
            dispatch(msg)

        client._dispatch = counting  # type: ignore[method-assign]
        return client

    def count_res(self, for_uuid: str) -> None:
        with self.lock:
            self.res_per_call[for_uuid] += 1

    def take_call(self) -> Optional[int]:
        with self.lock:
            if self.issued >= self.args.calls:
                return None
            self.issued += 1
            return self.issued

    def call_worker(self, index: int) -> None:
        a = self.args
        rng = random.Random(a.seed * 1000 + index)
        room = threading.Semaphore(a.in_flight)
        nacked = threading.Event()  # a call got NACK 500: redis is down
        client = self.connect()
        try:
            while True:
                room.acquire()
                if nacked.is_set():
                    time.sleep(0.02)  # do not burn the budget in NACKs while redis is down
                    nacked.clear()
                if client.closed:
                    client.close()
                    client = self.connect()
                    with self.lock:
                        self.reconnects += 1
                seq = self.take_call()
                if seq is None:
                    room.release()
                    break
                timeout = rng.uniform(a.min_timeout, a.max_timeout)
                if rng.random() < 0.1:
                    uri, args, expected = "test.delay", rng.randrange(0, 50), None
                else:
                    uri, args = "test.echo", [index, seq, "x" * rng.randrange(0, 200)]
                    expected = args
                fut = client.call_async(uri, args, timeout=timeout)
                ended = [0]
                fut.add_done_callback(lambda f, e=expected, u=uri, n=ended: self.ended(f, u, e, n, room, nacked))
                with self.lock:
                    self.calls.append(fut)
            for _ in range(a.in_flight):  # every call of this connection has ended
                room.acquire()
        finally:
            client.close()

    def ended(self, fut: Future, uri: str, expected: Any, ended: list[int], room: threading.Semaphore,
              nacked: threading.Event) -> None:  # fmt: skip
        """A call's future completed (on a thread of its client: must not block)."""
        ended[0] += 1
        exc = fut.exception()
        if exc is None:
            ok = fut.result() == expected if uri == "test.echo" else isinstance(fut.result(), int)
            kind = "result" if ok else "wrong result"
        elif isinstance(exc, NackError):
            kind = f"nack {exc.code}"
        elif isinstance(exc, CallExpired):
            kind = "expired"
        elif isinstance(exc, ConnectionClosed):
            kind = "closed"
        elif isinstance(exc, RemoteError):
            kind = "remote error"
        else:
            kind = f"other: {type(exc).__name__}"
        with self.lock:
            self.outcomes[kind] += 1
            if ended[0] > 1:
                self.ended_twice += 1
        if kind == "nack 500":
            nacked.set()
        room.release()

    def publisher(self, index: int) -> None:
        channel = f"soak.events.{index}"
        seq = 0
        client = self.connect()
        try:
            while not self.stop.is_set():
                if client.closed:
                    client.close()
                    client = self.connect()
                seq += 1
                try:
                    client.pub(channel, {"publisher": index, "seq": seq})
                    kind = "ack"
                    with self.lock:
                        self.published[channel] += 1
                except NackError as exc:
                    kind = f"nack {exc.code}"
                except JugglerError as exc:
                    kind = type(exc).__name__
                with self.lock:
                    self.pub_outcomes[kind] += 1
                self.stop.wait(1 / self.args.pub_rate)
        finally:
            client.close()

    def subscriber(self, index: int) -> None:
        seen: set[tuple[int, int]] = set()
        last: dict[int, int] = {}
        channels = [f"soak.events.{i}" for i in range(self.args.publishers)]
        while not self.stop.is_set():
            client = self.connect()
            subs = []
            try:
                for ch in channels:
                    subs.append(client.sub(ch))
                while not self.stop.is_set() and not client.closed:
                    for sub in subs:
                        try:
                            ev = sub.get(0.05)
                        except TimeoutError:
                            continue
                        if ev is None:
                            break
                        self.event(ev, seen, last)
            except JugglerError:
                pass
            finally:
                client.close()
                with self.lock:
                    self.events_dropped += sum(s.dropped for s in subs)

    def event(self, ev: Evnt, seen: set[tuple[int, int]], last: dict[int, int]) -> None:
        key = (ev.args["publisher"], ev.args["seq"])
        with self.lock:
            self.events_received += 1
            if key in seen:
                self.event_duplicates += 1
            elif key[1] < last.get(key[0], 0):
                self.event_out_of_order += 1
            seen.add(key)
            last[key[0]] = max(last.get(key[0], 0), key[1])

    def faults_loop(self) -> None:
        a = self.args
        now = time.monotonic()
        next_redis = now + a.redis_every * self.rng.uniform(0.5, 1.5) if a.redis_every else float("inf")
        next_kill = now + a.kill_every * self.rng.uniform(0.5, 1.5) if a.kill_every else float("inf")
        while not self.stop.wait(0.05):
            now = time.monotonic()
            if now >= next_redis:
                self.restart_redis()
                next_redis = time.monotonic() + a.redis_every * self.rng.uniform(0.5, 1.5)
            if now >= next_kill:
                self.kill_callee()
                next_kill = time.monotonic() + a.kill_every * self.rng.uniform(0.5, 1.5)
            self.keep_callees()
        self.finished.wait()

    def spawn(self, target: Any, *args: Any, name: str) -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self.threads.append(t)
        return t

    # -- the run --

    def run(self) -> dict[str, Any]:
        a = self.args
        started = time.monotonic()
        self.start_processes()
        try:
            self.spawn(self.faults_loop, name="soak-faults")
            side = [self.spawn(self.subscriber, i, name=f"soak-sub-{i}") for i in range(a.subscribers)]
            side += [self.spawn(self.publisher, i, name=f"soak-pub-{i}") for i in range(a.publishers)]
            workers = [self.spawn(self.call_worker, i, name=f"soak-calls-{i}") for i in range(a.connections)]
            last_report = time.monotonic()
            for t in workers:
                while t.is_alive():
                    t.join(1.0)
                    if time.monotonic() - last_report >= a.progress:
                        last_report = time.monotonic()
                        with self.lock:
                            done = sum(self.outcomes.values())
                            outcomes = dict(sorted(self.outcomes.items()))
                        self.log(f"  {time.monotonic() - started:6.1f} s  {done} of {a.calls} calls ended "
                                 f"{outcomes}, {dict(self.faults)}")  # fmt: skip
            traffic_s = time.monotonic() - started
            self.stop.set()
            for t in side:
                t.join(30)
            pending = [f for f in self.calls if not f.done()]
            self.stop_processes()
            leftover = self.leftover_keys()
        finally:
            self.stop.set()
            self.stop_processes()
            if self.redis is not None:
                self.redis.stop()
            self.finished.set()
            for t in self.threads:
                t.join(30)
        res_twice = sum(1 for n in self.res_per_call.values() if n > 1)
        ended = sum(self.outcomes.values())
        checks = {
            "every call ended": ended == a.calls and not pending,
            "no call ended twice": self.ended_twice == 0,
            "no call got two results": res_twice == 0,
            "no wrong result": self.outcomes["wrong result"] == 0 and not any(k.startswith("other") for k in self.outcomes),
            "no event twice": self.event_duplicates == 0,
            "no event out of order": self.event_out_of_order == 0,
            "no juggler key left in redis": not leftover,
            "the server exited cleanly": "server exit status" not in self.faults,
        }
        return {
            "calls": a.calls,
            "connections": a.connections,
            "seconds": round(traffic_s, 1),
            "outcomes": dict(sorted(self.outcomes.items())),
            "pending": len(pending),
            "ended twice": self.ended_twice,
            "calls with two results": res_twice,
            "reconnects": self.reconnects,
            "events published (acked)": sum(self.published.values()),
            "pub outcomes": dict(sorted(self.pub_outcomes.items())),
            "events received": self.events_received,
            "event duplicates": self.event_duplicates,
            "events out of order": self.event_out_of_order,
            "events dropped by full subscription queues": self.events_dropped,
            "faults": dict(self.faults),
            "juggler keys left": leftover,
            "checks": checks,
            "ok": all(checks.values()),
        }

    def leftover_keys(self) -> dict[str, int]:
        """The juggler keys still in redis once the longest timeout has passed (and their
        TTL in ms)."""
        r = redis.Redis(port=self.redis_port, socket_timeout=5, socket_connect_timeout=5)
        try:
            deadline = time.monotonic() + self.args.max_timeout + 5
            while True:
                keys = r.keys("juggler:*")
                if not keys or time.monotonic() > deadline:
                    return {k.decode(): r.pttl(k) for k in keys}
                time.sleep(0.1)  # waiting for TTLs to pass: there is nothing to wait on
        finally:
            r.close()


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20000, help="calls in all (N)")
    p.add_argument("--connections", type=int, default=20, help="connections making calls (M)")
    p.add_argument("--in-flight", type=int, default=8, help="calls in flight per connection")
    p.add_argument("--min-timeout", type=float, default=0.5, help="shortest call timeout (s)")
    p.add_argument("--max-timeout", type=float, default=2.0, help="longest call timeout (s)")
    p.add_argument("--publishers", type=int, default=2, help="publishing connections, one channel each")
    p.add_argument("--subscribers", type=int, default=4, help="connections subscribed to every channel")
    p.add_argument("--pub-rate", type=float, default=50.0, help="events per second per publisher")
    p.add_argument("--callees", type=int, default=2, help="callee processes")
    p.add_argument("--workers", type=int, default=8, help="workers per callee process")
    p.add_argument("--redis-every", type=float, default=8.0, help="restart redis about this often (s; 0: never)")
    p.add_argument("--redis-down", type=float, default=0.3, help="how long redis stays down (s)")
    p.add_argument("--kill-every", type=float, default=3.0, help="kill -9 a callee about this often (s; 0: never)")
    p.add_argument("--resp3", action="store_true", help="the server and callees speak RESP3 to redis (redis-py's "
                   "path for every command, instead of juggler.resp)")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--progress", type=float, default=10.0, help="print progress this often (s)")
    p.add_argument("--logdir", default="/tmp", help="where the processes' logs go")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    report = Soak(args).run()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"    {k:<40} {v}")
            else:
                print(f"{key:<44} {value}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
