"""Frame sources read an integrator's folder as it is: a file that cannot be sent is named and passed over."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from workers.sources import FolderSource, parse_source


def test_a_folder_source_names_and_passes_over_files_it_cannot_send(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # an unreadable TIFF, BMP or WebP (those are re-encoded as PNG) raised out of the source: ingest logged "source
    # failed" and sent none of the folder's later files
    image = np.full((16, 24, 3), 80, np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    (tmp_path / "b.tif").write_bytes(b"II*\x00 a TIFF cut off by a failed copy")
    cv2.imwritemulti(str(tmp_path / "c.tif"), [image, image])
    cv2.imwrite(str(tmp_path / "d.bmp"), image)
    (tmp_path / "e.jpg").write_bytes(b"")  # sent as it is: the scoring worker dead-letters it with the reason
    source = FolderSource("cam0", tmp_path, loop=False)
    with caplog.at_level(logging.ERROR, logger="workers.sources"):
        sent = [capture.metadata["source_file"] for capture in source.captures()]
    assert sent == ["a.png", "d.bmp", "e.jpg"]
    skipped = {record.file: record.reason for record in caplog.records}  # type: ignore[attr-defined]
    assert set(skipped) == {str(tmp_path / "b.tif"), str(tmp_path / "c.tif")}
    assert "not a readable image" in skipped[str(tmp_path / "b.tif")]
    assert "holds 2 images (pages)" in skipped[str(tmp_path / "c.tif")]


def test_a_looping_folder_of_which_nothing_can_be_sent_ends(tmp_path: Path) -> None:
    (tmp_path / "a.tif").write_bytes(b"II*\x00 not a TIFF")
    sent: list[object] = []
    # in a daemon thread, so that a source spinning for good fails the test instead of hanging the suite
    reader = threading.Thread(target=lambda: sent.extend(FolderSource("cam0", tmp_path, loop=True).captures()),
                              daemon=True)  # fmt: skip
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "a looping folder with nothing to send never ended"
    assert sent == []


def test_a_test_folder_of_a_dataset_sends_each_frame_with_its_label(tmp_path: Path) -> None:
    """The demo line (and any MVTec-layout dataset) keeps its truth in its folders: frames of ROOT/test/<type> carry
    metadata label=<type>, as README documents labels for replay's by-label report; other folders carry none."""
    image = np.full((16, 24, 3), 80, np.uint8)
    root = tmp_path / "demo"
    for folder in ("train/good", "test/good", "test/crack", "other/good"):
        (root / folder).mkdir(parents=True)
        cv2.imwrite(str(root / folder / "a.png"), image)
    cv2.imwrite(str(root / "test" / "crack" / "b.bmp"), image)  # re-encoded as PNG: labelled all the same

    def labels(folder: Path) -> list[object]:
        return [capture.metadata.get("label") for capture in FolderSource("cam0", folder, loop=False).captures()]

    assert labels(root / "test" / "good") == ["good"]
    assert labels(root / "test" / "crack") == ["crack", "crack"]
    assert labels(root / "other" / "good") == [None]  # not a dataset's test folder
    (tmp_path / "plain" / "test" / "good").mkdir(parents=True)  # a test/ folder of no dataset (no train/good)
    cv2.imwrite(str(tmp_path / "plain" / "test" / "good" / "a.png"), image)
    assert labels(tmp_path / "plain" / "test" / "good") == [None]


@pytest.mark.parametrize(("camera_id", "message"), [("c" * 240, "is 257 characters"), ("cam\n1", "control character")])
def test_a_camera_id_its_frame_ids_could_not_carry_is_refused_before_sending(
    tmp_path: Path, camera_id: str, message: str
) -> None:
    # a frame id is the camera id and 17 characters: ingest stopped at its first frame with a pydantic traceback
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    made_from_it = r"a frame id made from it \(CAMERA_ID-<16 hex digits>\)"
    with pytest.raises(ValueError, match=rf"camera id .*{made_from_it} .*{message}"):
        parse_source(f"{camera_id}=folder:{tmp_path}", "cam0", "jpeg", 90, 1.0)
    assert parse_source(f"{'c' * 239}=folder:{tmp_path}", "cam0", "jpeg", 90, 1.0).camera_id == "c" * 239
