"""The least a websocket server of juggler's shape can cost to open and close idle
connections: what ``benchmarks/idle.py --server-cmd`` measures it against.

Per connection, as in juggler: a reader thread that reads the upgrade request, sends the 101
and then blocks in ``recv``, and a writer thread that blocks on a condition until the reader
ends it; the reader answers a close frame with one and joins the writer. Nothing else: no
handshake checks, no frames parsed beyond a close's opcode, no redis, no keepalive, no
metrics. The process is tuned as ``juggler server`` tunes itself (one CPU, 512 KiB stacks,
a 1 s switch interval, the GC's young generation at 10,000, the futex table sized for the
threads: :func:`juggler.tuning.tune_process`).

``--threads`` says how each thread starts:

- ``threading``: :meth:`threading.Thread.start`, as juggler starts them;
- ``raw``: ``_thread.start_new_thread``, with no :class:`threading.Thread` at all (threads
  without names, invisible to :func:`threading.enumerate`: not something to ship).

Usage::

    python benchmarks/idle.py -n 10000 --hold 2 \\
        --server-cmd '{python} benchmarks/floor_server.py --port {port} --threads threading'
"""

from __future__ import annotations

import _thread
import argparse
import base64
import hashlib
import os
import socket
import sys
import threading
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from juggler.tuning import tune_process  # noqa: E402

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLOSE_1000 = b"\x88\x02\x03\xe8"


def starter(kind: str) -> Callable[[Callable[..., None], tuple[Any, ...]], Callable[[], None]]:
    """``start(fn, args)`` for ``kind``, returning what joins the thread."""
    if kind == "raw":

        def start_raw(fn: Callable[..., None], args: tuple[Any, ...]) -> Callable[[], None]:
            done = _thread.allocate_lock()
            done.acquire()

            def run() -> None:
                try:
                    fn(*args)
                finally:
                    done.release()

            _thread.start_new_thread(run, ())
            return done.acquire

        return start_raw

    def start_thread_object(fn: Callable[..., None], args: tuple[Any, ...]) -> Callable[[], None]:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        return t.join

    return start_thread_object


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", choices=("threading", "raw"), default="threading")
    parser.add_argument("--max-connections", type=int, default=10000)
    args, _ = parser.parse_known_args()
    tune_process(args.max_connections)
    start = starter(args.threads)

    def writer(cond: threading.Condition, ended: list[bool]) -> None:
        with cond:
            while not ended:
                cond.wait()

    def reader(sock: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                data = sock.recv(4096)
                if not data:
                    return
                head += data
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))  # fmt: skip
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Protocol: juggler.0\r\n\r\n")  # fmt: skip
            cond, ended = threading.Condition(), []
            join = start(writer, (cond, ended))
            while True:
                data = sock.recv(4096)
                if not data or data[0] & 0x0F == 8:
                    break
            with cond:
                ended.append(True)
                cond.notify()
            join()
            try:
                sock.sendall(CLOSE_1000)
            except OSError:
                pass
        finally:
            sock.close()

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(socket.SOMAXCONN)
    print(f"websocket: ws://127.0.0.1:{args.port}/ws", flush=True)
    while True:
        sock, _ = listener.accept()
        start(reader, (sock,))


if __name__ == "__main__":
    main()
