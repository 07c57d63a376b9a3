"""juggler.statesync.protocol: JSON Patch round trips (hypothesis) and what decode refuses."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from juggler.exceptions import ProtocolError
from juggler.statesync import protocol

from .statesync_util import same

scalars = st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
# keys with the characters JSON Pointer escapes ("/" and "~") and digits, that look like indexes
keys = st.text(alphabet="ab/~01-é", max_size=4)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(keys, children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(json_values, json_values)
def test_diff_then_apply_gives_the_target(src, dst):
    before = copy.deepcopy(src)
    patch = protocol.diff(src, dst)
    assert same(protocol.apply(src, patch), dst)
    assert same(src, before)  # apply makes a new value
    assert (patch == []) == same(src, dst)


@settings(max_examples=100, deadline=None)
@given(json_values, json_values)
def test_a_patch_survives_the_wire(src, dst):
    wire = protocol.encode(protocol.DATA, protocol.diff(src, dst))
    msg = protocol.decode(wire)
    assert msg.type == protocol.DATA
    # the receiver's copy of src came over the wire too
    assert same(protocol.apply(json.loads(json.dumps(src)), msg.payload), dst)


@settings(max_examples=100, deadline=None)
@given(st.lists(json_values, min_size=1, max_size=6))
def test_a_chain_of_patches_follows_every_change(values):
    """The receiver applies each patch to what it has so far, as a peer does."""
    sent, received = None, None
    for value in values:
        received = protocol.apply(received, protocol.diff(sent, value))
        sent = value
        assert same(received, value)


@given(json_values)
def test_message_round_trip(payload):
    for mtype in (protocol.MESSAGE, protocol.PING, protocol.PONG):
        msg = protocol.decode(protocol.encode(mtype, payload))
        assert msg.type == mtype and same(msg.payload, payload)


@given(json_values)
def test_snapshot_is_an_equal_copy(value):
    snap = protocol.snapshot(value)
    assert same(snap, value)
    if isinstance(value, (list, dict)):
        assert snap is not value


@pytest.mark.parametrize(
    "data, code, reason",
    [
        (b"\xff\xfe", 1007, "not valid UTF-8"),
        (b"{not json", 1007, "not valid JSON"),
        (b'{"type": "DATA", "payload": NaN}', 1007, "not valid JSON"),
        (b"[1, 2]", 1007, "not a JSON object"),
        (b'{"payload": 1}', 1007, "no 'type'"),
        (b'{"type": 5, "payload": 1}', 1007, "no 'type'"),
        (b'{"type": "HELLO", "payload": 1}', 1002, "unknown message type 'HELLO'"),
        (b'{"type": "MESSAGE"}', 1007, "MESSAGE message has no 'payload'"),
        (b'{"type": "DATA"}', 1007, "DATA message has no 'payload'"),
        (b'{"type": "DATA", "payload": {"op": "add"}}', 1007, "not a JSON Patch"),
        (b'{"type": "DATA", "payload": [1]}', 1007, "not a JSON Patch"),
        (b"[" * 100000 + b"]" * 100000, 1007, "nested too deeply"),
        (b'{"type": "MESSAGE", "payload": "\\ud800"}', 1007, "lone UTF-16 surrogate"),
        (b'{"type": "MESSAGE", "payload": 1e999}', 1007, "not valid JSON"),
    ],
)
def test_decode_refuses_with_a_close_code(data, code, reason):
    with pytest.raises(ProtocolError, match=reason) as info:
        protocol.decode(data)
    assert info.value.close_code == code


def test_ping_and_pong_need_no_payload():
    assert protocol.decode(b'{"type": "PING"}') == protocol.Message("PING", None)
    assert protocol.decode(b'{"type": "PONG", "payload": {}}') == protocol.Message("PONG", {})


@pytest.mark.parametrize(
    "doc, patch, reason",
    [
        ({"a": 1}, [{"op": "remove", "path": "/b"}], "non-existent"),
        ({"a": 1}, [{"op": "replace", "path": "/b/c", "value": 1}], "does not apply"),
        ([1], [{"op": "add", "path": "/5", "value": 1}], "does not apply"),
        ({"a": 1}, [{"op": "test", "path": "/a", "value": 2}], "does not apply"),
        ({"a": 1}, [{"op": "frobnicate", "path": "/a"}], "does not apply"),
        ({"a": 1}, [{"path": "/a"}], "does not apply"),
        ({"a": 1}, [{"op": "add", "path": "a", "value": 1}], "does not apply"),
        ({"a": 1}, [{"op": "move", "from": "/a", "path": "/a/b"}], "does not apply"),
        (None, [{"op": "add", "path": "/x", "value": 1}], "does not apply"),
        ("text", [{"op": "remove", "path": "/0"}], "does not apply"),
    ],
)
def test_a_patch_that_does_not_apply_is_the_peers_error(doc, patch, reason):
    before = copy.deepcopy(doc)
    with pytest.raises(ProtocolError, match=reason) as info:
        protocol.apply(doc, patch)
    assert info.value.close_code == 1007
    assert doc == before


def test_a_failing_patch_changes_nothing_half_way():
    doc = {"a": 1}
    with pytest.raises(ProtocolError):
        protocol.apply(doc, [{"op": "add", "path": "/b", "value": 2}, {"op": "remove", "path": "/zz"}])
    assert doc == {"a": 1}


@pytest.mark.parametrize("value, error", [({1, 2}, TypeError), (float("nan"), ValueError), ({"a": [float("inf")]}, ValueError),
                                          (object(), TypeError)])  # fmt: skip
def test_snapshot_refuses_what_is_not_json(value, error):
    with pytest.raises(error, match="JSON"):
        protocol.snapshot(value)


def test_rpc_messages():
    req = protocol.rpc_request(1, "add", [1, 2])
    assert req == {"type": "rpc", "id": 1, "direction": "request", "action": "add", "args": [1, 2]}
    assert protocol.parse_rpc(req) == protocol.RpcRequest(1, "add", [1, 2])
    res = protocol.rpc_response(1, False, "boom")
    assert protocol.parse_rpc(res) == protocol.RpcResponse(1, False, "boom")
    for other in ("text", None, [1], {"type": "other"}, {"no": "type"}):
        assert protocol.parse_rpc(other) is None


@pytest.mark.parametrize(
    "payload, reason",
    [
        ({"type": "rpc", "direction": "request", "action": "a", "args": []}, "'id'"),
        ({"type": "rpc", "id": True, "direction": "request", "action": "a", "args": []}, "'id'"),
        ({"type": "rpc", "id": 1, "direction": "sideways"}, "'direction'"),
        ({"type": "rpc", "id": 1, "direction": "request", "action": 5, "args": []}, "'action'"),
        ({"type": "rpc", "id": 1, "direction": "request", "action": "a", "args": {}}, "'args'"),
        ({"type": "rpc", "id": 1, "direction": "response", "result": 1}, "'success'"),
    ],
)
def test_rpc_messages_of_the_wrong_shape(payload, reason):
    with pytest.raises(ProtocolError, match=reason) as info:
        protocol.parse_rpc(payload)
    assert info.value.close_code == 1007
