"""Redis faults on the pub-sub side and the callee (issue 20): no subscribed websocket is closed
because redis went away, the server restores every subscription once redis is back, requests
while it is down are NACKed within a second, and a callee logs one line going and one back.

Each test starts its own redis-server (it kills or stops it).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import redis as redis_py

from juggler import Callee, Client, NackError, RedisBroker, Server
from juggler.message import EventPayload

from .conftest import T, echo, start_redis_server, stop_redis_server
from .test_faults import RefusingRedis


def kill(rp) -> None:
    """SIGKILL: redis vanishes at once, without a word to its clients."""
    rp.proc.kill()
    rp.proc.wait()


def wait_until(predicate, timeout: float, what: str) -> None:
    """A bounded wait for a state the test cannot be told about (redis' or the hub's)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)


def nack_within(seconds: float, request) -> NackError:
    started = time.monotonic()
    with pytest.raises(NackError) as info:
        request()
    took = time.monotonic() - started
    assert took < seconds, f"answered in {took:.2f} s"
    assert info.value.code == 500 and info.value.message.startswith("redis unavailable"), info.value
    return info.value


def redis_counts(url: str, channels: list[str]) -> tuple[dict[str, int], int]:
    r = redis_py.Redis.from_url(url)
    try:
        numsub = {c.decode() if isinstance(c, bytes) else c: n for c, n in r.pubsub_numsub(*channels)}
        return numsub, r.pubsub_numpat()
    finally:
        r.close()


def test_fifty_subscribers_survive_a_redis_restart():
    """50 websockets subscribed to channels and patterns across a SIGKILL and restart of redis:
    none is closed, SUB and PUB while redis is down are NACKed within a second, an UNSB while
    down takes its subscription away for good, a SUB while down and the subscriptions of a
    connection closed while down are not restored, and once redis is back every subscription
    delivers again with no client action, with the same counts in redis as before."""
    rp = start_redis_server()
    port = rp.port
    broker = RedisBroker.from_url(rp.url)
    server = Server(broker).start()
    clients: list[Client] = []
    refuser = None
    try:
        subs = []  # (client index, subscription, what it listens to, an event that matches)
        for i in range(50):
            c = Client.connect(server.url, connect_timeout=T(5))
            clients.append(c)
            if i % 2:
                subs.append((i, c.sub(f"news.{i % 10}"), f"news.{i % 10}"))
            else:
                subs.append((i, c.sub(f"feed.{i % 5}.*", pattern=True), f"feed.{i % 5}.x"))
        # what the outage takes away: an UNSB, a connection that closes; and a SUB while down
        leaving, closing = clients[0], clients[1]
        unsb_sub = leaving.sub("only.leaving")
        closing.sub("only.closing")
        channels = [f"news.{k}" for k in range(10)] + ["only.leaving", "only.closing", "late"]
        before = redis_counts(rp.url, channels)
        assert before[0]["only.leaving"] == 1 and before[1] == 5

        kill(rp)
        refuser = RefusingRedis(port)  # (holds the port while redis is down, and counts connects)
        wait_until(lambda: not server.hub.connected, T(5), "the hub sees redis go")
        other = clients[2]
        nack_within(1.0, lambda: other.pub("news.1", "lost"))
        nack_within(1.0, lambda: other.sub("late"))
        nack_within(1.0, lambda: other.sub("news.3"))  # held by others, but not in redis now
        nack_within(1.0, lambda: leaving.unsb("only.leaving"))
        closing.close()
        wait_until(lambda: len(server.connections) == 49, T(5), "the server sees the close")
        counted_from = refuser.count
        time.sleep(1.0)  # the span measured: the server's connects in it, with 50 subscribers
        attempts = refuser.count - counted_from
        refuser.close()
        print(f"server connects while redis was down: {attempts} in 1 s")
        assert attempts <= 8, attempts  # a handful a second, not one per subscriber

        rp = start_redis_server(port)
        restarted = time.monotonic()
        wait_until(lambda: server.hub.connected, T(5), "the hub restores its subscriptions")
        assert time.monotonic() - restarted < 1.5
        after = redis_counts(rp.url, channels)
        assert after[0] == {**before[0], "only.leaving": 0, "only.closing": 0}
        assert after[1] == before[1]

        assert not any(c.closed for c in clients[2:] + [leaving])
        assert len(server.connections) == 49
        with Client.connect(server.url, connect_timeout=T(5)) as publisher:
            publisher.pub("only.leaving", "unsubscribed")
            for k in range(10):
                publisher.pub(f"news.{k}", f"n{k}")
            for k in range(5):
                publisher.pub(f"feed.{k}.x", f"f{k}")
            for i, sub, target in subs:
                if i == 1:
                    continue  # closed
                evnt = sub.get(T(5))
                assert evnt is not None, f"client {i} got nothing on {target}"
                assert evnt.channel == target
            # events reach each connection in the order published: the UNSB's would have been
            # first, before its news.0 (client 0 holds feed.0.*: its event came above)
            try:
                assert unsb_sub.get(0.2) is None
            except TimeoutError:
                pass
    finally:
        if refuser is not None:
            refuser.close()
        for c in clients:
            c.close()
        server.shutdown()
        broker.close()
        stop_redis_server(rp)


def test_a_stall_closes_nothing_and_events_flow_after_it():
    """SIGSTOP for 3 s: no websocket is closed, a PUB is NACKed within a second, a SUB ends by
    its confirmation timeout at the latest, and once redis runs again the subscriptions
    deliver."""
    rp = start_redis_server()
    broker = RedisBroker.from_url(rp.url)
    server = Server(broker).start()
    try:
        with Client.connect(server.url, connect_timeout=T(5)) as a, Client.connect(server.url, connect_timeout=T(5)) as b:
            sub = a.sub("stalled")
            b.pub("stalled", 0)
            assert sub.get(T(5)).args == 0
            os.kill(rp.proc.pid, signal.SIGSTOP)
            resume = threading.Timer(3.0, os.kill, (rp.proc.pid, signal.SIGCONT))
            resume.start()
            try:
                nack_within(1.0, lambda: b.pub("stalled", "during"))
                nack_within(1.0, lambda: b.pub("stalled", "during"))  # known down: at most a turn
                started = time.monotonic()
                try:
                    b.sub("new.during.stall")  # confirmed once the stall ends, or NACKed
                except NackError as exc:
                    assert exc.code == 500
                assert time.monotonic() - started < server.hub.confirm_timeout + 1
            finally:
                resume.join()
            assert not a.closed and not b.closed
            # after the stall: a PUB that gets its turn goes through, and the event arrives
            deadline = time.monotonic() + T(5)
            while True:
                try:
                    b.pub("stalled", 1)
                    break
                except NackError:
                    assert time.monotonic() < deadline
            while (evnt := sub.get(T(5))) is not None and evnt.args != 1:
                pass  # a PUB NACKed during the stall may still be delivered after it
            assert evnt is not None and evnt.args == 1
    finally:
        server.shutdown()
        broker.close()
        stop_redis_server(rp)


def test_the_first_sub_on_a_stalled_redis_ends_by_its_timeout():
    """The server's first SUB connects its pub-sub connection: on a stalled redis, redis-py's
    handshake waits at most the confirmation timeout (not for ever, holding every SUB and
    UNSB and the shutdown), and the SUB is NACKed."""
    rp = start_redis_server()
    broker = RedisBroker.from_url(rp.url)
    server = Server(broker).start()
    try:
        with Client.connect(server.url, connect_timeout=T(5), ack_timeout=T(30)) as c:
            os.kill(rp.proc.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(NackError) as info:
                    c.sub("first")
                assert info.value.code == 500
                assert time.monotonic() - started < server.hub.confirm_timeout + 1
            finally:
                os.kill(rp.proc.pid, signal.SIGCONT)
            deadline = time.monotonic() + T(5)
            while True:  # at most a turn of the backoff after the stall
                try:
                    sub = c.sub("first")
                    break
                except NackError:
                    assert time.monotonic() < deadline
            c.pub("first", "after")
            assert sub.get(T(5)).args == "after"
    finally:
        server.shutdown()
        broker.close()
        stop_redis_server(rp)


def test_subs_on_a_stalled_redis_end_by_one_confirmation_timeout():
    """Two SUBs of new channels while redis stalls longer than the confirmation timeout: the
    first is NACKed at its timeout (without waiting again to take its SUBSCRIBE back), the
    second, queued behind it, by the same deadline of its own (not twice that)."""
    rp = start_redis_server()
    broker = RedisBroker.from_url(rp.url)
    server = Server(broker, write_timeout=1.0).start()  # confirm_timeout: 5 s, the least
    confirm = server.hub.confirm_timeout
    try:
        with Client.connect(server.url, connect_timeout=T(5)) as a, Client.connect(server.url, connect_timeout=T(5)) as b:
            a.sub("warm")  # the hub's connection is up
            os.kill(rp.proc.pid, signal.SIGSTOP)
            resume = threading.Timer(confirm + 2, os.kill, (rp.proc.pid, signal.SIGCONT))
            resume.start()
            answered: dict[str, float] = {}

            def sub(client: Client, channel: str) -> None:
                started = time.monotonic()
                try:
                    client.sub(channel)
                except NackError as exc:
                    assert exc.code == 500
                answered[channel] = time.monotonic() - started

            try:
                threads = [threading.Thread(target=sub, args=(c, ch), name=f"sub-{ch}") for c, ch in ((a, "one"), (b, "two"))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(T(30))
            finally:
                resume.join()
            assert set(answered) == {"one", "two"}
            assert all(took < confirm + 1 for took in answered.values()), answered
            assert not a.closed and not b.closed
    finally:
        server.shutdown()
        broker.close()
        stop_redis_server(rp)


def test_client_pause_closes_nothing():
    """CLIENT PAUSE (as a failover does): a PUB is NACKed within a second and nothing is closed;
    events flow once the pause ends."""
    rp = start_redis_server()
    broker = RedisBroker.from_url(rp.url)
    server = Server(broker).start()
    pauser = redis_py.Redis.from_url(rp.url)
    try:
        with Client.connect(server.url, connect_timeout=T(5)) as a, Client.connect(server.url, connect_timeout=T(5)) as b:
            sub = a.sub("paused")
            pauser.execute_command("CLIENT", "PAUSE", 2000, "ALL")
            nack_within(1.0, lambda: b.pub("paused", "during"))
            pauser.execute_command("CLIENT", "UNPAUSE")
            deadline = time.monotonic() + T(5)
            while True:
                try:
                    b.pub("paused", "after")
                    break
                except NackError:
                    assert time.monotonic() < deadline
            while (evnt := sub.get(T(5))) is not None and evnt.args != "after":
                pass
            assert evnt is not None
            assert not a.closed and not b.closed
    finally:
        pauser.close()
        server.shutdown()
        broker.close()
        stop_redis_server(rp)


def test_a_callee_logs_one_line_going_and_one_back_and_reconnects_sparingly(caplog):
    rp = start_redis_server()
    port = rp.port
    broker = RedisBroker.from_url(rp.url)
    callee = Callee(broker, workers=8)
    callee.register("test.echo", echo)
    server = Server(broker).start()
    refuser = None
    try:
        with callee, caplog.at_level(logging.INFO, logger="juggler.callee"):
            with Client.connect(server.url, connect_timeout=T(5)) as c:
                assert c.call("test.echo", 1, timeout=T(5)) == 1
            kill(rp)
            refuser = RefusingRedis(port)
            wait_until(lambda: not callee.health.up, T(5), "the callee sees redis go")
            counted_from = refuser.count
            time.sleep(2.0)  # the span measured: the connects of 8 workers in it
            attempts = refuser.count - counted_from
            refuser.close()
            refuser = None
            print(f"callee connects while redis was down: {attempts} in 2 s")
            assert 2 <= attempts <= 16, attempts  # about 8 turns in 2 s, not 8 workers' worth each
            rp = start_redis_server(port)
            back = time.monotonic()
            with Client.connect(server.url, connect_timeout=T(5)) as c:
                assert c.call("test.echo", 2, timeout=T(5)) == 2
            assert time.monotonic() - back < 1.0
            assert callee.health.up
        lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "juggler.callee" and r.levelno >= logging.WARNING]
        assert len(lines) == 2, lines
        assert lines[0][0] == logging.ERROR and "redis unavailable" in lines[0][1]
        assert lines[1][0] == logging.WARNING and "redis is back" in lines[1][1]
        # and its metrics say so
        from juggler.metrics import CalleeMetrics

        text = CalleeMetrics(callee).render().decode()
        assert 'juggler_redis_up{callee="juggler-callee"} 1.0' in text
        assert "juggler_redis_reconnects_total" in text
    finally:
        if refuser is not None:
            refuser.close()
        server.shutdown()
        callee.stop()
        broker.close()
        stop_redis_server(rp)


def test_a_call_popped_before_the_outage_runs_once():
    """A call running when redis dies: it runs once; its result cannot be stored, which is
    logged, and the client gets its expiry (not a second run after the return)."""
    rp = start_redis_server()
    port = rp.port
    broker = RedisBroker.from_url(rp.url)
    runs = []
    started = threading.Event()
    release = threading.Event()

    def slow(args):
        runs.append(args)
        started.set()
        release.wait(T(10))
        return args

    callee = Callee(broker, workers=2)
    callee.register("test.slow", slow)
    server = Server(broker).start()
    try:
        with callee, Client.connect(server.url, connect_timeout=T(5)) as c:
            fut = c.call_async("test.slow", "once", timeout=3)
            assert started.wait(T(5))
            kill(rp)
            rp = start_redis_server(port)
            release.set()
            with pytest.raises(Exception):
                fut.result(T(10))  # expired (or the connection's listener failed)
            assert callee.stats.wait_for(lambda s: s.calls >= 1, T(5))
            assert runs == ["once"]
    finally:
        server.shutdown()
        callee.stop()
        broker.close()
        stop_redis_server(rp)


def test_publish_fails_fast_on_a_stalled_redis_through_the_broker():
    rp = start_redis_server()
    broker = RedisBroker.from_url(rp.url)
    try:
        assert broker.publish("x", EventPayload("u", 1)) == 0
        os.kill(rp.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            from juggler import BrokerError

            with pytest.raises(BrokerError, match="redis unavailable"):
                broker.publish("x", EventPayload("u", 2))
            assert time.monotonic() - started < broker.publish_timeout + 0.3
        finally:
            os.kill(rp.proc.pid, signal.SIGCONT)
        assert broker.publish("x", EventPayload("u", 3)) == 0
    finally:
        broker.close()
        stop_redis_server(rp)


# -- the hub's races, on a stand-in pub-sub connection whose every step the test drives ----------


class _FakePubSub:
    def __init__(self, broker: "_FakeBroker") -> None:
        import queue

        self.broker = broker
        self.events: "queue.Queue" = queue.Queue()
        self.done = None  # restore()'s callback, called when the test says redis confirmed
        self.restored: list = []
        self.closed = False

    def subscribe(self, channel, pattern, timeout=None):
        if self.broker.down:
            from juggler import BrokerError

            raise BrokerError("redis unavailable: refused")
        self.broker.log.append(("subscribe", pattern, channel))

    def unsubscribe(self, channel, pattern, timeout=None):
        self.broker.log.append(("unsubscribe", pattern, channel))

    def connect(self):
        if self.broker.down:
            from juggler import BrokerError

            raise BrokerError("redis unavailable: refused")

    def restore(self, keys, done):
        self.restored = sorted(keys)
        self.done = done
        self.broker.restoring.set()

    def get_event(self, timeout):
        item = self.events.get()
        if isinstance(item, Exception):
            raise item
        return item

    def wake(self):
        self.events.put(None)

    def close(self):
        self.closed = True


class _FakeBroker:
    def __init__(self) -> None:
        self.down = False
        self.log: list = []
        self.made: list[_FakePubSub] = []
        self.restoring = threading.Event()

    def pubsub(self, confirm_timeout=5.0):
        ps = _FakePubSub(self)
        self.made.append(ps)
        return ps

    def publish(self, channel, payload):
        if self.down:
            from juggler import BrokerError

            raise BrokerError("redis unavailable: refused")
        return 1


class _Sub:
    def __init__(self) -> None:
        self.got: list = []

    def deliver(self, key, event):
        self.got.append((key, event.payload.args))


def test_the_hub_restores_what_is_held_and_only_that():
    """SUB, UNSB and closes during the outage and during the restore, step by step."""
    from juggler import BrokerError
    from juggler.health import RedisHealth
    from juggler.pubsub import PubSubHub
    from juggler.redis_pubsub import PubSubEvent

    broker = _FakeBroker()
    hub = PubSubHub(broker, health=RedisHealth(base=0.01, cap=0.02))
    a, b, c, gone = _Sub(), _Sub(), _Sub(), _Sub()
    try:
        hub.subscribe(a, "x", False)
        hub.subscribe(b, "y", False)
        hub.subscribe(b, "p*", True)
        hub.subscribe(gone, "g", False)
        ps0 = broker.made[0]
        broker.down = True
        ps0.events.put(BrokerError("redis unavailable: connection reset"))
        wait_until(lambda: not hub.connected, T(5), "the hub sees the failure")
        assert ps0.closed
        for channel in ("z", "x"):  # a new channel, and one held by another connection
            with pytest.raises(BrokerError, match="redis unavailable"):
                hub.subscribe(c, channel, False)
        hub.subscribe(a, "x", False)  # again: it holds it already (to be restored)
        with pytest.raises(BrokerError, match="redis unavailable"):
            hub.unsubscribe(b, "y", False)  # NACKed, but gone all the same
        with pytest.raises(BrokerError, match="redis unavailable"):
            hub.publish("x", EventPayload("u", 1))
        hub.drop(gone)  # its connection closed during the outage
        assert hub.subscriptions() == {(False, "x"), (True, "p*")}

        broker.down = False  # redis is back: the reader's next turn reconnects
        assert broker.restoring.wait(T(5))
        ps1 = broker.made[-1]
        assert ps1.restored == [(False, "x"), (True, "p*")]
        # restore sent, not confirmed: a SUB is still refused; the last UNSB of a restored
        # channel goes to the new connection (after the restore's SUBSCRIBE)
        assert not hub.connected
        with pytest.raises(BrokerError, match="redis unavailable"):
            hub.subscribe(c, "x", False)
        hub.unsubscribe(a, "x", False)
        assert broker.log[-1] == ("unsubscribe", False, "x")
        ps1.done()  # redis confirmed the restore
        assert hub.connected and hub.restores == 1
        hub.subscribe(c, "x", False)  # released above: subscribed afresh
        assert broker.log[-1] == ("subscribe", False, "x")
        ps1.events.put(PubSubEvent("p1", "p*", EventPayload("u", "after")))
        ps1.events.put(PubSubEvent("x", "", EventPayload("u", "x after")))
        wait_until(lambda: c.got, T(5), "the events after the restore")
        assert b.got == [((True, "p*"), "after")] and a.got == [] and gone.got == []
        assert hub.publish("x", EventPayload("u", 2)) == 1
    finally:
        hub.close()
        hub.close()


def test_the_hub_closes_while_it_waits_to_reconnect():
    from juggler import BrokerError
    from juggler.health import RedisHealth
    from juggler.pubsub import PubSubHub

    broker = _FakeBroker()
    hub = PubSubHub(broker, health=RedisHealth(base=5.0, cap=5.0))  # turns far apart
    hub.subscribe(_Sub(), "x", False)
    broker.down = True
    broker.made[0].events.put(BrokerError("redis unavailable: connection reset"))
    wait_until(lambda: not hub.connected, T(5), "the hub sees the failure")
    started = time.monotonic()
    hub.close()  # joins the reader, which waits for its turn
    assert time.monotonic() - started < 1.0


def test_the_cluster_node_of_the_pubsub_connection_restarts(tmp_path):
    """On a Redis Cluster the server's pub-sub connection is on one primary: that node stops
    and comes back. No subscribed websocket is closed, the hub moves to a primary that
    serves (the next in turn), and every subscription gets events again, before and after the
    node's return."""
    from .conftest import start_redis_cluster

    cluster = start_redis_cluster(str(tmp_path))
    broker = None
    clients: list[Client] = []
    try:
        broker = RedisBroker.from_url(cluster.url, cluster=True)
        with Server(broker) as server:
            clients = [Client.connect(server.url, connect_timeout=T(5)) for _ in range(6)]
            subs = [c.sub("cluster.news") if i % 2 else c.sub("cluster.*", pattern=True) for i, c in enumerate(clients)]
            # the node to stop: the one the server's pub-sub connection is on
            victim = server.hub._ps._owner.connection_pool.connection_kwargs["port"]
            cluster.stop_node(victim)
            wait_until(lambda: server.hub.restores >= 1, T(10), "the hub moves to another primary")
            publisher = clients[0]

            def events_flow(tag: str) -> None:
                deadline = time.monotonic() + T(10)
                while True:  # PUBLISH goes to the node of the channel's slot: it may be the one down
                    try:
                        publisher.pub("cluster.news", tag)
                        break
                    except NackError:
                        assert time.monotonic() < deadline, "PUB never went through"
                        time.sleep(0.05)
                for sub in subs:
                    while (evnt := sub.get(T(10))).args != tag:
                        pass  # an earlier PUB NACKed may still have been delivered

            moved_to = server.hub._ps._owner.connection_pool.connection_kwargs["port"]
            assert moved_to != victim
            if broker.client.get_node_from_key("cluster.news").port != victim:
                events_flow("while the node is down")
            cluster.start_node(victim)
            events_flow("after the node is back")
            assert not any(c.closed for c in clients)
            assert len(server.connections) == len(clients)
    finally:
        for c in clients:
            c.close()
        if broker is not None:
            broker.close()
        cluster.stop()
