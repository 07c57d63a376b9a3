"""Throughput and latency with each role in its own process, as deployed.

Starts a redis-server on a free port, `juggler server`, `juggler callee --demo`, then runs
`juggler load` (auto-regulated) for a few connection counts and prints one line per run.

    python benchmarks/bench_processes.py [--duration 5] [--connections 1,4,16] [--workers 16]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_line(proc: subprocess.Popen, pattern: str) -> re.Match:
    for line in proc.stdout:
        m = re.search(pattern, line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return m
    raise RuntimeError(f"process exited before printing {pattern!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", default="5")
    ap.add_argument("--connections", default="1,4,16")
    ap.add_argument("--workers", default="16")
    ap.add_argument("--uri", default="test.echo")
    ap.add_argument("--payload", default='"hello"')
    args = ap.parse_args()
    juggler = [sys.executable, "-m", "juggler"]
    procs = []
    try:
        port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(redis)
        wait_line(redis, "Ready to accept connections")
        url = f"redis://127.0.0.1:{port}/0"
        server = subprocess.Popen([*juggler, "server", "--redis", url, "--port", "0", "--log-level", "warning"],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(server)
        ws = wait_line(server, r"websocket: (ws://\S+)").group(1)
        callee = subprocess.Popen([*juggler, "callee", "--redis", url, "--demo", "--workers", args.workers,
                                   "--log-level", "warning"], stdout=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(callee)
        wait_line(callee, "callee: serving")
        print(f"redis {url}, server {ws}, callee --workers {args.workers}, uri {args.uri}, {args.duration} s per run")
        for n in args.connections.split(","):
            out = subprocess.run([*juggler, "load", "--duration", args.duration, "--connections", n, "--uri", args.uri,
                                  "--payload", args.payload, "--json", "--quiet", ws],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            r = json.loads(out.stdout)
            lat = r["latency_ms"]
            print(f"{n:>3} connections: {r['calls_per_second']:8.1f} calls/s  calls {r['calls']}  results {r['results']}"
                  f"  nacks {r['nacks']}  expired {r['expired']}  latency ms p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}"
                  f"  p99 {lat['p99']:.2f}  max {lat['max']:.2f}", flush=True)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait()


if __name__ == "__main__":
    main()
