"""Websocket frames (RFC 6455): opcodes, close codes, encoding, unmasking and close frames.

Pure functions and constants: no sockets, threads or logging. :class:`juggler.peer.Peer`
parses the frames it is fed with them; the server and the client both write the frames built
here.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from .exceptions import ProtocolError

__all__ = [
    "CloseCode",
    "OP_CONT",
    "OP_TEXT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "DATA_OPS",
    "CONTROL_OPS",
    "FRAGMENT_COST",
    "unmask",
    "frame_header",
    "encode_frame",
    "encode_close",
    "parse_close",
    "valid_close_code",
]

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
DATA_OPS = (OP_TEXT, OP_BINARY)
CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)



class CloseCode(IntEnum):
    """The websocket close codes juggler sends or names (RFC 6455, 7.4.1; the names are
    python-websockets'). The one place they are defined: the server, the client, statesync
    and the protocol modules all use these."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005  #: never sent: a close frame without a code
    ABNORMAL_CLOSURE = 1006  #: never sent: the connection ended without a close frame
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


#: What each continuation frame counts against the read limit, besides its payload (a message
#: in one frame gets its full limit).
FRAGMENT_COST = 64


def unmask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask``, a machine word at a time (via Python ints)."""
    n = len(data)
    if n == 0:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


def frame_header(opcode: int, n: int, masked: bool = False) -> bytes:
    """The header of one final frame of ``n`` payload bytes (the mask, if any, follows it)."""
    b1 = 0x80 | opcode
    bit = 0x80 if masked else 0
    if n < 126:
        return struct.pack(">BB", b1, bit | n)
    if n < 65536:
        return struct.pack(">BBH", b1, bit | 126, n)
    return struct.pack(">BBQ", b1, bit | 127, n)


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame: unmasked (from a server), or masked with the 4-byte ``mask`` (from a
    client)."""
    header = frame_header(opcode, len(payload), mask is not None)
    if mask is None:
        return header + payload
    return header + mask + unmask(payload, mask)


def encode_close(code: int, reason: str = "", mask: bytes | None = None) -> bytes:
    """A close frame; ``reason`` is cut to fit the 125-byte control frame limit."""
    raw = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, struct.pack(">H", code) + raw, mask)


_RESERVED_CLOSE_CODES = {1004, 1005, 1006, 1015}


def valid_close_code(code: int) -> bool:
    """Whether ``code`` may be sent in a close frame (RFC 6455, 7.4)."""
    return 1000 <= code < 5000 and code not in _RESERVED_CLOSE_CODES and not 1016 <= code < 3000


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame (1005 when it has none)."""
    if not payload:
        return CloseCode.NO_STATUS_RCVD, ""
    if len(payload) == 1:
        raise ProtocolError("close frame payload of one byte")
    (code,) = struct.unpack(">H", payload[:2])
    if not valid_close_code(code):
        raise ProtocolError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("close reason is not valid UTF-8", CloseCode.INVALID_DATA) from None
    return code, reason
