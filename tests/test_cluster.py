"""Redis Cluster: the broker, a callee and end-to-end scenarios on a real 3-master cluster.

The ``redis_cluster`` fixture (tests/conftest.py) starts the cluster once per session; each
test flushes it first.
"""

from __future__ import annotations

import threading

import pytest
import redis
from redis.cluster import RedisCluster

from juggler import BrokerError, Callee, Client, RedisBroker, Server
from juggler.broker import call_slot, call_timeout_key, calls_key, results_key
from juggler.message import CallPayload, EventPayload, new_uuid

from .conftest import T, echo


@pytest.fixture
def cluster_broker(redis_cluster):
    broker = RedisBroker.from_url(redis_cluster.url, cluster=True)
    broker.client.flushall()
    yield broker
    broker.close()


def uris_on_each_primary(client: RedisCluster, prefix: str) -> list[str]:
    """One URI per primary node: ``prefix.N`` whose call list lives on that node."""
    found: dict[str, str] = {}
    n = 0
    while len(found) < len(client.get_primaries()):
        uri = f"{prefix}.{n}"
        node = client.nodes_manager.get_node_from_slot(call_slot(uri))
        found.setdefault(node.name, uri)
        n += 1
    return sorted(found.values())


# -- the broker on a cluster ---------------------------------------------------------------------


def test_the_fixture_is_a_three_master_cluster(redis_cluster):
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        assert len(client.get_primaries()) == 3
        assert client.cluster_info()["cluster_state"] == "ok"
    finally:
        client.close()


def test_from_url_detects_a_cluster(redis_cluster, redis_server):
    broker = RedisBroker.from_url(redis_cluster.url, cluster=None)
    plain = RedisBroker.from_url(redis_server.url, cluster=None)
    try:
        assert broker.cluster and isinstance(broker.client, RedisCluster)
        assert not plain.cluster and isinstance(plain.client, redis.Redis)
    finally:
        broker.close()
        plain.close()
    # a server that does not know INFO (juggler's embedded redis) is no cluster node either
    from juggler.embedded import EmbeddedRedis

    with EmbeddedRedis().start() as embedded:
        broker = RedisBroker.from_url(embedded.url, cluster=None)
        assert not broker.cluster and broker.ping()
        broker.close()


def test_from_url_raises_broker_error_for_an_unreachable_cluster():
    from .conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(BrokerError, match="cannot reach redis cluster"):
        RedisBroker.from_url(url, cluster=True, socket_connect_timeout=1)
    with pytest.raises(BrokerError, match="cannot reach redis"):
        RedisBroker.from_url(url, cluster=None, socket_connect_timeout=1)


def test_each_call_lives_on_the_node_of_its_uri_slot(cluster_broker):
    client = cluster_broker.client
    for uri in uris_on_each_primary(client, "layout"):
        payload = CallPayload(new_uuid(), new_uuid(), uri, {"x": 1})
        cluster_broker.store_call(payload, 5)
        node = client.get_redis_connection(client.nodes_manager.get_node_from_slot(call_slot(uri)))
        # both keys of the script are on that node: the hash tag is the URI
        assert node.llen(calls_key(uri)) == 1
        assert 0 < node.pttl(call_timeout_key(uri, payload.msg_uuid)) <= 5000
        assert 0 < node.pttl(calls_key(uri)) <= 5000
        popped = cluster_broker.pop_call([uri], 1)
        assert popped.payload == payload and 0 < popped.remaining <= 5
        assert not node.exists(call_timeout_key(uri, payload.msg_uuid))


def test_call_groups_split_uris_by_slot(cluster_broker, redis_server):
    a, b, c = uris_on_each_primary(cluster_broker.client, "group")
    assert cluster_broker.call_groups([a, b, c]) == [[a], [b], [c]]
    # URIs that start with the same {tag} share a slot, so one BRPOP can wait on them together
    assert cluster_broker.call_groups(["{app}.echo", "{app}.reverse", "{app}.delay"]) == [
        ["{app}.echo", "{app}.reverse", "{app}.delay"]
    ]
    plain = RedisBroker(redis.Redis.from_url(redis_server.url))
    assert plain.call_groups([a, b, c]) == [[a, b, c]]
    plain.client.close()


def test_keys_of_different_slots_in_one_command_are_a_broker_error(cluster_broker):
    a, b, _ = uris_on_each_primary(cluster_broker.client, "cross")
    with pytest.raises(BrokerError, match="same key slot"):
        cluster_broker.pop_call([a, b], 0.01)


def test_a_uri_starting_with_a_closing_brace_is_a_broker_error(cluster_broker):
    """'}x' gives the keys an empty hash tag: the whole key is hashed, so a call's list and
    timeout key land in different slots and the cluster refuses the script (NACK 500)."""
    from redis.cluster import key_slot

    msg_uuid = "6f1f4a52-0c5b-4a57-9d39-2f4a3f0c9b1e"
    assert key_slot(calls_key("}x").encode()) != key_slot(call_timeout_key("}x", msg_uuid).encode())
    with pytest.raises(BrokerError, match="redis error: .*same (key )?slot"):  # (redis says it now: CROSSSLOT)
        cluster_broker.store_call(CallPayload(new_uuid(), msg_uuid, "}x", 1), 1)


def test_scripts_survive_script_flush_on_every_node(cluster_broker):
    uris = uris_on_each_primary(cluster_broker.client, "flush")
    cluster_broker.client.script_flush()
    for uri in uris:  # NOSCRIPT on each node: EVAL loads it there again
        cluster_broker.store_call(CallPayload(new_uuid(), new_uuid(), uri, 1), 5)
        assert cluster_broker.pop_call([uri], 1).payload.uri == uri


def test_unserved_calls_leave_nothing_in_redis(cluster_broker):
    """A call to a URI nobody serves goes away with its timeout, list included (the
    reference leaves the list forever)."""
    import time

    client = cluster_broker.client
    keys = []
    for uri in uris_on_each_primary(client, "nobody"):
        p = CallPayload(new_uuid(), new_uuid(), uri, 1)
        cluster_broker.store_call(p, 0.2)
        keys += [calls_key(uri), call_timeout_key(uri, p.msg_uuid)]
    assert all(0 < client.pttl(k) <= 200 for k in keys)
    started = time.monotonic()
    # polling redis is the only way to see a key expire (EXISTS also reclaims it)
    while any(client.exists(k) for k in keys):
        assert time.monotonic() - started < T(5), "call lists did not expire"
        time.sleep(0.02)
    assert [k for k in client.scan_iter() if client.exists(k)] == []


def test_callee_serves_uris_in_several_slots(cluster_broker):
    uris = uris_on_each_primary(cluster_broker.client, "slotted")
    callee = Callee(cluster_broker, workers=2, block=0.05)
    for uri in uris:
        callee.register(uri, lambda args, uri=uri: [uri, args])
    with callee:
        # one worker per slot group at least: 3 threads for workers=2
        assert len([t for t in threading.enumerate() if t.name.startswith("juggler-callee-")]) == 3
        conn = new_uuid()
        calls = {uri: CallPayload(conn, new_uuid(), uri, i) for i, uri in enumerate(uris)}
        for p in calls.values():
            cluster_broker.store_call(p, T(5))
        got = {}
        while len(got) < len(uris):
            popped = cluster_broker.pop_result(conn, T(5))
            assert popped is not None, f"results so far: {got}"
            got[popped.payload.uri] = popped.payload.args
        assert got == {uri: [uri, i] for i, uri in enumerate(uris)}


def test_pubsub_connections_go_to_each_primary_in_turn(cluster_broker):
    """PUBLISH on any node reaches subscribers on every node; a pattern too."""
    from .test_broker import Listener

    listeners = [Listener(cluster_broker.pubsub()) for _ in range(3)]
    try:
        ports = {ln.ps._pubsub.connection_pool.connection_kwargs["port"] for ln in listeners}
        assert len(ports) == 3
        for i, ln in enumerate(listeners):
            ln.ps.subscribe("cl.news" if i % 2 else "cl.*", i % 2 == 0)
        cluster_broker.publish("cl.news", EventPayload(new_uuid(), "hi"))
        for i, ln in enumerate(listeners):
            ev = ln.events.get(timeout=T(5))
            assert (ev.channel, ev.pattern, ev.payload.args) == ("cl.news", "" if i % 2 else "cl.*", "hi")
    finally:
        for ln in listeners:
            ln.close()


def test_a_user_made_cluster_client_works_too(redis_cluster):
    """RedisBroker(RedisCluster(...)): a results listener blocks, with no socket timeout, on a
    connection of its own to the node that serves its key."""
    client = RedisCluster.from_url(redis_cluster.url)
    broker = RedisBroker(client)
    key = results_key("some-connection")
    listener = broker.dedicated(key)
    try:
        kwargs = listener.client.connection_pool.connection_kwargs
        assert kwargs["port"] == client.get_node_from_key(key).port
        assert kwargs["socket_timeout"] is None
    finally:
        listener.close()
    callee = Callee(broker, workers=2, block=0.05)
    callee.register("test.echo", echo)
    try:
        with Server(broker) as server, callee:
            with Client.connect(server.url, connect_timeout=T(5)) as c:
                assert c.call("test.echo", "mine", timeout=T(5)) == "mine"
                sub = c.sub("own.*", pattern=True)
                c.pub("own.x", 1)
                assert sub.get(T(5)).args == 1
    finally:
        client.close()


# -- end to end on the cluster (the scenarios of test_e2e.py run on it too) --------------------------


def test_many_websockets_each_with_its_listeners(redis_cluster):
    """Every websocket's results listener blocks on a node connection of its own, taken from
    the cluster client's uncapped node pools: 60 websockets all get their results, and
    from_url refuses a cap that would let idle listeners starve everyone."""
    with pytest.raises(ValueError, match="max_connections"):
        RedisBroker.from_url(redis_cluster.url, cluster=True, max_connections=4)
    broker = RedisBroker.from_url(redis_cluster.url, cluster=True)
    callee = Callee(broker, workers=2, block=0.05)
    callee.register("test.echo", echo)
    clients: list[Client] = []
    try:
        with Server(broker) as server, callee:
            clients = [Client.connect(server.url, connect_timeout=T(5)) for _ in range(60)]
            futures = [c.call_async("test.echo", i, timeout=T(20)) for i, c in enumerate(clients)]
            assert [f.result(T(20)) for f in futures] == list(range(60))
    finally:
        for c in clients:
            c.close()
        broker.close()


def test_callee_on_a_cluster_batches_and_stops_at_once(cluster_broker):
    """On a cluster each worker blocks on the primary of its URIs' slot; batched calls are
    served once each, results reach the nodes of their connections, and stop() unblocks the
    workers at once."""
    import time

    uris = uris_on_each_primary(cluster_broker.client, "batched")
    callee = Callee(cluster_broker, workers=3, block=30.0, batch=8)
    for uri in uris:
        callee.register(uri, lambda args, uri=uri: [uri, args])
    calls = [CallPayload(new_uuid(), new_uuid(), uris[i % len(uris)], i) for i in range(60)]
    for p in calls:
        cluster_broker.store_call(p, T(30))
    callee.start()
    try:
        assert callee.stats.wait_for(lambda s: s.calls == len(calls), T(20))
        for p in calls:
            popped = cluster_broker.pop_result(p.conn_uuid, T(5))
            assert popped is not None and popped.payload.args == [p.uri, p.args]
        time.sleep(0.2)  # every worker blocked again
        started = time.monotonic()
        assert callee.stop(timeout=T(5)) is True
        assert time.monotonic() - started < 0.5
    finally:
        callee.stop()
    assert callee.stats.snapshot()["calls"] == len(calls)
