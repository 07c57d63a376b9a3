"""Fuzzing a live juggler server with hypothesis: random and mutated messages and frames.

Each example opens a raw websocket (a real handshake, then frames built by hand over a plain
socket) to a server on the ``make_stack`` fixture (``read_limit=4096``; 16 KiB where messages
nest as deep as Python's recursion limit; over fakeredis and a real redis-server), throws bytes
at it, and checks what comes back against a model of the protocol:

- the model (:func:`predict`) walks the bytes the way RFC 6455 and ``protocol.md`` say a server
  must: frame headers, fragmentation, control frames, the read limit, then each complete text
  message through :func:`oracle`, which says what a juggler server answers (ACK, NACK, RES) or
  with which close code it hangs up (1002, 1003, 1007, 1008, 1009). Where the protocol leaves a
  choice (a deeply nested message, an upper-case uuid), several outcomes are allowed;
- every read is bounded by a socket timeout: a server that stops answering fails the example
  ("hung"), and so does one that drops the TCP connection without a close frame;
- after every example: the server's ``on_state`` hook reports the connection CLOSED with the
  code it sent, its reader thread ends, no ``juggler*`` thread is left behind, a control
  :class:`juggler.Client` on the same server still gets its call answered, and, on the real
  redis, ``CLIENT LIST`` holds no connection the example opened;
- at the end of each test: the server holds no connection but the control client's, and the
  thread and redis connection counts are back to their baselines.

Each property runs ``JUGGLER_FUZZ_EXAMPLES`` examples (default 80). Nothing sleeps to wait for
anything: connection teardown is awaited on the ``on_state`` hook, threads are joined, and only
redis's own view of its clients (which lags a closed socket by an event-loop turn) is polled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union
from urllib.parse import urlparse

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from juggler import ConnState
from juggler.frames import FRAGMENT_COST

from .conftest import T

LIMIT = 4096  # the fuzzed server's read_limit
ENVELOPE_LIMIT = 16384  # room for messages nested as deep as the recursion limit
TIMEOUT = T(5)  # bounds every blocking read and wait
REDIS_SETTLE = T(1)  # how long redis may take to notice a closed connection
# Each example costs about one server-side connection teardown (its redis listeners poll every
# 50 ms): 80 examples keep the file around a minute over both redises.
MAX_EXAMPLES = int(os.environ.get("JUGGLER_FUZZ_EXAMPLES", "80"))
SUBPROTOCOL = "juggler.0"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CALL, PUB, SUB, UNSB, NACK, ACK, RES, EVNT = 1, 2, 3, 4, 7, 8, 9, 10
TYPE_NAMES = {NACK: "NACK", ACK: "ACK", RES: "RES", EVNT: "EVNT"}
ALL_TYPES = frozenset({CALL, PUB, SUB, UNSB})
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
KNOWN_OPS = frozenset({OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})
ERROR_CODES = frozenset({1002, 1003, 1007, 1008, 1009})
SERVED = ("test.echo", "test.reverse", "test.fail")  # never test.delay: its args say how long to sleep
MAX_CALL_TIMEOUT_NS = 600 * 10**9  # the server's default max_call_timeout
INT64 = 1 << 63
DEEP = 100  # nesting beyond which a server may refuse a message (1007) instead of answering it
DEEP_BELOW = 40  # test_fuzz_deep_nesting: nesting from the recursion limit down to this much less

FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the repository; failures print their example
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- frames --------------------------------------------------------------------------------------


def xor_mask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


@dataclass
class Frame:
    """A client frame, valid or not. ``length`` overrides the declared payload length (for
    headers that announce more than is sent)."""

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    mask: bytes = b"\x37\xfa\x21\x3d"
    length: Optional[int] = None
    wide: bool = False  # encode the length in the 64-bit form whatever it is (control frames only)

    def encode(self) -> bytes:
        n = len(self.payload) if self.length is None else self.length
        b1 = (0x80 if self.fin else 0) | (self.rsv & 7) << 4 | (self.opcode & 0xF)
        mbit = 0x80 if self.masked else 0
        if n < 126 and not self.wide:
            head = bytes([b1, mbit | n])
        elif n < 65536 and not self.wide:
            head = struct.pack(">BBH", b1, mbit | 126, n)
        else:
            head = struct.pack(">BBQ", b1, mbit | 127, n)
        if not self.masked:
            return head + self.payload
        return head + self.mask + xor_mask(self.payload, self.mask)

    def __repr__(self) -> str:
        flags = [f"op={self.opcode:#x}"]
        if not self.fin:
            flags.append("fin=0")
        if self.rsv:
            flags.append(f"rsv={self.rsv}")
        if not self.masked:
            flags.append("unmasked")
        if self.length is not None:
            flags.append(f"declared={self.length}")
        if self.wide:
            flags.append("wide")
        p = self.payload if len(self.payload) <= 160 else self.payload[:160] + b"...(%d bytes)" % len(self.payload)
        return f"Frame({' '.join(flags)} {p!r})"


def close_frame(code: int, reason: str = "") -> Frame:
    return Frame(OP_CLOSE, struct.pack(">H", code) + reason.encode("utf-8"))


class RawWS:
    """A websocket client over a plain socket: a real handshake, then bytes as given."""

    def __init__(self, url: str, allowed_header: Optional[str] = None) -> None:
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=TIMEOUT)
        self.port = self.sock.getsockname()[1]
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        lines = [
            f"GET {u.path} HTTP/1.1",
            f"Host: {u.hostname}:{u.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Sec-WebSocket-Protocol: {SUBPROTOCOL}",
        ]
        if allowed_header is not None:
            lines.append(f"Juggler-Allowed-Messages: {allowed_header}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status, *header_lines = head.decode("latin-1").split("\r\n")
        assert status.startswith("HTTP/1.1 101 "), f"handshake refused: {head!r}"
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        accept = base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode("ascii")
        assert headers.get("sec-websocket-accept") == accept, headers
        assert headers.get("sec-websocket-protocol") == SUBPROTOCOL, headers

    def _more(self) -> None:
        chunk = self.sock.recv(65536)  # socket.timeout past TIMEOUT
        if not chunk:
            raise EOFError("the server closed the TCP connection")
        self.buf += chunk

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, data: bytes) -> Optional[OSError]:
        """Send ``data``; an error (the server hung up early) is returned, not raised."""
        try:
            self.sock.sendall(data)
            return None
        except OSError as exc:
            return exc

    def read_frame(self) -> tuple[int, bytes]:
        """One server frame, checked for what RFC 6455 asks of a server: final (juggler never
        fragments), no reserved bits, unmasked, a known opcode."""
        b1, b2 = self._read(2)
        assert b1 & 0x80, f"server frame not final: {b1:#x}"
        assert not b1 & 0x70, f"server frame with reserved bits: {b1:#x}"
        assert not b2 & 0x80, "server frames must not be masked"
        op, n = b1 & 0x0F, b2 & 0x7F
        assert op in (OP_TEXT, OP_CLOSE, OP_PING, OP_PONG), f"unexpected server opcode {op:#x}"
        if n == 126:
            (n,) = struct.unpack(">H", self._read(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", self._read(8))
        return op, self._read(n)

    def expect_eof(self) -> None:
        """After a completed close handshake the server ends the TCP connection."""
        try:
            while True:
                data = self.buf or self.sock.recv(65536)
                self.buf = b""
                if not data:
                    return
                pytest.fail(f"data after the close frame: {data[:200]!r}")
        except ConnectionResetError:
            return
        except socket.timeout:
            pytest.fail("the server did not end the TCP connection after the close handshake")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --- the model: what a conforming server answers -----------------------------------------------


@dataclass(frozen=True)
class Close:
    """The server closes with one of ``codes``."""

    codes: frozenset


C1002, C1007, C1008 = Close(frozenset({1002})), Close(frozenset({1007})), Close(frozenset({1008}))


@dataclass(frozen=True)
class ResSpec:
    """A RES that may (or, when ``required``, must) follow an ACK; ``check(payload)``."""

    check: Callable[[dict], bool]
    required: bool


@dataclass(frozen=True)
class Answer:
    """The server answers: ``event`` is ("ACK", payload) or ("NACK", payload without its
    message); ``res``, for an ACKed CALL, the RES that may follow it (``None``: none may)."""

    event: tuple
    uuid: str
    res: Optional[ResSpec] = None


@dataclass(frozen=True)
class Unknown:
    """Past this message the model predicts nothing (it cannot tell what the text means)."""


Alt = Union[Close, Answer, Unknown]


class _Bad(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def strict_json(text: str) -> Any:
    """RFC 8259 JSON: no NaN/Infinity, no number overflowing a double, no lone surrogate."""
    obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    stack = [obj]
    while stack:  # iterative: the object may be deeply nested
        v = stack.pop()
        if isinstance(v, str):
            v.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
    return obj


def nesting_depth(text: str) -> int:
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def on_fresh_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a new thread. Nesting in json (and in ``==``) is bounded by the
    recursion limit minus the caller's depth: a fresh thread goes at least as deep as any
    server thread can, whereas the test's own stack (pytest, hypothesis) is already deep."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["v"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            box["e"] = exc

    t = threading.Thread(target=run, name="fuzz-deep")
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]


def loads(text: Union[str, bytes]) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        return on_fresh_thread(json.loads, text)


def same_json(a: Any, b: Any) -> bool:
    """Equality of two decoded JSON values, types included (1 is not 1.0 nor True), without
    recursion (they may be nested a thousand deep)."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y))
        elif isinstance(x, dict):
            if x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif x != y:
            return False
    return True


UUID_LOWER = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
UUID_ANYCASE = re.compile(UUID_LOWER.pattern, re.IGNORECASE)


def _is_int(v: Any) -> bool:
    return type(v) is int  # noqa: E721 - bool is not an integer here


def _field(payload: dict, name: str, kind: type, default: Any) -> Any:
    v = payload.get(name)
    if v is None:  # JSON null: absent, as Go's decoder takes it
        return default
    if kind is int and not _is_int(v) or kind is bool and type(v) is not bool or kind is str and not isinstance(v, str):
        raise _Bad(name)
    return v


def is_error_result(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == {"error"} and isinstance(v["error"], dict) and isinstance(v["error"].get("message"), str)


def res_checker(uri: str, args: Any, relaxed: bool) -> Callable[[dict], bool]:
    def check(payload: dict) -> bool:
        if payload.get("uri") != uri or set(payload) != {"for", "uri", "args"}:
            return False
        got = payload["args"]
        if relaxed and is_error_result(got):
            return True
        if uri == "test.echo":
            return same_json(got, args)
        if uri == "test.reverse":
            return same_json(got, args[::-1]) if isinstance(args, str) else is_error_result(got)
        return is_error_result(got)  # test.fail

    return check


def request_outcome(obj: Any, allowed: frozenset, relaxed: bool) -> list[Alt]:
    """What a juggler server does with the JSON value ``obj``, read on a connection that may
    send ``allowed`` (protocol.md: envelope, payload fields, NACK 400 for a missing uri or
    channel and for a timeout over the server's maximum)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("meta"), dict):
        return [C1007]
    meta = obj["meta"]
    t = meta.get("type")
    if not _is_int(t):
        return [C1007]
    if t not in ALL_TYPES:  # unknown or server-side type
        return [C1002] if -INT64 <= t < INT64 else [Close(frozenset({1002, 1007}))]
    u = meta.get("uuid")
    if not isinstance(u, str) or not UUID_ANYCASE.fullmatch(u):
        return [C1007]
    payload = obj.get("payload")
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        return [C1007]
    try:
        if t == CALL:
            uri = _field(payload, "uri", str, "")
            timeout = _field(payload, "timeout", int, 0)
            if not -INT64 <= timeout < INT64:
                raise _Bad("timeout")
        else:
            channel = _field(payload, "channel", str, "")
            if t in (SUB, UNSB):
                _field(payload, "pattern", bool, False)
    except _Bad:
        return [C1007]
    alts: list[Alt] = []
    if t not in allowed:
        alts.append(C1008)
    elif t == CALL:
        if not uri:
            alts.append(Answer(("NACK", {"for": u, "for_type": CALL, "code": 400}), u))
        elif timeout > MAX_CALL_TIMEOUT_NS:
            alts.append(Answer(("NACK", {"for": u, "for_type": CALL, "uri": uri, "code": 400}), u))
        else:
            res = None
            if uri in SERVED:
                # Under 1 ms means the default of 60 s; a short timeout may expire before the
                # callee gets to it, so its RES is not required.
                required = timeout < 1_000_000 or timeout >= 1_000_000_000
                res = ResSpec(res_checker(uri, payload.get("args"), relaxed), required)
            alts.append(Answer(("ACK", {"for": u, "for_type": CALL, "uri": uri}), u, res))
    elif not channel:
        alts.append(Answer(("NACK", {"for": u, "for_type": t, "code": 400}), u))
    elif t == UNSB and SUB not in allowed:
        alts.append(Answer(("NACK", {"for": u, "for_type": t, "channel": channel, "code": 400}), u))
    else:
        alts.append(Answer(("ACK", {"for": u, "for_type": t, "channel": channel}), u))
    if not UUID_LOWER.fullmatch(u):
        alts.append(C1007)  # uuids are sent lower-case; a server may insist
    return alts


def oracle(message: bytes, allowed: frozenset) -> list[Alt]:
    """The possible outcomes of one complete text message."""
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        return [C1007]
    deep = nesting_depth(text) > DEEP
    try:
        obj = strict_json(text)
    except RecursionError:
        try:
            obj = on_fresh_thread(strict_json, text)
        except (ValueError, RecursionError):
            return [C1007]
    except ValueError:
        return [C1007]
    alts = request_outcome(obj, allowed, relaxed=deep)
    if deep and C1007 not in alts:
        alts.append(C1007)
    return alts


@dataclass
class Prediction:
    """One way the exchange may go: the server sends ``events`` (ACK/NACK/PONG, in this order;
    RES anywhere after their ACK) and then closes with a code in ``codes``. ``phase`` says
    whether the frame that ends it is in the first send or in the final close; ``clean``: it is
    a close handshake the client started (the server must then end TCP); ``unknown``: past
    ``events`` nothing is predicted."""

    events: list
    res: dict
    codes: Optional[frozenset]
    phase: int
    clean: bool = False
    unknown: bool = False


class ModelIncomplete(Exception):
    """The bytes end inside a frame: a test-construction error (a server would wait)."""


VALID_CLOSE = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))


def close_outcome(payload: bytes) -> tuple[frozenset, bool]:
    """The server's answer to a client close frame: (codes, clean)."""
    if not payload:
        return frozenset({1000}), True  # 1005 (no code) is answered with 1000
    if len(payload) == 1:
        return frozenset({1002}), False
    code = struct.unpack(">H", payload[:2])[0]
    if code not in VALID_CLOSE:
        return frozenset({1002}), False
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return frozenset({1007}), False
    return frozenset({code, 1000}), True  # echoing the code is what RFC 6455 suggests


def predict(stream: bytes, split: int, classify: Callable[[bytes], list[Alt]], limit: int = LIMIT) -> list[Prediction]:
    """Every way a conforming server may answer ``stream`` (the first ``split`` bytes are sent
    first, the rest once the server has answered them)."""
    out: list[Prediction] = []

    def need(end: int) -> None:
        if end > len(stream):
            raise ModelIncomplete(f"stream ends at {len(stream)} inside a frame that needs {end}")

    def run(pos: int, events: list, res: dict) -> None:
        op: Optional[int] = None
        data = bytearray()
        size = 0
        while True:
            phase = 1 if pos < split else 2

            def end(codes: Optional[frozenset], clean: bool = False, unknown: bool = False) -> None:
                out.append(Prediction(list(events), dict(res), codes, phase, clean, unknown))

            need(pos + 2)
            b1, b2 = stream[pos], stream[pos + 1]
            fin, rsv, opc, masked, n = b1 >> 7, (b1 >> 4) & 7, b1 & 0xF, b2 >> 7, b2 & 0x7F
            control = opc >= 8
            if rsv or opc not in KNOWN_OPS or not masked or control and (not fin or n > 125):
                return end(frozenset({1002}))
            p = pos + 2
            errs = set()
            cost = 0
            if not control:
                if n >= 126:
                    k = 2 if n == 126 else 8
                    need(p + k)
                    n = int.from_bytes(stream[p : p + k], "big")
                    p += k
                    if n >> 63:
                        errs.add(1002)  # RFC 6455: the most significant bit must be 0
                if (opc == OP_CONT) != (op is not None):
                    errs.add(1002)  # continuation without a message, or a message inside one
                cost = n + (FRAGMENT_COST if opc == OP_CONT else 0)
                if size + cost > limit:
                    errs.add(1009)
                if errs:
                    return end(frozenset(errs))
            need(p + 4 + n)
            payload = xor_mask(stream[p + 4 : p + 4 + n], stream[p : p + 4])
            pos = p + 4 + n
            if opc == OP_CLOSE:
                codes, clean = close_outcome(payload)
                return end(codes, clean=clean)
            if opc == OP_PING:
                events.append(("PONG", payload))
                continue
            if opc == OP_PONG:
                continue
            if opc != OP_CONT:
                op = opc
            data += payload
            size += cost
            if not fin:
                continue
            kind, message = op, bytes(data)
            op, data, size = None, bytearray(), 0
            if kind == OP_BINARY:
                return end(frozenset({1003}))
            alts = classify(message)
            for i, alt in enumerate(alts):
                last = i == len(alts) - 1
                if isinstance(alt, Close):
                    end(alt.codes)
                elif isinstance(alt, Unknown):
                    end(None, unknown=True)
                elif last:  # the common, single-outcome case: carry on in this loop
                    events.append(alt.event)
                    res[alt.uuid] = alt.res
                    break
                else:
                    run(pos, events + [alt.event], {**res, alt.uuid: alt.res})
            else:
                return

    run(0, [], {})
    return out


# --- checking what the server sends against the predictions ------------------------------------


def _event_matches(expected: tuple, got: tuple) -> bool:
    if expected[0] != got[0]:
        return False
    if expected[0] == "NACK":
        p = dict(got[1])
        return isinstance(p.pop("message", None), str) and p == expected[1]
    return expected[1] == got[1]


@dataclass
class Observed:
    events: list = field(default_factory=list)  # ("ACK"/"NACK", payload) or ("PONG", bytes)
    res: list = field(default_factory=list)  # RES payloads, in order


def _call_ack(event: tuple) -> bool:
    """Whether ``event`` is the ACK of a CALL: the server may send it from the connection's
    results listener, once redis has stored the call (a call stored through the listener:
    docs/server.rst), so it may come after ACKs and NACKs the reader sent for later requests,
    or not at all when the connection closes first ("exactly one ACK or NACK, unless the
    connection closes first")."""
    return event[0] == "ACK" and event[1].get("for_type") == CALL


def _split(events: list) -> tuple[list, list]:
    """``events`` as (the ones whose order is predicted, the ACKs of CALLs)."""
    fixed, floating = [], []
    for e in events:
        (floating if _call_ack(e) else fixed).append(e)
    return fixed, floating


def _floating_ok(expected: list, got: list) -> bool:
    """Whether every ACK of a CALL seen was predicted (each once), in any order."""
    left = list(expected)
    for g in got:
        for i, e in enumerate(left):
            if _event_matches(e, g):
                del left[i]
                break
        else:
            return False
    return True


def _consistent(p: Prediction, seen: Observed) -> bool:
    """Whether what was seen so far can still end as ``p``."""
    if p.unknown:
        n = min(len(seen.events), len(p.events))
        return all(_event_matches(e, g) for e, g in zip(p.events[:n], seen.events[:n]))
    (want, want_acks), (got, got_acks) = _split(p.events), _split(seen.events)
    if len(got) > len(want) or not all(_event_matches(e, g) for e, g in zip(want, got)):
        return False
    if not _floating_ok(want_acks, got_acks):
        return False
    acked = Counter(g[1]["for"] for g in seen.events if g[0] == "ACK")
    got_res = Counter()
    for r in seen.res:
        u = r.get("for")
        got_res[u] += 1
        spec = p.res.get(u)
        if spec is None or got_res[u] > acked[u] or not spec.check(r):
            return False
    return True


def _ready_for_phase2(p: Prediction, seen: Observed, probe_uuid: Optional[str]) -> bool:
    if p.unknown:
        return probe_uuid is not None and any(r.get("for") == probe_uuid for r in seen.res)
    if p.phase != 2 or len(seen.events) != len(p.events):  # (every ACK included: nothing closed)
        return False
    res_for = {r.get("for") for r in seen.res}
    return all(u in res_for for u, spec in p.res.items() if spec is not None and spec.required)


def parse_server_message(data: bytes) -> dict:
    msg = loads(data.decode("utf-8"))
    assert isinstance(msg, dict) and set(msg) == {"meta", "payload"}, msg
    assert set(msg["meta"]) == {"type", "uuid"} and msg["meta"]["type"] in TYPE_NAMES, msg
    assert UUID_LOWER.fullmatch(msg["meta"]["uuid"]), msg
    assert isinstance(msg["payload"], dict), msg
    return msg


def _describe(preds: list[Prediction]) -> str:
    lines = []
    for p in preds:
        codes = "any" if p.codes is None else sorted(p.codes)
        tail = " then unpredicted" if p.unknown else f" then close {codes} (phase {p.phase})"
        lines.append(f"  {p.events}{tail}")
    return "\n".join(lines)


def exchange(ws: RawWS, phase1: bytes, phase2: bytes, preds: list[Prediction], probe_uuid: Optional[str]) -> tuple[int, bool]:
    """Send ``phase1``, read the answers, send ``phase2`` once a prediction says the server has
    answered everything before it, and read until the close frame. Returns (code, clean)."""
    assert preds, "the model predicts nothing"
    ws.send(phase1)  # an error here (the server hung up first) shows in what is read
    seen = Observed()
    sent2 = not phase2

    def live() -> list[Prediction]:
        return [p for p in preds if _consistent(p, seen)]

    while True:
        if not sent2 and any(_ready_for_phase2(p, seen, probe_uuid) for p in live()):
            ws.send(phase2)
            sent2 = True
        try:
            op, data = ws.read_frame()
        except socket.timeout:
            pytest.fail(f"server hung: no frame within {TIMEOUT} s; seen {seen.events} and RES {seen.res};"
                        f" phase 2 sent: {sent2}; expected one of:\n{_describe(preds)}")  # fmt: skip
        except (EOFError, ConnectionError) as exc:
            pytest.fail(f"the TCP connection ended without a close frame ({exc!r}); seen {seen.events};"
                        f" expected one of:\n{_describe(preds)}")  # fmt: skip
        if op == OP_CLOSE:
            break
        if op == OP_PING:
            continue
        if op == OP_PONG:
            seen.events.append(("PONG", data))
        else:
            msg = parse_server_message(data)
            kind = TYPE_NAMES[msg["meta"]["type"]]
            if kind == "RES":
                seen.res.append(msg["payload"])
            elif kind in ("ACK", "NACK"):
                seen.events.append((kind, msg["payload"]))
            # an EVNT can only come from a SUB the example made: not predicted, not an error
        assert live(), f"unexpected answer: seen {seen.events} and RES {seen.res}; expected one of:\n{_describe(preds)}"
    assert 2 <= len(data) <= 125, f"close frame without a code, or too long: {data!r}"
    code = struct.unpack(">H", data[:2])[0]
    data[2:].decode("utf-8")  # the reason must be UTF-8
    final = []
    for p in live():
        if p.unknown:
            ok = code in VALID_CLOSE and len(seen.events) >= len(p.events)
        else:
            # an ACK of a CALL may be missing: the connection closed before its listener sent it
            ok = len(_split(seen.events)[0]) == len(_split(p.events)[0]) and code in p.codes and (p.phase == 1 or sent2)
        if ok:
            final.append(p)
    assert final, (f"closed with {code} {data[2:]!r} after {seen.events} (RES {seen.res}), phase 2 sent: {sent2};"
                   f" expected one of:\n{_describe(preds)}")  # fmt: skip
    if not any(p.clean or p.unknown for p in final):  # a protocol error: one of its codes
        assert code in ERROR_CODES, f"protocol error closed with {code} {data[2:]!r}"
    return code, all(p.clean for p in final)


# --- the harness: one server per test, checks after every example ------------------------------


class Tracker:
    """The server's ``on_state`` hook: records each connection's CLOSED, by client port."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.closed: dict[int, tuple[Optional[int], str, threading.Thread]] = {}

    def hook(self, conn: Any, state: ConnState) -> None:
        if state is ConnState.CLOSED:
            with self.cond:
                self.closed[conn.remote_addr[1]] = (conn.close_code, conn.close_reason, threading.current_thread())
                self.cond.notify_all()

    def wait_closed(self, port: int, timeout: float) -> Optional[tuple[Optional[int], str, threading.Thread]]:
        with self.cond:
            if not self.cond.wait_for(lambda: port in self.closed, timeout):
                return None
            return self.closed.pop(port)


def _pool_addrs(client: Any) -> set[str]:
    """The local addresses of a redis-py client's pooled connections (the shared pool may grow
    under concurrent use: that is not a leak)."""
    pool = client.connection_pool
    out = set()
    for c in list(getattr(pool, "_available_connections", [])) + list(getattr(pool, "_in_use_connections", [])):
        sock = getattr(c, "_sock", None)
        if sock is not None:
            try:
                host, port = sock.getsockname()[:2]
                out.add(f"{host}:{port}")
            except OSError:
                pass
    return out


@dataclass
class Case:
    """One example: the bytes sent after the handshake, in two phases."""

    label: str
    frames: list
    allowed_header: Optional[str] = None
    allowed: frozenset = ALL_TYPES
    tail: list = field(default_factory=list)  # the probe and the final close (phase 1 end, phase 2)
    raw: bytes = b""  # unframed bytes after the frames (garbage), part of phase 1
    probe_uuid: Optional[str] = None
    zeros: int = 0  # zero bytes after ``raw``

    @property
    def phase1(self) -> bytes:
        probe = self.tail[:-1] if self.tail else []
        return b"".join(f.encode() for f in self.frames) + self.raw + b"\0" * self.zeros + b"".join(f.encode() for f in probe)

    @property
    def phase2(self) -> bytes:
        return self.tail[-1].encode() if self.tail else b""

    def __repr__(self) -> str:
        hdr = "" if self.allowed_header is None else f" allowed={self.allowed_header!r}"
        raw = f" raw={self.raw[:300]!r}{'...' if len(self.raw) > 300 else ''}" if self.raw else ""
        zeros = f" +{self.zeros} zero bytes" if self.zeros else ""
        return f"Case({self.label}{hdr} frames={self.frames}{raw}{zeros} tail={self.tail})"


class Harness:
    def __init__(self, make_stack: Any, redis_client: Any, limit: int = LIMIT) -> None:
        self.limit = limit
        self.started = time.monotonic()
        self.tracker = Tracker()
        self.stack = make_stack(read_limit=limit, on_state=self.tracker.hook)
        self.control = self.stack.client()
        # The server's pub-sub reader (a thread, a redis connection) is the server's, made by
        # its first SUB: make it now, so that it is there before any example, like the pool.
        self.control.sub("fuzz.control")
        # The same for the connection a PUBLISH goes out on (the broker's own for PUBLISH).
        self.control.pub("fuzz.warmup", None)
        self.examples = 0
        self._pause = threading.Event()  # never set: a bounded pause between redis polls
        self.check_control()
        self.admin = None
        if not isinstance(redis_client, fakeredis.FakeRedis):
            kw = redis_client.connection_pool.connection_kwargs
            self.admin = redis.Redis(host=kw.get("host", "127.0.0.1"), port=kw.get("port", 6379), db=kw.get("db", 0))
            self.admin_id = self.admin.client_id()
        self.threads0 = set(self._threads())
        self.redis0 = self.redis_addrs()

    @staticmethod
    def _threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("juggler")]

    def redis_addrs(self) -> set[str]:
        if self.admin is None:
            return set()
        return {c["addr"] for c in self.admin.client_list() if int(c["id"]) != self.admin_id}

    def wait_redis_released(self, before: set[str], what: str) -> None:
        """Poll CLIENT LIST (redis notices a closed socket on its next event-loop turn) until
        it holds no connection that was not there ``before``, bar the shared pool's."""
        if self.admin is None:
            return
        deadline = time.monotonic() + REDIS_SETTLE
        while True:
            extra = self.redis_addrs() - before - _pool_addrs(self.stack.redis)
            if not extra:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"redis connections leaked by {what}: {sorted(extra)}")
            self._pause.wait(0.005)

    def check_control(self) -> None:
        self.examples += 1
        token = f"control-{self.examples}"
        assert self.control.call("test.echo", token, timeout=TIMEOUT) == token, "the control client lost its call"

    def run(self, case: Case) -> None:
        p1 = case.phase1
        note(f"phase 1: {len(p1)} bytes; recursion limit {sys.getrecursionlimit()}")
        threads_before = set(self._threads())
        redis_before = self.redis_addrs()
        phase1, phase2 = case.phase1, case.phase2
        preds = predict(phase1 + phase2, len(phase1), lambda m: oracle(m, case.allowed), self.limit)
        ws = RawWS(self.stack.server.url, case.allowed_header)
        try:
            code, clean = exchange(ws, phase1, phase2, preds, case.probe_uuid)
            if clean:
                ws.expect_eof()
        finally:
            ws.close()
        closed = self.tracker.wait_closed(ws.port, TIMEOUT)
        assert closed is not None, f"the server did not tear the connection down within {TIMEOUT} s"
        server_code, reason, thread = closed
        assert server_code == code, f"the server recorded close {server_code} {reason!r} but sent {code}"
        thread.join(TIMEOUT)
        assert not thread.is_alive(), f"connection thread {thread.name} still alive {TIMEOUT} s after CLOSED"
        left = [t.name for t in set(self._threads()) - threads_before if t.is_alive()]
        assert not left, f"threads left behind by the connection: {left}"
        self.check_control()
        self.wait_redis_released(redis_before, "the example")

    def finish(self) -> None:
        """After all examples: only the control client is connected, and the thread and redis
        connection counts are back to their baselines."""
        print(f"\n{self.examples - 1} examples in {time.monotonic() - self.started:.1f} s")
        conns = self.stack.server.connections
        assert len(conns) == 1, f"connections still open: {conns}"
        now = set(self._threads())
        assert now == self.threads0, f"juggler threads changed: {sorted(t.name for t in now ^ self.threads0)}"
        self.wait_redis_released(self.redis0, "the test")


@pytest.fixture
def harness(make_stack, redis_client, request):
    h = Harness(make_stack, redis_client, getattr(request, "param", LIMIT))
    yield h
    if h.admin is not None:
        h.admin.close()


# --- strategies ----------------------------------------------------------------------------------


class Ids:
    """Distinct, deterministic message uuids within one example (with hex letters, so that
    upper-casing one changes it)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"{self.n:08x}-abcd-4ef0-8abc-{self.n:012x}"


def dumps(obj: Any, ascii_only: bool = False, spaced: bool = False) -> str:
    return json.dumps(obj, ensure_ascii=ascii_only, separators=(", ", ": ") if spaced else (",", ":"))


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["NaN", "Infinity", "-0", "\u2028", "\x00", "\U0001f600", "é", "\\ud800"]),
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)
masks = st.sampled_from([b"\x00\x00\x00\x00", b"\x37\xfa\x21\x3d", b"\xff\xff\xff\xff"]) | st.binary(min_size=4, max_size=4)
channels = st.sampled_from(["fuzz.a", "fuzz.*", "fuzz.[ab]", "[", "\\", "*", " ", "fuzz.\u00e9"]) | st.text(min_size=1, max_size=16)
uris = st.sampled_from(SERVED + ("test.nobody", "")) | st.text(max_size=12)


@st.composite
def allowed_headers(draw: Any) -> tuple[Optional[str], frozenset]:
    kind = draw(st.sampled_from(["absent"] * 5 + ["star", "empty", "subset", "subset"]))
    if kind == "absent":
        return None, ALL_TYPES
    if kind == "star":
        return draw(st.sampled_from(["*", " * "])), ALL_TYPES
    if kind == "empty":
        return "", ALL_TYPES
    names = draw(st.lists(st.sampled_from(["call", "pub", "sub", "unsb"]), min_size=1, max_size=4, unique=True))
    parts = []
    for name in names:
        if draw(st.booleans()):
            name = name.upper()
        parts.append(draw(st.sampled_from(["", " "])) + name + draw(st.sampled_from(["", " "])))
    allowed = frozenset({"call": CALL, "pub": PUB, "sub": SUB, "unsb": UNSB}[n] for n in names)
    return ",".join(parts), allowed


def probe_and_close(draw: Any, ids: Ids, allowed: frozenset, vary: bool = True) -> tuple[list, str]:
    """A request the connection may send (a CALL when it can), then a close frame (with a
    code and mask drawn, unless not ``vary``)."""
    u = ids()
    if CALL in allowed:
        probe = {"meta": {"type": CALL, "uuid": u}, "payload": {"uri": "test.echo", "timeout": 10**10, "args": "probe"}}
    else:
        t = min(allowed)
        probe = {"meta": {"type": t, "uuid": u}, "payload": {"channel": "fuzz.probe"}}
    if not vary:
        return [Frame(OP_TEXT, dumps(probe).encode()), close_frame(1000)], u
    code = draw(st.sampled_from([1000, 1000, 1000, 1001, 3000, 4999]))
    return [Frame(OP_TEXT, dumps(probe).encode(), mask=draw(masks)), close_frame(code, draw(st.sampled_from(["", "bye"])))], u


def fragment(draw: Any, opcode: int, data: bytes, max_pieces: int = 4, controls: bool = True) -> list[Frame]:
    """``data`` as one message of 1..max_pieces frames cut at arbitrary bytes (inside UTF-8
    sequences too), with pings and pongs between the fragments."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=max_pieces - 1)))) if len(data) > 1 else []
    bounds = [0, *cuts, len(data)]
    frames: list[Frame] = []
    for i in range(len(bounds) - 1):
        piece = data[bounds[i] : bounds[i + 1]]
        frames.append(Frame(opcode if i == 0 else OP_CONT, piece, fin=i == len(bounds) - 2, mask=draw(masks)))
        if controls and i < len(bounds) - 2 and draw(st.integers(0, 4)) == 0:
            frames.append(Frame(draw(st.sampled_from([OP_PING, OP_PONG])), draw(st.binary(max_size=20)), mask=draw(masks)))
    return frames


@st.composite
def valid_request(draw: Any, ids: Ids) -> bytes:
    kind = draw(st.sampled_from(["call", "call", "pub"]))
    u = ids()
    if kind == "call":
        payload = {"uri": draw(st.sampled_from(SERVED)), "timeout": 10**10, "args": draw(json_values)}
        env = {"meta": {"type": CALL, "uuid": u}, "payload": payload}
    else:
        env = {"meta": {"type": PUB, "uuid": u}, "payload": {"channel": draw(channels), "args": draw(json_values)}}
    return dumps(env, ascii_only=draw(st.booleans()), spaced=draw(st.booleans())).encode("utf-8")


# Envelope mutations ------------------------------------------------------------------------------

RAW = "\u0000RAW\u0000"  # a string value replaced by raw JSON text after serialization
RAW_TOKENS = [
    "NaN", "-NaN", "Infinity", "-Infinity", "nan", "inf", "1e999", "-1e999", "1e400", "0x10", "01", "+1", ".5",
    "1.", "-", "1e", "true1", "nul", "\"\\ud800\"", "\"a\\udfffb\"", "\"\\ud83d\\ude00\"", "\"\\ud83d\"",
    "\"\\udc00\\ud800\"", "\"\\u00e9\"", "\"\\x41\"", "\"\t\"", "\"\\/\"", "[]", "{}", "-0", "1E+2", "123456789012345678901234567890",
    "9223372036854775807", "9223372036854775808", "-9223372036854775809", "1.0", "1e9", "\"1\"", "null",
]  # fmt: skip
RAW_BYTES = [b'"\xed\xa0\x80"', b'"\xff"', b'"\xc0\xaf"', b'"\xf4\x90\x80\x80"', b'"\xe2\x82"', b'"\xf0\x9f\x98\x80"']


def _set_path(env: dict, path: tuple, value: Any) -> None:
    node = env
    for k in path[:-1]:
        nxt = node.get(k) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[path[-1]] = value


def _del_path(env: dict, path: tuple) -> None:
    node: Any = env
    for k in path[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


PATHS = [("meta",), ("meta", "type"), ("meta", "uuid"), ("payload",), ("payload", "uri"), ("payload", "timeout"),
         ("payload", "args"), ("payload", "channel"), ("payload", "pattern")]  # fmt: skip

weird_values = st.one_of(
    json_values,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 5, 6, 7, 8, 9, 10, 11, 2**31, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 1.0, 1.5, -0.0, True, False]),
    st.sampled_from(["", "1", "CALL", "call", "00000000-0000-0000-0000-000000000000", "{00000000-0000-0000-0000-000000000000}",
                     "00000000000000000000000000000000", "00000000-abcd-4ef0-8abc-00000000000", "00000000-ABCD-4EF0-8ABC-000000000001",
                     "00000001-abcd-4ef0-8abc-000000000001\n", "test.echo", "test.nobody"]),  # fmt: skip
)


@st.composite
def mutated_message(draw: Any, ids: Ids, allowed: frozenset) -> tuple[bytes, list[str]]:
    """A request envelope, then 0..3 mutations; returns its bytes and what was done."""
    t = draw(st.sampled_from([CALL, CALL, PUB, SUB, UNSB]))
    u = ids()
    if t == CALL:
        payload: dict = {"uri": draw(uris)}
        if draw(st.booleans()):
            payload["timeout"] = draw(st.sampled_from([0, -1, 1, 999_999, 1_000_000, 10**9, 10**10, 600 * 10**9, 600 * 10**9 + 1, -(2**63), 2**63 - 1]) | st.integers(-(2**63), 2**63 - 1))
        if draw(st.booleans()):
            payload["args"] = draw(json_values)
    elif t == PUB:
        payload = {"channel": draw(channels), "args": draw(json_values)}
    else:
        payload = {"channel": draw(channels)}
        if draw(st.booleans()):
            payload["pattern"] = draw(st.booleans())
    env: dict = {"meta": {"type": t, "uuid": u}, "payload": payload}
    done: list[str] = []
    raw_text: Optional[str] = None
    raw_bytes: Optional[bytes] = None
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3]))):
        kind = draw(st.sampled_from(["replace", "replace", "drop", "extra", "raw", "big"]))
        path = draw(st.sampled_from(PATHS))
        if kind == "replace":
            value = draw(weird_values)
            _set_path(env, path, value)
            done.append(f"{'.'.join(path)}={value!r}")
        elif kind == "drop":
            _del_path(env, path)
            done.append(f"del {'.'.join(path)}")
        elif kind == "extra":
            where = draw(st.sampled_from([(), ("meta",), ("payload",)]))
            key = "x-" + draw(st.text(max_size=6))
            value = draw(json_values)
            _set_path(env, where + (key,), value)
            done.append(f"{'.'.join(where + (key,))}={value!r}")
        elif kind == "raw" and raw_text is None and raw_bytes is None:
            _set_path(env, path, RAW)
            if draw(st.integers(0, 4)) == 0:
                raw_bytes = draw(st.sampled_from(RAW_BYTES))
                done.append(f"{'.'.join(path)}=raw {raw_bytes!r}")
            else:
                raw_text = draw(st.sampled_from(RAW_TOKENS))
                done.append(f"{'.'.join(path)}=raw {raw_text}")
        elif kind == "big":
            n = draw(st.sampled_from([3900, 4000, 4050, 4096, 5000, 16000, 16300, 16384, 17000]) | st.integers(0, 20000))
            _set_path(env, ("payload", "args"), "x" * n)
            done.append(f"args={n}-char string")
    text = dumps(env, ascii_only=draw(st.booleans()), spaced=draw(st.booleans()))
    data = text.encode("utf-8")
    if raw_text is not None:
        data = data.replace(dumps(RAW).encode(), raw_text.encode("utf-8"), 1)
    elif raw_bytes is not None:
        data = data.replace(dumps(RAW).encode(), raw_bytes, 1)
    text_kind = draw(st.sampled_from(["none"] * 20 + ["truncate", "append", "append", "prepend", "prepend", "dupkey", "flip", "insert", "delete"]))
    if text_kind == "truncate" and len(data) > 1:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif text_kind == "append":
        data += draw(st.sampled_from([b"\n", b" \r\n\t", b"x", b"}", b"{}", b",", b"\x00", b"\n\n"]))
    elif text_kind == "prepend":
        data = draw(st.sampled_from([b" ", b"\n", b"\xef\xbb\xbf", b"\x00", b"["])) + data
    elif text_kind == "dupkey" and data.startswith(b"{"):
        data = b'{"meta":{"type":99,"uuid":7},"payload":[],' + data[1:]
    elif text_kind in ("flip", "insert", "delete") and data:
        i = draw(st.integers(0, len(data) - 1))
        if text_kind == "flip":
            data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1 :]
        elif text_kind == "insert":
            data = data[:i] + draw(st.binary(min_size=1, max_size=3)) + data[i:]
        else:
            data = data[:i] + data[i + 1 :]
    if text_kind != "none":
        done.append(f"text {text_kind}")
    return data, done


def nested_json(depth: int, shape: str) -> str:
    if shape == "list":
        return "[" * depth + "0" + "]" * depth
    opens = ["[" if i % 2 == 0 else '{"a":' for i in range(depth)]
    return "".join(opens) + "0" + "".join("]" if o == "[" else "}" for o in reversed(opens))


@dataclass
class DeepFrame:
    """A text frame: a CALL (to ``uri``) or a PUB whose args nest ``depth`` deep or, when
    ``depth`` is ``None``, ``below`` less deep than Python's recursion limit, read when the
    frame is sent: hypothesis raises the limit (to about its stack depth + 2000) while it runs
    an example, and the server's threads share it. Near the limit is where a server that
    decodes what it cannot re-encode shows."""

    shape: str
    uri: Optional[str]  # None: a PUB
    uuid: str
    depth: Optional[int] = None
    below: int = 0

    def message(self) -> bytes:
        depth = self.depth if self.depth is not None else sys.getrecursionlimit() - self.below
        if self.uri is None:
            env = {"meta": {"type": PUB, "uuid": self.uuid}, "payload": {"channel": "fuzz.deep", "args": RAW}}
        else:
            env = {"meta": {"type": CALL, "uuid": self.uuid}, "payload": {"uri": self.uri, "timeout": 10**10, "args": RAW}}
        return dumps(env).encode().replace(dumps(RAW).encode(), nested_json(depth, self.shape).encode(), 1)

    def encode(self) -> bytes:
        return Frame(OP_TEXT, self.message()).encode()


@st.composite
def deep_frames(draw: Any, ids: Ids) -> DeepFrame:
    shape = draw(st.sampled_from(["list", "mixed"]))
    uri = draw(st.sampled_from(SERVED + ("test.nobody", None)))
    if draw(st.integers(0, 3)) == 0:
        return DeepFrame(shape, uri, ids(), depth=draw(st.integers(1, 3000)))
    # just under the limit, spread evenly (st.integers favours its bounds)
    return DeepFrame(shape, uri, ids(), below=draw(st.randoms(use_true_random=True)).randint(0, 60))


@st.composite
def deep_cases(draw: Any) -> Case:
    """A message ``below`` levels less deeply nested than the recursion limit: a small space,
    which hypothesis covers (the domain of st.integers in a composite with many draws is
    sampled too unevenly to find a depth that only one value exposes)."""
    ids = Ids()
    below = draw(st.integers(0, DEEP_BELOW))
    if draw(st.booleans()):
        header, allowed, uri = None, ALL_TYPES, "test.echo"
    else:  # no results nor pub-sub listener: quick to tear down
        header, allowed, uri = "pub", frozenset({PUB}), None
    tail, probe = probe_and_close(draw, ids, allowed, vary=False)
    return Case(f"deep: {'CALL' if uri else 'PUB'} nested (recursion limit - {below}) deep", [DeepFrame("list", uri, ids(), below=below)], header, allowed, tail, probe_uuid=probe)


@st.composite
def envelope_cases(draw: Any) -> Case:
    ids = Ids()
    if draw(st.integers(0, 4)) == 0:
        deep = draw(deep_frames(ids))
        tail, probe = probe_and_close(draw, ids, ALL_TYPES)
        return Case("envelope: deeply nested args", [deep], None, ALL_TYPES, tail, probe_uuid=probe)
    header, allowed = draw(allowed_headers())
    data, done = draw(mutated_message(ids, allowed))
    frames = fragment(draw, OP_TEXT, data, max_pieces=draw(st.sampled_from([1, 1, 1, 3])))
    tail, probe = probe_and_close(draw, ids, allowed)
    return Case("envelope: " + "; ".join(done or ["unmutated"]), frames, header, allowed, tail, probe_uuid=probe)


@st.composite
def garbage_cases(draw: Any) -> Case:
    ids = Ids()
    header, allowed = draw(allowed_headers())
    junk = draw(
        st.binary(max_size=200)
        | st.text(max_size=60).map(lambda s: s.encode("utf-8"))
        | st.sampled_from([b"{", b"{}", b"[]", b"null", b'"meta"', b'{"meta":null}', b'{"meta":{}}', b"\xff\xfe", b"\xc3", b"{\"meta\":{\"type\":1"])
    )  # fmt: skip
    if draw(st.integers(0, 3)) == 0:  # unframed garbage, then zeros: a frame the garbage started ends, and 00 00 is an unmasked frame
        frames = []
        if draw(st.booleans()):
            frames = fragment(draw, OP_TEXT, draw(valid_request(ids)))
        stream = b"".join(f.encode() for f in frames)
        if draw(st.booleans()):  # flipped bits in otherwise well-formed frames
            stream += junk
            flips = draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=4))
            b = bytearray(stream)
            for i, bit in flips:
                if b:
                    b[i % len(b)] ^= 1 << bit
            raw = bytes(b)
        else:
            raw = stream + junk
        return Case("raw garbage", [], header, allowed, raw=raw, zeros=LIMIT + 64)
    opcode = draw(st.sampled_from([OP_TEXT, OP_TEXT, OP_BINARY]))
    frames = fragment(draw, opcode, junk)
    tail, probe = probe_and_close(draw, ids, allowed)
    return Case(f"garbage in {'text' if opcode == OP_TEXT else 'binary'} frames", frames, header, allowed, tail, probe_uuid=probe)


close_payloads = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=1),
    st.tuples(
        st.sampled_from([0, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1011, 1012, 1014, 1015, 1016, 2999, 3000, 4999, 5000, 65535])
        | st.integers(0, 65535),
        st.text(max_size=20).map(lambda s: s.encode("utf-8")) | st.sampled_from([b"\xff", b"\xed\xa0\x80", b"ok\xc3"]),
    ).map(lambda t: struct.pack(">H", t[0]) + t[1]),
)


@st.composite
def frame_cases(draw: Any) -> Case:
    ids = Ids()
    header, allowed = draw(allowed_headers())
    frames: list[Frame] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["message"] * 6 + ["ping"] * 2 + ["pong", "binary", "text", "close", "random", "cont", "start"]))
        mask = draw(masks)
        if kind == "message":
            frames += fragment(draw, OP_TEXT, draw(valid_request(ids)), max_pieces=draw(st.integers(1, 6)))
        elif kind in ("ping", "pong"):
            n = draw(st.sampled_from([0, 1, 125, 126, 127, 200]) | st.integers(0, 130))
            frames.append(Frame(OP_PING if kind == "ping" else OP_PONG, draw(st.binary(min_size=n, max_size=n)), fin=draw(st.integers(0, 9)) > 0, mask=mask))
        elif kind == "binary":
            frames += fragment(draw, OP_BINARY, draw(valid_request(ids) | st.binary(max_size=50)))
        elif kind == "text":
            frames += fragment(draw, OP_TEXT, draw(st.binary(max_size=40)))
        elif kind == "close":
            payload = draw(close_payloads | st.binary(min_size=126, max_size=130))
            frames.append(Frame(OP_CLOSE, payload, fin=draw(st.integers(0, 9)) > 0, mask=mask))
        elif kind == "cont":
            frames.append(Frame(OP_CONT, draw(st.binary(max_size=10)), fin=draw(st.booleans()), mask=mask))
        elif kind == "start":  # a message left open: what follows breaks it, or continues it
            frames.append(Frame(OP_TEXT, draw(valid_request(ids))[:5], fin=False, mask=mask))
        else:
            frames.append(
                Frame(
                    draw(st.integers(0, 15)),
                    draw(st.binary(max_size=20) | valid_request(ids)),
                    fin=draw(st.booleans()),
                    rsv=draw(st.sampled_from([0, 0, 0, 1, 2, 4, 7])),
                    masked=draw(st.integers(0, 4)) > 0,
                    mask=mask,
                )
            )
    # Low-level mutations of the well-formed frames.
    mutations = draw(st.lists(st.tuples(st.integers(0, 100), st.sampled_from(["rsv", "opcode", "unmask", "fin", "nofin"])), max_size=2))
    for i, what in mutations if draw(st.integers(0, 3)) == 0 else []:
        f = frames[i % len(frames)]
        if what == "rsv":
            f.rsv = draw(st.integers(1, 7))
        elif what == "opcode":
            f.opcode = draw(st.integers(0, 15))
        elif what == "unmask":
            f.masked = False
        else:
            f.fin = what == "fin"
    tail, probe = probe_and_close(draw, ids, allowed)
    return Case("frames", frames, header, allowed, tail, probe_uuid=probe)


@st.composite
def oversized_cases(draw: Any) -> Case:
    ids = Ids()
    kind = draw(st.sampled_from(["message", "message", "message", "fragments", "declared", "control"]))
    frames: list[Frame]
    if kind in ("message", "fragments"):
        size = draw(st.integers(LIMIT - 40, LIMIT + 40) | st.integers(LIMIT - 400, 4 * LIMIT))
        u = ids()
        env = {"meta": {"type": CALL, "uuid": u}, "payload": {"uri": "test.echo", "timeout": 10**10, "args": ""}}
        base = len(dumps(env).encode())
        env["payload"]["args"] = "x" * max(0, size - base)
        data = dumps(env).encode()
        if kind == "message":
            frames = fragment(draw, OP_TEXT, data, max_pieces=draw(st.integers(1, 3)), controls=False)
        else:  # many small fragments: each costs FRAGMENT_COST beyond its bytes
            k = draw(st.integers(2, 80))
            step = max(1, len(data) // k)
            pieces = [data[i : i + step] for i in range(0, len(data), step)]
            frames = [Frame(OP_TEXT if i == 0 else OP_CONT, p, fin=i == len(pieces) - 1) for i, p in enumerate(pieces)]
        if draw(st.booleans()):  # oversized in the middle of a connection that did well so far
            frames = fragment(draw, OP_TEXT, draw(valid_request(ids))) + frames
    elif kind == "declared":  # a header announcing more than the limit; a few bytes follow
        length = draw(st.integers(LIMIT + 1, 65535) | st.integers(65536, 2**64 - 1) | st.sampled_from([LIMIT + 1, 2**63, 2**64 - 1, 2**63 - 1]))
        frames = [Frame(draw(st.sampled_from([OP_TEXT, OP_BINARY, OP_CONT])), draw(st.binary(max_size=8)), length=length)]
    else:  # a control frame whose length uses the 16- or 64-bit form
        n = draw(st.integers(126, 300) | st.integers(0, 125))
        frames = [Frame(draw(st.sampled_from([OP_PING, OP_PONG, OP_CLOSE])), b"\x03\xe8" + b"p" * max(0, n - 2), wide=draw(st.booleans()))]
    tail, probe = probe_and_close(draw, ids, ALL_TYPES)
    return Case(f"oversized {kind}", frames, None, ALL_TYPES, tail, probe_uuid=probe)


# --- the properties --------------------------------------------------------------------------------


def _run(harness: Harness, cases: Any, max_examples: int = MAX_EXAMPLES) -> None:
    @settings(FUZZ, max_examples=max_examples)
    @given(cases)
    def prop(case: Case) -> None:
        harness.run(case)

    prop()
    harness.finish()


def test_fuzz_garbage(harness):
    """Random bytes in text and binary frames (fragmented or not), and unframed garbage."""
    _run(harness, garbage_cases())


@pytest.mark.parametrize("harness", [ENVELOPE_LIMIT], indirect=True)
def test_fuzz_envelopes(harness):
    """Request envelopes with mutated fields: wrong types, missing or extra fields, unknown and
    server-side types, huge and negative numbers, NaN-ish tokens, lone surrogates, invalid
    UTF-8, deep nesting, broken JSON text; under random Juggler-Allowed-Messages headers."""
    _run(harness, envelope_cases())


@pytest.mark.parametrize("harness", [ENVELOPE_LIMIT], indirect=True)
def test_fuzz_deep_nesting(harness):
    """Messages nested just under Python's recursion limit (which bounds json decoding and
    encoding): the server decodes and answers them, or refuses them with 1007."""
    _run(harness, deep_cases(), max_examples=2 * (DEEP_BELOW + 1))  # the whole (small) space


def test_fuzz_frames(harness):
    """Sequences of frames: valid messages cut into fragments with control frames between
    them, random opcodes, reserved bits, unmasked frames, continuation frames out of place,
    control frames too long or fragmented, client close frames with valid and invalid codes."""
    _run(harness, frame_cases())


def test_fuzz_oversized(harness):
    """Messages around and over the read limit, in one frame or many; headers announcing huge
    lengths (64-bit, high bit set); control frames with extended lengths."""
    _run(harness, oversized_cases())
