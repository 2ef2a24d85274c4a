"""Camera software written against README alone: the documented wire protocol, checked from outside.

The producer and consumer code here uses only redis-py, msgpack, numpy and cv2 - nothing of lineinspect - as an
integrator's C++, Go or Node program would: XADD frames as README's "Publishing frames from your own software" says,
read decisions with XREAD or a consumer group of its own, dead letters with XRANGE, and the scorers' lag with XINFO
GROUPS. lineinspect itself runs as a sink and a scoring worker in their own processes (the fixtures' launcher and the
tiny fitted model), shared by every test in this file. Its camera started before its scorers, as cameras do, so the
line also shows what README says a producer sees then.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np
import pytest
import redis

from tests.workers.conftest import TinyLine
from tests.workers.helpers import wait_until
from tests.workers.processes import WorkerProcesses, worker_env

pytestmark = pytest.mark.slow

LINE = "line-1"
SCORER = "score-ext"  # the scoring worker's consumer name
MAX_BATCH = 4  # worker.max_batch (worker_env's): frames one read of the scorer takes at most
MAXLEN = 2000  # streams.maxlen (config.toml's default, which worker_env leaves alone)
MAX_FRAME_BYTES = 100_000  # streams.max_frame_bytes for these workers: an oversized frame stays cheap to send
MAX_FRAME_PIXELS = 20_000  # streams.max_frame_pixels for these workers: the 96 x 96 demo frames are under it
DECISION_FIELDS = {"verdict", "score", "threshold", "model_id", "error_reason", "error_detail", "heatmap_ref",
                   "timings", "frame_id", "line_id", "camera_id", "sequence", "captured_at_ns", "metadata",
                   "frame_entry_id", "version", "decided_at_ns", "published_at_ns", "map_size",
                   "anomaly_map"}  # fmt: skip
STAGES = {"queue_wait_s", "decode_s", "backbone_s", "search_s", "postprocess_s", "publish_s"}
DEAD_LETTER_FIELDS = {"reason", "detail", "source_stream", "source_entry_id", "frame_id", "payload"}


# -- the camera software: redis-py and msgpack only ------------------------------------------------------------------
def frame_map(line_id: str = LINE, **fields: Any) -> dict[str, Any]:
    """A schema-version-1 frame map as README's table describes it; ``fields`` override or add keys."""
    frame: dict[str, Any] = {
        "version": 1,
        "line_id": line_id,
        "camera_id": "cam-ext",
        "frame_id": f"ext-{uuid.uuid4().hex[:12]}",
        "sequence": 0,
        "captured_at_ns": time.time_ns(),
        "encoding": "png",
        "data": b"",
    }
    frame.update(fields)
    return frame


def raw_fields(pixels: np.ndarray) -> dict[str, Any]:
    return {"encoding": "raw", "data": np.ascontiguousarray(pixels).tobytes(), "raw_shape": list(pixels.shape),
            "raw_dtype": str(pixels.dtype)}  # fmt: skip


def png_bytes(rgb: np.ndarray) -> bytes:
    image = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", image)
    assert ok
    return buffer.tobytes()


@dataclass
class Camera:
    """What an integrator's program holds: a Redis connection and the line's key names (README "Redis keys")."""

    redis: Any  # a redis.Redis: its command stubs type sync and asyncio replies as one union mypy cannot narrow
    prefix: str
    line_id: str
    seen: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # frame entry id -> decisions read
    last_decision_id: str = "0-0"

    def key(self, name: str) -> str:
        return f"{self.prefix}:{self.line_id}:{name}"

    def xadd(self, fields: dict[str, bytes]) -> str:
        entry_id = self.redis.xadd(self.key("frames"), fields, maxlen=MAXLEN, approximate=True)
        return entry_id.decode()

    def publish(self, frame: dict[str, Any]) -> str:
        """``XADD P:L:frames MAXLEN ~ N * payload <msgpack map>``; returns the entry id."""
        return self.xadd({"payload": msgpack.packb(frame, use_bin_type=True)})

    def read_decisions(self) -> None:
        """XREAD the decisions stream from the last id seen (README's first way of reading it)."""
        reply = self.redis.xread({self.key("decisions"): self.last_decision_id}, count=500, block=100)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                decision = msgpack.unpackb(fields[b"payload"], raw=False)
                self.seen.setdefault(decision["frame_entry_id"], []).append(decision)
                self.last_decision_id = entry_id.decode()

    def decisions_for(self, entry_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The decision of each frame entry, once every one has arrived and the line has nothing left in flight;
        fails if any frame got more than one."""

        def arrived() -> bool:
            self.read_decisions()
            return all(entry_id in self.seen for entry_id in entry_ids)

        wait_until(arrived, timeout_s=180, what=f"decisions for {len(entry_ids)} frames")
        self.settle()
        self.read_decisions()
        assert {entry_id: len(self.seen[entry_id]) for entry_id in entry_ids} == dict.fromkeys(entry_ids, 1)
        return {entry_id: self.seen[entry_id][0] for entry_id in entry_ids}

    def settle(self) -> None:
        """Wait until every frame published so far has been delivered, scored and published by the sink (the test's
        view of the line: camera software needs only the decisions)."""

        def idle() -> bool:
            groups = {row["name"].decode(): row for row in self.redis.xinfo_groups(self.key("frames"))}
            scorers = groups.get("scorers")
            results_left = self.redis.exists(self.key("results")) and self.redis.xlen(self.key("results"))
            return scorers is not None and scorers["lag"] == 0 and scorers["pending"] == 0 and not results_left

        wait_until(idle, timeout_s=180, what="the line to settle")

    def dead_letters(self) -> dict[str, dict[str, bytes]]:
        """The dead-letter stream, by the frames-stream entry each letter names."""
        rows = self.redis.xrange(self.key("deadletter"), "-", "+")
        letters = {}
        for _entry_id, fields in rows:
            letter = {name.decode(): value for name, value in fields.items()}
            letters[letter["source_entry_id"].decode()] = letter
        return letters

    def scorers_lag(self) -> Any:
        groups = {row["name"].decode(): row for row in self.redis.xinfo_groups(self.key("frames"))}
        return groups["scorers"]["lag"]


# -- the deployment: a sink and a scoring worker as processes --------------------------------------------------------
@dataclass
class EarlyCamera:
    """What the camera saw before any scorer ran: XINFO GROUPS before its first frame (the error) and after it."""

    error_before_first_frame: str
    groups_before_scorer: list[Any]
    entry_ids: list[str]


@dataclass
class Line:
    camera: Camera
    model_id: str
    threshold: float
    heatmap_dir: Path
    early: EarlyCamera
    good_rgb: list[np.ndarray]
    scorer: subprocess.Popen[bytes]


def rgb_of(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def line(tiny_line: TinyLine, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    root = tmp_path_factory.mktemp("external-producer")
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    camera = Camera(redis.Redis.from_url(redis_url), prefix, LINE)
    try:
        camera.redis.xinfo_groups(camera.key("frames"))
        error = ""
    except redis.ResponseError as refused:
        error = str(refused)
    good = [rgb_of(path) for path in tiny_line.good_images]
    early_ids = [camera.publish(frame_map(sequence=n, data=png_bytes(good[n % len(good)]))) for n in range(3)]
    early = EarlyCamera(error, camera.redis.xinfo_groups(camera.key("frames")), early_ids)

    (root / "logs").mkdir()
    env = worker_env(redis_url, prefix, root, LINEINSPECT__STREAMS__MAX_FRAME_BYTES=str(MAX_FRAME_BYTES),
                     LINEINSPECT__STREAMS__MAX_FRAME_PIXELS=str(MAX_FRAME_PIXELS))  # fmt: skip
    processes = WorkerProcesses(env, root / "logs")
    processes.start("sink", "--line", LINE, "--name", "sink-ext")
    scorer = processes.start("score-worker", "--line", LINE, "--name", SCORER, "--model", str(tiny_line.model_dir))
    manifest = json.loads((tiny_line.model_dir / "manifest.json").read_text())
    try:
        yield Line(camera, manifest["model_id"], manifest["threshold"]["value"], root / "heatmaps", early, good, scorer)
    finally:
        processes.stop_all()
        camera.redis.close()


# -- the contract -----------------------------------------------------------------------------------------------------
def test_before_the_first_scorer_there_is_no_stream_then_no_group_and_the_waiting_frames_are_scored(
    line: Line,
) -> None:
    early = line.early
    assert "no such key" in early.error_before_first_frame.lower()
    assert early.groups_before_scorer == []
    decisions = line.camera.decisions_for(early.entry_ids)  # published before any scorer: scored from the start
    assert [decisions[entry_id]["sequence"] for entry_id in early.entry_ids] == [0, 1, 2]
    assert {decision["verdict"] for decision in decisions.values()} <= {"pass", "fail"}


def test_the_scorers_lag_counts_the_frames_no_scorer_has_taken_and_falls_to_zero(line: Line) -> None:
    camera = line.camera
    camera.settle()
    line.scorer.send_signal(signal.SIGSTOP)  # an overloaded scorer: it reads nothing more until SIGCONT
    try:
        entry_ids = [camera.publish(frame_map(sequence=n, data=png_bytes(line.good_rgb[n % 4]))) for n in range(6)]
        lag = camera.scorers_lag()
        # one read may have been waiting in Redis when the scorer stopped: it took up to max_batch of the frames
        taken = len(camera.redis.xpending_range(camera.key("frames"), "scorers", "-", "+", 100, consumername=SCORER))
    finally:
        line.scorer.send_signal(signal.SIGCONT)
    assert lag == len(entry_ids) - taken and lag >= len(entry_ids) - MAX_BATCH
    camera.decisions_for(entry_ids)  # which waits for the lag to fall to 0
    assert camera.scorers_lag() == 0


def test_every_documented_pixel_layout_gets_one_decision_with_the_documented_fields(line: Line) -> None:
    camera = line.camera
    rgb = line.good_rgb[0].copy()
    rgb[:, :, 0] //= 2  # a colour frame (the demo parts are grey): channel order now matters
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, dtype=np.uint8)])
    grey = cv2.cvtColor(line.good_rgb[1], cv2.COLOR_RGB2GRAY)
    jpeg_ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert jpeg_ok
    metadata = {"label": "good", "recipe": "A7", "part": 12, "offset": -3, "counter": 2**63 + 5, "gain": 0.25,
                "exposure": 2.0, "rework": False, "checked": True, "note": None}  # fmt: skip
    frames = {
        "png": frame_map(data=png_bytes(rgb), metadata=metadata),
        "png_said_jpeg": frame_map(encoding="jpeg", data=png_bytes(rgb)),
        "jpeg": frame_map(encoding="jpeg", data=jpeg.tobytes()),
        "raw_rgb": frame_map(**raw_fields(rgb)),
        "raw_rgba": frame_map(**raw_fields(rgba)),
        "raw_rgb16": frame_map(**raw_fields(rgb.astype(np.uint16) * 257)),
        "raw_bgr": frame_map(**raw_fields(np.ascontiguousarray(rgb[:, :, ::-1]))),  # README: convert BGR first
        "grey_png": frame_map(data=png_bytes(grey)),
        "raw_grey": frame_map(**raw_fields(grey)),
        "raw_grey_1": frame_map(**raw_fields(grey[:, :, None])),
        "raw_grey16": frame_map(**raw_fields(grey.astype(np.uint16) * 257)),
        "raw_8x8": frame_map(**raw_fields(np.full((8, 8), 120, dtype=np.uint8))),
    }
    for sequence, frame in enumerate(frames.values(), start=10):
        frame["sequence"] = sequence
    entry_ids = {name: camera.publish(frame) for name, frame in frames.items()}
    decisions = camera.decisions_for(list(entry_ids.values()))
    by_name = {name: decisions[entry_id] for name, entry_id in entry_ids.items()}

    for name, decision in by_name.items():
        sent = frames[name]
        assert decision.keys() == DECISION_FIELDS, name
        assert (decision["version"], decision["map_size"], decision["anomaly_map"]) == (1, None, None)
        assert sent["captured_at_ns"] <= decision["decided_at_ns"] <= decision["published_at_ns"]
        assert decision["frame_entry_id"] == entry_ids[name]
        assert decision["verdict"] in ("pass", "fail"), (name, decision["error_reason"], decision["error_detail"])
        assert (decision["error_reason"], decision["error_detail"]) == (None, None)
        assert isinstance(decision["score"], float)
        assert (decision["model_id"], decision["threshold"]) == (line.model_id, line.threshold)
        assert decision["verdict"] == ("fail" if decision["score"] > decision["threshold"] else "pass")
        ids = ("frame_id", "line_id", "camera_id", "sequence", "captured_at_ns")
        assert [decision[key] for key in ids] == [sent[key] for key in ids]
        assert set(decision["timings"]) == STAGES and all(value >= 0 for value in decision["timings"].values())
        if decision["verdict"] == "fail":  # a file on the sink's host, inside sink.heatmap_dir
            assert Path(decision["heatmap_ref"]).is_file() and line.heatmap_dir in Path(decision["heatmap_ref"]).parents
        else:
            assert decision["heatmap_ref"] is None
    got = by_name["png"]["metadata"]
    assert got == metadata and {key: type(value) for key, value in got.items()} == {
        key: type(value) for key, value in metadata.items()
    }  # bools stay bools, floats stay floats
    assert all(by_name[name]["metadata"] == {} for name in frames if name != "png")

    score = {name: decision["score"] for name, decision in by_name.items()}
    for same_picture in ("png_said_jpeg", "raw_rgb", "raw_rgba"):  # PNG bytes are read whatever encoding says
        assert score[same_picture] == pytest.approx(score["png"], rel=1e-5, abs=1e-5), same_picture
    # 16 bits at x 257 score like the 8-bit picture; not exactly: resizing rounds 8-bit frames to whole levels
    assert score["raw_rgb16"] == pytest.approx(score["png"], rel=2e-2)
    assert abs(score["raw_bgr"] - score["png"]) > 1e-3  # raw colour is read as RGB
    for same_grey in ("raw_grey", "raw_grey_1"):
        assert score[same_grey] == pytest.approx(score["grey_png"], rel=1e-5, abs=1e-5), same_grey
    assert score["raw_grey16"] == pytest.approx(score["grey_png"], rel=2e-2)


def test_documented_refusals_are_dead_lettered_with_an_error_decision_and_the_worker_goes_on(line: Line) -> None:
    camera = line.camera
    png = png_bytes(line.good_rgb[2])
    big = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)  # > max_frame_bytes
    refused = {  # what is sent -> the dead-letter reason README gives, all of them frames of this line
        "invalid_fields": [frame_map(data=png, exposure_us=100),  # an unknown key
                           frame_map(data=png, captured_at_ns=1.7e18),  # a float timestamp
                           frame_map(data=png, sequence=-1)],
        "unknown_schema_version": [frame_map(data=png, version=2)],
        "oversized_frame": [frame_map(**raw_fields(big))],
        "image_too_large": [frame_map(data=png_bytes(np.zeros((150, 150), dtype=np.uint8)))],
        "undecodable_image": [frame_map(**raw_fields(np.zeros((7, 8), dtype=np.uint8))),  # under 8 x 8
                              frame_map(data=b"GIF89a not a png or jpeg")],
        "raw_shape_mismatch": [frame_map(**{**raw_fields(np.zeros((16, 16, 2), dtype=np.uint8))}),
                               frame_map(**{**raw_fields(np.zeros((16, 16), dtype=np.uint8)), "raw_shape": [16, 17]})],
    }  # fmt: skip
    sent: list[tuple[str, str, dict[str, Any]]] = []  # (reason, entry id, frame)
    for reason, frames in refused.items():
        sent += [(reason, camera.publish(frame), frame) for frame in frames]
    other_line = frame_map(line_id="line-2", data=png)
    other_line_id = camera.publish(other_line)
    other_line_refused_id = camera.publish(frame_map(line_id="line-2", data=png, captured_at_ns=1.7e18))
    garbage = b"\x00\x01 not msgpack \xc1"
    garbage_id = camera.xadd({"payload": garbage})
    after = frame_map(data=png)
    after_id = camera.publish(after)

    decisions = camera.decisions_for([entry_id for _, entry_id, _ in sent] + [after_id])
    assert decisions[after_id]["verdict"] in ("pass", "fail")  # the worker went on
    assert not {other_line_id, other_line_refused_id, garbage_id} & camera.seen.keys()  # no decision for those
    letters = camera.dead_letters()
    for reason, entry_id, frame in sent:
        letter, decision = letters[entry_id], decisions[entry_id]
        assert letter.keys() >= DEAD_LETTER_FIELDS
        assert (letter["reason"].decode(), letter["source_stream"].decode()) == (reason, camera.key("frames"))
        assert letter["frame_id"].decode() == frame["frame_id"] and letter["detail"]
        payload = msgpack.packb(frame, use_bin_type=True)
        if reason == "oversized_frame":  # cut to its first 64 KiB
            assert letter["payload"] == payload[: 64 * 1024]
            assert (letter["payload_bytes"], letter["payload_truncated"]) == (str(len(payload)).encode(), b"1")
        else:
            assert letter["payload"] == payload and "payload_truncated" not in letter
        assert (decision["verdict"], decision["error_reason"]) == ("error", reason)
        assert decision["error_detail"] and decision["score"] is None and decision["frame_id"] == frame["frame_id"]
    wrong_line = letters[other_line_id]
    assert (wrong_line["reason"], wrong_line["frame_id"]) == (b"wrong_line", other_line["frame_id"].encode())
    assert letters[other_line_refused_id]["reason"] == b"invalid_fields"
    assert (letters[garbage_id]["reason"], letters[garbage_id]["frame_id"]) == (b"not_msgpack", b"")
    assert letters[garbage_id]["payload"] == garbage


def test_an_entry_without_a_payload_field_is_not_called_trimmed(line: Line) -> None:
    camera = line.camera
    misnamed = msgpack.packb(frame_map(data=png_bytes(line.good_rgb[0])), use_bin_type=True)
    misnamed_id = camera.xadd({"frame": misnamed})  # README: the field is `payload`
    after_id = camera.publish(frame_map(data=png_bytes(line.good_rgb[0])))
    camera.decisions_for([after_id])
    letter = camera.dead_letters()[misnamed_id]
    assert letter["reason"] == b"not_a_message"
    assert b"payload" in letter["detail"] and b"frame" in letter["detail"]
    assert misnamed_id not in camera.seen


def test_msgpack_types_other_than_the_documented_ones_are_invalid_fields_naming_the_field(line: Line) -> None:
    """README's table: text is msgpack str, ``data`` bin, metadata keys str. An int metadata key and bytes packed as
    str by an old encoder were dead-lettered not_msgpack (garbage, no field named); a bin frame id was accepted."""
    camera = line.camera
    png = png_bytes(line.good_rgb[1])
    int_key = frame_map(data=png, metadata={7: "station"})
    int_key_id = camera.xadd({"payload": msgpack.packb(int_key, use_bin_type=True)})
    old_encoder = frame_map(data=png)  # msgpack-python's use_bin_type=False: the PNG's bytes go as msgpack str
    old_encoder_id = camera.xadd({"payload": msgpack.packb(old_encoder, use_bin_type=False)})
    binary_id = camera.xadd({"payload": msgpack.packb(frame_map(data=png, frame_id=b"ext-bin"), use_bin_type=True)})
    after_id = camera.publish(frame_map(data=png))

    decisions = camera.decisions_for([int_key_id, old_encoder_id, after_id])
    assert decisions[after_id]["verdict"] in ("pass", "fail")
    letters = camera.dead_letters()
    for entry_id, frame, field_named in [(int_key_id, int_key, b"metadata"), (old_encoder_id, old_encoder, b"data")]:
        assert letters[entry_id]["reason"] == b"invalid_fields"
        assert letters[entry_id]["detail"].startswith(field_named + b": ")
        assert letters[entry_id]["frame_id"].decode() == frame["frame_id"]
        assert (decisions[entry_id]["verdict"], decisions[entry_id]["error_reason"]) == ("error", "invalid_fields")
    assert letters[binary_id]["reason"] == b"invalid_fields"
    assert letters[binary_id]["detail"].startswith(b"frame_id: ")
    assert binary_id not in camera.seen  # no text frame id to decide it under


def test_a_frame_whose_metadata_key_and_value_are_not_utf8_is_dead_lettered_and_the_worker_goes_on(
    line: Line,
) -> None:
    """An old encoder's str that is not UTF-8, as a metadata key holding another: the detail naming it held a lone
    surrogate, so the dead letter could not be written (UnicodeEncodeError) and the scorer stopped on the batch."""
    camera = line.camera
    png = png_bytes(line.good_rgb[0])
    broken = frame_map(data=png, metadata={b"\xfflot": b"\xfe"})
    broken_id = camera.xadd({"payload": msgpack.packb(broken, use_bin_type=False)})
    after_id = camera.publish(frame_map(data=png))
    decisions = camera.decisions_for([broken_id, after_id])
    assert decisions[after_id]["verdict"] in ("pass", "fail")
    assert (decisions[broken_id]["verdict"], decisions[broken_id]["error_reason"]) == ("error", "invalid_fields")
    letter = camera.dead_letters()[broken_id]
    assert letter["reason"] == b"invalid_fields"
    assert b"metadata.\\xfflot: msgpack str that is not UTF-8" in letter["detail"]
    assert line.scorer.poll() is None


def test_a_reused_frame_id_is_decided_again_flagged(line: Line) -> None:
    camera = line.camera
    frame_id = f"reused-{uuid.uuid4().hex[:8]}"
    png = png_bytes(line.good_rgb[3])
    entry_ids = [camera.publish(frame_map(frame_id=frame_id, sequence=n, data=png)) for n in range(2)]
    decisions = camera.decisions_for(entry_ids)
    flags = sorted(str(decisions[entry_id]["metadata"].get("frame_id_reused")) for entry_id in entry_ids)
    assert flags == ["None", "True"]
    assert {decisions[entry_id]["frame_id"] for entry_id in entry_ids} == {frame_id}


def test_a_consumer_group_of_ones_own_reads_the_same_decisions(line: Line) -> None:
    camera = line.camera
    decisions = camera.key("decisions")
    entry_ids = [camera.publish(frame_map(sequence=n, data=png_bytes(line.good_rgb[n]))) for n in range(2)]
    camera.decisions_for(entry_ids)
    camera.redis.xgroup_create(decisions, "plc-bridge", id="0")
    read: dict[str, dict[str, Any]] = {}
    while True:
        reply = camera.redis.xreadgroup("plc-bridge", "plc-1", {decisions: ">"}, count=100)
        if not reply:
            break
        for entry_id, fields in reply[0][1]:
            decision = msgpack.unpackb(fields[b"payload"], raw=False)
            read[decision["frame_entry_id"]] = decision
            camera.redis.xack(decisions, "plc-bridge", entry_id)
    assert read.keys() == camera.seen.keys()
    assert [read[entry_id] for entry_id in entry_ids] == [camera.seen[entry_id][0] for entry_id in entry_ids]
    assert camera.redis.xpending(decisions, "plc-bridge")["pending"] == 0
