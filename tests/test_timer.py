"""The server's timer thread (juggler.timer): callbacks at their deadlines, cancelled ones
dropped and let go."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from juggler.timer import Timer

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
