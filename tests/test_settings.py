"""One source of the server's settings: ServerSettings, read by Server, its connections and the
command line."""

from __future__ import annotations

import dataclasses

import fakeredis
import pytest

from juggler import RedisBroker, Server
from juggler.config import COMMANDS, SETTINGS
from juggler.conn import ConnSettings
from juggler.settings import ServerSettings


@pytest.fixture
def broker():
    return RedisBroker(fakeredis.FakeRedis(server=fakeredis.FakeServer()))


def test_every_server_setting_is_a_flag_a_variable_and_a_key_with_the_same_default():
    for f in dataclasses.fields(ServerSettings):
        if not f.metadata["cli"]:
            assert f.name not in SETTINGS
            continue
        s = SETTINGS[f.name]
        assert f.name in COMMANDS["server"] and s.group, f.name
        assert s.parse is f.metadata["parse"]
        assert s.default == (9000 if f.name == "port" else f.default), f.name  # the command's port: 9000


def test_server_takes_each_setting_as_a_keyword_and_its_connections_read_the_same(broker):
    server = Server(broker, read_limit=4096, write_timeout=3, max_connections=5)
    try:
        assert isinstance(server.settings, ConnSettings)  # what its connections get
        assert server.settings.read_limit == server.read_limit == 4096
        assert server.settings.write_timeout == 3.0 and isinstance(server.write_timeout, float)
        assert server._services.settings is server.settings
        assert server.write_limit == ServerSettings().write_limit  # the default, written once
        again = Server(broker, settings=server.settings, read_limit=100)
        try:
            assert again.settings.read_limit == 100 and again.settings.max_connections == 5
        finally:
            again.shutdown()
    finally:
        server.shutdown()


@pytest.mark.parametrize("kwargs, message", [
    ({"read_limit": 0}, "bad read_limit: 0 is out of range (at least 1)"),
    ({"close_timeout": 0}, "bad close_timeout: 0 must be more than zero"),
    ({"ping_interval": -1}, "bad ping_interval: -1 is not a duration"),
    ({"max_subscriptions": -1}, "bad max_subscriptions: -1 is out of range (at least 0)"),
    ({"path": "ws"}, "bad path: 'ws' must start with '/'"),
    ({"metrics_listen": "nowhere"}, "bad metrics_listen: 'nowhere' is not HOST:PORT"),
    ({"certfile": "cert.pem"}, "certfile and keyfile go together"),
])  # fmt: skip
def test_a_bad_setting_is_a_value_error_naming_it(broker, kwargs, message):
    with pytest.raises(ValueError) as info:
        Server(broker, **kwargs)
    assert str(info.value).startswith(message)


def test_an_unknown_keyword_is_a_type_error_naming_it(broker):
    with pytest.raises(TypeError, match="read_limt"):
        Server(broker, read_limt=10)
