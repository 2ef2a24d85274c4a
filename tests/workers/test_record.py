"""Recording files (format version 3: checksums, gap records and an end record; versions 1 and 2 still read), the
recorder on a live line (decisions matched to frames by stream entry, stopped by --frames or signals, gaps marked)
and the replay source (paced by the recorded times, clock steps left out)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest

from pipeline.codec import decode_frame, encode_decision, encode_frame
from pipeline.config import Config, RedisSettings, StreamSettings
from pipeline.messages import Frame, MetadataValue
from pipeline.redis_server import EmbeddedRedis
from pipeline.streams import LineKeys, StreamClient, StreamPosition
from tests.workers.conftest import TinyLine
from tests.workers.helpers import frame_from_file, start_thread, wait_until
from tests.workers.recordings import (
    as_version_2,
    decision_for,
    stream_ids,
    tiny_frame,
    write_recording,
    write_v1_recording,
)
from workers.lifecycle import WorkerRuntime
from workers.record import (
    DecisionMatcher,
    Gap,
    RecordCounts,
    RecordingError,
    RecordingWriter,
    ReplaySource,
    paced_step_s,
    read_recording,
    record_line,
    trimmed_unread,
)

REPO = Path(__file__).resolve().parents[2]


def test_recording_round_trip_and_not_a_recording(tiny_line: TinyLine, tmp_path: Path) -> None:
    frame = frame_from_file(tiny_line.good_images[0], captured_at_ns=123_000_000_000)
    with RecordingWriter(tmp_path / "rec.lir", "line-1") as writer:
        writer.frame("1-0", encode_frame(frame))
        writer.decision("1-0", encode_decision(decision_for(frame.frame_id, "fail", 4.0)))
    recording = read_recording(tmp_path / "rec.lir")
    assert (recording.line_id, recording.version, recording.complete, recording.cut) == ("line-1", 3, True, False)
    assert list(recording.frames()) == [frame] and recording.frame_count == 1 and recording.entry_ids == ["1-0"]
    assert recording.decisions[1].verdict == "fail"
    replayed = list(ReplaySource("x", tmp_path / "rec.lir", speed=0, run_id="r1").captures())
    assert replayed[0].data == frame.data
    assert (replayed[0].metadata["replay_of"], replayed[0].metadata["replay_frame"]) == (frame.frame_id, 1)
    assert replayed[0].captured_at_ns > frame.captured_at_ns  # re-stamped at send time
    (tmp_path / "junk.lir").write_bytes(b"\x93\x01\x02")
    with pytest.raises(RecordingError, match="not a lineinspect-recording file"):
        read_recording(tmp_path / "junk.lir")
    (tmp_path / "stub.lir").write_bytes((tmp_path / "rec.lir").read_bytes()[:20])
    with pytest.raises(RecordingError, match="no whole header"):
        read_recording(tmp_path / "stub.lir")


def test_frames_that_share_a_frame_id_keep_their_own_decisions(tmp_path: Path) -> None:
    """A camera that restarts sends frame ids again: each recorded frame is its own entry, found by stream entry."""
    frames = [tiny_frame("cam0-7", sequence=n) for n in range(3)]
    with RecordingWriter(tmp_path / "rec.lir", "line-1") as writer:
        for number, frame in enumerate(frames, start=1):
            writer.frame(f"{number}-0", encode_frame(frame))
        for number in (3, 1, 2):  # decisions come back in any order
            writer.decision(f"{number}-0", encode_decision(decision_for("cam0-7", score=float(number))))
    recording = read_recording(tmp_path / "rec.lir")
    assert recording.frame_count == 3 and recording.reused_frame_ids == 2
    assert {number: decision.score for number, decision in recording.decisions.items()} == {1: 1.0, 2: 2.0, 3: 3.0}
    assert [frame.sequence for frame in recording.frames()] == [0, 1, 2]


def test_a_cut_recording_keeps_every_whole_frame(tmp_path: Path) -> None:
    """Cut at every byte (a killed recorder, a full disk, a partial copy): never refused once the header is whole,
    always marked cut, and exactly the frames and decisions written whole before the cut are read."""
    path = write_recording(tmp_path / "rec.lir", [tiny_frame(f"f{n}") for n in range(3)])
    data = path.read_bytes()
    ends = []  # where each record ends
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    for _ in unpacker:
        ends.append(unpacker.tell())
    header_end, entry_ends, end_record_end = ends[0], ends[1:-1], ends[-1]
    assert end_record_end == len(data) and len(entry_ends) == 6
    cut = tmp_path / "cut.lir"
    for size in range(header_end, len(data)):
        cut.write_bytes(data[:size])
        recording = read_recording(cut)
        whole = sum(end <= size for end in entry_ends)  # entries frame, decision, frame, ...
        assert recording.cut and not recording.complete, size
        assert recording.frame_count == (whole + 1) // 2, size
        assert len(recording.decisions) == whole // 2, size
        assert recording.truncated_bytes == size - max([header_end, *(e for e in entry_ends if e <= size)]), size
        assert [frame.frame_id for frame in recording.frames()] == [f"f{n}" for n in range(recording.frame_count)]
    whole_file = read_recording(path)
    assert whole_file.complete and not whole_file.cut and whole_file.frame_count == 3


def test_a_changed_byte_is_refused_naming_its_entry(tmp_path: Path) -> None:
    """Flip each bit pattern at each byte: the file is refused, or (a damaged end record that reads as a cut) read
    as cut with its frames intact; never taken as a complete recording."""
    frames = [tiny_frame(f"f{n}") for n in range(2)]
    path = write_recording(tmp_path / "rec.lir", frames)
    data = path.read_bytes()
    damaged = tmp_path / "damaged.lir"
    refused = read_as_cut = 0
    for index in range(len(data)):
        for flip in (0x01, 0x80):
            changed = bytearray(data)
            changed[index] ^= flip
            damaged.write_bytes(bytes(changed))
            try:
                recording = read_recording(damaged)
            except RecordingError:
                refused += 1
                continue
            read_as_cut += 1
            assert recording.cut and not recording.complete, (index, flip)
            assert list(recording.frames()) == frames[: recording.frame_count], (index, flip)
            assert index > len(data) - 200, (index, flip)  # only at the end record
    assert refused > 0.99 * 2 * len(data), (refused, read_as_cut)
    payload_byte = data.index(encode_frame(frames[1])) + 40  # inside frame 2's payload
    changed = bytearray(data)
    changed[payload_byte] ^= 0x04
    damaged.write_bytes(bytes(changed))
    with pytest.raises(RecordingError, match=r"entry 3 \(frame 2, stream entry 2-0\) is damaged: its checksum does "
                       r"not match; 1 frame before it intact, the recording is refused"):  # fmt: skip
        read_recording(damaged)


def test_a_lost_or_moved_entry_is_caught_by_the_end_record(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "rec.lir", [tiny_frame(f"f{n}") for n in range(3)])
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(path.read_bytes())
    records = [msgpack.packb(item, use_bin_type=True) for item in unpacker]
    header, entries, end = records[0], records[1:-1], records[-1]
    lost = tmp_path / "lost.lir"
    lost.write_bytes(header + b"".join(entries[:3] + entries[4:]) + end)  # frame 2's decision dropped
    with pytest.raises(RecordingError, match="the end record counts 3 frames and 3 decisions, the file holds 3 and 2"):
        read_recording(lost)
    moved = tmp_path / "moved.lir"
    moved.write_bytes(header + b"".join(entries[2:4] + entries[:2] + entries[4:]) + end)  # frames 1 and 2 swapped
    with pytest.raises(RecordingError, match="an entry lost or moved"):
        read_recording(moved)
    extra = tmp_path / "extra.lir"
    extra.write_bytes(path.read_bytes() + entries[0])
    with pytest.raises(RecordingError, match="data follows the end record"):
        read_recording(extra)


class _FullDisk:
    """A file that takes ``room`` bytes, then fails like a full disk after writing part of what it was given."""

    def __init__(self, real: object, room: int) -> None:
        self.real, self.room = real, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.real.write(data[: self.room])  # type: ignore[attr-defined]
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return int(self.real.write(data))  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def test_a_write_that_fails_leaves_a_cut_recording_without_end_record(tmp_path: Path) -> None:
    frames = [tiny_frame(f"f{n}") for n in range(3)]
    writer = RecordingWriter(tmp_path / "rec.lir", "line-1")
    writer.frame("1-0", encode_frame(frames[0]))
    writer._file = _FullDisk(writer._file, room=30)  # type: ignore[assignment]  # the disk fills up here
    with pytest.raises(OSError, match="No space left"):
        writer.frame("2-0", encode_frame(frames[1]))
    with pytest.raises(RecordingError, match="an earlier write failed"):
        writer.frame("3-0", encode_frame(frames[2]))
    writer.close()
    recording = read_recording(tmp_path / "rec.lir")
    assert recording.cut and recording.truncated_bytes == 30 and recording.frame_count == 1
    assert list(recording.frames()) == frames[:1]


def test_version_1_recordings_are_still_read(tmp_path: Path) -> None:
    """The old format: no checksums, decisions found by frame id (the entry id they carry when they do)."""
    frames = [tiny_frame("cam0-1", sequence=n) for n in range(3)] + [tiny_frame("cam0-2", sequence=3)]
    path = write_v1_recording(
        tmp_path / "old.lir",
        [
            ("1-0", frames[0]),
            ("2-0", frames[1]),
            ("3-0", frames[2]),
            ("3-0", decision_for("cam0-1", score=3.0, frame_entry_id="3-0")),  # names its frame's entry
            ("-", decision_for("cam0-1", score=1.0)),  # an older scorer's: the first waiting frame with its id
            ("4-0", frames[3]),
            ("-", decision_for("cam0-2", score=4.0)),
        ],
    )
    recording = read_recording(path)
    assert (recording.version, recording.complete, recording.cut, recording.truncated_bytes) == (1, False, False, 0)
    assert recording.frame_count == 4 and recording.entry_ids == ["1-0", "2-0", "3-0", "4-0"]
    assert {number: decision.score for number, decision in recording.decisions.items()} == {1: 1.0, 3: 3.0, 4: 4.0}
    assert list(recording.frames()) == frames
    cut = tmp_path / "cut.lir"
    cut.write_bytes(path.read_bytes()[:-10])
    cut_recording = read_recording(cut)
    assert cut_recording.cut and cut_recording.truncated_bytes > 0 and cut_recording.frame_count == 4
    assert set(cut_recording.decisions) == {1, 3}


def test_frames_recorded_before_msgpack_types_were_checked_still_read_and_replay(tmp_path: Path) -> None:
    """Until the scorers refused text sent as msgpack bin and bytes sent as str (invalid_fields), the recorder took
    such frames as they decoded then (the text as UTF-8, the str's bytes as data). Read with today's checks, a
    recording holding one was refused as damaged and could not be replayed."""
    frame = tiny_frame("f-old")
    old_encoder = {**msgpack.unpackb(encode_frame(frame)), "camera_id": b"cam0", "metadata": {"lot": b"A7"},
                   "encoding": "raw", "data": "raw bytes", "raw_shape": [1, 9], "raw_dtype": "uint8"}  # fmt: skip
    with RecordingWriter(tmp_path / "rec.lir", "line-1") as writer:
        writer.frame("1-0", msgpack.packb(old_encoder, use_bin_type=True))
        writer.decision("1-0", encode_decision(decision_for("f-old", frame_entry_id="1-0")))
    recording = read_recording(tmp_path / "rec.lir")
    assert recording.frame_count == 1 and recording.decisions[1].verdict == "pass"
    (read,) = recording.frames()
    assert (read.camera_id, read.metadata, read.data) == ("cam0", {"lot": "A7"}, b"raw bytes")
    (replayed,) = ReplaySource("x", tmp_path / "rec.lir", speed=0).captures()
    assert (replayed.camera_id, replayed.data, replayed.metadata["lot"]) == ("cam0", b"raw bytes", "A7")
    sent = Frame.model_validate({  # as ingest makes it
        "line_id": "line-2", "camera_id": replayed.camera_id, "frame_id": "f-replay", "sequence": 0,
        "captured_at_ns": replayed.captured_at_ns, "encoding": replayed.encoding, "data": replayed.data,
        "raw_shape": replayed.raw_shape, "raw_dtype": replayed.raw_dtype, "metadata": replayed.metadata,
    })  # fmt: skip
    assert decode_frame(encode_frame(sent)) == sent  # sent with the documented types: the scorers take it


def test_a_newer_version_is_refused_and_a_recording_never_overwritten(tmp_path: Path) -> None:
    newer = tmp_path / "newer.lir"
    newer.write_bytes(msgpack.packb({"format": "lineinspect-recording", "version": 4, "line_id": "l"}))
    with pytest.raises(RecordingError, match="version 4; this lineinspect reads versions 1 to 3"):
        read_recording(newer)
    path = write_recording(tmp_path / "rec.lir", [tiny_frame("f0")])
    before = path.read_bytes()
    with pytest.raises(RecordingError, match="already exists: a recording is not overwritten"):
        RecordingWriter(path, "line-1")
    assert path.read_bytes() == before


def test_version_2_recordings_are_still_read_and_a_gap_needs_version_3(tmp_path: Path) -> None:
    """Version 2 is version 3 without gap records; a version 2 reader takes a gap record for damage, so a file with
    one is refused when it claims version 2 (and a version 2 reader refuses version 3 files as too new)."""
    frames = [tiny_frame(f"f{n}") for n in range(2)]
    old = as_version_2(write_recording(tmp_path / "v2.lir", frames))
    recording = read_recording(old)
    assert (recording.version, recording.complete, recording.gaps) == (2, True, [])
    assert list(recording.frames()) == frames and len(recording.decisions) == 2
    with RecordingWriter(tmp_path / "gap.lir", "line-1") as writer:
        writer.frame("1-0", encode_frame(frames[0]))
        writer.gap(3, "1-0", "5-0")
        writer.frame("5-0", encode_frame(frames[1]))
    assert read_recording(tmp_path / "gap.lir").gaps == [Gap(2, 1, 3, "1-0", "5-0")]
    with pytest.raises(RecordingError, match=r"entry 2 is damaged: not an entry"):
        read_recording(as_version_2(tmp_path / "gap.lir"))


def test_a_gap_record_is_checked_like_an_entry(tmp_path: Path) -> None:
    """A changed byte in a gap record is refused; a gap record lost or moved is caught by the end record."""
    frames = [tiny_frame(f"f{n}") for n in range(2)]
    path = tmp_path / "rec.lir"
    with RecordingWriter(path, "line-1") as writer:
        writer.frame("1-0", encode_frame(frames[0]))
        writer.gap(3, "1-0", "5-0")
        writer.frame("5-0", encode_frame(frames[1]))
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(path.read_bytes())
    records = [msgpack.packb(item, use_bin_type=True) for item in unpacker]
    start = len(b"".join(records[:2]))
    damaged = tmp_path / "damaged.lir"
    for index in range(start, start + len(records[2])):  # every byte of the gap record
        changed = bytearray(path.read_bytes())
        changed[index] ^= 0x01
        damaged.write_bytes(bytes(changed))
        with pytest.raises(RecordingError, match="entry 2"):
            read_recording(damaged)
    changed = bytearray(path.read_bytes())
    changed[start + records[2].index(b"\x03")] = 0x02  # 3 frames missing -> 2
    damaged.write_bytes(bytes(changed))
    with pytest.raises(RecordingError, match=r"entry 2 \(gap record after stream entry 1-0\) is damaged: its checksum"):
        read_recording(damaged)
    lost = tmp_path / "lost.lir"
    lost.write_bytes(b"".join(records[:2] + records[3:]))
    with pytest.raises(RecordingError, match="an entry lost or moved"):
        read_recording(lost)


def _record_in_thread(
    runtime: WorkerRuntime, path: Path, max_frames: int | None, stop: threading.Event | None = None
) -> tuple[threading.Thread, list[RecordCounts]]:
    keys = LineKeys(runtime.config.streams.prefix, "line-1")
    counts: list[RecordCounts] = []
    started = threading.Event()
    stop = stop or threading.Event()
    recorder = start_thread(
        lambda: counts.append(record_line(runtime.client, keys, path, stop, max_frames, settle_s=30, started=started))
    )
    assert started.wait(timeout=30)
    return recorder, counts


def test_record_line_stops_at_exactly_frames_and_keeps_their_decisions(
    make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    runtime = make_runtime("record", "r1")
    client, keys = runtime.client, LineKeys(runtime.config.streams.prefix, "line-1")
    client.publish(keys.frames, encode_frame(tiny_frame("before")))  # before recording: not recorded
    recorder, counts = _record_in_thread(runtime, tmp_path / "rec.lir", 3)
    frames = [tiny_frame(f"f{n}") for n in range(5)]
    entry_ids = [client.publish(keys.frames, encode_frame(frame)) for frame in frames]
    for frame, entry_id in zip(frames, entry_ids, strict=True):
        client.publish(keys.decisions, encode_decision(decision_for(frame.frame_id, frame_entry_id=entry_id)))
    recorder.join(timeout=60)
    assert counts == [(3, 3, 0, 0)]
    recording = read_recording(tmp_path / "rec.lir")
    assert recording.complete and recording.entry_ids == entry_ids[:3]
    assert [f.frame_id for f in recording.frames()] == ["f0", "f1", "f2"]
    assert [recording.decisions[n].frame_id for n in (1, 2, 3)] == ["f0", "f1", "f2"]


def test_the_recorder_matches_decisions_to_frames_by_stream_entry_not_frame_id(
    make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    """Three frames with one id (a camera counter wrapped): each decision, flagged frame_id_reused by the sink as it
    is for the later ones, goes to its own frame, whatever order they come back in."""
    runtime = make_runtime("record", "r2")
    client, keys = runtime.client, LineKeys(runtime.config.streams.prefix, "line-1")
    recorder, counts = _record_in_thread(runtime, tmp_path / "rec.lir", 4)
    frames = [tiny_frame("cam0-1", sequence=n) for n in range(3)] + [tiny_frame("cam0-9", sequence=3)]
    entry_ids = [client.publish(keys.frames, encode_frame(frame)) for frame in frames]
    for number in (3, 1, 2):
        reused: dict[str, MetadataValue] = {"frame_id_reused": True} if number > 1 else {}
        client.publish(keys.decisions, encode_decision(decision_for("cam0-1", score=float(number), metadata=reused,
                                                                    frame_entry_id=entry_ids[number - 1])))  # fmt: skip
    client.publish(keys.decisions, encode_decision(decision_for("cam0-1", score=99.0, frame_entry_id=entry_ids[0])))
    client.publish(keys.decisions, encode_decision(decision_for("cam0-9", score=4.0)))  # without frame_entry_id
    recorder.join(timeout=60)
    assert counts == [(4, 4, 0, 0)]  # the second decision for frame 1's entry is not its decision
    recording = read_recording(tmp_path / "rec.lir")
    assert {number: d.score for number, d in recording.decisions.items()} == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    assert recording.reused_frame_ids == 2


def test_a_recorder_skips_entries_that_are_not_frames_and_goes_on(
    make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    runtime = make_runtime("record", "r3")
    client, keys = runtime.client, LineKeys(runtime.config.streams.prefix, "line-1")
    recorder, counts = _record_in_thread(runtime, tmp_path / "rec.lir", 2)
    frames = [tiny_frame(f"f{n}") for n in range(2)]
    entry_ids = [client.publish(keys.frames, encode_frame(frames[0]))]
    client.publish(keys.frames, b"\xc1garbage")  # the pipeline dead-letters it; the recording leaves it out
    entry_ids.append(client.publish(keys.frames, encode_frame(frames[1])))
    for frame, entry_id in zip(frames, entry_ids, strict=True):
        client.publish(keys.decisions, encode_decision(decision_for(frame.frame_id, frame_entry_id=entry_id)))
    recorder.join(timeout=60)
    assert counts == [(2, 2, 1, 0)]
    assert [f.frame_id for f in read_recording(tmp_path / "rec.lir").frames()] == ["f0", "f1"]


def test_a_recorder_skips_entries_without_a_payload_field_counting_them(
    make_runtime: Callable[..., WorkerRuntime], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry published without the ``payload`` field (camera software naming it ``frame``) is no frame of the line
    (the scorers dead-letter it not_a_message) and no decision: the recording leaves it out, counted and logged with
    its fields, so a replay sends only frames the line was sent and nothing went unnoticed."""
    runtime = make_runtime("record", "r3-fields")
    client, keys = runtime.client, LineKeys(runtime.config.streams.prefix, "line-1")
    recorder, counts = _record_in_thread(runtime, tmp_path / "rec.lir", 2)
    frames = [tiny_frame(f"f{n}") for n in range(2)]
    entry_ids = [client.publish(keys.frames, encode_frame(frames[0]))]
    client.redis.xadd(keys.frames, {"frame": encode_frame(tiny_frame("misnamed"))})
    entry_ids.append(client.publish(keys.frames, encode_frame(frames[1])))
    client.redis.xadd(keys.decisions, {"decision": encode_decision(decision_for("misnamed"))})
    for frame, entry_id in zip(frames, entry_ids, strict=True):
        client.publish(keys.decisions, encode_decision(decision_for(frame.frame_id, frame_entry_id=entry_id)))
    with caplog.at_level("WARNING", logger="workers.record"):
        recorder.join(timeout=60)
    assert counts == [(2, 2, 2, 0)]
    skipped = [record for record in caplog.records if "no payload field" in record.getMessage()]
    assert sorted(str(getattr(record, "fields", None)) for record in skipped) == ["['decision']", "['frame']"]
    recording = read_recording(tmp_path / "rec.lir")
    assert recording.entry_ids == entry_ids and len(recording.decisions) == 2
    replayed = list(ReplaySource("x", tmp_path / "rec.lir", speed=0).captures())
    assert [capture.metadata["replay_of"] for capture in replayed] == ["f0", "f1"]


def test_frames_trimmed_before_the_recorder_read_them_are_counted(
    make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    # a recorder more than streams.maxlen frames behind (a stalled disk) lost frames without a word: the recording
    # looked whole and the replay compared fewer frames than the line had seen
    runtime = make_runtime("record", "r6")
    client, keys = runtime.client, LineKeys(runtime.config.streams.prefix, "line-1")
    recorder, counts = _record_in_thread(runtime, tmp_path / "rec.lir", 3)
    frames = [tiny_frame(f"f{n}") for n in range(10)]
    pipe = client.redis.pipeline(transaction=True)  # published and trimmed at once: the recorder never sees f0-f6
    for frame in frames:
        pipe.xadd(keys.frames, {"payload": encode_frame(frame)})
    pipe.xtrim(keys.frames, maxlen=3, approximate=False)
    entry_ids = [entry_id.decode() for entry_id in pipe.execute()[:10]]
    for frame, entry_id in zip(frames[7:], entry_ids[7:], strict=True):
        client.publish(keys.decisions, encode_decision(decision_for(frame.frame_id, frame_entry_id=entry_id)))
    recorder.join(timeout=60)
    assert counts == [(3, 3, 0, 7)]
    recording = read_recording(tmp_path / "rec.lir")
    assert [frame.frame_id for frame in recording.frames()] == ["f7", "f8", "f9"] and recording.complete
    # the file says where: 7 frames before the first recorded one, after the stream's start (0-0, it was empty)
    assert recording.gaps == [Gap(position=1, after_frame=0, frames=7, after_entry_id="0-0",
                                  before_entry_id=entry_ids[7])]  # fmt: skip
    assert recording.missing_frames == 7


def test_trimmed_unread_counts_only_entries_past_the_read_position() -> None:
    # read up to 5-0, with 5 entries added up to it; now 12 added, the oldest 3 of them still held
    assert trimmed_unread(StreamPosition("12-0", 12, "10-0", 3), "5-0", 5) == 4  # 6-0 to 9-0 never read
    assert trimmed_unread(StreamPosition("12-0", 12, "4-0", 9), "5-0", 5) == 0  # the oldest is behind us: no gap
    assert trimmed_unread(StreamPosition("12-0", 12, None, 0), "5-0", 5) == 7  # trimmed to nothing
    assert trimmed_unread(StreamPosition("12-0", None, "10-0", 3), "5-0", 5) == 0  # Redis < 7 does not count
    # a page 6-0 to 9-0 just read, 6-0 and 7-0 trimmed since: read, not lost
    assert trimmed_unread(StreamPosition("12-0", 12, "8-0", 5), "5-0", 5, ["6-0", "7-0", "8-0", "9-0"]) == 0
    # a page 8-0 to 9-0 just read after 5-0: 6-0 and 7-0 were trimmed unread
    assert trimmed_unread(StreamPosition("12-0", 12, "8-0", 5), "5-0", 5, ["8-0", "9-0"]) == 2


def test_record_refuses_a_negative_frame_count_and_records_zero_frames(
    make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    runtime = make_runtime("record", "r4")
    keys = LineKeys(runtime.config.streams.prefix, "line-1")
    with pytest.raises(ValueError, match="--frames must be >= 0"):
        record_line(runtime.client, keys, tmp_path / "neg.lir", threading.Event(), -1)
    assert not (tmp_path / "neg.lir").exists()
    assert record_line(runtime.client, keys, tmp_path / "zero.lir", threading.Event(), 0) == (0, 0, 0, 0)
    empty = read_recording(tmp_path / "zero.lir")
    assert empty.complete and empty.frame_count == 0 and list(empty.frames()) == []


@contextmanager
def running_recorder(
    redis_url: str, prefix: str, out: Path, *options: str, **env: str
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """``lineinspect record --line line-1 --out OUT`` as a process, started and recording; yields it and its stderr
    lines as they come (read by a thread: ``communicate()`` returns only what that thread has not read yet)."""
    environment = {**os.environ, "REDIS_URL": redis_url, "LINEINSPECT__STREAMS__PREFIX": prefix, **env}
    command = [sys.executable, "-m", "workers.cli", "record", "--line", "line-1", "--out", str(out), *options]
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    log: list[str] = []
    reader = start_thread(lambda: log.extend(iter(process.stderr.readline, "")))  # type: ignore[union-attr]
    try:
        wait_until(lambda: any('"recording"' in line for line in log), 60, "the recorder to start")
        yield process, log
    finally:
        process.kill()
        reader.join(timeout=10)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_lineinspect_record_stopped_by_a_signal(
    signum: signal.Signals, config: Config, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    """Ctrl-C and SIGTERM end the recording cleanly (end record); SIGKILL leaves it cut, its frames usable."""
    runtime = make_runtime("record", "r5")
    client, keys = runtime.client, LineKeys(config.streams.prefix, "line-1")
    out = tmp_path / "rec.lir"
    with running_recorder(config.redis.url or "", config.streams.prefix, out) as (process, log):
        frames = [tiny_frame(f"f{n}") for n in range(3)]
        for frame in frames:
            entry_id = client.publish(keys.frames, encode_frame(frame))
            client.publish(keys.decisions, encode_decision(decision_for(frame.frame_id, frame_entry_id=entry_id)))
        wait_until(lambda: len(read_recording(out).decisions) == 3, 30, "the frames to be written")
        process.send_signal(signum)
        output, _ = process.communicate(timeout=30)
    recording = read_recording(out)
    assert [frame.frame_id for frame in recording.frames()] == ["f0", "f1", "f2"] and len(recording.decisions) == 3
    if signum == signal.SIGKILL:
        assert recording.cut and not recording.complete
    else:
        assert process.returncode == 0 and recording.complete, log
        assert "recorded 3 frames and 3 decisions" in output


def test_lineinspect_record_frames_0_records_until_stopped_as_run_does(
    config: Config, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    """`lineinspect run --frames 0` runs until Ctrl-C; `record --frames 0` wrote an empty recording at once and
    exited 0, so an engineer who stopped it an hour later had nothing to replay."""
    runtime = make_runtime("record", "r9")
    client, keys = runtime.client, LineKeys(config.streams.prefix, "line-1")
    out = tmp_path / "rec.lir"
    with running_recorder(config.redis.url or "", config.streams.prefix, out, "--frames", "0") as (process, log):
        frames = [tiny_frame(f"f{n}") for n in range(2)]
        for frame in frames:
            entry_id = client.publish(keys.frames, encode_frame(frame))
            client.publish(keys.decisions, encode_decision(decision_for(frame.frame_id, frame_entry_id=entry_id)))
        wait_until(lambda: process.poll() is not None or len(read_recording(out).decisions) == 2, 30,
                   "the frames to be written")  # fmt: skip
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert "recorded 2 frames and 2 decisions" in output, (output, log)
    assert read_recording(out).complete


def test_a_recording_is_read_one_frame_at_a_time(tmp_path: Path) -> None:
    """A day of frames does not fit in memory: scanning keeps the decisions and a count, frames stay in the file."""
    import tracemalloc

    big = tiny_frame("f").model_copy(update={"data": bytes(2_000_000)})  # ~2 MB a frame, 40 of them
    path = write_recording(tmp_path / "rec.lir", [big.model_copy(update={"frame_id": f"f{n}"}) for n in range(40)])
    tracemalloc.start()
    recording = read_recording(path)
    sent = sum(1 for _ in ReplaySource("x", path, speed=0).captures())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert recording.frame_count == sent == 40 and len(recording.decisions) == 40 and recording.complete
    assert peak < 20_000_000  # a few frames at a time, not the 80 MB file


def test_replay_speed_keeps_the_recorded_gaps_scaled(tmp_path: Path) -> None:
    frames = [tiny_frame(f"f{n}", captured_at_ns=5_000_000_000 + n * 200_000_000) for n in range(4)]  # 0.6 s
    path = write_recording(tmp_path / "rec.lir", frames, entry_ids=stream_ids(frames))

    def replay_seconds(speed: float) -> float:
        started = time.monotonic()
        assert len(list(ReplaySource("x", path, speed=speed).captures())) == 4
        return time.monotonic() - started

    at_recorded_pace, twice_as_fast = replay_seconds(1.0), replay_seconds(2.0)
    assert at_recorded_pace >= 0.59 and 0.29 <= twice_as_fast < at_recorded_pace
    assert replay_seconds(0.0) < 0.25
    for speed in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="replay speed must be >= 0"):
            ReplaySource("x", path, speed=speed)


def test_a_decision_read_before_its_frame_is_kept_for_it() -> None:
    """The recorder reads both streams a page at a time: after a burst, decisions can be read before their frames."""
    matcher = DecisionMatcher()
    assert matcher.frame_read("5-0", "cam0-1") is None and matcher.frame_read("6-0", "cam0-1") is None
    early = encode_decision(decision_for("cam0-1", score=7.0, frame_entry_id="7-0"))
    assert matcher.decision_read(decision_for("cam0-1", frame_entry_id="7-0"), early, "6-0") is None  # frame 7 ahead
    assert matcher.decision_read(decision_for("x", frame_entry_id="4-0"), b"old", "6-0") is None  # before recording
    assert matcher.decision_read(decision_for("cam0-1", frame_entry_id="6-0"), b"d6", "6-0") == "6-0"
    assert matcher.decision_read(decision_for("cam0-1", frame_entry_id="6-0"), b"again", "6-0") is None  # decided
    assert matcher.frame_read("7-0", "cam0-1") == early and "7-0" not in matcher.awaiting
    assert matcher.decision_read(decision_for("cam0-1"), b"d", "7-0") == "5-0"  # no entry id: oldest of its id
    assert matcher.awaiting == {} and matcher.early == {}
    matcher.decision_read(decision_for("y", frame_entry_id="9-0"), b"d9", "7-0")
    assert matcher.frame_read("9-0", None) is None and matcher.early == {}  # frame 9 not recorded: dropped


def test_a_recording_keeps_a_small_summary_of_each_decision(tmp_path: Path) -> None:
    """A day at 10 fps is 864,000 decisions: whole Decisions (~4.8 kB each in memory) would need 4 GB."""
    import tracemalloc

    frames = [tiny_frame(f"cam0-{n:012d}", sequence=n) for n in range(3000)]
    path = write_recording(tmp_path / "rec.lir", frames)
    tracemalloc.start()
    recording = read_recording(path)
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(recording.decisions) == 3000 and recording.decisions[3000].score == 3000.0
    assert kept / 3000 < 1000, f"{kept / 3000:.0f} bytes kept per frame"


def test_a_recorder_that_cannot_start_leaves_no_file(tmp_path: Path) -> None:
    """Redis down at the start: no empty recording is left behind to block the next try (files are not overwritten)."""

    class RedisDown:
        def position(self, stream: str) -> StreamPosition:
            raise ConnectionError("redis unavailable")

    with pytest.raises(ConnectionError):
        record_line(RedisDown(), LineKeys("p", "line-1"), tmp_path / "rec.lir", threading.Event(), 5)  # type: ignore[arg-type]
    assert not (tmp_path / "rec.lir").exists()


def test_lineinspect_record_stopped_during_a_redis_outage_ends_within_the_drain_timeout(tmp_path: Path) -> None:
    # the recorder retried an unreachable Redis until it came back: Ctrl-C did nothing, a second one cut the file
    out = tmp_path / "rec.lir"
    with EmbeddedRedis() as server:
        client = StreamClient(server.url, RedisSettings(), StreamSettings())
        keys = LineKeys("outage", "line-1")
        drain = {"LINEINSPECT__WORKER__DRAIN_TIMEOUT_S": "1"}
        with running_recorder(server.url, "outage", out, **drain) as (process, log):
            frame = tiny_frame("f0")
            entry_id = client.publish(keys.frames, encode_frame(frame))
            client.publish(keys.decisions, encode_decision(decision_for("f0", frame_entry_id=entry_id)))
            wait_until(lambda: len(read_recording(out).decisions) == 1, 30, "the frame to be written")
            client.close()
            server.stop(kill=True)
            wait_until(lambda: any("retrying" in line for line in log), 30, "the recorder to meet the outage")
            stopped_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, rest = process.communicate(timeout=30)  # the last lines: communicate reads them, not the reader
            took_s = time.monotonic() - stopped_at
    assert process.returncode == 1 and "holds what was recorded before" in "".join(log) + rest, log[-3:]
    assert took_s < 8, log  # drain timeout 1 s (+ the attempt in flight); before: until Redis came back
    recording = read_recording(out)
    assert [item.frame_id for item in recording.frames()] == ["f0"] and recording.complete


def test_a_second_ctrl_c_while_waiting_for_decisions_still_closes_the_recording(
    config: Config, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    # the second Ctrl-C killed the recorder at once and left the file cut: an operator pressing it twice got a
    # recording without its end record
    runtime = make_runtime("record", "r7")
    client, keys = runtime.client, LineKeys(config.streams.prefix, "line-1")
    out = tmp_path / "rec.lir"
    with running_recorder(config.redis.url or "", config.streams.prefix, out) as (process, log):
        frames = [tiny_frame(f"f{n}") for n in range(3)]
        entry_id = client.publish(keys.frames, encode_frame(frames[0]))
        client.publish(keys.decisions, encode_decision(decision_for("f0", frame_entry_id=entry_id)))
        for frame in frames[1:]:  # nobody decides these: the recorder waits for them after the first Ctrl-C
            client.publish(keys.frames, encode_frame(frame))
        wait_until(lambda: read_recording(out).frame_count == 3, 30, "the frames to be written")
        process.send_signal(signal.SIGINT)
        wait_until(lambda: any("waiting for the decisions" in line for line in log), 30, "the recorder to wait")
        process.send_signal(signal.SIGINT)
        output, rest = process.communicate(timeout=30)
    text = "".join(log) + rest
    assert process.returncode == 0, text[-2000:]
    assert "a second Ctrl-C stops waiting and closes the file complete" in text
    assert "second stop: closing the recording without waiting" in text
    assert "recorded 3 frames and 1 decisions" in output
    recording = read_recording(out)
    assert recording.complete and not recording.cut and recording.frame_count == 3 and set(recording.decisions) == {1}


def test_a_third_stop_signal_ends_the_recorder_at_once() -> None:
    """Only a third signal (or SIGKILL) may cut a recording: the first two set their events, the third kills."""
    script = (
        "import signal, threading\n"
        "from workers.record import install_record_stop_handlers\n"
        "stop, stop_waiting = threading.Event(), threading.Event()\n"
        "install_record_stop_handlers(stop, stop_waiting)\n"
        "signal.raise_signal(signal.SIGTERM)\n"
        "print(stop.is_set(), stop_waiting.is_set(), flush=True)\n"
        "signal.raise_signal(signal.SIGINT)\n"
        "print(stop.is_set(), stop_waiting.is_set(), flush=True)\n"
        "signal.raise_signal(signal.SIGTERM)\n"
        "print('still running', flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.split("\n")[:2] == ["True False", "True True"], result.stderr
    assert result.returncode == -signal.SIGTERM and "still running" not in result.stdout


def test_a_clock_step_in_the_recorded_times_does_not_pace_a_replay(tmp_path: Path) -> None:
    # --speed 1 paced by capture times alone: a camera clock stepped back an hour sent every later frame at once, one
    # stepped forward an hour made the replay wait that hour. The stream's entry ids (the Redis server's clock) say
    # the frames came 0.2 s apart
    def frames_at(seconds: list[float]) -> list[Frame]:
        return [tiny_frame(f"f{n}", captured_at_ns=int((10_000 + at) * 1e9)) for n, at in enumerate(seconds)]

    published = [f"{1_700_000_000_000 + 200 * n}-0" for n in range(4)]  # 0.2 s apart
    back = write_recording(tmp_path / "back.lir", frames_at([0, 0.2, -3600 + 0.4, -3600 + 0.6]), entry_ids=published)
    ahead = write_recording(tmp_path / "ahead.lir", frames_at([0, 0.2, 20.4, 20.6]), entry_ids=published)

    def replay_seconds(path: Path) -> float:
        started = time.monotonic()
        assert len(list(ReplaySource("x", path, speed=1.0).captures())) == 4
        return time.monotonic() - started

    assert 0.59 <= replay_seconds(back) < 3  # before: 0.2 s, the frames after the step sent at once
    assert 0.59 <= replay_seconds(ahead) < 3  # before: 20.6 s
    # a pause of the line shows on both clocks and is kept; a recording without stream entry ids keeps its times
    assert paced_step_s(3 * 10**9, "1000-0", "4000-0") == 3.0
    assert paced_step_s(3 * 10**9, "1000-0", "1200-0") == pytest.approx(0.2)
    assert paced_step_s(3 * 10**9, "1-0", "x") == 3.0
    assert paced_step_s(200_000_000, "1000-0", "1001-5") == pytest.approx(0.2)  # published in one burst: capture time


def test_a_recording_replaced_after_it_was_read_is_not_replayed_against_the_old_baseline(tmp_path: Path) -> None:
    # the replay reads the frames again after the scan: a file replaced meanwhile sent another recording's frames,
    # compared with the first one's decisions
    path = write_recording(tmp_path / "rec.lir", [tiny_frame(f"f{n}") for n in range(3)])
    recording = read_recording(path)
    path.unlink()
    write_recording(path, [tiny_frame(f"g{n}") for n in range(3)], entry_ids=["7-0", "8-0", "9-0"])
    with pytest.raises(RecordingError, match="changed since it was read: its frame 1 is now stream entry 7-0, was 1-0"):
        list(recording.frames())
