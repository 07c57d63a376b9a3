"""Unit tests of juggler.message: the juggler.0 wire format (see docs / shared protocol notes).

Every encoded message is parsed back with :func:`json.loads` and compared as a dict, so the
tests pin the JSON shape (which fields, which types, which are omitted when empty) and not the
key order or spacing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import uuid

import pytest

from juggler.exceptions import ProtocolError
from juggler.message import (
    CLIENT_TYPES,
    DEFAULT_CALL_TIMEOUT,
    SERVER_TYPES,
    Ack,
    Call,
    CallPayload,
    EventPayload,
    Evnt,
    MessageType,
    Nack,
    Pub,
    Res,
    ResultPayload,
    Sub,
    Unsb,
    decode,
    effective_timeout,
    encode,
    error_result,
    new_uuid,
    result_error_message,
)

# Full 36-character versions of the uuids of the protocol examples.
U_CALL = "797b5a8e-1b6d-4a4e-9a3b-0a6f1f0f7c11"
U_ACK = "f537c0de-2f1e-4b7c-8d2a-5e6f7a8b9c0d"
U_RES = "f1cd2e3f-4a5b-4c6d-8e7f-901a2b3c4d5e"
U_CALL2 = "82d9a1b2-c3d4-4e5f-a6b7-c8d9e0f1a2b3"
U_NACK = "d28e3f40-5162-4738-89ab-cdef01234567"
U_SUB = "8f77aa01-bb02-4c03-9d04-ee05ff060708"
U_SUBACK = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
U_PUB = "a5251234-5678-4abc-9def-0123456789ab"
U_EVNT = "b133fedc-ba98-4765-a432-10fedcba9876"

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007


def wire(msg) -> dict:
    """The encoded message, parsed back into a dict."""
    text = encode(msg)
    assert isinstance(text, str)
    return json.loads(text)


def line(mtype, payload, muuid: str = U_CALL) -> str:
    """A message line built from Python values (payload may be any JSON value or raw text)."""
    if isinstance(payload, str):
        return '{"meta":{"type":%s,"uuid":"%s"},"payload":%s}' % (mtype, muuid, payload)
    return json.dumps({"meta": {"type": mtype, "uuid": muuid}, "payload": payload})


def assert_protocol_error(data, close_code: int) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.close_code == close_code, str(info.value)
    assert str(info.value), "a protocol error carries a reason for the close frame"
    assert info.value.reason == str(info.value)
    return info.value


# --- message types ---------------------------------------------------------------------------


def test_message_type_values():
    assert {t.name: int(t) for t in MessageType} == {
        "CALL": 1,
        "PUB": 2,
        "SUB": 3,
        "UNSB": 4,
        "NACK": 7,
        "ACK": 8,
        "RES": 9,
        "EVNT": 10,
    }
    assert CLIENT_TYPES == {MessageType.CALL, MessageType.PUB, MessageType.SUB, MessageType.UNSB}
    assert SERVER_TYPES == {MessageType.NACK, MessageType.ACK, MessageType.RES, MessageType.EVNT}


@pytest.mark.parametrize(
    "cls, mtype",
    [
        (Call, MessageType.CALL),
        (Pub, MessageType.PUB),
        (Sub, MessageType.SUB),
        (Unsb, MessageType.UNSB),
        (Ack, MessageType.ACK),
        (Nack, MessageType.NACK),
        (Res, MessageType.RES),
        (Evnt, MessageType.EVNT),
    ],
)
def test_class_type_is_not_a_field(cls, mtype):
    assert cls.type is mtype
    assert "type" not in {f.name for f in dataclasses.fields(cls)}


def test_new_uuid_is_lowercase_36_char_uuid4():
    seen = set()
    for _ in range(200):
        u = new_uuid()
        assert len(u) == 36
        assert u == u.lower()
        assert str(uuid.UUID(u)) == u
        assert uuid.UUID(u).version == 4
        seen.add(u)
    assert len(seen) == 200


def test_default_uuids_are_fresh_per_message():
    a, b = Call("x"), Call("x")
    assert a.uuid != b.uuid
    assert str(uuid.UUID(a.uuid)) == a.uuid


def test_messages_are_frozen():
    c = Call("x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.uri = "y"  # type: ignore[misc]


# --- encoding: exact JSON shapes ------------------------------------------------------------

ENCODE_CASES = [
    (
        Call("test.echo", "hello", 1.0, uuid=U_CALL),
        {"meta": {"type": 1, "uuid": U_CALL}, "payload": {"uri": "test.echo", "timeout": 1000000000, "args": "hello"}},
    ),
    (
        Call("a.b", uuid=U_CALL),
        {"meta": {"type": 1, "uuid": U_CALL}, "payload": {"uri": "a.b", "timeout": 0, "args": None}},
    ),
    (
        Call("a.b", {"k": [1, 2.5, None, True]}, 0.25, uuid=U_CALL),
        {
            "meta": {"type": 1, "uuid": U_CALL},
            "payload": {"uri": "a.b", "timeout": 250000000, "args": {"k": [1, 2.5, None, True]}},
        },
    ),
    (
        Pub("chan.a", {"x": 1}, uuid=U_PUB),
        {"meta": {"type": 2, "uuid": U_PUB}, "payload": {"channel": "chan.a", "args": {"x": 1}}},
    ),
    (
        Pub("chan.a", uuid=U_PUB),
        {"meta": {"type": 2, "uuid": U_PUB}, "payload": {"channel": "chan.a", "args": None}},
    ),
    (
        Sub("chan.*", True, uuid=U_SUB),
        {"meta": {"type": 3, "uuid": U_SUB}, "payload": {"channel": "chan.*", "pattern": True}},
    ),
    (
        Sub("chan.a", uuid=U_SUB),
        {"meta": {"type": 3, "uuid": U_SUB}, "payload": {"channel": "chan.a", "pattern": False}},
    ),
    (
        Unsb("chan.*", True, uuid=U_SUB),
        {"meta": {"type": 4, "uuid": U_SUB}, "payload": {"channel": "chan.*", "pattern": True}},
    ),
    (
        Unsb("chan.a", uuid=U_SUB),
        {"meta": {"type": 4, "uuid": U_SUB}, "payload": {"channel": "chan.a", "pattern": False}},
    ),
    (
        Ack(U_CALL, MessageType.CALL, uri="test.echo", uuid=U_ACK),
        {"meta": {"type": 8, "uuid": U_ACK}, "payload": {"for": U_CALL, "for_type": 1, "uri": "test.echo"}},
    ),
    (
        Ack(U_SUB, MessageType.SUB, channel="chan.*", uuid=U_ACK),
        {"meta": {"type": 8, "uuid": U_ACK}, "payload": {"for": U_SUB, "for_type": 3, "channel": "chan.*"}},
    ),
    (
        Ack(U_PUB, MessageType.PUB, uuid=U_ACK),
        {"meta": {"type": 8, "uuid": U_ACK}, "payload": {"for": U_PUB, "for_type": 2}},
    ),
    (
        Nack(U_CALL2, MessageType.CALL, 500, "list capacity exceeded", uri="x", uuid=U_NACK),
        {
            "meta": {"type": 7, "uuid": U_NACK},
            "payload": {"for": U_CALL2, "for_type": 1, "uri": "x", "code": 500, "message": "list capacity exceeded"},
        },
    ),
    (
        Nack(U_SUB, MessageType.UNSB, 400, "no", channel="c", uuid=U_NACK),
        {
            "meta": {"type": 7, "uuid": U_NACK},
            "payload": {"for": U_SUB, "for_type": 4, "channel": "c", "code": 400, "message": "no"},
        },
    ),
    (
        Nack(U_PUB, MessageType.PUB, 500, "", uuid=U_NACK),
        {"meta": {"type": 7, "uuid": U_NACK}, "payload": {"for": U_PUB, "for_type": 2, "code": 500, "message": ""}},
    ),
    (
        Res(U_CALL, "test.echo", "hello", uuid=U_RES),
        {"meta": {"type": 9, "uuid": U_RES}, "payload": {"for": U_CALL, "uri": "test.echo", "args": "hello"}},
    ),
    (
        Res(U_CALL, uuid=U_RES),
        {"meta": {"type": 9, "uuid": U_RES}, "payload": {"for": U_CALL, "args": None}},
    ),
    (
        Res(U_CALL, "u", {"error": {"message": "boom"}}, uuid=U_RES),
        {"meta": {"type": 9, "uuid": U_RES}, "payload": {"for": U_CALL, "uri": "u", "args": {"error": {"message": "boom"}}}},
    ),
    (
        Evnt(U_PUB, "chan.a", {"x": 1}, "chan.*", uuid=U_EVNT),
        {
            "meta": {"type": 10, "uuid": U_EVNT},
            "payload": {"for": U_PUB, "channel": "chan.a", "pattern": "chan.*", "args": {"x": 1}},
        },
    ),
    (
        Evnt(U_PUB, "chan.a", [1, 2], uuid=U_EVNT),
        {"meta": {"type": 10, "uuid": U_EVNT}, "payload": {"for": U_PUB, "channel": "chan.a", "args": [1, 2]}},
    ),
]


@pytest.mark.parametrize("msg, expected", ENCODE_CASES, ids=[f"{m.type.name}-{i}" for i, (m, _) in enumerate(ENCODE_CASES)])
def test_encode_shape(msg, expected):
    assert wire(msg) == expected


@pytest.mark.parametrize(
    "seconds, ns",
    [
        (0.0, 0),
        (1e-9, 1),
        (0.000999999, 999999),
        (0.001, 1000000),
        (0.25, 250000000),
        (1.0, 1000000000),
        (1.5, 1500000000),
        (2.5, 2500000000),
        (60.0, 60000000000),
        (123.456789, 123456789000),
        (3600, 3600000000000),
        (86400 * 365, 86400 * 365 * 10**9),
    ],
)
def test_call_timeout_seconds_to_nanoseconds(seconds, ns):
    text = encode(Call("u", timeout=seconds, uuid=U_CALL))
    timeout = json.loads(text)["payload"]["timeout"]
    assert type(timeout) is int
    assert timeout == ns
    # an integer on the wire: no fraction, no exponent (Go refuses those for a Duration)
    assert f'"timeout":{ns},' in text.replace(" ", "")
    # and back: integer nanoseconds to float seconds
    assert decode(line(1, {"uri": "u", "timeout": ns})).timeout == ns / 1e9


def test_encode_is_utf8_json_with_non_ascii():
    msg = Pub("canal.é", {"texte": "héllo wörld ✓ 😀", "€": "\u2028"}, uuid=U_PUB)
    text = encode(msg)
    raw = text.encode("utf-8")
    assert json.loads(raw.decode("utf-8"))["payload"] == {"channel": "canal.é", "args": {"texte": "héllo wörld ✓ 😀", "€": "\u2028"}}
    assert decode(raw) == msg


@pytest.mark.parametrize("bad_args", [object(), {1, 2}, b"bytes", float("nan"), float("inf"), -float("inf"), {"x": [float("nan")]}])
@pytest.mark.parametrize("make", [lambda a: Call("u", a), lambda a: Pub("c", a), lambda a: Res(U_CALL, "u", a), lambda a: Evnt(U_PUB, "c", a)])
def test_encode_refuses_what_json_cannot_carry(make, bad_args):
    with pytest.raises((TypeError, ValueError)):
        encode(make(bad_args))


# --- Ack.to / Nack.to -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_msg, target",
    [
        (Call("test.echo", uuid=U_CALL), {"uri": "test.echo", "channel": ""}),
        (Pub("chan.a", uuid=U_PUB), {"uri": "", "channel": "chan.a"}),
        (Sub("chan.*", True, uuid=U_SUB), {"uri": "", "channel": "chan.*"}),
        (Unsb("chan.b", uuid=U_SUB), {"uri": "", "channel": "chan.b"}),
    ],
)
def test_ack_and_nack_to_request(request_msg, target):
    ack = Ack.to(request_msg)
    assert (ack.for_uuid, ack.for_type, ack.uri, ack.channel) == (request_msg.uuid, request_msg.type, target["uri"], target["channel"])
    assert ack.uuid != request_msg.uuid
    nack = Nack.to(request_msg, 500, "list capacity exceeded")
    assert (nack.for_uuid, nack.for_type, nack.uri, nack.channel) == (request_msg.uuid, request_msg.type, target["uri"], target["channel"])
    assert (nack.code, nack.message) == (500, "list capacity exceeded")
    payload = wire(ack)["payload"]
    assert payload["for"] == request_msg.uuid and payload["for_type"] == int(request_msg.type)
    # the target field the request does not have is omitted, not sent empty
    assert set(payload) == {"for", "for_type", "uri" if isinstance(request_msg, Call) else "channel"}


# --- round trips ------------------------------------------------------------------------------

ARGS_SAMPLES = [None, "hello", "", 0, -7, 3.25, True, False, [], {}, [1, "two", None, {"three": [3]}], {"x": {"y": {"z": "é😀"}}}]


def _round_trip_messages():
    for args in ARGS_SAMPLES:
        yield Call("test.echo", args, 1.0)
        yield Pub("chan.a", args)
        yield Res(new_uuid(), "test.echo", args)
        yield Evnt(new_uuid(), "chan.a", args, "chan.*")
    for timeout in (0.0, 1e-9, 0.001, 0.1, 0.3, 1.0, 2.5, 30.0, 60.0, 123.456789, 1e6):
        yield Call("u", "a", timeout)
    for pattern in (True, False):
        yield Sub("chan.*", pattern)
        yield Unsb("chan.*", pattern)
    for t in CLIENT_TYPES:  # an ACK or NACK answers a request
        yield Ack(new_uuid(), t, uri="test.echo")
        yield Ack(new_uuid(), t, channel="chan.a")
        yield Ack(new_uuid(), t)
        yield Nack(new_uuid(), t, 500, "list capacity exceeded", uri="x")
        yield Nack(new_uuid(), t, 400, "", channel="c")
    yield Res(new_uuid())
    yield Res(new_uuid(), "", {"error": {"message": "boom"}})
    yield Evnt(new_uuid(), "chan.a")
    yield Evnt(new_uuid(), "", None, "")
    yield Call("", None)
    yield Pub("", None)


@pytest.mark.parametrize("msg", list(_round_trip_messages()), ids=repr)
def test_round_trip(msg):
    text = encode(msg)
    assert decode(text) == msg
    assert decode(text.encode("utf-8")) == msg
    assert type(decode(text)) is type(msg)


def test_round_trip_many_random_timeouts():
    rng = random.Random(6455)
    for _ in range(2000):
        ns = rng.randrange(0, 10**13)
        t = ns / 1e9
        msg = Call("u", None, t, uuid=U_CALL)
        assert json.loads(encode(msg))["payload"]["timeout"] == ns
        assert decode(encode(msg)) == msg


# --- decoding the protocol's examples ----------------------------------------------------------

PROTOCOL_EXAMPLES = [
    (
        '{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"test.echo","timeout":1000000000,"args":"hello"}}' % U_CALL,
        Call(uri="test.echo", args="hello", timeout=1.0, uuid=U_CALL),
    ),
    (
        '{"meta":{"type":8,"uuid":"%s"},"payload":{"for":"%s","for_type":1,"uri":"test.echo"}}' % (U_ACK, U_CALL),
        Ack(for_uuid=U_CALL, for_type=MessageType.CALL, uri="test.echo", uuid=U_ACK),
    ),
    (
        '{"meta":{"type":9,"uuid":"%s"},"payload":{"for":"%s","uri":"test.echo","args":"hello"}}' % (U_RES, U_CALL),
        Res(for_uuid=U_CALL, uri="test.echo", args="hello", uuid=U_RES),
    ),
    (
        '{"meta":{"type":7,"uuid":"%s"},"payload":{"for":"%s","for_type":1,"uri":"x","code":500,"message":"list capacity exceeded"}}'
        % (U_NACK, U_CALL2),
        Nack(for_uuid=U_CALL2, for_type=MessageType.CALL, code=500, message="list capacity exceeded", uri="x", uuid=U_NACK),
    ),
    (
        '{"meta":{"type":3,"uuid":"%s"},"payload":{"channel":"chan.*","pattern":true}}' % U_SUB,
        Sub(channel="chan.*", pattern=True, uuid=U_SUB),
    ),
    (
        '{"meta":{"type":8,"uuid":"%s"},"payload":{"for":"%s","for_type":3,"channel":"chan.*"}}' % (U_SUBACK, U_SUB),
        Ack(for_uuid=U_SUB, for_type=MessageType.SUB, channel="chan.*", uuid=U_SUBACK),
    ),
    (
        '{"meta":{"type":2,"uuid":"%s"},"payload":{"channel":"chan.a","args":{"x":1}}}' % U_PUB,
        Pub(channel="chan.a", args={"x": 1}, uuid=U_PUB),
    ),
    (
        '{"meta":{"type":10,"uuid":"%s"},"payload":{"for":"%s","channel":"chan.a","pattern":"chan.*","args":{"x":1}}}'
        % (U_EVNT, U_PUB),
        Evnt(for_uuid=U_PUB, channel="chan.a", args={"x": 1}, pattern="chan.*", uuid=U_EVNT),
    ),
]


@pytest.mark.parametrize("text, expected", PROTOCOL_EXAMPLES, ids=[m.type.name for _, m in PROTOCOL_EXAMPLES])
def test_decode_protocol_examples(text, expected):
    got = decode(text)
    assert got == expected
    assert type(got) is type(expected)
    # the reference ends each frame with "\n": accepted too, as text or bytes
    assert decode(text + "\n") == expected
    assert decode((text + "\n").encode("utf-8")) == expected
    assert decode(bytearray(text.encode("utf-8"))) == expected
    assert decode(memoryview(text.encode("utf-8"))) == expected
    # and our encoding of the same message is the same JSON
    assert wire(expected) == json.loads(text)


def test_decode_for_type_is_a_message_type():
    text, _ = PROTOCOL_EXAMPLES[1]
    ack = decode(text)
    assert ack.for_type is MessageType.CALL


@pytest.mark.parametrize(
    "text, expected",
    [
        # whitespace and key order do not matter
        (
            ' { "payload" : { "args" : [1] , "uri" : "u" , "timeout" : 5 } ,\n "meta" : { "uuid" : "%s" , "type" : 1 } } \r\n'
            % U_CALL,
            Call("u", [1], 5e-9, uuid=U_CALL),
        ),
        # uppercase uuid: accepted, kept as sent
        (line(2, {"channel": "c"}, U_PUB.upper()), Pub("c", None, uuid=U_PUB.upper())),
        # unknown fields are ignored, in meta and payload
        (
            json.dumps({"meta": {"type": 3, "uuid": U_SUB, "extra": 1}, "payload": {"channel": "c", "pattern": False, "x": "y"}, "z": 0}),
            Sub("c", False, uuid=U_SUB),
        ),
        # escaped characters, including a surrogate pair
        (line(2, '{"channel":"\\u00e9\\ud83d\\ude00","args":"\\n\\t\\"\\\\"}', U_PUB), Pub("é😀", '\n\t"\\', uuid=U_PUB)),
    ],
)
def test_decode_variants(text, expected):
    assert decode(text) == expected


# --- decoding defaults (absent or null fields) --------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (line(1, {}), Call("", None, 0.0, uuid=U_CALL)),
        (line(1, {"uri": "u"}), Call("u", None, 0.0, uuid=U_CALL)),
        (line(1, {"uri": None, "timeout": None, "args": None}), Call("", None, 0.0, uuid=U_CALL)),
        (line(1, "null"), Call("", None, 0.0, uuid=U_CALL)),
        ('{"meta":{"type":1,"uuid":"%s"}}' % U_CALL, Call("", None, 0.0, uuid=U_CALL)),
        # a negative timeout means the default: decoded as 0
        (line(1, {"uri": "u", "timeout": -1}), Call("u", None, 0.0, uuid=U_CALL)),
        (line(1, {"uri": "u", "timeout": -(2**63)}), Call("u", None, 0.0, uuid=U_CALL)),
        (line(2, {"channel": "c"}, U_PUB), Pub("c", None, uuid=U_PUB)),
        (line(2, {}, U_PUB), Pub("", None, uuid=U_PUB)),
        (line(3, {"channel": "c"}, U_SUB), Sub("c", False, uuid=U_SUB)),
        (line(3, {"channel": "c", "pattern": None}, U_SUB), Sub("c", False, uuid=U_SUB)),
        (line(4, {"channel": "c"}, U_SUB), Unsb("c", False, uuid=U_SUB)),
        (line(8, {"for": U_CALL, "for_type": 1}, U_ACK), Ack(U_CALL, MessageType.CALL, uuid=U_ACK)),
        (line(8, {"for": U_CALL, "for_type": 1, "uri": None, "channel": None}, U_ACK), Ack(U_CALL, MessageType.CALL, uuid=U_ACK)),
        (line(7, {"for": U_CALL, "for_type": 1, "code": 500}, U_NACK), Nack(U_CALL, MessageType.CALL, 500, "", uuid=U_NACK)),
        (line(9, {"for": U_CALL}, U_RES), Res(U_CALL, "", None, uuid=U_RES)),
        (line(10, {"for": U_PUB}, U_EVNT), Evnt(U_PUB, "", None, "", uuid=U_EVNT)),
        (line(10, {"for": U_PUB, "channel": "c", "pattern": None}, U_EVNT), Evnt(U_PUB, "c", None, "", uuid=U_EVNT)),
    ],
)
def test_decode_defaults(text, expected):
    assert decode(text) == expected


# --- effective_timeout --------------------------------------------------------------------------


def test_default_call_timeout_is_60s():
    assert DEFAULT_CALL_TIMEOUT == 60.0


@pytest.mark.parametrize(
    "asked, applied",
    [
        (0.0, 60.0),
        (-1.0, 60.0),
        (-1e-9, 60.0),
        (1e-9, 60.0),
        (0.000999999, 60.0),
        (999999 / 1e9, 60.0),
        (0.001, 0.001),
        (1000000 / 1e9, 0.001),
        (0.5, 0.5),
        (1.0, 1.0),
        (60.0, 60.0),
        (3600.0, 3600.0),
    ],
)
def test_effective_timeout(asked, applied):
    assert effective_timeout(asked) == applied


@pytest.mark.parametrize("ns, applied", [(0, 60.0), (-5, 60.0), (999999, 60.0), (1000000, 0.001), (1000000000, 1.0)])
def test_effective_timeout_of_decoded_call(ns, applied):
    assert effective_timeout(decode(line(1, {"uri": "u", "timeout": ns})).timeout) == applied


# --- malformed messages ------------------------------------------------------------------------

NOT_UTF8 = [
    b"\xff",
    b'{"meta":{"type":1,"uuid":"' + U_CALL.encode() + b'"},"payload":{"uri":"\xe9"}}',  # latin-1 e-acute
    b'{"meta":{"type":1,"uuid":"' + U_CALL.encode() + b'"},"payload":{"uri":"\xc3"}}',  # truncated sequence
    b'{"meta":{"type":1,"uuid":"' + U_CALL.encode() + b'"},"payload":{"uri":"\xed\xa0\x80"}}',  # encoded surrogate
    b'{"meta":{"type":1,"uuid":"' + U_CALL.encode() + b'"},"payload":{"uri":"\xc0\xaf"}}',  # overlong
]


@pytest.mark.parametrize("data", NOT_UTF8)
def test_decode_not_utf8(data):
    assert_protocol_error(data, CLOSE_INVALID_DATA)


NOT_JSON = [
    "",
    " ",
    "\n",
    "{",
    "}",
    "nope",
    "{meta: 1}",
    "{'meta': {'type': 1}}",
    '{"meta":{"type":1,"uuid":"%s"},"payload":{}' % U_CALL,
    '{"meta":{"type":1,"uuid":"%s"},"payload":{},}' % U_CALL,
    '{"meta":{"type":1,"uuid":"%s"},"payload":{}} {}' % U_CALL,
    '{"meta":{"type":1,"uuid":"%s"},"payload":{}}x' % U_CALL,
    "\ufeff" + '{"meta":{"type":1,"uuid":"%s"},"payload":{}}' % U_CALL,
    '{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"a\x01b"}}' % U_CALL,  # raw control character
    '{"meta":{"type":01,"uuid":"%s"},"payload":{}}' % U_CALL,  # leading zero
]


@pytest.mark.parametrize("data", NOT_JSON)
@pytest.mark.parametrize("as_bytes", [False, True])
def test_decode_not_json(data, as_bytes):
    assert_protocol_error(data.encode("utf-8") if as_bytes else data, CLOSE_INVALID_DATA)


# JSON's grammar has no NaN or Infinity; Python's json module accepts them, Go's refuses them,
# and our own encoder (allow_nan=False) cannot send them on. They are malformed data.
NON_JSON_NUMBERS = ["NaN", "Infinity", "-Infinity", '{"x":[1,NaN]}']


@pytest.mark.parametrize("args", NON_JSON_NUMBERS)
@pytest.mark.parametrize(
    "mtype, extra",
    [(1, '"uri":"u",'), (2, '"channel":"c",'), (9, '"for":"%s",' % U_CALL), (10, '"for":"%s","channel":"c",' % U_PUB)],
    ids=["CALL", "PUB", "RES", "EVNT"],
)
def test_decode_refuses_nan_and_infinity(mtype, extra, args):
    assert_protocol_error(line(mtype, "{%s\"args\":%s}" % (extra, args)), CLOSE_INVALID_DATA)


@pytest.mark.parametrize("data", ["null", "1", "1.5", '"text"', "true", "[]", '[{"meta":{"type":1,"uuid":"%s"}}]' % U_CALL])
def test_decode_not_an_object(data):
    assert_protocol_error(data, CLOSE_INVALID_DATA)


@pytest.mark.parametrize(
    "data",
    [
        "{}",
        '{"payload":{}}',
        '{"meta":null,"payload":{}}',
        '{"meta":1,"payload":{}}',
        '{"meta":"x","payload":{}}',
        '{"meta":[1,"%s"],"payload":{}}' % U_CALL,
        '{"META":{"type":1,"uuid":"%s"},"payload":{}}' % U_CALL,
    ],
)
def test_decode_missing_or_non_object_meta(data):
    assert_protocol_error(data, CLOSE_INVALID_DATA)


@pytest.mark.parametrize("raw_type", ["null", "true", "false", '"1"', '"CALL"', "1.0", "1.5", "1e0", "[1]", "{}"])
def test_decode_type_not_an_int(raw_type):
    assert_protocol_error('{"meta":{"type":%s,"uuid":"%s"},"payload":{}}' % (raw_type, U_CALL), CLOSE_INVALID_DATA)


def test_decode_type_missing():
    assert_protocol_error('{"meta":{"uuid":"%s"},"payload":{}}' % U_CALL, CLOSE_INVALID_DATA)


@pytest.mark.parametrize("raw_type", [0, 5, 6, 11, 12, 100, -1, -8, 2**31, 2**64, 10**30])
def test_decode_unknown_type(raw_type):
    assert_protocol_error(line(raw_type, {}), CLOSE_PROTOCOL_ERROR)


BAD_UUIDS = [
    None,
    "",
    "x",
    "not-a-uuid",
    U_CALL[:-1],  # 35 characters
    U_CALL + "0",  # 37 characters
    U_CALL[:-1] + "g",  # not hex
    U_CALL.replace("-", "_"),
    1,
    0,
    True,
    [U_CALL],
    {"uuid": U_CALL},
]


@pytest.mark.parametrize("bad", BAD_UUIDS, ids=repr)
@pytest.mark.parametrize("mtype", [1, 2, 3, 4, 7, 8, 9, 10])
def test_decode_invalid_meta_uuid(mtype, bad):
    payload = {"uri": "u", "channel": "c", "for": U_CALL, "for_type": 1, "code": 500}
    assert_protocol_error(json.dumps({"meta": {"type": mtype, "uuid": bad}, "payload": payload}), CLOSE_INVALID_DATA)


@pytest.mark.parametrize("mtype", [1, 2, 3, 4, 7, 8, 9, 10])
def test_decode_missing_meta_uuid(mtype):
    assert_protocol_error(json.dumps({"meta": {"type": mtype}, "payload": {"for": U_CALL, "for_type": 1, "code": 1}}), CLOSE_INVALID_DATA)


@pytest.mark.parametrize("payload", ["[]", "[1]", '"x"', "1", "true", "1.5"])
@pytest.mark.parametrize("mtype", [1, 2, 3, 4, 7, 8, 9, 10])
def test_decode_payload_not_an_object(mtype, payload):
    assert_protocol_error(line(mtype, payload), CLOSE_INVALID_DATA)


WRONG_FIELDS = [
    # CALL
    (1, {"uri": 1}),
    (1, {"uri": True}),
    (1, {"uri": ["u"]}),
    (1, {"uri": {"u": 1}}),
    (1, {"uri": "u", "timeout": 1.0}),
    (1, {"uri": "u", "timeout": 1.5}),
    (1, {"uri": "u", "timeout": 1e9}),
    (1, {"uri": "u", "timeout": True}),
    (1, {"uri": "u", "timeout": False}),
    (1, {"uri": "u", "timeout": "1000"}),
    (1, {"uri": "u", "timeout": "1s"}),
    (1, {"uri": "u", "timeout": [1]}),
    (1, {"uri": "u", "timeout": {}}),
    # PUB
    (2, {"channel": 1}),
    (2, {"channel": False}),
    (2, {"channel": ["c"]}),
    # SUB / UNSB
    (3, {"channel": 1, "pattern": False}),
    (3, {"channel": "c", "pattern": 1}),
    (3, {"channel": "c", "pattern": 0}),
    (3, {"channel": "c", "pattern": "true"}),
    (3, {"channel": "c", "pattern": "c.*"}),
    (3, {"channel": "c", "pattern": []}),
    (4, {"channel": 2, "pattern": True}),
    (4, {"channel": "c", "pattern": 1}),
    (4, {"channel": "c", "pattern": "false"}),
    # ACK
    (8, {"for_type": 1}),
    (8, {"for": None, "for_type": 1}),
    (8, {"for": "x", "for_type": 1}),
    (8, {"for": 1, "for_type": 1}),
    (8, {"for": U_CALL}),
    (8, {"for": U_CALL, "for_type": None}),
    (8, {"for": U_CALL, "for_type": True}),
    (8, {"for": U_CALL, "for_type": "1"}),
    (8, {"for": U_CALL, "for_type": 1.0}),
    (8, {"for": U_CALL, "for_type": 0}),
    (8, {"for": U_CALL, "for_type": 5}),
    (8, {"for": U_CALL, "for_type": 11}),
    (8, {"for": U_CALL, "for_type": -1}),
    (8, {"for": U_CALL, "for_type": 1, "uri": 1}),
    (8, {"for": U_CALL, "for_type": 3, "channel": 1}),
    (8, {"for": U_CALL, "for_type": 3, "channel": True}),
    # NACK
    (7, {"for": U_CALL, "for_type": 1, "message": "m"}),
    (7, {"for": U_CALL, "for_type": 1, "code": None, "message": "m"}),
    (7, {"for": U_CALL, "for_type": 1, "code": "500", "message": "m"}),
    (7, {"for": U_CALL, "for_type": 1, "code": 500.0, "message": "m"}),
    (7, {"for": U_CALL, "for_type": 1, "code": True, "message": "m"}),
    (7, {"for": U_CALL, "for_type": 1, "code": 500, "message": 1}),
    (7, {"for": U_CALL, "for_type": 1, "code": 500, "message": False}),
    (7, {"for": U_CALL, "for_type": 1, "code": 500, "uri": 2}),
    (7, {"for": U_CALL, "for_type": 9, "code": 500, "channel": []}),
    (7, {"for": "nope", "for_type": 1, "code": 500}),
    (7, {"for": U_CALL, "for_type": 6, "code": 500}),
    (7, {"for_type": 1, "code": 500}),
    # RES
    (9, {}),
    (9, {"uri": "u", "args": 1}),
    (9, {"for": "", "args": 1}),
    (9, {"for": U_CALL[:8], "args": 1}),
    (9, {"for": 7, "args": 1}),
    (9, {"for": U_CALL, "uri": 1}),
    (9, {"for": U_CALL, "uri": True}),
    # EVNT
    (10, {"channel": "c"}),
    (10, {"for": "zz", "channel": "c"}),
    (10, {"for": U_PUB, "channel": 1}),
    (10, {"for": U_PUB, "channel": "c", "pattern": True}),
    (10, {"for": U_PUB, "channel": "c", "pattern": False}),
    (10, {"for": U_PUB, "channel": "c", "pattern": 1}),
]


@pytest.mark.parametrize("mtype, payload", WRONG_FIELDS, ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v))
def test_decode_wrong_field_types(mtype, payload):
    assert_protocol_error(line(mtype, payload), CLOSE_INVALID_DATA)


# A Go Duration is an int64; a timeout outside int64 is not one. Python ints have no limit, so
# decode must refuse those itself, as malformed data, not fail with another exception.
@pytest.mark.parametrize(
    "ns", [2**63, -(2**63) - 1, 10**30, 10**308, 10**400], ids=["2**63", "-2**63-1", "10**30", "10**308", "10**400"]
)
def test_decode_call_timeout_outside_int64(ns):
    assert_protocol_error('{"meta":{"type":1,"uuid":"%s"},"payload":{"uri":"u","timeout":%d}}' % (U_CALL, ns), CLOSE_INVALID_DATA)


def test_decode_call_timeout_int64_bounds_accepted():
    assert decode(line(1, {"uri": "u", "timeout": 2**63 - 1})).timeout == (2**63 - 1) / 1e9
    assert decode(line(1, {"uri": "u", "timeout": -(2**63)})).timeout == 0.0


# "\ud800" is a lone surrogate: Python's json module decodes it into a str that cannot be
# encoded as UTF-8 (Go replaces it with U+FFFD). Whatever decode does with it, a message it
# returns must be one that can be sent on (as UTF-8) or stored (redis keys/values are UTF-8).
@pytest.mark.parametrize(
    "mtype, payload",
    [
        (1, '{"uri":"u","args":"\\ud800"}'),
        (1, '{"uri":"\\udc00x","args":1}'),
        (2, '{"channel":"c\\ud83d","args":null}'),
        (3, '{"channel":"\\ude00","pattern":true}'),
        (9, '{"for":"%s","args":{"\\ud800":1}}' % U_CALL),
    ],
)
def test_decode_lone_surrogates_do_not_yield_unencodable_messages(mtype, payload):
    text = line(mtype, payload)
    try:
        msg = decode(text)
    except ProtocolError as exc:
        assert exc.close_code == CLOSE_INVALID_DATA
        return
    encode(msg).encode("utf-8")  # must not raise UnicodeEncodeError
    for value in dataclasses.asdict(msg).values():
        if isinstance(value, str):
            value.encode("utf-8")


def test_decode_is_not_fooled_by_non_dict_mapping_payloads():
    # a list of pairs is not an object, even though dict() would accept it
    assert_protocol_error(line(1, '[["uri","u"]]'), CLOSE_INVALID_DATA)


def test_protocol_error_default_code_is_1002():
    assert ProtocolError("x").close_code == 1002


# --- redis payloads ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [CallPayload, ResultPayload])
def test_call_and_result_payload_shape(cls):
    p = cls(U_ACK, U_CALL, "test.echo", {"x": [1, "é"]})
    assert json.loads(p.to_json()) == {"conn_uuid": U_ACK, "msg_uuid": U_CALL, "uri": "test.echo", "args": {"x": [1, "é"]}}
    # args omitted when absent
    assert json.loads(cls(U_ACK, U_CALL, "u").to_json()) == {"conn_uuid": U_ACK, "msg_uuid": U_CALL, "uri": "u"}
    # but falsy args are kept
    for falsy in (0, "", False, [], {}):
        assert json.loads(cls(U_ACK, U_CALL, "u", falsy).to_json())["args"] == falsy


@pytest.mark.parametrize("cls", [CallPayload, ResultPayload])
@pytest.mark.parametrize("args", ARGS_SAMPLES)
def test_call_and_result_payload_round_trip(cls, args):
    p = cls(new_uuid(), new_uuid(), "test.é", args)
    assert cls.from_json(p.to_json()) == p
    assert cls.from_json(p.to_json().encode("utf-8")) == p


@pytest.mark.parametrize("cls", [CallPayload, ResultPayload])
def test_call_and_result_payload_from_reference_json(cls):
    text = '{"conn_uuid":"%s","msg_uuid":"%s","uri":"test.echo","args":"hello"}' % (U_ACK, U_CALL)
    assert cls.from_json(text) == cls(U_ACK, U_CALL, "test.echo", "hello")
    assert cls.from_json('{"conn_uuid":"a","msg_uuid":"b","uri":"c"}') == cls("a", "b", "c", None)


@pytest.mark.parametrize("cls", [CallPayload, ResultPayload])
@pytest.mark.parametrize(
    "data",
    [
        "",
        "{",
        "nope",
        b"\xff\xfe",
        "[]",
        "null",
        "1",
        '"s"',
        '{"conn_uuid":1,"msg_uuid":"b","uri":"c"}',
        '{"conn_uuid":"a","msg_uuid":null,"uri":"c"}',
        '{"conn_uuid":"a","msg_uuid":"b","uri":["c"]}',
        '{"conn_uuid":"a","msg_uuid":"b","uri":true}',
    ],
)
def test_call_and_result_payload_invalid(cls, data):
    with pytest.raises(ValueError):
        cls.from_json(data)


@pytest.mark.parametrize("args", ARGS_SAMPLES)
def test_event_payload(args):
    p = EventPayload(U_PUB, args)
    assert json.loads(p.to_json()) == {"msg_uuid": U_PUB, "args": args}
    assert EventPayload.from_json(p.to_json()) == p
    assert EventPayload.from_json(p.to_json().encode("utf-8")) == p


def test_event_payload_from_reference_json():
    assert EventPayload.from_json('{"msg_uuid":"%s","args":{"x":1}}' % U_PUB) == EventPayload(U_PUB, {"x": 1})
    assert EventPayload.from_json('{"msg_uuid":"%s"}' % U_PUB) == EventPayload(U_PUB, None)


@pytest.mark.parametrize("data", ["", "{", b"\xff", "[]", "null", "3", '{"msg_uuid":1}', '{"msg_uuid":null}', '{"msg_uuid":["x"]}'])
def test_event_payload_invalid(data):
    with pytest.raises(ValueError):
        EventPayload.from_json(data)


# --- error results ----------------------------------------------------------------------------


def test_error_result_shape():
    assert error_result("boom") == {"error": {"message": "boom"}}
    assert json.loads(encode(Res(U_CALL, "u", error_result("boom"), uuid=U_RES)))["payload"]["args"] == {"error": {"message": "boom"}}


def test_error_result_with_the_exception_type_keeps_the_reference_shape():
    result = error_result("list index out of range", "IndexError")
    assert result == {"error": {"message": "list index out of range", "type": "IndexError"}}
    # what a reader that knows only the reference's {"error": {"message": ...}} gets from it
    assert result_error_message(result) == "list index out of range"
    res = decode(encode(Res(U_CALL, "u", result)))
    assert result_error_message(res.args) == "list index out of range"


@pytest.mark.parametrize(
    "result, text, kind",
    [
        ({"error": {"message": "list index out of range", "type": "IndexError"}}, "IndexError: list index out of range", "IndexError"),
        ({"error": {"message": "boom"}}, "boom", None),  # a Go callee's: no type
        ({"error": {"message": "KeyError", "type": "KeyError"}}, "KeyError", "KeyError"),  # no message of its own
        ({"error": {"message": "boom", "type": 3}}, "boom", None),
        (None, "boom", None),
    ],
)
def test_remote_error_reads_like_a_python_traceback_line(result, text, kind):
    from juggler.exceptions import RemoteError

    exc = RemoteError("boom" if result is None else result["error"]["message"], result)
    assert (str(exc), exc.type) == (text, kind)


@pytest.mark.parametrize("message", ["boom", "", "é😀", "multi\nline"])
def test_result_error_message_of_error_result(message):
    assert result_error_message(error_result(message)) == message
    # also after a trip through the wire
    res = decode(encode(Res(U_CALL, "u", error_result(message))))
    assert result_error_message(res.args) == message


@pytest.mark.parametrize(
    "result",
    [
        None,
        "boom",
        1,
        [],
        {},
        ["error"],
        {"error": "boom"},
        {"error": None},
        {"error": {}},
        {"error": {"message": 1}},
        {"error": {"message": None}},
        {"error": {"msg": "boom"}},
        {"Error": {"message": "boom"}},
        {"error": {"message": "boom"}, "other": 1},
        {"result": {"message": "boom"}},
    ],
)
def test_result_error_message_of_normal_results(result):
    assert result_error_message(result) is None


@pytest.mark.parametrize("mtype", [MessageType.ACK, MessageType.NACK])
@pytest.mark.parametrize("for_type", [int(t) for t in SERVER_TYPES] + [5, 0, 42])
def test_decode_refuses_for_type_that_is_not_a_request(mtype, for_type):
    payload = {"for": U_CALL, "for_type": for_type, "code": 500, "message": "m"}
    assert_protocol_error(json.dumps({"meta": {"type": int(mtype), "uuid": U_CALL2}, "payload": payload}), CLOSE_INVALID_DATA)


@pytest.mark.parametrize("mtype", sorted(SERVER_TYPES))
def test_decode_with_types_refuses_other_side_before_its_payload(mtype):
    # a server message sent to a server is a protocol error (1002), whatever its payload holds
    text = json.dumps({"meta": {"type": int(mtype), "uuid": U_CALL}})
    assert_protocol_error_types(text, CLIENT_TYPES)


def assert_protocol_error_types(text, types):
    with pytest.raises(ProtocolError) as info:
        decode(text, types)
    assert info.value.close_code == 1002
    assert "server message" in info.value.reason


@pytest.mark.parametrize(
    "bad_uuid",
    ["797B5A8E1B6D4A4E9A3B0A6F1F0F7C11", "{797b5a8e-1b6d-4a4e-9a3b-0a6f1f0f7c11}",
     "urn:uuid:797b5a8e-1b6d-4a4e-9a3b-0a6f1f0f7c11", "797b5a8e-1b6d4a4e-9a3b-0a6f1f0f7c11-"],
)  # fmt: skip
def test_decode_refuses_non_canonical_uuids(bad_uuid):
    assert_protocol_error(json.dumps({"meta": {"type": 3, "uuid": bad_uuid}, "payload": {"channel": "c"}}), CLOSE_INVALID_DATA)
