"""Pub-sub fan-out through the server's one pub-sub reader (juggler.pubsub, issue 13): events
reach every subscriber exactly once and in order under SUB/UNSB churn, plain and pattern
subscriptions of one connection each get their EVNT, and an EVNT's payload is encoded once
for all of its subscribers."""

from __future__ import annotations

import threading

import pytest

from juggler import Client, RedisBroker, Server, chain, log_messages, process_msg, recover
from juggler.broker import PubSubEvent
from juggler.frames import OP_TEXT, encode_frame
from juggler.message import EventPayload, Evnt, MessageType, encode
from juggler.middleware import writes_events_as_sent

from .conftest import T


@pytest.mark.parametrize("args", ["x", {"a": [1, 2.5, None, "é\u2028"]}, None, [{"deep": {"er": True}}]])
@pytest.mark.parametrize("pattern", ["", "news.*"])
def test_a_shared_payload_encodes_as_the_message_does(args, pattern):
    event = PubSubEvent("news.a", pattern, EventPayload("11111111-2222-3333-4444-555555555555", args))
    alone = Evnt(for_uuid=event.payload.msg_uuid, channel="news.a", pattern=pattern, args=args)
    shared = Evnt(for_uuid=event.payload.msg_uuid, channel="news.a", pattern=pattern, args=args, uuid=alone.uuid)
    assert encode(shared.sharing(event.evnt_payload)) == encode(alone)
    assert event.evnt_payload is event.evnt_payload  # made once per event


def test_plain_and_pattern_subscriptions_of_one_connection_each_get_the_event(stack):
    c = stack.client()
    plain = c.sub("room.1")
    pattern = c.sub("room.*", pattern=True)
    stack.client().pub("room.1", "hi")
    got = {(e.channel, e.pattern, e.args) for e in (plain.get(T(5)), pattern.get(T(5)))}
    assert got == {("room.1", "", "hi"), ("room.1", "room.*", "hi")}
    assert stack.server.hub.subscriptions() == {(False, "room.1"), (True, "room.*")}


def test_events_reach_every_subscriber_once_and_in_order_under_churn(stack):
    n_events = 150
    stable = [stack.client() for _ in range(4)]
    subs = [c.sub("churn") for c in stable[:2]] + [c.sub("ch*", pattern=True) for c in stable[2:]]
    churners = [stack.client() for _ in range(3)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn(c) -> None:
        try:
            i = 0
            while not stop.is_set():
                pattern = i % 2 == 1
                name = "ch*" if pattern else "churn"
                c.sub(name, pattern=pattern)
                c.unsb(name, pattern=pattern)
                i += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(c,), name=f"juggler-test-churn-{i}") for i, c in enumerate(churners)]
    for t in threads:
        t.start()
    try:
        publisher = stack.client()
        for i in range(n_events):
            publisher.pub("churn", i)
    finally:
        stop.set()
        for t in threads:
            t.join(T(30))
    assert errors == [] and not any(t.is_alive() for t in threads)
    for sub in subs:
        assert [sub.get(T(10)).args for _ in range(n_events)] == list(range(n_events))
    # the churners hold nothing any more: only the stable subscriptions are left in redis
    assert stack.server.hub.subscriptions() == {(False, "churn"), (True, "ch*")}
    for c in stable:
        c.close()
    for c in churners:
        c.close()
    server = stack.server
    assert _eventually(lambda: server.hub.subscriptions() == set())


def test_a_connection_that_unsubscribes_gets_nothing_more(stack):
    c = stack.client()
    gone = c.sub("gone")
    marker = c.sub("marker")
    publisher = stack.client()
    c.unsb("gone")
    publisher.pub("gone", 1)
    publisher.pub("marker", 2)  # published after: its EVNT comes after any EVNT of "gone"
    assert marker.get(T(5)).args == 2
    assert c.received["EVNT"] == 1
    assert list(gone) == []


def _eventually(predicate, timeout: float = 5) -> bool:
    """Whether ``predicate`` holds within ``timeout`` s (the server releases subscriptions as
    it tears the connections down, after the clients have closed)."""
    import time

    deadline = time.monotonic() + T(timeout)
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)  # a bounded poll of observable state
    return True


@pytest.mark.realredis
def test_fan_out_on_a_redis_cluster(redis_cluster):
    """One pub-sub connection to one primary serves channels of every slot: on a cluster a
    plain PUBLISH reaches every node."""
    broker = RedisBroker.from_url(redis_cluster.url, cluster=True)
    clients: list[Client] = []
    try:
        with Server(broker) as server:
            clients = [Client.connect(server.url, connect_timeout=T(5)) for _ in range(4)]
            channels = [f"slot.{i}" for i in range(3)]  # spread over the cluster's slots
            subs = [(c, [c.sub(ch) for ch in channels] + [c.sub("slot.*", pattern=True)]) for c in clients[:3]]
            for i, ch in enumerate(channels):
                clients[3].pub(ch, i)
            for _, mine in subs:
                for i, sub in enumerate(mine[:3]):
                    assert sub.get(T(5)).args == i
                assert sorted(mine[3].get(T(5)).args for _ in channels) == [0, 1, 2]
            assert len([t for t in threading.enumerate() if t.name == "juggler-server-pubsub"]) == 1
    finally:
        for c in clients:
            c.close()
        broker.close()


def test_a_pub_ack_precedes_the_evnt_it_causes_on_its_own_connection(stack):
    import json

    import websocket

    ws = websocket.create_connection(stack.server.url, subprotocols=["juggler.0"], timeout=T(10))
    try:
        def request(mtype: int, payload: dict) -> str:
            uuid = __import__("juggler").message.new_uuid()
            ws.send(json.dumps({"meta": {"type": mtype, "uuid": uuid}, "payload": payload}))
            return uuid

        request(3, {"channel": "own", "pattern": False})
        assert json.loads(ws.recv())["meta"]["type"] == 8
        for i in range(100):
            pub = request(2, {"channel": "own", "args": i})
            first, second = json.loads(ws.recv()), json.loads(ws.recv())
            assert (first["meta"]["type"], first["payload"]["for"]) == (8, pub)
            assert (second["meta"]["type"], second["payload"]["for"], second["payload"]["args"]) == (10, pub, i)
    finally:
        ws.close()


def test_a_stalled_subscriber_is_disconnected_without_delaying_the_others(make_stack):
    """A subscriber that stops reading fills its socket, then its write queue, and is closed
    with 1008; the hub never waits for it, so the others get every event meanwhile."""
    import json
    import socket as socketlib
    import time

    from .test_idle import Counter

    counter = Counter()
    closes: list[tuple[int, str]] = []

    def hook(conn, state):
        counter(conn, state)
        if state.name == "CLOSED":
            closes.append((conn.close_code, conn.close_reason))

    stack = make_stack(on_state=hook, write_queue_size=8)
    stalled = socketlib.socket()
    stalled.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_RCVBUF, 4096)
    stalled.connect((stack.server.host, stack.server.port))
    try:
        stalled.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Protocol: juggler.0\r\n\r\n"
        )
        stalled.settimeout(T(10))
        head = b""
        while b"\r\n\r\n" not in head:
            head += stalled.recv(1)
        from juggler.frames import OP_TEXT, encode_frame

        sub = json.dumps({"meta": {"type": 3, "uuid": __import__("juggler").message.new_uuid()},
                          "payload": {"channel": "flood", "pattern": False}}).encode()  # fmt: skip
        stalled.sendall(encode_frame(OP_TEXT, sub, b"abcd"))
        reader = stack.client()
        events = reader.sub("flood")
        counter.wait(connected=2)
        deadline = time.monotonic() + T(10)
        while sum(bool(c.subscriptions()) for c in stack.server.connections) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)  # a bounded wait for the stalled one's SUB to be processed
        # it never reads again: big events fill its socket buffers, then its queue of 8
        publisher = stack.client()
        big = "x" * 65536
        n = 60
        started = time.monotonic()
        for i in range(n):
            publisher.pub("flood", [i, big])
        got = [events.get(T(10)).args[0] for _ in range(n)]
        took = time.monotonic() - started
        assert got == list(range(n))
        counter.wait(closed=1)
        assert (1008, "client too slow: write queue full") in closes
        assert took < T(10), f"the others waited on the stalled subscriber: {took:.1f} s"
    finally:
        stalled.close()


@pytest.mark.parametrize("args", ["x", {"a": [1, 2.5, None, "é\u2028"]}, "y" * 200, "z" * 70000])
@pytest.mark.parametrize("pattern", ["", "news.*"])
def test_an_events_shared_frame_is_the_frame_of_its_message(args, pattern):
    event = PubSubEvent("news.a", pattern, EventPayload("11111111-2222-3333-4444-555555555555", args))
    alone = Evnt(for_uuid=event.payload.msg_uuid, channel="news.a", pattern=pattern, args=args)
    data = encode(alone).encode("utf-8")
    head, tail, size = event.evnt_frame
    assert head + alone.uuid.encode("ascii") + tail == encode_frame(OP_TEXT, data)
    assert size == len(data)
    assert event.evnt_frame is event.evnt_frame  # made once per event


def test_a_handler_that_is_not_plain_still_sees_every_evnt(make_stack):
    seen: list[str] = []

    def record(next_handler):
        def handle(conn, msg):
            if msg.type is MessageType.EVNT:
                seen.append(msg.args)
            next_handler(conn, msg)

        return handle

    stack = make_stack(handler=chain(recover(), record))
    assert not writes_events_as_sent(stack.server.handler)
    sub = stack.client().sub("seen")
    stack.client().pub("seen", "one")
    assert sub.get(T(5)).args == "one"
    assert seen == ["one"]
    # the default chain of the CLI writes them straight, as process_msg alone does
    assert writes_events_as_sent(chain(recover())) and writes_events_as_sent(process_msg)
    assert not writes_events_as_sent(chain(log_messages()))


def test_a_server_subclass_encode_still_sees_every_evnt(redis_client):
    class Marking(Server):
        def encode(self, conn, msg):
            data = super().encode(conn, msg)
            if msg.type is MessageType.EVNT:
                data = data.replace(b'"args":"plain"', b'"args":"marked"')
            return data

    server = Marking(RedisBroker(redis_client)).start()
    try:
        with Client.connect(server.url, connect_timeout=T(10)) as sub_c, Client.connect(server.url, connect_timeout=T(10)) as pub_c:
            sub = sub_c.sub("mark")
            pub_c.pub("mark", "plain")
            assert sub.get(T(5)).args == "marked"
    finally:
        server.shutdown()


def test_fast_delivery_counts_what_it_wrote(stack):
    subs = [stack.client().sub("counted") for _ in range(3)]
    before = stack.server.stats.snapshot().get("write_EVNT", 0)
    stack.client().pub("counted", 1)
    assert [s.get(T(5)).args for s in subs] == [1, 1, 1]
    assert stack.server.stats.snapshot().get("write_EVNT", 0) - before == 3


@pytest.mark.parametrize("raw", ['{"msg_uuid": "u", "args": "\\ud83d"}', '{"msg_uuid": "u", "args": NaN}'])
def test_an_event_that_cannot_be_encoded_is_dropped_once_and_the_hub_goes_on(stack, raw):
    """A foreign publisher's event that JSON cannot carry to a client (a lone surrogate, NaN)
    is dropped before the fan-out, counted once, and the next event still arrives."""
    subs = [stack.client().sub("odd") for _ in range(3)]
    stack.redis.publish("odd", raw)
    stack.client().pub("odd", "fine")
    assert [s.get(T(5)).args for s in subs] == ["fine"] * 3
    assert stack.server.stats.snapshot().get("failed_event_decodes") == 1
    assert stack.server.hub._thread is not None and stack.server.hub._thread.is_alive()


def test_a_middleware_made_with_functools_wraps_still_sees_every_evnt(make_stack):
    import functools

    seen: list = []

    def audit(next_handler):
        @functools.wraps(next_handler)  # copies the wrapped function's __dict__
        def handle(conn, msg):
            if msg.type is MessageType.EVNT:
                seen.append(msg.args)
            next_handler(conn, msg)

        return handle

    stack = make_stack(handler=chain(audit, recover()))
    assert not writes_events_as_sent(stack.server.handler)
    sub = stack.client().sub("audited")
    stack.client().pub("audited", 7)
    assert sub.get(T(5)).args == 7
    assert seen == [7]
