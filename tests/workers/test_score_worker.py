"""Scoring worker in-process against a real Redis and a real (tiny) model: faults, parity, drain, hot reload."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import numpy as np
import pytest

from pipeline.codec import CodecErrorReason, encode_frame
from pipeline.config import Config, config_from_mapping
from pipeline.messages import Frame
from pipeline.streams import SCORER_GROUP, LineKeys, StreamEntry
from tests.workers.conftest import TinyLine
from tests.workers.helpers import decisions_in, frame_from_file, publish_frames, start_thread, wait_until
from workers.lifecycle import WorkerRuntime
from workers.score import BatchOutcome, ModelSlot, ScorerLike, ScoreWorker, load_model
from workers.sink import SinkWorker


def start_worker(runtime: WorkerRuntime, model_dir: object) -> ScoreWorker:
    keys = LineKeys(runtime.config.streams.prefix, "line-1")
    slot = ModelSlot(runtime, keys, load_model("cpu"), model_dir)  # type: ignore[arg-type]
    return ScoreWorker(runtime, "line-1", slot)


def test_bad_frames_are_dead_lettered_with_their_reason_and_the_worker_keeps_going(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], worker_config: Config
) -> None:
    runtime = make_runtime("score", "w1")
    worker = start_worker(runtime, tiny_line.model_dir)
    client, keys = runtime.client, worker.keys
    good = frame_from_file(tiny_line.good_images[0])
    bad_jpeg = frame_from_file(tiny_line.good_images[1], encoding="jpeg", data=b"\xff\xd8\xff\xe0 truncated jpeg")
    bad_raw = frame_from_file(
        tiny_line.good_images[1], encoding="raw", data=bytes(100), raw_shape=(96, 96, 3), raw_dtype="uint8"
    )
    oversized = frame_from_file(
        tiny_line.good_images[1],
        encoding="raw",
        data=bytes(96 * 96 * 3 * 8),
        raw_shape=(96 * 8, 96, 3),
        raw_dtype="uint8",
    )
    after = frame_from_file(tiny_line.good_images[2])
    client.ensure_group(keys.frames, SCORER_GROUP)
    client.publish(keys.frames, b"\x00\x01garbage that is not msgpack\xc1")
    client.publish(keys.frames, msgpack.packb({"version": 7, "frame_id": "from-the-future"}))
    publish_frames(client, keys, [good, bad_jpeg, bad_raw, after, oversized])  # bad frames share batches with good
    thread = start_thread(worker.run)
    wait_until(lambda: client.length(keys.results) >= 6, what="decisions for every frame with a readable frame_id")
    runtime.stop.set()
    thread.join(timeout=30)

    reasons = sorted(letter["reason"] for letter in client.dead_letters(keys))
    assert reasons == sorted(
        [
            CodecErrorReason.NOT_MSGPACK,
            CodecErrorReason.UNKNOWN_VERSION,
            CodecErrorReason.UNDECODABLE_IMAGE,
            CodecErrorReason.RAW_SHAPE_MISMATCH,
            CodecErrorReason.OVERSIZED,
        ]
    )
    by_frame = {decision.frame_id: decision for decision in decisions_in(client, keys.results)}
    assert by_frame[bad_jpeg.frame_id].error_reason == "undecodable_image"
    assert by_frame[bad_raw.frame_id].error_reason == "raw_shape_mismatch"
    assert by_frame["from-the-future"].error_reason == "unknown_schema_version"  # rejected, but it can be named
    assert by_frame[oversized.frame_id].error_reason == "oversized_frame"
    assert {by_frame[good.frame_id].verdict, by_frame[after.frame_id].verdict} <= {"pass", "fail"}
    assert len(by_frame) == 6
    named = {letter["reason"]: letter["frame_id"] for letter in client.dead_letters(keys)}
    assert named["unknown_schema_version"] == "from-the-future" and named["oversized_frame"] == oversized.frame_id
    details = {letter["reason"]: letter["detail"] for letter in client.dead_letters(keys)}
    assert re.search(r"JPEG data ends inside its APP0 segment .*: truncated", details["undecodable_image"])
    assert named["not_msgpack"] == ""
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0
    assert (
        runtime.metrics.registry.get_sample_value(
            "lineinspect_dead_letters_total", {"line": "line-1", "reason": "oversized_frame"}
        )
        == 1
    )


def test_streamed_scores_equal_offline_scores_of_the_same_files(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime]
) -> None:
    from models.artifact import load_scorer
    from models.images import read_image

    runtime = make_runtime("score", "w1")
    worker = start_worker(runtime, tiny_line.model_dir)
    paths = tiny_line.good_images + tiny_line.defect_images
    frames = [frame_from_file(path) for path in paths]
    publish_frames(runtime.client, worker.keys, frames)
    thread = start_thread(worker.run)
    wait_until(lambda: runtime.client.length(worker.keys.results) >= len(frames), what="all decisions")
    runtime.stop.set()
    thread.join(timeout=30)

    offline = load_scorer(tiny_line.model_dir, device="cpu").score([read_image(path) for path in paths]).scores
    streamed = {d.frame_id: d.score for d in decisions_in(runtime.client, worker.keys.results)}
    streamed_scores = np.array([streamed[frame.frame_id] for frame in frames], dtype=np.float64)
    np.testing.assert_allclose(streamed_scores, offline, rtol=1e-5, atol=1e-5)


def test_frames_in_hand_are_finished_and_acknowledged_on_stop(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime]
) -> None:
    runtime = make_runtime("score", "w1")
    worker = start_worker(runtime, tiny_line.model_dir)
    frames = [frame_from_file(tiny_line.good_images[i % 4]) for i in range(6)]
    entries = worker.prepare(runtime.client.read_new(worker.keys.frames, SCORER_GROUP, "w1", 10, None))
    assert entries == []
    publish_frames(runtime.client, worker.keys, frames)
    in_hand = worker.prepare(runtime.client.read_new(worker.keys.frames, SCORER_GROUP, "w1", 10, None))
    assert runtime.client.group_stats(worker.keys.frames)[SCORER_GROUP].pending == 6
    worker.finish(in_hand)
    assert runtime.client.group_stats(worker.keys.frames)[SCORER_GROUP].pending == 0
    assert {d.frame_id for d in decisions_in(runtime.client, worker.keys.results)} == {f.frame_id for f in frames}


def test_stale_frames_get_an_error_decision_without_scoring(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], worker_config: Config
) -> None:
    config = worker_config.model_copy(
        update={"worker": worker_config.worker.model_copy(update={"stale_after_ms": 1000})}
    )
    runtime = make_runtime("score", "w1", config)
    worker = start_worker(runtime, tiny_line.model_dir)
    old = frame_from_file(tiny_line.good_images[0], captured_at_ns=1_000_000_000)
    fresh = frame_from_file(tiny_line.good_images[0])
    publish_frames(runtime.client, worker.keys, [old, fresh])
    worker.finish(worker.prepare(runtime.client.read_new(worker.keys.frames, SCORER_GROUP, "w1", 10, None)))
    by_frame = {d.frame_id: d for d in decisions_in(runtime.client, worker.keys.results)}
    assert (by_frame[old.frame_id].verdict, by_frame[old.frame_id].error_reason) == ("error", "stale")
    assert by_frame[old.frame_id].score is None
    assert by_frame[fresh.frame_id].verdict in ("pass", "fail")


def test_entries_delivered_too_often_are_dead_lettered(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], worker_config: Config
) -> None:
    runtime = make_runtime("score", "w1")
    worker = start_worker(runtime, tiny_line.model_dir)
    client, keys = runtime.client, worker.keys
    frame = frame_from_file(tiny_line.good_images[0])
    publish_frames(client, keys, [frame])
    client.read_new(keys.frames, SCORER_GROUP, "w1", 10, None)
    for _ in range(worker_config.streams.max_deliveries):
        own = client.read_own_pending(keys.frames, SCORER_GROUP, "w1", 10)
    assert own[0].deliveries == worker_config.streams.max_deliveries + 1
    worker.finish(worker.prepare(own))
    assert [letter["reason"] for letter in client.dead_letters(keys)] == ["max_deliveries_exceeded"]
    assert client.dead_letters(keys)[0]["source_entry_id"] == own[0].entry_id
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0


def test_a_dead_workers_frames_trimmed_before_the_claim_are_dead_lettered_not_lost(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime]
) -> None:
    runtime = make_runtime("score", "alive")
    worker = start_worker(runtime, tiny_line.model_dir)
    client, keys = runtime.client, worker.keys
    frames = [frame_from_file(tiny_line.good_images[i % 4]) for i in range(4)]
    ids = publish_frames(client, keys, frames)
    client.read_new(keys.frames, SCORER_GROUP, "killed", 10, None)  # a worker that took them and died
    client.redis.xtrim(keys.frames, maxlen=1, approximate=False)  # a busy line trimmed past them meanwhile

    def accounted() -> set[str]:
        letters = {row["source_entry_id"] for row in client.dead_letters(keys) if row["reason"] == "entry_trimmed"}
        return letters | {decision.frame_entry_id or "" for decision in decisions_in(client, keys.results)}

    def claim_and_finish() -> bool:  # entries are claimed once idle for streams.claim_idle_ms (500 ms in tests)
        worker._next_claim = 0.0
        worker.finish(worker.prepare(worker._claim_idle()))
        return accounted() == set(ids)

    wait_until(claim_and_finish, timeout_s=10, what="every frame of the dead worker to be decided or dead-lettered")
    assert len(client.dead_letters(keys)) == 3
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0
    labels = {"line": "line-1", "reason": "entry_trimmed"}  # written by the claim's script, counted by the worker
    assert runtime.metrics.registry.get_sample_value("lineinspect_dead_letters_total", labels) == 3


def test_while_the_sink_is_away_scorers_stop_at_maxlen_results_and_no_decision_is_trimmed(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], worker_config: Config
) -> None:
    # The sink down (crash loop, host away) while frames keep coming: the results stream used to be trimmed at
    # streams.maxlen like the others, silently dropping the decisions of frames scored beyond it.
    data = worker_config.model_dump(mode="json")
    data["streams"]["maxlen"] = 10
    config = config_from_mapping(data)
    runtime = make_runtime("score", "w1", config)
    worker = start_worker(runtime, tiny_line.model_dir)
    client, keys = runtime.client, worker.keys
    first = [frame_from_file(tiny_line.good_images[i % 4]) for i in range(10)]  # the frames stream holds ~maxlen
    publish_frames(client, keys, first)
    start_thread(worker.run)
    wait_until(lambda: client.length(keys.results) >= 10, what="the scorer to reach the results limit")
    later = [frame_from_file(tiny_line.good_images[i % 4]) for i in range(10)]
    publish_frames(client, keys, later)
    wait_until(worker.sink_is_behind, what="the scorer to see the sink behind")
    assert client.group_stats(keys.frames)[SCORER_GROUP].lag == len(later), "the scorer kept taking frames"
    sink = SinkWorker(make_runtime("sink", "s1"), "line-1")  # a decisions stream long enough for all of them
    start_thread(sink.run)
    frames = first + later
    wait_until(lambda: client.length(keys.decisions) >= len(frames), timeout_s=30, what="every frame's decision")
    assert sorted(d.frame_id for d in decisions_in(client, keys.decisions)) == sorted(f.frame_id for f in frames)
    assert client.dead_letters(keys) == []


def test_hot_reload_swaps_models_between_batches_without_losing_or_repeating_frames(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime]
) -> None:
    from models.artifact import read_manifest

    model_a = str(read_manifest(tiny_line.model_dir)["model_id"])
    model_b = str(read_manifest(tiny_line.other_model_dir)["model_id"])
    assert model_a != model_b
    runtime = make_runtime("score", "w1")
    worker = start_worker(runtime, tiny_line.model_dir)
    client, keys = runtime.client, worker.keys
    thread = start_thread(worker.run)
    first = [frame_from_file(tiny_line.good_images[i % 4]) for i in range(5)]
    publish_frames(client, keys, first)
    wait_until(lambda: client.length(keys.results) >= 5, what="first decisions")

    client.set_model_dir(keys, "/nonexistent/model")  # a broken announcement keeps the current model
    wait_until(
        lambda: (
            runtime.metrics.registry.get_sample_value(
                "lineinspect_model_reloads_total", {"line": "line-1", "outcome": "failed"}
            )
            == 1
        ),
        what="failed reload",
    )
    client.set_model_dir(keys, str(tiny_line.other_model_dir))
    wait_until(lambda: worker.models.scorer.model_id == model_b, what="model swap")
    second = [frame_from_file(tiny_line.defect_images[i % 4]) for i in range(5)]
    publish_frames(client, keys, second)
    wait_until(lambda: client.length(keys.results) >= 10, what="second decisions")
    runtime.stop.set()
    thread.join(timeout=30)

    decisions = decisions_in(client, keys.results)
    assert sorted(d.frame_id for d in decisions) == sorted(f.frame_id for f in first + second)
    models_used = {d.frame_id: d.model_id for d in decisions}
    assert {models_used[f.frame_id] for f in first} == {model_a}
    assert {models_used[f.frame_id] for f in second} == {model_b}
    assert (
        runtime.metrics.registry.get_sample_value("lineinspect_model_info", {"line": "line-1", "model_id": model_b})
        == 1
    )


def test_a_line_without_any_model_is_a_clear_error(make_runtime: Callable[..., WorkerRuntime]) -> None:
    runtime = make_runtime("score", "w1")
    with pytest.raises(ValueError, match="no model for line line-1"):
        ModelSlot(runtime, LineKeys(runtime.config.streams.prefix, "line-1"), load_model("cpu"), None)


def test_encode_frame_round_trips_file_bytes(tiny_line: TinyLine) -> None:
    frame = frame_from_file(tiny_line.good_images[0])
    assert tiny_line.good_images[0].read_bytes() in encode_frame(frame)


def test_a_flipped_model_symlink_under_the_same_announced_path_is_reloaded(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    from models.artifact import read_manifest

    current = tmp_path / "current"
    current.symlink_to(tiny_line.model_dir)
    runtime = make_runtime("score", "w1")
    slot = ModelSlot(runtime, LineKeys(runtime.config.streams.prefix, "line-1"), load_model("cpu"), current)
    assert slot.scorer.model_id == read_manifest(tiny_line.model_dir)["model_id"]
    current.unlink()
    current.symlink_to(tiny_line.other_model_dir)

    def swapped() -> bool:
        slot.refresh()
        return slot.scorer.model_id == read_manifest(tiny_line.other_model_dir)["model_id"]

    wait_until(swapped, what="the flipped model to load")
    assert slot.model_dir == str(current)


def test_a_promoted_model_survives_redis_losing_the_model_key(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime]
) -> None:
    # Redis restarted without its data: the line's model key is gone. A worker started afterwards (a restart, a
    # KEDA scale-up) with the original --model set the key to it, and every running worker followed: the line
    # silently went back to the model it was first deployed with.
    from models.artifact import read_manifest

    runtime = make_runtime("score", "w1")
    keys = LineKeys(runtime.config.streams.prefix, "line-1")
    slot = ModelSlot(runtime, keys, load_model("cpu"), tiny_line.model_dir)
    runtime.client.set_model_dir(keys, str(tiny_line.other_model_dir))  # lineinspect promote
    promoted = read_manifest(tiny_line.other_model_dir)["model_id"]

    def swapped() -> bool:
        slot.refresh()
        return slot.scorer.model_id == promoted

    wait_until(swapped, what="the promoted model")
    runtime.client.redis.delete(keys.model)  # Redis came back empty

    def reannounced() -> bool:
        slot.refresh()
        return runtime.client.get_model_dir(keys) is not None

    wait_until(reannounced, what="the key announced again")
    assert runtime.client.get_model_dir(keys) == str(tiny_line.other_model_dir)
    later = ModelSlot(make_runtime("score", "w2"), keys, load_model("cpu"), tiny_line.model_dir)
    assert later.scorer.model_id == promoted


def scored(scores: np.ndarray, shifted: np.ndarray | None = None) -> SimpleNamespace:
    """What a stand-in model returns for these image scores: blank 8 x 8 maps, zero timings, shift flags (and no
    registration)."""
    return SimpleNamespace(
        scores=scores.astype(np.float32),
        maps=np.zeros((len(scores), 8, 8), np.float32),
        timings=SimpleNamespace(backbone_s=0.0, search_s=0.0, postprocess_s=0.0),
        shifted=np.zeros(len(scores), bool) if shifted is None else shifted,
        unregistered=None,
    )


def score_directly(worker: ScoreWorker, paths: Sequence[Path]) -> tuple[list[Frame], BatchOutcome]:
    """The worker's outcome for frames of these images, handed to it as stream entries (no stream read)."""
    frames = [frame_from_file(path) for path in paths]
    entries = [StreamEntry(f"{i + 1}-0", encode_frame(frame)) for i, frame in enumerate(frames)]
    return frames, worker.score(worker.prepare(entries))


class MiscountingScorer:
    """Stand-in for a broken model: returns one score whatever the batch size."""

    model_id = "broken"
    threshold = SimpleNamespace(value=1.0)

    def aspect_mismatch(self, height: int, width: int) -> str | None:
        return None

    def score(self, images: Sequence[np.ndarray]) -> SimpleNamespace:
        return scored(np.zeros(1))


def test_a_model_returning_the_wrong_number_of_outputs_errors_every_frame_of_the_batch(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime]
) -> None:
    runtime = make_runtime("score", "w1")
    worker = ScoreWorker(runtime, "line-1", SimpleNamespace(scorer=MiscountingScorer()))  # type: ignore[arg-type]
    frames, outcome = score_directly(worker, tiny_line.good_images[:3])
    assert [(d.frame_id, d.verdict, d.error_reason) for d in outcome.decisions] == [
        (frame.frame_id, "error", "scoring_failed") for frame in frames
    ]
    assert "3 inputs" in (outcome.decisions[0].error_detail or "")
    assert outcome.dead_letters == []


def test_each_line_follows_its_own_model_key(tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime]) -> None:
    runtime = make_runtime("score", "w1")
    prefix = runtime.config.streams.prefix
    slot_1 = ModelSlot(runtime, LineKeys(prefix, "line-1"), load_model("cpu"), tiny_line.model_dir)
    slot_2 = ModelSlot(runtime, LineKeys(prefix, "line-2"), load_model("cpu"), tiny_line.other_model_dir)
    assert slot_1.scorer.model_id != slot_2.scorer.model_id
    assert runtime.client.get_model_dir(LineKeys(prefix, "line-2")) == str(tiny_line.other_model_dir)


class UncalibratedScorer:
    """Stand-in for a model fitted without held-out images: scores but no threshold."""

    model_id = "uncalibrated"
    threshold = None

    def aspect_mismatch(self, height: int, width: int) -> str | None:
        return None

    def score(self, images: Sequence[np.ndarray]) -> SimpleNamespace:
        return scored(np.full(len(images), 2.5))


def test_an_uncalibrated_model_gives_error_decisions_that_keep_the_score(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime]
) -> None:
    runtime = make_runtime("score", "w1")
    worker = ScoreWorker(runtime, "line-1", SimpleNamespace(scorer=UncalibratedScorer()))  # type: ignore[arg-type]
    _, outcome = score_directly(worker, tiny_line.good_images[:1])
    [decision] = outcome.decisions
    assert (decision.verdict, decision.error_reason, decision.score) == ("error", "uncalibrated", 2.5)
    assert "lineinspect calibrate" in (decision.error_detail or "")


class HalfShiftingScorer:
    """Stand-in for a model with shifting on: every other frame failed unshifted and was scored again shifted."""

    model_id = "shifting"
    threshold = SimpleNamespace(value=1.0)

    def aspect_mismatch(self, height: int, width: int) -> str | None:
        return None

    def score(self, images: Sequence[np.ndarray]) -> SimpleNamespace:
        shifted = np.arange(len(images)) % 2 == 0
        return scored(np.where(shifted, 2.0, 0.5), shifted)


def test_frames_scored_again_with_shifts_are_counted(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime]
) -> None:
    runtime = make_runtime("score", "w1")
    worker = ScoreWorker(runtime, "line-1", SimpleNamespace(scorer=HalfShiftingScorer()))  # type: ignore[arg-type]
    _, outcome = score_directly(worker, tiny_line.good_images[:3])
    assert [d.verdict for d in outcome.decisions] == ["fail", "pass", "fail"]
    counted = runtime.metrics.registry.get_sample_value("lineinspect_shifted_frames_total", {"line": "line-1"})
    assert counted == 2.0


def test_frames_a_registering_model_cannot_register_are_counted(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    import cv2

    from models.artifact import load_scorer
    from models.fit import fit_scorer
    from models.images import list_images

    train = list_images(tiny_line.model_dir.parent / "demo" / "train" / "good")
    config = config_from_mapping({"model": {"image_size": 64, "device": "cpu", "registration": "on"}})
    fit_scorer(train, config, progress=False).save(tmp_path / "registered")
    scorer = load_scorer(tmp_path / "registered", device="cpu")
    assert scorer.registration is not None
    noise = tmp_path / "noise.png"  # nothing like the part: its pose cannot be trusted, so it is scored as it came
    cv2.imwrite(str(noise), np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    runtime = make_runtime("score", "w1")
    worker = ScoreWorker(runtime, "line-1", SimpleNamespace(scorer=scorer))  # type: ignore[arg-type]
    _, outcome = score_directly(worker, [tiny_line.good_images[0], noise, tiny_line.good_images[1]])
    assert len(outcome.decisions) == 3 and all(d.score is not None for d in outcome.decisions)
    sample = runtime.metrics.registry.get_sample_value("lineinspect_unregistered_frames_total", {"line": "line-1"})
    assert sample == 1.0


def png_with_header(width: int, height: int, bit_depth: int = 8, idat_bytes: int = 1000) -> bytes:
    """A PNG whose IHDR announces ``width`` x ``height`` RGB pixels, with ``idat_bytes`` of zero scanlines behind it
    (far fewer than announced: what matters is what a decoder allocates from the header)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    idat = zlib.compress(bytes(idat_bytes))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_poison_frames_are_dead_lettered_and_the_rest_of_their_batch_is_scored(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime]
) -> None:
    """Frames whose decoding raised something other than CodecError (cv2.error, numpy reshape errors) used to kill
    the worker, and with it every frame of their batch on each redelivery."""
    import cv2

    runtime = make_runtime("score", "w1")
    worker = start_worker(runtime, tiny_line.model_dir)
    client, keys = runtime.client, worker.keys
    image = tiny_line.good_images[0]
    huge_png = frame_from_file(image, encoding="png", data=png_with_header(100_000, 100_000))
    wrapped_raw = frame_from_file(image, encoding="raw", data=b"", raw_shape=(2**32, 2**32, 3), raw_dtype="uint8")
    ok, tiff = cv2.imencode(".tiff", np.full((64, 64, 3), 0.5, np.float64))
    assert ok
    float_tiff = frame_from_file(image, encoding="png", data=tiff.tobytes())
    good = [frame_from_file(tiny_line.good_images[i]) for i in range(3)]
    publish_frames(client, keys, [good[0], huge_png, good[1], wrapped_raw, float_tiff, good[2]])  # max_batch is 4
    thread = start_thread(worker.run)
    wait_until(lambda: client.length(keys.results) >= 6 or not thread.is_alive(), timeout_s=30, what="decisions")
    assert thread.is_alive(), "the worker died on a poison frame"
    runtime.stop.set()
    thread.join(timeout=30)

    by_frame = {decision.frame_id: decision for decision in decisions_in(client, keys.results)}
    assert [by_frame[frame.frame_id].verdict in ("pass", "fail") for frame in good] == [True] * 3
    letters = {letter["frame_id"]: letter for letter in client.dead_letters(keys)}
    expected = {
        huge_png.frame_id: "image_too_large",
        wrapped_raw.frame_id: "image_too_large",
        float_tiff.frame_id: "undecodable_image",
    }
    assert {frame_id: letter["reason"] for frame_id, letter in letters.items()} == expected
    assert {frame_id: by_frame[frame_id].error_reason for frame_id in expected} == expected
    assert "neither PNG nor JPEG" in letters[float_tiff.frame_id]["detail"]
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0


def test_the_pixel_limit_is_read_from_the_config(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], worker_config: Config
) -> None:
    config = worker_config.model_copy(
        update={"streams": worker_config.streams.model_copy(update={"max_frame_pixels": 96 * 96 - 1})}
    )
    runtime = make_runtime("score", "w1", config)
    worker = start_worker(runtime, tiny_line.model_dir)
    frame = frame_from_file(tiny_line.good_images[0])  # 96 x 96
    publish_frames(runtime.client, worker.keys, [frame])
    worker.finish(worker.prepare(runtime.client.read_new(worker.keys.frames, SCORER_GROUP, "w1", 10, None)))
    [letter] = runtime.client.dead_letters(worker.keys)
    assert (letter["reason"], letter["frame_id"]) == ("image_too_large", frame.frame_id)
    assert "streams.max_frame_pixels" in letter["detail"]


def test_a_frame_of_another_line_is_dead_lettered_not_scored(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime]
) -> None:
    runtime = make_runtime("score", "w1")
    worker = start_worker(runtime, tiny_line.model_dir)
    stray = frame_from_file(tiny_line.good_images[0], line_id="line-2")
    own = frame_from_file(tiny_line.good_images[1])
    publish_frames(runtime.client, worker.keys, [stray, own])
    worker.finish(worker.prepare(runtime.client.read_new(worker.keys.frames, SCORER_GROUP, "w1", 10, None)))
    assert [d.frame_id for d in decisions_in(runtime.client, worker.keys.results)] == [own.frame_id]
    [letter] = runtime.client.dead_letters(worker.keys)
    assert (letter["reason"], letter["frame_id"]) == ("wrong_line", stray.frame_id)
    assert "line-2" in letter["detail"] and "line-1" in letter["detail"]
    assert runtime.client.group_stats(worker.keys.frames)[SCORER_GROUP].pending == 0


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"version": 2, "frame_id": "v2"}, "unknown_schema_version"),
        ({"version": 1.0, "frame_id": "v1-float"}, "unknown_schema_version"),
        ({"version": 1, "frame_id": "seq-text", "sequence": "5"}, "invalid_fields"),
    ],
)
def test_rejected_payloads_that_name_their_frame_get_an_error_decision(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], fields: dict[str, object], reason: str
) -> None:
    runtime = make_runtime("score", "w1")
    worker = start_worker(runtime, tiny_line.model_dir)
    payload = encode_frame(frame_from_file(tiny_line.good_images[0], frame_id=str(fields["frame_id"])))
    entry_id = runtime.client.publish(worker.keys.frames, msgpack.packb(msgpack.unpackb(payload) | fields))
    worker.finish(worker.prepare(runtime.client.read_new(worker.keys.frames, SCORER_GROUP, "w1", 10, None)))
    [letter] = runtime.client.dead_letters(worker.keys)
    assert (letter["reason"], letter["frame_id"]) == (reason, fields["frame_id"])
    [decision] = decisions_in(runtime.client, worker.keys.results)
    assert (decision.frame_id, decision.line_id, decision.verdict, decision.error_reason) == (
        fields["frame_id"],
        "line-1",
        "error",
        reason,
    )
    assert decision.camera_id == "cam0" and decision.score is None
    # the sink tells a redelivery of this entry (another worker's decision for it: suppressed) from a new frame
    assert decision.frame_entry_id == entry_id


def broken_model_dir(tmp_path: Path) -> Path:
    """A model directory whose manifest is not JSON: it does not load."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{ not json")
    return broken


def test_a_broken_announced_model_falls_back_to_the_model_option(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from models.artifact import read_manifest

    broken = broken_model_dir(tmp_path)
    runtime = make_runtime("score", "w1")
    keys = LineKeys(runtime.config.streams.prefix, "line-1")
    runtime.client.set_model_dir(keys, str(broken))
    with caplog.at_level("ERROR", logger="workers.score"):
        slot = ModelSlot(runtime, keys, load_model("cpu"), tiny_line.model_dir)
    assert slot.scorer.model_id == read_manifest(tiny_line.model_dir)["model_id"]
    assert slot.model_dir == str(tiny_line.model_dir)
    assert runtime.client.get_model_dir(keys) == str(broken)  # left for whoever promoted it to fix
    [record] = [r for r in caplog.records if "does not load" in r.getMessage()]
    assert record.__dict__["announced_model_dir"] == str(broken)
    assert record.__dict__["model_dir"] == str(tiny_line.model_dir) and record.__dict__["error"]
    slot.refresh()  # the broken directory is not loaded again until the key (or its manifest) changes
    assert slot._loading is None
    runtime.client.set_model_dir(keys, str(tiny_line.other_model_dir))
    slot._next_poll = 0.0

    def swapped() -> bool:
        slot.refresh()
        return slot.scorer.model_id == read_manifest(tiny_line.other_model_dir)["model_id"]

    wait_until(swapped, what="a newly promoted model to load")


def test_a_model_option_that_does_not_load_is_not_announced(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    # With the line's model key unset, score-worker wrote its --model there before loading it: a --model that did not
    # load was then what every later worker was told to use (each logged "model key names a model that does not
    # load" and fell back to its own --model), and promote-less lines kept it for good.
    from models.artifact import read_manifest

    broken = broken_model_dir(tmp_path)
    runtime = make_runtime("score", "w1")
    keys = LineKeys(runtime.config.streams.prefix, "line-1")
    with pytest.raises(ValueError, match=f"model {broken} .*does not load") as caught:
        ModelSlot(runtime, keys, load_model("cpu"), broken)
    assert runtime.client.get_model_dir(keys) is None
    assert "(--model or worker.model_dir)" in str(caught.value)  # not "named by the model key": it never was
    slot = ModelSlot(make_runtime("score", "w2"), keys, load_model("cpu"), tiny_line.model_dir)
    assert runtime.client.get_model_dir(keys) == slot.model_dir == str(tiny_line.model_dir)  # announced once loaded
    assert slot.scorer.model_id == read_manifest(tiny_line.model_dir)["model_id"]


def test_a_relative_model_option_is_announced_as_an_absolute_path(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the key held "models/demo" as given: a scorer started in another directory would load another (or no) model
    monkeypatch.chdir(tiny_line.model_dir.parent)
    runtime = make_runtime("score", "w1")
    keys = LineKeys(runtime.config.streams.prefix, "line-1")
    ModelSlot(runtime, keys, load_model("cpu"), Path(tiny_line.model_dir.name))
    assert runtime.client.get_model_dir(keys) == str(tiny_line.model_dir.absolute())


def test_scorers_starting_together_with_different_models_both_score_with_the_one_announced_first(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime]
) -> None:
    # Since --model is announced only once loaded (f3db34d), a second scorer started on a line with no model key
    # found the key taken by a peer that finished loading first and scored with its own --model until a background
    # reload swapped the peer's in: one line's frames got verdicts from two models (before f3db34d it read back the
    # key it had lost and loaded the winner's model). Here the peer starts and announces while w2 loads.
    from models.artifact import read_manifest

    keys = LineKeys(make_runtime("score", "w0").config.streams.prefix, "line-1")
    peers: list[ModelSlot] = []

    def load_while_a_peer_starts(model_dir: Path) -> ScorerLike:
        if not peers:
            peers.append(ModelSlot(make_runtime("score", "w1"), keys, load_model("cpu"), tiny_line.model_dir))
        return load_model("cpu")(model_dir)

    runtime = make_runtime("score", "w2")
    slot = ModelSlot(runtime, keys, load_while_a_peer_starts, tiny_line.other_model_dir)
    assert runtime.client.get_model_dir(keys) == peers[0].model_dir == str(tiny_line.model_dir)
    assert slot.model_dir == str(tiny_line.model_dir)
    assert slot.scorer.model_id == peers[0].scorer.model_id == read_manifest(tiny_line.model_dir)["model_id"]


def test_a_worker_falling_back_to_its_model_option_shows_that_it_loads_that_one(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    # The "starting" beats named the announced directory for the whole start, also while the worker, that one having
    # failed, loaded its --model: `lineinspect check` and /livez said it was loading a model it had given up on.
    broken = broken_model_dir(tmp_path)
    runtime = make_runtime("score", "w1")
    keys = LineKeys(runtime.config.streams.prefix, "line-1")
    runtime.client.set_model_dir(keys, str(broken))
    shown: dict[str, tuple[object, object]] = {}

    def load(model_dir: Path) -> ScorerLike:
        (written,) = runtime.client.read_health(runtime.config.streams.prefix)
        shown[model_dir.name] = (written["loading"], runtime.heartbeat.alive()[1]["loading"])
        return load_model("cpu")(model_dir)

    ModelSlot(runtime, keys, load, tiny_line.model_dir)
    assert shown == {"broken": (str(broken), str(broken)),
                     tiny_line.model_dir.name: (str(tiny_line.model_dir), str(tiny_line.model_dir))}  # fmt: skip


@pytest.mark.parametrize("with_model_option", [False, True])
def test_a_broken_announced_model_without_a_usable_model_option_is_a_one_line_error(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path, with_model_option: bool
) -> None:
    runtime = make_runtime("score", "w1")
    keys = LineKeys(runtime.config.streams.prefix, "line-1")
    missing = tmp_path / "deleted-model"
    runtime.client.set_model_dir(keys, str(missing))
    model_option = tmp_path / "also-missing" if with_model_option else None
    with pytest.raises(ValueError, match=f"model {missing} .*does not load") as caught:
        ModelSlot(runtime, keys, load_model("cpu"), model_option)
    assert "\n" not in str(caught.value)
    if with_model_option:
        assert f"--model {model_option}" in str(caught.value)


def masked(scorer: Any, mask: Any) -> Any:
    """The fitted ``models.scorer.Scorer`` and its fused members with an inspection ``mask`` given after fitting."""
    from models.scorer import Scorer

    companions = [masked(companion, mask) for companion in scorer.companions]
    return Scorer(scorer.method, scorer.model_settings, scorer.scoring, scorer.training, scorer.threshold,
                  scorer.model_id, scorer.position_stats, companions, scorer.registration, mask)  # fmt: skip


def test_frames_of_another_aspect_than_the_inspection_mask_get_wrong_aspect_errors_and_the_rest_are_scored(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    # a camera set to another region of interest: the worker stretched the mask over its frames and scored them, the
    # mask's ignored region over part of the surface and its inspected one over the lot code
    import cv2

    from models.artifact import load_scorer
    from models.images import read_image
    from models.inspection_mask import InspectionMask

    inspected = np.ones((32, 48), bool)  # drawn over the camera's 96 x 64 frames at half scale
    inspected[:, 36:] = False  # a label's place
    masked(load_scorer(tiny_line.model_dir, device="cpu"), InspectionMask(inspected)).save(tmp_path / "masked")
    crops = []
    for index, path in enumerate([*tiny_line.good_images[:2], tiny_line.defect_images[0]]):
        crops.append(tmp_path / f"crop-{index}.png")
        cv2.imwrite(str(crops[-1]), read_image(path)[16:80, :, ::-1])  # 96 x 64
    runtime = make_runtime("score", "w1")
    worker = start_worker(runtime, tmp_path / "masked")  # loaded and warmed up on a frame of the mask's aspect
    model_id = worker.models.scorer.model_id
    frames, outcome = score_directly(worker, [crops[0], tiny_line.good_images[0], crops[1], crops[2]])

    assert outcome.dead_letters == []  # the frame is whole: nothing to replay, another model may score it
    by_frame = {decision.frame_id: decision for decision in outcome.decisions}
    assert len(by_frame) == 4 and {decision.model_id for decision in outcome.decisions} == {model_id}
    refused = by_frame[frames[1].frame_id]
    assert (refused.verdict, refused.error_reason, refused.score) == ("error", "wrong_aspect", None)
    assert f"frame {frames[1].frame_id} is 96x96 but the inspection mask is 48x32" in (refused.error_detail or "")
    scored = [by_frame[frame.frame_id] for frame in (frames[0], frames[2], frames[3])]
    assert all(decision.verdict in ("pass", "fail") for decision in scored)
    offline = load_scorer(tmp_path / "masked", device="cpu").score([read_image(path) for path in crops]).scores
    streamed = [np.nan if decision.score is None else decision.score for decision in scored]
    np.testing.assert_allclose(streamed, offline, rtol=1e-5, atol=1e-5)
    _, alone = score_directly(worker, tiny_line.good_images[1:2])  # a batch of refused frames only
    assert [decision.error_reason for decision in alone.decisions] == ["wrong_aspect"]
