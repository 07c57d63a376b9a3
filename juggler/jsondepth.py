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

The check costs a ``len()`` for a text no longer than :data:`MAX_JSON_DEPTH` (it cannot hold
more opening brackets: most messages), two ``str.count`` calls for a longer one with no more
opening brackets than that, and only beyond that one scan: a regular expression finds its
strings and brackets, in one pass whatever the text holds, and
:func:`itertools.accumulate` sums their depths.

What juggler encodes is what it decoded, or what the application made: a callee's result, a
state-sync state. Data nested thousands deep, made by an application on Python 3.13 in a
process whose thread stacks :func:`juggler.tuning.tune_process` made 512 KiB, can still
overflow a stack in the JSON encoder; keep such data shallow, or the stacks large.
"""

from __future__ import annotations

import itertools
import json
import re

__all__ = ["MAX_JSON_DEPTH", "too_deep"]

#: The deepest nesting of arrays and objects juggler decodes: 512 levels, far more than any
#: message needs, and a third of what CPython 3.12 decodes at most (Go's ``encoding/json``
#: allows 10,000). A message nested deeper closes its websocket with 1007 (``message is
#: nested too deeply``), as invalid JSON does.
MAX_JSON_DEPTH = 512

# A string (to its closing quote, or to the end of the text: never a failed match, so one pass
# over the text, whatever it holds) or a bracket; one way to match each character.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def too_deep(text: str | bytes, limit: int | None = None) -> bool:
    """Whether the JSON ``text`` nests arrays and objects deeper than ``limit`` (default
    :data:`MAX_JSON_DEPTH`, read at the call). Bytes are read in the encoding
    :func:`json.loads` would detect (UTF-8, or UTF-16 or -32). Brackets inside strings do not
    count; for text that is not JSON the answer means little, but a text with more than
    ``limit`` opening brackets before its first broken string is too deep, as the decoder
    would go that deep before it fails."""
    if limit is None:
        limit = MAX_JSON_DEPTH
    if len(text) <= limit:  # (fewer opening brackets than that)
        return False
    if isinstance(text, str):
        if text.count("[") + text.count("{") <= limit:
            return False
    else:
        if text.count(b"[") + text.count(b"{") <= limit:  # (a bracket is that byte in UTF-16, -32 too)
            return False
        text = bytes(text).decode(json.detect_encoding(text), "replace")
    steps = map(_STEP.get, _TOKEN.findall(text), itertools.repeat(0))
    return max(itertools.accumulate(steps), default=0) > limit
