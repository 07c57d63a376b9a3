"""Shared fixtures.

- ``redis_server``: a real ``redis-server`` the suite starts on a free port (never 6379) for the
  whole session. Without the binary the real-redis tests skip, except under ``CI``, where they
  fail: CI must run them.
- ``redis_client``: parametrized over ``fake`` (fakeredis) and ``real``; every integration test
  that uses it runs on both.
- ``stack``: a started server and callee on that redis, plus clients, all stopped and joined
  at teardown.

Timeouts are multiplied by ``JUGGLER_TEST_TIMEOUT_SCALE`` (default 1) for slow machines.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Any

import fakeredis
import pytest
import redis

from juggler import Callee, Client, RedisBroker, Server
from juggler.peer import FAIL, Peer
from juggler.transport import SocketReader

SCALE = float(os.environ.get("JUGGLER_TEST_TIMEOUT_SCALE", "1"))


def T(seconds: float) -> float:
    """A test timeout, scaled for slow machines."""
    return seconds * SCALE


class PeerReader:
    """Reads a socket (or a :class:`SocketReader`) through a :class:`~juggler.peer.Peer`, one
    event at a time: :meth:`read` returns the next ``(kind, value)``, raises the
    :class:`~juggler.exceptions.ProtocolError` of a ``FAIL``, and
    :class:`~juggler.exceptions.Stopped` when the stream ends. A server side by default (the
    frames read must be masked); ``client=True`` reads a server's frames."""

    def __init__(self, source: Any, *, client: bool = False, limit: int = 1 << 20) -> None:
        self.reader = source if isinstance(source, SocketReader) else SocketReader(source)
        self.peer = Peer(client=client, limit=limit)
        self.events: list[tuple[int, Any]] = []

    def read(self) -> tuple[int, Any]:
        while not self.events:
            self.events.extend(self.peer.receive_data(self.reader.read_some()))
        kind, value = self.events.pop(0)
        if kind == FAIL:
            raise value
        return kind, value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def juggler_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("juggler")]


# The juggler_* fixtures: juggler's pytest plugin, loaded as docs/testing.rst tells users to.
pytest_plugins = ["juggler.pytest_plugin"]


def import_or_skip(module: str, reason: str, installable: bool = True) -> Any:
    """``module`` imported; where it is missing, the tests of the calling module skip with
    ``reason``, except under ``CI``, where the import error fails them: CI must run them.
    ``installable=False`` (the package has no release for this Python, so the test extra
    leaves it out) skips them under ``CI`` too."""
    if os.environ.get("CI") and installable:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)


@pytest.fixture(autouse=True)
def no_thread_leaks():
    """Every test ends with no juggler thread alive (autouse: torn down after the others)."""
    before = set(juggler_threads())
    yield
    left = [n for n in juggler_threads() if n not in before]
    assert not left, f"juggler threads left alive: {left}"


class RedisProcess:
    def __init__(self, port: int, proc: subprocess.Popen):
        self.port = port
        self.proc = proc
        self.url = f"redis://127.0.0.1:{port}/0"


def start_redis_server(port: int | None = None, extra: tuple[str, ...] = ()) -> RedisProcess:
    """Start redis-server on ``port`` (a free one by default; ``extra``: more of its flags);
    returns once it accepts."""
    port = port or free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # wait for readiness by reading its log, not by sleeping
        if "Ready to accept connections" in line:
            break
    else:
        raise RuntimeError(f"redis-server on port {port} exited with {proc.wait()}")
    # Keep draining its log so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stdout], name="redis-log-drain", daemon=True).start()
    return RedisProcess(port, proc)


def stop_redis_server(rp: RedisProcess) -> None:
    rp.proc.terminate()
    try:
        rp.proc.wait(T(10))
    except subprocess.TimeoutExpired:
        rp.proc.kill()
        rp.proc.wait()


def kill_redis_server(rp: RedisProcess) -> None:
    """SIGKILL: redis goes at once, with what it held (the way a crash or an OOM kill does)."""
    rp.proc.kill()
    rp.proc.wait()


@contextlib.contextmanager
def stalled_redis(rp: RedisProcess):
    """Redis stopped (SIGSTOP) for the block: connected clients wait, nothing is refused."""
    rp.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        rp.proc.send_signal(signal.SIGCONT)


@pytest.fixture(scope="session")
def redis_server():
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, and CI must run the real-redis tests")
        pytest.skip("redis-server is not installed")
    rp = start_redis_server()
    yield rp
    stop_redis_server(rp)


def make_redis_client(kind: str, request):
    """An empty redis of ``kind``: "fake" (fakeredis), "real" (the session's redis-server) or
    "cluster" (the session's 3-master Redis Cluster)."""
    if kind == "fake":
        return fakeredis.FakeRedis(server=fakeredis.FakeServer())
    if kind == "cluster":
        from redis.cluster import RedisCluster

        client = RedisCluster.from_url(request.getfixturevalue("redis_cluster").url)
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis_server").url)
    client.flushall()
    return client


@pytest.fixture
def real(redis_server):
    """A plain client of the session's real redis, emptied."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(params=["fake", "real"])
def redis_client(request):
    client = make_redis_client(request.param, request)
    yield client
    client.close()


def echo(args):
    return args


def reverse(args):
    if not isinstance(args, str):
        raise TypeError("test.reverse takes a string")
    return args[::-1]


def delay(args):
    ms = int(args or 0)
    time.sleep(ms / 1000)
    return ms


def fail(args):
    raise RuntimeError(f"failed on purpose: {args}")


class Stack:
    """A server, a callee pool and clients on one redis; ``close()`` stops and joins them all."""

    def __init__(self, redis_client, call_cap: int = 0, result_cap: int = 0, workers: int = 8, **server_kw):
        self.redis = redis_client
        self.broker = RedisBroker(redis_client, call_cap=call_cap, result_cap=result_cap)
        self.server = Server(self.broker, **server_kw).start()
        self.callee = Callee(self.broker, workers=workers, block=0.05)
        for uri, fn in (("test.echo", echo), ("test.reverse", reverse), ("test.delay", delay), ("test.fail", fail)):
            self.callee.register(uri, fn)
        self.callee.start()
        self.clients: list[Client] = []

    def client(self, **kw) -> Client:
        """A client of this stack's server, closed with the stack."""
        kw.setdefault("connect_timeout", T(10))
        c = Client.connect(self.server.url, **kw)
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.callee.stop()
        self.server.shutdown()


@pytest.fixture
def stack(redis_client):
    s = Stack(redis_client)
    yield s
    s.close()


@pytest.fixture
def make_stack(redis_client):
    """A factory for a Stack with other settings (caps, server limits)."""
    made: list[Stack] = []

    def make(**kw) -> Stack:
        s = Stack(redis_client, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# -- Redis Cluster (issue 5) ---------------------------------------------------------------------


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too (redis < 7 has no
    ``cluster-port`` setting to choose the bus port)."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (P, P + 10000) for a cluster node")


class RedisClusterProcess:
    """A Redis Cluster of ``redis-server`` processes on loopback: ``ports`` are its nodes,
    ``replicas`` per master (0: every node a master).

    ``url`` is the first node's URL (any node will do to discover the rest); ``stop_node`` and
    ``start_node`` take one node down and bring it back on the same port with the same
    cluster config file, so it rejoins (with its slots, or as a replica if its replica was
    promoted meanwhile); ``kill_node`` is a crash (SIGKILL).
    """

    def __init__(self, directory: str, ports: list[int], node_timeout_ms: int, replicas: int = 0) -> None:
        self.directory = directory
        self.ports = ports
        self.node_timeout_ms = node_timeout_ms
        self.replicas = replicas
        self.procs: dict[int, subprocess.Popen] = {}
        self.url = f"redis://127.0.0.1:{ports[0]}/0"

    def _argv(self, port: int) -> list[str]:
        return [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--cluster-enabled", "yes", "--cluster-config-file", os.path.join(self.directory, f"nodes-{port}.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms), "--dir", self.directory,
        ]  # fmt: skip

    def start_node(self, port: int) -> None:
        proc = subprocess.Popen(self._argv(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:  # readiness from its log, as for a single redis-server
            if "Ready to accept connections" in line:
                break
        else:
            raise RuntimeError(f"cluster node on port {port} exited with {proc.wait()}")
        threading.Thread(target=lambda: [None for _ in proc.stdout], name="redis-log-drain", daemon=True).start()
        self.procs[port] = proc

    def stop_node(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.terminate()
        try:
            proc.wait(T(10))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill_node(self, port: int) -> None:
        """SIGKILL: the node goes at once, as in a crash (its replica, if any, is promoted
        after ``cluster-node-timeout``)."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait()

    def masters(self) -> dict[int, list[int]]:
        """Each master's port and its replicas' ports, as the first live node sees them (a
        node marked failed is left out)."""
        port = next(iter(self.procs))
        r = redis.Redis(port=port, socket_connect_timeout=1)
        try:
            nodes = r.cluster("nodes")
        finally:
            r.close()
        ids = {info["node_id"]: int(addr.split("@")[0].rsplit(":", 1)[1]) for addr, info in nodes.items()}
        out: dict[int, list[int]] = {}
        for addr, info in nodes.items():
            if "fail" in info["flags"] or not info["connected"] and "myself" not in info["flags"]:
                continue
            if "master" in info["flags"]:
                out.setdefault(ids[info["node_id"]], [])
        for addr, info in nodes.items():
            if "slave" in info["flags"] and "fail" not in info["flags"] and ids.get(info["master_id"]) in out:
                out[ids[info["master_id"]]].append(ids[info["node_id"]])
        return out

    def wait_ok(self, timeout: float) -> None:
        """Poll every running node until each says cluster_state:ok, and each replica's link
        to its master is up (readiness polling: there is no event to wait on)."""
        deadline = time.monotonic() + timeout
        pending = set(self.procs)
        while pending:
            for port in sorted(pending):
                r = redis.Redis(port=port, socket_connect_timeout=1)
                try:
                    if r.cluster("info").get("cluster_state") == "ok":
                        info = r.info("replication")
                        if info.get("role") == "master" or info.get("master_link_status") == "up":
                            pending.discard(port)
                except redis.RedisError:
                    pass
                finally:
                    r.close()
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"cluster nodes {sorted(pending)} not ok after {timeout} s")
            if pending:
                time.sleep(0.05)

    def stop(self) -> None:
        for port in list(self.procs):
            self.stop_node(port)


def start_redis_cluster(directory: str, masters: int = 3, node_timeout_ms: int = 15000,
                        replicas: int = 0) -> RedisClusterProcess:  # fmt: skip
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each (a failover, a
    replica promoted, takes about ``node_timeout_ms`` plus a second or two: give a small one
    to a test that kills a master), started and ready: every node ok, every replica synced."""
    os.makedirs(directory, exist_ok=True)
    ports: list[int] = []
    while len(ports) < masters * (1 + replicas):
        port = free_cluster_port()
        if port not in ports:  # (a port freed may be handed out again)
            ports.append(port)
    cluster = RedisClusterProcess(directory, ports, node_timeout_ms, replicas)
    try:
        for port in cluster.ports:
            cluster.start_node(port)
        # "yes" on stdin rather than --cluster-yes, which older redis-cli versions lack
        out = subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in cluster.ports],
             "--cluster-replicas", str(replicas)],
            input="yes\n", capture_output=True, text=True, timeout=T(60),
        )  # fmt: skip
        if out.returncode != 0 or "All 16384 slots covered" not in out.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed ({out.returncode}): {out.stdout}{out.stderr}")
        cluster.wait_ok(T(30))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def need_cluster_binaries() -> None:
    """Without redis-server or redis-cli the cluster tests skip, except under CI, where they
    fail."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{' and '.join(missing)} not installed, and CI must run the Redis Cluster tests")
        pytest.skip(f"{' and '.join(missing)} not installed")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A 3-master Redis Cluster for the whole session (see :func:`need_cluster_binaries`); if it
    cannot start, its tests fail."""
    need_cluster_binaries()
    started = time.monotonic()
    cluster = start_redis_cluster(str(tmp_path_factory.mktemp("redis-cluster")))
    _cluster_startups.append(time.monotonic() - started)
    yield cluster
    cluster.stop()


@pytest.fixture
def make_redis_cluster(tmp_path):
    """``make(**kw)``: a Redis Cluster of the test's own (:func:`start_redis_cluster`'s
    arguments), for a test that stops or kills its nodes; stopped at teardown."""
    need_cluster_binaries()
    made: list[RedisClusterProcess] = []

    def make(**kw: Any) -> RedisClusterProcess:
        cluster = start_redis_cluster(str(tmp_path / f"cluster-{len(made)}"), **kw)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


_cluster_startups: list[float] = []


def pytest_terminal_summary(terminalreporter):
    """Say how long the session's Redis Cluster took to start (redis-cli waits for the nodes
    to agree in steps of one second)."""
    for seconds in _cluster_startups:
        terminalreporter.write_line(f"redis cluster fixture: 3 masters ready in {seconds:.1f} s")
