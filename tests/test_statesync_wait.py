"""statesync.wait_remote_data: waiting for the peer's data, on either side of a connection."""

from __future__ import annotations

import queue

import pytest

from juggler import statesync
from juggler.exceptions import ConnectionClosed, JugglerTimeout

from .conftest import T

__all__: list[str] = []


@pytest.fixture
def pair():
    """A server that hands each connection to the test, and a client connected to it."""
    conns: queue.Queue = queue.Queue()
    server = statesync.listen("127.0.0.1", 0, lambda conn: (conns.put(conn), conn.wait_closed()))
    client = statesync.connect(server.url, autoflush_delay=0)
    try:
        yield client, conns.get(timeout=T(10))
    finally:
        client.close()
        server.close()


def test_it_returns_the_first_data_and_waits_for_what_until_accepts(pair):
    client, theirs = pair
    assert client.remote_data is None
    theirs.set_local_data({"count": 0})
    assert statesync.wait_remote_data(client, timeout=T(10)) == {"count": 0}
    assert statesync.wait_remote_data(client, timeout=T(10)) == {"count": 0}  # at once: it is there

    def bump():
        for n in range(1, 4):
            theirs.set_local_data({"count": n})

    bump()
    assert statesync.wait_remote_data(client, lambda d: d["count"] == 3, timeout=T(10)) == {"count": 3}
    # the server's side waits the same way
    client.set_local_data([1])
    assert statesync.wait_remote_data(theirs, timeout=T(10)) == [1]


def test_it_times_out_with_a_timeout_error(pair):
    client, _ = pair
    with pytest.raises(JugglerTimeout, match="no such remote data within 0.05 s: None"):
        statesync.wait_remote_data(client, timeout=0.05)
    with pytest.raises(TimeoutError):
        statesync.wait_remote_data(client, timeout=0)


def test_it_ends_with_the_connection(pair):
    client, theirs = pair
    theirs.close(1001, "going away")
    with pytest.raises(ConnectionClosed) as info:
        statesync.wait_remote_data(client, timeout=T(10))
    assert info.value.code == 1001
    # and at once, for a connection already over
    with pytest.raises(ConnectionClosed):
        statesync.wait_remote_data(client, lambda d: d == "never", timeout=T(10))
