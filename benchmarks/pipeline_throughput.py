"""Pipeline throughput and latency against the bare scorer, and Redis memory over a soak run.

    python benchmarks/pipeline_throughput.py --model MODEL_DIR [--images DIR] [--batch 8] [--frames 400]
        [--rounds 3] [--workers 1] [--soak-s 600] [--json out.json]

The pipeline is the product's processes on one line: ``lineinspect ingest`` (a ``loop-folder`` source over
``--images``: the files' bytes, unchanged), ``--workers`` scoring workers (``worker.max_batch = --batch``) and a sink,
on the Redis of ``REDIS_URL`` (use a db of its own, e.g. ``redis://127.0.0.1:6379/14``; else an embedded server).
This process only reads the decisions stream (blocking XREAD) and, for the bare scorer, scores in-process.

1. Throughput, ``--rounds`` times interleaved so that load from other processes hits both alike:
   a. bare scorer: ``Scorer.score`` on batches of ``--batch`` images (decoded beforehand), in this process;
   b. pipeline at full load: an ingest of ``--frames`` frames, as fast as the scorers take them (the ingest keeps
      ``ingest.live_queue_limit`` frames queued) -> steady-state decisions/s: decisions published after the
      first batch's, divided by the time from the first batch's to the last (start-up of the ingest process
      excluded, as the bare scorer's warm-up is).
   The images are the same, in the same order. Reported per round and as medians; ratio = median pipeline / median
   bare.
2. Latency at 50% and 90% of the median pipeline rate: the ingest paced with ``--max-fps`` -> end-to-end (capture
   -> published decision) p50 / p99 and the mean per-stage times reported in the decisions.
3. With ``--soak-s``: the ingest at 50% load for that long. Every 5 s: Redis ``used_memory`` (instance-wide) and
   ``MEMORY USAGE`` of the line's streams; every 60 s and at the end: ``MEMORY USAGE`` (exact) of every key of the
   run (streams, published markers, heartbeats) -> peaks, plus the streams' lengths at the end.

The 1-minute load average is recorded before and after every measurement. Without ``--images``, a demo line is
generated. Streams are trimmed at ``streams.maxlen`` (default 2000). The run's keys are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline.codec import decode_decision  # noqa: E402
from pipeline.config import RedisSettings, StreamSettings  # noqa: E402
from pipeline.redis_server import resolve_redis  # noqa: E402
from pipeline.streams import SCORER_GROUP, LineKeys, StreamClient  # noqa: E402

LINE = "bench"


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def bare_scorer_rate(scorer: Any, images: list[np.ndarray], batch: int, frames: int) -> float:
    chosen = [images[i % len(images)] for i in range(frames)]
    started = time.perf_counter()
    for start in range(0, frames, batch):
        scorer.score(chosen[start : start + batch])
    return frames / (time.perf_counter() - started)


def worker_env(url: str, prefix: str, batch: int, maxlen: int, logs: Path) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": url,
        "PYTHONPATH": str(REPO_ROOT),
        "LINEINSPECT__STREAMS__PREFIX": prefix,
        "LINEINSPECT__STREAMS__MAXLEN": str(maxlen),
        "LINEINSPECT__WORKER__MAX_BATCH": str(batch),
        "LINEINSPECT__SINK__METRICS_PORT": "0",
        "LINEINSPECT__SINK__HEATMAP_DIR": str(logs / "heatmaps"),
    }


def start_workers(env: dict[str, str], model_dir: Path, workers: int, logs: Path) -> list[subprocess.Popen[bytes]]:
    commands = [["sink", "--name", "bench-sink"]] + [
        ["score-worker", "--name", f"bench-score-{i}", "--model", str(model_dir)] for i in range(workers)
    ]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *command, "--line", LINE],
            env=env,
            cwd=REPO_ROOT,
            stdout=(logs / f"{command[2]}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for command in commands
    ]


def wait_ready(client: StreamClient, prefix: str, workers: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ok = [s for s in client.read_health(prefix) if s.get("line") == LINE and s.get("state") == "ok"]
        if sum(s.get("role") == "score" for s in ok) >= workers and any(s.get("role") == "sink" for s in ok):
            return
        time.sleep(0.2)
    msg = "workers did not become ready within 300 s (see the logs directory)"
    raise RuntimeError(msg)


@dataclass
class MemorySampler:
    """Redis memory while the line runs: instance-wide ``used_memory`` and ``MEMORY USAGE`` of the run's keys."""

    client: StreamClient
    keys: LineKeys
    every_s: float = 5.0
    scan_every_s: float = 60.0
    enabled: bool = False  # off while throughput is measured: sampling is the only extra load on Redis
    used_memory: list[int] = field(default_factory=list)
    streams_memory: list[int] = field(default_factory=list)
    our_keys_memory: list[int] = field(default_factory=list)
    scans: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _next: float = 0.0
    _next_scan: float = 0.0

    @property
    def streams(self) -> list[str]:
        return [self.keys.frames, self.keys.results, self.keys.decisions, self.keys.deadletter]

    def maybe_sample(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every_s
            self.used_memory.append(int(self.client.redis.info("memory")["used_memory"]))
            self.streams_memory.append(sum(self.client.redis.memory_usage(key, samples=0) or 0 for key in self.streams))
        if now >= self._next_scan:
            self._next_scan = now + self.scan_every_s
            self.scans.append(self.scan())
            self.our_keys_memory.append(self.scans[-1]["bytes"])

    def scan(self) -> dict[str, Any]:
        """Exact ``MEMORY USAGE`` (SAMPLES 0) of every key under the run's prefix: per stream, markers, the rest."""
        redis = self.client.redis
        names = list(redis.scan_iter(match=f"{self.keys.prefix}:*", count=1000))
        pipe = redis.pipeline(transaction=False)
        for name in names:
            pipe.memory_usage(name, samples=0)
        sizes = dict(zip(names, (int(size or 0) for size in pipe.execute()), strict=True))
        streams = {key.rsplit(":", 1)[1]: sizes.get(key.encode(), 0) for key in self.streams}
        markers = [size for name, size in sizes.items() if b":published:" in name]
        return {
            "at_s": round(time.monotonic() - self.started),
            "bytes": sum(sizes.values()),
            "streams_bytes": streams,
            "published_markers": len(markers),
            "published_markers_bytes": sum(markers),
            "other_keys": len(sizes) - len(markers) - sum(1 for key in self.streams if key.encode() in sizes),
            "stream_lengths": self.lengths(),
        }

    def lengths(self) -> dict[str, int]:
        return {key.rsplit(":", 1)[1]: self.client.length(key) for key in self.streams}


def start_ingest(
    env: dict[str, str], images_dir: Path, frames: int, max_fps: float | None, run_id: str, logs: Path
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "workers.cli", "ingest", "--line", LINE,
        "--source", f"bench=loop-folder:{images_dir}", "--frames", str(frames),
        "--metadata", f"bench_run={run_id}", "--name", f"bench-ingest-{run_id}",
    ]  # fmt: skip
    if max_fps is not None:
        command += ["--max-fps", f"{max_fps:.3f}"]
    return subprocess.Popen(
        command, env=env, cwd=REPO_ROOT, stdout=(logs / f"ingest-{run_id}.log").open("wb"), stderr=subprocess.STDOUT
    )


@dataclass
class Line:
    """The bench line's Redis client, keys and worker environment."""

    client: StreamClient
    keys: LineKeys
    env: dict[str, str]
    images_dir: Path
    logs: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def roles(self) -> list[str]:
        return ["sink"] + [f"score_{index}" for index in range(len(self.workers) - 1)]


def ingest_and_collect(line: Line, count: int, max_fps: float | None, sampler: MemorySampler) -> list[dict[str, Any]]:
    """Run an ingest of ``count`` frames (paced at ``max_fps`` when given) and return their decisions' timings."""
    client, keys = line.client, line.keys
    position = client.last_id(keys.decisions)
    run_id = uuid.uuid4().hex[:8]
    ingest = start_ingest(line.env, line.images_dir, count, max_fps, run_id, line.logs)
    deadline = time.monotonic() + 120 + 5 * count
    collected: list[dict[str, Any]] = []
    try:
        while len(collected) < count:
            if time.monotonic() > deadline:
                msg = f"only {len(collected)} of {count} decisions arrived (logs in {line.logs})"
                raise RuntimeError(msg)
            for _stream, entry in client.tail({keys.decisions: position}, count=500, block_ms=100):
                position = entry.entry_id
                decision = decode_decision(entry.payload or b"")
                if decision.metadata.get("bench_run") == run_id:
                    collected.append(
                        {
                            "published_at_ns": decision.published_at_ns,
                            "captured_at_ns": decision.captured_at_ns,
                            "verdict": decision.verdict,
                            **decision.timings.model_dump(),
                        }
                    )
            sampler.maybe_sample()
    finally:
        if len(collected) < count:  # interrupted or timed out: stop the ingest too
            ingest.terminate()
        try:
            code = ingest.wait(timeout=60)
        except subprocess.TimeoutExpired:
            ingest.kill()
            code = ingest.wait()
    if code != 0:
        msg = f"ingest exited with {code} (logs in {line.logs})"
        raise RuntimeError(msg)
    return collected


def steady_rate(decisions: Sequence[dict[str, Any]]) -> float:
    """Decisions/s after the first published batch: those published later over the time they took."""
    stamps = sorted(d["published_at_ns"] for d in decisions)
    later = [stamp for stamp in stamps if stamp > stamps[0]]
    return len(later) / ((stamps[-1] - stamps[0]) / 1e9)


def summarise(decisions: Sequence[dict[str, Any]]) -> dict[str, float]:
    latencies = np.array([(d["published_at_ns"] - d["captured_at_ns"]) / 1e6 for d in decisions])
    stages = {
        f"mean_{key}_ms": float(np.mean([d[key] for d in decisions]) * 1000)
        for key in ("queue_wait_s", "decode_s", "backbone_s", "search_s", "postprocess_s", "publish_s")
    }
    fails = sum(d["verdict"] == "fail" for d in decisions)
    return {
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "fail_fraction": fails / len(decisions),
        **stages,
    }


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def exited_children_cpu_s() -> float:
    """CPU of every child that has exited and been waited for: the ingests (start-up included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def redis_cpu_s(client: StreamClient) -> float:
    """The Redis server's CPU (all its clients: on a shared Redis, others' commands count too)."""
    cpu = client.redis.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def measure_throughput(
    args: argparse.Namespace, scorer: Any, images: list[np.ndarray], line: Line, sampler: MemorySampler
) -> dict[str, Any]:
    """Interleaved rounds. Besides images/s, CPU ms per image: this process's for the bare scorer; each pipeline
    process's (the ingest's including its start-up; Redis's including other clients') for the pipeline: a cost
    that load from other processes distorts less than wall time does."""
    rounds: list[dict[str, Any]] = []
    for round_number in range(args.rounds):
        load_before = load_1m()
        cpu_before = own_cpu_s()
        bare = bare_scorer_rate(scorer, images, args.batch, args.frames)
        bare_cpu_ms = 1000 * (own_cpu_s() - cpu_before) / args.frames
        load_mid = load_1m()
        before = [process_cpu_s(worker.pid) for worker in line.workers]
        ingest_before, redis_before = exited_children_cpu_s(), redis_cpu_s(line.client)
        full = ingest_and_collect(line, args.frames, None, sampler)
        per_image = {
            f"{role}_cpu_ms_per_image": 1000 * (process_cpu_s(worker.pid) - cpu) / args.frames
            for role, worker, cpu in zip(line.roles, line.workers, before, strict=True)
        }
        per_image["ingest_cpu_ms_per_image"] = 1000 * (exited_children_cpu_s() - ingest_before) / args.frames
        per_image["redis_cpu_ms_per_image"] = 1000 * (redis_cpu_s(line.client) - redis_before) / args.frames
        pipeline = steady_rate(full)
        first_capture = min(d["captured_at_ns"] for d in full)
        overall = len(full) / ((max(d["published_at_ns"] for d in full) - first_capture) / 1e9)
        rounds.append(
            {
                "bare_images_per_s": bare,
                "pipeline_images_per_s": pipeline,
                "ratio": pipeline / bare,
                "pipeline_first_capture_to_last_decision_images_per_s": overall,
                "load_1m_before_bare": load_before,
                "load_1m_before_pipeline": load_mid,
                "load_1m_after": load_1m(),
                "fail_fraction": summarise(full)["fail_fraction"],
                "bare_cpu_ms_per_image": bare_cpu_ms,
                **per_image,
            }
        )
        print(f"round {round_number + 1}: {json.dumps(rounds[-1])}", flush=True)
    bare_median = statistics.median(r["bare_images_per_s"] for r in rounds)
    pipeline_median = statistics.median(r["pipeline_images_per_s"] for r in rounds)
    return {
        "rounds": rounds,
        **{
            f"median_{key}": statistics.median(r[key] for r in rounds)
            for key in rounds[0]
            if key.endswith("_cpu_ms_per_image")
        },
        "bare_images_per_s": bare_median,
        "pipeline_images_per_s": pipeline_median,
        "ratio_to_bare": pipeline_median / bare_median,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--soak-s", type=float, default=0.0)
    parser.add_argument("--skip-latency", action="store_true", help="throughput (and soak) only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from models.artifact import load_scorer
    from models.images import list_images, read_image
    from models.synthetic import make_demo_line

    work = Path(tempfile.mkdtemp(prefix="lineinspect-bench-"))
    if args.images:
        images_dir = args.images.resolve()
    else:  # the demo's good and defect test images in one folder, for one loop-folder source
        images_dir = work / "images"
        images_dir.mkdir()
        for path in make_demo_line(work / "demo").test_images:
            (images_dir / f"{path.parent.name}-{path.name}").symlink_to(path.resolve())
    paths = list_images(images_dir)  # the order a loop-folder source sends them in
    images = [read_image(p) for p in paths]
    scorer = load_scorer(args.model, device="auto")
    scorer.score(images[: args.batch])  # warm-up
    settings = StreamSettings(prefix=f"bench-{uuid.uuid4().hex[:6]}")
    results: dict[str, Any] = {
        "batch": args.batch,
        "frames": args.frames,
        "workers": args.workers,
        "model_id": scorer.model_id,
        "maxlen": settings.maxlen,
        "cpu_count": os.cpu_count(),
        "images": str(images_dir),
        "logs": str(work),
    }
    with resolve_redis(os.environ.get("REDIS_URL")) as url:
        client = StreamClient(url, RedisSettings(), settings)
        keys = LineKeys(settings.prefix, LINE)
        client.ensure_group(keys.frames, SCORER_GROUP)
        env = worker_env(url, settings.prefix, args.batch, settings.maxlen, work)
        children = start_workers(env, args.model.resolve(), args.workers, work)
        sampler = MemorySampler(client, keys)
        line = Line(client, keys, env, images_dir, work, children)
        try:
            wait_ready(client, settings.prefix, args.workers)
            ingest_and_collect(line, 2 * args.batch, None, sampler)  # warm-up
            results.update(measure_throughput(args, scorer, images, line, sampler))
            rate = results["pipeline_images_per_s"]
            print(
                f"bare {results['bare_images_per_s']:.1f} images/s, pipeline {rate:.1f} images/s "
                f"= {100 * results['ratio_to_bare']:.1f}% (medians of {args.rounds} interleaved rounds)",
                flush=True,
            )
            for load in () if args.skip_latency else (0.5, 0.9):
                load_before = load_1m()
                paced = ingest_and_collect(line, args.frames, load * rate, sampler)
                key = f"load_{int(load * 100)}"
                results[key] = {
                    "rate": load * rate,
                    "load_1m_before": load_before,
                    "load_1m_after": load_1m(),
                    **summarise(paced),
                }
                print(f"{int(load * 100)}% load: {json.dumps(results[key])}", flush=True)
            if args.soak_s > 0:
                sampler.enabled, sampler.started = True, time.monotonic()
                load_before = load_1m()
                soak = ingest_and_collect(line, int(args.soak_s * 0.5 * rate), 0.5 * rate, sampler)
                final = sampler.scan()
                results["soak"] = {
                    "seconds": args.soak_s,
                    "rate": 0.5 * rate,
                    "frames": len(soak),
                    "load_1m_before": load_before,
                    "load_1m_after": load_1m(),
                    **summarise(soak),
                    "used_memory_peak_bytes": max(sampler.used_memory),
                    "used_memory_first_last_bytes": [sampler.used_memory[0], sampler.used_memory[-1]],
                    "streams_memory_peak_bytes": max(sampler.streams_memory),
                    "streams_memory_first_last_bytes": [sampler.streams_memory[0], sampler.streams_memory[-1]],
                    "our_keys_memory_peak_bytes": max([*sampler.our_keys_memory, final["bytes"]]),
                    "our_keys_at_end": final,
                    "our_keys_every_60_s": sampler.scans,
                    "stream_lengths_at_end": sampler.lengths(),
                    "instance_used_memory_peak_bytes": int(client.redis.info("memory")["used_memory_peak"]),
                }
                print(f"soak: {json.dumps(results['soak'])}", flush=True)
        finally:
            for child in children:
                child.send_signal(signal.SIGTERM)
            for child in children:
                child.wait(timeout=60)
            for name in client.redis.scan_iter(match=f"{settings.prefix}:*", count=1000):
                client.redis.delete(name)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
