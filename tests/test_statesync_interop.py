"""juggler.statesync against its real peer, hat-juggler 0.5.13, both ways: their client with our
server and our client with their server. hat-juggler runs on asyncio on a thread of the test
process; a wire tap between the two counts the frames that cross."""

from __future__ import annotations

import queue
import sys

import pytest

from juggler import statesync

from .conftest import T, free_port, import_or_skip
from .statesync_util import HatLoop, HatPeer, OurPeer, WireTap, get, same

hj = import_or_skip(
    "hat.juggler",
    "hat-juggler is not installed: pip install '.[test]' installs it on Python 3.9 to 3.11 "
    "(it has no wheels for later versions)",
    installable=sys.version_info < (3, 12),  # (setup.cfg's test extra: python_version < "3.12")
)


def boom(*args):
    raise RuntimeError(f"failed on purpose: {args}")


ACTIONS = {"add": lambda a, b: a + b, "fail": boom, "echo": lambda *args: list(args)}

PAIRINGS = ["their-client-our-server", "our-client-their-server"]


@pytest.fixture(scope="module")
def hat():
    loop = HatLoop()
    yield loop
    loop.close()


class Pair:
    """Our peer and theirs, connected through a wire tap; ``ours_dir`` is the direction of
    the frames we send on it."""

    def __init__(self, hat: HatLoop, pairing: str, ours_delay, theirs_delay) -> None:
        self.hat = hat
        self.pairing = pairing
        self.server = self.their_server = self.tap = None
        conns: "queue.Queue" = queue.Queue()
        if pairing == "their-client-our-server":
            self.server = statesync.listen("127.0.0.1", 0, conns.put, autoflush_delay=ours_delay)
            self.tap = WireTap(self.server.port)
            their_conn = hat.run(hj.connect(f"ws://127.0.0.1:{self.tap.port}/ws", autoflush_delay=theirs_delay))
            their_rpc = hat.call(hj.RpcConnection, their_conn, ACTIONS)
            self.ours = OurPeer(get(conns), ACTIONS)
            self.ours_dir, self.theirs_dir = "down", "up"
        else:

            def on_connection(conn):
                conns.put((conn, hj.RpcConnection(conn, ACTIONS)))

            port = free_port()
            self.their_server = hat.run(hj.listen("127.0.0.1", port, on_connection, autoflush_delay=theirs_delay))
            self.tap = WireTap(port)
            self.ours = OurPeer(statesync.connect(f"ws://127.0.0.1:{self.tap.port}/ws", autoflush_delay=ours_delay), ACTIONS)
            their_conn, their_rpc = get(conns)
            self.ours_dir, self.theirs_dir = "up", "down"
        self.theirs = HatPeer(hat, their_conn, their_rpc)

    def close(self) -> None:
        try:
            self.ours.close()
            self.theirs.close()
        finally:
            if self.server is not None:
                self.server.close()
            if self.their_server is not None:
                self.hat.run(self.their_server.async_close())
            self.tap.close()


@pytest.fixture
def make_pair(hat):
    made = []

    def make(pairing: str, ours_delay=0, theirs_delay=0) -> Pair:
        p = Pair(hat, pairing, ours_delay, theirs_delay)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# Nested objects, lists, scalars and back to null; keys that JSON Pointer must escape; 1 vs True.
STEPS = [
    {"a": {"b": [1, 2, {"c": None}]}, "s": "x"},
    {"a": {"b": [2, {"c": [True, False]}], "n": 1.5}, "s": "x"},
    {"a": {"b": [2, {"c": [1, 0]}], "n": 1.5}, "a/b": {"c~d": "é ✓"}},
    [1, "two", 3.5, True, None, {"k": []}],
    ["two", 1, {"k": [{}]}, None],
    42,
    "text",
    True,
    {},
    None,
]


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("sender", ["ours", "theirs"])
def test_data_syncs_nested_lists_scalars_and_back_to_null(make_pair, pairing, sender):
    pair = make_pair(pairing)
    src, dst = (pair.ours, pair.theirs) if sender == "ours" else (pair.theirs, pair.ours)
    watch = dst.watch()
    for value in STEPS:
        src.set_local_data(value)
        assert same(watch.equals(value), value)
    assert dst.remote_data is None
    # every change went out as a patch of its own (autoflush_delay 0 on both sides)
    direction = pair.ours_dir if sender == "ours" else pair.theirs_dir
    assert len(pair.tap.messages(direction, "DATA")) == len(STEPS)


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_both_sides_sync_at_once(make_pair, pairing):
    pair = make_pair(pairing)
    ours, theirs = pair.ours.watch(), pair.theirs.watch()
    pair.ours.set_local_data({"side": "ours", "n": [1]})
    pair.theirs.set_local_data({"side": "theirs", "n": [2]})
    ours.equals({"side": "theirs", "n": [2]})
    theirs.equals({"side": "ours", "n": [1]})


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_changes_within_the_delay_arrive_as_one_data_message(make_pair, pairing):
    pair = make_pair(pairing, ours_delay=T(2.0))
    watch = pair.theirs.watch()
    for i in range(100):
        pair.ours.set_local_data({"i": i, "items": list(range(i % 7)), "nested": {"even": i % 2 == 0}})
    final = {"i": 99, "items": list(range(99 % 7)), "nested": {"even": False}}
    watch.equals(final)
    data = pair.tap.messages(pair.ours_dir, "DATA")
    assert len(data) == 1, data
    assert watch.changes == 1
    assert pair.ours.conn.data_sent == 1


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_their_coalescing_reaches_us_as_one_patch(make_pair, pairing):
    pair = make_pair(pairing, theirs_delay=T(2.0))
    watch = pair.ours.watch()
    for i in range(50):
        pair.theirs.set_local_data({"i": i})
    watch.equals({"i": 49})
    assert len(pair.tap.messages(pair.theirs_dir, "DATA")) == 1


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_flush_sends_at_once_whatever_the_delay(make_pair, pairing):
    pair = make_pair(pairing, ours_delay=T(60))
    watch = pair.theirs.watch()
    pair.ours.set_local_data({"now": True})
    pair.ours.flush()
    watch.equals({"now": True}, timeout=5)


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_messages_both_ways(make_pair, pairing):
    pair = make_pair(pairing)
    for msg in ({"any": ["json", 1, None]}, "text", 3, None, [{"type": "not-rpc"}]):
        pair.ours.send(msg)
        assert same(pair.theirs.receive(), msg)
        pair.theirs.send(msg)
        assert same(pair.ours.receive(), msg)


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_rpc_both_ways_with_a_failing_action(make_pair, pairing):
    pair = make_pair(pairing)
    assert pair.ours.call("add", 1, 2) == 3
    assert pair.theirs.call("add", 2, 3) == 5
    assert pair.ours.call("echo", {"a": [1]}, None) == [{"a": [1]}, None]
    with pytest.raises(statesync.RemoteError, match=r"failed on purpose: \(7,\)"):
        pair.ours.call("fail", 7)
    with pytest.raises(Exception, match=r"failed on purpose: \(8,\)") as info:
        pair.theirs.call("fail", 8)
    assert type(info.value) is Exception  # hat-juggler's error for a failed remote action
    with pytest.raises(statesync.RemoteError, match="invalid action"):
        pair.ours.call("nope")
    with pytest.raises(Exception, match="invalid action 'nope'"):
        pair.theirs.call("nope")
    # messages that are no RPC still reach receive() on both sides
    pair.ours.send({"plain": 1})
    assert pair.theirs.receive() == {"plain": 1}


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_we_close(make_pair, pairing):
    pair = make_pair(pairing)
    pair.ours.set_local_data({"last": "words"})  # autoflush 0: sent before the close frame
    pair.ours.close()
    assert pair.theirs.wait_closed()
    assert same(pair.theirs.remote_data, {"last": "words"})
    closes = [p for op, p in pair.tap.frames(pair.ours_dir) if op == 0x8]
    assert closes and int.from_bytes(closes[0][:2], "big") == 1000
    with pytest.raises(statesync.ConnectionClosed):
        pair.ours.send("late")


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_they_close(make_pair, pairing):
    pair = make_pair(pairing)
    pair.theirs.send("before the close")
    pair.theirs.close()
    conn = pair.ours.conn
    assert conn.wait_closed(T(10))
    assert conn.close_code == 1000
    assert conn.receive(T(5)) == "before the close"  # what came before the close is kept
    assert list(conn) == []  # and then the iteration ends cleanly
    for op in (lambda: conn.send(1), lambda: conn.set_local_data(1), conn.flush_local_data, conn.receive):
        with pytest.raises(statesync.ConnectionClosed):
            op()
    with pytest.raises(statesync.ConnectionClosed):
        pair.ours.call("add", 1, 2)


def test_our_server_closing_closes_their_client(make_pair):
    pair = make_pair("their-client-our-server")
    pair.server.close()
    assert pair.theirs.wait_closed()
    assert pair.ours.conn.close_code == 1001


def test_their_server_closing_closes_our_client(make_pair):
    pair = make_pair("our-client-their-server")
    pair.hat.run(pair.their_server.async_close())
    assert pair.ours.wait_closed()


def test_their_client_answers_our_keepalive_pings(hat):
    conns: "queue.Queue" = queue.Queue()
    with statesync.listen("127.0.0.1", 0, conns.put, ping_interval=0.05, idle_timeout=T(2)) as server:
        tap = WireTap(server.port)
        try:
            theirs = hat.run(hj.connect(f"ws://127.0.0.1:{tap.port}/ws"))
            ours = get(conns)
            # idle (no data, no messages) for longer than idle_timeout: pongs keep it open
            assert not ours.wait_closed(T(2) + 0.5)
            pings = [f for f in tap.frames("down") if f[0] == 0x9]
            pongs = [f for f in tap.frames("up") if f[0] == 0xA]
            assert pings and pongs
            hat.run(theirs.async_close())
            assert ours.wait_closed(T(10))
        finally:
            tap.close()
