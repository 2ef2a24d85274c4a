"""Record a line's frames and decisions to a file, and read a recording back one frame at a time for a replay.

Recording file: a sequence of msgpack maps (no pickle), version 3:

- the header ``{"format": "lineinspect-recording", "version": 3, "line_id", "created_at_ns", "crc32"}``;
- ``{"kind": "frame", "entry_id", "payload", "crc32"}``: an encoded Frame (with its original ``captured_at_ns``)
  and the frames-stream entry id it was read from;
- ``{"kind": "decision", "entry_id", "payload", "crc32"}``: the Decision published for the recorded frame whose
  entry id is ``entry_id`` (not whose frame_id: cameras reuse frame ids when a counter wraps or they restart);
- ``{"kind": "gap", "frames", "after_entry_id", "before_entry_id", "crc32"}`` (version 3), where the recorder found
  frames-stream entries trimmed before it read them (it fell more than ``streams.maxlen`` frames behind): ``frames``
  entries after stream entry ``after_entry_id`` and before ``before_entry_id`` (``""``: none read after it) are
  missing from the recording at this point;
- written when the recorder stops (``--frames`` reached, Ctrl-C, SIGTERM): the end record
  ``{"kind": "end", "frames", "decisions", "entries_sha256", "ended_at_ns", "crc32"}``.

``crc32`` is ``zlib.crc32`` of the record's other values: for a frame or decision of ``msgpack([kind, entry_id])``
followed by the payload, for the header, a gap and the end record of ``msgpack([...their values in the order
above])``. A changed byte is refused naming its entry (one in the end record's first bytes can at worst make the
file read as cut, its entries still verified). ``entries_sha256`` is the SHA-256 of ``msgpack([kind, entry_id,
crc32])`` of every entry in order (a gap's ``after_entry_id`` as its entry id): an entry lost, repeated or moved is
caught even though each one checks out alone.

A file without its end record (version 2 and later) was cut (recorder killed, disk full, copy cut short, or still
being written): its whole entries, each verified, are usable, and a replay sends them with a warning. Version 2 is
version 3 without gap records (a version 2 reader cannot tell a gap from damage, hence the new version: it refuses
a version 3 file as too new). Version 1 files (no checksums, no end record, decisions matched to frames by frame
id) are still read; in them only a cut is seen.

Frames are numbered 1, 2, ... in recording order; the number, not the frame id, identifies a recorded frame.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, NamedTuple, TypeVar

import msgpack

from pipeline.codec import CodecError, decode_decision, decode_frame, decode_recorded_frame
from pipeline.messages import Decision, Frame, MetadataValue
from pipeline.streams import LineKeys, StreamClient, StreamPosition
from workers.lifecycle import install_stop_handlers
from workers.sources import LABEL_KEY, Capture

logger = logging.getLogger(__name__)
MessageT = TypeVar("MessageT", Frame, Decision)
FORMAT = "lineinspect-recording"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CHECKSUMMED_VERSION = 2  # the first with checksums and an end record
GAP_VERSION = 3  # the first with gap records
HEADER_FIELDS = ("format", "version", "line_id", "created_at_ns")
ENTRY_FIELDS = ("kind", "entry_id", "payload")
ENTRY_KINDS = ("frame", "decision")
GAP_FIELDS = ("kind", "frames", "after_entry_id", "before_entry_id")
END_FIELDS = ("kind", "frames", "decisions", "entries_sha256", "ended_at_ns")
MAX_ENTRY_BYTES = 512 * 1024 * 1024  # Redis's largest value: an entry claiming more has a damaged length
CLOCK_JUMP_S = 1.0  # capture times and stream entry ids disagreeing more than this between two frames: a clock stepped
EARLY_DECISIONS_KEPT = 10_000  # decisions read before their frame, kept until it is read (bounded by the lag)
END_RECORD_MAX_BYTES = 256  # an end record is about 130 bytes; the tail searched for one past a damaged length


class RecordingError(ValueError):
    """A recording file that cannot be read, or an entry of it that is damaged."""


class DecisionSummary(NamedTuple):
    """What a replay report uses of a decision. A whole Decision (timings, metadata) takes about 4.8 kB in memory
    and a day at 10 fps holds 864,000 of them; this takes about 0.3 kB (0.4 kB with a heatmap path)."""

    frame_id: str
    verdict: str
    score: float | None
    threshold: float | None
    model_id: str | None
    error_reason: str | None
    label: str | None  # metadata["label"] (frames ingested with --metadata label=...)
    heatmap_ref: str | None = None  # the overlay the line's sink wrote (failing frames, unless save_all_heatmaps)


def summarise(decision: Decision) -> DecisionSummary:
    label = decision.metadata.get(LABEL_KEY)

    def shared(text: str | None) -> str | None:  # a few distinct values repeated per frame: one copy each
        return None if text is None else sys.intern(text)

    return DecisionSummary(decision.frame_id, sys.intern(decision.verdict), decision.score, decision.threshold,
                           shared(decision.model_id), shared(decision.error_reason),
                           None if label is None else shared(str(label)), decision.heatmap_ref)  # fmt: skip


class Entry(NamedTuple):
    """One verified entry: its position in the file (1 = first after the header), kind, stream entry id, payload."""

    position: int
    kind: str
    entry_id: str
    payload: bytes


class Gap(NamedTuple):
    """Where a recording misses frames the line saw: ``frames`` frames-stream entries trimmed before the recorder
    read them, after stream entry ``after_entry_id`` and before ``before_entry_id`` (``""``: nothing read after
    them), between recorded frames ``after_frame`` and ``after_frame + 1``; ``position`` in the file as an Entry's."""

    position: int
    after_frame: int
    frames: int
    after_entry_id: str
    before_entry_id: str


def _crc(values: list[Any], payload: bytes = b"") -> int:
    return zlib.crc32(payload, zlib.crc32(msgpack.packb(values, use_bin_type=True)))


class RecordingWriter:
    """Writes a recording: the header at once, each entry as it comes (flushed, so a killed recorder loses at most
    the one it was writing), the end record on ``close()``. A write that failed (disk full) leaves the file without
    an end record, cut, as a killed recorder leaves it. An existing file is never overwritten."""

    def __init__(self, path: Path, line_id: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file: BinaryIO = path.open("xb")
        except FileExistsError:
            msg = f"{path} already exists: a recording is not overwritten (choose another --out or remove it)"
            raise RecordingError(msg) from None
        self.path = path
        self._packer = msgpack.Packer(use_bin_type=True)
        self._entries_sha256 = hashlib.sha256()
        self.frames = self.decisions = 0
        self._write_failed = False
        created_at_ns = time.time_ns()
        values = [FORMAT, FORMAT_VERSION, line_id, created_at_ns]
        self._write({**dict(zip(HEADER_FIELDS, values, strict=True)), "crc32": _crc(values)})

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _write(self, record: dict[str, Any]) -> None:
        if self._write_failed:
            msg = f"{self.path}: an earlier write failed, the recording ends there"
            raise RecordingError(msg)
        data = self._packer.pack(record)
        self._write_failed = True  # until the whole record is out: an interrupted write must not get an end record
        self._file.write(data)
        self._file.flush()
        self._write_failed = False

    def _entry(self, kind: str, entry_id: str, payload: bytes) -> None:
        crc32 = _crc([kind, entry_id], payload)
        self._write({"kind": kind, "entry_id": entry_id, "payload": payload, "crc32": crc32})
        self._entries_sha256.update(msgpack.packb([kind, entry_id, crc32]))

    def frame(self, entry_id: str, payload: bytes) -> None:
        """A frame read from the frames stream at ``entry_id``."""
        self._entry("frame", entry_id, payload)
        self.frames += 1

    def decision(self, frame_entry_id: str, payload: bytes) -> None:
        """The decision for the recorded frame read at ``frame_entry_id``."""
        self._entry("decision", frame_entry_id, payload)
        self.decisions += 1

    def gap(self, frames: int, after_entry_id: str, before_entry_id: str) -> None:
        """``frames`` frames-stream entries after ``after_entry_id`` (and before ``before_entry_id``, "" when not
        known yet) were trimmed before they were read: missing here, between the frames written before and after."""
        values = ["gap", frames, after_entry_id, before_entry_id]
        crc32 = _crc(values)
        self._write({**dict(zip(GAP_FIELDS, values, strict=True)), "crc32": crc32})
        self._entries_sha256.update(msgpack.packb(["gap", after_entry_id, crc32]))

    def close(self) -> None:
        """Write the end record (unless a write failed) and close; the file is then complete."""
        if self._file.closed:
            return
        try:
            if not self._write_failed:
                values = ["end", self.frames, self.decisions, self._entries_sha256.hexdigest(), time.time_ns()]
                self._write({**dict(zip(END_FIELDS, values, strict=True)), "crc32": _crc(values)})
                os.fsync(self._file.fileno())
        finally:
            try:
                self._file.close()
            except OSError:
                if not self._write_failed:
                    raise  # else the failed write's own error is on its way up


class _Entries:
    """The entries of a recording file after its header (frames and decisions as ``Entry``, gap records as ``Gap``),
    read and verified one at a time; ``RecordingError`` naming the file and the entry when one is damaged. Once
    read to the end: ``line_id`` and ``version`` from the header, ``complete`` (the end record was read and matches)
    and ``unread_bytes`` (what follows the last whole entry of a cut file)."""

    def __init__(self, path: Path) -> None:
        self.path, self.line_id, self.version = path, "", 0
        self.complete, self.unread_bytes = False, 0
        self._frames = self._decisions = self._whole_bytes = 0

    def __iter__(self) -> Iterator[Entry | Gap]:
        try:
            handle = self.path.open("rb")
        except OSError as error:
            msg = f"{self.path}: cannot be read ({error.strerror or error})"
            raise RecordingError(msg) from None
        with handle:
            unpacker = msgpack.Unpacker(handle, raw=False, strict_map_key=True, max_buffer_size=MAX_ENTRY_BYTES)
            self._read_header(unpacker)
            entries_sha256 = hashlib.sha256()
            position = 0
            while True:
                item = self._next(unpacker, position + 1)
                if item is None:
                    break
                position += 1
                if self.version == 1:
                    yield self._v1_entry(item, position)
                    continue
                if isinstance(item, dict) and item.get("kind") == "end":
                    self._check_end(item, position, entries_sha256.hexdigest())
                    if self._whole_bytes != self._size():
                        raise self._damaged(position + 1, "", "", "data follows the end record")
                    self.complete = True
                    return
                if self.version >= GAP_VERSION and isinstance(item, dict) and item.get("kind") == "gap":
                    gap = self._gap(item, position)
                    entries_sha256.update(msgpack.packb(["gap", gap.after_entry_id, item["crc32"]]))
                    yield gap
                    continue
                entry = self._v2_entry(item, position)
                entries_sha256.update(msgpack.packb([entry.kind, entry.entry_id, item["crc32"]]))
                yield entry
            self.unread_bytes = self._size() - self._whole_bytes
            if self.version >= CHECKSUMMED_VERSION and self._ends_in_end_record():
                raise self._damaged(position + 1, "", "", "its length is damaged (it runs over the end record)")

    def _size(self) -> int:
        return self.path.stat().st_size

    def _next(self, unpacker: msgpack.Unpacker, position: int) -> Any:
        """The next msgpack object, or None at the end of the data (or of its last whole object)."""
        try:
            item = next(unpacker)
            self._whole_bytes = unpacker.tell()  # tell() is only right after a whole object
            return item
        except StopIteration:
            return None
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
            raise self._damaged(position, "", "", f"not readable ({error})") from None

    def _read_header(self, unpacker: msgpack.Unpacker) -> None:
        path = self.path
        try:
            header: Any = next(unpacker, None)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            header = False
        self._whole_bytes = unpacker.tell()
        if header is None:
            msg = f"{path}: no whole header: not a {FORMAT} file, or one cut before its first frame (nothing to replay)"
            raise RecordingError(msg)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            msg = f"{path}: not a {FORMAT} file (make one with `lineinspect record`)"
            raise RecordingError(msg)
        version = header.get("version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            readable = f"{READABLE_VERSIONS[0]} to {READABLE_VERSIONS[-1]}"
            msg = f"{path}: {FORMAT} version {version!r}; this lineinspect reads versions {readable} (upgrade it)"
            raise RecordingError(msg)
        self.version, self.line_id = int(version), str(header.get("line_id"))
        if version >= CHECKSUMMED_VERSION:
            values = [header.get(key) for key in HEADER_FIELDS]
            if set(header) != {*HEADER_FIELDS, "crc32"} or header["crc32"] != _crc(values):
                msg = f"{path}: the header is damaged (its checksum does not match); the recording cannot be trusted"
                raise RecordingError(msg)

    def _v1_entry(self, item: Any, position: int) -> Entry:
        if not isinstance(item, dict) or not isinstance(item.get("payload"), bytes):
            raise self._damaged(position, "", "", f"not an entry (a msgpack {type(item).__name__} without payload)")
        entry_id = item.get("entry_id")
        return self._counted(Entry(position, str(item.get("kind")), entry_id if isinstance(entry_id, str) else "",
                                   item["payload"]))  # fmt: skip

    def _v2_entry(self, item: Any, position: int) -> Entry:
        if not isinstance(item, dict):
            raise self._damaged(position, "", "", f"not an entry (a msgpack {type(item).__name__})")
        kind, entry_id, payload, crc32 = (item.get(key) for key in (*ENTRY_FIELDS, "crc32"))
        if (
            set(item) != {*ENTRY_FIELDS, "crc32"}
            or kind not in ENTRY_KINDS
            or not isinstance(entry_id, str)
            or not isinstance(payload, bytes)
        ):
            fields = [str(key)[:20] for key in item]
            what = str(kind)[:20] if kind in ENTRY_KINDS else ""  # a gap record in a version 2 file: not its kind
            raise self._damaged(position, what, str(entry_id)[:40], f"not an entry (fields {fields})")
        if crc32 != _crc([kind, entry_id], payload):
            raise self._damaged(position, kind, entry_id, "its checksum does not match")
        return self._counted(Entry(position, kind, entry_id, payload))

    def _gap(self, item: dict[str, Any], position: int) -> Gap:
        values = [item.get(key) for key in GAP_FIELDS]
        _kind, frames, after_entry_id, before_entry_id = values
        if (
            set(item) != {*GAP_FIELDS, "crc32"}
            or type(frames) is not int
            or not isinstance(after_entry_id, str)
            or not isinstance(before_entry_id, str)
        ):
            fields = [str(key)[:20] for key in item]
            raise self._damaged(position, "gap", str(after_entry_id)[:40], f"not a gap record (fields {fields})")
        if item["crc32"] != _crc(values):
            raise self._damaged(position, "gap", after_entry_id, "its checksum does not match")
        return Gap(position, self._frames, frames, after_entry_id, before_entry_id)

    def _counted(self, entry: Entry) -> Entry:
        self._frames += entry.kind == "frame"
        self._decisions += entry.kind == "decision"
        return entry

    def _check_end(self, item: dict[str, Any], position: int, entries_sha256: str) -> None:
        if set(item) != {*END_FIELDS, "crc32"} or item["crc32"] != _crc([item[key] for key in END_FIELDS]):
            raise self._damaged(position, "end", "", "the end record's checksum does not match")
        if (item["frames"], item["decisions"]) != (self._frames, self._decisions):
            counted = f"{item['frames']} frames and {item['decisions']} decisions"
            held = f"{self._frames} and {self._decisions}"
            raise self._damaged(position, "end", "", f"the end record counts {counted}, the file holds {held}")
        if item["entries_sha256"] != entries_sha256:
            raise self._damaged(position, "end", "", "the entries' checksum does not match (an entry lost or moved)")

    def _ends_in_end_record(self) -> bool:
        """Whether the file's last bytes are a whole end record: then it was not cut, a damaged length made an entry
        run over the rest of the file."""
        with self.path.open("rb") as handle:
            handle.seek(max(0, self._size() - END_RECORD_MAX_BYTES))
            tail = handle.read()
        for start in range(len(tail)):
            if 0x80 <= tail[start] <= 0x8F:  # a small map's first byte
                try:
                    item = msgpack.unpackb(tail[start:], raw=False)
                except Exception:  # not a whole msgpack object from here: try the next byte
                    continue
                if (
                    isinstance(item, dict)
                    and set(item) == {*END_FIELDS, "crc32"}
                    and item["kind"] == "end"
                    and item["crc32"] == _crc([item[key] for key in END_FIELDS])
                ):
                    return True
        return False

    def _damaged(self, position: int, kind: str, entry_id: str, reason: str) -> RecordingError:
        what = {"frame": f"frame {self._frames + 1}, stream entry {entry_id}",
                "decision": f"decision for stream entry {entry_id}", "end": "the end record",
                "gap": f"gap record after stream entry {entry_id}"}.get(kind)  # fmt: skip
        intact = f"{self._frames} frame{'' if self._frames == 1 else 's'}"
        msg = (f"{self.path}: entry {position}{f' ({what})' if what else ''} is damaged: {reason}; {intact} before "
               "it intact, the recording is refused (a damaged copy? the original may be whole)")  # fmt: skip
        return RecordingError(msg)


@dataclass
class Recording:
    """A recording's header, its baseline decisions and how many frames it holds; the frames themselves stay in
    the file and are read one at a time (``frames()``): a day of frames does not fit in memory, its decisions do.

    Frames are identified by their number (1 = first recorded); ``entry_ids[number - 1]`` is where the frame was
    read on the recorded line's frames stream. ``gaps`` are where the recorder found frames trimmed before it read
    them (version 3); ``unmatched_decisions`` counts recorded decisions for no recorded frame (left out of
    ``decisions``: none in a file the recorder wrote unless something went wrong)."""

    path: Path
    line_id: str
    version: int = FORMAT_VERSION
    frame_count: int = 0
    decisions: dict[int, DecisionSummary] = field(default_factory=dict)  # baseline, by frame number
    entry_ids: list[str] = field(default_factory=list)
    reused_frame_ids: int = 0  # frames whose frame_id an earlier frame of the recording has
    complete: bool = False  # version 2 or later with its end record read and matching
    truncated_bytes: int = 0  # bytes after the last whole entry: a recorder killed mid-write, a cut copy
    gaps: list[Gap] = field(default_factory=list)
    unmatched_decisions: int = 0

    @property
    def cut(self) -> bool:
        """The recorder did not finish it: a version 2+ file without its end record, or a file ending mid-entry."""
        return (self.version >= CHECKSUMMED_VERSION and not self.complete) or self.truncated_bytes > 0

    @property
    def missing_frames(self) -> int:
        """Frames the line saw that the recording misses (its gaps)."""
        return sum(gap.frames for gap in self.gaps)

    def frames(self) -> Iterator[Frame]:
        """The recorded frames in order (the n-th is frame number n), decoded one at a time; at most
        ``frame_count`` of them, those the scan found intact. RecordingError when the file no longer holds the
        frames the scan found (replaced since): the baseline decisions are those of the scan."""
        if self.frame_count == 0:
            return
        sent = 0
        for entry in _Entries(self.path):
            if isinstance(entry, Entry) and entry.kind == "frame":
                if entry.entry_id != self.entry_ids[sent]:
                    msg = (f"{self.path} changed since it was read: its frame {sent + 1} is now stream entry "
                           f"{entry.entry_id}, was {self.entry_ids[sent]} (replaced?)")  # fmt: skip
                    raise RecordingError(msg)
                yield _decoded(self.path, entry, decode_recorded_frame)
                sent += 1
                if sent == self.frame_count:
                    return


def _decoded(path: Path, entry: Entry, decode: Callable[[bytes], MessageT]) -> MessageT:
    try:
        return decode(entry.payload)
    except CodecError as error:
        msg = f"{path}: entry {entry.position} ({entry.kind}, stream entry {entry.entry_id}) is damaged ({error})"
        raise RecordingError(msg) from None


def read_recording(path: Path) -> Recording:
    """Scan a recording in one pass (every entry verified and decoded, frames not kept); raises RecordingError
    naming the file, and the entry, when it is not a recording or an entry is damaged. A cut recording is read up
    to its last whole entry (``cut``, ``truncated_bytes``)."""
    entries = _Entries(path)
    decisions: dict[int, DecisionSummary] = {}
    entry_ids: list[str] = []
    seen_frame_ids: set[str] = set()
    reused = 0
    gaps: list[Gap] = []
    unmatched = 0
    waiting_by_entry: dict[str, int] = {}  # v2+: stream entry id -> number of a frame without its decision yet
    waiting_by_frame_id: dict[str, deque[tuple[int, str]]] = {}  # v1: frame_id -> (number, entry id) waiting
    for entry in entries:
        if isinstance(entry, Gap):
            gaps.append(entry)
        elif entry.kind == "frame":
            frame: Frame = _decoded(path, entry, decode_recorded_frame)
            entry_ids.append(entry.entry_id)
            number = len(entry_ids)
            reused += frame.frame_id in seen_frame_ids
            seen_frame_ids.add(frame.frame_id)
            if entries.version >= CHECKSUMMED_VERSION:
                waiting_by_entry[entry.entry_id] = number
            else:
                waiting_by_frame_id.setdefault(frame.frame_id, deque()).append((number, entry.entry_id))
        elif entry.kind == "decision":
            decision: Decision = _decoded(path, entry, decode_decision)
            if entries.version >= CHECKSUMMED_VERSION:
                matched = waiting_by_entry.pop(entry.entry_id, None)
            else:
                matched = _match_v1(waiting_by_frame_id, decision)
            if matched is None:
                logger.warning("recorded decision matches no recorded frame, left out",
                               extra={"recording": str(path), "entry": entry.position})  # fmt: skip
                unmatched += 1
                continue
            decisions[matched] = summarise(decision)
    return Recording(path, entries.line_id, entries.version, len(entry_ids), decisions, entry_ids, reused,
                     entries.complete, entries.unread_bytes, gaps, unmatched)  # fmt: skip


def _match_v1(waiting: dict[str, deque[tuple[int, str]]], decision: Decision) -> int | None:
    """Version 1 recorded decisions by frame id: the waiting frame the decision names by entry id when it does,
    else the first waiting frame with that id (the version 1 recorder kept one decision per id in flight)."""
    queue = waiting.get(decision.frame_id)
    if not queue:
        return None
    chosen = next((item for item in queue if item[1] == decision.frame_entry_id), queue[0])
    queue.remove(chosen)
    if not queue:
        del waiting[decision.frame_id]
    return chosen[0]


class RecordCounts(NamedTuple):
    """What a recorder saw: frames and decisions recorded, entries skipped (not a frame or decision, or without a
    ``payload`` field: the pipeline dead-letters those, the recording leaves them out), and frames-stream entries
    trimmed before it read them."""

    frames: int
    decisions: int
    skipped: int
    trimmed: int


def trimmed_unread(now: StreamPosition, read_up_to: str, added_through_read: int, page: Sequence[str] = ()) -> int:
    """How many entries added after ``read_up_to`` (the last id read before ``page``; ``added_through_read``
    entries had been added to the stream up to it) were trimmed without being read, given the ids ``page`` that a
    read after it has just returned. Trimming takes the oldest first, so that happened only when the stream's oldest
    entry is now newer than ``read_up_to``; entries of ``page`` older than it were read, then trimmed. 0 when Redis
    does not count added entries (before 7.0)."""
    if now.entries_added is None:
        return 0
    if now.first_id is not None and _stream_order(now.first_id) <= _stream_order(read_up_to):
        return 0
    oldest = None if now.first_id is None else _stream_order(now.first_id)
    read_then_trimmed = sum(1 for entry_id in page if oldest is None or _stream_order(entry_id) < oldest)
    return max(0, now.entries_added - added_through_read - now.length - read_then_trimmed)


def record_line(
    client: StreamClient,
    keys: LineKeys,
    path: Path,
    stop: threading.Event,
    max_frames: int | None,
    settle_s: float = 5.0,
    started: threading.Event | None = None,
    stop_waiting: threading.Event | None = None,
) -> RecordCounts:
    """Save new frames (and their decisions) of a line until ``max_frames`` or ``stop``. The file gets its end
    record when this returns or raises, unless writing it is what failed.

    A recorder that falls more than ``streams.maxlen`` frames behind the line (a stalled disk, a paused process)
    finds frames trimmed before it read them: they are missing from the recording, counted in ``trimmed``, logged
    and written into the file as a gap record where they are found (the frames around the gap are recorded as usual).

    A decision is matched to its frame by the frames-stream entry id it carries (``frame_entry_id``), so frames
    that reuse a frame id each keep their own; a decision without one goes to the oldest waiting frame of its id.
    After the last frame, decisions are awaited up to ``settle_s`` (or until ``stop_waiting`` is set) so the
    recording has a baseline for each frame. ``started`` is set once the recorder has fixed its starting point:
    frames published after that are recorded.
    """
    if max_frames is not None and max_frames < 0:
        msg = f"--frames must be >= 0, got {max_frames}"
        raise ValueError(msg)
    recorded = decided = skipped = trimmed = 0
    matcher = DecisionMatcher()
    settle_until: float | None = None

    def frames_done() -> bool:
        return stop.is_set() or (max_frames is not None and recorded >= max_frames)

    start = client.position(keys.frames)  # the read position and the count of entries added up to it, together
    positions = {keys.frames: start.last_id, keys.decisions: client.last_id(keys.decisions)}
    added_through_read = start.entries_added

    with RecordingWriter(path, keys.line_id) as writer:  # after Redis answered: a failed start leaves no file behind
        if started is not None:
            started.set()
        logger.info("recording", extra={"line": keys.line_id, "out": str(path), "max_frames": max_frames})
        while True:
            if frames_done() and settle_until is None:
                settle_until = time.monotonic() + settle_s
                if matcher.awaiting:
                    logger.info("waiting for the decisions of the last frames (a second Ctrl-C stops waiting and "
                                "closes the file complete, without them; a third stops at once, leaving it cut)",
                                extra={"frames": len(matcher.awaiting), "settle_s": settle_s})  # fmt: skip
            if settle_until is not None and (
                not matcher.awaiting
                or time.monotonic() > settle_until
                or (stop_waiting is not None and stop_waiting.is_set())
            ):
                break
            page = client.tail(positions, count=100, block_ms=100)
            if added_through_read is not None and not frames_done():
                read = [entry.entry_id for stream, entry in page if stream == keys.frames]
                now = client.position(keys.frames)
                lost = trimmed_unread(now, positions[keys.frames], added_through_read, read)
                if lost:
                    before = read[0] if read else now.first_id or ""  # the first entry read after the gap
                    logger.warning("frames were trimmed from the stream before the recorder read them; they are "
                                   "missing from the recording, which marks the gap (it fell more than "
                                   "streams.maxlen frames behind)",
                                   extra={"frames": lost, "after_entry_id": positions[keys.frames],
                                          "before_entry_id": before})  # fmt: skip
                    writer.gap(lost, positions[keys.frames], before)
                trimmed, added_through_read = trimmed + lost, added_through_read + lost + len(read)
            for stream, entry in page:
                positions[stream] = entry.entry_id
                if entry.payload is None:  # published without the payload field: no frame or decision to record
                    if stream == keys.frames:
                        matcher.frame_read(entry.entry_id, None)
                    if stream != keys.frames or not frames_done():
                        skipped += 1
                        where = {"stream": stream, "entry_id": entry.entry_id, "fields": list(entry.other_fields)}
                        logger.warning("entry skipped: it has no payload field", extra=where)
                    continue
                try:
                    if stream == keys.frames:
                        frame_id = None if frames_done() else decode_frame(entry.payload).frame_id
                        early = matcher.frame_read(entry.entry_id, frame_id)
                        if frame_id is not None:
                            writer.frame(entry.entry_id, entry.payload)
                            recorded += 1
                        if early is not None:
                            writer.decision(entry.entry_id, early)
                            decided += 1
                    else:
                        decision = decode_decision(entry.payload)
                        frame_entry_id = matcher.decision_read(decision, entry.payload, positions[keys.frames])
                        if frame_entry_id is not None:
                            writer.decision(frame_entry_id, entry.payload)
                            decided += 1
                except CodecError as error:
                    if stream == keys.frames:
                        matcher.frame_read(entry.entry_id, None)
                    skipped += 1
                    where = {"stream": stream, "entry_id": entry.entry_id, "error": str(error)}
                    logger.warning("entry skipped: not a frame or decision", extra=where)
        if matcher.awaiting:
            logger.warning("frames recorded without their decision", extra={"frames": len(matcher.awaiting)})
    return RecordCounts(recorded, decided, skipped, trimmed)


def install_record_stop_handlers(stop: threading.Event, stop_waiting: threading.Event) -> None:
    """SIGINT/SIGTERM for ``lineinspect record``: the first sets ``stop`` (no more frames are recorded, the decisions
    of the last ones are awaited), the second ``stop_waiting`` (the file is closed at once with its end record,
    complete without those decisions), a third ends the process and leaves the file cut (its whole entries stay
    usable). A worker has one step before that: a recorder's second signal must not cut the file."""
    second = (stop_waiting, "second stop: closing the recording without waiting for more decisions")
    install_stop_handlers(stop, second, message="stop requested: recording no more frames")


class DecisionMatcher:
    """Which recorded frame each decision read from the decisions stream is for.

    A decision names its frame by frames-stream entry id (``frame_entry_id``), which frames that reuse a frame id do
    not share; one without it goes to the oldest awaiting frame of its frame id. The recorder reads both streams a
    page at a time, so after a burst a decision can be read before its frame: it is kept (``early``) until the
    frame is read, as long as the frame's entry id is ahead of the frames stream's read position."""

    def __init__(self) -> None:
        self.awaiting: dict[str, str] = {}  # entry id -> frame_id of recorded frames without their decision yet
        self.early: dict[str, bytes] = {}  # frame entry id -> payload of a decision read before that frame

    def frame_read(self, entry_id: str, frame_id: str | None) -> bytes | None:
        """A frames-stream entry was read, recorded as ``frame_id`` (None: not recorded); returns its decision's
        payload when that came first (the frame is then no longer awaited)."""
        early = self.early.pop(entry_id, None)
        if frame_id is not None and early is None:
            self.awaiting[entry_id] = frame_id
        return early if frame_id is not None else None

    def decision_read(self, decision: Decision, payload: bytes, frames_position: str) -> str | None:
        """The entry id of the recorded frame ``decision`` is for, no longer awaited; None when it is for a frame
        not read yet (kept), from before the recording, or already decided (the sink publishes one per frame)."""
        entry_id = decision.frame_entry_id
        if entry_id is None:
            entry_id = next((entry for entry, frame_id in self.awaiting.items() if frame_id == decision.frame_id), None)
        elif entry_id not in self.awaiting:
            if _stream_order(entry_id) > _stream_order(frames_position):
                self.early.setdefault(entry_id, payload)
                if len(self.early) > EARLY_DECISIONS_KEPT:  # a frame entry id far ahead: a producer's bug
                    del self.early[next(iter(self.early))]
            return None
        if entry_id is not None:
            del self.awaiting[entry_id]
        return entry_id


def _stream_order(entry_id: str) -> tuple[int, int]:
    """A Redis stream entry id ``<ms>-<seq>`` as a sortable pair; (-1, -1) for text that is not one."""
    milliseconds, _, sequence = entry_id.partition("-")
    try:
        return int(milliseconds), int(sequence or 0)
    except ValueError:
        return -1, -1


def paced_step_s(captured_step_ns: int, previous_entry_id: str, entry_id: str) -> float:
    """Seconds between two recorded frames for a replay at the recorded pace: their capture times' difference, unless
    the frames stream's entry ids (the Redis server's clock, never going back) disagree by more than
    ``CLOCK_JUMP_S``: then the camera's or ingest host's clock stepped (NTP, a reboot, hosts that disagree) and the
    entry ids' difference is the pace the line saw. A pause of the line shows on both clocks and is kept."""
    captured_s = captured_step_ns / 1e9
    before, after = _stream_order(previous_entry_id)[0], _stream_order(entry_id)[0]
    if before < 0 or after < 0:  # not stream entry ids (a hand-made recording): the capture times alone
        return captured_s
    published_s = (after - before) / 1e3
    return published_s if abs(captured_s - published_s) > CLOCK_JUMP_S else captured_s


class ReplaySource:
    """Frames of a recording as a (non-live) ingest source, paced by ``speed`` (``paced_step_s``). Each frame is
    sent with ``metadata["replay_frame"]``, its number in the recording, and ``metadata["replay_of"]``, its recorded
    frame_id; ``failure`` holds the error when the file could not be read to the end during the replay."""

    live = False

    def __init__(self, camera_id: str, path: Path, speed: float, run_id: str = "") -> None:
        if not speed >= 0:  # NaN too
            msg = f"replay speed must be >= 0 (1 = recorded pace, N = N times faster, 0 = flat out), got {speed}"
            raise ValueError(msg)
        self.camera_id, self.speed, self.run_id = camera_id, speed, run_id
        self.recording = read_recording(path)
        self.failure: RecordingError | None = None
        self.paced_until = 0.0  # time.monotonic() the last frame was held back until (speed > 0)
        if self.recording.cut:
            logger.warning("recording was cut (no end record): replaying its whole frames",
                           extra={"recording": str(path), "frames": self.recording.frame_count})  # fmt: skip
        elif self.recording.version < CHECKSUMMED_VERSION:
            logger.warning("old recording format: no checksums, damage cannot be seen",
                           extra={"recording": str(path), "version": self.recording.version})  # fmt: skip
        if self.recording.gaps:
            logger.warning("the recording misses frames the line saw (its recorder fell behind): not replayed",
                           extra={"recording": str(path), "frames": self.recording.missing_frames,
                                  "gaps": len(self.recording.gaps)})  # fmt: skip

    def captures(self) -> Iterator[Capture]:
        started, recorded_s = time.monotonic(), 0.0  # recorded time since the first frame, as paced_step_s counts it
        previous_ns: int | None = None  # the previous frame's captured_at_ns
        entry_ids = self.recording.entry_ids
        try:
            for number, frame in enumerate(self.recording.frames(), start=1):
                if self.speed > 0:
                    if previous_ns is not None:
                        recorded_s += paced_step_s(frame.captured_at_ns - previous_ns, entry_ids[number - 2],
                                                   entry_ids[number - 1])  # fmt: skip
                    due = started + recorded_s / self.speed
                    self.paced_until = due
                    time.sleep(max(0.0, due - time.monotonic()))
                previous_ns = frame.captured_at_ns
                metadata: dict[str, MetadataValue] = {**frame.metadata, "replay_of": frame.frame_id,
                                                      "replay_frame": number}  # fmt: skip
                if self.run_id:
                    metadata["replay_run"] = self.run_id
                yield Capture(
                    frame.data,
                    frame.encoding,
                    time.time_ns(),
                    raw_shape=frame.raw_shape,
                    raw_dtype=frame.raw_dtype,
                    metadata=metadata,
                    camera_id=frame.camera_id,
                )
        except RecordingError as error:  # changed since the scan: the ingest thread only logs a source's failure
            self.failure = error
            raise
