"""The `juggler` command on a Redis Cluster: the same --redis flag, any node's URL."""

from __future__ import annotations

from juggler import Client

from .conftest import T
from .test_cli import Proc


def test_server_and_callee_commands_on_a_cluster(redis_cluster):
    server = Proc("server", "--redis", redis_cluster.url, "--port", "0")
    callee = Proc("callee", "--redis", redis_cluster.url, "--demo", "--workers", "2")
    try:
        url = server.expect(r"websocket: (ws://\S+)").group(1)
        callee.expect(r"callee: serving")
        with Client.connect(url, connect_timeout=T(10)) as c:
            assert c.call("test.echo", "hi", timeout=T(10)) == "hi"
            assert c.call("test.reverse", "cluster", timeout=T(10)) == "retsulc"
            sub = c.sub("cli.*", pattern=True)
            c.pub("cli.x", 1)
            assert sub.get(T(10)).args == 1
    finally:
        assert callee.stop() == 0
        assert server.stop() == 0
