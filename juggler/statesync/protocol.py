"""The state-sync protocol's messages, JSON Patch and the RPC convention.

Pure functions and frozen dataclasses: no sockets, threads or logging. A message is one JSON
object in one websocket text frame::

    {"type": "DATA" | "MESSAGE" | "PING" | "PONG", "payload": ...}

``DATA`` carries an RFC 6902 JSON Patch that turns the peer's last synced data into its
current data; ``MESSAGE`` any JSON; ``PING`` is answered with ``{"type": "PONG", "payload":
{}}``. :class:`RpcConnection <juggler.statesync.RpcConnection>` passes requests and responses
inside ``MESSAGE`` payloads (see :func:`parse_rpc`).

Errors in what the peer sent are :class:`~juggler.exceptions.ProtocolError` with the close
code that answers them: 1007 for a message that is not well-formed (not UTF-8, not JSON, not an
object, a payload of the wrong shape, a patch that does not apply), 1002 for a ``type`` this
protocol does not have.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import jsonpatch
import jsonpointer

from ..exceptions import ProtocolError
from ..frames import CloseCode
from ..message import parse_json

__all__ = [
    "DATA",
    "MESSAGE",
    "PING",
    "PONG",
    "TYPES",
    "Message",
    "encode",
    "decode",
    "check_data",
    "snapshot",
    "diff",
    "encode_patch",
    "apply",
    "RpcRequest",
    "RpcResponse",
    "rpc_request",
    "rpc_response",
    "parse_rpc",
]

DATA = "DATA"
MESSAGE = "MESSAGE"
PING = "PING"
PONG = "PONG"
TYPES = frozenset({DATA, MESSAGE, PING, PONG})



@dataclass(frozen=True)
class Message:
    """One message: its ``type`` (one of :data:`TYPES`) and its ``payload`` (a JSON value; a
    JSON Patch, a list, for ``DATA``)."""

    type: str
    payload: Any = None


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode(type: str, payload: Any) -> bytes:
    """The UTF-8 text of a message. :class:`TypeError` or :class:`ValueError` when ``payload``
    is not JSON (a set, NaN, ...)."""
    return _dumps({"type": type, "payload": payload}).encode("utf-8")


def _invalid(reason: str) -> ProtocolError:
    return ProtocolError(reason, CloseCode.INVALID_DATA)


def decode(data: Union[bytes, str]) -> Message:
    """Parse one message from the peer; :class:`~juggler.exceptions.ProtocolError` when it is
    not one (see the module's docstring for the close codes)."""
    obj = parse_json(data)  # ProtocolError 1007 for what is not UTF-8 JSON
    if not isinstance(obj, dict):
        raise _invalid("message is not a JSON object")
    mtype = obj.get("type")
    if not isinstance(mtype, str):
        raise _invalid("message has no 'type' string")
    if mtype not in TYPES:
        raise ProtocolError(f"unknown message type {mtype[:40]!r}", CloseCode.PROTOCOL_ERROR)
    if mtype in (DATA, MESSAGE) and "payload" not in obj:
        raise _invalid(f"{mtype} message has no 'payload'")
    payload = obj.get("payload")
    if mtype == DATA:
        if not isinstance(payload, list) or not all(isinstance(op, dict) for op in payload):
            raise _invalid("DATA payload is not a JSON Patch (an array of operation objects)")
    return Message(mtype, payload)


def check_data(data: Any) -> None:
    """What :meth:`Connection.set_local_data <juggler.statesync.Connection.set_local_data>`
    checks of ``data`` on the caller's thread, in O(1): its own type (a dict, list or tuple,
    str, int, float, bool or None; a float finite). What is inside is checked when it is first
    encoded (see :func:`encode_patch`). :class:`TypeError` or :class:`ValueError`."""
    if isinstance(data, (dict, list, tuple, str, int, bool)) or data is None:
        return
    if isinstance(data, float):
        if not math.isfinite(data):
            raise ValueError(f"{data!r} is not JSON")
        return
    raise TypeError(f"data is not JSON: {type(data).__name__} {data!r:.60}")


def snapshot(data: Any) -> Any:
    """A copy of ``data`` as JSON has it (tuples become lists): for an application that wants
    to keep changing its object after handing it over. :class:`TypeError` or
    :class:`ValueError` naming the problem when ``data`` is not JSON."""
    if data is None or isinstance(data, (str, int, float, bool)):
        if isinstance(data, float) and not math.isfinite(data):
            raise ValueError(f"{data!r} is not JSON")
        return data
    try:
        return json.loads(_dumps(data))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"data is not JSON: {exc}") from None
    except RecursionError:
        raise ValueError("data is nested too deeply to be JSON") from None


# --- JSON Patch: making one ----------------------------------------------------------------------
#
# jsonpatch's from_diff walks both values whole and compares every leaf through json.dumps: 2 ms
# for a 10 KB state, 125 ms for 1 MB, whatever changed. diff() below skips what the two values
# share (``is``: an application that builds its new state from the old one's parts pays for
# what changed only), compares equal containers at C speed (``==``, then json.dumps to tell
# ``1`` from ``True`` and ``1.0``), and emits only add, remove and replace, which every peer
# applies (hat-juggler's jsonpatch, its JavaScript, our demo page).


def _escape(key: Any) -> str:
    if type(key) is not str:
        raise TypeError(f"object key {key!r:.40} is not a string")
    if "~" in key or "/" in key:
        return key.replace("~", "~0").replace("/", "~1")
    return key


def _same(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are equal as JSON; a ``False`` for equal values is allowed
    (it costs a bigger patch, never a wrong one), a ``True`` for different ones is not."""
    if a is b:
        return True
    t = type(a)
    if t is not type(b):
        return False
    if t is float:
        return a == b and (a != 0.0 or math.copysign(1.0, a) == math.copysign(1.0, b))
    if t is dict or t is list or t is tuple:
        # == is C-speed but takes 1 for True and 1.0; the encodings tell them apart (and may
        # differ for equal dicts in another key order: allowed, see above)
        return a == b and _dumps(a) == _dumps(b)
    return a == b


def _diff(src: Any, dst: Any, path: str, ops: list[dict[str, Any]]) -> None:
    if src is dst:
        return
    ts, td = type(src), type(dst)
    if ts is dict and td is dict:
        if src == dst and _dumps(src) == _dumps(dst):
            return
        for key in src:
            if key not in dst:
                ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key, value in dst.items():
            if key in src:
                _diff(src[key], value, f"{path}/{_escape(key)}", ops)
            else:
                ops.append({"op": "add", "path": f"{path}/{_escape(key)}", "value": value})
    elif (ts is list or ts is tuple) and (td is list or td is tuple):
        _diff_lists(src, dst, path, ops)
    elif not _same(src, dst):
        ops.append({"op": "replace", "path": path, "value": dst})


def _diff_lists(src: Any, dst: Any, path: str, ops: list[dict[str, Any]]) -> None:
    """Trim the common head and tail; pair the middles item by item; remove what is left of
    the old one (from the end) or add what is left of the new one."""
    n, m = len(src), len(dst)
    i = 0
    while i < n and i < m and _same(src[i], dst[i]):
        i += 1
    j = 0
    while j < n - i and j < m - i and _same(src[n - 1 - j], dst[m - 1 - j]):
        j += 1
    a, b = n - i - j, m - i - j
    for k in range(i, i + min(a, b)):
        _diff(src[k], dst[k], f"{path}/{k}", ops)
    for k in range(i + a - 1, i + b - 1, -1):
        ops.append({"op": "remove", "path": f"{path}/{k}"})
    for k in range(i + a, i + b):
        ops.append({"op": "add", "path": f"{path}/{k}", "value": dst[k]})


def diff(src: Any, dst: Any) -> list[dict[str, Any]]:
    """The JSON Patch (RFC 6902: add, remove and replace operations) that turns ``src`` into
    ``dst``; ``[]`` when they are equal as JSON (``1``, ``1.0`` and ``True`` are not).
    Subtrees the two share (the same objects) are skipped unseen. The operations' values are
    ``dst``'s own objects, not copies. :class:`TypeError` for an object key that is not a
    string; other values that are not JSON fail when the patch is encoded."""
    ops: list[dict[str, Any]] = []
    try:
        _diff(src, dst, "", ops)
    except RecursionError:
        raise ValueError("data is nested too deeply to be JSON") from None
    return ops


def encode_patch(src: Any, dst: Any) -> Optional[bytes]:
    """The ``DATA`` message (its UTF-8 text) that turns ``src`` into ``dst``; ``None`` when
    they are equal. :class:`TypeError` or :class:`ValueError`, naming the problem, when
    ``dst`` is not JSON (in the parts that differ from ``src``)."""
    try:
        patch = diff(src, dst)
        return encode(DATA, patch) if patch else None
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"data is not JSON: {exc}") from None
    except RecursionError:
        raise ValueError("data is nested too deeply to be JSON") from None


# --- JSON Patch: applying one --------------------------------------------------------------------
#
# jsonpatch.apply_patch(doc, patch, in_place=False) deep-copies the whole document first, for
# every patch, however small. _apply() copies only the containers on the paths the operations
# touch, sharing the rest with the previous value (which nobody changes: remote data is
# read-only), for add, remove and replace on paths that exist as they should; anything else
# (move, copy, test, a path that does not resolve, a malformed operation) goes to jsonpatch,
# from the untouched original, so the result and the errors are jsonpatch's.

_INDEX = re.compile(r"0|[1-9][0-9]*")
_BAD_ESCAPE = re.compile(r"~(?![01])")


class _Unusual(Exception):
    """Not for the fast path: let jsonpatch do it."""


def _tokens(path: Any) -> list[str]:
    if type(path) is not str or (path and path[0] != "/"):
        raise _Unusual
    if not path:
        return []
    tokens = path[1:].split("/")
    if "~" in path:
        if _BAD_ESCAPE.search(path):
            raise _Unusual
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in tokens]
    return tokens


def _own(parent: Any, key: Any, mine: dict[int, Any]) -> Any:
    """``parent[key]``, a container copied for this patch (once: ``mine`` keeps the copies)."""
    node = parent[key]
    if id(node) not in mine:
        if type(node) is dict:
            node = dict(node)
        elif type(node) is list:
            node = node.copy()
        else:
            raise _Unusual
        parent[key] = node
        mine[id(node)] = node
    return node


def _key(node: Any, token: str, last: bool, kind: str) -> Any:
    """The key of ``token`` in ``node`` (a dict or list), if it resolves as it should: every
    token but the last must exist; the last one of an ``add`` may be a list's end."""
    if type(node) is dict:
        if not last and token not in node:
            raise _Unusual
        return token
    appending = last and kind == "add"
    if appending and token == "-":
        return len(node)
    if _INDEX.fullmatch(token) and (int(token) < len(node) or (appending and int(token) == len(node))):
        return int(token)
    raise _Unusual


def _apply_op(parent: Any, key: Any, kind: str, op: dict[str, Any]) -> None:
    """Do one add, remove or replace at ``parent[key]`` (copies of this patch's own)."""
    if kind == "add" and type(parent) is list:
        parent.insert(key, op["value"])
    elif kind == "add":
        parent[key] = op["value"]
    elif type(parent) is dict and key not in parent:
        raise _Unusual
    elif kind == "remove":
        del parent[key]
    else:
        parent[key] = op["value"]


def _apply(doc: Any, patch: list[dict[str, Any]]) -> Any:
    holder = [doc]
    mine: dict[int, Any] = {id(holder): holder}  # containers copied for this patch, kept alive
    for op in patch:
        kind = op.get("op")
        if kind not in ("add", "remove", "replace") or (kind != "remove" and "value" not in op):
            raise _Unusual
        tokens = _tokens(op.get("path"))
        if not tokens:  # the whole document
            if kind == "remove":
                raise _Unusual
            holder[0] = op["value"]
            continue
        parent: Any = holder
        key: Any = 0
        last = len(tokens) - 1
        for i, token in enumerate(tokens):
            parent = _own(parent, key, mine)
            key = _key(parent, token, i == last, kind)
        _apply_op(parent, key, kind, op)
    return holder[0]


def apply(doc: Any, patch: list[dict[str, Any]]) -> Any:
    """``doc`` with the JSON Patch ``patch`` applied, as a new value that shares what the
    patch does not touch with ``doc`` (``doc`` is not changed, and a patch that fails half-way
    changes nothing). A patch that does not apply is the peer's error:
    :class:`~juggler.exceptions.ProtocolError` 1007."""
    try:
        return _apply(doc, patch)
    except _Unusual:
        pass
    except (TypeError, KeyError, IndexError, ValueError, AttributeError, RecursionError):
        pass  # a malformed operation: jsonpatch names the problem
    try:
        return jsonpatch.apply_patch(doc, patch, in_place=False)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise _invalid(f"patch does not apply: {exc}") from None
    except (TypeError, KeyError, IndexError, ValueError, AttributeError) as exc:
        # jsonpatch lets a few malformed operations through as plain Python errors
        raise _invalid(f"patch does not apply: {type(exc).__name__}: {exc}") from None
    except RecursionError:
        raise _invalid("patch does not apply: nested too deeply") from None


# --- the RPC convention (hat-juggler's RpcConnection) ----------------------------------------------


@dataclass(frozen=True)
class RpcRequest:
    id: Any
    action: str
    args: list[Any]


@dataclass(frozen=True)
class RpcResponse:
    id: Any
    success: bool
    result: Any


def rpc_request(id: int, action: str, args: list[Any]) -> dict[str, Any]:
    """The ``MESSAGE`` payload that calls ``action(*args)`` on the peer."""
    return {"type": "rpc", "id": id, "direction": "request", "action": action, "args": list(args)}


def rpc_response(id: Any, success: bool, result: Any) -> dict[str, Any]:
    """The ``MESSAGE`` payload that answers request ``id``: its result, or with ``success``
    false the error's text."""
    return {"type": "rpc", "id": id, "direction": "response", "success": success, "result": result}


def parse_rpc(payload: Any) -> Optional[Union[RpcRequest, RpcResponse]]:
    """The RPC request or response a ``MESSAGE`` payload carries; ``None`` when it is not
    one (no ``"type": "rpc"``), :class:`~juggler.exceptions.ProtocolError` 1007 when it is
    one of the wrong shape."""
    if not isinstance(payload, dict) or payload.get("type") != "rpc":
        return None
    msg_id = payload.get("id")
    if isinstance(msg_id, bool) or not isinstance(msg_id, (int, str)):
        raise _invalid("rpc message 'id' must be an integer or a string")
    direction = payload.get("direction")
    if direction == "request":
        action, args = payload.get("action"), payload.get("args")
        if not isinstance(action, str):
            raise _invalid("rpc request 'action' must be a string")
        if not isinstance(args, list):
            raise _invalid("rpc request 'args' must be an array")
        return RpcRequest(msg_id, action, args)
    if direction == "response":
        success = payload.get("success")
        if not isinstance(success, bool):
            raise _invalid("rpc response 'success' must be a boolean")
        return RpcResponse(msg_id, success, payload.get("result"))
    raise _invalid("rpc message 'direction' must be 'request' or 'response'")
