"""Chaos soak of the streaming pipeline: under random faults, every frame gets exactly one decision or dead letter.

    python benchmarks/chaos_soak.py [--duration-s 120] [--rate 5] [--seed 0] [--fault-every-s 6] [--json out.json]
    python benchmarks/chaos_soak.py --maxlen 300 --rate 250 [--hold-back-at 64] ...   # overload: the line trims

Starts its own redis-server (``EmbeddedRedis``, append-only file fsynced on every write, on a free port; never the
machine's), fits a tiny model on a demo line (40 good 96 px parts, 64 px model input), and runs two scoring workers
and a sink as real processes (``python -m workers.cli``, stable ``--name``s, ``streams.claim_idle_ms`` = 3000). This
process publishes frames at ``--rate`` frames/s (good and defective demo parts, PNG) and, for ``--duration-s``
seconds, injects one fault every ``--fault-every-s`` (drawn at 0.5x-1.5x), chosen with ``--seed``; faults on
different processes overlap:

- ``kill9_scorer`` / ``term_scorer`` / ``kill9_sink``: SIGKILL or SIGTERM the process, restart it under the same name
  after 0.5-6 s (a SIGTERM'd scorer is waited for: it drains);
- ``stop_worker``: SIGSTOP a scorer or the sink for ``claim_idle_ms`` + 0.5-3 s, then SIGCONT (peers claim its
  entries meanwhile);
- ``restart_redis``: stop the server cleanly and start it again on the same port with its data, 0.5-3 s down;
- ``corrupt_frames`` / ``unknown_version``: publish 1-4 entries that are not msgpack, have fields of the wrong type,
  carry undecodable image bytes, or a schema version of 2 (with and without a readable ``frame_id``); or that break
  the wire's limits: a ``frame_id`` of 10,000 characters or ending in CR/LF (README: an ``error`` decision and an
  ``invalid_fields`` dead letter, both naming the frame by a stand-in id), metadata over 64 KiB (the same, under its
  own id), a ``raw_shape`` array of 2,000 items (``not_msgpack``, refused before it is unpacked, with an ``error``
  decision: its ``frame_id`` can be read, whether it comes before the array in the map or after it).

Each entry is published as README tells camera software to (``XADD P:L:frames MAXLEN ~ <streams.maxlen> * payload
...``), in a script that also reads, in the same atomic step, the stream's oldest entry and the ``scorers`` group's
last-delivered id: so for every frame the trimming removed it knows whether a scorer had read it by then (entry id
up to the last-delivered id) or not. A retry after a lost reply does not publish twice (the script remembers its
last publish). A reader of its own, as a PLC bridge would be, follows the decisions and dead-letter streams with
XREAD from the last id it saw while the line runs, so what those streams trim later is still seen; at the end it
must have read every entry either stream was ever given (``entries-added``), or the checks could not see them all.

``--maxlen`` sets ``streams.maxlen`` for every process (default 100,000: nothing is trimmed). With a small one
(200-500, the default 2000's scale) and ``--rate`` above what the scorers can do, the line falls behind and trims,
as README's "When the line is behind" describes. ``--hold-back-at N`` makes the publisher follow README's advice
instead (a live camera: while the scorers' lag is at ``N``, well under ``maxlen``, the frame due is dropped and
counted): then no frame may be trimmed before a scorer read it.

Then it stops the faults and the publisher, waits until the line drains (every published entry accounted for,
nothing pending, the results stream empty) and checks, from what its reader saw:

1. every published frames-stream entry has exactly one decision (``frame_entry_id``) or exactly one dead letter
   (``source_entry_id``), or both where README allows it: a rejected frame whose ``frame_id`` can be read gets an
   ``error`` decision whose ``error_reason`` is its dead letter's reason; both name the frame by its ``frame_id``, or
   by its stand-in (``codec.stand_in_id``) when that is no valid id; each entry's outcome is the one its kind
   calls for (good and defective parts: ``pass``/``fail``; a good part delivered more than ``streams.max_deliveries``
   times is also allowed its documented ``max_deliveries_exceeded`` dead letter and error decision, and counted);
   an entry trimmed after a scorer read it may instead have one ``entry_trimmed`` dead letter and no decision (the
   claim that found it trimmed while pending), never that dead letter and a decision too;
2. no decision or frames-stream dead letter for an entry never published;
3. no frame lost (neither decision nor dead letter) but those trimmed before any scorer read them (README: they get
   neither; counted) and none of those with a decision or dead letter;
4. the ``scorers`` and ``sinks`` pending lists are empty, the results stream is empty, and the ``scorers`` lag is 0
   as Redis reports it (XINFO GROUPS, read directly: ``StreamClient.group_stats`` would set it right itself) and as
   the sink exports it (``lineinspect_stream_lag``), which never exceeded, on any scrape while it ran, the frames the
   stream can hold (``streams.maxlen`` + 100: ``MAXLEN ~`` trims whole nodes of up to 100 entries);
5. metrics, scraped from every process's ``/metrics`` every second while it runs and once more after the drain: each
   sink incarnation's ``lineinspect_frames_total{verdict}``, ``lineinspect_errors_total{reason}`` and its
   ``lineinspect_dead_letters_total{reason}`` against the decisions and results-stream dead letters appended while
   it was the line's sink (equal for the sink alive at the end; at most those for one that was killed, whose last
   scrape may be older than its last publish); the scorers' ``lineinspect_dead_letters_total{reason}`` summed over
   every incarnation at most the frames-stream dead letters (equal when no scorer was killed or stopped by SIGTERM);
   no process exports ``lineinspect_dropped_frames_total`` above 0 (only ingest counts drops, and there is none:
   frames trimmed unread are counted by no metric, only here);
6. the soak's Redis holds at most one commit-reply key (``P:L:deadletter:commit:<token>``) per worker process that
   ran: a client's next commit deletes its last one's (the code before 35c89ba kept one per commit with dead
   letters, for an hour).

Prints progress every 10 s, a summary at the end, and exits 1 when an invariant fails (the worker logs are then
kept; ``--keep`` keeps them anyway). CPU: a 64 px model, two scorers with one torch thread each.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline.codec import CodecError, decode_decision, encode_frame, stand_in_id  # noqa: E402
from pipeline.config import RedisSettings, StreamSettings, config_from_mapping  # noqa: E402
from pipeline.messages import Decision, Frame  # noqa: E402
from pipeline.redis_server import EmbeddedRedis, free_port  # noqa: E402
from pipeline.streams import (  # noqa: E402
    ENTRY_TRIMMED,
    PAYLOAD,
    RETRIED_ERRORS,
    SCORER_GROUP,
    SINK_GROUP,
    LineKeys,
    StreamClient,
    commit_reply_key,
)

LINE = "chaos"
CLAIM_IDLE_MS = 3000
MAX_DELIVERIES = 3
SCORERS = ("score-a", "score-b")
SINK = "sink"
STREAM_NODE_ENTRIES = 100  # Redis stream-node-max-entries: MAXLEN ~ trims whole nodes, the stream holds < maxlen + this
FAULTS = ("kill9_scorer", "term_scorer", "kill9_sink", "stop_worker", "restart_redis", "corrupt_frames",
          "unknown_version")  # fmt: skip


# -- what each published entry should come to -------------------------------------------------------------------
@dataclass(frozen=True)
class Expected:
    """The outcome an entry's kind calls for: a dead letter with ``dead_letter`` as reason (None: none), and a
    decision (``decision``) whose verdict is one of ``verdicts``."""

    dead_letter: str | None
    decision: bool
    verdicts: tuple[str, ...] = ("pass", "fail")


EXPECTED = {
    "good": Expected(None, True),
    "defect": Expected(None, True),
    "not_msgpack": Expected("not_msgpack", False),
    "invalid_fields": Expected("invalid_fields", True, ("error",)),
    "undecodable_image": Expected("undecodable_image", True, ("error",)),
    "unknown_version": Expected("unknown_schema_version", True, ("error",)),
    "unknown_version_no_id": Expected("unknown_schema_version", False),
    # the wire's limits (README, "Publishing frames from your own software"): ids of at most 256 printable
    # characters, metadata of at most 64 KiB, msgpack arrays and maps of at most 1024 items
    "long_frame_id": Expected("invalid_fields", True, ("error",)),  # decision and dead letter under a stand-in id
    "crlf_frame_id": Expected("invalid_fields", True, ("error",)),  # the same
    "large_metadata": Expected("invalid_fields", True, ("error",)),
    "long_array": Expected("not_msgpack", True, ("error",)),  # frame_id before the array: read, so decided
    "long_array_first": Expected("not_msgpack", True, ("error",)),  # the array before it: skipped unbuilt, then read
}
CORRUPT_KINDS = ("not_msgpack", "invalid_fields", "undecodable_image", "long_frame_id", "crlf_frame_id",
                 "large_metadata", "long_array", "long_array_first")  # fmt: skip
LONG_ID_CHARS = 10_000  # over messages.MAX_ID_CHARS (256)
LARGE_METADATA_CHARS = 65 * 1024 + 1  # over messages.MAX_METADATA_BYTES (64 KiB) in one ASCII value
LONG_ARRAY_ITEMS = 2_000  # over codec.MAX_CONTAINER_ITEMS (1024)
VERSION_KINDS = ("unknown_version", "unknown_version_no_id")


@dataclass(frozen=True)
class Published:
    entry_id: str
    kind: str
    frame_id: str  # how its decision and dead letter must name the frame ('' where the payload names none)


class Payloads:
    """Encoded payloads of each kind, from the demo line's test images; frame ids ``chaos-<n>`` are unique."""

    def __init__(self, good: list[Path], defect: list[Path], rng: random.Random) -> None:
        self.good = [path.read_bytes() for path in good]
        self.defect = [path.read_bytes() for path in defect]
        self.rng = rng
        self.count = 0

    def _frame(self, data: bytes, label: str) -> Frame:
        self.count += 1
        return Frame(line_id=LINE, camera_id="cam0", frame_id=f"chaos-{self.count:06d}", sequence=self.count,
                     captured_at_ns=time.time_ns(), encoding="png", data=data,
                     metadata={"label": label})  # fmt: skip

    def make(self, kind: str) -> tuple[bytes, str]:
        """``(payload, frame_id)`` of one entry of ``kind``: frame_id as its decision and dead letter must name it,
        its stand-in where the payload's is no valid id, '' where the payload has none that can be read."""
        if kind in ("good", "defect"):
            frame = self._frame(self.rng.choice(self.good if kind == "good" else self.defect), kind)
            return encode_frame(frame), frame.frame_id
        frame = self._frame(self.good[0], kind)
        fields = frame.model_dump(mode="python")
        if kind == "not_msgpack":
            return b"\xc1" + frame.frame_id.encode(), ""  # 0xc1 is never used in msgpack
        if kind == "invalid_fields":
            fields["captured_at_ns"] = float(fields["captured_at_ns"])  # README: a float timestamp is refused
        elif kind == "undecodable_image":
            fields["data"] = b"not an image " + frame.frame_id.encode()
        elif kind == "unknown_version":
            fields["version"] = 2
        elif kind == "unknown_version_no_id":
            fields = {"version": 2, "line_id": LINE, "note": frame.frame_id}
            return _packed(fields), ""
        elif kind in ("long_frame_id", "crlf_frame_id"):
            fields["frame_id"] = (f"{frame.frame_id}-{'x' * LONG_ID_CHARS}"[:LONG_ID_CHARS] if kind == "long_frame_id"
                                  else f"{frame.frame_id}\r\n")  # fmt: skip
            return _packed(fields), stand_in_id(fields["frame_id"])
        elif kind == "large_metadata":
            fields["metadata"] = {"label": kind, "note": "m" * LARGE_METADATA_CHARS}
        elif kind == "long_array":
            fields["raw_shape"] = [1] * LONG_ARRAY_ITEMS  # after frame_id (Frame's field order)
        elif kind == "long_array_first":
            fields = {"raw_shape": [1] * LONG_ARRAY_ITEMS} | {k: v for k, v in fields.items() if k != "raw_shape"}
        return _packed(fields), frame.frame_id


def _packed(fields: dict[str, Any]) -> bytes:
    payload = msgpack.packb(fields, use_bin_type=True)
    assert isinstance(payload, bytes)
    return payload


# -- processes --------------------------------------------------------------------------------------------------
@dataclass
class Incarnation:
    """One run of one worker process: its /metrics port, the streams' last ids when it started (what it appends
    comes after them), and the last metrics scraped from it."""

    role: str
    name: str
    number: int
    process: subprocess.Popen[bytes]
    port: int
    decisions_from: str
    deadletter_from: str
    ended: str = ""  # how it ended: kill9, term; '' while alive
    stopped: bool = False  # SIGSTOP'd: not scraped
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)
    scraped_at: float = 0.0
    max_frames_lag: float = 0.0  # the largest lineinspect_stream_lag of the scorers it exported (sinks)


class Fleet:
    """Starts, signals and scrapes the worker processes; one fault at a time per worker (``busy``)."""

    def __init__(self, env: dict[str, str], model_dir: Path, logs: Path, client: StreamClient, keys: LineKeys) -> None:
        self.env, self.model_dir, self.logs, self.client, self.keys = env, model_dir, logs, client, keys
        self.incarnations: list[Incarnation] = []
        self.current: dict[str, Incarnation] = {}
        self.busy: set[str] = set()
        self.lock = threading.Lock()
        self.closing = False

    def start(self, name: str) -> Incarnation | None:
        """Start ``name`` (a restart keeps its name); None once ``stop_all`` has begun."""
        if self.closing:
            return None
        role = "sink" if name == SINK else "score"
        port = free_port()
        env = dict(self.env)
        if role == "sink":
            env["LINEINSPECT__SINK__METRICS_PORT"] = str(port)
            command = ["sink"]
        else:
            env["LINEINSPECT__WORKER__HEALTH_PORT"] = str(port)
            command = ["score-worker", "--model", str(self.model_dir)]
        number = sum(inc.name == name for inc in self.incarnations) + 1
        decisions_from = self.client.last_id(self.keys.decisions)
        deadletter_from = self.client.last_id(self.keys.deadletter)
        log = (self.logs / f"{name}-{number}.log").open("wb")
        process = subprocess.Popen([sys.executable, "-m", "workers.cli", *command, "--line", LINE, "--name", name],
                                   cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        log.close()
        incarnation = Incarnation(role, name, number, process, port, decisions_from, deadletter_from)
        with self.lock:
            if self.closing:  # stop_all began while it started
                process.kill()
                process.wait()
                return None
            self.incarnations.append(incarnation)
            self.current[name] = incarnation
        return incarnation

    def scrape(self, incarnation: Incarnation) -> bool:
        from prometheus_client.parser import text_string_to_metric_families

        if incarnation.stopped or incarnation.ended or incarnation.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{incarnation.port}/metrics", timeout=3) as reply:
                text = reply.read().decode()
        except OSError:
            return False  # not serving yet, or busy: the previous sample stands
        samples = {}
        for family in text_string_to_metric_families(text):
            if not family.name.startswith("lineinspect_"):
                continue
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        incarnation.metrics, incarnation.scraped_at = samples, time.monotonic()
        lag = _counter(incarnation, "lineinspect_stream_lag", stream=self.keys.frames, group=SCORER_GROUP)
        incarnation.max_frames_lag = max(incarnation.max_frames_lag, lag)
        return True

    def scrape_all(self) -> None:
        with self.lock:
            alive = list(self.current.values())
        for incarnation in alive:
            self.scrape(incarnation)

    def stop_all(self) -> None:
        with self.lock:
            self.closing = True
        for incarnation in self.current.values():
            if incarnation.process.poll() is None:
                incarnation.process.send_signal(signal.SIGCONT)
                incarnation.process.send_signal(signal.SIGTERM)
        for incarnation in self.current.values():
            try:
                incarnation.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                incarnation.process.kill()
                incarnation.process.wait()


# -- the faults -------------------------------------------------------------------------------------------------
class Chaos:
    """Draws faults from ``rng`` in the main thread and runs each in a thread of its own."""

    def __init__(self, fleet: Fleet, server: EmbeddedRedis, publisher: Publisher, rng: random.Random) -> None:
        self.fleet, self.server, self.publisher, self.rng = fleet, server, publisher, rng
        self.threads: list[threading.Thread] = []
        self.done: Counter[str] = Counter()
        self.events: list[str] = []
        self.started = time.monotonic()

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f} s] {text}"
        self.events.append(line)
        print(line, flush=True)

    def inject(self) -> None:
        kind = self.rng.choice(FAULTS)
        pause_s = self.rng.uniform(0.5, 6.0)
        if kind in ("corrupt_frames", "unknown_version"):
            kinds = [self.rng.choice(CORRUPT_KINDS if kind == "corrupt_frames" else VERSION_KINDS)
                     for _ in range(self.rng.randint(1, 4))]  # fmt: skip
            self.publisher.special.extend(kinds)
            self.done[kind] += 1
            self.log(f"{kind}: {', '.join(kinds)}")
            return
        if kind == "restart_redis":
            target, down_s = "redis", self.rng.uniform(0.5, 3.0)
            action: Callable[[], None] = lambda: self._restart_redis(down_s)  # noqa: E731
        else:
            choices = {"kill9_scorer": SCORERS, "term_scorer": SCORERS, "kill9_sink": (SINK,),
                       "stop_worker": (*SCORERS, SINK)}[kind]  # fmt: skip
            target = self.rng.choice(choices)
            if kind == "stop_worker":
                stop_s = CLAIM_IDLE_MS / 1000 + self.rng.uniform(0.5, 3.0)
                action = lambda: self._stop(target, stop_s)  # noqa: E731
            else:
                how = signal.SIGTERM if kind == "term_scorer" else signal.SIGKILL
                action = lambda: self._restart(target, how, pause_s)  # noqa: E731
        with self.fleet.lock:
            if target in self.fleet.busy:
                return  # its previous fault is still under way: draw again next time
            self.fleet.busy.add(target)
        self.done[kind] += 1
        thread = threading.Thread(target=self._run, args=(target, action), name=f"fault-{kind}")
        self.threads.append(thread)
        thread.start()

    def _run(self, target: str, action: Callable[[], None]) -> None:
        try:
            action()
        finally:
            with self.fleet.lock:
                self.fleet.busy.discard(target)

    def _restart(self, name: str, how: signal.Signals, pause_s: float) -> None:
        incarnation = self.fleet.current[name]
        self.fleet.scrape(incarnation)  # its counters as late as they can be read
        incarnation.ended = "term" if how == signal.SIGTERM else "kill9"
        incarnation.process.send_signal(how)
        try:
            code = incarnation.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.log(f"{name}-{incarnation.number} did not exit 60 s after {how.name}: SIGKILL")
            incarnation.process.kill()
            code = incarnation.process.wait()
        self.log(f"{how.name} {name}-{incarnation.number} (exit {code}); restart in {pause_s:.1f} s")
        time.sleep(pause_s)
        self.fleet.start(name)

    def _stop(self, name: str, stop_s: float) -> None:
        incarnation = self.fleet.current[name]
        incarnation.stopped = True
        incarnation.process.send_signal(signal.SIGSTOP)
        self.log(f"SIGSTOP {name}-{incarnation.number} for {stop_s:.1f} s")
        time.sleep(stop_s)
        incarnation.process.send_signal(signal.SIGCONT)
        incarnation.stopped = False

    def _restart_redis(self, down_s: float) -> None:
        self.log(f"restart redis, {down_s:.1f} s down")
        self.server.restart(down_s=down_s)

    def join(self) -> None:
        for thread in self.threads:
            thread.join()


# -- publishing -------------------------------------------------------------------------------------------------
# KEYS: the frames stream, this publisher's memo. ARGV: publish number, MAXLEN, payload, the scorers' group. XADD as
# README tells camera software to, then, in the same atomic step, the stream's oldest entry and the group's
# last-delivered id: whatever the XADD trimmed and was newer than that id no scorer had read. The memo holds the last
# publish's reply, so a retry after a lost reply (a Redis restart) returns it instead of publishing again.
_OBSERVED_PUBLISH = """
local memo = redis.call('GET', KEYS[2])
if memo and string.sub(memo, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  return string.sub(memo, #ARGV[1] + 2)
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'payload', ARGV[3])
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
local delivered = '0-0'
for _, row in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = {}
  for index = 1, #row, 2 do group[row[index]] = row[index + 1] end
  if group['name'] == ARGV[4] then delivered = group['last-delivered-id'] end
end
local reply = id .. ' ' .. oldest .. ' ' .. delivered
redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. reply)
return reply
"""


@dataclass(frozen=True)
class Trim:
    """The frames stream after a publish that trimmed it: its oldest entry, and the scorers' last-delivered id then."""

    oldest: str
    last_delivered: str


class TrimLog:
    """Every trim of the frames stream (only the publisher appends to it, so only its XADDs trim it), in order."""

    NEVER = "never trimmed"
    UNREAD = "trimmed before any scorer read it"
    READ = "trimmed after a scorer read it"

    def __init__(self) -> None:
        self.trims: list[Trim] = []
        self._oldest_keys: list[tuple[int, int]] = []

    def observe(self, oldest: str, last_delivered: str) -> None:
        key = _id_key(oldest)
        if not self._oldest_keys or key > self._oldest_keys[-1]:
            self.trims.append(Trim(oldest, last_delivered))
            self._oldest_keys.append(key)

    def fate(self, entry_id: str) -> str:
        """Whether ``entry_id`` was trimmed, and whether the ``scorers`` had read it by then (XREADGROUP delivers in
        id order: an entry after the last-delivered id had not been delivered; once trimmed it never is)."""
        key = _id_key(entry_id)
        at = bisect.bisect_right(self._oldest_keys, key)  # the first trim whose oldest entry is newer than it
        if at == len(self.trims):
            return self.NEVER
        return self.READ if key <= _id_key(self.trims[at].last_delivered) else self.UNREAD


class Publisher(threading.Thread):
    """Publishes one entry every ``1 / rate`` s (the specials queued by the chaos first); records each entry id and
    every trim it caused. With ``hold_back_at`` it follows README's advice to camera software: while the scorers' lag
    (``StreamClient.group_stats``, as ingest reads it) is at that limit, a frame due is dropped (a live camera) and
    queued specials wait."""

    def __init__(self, client: StreamClient, keys: LineKeys, payloads: Payloads, rate: float, rng: random.Random,
                 hold_back_at: int = 0):  # fmt: skip
        super().__init__(name="publisher", daemon=True)
        self.client, self.keys, self.payloads, self.rate, self.rng = client, keys, payloads, rate, rng
        self.hold_back_at = hold_back_at
        self.special: list[str] = []
        self.published: list[Published] = []
        self.dropped = 0  # frames not published, held back
        self.trims = TrimLog()
        self.halt = threading.Event()
        self._script = client.redis.register_script(_OBSERVED_PUBLISH)

    def held_back(self) -> bool:
        if not self.hold_back_at:
            return False
        stats = self.client.group_stats(self.keys.frames).get(SCORER_GROUP)
        return stats is not None and stats.lag is not None and stats.lag >= self.hold_back_at

    def publish(self, payload: bytes) -> str:
        """XADD ``payload`` (once, whatever Redis does meanwhile); returns its entry id."""
        number = str(len(self.published) + 1)
        memo = f"{self.keys.frames}:soak-publisher"
        args = [number, self.client.settings.maxlen, payload, SCORER_GROUP]
        reply = _text(_retrying(lambda: self._script(keys=[self.keys.frames, memo], args=args)))
        entry_id, oldest, last_delivered = reply.split(" ")
        self.trims.observe(oldest, last_delivered)
        return entry_id

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.halt.is_set():
            if self.held_back():
                self.dropped += 0 if self.special else 1
            else:
                kind = self.special.pop(0) if self.special else ("defect" if self.rng.random() < 0.2 else "good")
                payload, frame_id = self.payloads.make(kind)
                self.published.append(Published(self.publish(payload), kind, frame_id))
            next_at = max(next_at + 1.0 / self.rate, time.monotonic() - 1.0)
            self.halt.wait(max(0.0, next_at - time.monotonic()))


# -- reading the line's output, as a PLC bridge would -----------------------------------------------------------
class LineTail(threading.Thread):
    """Follows the decisions and dead-letter streams with XREAD from the last id seen (README's advice to a consumer
    of the line), so entries trimmed from them later are still seen."""

    def __init__(self, client: StreamClient, keys: LineKeys) -> None:
        super().__init__(name="line-tail", daemon=True)
        self.client, self.keys = client, keys
        self.positions = {keys.decisions: "0-0", keys.deadletter: "0-0"}
        self.decisions: list[tuple[str, Decision]] = []  # (decisions-stream entry id, decision)
        self.dead_letters: list[tuple[str, dict[str, str]]] = []  # (dead-letter entry id, text fields)
        self.undecodable: list[str] = []  # decisions-stream entries that are not a Decision
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def read_once(self, block_ms: int | None) -> int:
        """One XREAD of both streams after the last ids seen; returns how many entries it read."""
        with self.lock:
            positions = dict(self.positions)
            reply = _retrying(lambda: self.client.redis.xread(positions, count=1000, block=block_ms))
            read = 0
            for raw_stream, rows in reply or []:
                stream = _text(raw_stream)
                for raw_id, fields in rows:
                    entry_id, read = _text(raw_id), read + 1
                    self.positions[stream] = entry_id
                    if stream == self.keys.deadletter:
                        self.dead_letters.append((entry_id, _letter_fields(fields)))
                        continue
                    try:
                        self.decisions.append((entry_id, decode_decision(fields.get(PAYLOAD.encode(), b""))))
                    except CodecError:
                        self.undecodable.append(entry_id)
            return read

    def run(self) -> None:
        while not self.halt.is_set():
            self.read_once(block_ms=500)

    def catch_up(self) -> None:
        """Stop following and read whatever is left."""
        self.halt.set()
        self.join()
        while self.read_once(block_ms=None):
            pass

    def missed(self) -> dict[str, int]:
        """Entries each stream was ever given (XINFO STREAM entries-added, Redis 7) that this reader did not read:
        it fell more than ``streams.maxlen`` behind (0 for both, or the checks did not see everything)."""
        read = {self.keys.decisions: len(self.decisions) + len(self.undecodable),
                self.keys.deadletter: len(self.dead_letters)}  # fmt: skip
        missed = {}
        for stream, count in read.items():
            added = self.client.position(stream).entries_added
            missed[stream.rsplit(":", 1)[1]] = -1 if added is None else added - count
        return missed


def _letter_fields(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {_text(k): v.decode(errors="replace") for k, v in fields.items() if _text(k) != PAYLOAD}


# -- checking ---------------------------------------------------------------------------------------------------
@dataclass
class LineState:
    """Everything the checks read after the drain: the streams' entries as the reader saw them, the groups from
    Redis."""

    decisions: list[tuple[str, Decision]]  # (decisions-stream entry id, decision)
    dead_letters: list[tuple[str, dict[str, str]]]  # (dead-letter entry id, text fields)
    scorers_pending: int
    scorers_lag: int | None
    sinks_pending: int
    results_length: int


def read_state(client: StreamClient, keys: LineKeys, tail: LineTail) -> LineState:
    with tail.lock:
        decisions, letters = list(tail.decisions), list(tail.dead_letters)
    scorers, sinks = raw_group(client, keys.frames, SCORER_GROUP), raw_group(client, keys.results, SINK_GROUP)
    return LineState(decisions, letters, int(scorers.get("pending", -1)), scorers.get("lag"),
                     int(sinks.get("pending", -1)), client.length(keys.results))  # fmt: skip


def raw_group(client: StreamClient, stream: str, group: str) -> dict[str, Any]:
    """XINFO GROUPS' row of ``group`` as Redis has it: ``StreamClient.group_stats`` sets a wrong lag right first, so
    this process would repair what the line's workers must (the sink, every second)."""
    for row in _retrying(lambda: client.redis.xinfo_groups(stream)):
        if _text(row["name"]) == group:
            return dict(row)
    return {}


def _retrying(call: Callable[[], Any]) -> Any:
    """``call()``, again while Redis restarts (as ``StreamClient`` calls are)."""
    while True:
        try:
            return call()
        except RETRIED_ERRORS:
            time.sleep(0.2)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence or 0)


def accounted(published: list[Published], state: LineState, keys: LineKeys, trims: TrimLog) -> int:
    """How many published entries have a decision or a frames-stream dead letter, or were trimmed unread."""
    seen = {decision.frame_entry_id for _, decision in state.decisions}
    seen |= {fields["source_entry_id"] for _, fields in state.dead_letters if fields["source_stream"] == keys.frames}
    return sum(item.entry_id in seen or trims.fate(item.entry_id) == TrimLog.UNREAD for item in published)


def check_frames(
    published: list[Published], state: LineState, keys: LineKeys, trims: TrimLog
) -> tuple[list[str], dict[str, Any]]:
    """Invariants 1-4: violations (text) and counts."""
    violations: list[str] = []
    decisions: defaultdict[str, list[Decision]] = defaultdict(list)
    for _, published_decision in state.decisions:
        decisions[published_decision.frame_entry_id or ""].append(published_decision)
    frame_letters: defaultdict[str, list[dict[str, str]]] = defaultdict(list)
    for _, fields in state.dead_letters:
        if fields["source_stream"] == keys.frames:
            frame_letters[fields["source_entry_id"]].append(fields)
    outcomes: Counter[str] = Counter()
    for item in published:
        got_decisions, got_letters = decisions.get(item.entry_id, []), frame_letters.get(item.entry_id, [])
        expected = EXPECTED[item.kind]
        fate = trims.fate(item.entry_id)
        where = f"entry {item.entry_id} ({item.kind}, frame_id {item.frame_id or '-'}, {fate})"
        if not got_decisions and not got_letters:
            if fate == TrimLog.UNREAD:
                outcomes[TrimLog.UNREAD] += 1  # README: gets neither (the documented loss)
            else:
                violations.append(f"{where}: lost, neither a decision nor a dead letter")
                outcomes["lost"] += 1
            continue
        if fate == TrimLog.UNREAD:
            violations.append(f"{where}: has {len(got_decisions)} decision(s) and {len(got_letters)} dead letter(s)")
        if len(got_decisions) > 1:
            violations.append(f"{where}: {len(got_decisions)} decisions")
        if len(got_letters) > 1:
            violations.append(f"{where}: {len(got_letters)} dead letters ({[f['reason'] for f in got_letters]})")
        letter = got_letters[0]["reason"] if got_letters else None
        decision = got_decisions[0] if got_decisions else None
        if letter == ENTRY_TRIMMED:  # trimmed while pending: the claim that found it dead-lettered it
            if decision is not None:
                violations.append(f"{where}: dead letter {ENTRY_TRIMMED} and a decision ({decision.verdict}, "
                                  f"{decision.error_reason})")  # fmt: skip
            elif fate != TrimLog.READ:
                violations.append(f"{where}: dead letter {ENTRY_TRIMMED}")
            else:
                outcomes[f"{item.kind}: no decision, {ENTRY_TRIMMED}"] += 1
            continue
        if decision is not None and letter is not None and decision.error_reason != letter:
            violations.append(f"{where}: decision ({decision.verdict}, {decision.error_reason}) and a dead letter "
                              f"({letter}) that disagree")  # fmt: skip
        named = {"decision": decision.frame_id if decision else item.frame_id,
                 "dead letter": got_letters[0]["frame_id"] if got_letters else item.frame_id}  # fmt: skip
        for what, frame_id in named.items():
            if frame_id != item.frame_id:
                violations.append(f"{where}: its {what} names frame {frame_id[:100]!r} ({len(frame_id)} characters)")
        redelivered = letter == "max_deliveries_exceeded" and decision is not None and expected.dead_letter is None
        if redelivered:
            outcomes["max_deliveries_exceeded"] += 1
        elif letter != expected.dead_letter:
            violations.append(f"{where}: dead letter {letter}, expected {expected.dead_letter}")
        elif (decision is not None) != expected.decision:
            violations.append(f"{where}: {'a' if decision else 'no'} decision, expected the opposite")
        elif decision is not None and decision.verdict not in expected.verdicts:
            violations.append(f"{where}: verdict {decision.verdict} ({decision.error_reason}: "
                              f"{decision.error_detail}), expected {'/'.join(expected.verdicts)}")  # fmt: skip
        else:
            verdict = decision.verdict if decision else "no decision"
            outcomes[f"{item.kind}: {verdict}, {letter or 'no dead letter'}"] += 1
    known = {item.entry_id for item in published}
    strays = [entry for entry in decisions if entry not in known]
    for entry in strays:
        violations.append(f"{len(decisions[entry])} decision(s) for entry {entry!r}, never published "
                          f"(frame_id {decisions[entry][0].frame_id})")  # fmt: skip
    for entry in (entry for entry in frame_letters if entry not in known):
        reason = frame_letters[entry][0]["reason"]
        violations.append(f"dead letter for frames entry {entry}, never published ({reason})")
    if state.scorers_pending != 0 or state.scorers_lag not in (0, None):
        violations.append(f"scorers group: {state.scorers_pending} pending, lag {state.scorers_lag}")
    if state.sinks_pending != 0 or state.results_length != 0:
        violations.append(f"sinks group: {state.sinks_pending} pending, results stream holds {state.results_length}")
    counts = {
        "published": len(published),
        "published_by_kind": dict(Counter(item.kind for item in published)),
        "fates": dict(Counter(trims.fate(item.entry_id) for item in published)),
        "trims": len(trims.trims),
        "decisions": len(state.decisions),
        "dead_letters": len(state.dead_letters),
        "dead_letters_by_source": dict(Counter(f["source_stream"].rsplit(":", 1)[1] for _, f in state.dead_letters)),
        "outcomes": dict(sorted(outcomes.items())),
        "scorers_pending": state.scorers_pending,
        "sinks_pending": state.sinks_pending,
        "results_length": state.results_length,
    }
    return violations, counts


def _counter(incarnation: Incarnation, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in incarnation.metrics.items()
               if sample == name and wanted <= set(sample_labels))  # fmt: skip


def check_metrics(fleet: Fleet, state: LineState, keys: LineKeys, maxlen: int) -> tuple[list[str], list[str]]:
    """Invariant 5: (violations, notes)."""
    violations, notes = [], []
    max_lag = max((inc.max_frames_lag for inc in fleet.incarnations if inc.role == "sink"), default=0.0)
    notes.append(f"sinks: largest lineinspect_stream_lag of the scorers exported {max_lag:.0f}")
    if max_lag > maxlen + STREAM_NODE_ENTRIES:
        violations.append(f"a sink exported lineinspect_stream_lag {max_lag:.0f} for the scorers, more frames than "
                          f"the stream holds (streams.maxlen {maxlen}, trimmed by whole nodes of up to "
                          f"{STREAM_NODE_ENTRIES})")  # fmt: skip
    sinks = [inc for inc in fleet.incarnations if inc.role == "sink"]
    ends = [inc.decisions_from for inc in sinks[1:]] + [None]
    letter_ends = [inc.deadletter_from for inc in sinks[1:]] + [None]
    for incarnation, end, letter_end in zip(sinks, ends, letter_ends, strict=True):
        span = [d for entry_id, d in state.decisions if _within(entry_id, incarnation.decisions_from, end)]
        letters = [fields["reason"] for entry_id, fields in state.dead_letters
                   if fields["source_stream"] == keys.results
                   and _within(entry_id, incarnation.deadletter_from, letter_end)]  # fmt: skip
        stream: dict[str, float] = {}
        metric: dict[str, float] = {}
        for verdict in ("pass", "fail", "error"):
            stream[f"frames_total{{verdict={verdict}}}"] = sum(d.verdict == verdict for d in span)
            metric[f"frames_total{{verdict={verdict}}}"] = _counter(incarnation, "lineinspect_frames_total",
                                                                    verdict=verdict)  # fmt: skip
        for reason in {d.error_reason or "unknown" for d in span if d.verdict == "error"}:
            stream[f"errors_total{{reason={reason}}}"] = sum(d.error_reason == reason for d in span)
            metric[f"errors_total{{reason={reason}}}"] = _counter(incarnation, "lineinspect_errors_total",
                                                                  reason=reason)  # fmt: skip
        for reason in set(letters):
            stream[f"dead_letters_total{{reason={reason}}}"] = letters.count(reason)
            metric[f"dead_letters_total{{reason={reason}}}"] = _counter(
                incarnation, "lineinspect_dead_letters_total", reason=reason
            )
        final = not incarnation.ended
        who = f"sink-{incarnation.number} ({'alive at the end' if final else incarnation.ended})"
        for key in stream:
            if (final and metric[key] != stream[key]) or metric[key] > stream[key]:
                violations.append(f"{who}: {key} = {metric[key]:.0f}, the streams hold {stream[key]:.0f} of its span")
        notes.append(f"{who}: " + ", ".join(f"{key} {metric[key]:.0f}/{stream[key]:.0f}" for key in sorted(stream)))
    scorers = [inc for inc in fleet.incarnations if inc.role == "score"]
    frame_letters = Counter(f["reason"] for _, f in state.dead_letters if f["source_stream"] == keys.frames)
    all_final = all(not inc.ended for inc in scorers)
    for reason in sorted(frame_letters):
        counted = sum(_counter(inc, "lineinspect_dead_letters_total", reason=reason) for inc in scorers)
        if counted > frame_letters[reason] or (all_final and counted != frame_letters[reason]):
            violations.append(f"scorers: dead_letters_total{{reason={reason}}} = {counted:.0f} over every "
                              f"incarnation, the frames stream holds {frame_letters[reason]}")  # fmt: skip
        notes.append(f"scorers: dead_letters_total{{reason={reason}}} {counted:.0f}/{frame_letters[reason]}")
    final_sink = sinks[-1]
    exported_lag = _counter(final_sink, "lineinspect_stream_lag", stream=keys.frames, group=SCORER_GROUP)
    if not final_sink.ended and exported_lag != 0:
        violations.append(f"sink-{final_sink.number}: lineinspect_stream_lag of the scorers is {exported_lag:.0f} "
                          "with every frame delivered")  # fmt: skip
    dropped = sum(_counter(inc, "lineinspect_dropped_frames_total") for inc in fleet.incarnations)
    if dropped:
        violations.append(f"dropped_frames_total {dropped:.0f} over every incarnation, with no ingest to drop any")
    duplicates = sum(_counter(inc, "lineinspect_duplicate_decisions_total") for inc in sinks)
    notes.append(f"sinks: duplicate_decisions_total {duplicates:.0f} (redelivered results not published again)")
    return violations, notes


def check_commit_replies(client: StreamClient, keys: LineKeys, fleet: Fleet, counts: dict[str, Any]) -> list[str]:
    """Invariant 6: at most one commit-reply key per worker process that ran (each has one ``StreamClient``, whose
    next commit deletes the reply key of its last); adds the count to ``counts``."""
    pattern = commit_reply_key(keys.deadletter, "*")  # the prefix and line hold no glob character
    replies = _retrying(lambda: [_text(name) for name in client.redis.scan_iter(match=pattern, count=1000)])
    counts["commit_reply_keys"] = len(replies)
    processes = len(fleet.incarnations)
    if len(replies) > processes:
        return [f"{len(replies)} commit-reply keys ({pattern}) left by {processes} worker processes: at most one each"]
    return []


def _within(entry_id: str, after: str, until: str | None) -> bool:
    return _id_key(entry_id) > _id_key(after) and (until is None or _id_key(entry_id) <= _id_key(until))


# -- the run ----------------------------------------------------------------------------------------------------
def fit_tiny_model(work: Path) -> tuple[Path, list[Path], list[Path]]:
    """A demo line (96 px parts) and a model fitted on its 40 good parts at 64 px (threshold from held-out ones)."""
    from models.fit import fit_scorer
    from models.images import list_images
    from models.synthetic import make_demo_line

    demo = make_demo_line(work / "demo", n_train=40, n_test_good=12, n_test_defect=12, image_size=96, seed=1)
    config = config_from_mapping({"model": {"image_size": 64, "device": "cpu"}, "bank": {"seed": 0}})
    scorer = fit_scorer(list_images(demo.train_dir), config, progress=False)
    model_dir = work / "model"
    scorer.save(model_dir)
    labels = dict(zip(demo.test_images, demo.test_labels, strict=True))
    print(f"model {scorer.model_id}: threshold {scorer.threshold.value if scorer.threshold else None}", flush=True)
    return model_dir, [p for p, label in labels.items() if label == 0], [p for p, label in labels.items() if label]


def worker_env(url: str, prefix: str, maxlen: int, work: Path) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": url,
        "PYTHONPATH": str(REPO_ROOT),
        "LINEINSPECT__STREAMS__PREFIX": prefix,
        "LINEINSPECT__STREAMS__MAXLEN": str(maxlen),
        "LINEINSPECT__STREAMS__CLAIM_IDLE_MS": str(CLAIM_IDLE_MS),
        "LINEINSPECT__STREAMS__MAX_DELIVERIES": str(MAX_DELIVERIES),
        "LINEINSPECT__REDIS__RECONNECT_MAX_BACKOFF_S": "0.5",
        "LINEINSPECT__WORKER__MAX_BATCH": "4",
        "LINEINSPECT__WORKER__TORCH_THREADS": "1",
        "LINEINSPECT__WORKER__DRAIN_TIMEOUT_S": "20",
        "LINEINSPECT__MODEL__DEVICE": "cpu",
        "LINEINSPECT__SINK__HEATMAP_DIR": str(work / "heatmaps"),
        "OMP_NUM_THREADS": "1",
    }


def wait_ready(client: StreamClient, prefix: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ok = {(s.get("role"), s.get("name")) for s in client.read_health(prefix) if s.get("state") == "ok"}
        if {("score", name) for name in SCORERS} | {("sink", SINK)} <= ok:
            return
        time.sleep(0.5)
    msg = f"workers not ready within {timeout_s:.0f} s"
    raise RuntimeError(msg)


def progress(started: float, publisher: Publisher, client: StreamClient, keys: LineKeys, chaos: Chaos,
             tail: LineTail) -> str:  # fmt: skip
    frames = raw_group(client, keys.frames, SCORER_GROUP)
    return (f"[{time.monotonic() - started:7.1f} s] published {len(publisher.published)}, "
            f"decisions {len(tail.decisions)}, dead letters {len(tail.dead_letters)} (read), "
            f"frames trimmed {len(publisher.trims.trims)} times, "
            f"scorers pending {frames.get('pending', '-')} lag {frames.get('lag', '-')}, "
            f"results waiting {client.length(keys.results)}, faults {sum(chaos.done.values())}, "
            f"load {os.getloadavg()[0]:.1f}")  # fmt: skip


def run(args: argparse.Namespace, work: Path) -> int:
    rng = random.Random(args.seed)
    model_dir, good, defect = fit_tiny_model(work)
    logs = work / "logs"
    logs.mkdir()
    prefix = f"chaos{args.seed}"
    keys = LineKeys(prefix, LINE)
    with EmbeddedRedis(persistent=True) as server:
        client = StreamClient(server.url, RedisSettings(reconnect_max_backoff_s=0.5),
                              StreamSettings(prefix=prefix, maxlen=args.maxlen))  # fmt: skip
        client.ensure_group(keys.frames, SCORER_GROUP)
        client.ensure_group(keys.results, SINK_GROUP)
        fleet = Fleet(worker_env(server.url, prefix, args.maxlen, work), model_dir, logs, client, keys)
        publisher = Publisher(client, keys, Payloads(good, defect, random.Random(args.seed + 1)), args.rate,
                              random.Random(args.seed + 2), args.hold_back_at)  # fmt: skip
        tail_settings = StreamSettings(prefix=prefix, maxlen=args.maxlen, block_ms=1000)  # its XREAD blocks 500 ms
        tail = LineTail(StreamClient(server.url, RedisSettings(reconnect_max_backoff_s=0.5), tail_settings), keys)
        chaos = Chaos(fleet, server, publisher, rng)
        try:
            tail.start()
            for name in (*SCORERS, SINK):
                fleet.start(name)
            wait_ready(client, prefix, 300)
            print(f"workers ready; redis {server.url}, work {work}", flush=True)
            started = chaos.started = time.monotonic()
            publisher.start()
            next_fault = started + rng.uniform(0.5, 1.5) * args.fault_every_s
            next_progress = started + 10
            while (now := time.monotonic()) < started + args.duration_s:
                if now >= next_fault:
                    chaos.inject()
                    next_fault = now + rng.uniform(0.5, 1.5) * args.fault_every_s
                if now >= next_progress:
                    next_progress = now + 10
                    print(progress(started, publisher, client, keys, chaos, tail), flush=True)
                fleet.scrape_all()
                time.sleep(1.0)
            print("faults over: waiting for the running ones to finish, then for the line to drain", flush=True)
            chaos.join()
            publisher.halt.set()
            publisher.join()
            drain(client, keys, publisher, fleet, tail, args.drain_timeout_s, started, chaos)
            time.sleep(2.0)  # counters are raised just after the entries they count
            fleet.scrape_all()
            tail.catch_up()
            state = read_state(client, keys, tail)
            violations, counts = check_frames(publisher.published, state, keys, publisher.trims)
            metric_violations, notes = check_metrics(fleet, state, keys, args.maxlen)
            violations += metric_violations
            counts["held_back_dropped"] = publisher.dropped
            if args.hold_back_at and counts["fates"].get(TrimLog.UNREAD):
                violations.append(f"{counts['fates'][TrimLog.UNREAD]} frames trimmed before any scorer read them, "
                                  f"from a publisher holding back at lag {args.hold_back_at}")  # fmt: skip
            violations += check_commit_replies(client, keys, fleet, counts)
            counts["reader_missed"] = tail.missed()
            if any(missed != 0 for missed in counts["reader_missed"].values()) or tail.undecodable:
                violations.append(f"the reader did not read every entry (missed, by stream: {counts['reader_missed']}; "
                                  f"undecodable decisions: {tail.undecodable[:5]})")  # fmt: skip
        finally:
            tail.halt.set()
            fleet.stop_all()
            client.close()
            tail.client.close()
    summary = {
        "seed": args.seed,
        "duration_s": args.duration_s,
        "rate": args.rate,
        "maxlen": args.maxlen,
        "hold_back_at": args.hold_back_at,
        "fault_every_s": args.fault_every_s,
        "faults": dict(sorted(chaos.done.items())),
        "incarnations": Counter(inc.name for inc in fleet.incarnations),
        **counts,
        "metrics": notes,
        "violations": violations,
        "load_1m_at_end": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(summary, indent=2, default=str), flush=True)
    if args.json:
        args.json.write_text(json.dumps({**summary, "events": chaos.events}, indent=2, default=str))
    print(f"{'FAILED' if violations else 'OK'}: {len(violations)} invariant violations "
          f"over {counts['published']} published entries", flush=True)  # fmt: skip
    return 1 if violations else 0


def drain(client: StreamClient, keys: LineKeys, publisher: Publisher, fleet: Fleet, tail: LineTail,
          timeout_s: float, started: float, chaos: Chaos) -> None:  # fmt: skip
    """Wait until every published entry is accounted for and nothing is pending (or ``timeout_s`` passes)."""
    deadline = time.monotonic() + timeout_s
    next_progress = 0.0
    while True:
        state = read_state(client, keys, tail)
        done = accounted(publisher.published, state, keys, publisher.trims)
        idle = state.scorers_pending == 0 and state.sinks_pending == 0 and state.results_length == 0
        if (done == len(publisher.published) and idle) or time.monotonic() > deadline:
            print(f"drained: {done}/{len(publisher.published)} accounted for, idle {idle}", flush=True)
            return
        if time.monotonic() >= next_progress:
            next_progress = time.monotonic() + 10
            print(progress(started, publisher, client, keys, chaos, tail), flush=True)
        fleet.scrape_all()
        time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=120.0, help="how long faults are injected")
    parser.add_argument("--rate", type=float, default=5.0, help="frames published per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-every-s", type=float, default=6.0, help="mean time between faults")
    parser.add_argument("--maxlen", type=int, default=100_000,
                        help="streams.maxlen (the default: nothing is trimmed; 200-500 with a --rate above what the "
                             "scorers can do: overload, the line trims)")  # fmt: skip
    parser.add_argument("--hold-back-at", type=int, default=0,
                        help="drop frames while the scorers' lag is at this limit, as README advises camera software "
                             "(0: publish regardless; then no frame may be trimmed unread)")  # fmt: skip
    parser.add_argument("--drain-timeout-s", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None, help="write the summary and the fault log here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) even when all is well")
    args = parser.parse_args()
    logging.getLogger("pipeline").setLevel(logging.ERROR)  # this process's own retries through Redis restarts
    work = Path(tempfile.mkdtemp(prefix="lineinspect-chaos-"))
    code = run(args, work)
    if code == 0 and not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs kept in {work / 'logs'}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
