"""Where the Redis store keeps things: slot-safe keys (Redis Cluster hash tags) and its scripts.

Every key starts with the configured prefix P (`session.key_prefix`) and carries a hash tag,
so that what one script touches lives in one slot:

    P{<tag>}s,<session id>     the session record (JSON, see gateway/session/record.py)
    P{<tag>}b,<session id>     its bound marker ("1"), set by the bind for a whole ttl
    P{o.<owner>}i,             the owner's index: a sorted set of session ids, scored by the
                               epoch ms at which each stops counting (created_at + ttl)

`<tag>` is the first 16 hex digits of SHA-256 of the session id: a record and its marker share
a slot, and ids spread over the Cluster whatever characters they hold (`{` and `}` included).
`<owner>` is the record's `owner` (32 hex digits). Every such key has a comma right after the
prefix's hash tag; a session id never holds a comma, so no key of this layout can equal a key
of the layout before it (`P<session id>`, `P'bound:<id>`, `P'owner:<owner>`, where P' is P with
its last character changed), which is read only to invalidate it (legacy).
"""

from __future__ import annotations

import hashlib

# KEYS[1] record, KEYS[2] bound marker (one slot). ARGV: record JSON, its life in ms, ttl ms,
# an `expired` tombstone's JSON.
# {1}: bound. {0, record}: the id is taken (another bind won). {2, tombstone}: the id was bound
# before and is idle past its timeout: nothing is bound, the tombstone is written in its place.
BIND = """
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return {2, ARGV[4]}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return {1}
"""

# KEYS[1] the owner's index. ARGV: now ms, the new entry's score (created_at + ttl, ms), the cap,
# the session id, ttl ms. Returns 1 when the id holds a place (new, or already there), else
# the entries (id, score, id, score, …): the owner is at the cap, as far as the index knows.
RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS[1] the owner's index. ARGV[1] a score; ARGV[2…] ids found not live. An id leaves the index
# only if its place was taken before that score: a place reserved moments ago may belong to a
# bind still on its way to the session's slot.
PRUNE = """
local removed = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) < tonumber(ARGV[1]) then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
"""

# GETEX before Redis 6.2: the same in one round trip.
GET_AND_SLIDE = """
local value = redis.call('GET', KEYS[1])
if value then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return value
"""


def session_tag(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def record_key(prefix: str, session_id: str) -> str:
    return f"{prefix}{{{session_tag(session_id)}}}s,{session_id}"


def bound_marker_key(prefix: str, session_id: str) -> str:
    """Set by a bind for `ttl`: the id was bound, so it is not bound again (gateway/session/store.py)."""
    return f"{prefix}{{{session_tag(session_id)}}}b,{session_id}"


def owner_index_key(prefix: str, owner: str) -> str:
    return f"{prefix}{{o.{owner}}}i,"


def record_pattern(prefix: str) -> str:
    """A SCAN pattern for every record key (not markers, not indexes)."""
    return _glob_escape(prefix) + "{*}s,*"


def session_id_of(prefix: str, key: str) -> str | None:
    """The session id of a record key, None for any other key."""
    rest = key[len(prefix) :] if key.startswith(prefix) else ""
    close = rest.find("}")
    if not rest.startswith("{") or close < 0 or rest[close + 1 : close + 3] != "s,":
        return None
    return rest[close + 3 :]


def beside(prefix: str) -> str:
    """A prefix beside `prefix`, never equal to a key under it: its last character changed."""
    last = prefix[-1:] or ":"
    return f"{prefix[:-1]}{'!' if last == '|' else '|'}"


def legacy_keys(prefix: str, session_id: str) -> tuple[str, str]:
    """The record key and the bound marker of the layout before this one (one Redis, no tags)."""
    return f"{prefix}{session_id}", f"{beside(prefix)}bound:{session_id}"


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
