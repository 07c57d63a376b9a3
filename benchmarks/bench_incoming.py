"""Micro-benchmark of a server's incoming CALL path, in one process, no network, no redis.

From a masked websocket frame's bytes to the bytes of the store command written to redis:
a real :class:`~juggler.conn.Conn` of a real :class:`~juggler.Server` runs its reader loop
(``Conn._read_loop``) over frames handed to it from memory, with the standard handler, and
stores each CALL ahead (``store_call_ahead``) on a results broker whose redis connection
only records the bytes it is given. Prints µs per CALL for the whole path and for its parts
(frame parse, decode, the store's bytes), the best of ``--repeat`` rounds.

    python benchmarks/bench_incoming.py [--calls 20000] [--repeat 5] [--args '"hello"']
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis  # noqa: E402

from juggler import resp  # noqa: E402
from juggler.broker import RedisBroker  # noqa: E402
from juggler.conn import Conn  # noqa: E402
from juggler.exceptions import Stopped  # noqa: E402
from juggler.frames import OP_TEXT, encode_frame  # noqa: E402
from juggler.handshake import HandshakeRequest  # noqa: E402
from juggler.message import CLIENT_TYPES, CallPayload, decode, new_uuid  # noqa: E402
from juggler.peer import Peer  # noqa: E402
from juggler.server import Server  # noqa: E402
from juggler.transport import SocketIO, SocketReader  # noqa: E402


class _Own(resp.RespConnection):
    """A redis connection that records what it is sent, and lets the next call be stored."""

    def __init__(self, broker: RedisBroker) -> None:  # (no socket)
        self.broken = False
        self.sent = 0
        self.last = b""
        self._broker = broker

    def _send(self, data: bytes) -> None:
        self.sent += 1
        self.last = data
        b = self._broker
        b._brpop_sent = False
        b._expect.clear()
        b.call_deadlines.clear()  # (as if its result came)


class _Frames:
    """A SocketReader stand-in: hands out the frames, one per read, then ends."""

    def __init__(self, frames: list[bytes]) -> None:
        self._it = iter(frames)
        self.last_recv = time.monotonic()

    def read_some(self) -> bytes:
        try:
            return next(self._it)
        except StopIteration:
            raise Stopped("done") from None


def call_text(uri: str, args_json: str) -> bytes:
    return ('{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"%s","timeout":5000000000,"args":%s}}'
            % (new_uuid(), uri, args_json)).encode()  # fmt: skip


def make_conn(server: Server) -> tuple[Conn, _Own]:
    a, b = socket.socketpair()
    io = SocketIO(a, write_timeout=1.0)
    request = HandshakeRequest("GET", "/ws", "HTTP/1.1", {})
    conn = Conn(server._conn_services(), io, ("bench", 0), request, CLIENT_TYPES, SocketReader(io))
    conn._b = b  # (kept open)
    results = RedisBroker(redis.Redis(port=1)).dedicated("bench")  # (never connects)
    own = _Own(results)
    results._own = own
    assert results.follow_calls(conn._calls)
    conn._results = results
    conn._results_thread = threading.current_thread()  # (listen_for_results: "it runs")
    conn._ahead = True
    conn._store_watch = object()  # (no watchdog on the timer)
    return conn, own


def best(fn: Any, repeat: int, n: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t = time.thread_time()  # (CPU time: the machine may be busy)
        fn()
        times.append(time.thread_time() - t)
    return min(times) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--args", default='"hello"', help="the CALL's args, as JSON")
    ap.add_argument("--uri", default="test.echo")
    opts = ap.parse_args()
    n = opts.calls
    server = Server(RedisBroker(redis.Redis(port=1)), port=0)
    texts = [call_text(opts.uri, opts.args) for _ in range(n)]
    mask = b"\x01\x02\x03\x04"
    frames = [encode_frame(OP_TEXT, t, mask) for t in texts]

    def whole() -> None:
        conn, own = make_conn(server)
        conn._socket_reader = _Frames(frames)  # type: ignore[assignment]
        conn._read_loop()
        assert own.sent == n and not conn.closed, (own.sent, conn.close_reason)
        conn._io.sock.close()
        conn._b.close()

    def loop_only() -> None:
        conn, own = make_conn(server)
        conn._socket_reader = _Frames(frames)  # type: ignore[assignment]
        conn.handle = lambda msg: None  # type: ignore[method-assign]
        conn._read_loop()
        conn._io.sock.close()
        conn._b.close()

    def parse() -> None:
        peer = Peer()
        for f in frames:
            peer.receive_data(f)

    def decode_only() -> None:
        for t in texts:
            decode(t, CLIENT_TYPES)

    conn, own = make_conn(server)
    results = conn._results
    payloads = [CallPayload(conn.uuid, new_uuid(), opts.uri, json.loads(opts.args)) for _ in range(n)]

    def store_only() -> None:
        for p in payloads:
            results.store_call_ahead(p, 5.0, _done)

    msgs = [decode(t, CLIENT_TYPES) for t in texts]

    def handle_only() -> None:
        handle = conn.handle
        for m in msgs:
            handle(m)

    print(f"CPU µs per CALL (best of {opts.repeat} x {n}), args {opts.args[:40]}")
    parts = [("whole incoming path", whole), ("reader loop, no handler", loop_only), ("frame parse (Peer)", parse),
             ("decode", decode_only), ("Conn.handle (process_msg)", handle_only), ("store_call_ahead", store_only)]
    for name, fn in parts:
        print(f"  {name:<26} {best(fn, opts.repeat, n):6.2f}")


def _done(error: Any) -> None:
    pass


if __name__ == "__main__":
    main()
