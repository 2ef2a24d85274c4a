"""Frame sources for ingest: image folder (optionally looping), video file, live camera, replay of a recording.

A source spec on the command line is ``[CAMERA_ID=]KIND:TARGET``:

- ``folder:DIR`` (``loop-folder:DIR`` repeats forever): PNG/JPEG files are sent as their original bytes, so a frame
  scores exactly like ``lineinspect score`` on the file (one that does not decode is dead-lettered by the scoring
  worker, with the reason); other formats are sent as PNG, and one that cannot be read is logged and passed over.
  A test folder of an MVTec-layout dataset (``ROOT/test/<type>/`` beside ``ROOT/train/good/``, as ``lineinspect
  run``'s demo line and ``lineinspect evaluate`` use) knows its frames' truth: each is sent with
  ``metadata["label"]`` = ``<type>`` (``good``, or the defect type), which a replay reports accuracy by.
- ``video:FILE``: frames of a video file, JPEG-encoded (``ingest.jpeg_quality``).
- ``camera:0`` / ``camera:rtsp://...`` / ``camera:<GStreamer pipeline ending in appsink>``: a live camera through
  OpenCV ``VideoCapture``. Live sources drop their oldest frames when scoring falls behind; the others wait.
- ``replay:FILE``: a recording made by ``lineinspect record`` (see ``workers.record``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2

from pipeline.codec import encode_pixels
from pipeline.messages import Encoding, MetadataValue, brief_repr, id_problem

ENCODED_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
LABEL_KEY = "label"  # frame metadata naming the part's truth: "good" or a defect type (replay reports by it)
GOOD_LABEL = "good"  # the label of a good part; any other label names a defect
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capture:
    """One captured image, encoded, before it becomes a Frame."""

    data: bytes
    encoding: Encoding
    captured_at_ns: int
    raw_shape: tuple[int, ...] | None = None
    raw_dtype: str | None = None
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    camera_id: str | None = None  # replay keeps each recorded frame's camera; other sources use their own


class Source(Protocol):
    camera_id: str
    live: bool

    def captures(self) -> Iterator[Capture]: ...


class FolderSource:
    """Image files of a directory in name order, once or looping."""

    live = False

    def __init__(self, camera_id: str, directory: Path, loop: bool) -> None:
        from models.images import list_images

        self.camera_id, self.directory, self.loop = camera_id, directory, loop
        self.paths = list_images(directory)
        self.label = dataset_test_label(directory)
        if not self.paths:
            msg = f"folder source {directory} holds no images (png, jpg, bmp, tif, webp)"
            raise ValueError(msg)

    def _capture(self, path: Path) -> Capture | None:
        """The file as a capture, or None (logged with the reason) when it cannot be read or re-encoded."""
        from models.images import ImageError, read_image

        encoding = ENCODED_SUFFIXES.get(path.suffix.lower())
        metadata: dict[str, MetadataValue] = {"source_file": path.name}
        if self.label is not None:
            metadata[LABEL_KEY] = self.label
        try:
            if encoding is not None:
                return Capture(path.read_bytes(), encoding, time.time_ns(), metadata=metadata)  # type: ignore[arg-type]
            image = read_image(path, keep_depth=True)
        except (ImageError, OSError) as error:  # a file removed or unreadable since the folder was listed
            reason = str(error) if isinstance(error, ImageError) else f"{path}: cannot read file ({error})"
            logger.error("image file not sent", extra={"camera": self.camera_id, "file": str(path), "reason": reason})
            return None
        if (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all():
            image = image[..., 0]  # a grey frame goes as one channel (16-bit RGB of 12 MP would pass 16 MB)
        data, _ = encode_pixels(image, "png")
        return Capture(data, "png", time.time_ns(), metadata=metadata)

    def captures(self) -> Iterator[Capture]:
        while True:
            sent = 0
            for path in self.paths:
                capture = self._capture(path)
                if capture is not None:
                    sent += 1
                    yield capture
            if not self.loop or not sent:  # a looping folder of which nothing could be sent would spin
                return


def dataset_test_label(directory: Path) -> str | None:
    """The truth of every image in ``directory`` when it is a test folder of an MVTec-layout dataset,
    ``ROOT/test/<type>/`` with ``ROOT/train/good/`` (``models.datasets``): ``<type>``, i.e. ``good`` or the defect
    type, as ``lineinspect evaluate`` labels them; None for any other folder."""
    directory = Path(directory).resolve()
    root = directory.parent.parent
    if directory.parent.name != "test" or not (root / "train" / "good").is_dir():
        return None
    return directory.name


class VideoSource:
    """Frames from ``cv2.VideoCapture``: a file (waits under backpressure) or a camera (live, drops oldest)."""

    def __init__(self, camera_id: str, target: str, live: bool, encoding: Encoding, jpeg_quality: int) -> None:
        self.camera_id, self.target, self.live = camera_id, target, live
        self.encoding, self.jpeg_quality = encoding, jpeg_quality

    def _open(self) -> cv2.VideoCapture:
        if self.target.isdigit():
            capture = cv2.VideoCapture(int(self.target))
        elif "appsink" in self.target:
            capture = cv2.VideoCapture(self.target, cv2.CAP_GSTREAMER)
        else:
            capture = cv2.VideoCapture(self.target)
        if not capture.isOpened():
            msg = f"OpenCV cannot open {self.target!r} (device index, video file, RTSP URL or GStreamer pipeline)"
            raise ValueError(msg)
        return capture

    def captures(self) -> Iterator[Capture]:
        capture = self._open()
        try:
            index = 0
            while True:
                ok, frame_bgr = capture.read()
                captured_at = time.time_ns()
                if not ok:
                    return
                rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
                data, extra = encode_pixels(rgb, self.encoding, self.jpeg_quality)
                yield Capture(data, self.encoding, captured_at, metadata={"source_index": index}, **extra)
                index += 1
        finally:
            capture.release()


def new_frame_id(camera_id: str) -> str:
    """A frame id unique across restarts and ingest workers: the camera's id and 16 random hex digits."""
    return f"{camera_id}-{uuid.uuid4().hex[:16]}"


def parse_source(spec: str, default_camera_id: str, encoding: Encoding, jpeg_quality: int, speed: float) -> Source:
    """Build a source from ``[CAMERA_ID=]KIND:TARGET`` (see the module docstring)."""
    camera_id, _, rest = spec.partition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
    kind, sep, target = rest.partition(":")
    if not sep or not target:
        msg = f"source {spec!r} must look like [CAMERA_ID=]KIND:TARGET, e.g. cam1=folder:images/"
        raise ValueError(msg)
    camera_id = camera_id or default_camera_id
    problem = id_problem(new_frame_id(camera_id))
    if problem is not None:  # checked here, or the ingest worker would stop at its first frame
        msg = (f"camera id {brief_repr(camera_id)} in {brief_repr(spec)}: a frame id "
               f"made from it (CAMERA_ID-<16 hex digits>) {problem}")  # fmt: skip
        raise ValueError(msg)
    if kind in ("folder", "loop-folder"):
        return FolderSource(camera_id, Path(target), loop=kind == "loop-folder")
    if kind == "video":
        if not Path(target).exists():
            msg = f"video file not found: {target}"
            raise ValueError(msg)
        return VideoSource(camera_id, target, live=False, encoding=encoding, jpeg_quality=jpeg_quality)
    if kind == "camera":
        return VideoSource(camera_id, target, live=True, encoding=encoding, jpeg_quality=jpeg_quality)
    if kind == "replay":
        from workers.record import ReplaySource

        return ReplaySource(camera_id, Path(target), speed=speed)
    msg = f"unknown source kind {kind!r} in {spec!r}: use folder, loop-folder, video, camera or replay"
    raise ValueError(msg)
