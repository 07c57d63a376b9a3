"""The frames of a server's replies (ACK, NACK, RES), built directly as bytes.

One per call and message on the server's default path (its own ``encode``): the same bytes
as :func:`juggler.message.encode` then :func:`juggler.frames.encode_frame` make, in one
f-string and one UTF-8 encode, instead of a dict for the message and the JSON encoder's walk
over it, plus a ``struct.pack`` for the header. Measured (micro-benchmark, one thread): an
ACK's frame in ~1/5 of the time, a RES's in ~1/4. ``tests/test_reply_frame.py`` proves the
bytes equal over many random messages. Anything unusual (another message type, a field of an
unexpected type, an ACK extension) returns ``None`` and takes the general path.
"""

from __future__ import annotations

from json.encoder import encode_basestring as _quote  # the string quoting of _dumps (C)
from typing import Optional, Union

from .frames import OP_TEXT, frame_header
from .message import Ack, Message, MessageType, Nack, Res, _dumps

__all__ = ["reply_frame"]

#: The header of a text frame of each payload length up to 1023 (~40 KB): an ACK or a RES of
#: a short result is 120-200 bytes.
_TEXT_HEADERS = tuple(frame_header(OP_TEXT, n) for n in range(1024))


def reply_frame(msg: Message, limit: int) -> Optional[bytes]:
    """The websocket text frame of an ACK, NACK or RES, built directly: the same bytes as
    :func:`~juggler.message.encode` and :func:`~juggler.frames.encode_frame` make, in fewer
    steps (the server's default path, one per call and message). ``None`` for any other message, one
    with a field of an unusual type or an ACK extension (``recovered``, ``position``), or one
    whose JSON is over ``limit`` bytes: those take the general path. Raises what
    :func:`~juggler.message.encode` raises for a RES whose ``args`` are not JSON."""
    cls = type(msg)
    if cls is not Res and cls is not Ack and cls is not Nack:
        return None
    uuid = msg.uuid
    if type(uuid) is not str or type(msg.for_uuid) is not str:  # type: ignore[union-attr]
        return None
    if cls is Res:
        uri = msg.uri  # type: ignore[union-attr]
        if type(uri) is not str:
            return None
        args = msg.args  # type: ignore[union-attr]
        args = _quote(args) if type(args) is str else _dumps(args)  # (what _dumps does with a str)
        if uri:
            text = (f'{{"meta":{{"type":9,"uuid":{_quote(uuid)}}},'
                    f'"payload":{{"for":{_quote(msg.for_uuid)},"uri":{_quote(uri)},"args":{args}}}}}')  # type: ignore[union-attr]
        else:
            text = (f'{{"meta":{{"type":9,"uuid":{_quote(uuid)}}},'
                    f'"payload":{{"for":{_quote(msg.for_uuid)},"args":{args}}}}}')  # type: ignore[union-attr]
    elif cls is Ack:
        if msg.recovered is not None or msg.position is not None:  # type: ignore[union-attr]
            return None
        target = _target_json(msg)  # type: ignore[arg-type]
        if target is None:
            return None
        text = (f'{{"meta":{{"type":8,"uuid":{_quote(uuid)}}},'
                f'"payload":{{"for":{_quote(msg.for_uuid)},"for_type":{msg.for_type:d}{target}}}}}')  # type: ignore[union-attr]
    else:
        code, message = msg.code, msg.message  # type: ignore[union-attr]
        target = _target_json(msg)  # type: ignore[arg-type]
        if type(code) is not int or type(message) is not str or target is None:
            return None
        text = (f'{{"meta":{{"type":7,"uuid":{_quote(uuid)}}},'
                f'"payload":{{"for":{_quote(msg.for_uuid)},"for_type":{msg.for_type:d}{target},'
                f'"code":{code:d},"message":{_quote(message)}}}}}')  # type: ignore[union-attr]
    data = text.encode("utf-8")
    n = len(data)
    if n > limit:
        return None
    if n < 1024:
        return _TEXT_HEADERS[n] + data
    return frame_header(OP_TEXT, n) + data


def _target_json(msg: Union[Ack, Nack]) -> Optional[str]:
    """The ``"uri"`` and ``"channel"`` members of an ACK's or NACK's payload (``None``: a
    field that is not a string)."""
    uri, channel = msg.uri, msg.channel
    if type(uri) is not str or type(channel) is not str or type(msg.for_type) is not MessageType:
        return None
    if not channel:
        return f',"uri":{_quote(uri)}' if uri else ""
    return f',"uri":{_quote(uri)},"channel":{_quote(channel)}' if uri else f',"channel":{_quote(channel)}'
