"""Scoring worker in-process against a real Redis and a real (tiny) model: faults, parity, drain, hot reload."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

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
from workers.score import BatchOutcome, ModelSlot, ScoreWorker, load_model


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
    wait_until(lambda: client.length(keys.results) >= 4, what="decisions for the good and undecodable frames")
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
    assert {by_frame[good.frame_id].verdict, by_frame[after.frame_id].verdict} <= {"pass", "fail"}
    assert len(by_frame) == 4
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
