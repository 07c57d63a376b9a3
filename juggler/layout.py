"""The redis layout of juggler.0: the names of the keys and the Lua scripts, in one place.

Keys (the braces are literal: redis cluster hash tags, so a script's keys share a slot)::

    juggler:calls:{URI}                         list of pending call payloads
    juggler:calls:timeout:{URI}:MSGUUID         expires with the call
    juggler:results:{CONNUUID}                  list of results for one connection
    juggler:results:timeout:{CONNUUID}:MSGUUID  expires with the result

Unlike the reference, the lists themselves carry a TTL that is never shorter than the
longest timeout pushed into them, so calls to a URI that no callee serves, and results for a
connection that is gone, do not stay in redis forever.

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
