"""juggler.replies.reply_frame builds the frames of ACK, NACK and RES directly: byte for byte
what encode() and encode_frame() make (Go clients read them), over many random messages."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest

from juggler.frames import OP_TEXT, encode_frame
from juggler.replies import reply_frame
from juggler.message import (
    Ack,
    Call,
    Evnt,
    MessageType,
    Nack,
    Position,
    Pub,
    Res,
    ResultPayload,
    Sub,
    Unsb,
    encode,
    new_uuid,
)

NO_LIMIT = 1 << 40

# strings that exercise the escaping: quotes, backslashes, every control character, the
# characters JavaScript treats as line ends, non-BMP, a slash, HTML's specials
_SPECIAL = ['"', "\\", "/", "\u2028", "\u2029", "\x7f", "é", "✓", "\U0001F600", "<", ">", "&", "'", "\ufeff", "\u0000"]
_SPECIAL += [chr(c) for c in range(32)]


def old_frame(msg) -> bytes:
    return encode_frame(OP_TEXT, encode(msg).encode("utf-8"))


def rand_str(rng: random.Random, most: int = 12) -> str:
    kind = rng.random()
    if kind < 0.2:
        return ""
    if kind < 0.4:
        return "".join(rng.choice("abcxyz.-_09") for _ in range(rng.randint(1, most)))
    return "".join(
        rng.choice(_SPECIAL) if rng.random() < 0.4 else chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
        for _ in range(rng.randint(1, most))
    )


def rand_float(rng: random.Random) -> float:
    return rng.choice([
        0.0, -0.0, 1.0, 0.1, 1e16, 1e-7, 1e21, 1e22, 5e-324, 1.7976931348623157e308, -2.5, 123456789.125,
        rng.random(), rng.uniform(-1e6, 1e6), rng.uniform(-1, 1) * 10 ** rng.randint(-300, 300),
    ])  # fmt: skip


def rand_json(rng: random.Random, depth: int = 0):
    kinds = ["null", "true", "false", "int", "bigint", "float", "str"]
    if depth < 4:
        kinds += ["list", "dict"] * 2
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind in ("true", "false"):
        return kind == "true"
    if kind == "int":
        return rng.randint(-(1 << 53), 1 << 53)
    if kind == "bigint":
        return rng.choice([1, -1]) * rng.getrandbits(rng.randint(64, 300))
    if kind == "float":
        return rand_float(rng)
    if kind == "str":
        return rand_str(rng, 40)
    if kind == "list":
        return [rand_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {rand_str(rng): rand_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def rand_args(rng: random.Random):
    kind = rng.random()
    if kind < 0.05:
        return "x" * rng.choice([100, 125, 126, 200, 950, 1023, 1024, 65535, 65536, 70000])  # each frame header size
    if kind < 0.08:
        return [rand_json(rng) for _ in range(2000)]  # large
    if kind < 0.1:
        return json.loads(json.dumps(rand_json(rng)))  # as decoded from redis
    return rand_json(rng)


def rand_request(rng: random.Random):
    u = new_uuid()
    kind = rng.randrange(4)
    if kind == 0:
        return Call(rand_str(rng), uuid=u)
    if kind == 1:
        return Pub(rand_str(rng), uuid=u)
    if kind == 2:
        return Sub(rand_str(rng), pattern=rng.random() < 0.5, uuid=u)
    return Unsb(rand_str(rng), uuid=u)


def rand_reply(rng: random.Random):
    kind = rng.randrange(5)
    if kind == 0:
        return Ack(rand_request(rng))
    if kind == 1:
        return Ack(new_uuid(), rng.choice(list(MessageType)[:4]), uri=rand_str(rng), channel=rand_str(rng))
    if kind == 2:
        code = rng.choice([400, 403, 429, 500, 503, rng.randint(-(1 << 40), 1 << 40)])
        return Nack(rand_request(rng), code, rand_str(rng, 60))
    if kind == 3:
        return Nack(new_uuid(), rng.choice(list(MessageType)[:4]), rng.randint(100, 599), rand_str(rng), uri=rand_str(rng),
                    channel=rand_str(rng))  # fmt: skip
    return Res(new_uuid(), uri=rand_str(rng), args=rand_args(rng))


def test_reply_frames_are_the_encoders_bytes_over_many_random_messages():
    rng = random.Random(20261206)
    kinds = set()
    for _ in range(5000):
        msg = rand_reply(rng)
        kinds.add(type(msg))
        assert reply_frame(msg, NO_LIMIT) == old_frame(msg), msg
    assert kinds == {Ack, Nack, Res}


def test_result_args_as_decoded_from_a_result_payload():
    rng = random.Random(7)
    for _ in range(500):
        text = json.dumps({"conn_uuid": new_uuid(), "msg_uuid": new_uuid(), "uri": rand_str(rng), "args": rand_args(rng)},
                          ensure_ascii=rng.random() < 0.5)  # fmt: skip
        p = ResultPayload.from_json(text.encode("utf-8"))
        msg = Res(for_uuid=p.msg_uuid, uri=p.uri, args=p.args)
        assert reply_frame(msg, NO_LIMIT) == old_frame(msg)


@pytest.mark.parametrize("args", [0, -1, 1.5, math.pi, -0.0, True, False, None, "", [], {}, "é\U0001F600", [[[[]]]], {"a": {"b": [1, {"c": None}]}}])
def test_every_json_kind_at_the_top_of_args(args):
    msg = Res(new_uuid(), "u", args)
    assert reply_frame(msg, NO_LIMIT) == old_frame(msg)


def test_the_write_limit_is_of_the_json_as_the_servers_encode_counts_it():
    msg = Res(new_uuid(), "u", "é" * 100)
    size = len(encode(msg).encode("utf-8"))
    assert reply_frame(msg, size) == old_frame(msg)
    assert reply_frame(msg, size - 1) is None


def test_other_messages_and_unusual_fields_take_the_general_path():
    call = Call("u")
    assert reply_frame(call, NO_LIMIT) is None
    assert reply_frame(Evnt(new_uuid(), "ch", 1), NO_LIMIT) is None
    assert reply_frame(Ack(Sub("ch"), recovered=True), NO_LIMIT) is None
    assert reply_frame(Ack(Sub("ch"), position=Position("1-0", "e")), NO_LIMIT) is None
    assert reply_frame(Nack(call, True, "bool code"), NO_LIMIT) is None

    class Str(str):
        pass

    assert reply_frame(Res(Str(new_uuid()), "u", 1), NO_LIMIT) is None
    assert reply_frame(Res(new_uuid(), None, 1), NO_LIMIT) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("args", [float("nan"), float("inf"), object(), {1j: 2}, "\ud800"])
def test_args_that_are_not_json_raise_as_encode_does(args):
    msg = Res(new_uuid(), "u", args)
    with pytest.raises((TypeError, ValueError)) as old:
        old_frame(msg)
    with pytest.raises(old.type):
        reply_frame(msg, NO_LIMIT)


def test_deep_args_as_deep_as_encode_takes():
    depth = sys.getrecursionlimit() // 2
    args: list = []
    for _ in range(depth):
        args = [args]
    msg = Res(new_uuid(), "u", args)
    assert reply_frame(msg, NO_LIMIT) == old_frame(msg)
