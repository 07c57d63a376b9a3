"""The server's incoming CALL path, made lean, makes the same messages and bytes as before.

A CALL's payload stored in redis is read by Go callees, and the store command goes to redis as
it did: both are compared byte for byte with the builders they replaced (kept here, as they
were), over many random CALLs (uuids, uris, args of every JSON kind, unicode, escapes,
floats, nesting). The decoder's shortcut for a usual CALL (``message._plain_call``) is
compared with the full decoder on the same texts, well-formed and not.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
import redis

from juggler import message, resp
from juggler.broker import RedisBroker
from juggler.exceptions import ProtocolError
from juggler.layout import STORE, call_timeout_key, calls_key, ms, results_key
from juggler.message import CLIENT_TYPES, CallPayload, MessageType, ResultPayload, decode, new_uuid

pytestmark = pytest.mark.timeout(120)

# -- the builders as they were -------------------------------------------------------------------

_old_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def old_payload_json(p: CallPayload | ResultPayload) -> str:
    d: dict[str, Any] = {"conn_uuid": p.conn_uuid, "msg_uuid": p.msg_uuid, "uri": p.uri}
    if p.args is not None:
        d["args"] = p.args
    return _old_dumps(d)


def old_store_ahead_bytes(p: CallPayload, timeout: float, cap: int) -> bytes:
    data = old_payload_json(p).encode("utf-8")
    store = ("EVAL", STORE.source, 2, call_timeout_key(p.uri, p.msg_uuid), calls_key(p.uri), ms(timeout), data, cap)
    return b"".join(resp.pack(c) for c in [store, ("BRPOP", results_key(p.conn_uuid), 0)])


def py_pack(args: Any) -> bytes:
    """resp.pack's loop, for what hiredis' pack_command would pack."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a.encode("utf-8") if isinstance(a, str) else str(a).encode("ascii") if isinstance(a, int) else a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


# -- random CALLs ---------------------------------------------------------------------------------

_CHARS = ['"', "\\", "/", "\n", "\r", "\t", "\b", "\f", "\x00", "\x1f", "\x7f", "é", "ß", "\u2028", "\u2029",
          "\ufeff", "中", "😀", "\U0010ffff", "{", "}", ":", ",", " ", "a", "Z", "0"]  # fmt: skip


def rand_str(rng: random.Random, most: int = 12) -> str:
    return "".join(rng.choice(_CHARS) if rng.random() < 0.5 else chr(rng.randrange(0x20, 0x7F))
                   for _ in range(rng.randrange(most + 1)))  # fmt: skip


def rand_float(rng: random.Random) -> float:
    return rng.choice([0.0, -0.0, 0.1, 1.5, 1e16, 1e-7, 1.7976931348623157e308, 5e-324, 123456789.125, -2.5e-300,
                       rng.random(), rng.uniform(-1e9, 1e9), rng.random() * 10 ** rng.randrange(-20, 20)])  # fmt: skip


def rand_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "float", "bool", "null"] + (["list", "dict"] * 2 if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return rand_str(rng)
    if kind == "int":
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64 + 7, rng.randrange(-(10**30), 10**30)])
    if kind == "float":
        return rand_float(rng)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rand_str(rng, 6): rand_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def rand_call(rng: random.Random) -> CallPayload:
    uri = rng.choice(["test.echo", "a", "", rand_str(rng, 20)])
    return CallPayload(new_uuid(), new_uuid(), uri, rand_value(rng))


def test_stored_payload_bytes_are_as_before():
    rng = random.Random(23)
    for _ in range(5000):
        p = rand_call(rng)
        assert p.to_json().encode("utf-8") == old_payload_json(p).encode("utf-8")
        r = ResultPayload(p.conn_uuid, p.msg_uuid, p.uri, p.args)
        assert r.to_json() == old_payload_json(r)
        assert CallPayload.from_json(p.to_json()) == p or p.args != p.args  # (json round trip)
    for odd in (CallPayload(5, new_uuid(), "u", None), CallPayload(new_uuid(), None, ["u"], {"a": 1})):  # type: ignore[arg-type]
        assert odd.to_json() == old_payload_json(odd)  # (fields that are not strings: encoded as before)


def test_payloads_that_cannot_be_encoded_fail_as_before():
    circular: list[Any] = []
    circular.append(circular)
    deep: Any = []
    for _ in range(100000):
        deep = [deep]
    for args in (float("nan"), float("inf"), {"x": object()}, circular, deep, {1: 2, (1, 2): 3}, "\ud800"):
        p = CallPayload(new_uuid(), new_uuid(), "u", args)
        try:
            expected: Any = old_payload_json(p).encode("utf-8")
        except Exception as exc:
            expected = type(exc)
        try:
            got: Any = p.to_json().encode("utf-8")
        except Exception as exc:
            got = type(exc)
        assert got == expected, args if not isinstance(args, list) else "a list"


def test_store_ahead_command_bytes_are_as_before():
    rng = random.Random(24)
    broker = RedisBroker(redis.Redis(port=1))  # (never connects)
    conn_uuid = new_uuid()
    for i in range(5000):
        p = rand_call(rng)
        if i % 100 == 0:  # a broker serves one connection; its cap is set once: changes are seen all the same
            conn_uuid = new_uuid()
            broker.call_cap = rng.choice([0, 1, 1000, 10**6])
        p = CallPayload(conn_uuid, p.msg_uuid, p.uri, p.args)
        timeout = rng.choice([0.0005, 0.001, 1.0, 5.0, 60.0, 3600.5, rng.uniform(0, 100)])
        expected = old_store_ahead_bytes(p, timeout, broker.call_cap)
        assert broker._store_ahead_command(p, timeout) == expected
        store = ("EVAL", STORE.source, 2, call_timeout_key(p.uri, p.msg_uuid), calls_key(p.uri), ms(timeout),
                 old_payload_json(p).encode("utf-8"), broker.call_cap)  # fmt: skip
        assert expected == py_pack(store) + py_pack(("BRPOP", results_key(p.conn_uuid), 0))


class _Own(resp.RespConnection):
    def __init__(self) -> None:  # (no socket)
        self.broken = False
        self.sent: list[bytes] = []

    def _send(self, data: bytes) -> None:
        self.sent.append(data)


def test_store_call_ahead_sends_the_bytes_of_before():
    rng = random.Random(25)
    broker = RedisBroker(redis.Redis(port=1)).dedicated("k")
    broker._own = own = _Own()
    assert broker.follow_calls({})
    conn_uuid = new_uuid()
    for _ in range(500):
        p = rand_call(rng)
        p = CallPayload(conn_uuid, p.msg_uuid, p.uri, p.args)
        assert broker.store_call_ahead(p, 5.0, lambda error: None)
        assert own.sent[-1] == old_store_ahead_bytes(p, 5.0, broker.call_cap)
        broker._brpop_sent = False  # (as if its result came)
        broker._expect.clear()


def test_consume_ahead_sends_the_bytes_of_before():
    # the script taking a result's timeout key, packed from a head made once: the bytes that
    # packing its commands made, in each case (sure or not of the call's time left, redis
    # leaving its reply out or not, or asked whether it can; a BRPOP after it or not)
    from juggler.layout import CONSUME, result_timeout_key
    from juggler.rpc import _PROBE, _REPLY_SKIP

    class Replying(_Own):
        def read_reply(self, wait=False, before_wait=None):
            return 5000  # (the script's PTTL, when the listener waits for it)

    rng = random.Random(26)
    broker = RedisBroker(redis.Redis(port=1)).dedicated("k")
    deadlines: dict = {}
    assert broker.follow_calls(deadlines)
    own = Replying()
    for i in range(400):
        conn_uuid = new_uuid() if i % 2 else rng.choice(["c", "é{x}", "x" * 300])
        msg_uuid = new_uuid() if i % 3 else rng.choice(["m", "ü\u2028", "y" * 200])
        p = ResultPayload(conn_uuid, msg_uuid, "test.echo", i)
        sure, again, skip = rng.random() < 0.7, rng.random() < 0.5, rng.choice([True, False, None])
        own.reply_skip = skip
        broker._no_reply_skip.found = rng.random() < 0.3
        deadlines.clear()
        deadlines[msg_uuid] = time.monotonic() + (100 if sure else 0.01)
        if again:
            deadlines["other"] = time.monotonic() + 100
        consume = ("EVAL", CONSUME.source, 1, result_timeout_key(conn_uuid, msg_uuid))
        if not sure:
            commands = [consume]
        elif skip:
            commands = [_REPLY_SKIP, consume]
        elif skip is None and not broker._no_reply_skip.found:
            commands = [*_PROBE, consume]
        else:
            commands = [consume]
        if again:
            commands.append(("BRPOP", results_key(conn_uuid), 0))
        broker._consume_ahead(own, results_key(conn_uuid), p)
        assert own.sent[-1] == b"".join(py_pack(c) for c in commands), (sure, again, skip)
        broker._expect.clear()


# -- the decoder's shortcut -----------------------------------------------------------------------


def full_decode(text: bytes, types: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as m:
        m.setattr(message, "_plain_call", lambda obj, types: None)
        return outcome(text, types)


def outcome(text: bytes, types: Any) -> Any:
    try:
        msg = decode(text, types)
    except ProtocolError as exc:
        return ("error", exc.close_code, exc.reason)
    return (type(msg), msg, msg.__dict__)


def rand_call_text(rng: random.Random) -> bytes:
    """A CALL as a client sends it, or one field of it not as a CALL needs."""
    meta: dict[str, Any] = {"type": 1, "uuid": new_uuid()}
    payload: Any = {"uri": rand_str(rng, 10), "timeout": rng.randrange(0, 10**11), "args": rand_value(rng)}
    odd = rng.randrange(14)
    if odd == 1:
        meta["type"] = rng.choice([1.0, True, "1", None, 2, 9, 0])
    elif odd == 2:
        meta["uuid"] = rng.choice([new_uuid().upper(), new_uuid()[:-1], 5, None, new_uuid() + "\n"])
    elif odd == 3:
        payload = rng.choice([None, [], "x", 1])
    elif odd == 4:
        payload["uri"] = rng.choice([None, 5, True, ["a"], {"a": 1}])
    elif odd == 5:
        payload["timeout"] = rng.choice([None, -1, -(2**63), 2**63 - 1, 2**63, 1.5, 1e9, True, False, "5"])
    elif odd == 6:
        del payload[rng.choice(["uri", "timeout", "args"])]
    elif odd == 7:
        payload["extra"] = rand_value(rng)
        meta["extra"] = 1
    obj: Any = {"meta": meta, "payload": payload}
    if odd == 8:
        del obj[rng.choice(["meta", "payload"])]
    elif odd == 9:
        obj = rng.choice([[obj], "x", None, 5])
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, separators=rng.choice([(",", ":"), (", ", ": ")]))
    if odd == 10:
        text = rng.choice([" ", "\n", "\ufeff"]) + text + rng.choice(["", " ", "\r\n"])
    elif odd == 11:
        text = text + rng.choice(["x", "{}", "]", ","])
    elif odd == 12:
        text = text.replace('"args"', '"args": NaN, "a"', 1)
    return text.encode("utf-8")


def test_decode_shortcut_makes_what_the_full_decoder_makes(monkeypatch):
    rng = random.Random(26)
    types_choices = [CLIENT_TYPES, None, frozenset({MessageType.PUB}), frozenset(MessageType)]
    for _ in range(4000):
        text = rand_call_text(rng)
        types = rng.choice(types_choices)
        assert outcome(text, types) == full_decode(text, types, monkeypatch), text


def test_decode_shortcut_is_taken_for_a_usual_call(monkeypatch):
    taken = []
    real = message._plain_call
    monkeypatch.setattr(message, "_plain_call", lambda obj, types: taken.append(1) or real(obj, types))
    text = b'{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"a.b","timeout":1000000000,"args":[1]}}' % new_uuid().encode()
    msg = decode(text, CLIENT_TYPES)
    assert taken and msg.type is MessageType.CALL and msg.timeout == 1.0 and msg.args == [1]


# -- the peer's shortcut for one whole text frame -------------------------------------------------


def rand_frame(rng: random.Random) -> bytes:
    from juggler.frames import encode_frame

    size = rng.choice([0, 1, 5, 125, 126, 127, 200, 65535, 65536, rng.randrange(1, 3000)])
    payload = bytes(rng.randrange(256) for _ in range(min(size, 300))) * (size // 300 + 1)
    payload = payload[:size]
    opcode = rng.choice([1, 1, 1, 2, 0, 9, 10, 8, 3])
    mask = bytes(rng.randrange(256) for _ in range(4)) if rng.random() < 0.9 else None
    frame = bytearray(encode_frame(opcode, payload, mask))
    if rng.random() < 0.2:
        frame[0] ^= rng.choice([0x80, 0x40, 0x10])  # not final, or a reserved bit
    cut = rng.random()
    if cut < 0.15:
        frame = frame[: rng.randrange(len(frame) + 1)]
    elif cut < 0.3:
        frame += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 10)))
    return bytes(frame)


def test_peer_shortcut_gives_the_events_of_the_full_parse(monkeypatch):
    from juggler.peer import Peer

    rng = random.Random(27)
    for _ in range(3000):
        data = rand_frame(rng)
        kwargs = dict(limit=rng.choice([1 << 20, 126, 65535, 200]), read_after_close=rng.random() < 0.5)
        closing = rng.random() < 0.2
        got = []
        for shortcut in (True, False):
            peer = Peer(**kwargs)
            peer.closing = closing
            with monkeypatch.context() as m:
                if not shortcut:
                    m.setattr(Peer, "_one_text_frame", lambda self, data: None)
                events = list(peer.receive_data(data)) + list(peer.receive_data(b"\x81\x80abcd"))
            got.append([(k, v if not isinstance(v, Exception) else (type(v), str(v), v.close_code)) for k, v in events])
        assert got[0] == got[1], data[:20]
