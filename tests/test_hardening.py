"""Hardening (issue 9): no memory that only grows, limits against an abusive client, and
messages delivered exactly once and in order, also when redis loses a reply or the server
shuts down with a backlog."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque

import pytest
import redis

from juggler import BrokerError, CallExpired, Client, NackError, RedisBroker, Res, Server, chain
from juggler.layout import STORE_SCRIPT, call_timeout_key, calls_key
from juggler.message import CallPayload, EventPayload, new_uuid

from .conftest import PeerReader, T
from .proxy import Proxy
from .test_web import fetch


def _eventually(predicate, timeout: float = 5) -> bool:
    """Whether ``predicate`` holds within ``timeout`` s: for state the server changes on a
    thread of its own after the client saw the answer (a bounded poll of observable state)."""
    deadline = time.monotonic() + T(timeout)
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# -- memory that only grows ----------------------------------------------------------------------


def test_a_discarding_close_keeps_the_rest_of_a_frame_begun_on_the_socket():
    """A slow subscriber: the socket took part of an EVNT frame (its rest waits at the head of
    the queue), then the queue fills and the connection is closed with 1008, dropping what
    is queued. The rest of that frame must still go before the close frame, or the close
    frame would be read as part of the EVNT's payload."""
    from juggler.transport import WriteQueue

    q = WriteQueue(2)
    assert q.claim()
    q.put_first(b"rest of a frame")  # what send_nowait could not write
    q.release()
    assert q.put("evnt 2") and not q.put("evnt 3")  # full
    q.close("close", discard=True)
    assert q.get_batch(10) == [b"rest of a frame", "close"]

    q = WriteQueue(2)  # closed while the socket took the frame's first part: its rest still goes first
    assert q.claim()
    q.close("close")
    assert q.put_first(b"rest of a frame") and not q.put_first("slot", last=True)
    q.release()
    assert q.get_batch(10) == [b"rest of a frame", "close"]

    q = WriteQueue(2)  # no frame begun: everything queued goes
    assert q.put("evnt 1") and q.put("evnt 2")
    q.close("close", discard=True)
    assert q.get_batch(10) == ["close"]


def test_sub_and_unsb_of_many_channels_leave_no_bookkeeping_behind(stack):
    """SUB then UNSB of 2,000 distinct channels: the hub's maps and the redis pub-sub
    connection's confirmation bookkeeping shrink back to nothing."""
    c = stack.client()
    for i in range(2000):
        c.sub(f"many.{i}", pattern=i % 2 == 1)
        c.unsb(f"many.{i}", pattern=i % 2 == 1)
    hub = stack.server.hub
    ps = hub._ps
    assert ps is not None
    assert (hub._subs, hub._by_sub, ps._waiting, ps._active) == ({}, {}, {}, set())
    assert stack.redis.pubsub_channels() == [] and stack.redis.pubsub_numpat() == 0



def _containers(conn) -> dict[str, int]:
    """The size of every container a connection holds (its per-connection bookkeeping)."""
    return {k: len(v) for k, v in vars(conn).items() if isinstance(v, (dict, list, set, deque))}


def test_results_a_handler_drops_leave_nothing_behind(make_stack):
    """A middleware drops every RES: the connection keeps no entry for any of them."""
    n = 300
    dropped = threading.Semaphore(0)

    def drop_results(next_handler):
        def handle(conn, msg):
            if isinstance(msg, Res):
                dropped.release()
                return
            next_handler(conn, msg)

        return handle

    stack = make_stack(handler=chain(drop_results))
    c = stack.client()
    calls = [c.call_async("test.echo", i, timeout=T(30)) for i in range(n)]
    for _ in range(n):
        assert dropped.acquire(timeout=T(10))
    (conn,) = stack.server.connections
    assert all(size <= 2 for size in _containers(conn).values()), _containers(conn)
    assert not any(f.done() for f in calls)



# -- limits against an abusive client --------------------------------------------------------------


def _handshake(pad: int) -> bytes:
    return (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: juggler.0\r\nX-Pad: " + b"p" * pad + b"\r\n\r\n"
    )


def _status_of(server, head: bytes, chunk: int) -> bytes:
    """The status line the server answers ``head`` with, sent ``chunk`` bytes at a time."""
    with socket.create_connection((server.host, server.port), timeout=T(10)) as s:
        try:
            for i in range(0, len(head), chunk):
                s.sendall(head[i : i + chunk])
        except OSError:  # refused before it was all sent
            pass
        answer = b""
        while b"\r\n" not in answer:
            got = s.recv(4096)
            if not got:
                break
            answer += got
        return answer.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("chunk", [1 << 20, 1000], ids=["one-write", "trickled"])
def test_a_handshake_head_over_16_kib_gets_431_however_it_arrives(stack, chunk):
    from juggler.server import HEAD_LIMIT

    assert HEAD_LIMIT == 16384
    big = _handshake(60_000)
    assert _status_of(stack.server, big, chunk) == b"HTTP/1.1 431 Request Header Fields Too Large"
    at_limit = _handshake(0)
    at_limit = _handshake(HEAD_LIMIT - len(at_limit))
    assert len(at_limit) == HEAD_LIMIT
    assert _status_of(stack.server, at_limit, chunk) == b"HTTP/1.1 101 Switching Protocols"
    over = _handshake(HEAD_LIMIT - len(_handshake(0)) + 1)
    assert _status_of(stack.server, over, chunk).startswith(b"HTTP/1.1 431")
    assert stack.server.stats.snapshot()["refused_431"] == 2



def test_subscriptions_per_connection_are_capped_at_100_by_default(stack):
    assert stack.server.max_subscriptions == 100
    c = stack.client()
    for i in range(100):
        c.sub(f"cap.{i}", pattern=i % 3 == 0)
    with pytest.raises(NackError) as err:
        c.sub("cap.one-more")
    assert (err.value.code, err.value.message) == (429, "too many subscriptions: at most 100 per connection")
    with pytest.raises(NackError):
        c.sub("cap.*", pattern=True)
    c.sub("cap.1")  # already held: not a new one
    c.unsb("cap.1")
    c.sub("cap.one-more")  # room again
    other = stack.client()
    other.sub("cap.other")  # the cap is per connection
    assert len(stack.server.hub.subscriptions()) == 101


def test_a_connection_looping_subs_holds_no_more_than_its_cap_in_redis(make_stack):
    stack = make_stack(max_subscriptions=5)
    c = stack.client()
    codes = []
    for i in range(200):
        try:
            c.sub(f"loop.{i}.*", pattern=True)
            codes.append(200)
        except NackError as exc:
            codes.append(exc.code)
    assert codes == [200] * 5 + [429] * 195
    assert stack.redis.pubsub_numpat() == 5


def test_calls_in_flight_per_connection_are_capped_at_1000_by_default(stack):
    """A loop of CALLs to a URI nobody serves: the first 1,000 wait in redis, the rest get
    NACK 429 at once; once calls end (results, or expiry), there is room again."""
    assert stack.server.max_calls_in_flight == 1000
    c = stack.client()
    calls = [c.call_async("nobody.serves", i, timeout=T(60)) for i in range(1200)]
    for f in calls[1000:]:
        with pytest.raises(NackError) as err:
            f.result(T(10))
        assert (err.value.code, err.value.message) == (429, "too many calls in flight: at most 1000 per connection")
    assert len([f for f in calls[:1000] if not f.done()]) == 1000
    assert stack.redis.llen("juggler:calls:{nobody.serves}") == 1000
    # another connection is not affected
    assert stack.client().call("test.echo", "other", timeout=T(10)) == "other"


def test_calls_in_flight_leave_the_count_when_they_end(make_stack):
    stack = make_stack(max_calls_in_flight=4)
    c = stack.client()
    # answered calls leave at once
    for i in range(20):
        assert c.call("test.echo", i, timeout=T(10)) == i
    # unanswered ones when their timeout passes
    waiting = [c.call_async("nobody.serves", i, timeout=0.3) for i in range(4)]
    with pytest.raises(NackError) as err:
        c.call("test.echo", "full", timeout=T(10))
    assert err.value.code == 429
    for f in waiting:
        with pytest.raises(CallExpired):
            f.result(T(10))

    def room() -> bool:  # the server's deadlines end a little after the client's
        try:
            return c.call("test.echo", "room again", timeout=T(10)) == "room again"
        except NackError as exc:
            assert exc.code == 429
            return False

    assert _eventually(room)
    # a call that redis refused does not count
    (conn,) = stack.server.connections
    before = len(conn._calls)
    for i in range(10):
        with pytest.raises(NackError) as err:
            c.call("test.echo", "x" * (70 * 1024), timeout=T(10))
        assert err.value.code == 413
    assert len(conn._calls) == before
    assert c.call("test.echo", "still room", timeout=T(10)) == "still room"


def test_call_args_over_64_kib_get_413_and_never_reach_redis(stack):
    c = stack.client()
    assert stack.broker.max_args_size == 64 * 1024
    at_limit = "x" * (64 * 1024 - 2)  # a JSON string: its two quotes count
    assert c.call("test.echo", at_limit, timeout=T(10)) == at_limit
    for args in ["x" * (64 * 1024 - 1), ["é" * 40000], "y" * 1_000_000]:
        with pytest.raises(NackError) as err:
            c.call("nobody.serves", args, timeout=T(60))
        assert err.value.code == 413 and "over the server's maximum of 65536" in err.value.message
    assert stack.redis.keys("juggler:calls*") == []
    # PUB is bounded by the read limit only
    sub = c.sub("big")
    c.pub("big", "z" * 500_000)
    assert len(sub.get(T(10)).args) == 500_000



def test_metrics_listen_serves_health_and_metrics_off_the_public_port(redis_client):
    import json

    broker = RedisBroker(redis_client)
    with Server(broker, metrics_listen="127.0.0.1:0") as server:
        base = server.metrics_url
        assert base.startswith("http://127.0.0.1:") and not base.endswith(f":{server.port}")
        status, body = fetch(base + "/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok", "redis": "ok", "connections": 0}
        status, body = fetch(base + "/metrics")
        assert status == 200 and b"juggler_connections_active" in body
        assert fetch(base + "/ws")[0] == 404
        # the public port serves websockets only: no health or metrics there, before any
        # origin check or accepting hook
        public = f"http://{server.host}:{server.port}"
        for path in ("/healthz", "/metrics"):
            status, body = fetch(public + path)
            assert status == 404 and b"no websocket endpoint" in body
        assert any(t.name == "juggler-server-metrics" for t in threading.enumerate())
    assert not any(t.name.startswith("juggler-server-metrics") for t in threading.enumerate())


def test_metrics_listen_refuses_a_flood_of_slow_scrapers_beyond_its_cap(redis_client):
    """Scrapers that connect and send nothing hold at most 8 request threads; one more gets
    503 at once, and they are let go after the request timeout (or at shutdown)."""
    broker = RedisBroker(redis_client)
    with Server(broker, metrics_listen="127.0.0.1:0") as server:
        host, port = server._http.host, server._http.port
        idle = [socket.create_connection((host, port), timeout=T(10)) for _ in range(8)]
        try:
            assert _eventually(lambda: server._http._listener.thread_count() == 8)
            with socket.create_connection((host, port), timeout=T(10)) as extra:
                assert extra.recv(100).startswith(b"HTTP/1.1 503")
        finally:
            for s in idle:
                s.close()


@pytest.mark.parametrize("where", ["public", "metrics_listen"])
def test_health_checks_cost_redis_one_ping_a_second(redis_client, where):
    broker = RedisBroker(redis_client)
    pings = []
    ping = broker.ping
    broker.ping = lambda: pings.append(1) or ping()
    kw = {"metrics_listen": "127.0.0.1:0"} if where == "metrics_listen" else {}
    with Server(broker, **kw) as server:
        base = server.metrics_url or f"http://{server.host}:{server.port}"
        for _ in range(20):
            assert fetch(base + "/healthz")[0] == 200
        assert len(pings) == 1
        when, answer = server._health_answer
        server._health_answer = (when - 1.0, answer)  # a second later
        assert fetch(base + "/healthz")[0] == 200
        assert len(pings) == 2


def test_health_checks_are_not_held_up_by_a_redis_that_hangs(redis_client):
    """One check PINGs a redis that does not answer: the others get the last answer at once
    instead of queueing behind it."""
    broker = RedisBroker(redis_client)
    hang, pinging, release = threading.Event(), threading.Event(), threading.Event()
    ping = broker.ping

    def slow_ping():
        if hang.is_set():
            pinging.set()
            release.wait(T(10))
        return ping()

    broker.ping = slow_ping
    with Server(broker) as server:
        base = f"http://{server.host}:{server.port}"
        assert fetch(base + "/healthz")[0] == 200
        when, answer = server._health_answer
        server._health_answer = (when - 1.0, answer)  # a second later: the answer is stale
        hang.set()
        slow = threading.Thread(target=fetch, args=(base + "/healthz",), name="juggler-test-slow-health")
        slow.start()
        assert pinging.wait(T(10))
        started = time.monotonic()
        for _ in range(5):
            assert fetch(base + "/healthz")[0] == 200  # the last answer, while the PING hangs
        assert time.monotonic() - started < T(5)
        release.set()
        slow.join(T(10))
        assert not slow.is_alive()


# -- exactly once, in order ----------------------------------------------------------------------


@pytest.mark.realredis
def test_a_sub_nacked_for_want_of_confirmation_leaves_no_subscription(redis_server):
    """redis' confirmation of a SUBSCRIBE comes late (the proxy holds its replies): the SUB is
    NACKed, and neither the hub nor redis keeps the subscription, so no event follows."""
    redis_client = redis.Redis.from_url(redis_server.url)
    rpc = RedisBroker(redis_client)
    with Proxy(redis_server.port) as proxy:
        pubsub = RedisBroker.from_url(proxy.url)
        try:
            with Server(rpc, pubsub_broker=pubsub) as server:
                server.hub.confirm_timeout = T(0.3)
                with Client.connect(server.url, connect_timeout=T(5)) as c:
                    marker = c.sub("marker")
                    proxy.hold()
                    with pytest.raises(NackError) as err:
                        c.sub("late")
                    assert err.value.code == 500 and "did not confirm" in err.value.message
                    proxy.release()
                    assert server.hub.subscriptions() == {(False, "marker")}
                    assert _eventually(lambda: redis_client.pubsub_numsub("late") == [(b"late", 0)])
                    publisher = RedisBroker(redis_client)
                    publisher.publish("late", EventPayload("11111111-2222-3333-4444-555555555555", 1))
                    publisher.publish("marker", EventPayload("11111111-2222-3333-4444-555555555555", 2))
                    assert marker.get(T(5)).args == 2  # after any EVNT of "late" there could be
                    assert c.received["EVNT"] == 1
                    assert server.hub._ps._waiting == {}  # the late confirmations were taken
        finally:
            pubsub.close()
            rpc.close()
            redis_client.close()


@pytest.mark.realredis
@pytest.mark.parametrize("protocol", [2, 3], ids=["fast-path", "redis-py"])
def test_a_store_whose_reply_is_lost_is_not_sent_again(redis_server, real, protocol):
    """redis runs the store script, then its reply is lost (the proxy drops it and cuts the
    connection): the call is NACKed and stored once, not twice by a retry. On RESP2 the
    command goes through juggler.resp, on RESP3 through redis-py (with from_url's retries)."""
    real.script_load(STORE_SCRIPT)  # so that the EVALSHA runs: NOSCRIPT is not the case here
    with Proxy(redis_server.port) as proxy:
        broker = RedisBroker.from_url(proxy.url, protocol=protocol)
        try:
            assert (broker._fast is not None) == (protocol == 2)
            proxy.drop_reply_after(b"juggler:calls:timeout:")
            with pytest.raises(BrokerError, match="redis unavailable"):
                broker.store_call(CallPayload(new_uuid(), new_uuid(), "lost.reply", 1), 30)
            assert proxy.dropped.is_set()
            assert real.llen(calls_key("lost.reply")) == 1
            broker.store_call(CallPayload(new_uuid(), new_uuid(), "lost.reply", 2), 30)  # it goes on
            assert real.llen(calls_key("lost.reply")) == 2
        finally:
            broker.close()


@pytest.mark.realredis
@pytest.mark.parametrize("protocol", [2, 3], ids=["fast-path", "redis-py"])
def test_a_publish_whose_reply_is_lost_is_not_sent_again(redis_server, real, protocol):
    ps = real.pubsub(ignore_subscribe_messages=True)
    ps.subscribe("lost")
    with Proxy(redis_server.port) as proxy:
        broker = RedisBroker.from_url(proxy.url, protocol=protocol)
        try:
            proxy.drop_reply_after(b"PUBLISH")
            with pytest.raises(BrokerError, match="redis unavailable"):
                broker.publish("lost", EventPayload(new_uuid(), 1))
            assert broker.publish("lost", EventPayload(new_uuid(), 2)) == 1
            got = []
            deadline = time.monotonic() + T(5)
            while 2 not in got and time.monotonic() < deadline:
                msg = ps.get_message(timeout=T(1))  # (None also for the subscribe confirmation)
                if msg is not None:
                    got.append(EventPayload.from_json(msg["data"]).args)
            assert got == [1, 2]
        finally:
            broker.close()
            ps.close()


@pytest.mark.realredis
def test_on_a_cluster_a_store_whose_reply_is_lost_is_not_sent_again(redis_cluster, monkeypatch):
    """The cluster client retries a command after a connection error: the reply of the
    store script is lost after it ran (read, then the connection fails)."""
    import redis.connection

    broker = RedisBroker.from_url(redis_cluster.url, cluster=True)
    uri = "lost.reply.cluster"
    armed = [True]
    send, read = redis.connection.Connection.send_command, redis.connection.Connection.read_response

    def send_command(self, *args, **kwargs):
        if armed[0] and any(isinstance(a, str) and a.startswith(call_timeout_key(uri, "")) for a in args):
            armed[0] = False
            self._lose_reply = True
        return send(self, *args, **kwargs)

    def read_response(self, *args, **kwargs):
        reply = read(self, *args, **kwargs)
        if getattr(self, "_lose_reply", False):
            self._lose_reply = False
            self.disconnect()
            raise redis.exceptions.ConnectionError("the reply was lost")
        return reply

    try:
        broker.client.delete(calls_key(uri))
        monkeypatch.setattr(redis.connection.Connection, "send_command", send_command)
        monkeypatch.setattr(redis.connection.Connection, "read_response", read_response)
        with pytest.raises(BrokerError, match="redis unavailable"):
            broker.store_call(CallPayload(new_uuid(), new_uuid(), uri, 1), 30)
        assert not armed[0]
        assert broker.client.llen(calls_key(uri)) == 1
        broker.store_call(CallPayload(new_uuid(), new_uuid(), uri, 2), 30)
        assert broker.client.llen(calls_key(uri)) == 2
    finally:
        monkeypatch.undo()
        broker.client.delete(calls_key(uri))
        broker.close()


def _raw_connect(server, rcvbuf: int = 4096) -> socket.socket:
    """A websocket to ``server`` on a plain socket with a small receive buffer, handshake done."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((server.host, server.port))
    s.settimeout(T(10))
    s.sendall(_handshake(0))
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    return s


def test_a_going_away_close_lets_the_writer_drain_what_is_queued(make_stack):
    """The server shuts down while a subscriber's write queue is full (it did not read for a
    while): what is queued still goes out, then the close frame."""
    import json

    from juggler.frames import OP_TEXT, encode_close, encode_frame
    from juggler.message import Evnt
    from juggler.peer import CLOSE

    delivered = threading.Semaphore(0)

    def count_events(next_handler):
        def handle(conn, msg):
            next_handler(conn, msg)
            if isinstance(msg, Evnt):
                delivered.release()  # written, or queued

        return handle

    size = 16
    stack = make_stack(handler=chain(count_events), write_queue_size=size, close_timeout=T(20))
    s = _raw_connect(stack.server)
    try:
        sub = {"meta": {"type": 3, "uuid": new_uuid()}, "payload": {"channel": "drain", "pattern": False}}
        s.sendall(encode_frame(OP_TEXT, json.dumps(sub).encode(), b"mask"))
        assert _eventually(lambda: len(stack.server.connections) == 1)  # (registered after the 101)
        (conn,) = stack.server.connections
        assert _eventually(lambda: conn.subscriptions() == {(False, "drain")})
        publisher = stack.client()
        big = "x" * 30000
        i = 0
        # it does not read: big events fill the socket's buffers, then the queue, one each
        while len(conn._queue) < size:
            publisher.pub("drain", [i, big])
            assert delivered.acquire(timeout=T(10))
            assert not conn.closed
            i += 1
        written = stack.server.stats.snapshot().get("write_EVNT", 0)
        pending = sum(isinstance(m, Evnt) for m in list(conn._queue._items) + conn._out_msgs)
        assert pending >= size - 1
        shutdown = threading.Thread(target=stack.server.shutdown, name="test-shutdown")
        shutdown.start()
        try:
            frames = PeerReader(s, client=True, limit=1 << 24)
            events = []
            while True:
                opcode, data = frames.read()
                if opcode == CLOSE:
                    s.sendall(encode_close(1001, "", b"mask"))  # so the server need not wait for it
                    break
                if opcode != OP_TEXT:
                    continue
                msg = json.loads(data)
                if msg["meta"]["type"] == 10:
                    events.append(msg["payload"]["args"][0])
        finally:
            shutdown.join()
        assert data.code == 1001
        assert len(events) >= written + pending, (len(events), written, pending)
        assert events == list(range(i))  # every one, in order
    finally:
        s.close()
