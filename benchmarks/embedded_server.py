"""A juggler server embedded in a program of its own, for ``--server-cmd`` of the benchmarks:
what a server costs in a process that ``juggler server`` did not tune, or that asked for the
tuning with :func:`juggler.tuning.tune_process` (``--tuned``).

Usage::

    python benchmarks/idle.py -n 2000 --server-cmd '{python} benchmarks/embedded_server.py {redis} {port} {max_connections}'
    python benchmarks/idle.py -n 2000 --server-cmd '{python} benchmarks/embedded_server.py {redis} {port} {max_connections} --tuned'
"""

from __future__ import annotations

import argparse
import threading

import redis

from juggler import RedisBroker, Server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("redis", help="redis URL")
    ap.add_argument("port", type=int)
    ap.add_argument("max_connections", type=int)
    ap.add_argument("--tuned", action="store_true", help="tune the process first, as juggler server does")
    args = ap.parse_args()
    if args.tuned:
        from juggler.tuning import tune_process

        tune_process(args.max_connections, cpu="auto")
    server = Server(RedisBroker(redis.Redis.from_url(args.redis)), port=args.port, max_connections=args.max_connections)
    server.start()
    print(f"websocket: {server.url}", flush=True)  # what the benchmarks wait for
    threading.Event().wait()  # until the benchmark kills it


if __name__ == "__main__":
    main()
