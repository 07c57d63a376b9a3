"""One websocket peer (RFC 6455) as a state machine: bytes in, events and frames out.

A :class:`Peer` is what every websocket endpoint of juggler drives: the server's connections
(:class:`~juggler.conn.Conn`), the blocking :class:`~juggler.client.Client`, both sides of
:mod:`juggler.statesync`, and the load tool. It owns the websocket rules that are the same for
all of them: frame syntax, masking (a server side expects masked frames, a client side masks
its own), fragmented messages reassembled under a read limit, pings answered, the close
handshake. It has no sockets, threads, clocks or logging (in the manner of python-websockets'
sans-I/O ``Protocol``, or wsproto): whoever reads the socket hands it the bytes with
:meth:`Peer.receive_data`, and acts on the events that come back, in order, each a tuple
``(kind, value)``:

=================== ====================== ==========================================================
kind                value                  what the driver does
=================== ====================== ==========================================================
``OP_TEXT``,        the message (bytes)    handle it (dropped while closing, unless
``OP_BINARY``                              ``read_after_close``)
``SEND``            a frame (bytes)        write it: the pong that answers a ping (none while closing)
``OP_PONG``         its payload            nothing, usually
``CLOSE``           a :class:`Close`       the peer closed: answer with ``close.answer``; no event
                                           follows
``FAIL``            a                      the peer broke the protocol: close with its
                    :class:`~juggler.      ``close_code`` and ``reason``; what follows is discarded
                    exceptions.            (read on until the peer hangs up, as RFC 6455 asks)
                    ProtocolError`
=================== ====================== ==========================================================

The driver sets :attr:`Peer.closing` once it starts its own close (any thread may: it is one
attribute) and builds its frames with :meth:`Peer.frame` and :meth:`Peer.close_frame`, which
mask them on the client side (with ``os.urandom``, the peer's one call outside itself). The
events of one call are made at once: a driver that starts closing while it acts on one of
them checks :attr:`Peer.closing` before it acts on the messages after it, as the server's
connections do. When and how the bytes go out (a queue, a writer thread, a write deadline)
is the driver's: see :mod:`juggler.transport`.

A frame that arrives whole in one read (the usual case) is parsed straight from the bytes
read; only a frame cut across reads waits in a buffer, parsed once the buffer holds as many
bytes as the frame needs. A read that brings exactly one whole masked text frame (a client's
message, as a rule) is recognized first and unmasked at once: about 1.5 µs of CPU for a small
CALL, against 2.3 µs for the full parse.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from .exceptions import ProtocolError
from .frames import (
    FRAGMENT_COST,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    CloseCode,
    encode_close,
    encode_frame,
    parse_close,
    unmask,
)

__all__ = ["Peer", "Close", "SEND", "CLOSE", "FAIL", "OP_TEXT", "OP_BINARY", "OP_PONG"]

#: Event kinds besides the opcodes of messages (``OP_TEXT``, ``OP_BINARY``) and pongs
#: (``OP_PONG``): a frame to send, the peer's close, the peer's protocol error.
SEND = 0x10
CLOSE = 0x11
FAIL = 0x12

_OPCODES = frozenset({OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})
_NO_EVENTS: tuple[()] = ()


class Close(NamedTuple):
    """The close frame a peer sent."""

    code: int  #: 1005 (``CloseCode.NO_STATUS_RCVD``) when it had none
    reason: str

    @property
    def answer(self) -> int:
        """The code to close with in answer: the peer's, echoed as RFC 6455 suggests; 1000
        for none."""
        return CloseCode.NORMAL_CLOSURE if self.code == CloseCode.NO_STATUS_RCVD else self.code


class Peer:
    """A websocket endpoint's protocol state (see the module's docstring).

    ``client``: this is the client side (frames read must not be masked, frames built are
    masked); else the server side (frames read must be masked). ``limit``: the largest message
    read, in bytes after reassembly, where each continuation frame also costs
    ``FRAGMENT_COST`` (over it: ``FAIL`` with 1009). ``read_after_close``: messages that come
    after :attr:`closing` is set are still returned (the client's: a result may still come
    while its close frame waits behind its calls); else they are dropped.
    """

    __slots__ = ("client", "limit", "read_after_close", "closing", "_buf", "_need", "_op", "_data", "_size", "_ended")

    def __init__(self, *, client: bool = False, limit: int = 1 << 20, read_after_close: bool = False) -> None:
        self.client = client
        self.limit = limit
        self.read_after_close = read_after_close
        #: Set by the driver once it starts closing (its close frame is or will be sent):
        #: pings are no longer answered and, unless ``read_after_close``, messages dropped.
        self.closing = False
        self._buf = bytearray()  # the start of a frame not all here yet
        self._need = 0  # bytes _buf must hold before it is worth parsing again
        self._op: int | None = None  # the opcode of the fragmented message being reassembled
        self._data = bytearray()  # and its payload so far
        self._size = 0  # what it counts against the limit so far
        self._ended = False  # a close frame or a protocol error came: the rest is discarded

    @property
    def ended(self) -> bool:
        """Whether the peer's close frame, or a protocol error, came: no event follows."""
        return self._ended

    # -- sending --

    def frame(self, opcode: int, payload: bytes) -> bytes:
        """One final frame of ``payload``, masked on the client side."""
        return encode_frame(opcode, payload, os.urandom(4) if self.client else None)

    def close_frame(self, code: int, reason: str = "") -> bytes:
        """The close frame to send (masked on the client side); sets :attr:`closing`."""
        self.closing = True
        return encode_close(code, reason, os.urandom(4) if self.client else None)

    # -- receiving --

    def receive_data(self, data: bytes) -> "list[tuple[int, Any]] | tuple[()]":
        """The events that ``data``, the next bytes from the peer, complete (see the module's
        docstring); what is left of a frame not yet whole waits for the next call."""
        if self._ended:
            return _NO_EVENTS
        buf = self._buf
        if not buf:
            whole = self._one_text_frame(data)
            if whole is not None:
                return whole
        if buf:
            buf += data
            if len(buf) < self._need:
                return _NO_EVENTS
            data = bytes(buf)
            buf.clear()
        events: list[tuple[int, Any]] = []
        pos, end = 0, len(data)
        masked = not self.client
        try:
            while True:
                frame = self._frame_at(data, pos, end)
                if frame is None:
                    break
                b1, start, pos = frame
                payload = unmask(data[start:pos], data[start - 4 : start]) if masked else data[start:pos]
                opcode = b1 & 0x0F
                if opcode >= OP_CLOSE:
                    if not self._control(events, opcode, payload):
                        return events
                elif b1 & 0x80 and opcode != OP_CONT:  # a message in one frame
                    if not self.closing or self.read_after_close:
                        events.append((opcode, payload))
                else:
                    self._fragment(events, opcode, payload, b1 & 0x80)
        except ProtocolError as exc:
            self._fail(events, exc)
            return events
        if pos < end:
            buf += data[pos:] if pos else data
        return events

    def _one_text_frame(self, data: bytes) -> "list[tuple[int, Any]] | tuple[()] | None":
        """The events of ``data`` when it is exactly one whole, final, masked text frame under
        the read limit, read by a server side between messages (what a client sends, and one
        read brings, as a rule): those :meth:`receive_data` would give, with less work;
        ``None`` otherwise (then it parses ``data`` in full)."""
        n = len(data)
        # (FIN, no reserved bits, text; a payload of 1 byte or more)
        if n < 7 or data[0] != 0x81 or self.client or self._op is not None:
            return None
        length = data[1] ^ 0x80  # (the mask bit set: under 128)
        if length < 126:
            start = 6
        elif length == 126 and n >= 8:
            length = (data[2] << 8) | data[3]
            start = 8
        else:
            return None  # (unmasked, or a 64-bit length)
        if n != start + length or not 0 < length <= self.limit:
            return None
        if self.closing and not self.read_after_close:
            return _NO_EVENTS
        return [(OP_TEXT, unmask(data[start:], data[start - 4 : start]))]

    def _frame_at(self, data: bytes, pos: int, end: int) -> "tuple[int, int, int] | None":
        """The frame that starts at ``data[pos]``: its first byte and where its payload starts
        and stops, once all of it is in ``data[:end]`` (else ``None``, and how many bytes it
        needs so far in ``_need``). :class:`ProtocolError` for a frame RFC 6455 forbids, as
        soon as its head shows it."""
        left = end - pos
        if left < 2:
            self._need = 2
            return None
        b1 = data[pos]
        b2 = data[pos + 1]
        opcode = b1 & 0x0F
        if b1 & 0x70:
            raise ProtocolError("reserved bits set without a negotiated extension")
        if opcode not in _OPCODES:
            raise ProtocolError(f"unknown opcode {opcode:#x}")
        if bool(b2 & 0x80) is self.client:
            raise ProtocolError("server frames must not be masked" if self.client else "client frames must be masked")
        length = b2 & 0x7F
        head = 2
        if opcode >= OP_CLOSE:  # a control frame
            if not b1 & 0x80 or length > 125:
                raise ProtocolError("control frames must be final and at most 125 bytes")
        else:
            if length >= 126:
                head = 4 if length == 126 else 10
                if left < head:
                    self._need = head
                    return None
                length = int.from_bytes(data[pos + 2 : pos + head], "big")
                if length >> 63:
                    raise ProtocolError("frame length has its high bit set")
            self._check_data_frame(opcode, length)
        if not self.client:
            head += 4  # the mask
        stop = pos + head + length
        if stop > end:
            self._need = head + length
            return None
        return b1, pos + head, stop

    def _check_data_frame(self, opcode: int, length: int) -> None:
        """:class:`ProtocolError` for a data frame over the read limit (1009) or out of place
        (a continuation with nothing to continue, a new message inside one)."""
        # Each continuation frame also costs FRAGMENT_COST against the limit, so a flood of
        # tiny or empty fragments cannot keep a connection busy for free.
        cost = length + FRAGMENT_COST if opcode == OP_CONT else length
        if self._size + cost > self.limit:
            raise ProtocolError(f"message larger than the read limit of {self.limit} bytes", CloseCode.MESSAGE_TOO_BIG)
        if opcode == OP_CONT:
            if self._op is None:
                raise ProtocolError("continuation frame without a message to continue")
        elif self._op is not None:
            raise ProtocolError("new message started inside a fragmented message")

    def _control(self, events: list[tuple[int, Any]], opcode: int, payload: bytes) -> bool:
        """Act on a control frame; ``False`` when it ends the stream (the peer's close)."""
        if opcode == OP_PING:
            if not self.closing:
                events.append((SEND, self.frame(OP_PONG, payload)))
        elif opcode == OP_PONG:
            events.append((OP_PONG, payload))
        else:
            try:
                close = Close(*parse_close(payload))
            except ProtocolError as exc:
                self._fail(events, exc)
                return False
            self._ended = True
            events.append((CLOSE, close))
            return False
        return True

    def _fragment(self, events: list[tuple[int, Any]], opcode: int, payload: bytes, fin: int) -> None:
        if opcode == OP_CONT:
            self._size += len(payload) + FRAGMENT_COST
        else:
            self._op = opcode
            self._size = len(payload)
        self._data += payload
        if fin:
            op, message = self._op, bytes(self._data)
            self._op, self._size = None, 0
            self._data.clear()
            if not self.closing or self.read_after_close:
                events.append((op, message))

    def _fail(self, events: list[tuple[int, Any]], exc: ProtocolError) -> None:
        self._ended = True
        self._buf.clear()
        self._data.clear()
        events.append((FAIL, exc))
