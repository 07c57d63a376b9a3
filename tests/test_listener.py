"""The listener that the juggler server, the state-sync server and the metrics endpoints
share: its thread registry, its refusals and its shutdown."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import warnings
from unittest import mock

import pytest

from juggler import listener as listener_module
from juggler.listener import QUICK_START, Listener, helper_thread, start_thread

from .conftest import T
from .test_out_of_threads import failing_thread_starts

log = logging.getLogger("test.listener")


def answer(listener: Listener, send: bytes = b"") -> bytes:
    with socket.create_connection((listener.host, listener.port), timeout=T(10)) as s:
        if send:
            s.sendall(send)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


def test_each_connection_runs_on_a_named_thread_and_close_joins_them():
    names: list[str] = []

    def serve(sock: socket.socket, address) -> None:
        names.append(threading.current_thread().name)
        sock.sendall(b"hi")

    listener = Listener("127.0.0.1", 0, serve, name="test-listener-accept", conn_name="test-listener-{n}", logger=log)
    try:
        assert listener.start() is True and listener.start() is False
        assert answer(listener) == b"hi" and answer(listener) == b"hi"
        assert names == ["test-listener-1", "test-listener-2"]
    finally:
        assert listener.close() is True
    assert listener.close() is False  # idempotent
    assert not any(t.name.startswith("test-listener") for t in threading.enumerate())
    with pytest.raises(RuntimeError):
        listener.start()


@pytest.mark.parametrize("helper_threads", [True, False])
def test_a_connection_thread_starts_its_helper_made_on_the_accept_thread(helper_threads):
    """With helper_threads, the first helper_thread() of a connection's thread hands out the
    thread object the accept thread made for it (so its making does not deepen the
    connection thread's C stack), named and running what it is given; a second call, or a
    listener without helper_threads, makes a new one. Either way it is joined, and gone."""
    seen: list = []

    def serve(sock: socket.socket, address) -> None:
        made = threading.current_thread().helper
        ran: list[str] = []
        first = helper_thread(lambda: ran.append(threading.current_thread().name), "test-listener-helper")
        second = helper_thread(lambda: None, "test-listener-helper-2")
        start_thread(first)
        first.join()
        seen.append((made is not None, first is made, second is not first, first.daemon, ran))
        sock.sendall(b"hi")

    listener = Listener("127.0.0.1", 0, serve, name="test-listener-accept", conn_name="test-listener-{n}", logger=log,
                        helper_threads=helper_threads)  # fmt: skip
    listener.start()
    try:
        assert answer(listener) == b"hi"
    finally:
        listener.close()
    assert seen == [(helper_threads, helper_threads, True, True, ["test-listener-helper"])]
    assert not any(t.name.startswith("test-listener") for t in threading.enumerate())


def test_close_wakes_what_is_registered_and_refuses_what_registers_after():
    registered = threading.Event()
    went: list[bool] = []

    def serve(sock: socket.socket, address) -> None:
        assert listener.register(sock, lambda: sock.shutdown(socket.SHUT_RDWR))
        registered.set()
        went.append(sock.recv(10) == b"")  # woken by close(), not by the peer
        assert not listener.register(object(), lambda: None)  # closing: not registered
        listener.unregister(sock)

    listener = Listener("127.0.0.1", 0, serve, name="test-listener-accept", conn_name="test-listener-{n}", logger=log)
    listener.start()
    with socket.create_connection((listener.host, listener.port), timeout=T(10)):
        assert registered.wait(T(10))
        assert len(listener.members()) == 1 and listener.thread_count() == 1
        listener.close()
    assert went == [True] and listener.members() == [] and listener.thread_count() == 0


def test_beyond_its_threads_or_out_of_them_a_connection_gets_503_at_once():
    release = threading.Event()
    refused: list[str] = []

    def serve(sock: socket.socket, address) -> None:
        release.wait(T(10))

    listener = Listener("127.0.0.1", 0, serve, name="test-listener-accept", conn_name="test-listener-{n}", logger=log,
                        max_threads=1, on_refused=refused.append)  # fmt: skip
    listener.start()
    try:
        with failing_thread_starts(r"test-listener-\d+") as failed:
            assert answer(listener).endswith(b"\r\n\r\nserver out of threads\n")
        assert failed
        held = socket.create_connection((listener.host, listener.port), timeout=T(10))
        try:
            assert answer(listener).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")  # beyond max_threads
        finally:
            release.set()
            held.close()
        assert refused == ["503", "503"]
    finally:
        release.set()
        listener.close()


def test_quick_start_is_what_cpython_3_9_to_3_12_allow():
    assert QUICK_START is (sys.implementation.name == "cpython" and sys.version_info[:2] < (3, 13))


@pytest.mark.skipif(not QUICK_START, reason="threads start as usual on this Python (QUICK_START)")
def test_a_thread_started_quickly_is_joined_even_before_it_runs():
    """start_thread does not wait for a connection's thread to run; as after Thread.start,
    it is alive and listed by threading.enumerate() from then on, and joining it waits for
    it to start, then to end (a join with a timeout returns at that timeout)."""
    gate = threading.Event()
    real = threading._start_new_thread  # type: ignore[attr-defined]

    def late_start(function, args):  # type: ignore[no-untyped-def]
        return real(lambda: (gate.wait(T(10)), function(*args)), ())

    ran: list[str] = []
    t = helper_thread(lambda: ran.append(threading.current_thread().name), "test-listener-quick")
    with mock.patch.object(threading, "_start_new_thread", late_start):
        start_thread(t)
    assert t in threading.enumerate() and t.is_alive()  # listed and alive, not running yet
    t.join(0.05)
    assert ran == [] and t.is_alive()
    with pytest.raises(RuntimeError, match="only be started once"):
        start_thread(t)
    joined = threading.Thread(target=t.join, name="test-listener-joiner")
    joined.start()
    gate.set()
    joined.join(T(10))
    assert not joined.is_alive() and not t.is_alive()
    assert ran == ["test-listener-quick"]
    assert t._started is listener_module._STARTED  # its own Event dropped once it ran
    assert t not in threading.enumerate()


@pytest.mark.skipif(not QUICK_START, reason="threads start as usual on this Python (QUICK_START)")
def test_a_quick_start_that_fails_leaves_nothing_behind():
    t = helper_thread(lambda: None, "test-listener-unstarted")
    with failing_thread_starts("test-listener-unstarted") as failed:
        with pytest.raises(RuntimeError, match="can't start new thread"):
            start_thread(t)
    assert failed == ["test-listener-unstarted"]
    assert t not in threading.enumerate() and not t.is_alive()
    with pytest.raises(RuntimeError, match="before it is started"):
        t.join()  # as for a Thread whose start() failed


@pytest.mark.skipif(not QUICK_START or not hasattr(os, "fork"), reason="quick start, and os.fork")
def test_a_thread_that_had_not_run_when_the_process_forked_is_not_alive_in_the_child():
    """In a forked child only the forking thread lives: a quick-started thread that had not
    run yet never will, so it is not alive, and joining it fails at once (as for a Thread
    whose start failed) instead of waiting for ever."""
    gate = threading.Event()
    real = threading._start_new_thread  # type: ignore[attr-defined]

    def late_start(function, args):  # type: ignore[no-untyped-def]
        return real(lambda: (gate.wait(T(10)), function(*args)), ())

    t = helper_thread(lambda: None, "test-listener-forked")
    with mock.patch.object(threading, "_start_new_thread", late_start):
        start_thread(t)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # (3.12: fork with threads)
            pid = os.fork()
        if pid == 0:  # the child: only report, by exit status
            code = 1
            try:
                if not t.is_alive():
                    try:
                        t.join(1)
                    except RuntimeError:
                        code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        gate.set()
        t.join(T(10))
    assert not t.is_alive()
