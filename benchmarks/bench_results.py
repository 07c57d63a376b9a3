"""Micro-benchmark of a server's results path, in one process and one thread, no redis.

From redis' replies on a connection's results listener (a CALL's store answered, then the
``BRPOP`` that brings its result) to the ACK and RES frames written to the websocket: a real
:class:`~juggler.conn.Conn` runs its results loop (``Conn._results_loop``) on this thread,
with the standard handler's callback for each call stored ahead (the ACK). Where the
listener would wait for redis (``RespConnection._reply``), the next replies are handed to it
instead: with ``--apart``, one at a time (a slow callee: the result comes after the thread
waited again), else a call's store reply and its result together (a quick callee). The
websocket and the redis connection are socket pairs drained by a ``cat`` process each, so
writes do not wait. Prints CPU µs per call (this thread's CPU time), the best of
``--repeat`` rounds.

    python benchmarks/bench_results.py [--calls 5000] [--repeat 5] [--args '"hello"'] [--apart]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis  # noqa: E402

from juggler import resp  # noqa: E402
from juggler.broker import RedisBroker  # noqa: E402
from juggler.conn import Conn  # noqa: E402
from juggler.handshake import HandshakeRequest  # noqa: E402
from juggler.layout import results_key  # noqa: E402
from juggler.message import CLIENT_TYPES, Call, ResultPayload  # noqa: E402
from juggler.middleware import _call_stored  # noqa: E402
from juggler.server import Server  # noqa: E402
from juggler.transport import SocketIO, SocketReader  # noqa: E402


class _Link:
    """What RespConnection takes of a redis-py connection: its socket, and disconnect()."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def disconnect(self) -> None:
        self._sock.close()


class _Fed(resp.RespConnection):
    """A redis connection whose every wait for a reply gets the next of ``chunks`` instead
    (``(stores, bytes)``: ``stores``, the next call is stored first); once they are all read,
    the end of the stream."""

    chunks: list[tuple[bool, bytes]]
    store_next: Any
    conn: Conn

    def _reply(self) -> Any:
        if self.chunks:
            stores, data = self.chunks.pop()
            if stores:
                self.store_next()
            self._reader.feed(data)
        else:
            self.conn._results_stop = True  # (so that the loop ends, rather than connect again)
            self._sock.shutdown(socket.SHUT_RDWR)
        return super()._reply()


def _drained() -> tuple[socket.socket, subprocess.Popen]:
    """One end of a socket pair whose other end a ``cat`` process reads and drops."""
    a, b = socket.socketpair()
    sink = subprocess.Popen(["cat"], stdin=b.fileno(), stdout=subprocess.DEVNULL)
    b.close()
    return a, sink


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(data), data)


def one_round(server: Server, n: int, args: Any, apart: bool) -> tuple[float, dict]:
    """CPU seconds of the results loop over ``n`` calls, and the server's counters."""
    ws, ws_sink = _drained()
    rd, rd_sink = _drained()
    io = SocketIO(ws, write_timeout=5.0)
    conn = Conn(server._conn_services(), io, ("bench", 0), HandshakeRequest("GET", "/ws", "HTTP/1.1", {}),
                CLIENT_TYPES, SocketReader(io))  # fmt: skip
    results = RedisBroker(redis.Redis(port=1)).dedicated(results_key(conn.uuid))  # (never connects)
    own = _Fed(_Link(rd))
    own.reply_skip = True  # (found out on the first result: CLIENT REPLY SKIP is taken)
    results._own = own
    results._reconnected = time.monotonic()  # (at the end, no new connection: the loop ends)
    deadlines = conn._calls
    assert results.follow_calls(deadlines)
    results.keys_taken_later = True  # (as Conn.listen_for_results sets it; older trees ignore it)
    conn._results = results
    conn._ahead = True
    key = results_key(conn.uuid).encode()
    chunks = []
    calls = []
    for _ in range(n):
        call = Call(uri="test.echo", args=args, timeout=5.0)
        calls.append(call)
        payload = ResultPayload(conn.uuid, call.uuid, "test.echo", args).to_json().encode()
        brpop = b"*2\r\n" + _bulk(key) + _bulk(payload)
        chunks.extend(((True, b":1\r\n"), (False, brpop)) if apart else ((True, b":1\r\n" + brpop),))
    own.chunks = chunks[::-1]  # (popped from the end)
    calls.reverse()

    def store_next() -> None:  # what the reader does for the next CALL, before redis answers
        call = calls.pop()
        deadlines[call.uuid] = time.monotonic() + 5.0
        results._expect.extend(((functools.partial(_call_stored, conn, call), 0.0), "brpop"))
        results._brpop_sent = True
        if getattr(results, "_later", (None,))[0] is not None:  # (the reader sends it with its store)
            results._later = (None, b"")

    own.store_next = store_next
    own.conn = conn
    gc.collect()
    t = time.thread_time()
    conn._results_loop()
    spent = time.thread_time() - t
    assert not conn.closed, conn.close_reason
    ws.close()
    rd.close()
    ws_sink.wait(10)
    rd_sink.wait(10)
    return spent, server.stats.snapshot()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--args", default='"hello"', help="the result's args, as JSON")
    ap.add_argument("--apart", action="store_true", help="each result after the thread waited again (a slow callee)")
    opts = ap.parse_args()
    args = json.loads(opts.args)
    server = Server(RedisBroker(redis.Redis(port=1)), port=0)
    times = []
    before = server.stats.snapshot()
    for _ in range(opts.repeat):
        spent, stats = one_round(server, opts.calls, args, opts.apart)
        times.append(spent)
    res = stats.get("write_RES", 0) - before.get("write_RES", 0)
    ack = stats.get("write_ACK", 0) - before.get("write_ACK", 0)
    assert res == ack == opts.calls * opts.repeat, (ack, res)
    how = "each result after a wait" if opts.apart else "store reply and result together"
    print(f"results path, CPU µs per call (best of {opts.repeat} x {opts.calls}; {how}),"
          f" args {opts.args[:40]}: {min(times) / opts.calls * 1e6:.2f}  (median {sorted(times)[len(times) // 2] / opts.calls * 1e6:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
