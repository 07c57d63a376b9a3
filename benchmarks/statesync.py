"""State sync at scale: our juggler.statesync server against hat-juggler's own, same clients.

Each measurement starts one server process (``--role server``): ours (``juggler.statesync``
of a tree, on threads) or hat-juggler's (``hat.juggler.listen``, on asyncio), with the same
application around it, and drives it with hat-juggler's Python clients (``hat.juggler.connect``)
spread over ``--drivers`` processes of their own (``--role driver``), so the clients are the
same code whichever server they talk to. Server CPU comes from /proc/PID/stat of the server
process only; the machine has other load (drivers, other people's tests): read ratios from one
run, and repeat with ``--runs``.

Scenarios (``--scenario``, comma-separated, default all):

fanout
    ``--clients`` (500) clients, a state of ``--state-kb`` (10) KB that the application changes
    ``--rate`` (50) times a second for ``--duration`` (10) s: each change builds a new state
    sharing the unchanged parts with the old one (one item changed, a sequence number and the
    time of the change) and hands it to every connection (``conn.set_local_data(state)``).
    Reports the changes made (the application's loop is paced, not skipped: a loop held back
    makes fewer), whether every client converged to the final state (a hash of it), server CPU
    per change x client, and the change-to-client latency: for each change and each client,
    the time from the change until the client had it (in its own DATA, or coalesced into a
    later one). Also the age of each state a client saw when it saw it, the DATA messages the
    clients got, the patches our server made (one per distinct pair of states: shared by
    connections at the same state, one each for connections that flow control held at their
    own), and the CPU the client processes used (% of one core): when they cannot keep up, the
    latency is theirs, not the server's. ``--flow-timeout 0`` turns our flow control off.
big
    The same with a 1 MB state (``--big-kb``), ``--big-clients`` (50) clients and one change a
    second: server CPU per change.
idle
    ``--idle`` (1000) connections and nothing else: the server's RSS per connection, threads,
    and its CPU over ``--hold`` (5) s.
c2s
    ``--c2s-clients`` (100) clients each setting their own local data ``--c2s-rate`` (10) times
    a second (autoflush 0: one DATA each) for ``--duration`` s: server CPU per patch received.

``--against REV`` adds our server from a git revision (a temporary worktree) as "before".
Measurements alternate: ours, before, hat, then hat, before, ours, ... (``--runs`` rounds).

Usage::

    python benchmarks/statesync.py
    python benchmarks/statesync.py --scenario fanout --clients 500 --against main --runs 2
    python benchmarks/statesync.py --scenario big,idle --json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402

SCENARIOS = ("fanout", "big", "idle", "c2s")


def canon_hash(data: Any) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def stdin_lines(put: Callable[[dict[str, Any]], None]) -> threading.Thread:
    """Read JSON commands from stdin on a thread of their own; EOF is ``{"cmd": "quit"}``."""

    def run() -> None:
        for line in sys.stdin:
            if line.strip():
                put(json.loads(line))
        put({"cmd": "quit"})

    t = threading.Thread(target=run, name="bench-stdin", daemon=True)  # ends with stdin
    t.start()
    return t


# -- the application's state ---------------------------------------------------------------------


class State:
    """A state of about ``size`` bytes of JSON: ``items`` groups of about 100-byte items, a
    sequence number and the (monotonic) time of the change. :meth:`change` makes a new state
    that shares every group but one, and in that group every item but one, with the old."""

    def __init__(self, size: int) -> None:
        n = max(1, size // 100)
        self.groups = max(1, int(n**0.5))
        self.per = max(1, n // self.groups)
        items = {f"g{g}": {f"k{k}": self._item(g * 1000 + k) for k in range(self.per)} for g in range(self.groups)}
        self.value: dict[str, Any] = {"seq": 0, "t": time.monotonic(), "items": items}

    @staticmethod
    def _item(v: int) -> dict[str, Any]:
        return {"name": f"item number {v:08d} of the benchmark state", "v": v, "on": v % 2 == 0}

    def change(self, seq: int) -> dict[str, Any]:
        old = self.value
        g, k = f"g{seq % self.groups}", f"k{(seq // self.groups) % self.per}"
        group = {**old["items"][g], k: self._item(seq)}
        self.value = {"seq": seq, "t": time.monotonic(), "items": {**old["items"], g: group}}
        return self.value


def client_state(i: int, seq: int) -> dict[str, Any]:
    """What a c2s client sets: about 1 KB."""
    return {"client": i, "seq": seq, "t": time.monotonic(), "notes": [f"note {seq:06d}-{k}" for k in range(40)]}


# -- the server process ----------------------------------------------------------------------------


class App:
    """The application: connections as they come, the state, the paced loop of changes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state = State(args.state_bytes) if args.state_bytes else None
        self.conns: list[Any] = []
        self.received: list[int] = []  # DATA received, per connection (counted by its change callback)
        self.patches: Any = None  # our server's PatchCache (hat-juggler diffs per connection)
        self.lock = threading.Lock()

    def on_connection(self, conn: Any) -> None:
        with self.lock:
            idx = len(self.received)
            self.received.append(0)
            self.conns.append(conn)
            if self.state is not None:
                conn.set_local_data(self.state.value)

        def changed() -> None:
            self.received[idx] += 1

        conn.register_change_cb(changed)

    def set_all(self, state: dict[str, Any]) -> None:
        """Hand ``state`` to every connection (both servers' closed connections raise a
        ConnectionError: juggler's ConnectionClosed is one)."""
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            try:
                conn.set_local_data(state)
            except ConnectionError:
                with self.lock:
                    self.conns.remove(conn)

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"conns": len(self.conns), "received": sum(self.received),
                    "patches": None if self.patches is None else self.patches.computed}  # fmt: skip


def run_changes(app: App) -> Any:
    """The paced loop, as a generator of sleeps (so the same code runs on a thread and in asyncio)."""
    a = app.args
    total = int(a.rate * a.duration)
    t0 = time.monotonic()
    end = t0 + a.duration
    made = 0
    times = []
    for seq in range(1, total + 1):
        due = t0 + seq / a.rate
        now = time.monotonic()
        if due > now:
            yield due - now
        if time.monotonic() > end + 0.1:  # late by more than scheduling jitter: held back
            break
        state = app.state.change(seq)
        app.set_all(state)
        times.append(state["t"])
        made += 1
    return {"made": made, "of": total, "elapsed": time.monotonic() - t0, "final": canon_hash(app.state.value),
            "final_seq": app.state.value["seq"], "times": times}  # fmt: skip


async def serve_commands(app: App) -> None:
    """Answer the harness (go, status, quit) on an asyncio loop, and run the application's
    loop of changes when told: on the loop's thread, which is where hat-juggler's server
    wants its calls (ours takes them from any thread)."""
    loop = asyncio.get_running_loop()
    cmds: "asyncio.Queue[dict[str, Any]]" = asyncio.Queue()
    stdin_lines(lambda cmd: loop.call_soon_threadsafe(cmds.put_nowait, cmd))
    emit({"ready": True, "pid": os.getpid()})
    while True:
        cmd = await cmds.get()
        if cmd["cmd"] == "go":
            gen = run_changes(app)
            try:
                while True:
                    await asyncio.sleep(next(gen))
            except StopIteration as stop:
                emit(stop.value)
        elif cmd["cmd"] == "status":
            emit(app.status())
        elif cmd["cmd"] == "quit":
            return


def server_ours(args: argparse.Namespace) -> None:
    from juggler import statesync

    app = App(args)
    flow = {} if args.flow_timeout is None else {"flow_timeout": args.flow_timeout}
    server = statesync.listen("127.0.0.1", args.port, app.on_connection, autoflush_delay=args.autoflush,
                              max_connections=args.max_connections, **flow)  # fmt: skip
    app.patches = getattr(server, "patches", None)
    try:
        asyncio.run(serve_commands(app))
    finally:
        server.close()


def server_hat(args: argparse.Namespace) -> None:
    import hat.juggler as hj

    async def main() -> None:
        app = App(args)
        server = await hj.listen("127.0.0.1", args.port, app.on_connection, autoflush_delay=args.autoflush)
        try:
            await serve_commands(app)
        finally:
            await server.async_close()

    asyncio.run(main())


# -- the driver process: hat-juggler clients ------------------------------------------------------------


def driver(args: argparse.Namespace) -> None:
    import hat.juggler as hj

    async def main() -> None:
        loop = asyncio.get_running_loop()
        cmds: "asyncio.Queue[dict[str, Any]]" = asyncio.Queue()
        stdin_lines(lambda cmd: loop.call_soon_threadsafe(cmds.put_nowait, cmd))
        conns: list[Any] = []
        last_seq: list[Optional[int]] = []
        arrivals: list[list[tuple[float, int]]] = []  # per client: (when, seq) of each state seen
        ages: list[float] = []  # of each state a client saw, when it saw it
        failures: dict[str, int] = {}
        sem = asyncio.Semaphore(50)

        def watcher(i: int, conn: Any) -> Callable[[], None]:
            def changed() -> None:
                data = conn.remote_data
                seq = data.get("seq") if isinstance(data, dict) else None
                if seq is not None and seq != last_seq[i]:
                    last_seq[i] = seq
                    if seq > 0:
                        now = time.monotonic()
                        ages.append(now - data["t"])
                        arrivals[i].append((now, seq))

            return changed

        async def open_one(i: int) -> None:
            async with sem:
                try:
                    conn = await asyncio.wait_for(hj.connect(args.url, autoflush_delay=args.client_autoflush), 30)
                except Exception as exc:
                    key = type(exc).__name__
                    failures[key] = failures.get(key, 0) + 1
                    return
                last_seq.append(None)
                arrivals.append([])
                conns.append(conn)
                conn.register_change_cb(watcher(len(conns) - 1, conn))

        await asyncio.gather(*(open_one(i) for i in range(args.clients)))
        emit({"ready": len(conns), "failures": failures})

        async def converge(cmd: dict[str, Any]) -> dict[str, Any]:
            deadline = time.monotonic() + cmd["timeout"]
            target = cmd["seq"]
            while time.monotonic() < deadline and not all(s == target for s in last_seq):
                await asyncio.sleep(0.05)
            ok = sum(1 for conn in conns if conn.is_open and canon_hash(conn.remote_data) == cmd["hash"])
            # change-to-client latency: for each change and client, until the client had it (or
            # a later state: a change coalesced into a later patch reaches the client with it)
            times = cmd["times"]
            latencies = []
            for events in arrivals:
                j = 0
                for k, t in enumerate(times, 1):
                    while j < len(events) and events[j][1] < k:
                        j += 1
                    if j == len(events):
                        break  # never reached it (counted by "converged")
                    latencies.append(round(events[j][0] - t, 4))
            return {"converged": ok, "clients": len(conns), "latencies": latencies, "ages": [round(a, 4) for a in ages],
                    "closed": sum(1 for conn in conns if not conn.is_open)}  # fmt: skip

        async def sets(cmd: dict[str, Any]) -> dict[str, Any]:
            rate, duration = cmd["rate"], cmd["duration"]
            counts = [0] * len(conns)

            async def one(i: int, conn: Any) -> None:
                t0 = time.monotonic() + (i % 10) / (10 * rate)  # spread the clients over a period
                for seq in range(1, int(rate * duration) + 1):
                    delay = t0 + seq / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if not conn.is_open:
                        return
                    conn.set_local_data(client_state(i, seq))
                    counts[i] += 1

            await asyncio.gather(*(one(i, conn) for i, conn in enumerate(conns)))
            for conn in conns:  # autoflush 0 sends each at once; make sure the last is out
                if conn.is_open:
                    await conn.flush_local_data()
            return {"sent": sum(counts)}

        try:
            while True:
                cmd = await cmds.get()
                if cmd["cmd"] == "converge":
                    emit(await converge(cmd))
                elif cmd["cmd"] == "sets":
                    emit(await sets(cmd))
                elif cmd["cmd"] == "quit":
                    return
        finally:
            await asyncio.gather(*(conn.async_close() for conn in conns), return_exceptions=True)

    asyncio.run(main())


# -- the harness ------------------------------------------------------------------------------------------


class Child:
    """A role process of this script, talking JSON lines over its stdin and stdout."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: str) -> None:
        self.name = name
        self.log_path = os.path.join(logdir, f"{name}-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
                                      text=True, bufsize=1, preexec_fn=c._die_with_parent)  # fmt: skip
        self.pid = self.popen.pid
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"bench-{name}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, cmd: str, **kw: Any) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.popen.stdin.flush()

    def reply(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.name}: no answer within {timeout:g} s; log {self.log_path}") from None
        if line is None:
            with open(self.log_path, "rb") as f:
                tail = f.read().decode("utf-8", "replace")[-2000:]
            raise RuntimeError(f"{self.name} exited ({self.popen.wait()}):\n{tail}")
        return json.loads(line)

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                self.send("quit")
                self.popen.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()


def role_argv(role: str, **opts: Any) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--role", role]
    for k, v in opts.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def measure(impl: str, tree: Optional[str], scenario: str, args: argparse.Namespace, logdir: str) -> dict[str, Any]:
    env = c.tree_env(tree) if tree else dict(os.environ)
    port = c.free_port()
    if scenario == "fanout":
        clients, size, rate = args.clients, args.state_kb * 1024, args.rate
    elif scenario == "big":
        clients, size, rate = args.big_clients, args.big_kb * 1024, 1.0
    elif scenario == "idle":
        clients, size, rate = args.idle, 0, 0.0
    else:
        clients, size, rate = args.c2s_clients, 0, 0.0
    flow = {"flow_timeout": args.flow_timeout} if impl == "ours" and args.flow_timeout is not None else {}
    server = Child(f"server-{impl}", role_argv("server", impl="hat" if impl == "hat" else "ours", port=port,
                   state_bytes=size, rate=rate or 1, duration=args.duration, autoflush=args.autoflush,
                   max_connections=clients + 100, **flow), env, logdir)  # fmt: skip
    drivers: list[Child] = []
    out: dict[str, Any] = {"impl": impl, "scenario": scenario, "clients": clients}
    try:
        server.reply(30)
        base = c.proc_status(server.pid)
        ndrivers = max(1, min(max(args.drivers, -(-clients // args.per_driver)), clients))
        for d in range(ndrivers):
            share = clients // ndrivers + (1 if d < clients % ndrivers else 0)
            drivers.append(Child(f"driver{d}", role_argv("driver", url=f"ws://127.0.0.1:{port}/ws", clients=share,
                                 client_autoflush=0 if scenario == "c2s" else args.autoflush), dict(os.environ), logdir))  # fmt: skip
        ready = [d.reply(args.open_timeout) for d in drivers]
        out["connected"] = sum(r["ready"] for r in ready)
        if out["connected"] < clients:
            out["connect_failures"] = [r["failures"] for r in ready]
        if scenario in ("fanout", "big"):
            time.sleep(1.0)  # the initial state reaches every client
            server.send("status")
            patches0 = server.reply(30)["patches"]
            cpu0 = c.cpu_seconds(server.pid)
            dcpu0 = sum(c.cpu_seconds(d.pid) for d in drivers)
            t0 = time.monotonic()
            server.send("go")
            done = server.reply(args.duration + 120)
            for d in drivers:
                d.send("converge", seq=done["final_seq"], hash=done["final"], times=done["times"],
                       timeout=args.converge_timeout)
            results = [d.reply(args.converge_timeout + 60) for d in drivers]
            cpu = c.cpu_seconds(server.pid) - cpu0
            server.send("status")
            patches = server.reply(30)["patches"]
            out["patches"] = None if patches is None else patches - patches0
            out["clients_cpu_pct"] = 100 * (sum(c.cpu_seconds(d.pid) for d in drivers) - dcpu0) / (time.monotonic() - t0)
            lat = sorted(x for r in results for x in r["latencies"])
            ages = sorted(x for r in results for x in r["ages"])
            out.update(made=done["made"], of=done["of"], converged=sum(r["converged"] for r in results),
                       closed=sum(r["closed"] for r in results), cpu=cpu,
                       cpu_per_change=cpu / max(1, done["made"]),
                       cpu_per_change_client=cpu / max(1, done["made"] * out["connected"]),
                       lat_p50=c.percentile(lat, 50), lat_p99=c.percentile(lat, 99), lat_max=lat[-1] if lat else 0.0,
                       age_p50=c.percentile(ages, 50), age_p99=c.percentile(ages, 99), deliveries=len(ages))  # fmt: skip
        elif scenario == "idle":
            time.sleep(2.0)
            st = c.proc_status(server.pid)
            cpu0 = c.cpu_seconds(server.pid)
            time.sleep(args.hold)
            cpu = c.cpu_seconds(server.pid) - cpu0
            out.update(rss_base=base["rss"], rss=st["rss"], threads=st["threads"],
                       rss_per_conn=(st["rss"] - base["rss"]) / max(1, out["connected"]),
                       threads_per_conn=(st["threads"] - base["threads"]) / max(1, out["connected"]),
                       idle_cpu_pct=100 * cpu / args.hold)  # fmt: skip
        else:
            cpu0 = c.cpu_seconds(server.pid)
            for d in drivers:
                d.send("sets", rate=args.c2s_rate, duration=args.duration)
            sent = sum(d.reply(args.duration + 120)["sent"] for d in drivers)
            deadline = time.monotonic() + args.converge_timeout
            while True:
                server.send("status")
                received = server.reply(30)["received"]
                if received >= sent or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            cpu = c.cpu_seconds(server.pid) - cpu0
            out.update(sent=sent, received=received, cpu=cpu, cpu_per_patch=cpu / max(1, received))
    finally:
        for d in drivers:
            d.stop()
        server.stop()
    return out


def run_server(args: argparse.Namespace) -> None:
    c.raise_nofile()
    (server_hat if args.impl == "hat" else server_ours)(args)


def fmt_row(scenario: str, m: dict[str, Any]) -> str:
    if scenario in ("fanout", "big"):
        return (f"made {m['made']:4d}/{m['of']:<4d} converged {m['converged']:4d}/{m['clients']:<4d} "
                f"cpu {m['cpu']:6.2f} s  per change {m['cpu_per_change'] * 1e3:8.2f} ms  "
                f"per change x client {m['cpu_per_change_client'] * 1e6:7.2f} us  "
                f"latency p50 {m['lat_p50'] * 1e3:6.0f} ms p99 {m['lat_p99'] * 1e3:6.0f} ms  "
                f"(age of states seen p99 {m['age_p99'] * 1e3:6.0f} ms)  clients' CPU {m['clients_cpu_pct']:4.0f} %  "
                f"DATA {m['deliveries']}" + ("" if m.get("patches") is None else f"  patches made {m['patches']}"))  # fmt: skip
    if scenario == "idle":
        return (f"connected {m['connected']:5d}  threads {m['threads']:5d} ({m['threads_per_conn']:.2f}/conn)  "
                f"RSS/conn {m['rss_per_conn'] / 1024:6.1f} KB  idle CPU {m['idle_cpu_pct']:5.2f} %")  # fmt: skip
    return (f"sent {m['sent']:6d} received {m['received']:6d}  cpu {m['cpu']:6.2f} s  "
            f"per patch {m['cpu_per_patch'] * 1e6:7.1f} us")


KEYS = {"fanout": ("made", "converged", "cpu_per_change_client", "lat_p99"), "big": ("made", "converged", "cpu_per_change", "lat_p99"),
        "idle": ("rss_per_conn", "threads_per_conn", "idle_cpu_pct"), "c2s": ("received", "cpu_per_patch")}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    ap.add_argument("--clients", type=int, default=500, help="fanout: clients (default 500)")
    ap.add_argument("--state-kb", type=int, default=10, help="fanout: state size in KB (default 10)")
    ap.add_argument("--rate", type=float, default=50.0, help="fanout: changes per second (default 50)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of changes, fanout, big and c2s (default 10)")
    ap.add_argument("--big-clients", type=int, default=50, help="big: clients (default 50)")
    ap.add_argument("--big-kb", type=int, default=1024, help="big: state size in KB (default 1024)")
    ap.add_argument("--idle", type=int, default=1000, help="idle: connections (default 1000)")
    ap.add_argument("--hold", type=float, default=5.0, help="idle: seconds to measure idle CPU (default 5)")
    ap.add_argument("--c2s-clients", type=int, default=100, help="c2s: clients (default 100)")
    ap.add_argument("--c2s-rate", type=float, default=10.0, help="c2s: sets per second per client (default 10)")
    ap.add_argument("--autoflush", type=float, default=0.2, help="autoflush_delay of the servers and clients (default 0.2)")
    ap.add_argument("--drivers", type=int, default=4, help="client processes (default 4; more if --per-driver says so)")
    ap.add_argument("--per-driver", type=int, default=125, help="clients per client process, at most (default 125)")
    ap.add_argument("--open-timeout", type=float, default=120.0, help="seconds to open every client (default 120)")
    ap.add_argument("--converge-timeout", type=float, default=60.0, help="seconds for clients to converge (default 60)")
    ap.add_argument("--flow-timeout", type=float, help="flow_timeout of our server (not --against's; default: the library's; 0: off)")
    ap.add_argument("--impls", default="ours,hat", help="what to measure: ours, hat (default ours,hat)")
    ap.add_argument("--against", metavar="REV", help="also measure our server at this git revision (before)")
    ap.add_argument("--runs", type=int, default=1, help="rounds of measurements (default 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    # the roles this script plays in its child processes
    ap.add_argument("--role", choices=("harness", "server", "driver"), default="harness", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--state-bytes", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--max-connections", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--client-autoflush", type=float, default=0.2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "server":
        run_server(args)
        return 0
    if args.role == "driver":
        c.raise_nofile()
        driver(args)
        return 0

    c.sigterm_as_interrupt()
    c.raise_nofile()
    scenarios = [s for s in args.scenario.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    impls = [i for i in args.impls.split(",") if i]
    logdir = tempfile.mkdtemp(prefix="juggler-bench-statesync-")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in scenarios}
    trees: dict[str, Optional[str]] = {"ours": c.REPO, "hat": None}
    labels = {"ours": f"ours {c.describe_tree(c.REPO)}", "hat": "hat-juggler 0.5.13"}
    wt = None
    try:
        if args.against:
            wt = c.worktree(args.against)
            path, commit = wt.__enter__()
            trees["before"] = path
            labels["before"] = f"ours {commit} (before)"
            impls.insert(1, "before")
        for r in range(args.runs):
            order = impls if r % 2 == 0 else impls[::-1]
            for s in scenarios:
                for impl in order:
                    c.log(f"[{s}] {labels[impl]} ...")
                    m = measure(impl, trees[impl], s, args, logdir)
                    results[s].setdefault(impl, []).append(m)
                    c.log(f"  {fmt_row(s, m)}")
    except KeyboardInterrupt:
        c.log("interrupted")
    finally:
        if wt is not None:
            wt.__exit__(None, None, None)
    if args.json:
        print(json.dumps({"labels": labels, "results": results}, indent=1))
        return 0
    print(f"\nstate sync, medians of {args.runs} run(s); load: {os.getloadavg()[0]:.2f}; logs in {logdir}")
    for s in scenarios:
        print(f"\n== {s}")
        meds: dict[str, dict[str, float]] = {}
        for impl, ms in results[s].items():
            meds[impl] = {k: statistics.median(m[k] for m in ms) for k in KEYS[s]}
            print(f"  {labels[impl]:28s} " + "  ".join(f"{k} {v:.6g}" for k, v in meds[impl].items()))
        if "ours" in meds and "hat" in meds:
            print("  ours / hat: " + "  ".join(f"{k} {c.fmt_ratio(c.ratio(meds['ours'][k], meds['hat'][k]))}" for k in KEYS[s]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
