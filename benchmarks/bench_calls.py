"""Call and pub-sub throughput and latency through a real juggler server, client and callee.

Starts its own redis-server on a free port (or uses --redis URL, or --fake for fakeredis),
a server on port 0 and a callee pool, then prints:
- sequential calls: one client, one call at a time (round-trip latency);
- concurrent calls: N clients with M calls in flight each (throughput);
- pub-sub: events per second from one publisher to one subscriber.

    python benchmarks/bench_calls.py [--calls 2000] [--clients 4] [--inflight 16] [--fake]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import threading
import time
from concurrent.futures import wait

import redis

from juggler import Callee, Client, RedisBroker, Server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    for line in proc.stdout:
        if "Ready to accept connections" in line:
            break
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, f"redis://127.0.0.1:{port}/0"


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def report(name: str, n: int, elapsed: float, lat: list[float] | None = None) -> None:
    line = f"{name:<28} {n:>7} in {elapsed:6.2f} s = {n / elapsed:8.0f}/s"
    if lat:
        ms = [x * 1000 for x in lat]
        line += (
            f"   latency ms: p50 {pct(ms, 50):.2f}  p90 {pct(ms, 90):.2f}  p99 {pct(ms, 99):.2f}"
            f"  max {max(ms):.2f}  mean {statistics.fmean(ms):.2f}"
        )
    print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--redis", help="redis URL (default: start a redis-server)")
    ap.add_argument("--fake", action="store_true", help="use fakeredis instead of redis")
    args = ap.parse_args()

    proc = None
    if args.fake:
        import fakeredis

        client = fakeredis.FakeRedis()
        where = "fakeredis"
    else:
        url = args.redis
        if url is None:
            proc, url = start_redis()
        client = redis.Redis.from_url(url)
        where = url
    broker = RedisBroker(client)
    callee = Callee(broker, workers=args.workers)
    callee.register("bench.echo", lambda a: a)
    payload = {"text": "x" * 100, "n": 1}
    print(f"juggler benchmark on {where}: {args.workers} callee workers, payload {len(str(payload))} bytes")
    try:
        with Server(broker) as server, callee:
            with Client.connect(server.url) as c:
                for _ in range(50):  # warm up
                    c.call("bench.echo", payload, timeout=10)
                lat = []
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    s = time.perf_counter()
                    c.call("bench.echo", payload, timeout=10)
                    lat.append(time.perf_counter() - s)
                report("sequential calls", args.calls, time.perf_counter() - t0, lat)

            clients = [Client.connect(server.url) for _ in range(args.clients)]
            lat_all: list[float] = []
            lock = threading.Lock()

            def drive(c: Client, n: int) -> None:
                sem = threading.Semaphore(args.inflight)
                futs = []
                for _ in range(n):
                    sem.acquire()
                    s = time.perf_counter()
                    f = c.call_async("bench.echo", payload, timeout=30)

                    def done(f, s=s):
                        sem.release()
                        with lock:
                            lat_all.append(time.perf_counter() - s)

                    f.add_done_callback(done)
                    futs.append(f)
                wait(futs)
                for f in futs:
                    f.result()

            per = args.calls * 2 // args.clients
            t0 = time.perf_counter()
            threads = [threading.Thread(target=drive, args=(c, per)) for c in clients]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            report(f"concurrent calls ({args.clients}x{args.inflight})", per * args.clients, time.perf_counter() - t0, lat_all)
            for c in clients:
                c.close()

            with Client.connect(server.url) as pub, Client.connect(server.url) as subc:
                sub = subc.sub("bench.events")
                got = 0
                t0 = time.perf_counter()

                def publish() -> None:
                    for i in range(args.events):
                        pub.pub("bench.events", i)

                t = threading.Thread(target=publish)
                t.start()
                while got < args.events:
                    sub.get(timeout=30)
                    got += 1
                t.join()
                report("pub-sub events (pub->evnt)", got, time.perf_counter() - t0)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
