"""The listener that the juggler server, the state-sync server and the metrics endpoints
share: its thread registry, its refusals and its shutdown."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from juggler.listener import Listener, helper_thread, start_thread

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
