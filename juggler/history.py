"""Channel history and recovery: no event lost across a reconnect.

A server run with history rules (``juggler server --history 'chat.*=200,300s'``,
``Server(history=[...])``) keeps, for each channel matching a rule, its last SIZE events in a
redis stream, each history expiring TTL after its last event. A PUB on such a channel is one
Lua script (:data:`~juggler.layout.PUBLISH_HISTORY`): ``XADD ... MAXLEN ~ SIZE`` and the
``PUBLISH``, so history and live delivery never disagree, and the event carries its
``offset`` (the stream ID, a string increasing per channel) and the history's ``epoch`` (a
random string, made again whenever the history is lost). Channels that match no rule cost
exactly what they did (a plain ``PUBLISH``).

A SUB of such a channel is answered with the subscriber's position (the last event before
it); a SUB with ``since`` (a position) first gets every event after it from the history, then
the live ones, with no gap and no duplicate at the seam: the connection subscribes live first
and holds the live events (:class:`Held`) while it reads the history, writes what it read,
then the held events not already written. When the position is not in the history any more
(another epoch, trimmed, more than SIZE events behind), the ACK says ``"recovered": false``
and the live stream starts. See ``docs/protocol.rst`` for the wire.

Bounds: SIZE from 1 to :data:`MAX_SIZE` (default :data:`DEFAULT_SIZE`), TTL up to
:data:`MAX_TTL` (default :data:`DEFAULT_TTL`); a replay writes at most SIZE events, through the
connection's write queue and its write timeout; the events held during a recovery are at most
SIZE plus the connection's write queue size (past it the connection is closed, 1008). Redis
keeps about SIZE events per channel (``MAXLEN ~`` trims whole stream nodes, 100 entries by
default).

:func:`publish` publishes from any backend, with no websocket, through the same script.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, Union

import redis

from . import resp
from .config import parse_duration
from .exceptions import BrokerError
from .layout import HISTORY_RULES_KEY, PUBLISH_HISTORY, READ_HISTORY, epoch_key, history_key, ms
from .message import Ack, EventPayload, Evnt, Position, Sub, new_uuid
from .redisconn import text

if TYPE_CHECKING:  # pragma: no cover
    from .conn import Conn

__all__ = [
    "DEFAULT_SIZE",
    "MAX_SIZE",
    "DEFAULT_TTL",
    "MAX_TTL",
    "HistoryRule",
    "History",
    "HistoryRead",
    "Held",
    "publish",
    "publish_event",
    "read_history",
    "subscribe",
]

logger = logging.getLogger(__name__)

#: Events kept per channel when a rule gives no SIZE, and the most a rule may give.
DEFAULT_SIZE = 100
MAX_SIZE = 10_000
#: Seconds a history lives after its last event when a rule gives no TTL, and the most.
DEFAULT_TTL = 300.0
MAX_TTL = 7 * 24 * 3600.0

#: ``run(script, keys, args)``: a Lua script's reply (a broker's, or a redis-py client's).
Eval = Callable[[resp.Script, list, list], Any]


def _glob(pattern: str) -> "re.Pattern[str]":
    """A redis glob (``*``, ``?``, ``[abc]``, ``[^a-c]``, ``\\x``) as a regular expression."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "\\" and i < len(pattern):
            out.append(re.escape(pattern[i]))
            i += 1
        elif c == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i:end]
            i = end + 1
            negate = body[:1] in ("^", "!")
            body = re.escape(body[1:] if negate else body).replace("\\-", "-")
            out.append(f"[{'^' if negate else ''}{body}]")
        else:
            out.append(re.escape(c))
    return re.compile("".join(out), re.DOTALL)


@dataclass(frozen=True)
class HistoryRule:
    """Keep the last ``size`` events of each channel matching ``pattern`` (a redis glob), each
    history expiring ``ttl`` seconds after its last event."""

    pattern: str
    size: int = DEFAULT_SIZE
    ttl: float = DEFAULT_TTL

    def __post_init__(self) -> None:
        if not self.pattern:
            raise ValueError("a history rule needs a channel pattern")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 1 <= self.size <= MAX_SIZE:
            raise ValueError(f"history size of {self.pattern!r} must be from 1 to {MAX_SIZE}, got {self.size!r}")
        if not 0.001 <= self.ttl <= MAX_TTL:
            raise ValueError(f"history TTL of {self.pattern!r} must be from 1ms to {MAX_TTL:g} s, got {self.ttl!r}")

    @classmethod
    def parse(cls, spec: str) -> "HistoryRule":
        """From ``PATTERN``, ``PATTERN=SIZE`` or ``PATTERN=SIZE,TTL`` (TTL a duration: ``300``,
        ``300s``, ``5m``). Raises :class:`ValueError` naming what is wrong."""
        pattern, _, rest = spec.strip().rpartition("=") if "=" in spec else (spec.strip(), "", "")
        size_text, _, ttl_text = rest.partition(",")
        try:
            size = int(size_text) if size_text.strip() else DEFAULT_SIZE
            ttl = parse_duration(ttl_text) if ttl_text.strip() else DEFAULT_TTL
        except ValueError as exc:
            raise ValueError(f"history rule {spec!r} is not PATTERN=SIZE,TTL (e.g. 'chat.*=200,300s'): {exc}") from None
        return cls(pattern.strip(), size, ttl)

    def __str__(self) -> str:
        return f"{self.pattern}={self.size},{self.ttl:g}s"


class History:
    """History rules; a channel takes the first one its name matches."""

    _CACHE = 4096  # channels whose rule is remembered (then the cache starts again)

    def __init__(self, rules: Iterable[Union[HistoryRule, str]]) -> None:
        self.rules = tuple(r if isinstance(r, HistoryRule) else HistoryRule.parse(r) for r in rules)
        self._matchers = [(_glob(r.pattern).fullmatch, r) for r in self.rules]
        self._cache: dict[str, Optional[HistoryRule]] = {}

    @classmethod
    def of(cls, value: Union[None, "History", str, Iterable[Union[HistoryRule, str]]]) -> Optional["History"]:
        """``value`` as a :class:`History` (a rule spec, or several); ``None`` for none."""
        if value is None or isinstance(value, History):
            return value or None
        history = cls([value] if isinstance(value, (str, HistoryRule)) else value)
        return history or None

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __repr__(self) -> str:
        return f"History({[str(r) for r in self.rules]!r})"

    def rule(self, channel: str) -> Optional[HistoryRule]:
        """The rule of ``channel``, or ``None`` when it keeps no history."""
        try:
            return self._cache[channel]
        except KeyError:
            pass
        found = next((r for match, r in self._matchers if match(channel)), None)
        if len(self._cache) >= self._CACHE:
            self._cache = {}
        self._cache[channel] = found
        return found

    def to_json(self) -> str:
        return json.dumps([str(r) for r in self.rules])


def new_epoch() -> str:
    return os.urandom(8).hex()


# -- redis ---------------------------------------------------------------------------------------


def publish_event(run: Eval, channel: str, payload: EventPayload, rule: HistoryRule) -> tuple[int, Position]:
    """Append ``payload`` to ``channel``'s history and publish it (one script); the number of
    redis subscribers that got it, and its position."""
    keys = [history_key(channel), epoch_key(channel)]
    n, offset, epoch = run(PUBLISH_HISTORY, keys, [channel, payload.to_json(), rule.size, ms(rule.ttl), new_epoch()])
    return int(n), Position(text(offset), text(epoch))


@dataclass(frozen=True)
class HistoryRead:
    """What a SUB finds in a channel's history: the ``position`` of its last event, whether the
    events after ``since`` could be ``recovered``, and those ``events`` (in order)."""

    position: Position
    recovered: bool
    events: tuple[EventPayload, ...] = ()


def read_history(run: Eval, channel: str, rule: HistoryRule, since: Optional[Position]) -> HistoryRead:
    """Read ``channel``'s history (making its epoch if it has none) and, given ``since``, the
    events after it: at most ``rule.size``, or none and ``recovered=False``."""
    args = [new_epoch(), ms(rule.ttl), since.offset if since else "", since.epoch if since else "", rule.size]
    reply = run(READ_HISTORY, [history_key(channel), epoch_key(channel)], args)
    epoch, top = text(reply[0]), text(reply[1])
    events = []
    for i in range(3, len(reply) - 1, 2):
        p = EventPayload.from_json(reply[i + 1])
        events.append(EventPayload(p.msg_uuid, p.args, text(reply[i]), epoch))
    return HistoryRead(Position(top, epoch), bool(reply[2]), tuple(events))


def _offset_key(offset: str) -> tuple[int, int]:
    ms_part, _, seq = offset.partition("-")
    try:
        return int(ms_part), int(seq or 0)
    except ValueError:
        return (-1, -1)


# -- a SUB with history (on the connection's reader thread) --------------------------------------


class Held:
    """The live events of one subscription while its history is read and written, and the
    seam after: the server's pub-sub thread holds them here, then (once the history is
    written) drops those the history held already. Events the pub-sub thread had not read
    yet when the history was read come after the recovery is over: they are dropped too,
    until the first event past the history goes through (then :attr:`passed`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.overflowed = False
        #: An event past the history went through: nothing more to drop.
        self.passed = False
        self._floor: Optional[tuple[str, tuple[int, int]]] = None  # (epoch, offset) of the history read
        self._events: list[Any] = []
        self._done = False
        self._lock = threading.Lock()

    def hold(self, event: Any) -> bool:
        """(The pub-sub thread.) Keep ``event``, or drop it as written from the history
        already: ``True``; ``False``: the caller writes it."""
        with self._lock:
            if not self._done:
                if len(self._events) >= self.limit:
                    self.overflowed = True
                else:
                    self._events.append(event)
                return True
        return self.behind(event)

    def read(self, position: Position) -> None:
        """The history was read up to ``position``."""
        self._floor = (position.epoch, _offset_key(position.offset))

    def behind(self, event: Any) -> bool:
        """Whether ``event`` was in the history read (then it was written from there)."""
        p = event.payload
        if self.passed or not p.offset or self._floor is None:
            return False
        epoch, top = self._floor
        if p.epoch == epoch and _offset_key(p.offset) <= top:
            return True
        self.passed = True
        return False

    def take(self) -> list[Any]:
        """The events held so far; when there are none, the recovery is over."""
        with self._lock:
            events, self._events = self._events, []
            self._done = self.overflowed or not events
            return events


def rule_for(conn: "Conn", msg: Sub) -> Optional[HistoryRule]:
    history = conn.history
    return None if history is None or msg.pattern else history.rule(msg.channel)


def subscribe(conn: "Conn", msg: Sub) -> None:
    """Run a SUB of a channel with history, or a SUB with ``since``: subscribe, ACK with the
    position (and ``recovered``), write the events recovered, then the live ones held meanwhile
    that came after them. Raises :class:`BrokerError` before anything is sent (then nothing
    is subscribed)."""
    rule = rule_for(conn, msg)
    key = (msg.pattern, msg.channel)
    if rule is None or key in conn.subscriptions():
        # a pattern or a channel without history: nothing to recover from; held already: its
        # events reach the connection as they did (and a replay would repeat them)
        conn.subscribe(msg.channel, msg.pattern)
        conn.send(Ack(msg, recovered=False if msg.since is not None else None))
        return
    held = Held(rule.size + conn.settings.write_queue_size)
    conn.hold_events(key, held)
    try:
        read = _subscribe_and_read(conn, msg, rule)
    except BaseException:
        conn.release_events(key, held)
        raise
    held.read(read.position)
    conn.send(Ack(msg, recovered=read.recovered if msg.since else None, position=read.position))
    if msg.since is not None and not read.recovered:
        logger.info("connection %s: SUB %s: cannot recover %r from offset %s of epoch %s (now %s of %s)",
                    conn.uuid, msg.uuid, msg.channel, msg.since.offset, msg.since.epoch, read.position.offset,
                    read.position.epoch)  # fmt: skip
    for payload in read.events:
        conn.handle(_evnt(msg.channel, payload))
    _write_held(conn, held)  # (the pub-sub thread lets `held` go once an event passes it)


def _subscribe_and_read(conn: "Conn", msg: Sub, rule: HistoryRule) -> HistoryRead:
    """Subscribe, then read the history; on a failure to read, unsubscribe again."""
    conn.subscribe(msg.channel, False)  # live first: what is published from now on is held
    try:
        return conn.pubsub_broker.read_history(msg.channel, rule, msg.since)
    except BrokerError:
        try:
            conn.unsubscribe(msg.channel, False)
        except BrokerError as exc:
            logger.debug("connection %s: undoing SUB %s: %s", conn.uuid, msg.uuid, exc)
        raise


def _write_held(conn: "Conn", held: Held) -> None:
    """Write the held events that came after the history read (the others were in it), until
    none is left; then the pub-sub thread writes them again."""
    while True:
        events = held.take()
        if held.overflowed:
            conn.close(1008, "client too slow: events piled up while recovering history")
            return
        if not events:
            return
        for event in events:
            if not held.behind(event):
                conn.handle(event.evnt().sharing(event.evnt_payload))


def _evnt(channel: str, p: EventPayload) -> Evnt:
    return Evnt(p.msg_uuid, channel, p.args, offset=p.offset, epoch=p.epoch)


# -- publishing from any backend -----------------------------------------------------------------


def _redis_py_eval(client: Any) -> Eval:
    def run(script: resp.Script, keys: list, args: list) -> Any:
        try:
            return client.evalsha(script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return client.eval(script.source, len(keys), *keys, *args)

    return run


def recorded_history(redis_client: Any) -> Optional[History]:
    """The history rules servers recorded in redis (``juggler:history:rules``), if any."""
    raw = redis_client.get(HISTORY_RULES_KEY)
    if not raw:
        return None
    try:
        return History.of(json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{HISTORY_RULES_KEY} in redis holds no history rules: {exc}") from None


def record_history(redis_client: Any, history: History) -> None:
    """Record ``history`` for publishers (:func:`publish`); a server with history does this on
    start."""
    redis_client.set(HISTORY_RULES_KEY, history.to_json())


def publish(redis_client: Any, channel: str, args: Any = None, *,
            history: Union[None, History, str, Sequence[Union[HistoryRule, str]]] = None) -> Optional[str]:  # fmt: skip
    """Publish ``args`` on ``channel`` from any backend (a web view, a cron job, a callee),
    with no websocket: the subscribers of every juggler server get it, as if a client had
    sent a PUB, and a channel with history keeps it (the same script as a PUB).

    ``redis_client``: a redis-py client of the servers' pub-sub redis. ``history``: the rules
    (as ``Server(history=...)`` takes them); ``None``: the ones the servers recorded in redis
    on start (one more ``GET``). Returns the event's offset, or ``None`` when the channel
    keeps no history. Raises redis-py's errors.
    """
    rules = History.of(history) if history is not None else recorded_history(redis_client)
    rule = rules.rule(channel) if rules is not None else None
    payload = EventPayload(new_uuid(), args)
    if rule is None:
        redis_client.publish(channel, payload.to_json())
        return None
    return publish_event(_redis_py_eval(redis_client), channel, payload, rule)[1].offset
