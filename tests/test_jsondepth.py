"""juggler's own limit on how deep the JSON it decodes may nest (juggler.jsondepth), the same
on every Python: CPython 3.13's JSON decoder recurses 10,000 levels deep, more than a 512 KiB
thread stack holds."""

from __future__ import annotations

import json
import time

import pytest

from juggler.exceptions import ProtocolError
from juggler.jsondepth import MAX_JSON_DEPTH, too_deep
from juggler.message import CallPayload, EventPayload, ResultPayload, parse_json


def nested(depth: int, shape: str = "list") -> str:
    if shape == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "0" + "}" * depth


@pytest.mark.parametrize("shape", ["list", "dict"])
def test_nesting_up_to_the_limit_passes_and_one_more_does_not(shape):
    at, beyond = nested(MAX_JSON_DEPTH, shape), nested(MAX_JSON_DEPTH + 1, shape)
    assert not too_deep(at) and too_deep(beyond)
    assert not too_deep(at.encode()) and too_deep(beyond.encode())  # bytes too
    assert too_deep(nested(10, shape), limit=9) and not too_deep(nested(10, shape), limit=10)


def test_brackets_in_strings_do_not_count_and_wide_is_not_deep():
    in_strings = json.dumps(["[" * 2000, "{" * 2000, '\\"[[[' * 500])  # escaped quotes included
    assert json.loads(in_strings) and not too_deep(in_strings)
    wide = json.dumps([[{} for _ in range(10)] for _ in range(500)])  # 5,500 brackets, 3 deep
    assert not too_deep(wide)
    assert too_deep('["a\\"]", ' + nested(MAX_JSON_DEPTH) + "]")  # after a string with an escaped quote


def test_a_message_nested_too_deeply_is_invalid_before_it_is_decoded():
    with pytest.raises(ProtocolError) as info:
        parse_json(nested(MAX_JSON_DEPTH + 1))
    assert info.value.close_code == 1007 and info.value.reason == "message is nested too deeply"
    assert parse_json(nested(MAX_JSON_DEPTH)) is not None


@pytest.mark.parametrize("kind, parse", [
    ("call", CallPayload.from_json), ("result", ResultPayload.from_json), ("event", EventPayload.from_json),
])  # fmt: skip
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16-le", "utf-32"])
def test_payloads_from_redis_nested_too_deeply_are_refused(kind, parse, encoding):
    """A payload from redis may nest one level less than a websocket message (a client's
    envelope is a level deeper than a payload's), in any encoding json.loads reads: a UTF-16
    character whose low byte is a quote once hid the brackets after it."""
    ids = '"conn_uuid":"c","msg_uuid":"m","uri":"u",' if kind != "event" else '"msg_uuid":"m",'

    def payload(depth: int) -> bytes:
        return ("{" + ids + '"x":"\u0122Ģ",' + '"args":' + nested(depth) + "}").encode(encoding)

    with pytest.raises(ValueError, match=f"{kind} payload is nested too deeply"):
        parse(payload(MAX_JSON_DEPTH - 1))  # (the payload: MAX_JSON_DEPTH deep)
    assert parse(payload(MAX_JSON_DEPTH - 2)).msg_uuid == "m"


def test_text_that_is_not_json_is_too_deep_by_its_opening_brackets():
    assert too_deep("[" * (MAX_JSON_DEPTH + 1))  # the decoder would go that deep before it fails
    assert not too_deep("[" * MAX_JSON_DEPTH)
    assert too_deep("[" * (MAX_JSON_DEPTH + 1) + '"unterminated ]]]]')
    assert not too_deep('"' + "[" * 5000)  # (inside a string that never ends)


@pytest.mark.timeout(60)
def test_adversarial_text_is_scanned_in_one_pass():
    """Escaped quotes in a string that never ends: a string pattern that could fail was tried
    at each quote, to the end of the text each time (quadratic: 34 s for 80 KB, hours for
    the 1 MiB a message may have), holding the GIL all along."""
    attack = "[" * (MAX_JSON_DEPTH + 1) + '"' + '\\"' * (512 * 1024)
    started = time.process_time()
    assert too_deep(attack) and too_deep(attack.encode())
    assert time.process_time() - started < 5  # (linear: well under a second)


def test_too_deep_reads_the_limit_at_each_call(monkeypatch):
    from juggler import jsondepth

    monkeypatch.setattr(jsondepth, "MAX_JSON_DEPTH", 5)
    assert jsondepth.too_deep(nested(6)) and not jsondepth.too_deep(nested(5))
