"""Out of threads is a refusal, not a collapse (issue 20): when the process cannot start a
thread, the one connection (or request) that needed it is refused, everything else keeps
working, and shutdown completes.

Here starting a thread fails on purpose for the threads a test names, where CPython fails
(``threading._start_new_thread``, which a connection's quick start calls too); the last test
runs a server in a process whose address space is too small for more thread stacks."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from typing import Iterator
from unittest import mock

import pytest

from juggler import Client
from juggler.exceptions import ConnectionClosed, HandshakeError, NackError

from .conftest import T
from .test_idle import HANDSHAKE


@contextlib.contextmanager
def failing_thread_starts(pattern: str, times: int = 1) -> Iterator[list[str]]:
    """Starting a thread raises what CPython raises when the process is out of threads, for
    the next ``times`` threads whose name matches ``pattern``; yields the names it failed.
    It fails in ``threading._start_new_thread``, as CPython 3.9-3.12 does, so both
    ``Thread.start`` and :func:`juggler.listener.start_thread`'s quick start meet it; where
    that name is missing (Python 3.13), in ``Thread.start``."""
    lock = threading.Lock()
    failed: list[str] = []

    def fails(t: object) -> bool:
        if isinstance(t, threading.Thread) and re.fullmatch(pattern, t.name):
            with lock:
                if len(failed) < times:
                    failed.append(t.name)
                    return True
        return False

    real_new = getattr(threading, "_start_new_thread", None)
    if real_new is not None:

        def start_new_thread(function, *args):  # type: ignore[no-untyped-def]
            if fails(getattr(function, "__self__", None)):  # (function: the thread's _bootstrap)
                raise RuntimeError("can't start new thread")
            return real_new(function, *args)

        with mock.patch.object(threading, "_start_new_thread", start_new_thread):
            yield failed
        return
    real = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if fails(self):
            raise RuntimeError("can't start new thread")
        real(self)

    with mock.patch.object(threading.Thread, "start", start):
        yield failed


def handshake(host: str, port: int) -> bytes:
    """A websocket handshake's whole answer, up to the server's close (or the 101's end)."""
    with socket.create_connection((host, port), timeout=T(10)) as s:
        s.sendall(HANDSHAKE)
        data = b""
        while b"\r\n\r\n" not in data or (data.startswith(b"HTTP/1.1 5") and not data.endswith(b"\n\n")):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def shutdown_promptly(server) -> None:
    started = time.monotonic()
    server.shutdown()
    assert time.monotonic() - started < T(5)


@pytest.mark.parametrize("thread", [r"juggler-conn-127\.0\.0\.1:\d+", r"juggler-conn-\d+-writer"])
def test_no_thread_for_a_connection_gets_it_a_503(make_stack, thread):
    stack = make_stack(max_connections=2, close_timeout=0.5)
    server = stack.server
    first = stack.client()
    assert first.call("test.echo", 1, timeout=T(10)) == 1
    with failing_thread_starts(thread) as failed:
        answer = handshake(server.host, server.port)
    assert failed, "no thread was started by that name"
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
    assert answer.endswith(b"\r\n\r\nserver out of threads\n"), answer
    assert server.stats.snapshot().get("refused_503") == 1
    # the others are served, and the refused one's slot was given back: a second fits
    assert first.call("test.echo", 2, timeout=T(10)) == 2
    assert stack.client().call("test.echo", 3, timeout=T(10)) == 3
    assert len(server.connections) == 2
    shutdown_promptly(server)


def test_no_thread_for_the_results_listener_nacks_the_call_and_closes(make_stack):
    stack = make_stack(close_timeout=0.5)
    other = stack.client()
    assert other.call("test.echo", "before", timeout=T(10)) == "before"
    c = stack.client()
    dedicated, closed_brokers = stack.broker.dedicated, []

    def spy(*args, **kw):  # each results listener's own redis connection, and whether it was closed
        broker = dedicated(*args, **kw)
        close = broker.close
        broker.close = lambda: (closed_brokers.append(broker), close())
        return broker

    with mock.patch.object(stack.broker, "dedicated", spy), failing_thread_starts(r"juggler-conn-\d+-results") as failed:
        with pytest.raises(NackError) as nack:
            c.call("test.echo", 1, timeout=T(10))
        assert failed
        assert nack.value.code == 503 and nack.value.message == "server out of threads"
        assert c.wait_closed(T(10))
        with pytest.raises(ConnectionClosed) as closed:
            c.call("test.echo", 2, timeout=T(10))
        assert closed.value.code == 1013 and closed.value.reason == "server out of threads"
        assert len(closed_brokers) == 1  # its redis connection was given back
    assert other.call("test.echo", "after", timeout=T(10)) == "after"
    assert len(stack.server.connections) == 1
    shutdown_promptly(stack.server)


def test_no_thread_for_the_pubsub_reader_nacks_the_sub(make_stack):
    stack = make_stack(close_timeout=0.5)
    c = stack.client()
    with failing_thread_starts(r"juggler-server-pubsub") as failed:
        with pytest.raises(NackError) as nack:
            c.sub("news")
    assert failed
    assert nack.value.code == 500 and "cannot start the pub-sub reader: can't start new thread" in nack.value.message
    sub = c.sub("news")  # the connection is still open, and the next SUB starts the reader
    c.pub("news", "hello")
    assert sub.get(T(10)).args == "hello"
    shutdown_promptly(stack.server)


def test_no_thread_for_a_metrics_request_gets_it_a_503(make_stack):
    stack = make_stack(metrics_listen="127.0.0.1:0")
    url = stack.server.metrics_url + "/healthz"
    with failing_thread_starts(r"juggler-server-metrics-\d+") as failed:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=T(10))
    refused.value.close()
    assert failed and refused.value.code == 503
    with urllib.request.urlopen(url, timeout=T(10)) as answer:
        assert answer.status == 200
    shutdown_promptly(stack.server)


# -- a process that really runs out --------------------------------------------------------

# A server in a process whose address space is limited (RLIMIT_AS) so that exactly ROOM more
# thread stacks fit: it starts threads until one fails, then lets ROOM of them go. Its heap is
# kept apart (malloc only, one arena, a reserve never given back), so that what fails is the
# thread stacks, as when kernel.pid_max or vm.max_map_count run out, and not every allocation.
SERVER = textwrap.dedent(
    r"""
    import resource, sys, threading, time
    import redis
    from juggler import Callee, RedisBroker, Server

    def echo(args):
        return args

    threading.stack_size(8 << 20)  # what the C library gives by default, whatever the host's
    broker = RedisBroker(redis.Redis.from_url(sys.argv[1]))
    server = Server(broker, max_connections=0, close_timeout=0.5)
    callee = Callee(broker, workers=2)
    callee.register("test.echo", echo)
    server.start()
    callee.start()
    reserve = bytearray(48 << 20)  # grows the heap by 48 MiB, given back to malloc (not the system)
    del reserve
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + 40 * (8 << 20), resource.RLIM_INFINITY))
    ballast = []
    while True:  # take every thread there is room for, then give ROOM back
        stop = threading.Event()
        t = threading.Thread(target=stop.wait, name="ballast")
        try:
            t.start()
        except RuntimeError:
            break
        ballast.append((t, stop))
    for t, stop in ballast[: int(sys.argv[2])]:
        stop.set()
        t.join()
    print(server.url, len(ballast), flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    server.shutdown()
    callee.stop()
    print(f"stopped in {time.monotonic() - started:.2f} s", flush=True)
    for t, stop in ballast:
        stop.set()
        t.join()
    """
)


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def wait_threads(pid: int, n: int) -> None:
    """Until process ``pid`` is down to ``n`` threads (a refused connection's thread ends a
    moment after its refusal was sent)."""
    deadline = time.monotonic() + T(10)
    while threads(pid) > n:
        assert time.monotonic() < deadline, f"{threads(pid)} threads, not {n}"
        time.sleep(0.01)


def connect_when_threads_are_back(url: str) -> Client:
    """A client, once the threads of the connections that closed are back (a thread's stack
    is free once its thread has exited, a moment after its connection ended)."""
    deadline = time.monotonic() + T(10)
    while True:
        try:
            return Client.connect(url, connect_timeout=T(10))
        except HandshakeError as exc:
            assert exc.status == 503 and time.monotonic() < deadline, exc
            time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and thread stacks as Linux has them")
@pytest.mark.parametrize("fails", ["reader", "writer"])
def test_a_process_out_of_threads_refuses_connections_and_still_stops(real, redis_server, fails):
    # reader: room for 2 threads, a's reader and writer; then b's reader cannot start, nor a's
    # results listener. writer: room for 4, a's 2 and the pub-sub reader; b's reader takes the
    # last, and b's writer cannot start.
    room = {"reader": 2, "writer": 4}[fails]
    env = {**os.environ, "PYTHONMALLOC": "malloc", "MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
           "MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TOP_PAD_": str(1 << 20)}  # fmt: skip
    p = subprocess.Popen([sys.executable, "-c", SERVER, redis_server.url, str(room)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    clients: list[Client] = []
    try:
        line = p.stdout.readline().split()
        assert line and line[0].startswith("ws://"), p.stderr.read() if p.poll() is not None else line
        url = line[0]
        assert int(line[1]) > room  # the address space had room for more threads than are left
        a = Client.connect(url, connect_timeout=T(10))
        clients.append(a)
        if fails == "writer":
            sub = a.sub("news")  # the server's pub-sub reader: a thread
        before = threads(p.pid)
        with pytest.raises(HandshakeError) as refused:  # no thread for b's reader, or for its writer
            Client.connect(url, connect_timeout=T(10))
        assert refused.value.status == 503
        wait_threads(p.pid, before)
        if fails == "reader":
            with pytest.raises(NackError) as nack:  # no thread for a's results listener
                a.call("test.echo", 1, timeout=T(10))
            assert nack.value.code == 503
            assert a.wait_closed(T(10))
        else:  # a still works: b's reader gave its thread back, and a's results listener takes it
            a.pub("news", "still here")
            assert sub.get(T(10)).args == "still here"
            assert a.call("test.echo", 1, timeout=T(10)) == 1
            with pytest.raises(HandshakeError) as refused:  # and that was the last thread
                Client.connect(url, connect_timeout=T(10))
            assert refused.value.status == 503
            a.close()
        c = connect_when_threads_are_back(url)  # a's threads are back
        clients.append(c)
        assert c.pub("news", "again")
        if fails == "writer":  # with a's results listener's thread, c's call has one too
            assert c.call("test.echo", "again", timeout=T(10)) == "again"
        p.stdin.write("\n")
        p.stdin.flush()
        line = p.stdout.readline()
        assert p.wait(T(20)) == 0, p.stderr.read()
        assert line.startswith("stopped in "), line
        assert float(line.split()[2]) < T(5)
        err = p.stderr.read()
        assert "cannot start a thread for" in err, err
        if fails == "reader":
            assert "cannot start its results listener" in err, err
    finally:
        for c in clients:
            c.close()
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()
        p.stdin.close()
