"""What one valid-looking frame may make the pipeline and Redis hold: ids of at most ``MAX_ID_CHARS`` printable
characters, metadata text of at most ``MAX_METADATA_BYTES``; a frame over either is ``invalid_fields`` naming the
field and the limit, and its error decision (``peek_frame_ref``) never carries the oversized id. Recordings made
before these limits still read (``decode_recorded_frame``)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from pipeline.codec import (
    CodecError,
    CodecErrorReason,
    decode_frame,
    decode_recorded_frame,
    encode_decision,
    encode_frame,
    peek_frame_ref,
)
from pipeline.messages import MAX_ID_CHARS, MAX_METADATA_BYTES, error_decision
from pipeline.streams import DecisionToPublish, LineKeys, StreamClient
from tests.pipeline.test_codec import make_frame

ID_FIELDS = ("line_id", "camera_id", "frame_id")


def frame_fields(**overrides: Any) -> dict[str, Any]:
    """A valid frame's wire fields, as a producer packs them, with ``overrides`` put in unchecked."""
    fields: dict[str, Any] = msgpack.unpackb(encode_frame(make_frame()), raw=False)
    fields.update(overrides)
    return fields


def payload_of(**overrides: Any) -> bytes:
    packed = msgpack.packb(frame_fields(**overrides), use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


def refusal(payload: bytes) -> CodecError:
    with pytest.raises(CodecError) as caught:
        decode_frame(payload, max_bytes=16 * 1024 * 1024)
    return caught.value


@pytest.mark.parametrize("field", ID_FIELDS)
def test_an_id_over_the_limit_is_invalid_fields_naming_the_field_and_the_limit(field: str) -> None:
    assert getattr(decode_frame(payload_of(**{field: "é" * MAX_ID_CHARS})), field) == "é" * MAX_ID_CHARS
    for length in (MAX_ID_CHARS + 1, 10 * 1024 * 1024):
        error = refusal(payload_of(**{field: "x" * length}))
        assert error.reason is CodecErrorReason.INVALID_FIELDS
        assert error.detail.startswith(f"{field}: ") and f"at most {MAX_ID_CHARS}" in error.detail
        assert str(length) in error.detail and len(error.detail) < 300  # says how long, without the id


@pytest.mark.parametrize("field", ID_FIELDS)
def test_an_id_with_a_control_character_is_invalid_fields_and_punctuation_is_not(field: str) -> None:
    for text in ("f-1\n", "f\r1", "f\x001", "\tf", "f\x7f", "f\x85"):
        error = refusal(payload_of(**{field: text}))
        assert error.reason is CodecErrorReason.INVALID_FIELDS
        assert error.detail.startswith(f"{field}: ") and "control character" in error.detail
    for text in ("cam:1/line 3", "2024-05-01T12:00:00.123+02:00", "Prüfstand-Ä~#1", "lot{7}[a]*?"):
        assert getattr(decode_frame(payload_of(**{field: text})), field) == text


def test_metadata_text_over_the_limit_is_invalid_fields_naming_the_limit_and_the_largest_entry() -> None:
    ordinary = {f"field-{index:03d}": f"value {index} " * 10 for index in range(254)}  # with 2 more: 256, ~40 KB
    assert decode_frame(payload_of(metadata={**ordinary, "ok": True, "at": 1.5})).metadata["field-000"]
    assert decode_frame(payload_of(metadata={"note": "x" * (MAX_METADATA_BYTES - 4)})).metadata  # exactly the limit
    too_much: list[dict[str, Any]] = [
        {"note": "x" * (MAX_METADATA_BYTES - 3)},  # one byte over, with its key
        {"note": "ä" * (MAX_METADATA_BYTES // 2)},  # half as many characters, two bytes each
        {"n" * (MAX_METADATA_BYTES + 1): 1},  # a key
        {"blob": "x" * (16 * 1024 * 1024 - 200)},
        {f"k{index}": "v" * 300 for index in range(250)},  # many ordinary entries
        {"lot\nnumber": "x" * MAX_METADATA_BYTES},  # named quoted: a raw newline split the log line
    ]
    for metadata in too_much:
        error = refusal(payload_of(metadata=metadata))
        assert error.reason is CodecErrorReason.INVALID_FIELDS
        assert error.detail.startswith("metadata: ") and f"at most {MAX_METADATA_BYTES}" in error.detail
        largest = max(metadata, key=lambda key: len(key) + len(str(metadata[key])))
        assert f"largest {largest[:10]!r}"[:-1] in error.detail and len(error.detail) < 400
        assert "\n" not in error.detail


def test_a_frame_refused_for_its_long_id_gets_an_error_decision_under_a_bounded_stand_in_id() -> None:
    long_id = "part-" + "7" * (10 * 1024 * 1024)
    payload = payload_of(frame_id=long_id)
    error = refusal(payload)
    ref = peek_frame_ref(payload, "line-1", received_at_ns=5)
    assert ref is not None and len(ref.frame_id) <= MAX_ID_CHARS and ref.frame_id.startswith("part-777")
    assert decode_frame(payload_of(frame_id=ref.frame_id)).frame_id == ref.frame_id  # a valid id itself
    other = peek_frame_ref(payload_of(frame_id=long_id[:-1] + "8"), "line-1", 5)
    assert other is not None and other.frame_id != ref.frame_id  # the whole id names it, not only its start
    decision = error_decision(ref, error.reason.value, error.detail, frame_entry_id="1-0")
    assert len(encode_decision(decision)) < 2048
    controlled = peek_frame_ref(payload_of(frame_id="f-1\r\n", data="str"), "line-1", 5)
    assert controlled is not None and controlled.frame_id.isprintable() and controlled.frame_id != "f-1"


def test_a_frame_with_a_long_valid_id_refused_for_another_reason_is_named_by_its_id() -> None:
    frame_id = "f" * MAX_ID_CHARS
    payload = payload_of(frame_id=frame_id, camera_id="c" * MAX_ID_CHARS, sequence=-1)
    assert refusal(payload).reason is CodecErrorReason.INVALID_FIELDS
    ref = peek_frame_ref(payload, "line-1", received_at_ns=5)
    assert ref is not None and (ref.frame_id, ref.camera_id) == (frame_id, "c" * MAX_ID_CHARS)


def test_recordings_made_before_the_limits_still_read() -> None:
    """A recording holds frames the line took when they were recorded; a replay sends them as they are and the
    shadow line refuses what it now refuses."""
    old = payload_of(frame_id="f" * 5000, camera_id="cam\n0", metadata={"blob": "x" * 200_000})
    assert refusal(old).reason is CodecErrorReason.INVALID_FIELDS
    frame = decode_recorded_frame(old)
    assert (len(frame.frame_id), frame.camera_id, len(str(frame.metadata["blob"]))) == (5000, "cam\n0", 200_000)
    older = msgpack.packb(frame_fields(frame_id=b"f" * 300, metadata={b"note": b"n" * 100_000}), use_bin_type=False)
    assert len(decode_recorded_frame(older).frame_id) == 300


def test_the_error_decision_of_a_frame_with_a_10_mb_id_stays_small_in_redis(
    client: StreamClient, keys: LineKeys
) -> None:
    payload = payload_of(frame_id="f" * (10 * 1024 * 1024))
    entry_id = client.publish(keys.frames, payload)
    error = refusal(payload)
    ref = peek_frame_ref(payload, keys.line_id, received_at_ns=0)
    assert ref is not None
    decision = encode_decision(error_decision(ref, error.reason.value, error.detail, frame_entry_id=entry_id))
    client.publish_decisions_once(keys, [DecisionToPublish(ref.frame_id, entry_id, decision)], marker_ttl_s=60)
    client.redis.delete(keys.frames)  # the frame itself is the producer's 10 MB, trimmed with the stream
    names = list(client.redis.scan_iter(match=f"{keys.frames.rsplit(':', 1)[0]}:*", count=1000))
    assert names and max(len(name) for name in names) < 1024, [name[:80] for name in names]
    assert sum(int(client.redis.memory_usage(name) or 0) for name in names) < 64 * 1024
