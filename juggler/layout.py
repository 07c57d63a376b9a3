"""The redis layout of juggler.0: the names of the keys and the Lua scripts, in one place.

Keys (the braces are literal: redis cluster hash tags, so a script's keys share a slot)::

    juggler:calls:{URI}                         list of pending call payloads
    juggler:calls:timeout:{URI}:MSGUUID         expires with the call
    juggler:results:{CONNUUID}                  list of results for one connection
    juggler:results:timeout:{CONNUUID}:MSGUUID  expires with the result
    juggler:history:{CHANNEL}                   stream: the last events of a channel with history
    juggler:history:epoch:{CHANNEL}             string: that history's epoch
    juggler:history:rules                       the --history rules servers run with, as JSON

Unlike the reference, the lists themselves carry a TTL that is never shorter than the
longest timeout pushed into them, so calls to a URI that no callee serves, and results for a
connection that is gone, do not stay in redis forever.

The history keys are an extension (see :mod:`juggler.history`): a Go server neither reads nor
writes them, and ignores the ``offset`` and ``epoch`` an event of such a channel carries.

A Go server, callee or client reads and writes the same keys: change nothing here without
checking the Go mixes (tests/test_wire.py).
"""

from __future__ import annotations

import math

from redis.cluster import key_slot

from . import resp

__all__ = [
    "CAPACITY_ERROR",
    "WAKE_MARKER",
    "calls_key",
    "call_timeout_key",
    "results_key",
    "result_timeout_key",
    "call_slot",
    "ms",
    "STORE_SCRIPT",
    "CONSUME_SCRIPT",
    "POP_CALLS_SCRIPT",
    "STORE",
    "CONSUME",
    "history_key",
    "epoch_key",
    "HISTORY_RULES_KEY",
    "PUBLISH_HISTORY",
    "READ_HISTORY",
]

CAPACITY_ERROR = "list capacity exceeded"


def calls_key(uri: str) -> str:
    return f"juggler:calls:{{{uri}}}"


def call_timeout_key(uri: str, msg_uuid: str) -> str:
    return f"juggler:calls:timeout:{{{uri}}}:{msg_uuid}"


def results_key(conn_uuid: str) -> str:
    return f"juggler:results:{{{conn_uuid}}}"


def result_timeout_key(conn_uuid: str, msg_uuid: str) -> str:
    return f"juggler:results:timeout:{{{conn_uuid}}}:{msg_uuid}"


def call_slot(uri: str) -> int:
    """The Redis Cluster hash slot of ``uri``'s call list (and of its calls' timeout keys)."""
    return key_slot(calls_key(uri).encode("utf-8"))



def ms(seconds: float) -> int:
    """Whole milliseconds for a PX, at least 1."""
    return max(1, int(math.ceil(seconds * 1000)))



# KEYS[1] timeout key, KEYS[2] list; ARGV[1] timeout in ms, ARGV[2] payload, ARGV[3] capacity
# (0: none). The element just pushed is trimmed off again when the list is over capacity. The
# list's own TTL is raised (never lowered) to the timeout, so an unconsumed list goes away once
# every element in it has expired. A list that exists without a TTL was filled by a server that
# does not set one (the Go reference): it is left alone, so none of its calls expire early.
STORE_SCRIPT = """
local before = redis.call('PTTL', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[1])
local n = redis.call('LPUSH', KEYS[2], ARGV[2])
local cap = tonumber(ARGV[3])
if cap > 0 and n > cap then
  redis.call('LTRIM', KEYS[2], 1, -1)
  redis.call('DEL', KEYS[1])
  return redis.error_reply('list capacity exceeded')
end
local ms = tonumber(ARGV[1])
if before == -2 or (before >= 0 and before < ms) then
  redis.call('PEXPIRE', KEYS[2], ms)
end
return n
"""

#: Pushed onto a connection's results list to wake its listener (:meth:`RedisBroker.wake_results`);
#: never a result payload, which is a JSON object.
WAKE_MARKER = b"juggler:wake"

# KEYS[1] timeout key. Returns its remaining ms (<= 0: expired or missing) and deletes it.
CONSUME_SCRIPT = """
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
return ttl
"""

STORE = resp.Script(STORE_SCRIPT)
CONSUME = resp.Script(CONSUME_SCRIPT)


# A callee worker's batch pop. KEYS: the call lists of the worker's URIs (one slot on a
# cluster); ARGV[1] how many calls to return at most, ARGV[2] a payload the worker already took
# off a list with BRPOP ('' for none), ARGV[3..] the URIs whose timeout keys it may consume.
# Pops further payloads (RPOP, lists in order, as BRPOP picks them) and, for each payload whose
# uri is one of ARGV[3..], reads the PTTL of its timeout key and deletes it, as CONSUME_SCRIPT
# does for one. Returns payload, ttl, payload, ttl, ...; ttl -3 means "not consumed" (the
# payload is not JSON Lua can read, or names another URI): the caller decides.
POP_CALLS_SCRIPT = """
local out = {}
local ours = {}
for i = 3, #ARGV do ours[ARGV[i]] = true end
local function take(payload)
  local ok, call = pcall(cjson.decode, payload)
  local ttl = -3
  if ok and type(call) == 'table' and type(call.uri) == 'string' and type(call.msg_uuid) == 'string'
      and ours[call.uri] then
    local key = 'juggler:calls:timeout:{' .. call.uri .. '}:' .. call.msg_uuid
    ttl = redis.call('PTTL', key)
    redis.call('DEL', key)
  end
  out[#out + 1] = payload
  out[#out + 1] = ttl
end
if ARGV[2] ~= '' then take(ARGV[2]) end
local n = tonumber(ARGV[1])
local i = 1
while #out < 2 * n and i <= #KEYS do
  local payload = redis.call('RPOP', KEYS[i])
  if payload then take(payload) else i = i + 1 end
end
return out
"""


# --- channel history (juggler.history) --------------------------------------------------------

#: Where servers with history record their rules (a JSON list of ``PATTERN=SIZE,TTL``), for
#: publishers that are not told them (:func:`juggler.history.publish`).
HISTORY_RULES_KEY = "juggler:history:rules"


def history_key(channel: str) -> str:
    return f"juggler:history:{{{channel}}}"


def epoch_key(channel: str) -> str:
    return f"juggler:history:epoch:{{{channel}}}"


# (Lua, both scripts) The epoch of KEYS[2], made from ARGV[1] when there is none: a history
# without an epoch is a lost one (expired, flushed, a redis restarted without persistence), so
# what is left of its stream KEYS[1] is dropped with it.
_EPOCH = """
local function the_epoch(new, ttl)
  local epoch = redis.call('GET', KEYS[2])
  if epoch then return epoch end
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], new, 'PX', ttl)
  return new
end
"""

# KEYS[1] the channel's stream, KEYS[2] its epoch; ARGV[1] the channel, ARGV[2] the event
# payload (a JSON object), ARGV[3] SIZE, ARGV[4] TTL in ms, ARGV[5] a new epoch. Appends the
# payload to the stream (trimmed to about SIZE: whole stream nodes), renews both keys' TTL and
# PUBLISHes the payload with its "offset" (the stream ID) and "epoch", in one atomic step: the
# history and the live stream never disagree. Returns {subscribers, offset, epoch}.
PUBLISH_HISTORY_SCRIPT = _EPOCH + """
local epoch = the_epoch(ARGV[5], ARGV[4])
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local event = string.sub(ARGV[2], 1, -2) .. ',"offset":"' .. id .. '","epoch":"' .. epoch .. '"}'
return {redis.call('PUBLISH', ARGV[1], event), id, epoch}
"""

# KEYS[1] the channel's stream, KEYS[2] its epoch; ARGV[1] a new epoch, ARGV[2] TTL in ms,
# ARGV[3] the offset to recover from ('': none), ARGV[4] its epoch, ARGV[5] SIZE. Returns
# {epoch, top, recovered, offset, payload, offset, payload...}: top is the last event's offset
# ('0-0': none); recovered is 1 when every event after ARGV[3] is still in the stream (its
# epoch is the history's, nothing after it was trimmed, at most SIZE of them), and they follow.
READ_HISTORY_SCRIPT = _EPOCH + """
local function id(s)
  local ms, seq = string.match(s, '^(%d+)-(%d+)$')
  if not ms then return nil end
  return {tonumber(ms), tonumber(seq)}
end
local function before(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end
local epoch = the_epoch(ARGV[1], ARGV[2])
local top = '0-0'
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then top = last[1][1] end
local since = id(ARGV[3])
if ARGV[3] == '' or ARGV[4] ~= epoch or not since or before(id(top), since) then
  return {epoch, top, 0}
end
if #last > 0 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'max-deleted-entry-id' and before(since, id(info[i + 1])) then
      return {epoch, top, 0}
    end
  end
end
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[3], '+', 'COUNT', tonumber(ARGV[5]) + 1)
if #entries > tonumber(ARGV[5]) then return {epoch, top, 0} end
local out = {epoch, top, 1}
for _, e in ipairs(entries) do
  out[#out + 1] = e[1]
  out[#out + 1] = e[2][2]
end
return out
"""

PUBLISH_HISTORY = resp.Script(PUBLISH_HISTORY_SCRIPT)
READ_HISTORY = resp.Script(READ_HISTORY_SCRIPT)
