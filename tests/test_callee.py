"""Callee pools against fakeredis and a real redis-server, without a server."""

from __future__ import annotations

import threading

import pytest

from juggler import Callee, RedisBroker
from juggler.broker import calls_key, result_timeout_key, results_key
from juggler.message import CallPayload, ResultPayload, new_uuid

from .conftest import T


@pytest.fixture
def broker(redis_client):
    return RedisBroker(redis_client)


def send_call(broker, uri, args, timeout=5.0):
    p = CallPayload(new_uuid(), new_uuid(), uri, args)
    broker.store_call(p, timeout)
    return p


def take_result(broker, p, block=None):
    popped = broker.pop_result(p.conn_uuid, block or T(5))
    assert popped is not None, "no result stored"
    return popped


def test_runs_function_and_stores_result_with_remaining_ttl(broker, redis_client):
    callee = Callee(broker, workers=2, block=0.05)
    callee.register("math.add", lambda a: a[0] + a[1])
    with callee:
        p = send_call(broker, "math.add", [2, 3], timeout=3.0)
        popped = take_result(broker, p)
    assert popped.payload == ResultPayload(p.conn_uuid, p.msg_uuid, "math.add", 5)
    assert 0 < popped.remaining <= 3.0


def test_result_timeout_key_uses_time_left(broker, redis_client):
    gate = threading.Event()
    callee = Callee(broker, workers=1, block=0.05)
    callee.register("slow", lambda a: gate.wait(T(5)) and "done")
    with callee:
        p = send_call(broker, "slow", None, timeout=10.0)
        assert callee.stats.wait_for(lambda s: s.busy == 1, T(5))
        gate.set()
        assert callee.stats.wait_for(lambda s: s.calls == 1, T(5))
        # the result waits in the connection's list with at most what the call had left
        key = result_timeout_key(p.conn_uuid, p.msg_uuid)
        assert redis_client.exists(results_key(p.conn_uuid))
        assert 0 < redis_client.pttl(key) <= 10000


def test_several_uris_on_one_callee(broker):
    callee = Callee(broker, workers=1, block=0.05)
    callee.register("a", lambda x: f"a:{x}")
    callee.register("b", lambda x: f"b:{x}")
    with callee:
        pa, pb = send_call(broker, "a", 1), send_call(broker, "b", 2)
        got = {take_result(broker, pa).payload.args, take_result(broker, pb).payload.args}
    assert got == {"a:1", "b:2"}
    assert sorted(callee.uris) == ["a", "b"]


def test_raising_function_gives_error_result_and_worker_goes_on(broker, caplog):
    def boom(args):
        raise ValueError("bad input")

    callee = Callee(broker, workers=1, block=0.05)
    callee.register("boom", boom)
    callee.register("ok", lambda a: a)
    with caplog.at_level("ERROR", logger="juggler.callee"), callee:
        p1 = send_call(broker, "boom", 1)
        assert take_result(broker, p1).payload.args == {"error": {"message": "bad input", "type": "ValueError"}}
        p2 = send_call(broker, "ok", 2)
        assert take_result(broker, p2).payload.args == 2
    assert [r.message for r in caplog.records].count("callee juggler-callee: function for boom raised") == 1
    assert callee.stats.snapshot() == {"calls": 2, "expired": 0, "errors": 1, "busy": 0}


def test_exception_without_message_uses_its_type(broker):
    def boom(args):
        raise KeyError()

    callee = Callee(broker, workers=1, block=0.05)
    callee.register("boom", boom)
    with callee:
        p = send_call(broker, "boom", 1)
        assert take_result(broker, p).payload.args == {"error": {"message": "KeyError", "type": "KeyError"}}


def test_non_json_result_becomes_error_result(broker):
    callee = Callee(broker, workers=1, block=0.05)
    callee.register("obj", lambda a: object())
    with callee:
        p = send_call(broker, "obj", 1)
        args = take_result(broker, p).payload.args
    assert "not JSON-serializable" in args["error"]["message"]


def test_expired_call_is_never_run(broker, redis_client):
    ran = []
    callee = Callee(broker, workers=1, block=0.05)
    callee.register("x", ran.append)
    p = CallPayload(new_uuid(), new_uuid(), "x", 1)
    redis_client.lpush(calls_key("x"), p.to_json())  # no timeout key: it has expired
    with callee:
        assert callee.stats.wait_for(lambda s: s.expired == 1, T(5))
    assert ran == []
    assert not redis_client.exists(results_key(p.conn_uuid))


def test_result_dropped_when_call_expires_while_running(broker, redis_client):
    gate = threading.Event()
    callee = Callee(broker, workers=1, block=0.05)
    callee.register("slow", lambda a: gate.wait(T(5)))
    with callee:
        p = send_call(broker, "slow", None, timeout=0.05)
        assert callee.stats.wait_for(lambda s: s.busy == 1, T(5))
        # the call had 50 ms; it is still running, so by the time it returns nothing is left
        threading.Timer(0.1, gate.set).start()
        assert callee.stats.wait_for(lambda s: s.expired == 1, T(5))
    assert not redis_client.exists(results_key(p.conn_uuid))


def test_stop_is_idempotent_and_joins_workers(broker):
    callee = Callee(broker, workers=3, block=0.05, name="juggler-callee-t")
    callee.register("x", lambda a: a)
    callee.start()
    assert sum(t.name.startswith("juggler-callee-t-") for t in threading.enumerate()) == 3
    assert callee.stop() is True
    assert callee.stop() is True
    assert not any(t.name.startswith("juggler-callee-t-") for t in threading.enumerate())
    with pytest.raises(RuntimeError):
        callee.start()


def test_stop_waits_for_running_calls(broker):
    gate = threading.Event()
    callee = Callee(broker, workers=1, block=0.05)
    callee.register("slow", lambda a: gate.wait(T(5)) and "finished")
    callee.start()
    p = send_call(broker, "slow", None, timeout=T(10))
    assert callee.stats.wait_for(lambda s: s.busy == 1, T(5))
    assert callee.stop(timeout=0.05) is False  # still running
    gate.set()
    assert callee.stop() is True
    assert take_result(broker, p).payload.args == "finished"


def test_serve_forever_returns_after_stop(broker):
    callee = Callee(broker, workers=1, block=0.05)
    callee.register("x", lambda a: a)
    t = threading.Thread(target=callee.serve_forever, name="serve")
    t.start()
    p = send_call(broker, "x", "v")
    assert take_result(broker, p).payload.args == "v"
    callee.stop()
    t.join(T(5))
    assert not t.is_alive()


def test_bad_configuration_is_refused(broker):
    with pytest.raises(ValueError):
        Callee(broker, workers=0)
    callee = Callee(broker)
    with pytest.raises(ValueError):
        callee.register("", lambda a: a)
    with pytest.raises(TypeError):
        callee.register("x", "not callable")
    with pytest.raises(RuntimeError, match="no URI"):
        callee.start()
    callee.register("x", lambda a: a)
    callee.start()
    try:
        with pytest.raises(RuntimeError, match="before start"):
            callee.register("y", lambda a: a)
    finally:
        callee.stop()


def test_redis_outage_backs_off_and_recovers(redis_server):
    """Workers survive redis being unreachable and serve again once it is back."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from .conftest import start_redis_server, stop_redis_server

    rp = start_redis_server()
    client = redis.Redis(port=rp.port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    broker = RedisBroker(client)
    callee = Callee(broker, workers=1, block=0.05, max_backoff=0.2)
    callee.register("x", lambda a: a)
    try:
        callee.start()
        port = rp.port
        stop_redis_server(rp)
        rp = start_redis_server(port)
        p = send_call(broker, "x", "back")
        assert take_result(broker, p, T(10)).payload.args == "back"
    finally:
        callee.stop()
        stop_redis_server(rp)
        client.close()


def test_sys_exit_in_a_function_does_not_end_the_worker(broker):
    import sys

    callee = Callee(broker, workers=1, block=0.05)
    callee.register("exit", lambda a: sys.exit(3))
    callee.register("ok", lambda a: a)
    with callee:
        p = send_call(broker, "exit", None)
        assert take_result(broker, p).payload.args == {"error": {"message": "3", "type": "SystemExit"}}
        p = send_call(broker, "ok", "alive")
        assert take_result(broker, p).payload.args == "alive"


def test_unencodable_deep_result_and_foreign_uri_do_not_end_the_worker(broker, redis_client):
    def deep(args):
        value: list = []
        for _ in range(100000):
            value = [value]
        return value

    callee = Callee(broker, workers=1, block=0.05)
    callee.register("deep", deep)
    callee.register("ok", lambda a: a)
    with callee:
        p = send_call(broker, "deep", None)
        assert "not JSON-serializable" in take_result(broker, p).payload.args["error"]["message"]
        # a payload in ok's list that names another uri is dropped, not run, not fatal
        stray = CallPayload(new_uuid(), new_uuid(), "elsewhere", 1)
        redis_client.lpush(calls_key("ok"), stray.to_json())
        p = send_call(broker, "ok", "alive")
        assert take_result(broker, p).payload.args == "alive"
    assert not redis_client.exists(results_key(stray.conn_uuid))


# -- stop without polling, batched pops (issue: serve calls at Go speed) -------------------------


def test_stop_wakes_workers_blocked_in_brpop_at_once(broker):
    """Workers wait with a BRPOP that never times out; stop() unblocks them (CLIENT UNBLOCK)
    well under the old 1 s poll, however long ``block`` is."""
    import time

    callee = Callee(broker, workers=4, block=30.0, name="juggler-callee-wake")
    callee.register("x", lambda a: a)
    callee.start()
    p = send_call(broker, "x", "up")  # every worker is past its first BRPOP
    assert take_result(broker, p).payload.args == "up"
    time.sleep(0.2)  # and blocked again
    started = time.monotonic()
    assert callee.stop(timeout=T(5)) is True
    assert time.monotonic() - started < 0.5
    assert not any(t.name.startswith("juggler-callee-wake-") for t in threading.enumerate())


def test_idle_workers_send_one_brpop_each_and_leave_no_key(broker, redis_client, monkeypatch):
    """An idle worker blocks in one BRPOP with no timeout, on fakeredis too (no short steps);
    stop() wakes it and leaves no key of its own behind."""
    import time

    from juggler.broker import CallPopper

    brpops = []
    write = CallPopper._write

    def counting(self, commands):
        brpops.extend(c for c in commands if c[0] == "BRPOP")
        return write(self, commands)

    monkeypatch.setattr(CallPopper, "_write", counting)
    callee = Callee(broker, workers=2, block=30.0)
    callee.register("x", lambda a: a)
    callee.start()
    time.sleep(0.5)  # idle: the old fakeredis worker sent a BRPOP every 50 ms
    assert len(brpops) == 2
    assert all(c[-1] == 0 for c in brpops)
    started = time.monotonic()
    assert callee.stop(timeout=T(5)) is True
    assert time.monotonic() - started < 0.5
    assert list(redis_client.scan_iter("juggler:callee:*")) == []


def test_every_worker_shares_a_plain_fakeredis_clients_data():
    """Workers of a callee on ``fakeredis.FakeRedis()`` (no FakeServer given) open their
    connections at once; fakeredis could give one an in-memory server of its own, where it
    would never see a call nor its wake-up. Eight calls that wait for each other need all
    eight workers, and stop() then ends every one promptly."""
    import time

    import fakeredis

    broker = RedisBroker(fakeredis.FakeRedis())
    barrier = threading.Barrier(8)
    callee = Callee(broker, workers=8, batch=1, block=30.0)
    callee.register("meet", lambda a: barrier.wait(T(10)) >= 0)
    callee.start()
    try:
        pending = [send_call(broker, "meet", i) for i in range(8)]
        assert all(take_result(broker, p).payload.args is True for p in pending)
    finally:
        started = time.monotonic()
        assert callee.stop(timeout=T(5)) is True
    assert time.monotonic() - started < 0.5


def test_stop_right_after_start_is_prompt(broker):
    """A stop that races with workers sending their first BRPOP still ends them promptly."""
    import time

    for _ in range(5):
        callee = Callee(broker, workers=3, block=30.0)
        callee.register("x", lambda a: a)
        callee.start()
        started = time.monotonic()
        assert callee.stop(timeout=T(5)) is True
        assert time.monotonic() - started < 0.5


def test_batched_pops_run_every_call_exactly_once(broker, redis_client):
    """Calls already waiting are taken in batches: each live one runs once and gets its
    result, with its own remaining time; expired ones mixed in are counted, never run."""
    from collections import Counter

    ran: Counter = Counter()
    lock = threading.Lock()

    def record(args):
        with lock:
            ran[args] += 1
        return args

    live, dead = [], []
    for i in range(300):
        if i % 7 == 3:  # expired: in the list, without its timeout key
            p = CallPayload(new_uuid(), new_uuid(), "rec", f"dead-{i}")
            redis_client.lpush(calls_key("rec"), p.to_json())
            dead.append(p)
        else:
            # a long timeout: each result's list expires with what its call had left
            live.append(send_call(broker, "rec", f"live-{i}", timeout=T(300)))
    callee = Callee(broker, workers=3, block=0.05, batch=16)
    callee.register("rec", record)
    with callee:
        assert callee.stats.wait_for(lambda s: s.calls + s.expired >= len(live) + len(dead), T(20))
        stats = callee.stats.snapshot()
    assert stats == {"calls": len(live), "expired": len(dead), "errors": 0, "busy": 0}
    assert ran == Counter(p.args for p in live)
    for p in live:
        popped = broker.pop_result(p.conn_uuid, 0.01)
        assert popped is not None and popped.payload == ResultPayload(p.conn_uuid, p.msg_uuid, "rec", p.args)
        assert 0 < popped.remaining <= T(300)
        assert broker.pop_result(p.conn_uuid, 0.01) is None  # stored once
    for p in dead:
        assert not redis_client.exists(results_key(p.conn_uuid))
    assert not redis_client.exists(calls_key("rec"))
    assert not redis_client.keys("juggler:calls:timeout:*")  # every timeout key consumed


def test_batched_results_keep_errors_and_caps(redis_client):
    """In a batch, a failing function gets its error result, a result over the result cap
    is refused (and logged) without losing the others."""
    broker = RedisBroker(redis_client, result_cap=2)
    conn = new_uuid()
    calls = [CallPayload(conn, new_uuid(), "f", i) for i in range(4)]
    for p in calls:
        broker.store_call(p, T(30))

    def f(i):
        if i == 1:
            raise ValueError("one is bad")
        return i * 10

    callee = Callee(broker, workers=1, block=0.05, batch=8)
    callee.register("f", f)
    with callee:
        assert callee.stats.wait_for(lambda s: s.calls == 4, T(10))
    got = [broker.pop_result(conn, 0.01) for _ in range(3)]
    # results are pushed in call order; the list holds at most 2: the first two made it
    assert [g.payload.args for g in got[:2]] == [0, {"error": {"message": "one is bad", "type": "ValueError"}}]
    assert got[2] is None
    assert callee.stats.snapshot()["errors"] == 1


def test_batched_pops_with_several_uris_and_a_stray_payload(broker, redis_client):
    callee = Callee(broker, workers=1, block=0.05, batch=8)
    callee.register("a", lambda x: f"a:{x}")
    callee.register("b", lambda x: f"b:{x}")
    stray = CallPayload(new_uuid(), new_uuid(), "elsewhere", 1)
    redis_client.lpush(calls_key("a"), stray.to_json())
    redis_client.lpush(calls_key("a"), b"not json")
    ps = [send_call(broker, "a" if i % 2 else "b", i) for i in range(10)]
    with callee:
        for p in ps:
            assert take_result(broker, p).payload.args == f"{p.uri}:{p.args}"
    assert not redis_client.exists(results_key(stray.conn_uuid))
    assert not redis_client.exists(calls_key("a")) and not redis_client.exists(calls_key("b"))


def test_batch_must_be_positive(broker):
    with pytest.raises(ValueError):
        Callee(broker, batch=0)


def test_results_lost_to_an_outage_are_not_a_second_error_line(caplog):
    """The outage has its one ERROR line (the callee's RedisHealth); results that could not be
    stored because redis could not be reached are an INFO line, those redis refused an ERROR."""
    import logging

    import fakeredis

    from juggler import BrokerError, CapacityExceeded

    callee = Callee(RedisBroker(fakeredis.FakeRedis()), workers=1)
    result = (ResultPayload("c", "m", "test.echo", 1), 1.0, "{}")
    with caplog.at_level(logging.INFO, logger="juggler.callee"):
        callee._stored([result], [BrokerError("redis unavailable: Connection refused")])
        callee._stored([result], [CapacityExceeded("list capacity exceeded")])
    levels = [(r.levelno, "could not store 1 result(s)" in r.getMessage()) for r in caplog.records]
    assert levels == [(logging.INFO, True), (logging.ERROR, True)]


def _settled(callee, waiting, parked):
    """Whether the workers of ``callee`` (one slot group) come to ``waiting`` in a BRPOP and
    ``parked``, within a few seconds."""
    import time

    slots = callee._slots[0]
    deadline = time.monotonic() + T(5)
    while (slots.waiting, slots.parked) != (waiting, parked) and time.monotonic() < deadline:
        time.sleep(0.005)  # (the state of threads that only block: nothing to wait on)
    assert (slots.waiting, slots.parked) == (waiting, parked), f"slow {slots.slow}, quick runs {slots.quick_runs}"
    return True


@pytest.mark.realredis
def test_a_burst_of_slow_calls_on_a_new_pool_gets_every_worker(real):
    """A pool starts with every worker waiting on redis: six calls stored at once, which
    wait for each other, run on six workers at once (none is taken into another's batch:
    redis hands each call to a blocked worker as it is stored; fakeredis wakes them all,
    and the first may take several, as the test above avoids with ``batch=1``)."""
    broker = RedisBroker(real)
    barrier = threading.Barrier(6)
    callee = Callee(broker, workers=6, block=30.0)
    callee.register("meet", lambda a: barrier.wait(T(10)) >= 0)
    with callee:
        assert _settled(callee, 6, 0)
        pending = [send_call(broker, "meet", i) for i in range(6)]
        assert all(take_result(broker, p, T(15)).payload.args is True for p in pending)


def test_quick_calls_park_all_but_two_workers_and_slow_ones_wake_them(broker):
    """Once calls prove quick, two workers wait on redis and the others are parked (calls
    that come together are taken together). A call that takes a worker and leaves none
    waiting wakes a parked one, so six calls that come one after the other and wait for each
    other still run on six workers at once; and once a call was slow, every worker waits."""
    import time

    barrier = threading.Barrier(6)
    callee = Callee(broker, workers=6, block=30.0)
    callee.register("quick", lambda a: a)
    # (slow whichever comes last: the sleep is the work of a slow function, not a wait)
    callee.register("meet", lambda a: barrier.wait(T(10)) >= 0 and (time.sleep(0.02) or True))
    with callee:
        slots = callee._slots[0]
        # Quick calls until the workers settled: ten, or more on a machine so busy that a call
        # took over the 1 ms that counts as slow (which starts the proof again), or that a
        # worker still in its BRPOP when the calls proved quick took none of the ten (it
        # parks when it takes one).
        for i in range(200):
            assert take_result(broker, send_call(broker, "quick", i)).payload.args == i
            if i >= 9 and (slots.waiting, slots.parked) == (2, 4):
                break
        assert _settled(callee, 2, 4)
        pending = []
        for i in range(5):
            pending.append(send_call(broker, "meet", i))
            assert callee.stats.wait_for(lambda s: s.busy == i + 1, T(5)), f"call {i} is not running"
        pending.append(send_call(broker, "meet", 5))  # the sixth lets them all go
        assert all(take_result(broker, p).payload.args is True for p in pending)
        assert _settled(callee, 6, 0)


def test_waiting_none_keeps_every_worker_waiting(broker):
    callee = Callee(broker, workers=4, block=30.0, waiting=None)
    callee.register("quick", lambda a: a)
    with callee:
        for i in range(10):
            assert take_result(broker, send_call(broker, "quick", i)).payload.args == i
        assert _settled(callee, 4, 0)
    with pytest.raises(ValueError, match="waiting"):
        Callee(broker, waiting=0)


@pytest.mark.parametrize("use_real", [False, True], ids=["fake", "real"])
def test_a_call_nested_deeper_than_the_worker_decodes_is_dropped_not_fatal(use_real, broker, request):
    # A payload that a server with more stack to spare stored: the worker's decode runs out of
    # recursion; it is logged and dropped as undecodable (its call expires), and the worker
    # goes on (on a real redis, through the batched popper; on fakeredis, through pop_call).
    if use_real:
        broker = RedisBroker(request.getfixturevalue("real"))
    callee = Callee(broker, workers=1, block=0.05)
    callee.register("ok", lambda a: a)
    with callee:
        deep = '{"conn_uuid":"c","msg_uuid":"m","uri":"ok","args":' + "[" * 100_000 + "]" * 100_000 + "}"
        broker.client.lpush(calls_key("ok"), deep)
        p = send_call(broker, "ok", "alive")
        assert take_result(broker, p).payload.args == "alive"
