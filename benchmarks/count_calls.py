"""Python function calls per RPC on each of a server's connection threads (reader, writer,
results), counted with a profile hook: what the interpreter runs per call, whatever the
machine's load (no timing).

Starts its own redis-server and ``juggler callee --demo`` (a process of its own, not
counted), a :class:`~juggler.Server` in this process whose threads carry a profile hook
(``threading.setprofile``), and drives ``--calls`` sequential CALLs of ``test.echo`` on
``--connections`` raw websockets from the main thread (not counted). Prints, per thread role,
the Python calls (``call``) and C calls (``c_call``) per RPC, and with ``--top N`` the
functions called most on each role. With ``--cpu``, no hook: the CPU µs per RPC of each role
instead (each thread's own clock, ``pthread_getcpuclockid``), the best of ``--repeat`` rounds.

    python benchmarks/count_calls.py [--calls 2000] [--connections 1] [--top 15] [--cpu]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import selectors
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common as c  # noqa: E402

import redis  # noqa: E402

from juggler import RedisBroker, Server  # noqa: E402

_ROLE = re.compile(r"juggler-conn-\d+-(\w+)")
_counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_funcs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_counting = False


def _role() -> str:
    name = threading.current_thread().name
    m = _ROLE.match(name)
    if m:
        return m.group(1)
    return "reader" if name.startswith("juggler-conn-") else "other"


def _hook(frame: Any, event: str, arg: Any) -> None:
    if not _counting or (event != "call" and event != "c_call"):
        return
    role = _role()
    _counts[role][event] += 1
    if event == "call":
        code = frame.f_code
        _funcs[role][f"{os.path.basename(code.co_filename)}:{code.co_name}"] += 1
    else:
        _funcs[role][f"C {getattr(arg, '__qualname__', arg)}"] += 1


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """Each live juggler thread's CPU seconds, by ident: (role, seconds)."""
    out = {}
    for t in threading.enumerate():
        if t.ident is None or not t.name.startswith("juggler-"):
            continue
        try:
            clock = time.pthread_getcpuclockid(t.ident)
            out[t.ident] = (_ROLE.match(t.name).group(1) if _ROLE.match(t.name) else "other", time.clock_gettime(clock))
        except (OSError, ProcessLookupError):
            pass
    return out


def main() -> None:
    global _counting
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--top", type=int, default=0)
    ap.add_argument("--cpu", action="store_true", help="CPU µs per RPC per thread role instead of calls")
    ap.add_argument("--repeat", type=int, default=3, help="(--cpu) rounds, the best of which is shown")
    opts = ap.parse_args()
    logdir = tempfile.mkdtemp(prefix="count_calls-")
    redis_proc, url, _ = c.start_redis(logdir)
    callee = c.Proc("callee", [sys.executable, "-m", "juggler", "callee", "--redis", url, "--demo",
                               "--log-level", "warning"], logdir)  # fmt: skip
    if not opts.cpu:
        threading.setprofile(_hook)
    server = Server(RedisBroker(redis.Redis.from_url(url)), host="127.0.0.1", port=0)
    try:
        server.start()
        port = server.port
        conns = [c.ws_connect(port, server.settings.path, 10.0) for _ in range(opts.connections)]
        sel = selectors.DefaultSelector()
        for sock, parser in conns:
            sel.register(sock, selectors.EVENT_READ, parser)

        def rpc_round() -> None:
            waiting = {}
            for sock, _ in conns:
                u = str(uuid.uuid4())
                text = '{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"test.echo","timeout":5000000000,"args":"hello"}}' % u
                sock.sendall(c.encode_frame(c.OP_TEXT, text.encode()))
                waiting[sock] = u
            deadline = time.monotonic() + 10
            while waiting:
                if time.monotonic() > deadline:
                    raise SystemExit("no RES within 10 s")
                for key, _ in sel.select(1.0):
                    data = key.fileobj.recv(65536)
                    for opcode, payload in key.data.feed(data):
                        msg = json.loads(payload)
                        if msg["meta"]["type"] in (7, 9) and msg["payload"].get("for") == waiting.get(key.fileobj):
                            del waiting[key.fileobj]

        for _ in range(50):  # warm up (the results threads start, the scripts load)
            rpc_round()
        rounds = max(1, opts.calls // opts.connections)
        n = rounds * opts.connections
        if opts.cpu:
            best: dict[str, float] = {}
            for _ in range(opts.repeat):
                before = _thread_cpu()
                for _ in range(rounds):
                    rpc_round()
                after = _thread_cpu()
                spent: dict[str, float] = collections.Counter()
                for t, (role, cpu) in after.items():
                    spent[role] += cpu - before.get(t, (role, 0.0))[1]
                for role, cpu in spent.items():
                    best[role] = min(best.get(role, cpu), cpu)
            print(f"CPU µs per RPC ({n} RPCs on {opts.connections} connection(s), best of {opts.repeat}):")
            for role in sorted(best):
                print(f"  {role:<8} {best[role] / n * 1e6:8.1f}")
            print(f"  {'all':<8} {sum(best.values()) / n * 1e6:8.1f}")
            return
        _counting = True
        for _ in range(rounds):
            rpc_round()
        _counting = False
        print(f"Python calls per RPC ({n} RPCs on {opts.connections} connection(s)):")
        print(f"  {'thread':<8} {'py calls':>9} {'C calls':>9}")
        for role in sorted(_counts):
            cnt = _counts[role]
            print(f"  {role:<8} {cnt['call'] / n:9.1f} {cnt['c_call'] / n:9.1f}")
        total_py = sum(cnt["call"] for cnt in _counts.values()) / n
        total_c = sum(cnt["c_call"] for cnt in _counts.values()) / n
        print(f"  {'all':<8} {total_py:9.1f} {total_c:9.1f}")
        if opts.top:
            for role in sorted(_funcs):
                print(f"-- {role}: top {opts.top} per RPC")
                for name, k in _funcs[role].most_common(opts.top):
                    print(f"  {k / n:6.2f}  {name}")
        for sock, _ in conns:
            sock.close()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        server.shutdown()
        callee.stop()
        redis_proc.stop()


if __name__ == "__main__":
    main()
