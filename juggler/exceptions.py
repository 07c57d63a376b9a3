"""Exceptions raised by juggler.

Every exception juggler raises derives from :class:`JugglerError`::

    JugglerError
    ├── ProtocolError          the peer broke the juggler.0 protocol (carries a close code)
    ├── BrokerError            redis failed or refused (carries the NACK code to send, 500)
    │   ├── CapacityExceeded   a call or result list is full ("list capacity exceeded")
    │   └── PayloadTooLarge    a call's args are over the broker's max_args_size (NACK 413)
    ├── HandshakeError         the server refused the websocket upgrade (also ConnectionError)
    ├── Refusal                a server refuses a handshake: the HTTP error response to send
    ├── RefuseConnection       raised by a server's on_state hook to refuse a handshake
    ├── ConnectionClosed       the connection closed before the operation completed
    │                          (also ConnectionError)
    ├── NackError              the server answered a request with NACK (code, message)
    ├── RemoteError            the callee returned an error result (or a statesync
    │                          action failed)
    ├── ConfigError            a setting has a bad value, or the config file is unreadable
    ├── JugglerTimeout         also TimeoutError
    │   ├── CallExpired        a call got no result before its timeout
    │   └── AckTimeout         a request got no ACK/NACK in time
    └── Stopped                a socket read ended (shut down, deadline, peer gone): raised
                               to the code around a read, which ends the connection; it
                               never reaches an application

Errors say whose fault they are: :class:`ProtocolError` is the remote peer's, the server
closes the connection with its ``close_code``; :class:`BrokerError` is redis', the server
answers with a NACK carrying ``nack_code``. A :class:`Refusal` is the server's answer to a
handshake it will not upgrade (the peer's request, or the server's policy: path, origin,
connection limit, or an application's :class:`RefuseConnection`): it carries the HTTP response
that the server sends. :class:`ConfigError` is the operator's: ``juggler`` commands exit with
status 2 on it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "JugglerError",
    "ProtocolError",
    "BrokerError",
    "CapacityExceeded",
    "PayloadTooLarge",
    "HandshakeError",
    "Refusal",
    "RefuseConnection",
    "ConnectionClosed",
    "NackError",
    "RemoteError",
    "ConfigError",
    "JugglerTimeout",
    "CallExpired",
    "AckTimeout",
    "Stopped",
]


class JugglerError(Exception):
    """Base class of every juggler exception."""


class ProtocolError(JugglerError):
    """The remote peer sent something the juggler.0 protocol does not allow.

    ``close_code`` is the websocket close code that answers it (1002, 1003, 1007, 1008 or 1009)
    and ``str(exc)`` is the short reason sent with the close frame.
    """

    def __init__(self, reason: str, close_code: int = 1002) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code


class BrokerError(JugglerError):
    """The broker (redis) failed; a request that caused it is answered with NACK ``nack_code``."""

    nack_code = 500


class CapacityExceeded(BrokerError):
    """A call list (per URI) or result list (per connection) is at its configured capacity."""

    def __init__(self, message: str = "list capacity exceeded") -> None:
        super().__init__(message)


class PayloadTooLarge(BrokerError):
    """A call's args, as JSON, are larger than the broker stores (``max_args_size``)."""

    nack_code = 413


class HandshakeError(JugglerError, ConnectionError):
    """The server refused the websocket handshake; ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Refusal(JugglerError):
    """A handshake answered with an HTTP error: ``status``, its ``reason`` phrase, a plain-text
    ``text`` for the body and extra response ``headers``. Raised by
    :func:`juggler.handshake.check_upgrade` and a server's own handshake checks; the server
    catches it and sends that response."""

    def __init__(self, status: int, reason: str, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status, self.reason, self.text, self.headers = status, reason, text, headers or {}


class RefuseConnection(JugglerError):
    """Raise it from a server's ``on_state`` hook (state ACCEPTING) to refuse the handshake
    with HTTP ``status`` and the plain-text ``reason``, e.g. ``RefuseConnection(401,
    "missing token")``."""

    _REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 429: "Too Many Requests",
                503: "Service Unavailable"}  # fmt: skip

    def __init__(self, status: int = 403, reason: str = "forbidden") -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error status, got {status}")
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason

    @property
    def status_text(self) -> str:
        return self._REASONS.get(self.status, "Error")


class ConnectionClosed(JugglerError, ConnectionError):
    """The connection closed before the operation could complete.

    ``code`` and ``reason`` are those of the close frame the server (or the state-sync peer)
    sent, or ``1006`` and a reason when the connection dropped without one.
    """

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        super().__init__(f"connection closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class NackError(JugglerError):
    """The server refused a request: ``code`` is HTTP-like, ``message`` says why."""

    def __init__(self, code: int, message: str, nack: Any = None) -> None:
        super().__init__(f"NACK {code}: {message}")
        self.code = code
        self.message = message
        self.nack = nack


class RemoteError(JugglerError):
    """The callee answered with an error result ``{"error": {"message": ...}}``; or, for
    :class:`juggler.statesync.RpcConnection`, the peer's action failed (``message`` is its
    error's text).

    ``type`` is the exception's class name when the callee sent one (a Python callee does:
    ``"IndexError"``; the Go reference does not), and ``str(exc)`` reads like Python's last
    traceback line: ``IndexError: list index out of range``.
    """

    def __init__(self, message: str, result: Any = None) -> None:
        error = result.get("error") if isinstance(result, dict) else None
        kind = error.get("type") if isinstance(error, dict) else None
        self.type: str | None = kind if isinstance(kind, str) and kind else None
        super().__init__(f"{self.type}: {message}" if self.type and self.type != message else message)
        self.message = message
        self.result = result


class ConfigError(JugglerError):
    """A setting has a bad value, or the config file is unreadable; the message names which."""


class JugglerTimeout(JugglerError, TimeoutError):
    """Base class of juggler's timeouts."""


class CallExpired(JugglerTimeout):
    """A call's timeout passed before its result arrived (the reference client's EXP)."""


class AckTimeout(JugglerTimeout):
    """The server did not answer a request with ACK or NACK in time."""


class Stopped(JugglerError):
    """A read ended because the socket was shut down, its deadline passed, or the peer went
    away. Raised by :class:`~juggler.transport.SocketReader` to the code around it (the server's and statesync's
    handshakes, :func:`~juggler.transport.peer_events`), which ends the connection: it never reaches an
    application."""
