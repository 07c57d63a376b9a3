"""What a connection's results thread sends is kept until it is about to wait for redis, then
written in one socket write (Conn._flush_batch): the same bytes as one write per message, in
the same order, an ACK never held until its RES, and a client that does not read still closed."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import redis
import websocket

from juggler import Callee, RedisBroker, Server
from juggler.broker import result_timeout_key
from juggler.conn import Conn
from juggler.frames import OP_TEXT, encode_frame
from juggler.handshake import HandshakeRequest
from juggler.message import CLIENT_TYPES, Ack, Call, CallPayload, MessageType, Nack, Res, ResultPayload, encode, new_uuid
from juggler.transport import SocketIO, SocketReader

from .conftest import T
from .test_broker import _following, _pop_in_turn

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def unit():
    """A Conn of a server that never serves, on a socket pair: ``(conn, peer socket, sends)``,
    ``sends`` recording each socket write the connection makes."""
    server = Server(RedisBroker(redis.Redis(port=1)), port=0)
    a, b = socket.socketpair()
    b.settimeout(T(5))
    io = SocketIO(a, write_timeout=1.0)
    conn = Conn(server._conn_services(), io, ("test", 0), HandshakeRequest("GET", "/ws", "HTTP/1.1", {}),
                CLIENT_TYPES, SocketReader(io))  # fmt: skip
    sends: list[bytes] = []
    sendall = io.sendall_claimed
    io.sendall_claimed = lambda data: (sends.append(bytes(data)), sendall(data))[1]  # type: ignore[method-assign]
    try:
        yield conn, b, sends
    finally:
        a.close()
        b.close()


def _call(uri: str = "test.echo") -> Call:
    return Call(uuid=new_uuid(), uri=uri, timeout=5.0, args=None)


def _ack_and_res(args=1) -> tuple[Ack, Res]:
    call = _call()
    return Ack.to(call), Res(for_uuid=call.uuid, uri=call.uri, args=args)


def _frame(msg) -> bytes:
    return encode_frame(OP_TEXT, encode(msg).encode("utf-8"))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the connection closed"
        data += chunk
    return data


def _batching(conn: Conn) -> None:
    """Make the calling thread the connection's results thread, as _results_loop does."""
    conn._batch = []
    conn._batcher = threading.get_ident()


def _kept_ack_and_res(conn: Conn) -> tuple[Ack, Res]:
    """As the results thread: a call's ACK and RES sent, and kept."""
    _batching(conn)
    ack, res = _ack_and_res()
    conn.write(ack)
    conn.write(res)
    return ack, res


@pytest.mark.parametrize("args", [None, "hello", {"k": [1, 2.5, "é\u2028"]}, "x" * 70000])
def test_an_ack_and_a_res_kept_go_out_in_one_write_the_same_bytes(unit, args):
    conn, peer, sends = unit
    _batching(conn)
    ack, res = _ack_and_res(args)
    assert conn.write(ack) and conn.write(res)
    assert sends == []  # kept until the thread waits
    conn._flush_batch()
    expected = _frame(ack) + _frame(res)
    assert sends == [expected]  # one write, the frames one after the other
    assert _recv_exactly(peer, len(expected)) == expected
    assert conn._batch == []
    stats = conn._svc.incr.__self__.snapshot()  # (the server's counters: each message counted once)
    assert stats.get("write_ACK") == 1 and stats.get("write_RES") == 1


def test_a_message_kept_alone_is_written_as_any_other(unit):
    conn, peer, sends = unit
    _batching(conn)
    nack = Nack.to(_call(), 500, "redis unavailable")
    conn.write(nack)
    conn._flush_batch()
    conn._flush_batch()  # (nothing kept: nothing written)
    assert sends == [_frame(nack)]
    assert _recv_exactly(peer, len(sends[0])) == _frame(nack)


def test_what_is_kept_queues_in_order_behind_a_busy_socket(unit):
    conn, _, sends = unit
    ack, res = _kept_ack_and_res(conn)
    assert conn._queue.claim()  # another thread writes
    conn._flush_batch()
    assert sends == [] and list(conn._queue._items) == [ack, res]


def test_other_threads_are_not_kept_waiting(unit):
    conn, _, sends = unit
    _batching(conn)
    conn.write(Ack.to(_call()))
    got = []
    other = threading.Thread(target=lambda: got.append(conn.write(Ack.to(_call()))), name="juggler-test-other")
    other.start()
    other.join(T(5))
    assert got == [True] and len(sends) == 1 and len(conn._batch) == 1


def test_a_handler_that_does_more_gets_what_was_kept_written_first(unit):
    conn, _, sends = unit
    _batching(conn)
    ack, res = _ack_and_res()
    conn.write(ack)
    conn._svc.handler.writes_as_sent = False  # (a handler that logs, say: it calls write itself)
    conn.write(res)
    assert sends == [_frame(ack), _frame(res)] and conn._batch == []


def test_ordered_writes_what_was_kept_first(unit):
    conn, _, sends = unit
    _batching(conn)
    ack, res = _ack_and_res()
    conn.write(ack)
    with conn.ordered():
        assert sends == [_frame(ack)]
        conn.write(res)
    assert sends == [_frame(ack), _frame(res)]


def test_nothing_is_kept_once_closing(unit):
    conn, _, sends = unit
    _batching(conn)
    conn.close()
    assert not conn.write(Ack.to(_call()))
    conn._flush_batch()
    assert conn._batch == [] and sends == []


def test_a_write_that_fails_closes_the_connection_and_keeps_nothing(unit):
    conn, peer, _ = unit
    _batching(conn)
    for msg in _ack_and_res():
        conn.write(msg)
    peer.close()
    conn._io.shutdown()  # (the peer is gone: the write fails)
    conn._flush_batch()
    assert conn.closed and conn.close_code == 1006 and conn._batch == []


# -- through a server, on real redis --


@pytest.fixture
def gated(real):
    """A server and a callee on real redis whose ``test.gate`` answers once ``gate`` is set."""
    broker = RedisBroker(real)
    server = Server(broker, write_queue_size=8, write_timeout=0.5).start()
    callee = Callee(broker, workers=4, block=0.05)
    gate = threading.Event()
    callee.register("test.gate", lambda args: args if gate.wait(T(10)) else None)
    callee.register("test.echo", lambda args: args)
    callee.start()
    try:
        yield server, gate
    finally:
        callee.stop()
        server.shutdown()


def _call_text(uuid: str, uri: str, args) -> str:
    return json.dumps({"meta": {"type": 1, "uuid": uuid}, "payload": {"uri": uri, "timeout": 10**10, "args": args}})


def test_an_ack_is_not_held_until_its_res(gated):
    server, gate = gated
    ws = websocket.create_connection(server.url, subprotocols=["juggler.0"], timeout=T(5))
    try:
        for i in range(4):  # the first stored by the reader, the others through the listener
            gate.clear()
            uuid = str(new_uuid())
            ws.send(_call_text(uuid, "test.gate", i))
            ack = json.loads(ws.recv())  # (the callee waits for the gate: only the ACK can come)
            assert ack["meta"]["type"] == MessageType.ACK and ack["payload"]["for"] == uuid
            gate.set()
            res = json.loads(ws.recv())
            assert res["meta"]["type"] == MessageType.RES and res["payload"] == {"for": uuid, "uri": "test.gate", "args": i}
        (conn,) = server.connections
        assert conn._batcher == conn._results_thread.ident and conn._ahead  # (it kept them)
    finally:
        ws.close()


def test_a_client_that_does_not_read_its_results_is_still_closed(gated):
    server, gate = gated
    gate.set()
    closed = []
    server.on_state = lambda conn, state: closed.append((state.name, conn.close_code)) if state.name == "CLOSED" else None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((server.host, server.port))
    ws = websocket.WebSocket()
    ws.sock_opt.timeout = T(10)
    ws.connect(server.url, socket=sock, subprotocols=["juggler.0"])
    try:
        big = "z" * 60000
        deadline = time.monotonic() + T(10)
        sent = 0
        while not closed and time.monotonic() < deadline:
            try:
                ws.send(_call_text(str(new_uuid()), "test.echo", big))
            except (OSError, websocket.WebSocketException):
                break
            sent += 1
            time.sleep(0.01)
        while not closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert closed and closed[0][1] in (1006, 1008), (closed, sent)  # queue full, or a write timed out
    finally:
        ws.shutdown()


def test_a_connection_writes_only_with_its_socket_claimed(gated, monkeypatch):
    # Conn writes without SocketIO's write lock (sendall_claimed, send_nowait_claimed): every
    # write must be made by the thread that holds the WriteQueue's claim on the socket.
    import inspect

    import juggler.conn as conn_module

    source = inspect.getsource(conn_module)
    assert source.count("self._io.send") == 2  # (only in _send and _send_nowait, checked below)
    unclaimed = []
    for name in ("_send", "_send_nowait"):
        original = getattr(Conn, name)

        def checked(self, data, original=original, name=name):
            if not self._queue._busy:
                unclaimed.append(name)
            return original(self, data)

        monkeypatch.setattr(Conn, name, checked)
    server, gate = gated
    gate.set()
    ws = websocket.create_connection(server.url, subprotocols=["juggler.0"], timeout=T(5))
    try:
        ws.send(json.dumps({"meta": {"type": 3, "uuid": str(new_uuid())}, "payload": {"channel": "c"}}))  # SUB
        assert json.loads(ws.recv())["meta"]["type"] == MessageType.ACK
        ws.send(json.dumps({"meta": {"type": 2, "uuid": str(new_uuid())}, "payload": {"channel": "c", "args": 1}}))
        got = {json.loads(ws.recv())["meta"]["type"] for _ in range(2)}  # the PUB's ACK and its EVNT
        assert got == {MessageType.ACK, MessageType.EVNT}
        ws.ping(b"p")  # (its pong)
        for i in range(20):
            ws.send(_call_text(str(new_uuid()), "test.echo", i))
        types = [json.loads(ws.recv())["meta"]["type"] for _ in range(40)]
        assert types.count(MessageType.ACK) == 20 and types.count(MessageType.RES) == 20
    finally:
        ws.close()  # (the close frame)
    deadline = time.monotonic() + T(5)
    while server.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert unclaimed == []


# -- the timeout key of a result handed over at once: taken with the next command --


def _taken(real, conn, payload) -> None:
    deadline = time.monotonic() + T(5)
    while real.exists(result_timeout_key(conn, payload.msg_uuid)):  # (run by redis)
        assert time.monotonic() < deadline, "a result's timeout key was not taken"
        time.sleep(0.01)


@pytest.fixture
def later(real):
    """``(broker, conn, listener, deadlines)``: a results listener that stores its calls ahead,
    with keys_taken_later, as a server's connection makes it."""
    broker = RedisBroker(real)
    conn, listener, deadlines = _following(broker)
    listener.keys_taken_later = True
    try:
        yield broker, conn, listener, deadlines
    finally:
        listener.close()
        broker.close()


def test_a_results_timeout_key_is_taken_with_the_connections_next_command(real, later):
    # With keys_taken_later (a server's connection that stores its calls ahead), the script
    # that takes the timeout key of a result handed over at once, with no BRPOP to follow it,
    # goes first in the next write on the listener's connection: a BRPOP's, or a call's store.
    broker, conn, listener, deadlines = later
    first, second = _pop_in_turn(listener, broker, deadlines, conn, 2)
    own = listener._own
    assert own.reply_skip is True  # (the first one's script asked: sent at once, with the probe)
    _taken(real, conn, first)
    assert real.exists(result_timeout_key(conn, second.msg_uuid))  # its script waits
    assert listener._later[0] is own and listener._later[1].endswith(result_timeout_key(conn, second.msg_uuid).encode() + b"\r\n")
    (third,) = _pop_in_turn(listener, broker, deadlines, conn, 1)  # sent with its BRPOP
    _taken(real, conn, second)
    assert listener._later[0] is own
    # the next call's store carries it
    call = CallPayload(conn, new_uuid(), "test.echo", 1)
    deadlines[call.msg_uuid] = time.monotonic() + 100
    stored: list = []
    assert listener.store_call_ahead(call, 5, stored.append)
    _taken(real, conn, third)
    assert listener._later == (None, b"")
    broker.store_result(ResultPayload(conn, call.msg_uuid, "test.echo", 2), 5)
    popped = listener.pop_result(conn, None)
    assert stored == [None] and popped.payload.msg_uuid == call.msg_uuid
    real.ping()
    assert own.alive() and listener._own is own, "replies out of step"


def test_a_script_left_for_a_connection_lost_is_not_sent_on_the_next(real, later):
    broker, conn, listener, deadlines = later
    _, left = _pop_in_turn(listener, broker, deadlines, conn, 2)
    old = listener._own
    assert listener._later[0] is old
    old.close()  # (lost: the listener takes a new connection)
    _pop_in_turn(listener, broker, deadlines, conn, 2)  # (the first probes it again)
    own = listener._own
    assert own is not old and listener._later[0] is own  # its own script left, not the old one's
    assert 0 < real.pttl(result_timeout_key(conn, left.msg_uuid)) <= 5000  # left to expire with its call
    real.ping()
    assert list(listener._expect) == [] and own.alive(), "replies out of step"


def test_what_is_kept_goes_out_before_the_thread_waits_for_the_ack_lock(unit):
    # the reader holds ack_lock while redis stores a call (up to STORE_WAIT): the results
    # thread, with a RES to send, writes what it kept first rather than after that wait
    from juggler.exceptions import BrokerError
    from juggler.rpc import Popped

    conn, peer, sends = unit
    _batching(conn)
    kept, (_, later_res) = _ack_and_res(), _ack_and_res()
    conn.write(kept[0])
    result = ResultPayload(conn.uuid, later_res.for_uuid, "test.echo", 1)
    conn._calls[result.msg_uuid] = time.monotonic() + 100
    held = threading.Event()
    seen_while_held: list = []

    class Broker:
        popped = [Popped(result, 100.0)]

        def pop_result(self, conn_uuid, block):
            if self.popped:
                return self.popped.pop()
            conn._results_stop = True
            raise BrokerError("redis unavailable: done")

    def reader() -> None:
        with conn.ack_lock:
            held.set()
            deadline = time.monotonic() + T(5)
            while not sends and time.monotonic() < deadline:
                time.sleep(0.005)
            seen_while_held.extend(sends)

    t = threading.Thread(target=reader, name="juggler-test-reader")
    t.start()
    assert held.wait(T(5))
    conn._listen(Broker())
    t.join(T(5))
    assert seen_while_held == [_frame(kept[0])]  # written while the lock was held
    assert len(sends) == 1 and conn._batch[0].for_uuid == later_res.for_uuid  # the RES, kept in turn


def test_an_encoder_that_raises_on_what_was_kept_closes_the_connection(unit):
    # a Server.encode that raises (not TypeError/ValueError: a bug) while the results thread
    # writes what it kept: the connection is closed with 1011, as when send() writes it; the
    # results thread goes on (nothing escapes), rather than dying with the connection open
    import dataclasses

    conn, peer, sends = unit
    _batching(conn)
    ack, _ = _ack_and_res()
    conn.write(ack)  # kept

    def encode(c, msg):
        raise RuntimeError("encoder bug")

    conn._svc = dataclasses.replace(conn._svc, encode=encode, reply_limit=None)
    conn._flush_batch()
    assert conn.closed and conn.close_code == 1011
    assert sends == [] and conn._batch == []


def test_what_was_kept_goes_out_before_the_results_thread_closes_the_connection(unit):
    # (a listener that fails closes the connection from the results thread: an ACK it kept
    # is written before the close frame, as it was before anything was kept)
    conn, peer, sends = unit
    _batching(conn)
    ack, _ = _ack_and_res()
    conn.write(ack)
    assert sends == []
    conn.close(1011, "results listener failed: internal error")
    assert sends == [_frame(ack)]
    assert _recv_exactly(peer, len(sends[0])) == sends[0]


def test_a_results_timeout_key_left_is_taken_as_its_listener_closes(real, later):
    # the script left for the next command goes out as the listener's connection closes (a
    # connection ending after its last call), not left in redis until its call's deadline
    broker, conn, listener, deadlines = later
    _, second = _pop_in_turn(listener, broker, deadlines, conn, 2)
    assert listener._later[1].endswith(result_timeout_key(conn, second.msg_uuid).encode() + b"\r\n")
    assert real.exists(result_timeout_key(conn, second.msg_uuid))
    listener.close()
    _taken(real, conn, second)
    assert listener._later == (None, b"")


def test_an_encoder_that_raises_on_the_second_of_two_kept_leaves_nothing_for_the_writer(unit):
    # two kept messages are gathered in the batch the writer uses too (the claim makes the
    # results thread its only user then): one that cannot be encoded leaves none of it behind
    import dataclasses

    conn, peer, sends = unit
    ack, res = _kept_ack_and_res(conn)
    encode = conn._svc.encode

    def encode_all_but_res(c, msg):
        if msg is res:
            raise RuntimeError("encoder bug")
        return encode(c, msg)

    conn._svc = dataclasses.replace(conn._svc, encode=encode_all_but_res, reply_limit=None)
    conn._flush_batch()
    assert conn.closed and conn.close_code == 1011
    assert sends == [] and conn._out == [] and conn._out_msgs == []
