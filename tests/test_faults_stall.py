"""A redis that stalls (SIGSTOP) runs, when it resumes, the stores sent to it meanwhile, and
counts their timeout keys' TTLs from then: a call stored late looks alive to redis for its whole
timeout again, a result stored late for what the callee had left. The server must not let that
turn into a second outcome: no RES after the call's deadline by its connection's own count
(the client's timer has run out), none for a call it NACKed (issue 20: "every request still ends
exactly once").

Each test stops its own redis while a call is in the state that shows one cause, and checks
that the result redis brings afterwards is dropped (counted as ``expired_results``), not sent.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, Callable, Iterator

import pytest

from juggler import Callee, CallExpired, Client, NackError, RedisBroker, Server
from juggler.message import EventPayload

from .conftest import T, echo, stalled_redis, start_redis_server, stop_redis_server

pytestmark = [pytest.mark.realredis, pytest.mark.timeout(60)]


def wait_until(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    """A bounded wait for state that no event announces (a server counter, the listener's
    replies awaited)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.005)


def stats(server: Server) -> dict[str, int]:
    return server.stats.snapshot()


class Gate:
    """A callee function that waits for :meth:`open` (``entered`` is set once it runs)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self._open = threading.Event()

    def __call__(self, args: Any) -> Any:
        self.entered.set()
        assert self._open.wait(T(30)), "the gate was never opened"
        return args

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def stall_stack(request) -> Iterator[Any]:
    """A real redis (stopped by the test), a server and a callee on brokers of their own, and a
    client; the callee serves ``test.echo`` and ``test.gated`` (a :class:`Gate`)."""
    rp = start_redis_server()
    broker = RedisBroker.from_url(rp.url, **getattr(request, "param", {}))
    callee_broker = RedisBroker.from_url(rp.url)
    gate = Gate()
    callee = Callee(callee_broker, workers=2, block=0.05)
    callee.register("test.echo", echo)
    callee.register("test.gated", gate)
    server = Server(broker).start()
    client = None
    try:
        with callee:
            client = Client.connect(server.url, connect_timeout=T(5))
            assert client.call("test.echo", 0, timeout=T(5)) == 0  # its results listener runs
            (conn,) = server.connections
            yield rp, server, conn, client, callee, gate
    finally:
        gate.open()
        if client is not None:
            client.close()
        server.shutdown()
        broker.close()
        callee_broker.close()
        stop_redis_server(rp)


def listener_idle(conn: Any) -> Callable[[], bool]:
    """Whether the connection's results listener waits for nothing (no BRPOP sent): the next
    CALL is then stored through it, with its BRPOP in the same write."""
    results = conn._results
    return lambda: not results._expect and not results._brpop_sent


def msg_uuid_of(client: Client, fut: Future) -> str:
    return next(uuid for uuid, f in client._calls.items() if f is fut)


def past_the_servers_deadline(conn: Any, msg_uuid: str) -> None:
    """Wait until the call's deadline by its connection's own count has passed (a time, not
    an event: nothing announces it)."""
    wait_until("the server read the CALL", lambda: msg_uuid in conn._calls, T(5))
    time.sleep(max(0.0, conn._calls[msg_uuid] - time.monotonic()) + 0.05)


def dropped_not_sent(server: Server, res_before: int, after: str) -> None:
    """Wait for the results listener to take the late result off redis (no event announces
    it), and check that it was dropped, not sent ``after`` the call ended."""
    def taken() -> bool:
        now = stats(server)
        return now.get("expired_results", 0) + now.get("write_RES", 0) > res_before

    wait_until("the listener took the result", taken, T(10))
    assert stats(server).get("write_RES", 0) == res_before, f"a RES went after the call's {after}"
    assert stats(server).get("expired_results") == 1


def test_a_call_that_redis_stores_only_after_a_stall_gets_no_res_past_its_deadline(stall_stack):
    """The CALL is stored through the idle results listener (no wait on the reader) while redis
    is stopped; the stall outlasts the call's timeout. When redis resumes it stores the call
    with a full TTL, the callee runs it and stores its result, and redis' TTL says the result
    is alive: by the connection's count the call has expired (its client's timer ran out), so
    no RES goes."""
    rp, server, conn, c, callee, _ = stall_stack
    wait_until("the listener idles", listener_idle(conn), T(5))
    res_before = stats(server).get("write_RES", 0)
    with stalled_redis(rp):
        fut = c.call_async("test.echo", "late", timeout=0.5)
        msg_uuid = msg_uuid_of(c, fut)
        with pytest.raises(CallExpired):
            fut.result(T(5))  # the client's timer
        past_the_servers_deadline(conn, msg_uuid)
        assert conn._results._expect, "the call was not stored through the listener"
    # redis resumes: the call is stored now, run, and its result brought to the listener
    assert callee.stats.wait_for(lambda s: s.calls >= 2, T(10)), "the callee did not run the late call"
    assert callee.stats.expired == 0  # (redis' count: alive; the case this test is about)
    dropped_not_sent(server, res_before, "deadline")
    assert c.call("test.echo", "after", timeout=T(5)) == "after"
    assert c.received["RES"] == 2 and not c.closed


def test_a_result_that_redis_stores_only_after_a_stall_gets_no_res_past_its_deadline(stall_stack):
    """The call is stored and running when redis stops; the callee finishes within the call's
    timeout and stores its result with the time left, which a stopped redis runs only when it
    resumes, past the call's deadline: its TTL counts from then. No RES goes."""
    rp, server, conn, c, callee, gate = stall_stack
    res_before = stats(server).get("write_RES", 0)
    fut = c.call_async("test.gated", "late", timeout=T(1))
    msg_uuid = msg_uuid_of(c, fut)
    assert gate.entered.wait(T(5))
    with stalled_redis(rp):
        gate.open()  # its result goes to redis, which runs it once it resumes
        assert callee.stats.wait_for(lambda s: s.busy == 0, T(5))
        with pytest.raises(CallExpired):
            fut.result(T(5))
        past_the_servers_deadline(conn, msg_uuid)
    assert callee.stats.wait_for(lambda s: s.calls >= 2, T(10))
    assert callee.stats.expired == 0  # (the callee stored the result: the case this test is about)
    dropped_not_sent(server, res_before, "deadline")
    assert c.call("test.echo", "after", timeout=T(5)) == "after"
    assert c.received["RES"] == 2 and not c.closed


def test_a_call_nacked_because_redis_stalled_and_stored_after_it_gets_no_res(stall_stack):
    """A CALL stored through the shared pool (a BRPOP already waits on the listener's
    connection, for a call in flight) while redis is stopped gets NACK 500 after the store's
    wait (0.75 s); redis stores it when it resumes, the callee runs it and its result comes to
    the listener: the call was NACKed, so no RES goes. The call in flight still gets its own."""
    rp, server, conn, c, callee, gate = stall_stack
    res_before = stats(server).get("write_RES", 0)
    running = c.call_async("test.gated", "running", timeout=T(30))
    assert gate.entered.wait(T(5))
    wait_until("the listener waits in a BRPOP", lambda: conn._results._brpop_sent, T(5))
    with stalled_redis(rp):
        fut = c.call_async("test.echo", "nacked", timeout=T(10))
        with pytest.raises(NackError) as info:
            fut.result(T(5))
        assert info.value.code == 500 and info.value.message.startswith("redis unavailable")
    assert callee.stats.wait_for(lambda s: s.calls >= 2, T(10)), "redis did not store the NACKed call after all"
    dropped_not_sent(server, res_before, "NACK")
    gate.open()
    assert running.result(T(5)) == "running"
    assert c.received["RES"] == 2 and not c.closed


@pytest.mark.parametrize("stall_stack", [{"socket_timeout": 0.5}], indirect=True)
def test_a_call_stored_ahead_nacked_because_redis_stalled_and_stored_after_it_gets_no_res(stall_stack):
    """The same through the results listener: a CALL stored on its connection while redis is
    stopped gets NACK 500 when redis has not answered within the reply timeout (the listener
    gives its connection up); redis still runs the store it had received when it resumes, and
    the result waits in the list for the next call's BRPOP, which brings it first: no RES for
    it, then the next call's RES."""
    rp, server, conn, c, callee, _ = stall_stack
    wait_until("the listener idles", listener_idle(conn), T(5))
    res_before = stats(server).get("write_RES", 0)
    with stalled_redis(rp):
        fut = c.call_async("test.echo", "nacked", timeout=T(10))
        with pytest.raises(NackError) as info:
            fut.result(T(5))
        assert (info.value.code, info.value.message) == (500, "redis unavailable: no answer in 0.5 s")
    assert callee.stats.wait_for(lambda s: s.calls >= 2, T(10)), "redis did not store the NACKed call after all"
    # the listener connects again in its turn (the server saw redis down), then idles: the
    # next call is stored through it, with the BRPOP that brings the NACKed call's result
    wait_until("the listener is back", lambda: conn._listener_health.up and conn._results._own is not None, T(5))
    wait_until("the listener idles", listener_idle(conn), T(5))
    assert c.call("test.echo", "next", timeout=T(5)) == "next"
    assert stats(server).get("write_RES", 0) == res_before + 1, "a RES went after the call's NACK"
    assert stats(server).get("expired_results") == 1
    assert c.received["RES"] == 2 and not c.closed


# -- one log line when redis goes, one when it is back (issue 20) ---------------------------------


def test_a_listener_connect_that_raced_an_outage_does_not_say_redis_is_back(redis_server, monkeypatch):
    """A results listener connects while redis looks up; another listener finds redis gone
    before that connect returns. The connect proves nothing (the kernel of a stopped redis
    accepts it): it must not mark redis back ("redis is back (after 0.0 s)" 25 ms after
    "unavailable", as the soak saw). A connect made after the failure was recorded, whose
    EXISTS redis answers, does."""
    from juggler import resp
    from juggler.health import RedisHealth

    health = RedisHealth("server test")
    broker = RedisBroker.from_url(redis_server.url)
    listener = broker.dedicated("juggler:results:{test}")
    listener.health = health
    real_connect = resp.connect

    def connect_while_another_finds_redis_gone(*args: Any, **kwargs: Any) -> Any:
        made = real_connect(*args, **kwargs)
        health.failed(ConnectionError("another listener lost redis"))
        return made

    try:
        monkeypatch.setattr(resp, "connect", connect_while_another_finds_redis_gone)
        listener._own_connection()
        assert not health.up, "a connect begun before the failure said redis is back"
        monkeypatch.setattr(resp, "connect", real_connect)
        listener._own_connection(fresh=True)  # begun after it, with its EXISTS answered
        assert health.up and health.outages == 1
    finally:
        listener.close()
        broker.close()


def test_an_event_read_after_redis_was_marked_down_does_not_say_it_is_back(redis_server):
    """The pub-sub hub's reader gets an event after redis was marked down: it may have waited
    in the socket's buffer while redis stalled, so it is no evidence; a request that begins
    after the failure and is answered (here a PUB, which takes a turn) is."""
    import redis as redis_py

    broker = RedisBroker.from_url(redis_server.url)
    publisher = redis_py.Redis.from_url(redis_server.url)
    try:
        with Server(broker) as server, Client.connect(server.url, connect_timeout=T(5)) as c:
            sub = c.sub("stall.news")
            server.redis_health.failed(ConnectionError("a listener lost redis"))
            publisher.publish("stall.news", EventPayload(str(uuid.uuid4()), 1).to_json())
            assert sub.get(T(5)).args == 1
            assert not server.redis_health.up, "an event said redis is back"
            deadline = time.monotonic() + T(5)
            while True:  # a PUB takes a turn of the backoff (at most 0.5 s), or is NACKed at once
                try:
                    c.pub("stall.news", 2)
                    break
                except NackError:
                    assert time.monotonic() < deadline, "no PUB got a turn"
            assert server.redis_health.up and server.redis_health.outages == 1
    finally:
        publisher.close()
        broker.close()
