"""Redis faults: redis stops and comes back in the middle of traffic.

Every call must end with exactly one outcome at the client (result, NACK, expired, closed),
connections whose redis listeners die are closed with 1011 and a readable reason, and callees
and servers serve again once redis is back. Each test starts its own redis (or cluster), since
it stops it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any, Optional

import pytest

from juggler import (
    BrokerError,
    Callee,
    CallExpired,
    Client,
    ConnectionClosed,
    HandshakeError,
    NackError,
    RedisBroker,
    Server,
)
from juggler.broker import call_slot
from juggler.message import EventPayload

from .conftest import T, delay, echo, start_redis_cluster, start_redis_server, stop_redis_server

LISTENER_FAILED = ("results listener failed: redis unavailable", "pub-sub listener failed: redis unavailable")


def slow_echo(args: Any) -> Any:
    """Keeps calls in flight for a while, so some are pending when redis stops."""
    delay(20)
    return args


class Traffic:
    """Client threads that call through ``url`` in a loop, a few calls in flight each, and
    record every call's outcome. A client that gets closed connects again (paced, since
    during an outage the server closes new connections at once)."""

    def __init__(self, url: str, clients: int, uris: list[str], subscribe: bool = True) -> None:
        self.url = url
        self.uris = uris
        self.subscribe = subscribe
        self.phase = "before"  # the test's phase; an outcome is counted in the phase it came in
        self.outcomes: list[tuple[str, str, Any]] = []  # (phase, kind, detail; for a result: its uri)
        self.calls: list[tuple[Future, Any]] = []
        self.ended: Counter[int] = Counter()  # id(future) -> times it completed
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"traffic-{i}") for i in range(clients)]

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(T(60))
        assert not any(t.is_alive() for t in self._threads), "a traffic thread hangs"

    def count(self, kind: str, phase: Optional[str] = None) -> int:
        with self._cond:
            return sum(1 for p, k, _ in self.outcomes if k == kind and (phase is None or p == phase))

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def _connect(self) -> Optional[Client]:
        try:
            c = Client.connect(self.url, connect_timeout=T(5))
        except (HandshakeError, OSError):
            return None
        if self.subscribe:
            try:
                c.sub("fault.news")
            except NackError:
                pass  # redis is down: calls on this connection will say so too
            except (ConnectionClosed, TimeoutError):
                c.close()
                return None
        return c

    def _run(self, idx: int) -> None:
        client: Optional[Client] = None
        n = 0
        try:
            while not self._stop.is_set():
                if client is None or client.closed:
                    if client is not None:
                        client.close()
                    client = self._connect()
                    if client is None:
                        self._stop.wait(0.05)  # pacing the reconnects, not waiting for an event
                        continue
                batch = []
                for _ in range(3):
                    n += 1
                    uri = self.uris[n % len(self.uris)]
                    args = f"{idx}-{n}"
                    fut = client.call_async(uri, args, timeout=T(2))
                    fut.add_done_callback(self._ended)
                    batch.append((fut, uri, args))
                for fut, uri, args in batch:
                    self._record(fut, uri, args)
        finally:
            if client is not None:
                client.close()

    def _ended(self, fut: Future) -> None:
        with self._cond:
            self.ended[id(fut)] += 1

    def _record(self, fut: Future, uri: str, args: Any) -> None:
        try:
            result = fut.result(T(30))  # bounded: a hang fails the test, not the run
            kind, detail = ("result", uri) if result == args else ("wrong-result", (args, result))
        except NackError as exc:
            kind, detail = "nack", (exc.code, exc.message)
        except CallExpired:
            kind, detail = "expired", None
        except ConnectionClosed as exc:
            kind, detail = "closed", (exc.code, exc.reason)
        except Exception as exc:  # anything else is a failure of the test
            kind, detail = "other", repr(exc)
        with self._cond:
            self.calls.append((fut, args))
            self.outcomes.append((self.phase, kind, detail))
            self._cond.notify_all()

    def check(self) -> Counter:
        """Every call ended exactly once, with one of the four outcomes."""
        kinds = Counter(k for _, k, _ in self.outcomes)
        assert set(kinds) <= {"result", "nack", "expired", "closed"}, [o for o in self.outcomes if o[1] not in ("result", "nack", "expired", "closed")]
        assert all(f.done() for f, _ in self.calls)
        assert all(self.ended[id(f)] == 1 for f, _ in self.calls)
        for _, kind, detail in self.outcomes:
            if kind == "nack":
                assert detail[0] == 500 and "redis" in detail[1], detail
            if kind == "closed":
                assert detail[0] == 1011 and detail[1] in LISTENER_FAILED, detail
        return kinds


def test_redis_restart_in_the_middle_of_traffic():
    rp = start_redis_server()
    port = rp.port
    broker = RedisBroker.from_url(rp.url)  # as the CLI makes it: prompt failures, short retry
    callee = Callee(broker, workers=4, block=0.05, max_backoff=0.2)
    callee.register("test.echo", echo)
    callee.register("test.slow", slow_echo)
    server = Server(broker).start()
    try:
        with callee, Traffic(server.url, clients=6, uris=["test.echo", "test.slow"]) as traffic:
            assert traffic.wait_for(lambda: traffic.count("result") >= 60, T(20))
            stop_redis_server(rp)
            traffic.phase = "outage"
            # every connection notices: its calls are NACKed or it is closed with 1011
            assert traffic.wait_for(lambda: traffic.count("nack", "outage") + traffic.count("closed", "outage") >= 6, T(20))
            rp = start_redis_server(port)
            traffic.phase = "after"
            # service resumes: the callee reconnected (capped backoff), the server serves again
            assert traffic.wait_for(lambda: traffic.count("result", "after") >= 60, T(30))
        kinds = traffic.check()
        assert kinds["result"] >= 120 and kinds["nack"] + kinds["closed"] >= 6
        # pub-sub works again too, for a new connection
        with Client.connect(server.url, connect_timeout=T(5)) as a, Client.connect(server.url, connect_timeout=T(5)) as b:
            sub = a.sub("after.*", pattern=True)
            b.pub("after.restart", "back")
            assert sub.get(T(5)).args == "back"
    finally:
        server.shutdown()
        callee.stop()
        broker.close()
        stop_redis_server(rp)


def test_requests_while_redis_is_down_are_nacked_not_hung():
    """With the pub-sub redis down, PUB and SUB get NACK 500 at once, RPC on its own redis
    goes on, and the same connection's SUB succeeds once the pub-sub redis is back."""
    rpc_redis, ps_redis = start_redis_server(), start_redis_server()
    ps_port = ps_redis.port
    rpc, ps = RedisBroker.from_url(rpc_redis.url), RedisBroker.from_url(ps_redis.url)
    callee = Callee(rpc, workers=1, block=0.05)
    callee.register("test.echo", echo)
    server = Server(rpc, pubsub_broker=ps).start()
    try:
        with callee, Client.connect(server.url, connect_timeout=T(5)) as c:
            stop_redis_server(ps_redis)
            with pytest.raises(NackError) as info:
                c.pub("news", 1)
            assert info.value.code == 500 and info.value.message.startswith("redis unavailable")
            with pytest.raises(NackError) as info:
                c.sub("news")
            assert info.value.code == 500
            assert c.call("test.echo", "rpc still works", timeout=T(5)) == "rpc still works"
            ps_redis = start_redis_server(ps_port)
            sub = c.sub("news")  # the SUB that failed does not stand in the way
            c.pub("news", 2)
            assert sub.get(T(5)).args == 2
    finally:
        server.shutdown()
        callee.stop()
        rpc.close()
        ps.close()
        stop_redis_server(rpc_redis)
        stop_redis_server(ps_redis)


def test_a_listener_on_a_dead_redis_closes_its_connection_with_1011():
    rp = start_redis_server()
    broker = RedisBroker.from_url(rp.url)
    server = Server(broker).start()
    try:
        with Client.connect(server.url, connect_timeout=T(5)) as c:
            # the first CALL starts the connection's results listener (nobody serves the URI)
            c.call_async("nobody.serves", None, timeout=T(60))
            deadline = time.monotonic() + T(5)
            # a bounded wait for the server to register the connection and start its listener
            while not server.connections or server.connections[0]._results_thread is None:
                assert time.monotonic() < deadline, "no results listener"
                time.sleep(0.005)
            stop_redis_server(rp)
            assert c.wait_closed(T(10))
            assert (c.close_code, c.close_reason) == (1011, "results listener failed: redis unavailable")
    finally:
        server.shutdown()
        broker.close()
        stop_redis_server(rp)


def test_cluster_node_restart_in_the_middle_of_traffic(tmp_path):
    """One of three masters stops and comes back: calls and connections on its slots fail
    (NACK, 1011), the others go on, and everything serves again once it is back."""
    cluster = start_redis_cluster(str(tmp_path))
    broker = None
    try:
        broker = RedisBroker.from_url(cluster.url, cluster=True)
        client = broker.client
        # a URI on each master; the one on the node we stop, and one on another node
        by_port: dict[int, str] = {}
        n = 0
        while len(by_port) < 3:
            uri = f"svc.{n}"
            by_port.setdefault(client.nodes_manager.get_node_from_slot(call_slot(uri)).port, uri)
            n += 1
        victim = cluster.ports[1]
        callee = Callee(broker, workers=6, block=0.05, max_backoff=0.2)
        for uri in by_port.values():
            callee.register(uri, echo)
        with Server(broker) as server, callee:
            with Traffic(server.url, clients=6, uris=list(by_port.values())) as traffic:
                assert traffic.wait_for(lambda: traffic.count("result") >= 60, T(20))
                cluster.stop_node(victim)
                traffic.phase = "outage"
                # connections whose listeners are on the stopped master are closed; the others
                # get NACK 500 for calls to its URI (one call of every batch of three) and
                # results from the other masters
                assert traffic.wait_for(lambda: traffic.count("nack", "outage") >= 3, T(30))
                assert traffic.wait_for(lambda: traffic.count("result", "outage") >= 10, T(30))
                cluster.start_node(victim)
                traffic.phase = "after"
                assert traffic.wait_for(lambda: traffic.count("result", "after") >= 90, T(60))
                # every URI served again, the restarted master's too
                assert traffic.wait_for(lambda: len({d for p, k, d in traffic.outcomes if p == "after" and k == "result"}) == 3, T(30))
            traffic.check()
            # after the node is back, all three URIs serve again from one new connection
            with Client.connect(server.url, connect_timeout=T(5)) as c:
                for uri in by_port.values():
                    assert c.call(uri, uri, timeout=T(10)) == uri
    finally:
        if broker is not None:
            broker.close()
        cluster.stop()


def test_pubsub_confirmations_survive_a_failed_subscribe():
    """A SUBSCRIBE that could not be sent is undone: the same pub-sub connection subscribes
    at once when redis is back, instead of waiting for a confirmation that never comes."""
    from .test_broker import Listener

    rp = start_redis_server()
    port = rp.port
    broker = RedisBroker.from_url(rp.url)
    listener = Listener(broker.pubsub(confirm_timeout=T(5)))
    try:
        stop_redis_server(rp)
        with pytest.raises(BrokerError):
            listener.ps.subscribe("again", False)
        rp = start_redis_server(port)
        listener.ps.subscribe("again", False)  # would time out if the failed one still counted
        broker.publish("again", EventPayload("u", 1))
        assert listener.events.get(timeout=T(5)).payload.args == 1
    finally:
        listener.close()
        broker.close()
        stop_redis_server(rp)


def test_a_redis_client_that_breaks_unexpectedly_is_a_broker_error(caplog):
    """redis-py's races surface as AttributeError/ValueError/OSError from a read: the broker
    turns them into BrokerError (so a listener closes its connection with 1011 and a callee
    worker backs off) and logs the traceback once."""
    import fakeredis

    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    broker = RedisBroker(client)

    def broken(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'readline'")

    client.brpop = broken
    client.connection_pool.get_connection = broken  # PUBLISH is sent once, on a pool connection
    with pytest.raises(BrokerError, match="redis unavailable: connection broken"):
        broker.pop_result("conn", 0.01)
    with pytest.raises(BrokerError, match="redis unavailable"):
        broker.publish("x", EventPayload("u", 1))
    assert "failed unexpectedly" in caplog.text
    client.close()


def test_call_whose_store_fails_is_nacked_and_the_connection_goes_on(redis_client):
    """The CALL path on its own: when storing the call in redis fails (here only that command,
    so the connection's listeners stay up), the client gets NACK 500 at once, and later calls
    are served."""
    from juggler import Callee, Client, NackError, RedisBroker, Server
    from juggler.exceptions import BrokerError

    class FlakyBroker(RedisBroker):
        fail_next = 0

        def store_call(self, payload, timeout):
            if self.fail_next:
                self.fail_next -= 1
                raise BrokerError("redis unavailable: Connection refused")
            super().store_call(payload, timeout)

        def dedicated(self, key=None):
            return RedisBroker(self.client).dedicated(key)

    broker = FlakyBroker(redis_client)
    callee = Callee(broker, workers=1, block=0.05)
    callee.register("test.echo", lambda a: a)
    with Server(broker) as server, callee, Client.connect(server.url, connect_timeout=T(5)) as c:
        broker.fail_next = 1
        with pytest.raises(NackError) as info:
            c.call("test.echo", 1, timeout=T(5))
        assert (info.value.code, info.value.message) == (500, "redis unavailable: Connection refused")
        assert c.call("test.echo", 2, timeout=T(5)) == 2


def test_a_call_stored_through_the_listener_that_redis_does_not_answer_is_nacked():
    """A CALL stored through the connection's idle results listener (the reader does not wait
    for redis) gets its NACK 500 all the same when redis stops answering: after the client's
    socket timeout the connection counts its redis as failed and closes with 1011."""
    import redis as redis_py

    rp = start_redis_server()
    broker = RedisBroker.from_url(rp.url, socket_timeout=0.5)
    callee = Callee(broker, workers=1, block=0.05)
    callee.register("test.echo", echo)
    server = Server(broker).start()
    pauser = redis_py.Redis.from_url(rp.url)
    try:
        with callee, Client.connect(server.url, connect_timeout=T(5)) as c:
            assert c.call("test.echo", 1, timeout=T(5)) == 1  # its listener runs, and waits
            (conn,) = server.connections
            deadline = time.monotonic() + T(5)
            while conn._results._expect:  # (a bounded wait for the listener to have read everything)
                assert time.monotonic() < deadline, "the listener is still busy"
                time.sleep(0.005)
            pauser.execute_command("CLIENT", "PAUSE", int(T(5) * 1000), "ALL")  # redis answers nobody
            started = time.monotonic()
            future = c.call_async("test.echo", 2, timeout=T(30))
            with pytest.raises(NackError) as info:
                future.result(T(10))
            assert (info.value.code, info.value.message) == (500, "redis unavailable: no answer in 0.5 s")
            assert c.wait_closed(T(10))
            assert (c.close_code, c.close_reason) == (1011, "results listener failed: redis unavailable")
            assert 0.5 <= time.monotonic() - started < T(5)  # at the socket timeout, not at the pause's end
    finally:
        pauser.execute_command("CLIENT", "UNPAUSE")
        pauser.close()
        server.shutdown()
        broker.close()
        stop_redis_server(rp)
