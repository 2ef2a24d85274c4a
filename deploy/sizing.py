"""Sizing measurements behind deploy/README.md: JPEG bytes per frame, and Redis stream throughput for big entries.

    python deploy/sizing.py jpeg --data ../shared/datasets/mtd --size 1280x1024 --size 640x480 --quality 90
    python deploy/sizing.py redis --url redis://127.0.0.1:6379/13 --payload-kb 100 --seconds 5

``jpeg`` encodes MTD good tiles (``MT_Free/Imgs/*.jpg``) the way ingest encodes camera frames (3-channel,
``cv2.imencode`` at ``--quality``) in two ways, because a camera frame's detail decides its JPEG size:
``resized`` stretches one tile to the frame size (smooth, a lower bound) and ``mosaic`` tiles native-resolution
tiles side by side (sensor-like detail at every pixel). ``redis`` runs, on one connection each, what a line does
per frame: ingest's ``XADD ... MAXLEN ~`` of an incompressible payload, and a scorer's ``XREADGROUP`` + ``XACK``;
it deletes its stream afterwards, having measured what the stream (``--maxlen`` entries once full) holds in Redis'
memory. Both print one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np


def _parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def _mosaic(tiles: list[np.ndarray], width: int, height: int, start: int) -> np.ndarray:
    canvas = np.zeros((height, width), dtype=np.uint8)
    y, index = 0, start
    while y < height:
        row_height, x = 0, 0
        while x < width:
            tile = tiles[index % len(tiles)]
            index += 1
            part = tile[: height - y, : width - x]
            canvas[y : y + part.shape[0], x : x + part.shape[1]] = part
            x += part.shape[1]
            row_height = max(row_height, part.shape[0])
        y += row_height
    return canvas


def measure_jpeg(data: Path, sizes: list[tuple[int, int]], quality: int, limit: int) -> dict[str, object]:
    paths = sorted((data / "MT_Free" / "Imgs").glob("*.jpg"))[:limit]
    if not paths:
        msg = f"no MT_Free/Imgs/*.jpg under {data}: pass --data with the Magnetic Tile Defects folder"
        raise SystemExit(msg)
    tiles: list[np.ndarray] = []
    for path in paths:
        tile = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if tile is None:
            msg = f"unreadable image: {path}"
            raise SystemExit(msg)
        tiles.append(tile)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    results: dict[str, object] = {"images": len(tiles), "quality": quality}
    for width, height in sizes:
        for mode in ("resized", "mosaic"):
            sizes_bytes = []
            for index, tile in enumerate(tiles):
                gray = cv2.resize(tile, (width, height)) if mode == "resized" else _mosaic(tiles, width, height, index)
                ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), params)
                assert ok
                sizes_bytes.append(len(encoded))
            sizes_bytes.sort()
            results[f"{width}x{height} {mode}"] = {
                "median_bytes": int(statistics.median(sizes_bytes)),
                "p90_bytes": sizes_bytes[int(0.9 * (len(sizes_bytes) - 1))],
            }
    return results


def measure_redis(url: str, payload_kb: int, seconds: float, maxlen: int) -> dict[str, object]:
    import redis

    client: Any = redis.Redis.from_url(url)  # redis-py's stubs type stream replies as unions
    stream = f"sizing-{uuid.uuid4().hex[:8]}:frames"
    payload = os.urandom(payload_kb * 1000)
    try:
        client.xgroup_create(stream, "scorers", id="0", mkstream=True)
        added, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            client.xadd(stream, {"payload": payload}, maxlen=maxlen, approximate=True)
            added += 1
        xadd_s = time.perf_counter() - start
        read, start = 0, time.perf_counter()
        while True:
            reply = client.xreadgroup("scorers", "sizing", {stream: ">"}, count=8)
            if not reply or not reply[0][1]:
                break
            ids = [entry_id for entry_id, _ in reply[0][1]]
            client.xack(stream, "scorers", *ids)
            read += len(ids)
        read_s = time.perf_counter() - start
        stream_bytes = client.memory_usage(stream, samples=0)  # every entry, not a sample
        stream_entries = client.xlen(stream)
    finally:
        client.delete(stream)
        client.close()
    return {
        "payload_bytes": len(payload),
        "xadd_per_s": round(added / xadd_s, 1),
        "xadd_mb_per_s": round(added * len(payload) / xadd_s / 1e6, 1),
        "xreadgroup_ack_per_s": round(read / read_s, 1) if read else None,
        "entries_read": read,
        "stream_entries": stream_entries,
        "stream_memory_mb": round(stream_bytes / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    jpeg = commands.add_parser("jpeg", help="JPEG bytes of MTD frames at given resolutions")
    jpeg.add_argument("--data", type=Path, required=True, help="Magnetic Tile Defects folder")
    jpeg.add_argument("--size", action="append", type=_parse_size, help="WIDTHxHEIGHT; repeatable")
    jpeg.add_argument("--quality", type=int, default=90)
    jpeg.add_argument("--limit", type=int, default=100, help="tiles to use")
    bench = commands.add_parser("redis", help="XADD and XREADGROUP+XACK rates for big entries, one connection")
    bench.add_argument("--url", required=True, help="redis://host:port/db (use a spare db)")
    bench.add_argument("--payload-kb", type=int, default=100)
    bench.add_argument("--seconds", type=float, default=5.0)
    bench.add_argument("--maxlen", type=int, default=2000)
    args = parser.parse_args()
    if args.command == "jpeg":
        result = measure_jpeg(args.data, args.size or [(1280, 1024), (640, 480)], args.quality, args.limit)
    else:
        result = measure_redis(args.url, args.payload_kb, args.seconds, args.maxlen)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
