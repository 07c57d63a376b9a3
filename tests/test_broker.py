"""RedisBroker against fakeredis and a real redis-server: the exact redis layout of juggler.0."""

from __future__ import annotations

import json
import sys
import logging
import threading
import time

import fakeredis
import pytest
import redis

from juggler import BrokerError, CapacityExceeded, PayloadTooLarge, RedisBroker
from juggler.broker import RedisPubSub, call_timeout_key, calls_key, result_timeout_key, results_key
from juggler.message import CallPayload, EventPayload, ResultPayload, new_uuid

from .conftest import T


@pytest.fixture
def broker(redis_client):
    return RedisBroker(redis_client)


def call(uri="test.echo", args=None):
    return CallPayload(new_uuid(), new_uuid(), uri, args)


def _following(broker, conn=None):
    """``(conn, listener, deadlines)``: the results listener of a connection (new unless
    ``conn`` is given) that stores its calls ahead (follow_calls), and its calls' deadlines."""
    conn = conn or new_uuid()
    listener = broker.dedicated(results_key(conn))
    deadlines: dict = {}
    assert listener.follow_calls(deadlines)
    return conn, listener, deadlines


def test_store_call_uses_the_reference_layout(broker, redis_client):
    p = call(args={"x": 1})
    broker.store_call(p, 2.5)
    assert redis_client.lrange(calls_key("test.echo"), 0, -1) == [p.to_json().encode()]
    assert json.loads(redis_client.lindex("juggler:calls:{test.echo}", 0)) == {
        "conn_uuid": p.conn_uuid,
        "msg_uuid": p.msg_uuid,
        "uri": "test.echo",
        "args": {"x": 1},
    }
    key = f"juggler:calls:timeout:{{test.echo}}:{p.msg_uuid}"
    assert key == call_timeout_key("test.echo", p.msg_uuid)
    assert redis_client.get(key) == b"2500"
    assert 0 < redis_client.pttl(key) <= 2500


def test_args_omitted_when_absent(broker, redis_client):
    p = call(args=None)
    broker.store_call(p, 1)
    assert "args" not in json.loads(redis_client.lindex(calls_key("test.echo"), 0))


def test_pop_call_returns_payload_and_time_left_and_deletes_timeout_key(broker, redis_client):
    p = call(args=[1])
    broker.store_call(p, 5)
    popped = broker.pop_call(["other", "test.echo"], T(1))
    assert popped.payload == p
    assert 4 < popped.remaining <= 5 and not popped.expired
    assert not redis_client.exists(call_timeout_key("test.echo", p.msg_uuid))


def test_pop_call_of_expired_call(broker, redis_client):
    p = call()
    redis_client.lpush(calls_key("test.echo"), p.to_json())  # no timeout key: expired
    popped = broker.pop_call(["test.echo"], T(1))
    assert popped.payload == p and popped.expired and popped.remaining == 0


def test_pop_call_times_out_with_none(broker):
    assert broker.pop_call(["nothing.here"], 0.05) is None


def test_pop_call_drops_undecodable_payload(broker, redis_client):
    redis_client.lpush(calls_key("test.echo"), b"not json")
    assert broker.pop_call(["test.echo"], T(1)) is None


def test_pop_call_drops_a_payload_nested_deeper_than_its_thread_decodes(broker, redis_client, caplog):
    # (a server with more stack to spare, or another implementation, stored it): dropped and
    # logged as undecodable, where the RecursionError used to end the callee's worker thread
    deep = '{"conn_uuid":"c","msg_uuid":"m","uri":"test.echo","args":' + "[" * 100_000 + "]" * 100_000 + "}"
    redis_client.lpush(calls_key("test.echo"), deep)
    with caplog.at_level(logging.WARNING, logger="juggler"):
        assert broker.pop_call(["test.echo"], T(1)) is None
    assert "nested too deeply" in caplog.text
    p = call()
    broker.store_call(p, 5)
    assert broker.pop_call(["test.echo"], T(1)).payload == p  # and the next one comes


def test_call_capacity(redis_client):
    broker = RedisBroker(redis_client, call_cap=2)
    first, second = call(args=1), call(args=2)
    broker.store_call(first, 5)
    broker.store_call(second, 5)
    third = call(args=3)
    with pytest.raises(CapacityExceeded, match="list capacity exceeded"):
        broker.store_call(third, 5)
    # the refused call was trimmed off again, and its timeout key removed
    assert [CallPayload.from_json(x) for x in redis_client.lrange(calls_key("test.echo"), 0, -1)] == [second, first]
    assert not redis_client.exists(call_timeout_key("test.echo", third.msg_uuid))
    assert CapacityExceeded.nack_code == 500


def test_result_capacity_and_layout(redis_client):
    broker = RedisBroker(redis_client, result_cap=1)
    conn = new_uuid()
    r1 = ResultPayload(conn, new_uuid(), "u", {"ok": True})
    broker.store_result(r1, 1)
    assert redis_client.llen(f"juggler:results:{{{conn}}}") == 1
    assert redis_client.exists(result_timeout_key(conn, r1.msg_uuid))
    with pytest.raises(CapacityExceeded):
        broker.store_result(ResultPayload(conn, new_uuid(), "u", 2), 1)
    popped = broker.pop_result(conn, T(1))
    assert popped.payload == r1 and not popped.expired
    broker.discard_results(conn)
    assert not redis_client.exists(results_key(conn))


def test_list_ttl_is_raised_never_lowered(broker, redis_client):
    broker.store_call(call(), 10)
    assert 9000 < redis_client.pttl(calls_key("test.echo")) <= 10000
    broker.store_call(call(), 1)
    assert redis_client.pttl(calls_key("test.echo")) > 9000
    broker.store_call(call(), 20)
    assert redis_client.pttl(calls_key("test.echo")) > 19000


def test_scripts_survive_script_flush(broker, redis_client):
    broker.store_call(call(), 1)
    redis_client.script_flush()  # EVALSHA now answers NOSCRIPT: the broker falls back to EVAL
    broker.store_call(call(), 1)
    assert broker.pop_call(["test.echo"], T(1)) is not None
    assert redis_client.llen(calls_key("test.echo")) == 1


def test_a_listener_pops_results_until_woken(broker, redis_client):
    # A connection's results listener: the script that takes a result's timeout key goes to
    # redis with the next BRPOP (on a real redis), and every case still comes out right.
    conn = new_uuid()
    listener = broker.dedicated(results_key(conn))
    real = "fakeredis" not in type(redis_client).__module__
    try:
        first = ResultPayload(conn, new_uuid(), "test.echo", "one")
        broker.store_result(first, 5)
        popped = listener.pop_result(conn, None)
        assert popped.payload == first and 4 < popped.remaining <= 5
        assert not redis_client.exists(result_timeout_key(conn, first.msg_uuid))
        if real:  # the next BRPOP was sent with the script, before the result was handed over
            port = listener._own._sock.getsockname()[1]
            mine = [c for c in redis_client.client_list() if c["addr"].endswith(f":{port}")]
            assert [c["cmd"] for c in mine] == ["brpop"]

        late = ResultPayload(conn, new_uuid(), "test.echo", "late")
        broker.store_result(late, 5)
        redis_client.delete(result_timeout_key(conn, late.msg_uuid))  # its call expired
        popped = listener.pop_result(conn, None)
        assert popped.payload == late and popped.expired

        redis_client.rpush(results_key(conn), b"not json")
        assert listener.pop_result(conn, None) is None  # dropped (logged)
        broker.wake_results(conn)
        assert listener.pop_result(conn, None) is None  # woken

        after = ResultPayload(conn, new_uuid(), "test.echo", "after")
        broker.store_result(after, 5)
        assert listener.pop_result(conn, None).payload == after
        assert redis_client.llen(results_key(conn)) == 0
    finally:
        listener.close()


def test_a_listener_hands_a_result_over_before_redis_answers_when_its_call_has_time_left(real):
    # With the connection's own count of its calls' deadlines, a result whose call has time
    # left goes out without waiting for the script that takes its timeout key; the script's
    # reply is read (and dropped) on the next turn. Otherwise the listener waits for redis.
    broker = RedisBroker(real)
    conn = new_uuid()
    listener = broker.dedicated(results_key(conn))
    deadlines: dict = {}
    listener.call_deadlines = deadlines
    try:
        sure, unsure, unknown = (ResultPayload(conn, new_uuid(), "test.echo", n) for n in ("a", "b", "c"))
        deadlines[sure.msg_uuid] = time.monotonic() + 100
        deadlines[unsure.msg_uuid] = time.monotonic() + 0.01  # under RESULT_SURE_MARGIN
        for p in (sure, unsure, unknown):
            broker.store_result(p, 5)
        popped = [listener.pop_result(conn, None) for _ in range(3)]
        assert [p.payload for p in popped] == [sure, unsure, unknown]
        assert 99 < popped[0].remaining <= 100  # its connection's count: redis was not waited for
        assert 4 < popped[1].remaining <= 5 and 4 < popped[2].remaining <= 5  # redis' PTTL
        for p in (sure, unsure, unknown):  # every timeout key was taken all the same
            assert not real.exists(result_timeout_key(conn, p.msg_uuid))
        broker.wake_results(conn)
        assert listener.pop_result(conn, None) is None

        # with a reply left to drop: a wake-up marker, an undecodable item, a reconnect
        for item in ("wake", b"not json", "reconnect"):
            early = ResultPayload(conn, new_uuid(), "test.echo", "early")
            deadlines[early.msg_uuid] = time.monotonic() + 100
            broker.store_result(early, 5)
            assert listener.pop_result(conn, None).payload == early  # its script's reply pending
            if item == "wake":
                broker.wake_results(conn)
                assert listener.pop_result(conn, None) is None
            elif item == "reconnect":
                # the listener drops its connection, with the script's reply and a BRPOP in
                # flight: redis may not have read them yet, and a BRPOP it reads after the
                # close, in the same turn as the next RPUSH, still takes that result (and
                # writes it to a dead socket). A listener drops a connection so only when redis
                # stalls (abandon) or it stops; here redis drops it too, at once, so that the
                # result below can only go to the new connection.
                old = listener._own
                address = "%s:%d" % old._sock.getsockname()[:2]
                old.close()
                real.client_kill_filter(_id=None, addr=address, skipme=True)
            else:
                real.rpush(results_key(conn), item)
                assert listener.pop_result(conn, None) is None
            after = ResultPayload(conn, new_uuid(), "test.echo", "after")
            broker.store_result(after, 5)
            assert listener.pop_result(conn, None).payload == after
            assert not real.exists(result_timeout_key(conn, after.msg_uuid))
    finally:
        listener.close()
        broker.close()


class Listener:
    """Reads a RedisPubSub on a thread, as a server connection's pub-sub thread does."""

    def __init__(self, ps):
        import queue
        import threading

        self.ps = ps
        self.events = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-listener")
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                ev = self.ps.get_event(0.05)
            except ValueError as exc:
                ev = exc
            if ev is not None:
                self.events.put(ev)

    def close(self):
        self._stop.set()
        self._thread.join()
        self.ps.close()


def test_subscribe_returns_once_redis_confirmed(broker, redis_client):
    listener = Listener(broker.pubsub())
    try:
        listener.ps.subscribe("a.b", False)
        listener.ps.subscribe("a.*", True)
        # no waiting: once subscribe returned, redis counts the subscriptions
        assert redis_client.pubsub_numsub("a.b") == [(b"a.b", 1)]
        assert redis_client.pubsub_numpat() == 1
        uuid = new_uuid()
        assert broker.publish("a.b", EventPayload(uuid, {"v": 1})) == 2
        got = {listener.events.get(timeout=T(2)).pattern for _ in range(2)}
        assert got == {"", "a.*"}
        listener.ps.unsubscribe("a.b", False)
        listener.ps.unsubscribe("a.*", True)
        assert redis_client.pubsub_numsub("a.b") == [(b"a.b", 0)]
        assert broker.publish("a.b", EventPayload(uuid, 2)) == 0
    finally:
        listener.close()


class _ScriptedPubSub:
    """A stand-in for redis-py's PubSub whose confirmations a test drops, and whose next
    command fails as after a lost connection (redis-py connects again by itself then)."""

    def __init__(self):
        import queue

        self.replies = queue.Queue()
        self.drop: set = set()
        self.fail_next = False
        self.connection = None

    def _command(self, kind, channel):
        if self.fail_next:
            self.fail_next = False
            raise redis.exceptions.ConnectionError("connection lost")
        if (kind, channel) in self.drop:
            self.drop.discard((kind, channel))
            return
        self.replies.put({"type": kind, "channel": channel.encode(), "pattern": None, "data": 1})

    def subscribe(self, channel):
        self._command("subscribe", channel)

    def unsubscribe(self, channel):
        self._command("unsubscribe", channel)

    def psubscribe(self, channel):
        self._command("psubscribe", channel)

    def punsubscribe(self, channel):
        self._command("punsubscribe", channel)

    def get_message(self, timeout=0.0):
        import queue

        try:
            return self.replies.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self):
        pass


def test_a_confirmation_lost_with_its_connection_is_not_taken_by_a_later_request():
    """An UNSUBSCRIBE's confirmation never comes (it went with the connection); its request
    timed out and stays in line for a late confirmation. Once a command fails on that
    connection (so redis-py has connected again), that line is stale: the next UNSUBSCRIBE
    of the channel must get its own confirmation, not wait behind the lost one."""
    fake = _ScriptedPubSub()
    ps = RedisPubSub(fake, confirm_timeout=T(0.3))
    listener = Listener(ps)
    try:
        ps.subscribe("x", False)
        fake.drop.add(("unsubscribe", "x"))
        with pytest.raises(BrokerError, match="did not confirm"):
            ps.unsubscribe("x", False)
        fake.fail_next = True
        with pytest.raises(BrokerError):
            ps.subscribe("y", False)
        ps.subscribe("x", False)
        ps.unsubscribe("x", False)  # took the lost one's place before: timed out
        ps.subscribe("x", False)
        ps.unsubscribe("x", False)
    finally:
        listener.close()


def test_unsubscribe_of_what_is_not_subscribed_is_a_no_op(broker, redis_client):
    listener = Listener(broker.pubsub())
    listener.ps.confirm_timeout = T(2)
    try:
        listener.ps.unsubscribe("never", False)  # returns at once, no confirmation to wait for
        listener.ps.subscribe("one", False)
        listener.ps.unsubscribe("other", False)
        listener.ps.unsubscribe("o*", True)
        listener.ps.unsubscribe("one", False)
        listener.ps.unsubscribe("one", False)
        assert redis_client.pubsub_numsub("one") == [(b"one", 0)]
    finally:
        listener.close()


def test_subscribe_without_a_reader_fails_clearly(broker):
    ps = broker.pubsub()
    ps.confirm_timeout = 0.05
    try:
        with pytest.raises(BrokerError, match="did not confirm subscribe 'x'"):
            ps.subscribe("x", False)
    finally:
        ps.close()


def test_event_payload_wire_format(broker, redis_client):
    ps = redis_client.pubsub(ignore_subscribe_messages=True)
    ps.subscribe("ch")
    ps.get_message(timeout=T(1))
    uuid = new_uuid()
    broker.publish("ch", EventPayload(uuid, [1, "x"]))
    msg = ps.get_message(timeout=T(2))
    assert json.loads(msg["data"]) == {"msg_uuid": uuid, "args": [1, "x"]}
    ps.close()


def test_undecodable_event_is_a_value_error(broker, redis_client):
    listener = Listener(broker.pubsub())
    try:
        listener.ps.subscribe("raw", False)
        assert redis_client.publish("raw", "not json") == 1
        err = listener.events.get(timeout=T(2))
        assert isinstance(err, ValueError) and "'raw'" in str(err)
    finally:
        listener.close()


def test_redis_down_is_a_broker_error():
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from .conftest import free_port

    dead = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    broker = RedisBroker(dead)
    with pytest.raises(BrokerError, match="redis unavailable"):
        broker.store_call(call(), 1)
    with pytest.raises(BrokerError):
        broker.publish("x", EventPayload(new_uuid(), 1))
    assert broker.ping() is False
    dead.close()


def test_negative_caps_refused(redis_client):
    with pytest.raises(ValueError):
        RedisBroker(redis_client, call_cap=-1)


def test_list_without_ttl_is_left_alone(broker, redis_client):
    """A list a Go server filled has no TTL: setting one could expire its calls early."""
    go_call = call(args="from go")
    redis_client.lpush(calls_key("test.echo"), go_call.to_json())  # the reference sets no TTL
    broker.store_call(call(), 0.2)
    assert redis_client.pttl(calls_key("test.echo")) == -1
    assert redis_client.llen(calls_key("test.echo")) == 2


def test_from_url_owns_its_client_and_fails_fast_when_redis_is_down(redis_server):
    import time

    from .conftest import free_port

    broker = RedisBroker.from_url(redis_server.url, call_cap=3)
    assert broker.ping() and broker.call_cap == 3
    broker.store_call(call(), 1)
    broker.close()
    dead = RedisBroker.from_url(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(BrokerError, match="redis unavailable"):
        dead.store_call(call(), 1)
    assert time.monotonic() - started < T(2)  # a prompt NACK, not redis-py's default retries
    dead.close()


@pytest.mark.timeout(60)
def test_connections_made_at_once_on_a_fresh_fakeredis_share_its_database():
    # fakeredis makes a database on a connection's first use, unlocked: connections made at
    # once could each get one of their own. A callee worker then never saw its wake-up marker
    # (and stop() hung). The broker makes the database first, on one thread.
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # thread switches at every turn: the race shows within a few tries
    try:
        for _ in range(60):
            client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
            RedisBroker(client)
            pool = client.connection_pool
            conns: list = []
            start = threading.Barrier(8)

            def connect():
                start.wait()
                c = pool.connection_class(**pool.connection_kwargs)
                c.connect()
                conns.append(c)

            threads = [threading.Thread(target=connect) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            client.set("seen", "yes")
            for c in conns:
                c.send_command("GET", "seen")
                assert c.read_response() == b"yes"
                c.disconnect()
    finally:
        sys.setswitchinterval(before)


def _until(predicate, what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + T(timeout)
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_listener_that_follows_its_calls_stores_them_and_brings_their_results(real):
    # A connection's calls go to redis through its results listener's connection, with the
    # BRPOP for their result in the same write; the listener reads redis' answer (stored, or
    # why not) before the result, and keeps no BRPOP waiting once no call is in flight.
    import queue

    broker = RedisBroker(real, call_cap=1)
    conn, listener, deadlines = _following(broker)
    got: queue.Queue = queue.Queue()

    def listen():
        while True:
            try:
                popped = listener.pop_result(conn, None)
                if popped is not None:  # as a connection does: its call is no longer in flight
                    deadlines.pop(popped.payload.msg_uuid, None)
                got.put(popped)
            except BrokerError as exc:
                got.put(exc)
                return

    def call(uri, in_flight=True):
        c = CallPayload(conn, new_uuid(), uri, uri)
        if in_flight:
            deadlines[c.msg_uuid] = time.monotonic() + 5
        return c

    def my_cmd():
        port = listener._own._sock.getsockname()[1]
        return [c["cmd"] for c in real.client_list() if c["addr"].endswith(f":{port}")][0]

    first = call("test.echo", in_flight=False)
    assert not listener.store_call_ahead(first, 5, print)  # no connection yet: nothing sent
    t = threading.Thread(target=listen, name="juggler-test-listener")
    t.start()
    try:
        # with no call in flight, it waits for what is sent, with no BRPOP
        _until(lambda: listener._own is not None, "the listener's connection")
        assert my_cmd() != "brpop"
        deadlines[first.msg_uuid] = time.monotonic() + 5
        stored: list = []
        assert listener.store_call_ahead(first, 5, stored.append)
        _until(lambda: stored, "the answer to the store")
        assert stored == [None] and real.exists(call_timeout_key("test.echo", first.msg_uuid))
        assert not listener.store_call_ahead(call("test.echo", in_flight=False), 5, print)  # a BRPOP waits
        popped = broker.pop_call(["test.echo"], 1)
        assert popped.payload == first
        broker.store_result(ResultPayload(conn, first.msg_uuid, "test.echo", "one"), 5)
        result = got.get(timeout=T(5))
        assert result.payload.msg_uuid == first.msg_uuid and 4 < result.remaining <= 5
        _until(lambda: my_cmd() == "eval", "the timeout key taken, and no BRPOP after it")
        assert not real.exists(result_timeout_key(conn, first.msg_uuid))
        _until(lambda: not listener._expect, "the script's reply read")  # (then it waits for us)

        # redis closes the idle connection (its idle-client timeout): the listener takes a new one
        old = listener._own  # (before the kill: the new one may come at once)
        real.client_kill_filter(_id=int(next(c["id"] for c in real.client_list() if c["cmd"] == "eval" and
                                             c["addr"].endswith(f":{old._sock.getsockname()[1]}"))))
        _until(lambda: listener._own is not old and listener._own is not None and not listener._own.broken,
               "a new connection")
        assert got.empty()  # nothing came of it

        # a refusal comes back the same way, and nothing was stored
        broker.store_call(CallPayload(new_uuid(), new_uuid(), "nobody.home", 0), 5)  # the list is full
        refused: list = []
        assert listener.store_call_ahead(call("nobody.home"), 5, refused.append)
        _until(lambda: refused, "the refusal")
        assert isinstance(refused[0], CapacityExceeded) and real.llen(calls_key("nobody.home")) == 1
        parent = RedisBroker(real, max_args_size=4)
        small = parent.dedicated(results_key(conn))
        try:
            assert small.follow_calls({})
            with pytest.raises(PayloadTooLarge, match="call args of"):  # checked before anything is sent
                small.store_call_ahead(CallPayload(conn, new_uuid(), "x", "over four bytes"), 5, print)
        finally:
            small.close()
            parent.close()
        assert got.empty()
    finally:
        listener.interrupt()  # wakes it, BRPOP or not
        t.join(T(5))
        listener.close()
        broker.close()
    assert not t.is_alive() and isinstance(got.get_nowait(), BrokerError)


def test_follow_calls_applies_to_a_listener_on_the_fast_path_only(real):
    broker = RedisBroker(real)
    fake = RedisBroker(fakeredis.FakeRedis())
    try:
        assert not broker.follow_calls({})  # not a listener
        listener = fake.dedicated("k")
        assert not listener.follow_calls({})  # fakeredis keeps redis-py's path
        assert not listener.store_call_ahead(CallPayload("c", "m", "u", 1), 5, print)
        listener.close()
    finally:
        broker.close()
        fake.close()


def test_a_call_stored_as_the_idle_connection_dies_gets_an_error_not_silence(real):
    # Redis closes a listener's idle connection just as the reader stores a call on it: the
    # listener must not take a new connection quietly (the call would be lost with no ACK or
    # NACK) but fail, giving the call its error.
    broker = RedisBroker(real)
    conn, listener, deadlines = _following(broker)
    own = listener._own_connection()  # (made here, so that its read can be replaced)
    call = CallPayload(conn, new_uuid(), "test.echo", 1)
    stored: list = []

    def dying_read(wait=False, before_wait=None):
        deadlines[call.msg_uuid] = time.monotonic() + 5  # the reader: call_started, then the store
        assert listener.store_call_ahead(call, 5, stored.append)
        own.broken = True
        raise redis.exceptions.ConnectionError("Connection closed by server.")

    own.read_reply = dying_read
    outcome: list = []

    def listen():
        try:
            outcome.append(listener.pop_result(conn, None))
        except BrokerError as exc:
            outcome.append(exc)

    t = threading.Thread(target=listen, name="juggler-test-listener")
    t.start()
    t.join(T(5))
    try:
        assert not t.is_alive(), "the listener went on as if nothing had been sent"
        assert len(stored) == 1 and isinstance(stored[0], BrokerError)
        assert len(outcome) == 1 and isinstance(outcome[0], BrokerError)
    finally:
        listener.interrupt()
        t.join(T(5))
        listener.close()
        broker.close()


def test_a_listener_reads_a_brpop_reply_without_a_read_that_comes_back_empty_first(real):
    # a script's reply may be in the socket already (read without letting go of the GIL); a
    # BRPOP's waits for a callee: waited for at once, no non-blocking read tried first
    broker = RedisBroker(real)
    conn, listener, deadlines = _following(broker)
    own = listener._own_connection()
    seen: list = []
    read_reply = own.read_reply

    def read(wait=False, before_wait=None):
        with listener._own_lock:
            head = listener._expect[0] if listener._expect else None
        seen.append((wait, "store" if type(head) is tuple else head))
        return read_reply(wait, before_wait)

    own.read_reply = read
    call = CallPayload(conn, new_uuid(), "test.echo", 1)
    result = ResultPayload(conn, call.msg_uuid, "test.echo", 2)
    deadlines[call.msg_uuid] = time.monotonic() + 5
    stored: list = []
    pusher = threading.Timer(0.05, lambda: (real.set(result_timeout_key(conn, call.msg_uuid), 1, px=5000),
                                            real.rpush(results_key(conn), result.to_json())))  # fmt: skip
    try:
        assert listener.store_call_ahead(call, 5, stored.append)
        pusher.start()
        popped = listener.pop_result(conn, None)
        assert stored == [None] and popped is not None and popped.payload == result
        assert seen == [(False, "store"), (True, "brpop")]
    finally:
        pusher.join(T(5))
        listener.close()
        broker.close()


def test_a_listener_never_closes_the_socket_the_reader_is_sending_on(monkeypatch):
    """The reader stores calls ahead on the listener's connection (with raw sends on its
    descriptor) while the listener drops that connection (here: redis cuts it on the script
    that takes a result's timeout key, once the listener has let the reader send again): the
    socket must not be closed while a send on it may be under way, or its descriptor, reused
    by a new socket, would carry the call's bytes to another peer. Stressed under a tiny switch
    interval, the window of each raw send widened; no byte may reach a socket opened meanwhile
    (another peer's, or the listener's next connection before its handshake)."""
    import random
    import socket
    import sys

    from juggler import gilsend

    from .scripted_redis import CUT, ScriptedRedis

    real_send = gilsend.send_nowait

    def slow_send(fd, data):  # the window between taking the descriptor and sending on it
        time.sleep(random.random() * 0.001)
        return real_send(fd, data)

    monkeypatch.setattr(gilsend, "send_nowait", slow_send)
    conn = new_uuid()
    result = ResultPayload(conn, new_uuid(), "u", "r").to_json().encode()
    key = results_key(conn).encode()
    brpop_reply = b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(result), result)

    def answer(command):
        name = command[0].upper()
        if name == b"BRPOP":
            return brpop_reply
        if name in (b"EVAL", b"EVALSHA"):  # the store (2 keys), or the timeout key's script
            return b":1\r\n" if command[2] == b"2" else CUT
        return b"-ERR unexpected\r\n"

    stray: list = []
    stop = threading.Event()
    with ScriptedRedis(answer) as fake:
        client = redis.Redis.from_url(fake.url)
        broker = RedisBroker(client)
        listener = broker.dedicated(results_key(conn))
        assert listener.follow_calls({})  # (no deadlines known: each result's key is read)
        stored: list = []

        def listen():
            while not stop.is_set():
                try:
                    listener.pop_result(conn, None)
                except BrokerError:
                    pass

        def store():
            while not stop.is_set():
                listener.store_call_ahead(CallPayload(conn, new_uuid(), "u", "x" * 200), 5, stored.append)

        def victims():  # new sockets, which may get the number of a descriptor just closed
            pairs: list = []
            while not stop.is_set() or pairs:
                if not stop.is_set():
                    pairs.append(socket.socketpair())
                    if len(pairs) < 8:
                        continue
                for s in pairs.pop(0):
                    s.setblocking(False)
                    try:
                        stray.append(s.recv(4096))
                    except BlockingIOError:
                        pass
                    s.close()

        threads = [threading.Thread(target=f, name=f"juggler-test-{f.__name__}") for f in (listen, store, victims)]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            for t in threads:
                t.start()
            # the stress lasts 3 s, and then until the connection was dropped and made again
            # (and calls answered) more than 20 times: on a loaded machine 3 s may not be enough
            started = time.monotonic()
            while time.monotonic() - started < T(60) and not (
                    time.monotonic() - started >= T(3) and fake.accepted > 20 and stored.count(None) > 20):
                stop.wait(0.1)
        finally:
            stop.set()
            sys.setswitchinterval(interval)
            listener.interrupt()
            for t in threads:
                t.join(T(10))
            listener.close()
            broker.close()
            client.close()
        assert not any(t.is_alive() for t in threads)
        assert fake.accepted > 20  # (the connection was dropped and made again many times)
        assert not fake.early, fake.early[:3]
    assert not [data for data in stray if data], stray[:3]
    assert stored.count(None) > 20  # calls stored, and answered once each


def _pop_in_turn(listener, broker, deadlines, conn, n):
    """As a connection would: a call in flight, its result stored, popped, the call over."""
    popped = []
    for i in range(n):
        p = ResultPayload(conn, new_uuid(), "test.echo", i)
        deadlines[p.msg_uuid] = time.monotonic() + 100  # time left: handed over at once
        broker.store_result(p, 5)
        got = listener.pop_result(conn, None)
        del deadlines[p.msg_uuid]
        assert got is not None and got.payload == p
        popped.append(p)
    return popped


def test_a_result_handed_over_at_once_has_its_timeout_key_taken_with_no_reply_to_read(real):
    # The script that takes the timeout key of a result handed over at once is sent with
    # CLIENT REPLY SKIP: redis runs it and answers nothing, so the listener has no reply to
    # wait for (nor to wake for). Whether redis can is asked with the first one.
    broker = RedisBroker(real)
    conn, listener, deadlines = _following(broker)
    try:
        popped = _pop_in_turn(listener, broker, deadlines, conn, 3)
        own = listener._own
        assert own is not None and own.reply_skip is True  # redis answered CLIENT REPLY ON
        assert list(listener._expect) == []  # nothing awaited after the last one
        deadline = time.monotonic() + T(5)
        while any(real.exists(result_timeout_key(conn, p.msg_uuid)) for p in popped):  # run by redis
            assert time.monotonic() < deadline, "a result's timeout key was not taken"
            time.sleep(0.01)
        real.ping()  # (a command after them: redis has written anything it would)
        assert own.alive(), "redis answered a script whose reply was to be skipped"
        _pop_in_turn(listener, broker, deadlines, conn, 2)  # the connection is still in step
        assert listener._own is own and own.alive()
    finally:
        listener.close()



def _listener_reply(command, key, results):
    """A scripted redis' answer to a results listener's BRPOP (the next of ``results``, on
    ``key``) and to its timeout-key script (4 s left); an error to anything else."""
    name = command[0].upper()
    if name == b"BRPOP":
        data = results.pop(0)
        return b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(data), data)
    if name == b"EVAL" and command[2] == b"1":  # the timeout key's script
        return b":4000\r\n"
    return b"-ERR unexpected\r\n"

@pytest.mark.parametrize("refusal", [b"-ERR unknown subcommand 'REPLY'\r\n", b"+OK\r\n"], ids=["refused", "ignored"])
def test_a_redis_that_does_not_skip_replies_gets_them_read_and_dropped(refusal):
    # A server that does not know CLIENT REPLY (an old one, one behind a proxy) answers an
    # error to it; one that takes it but answers all the same sends +OK and every reply:
    # either way the listener finds out from the first probe, and then reads each script's
    # reply, as before.
    from .scripted_redis import ScriptedRedis

    conn = new_uuid()
    key = results_key(conn).encode()
    results: list = []

    def answer(command):
        name = command[0].upper()
        if name == b"CLIENT":
            return refusal
        if name == b"ECHO":
            return b"$%d\r\n%s\r\n" % (len(command[1]), command[1])
        return _listener_reply(command, key, results)

    with ScriptedRedis(answer) as fake:
        client = redis.Redis.from_url(fake.url)
        _, listener, deadlines = _following(RedisBroker(client), conn)
        try:
            for i in range(3):
                p = ResultPayload(conn, new_uuid(), "test.echo", i)
                deadlines[p.msg_uuid] = time.monotonic() + 100
                results.append(p.to_json().encode())
                got = listener.pop_result(conn, None)
                del deadlines[p.msg_uuid]
                assert got is not None and got.payload == p
            own = listener._own
            assert own is not None and own.reply_skip is False
            names = [c[:3] for c in fake.commands if c[0].upper() == b"CLIENT"]
            assert names == [[b"CLIENT", b"REPLY", b"SKIP"]]  # tried once, with the probe
            deadline = time.monotonic() + T(5)
            while [c[0] for c in fake.commands].count(b"EVAL") < 3:  # (the last one on its way)
                assert time.monotonic() < deadline, "a result's timeout key was not taken"
                time.sleep(0.01)
            assert not listener._expect or list(listener._expect) == ["skip"]  # (its reply, to drop)
        finally:
            listener.close()
            client.close()


def test_a_redis_that_skips_a_reply_but_refuses_echo_is_not_asked_again_and_stays_in_step():
    # CLIENT REPLY SKIP taken, but the probe's ECHO refused (an ACL without it): the replies
    # that follow cannot be counted, so the listener gives its connection up once (a
    # BrokerError, as for redis gone), and neither it nor another listener of the same
    # broker asks again: the next connection reads and drops each script's reply.
    from .scripted_redis import ScriptedRedis

    conn = new_uuid()
    key = results_key(conn).encode()
    results: list = []
    skip = [False]

    def answer(command):
        name = command[0].upper()
        if skip[0]:
            skip[0] = False
            return None
        if name == b"CLIENT":
            skip[0] = True
            return None
        if name == b"ECHO":
            return b"-NOPERM this user has no permissions to run the 'echo' command\r\n"
        return _listener_reply(command, key, results)

    def pop(i):
        p = ResultPayload(conn, new_uuid(), "test.echo", i)
        deadlines[p.msg_uuid] = time.monotonic() + 100
        results.append(p.to_json().encode())
        try:
            return p, listener.pop_result(conn, None)
        finally:
            del deadlines[p.msg_uuid]

    with ScriptedRedis(answer) as fake:
        client = redis.Redis.from_url(fake.url)
        broker = RedisBroker(client)
        _, listener, deadlines = _following(broker, conn)
        try:
            p, got = pop(0)
            assert got is not None and got.payload == p  # handed over, the probe sent behind it
            results.append(b"")  # (what the next BRPOP takes, on the connection given up)
            with pytest.raises(BrokerError, match="out of step"):
                listener.pop_result(conn, None)
            assert listener._no_reply_skip.found and broker._no_reply_skip.found
            results.clear()
            for i in range(1, 4):  # a new connection: in step, each script's reply read and dropped
                p, got = pop(i)
                assert got is not None and got.payload == p
            names = [c[:3] for c in fake.commands if c[0].upper() == b"CLIENT"]
            assert names == [[b"CLIENT", b"REPLY", b"SKIP"]]  # asked once
            other = broker.dedicated(results_key(new_uuid()))
            assert other._no_reply_skip.found  # (nor will another listener of this broker)
            other.close()
        finally:
            listener.close()
            client.close()
