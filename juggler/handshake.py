"""The websocket handshake's HTTP: the request head, the accept key and plain responses.

Pure functions and a dataclass: no sockets, threads or logging.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from urllib.parse import parse_qs

from .exceptions import ProtocolError

__all__ = ["HandshakeRequest", "valid_key", "accept_key", "http_response"]

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


def http_response(status: int, reason: str, headers: dict[str, str] | None = None, body: str = "") -> bytes:
    """An HTTP/1.1 response with a plain-text body."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    hdrs = dict(headers or {})
    if status != 101:
        data = body.encode("utf-8")
        hdrs.setdefault("Content-Type", "text/plain; charset=utf-8")
        hdrs["Content-Length"] = str(len(data))
        hdrs.setdefault("Connection", "close")
    else:
        data = b""
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data
