"""Channel history (issue 21): the Python client recovers by itself across a reconnect."""

from __future__ import annotations

import logging
import threading

import pytest

import juggler
from juggler import Client, RedisBroker, Server
from juggler.layout import epoch_key, history_key

from .conftest import T, free_port

HISTORY = ["chat.*=100,60s"]


@pytest.fixture
def servers(real):
    """Servers on one port with history, one after the other; all shut down at the end."""
    port = free_port()
    started: list[Server] = []

    def start() -> Server:
        s = Server(RedisBroker(real), port=port, history=HISTORY).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.shutdown()


class Back:
    """on_reconnect: set once the client is back (with its subscriptions renewed)."""

    def __init__(self) -> None:
        self.count = 0
        self.cond = threading.Condition()

    def __call__(self, client, lost) -> None:
        if lost is None:
            with self.cond:
                self.count += 1
                self.cond.notify_all()

    def wait(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.count >= n, T(20))


def test_a_reconnecting_client_recovers_what_was_published_meanwhile(servers, real, caplog):
    server = servers()
    back = Back()
    client = Client.connect(server.url, reconnect=True, on_reconnect=back, connect_timeout=T(10))
    gaps = []
    try:
        sub = client.sub("chat.a", on_gap=gaps.append)
        assert sub.resume.position is not None and sub.resume.position.offset == "0-0"
        for i in range(3):
            juggler.publish(real, "chat.a", i)
        assert [sub.get(T(5)).args for _ in range(3)] == [0, 1, 2]
        server.shutdown()
        for i in range(3, 8):  # while the client is away
            juggler.publish(real, "chat.a", i)
        servers()
        back.wait(1)
        juggler.publish(real, "chat.a", 8)
        got = [sub.get(T(5)) for _ in range(6)]
        assert [e.args for e in got] == [3, 4, 5, 6, 7, 8]
        assert all(got[i].offset < got[i + 1].offset for i in range(5))
        assert sub.gaps == 0 and gaps == []
        with pytest.raises(TimeoutError):
            sub.get(0.2)  # no duplicate
    finally:
        client.close()


def test_a_failed_recovery_is_reported_on_the_subscription(servers, real, caplog):
    caplog.set_level(logging.WARNING, logger="juggler.client")
    server = servers()
    back = Back()
    client = Client.connect(server.url, reconnect=True, on_reconnect=back, connect_timeout=T(10))
    gaps = []
    try:
        sub = client.sub("chat.g", on_gap=gaps.append)
        juggler.publish(real, "chat.g", 0)
        assert sub.get(T(5)).args == 0
        server.shutdown()
        juggler.publish(real, "chat.g", 1)
        real.delete(history_key("chat.g"), epoch_key("chat.g"))  # the history is lost
        servers()
        back.wait(1)
        assert sub.gaps == 1 and gaps == [sub]
        assert "events published while reconnecting are lost" in caplog.text
        juggler.publish(real, "chat.g", 2)
        ev = sub.get(T(5))
        assert ev.args == 2 and ev.epoch == sub.resume.position.epoch
    finally:
        client.close()
