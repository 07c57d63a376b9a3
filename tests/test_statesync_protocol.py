"""juggler.statesync.protocol: JSON Patch round trips (hypothesis) and what decode refuses."""

from __future__ import annotations

import copy
import json

import jsonpatch
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


# -- our diff and apply against jsonpatch (what hat-juggler's peers use) -------------------------


def over_the_wire(value):
    return json.loads(json.dumps(value))


@settings(max_examples=300, deadline=None)
@given(json_values, json_values)
def test_our_diff_applied_by_jsonpatch_gives_the_target(src, dst):
    patch = protocol.diff(src, dst)
    assert {op["op"] for op in patch} <= {"add", "remove", "replace"}
    # what a hat-juggler peer does with it: decode the message, jsonpatch.apply_patch
    message = protocol.encode_patch(src, dst)
    assert (message is None) == (patch == []) == same(src, dst)
    if message is not None:
        received = json.loads(message)["payload"]
        assert same(jsonpatch.apply_patch(over_the_wire(src), received), dst)


@st.composite
def shared_edits(draw):
    """A value and a new one built from it as the docs ask: new containers along the paths
    of a few edits, every other part the old value's own objects."""
    src = draw(json_values)

    def edit(value):
        if isinstance(value, dict) and value and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(value)))
            return {**value, key: edit(value[key])}
        if isinstance(value, list) and value and draw(st.booleans()):
            i = draw(st.integers(0, len(value) - 1))
            how = draw(st.sampled_from(["into", "insert", "remove"]))
            if how == "into":
                return value[:i] + [edit(value[i])] + value[i + 1 :]
            if how == "insert":
                return value[:i] + [draw(json_values)] + value[i:]
            return value[:i] + value[i + 1 :]
        if isinstance(value, dict) and draw(st.booleans()):
            return {**value, draw(keys): draw(json_values)}
        return draw(json_values)

    dst = src
    for _ in range(draw(st.integers(1, 3))):
        dst = edit(dst)
    return src, dst


@settings(max_examples=300, deadline=None)
@given(shared_edits())
def test_our_diff_of_values_that_share_parts(pair):
    src, dst = pair
    before = over_the_wire(src)
    patch = protocol.diff(src, dst)
    assert same(jsonpatch.apply_patch(over_the_wire(src), over_the_wire(patch)), dst)
    assert same(protocol.apply(over_the_wire(src), over_the_wire(patch)), dst)
    assert same(src, before)  # diff changes nothing


def test_a_small_change_to_a_big_shared_state_is_a_small_patch():
    items = {f"k{i}": {"name": f"item {i}", "tags": list(range(i % 7))} for i in range(10000)}
    src = {"items": items, "count": 0}
    dst = {**src, "items": {**items, "k5": {"name": "five"}}, "count": 1}
    assert protocol.diff(src, dst) == [
        {"op": "remove", "path": "/items/k5/tags"},
        {"op": "replace", "path": "/items/k5/name", "value": "five"},
        {"op": "replace", "path": "/count", "value": 1},
    ]
    # the same value built anew: equal, whatever it costs to find out
    assert protocol.diff(dst, over_the_wire(dst)) == []
    # 1, 1.0 and True differ on the wire; 0.0 and -0.0 too
    assert protocol.diff({"a": [1]}, {"a": [True]}) == [{"op": "replace", "path": "/a/0", "value": True}]
    assert protocol.diff([1], [1.0]) == [{"op": "replace", "path": "/0", "value": 1.0}]
    assert protocol.diff({"a": 0.0}, {"a": -0.0}) == [{"op": "replace", "path": "/a", "value": -0.0}]


def test_what_is_not_json_fails_when_the_patch_is_encoded():
    protocol.check_data({"a": {1, 2}})  # O(1): only the value's own type
    for value, error in (({1, 2}, TypeError), (float("nan"), ValueError), (object(), TypeError)):
        with pytest.raises(error, match="JSON"):
            protocol.check_data(value)
    with pytest.raises(TypeError, match="not JSON: .*set"):
        protocol.encode_patch(None, {"a": {1, 2}})
    with pytest.raises(TypeError, match="not JSON: object key 1 is not a string"):
        protocol.encode_patch({"a": 1}, {1: 2})
    with pytest.raises(ValueError, match="not JSON"):
        protocol.encode_patch({"a": 1}, {"a": float("inf")})


paths = st.sampled_from(["", "/a", "/b", "/0", "/1", "/-", "/01", "/a/0", "/a/-", "/a/b", "/0/a", "/~1", "/~0a", "/~2",
                         "a", "/a/0/b", "/a~1b"])  # fmt: skip
operations = st.fixed_dictionaries(
    {"op": st.sampled_from(["add", "remove", "replace", "move", "copy", "test", "nope"]), "path": paths},
    optional={"value": json_values, "from": paths},
)


def jsonpatch_outcome(doc, patch):
    try:
        return True, jsonpatch.apply_patch(doc, patch, in_place=False)
    except Exception:
        return False, None


@settings(max_examples=500, deadline=None)
@given(json_values | st.dictionaries(st.sampled_from(["a", "b", "/", "~"]), json_values, max_size=3), st.lists(operations, max_size=4))
def test_our_apply_does_what_jsonpatch_does(doc, patch):
    before = over_the_wire(doc)
    ok, expected = jsonpatch_outcome(over_the_wire(doc), over_the_wire(patch))
    if ok:
        assert same(protocol.apply(doc, patch), expected)
    else:
        with pytest.raises(ProtocolError) as exc:
            protocol.apply(doc, patch)
        assert exc.value.close_code == 1007
    assert same(doc, before)  # all or nothing: doc itself never changes


def test_apply_shares_what_the_patch_does_not_touch():
    doc = {"a": {"x": [1, 2]}, "b": {"y": 1}}
    new = protocol.apply(doc, [{"op": "add", "path": "/a/x/-", "value": 3}])
    assert new == {"a": {"x": [1, 2, 3]}, "b": {"y": 1}}
    assert doc == {"a": {"x": [1, 2]}, "b": {"y": 1}}
    assert new["b"] is doc["b"]
