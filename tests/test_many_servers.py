"""Many servers on one redis: two ``juggler server`` processes, two callee pools, clients on
both. Nothing ties a client to a server: results go to a list per connection, events go
through redis pub-sub, and callees take calls from a list per URI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
import redis

from juggler import Callee, Client, RedisBroker

from .conftest import T

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """``python -m juggler server --redis URL --port 0``; ``url`` is the websocket URL it prints."""

    def __init__(self, redis_url: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("JUGGLER_CONFIG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "juggler", "server", "--redis", redis_url, "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        self.log: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # it prints its URL once it listens
            self.log.append(line)
            m = re.match(r"websocket: (ws://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        else:
            raise RuntimeError(f"juggler server exited with {self.proc.wait()}: {''.join(self.log)}")
        self._drain = threading.Thread(target=self._read_log, name="server-log-drain", daemon=True)
        self._drain.start()

    def _read_log(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)

    def stop(self) -> int:
        """A graceful stop (SIGTERM); its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(T(20))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def two_servers(redis_server) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    r.close()
    servers: list[ServerProcess] = []
    try:
        servers.append(ServerProcess(redis_server.url))
        servers.append(ServerProcess(redis_server.url))
        yield servers[0], servers[1]
    finally:
        statuses = [s.stop() for s in servers]
    assert statuses == [0] * len(servers), [("".join(s.log)) for s in servers]


def test_two_server_processes_share_callees_and_pubsub(two_servers, redis_server):
    a, b = two_servers
    broker = RedisBroker.from_url(redis_server.url)
    # Two callee pools of one worker each; the function waits until two calls run at once, so
    # two calls issued together must be taken one by each pool.
    barrier = threading.Barrier(2, timeout=T(10))

    def who(name: str):
        def run(args):
            barrier.wait()
            return [name, args]

        return run

    pools = []
    for name in ("pool-1", "pool-2"):
        callee = Callee(broker, workers=1, block=0.05, name=f"juggler-callee-{name}")
        callee.register("mesh.who", who(name))
        callee.register("test.echo", lambda args: args)
        pools.append(callee)
    clients: list[Client] = []
    try:
        for callee in pools:
            callee.start()
        on_a = Client.connect(a.url, connect_timeout=T(10))
        on_b = Client.connect(b.url, connect_timeout=T(10))
        clients += [on_a, on_b]

        # a client on A calls a callee and gets its result; so does one on B
        assert on_a.call("test.echo", "via a", timeout=T(10)) == "via a"
        assert on_b.call("test.echo", "via b", timeout=T(10)) == "via b"

        # both pools serve calls from both servers
        served: dict[str, set[str]] = {"pool-1": set(), "pool-2": set()}
        for label, client in (("a", on_a), ("b", on_b)):
            futures = [client.call_async("mesh.who", label, timeout=T(15)) for _ in range(2)]
            for f in futures:
                pool, got = f.result(T(15))
                assert got == label
                served[pool].add(label)
        assert served == {"pool-1": {"a", "b"}, "pool-2": {"a", "b"}}

        # a PUB through A reaches subscribers on B (a channel and a pattern), and back
        plain = on_b.sub("mesh.news")
        pat = on_b.sub("mesh.*", pattern=True)
        on_a.pub("mesh.news", {"from": "a"})
        assert plain.get(T(10)).args == {"from": "a"}
        ev = pat.get(T(10))
        assert (ev.channel, ev.pattern, ev.args) == ("mesh.news", "mesh.*", {"from": "a"})
        back = on_a.sub("mesh.back")
        on_b.pub("mesh.back", 1)
        assert back.get(T(10)).args == 1
    finally:
        for c in clients:
            c.close()
        for callee in pools:
            callee.stop()
        broker.close()


def test_many_clients_spread_over_two_servers(two_servers, redis_server):
    """Calls from 10 clients spread over both servers all come back to the right client,
    whichever server stored them and whichever callee ran them (no sticky sessions)."""
    a, b = two_servers
    broker = RedisBroker.from_url(redis_server.url)
    callee = Callee(broker, workers=4, block=0.05)
    callee.register("test.echo", lambda args: args)
    clients: list[Client] = []
    try:
        callee.start()
        clients = [Client.connect((a, b)[i % 2].url, connect_timeout=T(10)) for i in range(10)]
        futures = {(i, j): c.call_async("test.echo", [i, j], timeout=T(20)) for i, c in enumerate(clients) for j in range(30)}
        for (i, j), f in futures.items():
            assert f.result(T(20)) == [i, j]
    finally:
        for c in clients:
            c.close()
        callee.stop()
        broker.close()
