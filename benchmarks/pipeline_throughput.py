"""Pipeline throughput and latency against the bare scorer, and Redis memory over a soak run.

    python benchmarks/pipeline_throughput.py --model MODEL_DIR [--images DIR] [--batch 8] [--frames 400]
        [--workers 1] [--soak-s 600] [--json out.json]

1. Bare scorer: ``Scorer.score`` on batches of ``--batch`` decoded images, in this process -> images/s.
2. Pipeline at full load: ``--frames`` frames (the images' file bytes) published at once onto a fresh line served
   by ``--workers`` scoring worker processes and a sink -> decisions/s, and the ratio to the bare scorer.
3. Latency at 50% and 90% of the pipeline's full-load rate: frames published at that pace -> end-to-end
   (capture -> published decision) p50 / p99 and the mean per-stage times reported in the decisions.
4. With ``--soak-s``: frames at 50% load for that long, sampling Redis ``used_memory`` -> peak (bounded memory).

Redis: ``REDIS_URL`` when set, else an embedded server. Without ``--images``, a demo line is generated.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline.codec import decode_decision, decode_frame, encode_frame  # noqa: E402
from pipeline.config import RedisSettings, StreamSettings  # noqa: E402
from pipeline.messages import Frame  # noqa: E402
from pipeline.redis_server import resolve_redis  # noqa: E402
from pipeline.streams import SCORER_GROUP, LineKeys, StreamClient  # noqa: E402


def bare_scorer_rate(model_dir: Path, images: list[np.ndarray], batch: int, frames: int) -> float:
    from models.artifact import load_scorer

    scorer = load_scorer(model_dir, device="auto")
    scorer.score(images[:batch])  # warm-up
    chosen = [images[i % len(images)] for i in range(frames)]
    started = time.perf_counter()
    for start in range(0, frames, batch):
        scorer.score(chosen[start : start + batch])
    return frames / (time.perf_counter() - started)


def start_workers(
    url: str,
    prefix: str,
    line: str,
    model_dir: Path,
    workers: int,
    batch: int,
    logs: Path,
) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "REDIS_URL": url,
        "PYTHONPATH": str(REPO_ROOT),
        "LINEINSPECT__STREAMS__PREFIX": prefix,
        "LINEINSPECT__WORKER__MAX_BATCH": str(batch),
        "LINEINSPECT__SINK__METRICS_PORT": "0",
        "LINEINSPECT__SINK__HEATMAP_DIR": str(logs / "heatmaps"),
    }
    commands = [["sink", "--name", "bench-sink"]] + [
        ["score-worker", "--name", f"bench-score-{i}", "--model", str(model_dir)] for i in range(workers)
    ]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "workers.stream_commands", *command, "--line", line],
            env=env,
            cwd=REPO_ROOT,
            stdout=(logs / f"{command[2]}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for command in commands
    ]


def wait_ready(client: StreamClient, prefix: str, line: str, workers: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ok = [s for s in client.read_health(prefix) if s.get("line") == line and s.get("state") == "ok"]
        if sum(s.get("role") == "score" for s in ok) >= workers and any(s.get("role") == "sink" for s in ok):
            return
        time.sleep(0.2)
    msg = "workers did not become ready within 300 s (see the logs directory)"
    raise RuntimeError(msg)


def send_and_collect(
    client: StreamClient, keys: LineKeys, payloads: list[bytes], rate: float | None, memory: list[int]
) -> list[dict[str, Any]]:
    """Publish frames (all at once when ``rate`` is None) and return their decisions' timing fields."""
    position = client.last_id(keys.decisions)
    line_frames = [_restamp(payload, keys.line_id) for payload in payloads]
    started = time.monotonic()
    wanted = {frame.frame_id for frame in line_frames}
    collected: list[dict[str, Any]] = []
    sent = 0
    while len(collected) < len(line_frames):
        due = len(line_frames) if rate is None else min(len(line_frames), int((time.monotonic() - started) * rate) + 1)
        while sent < due:
            frame = line_frames[sent].model_copy(update={"captured_at_ns": time.time_ns()})
            client.publish(keys.frames, encode_frame(frame))
            sent += 1
        for _stream, entry in client.tail({keys.decisions: position}, count=500, block_ms=5):
            position = entry.entry_id
            decision = decode_decision(entry.payload or b"")
            if decision.frame_id in wanted:
                collected.append(
                    {
                        "published_at_ns": decision.published_at_ns,
                        "captured_at_ns": decision.captured_at_ns,
                        **decision.timings.model_dump(),
                    }
                )
        memory.append(int(client.redis.info("memory")["used_memory"]))
    return collected


def _restamp(payload: bytes, line_id: str) -> Frame:
    frame = decode_frame(payload)
    return frame.model_copy(update={"line_id": line_id, "frame_id": f"bench-{uuid.uuid4().hex}"})


def summarise(decisions: list[dict[str, Any]]) -> dict[str, float]:
    latencies = np.array([(d["published_at_ns"] - d["captured_at_ns"]) / 1e6 for d in decisions])
    stages = {
        f"mean_{key}_ms": float(np.mean([d[key] for d in decisions]) * 1000)
        for key in ("queue_wait_s", "decode_s", "backbone_s", "search_s", "postprocess_s", "publish_s")
    }
    return {"p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)), **stages}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--soak-s", type=float, default=0.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from models.images import list_images, read_image
    from models.synthetic import make_demo_line

    work = Path(tempfile.mkdtemp(prefix="lineinspect-bench-"))
    paths = list_images(args.images) if args.images else make_demo_line(work / "demo").test_images
    payloads = [
        encode_frame(
            Frame(
                line_id="x",
                camera_id="bench",
                frame_id=p.name,
                sequence=0,
                captured_at_ns=0,
                encoding="png" if p.suffix == ".png" else "jpeg",
                data=p.read_bytes(),
            )
        )
        for p in paths
    ]
    bare = bare_scorer_rate(args.model, [read_image(p) for p in paths], args.batch, args.frames)
    print(f"bare scorer: {bare:.1f} images/s at batch {args.batch}", flush=True)
    results: dict[str, Any] = {
        "batch": args.batch,
        "frames": args.frames,
        "workers": args.workers,
        "bare_images_per_s": bare,
    }
    with resolve_redis(os.environ.get("REDIS_URL")) as url:
        prefix = f"bench-{uuid.uuid4().hex[:6]}"
        settings = StreamSettings(prefix=prefix, maxlen=max(10_000, 2 * args.frames))
        client = StreamClient(url, RedisSettings(), settings)
        keys = LineKeys(prefix, "bench")
        client.ensure_group(keys.frames, SCORER_GROUP)
        children = start_workers(url, prefix, "bench", args.model.resolve(), args.workers, args.batch, work)
        memory: list[int] = []
        try:
            wait_ready(client, prefix, "bench", args.workers)
            send_and_collect(client, keys, payloads[: 2 * args.batch], None, memory)  # warm-up
            chosen = [payloads[i % len(payloads)] for i in range(args.frames)]
            started = time.monotonic()
            full = send_and_collect(client, keys, chosen, None, memory)
            rate = len(full) / (time.monotonic() - started)
            results.update({"pipeline_images_per_s": rate, "ratio_to_bare": rate / bare, "full_load": summarise(full)})
            print(f"pipeline: {rate:.1f} images/s = {100 * rate / bare:.0f}% of the bare scorer", flush=True)
            for load in (0.5, 0.9):
                paced = send_and_collect(client, keys, chosen, load * rate, memory)
                results[f"load_{int(load * 100)}"] = {"rate": load * rate, **summarise(paced)}
                print(f"{int(load * 100)}% load: {json.dumps(results[f'load_{int(load * 100)}'])}", flush=True)
            if args.soak_s > 0:
                soak_frames = [payloads[i % len(payloads)] for i in range(int(args.soak_s * 0.5 * rate))]
                results["soak"] = {
                    "seconds": args.soak_s,
                    **summarise(send_and_collect(client, keys, soak_frames, 0.5 * rate, memory)),
                }
            results["redis_used_memory_peak_bytes"] = max(memory) if memory else None
        finally:
            for child in children:
                child.send_signal(signal.SIGTERM)
            for child in children:
                child.wait(timeout=60)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
