"""A JPEG's structure walked from its start to the marker that ends it: the image's size, and whether the bytes hold
the whole image.

A JPEG is a start-of-image marker (FF D8); marker segments (FF and a code, then a two-byte length counting itself,
except the standalone markers); scans (a start-of-scan segment followed by entropy-coded data, in which FF 00 is a
data byte FF and FF D0-D7 are restart markers, and any other marker ends the scan; a progressive JPEG has several,
with tables between them); and the end-of-image marker (FF D9) that ends the image. Any marker may follow fill bytes
(FF). ``walk_jpeg`` follows that structure instead of searching the bytes for markers: an EXIF thumbnail in an APP1
segment is a whole JPEG of its own, and bytes after the end of the image (a phone's motion-photo video, a camera
SDK's trailer, zero padding) are no part of it and are not read. Stray bytes where a marker should begin are skipped,
as libjpeg skips them (with a warning) when it decodes. Checked before decoding because OpenCV decodes a JPEG cut
short, or missing data inside, with only a warning on stderr and grey (or shifted blocks) where data is missing.

The walk is linear in the data and cheap: the entropy-coded data, nearly all of a JPEG, is searched in C (``re``)
for the next marker, and its restart markers (when a restart interval is set) are read with numpy. No cv2.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

JPEG_SIGNATURE = b"\xff\xd8"
TRUNCATED = "truncated (a file still being written, or a copy or transfer cut short)"
# Start-of-frame markers (SOF0-SOF15 less DHT C4, JPG C8, DAC CC) carry the image's height and width.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-RST7 (libjpeg passes over them between segments)
_SOI, _EOI, _SOS, _DRI = 0xD8, 0xD9, 0xDA, 0xDD
_NAMES = {0xC4: "DHT", 0xCC: "DAC", 0xDA: "SOS", 0xDB: "DQT", 0xDC: "DNL", 0xDD: "DRI", 0xFE: "COM"}
# FF and a marker code: not FF (a fill byte, the marker follows) nor 00 (between segments, libjpeg passes over FF 00
# as stray bytes; in entropy-coded data it is a data byte FF), in entropy-coded data nor a restart marker D0-D7.
_MARKER = re.compile(rb"\xff[^\x00\xff]")
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# A JPEG holds a few dozen markers outside its entropy-coded data; the walk steps through each in Python, so data
# holding more is refused (16 MiB of FF D0 or of empty comments took it 4-6 s).
MAX_MARKERS = 1 << 16


class JpegLayout(NamedTuple):
    """What a walk over JPEG data found."""

    size: tuple[int, int] | None  # (width, height) from the first frame header; None when the walk stopped before it
    problem: str | None  # why the data does not hold one whole image (cut short, malformed, damaged); None if it does


def walk_jpeg(data: bytes) -> JpegLayout:
    """Walk ``data`` from its start-of-image marker over marker segments and scans to the end-of-image marker that
    ends the image. ``problem`` says where the data ends before it (truncated), what breaks the structure, or (with
    a restart interval) where restart markers skip: data is missing inside a scan although the end marker survives."""
    if not data.startswith(JPEG_SIGNATURE):
        return JpegLayout(None, f"not a JPEG: starts {data[:4]!r}, not with the start-of-image marker FF D8")
    size: tuple[int, int] | None = None
    restart_interval = scans = 0
    position = 2
    for _ in range(MAX_MARKERS):
        found = _MARKER.search(data, position)  # stray bytes before it passed over, as libjpeg passes over them
        if found is None:
            where = "before its frame header" if size is None else f"after {scans} scan(s)"
            return JpegLayout(size, f"JPEG data ends {where}, without its end-of-image marker: {TRUNCATED}")
        marker = found.start()
        code = data[marker + 1]
        if code == _EOI:
            if size is None or scans == 0:
                missing = "frame header (SOF)" if size is None else "scan (SOS)"
                return JpegLayout(size, f"JPEG ends (FF D9 at byte {marker}) before any {missing}: it holds no image")
            return JpegLayout(size, None)
        if code == _SOI:
            why = "another JPEG begins before this one ends: two joined, the first cut short"
            return JpegLayout(size, f"JPEG holds a second start-of-image marker (FF D8) at byte {marker} ({why})")
        if code in _STANDALONE:
            position = marker + 2
            continue
        name = _marker_name(code)
        if marker + 4 > len(data):
            return JpegLayout(size, f"JPEG data ends inside its {name} marker at byte {marker}: {TRUNCATED}")
        length = _uint16(data, marker + 2)
        end = marker + 2 + length
        if length < 2:  # no encoder writes it; libjpeg reads on after the length of an APPn or COM segment
            position = marker + 4
            continue
        if end > len(data):
            cut = f"inside its {name} segment at byte {marker} ({len(data) - marker - 2} of its {length} bytes)"
            return JpegLayout(size, f"JPEG data ends {cut}: {TRUNCATED}")
        if code in _SOF and size is None:
            if length < 7:
                return JpegLayout(None, f"JPEG is malformed: its {name} frame header at byte {marker} is too short")
            size = _uint16(data, marker + 7), _uint16(data, marker + 5)  # width, height
        elif code == _DRI and length == 4:  # libjpeg refuses any other length
            restart_interval = _uint16(data, marker + 4)
        elif code == _SOS:
            if size is None:
                return JpegLayout(None, f"JPEG is malformed: a scan (SOS at byte {marker}) before any frame header")
            scans += 1
            scan_end = _SCAN_END.search(data, end)
            if scan_end is None:
                cut = f"inside the entropy-coded data of its scan {scans} (SOS at byte {marker})"
                return JpegLayout(size, f"JPEG data ends {cut}, without its end-of-image marker: {TRUNCATED}")
            skip = _restart_skip(data, end, scan_end.start()) if restart_interval else None
            if skip is not None:
                return JpegLayout(size, f"JPEG is damaged inside its scan {scans}: {skip}")
            end = scan_end.start()
        position = end
    return JpegLayout(size, f"JPEG is malformed: more than {MAX_MARKERS} markers (a JPEG holds a few dozen)")


def _restart_skip(data: bytes, start: int, end: int) -> str | None:
    """Where the restart markers in ``data[start:end]`` (a scan's entropy-coded data) leave their cycle RST0, RST1,
    ... RST7, RST0, ..., or None when they keep it. An encoder writes them in that order from RST0 in every scan, so a
    skip means data is missing between them; a gap goes unseen only when it takes a multiple of 8 restart markers
    (none: a gap inside one restart interval)."""
    if end - start < 2:
        return None
    scan = np.frombuffer(data, np.uint8, count=end - start, offset=start)
    marks = np.flatnonzero(scan[:-1] == 0xFF)  # before 00 (a data byte FF), D0-D7 or a fill byte FF
    restarts = marks[(scan[marks + 1] >= 0xD0) & (scan[marks + 1] <= 0xD7)]
    found = scan[restarts + 1] - 0xD0
    due = np.arange(found.size) % 8
    skips = np.flatnonzero(found != due)
    if skips.size == 0:
        return None
    first = int(skips[0])
    return (f"restart marker RST{found[first]} at byte {start + int(restarts[first])} where RST{due[first]} is due: "
            "data is missing before it, though the end-of-image marker survived")  # fmt: skip


def _uint16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "big")


def _marker_name(code: int) -> str:
    if code in _SOF:
        return f"SOF{code - 0xC0}"
    if 0xE0 <= code <= 0xEF:
        return f"APP{code - 0xE0}"
    return _NAMES.get(code, f"FF {code:02X}")
