"""The ``DATA`` patches a server's connections share: each computed and encoded once per pair
of local data objects, however many connections send it (see :class:`PatchCache`)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Optional

from ..frames import OP_TEXT, encode_frame
from . import protocol

__all__ = ["PatchCache"]


class _Patch:
    """One entry of a :class:`PatchCache`: the way from ``src`` to ``dst``, once ``ready``:
    ``data`` (the DATA frame or message; ``None`` when they are equal as JSON) or ``error``
    (``dst`` is not JSON)."""

    __slots__ = ("src", "dst", "data", "error", "ready")

    def __init__(self, src: Any, dst: Any) -> None:
        self.src, self.dst = src, dst  # held: their id()s, the key, stay theirs
        self.data: Optional[bytes] = None
        self.error: Optional[Exception] = None
        self.ready = threading.Event()


class PatchCache:
    """The ``DATA`` patches between two local data objects, each computed and encoded once
    however many connections send it: a server's connections share one, a client connection
    has its own. Keyed by the identity of the two objects (which the entry holds, so that an
    id cannot be reused while it is kept); the ``size`` entries last used are kept. A thread
    that asks for a patch another thread is computing waits for it.

    With ``frames`` the entries are whole unmasked text frames, ready to send (a server's);
    else the messages, to be framed and masked by each sender (a client's)."""

    def __init__(self, size: int = 16, *, frames: bool, logger: Optional[logging.Logger] = None) -> None:
        if size <= 0:
            raise ValueError(f"patch_cache_size must be positive, got {size!r}")
        self.size = size
        self.frames = frames
        self.logger = logger or logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, int], _Patch] = OrderedDict()
        #: patches computed (cache misses): one per distinct change, however many connections
        self.computed = 0

    def get(self, src: Any, dst: Any) -> _Patch:
        """The entry from ``src`` to ``dst``, ready (computed on this thread if nobody has)."""
        key = (id(src), id(dst))
        with self._lock:
            entry = self._entries.get(key)
            mine = entry is None
            if mine:
                entry = self._entries[key] = _Patch(src, dst)
                self.computed += 1
                if len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
        assert entry is not None and entry.src is src and entry.dst is dst
        if not mine:
            entry.ready.wait()  # the computing thread sets it whatever happens
            return entry
        try:
            message = protocol.encode_patch(src, dst)
            if message is not None and self.frames:
                message = encode_frame(OP_TEXT, message, None)
            entry.data = message
        except (TypeError, ValueError) as exc:
            entry.error = exc
            # the application's fault, logged once for all the connections that would send it
            self.logger.error("statesync: local data not sent: %s", exc)
        except BaseException as exc:  # a bug: every sender of it closes with 1011
            entry.error = exc
            raise
        finally:
            entry.ready.set()
        return entry
