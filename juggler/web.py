"""What a server answers browsers over plain HTTP, on its own port.

- ``GET /juggler.js`` and ``GET /juggler.d.ts``: the browser client and its types, shipped in
  this package (``juggler/static/``); ``Server(serve_client=False)`` turns them off. Cacheable:
  an ``ETag``, ``Cache-Control: no-cache`` (revalidate, so that an upgraded server is seen at
  once: a 304 costs no body), and ``Access-Control-Allow-Origin: *``, since a page on another
  origin loads a module script in CORS mode.
- ``GET /``: the demo page, when ``Server(demo_page=True)`` (what ``juggler demo`` runs).
- ``GET <path>?juggler-refusal=ID``: why the handshake that carried ``?juggler-handshake=ID``
  was refused, as ``{"status": 403, "reason": "..."}``, on any path (juggler.js asks at the
  path it tried to open, so a handshake at a wrong path, refused with 404, is explained too). A browser cannot read the HTTP status
  of a refused websocket (its close event says 1006 and nothing else); juggler.js asks this
  after a failed handshake. The server keeps the last :data:`REFUSALS_KEPT` refusals for
  :data:`REFUSAL_TTL` seconds, only those of handshakes that carried an id.

Requests that ask for a websocket upgrade are never answered here.
"""

from __future__ import annotations

import hashlib
import html
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Optional

from .handshake import HandshakeRequest, http_response

__all__ = [
    "StaticFile",
    "RefusalLog",
    "WebRoutes",
    "HANDSHAKE_PARAM",
    "REFUSAL_PARAM",
    "REFUSALS_KEPT",
    "REFUSAL_TTL",
    "static_path",
]

#: The query parameter of a handshake that names it, so that its refusal can be looked up.
HANDSHAKE_PARAM = "juggler-handshake"
#: The query parameter of the refusal lookup.
REFUSAL_PARAM = "juggler-refusal"
#: Refusals kept at most (the oldest go first).
REFUSALS_KEPT = 1024
#: Seconds a refusal is kept.
REFUSAL_TTL = 60.0

_ID_CHARS = frozenset("0123456789abcdefABCDEF-")


def static_path(name: str) -> str:
    """The file system path of a file shipped in ``juggler/static/``, e.g. ``juggler.js``
    (to serve it from elsewhere)."""
    return str(resources.files("juggler") / "static" / name)


def _read(name: str) -> bytes:
    return (resources.files("juggler") / "static" / name).read_bytes()


@dataclass(frozen=True)
class StaticFile:
    """A file served with an entity tag: its 200 and 304 responses, made once."""

    etag: str
    ok: bytes
    not_modified: bytes

    @classmethod
    def make(cls, body: bytes, content_type: str) -> "StaticFile":
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = {
            "ETag": etag,
            "Cache-Control": "no-cache",  # revalidate each time: an upgraded server is seen at once
            "Access-Control-Allow-Origin": "*",  # module scripts load in CORS mode
            "X-Content-Type-Options": "nosniff",
        }
        ok = _head("200 OK", {"Content-Type": content_type, "Content-Length": str(len(body)), **headers}) + body
        return cls(etag, ok, _head("304 Not Modified", headers))


def _head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class RefusalLog:
    """Recent refusals of handshakes that carried an id: bounded (``size``) and short-lived
    (``ttl`` seconds). Thread-safe; expired entries go on the next record or lookup."""

    def __init__(self, size: int = REFUSALS_KEPT, ttl: float = REFUSAL_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.size = size
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, int, str]] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def record(self, handshake_id: str, status: int, reason: str) -> None:
        if not _valid_id(handshake_id):
            return
        now = self._clock()
        with self._lock:
            self._expire(now)
            self._entries[handshake_id] = (now + self.ttl, status, reason)
            self._entries.move_to_end(handshake_id)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def lookup(self, handshake_id: str) -> Optional[tuple[int, str]]:
        """``(status, reason)`` of the refusal of handshake ``handshake_id``, if kept."""
        with self._lock:
            self._expire(self._clock())
            entry = self._entries.get(handshake_id)
        return None if entry is None else entry[1:]

    def _expire(self, now: float) -> None:
        assert self._lock.locked()
        while self._entries:
            first = next(iter(self._entries.values()))
            if first[0] > now:
                return
            self._entries.popitem(last=False)


def _valid_id(value: str) -> bool:
    return 0 < len(value) <= 64 and set(value) <= _ID_CHARS


class WebRoutes:
    """The plain HTTP a server answers for browsers (see the module's documentation).

    :param ws_path: the server's websocket path (the demo page connects to it).
    :param serve_client: serve ``/juggler.js`` and ``/juggler.d.ts``.
    :param demo_page: serve the demo page at ``/``.
    """

    def __init__(self, ws_path: str, serve_client: bool = True, demo_page: bool = False) -> None:
        self.ws_path = ws_path
        self.refusals = RefusalLog()
        self.files: dict[str, StaticFile] = {}
        if serve_client:
            self.files["/juggler.js"] = StaticFile.make(_read("juggler.js"), "text/javascript; charset=utf-8")
            self.files["/juggler.d.ts"] = StaticFile.make(_read("juggler.d.ts"), "application/typescript; charset=utf-8")
        if demo_page:
            page = _read("demo.html").decode("utf-8").replace("{{ws_path}}", html.escape(ws_path, quote=True))
            self.files["/"] = StaticFile.make(page.encode("utf-8"), "text/html; charset=utf-8")

    def refused(self, request: HandshakeRequest, status: int, reason: str) -> None:
        """Keep the refusal of ``request`` if it carried a handshake id."""
        ids = request.query(HANDSHAKE_PARAM)
        if ids:
            self.refusals.record(ids[0], status, reason)

    def respond(self, request: HandshakeRequest) -> Optional[bytes]:
        """The response to ``request`` if it is one of ours, else ``None``."""
        if request.method not in ("GET", "HEAD"):
            return None
        if "websocket" in (t.lower() for t in request.tokens("upgrade")):
            return None
        path = request.path.partition("?")[0]
        ids = request.query(REFUSAL_PARAM)
        if ids:
            response = self._refusal(ids[0])
        else:
            f = self.files.get(path)
            if f is None:
                return None
            response = self._file(f, request.headers.get("if-none-match"))
        if request.method == "HEAD":
            response = response[: response.index(b"\r\n\r\n") + 4]
        return response

    def _refusal(self, handshake_id: str) -> bytes:
        found = self.refusals.lookup(handshake_id)
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store", "Access-Control-Allow-Origin": "*"}
        if found is None:
            body = {"status": None, "reason": "no refusal of this handshake on record"}
            return http_response(404, "Not Found", headers, json.dumps(body) + "\n")
        return http_response(200, "OK", headers, json.dumps({"status": found[0], "reason": found[1]}) + "\n")

    @staticmethod
    def _file(f: StaticFile, if_none_match: Optional[str]) -> bytes:
        if if_none_match is not None and _etag_matches(if_none_match, f.etag):
            return f.not_modified
        return f.ok


def _etag_matches(header: str, etag: str) -> bool:
    """Whether an ``If-None-Match`` value names ``etag`` (weak comparison, RFC 9110 13.1.2)."""
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False
