"""Redis faults: redis stops, stalls and comes back in the middle of traffic.

Every call must end with exactly one outcome at the client (result, NACK, expired), no
websocket is closed because redis went away (its results listener reconnects, in turn with the
server's other listeners), and callees and servers serve again once redis is back. Each test
starts its own redis (or cluster), since it stops it.
"""

from __future__ import annotations

import functools
import logging
import socket
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
from juggler.message import EventPayload, ResultPayload

from .conftest import (
    T,
    delay,
    echo,
    kill_redis_server,
    stalled_redis,
    start_redis_cluster,
    start_redis_server,
    stop_redis_server,
)

# the close reasons a redis outage may give: none (neither a results listener nor the pub-sub
# hub closes a connection when redis goes away)
LISTENER_FAILED: tuple[str, ...] = ()


def slow_echo(args: Any) -> Any:
    """Keeps calls in flight for a while, so some are pending when redis stops."""
    delay(20)
    return args


class Traffic:
    """Client threads that call through ``url`` in a loop, a few calls in flight each, and
    record every call's outcome (and, for a NACK, how long it took). A client that gets closed
    connects again (paced); :attr:`connects` counts the connections made."""

    def __init__(self, url: str, clients: int, uris: list[str], subscribe: bool = True) -> None:
        self.url = url
        self.uris = uris
        self.subscribe = subscribe
        self.phase = "before"  # the test's phase; an outcome is counted in the phase it came in
        self.outcomes: list[tuple[str, str, Any]] = []  # (phase, kind, detail; for a result: its uri)
        self.calls: list[tuple[Future, Any]] = []
        self.ended: Counter[int] = Counter()  # id(future) -> times it completed
        self.connects = 0
        self.closes: list[tuple[Any, str]] = []  # (code, reason) of each client closed
        self.nack_took: list[float] = []  # seconds from each NACKed call to its NACK
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
        with self._cond:
            self.connects += 1
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
                        with self._cond:
                            self.closes.append((client.close_code, client.close_reason))
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
                    sent = time.monotonic()
                    fut = client.call_async(uri, args, timeout=T(2))
                    fut.add_done_callback(functools.partial(self._ended, sent))
                    batch.append((fut, uri, args))
                for fut, uri, args in batch:
                    self._record(fut, uri, args)
        finally:
            if client is not None:
                client.close()

    def _ended(self, sent: float, fut: Future) -> None:
        took = time.monotonic() - sent
        with self._cond:
            self.ended[id(fut)] += 1
            if isinstance(fut.exception(), NackError):
                self.nack_took.append(took)

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

    def check(self, closes: bool = False, nack_within: float = 1.0) -> Counter:
        """Every call ended exactly once, with one of the four outcomes (of three, and every
        client on its first connection, unless ``closes``); each NACK within ``nack_within``
        seconds of its CALL."""
        kinds = Counter(k for _, k, _ in self.outcomes)
        if not closes:
            assert kinds["closed"] == 0 and self.connects == len(self._threads), (kinds, self.connects, self.closes)
        assert max(self.nack_took, default=0) < T(nack_within), sorted(self.nack_took)[-5:]
        assert set(kinds) <= {"result", "nack", "expired", "closed"}, [o for o in self.outcomes if o[1] not in ("result", "nack", "expired", "closed")]
        assert all(f.done() for f, _ in self.calls)
        assert all(self.ended[id(f)] == 1 for f, _ in self.calls)
        for _, kind, detail in self.outcomes:
            if kind == "nack":
                assert detail[0] == 500 and "redis" in detail[1], detail
            if kind == "closed":
                assert detail[0] == 1011 and detail[1] in LISTENER_FAILED, detail
        return kinds


def call_until_it_succeeds(client: Client, within: float) -> float:
    """Call test.echo until a call succeeds (each may be NACKed at once, or expire); the
    seconds it took. Fails past ``within``."""
    started = time.monotonic()
    while True:
        try:
            assert client.call("test.echo", "again", timeout=0.5) == "again"
            return time.monotonic() - started
        except (NackError, CallExpired) as exc:
            assert time.monotonic() - started < within, f"no call succeeded in {within} s: {exc}"


def test_redis_killed_and_restarted_under_traffic_closes_no_websocket():
    """SIGKILL, then a restart on the same port: no websocket is closed, a CALL while redis is
    down gets NACK 500 within a second, and calls succeed within a second of redis' return."""
    rp = start_redis_server()
    port = rp.port
    broker = RedisBroker.from_url(rp.url)  # as the CLI makes it: prompt failures, short retry
    callee = Callee(broker, workers=4, block=0.05, max_backoff=0.2)
    callee.register("test.echo", echo)
    callee.register("test.slow", slow_echo)
    server = Server(broker).start()
    try:
        # (no SUB: what pub-sub does through an outage is tested on its own)
        with callee, Client.connect(server.url, connect_timeout=T(5)) as probe, \
                Traffic(server.url, clients=6, uris=["test.echo", "test.slow"]) as traffic:  # fmt: skip
            assert probe.call("test.echo", 0, timeout=T(5)) == 0  # (its results listener runs)
            assert traffic.wait_for(lambda: traffic.count("result") >= 60, T(20))
            kill_redis_server(rp)
            traffic.phase = "outage"
            started = time.monotonic()
            with pytest.raises(NackError) as info:
                probe.call("test.echo", 1, timeout=T(10))
            assert info.value.code == 500 and info.value.message.startswith("redis unavailable")
            assert time.monotonic() - started < T(1)
            assert traffic.wait_for(lambda: traffic.count("nack", "outage") >= 6, T(20))
            assert not server.redis_health.up
            rp = start_redis_server(port)
            traffic.phase = "after"
            assert call_until_it_succeeds(probe, T(1)) < T(1)
            assert traffic.wait_for(lambda: traffic.count("result", "after") >= 60, T(30))
            assert not probe.closed
        kinds = traffic.check()
        assert kinds["result"] >= 120 and kinds["nack"] >= 6
        assert server.redis_health.up and server.redis_health.outages == 1
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
    """With the pub-sub redis down, PUB and SUB get NACK 500 within a second, RPC on its own
    redis goes on (the pub-sub redis' outage is not the server's RPC redis'), and the same
    connection, still open, subscribes once the pub-sub redis is back."""
    rpc_redis, ps_redis = start_redis_server(), start_redis_server()
    ps_port = ps_redis.port
    rpc, ps = RedisBroker.from_url(rpc_redis.url), RedisBroker.from_url(ps_redis.url)
    callee = Callee(rpc, workers=1, block=0.05)
    callee.register("test.echo", echo)
    server = Server(rpc, pubsub_broker=ps).start()
    try:
        with callee, Client.connect(server.url, connect_timeout=T(5)) as c:
            assert c.call("test.echo", "rpc works", timeout=T(5)) == "rpc works"
            kill_redis_server(ps_redis)
            started = time.monotonic()
            with pytest.raises(NackError) as info:
                c.pub("news", 1)
            assert info.value.code == 500 and info.value.message.startswith("redis unavailable")
            with pytest.raises(NackError) as info:
                c.sub("news")
            assert info.value.code == 500
            assert time.monotonic() - started < T(1)
            assert c.call("test.echo", "rpc still works", timeout=T(5)) == "rpc still works"
            assert server.redis_health.up
            ps_redis = start_redis_server(ps_port)
            sub = c.sub("news")  # the SUB that failed does not stand in the way
            c.pub("news", 2)
            assert sub.get(T(5)).args == 2
            assert not c.closed
    finally:
        server.shutdown()
        callee.stop()
        rpc.close()
        ps.close()
        stop_redis_server(rpc_redis)
        stop_redis_server(ps_redis)


def msg_uuid_of(client: Client, fut: Future) -> str:
    return next(uuid for uuid, f in client._calls.items() if f is fut)


def test_a_listener_that_loses_redis_reconnects_and_brings_a_result_stored_after_it_is_back():
    """A call stored before the outage still ends exactly once: its RES, stored once redis is
    back (the listener's BRPOP is sent again on its new connection), or its expiry at its
    own deadline; the websocket stays open."""
    rp = start_redis_server()
    port = rp.port
    broker = RedisBroker.from_url(rp.url)
    server = Server(broker).start()
    try:
        with Client.connect(server.url, connect_timeout=T(5)) as c:
            # nobody serves the URI: the calls wait, stored, their listener in a BRPOP
            waiting = c.call_async("nobody.serves", "w", timeout=T(60))
            short = c.call_async("nobody.serves", "s", timeout=2.0)
            started = time.monotonic()
            deadline = started + T(5)
            while c.received["ACK"] < 2:  # (a bounded wait for both to be stored)
                assert time.monotonic() < deadline, "the calls were not ACKed"
                time.sleep(0.005)
            (conn,) = server.connections
            kill_redis_server(rp)
            rp = start_redis_server(port)  # empty: what redis held is gone
            # the callee's result, stored after redis came back, as a callee would store it
            broker.store_result(ResultPayload(conn.uuid, msg_uuid_of(c, waiting), "nobody.serves", "done"), T(30))
            assert waiting.result(T(5)) == "done"
            with pytest.raises(CallExpired):
                short.result(T(5))
            assert 2.0 <= time.monotonic() - started < 2.0 + T(1)  # at its own deadline
            assert not c.closed and conn in server.connections
            assert c.received["NACK"] == 0
    finally:
        server.shutdown()
        broker.close()
        stop_redis_server(rp)


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Read a raw websocket (server frames, unmasked) until the server's close frame; its
    payload (the code and reason). Pings and other frames are skipped."""
    sock.settimeout(timeout)
    data = b""
    while True:
        while len(data) >= 2 and len(data) >= 2 + (data[1] & 0x7F):  # (control frames: < 126 bytes)
            opcode, size = data[0] & 0x0F, data[1] & 0x7F
            if opcode == 0x8:
                return data[2:2 + size]
            data = data[2 + size:]
        chunk = sock.recv(4096)
        assert chunk, "the connection ended without a close frame"
        data += chunk


class RefusingRedis:
    """Stands on a redis' port while it is down and counts the connections made to it, each
    closed at once (a client sees its handshake fail, as with a redis that is going down):
    what a server's or a callee's reconnects cost a redis that is down."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(128)
        self.accepted: list[float] = []  # when each connection came (time.monotonic())
        self._thread = threading.Thread(target=self._run, name="test-refusing-redis")
        self._thread.start()

    @property
    def count(self) -> int:
        return len(self.accepted)

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            conn.close()

    def close(self) -> None:
        """Idempotent."""
        if self.sock.fileno() == -1:
            return
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.sock.close()
        self._thread.join()
        self._thread.join(T(5))


def metric(server: Server, name: str) -> float:
    for line in server.metrics.render().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_while_redis_is_down_a_server_tries_it_a_handful_of_times_a_second(caplog):
    """20 websockets with a call in flight each lose redis: their listeners take turns in the
    server's one backoff (not one connect each, at once and then again), calls meanwhile are
    NACKed without a connect of their own, and all of them work again once redis is back. The
    outage is one log line going and one coming back, and shows in /metrics."""
    rp = start_redis_server()
    port = rp.port
    broker = RedisBroker.from_url(rp.url)
    server = Server(broker).start()
    clients: list[Client] = []
    refusing: Optional[RefusingRedis] = None
    try:
        for _ in range(20):
            c = Client.connect(server.url, connect_timeout=T(5))
            clients.append(c)
            c.call_async("nobody.serves", None, timeout=T(60))
        deadline = time.monotonic() + T(10)
        while sum(c.received["ACK"] for c in clients) < 20:  # (a bounded wait: all stored)
            assert time.monotonic() < deadline, "the calls were not ACKed"
            time.sleep(0.005)
        assert metric(server, "juggler_redis_up") == 1
        caplog.set_level(logging.DEBUG, logger="juggler.server")
        kill_redis_server(rp)
        refusing = RefusingRedis(port)
        window = 2.0
        started = time.monotonic()
        nacks = 0
        while time.monotonic() - started < window:  # calls meanwhile: NACKed, no connect each
            for c in clients:
                with pytest.raises(NackError):
                    c.call("test.echo", None, timeout=T(5))
                nacks += 1
        tries = [t for t in refusing.accepted if t - started < window]
        assert nacks >= 20
        assert metric(server, "juggler_redis_up") == 0
        # one connect per turn of the backoff (equal jitter from 0.05 s doubling to 0.5 s: 6 to
        # 10 turns in 2 s), then the turns 0.25 to 0.5 s apart, whatever the listeners' number
        assert 2 <= len(tries) <= 12, [t - started for t in tries]
        later = [t for t in tries if t - started > 1.0]
        assert all(b - a >= 0.2 for a, b in zip(later, later[1:])), [round(t - started, 3) for t in tries]
        refusing.close()
        refusing = None
        rp = start_redis_server(port)
        back = time.monotonic()
        while not server.redis_health.up:  # (found back within a turn: 0.5 s at most)
            assert time.monotonic() - back < T(1), "redis is not seen back"
            time.sleep(0.005)
        for c in clients:
            with pytest.raises(CallExpired):  # nobody serves it: the call reached redis
                c.call("nobody.serves", None, timeout=0.5)
        assert not any(c.closed for c in clients) and len(server.connections) == 20
        assert metric(server, "juggler_redis_up") == 1 and metric(server, "juggler_redis_reconnects_total") >= 20
        lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.levelname for r in lines] == ["ERROR", "WARNING"], [r.getMessage() for r in lines]
        assert "redis unavailable" in lines[0].getMessage() and "redis is back" in lines[1].getMessage()
    finally:
        for c in clients:
            c.close()
        if refusing is not None:
            refusing.close()
        server.shutdown()
        broker.close()
        stop_redis_server(rp)


def test_a_redis_that_stalls_closes_no_websocket_and_stops_no_timer():
    """Redis stopped (SIGSTOP) for 3 s under traffic: every call ends exactly once, no
    websocket is closed, and the server's timers keep running (an idle connection is closed
    at its idle timeout, in the middle of the stall)."""
    from .test_hardening import _raw_connect

    rp = start_redis_server()
    broker = RedisBroker.from_url(rp.url)
    callee = Callee(broker, workers=4, block=0.05, max_backoff=0.2)
    callee.register("test.echo", echo)
    server = Server(broker, ping_interval=0.3, idle_timeout=2.0).start()
    try:
        with callee, Traffic(server.url, clients=6, uris=["test.echo"]) as traffic:
            assert traffic.wait_for(lambda: traffic.count("result") >= 30, T(20))
            silent = _raw_connect(server)  # reads, but sends nothing: not even a pong
            with stalled_redis(rp):
                traffic.phase = "stall"
                started = time.monotonic()
                close = read_until_closed(silent, T(3))  # pings, then its close at the idle timeout
                assert close[:2] == (1001).to_bytes(2, "big")
                assert 1.5 <= time.monotonic() - started < 3.0
                time.sleep(max(0.0, 3.0 - (time.monotonic() - started)))  # (the stall lasts 3 s)
            silent.close()
            traffic.phase = "after"
            assert traffic.wait_for(lambda: traffic.count("result", "after") >= 30, T(20))
        # (a store waits 0.75 s at most for a redis that stalls, and a reader stores its CALLs
        # one after the other: a CALL read behind another waits its turn, within its deadline)
        traffic.check(nack_within=2.0)
    finally:
        server.shutdown()
        callee.stop()
        broker.close()
        stop_redis_server(rp)


def test_a_big_call_stored_on_a_stalled_redis_holds_up_no_timer_and_no_shutdown():
    """A CALL stored through the results listener, its args larger than the socket buffers,
    on a redis that is stopped: the send waits for redis (1 s at most) holding no lock the
    server's timer needs, so pings, idle timeouts and close deadlines go on; the call gets its
    NACK, the websocket stays open, and shutdown() ends while redis is still stopped."""
    from .test_hardening import _raw_connect

    rp = start_redis_server()
    # (a reply timeout long enough that the store watch of the call before is still due when
    # the big call's send begins: the timer then needs the listener's lock)
    broker = RedisBroker.from_url(rp.url, max_args_size=0, socket_timeout=2.0)
    callee = Callee(broker, workers=1, block=0.05)
    callee.register("test.echo", echo)
    server = Server(broker, read_limit=64 << 20, ping_interval=0.3, idle_timeout=3.0).start()
    stopper: Optional[threading.Thread] = None
    try:
        with callee, Client.connect(server.url, connect_timeout=T(5)) as c:
            for n in (1, 2):  # the second call is stored through the listener, as the big one
                assert c.call("test.echo", n, timeout=T(5)) == n
                (conn,) = server.connections
                deadline = time.monotonic() + T(5)
                while conn._results._expect or conn._results._brpop_sent:  # (bounded: the listener idles)
                    assert time.monotonic() < deadline, "the listener is still busy"
                    time.sleep(0.005)
            silent = _raw_connect(server)
            with stalled_redis(rp):
                started = time.monotonic()
                big = c.call_async("test.echo", "x" * (16 << 20), timeout=T(30))
                read_until_closed(silent, T(5))  # closed at its idle timeout: the timer runs
                assert time.monotonic() - started < 3.0 + T(1.5)
                with pytest.raises(NackError) as info:
                    big.result(T(5))
                assert info.value.code == 500 and info.value.message.startswith("redis unavailable")
                assert not c.closed
                stopper = threading.Thread(target=server.shutdown, name="test-shutdown")
                stopper.start()
                stopper.join(T(10))
                assert not stopper.is_alive(), "shutdown() hangs on a stalled redis"
            silent.close()
    finally:
        server.shutdown()
        callee.stop()
        broker.close()
        stop_redis_server(rp)


def test_cluster_node_restart_in_the_middle_of_traffic(tmp_path):
    """One of three masters stops and comes back: calls on its slots fail (NACK, or expiry
    for those whose result list lives there), the others go on, no websocket is closed (the
    listeners on that master reconnect once it is back), and everything serves again."""
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
            # (no SUB: what pub-sub does through an outage is tested on its own)
            with Traffic(server.url, clients=6, uris=list(by_port.values())) as traffic:
                assert traffic.wait_for(lambda: traffic.count("result") >= 60, T(20))
                cluster.stop_node(victim)
                traffic.phase = "outage"
                # calls to its URI get NACK 500 (one call of every batch of three), the others
                # their results (or their expiry: a result list on the stopped master)
                assert traffic.wait_for(lambda: traffic.count("nack", "outage") >= 3, T(30))
                assert traffic.wait_for(lambda: traffic.count("result", "outage") >= 10, T(30))
                cluster.start_node(victim)
                traffic.phase = "after"
                assert traffic.wait_for(lambda: traffic.count("result", "after") >= 90, T(60))
                # every URI served again, the restarted master's too
                assert traffic.wait_for(lambda: len({d for p, k, d in traffic.outcomes if p == "after" and k == "result"}) == 3, T(30))
            traffic.check()  # (and no websocket closed)
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
    turns them into BrokerError (so a listener reconnects in its turn and a callee
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
    socket timeout the listener gives its connection up and connects again; the websocket
    stays open, and calls go through once redis answers again."""
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
            assert 0.5 <= time.monotonic() - started < T(5)  # at the socket timeout, not at the pause's end
            pauser.execute_command("CLIENT", "UNPAUSE")
            assert call_until_it_succeeds(c, T(3)) < T(3)
            assert not c.closed and conn in server.connections
    finally:
        pauser.execute_command("CLIENT", "UNPAUSE")
        pauser.close()
        server.shutdown()
        callee.stop()
        broker.close()
        stop_redis_server(rp)
