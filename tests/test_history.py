"""Channel history and recovery (issue 21): the server side, on the wire, with real redis."""

from __future__ import annotations

import json
import struct
import threading
import time

import pytest

import juggler
from juggler import RedisBroker, Server
from juggler.dial import open_websocket
from juggler.history import DEFAULT_SIZE, MAX_SIZE, READ_CONNECTIONS, History, HistoryRule, Held
from juggler.layout import epoch_key, history_key
from juggler.message import EventPayload, Position, Pub, Sub, Unsb, decode, encode

from .conftest import T


class Raw:
    """A websocket that speaks juggler.0 message by message."""

    def __init__(self, url: str) -> None:
        self.ws = open_websocket(url, subprotocols=["juggler.0"], connect_timeout=T(5))
        self.ws.settimeout(T(5))

    def send(self, msg) -> None:
        self.ws.send(encode(msg))

    def recv(self):
        return decode(self.ws.recv())

    def recv_raw(self) -> dict:
        return json.loads(self.ws.recv())

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def server(real):
    s = Server(RedisBroker(real), history=["chat.*=5,60s", "news=3", "seam=5000"]).start()
    yield s
    s.shutdown()


@pytest.fixture
def raw(server):
    made = []

    def make() -> Raw:
        r = Raw(server.url)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _pub(r: Raw, channel: str, args) -> None:
    msg = Pub(channel, args)
    r.send(msg)
    ack = r.recv()
    assert ack.for_uuid == msg.uuid and ack.type.name == "ACK", ack


def _sub(r: Raw, channel: str, since=None, pattern=False):
    msg = Sub(channel, pattern=pattern, since=since)
    r.send(msg)
    ack = r.recv()
    assert ack.type.name == "ACK" and ack.for_uuid == msg.uuid, ack
    return ack


def test_rules_parse_with_defaults_and_maxima():
    assert HistoryRule.parse("chat.*=200,300s") == HistoryRule("chat.*", 200, 300.0)
    assert HistoryRule.parse("chat.*=200") == HistoryRule("chat.*", 200)
    assert HistoryRule.parse("chat.*") == HistoryRule("chat.*", DEFAULT_SIZE)
    assert HistoryRule.parse("a=1,5m").ttl == 300.0
    for bad in ("=10", "x=0", f"x={MAX_SIZE + 1}", "x=ten", "x=10,8d", "x=10,forever"):
        with pytest.raises(ValueError, match="history"):
            HistoryRule.parse(bad)
    h = History(["chat.[ab]=1", "chat.*=2", "n?ws=3"])
    assert h.rule("chat.a").size == 1 and h.rule("chat.c").size == 2 and h.rule("news").size == 3
    assert h.rule("chat") is None and h.rule("newsy") is None
    assert History.of(None) is None and History.of([]) is None


def test_evnt_of_a_channel_with_history_carries_offset_and_epoch(raw):
    a = raw()
    ack = _sub(a, "chat.x")
    assert ack.recovered is None and ack.position.offset == "0-0" and ack.position.epoch
    _pub(a, "chat.x", 1)
    ev = a.recv()
    assert ev.args == 1 and ev.offset and ev.epoch == ack.position.epoch
    _pub(a, "chat.x", 2)
    ev2 = a.recv()
    assert ev2.offset > ev.offset


def test_channels_without_history_are_untouched(raw, real):
    a = raw()
    ack = _sub(a, "plain")
    assert ack.position is None and ack.recovered is None
    _pub(a, "plain", 1)
    frame = a.recv_raw()
    assert "offset" not in frame["payload"] and "epoch" not in frame["payload"]
    assert real.keys("juggler:history:*{plain}*") == []


def test_since_recovers_in_order_then_live_with_no_duplicate(raw):
    a, b = raw(), raw()
    ack = _sub(a, "chat.r")
    _pub(b, "chat.r", 0)
    first = a.recv()
    a.close()
    for i in range(1, 4):  # missed while away
        _pub(b, "chat.r", i)
    c = raw()
    ack = _sub(c, "chat.r", since=first.position)
    assert ack.recovered is True and ack.position.epoch == first.epoch
    got = [c.recv() for _ in range(3)]
    assert [e.args for e in got] == [1, 2, 3]
    assert ack.position.offset == got[-1].offset
    _pub(b, "chat.r", 4)
    assert c.recv().args == 4


def test_since_a_trimmed_offset_or_another_epoch_is_not_recovered(raw, real):
    a = raw()
    _sub(a, "news")
    _pub(a, "news", 0)
    old = a.recv().position
    for i in range(1, 12):  # SIZE is 3: the event after `old` is trimmed
        _pub(a, "news", i)
        a.recv()
    b = raw()
    ack = _sub(b, "news", since=old)
    assert ack.recovered is False and ack.position.offset != old.offset
    ack = _sub(raw(), "news", since=Position(ack.position.offset, "another"))
    assert ack.recovered is False
    # the history lost (flushed): a new epoch
    real.delete(epoch_key("news"), history_key("news"))
    ack2 = _sub(raw(), "news", since=ack.position)
    assert ack2.recovered is False and ack2.position.epoch != ack.position.epoch


def test_since_on_a_pattern_or_a_plain_channel_is_not_recovered(raw):
    a = raw()
    ack = _sub(a, "chat.*", since=Position("1-0", "e"), pattern=True)
    assert ack.recovered is False and ack.position is None
    _pub(a, "chat.p", "x")
    ev = a.recv()
    assert ev.pattern == "chat.*" and ev.offset and ev.epoch  # offsets all the same
    ack = _sub(a, "plain", since=Position("1-0", "e"))
    assert ack.recovered is False


def test_a_replay_sends_at_most_size_events(raw):
    a = raw()
    _sub(a, "chat.s")
    _pub(a, "chat.s", 0)
    start = a.recv().position
    for i in range(1, 6):  # SIZE is 5: exactly 5 after `start`
        _pub(a, "chat.s", i)
        a.recv()
    ack = _sub(raw(), "chat.s", since=start)
    assert ack.recovered is True
    _pub(a, "chat.s", 6)  # 6 after `start`: more than SIZE
    a.recv()
    assert _sub(raw(), "chat.s", since=start).recovered is False


def test_no_gap_and_no_duplicate_at_the_seam_under_a_steady_publisher(server, raw, real):
    """Five connections recover while a publisher goes full speed: each gets every event after
    its position once, in order, then the live ones."""
    a = raw()
    _sub(a, "seam")
    _pub(a, "seam", -1)
    since = a.recv().position
    cond = threading.Condition()
    sent: list[int] = []

    def publish():
        for i in range(1500):
            juggler.publish(real, "seam", i)
            with cond:
                sent.append(i)
                cond.notify_all()

    t = threading.Thread(target=publish)
    t.start()
    subs = []
    try:
        for k in range(1, 6):
            with cond:
                assert cond.wait_for(lambda: len(sent) >= k * 200, T(20))
            c = raw()
            assert _sub(c, "seam", since=since).recovered is True
            subs.append(c)
    finally:
        t.join()
    juggler.publish(real, "seam", "end")
    for c in subs:
        got = [c.recv().args for _ in range(len(sent) + 1)]
        assert got == sent + ["end"]


def test_publish_from_a_backend(real, server, raw):
    a = raw()
    ack = _sub(a, "chat.b")
    offset = juggler.publish(real, "chat.b", {"x": 1})  # the rules the server recorded
    ev = a.recv()
    assert ev.args == {"x": 1} and ev.offset == offset and ev.epoch == ack.position.epoch
    assert juggler.publish(real, "plain", 1) is None
    assert juggler.publish(real, "chat.b", 2, history=[]) is None  # told: no history


class _Event:
    def __init__(self, offset: str, epoch: str = "e") -> None:
        self.payload = EventPayload("u", None, offset, epoch)


def test_held_events_are_bounded():
    held = Held(2)
    events = [_Event(f"1-{i}") for i in range(3)]
    assert all(held.hold(e) for e in events)
    assert held.overflowed
    assert held.take() == events[:2]


def test_the_seam_after_the_recovery():
    held = Held(10)
    first = _Event("5-0")
    assert held.hold(first)
    held.read(Position("7-0", "e"))
    assert held.take() == [first] and held.behind(first)
    assert held.take() == []  # over: the pub-sub thread writes from now on
    assert held.hold(_Event("6-0"))  # read late by the pub-sub thread: in the history, dropped
    assert not held.hold(_Event("")) and not held.passed  # no offset (a Go server's PUB): written
    assert not held.hold(_Event("3-0", "other")) and held.passed  # another epoch: written, and past
    assert not held.hold(_Event("6-0"))  # past the seam: nothing more is dropped


def test_event_payload_ignores_foreign_offsets():
    p = EventPayload.from_json('{"msg_uuid":"u","args":1,"offset":5}')
    assert p.offset == "" and p.epoch == ""


def test_the_wire_of_the_extensions():
    sub = Sub("c", since=Position("1-1", "e"))
    assert json.loads(encode(sub))["payload"] == {"channel": "c", "pattern": False, "since": {"offset": "1-1", "epoch": "e"}}
    assert decode(encode(sub)).since == Position("1-1", "e")
    unsb = Unsb("c")
    assert decode(encode(unsb)) == unsb and "since" not in encode(unsb)
    assert "since" not in encode(Sub("c"))
    from juggler.exceptions import ProtocolError

    for bad in ('"x"', '{"epoch":"e"}', '{"offset":1}', '{"offset":"' + "1" * 100 + '","epoch":""}'):
        text = '{"meta":{"type":3,"uuid":"%s"},"payload":{"channel":"c","since":%s}}' % (sub.uuid, bad)
        with pytest.raises(ProtocolError):
            decode(text)


def test_a_channel_without_history_costs_redis_one_publish(raw, real):
    a = raw()
    _sub(a, "plain")
    real.config_resetstat()
    for i in range(5):
        _pub(a, "plain", i)
        a.recv()
    stats = real.info("commandstats")
    assert stats["cmdstat_publish"]["calls"] == 5
    assert not any(k in stats for k in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_xadd"))


def test_the_publish_command(real, redis_server, server, raw, capsys):
    from juggler.cli import main

    a = raw()
    ack = _sub(a, "chat.cli")
    assert main(["publish", "--redis", redis_server.url, "chat.cli", '{"x": 1}']) == 0
    ev = a.recv()
    assert ev.args == {"x": 1} and ev.epoch == ack.position.epoch
    assert f"published on chat.cli at offset {ev.offset}" in capsys.readouterr().out
    assert main(["publish", "--redis", redis_server.url, "--history", "other=5", "chat.cli", "2"]) == 0
    assert "(no history)" in capsys.readouterr().out
    assert a.recv().offset == ""
    assert main(["publish", "--redis", redis_server.url, "chat.cli", "{nope"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_a_server_records_its_rules_for_publishers(server, real):
    assert json.loads(real.get("juggler:history:rules")) == ["chat.*=5,60s", "news=3,300s", "seam=5000,300s"]


def test_go_mixes_a_go_server_reads_our_events_and_publishes_around_history(raw, real):
    """What a Go server sees of a channel with history, and what it sends: its pub-sub
    connection gets the reference's payload with two more string fields (Go's JSON decoding
    ignores them), and its plain PUBLISH reaches our subscribers, with no offset."""
    go_side = real.pubsub()
    go_side.subscribe("chat.go")
    assert go_side.get_message(timeout=T(5))["type"] == "subscribe"
    a = raw()
    _sub(a, "chat.go")
    _pub(a, "chat.go", {"k": [1]})
    mine = a.recv()
    data = json.loads(go_side.get_message(timeout=T(5))["data"])
    assert data == {"msg_uuid": mine.for_uuid, "args": {"k": [1]}, "offset": mine.offset, "epoch": mine.epoch}
    go_side.close()
    # a PUB through a Go server: a plain PUBLISH of the reference's payload
    real.publish("chat.go", json.dumps({"msg_uuid": "3c1c3fce-05c6-4fd6-9ef4-a7d5bb1b8c4e", "args": 5}))
    frame = a.recv_raw()
    assert frame["payload"] == {"for": "3c1c3fce-05c6-4fd6-9ef4-a7d5bb1b8c4e", "channel": "chat.go", "args": 5}
    # a Go client's SUB (no since) of such a channel: the reference's ACK plus offset and epoch
    go_client = raw()
    msg = Sub("chat.go")
    go_client.send(msg)
    ack = go_client.recv_raw()["payload"]
    assert {k: ack[k] for k in ("for", "for_type", "channel")} == {"for": msg.uuid, "for_type": 3, "channel": "chat.go"}
    assert set(ack) == {"for", "for_type", "channel", "offset", "epoch"}


def test_history_in_the_config_file_and_the_environment(tmp_path):
    from juggler.config import ConfigError, load

    path = tmp_path / "juggler.toml"
    path.write_text('[server]\nhistory = ["chat.*=200,300s", "news"]\n')
    values, sources = load("server", {}, env={}, config_path=str(path))
    assert values["history"] == ["chat.*=200,300s", "news=100,300s"] and "file" in sources["history"]
    values, _ = load("server", {}, env={"JUGGLER_HISTORY": "a=1;b=2,1m"})
    assert values["history"] == ["a=1,300s", "b=2,60s"]
    path.write_text('[server]\nhistory = ["chat.*=0"]\n')
    with pytest.raises(ConfigError, match="history"):
        load("server", {}, env={}, config_path=str(path))


def test_a_second_sub_of_a_held_channel_changes_nothing(raw):
    a = raw()
    first = _sub(a, "chat.twice")
    _pub(a, "chat.twice", 1)
    assert a.recv().args == 1
    again = _sub(a, "chat.twice")
    assert again.position is None and again.recovered is None
    assert _sub(a, "chat.twice", since=first.position).recovered is False  # no replay: it has them
    _pub(a, "chat.twice", 2)
    assert a.recv().args == 2


def test_events_published_while_the_server_reconnects_to_redis_are_replayed(server, raw, real):
    """The server's own pub-sub connection drops (CLIENT KILL): once it is back, the events of
    channels with history published meanwhile reach the connections that held them, once."""
    a = raw()
    _sub(a, "chat.hub")
    _pub(a, "chat.hub", 0)
    assert a.recv().args == 0
    real.client_kill_filter(_type="pubsub")
    for i in range(1, 6):  # while the hub reconnects (its backoff waits a turn first)
        juggler.publish(real, "chat.hub", i)
    assert [a.recv().args for _ in range(5)] == [1, 2, 3, 4, 5]
    juggler.publish(real, "chat.hub", 6)
    assert a.recv().args == 6


def test_a_connection_whose_events_the_server_cannot_replay_is_closed(server, raw, real):
    a = raw()
    _sub(a, "chat.lost")
    _pub(a, "chat.lost", 0)
    a.recv()
    real.client_kill_filter(_type="pubsub")
    juggler.publish(real, "chat.lost", 1)
    real.delete(history_key("chat.lost"), epoch_key("chat.lost"))  # and the history is lost
    while True:
        opcode, frame = a.ws.recv_data_frame(True)
        if opcode == 0x8:
            break
    assert struct.unpack(">H", frame.data[:2])[0] == 1012
    assert b"events lost" in frame.data


def test_a_burst_of_subs_reads_history_on_a_bounded_number_of_redis_connections(raw, real, monkeypatch):
    # 200 SUBs with since, from 40 websockets at once: their history reads share at most
    # READ_CONNECTIONS redis connections, not one each (each websocket's reader reads its own).
    # (Each SUB waits for its turn as long as it must here: on a loaded machine 40 readers
    # may take longer than READ_WAIT to get theirs; that wait is the next test's.)
    monkeypatch.setattr(juggler.history, "READ_WAIT", T(30))
    channels = [f"chat.burst{i}" for i in range(5)]
    a = raw()
    firsts = []
    for channel in channels:
        _sub(a, channel)
        _pub(a, channel, 0)
        firsts.append(a.recv().position)
        _pub(a, channel, 1)
        a.recv()
    subs = [raw() for _ in range(40)]
    mine = real.client_id()

    def connections() -> int:
        return sum(1 for c in real.client_list() if int(c["id"]) != mine)

    before = connections()
    for s in subs:
        for channel, since in zip(channels, firsts):
            s.send(Sub(channel, since=since))
    for s in subs:
        got = [s.recv() for _ in range(2 * len(channels))]  # each ACK, then the event after `since`
        acks = [m for m in got if m.type.name == "ACK"]
        assert len(acks) == len(channels) and all(m.recovered is True for m in acks), got
        assert sorted((m.channel, m.args) for m in got if m.type.name == "EVNT") == [(c, 1) for c in channels]
    assert connections() - before <= READ_CONNECTIONS


def test_a_history_read_that_finds_no_connection_free_in_time_fails_and_gives_its_turn_back():
    from juggler.exceptions import BrokerError
    from juggler.history import HistoryReaders

    readers = HistoryReaders(None, fast=False, connections=1, wait=T(0.2))
    entered, release = threading.Event(), threading.Event()

    def slow(script, keys, args):  # a read that redis is slow to answer
        entered.set()
        assert release.wait(T(10))
        return [b"e", b"0-0", 0]

    rule = HistoryRule("x")
    first = threading.Thread(target=readers.read, args=(slow, "x", rule, None), name="juggler-test-read")
    first.start()
    try:
        assert entered.wait(T(5))
        with pytest.raises(BrokerError, match="history busy"):  # (a SUB gets its NACK)
            readers.read(slow, "x", rule, None)
    finally:
        release.set()
        first.join(T(5))
    assert not first.is_alive()
    read = readers.read(lambda s, k, a: [b"e", b"3-0", 0], "x", rule, None)  # its turn is back
    assert read.position == Position("3-0", "e") and not read.recovered
    readers.close()
