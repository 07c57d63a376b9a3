"""juggler.resp: the per-call redis commands spoken directly (with hiredis), and where that
path applies."""

from __future__ import annotations

import select
import threading
import time

import fakeredis
import pytest
import redis
import redis.exceptions

from juggler import RedisBroker, resp
from juggler.broker import calls_key
from juggler.message import CallPayload, ResultPayload, new_uuid

from .conftest import T, free_port, start_redis_server, stop_redis_server

pytestmark = pytest.mark.realredis



@pytest.mark.parametrize("in_c", [True, False])
def test_pack_is_a_resp_array_of_bulk_strings(in_c, monkeypatch):
    if not in_c:
        monkeypatch.setattr(resp, "_pack_command", None)  # the Python loop
    assert resp.pack(("SET", "k", b"\x00v", 5, "é", 1.5, -3)) == (
        b"*7\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\x00v\r\n$1\r\n5\r\n$2\r\n\xc3\xa9\r\n$3\r\n1.5\r\n$2\r\n-3\r\n"
    )
    assert resp.pack(["GET", True]) == b"*2\r\n$3\r\nGET\r\n$4\r\nTrue\r\n"  # what hiredis refuses


def test_commands_and_replies(real):
    conn = resp.connect(real)
    assert conn is not None
    try:
        assert conn.command("PING") == b"PONG"
        assert conn.command("RPUSH", "l", "a", "b") == 2
        assert conn.command("LRANGE", "l", 0, -1) == [b"a", b"b"]
        assert conn.command("GET", "missing") is None
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            conn.command("GET", "l")
        assert conn.command("PING") == b"PONG"  # an error reply leaves the connection usable
        assert conn.pipeline([("INCR", "n"), ("GET", "l"), ("INCR", "n")])[0::2] == [1, 2]
    finally:
        conn.close()


def test_the_fast_path_speaks_resp2_whatever_redis_py_would_ask_for(real):
    """redis-py 8 asks for RESP3 when a client names no protocol; the fast path's replies are
    read as RESP2 (a map would be a dict in RESP3, a list here)."""
    assert "protocol" not in real.connection_pool.connection_kwargs  # (redis-py's default: 3)
    conn = resp.connect(real)
    assert conn is not None
    try:
        assert b" resp=2" in conn.command("CLIENT", "INFO")
        conn.command("HSET", "h", "f", "v")
        assert conn.command("HGETALL", "h") == [b"f", b"v"]
    finally:
        conn.close()


def test_read_reply_returns_the_next_reply_whether_it_is_there_or_still_coming(real):
    conn = resp.connect(real)
    assert conn is not None

    def arrived():  # the reply is in the socket, not read yet
        assert select.select([conn._sock], [], [], T(5))[0]

    try:
        conn.send([("SET", "k", "v")])
        arrived()
        assert conn.read_reply() == b"OK"  # read without waiting
        conn.send([("RPUSH", "l", "x"), ("GET", "l")])
        arrived()
        assert conn.read_reply() == 1
        assert isinstance(conn.read_reply(), redis.exceptions.ResponseError)  # returned, not raised
        conn.send([("BLPOP", "later", 5)])
        pusher = threading.Timer(0.05, lambda: real.rpush("later", "y"))
        pusher.start()
        assert conn.read_reply() == [b"later", b"y"]  # not there yet: waited for
        assert conn.command("PING") == b"PONG"  # and nothing is left over
        pusher.join(T(5))  # (its RPUSH has its reply before the test's client closes)
    finally:
        conn.close()


def test_read_reply_wait_waits_without_a_look_that_finds_nothing(real, monkeypatch):
    # (a BRPOP's reply waits for another process: a non-blocking read first would find nothing)
    conn = resp.connect(real)
    assert conn is not None

    def no_look(*args):
        raise AssertionError("a non-blocking read was tried")

    for name in ("recv_nowait", "recv_into_nowait"):
        if hasattr(resp.gilsend, name):
            monkeypatch.setattr(resp.gilsend, name, no_look)
    try:
        conn.send([("BLPOP", "later", 5)])
        pusher = threading.Timer(0.05, lambda: real.rpush("later", "y"))
        pusher.start()
        assert conn.read_reply(wait=True) == [b"later", b"y"]
        conn.send([("SET", "k", "v"), ("RPUSH", "k", "x")])
        assert conn.read_reply(True) == b"OK"  # (there, or not yet: either way it comes)
        assert isinstance(conn.read_reply(True), redis.exceptions.ResponseError)  # returned, not raised
        pusher.join(T(5))
    finally:
        conn.close()


def test_evalsha_falls_back_to_eval_once_redis_forgot_the_script(real):
    script = resp.Script("return ARGV[1] .. KEYS[1]")
    conn = resp.connect(real)
    try:
        real.script_flush()
        assert conn.evalsha(script, ["k"], ["v"]) == b"vk"  # NOSCRIPT, then EVAL loads it
        assert real.script_exists(script.sha) == [True]
        assert conn.evalsha(script, ["k"], ["w"]) == b"wk"
    finally:
        conn.close()


def test_interrupt_wakes_a_blocked_read(real):
    conn = resp.connect(real, socket_timeout=None)
    errors: list[BaseException] = []

    def block() -> None:
        try:
            conn.command("BRPOP", "never", 0)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=block, name="juggler-test-brpop")
    t.start()
    t.join(0.2)
    assert t.is_alive()
    conn.interrupt()
    t.join(T(5))
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], redis.exceptions.ConnectionError)
    conn.close()


def test_the_pool_drops_a_connection_redis_closed_while_it_was_idle(real):
    pool = resp.RespPool(real)
    conn = pool.get()
    conn_id = conn.command("CLIENT", "ID")
    pool.put(conn)
    real.client_kill_filter(_id=conn_id)
    deadline = time.monotonic() + T(5)
    while conn.alive() and time.monotonic() < deadline:  # redis closes it on its next turn
        time.sleep(0.005)
    again = pool.get()  # not the dead one: a new connection
    try:
        assert again is not conn and again.command("PING") == b"PONG"
    finally:
        pool.put(again)
        pool.close()


def test_the_fast_path_applies_to_a_real_redis_only(real):
    assert resp.RespPool.applies(real)
    assert not resp.RespPool.applies(fakeredis.FakeRedis())
    assert not resp.RespPool.applies(redis.Redis(protocol=3))
    assert RedisBroker(real)._fast is not None
    assert RedisBroker(fakeredis.FakeRedis())._fast is None


def test_a_broker_recovers_from_a_redis_restart_without_failing_a_request():
    rp = start_redis_server()
    port = rp.port
    broker = RedisBroker(redis.Redis.from_url(rp.url))
    try:
        broker.store_call(CallPayload("c", "m1", "u", 1), 5)
        stop_redis_server(rp)
        rp = start_redis_server(port)
        # the pooled connection died with the old redis: it is noticed, not used
        broker.store_call(CallPayload("c", "m2", "u", 2), 5)
        assert broker.client.llen(calls_key("u")) == 1
    finally:
        broker.close()
        broker.client.close()
        stop_redis_server(rp)


def test_results_through_a_dedicated_listener(real):
    broker = RedisBroker(real)
    listener = broker.dedicated("juggler:results:{c}")
    try:
        broker.store_result(ResultPayload("c", "m", "u", {"x": 1}), 5)
        popped = listener.pop_result("c", None)
        assert popped.payload.args == {"x": 1} and 0 < popped.remaining <= 5
        broker.wake_results("c")
        assert listener.pop_result("c", None) is None  # the wake-up marker
        assert listener._own is not None  # it blocked on a connection of its own
    finally:
        listener.close()
        broker.close()


@pytest.mark.realredis
def test_the_fast_path_speaks_tls_to_a_tls_redis():
    """rediss:// takes the fast path too (redis-py's SSLConnection is a Connection): its
    commands must go through OpenSSL, not to the socket's descriptor as they are."""
    from pathlib import Path

    data = Path(__file__).parent / "data"
    tls_port = free_port()
    cert, key = str(data / "localhost.crt"), str(data / "localhost.key")
    rp = start_redis_server(extra=("--tls-port", str(tls_port), "--tls-cert-file", cert, "--tls-key-file", key,
                                   "--tls-ca-cert-file", cert, "--tls-auth-clients", "no"))  # fmt: skip
    broker = RedisBroker.from_url(f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=none")
    try:
        conn = resp.connect(broker.client)
        assert conn is not None  # the fast path applies
        try:
            assert conn.command("PING") == b"PONG"
            assert conn.pipeline([("SET", "tls-k", "v"), ("GET", "tls-k")]) == [b"OK", b"v"]
        finally:
            conn.close()
        payload = CallPayload(new_uuid(), new_uuid(), "tls.echo", {"x": 1})
        broker.store_call(payload, T(10))
        assert broker.pop_call(["tls.echo"], T(5)).payload == payload
        popper = broker.call_popper(["tls.echo"])  # a callee worker's connection: the fast path too
        try:
            assert popper._fast is not None
            broker.store_call(payload, T(10))
            assert [p.payload for p in popper.exchange([], 4)] == [payload]
        finally:
            popper.close()
    finally:
        broker.close()
        stop_redis_server(rp)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"?what\r\n", id="malformed"),  # hiredis.ProtocolError
        pytest.param(b"$-1\r\n", id="nil-for-an-integer"),
        pytest.param(b"*1\r\n:1\r\n", id="array-for-an-integer"),
    ],
)
def test_a_bad_reply_breaks_its_connection_and_is_a_broker_error(bad):
    """A reply that cannot be parsed, or one of the wrong type, is the redis connection error
    callers handle (BrokerError ``redis unavailable``), and its connection never goes back to
    the pool: the next command gets a new one, and works."""
    from juggler import BrokerError

    from .scripted_redis import ScriptedRedis

    replies = [bad, b":5000\r\n"]  # the CONSUME script: first a bad reply, then a TTL

    def answer(command):
        if command[0].upper() in (b"EVALSHA", b"EVAL"):
            return replies.pop(0)
        return b"-ERR unexpected\r\n"

    with ScriptedRedis(answer) as fake:
        client = redis.Redis.from_url(fake.url)
        broker = RedisBroker(client)
        try:
            with pytest.raises(BrokerError, match="redis unavailable: Protocol error from redis"):
                broker._take("juggler:results:timeout:{c}:m")  # (what pop_result does for a result)
            assert broker._take("juggler:results:timeout:{c}:m") == 5.0
            assert fake.accepted == 2  # the broken connection was closed, not pooled
        finally:
            broker.close()
            client.close()


def test_a_bad_brpop_reply_is_a_broker_error_on_the_listener_too():
    from juggler import BrokerError

    from .scripted_redis import ScriptedRedis

    with ScriptedRedis(lambda command: b":7\r\n") as fake:  # an integer where a pair is due
        client = redis.Redis.from_url(fake.url)
        broker = RedisBroker(client)
        listener = broker.dedicated("juggler:results:{c}")
        try:
            with pytest.raises(BrokerError, match="redis unavailable: Protocol error from redis"):
                listener.pop_result("c", 0.1)  # a timed BRPOP
            with pytest.raises(BrokerError, match="redis unavailable: Protocol error from redis"):
                listener.pop_result("c", None)  # the listener's own connection
            assert listener._own is None  # dropped, not used again
        finally:
            listener.close()
            broker.close()
            client.close()
