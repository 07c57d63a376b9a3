"""The server's timer thread (juggler.timer): callbacks at their deadlines, cancelled ones
dropped and let go."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from juggler.timer import Keepalive, Timer

from .conftest import T

pytestmark = pytest.mark.timeout(30)


def test_callbacks_run_in_deadline_order_and_a_cancelled_one_never_runs():
    timer = Timer(name="juggler-test-timer").start()
    try:
        ran: list[str] = []
        done = threading.Event()
        timer.call_later(0.03, lambda: (ran.append("last"), done.set()))
        timer.call_later(0.01, lambda: ran.append("first"))
        timer.call_later(0.02, lambda: ran.append("cancelled")).cancel()
        assert done.wait(T(5))
        assert ran == ["first", "last"]
    finally:
        timer.stop()


def test_a_cancelled_handle_lets_go_of_its_callback_before_its_deadline():
    # (a closed connection's close deadline and keepalive wait in the heap until they are
    # due: their bound methods must not keep the connection's objects alive meanwhile)
    class Owner:
        def due(self) -> None:
            raise AssertionError("a cancelled callback ran")

    timer = Timer(name="juggler-test-timer").start()
    try:
        owner = Owner()
        gone = weakref.ref(owner)
        handle = timer.call_later(3600, owner.due)
        handle.cancel()
        handle.cancel()  # (idempotent)
        del owner
        gc.collect()
        assert gone() is None
        assert handle.cancelled and len(timer) == 0
    finally:
        timer.stop()


def test_a_cancelled_keepalive_lets_go_of_its_connection():
    """A connection holds its keepalive, whose callbacks are the connection's bound methods:
    cancelled (at the connection's teardown), it lets go of them, so a closed connection is
    freed at once, not when the garbage collector finds the cycle."""

    class Reader:
        last_recv = 0.0

    class Conn:
        def __init__(self, timer: Timer) -> None:
            self.reader = Reader()
            self.keepalive = Keepalive(timer, self.reader, 3600, 7200, ping=self.ping, idle=self.idle,
                                       closed=self.closed)  # fmt: skip

        def ping(self) -> None:
            raise AssertionError("a cancelled keepalive pinged")

        def idle(self, reason: str) -> None:
            raise AssertionError("a cancelled keepalive timed out")

        def closed(self) -> bool:
            return False

    timer = Timer(name="juggler-test-timer").start()
    gc.disable()
    try:
        conn = Conn(timer)
        conn.keepalive.start()
        gone = weakref.ref(conn)
        conn.keepalive.cancel()
        conn.keepalive.cancel()  # (idempotent)
        del conn
        assert gone() is None  # by reference counting alone: the collector is off
    finally:
        gc.enable()
        timer.stop()


def test_a_closed_connection_leaves_nothing_for_the_garbage_collector(make_stack):
    """Every object of a closed websocket is freed by reference counting, as it closes: none
    waits in a reference cycle for the collector (each used to leave about 24, the writer's
    Thread among them)."""
    from juggler.conn import Conn

    stack = make_stack()
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            client = stack.client()
            client.pub("gc", 1)  # (ACKed: open and registered)
            client.close()
        assert _wait(lambda: not stack.server.connections and stack.server.connection_thread_count() == 0)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, (Conn, Keepalive, threading.Thread))]
        assert left == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _wait(done, timeout: float = T(10)) -> bool:
    import time

    end = time.monotonic() + timeout
    while not done():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)  # (threads that end: nothing to wait on)
    return True
