"""How deep the JSON that juggler decodes from its peers may nest: a limit of its own, the same
on every Python, checked before the text is decoded.

CPython's JSON decoder and encoder recurse in C, once per level of nesting. Up to 3.11 the
recursion limit bounds them (1,000 by default), and what is deeper raises
:class:`RecursionError`. From 3.12 on it does not: 3.12 decodes about 1,500 levels and 3.13
about 10,000, and 10,000 levels of C recursion do not fit in the 512 KiB stacks that
``juggler server`` gives its threads (:data:`juggler.tuning.THREAD_STACK_SIZE`): one message of
5,000 nested arrays (10 KB) crashed a server on Python 3.13 with SIGSEGV. So every JSON text
juggler takes from outside (a message from a websocket peer, a call or a result from redis, an
event from redis pub-sub) is refused, as invalid, when its arrays and objects nest deeper than
:data:`MAX_JSON_DEPTH`, before it is decoded.

The check costs a ``len()`` for a text shorter than twice :data:`MAX_JSON_DEPTH` (each level
takes two characters or more, so nearly every message), two ``str.count`` calls for a longer
one with no more opening brackets than that, and only beyond that a scan: its strings removed
by one regular expression, its brackets found by another, their depth summed with
:func:`itertools.accumulate` (about 1 ms for 6,000 brackets).
"""

from __future__ import annotations

import itertools
import re

__all__ = ["MAX_JSON_DEPTH", "too_deep"]

#: The deepest nesting of arrays and objects juggler decodes: 512 levels, far more than any
#: message needs, and a third of what CPython 3.12 decodes at most (Go's ``encoding/json``
#: allows 10,000). A message nested deeper closes its websocket with 1007 (``message is
#: nested too deeply``), as invalid JSON does.
MAX_JSON_DEPTH = 512

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')  # (one way to match each character: no backtracking)
_BRACKET = re.compile(r"[\[\]{}]")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def too_deep(text: str | bytes, limit: int | None = None) -> bool:
    """Whether the JSON ``text`` (or its UTF-8 bytes) nests arrays and objects deeper than
    ``limit`` (default :data:`MAX_JSON_DEPTH`, read at the call). Brackets inside strings do
    not count; for text that is not JSON the answer means little (decoding it fails anyway)."""
    if limit is None:
        limit = MAX_JSON_DEPTH
    if len(text) <= 2 * limit + 1:  # (each level takes two characters, or more)
        return False
    if isinstance(text, str):
        if text.count("[") + text.count("{") <= limit:
            return False
    else:
        if text.count(b"[") + text.count(b"{") <= limit:
            return False
        text = bytes(text).decode("utf-8", "replace")
    brackets = _BRACKET.findall(_STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0) > limit
