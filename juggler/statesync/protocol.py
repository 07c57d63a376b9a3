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
from dataclasses import dataclass
from typing import Any, Optional, Union

import jsonpatch
import jsonpointer

from ..exceptions import ProtocolError
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
    "snapshot",
    "diff",
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

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007


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
    return ProtocolError(reason, CLOSE_INVALID_DATA)


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
        raise ProtocolError(f"unknown message type {mtype[:40]!r}", CLOSE_PROTOCOL_ERROR)
    if mtype in (DATA, MESSAGE) and "payload" not in obj:
        raise _invalid(f"{mtype} message has no 'payload'")
    payload = obj.get("payload")
    if mtype == DATA:
        if not isinstance(payload, list) or not all(isinstance(op, dict) for op in payload):
            raise _invalid("DATA payload is not a JSON Patch (an array of operation objects)")
    return Message(mtype, payload)


def snapshot(data: Any) -> Any:
    """A copy of ``data`` as JSON has it (tuples become lists): what is kept and diffed, so
    that changing the caller's object later changes nothing here. :class:`TypeError` or
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


def diff(src: Any, dst: Any) -> list[dict[str, Any]]:
    """The JSON Patch (RFC 6902) that turns ``src`` into ``dst``; ``[]`` when they are equal
    as JSON (``1`` and ``True`` are not)."""
    return jsonpatch.JsonPatch.from_diff(src, dst).patch


def apply(doc: Any, patch: list[dict[str, Any]]) -> Any:
    """``doc`` with the JSON Patch ``patch`` applied, as a new value (``doc`` is not changed,
    and a patch that fails half-way changes nothing). A patch that does not apply is the
    peer's error: :class:`~juggler.exceptions.ProtocolError` 1007."""
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
