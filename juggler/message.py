"""The juggler.0 protocol: messages, their JSON encoding, and the redis payloads.

This module is pure: frozen dataclasses plus :func:`encode` and :func:`decode`; no sockets,
threads, redis or logging. Everything else in juggler is I/O around it.

Wire facts (see ``docs/protocol.rst``): every message is
``{"meta": {"type": <int>, "uuid": "<uuid>"}, "payload": {...}}``; durations are integer
nanoseconds on the wire and float seconds in Python.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from . import jsondepth
from .exceptions import ProtocolError
from .frames import OP_TEXT, CloseCode, frame_header

__all__ = [
    "SUBPROTOCOL",
    "MessageType",
    "CLIENT_TYPES",
    "SERVER_TYPES",
    "DEFAULT_CALL_TIMEOUT",
    "Call",
    "Pub",
    "Sub",
    "Unsb",
    "Ack",
    "Nack",
    "Res",
    "Evnt",
    "Position",
    "evnt_frame",
    "Message",
    "Request",
    "encode",
    "encode_payload",
    "decode",
    "parse_json",
    "new_uuid",
    "effective_timeout",
    "CallPayload",
    "ResultPayload",
    "EventPayload",
    "error_result",
    "result_error_message",
]

#: The websocket subprotocol of the juggler.0 protocol (``Sec-WebSocket-Protocol``): the one
#: place it is defined in Python (the server's handshake and the clients use it).
SUBPROTOCOL = "juggler.0"

#: A CALL timeout of 0, a negative one or one under a millisecond means this default (seconds).
DEFAULT_CALL_TIMEOUT = 60.0


class MessageType(enum.IntEnum):
    """The integer in ``meta.type``."""

    CALL = 1
    PUB = 2
    SUB = 3
    UNSB = 4
    NACK = 7
    ACK = 8
    RES = 9
    EVNT = 10


#: Types a client sends.
CLIENT_TYPES = frozenset({MessageType.CALL, MessageType.PUB, MessageType.SUB, MessageType.UNSB})
#: Types a server sends.
SERVER_TYPES = frozenset({MessageType.NACK, MessageType.ACK, MessageType.RES, MessageType.EVNT})


_UUID_BATCH = 256  # UUIDs made from one os.urandom call
_uuids: list[str] = []  # made, not handed out yet; list.pop() is atomic, so no lock
# a forked child must not hand out the UUIDs its parent will
os.register_at_fork(after_in_child=_uuids.clear)


def _make_uuids() -> list[str]:
    raw = bytearray(os.urandom(16 * _UUID_BATCH))
    raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])  # the RFC 4122 variant
    h = raw.hex()
    return [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-{h[i + 20:i + 32]}"
            for i in range(0, len(h), 32)]  # fmt: skip


def new_uuid() -> str:
    """A random (version 4) UUID as the lowercase 36-character string the protocol uses.

    As random as ``uuid.uuid4()`` (``os.urandom``), made a batch at a time: a server makes two
    per call and one per event delivered."""
    while True:
        try:
            return _uuids.pop()
        except IndexError:
            _uuids.extend(_make_uuids())


def effective_timeout(timeout: float) -> float:
    """The timeout a server applies to a CALL that asked for ``timeout`` seconds."""
    if timeout < 0.001:
        return DEFAULT_CALL_TIMEOUT
    return timeout


@dataclass(frozen=True)
class Call:
    """CALL: run the function registered at ``uri`` with ``args``.

    ``timeout`` is in seconds; 0 means the server's default (:data:`DEFAULT_CALL_TIMEOUT`).
    """

    uri: str
    args: Any = None
    timeout: float = 0.0
    uuid: str = field(default_factory=new_uuid)
    type = MessageType.CALL


@dataclass(frozen=True)
class Pub:
    """PUB: publish ``args`` on ``channel``."""

    channel: str
    args: Any = None
    uuid: str = field(default_factory=new_uuid)
    type = MessageType.PUB


@dataclass(frozen=True)
class Position:
    """Where a subscriber is in a channel's history: the ``offset`` of the last event it got
    (a string, increasing per channel) in history ``epoch`` (a random string that changes
    when the history is lost). See ``docs/protocol.rst``, "History and recovery"."""

    offset: str
    epoch: str


@dataclass(frozen=True)
class Sub:
    """SUB: subscribe to ``channel``, a redis glob pattern when ``pattern`` is true.

    ``since``: recover the events after this position from the channel's history first (an
    extension: a Go server ignores it)."""

    channel: str
    pattern: bool = False
    uuid: str = field(default_factory=new_uuid)
    since: Optional[Position] = None
    type = MessageType.SUB


@dataclass(frozen=True)
class Unsb:
    """UNSB: undo a SUB with the same ``channel`` and ``pattern``."""

    channel: str
    pattern: bool = False
    uuid: str = field(default_factory=new_uuid)
    type = MessageType.UNSB


#: A message a client sends.
Request = Union[Call, Pub, Sub, Unsb]


@dataclass(frozen=True, init=False)
class Ack:
    """ACK: the server accepted request ``for_uuid`` of type ``for_type``.

    ``Ack(request)`` answers a request message; ``Ack(for_uuid, for_type, uri=..., channel=...)``
    gives every field.

    The ACK of a SUB of a channel with history carries the subscriber's ``position`` in it
    (the last event before the subscription), and, when the SUB asked to recover
    (``since``), whether it did (``recovered``; ``None``: not asked). Extensions: a Go
    client ignores them.
    """

    for_uuid: str
    for_type: MessageType
    uri: str = ""
    channel: str = ""
    uuid: str = field(default_factory=new_uuid)
    recovered: Optional[bool] = None
    position: Optional[Position] = None
    type = MessageType.ACK

    def __init__(self, for_uuid: Any, for_type: Optional[MessageType] = None, uri: str = "", channel: str = "",
                 uuid: Optional[str] = None, recovered: Optional[bool] = None,
                 position: Optional[Position] = None) -> None:  # fmt: skip
        if isinstance(for_uuid, _REQUESTS):
            request = for_uuid
            for_uuid, for_type = request.uuid, request.type
            uri, channel = _target(request)
        elif for_type is None:
            raise TypeError("Ack needs the request, or for_uuid and for_type")
        # (one dict update: an ACK is made per request, on the reader's path)
        self.__dict__.update(for_uuid=for_uuid, for_type=for_type if type(for_type) is MessageType else MessageType(for_type),
                             uri=uri, channel=channel, uuid=uuid or new_uuid(), recovered=recovered, position=position)  # fmt: skip

    @classmethod
    def to(cls, request: "Request") -> "Ack":
        """The ACK that answers ``request`` (the same as ``Ack(request)``)."""
        return cls(request)


@dataclass(frozen=True, init=False)
class Nack:
    """NACK: the server refused request ``for_uuid``; ``code`` is HTTP-like.

    ``Nack(request, code, message)`` refuses a request message, e.g.
    ``conn.send(Nack(msg, 403, "forbidden"))``; ``Nack(for_uuid, for_type, code, message,
    uri=..., channel=...)`` gives every field.
    """

    for_uuid: str
    for_type: MessageType
    code: int
    message: str
    uri: str = ""
    channel: str = ""
    uuid: str = field(default_factory=new_uuid)
    type = MessageType.NACK

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args and isinstance(args[0], _REQUESTS):
            request, rest = args[0], list(args[1:])
            code = rest.pop(0) if rest else kwargs.pop("code")
            message = rest.pop(0) if rest else kwargs.pop("message", "")
            if rest:
                raise TypeError("Nack(request, code, message) takes no more positional arguments")
            uri, channel = _target(request)
            fields = dict(for_uuid=request.uuid, for_type=request.type, code=code, message=message, uri=uri,
                          channel=channel, uuid=kwargs.pop("uuid", None))  # fmt: skip
            if kwargs:
                raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        else:
            names = ("for_uuid", "for_type", "code", "message", "uri", "channel", "uuid")
            if len(args) > len(names):
                raise TypeError("too many arguments for Nack")
            fields = dict(zip(names, args))
            for k, v in kwargs.items():
                if k not in names or k in fields:
                    raise TypeError(f"unexpected or repeated argument {k!r}")
                fields[k] = v
            missing = [n for n in names[:4] if n not in fields]
            if missing:
                raise TypeError(f"Nack needs the request, or {', '.join(missing)}")
        _set(
            self,
            for_uuid=fields["for_uuid"],
            for_type=MessageType(fields["for_type"]),
            code=fields["code"],
            message=fields["message"],
            uri=fields.get("uri") or "",
            channel=fields.get("channel") or "",
            uuid=fields.get("uuid") or new_uuid(),
        )

    @classmethod
    def to(cls, request: "Request", code: int, message: str) -> "Nack":
        """The NACK that refuses ``request`` (the same as ``Nack(request, code, message)``)."""
        return cls(request, code, message)


def _set(obj: Any, **values: Any) -> None:
    for name, value in values.items():
        object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class Res:
    """RES: the result ``args`` of CALL ``for_uuid``."""

    for_uuid: str
    uri: str = ""
    args: Any = None
    uuid: str = field(default_factory=new_uuid)
    type = MessageType.RES


@dataclass(frozen=True)
class Evnt:
    """EVNT: ``args`` published by PUB ``for_uuid`` on ``channel``.

    ``pattern`` is the subscription pattern it matched, or ``""`` for a plain subscription.
    ``offset`` and ``epoch``: its place in the channel's history (``""``: the channel keeps
    none); an extension a Go client ignores.
    """

    for_uuid: str
    channel: str
    args: Any = None
    pattern: str = ""
    uuid: str = field(default_factory=new_uuid)
    offset: str = ""
    epoch: str = ""
    type = MessageType.EVNT

    @property
    def position(self) -> Optional[Position]:
        """Its :class:`Position`, or ``None`` for an event of a channel with no history."""
        return Position(self.offset, self.epoch) if self.offset else None

    def sharing(self, payload_json: str) -> "Evnt":
        """This EVNT, encoded with ``payload_json`` (its payload's JSON, made once for every
        subscriber of one event: only ``meta.uuid`` differs between their messages)."""
        object.__setattr__(self, "_payload_json", payload_json)
        return self


Message = Union[Call, Pub, Sub, Unsb, Ack, Nack, Res, Evnt]


_REQUESTS = (Call, Pub, Sub, Unsb)


def _target(request: Request) -> tuple[str, str]:
    """The (uri, channel) an ACK or NACK of ``request`` carries."""
    if type(request) is Call or isinstance(request, Call):
        return request.uri, ""
    return "", request.channel


# --- encoding -------------------------------------------------------------------------------

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _seconds_to_ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def _payload(msg: Message) -> dict[str, Any]:
    if isinstance(msg, Call):
        return {"uri": msg.uri, "timeout": _seconds_to_ns(msg.timeout), "args": msg.args}
    if isinstance(msg, Pub):
        return {"channel": msg.channel, "args": msg.args}
    if isinstance(msg, (Sub, Unsb)):
        p: dict[str, Any] = {"channel": msg.channel, "pattern": msg.pattern}
        if isinstance(msg, Sub) and msg.since is not None:
            p["since"] = {"offset": msg.since.offset, "epoch": msg.since.epoch}
        return p
    if isinstance(msg, (Ack, Nack)):
        p = {"for": msg.for_uuid, "for_type": int(msg.for_type)}
        if msg.uri:
            p["uri"] = msg.uri
        if msg.channel:
            p["channel"] = msg.channel
        if isinstance(msg, Nack):
            p["code"] = msg.code
            p["message"] = msg.message
        else:
            _ack_extensions(msg, p)
        return p
    if isinstance(msg, Res):
        p = {"for": msg.for_uuid}
        if msg.uri:
            p["uri"] = msg.uri
        p["args"] = msg.args
        return p
    if isinstance(msg, Evnt):
        p = {"for": msg.for_uuid, "channel": msg.channel}
        if msg.pattern:
            p["pattern"] = msg.pattern
        p["args"] = msg.args
        if msg.offset:
            p["offset"] = msg.offset
            p["epoch"] = msg.epoch
        return p
    raise TypeError(f"not a juggler message: {msg!r}")


def _ack_extensions(msg: Ack, p: dict[str, Any]) -> None:
    if msg.recovered is not None:
        p["recovered"] = msg.recovered
    if msg.position is not None:
        p["offset"] = msg.position.offset
        p["epoch"] = msg.position.epoch


def encode(msg: Message) -> str:
    """The JSON text of ``msg``.

    Raises :class:`ValueError` (or :class:`TypeError`) when ``args`` is not JSON-serializable.
    """
    shared = msg.__dict__.get("_payload_json") if msg.type is MessageType.EVNT else None
    if shared is not None:  # see Evnt.sharing: the same text _dumps makes, payload made once
        uuid = msg.uuid if _PLAIN_UUID.fullmatch(msg.uuid) else None
        quoted = f'"{uuid}"' if uuid is not None else _dumps(msg.uuid)
        return f'{{"meta":{{"type":10,"uuid":{quoted}}},"payload":{shared}}}'
    return _dumps({"meta": {"type": int(msg.type), "uuid": msg.uuid}, "payload": _payload(msg)})


_PLAIN_UUID = re.compile(r"[0-9a-f-]{36}")  # needs no escaping in JSON


def encode_payload(msg: Message) -> str:
    """The JSON text of ``msg``'s payload alone."""
    return _dumps(_payload(msg))


_EVNT_BEFORE = b'{"meta":{"type":10,"uuid":"'


def evnt_frame(payload_json: str) -> tuple[bytes, bytes, int]:
    """``(head, tail, size)`` for an EVNT whose payload's JSON is ``payload_json`` (see
    :meth:`Evnt.sharing`): its websocket text frame is ``head``, the message's 36-character
    UUID, then ``tail``; ``size`` is the message's JSON length. The same bytes as
    :func:`encode` and :func:`~juggler.frames.encode_frame` make, built once for every
    subscriber of an event."""
    after = b'"},"payload":' + payload_json.encode("utf-8") + b"}"
    size = len(_EVNT_BEFORE) + 36 + len(after)
    return frame_header(OP_TEXT, size) + _EVNT_BEFORE, after, size


# --- decoding -------------------------------------------------------------------------------

def _invalid(reason: str) -> ProtocolError:
    return ProtocolError(reason, CloseCode.INVALID_DATA)


def _get(payload: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = payload.get(name, default)
    if value is None and default is not None:
        # JSON null where a value is expected: treat as absent, as Go's decoder does.
        return default
    if value is default:
        return value
    if isinstance(value, bool) and kind is not bool:
        raise _invalid(f"payload field {name!r} must be {_kind_name(kind)}")
    if not isinstance(value, kind):
        raise _invalid(f"payload field {name!r} must be {_kind_name(kind)}")
    return value


def _require(payload: Mapping[str, Any], name: str, kind: type) -> Any:
    if name not in payload or payload[name] is None:
        raise _invalid(f"payload field {name!r} is missing")
    return _get(payload, name, kind, None)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer"}.get(kind, "valid")  # type: ignore[arg-type]


_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")


def _uuid_field(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"{what} must be a UUID string")
    if not _UUID_RE.match(value):
        raise _invalid(f"{what} is not a 36-character UUID: {value[:40]!r}")
    return value


_REQUEST_VALUES = frozenset(int(t) for t in CLIENT_TYPES)
_INT64 = 1 << 63


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: valid JSON, but no float (nor Go float64) holds it
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _for_type(value: Any) -> MessageType:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid("payload field 'for_type' must be an integer")
    if value not in _REQUEST_VALUES:
        raise _invalid(f"payload field 'for_type' is not a request type: {value}")
    return MessageType(value)


# json.loads makes a decoder per call (2 µs); its scanner, made once, parses the same way
_scan_once = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float).scan_once


def parse_json(data: str | bytes) -> Any:
    """The JSON value of a message's text (also the state-sync protocol's). Raises
    :class:`~juggler.exceptions.ProtocolError` with close code 1007 when it is not UTF-8, not
    JSON (``NaN`` and numbers out of range included), nested too deeply, or holds a lone
    UTF-16 surrogate."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid("message is not valid UTF-8") from None
    if jsondepth.too_deep(data):
        raise _invalid("message is nested too deeply")
    try:
        obj, end = _scan_once(data, 0)  # the usual text: a value, nothing around it
        if end != len(data):
            raise ValueError
    except (ValueError, StopIteration, RecursionError):
        obj = _loads(data)  # anything else: json.loads decides (and words the error)
    if "\\ud" in data or "\\uD" in data:
        _check_surrogates(obj)
    return obj


def _loads(data: str) -> Any:
    try:
        return json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
    except ValueError as exc:
        raise _invalid(f"message is not valid JSON: {getattr(exc, 'msg', exc)}") from None
    except RecursionError:
        raise _invalid("message is nested too deeply") from None


def _check_surrogates(obj: Any) -> None:
    """An escaped surrogate is valid only as part of a pair. A lone one decodes to a string
    that cannot be encoded again (Go would replace it): refuse the message."""
    try:
        _dumps(obj).encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("message contains a lone UTF-16 surrogate") from None


def decode(data: str | bytes, types: Optional[frozenset[MessageType]] = None) -> Message:
    """Parse one juggler message.

    Raises :class:`~juggler.exceptions.ProtocolError` with close code 1007 when the text is not
    a well-formed message (including JSON that Go would refuse: ``NaN``, lone surrogates, a
    timeout outside int64), and 1002 when ``meta.type`` is not a juggler message type or, given
    ``types``, not one of those (checked before the payload).
    """
    obj = parse_json(data)
    call = _plain_call(obj, types)
    return call if call is not None else _message(obj, types)


def _message(obj: Any, types: Optional[frozenset[MessageType]]) -> Message:
    """:func:`decode`'s message of ``obj``, the JSON value of its text."""
    if not isinstance(obj, dict):
        raise _invalid("message is not a JSON object")
    meta = obj.get("meta")
    if not isinstance(meta, dict):
        raise _invalid("message has no 'meta' object")
    raw_type = meta.get("type")
    if isinstance(raw_type, bool) or not isinstance(raw_type, int):
        raise _invalid("meta.type must be an integer")
    try:
        mtype = MessageType(raw_type)
    except ValueError:
        raise ProtocolError(f"unknown message type {raw_type}", CloseCode.PROTOCOL_ERROR) from None
    if types is not None and mtype not in types:
        side = "server" if mtype in SERVER_TYPES else "client"
        raise ProtocolError(f"{mtype.name} is a {side} message", CloseCode.PROTOCOL_ERROR)
    muuid = _uuid_field(meta.get("uuid"), "meta.uuid")
    payload = obj.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise _invalid("message 'payload' must be a JSON object")

    if mtype is MessageType.CALL:
        timeout_ns = _get(payload, "timeout", int, 0)
        if not -_INT64 <= timeout_ns < _INT64:
            raise _invalid("payload field 'timeout' is outside the int64 range of nanoseconds")
        return Call(
            uri=_get(payload, "uri", str, ""),
            args=payload.get("args"),
            timeout=max(timeout_ns, 0) / 1e9,
            uuid=muuid,
        )
    if mtype is MessageType.PUB:
        return Pub(channel=_get(payload, "channel", str, ""), args=payload.get("args"), uuid=muuid)
    if mtype is MessageType.SUB:
        return Sub(channel=_get(payload, "channel", str, ""), pattern=_get(payload, "pattern", bool, False),
                   uuid=muuid, since=_since(payload.get("since")))  # fmt: skip
    if mtype is MessageType.UNSB:
        return Unsb(channel=_get(payload, "channel", str, ""), pattern=_get(payload, "pattern", bool, False), uuid=muuid)
    for_uuid = _uuid_field(payload.get("for"), "payload field 'for'")
    if mtype in (MessageType.ACK, MessageType.NACK):
        common = dict(
            for_uuid=for_uuid,
            for_type=_for_type(payload.get("for_type")),
            uri=_get(payload, "uri", str, ""),
            channel=_get(payload, "channel", str, ""),
            uuid=muuid,
        )
        if mtype is MessageType.ACK:
            return Ack(recovered=_get(payload, "recovered", bool, None), position=_position(payload), **common)
        return Nack(code=_require(payload, "code", int), message=_get(payload, "message", str, ""), **common)
    if mtype is MessageType.RES:
        return Res(for_uuid=for_uuid, uri=_get(payload, "uri", str, ""), args=payload.get("args"), uuid=muuid)
    # EVNT
    return Evnt(
        for_uuid=for_uuid,
        channel=_get(payload, "channel", str, ""),
        args=payload.get("args"),
        pattern=_get(payload, "pattern", str, ""),
        uuid=muuid,
        offset=_get(payload, "offset", str, ""),
        epoch=_get(payload, "epoch", str, ""),
    )


def _plain_call(obj: Any, types: Optional[frozenset[MessageType]]) -> Optional[Call]:
    """The :class:`Call` of a CALL message with every field as a client usually sends it (a
    string ``uri``, an integer ``timeout`` in the int64 range, not negative): the same
    message :func:`decode` makes of it, made with less work; ``None`` for any other message,
    which :func:`decode` looks at in full (and refuses, if it must)."""
    meta = obj.get("meta") if type(obj) is dict else None
    if type(meta) is not dict:
        return None
    mtype = meta.get("type")
    if mtype != 1 or type(mtype) is not int or (types is not None and MessageType.CALL not in types):
        return None
    muuid = meta.get("uuid")
    payload = obj.get("payload")
    if type(muuid) is not str or not _UUID_RE.match(muuid) or type(payload) is not dict:
        return None
    uri = payload.get("uri")
    timeout_ns = payload.get("timeout", 0)
    if type(uri) is not str or type(timeout_ns) is not int or not 0 <= timeout_ns < _INT64:
        return None
    call = object.__new__(Call)
    call.__dict__.update(uri=uri, args=payload.get("args"), timeout=timeout_ns / 1e9, uuid=muuid)
    return call


#: The longest ``offset`` or ``epoch`` a SUB's ``since`` may carry.
MAX_POSITION_LENGTH = 64


def _since(value: Any) -> Optional[Position]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid("payload field 'since' must be an object with 'offset' and 'epoch'")
    position = _position(value)
    if position is None:
        raise _invalid("payload field 'since' has no 'offset'")
    if len(position.offset) > MAX_POSITION_LENGTH or len(position.epoch) > MAX_POSITION_LENGTH:
        raise _invalid(f"payload field 'since': offset and epoch are at most {MAX_POSITION_LENGTH} characters")
    return position


def _position(payload: Mapping[str, Any]) -> Optional[Position]:
    offset = _get(payload, "offset", str, "")
    return Position(offset, _get(payload, "epoch", str, "")) if offset else None


@dataclass(frozen=True)
class CallPayload:
    """A call as it waits in ``juggler:calls:{URI}``."""

    conn_uuid: str
    msg_uuid: str
    uri: str
    args: Any = None

    def to_json(self) -> str:
        return _redis_payload_json(self.conn_uuid, self.msg_uuid, self.uri, self.args)

    @classmethod
    def from_json(cls, data: str | bytes) -> "CallPayload":
        return cls(**_parse_redis_payload(data, "call"))


@dataclass(frozen=True)
class ResultPayload:
    """A result as it waits in ``juggler:results:{CONNUUID}``."""

    conn_uuid: str
    msg_uuid: str
    uri: str
    args: Any = None

    def to_json(self) -> str:
        return _redis_payload_json(self.conn_uuid, self.msg_uuid, self.uri, self.args)

    @classmethod
    def from_json(cls, data: str | bytes) -> "ResultPayload":
        return cls(**_parse_redis_payload(data, "result"))


_quote = json.encoder.encode_basestring  # (in C where it can be) a JSON string, as _dumps writes it
# a value's JSON as _dumps writes it, from an encoder made once (_dumps makes one per call), with
# no check for circular references (a circular value recurses: _dumps says why)
try:  # (CPython's private C encoder: where it is missing or takes other arguments, _dumps)
    _encode_value = json.encoder.c_make_encoder(None, json.JSONEncoder().default, _quote, None, ":", ",", False, False, False)  # fmt: skip
except (AttributeError, TypeError, ValueError):
    _encode_value = None


def _value_json(value: Any) -> str:
    """``_dumps(value)``, faster; the same exceptions for a value it cannot encode."""
    if type(value) is str:
        return _quote(value)
    if _encode_value is not None:
        try:
            return "".join(_encode_value(value, 0))
        except Exception:  # (RecursionError too) the error, as _dumps words it, below
            pass
    return _dumps(value)


def _redis_payload_json(conn_uuid: str, msg_uuid: str, uri: str, args: Any) -> str:
    """The JSON of a :class:`CallPayload` or :class:`ResultPayload` with these fields (args
    omitted when ``None``): the text ``_dumps`` makes of their dict, with less work
    (tests/test_incoming_bytes.py compares them)."""
    if type(conn_uuid) is str and type(msg_uuid) is str and type(uri) is str:
        head = f'{{"conn_uuid":{_quote(conn_uuid)},"msg_uuid":{_quote(msg_uuid)},"uri":{_quote(uri)}'
        return head + "}" if args is None else f'{head},"args":{_value_json(args)}}}'
    d = {"conn_uuid": conn_uuid, "msg_uuid": msg_uuid, "uri": uri}  # (not strings: _dumps decides)
    return _dumps(d if args is None else {**d, "args": args})


def _check_depth(data: str | bytes, what: str) -> None:
    """ValueError if the JSON ``data`` from redis nests deeper than juggler decodes: one level
    less than a websocket message, whose envelope is a level deeper than a payload's (so that a
    result or an event a server takes from redis is not too deep for its clients)."""
    if jsondepth.too_deep(data, jsondepth.MAX_JSON_DEPTH - 1):
        raise ValueError(f"{what} payload is nested too deeply")


def _parse_redis_payload(data: str | bytes, what: str) -> dict[str, Any]:
    _check_depth(data, what)
    try:  # the usual text first (json.loads' scanner, made once: 3 frames less deep); else json.loads
        text = data if isinstance(data, str) else data.decode("utf-8")
        obj, end = _scan_once(text, 0)
        if end != len(text):
            raise ValueError
    except (ValueError, StopIteration, RecursionError):
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise ValueError(f"{what} payload is not valid JSON: {exc}") from None
        except RecursionError:  # deeper than this thread can decode: undecodable, not a crash
            raise ValueError(f"{what} payload is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} payload is not a JSON object")
    out = {}
    for name in ("conn_uuid", "msg_uuid", "uri"):
        value = obj.get(name, "")
        if not isinstance(value, str):
            raise ValueError(f"{what} payload field {name!r} must be a string")
        out[name] = value
    out["args"] = obj.get("args")
    return out


@dataclass(frozen=True)
class EventPayload:
    """What a PUB publishes on its redis channel. An event of a channel with history carries
    its ``offset`` and ``epoch`` too (added by the publishing script: see
    :mod:`juggler.history`; a Go server ignores them)."""

    msg_uuid: str
    args: Any = None
    offset: str = ""
    epoch: str = ""

    def to_json(self) -> str:
        return _dumps({"msg_uuid": self.msg_uuid, "args": self.args})

    @classmethod
    def from_json(cls, data: str | bytes) -> "EventPayload":
        _check_depth(data, "event")
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise ValueError(f"event payload is not valid JSON: {exc}") from None
        except RecursionError:
            raise ValueError("event payload is nested too deeply") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("msg_uuid", ""), str):
            raise ValueError("event payload is not an object with a string 'msg_uuid'")
        offset, epoch = obj.get("offset", ""), obj.get("epoch", "")
        if not (isinstance(offset, str) and isinstance(epoch, str)):
            offset = epoch = ""  # (not ours: a foreign publisher's fields)
        return cls(msg_uuid=obj.get("msg_uuid", ""), args=obj.get("args"), offset=offset, epoch=epoch)


def error_result(message: str, exc_type: str | None = None) -> dict[str, Any]:
    """The result a callee returns for an error: ``{"error": {"message": message}}``, the
    reference's shape, with ``"type"`` (``exc_type``, the exception's class name, e.g.
    ``"IndexError"``) after the message when given. A reader that knows only ``message``
    ignores ``type``."""
    error = {"message": message}
    if exc_type is not None:
        error["type"] = exc_type
    return {"error": error}


def result_error_message(result: Any) -> str | None:
    """The message of an error result, or ``None`` when ``result`` is not one."""
    if isinstance(result, dict) and len(result) == 1 and isinstance(result.get("error"), dict):
        message = result["error"].get("message")
        if isinstance(message, str):
            return message
    return None
