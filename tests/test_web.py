"""What a server answers browsers over plain HTTP, and the handshake's query parameters."""

from __future__ import annotations

import json
import uuid

import fakeredis
import pytest
import websocket

from juggler import Client, HandshakeError, RedisBroker, Server

from .conftest import T


@pytest.fixture
def make_server():
    servers: list[Server] = []

    def make(**kw) -> Server:
        broker = RedisBroker(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
        s = Server(broker, **kw).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.shutdown()


def handshake(server: Server, query: str = "", **kw) -> websocket.WebSocket:
    return websocket.create_connection(server.url + query, subprotocols=["juggler.0"], timeout=T(10), **kw)


def test_allowed_messages_query_parameter_is_enforced(make_server):
    server = make_server()
    ws = handshake(server, "?juggler-allowed-messages=call,sub")
    try:
        ws.send(json.dumps({"meta": {"type": 2, "uuid": str(uuid.uuid4())}, "payload": {"channel": "c", "args": 1}}))
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert int.from_bytes(data[:2], "big") == 1008
        assert data[2:].decode() == "PUB is not allowed on this connection"
    finally:
        ws.close()
    # with the header too, the connection may send what both allow
    ws = handshake(server, "?juggler-allowed-messages=call,pub", header=["Juggler-Allowed-Messages: pub,sub"])
    try:
        ws.send(json.dumps({"meta": {"type": 2, "uuid": str(uuid.uuid4())}, "payload": {"channel": "c", "args": 1}}))
        assert json.loads(ws.recv())["meta"]["type"] == 8  # PUB: ACK
        ws.send(json.dumps({"meta": {"type": 3, "uuid": str(uuid.uuid4())}, "payload": {"channel": "c"}}))
        opcode, data = ws.recv_data(control_frame=True)
        assert (opcode, data[2:].decode()) == (websocket.ABNF.OPCODE_CLOSE, "SUB is not allowed on this connection")
    finally:
        ws.close()
    with pytest.raises(HandshakeError) as info:
        Client.connect(server.url + "?juggler-allowed-messages=call,jump", connect_timeout=T(10))
    assert info.value.status == 400 and "jump" in str(info.value)
