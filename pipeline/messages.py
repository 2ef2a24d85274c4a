"""Frame and Decision: the only shapes that cross a process boundary.

A ``Frame`` is one captured image on its way to a scoring worker; a ``Decision`` is the verdict for one frame.
Both carry ``version`` (the wire schema version checked by ``pipeline.codec``), ``line_id``, ``camera_id``,
``frame_id`` (unique per frame) and ``captured_at_ns`` (wall-clock nanoseconds set at capture, carried through
so end-to-end latency can be measured at the sink).

Frame pixels travel as ``encoding``:

- ``jpeg`` / ``png``: ``data`` holds the encoded file bytes.
- ``raw``: ``data`` holds the array bytes in C order, with ``raw_shape`` ``(height, width)`` or
  ``(height, width, channels)`` and ``raw_dtype`` (``uint8`` or ``uint16``).

Integer fields (``version``, ``sequence``, ``captured_at_ns``, ``raw_shape``) are strict: ``1.0``, ``True`` or
``"5"`` are rejected rather than coerced, so a producer's type bug surfaces as ``invalid_fields`` at the first frame.
So are a Frame's msgpack types: text (``line_id``, ``camera_id``, ``frame_id``, metadata keys) must be str, not bin,
``data`` must be bin, not str (an old encoder's raw type), and metadata values str, int, float, bool or nil, at most
``MAX_METADATA_ENTRIES`` (256) of them. What one frame makes the pipeline and Redis hold is bounded too: ids are at
most ``MAX_ID_CHARS`` (256) characters, none of them a control character, and metadata keys and text values at most
``MAX_METADATA_BYTES`` (64 KiB) of UTF-8 in all.

A Decision on the internal results stream may carry the anomaly map (``(map_size, map_size)`` float16 bytes) so
the sink can draw a heatmap; the sink strips it before publishing the decision on the line's output stream.
"""

from __future__ import annotations

import re
import reprlib
import time
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator

SCHEMA_VERSION: Literal[1] = 1

Encoding = Literal["jpeg", "png", "raw"]
Verdict = Literal["pass", "fail", "error"]
MetadataValue = str | int | float | bool | None


def now_ns() -> int:
    """Wall-clock time in nanoseconds, the unit of every ``*_at_ns`` field."""
    return time.time_ns()


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _exact_version(value: Any) -> Any:
    """``version`` must be the integer itself: 1.0 and True compare equal to 1 but are not schema version 1."""
    if type(value) is not int:
        msg = f"schema version must be an integer, got {type(value).__name__} {value!r}"
        raise ValueError(msg)
    return value


_WIRE_TYPES = {bytes: "bin", str: "str", bool: "bool", int: "int", float: "float", list: "array", tuple: "array",
               dict: "map", type(None): "nil"}  # fmt: skip


def wire_type(value: Any) -> str:
    """The msgpack type a decoded value came as (``bin``, ``str``, ``int``, ``map``...), for error messages."""
    return next((name for kind, name in _WIRE_TYPES.items() if isinstance(value, kind)), type(value).__name__)


def brief_repr(value: Any) -> str:
    """A repr of ``value`` of at most about 100 characters, for error messages, built without the repr of the whole
    of a huge or deeply nested value (seconds, or a RecursionError, on what a 16 MiB payload can hold)."""
    if isinstance(value, bytes | bytearray):
        return repr(bytes(value[:40])) + ("..." if len(value) > 40 else "")
    return _BRIEF.repr(value)


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 3, 60, 60


# Validation context (``{RECORDED_BEFORE_WIRE_TYPES: True}``) under which a Frame takes the msgpack types lineinspect
# took before it checked them (text as bin, ``data`` as str, metadata as bin): recordings made then hold such frames
# (``pipeline.codec.decode_recorded_frame``). Never for frames on a stream.
RECORDED_BEFORE_WIRE_TYPES = "recorded_before_wire_types"
# Entries a frame's metadata may hold (part number, recipe, source file, label...): it is copied into the frame's
# decision on the results and decisions streams, and 200,000 of them (2 MB) cost the scorer 40 MB to validate.
MAX_METADATA_ENTRIES = 256
# Characters a line_id, camera_id or frame_id may hold: the frame id names a Redis key (``P:L:published:<frame_id>``,
# kept streams.published_ttl_s) and is copied into the frame's decision, dead letter and logs, so a 10 MB id would
# be a 10 MB key name. Serials, UUIDs, timestamps and paths-like names fit with a wide margin.
MAX_ID_CHARS = 256
HEALTH_NAMESPACE = "health"  # P:health:<role>:<name> (pipeline.streams.health_key): not a line id
# Control characters (Unicode Cc: C0, DEL, C1) are refused in ids: a trailing CR/LF from a serial line or a file
# makes an id that prints like another one and splits plain log lines. Colons, spaces and any printable text are ids.
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# UTF-8 bytes a frame's metadata keys and str values may hold together (lot numbers, serials, recipe, labels, a
# source path, timestamps: a few kB at most): it is copied into the results and decisions streams, up to
# streams.maxlen decisions of it, where the payload limit (16 MiB) alone would let one value take 16 MiB.
MAX_METADATA_BYTES = 64 * 1024


def _recorded_before(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and bool(info.context.get(RECORDED_BEFORE_WIRE_TYPES))


def _wire_text(value: Any, info: ValidationInfo) -> Any:
    """A text field must come as msgpack str: bin would be decoded as UTF-8 by pydantic, silently."""
    if isinstance(value, bytes | bytearray) and not _recorded_before(info):
        msg = "msgpack bin, expected str: send text as msgpack str"
        raise ValueError(msg)
    return value


def _wire_data(value: Any, info: ValidationInfo) -> Any:
    """``data`` must come as msgpack bin: str (what old encoders make of bytes) would be encoded back to UTF-8."""
    if isinstance(value, str) and not _recorded_before(info):
        msg = "msgpack str, expected bin: pack the image bytes as bin (msgpack-python: packb(..., use_bin_type=True))"
        raise ValueError(msg)
    return value


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a frame's line, camera or frame id (too long, a control character), or None."""
    if len(value) > MAX_ID_CHARS:
        return f"is {len(value)} characters; ids hold at most {MAX_ID_CHARS}"
    control = CONTROL_CHARACTER.search(value)
    if control is not None:
        where = control.start()
        return f"holds control character U+{ord(control.group()):04X} at {where}; ids are printable text (strip CR/LF)"
    return None


def line_id_problem(line_id: str) -> str | None:
    """Why ``line_id`` cannot name a line (an id the wire refuses, or the heartbeats' key space), or None."""
    # P:health:<role>:<name> holds every worker's heartbeat: the keys of a line "health" or "health:<role>" would mix
    # with them (line "health:score"'s model key P:health:score:model is scorer "model"'s heartbeat)
    if line_id == HEALTH_NAMESPACE or line_id.startswith(f"{HEALTH_NAMESPACE}:"):
        return f"is reserved: {HEALTH_NAMESPACE!r} names the workers' heartbeat keys"
    return id_problem(line_id)


def _bounded_id(value: str, info: ValidationInfo) -> str:
    """An id the pipeline can name keys, decisions and log lines by; taken as it was in recordings made before."""
    problem = None if _recorded_before(info) else id_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _text_bytes(text: str) -> int:
    """UTF-8 length of ``text``; its character count (a lower bound) when that alone is over the metadata limit,
    so a 16 MiB string is not encoded to be measured."""
    return len(text) if len(text) > MAX_METADATA_BYTES else len(text.encode("utf-8", "surrogatepass"))


def metadata_size_problem(metadata: dict[str, Any]) -> str | None:
    """Why ``metadata``'s keys and str values are too much text for a frame to carry, or None."""
    sizes = {}
    for key, item in metadata.items():
        sizes[key] = _text_bytes(key) + (_text_bytes(item) if isinstance(item, str) else 0)
    total = sum(sizes.values())
    if total <= MAX_METADATA_BYTES:
        return None
    largest = max(sizes, key=lambda key: sizes[key])
    return (f"keys and str values hold at least {total} bytes of UTF-8 (largest {brief_repr(largest):.40}: "
            f"{sizes[largest]}); a frame's metadata holds at most {MAX_METADATA_BYTES} (64 KiB) in all")  # fmt: skip


def _wire_metadata(value: Any, info: ValidationInfo) -> Any:
    """Metadata keys must be str and values str, int, float, bool or nil, as msgpack sent them: a bin key or value
    would be decoded as UTF-8 by pydantic, silently."""
    if not isinstance(value, dict) or _recorded_before(info):
        return value  # pydantic says it is not a map; or a recorded frame, taken as it was then
    if len(value) > MAX_METADATA_ENTRIES:
        msg = f"holds {len(value)} entries; a frame's metadata holds at most {MAX_METADATA_ENTRIES}"
        raise ValueError(msg)
    for key, item in value.items():
        if not isinstance(key, str):
            msg = f"key {brief_repr(key):.40} is msgpack {wire_type(key)}; metadata keys must be str"
            raise ValueError(msg)
        if item is not None and not isinstance(item, str | int | float):  # bool is an int
            kind = wire_type(item)
            msg = f"{brief_repr(key):.40} is msgpack {kind}; metadata values must be str, int, float, bool or nil"
            raise ValueError(msg)
    problem = metadata_size_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


class Frame(_Message):
    """One captured image plus where and when it was taken."""

    version: Literal[1] = SCHEMA_VERSION
    line_id: str = Field(min_length=1)
    camera_id: str = Field(min_length=1)
    frame_id: str = Field(min_length=1)
    sequence: int = Field(ge=0, strict=True, description="Per-camera counter, increasing by one per captured frame.")
    captured_at_ns: int = Field(ge=0, strict=True)
    encoding: Encoding
    data: bytes
    raw_shape: tuple[Annotated[int, Strict()], ...] | None = None
    raw_dtype: Literal["uint8", "uint16"] | None = None
    metadata: dict[str, MetadataValue] = Field(default_factory=dict, description="Part number, recipe, source file.")

    _version_is_int = field_validator("version", mode="before")(_exact_version)
    _text_is_str = field_validator("line_id", "camera_id", "frame_id", mode="before")(_wire_text)
    _ids_bounded = field_validator("line_id", "camera_id", "frame_id")(_bounded_id)
    _data_is_bin = field_validator("data", mode="before")(_wire_data)
    _metadata_types = field_validator("metadata", mode="before")(_wire_metadata)


class FrameRef(NamedTuple):
    """Who a frame is, as far as a scoring worker could read a frame it rejected (``pipeline.codec.peek_frame_ref``):
    enough to publish an ``error`` decision for it."""

    frame_id: str
    line_id: str
    camera_id: str
    sequence: int
    captured_at_ns: int
    metadata: dict[str, MetadataValue]


class StageTimings(_Message):
    """Seconds spent per stage for one frame; batch-wide stages are the batch's time, shared by its frames."""

    queue_wait_s: float = 0.0
    decode_s: float = 0.0
    backbone_s: float = 0.0
    search_s: float = 0.0
    postprocess_s: float = 0.0
    publish_s: float = 0.0


class Decision(_Message):
    """The verdict for one frame. ``error_reason`` is set exactly when ``verdict`` is ``error``."""

    version: Literal[1] = SCHEMA_VERSION
    frame_id: str = Field(min_length=1)
    line_id: str = Field(min_length=1)
    camera_id: str = Field(min_length=1)
    sequence: int = Field(default=0, ge=0, strict=True)
    verdict: Verdict
    score: float | None = None
    threshold: float | None = None
    model_id: str | None = None
    error_reason: str | None = None
    error_detail: str | None = None
    heatmap_ref: str | None = Field(default=None, description="Path of the heatmap overlay PNG the sink wrote.")
    timings: StageTimings = StageTimings()
    captured_at_ns: int = Field(ge=0, strict=True)
    decided_at_ns: int = Field(default=0, ge=0, description="Set by the scoring worker when the verdict is known.")
    published_at_ns: int = Field(default=0, ge=0, description="Set by the sink when the decision is published.")
    frame_entry_id: str | None = Field(default=None, description="Frames-stream entry id, for the heatmap image.")
    map_size: int | None = Field(default=None, ge=1)
    anomaly_map: bytes | None = Field(default=None, description="(map_size, map_size) float16, C order.")
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)

    _version_is_int = field_validator("version", mode="before")(_exact_version)

    def anomaly_map_array(self) -> np.ndarray | None:
        """The anomaly map as a ``(map_size, map_size)`` float32 array, or None when the decision carries none."""
        if self.anomaly_map is None or self.map_size is None:
            return None
        values = np.frombuffer(self.anomaly_map, dtype=np.float16)
        if values.size != self.map_size * self.map_size:
            msg = f"decision {self.frame_id}: anomaly map has {values.size} values, expected {self.map_size}^2"
            raise ValueError(msg)
        return values.reshape(self.map_size, self.map_size).astype(np.float32)


def pack_anomaly_map(anomaly_map: np.ndarray) -> tuple[int, bytes]:
    """``(size, size)`` float map to ``(size, float16 bytes)`` for ``Decision.anomaly_map``."""
    if anomaly_map.ndim != 2 or anomaly_map.shape[0] != anomaly_map.shape[1]:
        msg = f"anomaly map must be square (size, size), got shape {anomaly_map.shape}"
        raise ValueError(msg)
    return int(anomaly_map.shape[0]), np.ascontiguousarray(anomaly_map, dtype=np.float16).tobytes()


def error_decision(
    frame: Frame | FrameRef,
    reason: str,
    detail: str,
    timings: StageTimings | None = None,
    frame_entry_id: str | None = None,
) -> Decision:
    """An ``error`` verdict for ``frame`` (or what could be read of a rejected one) that says why it was not scored.
    ``frame_entry_id``, the frames-stream entry it came from, lets the sink tell a redelivery of this frame (one
    decision) from another frame reusing its id."""
    return Decision(
        frame_entry_id=frame_entry_id,
        frame_id=frame.frame_id,
        line_id=frame.line_id,
        camera_id=frame.camera_id,
        sequence=frame.sequence,
        verdict="error",
        error_reason=reason,
        error_detail=detail[:500],
        timings=timings or StageTimings(),
        captured_at_ns=frame.captured_at_ns,
        decided_at_ns=now_ns(),
        metadata=frame.metadata,
    )
