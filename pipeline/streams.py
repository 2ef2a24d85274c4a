"""The only module that talks to Redis: stream keys, publish, read_batch, commit (publish + ack), claims, dead letters.

Keys for line ``L`` with prefix ``P`` (``streams.prefix``):

- ``P:L:frames``      stream of encoded Frames (field ``payload``), read by consumer group ``scorers``
- ``P:L:results``     stream of encoded Decisions from scoring workers (with anomaly maps), group ``sinks``
- ``P:L:decisions``   the line's output: exactly one encoded Decision per frame, published by the sink
- ``P:L:deadletter``  entries that could not be processed: ``reason``, ``detail``, ``source_stream``,
                      ``source_entry_id``, ``frame_id`` and the original ``payload`` (its first 64 KiB when larger,
                      then with ``payload_bytes``, the original size, and ``payload_truncated`` = ``1``)
- ``P:L:frames:trimmed_unread``  hash: per consumer group, the entries trimmed before it read them (``group_stats``)
- ``P:L:deadletter:commit:<token>``  a commit's reply, for its retry after a lost reply (commits with dead letters
                                     only), deleted by the client's next commit, else after an hour
- ``P:L:model``       the model directory the line's scoring workers should use (set it to hot-reload)
- ``P:L:published:<frame_id>``  sorted set of the frame entry ids decided under that frame_id within a TTL: makes
                                the sink's publish idempotent per frame, while a frame that reuses a frame_id still
                                gets its decision
- ``P:health:<role>:<name>``    JSON heartbeat of each worker, expiring after a TTL

``StreamClient.line_footprint`` finds a line's keys of these names (and only those: ids may hold colons, so a key that
another line's names could also give is left alone) and ``unlink`` removes them, for ``lineinspect forget-line``.

Every stream but the results stream is trimmed with ``MAXLEN ~ streams.maxlen``; results are deleted once the sink
has published them, and scorers stop taking frames while ``streams.maxlen`` of them wait for the sink. Calls retry on
connection loss with exponential backoff (capped at ``redis.reconnect_max_backoff_s``) until ``retry_deadline`` (a
``time.monotonic()`` value) passes.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import partial
from typing import Any, TypeVar

import redis

from pipeline.config import RedisSettings, StreamSettings
from pipeline.messages import HEALTH_NAMESPACE

logger = logging.getLogger(__name__)

T = TypeVar("T")
PAYLOAD = "payload"
SCORER_GROUP = "scorers"
SINK_GROUP = "sinks"
ENTRY_TRIMMED = "entry_trimmed"  # dead-letter reason: an entry trimmed from its stream while pending, before claimed
# A dead letter keeps at most this much of its payload: enough to see what an entry was, while rejected 20 MB frames
# do not fill Redis (the dead-letter stream holds up to ~streams.maxlen entries).
DEAD_LETTER_PAYLOAD_BYTES = 64 * 1024
DEAD_LETTER_FRAME_ID_CHARS = 1000
# How long a commit with dead letters keeps its reply for a retry whose first try's reply was lost (a Redis stall or
# restart): longer than such outages last. The client's next commit deletes it once the reply came back, so this
# bounds only the key of a client that commits no more (stopped, or killed while retrying).
COMMIT_REPLY_TTL_S = 3600
UNLINK_BATCH = 500  # keys per UNLINK (and per pipeline of size queries) when a line is forgotten
_COMMIT_TOKEN = re.compile(r"[0-9a-f]{32}")  # StreamClient.commit's reply-key tokens: uuid4().hex
RETRIED_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, ConnectionError, OSError)

# KEYS: the frame_id's published marker (a sorted set: frames-stream entry id -> when its decision was published),
# the decisions stream. ARGV: marker TTL (s), MAXLEN, frame entry id, payload, payload to use when another frame
# used this frame_id within the TTL, now (s, the sink's clock). Entries older than the TTL are dropped first, so the
# set holds at most a TTL's worth of frames however often a camera reuses an id, and each frame is recognised for a
# full TTL after its own decision. Returns false (already published for this frame), or {decision entry id, 1 when
# the frame_id was reused else 0}. A plain string marker (written by sinks before entry ids) counts as published.
_PUBLISH_ONCE = """
if redis.call('TYPE', KEYS[1])['ok'] == 'string' then
  return false
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[6]) - tonumber(ARGV[1]))
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  return false
end
local reused = redis.call('ZCARD', KEYS[1]) > 0
redis.call('ZADD', KEYS[1], ARGV[6], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1])
if reused then
  return {redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'payload', ARGV[5]), 1}
end
return {redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'payload', ARGV[4]), 0}
"""

# Claim a group's entries idle at least ARGV[3] ms (at most ARGV[4]) for consumer ARGV[2] of group ARGV[1], in one
# atomic step. Those no longer in the stream (trimmed while pending) are dead-lettered here, each appended to KEYS[2]
# (MAXLEN ~ ARGV[5]; reason ARGV[6], the fields of _dead_letter_fields for an entry without payload) and acknowledged
# in the same step: handed back for the claimer to dead-letter in its next commit, they were lost without a trace
# when it crashed in between (the claim had already taken them off the pending list). Returns {{id, detail} of each
# dead-lettered entry, XCLAIM's reply for the others}. Atomic, so an idle entry is claimed or dead-lettered by one
# claimer only (with XPENDING and XCLAIM as two calls two claimers both reported a trimmed entry), and an entry its
# owner acknowledged and deleted meanwhile (the sink deletes acknowledged results) is not taken for trimmed.
_CLAIM_IDLE = """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[4])
local claim, trimmed = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3]}, {}
for _, row in ipairs(rows) do
  local id = row[1]
  if #redis.call('XRANGE', KEYS[1], id, id) == 0 then
    local detail = 'trimmed from the stream while pending on ' .. row[2] .. ' (idle ' .. row[3] .. ' ms, delivered '
      .. row[4] .. ' times); dead-lettered by ' .. ARGV[2] .. "'s claim"
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'reason', ARGV[6], 'detail', detail,
               'source_stream', KEYS[1], 'source_entry_id', id, 'frame_id', '', 'payload', '')
    redis.call('XACK', KEYS[1], ARGV[1], id)
    table.insert(trimmed, {id, detail})
  else
    table.insert(claim, id)
  end
end
if #claim == 5 then
  return {trimmed, {}}
end
return {trimmed, redis.call(unpack(claim))}
"""

# Keep entries in hand: reset the idle time of those of ARGV[3..] still pending on consumer ARGV[2] of group ARGV[1]
# and still in the stream (XCLAIM to their owner, JUSTID: no delivery counted), so no peer claims a batch that is
# merely slow. Checked and reset in one atomic step, so an entry a peer has claimed meanwhile is never taken back. A
# trimmed entry is left as it is: XCLAIM would drop it from the pending list (Redis 7), and its dead letter with it
# should the owner die. Returns the ids now pending on another consumer (claimed by a peer).
_KEEP_CLAIMED = """
local claim, taken = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}, {}
for index = 3, #ARGV do
  local id = ARGV[index]
  local rows = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #rows > 0 then
    if rows[1][2] ~= ARGV[2] then
      table.insert(taken, id)
    elseif #redis.call('XRANGE', KEYS[1], id, id) > 0 then
      table.insert(claim, id)
    end
  end
end
if #claim > 5 then
  table.insert(claim, 'JUSTID')
  redis.call(unpack(claim))
end
return taken
"""

# Finish a batch atomically: acknowledge ARGV[5] ids of KEYS[1] for group ARGV[1] (and delete them when ARGV[2] is '1'),
# append one payload to each of KEYS[4 + ARGV[8]..] (MAXLEN ~ ARGV[3] unless it is ''; each payload followed by the id
# of the entry it is the result of, or ''), then the dead letters to KEYS[2] (MAXLEN ~ ARGV[4]; each as a field count
# and its field/value pairs). When none of the ids was still pending yet some are still in the stream, the batch was
# already committed (a retry after a reply lost to a stalled Redis: the MULTI/EXEC this replaces appended every result
# and dead letter a second time) or a peer that claimed it committed it: nothing is appended. Ids gone from the stream
# (trimmed, or results deleted once acknowledged) do not count, so a batch of trimmed frames still gets its dead
# letters. A result or dead letter naming an entry (its source id; a dead letter's source_entry_id) that this commit did
# not acknowledge is left out when the entry is still in the stream (a peer's claim took it from a stalled owner's batch
# and committed it: claim pages do not follow batch boundaries; or an earlier try of this commit did) or when a dead
# letter in KEYS[2] since the entry's time names it (a peer's claim found it trimmed and dead-lettered it entry_trimmed:
# a result appended then gave the frame a decision beside that dead letter; or an earlier try of this commit
# dead-lettered it). Otherwise it is appended: Redis restarted without its data, and a peer's read may have recreated
# the group already, so XACK answers 0 though nobody else has the entry (an entry a peer, or an earlier try, committed
# and that was trimmed since gets its result again, which the sink publishes once per frame). Returns {the number
# acknowledged (-1 for none asked), the positions (from 1) of the dead letters appended}; a failed XACK (not a stream)
# appends everything anyway and then returns its error, as the MULTI/EXEC did. A commit with dead letters names a reply
# key (KEYS[3], ARGV[6] its token, else ''): its reply is kept there ARGV[7] s, and a retry of the same call (its reply
# lost) gets it back without running again. Without it the retry answered "already committed, none appended", and the
# worker's lineinspect_dead_letters_total missed the letters its first try had appended. The ARGV[8] keys KEYS[4..] are
# reply keys of the client's earlier commits whose replies it has received: deleted first, so reply keys do not pile up
# for their TTL (a flood of garbage frames made one per batch: ~690 a second per scorer).
_COMMIT = """
local n_forget = tonumber(ARGV[8])
for index = 4, 3 + n_forget do
  redis.call('DEL', KEYS[index])
end
if ARGV[6] ~= '' then
  local earlier = redis.call('GET', KEYS[3])
  if earlier then
    local acked_before, positions = string.match(earlier, '^(-?%d+):(.*)$')
    local appended_before = {}
    for position in string.gmatch(positions, '%d+') do table.insert(appended_before, tonumber(position)) end
    return {tonumber(acked_before), appended_before}
  end
end
local n_acks = tonumber(ARGV[5])
local at = 9
local acked, existing, ack_error = 0, 0, nil
local not_acked_here, gone, oldest = {}, {}, nil
for index = 1, n_acks do
  local id = ARGV[at]
  at = at + 1
  local reply = redis.pcall('XACK', KEYS[1], ARGV[1], id)
  if type(reply) == 'table' and reply.err then
    ack_error = reply.err
  elseif reply == 1 then
    acked = acked + 1
  elseif #redis.call('XRANGE', KEYS[1], id, id) > 0 then
    existing = existing + 1
    not_acked_here[id] = true
  else
    gone[id] = true
    local since = string.match(id, '^(%d+)')
    if since and (not oldest or tonumber(since) < tonumber(oldest)) then oldest = since end
  end
  if ARGV[2] == '1' then
    redis.call('XDEL', KEYS[1], id)
  end
end
if n_acks > 0 and ack_error == nil and acked == 0 and existing > 0 then
  return {0, {}}
end
if oldest and ack_error == nil then
  for _, letter in ipairs(redis.call('XRANGE', KEYS[2], oldest, '+')) do
    local fields, named = letter[2], {}
    for index = 1, #fields, 2 do named[fields[index]] = fields[index + 1] end
    local source = named['source_entry_id']
    if source and gone[source] and named['source_stream'] == KEYS[1] then not_acked_here[source] = true end
  end
end
local function ours(source)
  return ack_error or not source or source == '' or not not_acked_here[source]
end
for key_index = 4 + n_forget, #KEYS do
  if ours(ARGV[at + 1]) then
    if ARGV[3] == '' then
      redis.call('XADD', KEYS[key_index], '*', 'payload', ARGV[at])
    else
      redis.call('XADD', KEYS[key_index], 'MAXLEN', '~', ARGV[3], '*', 'payload', ARGV[at])
    end
  end
  at = at + 2
end
local letters, appended = 0, {}
while at <= #ARGV do
  local n_values = tonumber(ARGV[at])
  local fields, source = {}, nil
  for index = 1, n_values do
    fields[index] = ARGV[at + index]
    if index % 2 == 0 and fields[index - 1] == 'source_entry_id' then
      source = fields[index]
    end
  end
  at = at + n_values + 1
  letters = letters + 1
  if ours(source) then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
    table.insert(appended, letters)
  end
end
if ack_error then
  return redis.error_reply(ack_error)
end
local reply = {n_acks > 0 and acked or -1, appended}
if ARGV[6] ~= '' then
  redis.call('SET', KEYS[3], reply[1] .. ':' .. table.concat(appended, ','), 'EX', ARGV[7])
end
return reply
"""

# The groups of stream KEYS[1] (XINFO GROUPS), after setting right the read counter (entries-read) of each group whose
# lag is impossible. (1) A group that has been delivered everything (its last-delivered-id is the stream's last id)
# yet whose lag is not 0: Redis 7.0 logs XREADGROUP to the append-only file as XCLAIMs without the group's read
# counter, so a restart brings back the counter of the last AOF rewrite and the lag stays too high by every entry read
# since, for good (ingest then held back with nothing waiting). (2) A lag above the stream's length, or none (nil):
# Redis 7.0 counts reads on one by one across a trim, so every entry trimmed before the group read it stays in the
# lag, for good (a line outrunning its scorers reported 10,020 with ~400 entries held), and a counter a restart left
# unknown cannot be estimated inside a trimmed stream (no lag until the group has read everything). It is set to the
# length (exact when the trim passed the group's last-delivered-id, an upper bound otherwise, counted down by Redis
# from there). Not while entries deleted with XDEL (results the sink has published) lie at or after the stream's first
# entry: Redis then reports nil because it cannot count across them, not because the counter was lost, and the length
# would count results the sink read and still holds (heatmaps in flight) as undelivered, for good. XGROUP SETID to
# the id the group already has changes nothing else; in the same atomic step, so no read moves the group meanwhile. A
# server refusing writes (a replica, a demoted primary: READONLY; NOREPLICAS) leaves the counter as it is, and so does
# Redis before 7 (no entries-added, no lag): the groups are returned as they are.
# What a repair raises the counter by (outside XDEL holes) is how many entries were trimmed before the group read them,
# as Redis counted them in its lag: given KEYS[2], it is added up per group in that hash (field <group>;
# <group>:entries-read keeps the counter as this script left it). A counter found lower than that (a Redis 7.0
# restart's stale one, or a hand-made XGROUP SETID) marks the group (<group>:restarted), and so does an unknown
# (nil) one that (2) sets: the repairs that mend it are not counted until the counter is exact again (the group
# delivered everything). (2) alone does not end the mark: its counter assumes the group read nothing the stream
# holds, so when the group catches up, (1) raises it by what the group had read of the stream before (2) (nearly
# all of it on a live line at maxlen), which is no loss when (2) was not counted. Frames trimmed unread meanwhile
# go uncounted: after a restart the count falls short rather than count frames read. Returns {the groups (XINFO
# GROUPS), {group, its total of entries trimmed unread, ...}} (the second {} for Redis before 7 or without KEYS[2]).
_GROUP_STATS = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {{}, {}}
end
local stream, info = {}, redis.call('XINFO', 'STREAM', KEYS[1])
for index = 1, #info, 2 do stream[info[index]] = info[index + 1] end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if not stream['entries-added'] then
  return {groups, {}}
end
local function id_before(a, b)
  local a_ms, a_seq = string.match(a, '(%d+)-(%d+)')
  local b_ms, b_seq = string.match(b, '(%d+)-(%d+)')
  a_ms, a_seq, b_ms, b_seq = tonumber(a_ms), tonumber(a_seq), tonumber(b_ms), tonumber(b_seq)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end
local deleted = stream['max-deleted-entry-id']
local first = stream['first-entry']
local holes = deleted and deleted ~= '0-0' and first and not id_before(deleted, first[1])
local repaired, totals, counting = false, {}, #KEYS > 1
for _, row in ipairs(groups) do
  local group = {}
  for index = 1, #row, 2 do group[row[index]] = row[index + 1] end
  local name, read_now = group['name'], group['entries-read']
  local seen, restarted = nil, false
  if counting then
    seen = tonumber(redis.call('HGET', KEYS[2], name .. ':entries-read'))
    restarted = redis.call('HEXISTS', KEYS[2], name .. ':restarted') == 1
  end
  if type(read_now) == 'number' and seen and read_now < seen then
    restarted = true
  end
  local entries_read, exact = nil, false
  local caught_up = group['last-delivered-id'] == stream['last-generated-id']
  if caught_up and group['lag'] ~= 0 then
    entries_read, exact = stream['entries-added'], true
  elseif not holes and (type(group['lag']) ~= 'number' or group['lag'] > stream['length']) then
    entries_read = stream['entries-added'] - stream['length']
  end
  local counter = read_now
  if entries_read then
    local reply = redis.pcall('XGROUP', 'SETID', KEYS[1], name, group['last-delivered-id'], 'ENTRIESREAD', entries_read)
    if not reply.err then
      repaired = true
      local counted = type(read_now) == 'number' and not restarted
      if counting and counted and not holes and entries_read > read_now then
        redis.pcall('HINCRBY', KEYS[2], name, entries_read - read_now)
      end
      restarted, counter = not counted and not exact, entries_read
    end
  elseif caught_up and group['lag'] == 0 then
    restarted = false
  end
  if counting then
    if type(counter) == 'number' and counter ~= seen then
      redis.pcall('HSET', KEYS[2], name .. ':entries-read', counter)
    end
    if restarted then
      redis.pcall('HSET', KEYS[2], name .. ':restarted', 1)
    else
      redis.pcall('HDEL', KEYS[2], name .. ':restarted')
    end
    table.insert(totals, name)
    table.insert(totals, tonumber(redis.call('HGET', KEYS[2], name)) or 0)
  end
end
if repaired then
  return {redis.call('XINFO', 'GROUPS', KEYS[1]), totals}
end
return {groups, totals}
"""

# Forget consumers of a group that hold nothing and have been idle long enough (pods that went away). Atomic, so a
# consumer cannot read an entry between the check and the deletion (deleting it would drop that entry's pending
# record). A live worker that is merely idle is recreated by its next read.
_FORGET_IDLE_CONSUMERS = """
local forgotten = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local fields = {}
  for index = 1, #consumer, 2 do fields[consumer[index]] = consumer[index + 1] end
  local idle_enough = tonumber(fields['idle']) >= tonumber(ARGV[2])
  if fields['name'] ~= ARGV[3] and tonumber(fields['pending']) == 0 and idle_enough then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], fields['name'])
    table.insert(forgotten, fields['name'])
  end
end
return forgotten
"""


class StreamsUnavailable(ConnectionError):
    """Redis stayed unreachable past the retry deadline."""


@dataclass(frozen=True)
class LineKeys:
    """Redis key names of one line."""

    prefix: str
    line_id: str

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{self.line_id}:{name}"

    @property
    def frames(self) -> str:
        return self._key("frames")

    @property
    def results(self) -> str:
        return self._key("results")

    @property
    def decisions(self) -> str:
        return self._key("decisions")

    @property
    def deadletter(self) -> str:
        return self._key("deadletter")

    @property
    def model(self) -> str:
        return self._key("model")

    def published(self, frame_id: str) -> str:
        return self._key(f"published:{frame_id}")


def health_key(prefix: str, role: str, name: str) -> str:
    return f"{prefix}:{HEALTH_NAMESPACE}:{role}:{name}"


@dataclass(frozen=True)
class StreamEntry:
    """One stream entry as read. ``payload`` is None when the entry was trimmed or deleted before it was read, or
    when it has no ``payload`` field (a producer of its own named it otherwise): ``other_fields`` then names the
    fields it has, and is empty for an entry that is gone."""

    entry_id: str
    payload: bytes | None
    deliveries: int = 1
    other_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeadLetter:
    entry_id: str
    payload: bytes | None
    reason: str
    detail: str
    frame_id: str = ""


class Publication(Enum):
    """What ``publish_decisions_once`` did with one decision."""

    DUPLICATE = "duplicate"  # this frame (frame_id and frame entry id) already has a published decision
    PUBLISHED = "published"
    PUBLISHED_FRAME_ID_REUSED = "published_frame_id_reused"  # another frame with this frame_id was published before


@dataclass(frozen=True)
class DecisionToPublish:
    """A decision for ``publish_decisions_once``; ``frame_entry_id`` (the frame's frames-stream entry id) tells a
    redelivery of the same frame from a different frame that reuses its frame_id. ``payload_if_reused`` is published
    instead of ``payload`` in the second case (None: ``payload``)."""

    frame_id: str
    frame_entry_id: str
    payload: bytes
    payload_if_reused: bytes | None = None


@dataclass(frozen=True)
class Claimed:
    """What ``claim_stale`` did: the idle entries it took over, to process, and the dead letters it has already
    written (entries trimmed while pending), for the claimer's metrics and logs."""

    entries: list[StreamEntry]
    dead_letters: list[DeadLetter]


@dataclass(frozen=True)
class GroupStats:
    """A consumer group as ``group_stats`` reports it; ``trimmed_unread`` is None where Redis does not count it."""

    pending: int
    lag: int | None
    last_delivered_id: str
    trimmed_unread: int | None = None  # entries trimmed from the stream before the group read them, in all


@dataclass(frozen=True)
class KeyUsage:
    """One key of a line: its Redis type, what it holds (stream entries, hash fields, sorted-set members, string
    bytes) and its MEMORY USAGE in bytes (Redis's estimate; None where the server refuses the command)."""

    key: str
    kind: str
    items: int
    memory_bytes: int | None


@dataclass(frozen=True)
class LineFootprint:
    """What a line holds in Redis (``StreamClient.line_footprint``): its ``keys``, and its frames that have no
    published decision yet: ``frames_pending`` (delivered to a scorer, not acknowledged), ``frames_unread`` (not yet
    delivered to any scorer; None: some, which this Redis cannot count) and ``results_waiting`` (scored, not yet
    published by the sink). ``left_alone`` names keys under the line's name that another line's could also be."""

    keys: list[KeyUsage]
    frames_pending: int
    frames_unread: int | None
    results_waiting: int
    left_alone: list[str]

    @property
    def undecided(self) -> bool:
        return bool(self.frames_pending or self.frames_unread is None or self.frames_unread or self.results_waiting)


def commit_reply_key(deadletter_stream: str, token: str) -> str:
    """Where ``StreamClient.commit`` keeps, for ``COMMIT_REPLY_TTL_S``, the reply of the commit call ``token``."""
    return f"{deadletter_stream}:commit:{token}"


def trimmed_unread_key(stream: str) -> str:
    """The hash in which ``group_stats`` adds up, per group of ``stream``, the entries trimmed before it read them."""
    return f"{stream}:trimmed_unread"


def _glob_escaped(text: str) -> str:
    """``text`` as a SCAN MATCH pattern matching itself only (ids may hold ``*``, ``?``, ``[``)."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def _line_key_type(keys: LineKeys, name: str) -> str | None:
    """The Redis type ``name`` has as one of the line's keys (the module docstring's list), None when the line uses no
    such name. Commit-reply keys are known by their token (32 hex digits), which no other line's key name ends with."""
    streams = (keys.frames, keys.results, keys.decisions, keys.deadletter)
    if name in streams:
        return "stream"
    if name in {trimmed_unread_key(stream) for stream in streams}:
        return "hash"
    if name == keys.model:
        return "string"
    commit_prefix = commit_reply_key(keys.deadletter, "")
    if name.startswith(commit_prefix) and _COMMIT_TOKEN.fullmatch(name[len(commit_prefix) :]):
        return "string"
    return "zset" if name.startswith(keys.published("")) else None


def _another_line_could_own(keys: LineKeys, name: str, kind: str, expires: bool) -> bool:
    """Whether ``name``, a key of the line of type ``kind``, could as well be another line's published marker (a
    sorted set, or the plain string older sinks wrote; both expire). Ids may hold colons:
    ``P:a:published:b:published:x`` is line ``a``'s marker of frame ``b:published:x`` and line ``a:published:b``'s of
    frame ``x``. Markers expire by themselves; streams, hashes and strings that never expire (the model key) are never
    markers."""
    if not (kind == "zset" or (kind == "string" and expires)):
        return False
    body = name[len(keys.prefix) + 1 :]
    own = len(keys.line_id) if name.startswith(keys.published("")) else -1  # where the line's own marker name splits
    return any(match.start() != own for match in re.finditer("(?=:published:)", body))


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream stands (XINFO STREAM): its newest id, how many entries were ever added (None before Redis 7),
    its oldest id still held (None when empty) and its length. A missing stream stands at ``0-0`` with nothing added."""

    last_id: str
    entries_added: int | None
    first_id: str | None
    length: int


@dataclass
class Commit:
    """What finishing a batch writes in one transaction: new entries, dead letters, the acks, then deletions.

    ``delete_acked`` removes the acknowledged entries from the stream (for internal streams nobody re-reads).
    ``trim_appends=False`` appends without ``MAXLEN``: for a stream whose entries are deleted once consumed (the
    results stream), trimming can only drop entries nobody has read; its writers bound it instead (scorers pause
    while the sink is ``streams.maxlen`` behind).
    ``append_sources`` (empty, or one per append) names the acknowledged entry each append is the result of: it is
    appended only when this commit acknowledged that entry, as a dead letter is (see ``StreamClient.commit``).
    """

    appends: list[tuple[str, bytes]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    delete_acked: bool = False
    trim_appends: bool = True
    append_sources: list[str] = field(default_factory=list)  # per append: the entry it is the result of ('': none)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def entry_time_s(entry_id: str) -> float:
    """Unix time (seconds) at which Redis appended the entry, from its id."""
    return int(entry_id.split("-", 1)[0]) / 1000.0


def redis_attempt_timeout_s(redis_settings: RedisSettings, stream_settings: StreamSettings) -> float:
    """How long one attempt of a Redis call may wait (its socket timeout): ``redis.connect_timeout_s`` +
    ``streams.block_ms`` (a blocking read's wait on top of the connect budget). ``StreamClient.attempt_timeout_s``
    of a client made with these settings."""
    return redis_settings.connect_timeout_s + stream_settings.block_ms / 1000.0


class StreamClient:
    """A Redis connection with the stream operations the workers need, retrying through outages."""

    def __init__(self, url: str, redis_settings: RedisSettings, stream_settings: StreamSettings) -> None:
        self.url = url
        self.settings = stream_settings
        self.max_backoff_s = redis_settings.reconnect_max_backoff_s
        self.retry_deadline: float | None = None
        # While a call retries through an outage: when it began and when the last attempt started (monotonic);
        # /livez reads them from the health server's thread (a worker waiting for Redis is alive, not stuck).
        self.unreachable_since: float | None = None
        self.last_attempt_at: float | None = None
        self._stop: threading.Event | None = None
        self._stop_grace_s = 0.0
        self._stop_seen_at: float | None = None
        self._attempt_timeout_s = redis_attempt_timeout_s(redis_settings, stream_settings)
        self.redis: Any = redis.Redis.from_url(
            url,
            socket_connect_timeout=redis_settings.connect_timeout_s,
            socket_timeout=self._attempt_timeout_s,
            health_check_interval=30,
        )
        self._publish_once = self.redis.register_script(_PUBLISH_ONCE)
        self._forget_idle_consumers = self.redis.register_script(_FORGET_IDLE_CONSUMERS)
        self._claim_idle = self.redis.register_script(_CLAIM_IDLE)
        self._keep_claimed = self.redis.register_script(_KEEP_CLAIMED)
        self._commit = self.redis.register_script(_COMMIT)
        # Reply keys of this client's commits whose replies came back: the next commit deletes them (``_COMMIT``).
        self._replies_received: list[str] = []
        self._replies_lock = threading.Lock()  # the sink commits from two threads
        self._group_stats = self.redis.register_script(_GROUP_STATS)

    @property
    def attempt_timeout_s(self) -> float:
        """How long one attempt of a call may wait on Redis (the socket timeout, ``redis_attempt_timeout_s``): a
        command sent has been answered, or its attempt has given up, this long after it was sent."""
        return self._attempt_timeout_s

    def close(self) -> None:
        self.redis.close()

    def stop_retrying_after(self, stop: threading.Event, grace_s: float) -> None:
        """Once ``stop`` is set, give up on an unreachable Redis ``grace_s`` later (``StreamsUnavailable``).

        Without it a worker told to stop during an outage retried until Redis came back, past its supervisor's
        grace period (systemd's TimeoutStopSec, Kubernetes' terminationGracePeriodSeconds) and into a SIGKILL."""
        self._stop, self._stop_grace_s = stop, grace_s

    def _deadline(self, attempt_started_at: float) -> float | None:
        """When retrying ends: ``retry_deadline``, or once stopped the last moment an attempt can start and still end
        (it may last the socket timeout, when Redis hangs) within ``grace_s`` of the stop, whichever is first.

        The stop is dated to the start of the failed attempt that first sees it: it came during that attempt or the
        wait before it (a stop ends the wait), so the grace period is not pushed back by an attempt's length."""
        deadline = self.retry_deadline
        if self._stop is not None and self._stop.is_set():
            if self._stop_seen_at is None:
                self._stop_seen_at = attempt_started_at
            stop_deadline = self._stop_seen_at + self._stop_grace_s - self._attempt_timeout_s
            deadline = stop_deadline if deadline is None else min(deadline, stop_deadline)
        return deadline

    def _call(self, operation: Callable[[], T], what: str) -> T:
        backoff_s = 0.05
        while True:
            attempt_started_at = self.last_attempt_at = time.monotonic()
            try:
                result = operation()
            except RETRIED_ERRORS as error:
                stopping = self._stop is not None and self._stop.is_set()  # before _deadline: it counts from it
                deadline = self._deadline(attempt_started_at)
                now = time.monotonic()
                if self.unreachable_since is None:
                    self.unreachable_since = now
                if deadline is not None and now >= deadline:
                    msg = f"redis at {self.url} unreachable during {what}: {error}"
                    raise StreamsUnavailable(msg) from error
                logger.warning(
                    "redis unavailable, retrying", extra={"op": what, "error": str(error), "retry_in_s": backoff_s}
                )
                pause_s = backoff_s if deadline is None else min(backoff_s, deadline - now)
                if self._stop is not None and not stopping:
                    self._stop.wait(pause_s)  # a stop (even one set since _deadline) ends the wait at once
                else:
                    time.sleep(pause_s)
                backoff_s = min(backoff_s * 2, self.max_backoff_s)
            except Exception:  # Redis answered (with an error of another kind): it is reachable
                self.unreachable_since = None
                raise
            else:
                self.unreachable_since = None
                return result

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except RETRIED_ERRORS:
            return False

    def ensure_group(self, stream: str, group: str) -> None:
        """Create ``group`` on ``stream`` (and the stream) reading from the start, unless it exists."""

        self._call(lambda: self._create_group(stream, group), "ensure_group")

    def _create_group(self, stream: str, group: str) -> None:
        try:
            self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def _in_group(self, stream: str, group: str, operation: Callable[[], T]) -> T:
        """Run a consumer-group command; when the group is gone (Redis restarted empty, or someone destroyed it),
        re-create it reading from the start and run the command again."""
        try:
            return operation()
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
        logger.warning(
            "consumer group missing (redis restarted empty?), recreating", extra={"stream": stream, "group": group}
        )
        self._create_group(stream, group)
        return operation()

    def publish(self, stream: str, payload: bytes) -> str:
        entry_id = self._call(
            lambda: self.redis.xadd(stream, {PAYLOAD: payload}, maxlen=self.settings.maxlen, approximate=True),
            "publish",
        )
        return _text(entry_id)

    def publish_many(self, stream: str, payloads: Sequence[bytes], after_id: str | None = None) -> list[str]:
        """``publish`` several payloads in one round trip (pipelined XADDs, in order); returns their entry ids.

        A lost reply (Redis stalled past the socket timeout, or the connection dropped after the XADDs ran) is
        retried; with ``after_id`` (the stream's last entry id the caller knows of, e.g. its own last one) a retry
        first looks among the entries after it and does not add again the payloads already there, so a frame is
        not published twice. Payloads must then be distinct (a frame's id makes them so).
        """
        if not payloads:
            return []
        attempts = 0

        def run() -> list[str]:
            nonlocal attempts
            attempts += 1
            landed = self._landed(stream, after_id, payloads) if attempts > 1 and after_id is not None else {}
            missing = [payload for payload in payloads if payload not in landed]
            pipe = self.redis.pipeline(transaction=False)
            for payload in missing:
                pipe.xadd(stream, {PAYLOAD: payload}, maxlen=self.settings.maxlen, approximate=True)
            added = dict(zip(missing, (_text(entry_id) for entry_id in pipe.execute()), strict=True))
            if landed:
                logger.warning(
                    "entries of a publish whose reply was lost had been added; not adding them again",
                    extra={"stream": stream, "already_added": len(landed), "added_now": len(added)},
                )
            return [landed.get(payload) or added[payload] for payload in payloads]

        return self._call(run, "publish_many")

    def _landed(self, stream: str, after_id: str, payloads: Sequence[bytes]) -> dict[bytes, str]:
        """Entry ids of those ``payloads`` already in ``stream`` after ``after_id``."""
        wanted, landed, position = set(payloads), {}, after_id
        while True:
            rows = self.redis.xrange(stream, f"({position}", "+", count=100)
            for entry_id, fields in rows:
                payload = fields.get(PAYLOAD.encode())
                if payload in wanted:
                    landed[payload] = _text(entry_id)
            if len(rows) < 100 or len(landed) == len(wanted):
                return landed
            position = _text(rows[-1][0])

    def _entries(self, reply: Any) -> list[StreamEntry]:
        entries: list[StreamEntry] = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                entries.append(_read_entry(entry_id, fields))
        return entries

    def read_new(self, stream: str, group: str, consumer: str, count: int, block_ms: int | None) -> list[StreamEntry]:
        """Up to ``count`` never-delivered entries; waits up to ``block_ms`` (None: do not wait) for the first."""

        def read() -> Any:
            return self.redis.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)

        return self._entries(self._call(lambda: self._in_group(stream, group, read), "read_new"))

    def _with_deliveries(self, stream: str, group: str, entries: list[StreamEntry]) -> list[StreamEntry]:
        if not entries:
            return entries
        ids = [entry.entry_id for entry in entries]
        rows = self._call(
            lambda: self.redis.xpending_range(
                stream, group, min=min(ids, key=_id_key), max=max(ids, key=_id_key), count=len(ids) + 1000
            ),
            "pending_counts",
        )
        counts = {_text(row["message_id"]): int(row["times_delivered"]) for row in rows}
        return [replace(entry, deliveries=counts.get(entry.entry_id, 1)) for entry in entries]

    def read_own_pending(
        self, stream: str, group: str, consumer: str, count: int, after_id: str = "0"
    ) -> list[StreamEntry]:
        """Entries delivered to ``consumer`` earlier and never acknowledged, with ids after ``after_id`` (a restart
        re-reads them first). Pass the last id of the previous page to walk the list once: entries that stay
        pending (a failing one) would otherwise come back on every call from ``0``."""

        def read() -> Any:
            return self.redis.xreadgroup(group, consumer, {stream: after_id}, count=count)

        reply = self._call(lambda: self._in_group(stream, group, read), "read_own_pending")
        return self._with_deliveries(stream, group, self._entries(reply))

    def claim_stale(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int, deadletter_stream: str
    ) -> Claimed:
        """Take over entries pending longer than ``min_idle_ms`` on any consumer (e.g. a dead worker's).

        Idle entries trimmed from the stream meanwhile (a killed worker's frames on a line that trims
        ``streams.maxlen`` entries within ``claim_idle_ms``) are dead-lettered ``entry_trimmed`` to
        ``deadletter_stream`` and acknowledged in the same atomic script (``_CLAIM_IDLE``), so a claimer that crashes
        right after loses none, and each idle entry goes to one claimer only. XPENDING (idle ones only) then XCLAIM,
        not XAUTOCLAIM: XAUTOCLAIM drops trimmed entries from the pending list whatever their idle time, so it
        reported as lost the frames a live worker had just read and was scoring."""

        def claim() -> Any:
            return self._claim_idle(
                keys=[stream, deadletter_stream],
                args=[group, consumer, min_idle_ms, count, self.settings.maxlen, ENTRY_TRIMMED],
            )

        trimmed, reply = self._call(lambda: self._in_group(stream, group, claim), "claim_stale")
        letters = [DeadLetter(_text(entry_id), None, ENTRY_TRIMMED, _text(detail)) for entry_id, detail in trimmed]
        claimed = [_read_entry(entry_id, _flat_fields(fields)) for entry_id, fields in reply]
        if letters:
            logger.warning(
                "pending entries were trimmed before they were claimed: dead-lettered",
                extra={"stream": stream, "count": len(letters), "first": letters[0].entry_id},
            )
        return Claimed(self._with_deliveries(stream, group, claimed), letters)

    def keep_claimed(self, stream: str, group: str, consumer: str, entry_ids: Sequence[str]) -> list[str]:
        """Reset the idle time of ``entry_ids`` still pending on ``consumer`` (its batch in hand), so no peer's
        ``claim_stale`` takes them while it is merely slow; returns those a peer has claimed. Never takes an entry
        back from a peer, never counts a delivery, and leaves entries trimmed from the stream as they are
        (``_KEEP_CLAIMED``); acknowledged ones are skipped."""
        if not entry_ids:
            return []
        args = [group, consumer, *entry_ids]
        reply = self._call(lambda: self._keep_claimed(keys=[stream], args=args), "keep_claimed")
        return [_text(entry_id) for entry_id in reply]

    def forget_idle_consumers(self, stream: str, group: str, min_idle_ms: int, keep: str) -> list[str]:
        """Delete consumers (other than ``keep``) with no pending entries, idle at least ``min_idle_ms`` (0: none);
        returns their names.

        Autoscaled or restarted workers leave their consumer names behind; without this XINFO CONSUMERS, and the
        group's memory, grow with every pod that ever ran."""
        if min_idle_ms <= 0:
            return []
        reply = self._call(
            lambda: self._forget_idle_consumers(keys=[stream], args=[group, min_idle_ms, keep]), "forget_idle_consumers"
        )
        forgotten = [_text(name) for name in reply or []]
        if forgotten:
            logger.info("forgot idle consumers", extra={"stream": stream, "group": group, "consumers": forgotten})
        return forgotten

    def commit(self, stream: str, group: str, commit: Commit, deadletter_stream: str) -> list[DeadLetter]:
        """Acknowledge, append results and dead letters, atomically and once (``_COMMIT``): retried after a lost
        reply, or after a peer that claimed the batch committed it, nothing is appended twice, and no dead letter, nor
        result naming its entry in ``append_sources``, is appended for an entry this commit did not acknowledge that
        is still in the stream (a peer's claim took and committed it) or that a dead letter names (a peer's claim
        found it trimmed); one that is neither (Redis lost its data) keeps them. Returns the dead letters appended, for
        the worker's metrics: by the first try when a retry follows a lost reply (the script keeps the reply of a
        commit with dead letters until this client's next commit, which deletes it, or ``COMMIT_REPLY_TTL_S`` when
        none follows: so a client leaves at most one reply key behind), none when a peer committed them."""
        if commit.append_sources and len(commit.append_sources) != len(commit.appends):
            msg = f"append_sources names {len(commit.append_sources)} entries for {len(commit.appends)} appends"
            raise ValueError(msg)
        if not (commit.appends or commit.dead_letters or commit.acks):
            return []
        token = uuid.uuid4().hex if commit.dead_letters else ""  # one per call: _call's retries share it
        reply_key = commit_reply_key(deadletter_stream, token) if token else deadletter_stream
        with self._replies_lock:
            forget, self._replies_received = self._replies_received, []
        keys = [stream, deadletter_stream, reply_key, *forget, *(target for target, _ in commit.appends)]
        appends_maxlen = self.settings.maxlen if commit.trim_appends else ""
        sources = commit.append_sources or [""] * len(commit.appends)
        args: list[str | bytes | int] = [group, "1" if commit.delete_acked else "0", appends_maxlen,
                                         self.settings.maxlen, len(commit.acks), token, COMMIT_REPLY_TTL_S,
                                         len(forget), *commit.acks]  # fmt: skip
        for (_, payload), source in zip(commit.appends, sources, strict=True):
            args += [payload, source]
        for letter in commit.dead_letters:
            fields = [item for pair in _dead_letter_fields(letter, stream).items() for item in pair]
            args += [len(fields), *fields]
        try:
            acked, appended = self._call(lambda: self._commit(keys=keys, args=args), "commit")
        except Exception:
            with self._replies_lock:  # maybe not deleted: the next commit tries again (DEL of a missing key is a no-op)
                self._replies_received[:0] = forget
            raise
        if token:  # the reply is in hand: its key is needed no longer (a retry of this call can come no more)
            with self._replies_lock:
                self._replies_received.append(reply_key)
        written = [commit.dead_letters[position - 1] for position in appended]
        if acked == 0 and commit.acks and (commit.appends or commit.dead_letters):
            logger.info("batch already committed (a retried commit, or a peer's claim): nothing appended again",
                        extra={"stream": stream, "entries": len(commit.acks)})  # fmt: skip
        elif len(written) < len(commit.dead_letters):
            logger.info("dead letters of entries committed elsewhere (a peer's claim) not appended again",
                        extra={"stream": stream, "skipped": len(commit.dead_letters) - len(written)})  # fmt: skip
        return written

    def publish_decision_once(
        self, keys: LineKeys, frame_id: str, payload: bytes, marker_ttl_s: int, frame_entry_id: str = ""
    ) -> bool:
        """Append to the decisions stream unless this frame already has a decision; True when appended."""
        (outcome,) = self.publish_decisions_once(
            keys, [DecisionToPublish(frame_id, frame_entry_id, payload)], marker_ttl_s
        )
        return outcome is not Publication.DUPLICATE

    def publish_decisions_once(
        self, keys: LineKeys, decisions: Sequence[DecisionToPublish], marker_ttl_s: int
    ) -> list[Publication]:
        """Append each decision unless its frame (frame_id + frame entry id) was already published, in one round trip.

        Each decision is its own atomic script call (marker + XADD), so a crash part-way publishes a prefix and a
        retry of the whole list publishes only what is missing. A different frame reusing a published frame_id is
        published too (with ``payload_if_reused``): dropping it would leave that frame without a verdict.
        """
        if not decisions:
            return []

        def run() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for decision in decisions:
                self._publish_once(
                    keys=[keys.published(decision.frame_id), keys.decisions],
                    args=[
                        marker_ttl_s,
                        self.settings.maxlen,
                        decision.frame_entry_id,
                        decision.payload,
                        decision.payload if decision.payload_if_reused is None else decision.payload_if_reused,
                        f"{time.time():.3f}",
                    ],
                    client=pipe,
                )
            return list(pipe.execute())

        outcomes: list[Publication] = []
        for reply in self._call(run, "publish_decisions_once"):
            if reply is None:
                outcomes.append(Publication.DUPLICATE)
            elif int(reply[1]):
                outcomes.append(Publication.PUBLISHED_FRAME_ID_REUSED)
            else:
                outcomes.append(Publication.PUBLISHED)
        return outcomes

    def fetch_many(self, stream: str, entry_ids: Sequence[str]) -> list[bytes | None]:
        """``fetch`` for several entries in one round trip (None where trimmed)."""
        if not entry_ids:
            return []

        def run() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for entry_id in entry_ids:
                pipe.xrange(stream, entry_id, entry_id, count=1)
            return list(pipe.execute())

        return [rows[0][1].get(PAYLOAD.encode()) if rows else None for rows in self._call(run, "fetch_many")]

    def ack(self, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            self._call(lambda: self.redis.xack(stream, group, *entry_ids), "ack")

    def fetch(self, stream: str, entry_id: str) -> bytes | None:
        """The payload of one entry, or None when it has been trimmed."""
        rows = self._call(lambda: self.redis.xrange(stream, entry_id, entry_id, count=1), "fetch")
        return rows[0][1].get(PAYLOAD.encode()) if rows else None

    def read_range(self, stream: str, after_id: str, count: int) -> list[StreamEntry]:
        """Entries after ``after_id`` (exclusive), oldest first, without a consumer group."""
        rows = self._call(lambda: self.redis.xrange(stream, f"({after_id}", "+", count=count), "read_range")
        return [_read_entry(entry_id, fields) for entry_id, fields in rows]

    def tail(self, positions: dict[str, str], count: int, block_ms: int | None) -> list[tuple[str, StreamEntry]]:
        """XREAD from several streams after the given ids (``$`` = only new entries), without a consumer group; an
        entry without a ``payload`` field comes with ``payload`` None and its fields named."""
        reply = self._call(lambda: self.redis.xread(positions, count=count, block=block_ms), "tail")
        found: list[tuple[str, StreamEntry]] = []
        for stream, items in reply or []:
            for entry_id, fields in items:
                found.append((_text(stream), _read_entry(entry_id, fields)))
        return found

    def last_id(self, stream: str) -> str:
        """Id of the newest entry, ``0-0`` for an empty or missing stream."""
        rows = self._call(lambda: self.redis.xrevrange(stream, "+", "-", count=1), "last_id")
        return _text(rows[0][0]) if rows else "0-0"

    def length(self, stream: str) -> int:
        return int(self._call(lambda: self.redis.xlen(stream), "length"))

    def position(self, stream: str) -> StreamPosition:
        def read() -> Any:
            try:
                return self.redis.xinfo_stream(stream)
            except redis.ResponseError:  # no such key
                return None

        info = self._call(read, "position")
        if not info:
            return StreamPosition("0-0", 0, None, 0)
        added = info.get("entries-added")
        first = info.get("first-entry")
        return StreamPosition(_text(info["last-generated-id"]), None if added is None else int(added),
                              _text(first[0]) if first else None, int(info["length"]))  # fmt: skip

    def group_stats(self, stream: str, count_trimmed: bool = True) -> dict[str, GroupStats]:
        """The consumer groups of ``stream`` (none when it is missing or not a stream). A group that has been
        delivered every entry, or whose lag exceeds the stream's length or is unknown, has its read counter set
        right first (``_GROUP_STATS``), so its lag is 0 again after a Redis 7.0 restart, never counts entries trimmed
        before it read them and is a number (at most the stream's length) after a restart on a trimmed stream, in
        Redis too (for KEDA, camera software, redis-cli); a server refusing writes reports its groups unrepaired.
        ``trimmed_unread`` is each group's running total of entries trimmed before it read them (Redis 7 and later;
        kept in ``trimmed_unread_key(stream)``; from the group's first read on: Redis's estimate of a counter it does
        not know, at that read, skips them), known once the group catches up or its lag exceeds the stream's
        length (after a restart that set its read counter back, only from when it next catches up: a shortfall rather
        than a false count): counted by whichever process calls this first (the sink every second, ingest while it
        publishes).
        ``count_trimmed=False`` (a stream nothing trims: results) keeps no such count (``trimmed_unread`` None)."""

        def read() -> Any:
            try:
                return self._group_stats(keys=[stream, trimmed_unread_key(stream)] if count_trimmed else [stream])
            except redis.ResponseError as error:
                if str(error).startswith("WRONGTYPE"):  # not a stream; any other error is not "no groups"
                    return [[], []]
                raise

        groups, totals = self._call(read, "group_stats")
        trimmed = {_text(name): int(total) for name, total in zip(totals[::2], totals[1::2], strict=True)}
        stats: dict[str, GroupStats] = {}
        for flat in groups:
            row = {_text(name): value for name, value in zip(flat[::2], flat[1::2], strict=True)}
            lag = row.get("lag")
            name = _text(row["name"])
            stats[name] = GroupStats(
                pending=int(row["pending"]),
                lag=None if lag is None else int(lag),
                last_delivered_id=_text(row["last-delivered-id"]),
                trimmed_unread=trimmed.get(name),
            )
        return stats

    def dead_letters(self, keys: LineKeys, count: int = 1000) -> list[dict[str, str]]:
        """Dead-letter entries of a line (text fields only), oldest first."""
        rows = self._call(lambda: self.redis.xrange(keys.deadletter, "-", "+", count=count), "dead_letters")
        return [
            {_text(name): value.decode(errors="replace") for name, value in fields.items() if name != PAYLOAD.encode()}
            for _entry_id, fields in rows
        ]

    def get_model_dir(self, keys: LineKeys) -> str | None:
        value = self._call(lambda: self.redis.get(keys.model), "get_model_dir")
        return None if value is None else _text(value)

    def set_model_dir(self, keys: LineKeys, model_dir: str, only_if_absent: bool = False) -> bool:
        return bool(self._call(lambda: self.redis.set(keys.model, model_dir, nx=only_if_absent), "set_model_dir"))

    def write_health(self, key: str, status: dict[str, Any], ttl_s: float) -> None:
        self._call(lambda: self.redis.set(key, json.dumps(status), px=int(ttl_s * 1000)), "write_health")

    def read_health(self, prefix: str) -> list[dict[str, Any]]:
        pattern = health_key(prefix, "*", "*")
        keys = self._call(lambda: list(self.redis.scan_iter(match=pattern, count=500)), "read_health")
        values = self._call(lambda: self.redis.mget(keys) if keys else [], "read_health")
        statuses = []
        for key, value in zip(keys, values, strict=True):
            try:
                status = json.loads(value) if value is not None else None
            except ValueError:
                status = None
            if isinstance(status, dict):
                statuses.append(status)
            elif value is not None:  # not a heartbeat (another program's key under P:health): check, run and
                logger.warning("not a heartbeat, skipped", extra={"key": key})  # forget-line read on
        return statuses

    def line_footprint(self, keys: LineKeys) -> LineFootprint:
        """The line's keys (by SCAN, never KEYS, matching only its own names, each checked for the type the line
        gives it) with their sizes, and its frames that have no published decision yet. Writes nothing."""
        pattern = _glob_escaped(f"{keys.prefix}:{keys.line_id}:") + "*"
        names = self._call(lambda: {_text(name) for name in self.redis.scan_iter(match=pattern, count=1000)},
                           "line_footprint")  # fmt: skip
        candidates = sorted((name, kind) for name in names if (kind := _line_key_type(keys, name)) is not None)
        usages: list[KeyUsage] = []
        left_alone: list[str] = []
        for start in range(0, len(candidates), UNLINK_BATCH):
            batch = candidates[start : start + UNLINK_BATCH]
            types = self._call(partial(self._types, [name for name, _kind in batch]), "line_footprint")
            owned = []
            for (name, kind), (found, expires) in zip(batch, types, strict=True):
                if found == kind and not _another_line_could_own(keys, name, kind, expires):
                    owned.append((name, kind))
                elif found != "none":  # "none": gone since the scan
                    left_alone.append(name)
            usages.extend(self._call(partial(self._usages, owned), "line_footprint"))
        pending, unread = self._call(partial(self._scorers_behind, keys.frames), "line_footprint")
        results_waiting = self._call(partial(self._stream_length, keys.results), "line_footprint")
        return LineFootprint(usages, pending, unread, results_waiting, left_alone)

    def _types(self, names: list[str]) -> list[tuple[str, bool]]:
        """Each key's type and whether it expires."""
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.type(name)
            pipe.pttl(name)
        replies = pipe.execute()
        return [(_text(found), ttl_ms >= 0) for found, ttl_ms in zip(replies[::2], replies[1::2], strict=True)]

    def _usages(self, named: list[tuple[str, str]]) -> list[KeyUsage]:
        """Each key's item count and MEMORY USAGE, in one round trip; a key gone meanwhile counts 0 items."""
        pipe = self.redis.pipeline(transaction=False)
        for name, kind in named:
            {"stream": pipe.xlen, "hash": pipe.hlen, "zset": pipe.zcard, "string": pipe.strlen}[kind](name)
            pipe.memory_usage(name)
        replies = pipe.execute(raise_on_error=False)
        return [
            KeyUsage(name, kind, items if isinstance(items, int) else 0, memory if isinstance(memory, int) else None)
            for (name, kind), items, memory in zip(named, replies[::2], replies[1::2], strict=True)
        ]

    def _stream_length(self, stream: str) -> int:
        """XLEN, 0 for a missing key or one of another type (then not the line's stream)."""
        try:
            return int(self.redis.xlen(stream))
        except redis.ResponseError:
            return 0

    def _scorers_behind(self, frames: str) -> tuple[int, int | None]:
        """Frames pending on the scorers, and frames not yet delivered to any (all of them before a scorer joined).
        Redis 7's lag counts those, but only once checked against the stream: after a restart it may count frames
        delivered before (or trimmed ones), and Redis 6 has none (then None: some, uncounted)."""
        try:
            groups = self.redis.xinfo_groups(frames)
        except redis.ResponseError:  # no such key, or not a stream
            return 0, 0
        length = self._stream_length(frames)
        scorers = next((group for group in groups if _text(group["name"]) == SCORER_GROUP), None)
        if scorers is None:
            return 0, length
        millis, sequence = _id_key(_text(scorers["last-delivered-id"]))
        if not self.redis.xrange(frames, f"{millis}-{sequence + 1}", "+", count=1):
            return int(scorers["pending"]), 0
        lag = scorers.get("lag")
        return int(scorers["pending"]), min(int(lag), length) if lag else None

    def unlink(self, names: Sequence[str]) -> int:
        """UNLINK ``names`` (Redis frees their memory in the background), ``UNLINK_BATCH`` at a time; returns how many
        existed."""
        removed = 0
        for start in range(0, len(names), UNLINK_BATCH):
            removed += int(self._call(partial(self.redis.unlink, *names[start : start + UNLINK_BATCH]), "unlink"))
        return removed


def _dead_letter_fields(letter: DeadLetter, source_stream: str) -> dict[str, str | bytes]:
    """The stream fields of a dead letter; a payload over ``DEAD_LETTER_PAYLOAD_BYTES`` keeps only its first bytes,
    with ``payload_bytes`` (its original size) and ``payload_truncated`` = ``1``."""
    payload = letter.payload or b""
    fields: dict[str, str | bytes] = {
        "reason": letter.reason,
        "detail": letter.detail[:2000],
        "source_stream": source_stream,
        "source_entry_id": letter.entry_id,
        "frame_id": letter.frame_id[:DEAD_LETTER_FRAME_ID_CHARS],
        PAYLOAD: payload[:DEAD_LETTER_PAYLOAD_BYTES],
    }
    if len(payload) > DEAD_LETTER_PAYLOAD_BYTES:
        fields["payload_bytes"] = str(len(payload))
        fields["payload_truncated"] = "1"
    return fields


def _flat_fields(fields: Any) -> dict[bytes, Any]:
    """The fields of an entry as a Lua script returns them: a flat ``[name, value, ...]`` list (None: no fields)."""
    return dict(zip(fields[::2], fields[1::2], strict=True)) if fields else {}


def _read_entry(entry_id: bytes | str, fields: dict[bytes, Any] | None) -> StreamEntry:
    """An entry from its id and fields as read (none: trimmed or deleted), naming its fields when ``payload`` is not
    one of them."""
    payload = (fields or {}).get(PAYLOAD.encode())
    if isinstance(payload, bytes):
        return StreamEntry(_text(entry_id), payload)
    names = tuple(name.decode(errors="replace") for name in fields or {})
    return StreamEntry(_text(entry_id), None, other_fields=names)


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence or 0)
