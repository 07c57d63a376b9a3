"""The websocket handshake's HTTP: the request head, the accept key and plain responses.

Pure functions and a dataclass: no sockets, threads or logging.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from urllib.parse import parse_qs

from .exceptions import ProtocolError, Refusal

__all__ = [
    "HandshakeRequest",
    "valid_key",
    "accept_key",
    "check_upgrade",
    "switching_protocols",
    "http_response",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def valid_key(key: str) -> bool:
    """Whether ``key`` is a ``Sec-WebSocket-Key``: base64 of 16 bytes."""
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


@dataclass
class HandshakeRequest:
    """The HTTP request head of a handshake. Header names are lower-cased; repeated headers
    are joined with ``", "`` as RFC 9110 allows."""

    method: str
    path: str
    version: str
    headers: dict[str, str]

    @classmethod
    def parse(cls, head: bytes) -> "HandshakeRequest":
        try:
            text = head.decode("latin-1")
            lines = text.split("\r\n")
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise ProtocolError("malformed HTTP request line") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise ProtocolError("malformed HTTP header line")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return cls(method, target, version, headers)

    def query(self, name: str) -> list[str]:
        """The values of query parameter ``name`` of the request target (none: ``[]``)."""
        return parse_qs(self.path.partition("?")[2], keep_blank_values=True).get(name, [])

    def tokens(self, name: str) -> list[str]:
        """The comma-separated, trimmed, non-empty values of header ``name``."""
        return [t.strip() for t in self.headers.get(name, "").split(",") if t.strip()]


def check_upgrade(req: HandshakeRequest) -> None:
    """Raise :class:`Refusal` unless ``req`` asks for a websocket upgrade as RFC 6455 (4.2.1)
    wants it: ``Upgrade: websocket``, ``Connection: Upgrade``, version 13 and a valid key. (The
    method and the path are the caller's to check, before this.)"""
    if "websocket" not in [t.lower() for t in req.tokens("upgrade")]:
        raise Refusal(426, "Upgrade Required", "this is a websocket endpoint", {"Upgrade": "websocket"})
    if "upgrade" not in [t.lower() for t in req.tokens("connection")]:
        raise Refusal(400, "Bad Request", "Connection header must include Upgrade")
    if req.headers.get("sec-websocket-version") != "13":
        raise Refusal(426, "Upgrade Required", "unsupported websocket version", {"Sec-WebSocket-Version": "13"})
    if not valid_key(req.headers.get("sec-websocket-key", "")):
        raise Refusal(400, "Bad Request", "missing or invalid Sec-WebSocket-Key")


def switching_protocols(req: HandshakeRequest, protocol: str | None = None) -> bytes:
    """The 101 response that accepts the upgrade ``req`` asked for, with subprotocol
    ``protocol`` if one was chosen."""
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Accept": accept_key(req.headers["sec-websocket-key"]),
    }
    if protocol:
        headers["Sec-WebSocket-Protocol"] = protocol
    return http_response(101, "Switching Protocols", headers)


def http_response(status: int, reason: str, headers: dict[str, str] | None = None, body: str | bytes = "") -> bytes:
    """An HTTP/1.1 response with a body: text (sent as plain text unless ``headers`` give a
    Content-Type) or bytes. A ``Content-Length`` in ``headers`` is kept, so a response whose
    body follows separately (a file) or is left out (HEAD) can say how long it is."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    hdrs = dict(headers or {})
    if status != 101:
        data = body.encode("utf-8") if isinstance(body, str) else body
        hdrs.setdefault("Content-Type", "text/plain; charset=utf-8")
        hdrs.setdefault("Content-Length", str(len(data)))
        hdrs.setdefault("Connection", "close")
    else:
        data = b""
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data
