"""Ingest: buffers and rate limit as pure units; folder/live sources publishing into a real Redis with backpressure."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.codec import decode_frame, encode_pixels
from pipeline.config import Config
from pipeline.streams import SCORER_GROUP
from tests.workers.helpers import start_thread, wait_until
from workers.ingest import FrameBuffer, Ingestor, RateLimiter
from workers.lifecycle import WorkerRuntime
from workers.sources import Capture, FolderSource, VideoSource, parse_source


def capture(index: int) -> Capture:
    return Capture(b"x", "png", index, metadata={"index": index})


def test_live_buffer_drops_its_oldest_frames_and_counts_them() -> None:
    buffer = FrameBuffer(capacity=3, drop_oldest=True)
    stop = threading.Event()
    for index in range(5):
        assert buffer.put(capture(index), stop)
    assert buffer.dropped == 2
    assert [buffer.take().metadata["index"] for _ in range(3)] == [2, 3, 4]  # type: ignore[union-attr]
    assert buffer.take() is None


def test_file_buffer_blocks_instead_of_dropping_until_stopped() -> None:
    buffer = FrameBuffer(capacity=2, drop_oldest=False)
    stop = threading.Event()
    assert buffer.put(capture(0), stop) and buffer.put(capture(1), stop)
    stop.set()
    assert not buffer.put(capture(2), stop)
    assert buffer.dropped == 0
    assert [buffer.take().metadata["index"] for _ in range(2)] == [0, 1]  # type: ignore[union-attr]


def test_buffer_wakes_the_publisher_on_put_and_on_close() -> None:
    ready = threading.Event()
    buffer = FrameBuffer(capacity=2, drop_oldest=True, on_put=ready)
    assert buffer.put(capture(0), threading.Event()) and ready.is_set()
    ready.clear()
    buffer.close()
    assert ready.is_set()


def test_rate_limiter_spaces_events() -> None:
    now = [0.0]
    limiter = RateLimiter(max_fps=10, clock=lambda: now[0])
    assert limiter.delay() == 0.0
    assert limiter.delay() == pytest.approx(0.1)
    now[0] = 0.1
    assert limiter.delay() == 0.0
    now[0] = 5.0  # fell far behind: next event is one interval later, no burst
    assert limiter.delay() == 0.0
    assert limiter.delay() == pytest.approx(0.1)
    assert RateLimiter(None).delay() == 0.0


def test_parse_source_specs(tmp_path: Path) -> None:
    image = np.full((16, 16, 3), 100, np.uint8)
    (tmp_path / "a.png").write_bytes(encode_pixels(image, "png")[0])
    source = parse_source(f"left=loop-folder:{tmp_path}", "cam0", "jpeg", 90, 1.0)
    assert isinstance(source, FolderSource) and source.camera_id == "left" and source.loop
    assert parse_source(f"folder:{tmp_path}", "cam3", "jpeg", 90, 1.0).camera_id == "cam3"
    camera = parse_source("camera:rtsp://host/stream", "cam0", "jpeg", 90, 1.0)
    assert isinstance(camera, VideoSource) and camera.live
    with pytest.raises(ValueError, match="unknown source kind"):
        parse_source("webcam:0", "cam0", "jpeg", 90, 1.0)
    with pytest.raises(ValueError, match="KIND:TARGET"):
        parse_source("folder", "cam0", "jpeg", 90, 1.0)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for index in range(3):
        image = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        (tmp_path / f"img_{index}.png").write_bytes(encode_pixels(image, "png")[0])
    return tmp_path


def test_folder_frames_carry_the_original_file_bytes(
    image_dir: Path, make_runtime: Callable[..., WorkerRuntime]
) -> None:
    runtime = make_runtime("ingest", "i1")
    ingestor = Ingestor(runtime, "line-1", [FolderSource("cam0", image_dir, loop=False)], None, {"recipe": "r7"})
    assert ingestor.run() == 3
    entries = runtime.client.read_range(ingestor.keys.frames, "0-0", 10)
    frames = [decode_frame(entry.payload) for entry in entries if entry.payload]
    assert [frame.metadata["source_file"] for frame in frames] == ["img_0.png", "img_1.png", "img_2.png"]
    assert frames[1].data == (image_dir / "img_1.png").read_bytes()
    assert [frame.sequence for frame in frames] == [0, 1, 2]
    assert {frame.metadata["recipe"] for frame in frames} == {"r7"}
    assert len({frame.frame_id for frame in frames}) == 3
    ingested = runtime.metrics.registry.get_sample_value(
        "lineinspect_ingested_frames_total", {"line": "line-1", "camera": "cam0"}
    )
    assert ingested == 3


def test_frames_over_the_byte_limit_are_not_sent_and_counted_as_too_large(
    tmp_path: Path, worker_config: Config, make_runtime: Callable[..., WorkerRuntime]
) -> None:
    rng = np.random.default_rng(1)
    small, large = np.zeros((8, 8, 3), np.uint8), rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    for name, image in (("a_small.png", small), ("b_large.png", large), ("c_small.png", small)):
        (tmp_path / name).write_bytes(encode_pixels(image, "png")[0])
    limit = 64 * 1024  # the noise image's PNG is ~197 KB, the small ones well under 1 KB
    config = worker_config.model_copy(
        update={"streams": worker_config.streams.model_copy(update={"max_frame_bytes": limit})}
    )
    runtime = make_runtime("ingest", "i1", config)
    ingestor = Ingestor(runtime, "line-1", [FolderSource("cam0", tmp_path, loop=False)], None)
    assert ingestor.run() == 2
    sent = [decode_frame(entry.payload or b"").metadata["source_file"]
            for entry in runtime.client.read_range(ingestor.keys.frames, "0-0", 10)]  # fmt: skip
    assert sent == ["a_small.png", "c_small.png"]
    count = runtime.metrics.registry.get_sample_value
    labels = {"line": "line-1", "camera": "cam0"}
    assert count("lineinspect_dropped_frames_total", {**labels, "reason": "too_large"}) == 1
    assert count("lineinspect_dropped_frames_total", {**labels, "reason": "backpressure"}) is None


def test_file_sources_wait_for_scorers_instead_of_dropping(
    image_dir: Path, make_runtime: Callable[..., WorkerRuntime], worker_config: Config
) -> None:
    config = worker_config.model_copy(
        update={"ingest": worker_config.ingest.model_copy(update={"live_queue_limit": 4})}
    )
    runtime = make_runtime("ingest", "i1", config)
    ingestor = Ingestor(runtime, "line-1", [FolderSource("cam0", image_dir, loop=True)], max_frames=10)
    thread = start_thread(ingestor.run)
    client, frames_stream = runtime.client, ingestor.keys.frames
    wait_until(lambda: client.length(frames_stream) == 4, what="backlog to reach the limit")
    time.sleep(0.3)
    assert client.length(frames_stream) == 4  # nothing more published while nobody reads
    read = client.read_new(frames_stream, SCORER_GROUP, "reader", 100, None)
    wait_until(lambda: client.length(frames_stream) == 8, what="ingest to resume")
    read += client.read_new(frames_stream, SCORER_GROUP, "reader", 100, None)
    wait_until(lambda: not thread.is_alive(), what="ingest to finish")
    read += client.read_new(frames_stream, SCORER_GROUP, "reader", 100, None)
    assert len(read) == 10
    assert ingestor.feeds[0].buffer.dropped == 0


class FastLiveSource:
    """A live camera stand-in that produces frames much faster than anyone reads them."""

    camera_id = "live0"
    live = True

    def captures(self) -> Iterator[Capture]:
        for index in range(200):
            yield Capture(
                encode_pixels(np.full((16, 16, 3), index % 255, np.uint8), "png")[0],
                "png",
                time.time_ns(),
                metadata={"index": index},
            )


def test_live_sources_drop_oldest_under_backpressure_and_export_the_count(
    make_runtime: Callable[..., WorkerRuntime], worker_config: Config
) -> None:
    config = worker_config.model_copy(
        update={"ingest": worker_config.ingest.model_copy(update={"live_queue_limit": 4})}
    )
    runtime = make_runtime("ingest", "i1", config)
    ingestor = Ingestor(runtime, "line-1", [FastLiveSource()], max_frames=None)
    thread = start_thread(ingestor.run)
    wait_until(lambda: ingestor.feeds[0].buffer.finished, what="the camera to finish")
    runtime.client.read_new(ingestor.keys.frames, SCORER_GROUP, "reader", 100, None)
    wait_until(lambda: not thread.is_alive(), what="ingest to finish")
    published = runtime.client.read_range(ingestor.keys.frames, "0-0", 1000)
    dropped = runtime.metrics.registry.get_sample_value(
        "lineinspect_dropped_frames_total", {"line": "line-1", "camera": "live0", "reason": "backpressure"}
    )
    assert dropped is not None and dropped > 0
    assert len(published) + dropped == 200
    ingested = runtime.metrics.registry.get_sample_value(
        "lineinspect_ingested_frames_total", {"line": "line-1", "camera": "live0"}
    )
    assert ingested == len(published)
    last = decode_frame(published[-1].payload or b"")
    assert last.metadata["index"] == 199  # the newest frame survives, the oldest were dropped


def test_video_file_frames_are_published_as_jpeg(tmp_path: Path, make_runtime: Callable[..., WorkerRuntime]) -> None:
    import cv2

    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (32, 24))
    assert writer.isOpened()
    for index in range(5):
        writer.write(np.full((24, 32, 3), 40 * index, np.uint8))
    writer.release()
    runtime = make_runtime("ingest", "i1")
    source = parse_source(f"video:{path}", "cam0", "jpeg", 80, 1.0)
    ingestor = Ingestor(runtime, "line-1", [source], max_frames=None)
    assert ingestor.run() == 5
    frames = [decode_frame(e.payload or b"") for e in runtime.client.read_range(ingestor.keys.frames, "0-0", 10)]
    assert {frame.encoding for frame in frames} == {"jpeg"}
    assert [frame.metadata["source_index"] for frame in frames] == [0, 1, 2, 3, 4]


class CountingSource:
    """A file-like (not live) source that records when each capture is taken."""

    camera_id = "files0"
    live = False

    def captures(self) -> Iterator[Capture]:
        for index in range(4):
            yield Capture(b"x", "png", time.time_ns(), metadata={"index": index})


def test_a_paced_file_source_reads_each_frame_at_its_slot(
    make_runtime: Callable[..., WorkerRuntime], worker_config: Config
) -> None:
    """captured_at is taken after the rate limit's wait, not one interval early (it is where latency starts)."""
    config = worker_config.model_copy(update={"ingest": worker_config.ingest.model_copy(update={"max_fps": 20})})
    runtime = make_runtime("ingest", "i-paced", config)
    ingestor = Ingestor(runtime, "line-1", [CountingSource()], max_frames=4)
    assert ingestor.run() == 4
    entries = runtime.client.read_range(ingestor.keys.frames, "0-0", 10)
    frames = [decode_frame(entry.payload or b"") for entry in entries]
    assert [frame.metadata["index"] for frame in frames] == [0, 1, 2, 3]
    gaps_s = np.diff([frame.captured_at_ns for frame in frames]) / 1e9
    assert (gaps_s >= 0.05 - 0.002).all()  # the limiter's spacing: a lower bound by construction, not a speed check


def test_a_folder_sends_16_bit_grey_tiffs_as_one_channel_16_bit_pngs(tmp_path: Path) -> None:
    """Mono12 frames saved as TIFF keep their grey levels, and their bytes stay a third of 16-bit RGB's."""
    import cv2

    from models.images import read_image
    from pipeline.codec import decode_pixels
    from pipeline.messages import Frame

    grey = (np.arange(64 * 80, dtype=np.uint32).reshape(64, 80) % 4096).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "mono12.tif"), grey)
    capture = next(iter(FolderSource("cam0", tmp_path, loop=False).captures()))
    assert capture.encoding == "png"
    sent = cv2.imdecode(np.frombuffer(capture.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert sent is not None and sent.shape == (64, 80) and sent.dtype == np.uint16
    frame = Frame(frame_id="f", line_id="line-1", camera_id="cam0", sequence=0, captured_at_ns=1, encoding="png",
                  data=capture.data)  # fmt: skip
    decoded = decode_pixels(frame)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, read_image(tmp_path / "mono12.tif", keep_depth=True))
    assert int(decoded.max()) == 4095
