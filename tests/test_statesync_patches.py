"""juggler.statesync at scale: set_local_data keeps a reference, and a server's connections share
one patch per change (the PatchCache). Correctness across the shared patches: connections at
different last-sent states, a connection that joins mid-stream, a value changed in place despite
the rules, what is not JSON, big and small states, and hat-juggler's clients on the same patches."""

from __future__ import annotations

import logging
import queue
import threading

import pytest

from juggler import statesync

from .conftest import T
from .statesync_util import HatLoop, Watch, WireTap, get, same
from .test_statesync import serve  # noqa: F401  (a fixture)


class App:
    """A server application that gives every connection the current state: on_connection
    hands it over, :meth:`publish` hands a new one to all (as docs/statesync.rst shows)."""

    def __init__(self, state=None) -> None:
        self.lock = threading.Lock()
        self.state = state
        self.conns: list[statesync.Connection] = []
        self.arrived: "queue.Queue[statesync.Connection]" = queue.Queue()

    def on_connection(self, conn: statesync.Connection) -> None:
        with self.lock:
            self.conns.append(conn)
            if self.state is not None:
                conn.set_local_data(self.state)
        self.arrived.put(conn)

    def publish(self, state) -> None:
        with self.lock:
            self.state = state
            for conn in self.conns:
                conn.set_local_data(state)


@pytest.fixture
def servers(serve):
    """``servers(app, **listen_kw)``: a server for ``app``; ``servers.connect(url)`` a client.
    Every one is closed at teardown (by test_statesync's ``serve``)."""

    def start(app: App, **kw):
        return serve(app.on_connection, **kw)

    start.connect = serve.connect
    return start


def changed(state: dict, key: str, value) -> dict:
    """A new state with ``items[key] = value``, sharing every other part with ``state``."""
    return {**state, "seq": state["seq"] + 1, "items": {**state["items"], key: value}}


def big_state(n: int) -> dict:
    return {"seq": 0, "items": {f"k{i}": {"name": f"item {i:06d}", "tags": ["a", "b"], "on": i % 2 == 0} for i in range(n)}}


def test_one_patch_per_change_for_every_connection(servers):
    app = App(big_state(50))
    server = servers(app, autoflush_delay=0)  # a DATA per change, so each connection sends each change
    clients = [servers.connect(server.url) for _ in range(5)]
    for _ in clients:
        get(app.arrived)
    watches = [Watch(c) for c in clients]
    for w in watches:
        w.equals(app.state)
    assert server.patches.computed == 1  # the initial state: None -> state, once for all five
    state = app.state
    for i in range(10):
        state = changed(state, f"k{i}", {"name": "changed", "n": i})
        app.publish(state)
    for w in watches:
        w.equals(state)
    assert server.patches.computed == 11
    assert all(conn.data_sent == 11 for conn in app.conns)


def test_connections_at_different_last_sent_states_and_ones_that_join_later(servers):
    app = App()
    server = servers(app, autoflush_delay=None)  # sent on flush only: each connection where we want it
    a = servers.connect(server.url)
    sa = get(app.arrived)
    b = servers.connect(server.url)
    sb = get(app.arrived)
    wa, wb = Watch(a), Watch(b)
    s1 = {"seq": 1, "items": {"x": [1, 2, 3], "y": {"z": True}}}
    s2 = {**s1, "seq": 2, "items": {**s1["items"], "x": [1, 3]}}
    s3 = {**s2, "seq": 3, "items": {**s2["items"], "y": {"z": 1}}}  # True -> 1: a change on the wire
    s4 = {"seq": 4, "items": {**s3["items"], "w": "new"}}
    for conn in (sa, sb):
        conn.set_local_data(s1)
        conn.flush_local_data()
    for s in (s2, s3):
        sb.set_local_data(s)
        sb.flush_local_data()
    wa.equals(s1)
    wb.equals(s3)
    assert server.patches.computed == 3  # None->s1 (shared), s1->s2, s2->s3
    app.publish(s4)
    for conn in (sa, sb):
        conn.flush_local_data()  # a goes s1 -> s4, b s3 -> s4: two different patches
    wa.equals(s4)
    wb.equals(s4)
    assert server.patches.computed == 5
    # two connections join now: both start from nothing, and share that patch
    c, d = servers.connect(server.url), servers.connect(server.url)
    for _ in range(2):
        get(app.arrived).flush_local_data()
    Watch(c).equals(s4)
    Watch(d).equals(s4)
    assert server.patches.computed == 6
    assert [conn.data_sent for conn in app.conns] == [2, 4, 1, 1]


def test_a_client_that_joins_mid_stream_converges(servers):
    app = App(big_state(200))
    server = servers(app, autoflush_delay=0.01)
    first = servers.connect(server.url)
    get(app.arrived)
    stop = threading.Event()
    final = []

    def produce() -> None:  # as fast as it can, while clients join
        state, i = app.state, 0
        while not stop.is_set() or i < 50:
            state = changed(state, f"k{i % 200}", {"name": "changed", "n": i})
            app.publish(state)
            i += 1
        final.append(state)

    producer = threading.Thread(target=produce, name="test-producer")
    producer.start()
    try:
        late = [servers.connect(server.url) for _ in range(4)]
        for _ in late:
            get(app.arrived)
    finally:
        stop.set()
        producer.join()
    for conn in [first, *late]:
        Watch(conn).equals(final[0])


def test_a_value_changed_in_place_despite_the_rules(servers):
    """What docs/statesync.rst says happens: the change in place goes unseen, the peer catches
    up on what later values change, and a patch made from the changed object may not apply
    to what the peer has (it closes the connection, 1007)."""
    app = App()
    server = servers(app, autoflush_delay=None)
    client = servers.connect(server.url)
    conn = get(app.arrived)
    watch = Watch(client)
    state = {"a": 1, "b": [1]}
    conn.set_local_data(state)
    conn.flush_local_data()
    watch.equals({"a": 1, "b": [1]})
    state["a"] = 2  # against the rules
    conn.set_local_data(state)
    conn.flush_local_data()  # the object the peer got: nothing to send
    conn.set_local_data({"a": 2, "b": [1]})
    conn.flush_local_data()  # equal to the changed object: nothing to send either
    assert conn.data_sent == 1
    assert same(client.remote_data, {"a": 1, "b": [1]})  # the peer missed the change
    conn.set_local_data({"a": 3, "b": [1]})
    conn.flush_local_data()
    watch.equals({"a": 3, "b": [1]})  # and catches up on what a later value changes
    state = {"x": 1}
    conn.set_local_data(state)
    conn.flush_local_data()
    watch.equals({"x": 1})
    del state["x"]
    state["y"] = 1  # against the rules, again
    conn.set_local_data({"y": 2})
    conn.flush_local_data()  # "replace /y": the peer has no y
    assert conn.wait_closed(T(10))
    assert client.close_code == 1007 and "patch does not apply" in client.close_reason


def test_what_is_not_json_is_logged_once_for_all_connections(servers, caplog):
    app = App({"ok": True})
    server = servers(app, autoflush_delay=None)
    clients = [servers.connect(server.url) for _ in range(3)]
    for _ in clients:
        get(app.arrived).flush_local_data()
    for c in clients:
        Watch(c).equals({"ok": True})
    with caplog.at_level(logging.ERROR, logger="juggler.statesync"):
        app.publish({"ok": True, "bad": {1, 2}})
        for conn in app.conns:
            with pytest.raises(TypeError, match="not JSON"):
                conn.flush_local_data()
    assert len([r for r in caplog.records if "local data not sent" in r.getMessage()]) == 1
    app.publish({"ok": False})
    for conn in app.conns:
        conn.flush_local_data()
    for c in clients:
        Watch(c).equals({"ok": False})
        assert not c.closed


def test_big_and_small_states(servers):
    app = App()
    server = servers(app, autoflush_delay=0)
    tap = WireTap(server.port)
    tapped = servers.connect(f"ws://127.0.0.1:{tap.port}/ws")
    others = [servers.connect(server.url) for _ in range(2)]
    clients = [tapped, *others]
    for _ in clients:
        get(app.arrived)
    watches = [Watch(c) for c in clients]
    try:
        state = big_state(8000)  # about 0.5 MB of JSON
        app.publish(state)
        for w in watches:
            w.equals(state, timeout=30)
        for i in range(5):
            state = changed(state, f"k{i * 1000}", None)
            app.publish(state)
        for w in watches:
            w.equals(state, timeout=30)
        for value in (1, True, 1.0, "x", [], {}, None, [1, [True]], [1, [1]], 0):
            app.publish(value)
            for w in watches:
                w.equals(value)
        sizes = [len(p) for op, p in tap.frames("down") if op == 1]
        assert sizes[0] > 400_000 and max(sizes[1:6]) < 200  # the whole state once, then small patches
    finally:
        tap.close()


def test_hat_clients_and_ours_on_the_same_shared_patches(servers):
    hj = pytest.importorskip("hat.juggler", reason="hat-juggler is a test dependency (pip install '.[test]')")
    hat = HatLoop()
    theirs = []
    try:
        app = App(big_state(100))
        server = servers(app, autoflush_delay=None)  # each change flushed to all below
        theirs = [hat.run(hj.connect(server.url, autoflush_delay=0)) for _ in range(3)]
        ours = [servers.connect(server.url) for _ in range(2)]
        for _ in range(5):
            get(app.arrived).flush_local_data()
        watches = [Watch(c, lambda cb, c=c: hat.call(c.register_change_cb, cb)) for c in theirs] + [Watch(c) for c in ours]
        state = app.state
        for i in range(30):
            state = changed(state, f"k{(i * 7) % 120}", [i, {"i": i}] if i % 3 else None)
            if i % 10 == 5:
                state = {**state, "items": {k: v for k, v in state["items"].items() if k != f"k{i}"}}
            app.publish(state)
            for conn in app.conns:
                conn.flush_local_data()
        for w in watches:
            w.equals(state)
        assert server.patches.computed == 31  # the first state and 30 changes: once each, for all five
    finally:
        for c in theirs:
            hat.run(c.async_close())
        hat.close()


@pytest.mark.parametrize("size, computed", [(16, 2), (1, 3)])
def test_a_patch_pushed_out_of_the_cache_is_made_again(servers, size, computed):
    app = App()
    server = servers(app, autoflush_delay=None, patch_cache_size=size)
    a = servers.connect(server.url)
    sa = get(app.arrived)
    b = servers.connect(server.url)
    sb = get(app.arrived)
    s1 = {"n": 1, "items": list(range(100))}
    s2 = {**s1, "n": 2}
    app.publish(s1)
    sa.flush_local_data()  # None -> s1
    sa.set_local_data(s2)
    sa.flush_local_data()  # s1 -> s2: with room for one patch only, None -> s1 goes
    sb.flush_local_data()  # None -> s1 again: from the cache, or made again
    Watch(a).equals(s2)
    Watch(b).equals(s1)
    assert server.patches.computed == computed
