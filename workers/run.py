"""``lineinspect run``: the whole line on one machine, from nothing to a summary.

Redis (configured and reachable, else embedded) -> demo line from scikit-image textures -> model (fitted unless
``--model``) announced on the line's model key -> sink, scoring worker(s) and ingest started as separate
processes (``python -m workers.cli ...``, logs in ``OUT/logs/``) -> live progress from the decisions
stream -> stop after ``--frames`` decisions or Ctrl-C -> children drained with SIGTERM (a second Ctrl-C stops them at
once) -> summary with AUROC on the demo's known defects. Heatmaps of failed frames land in ``OUT/heatmaps/``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.codec import decode_decision
from pipeline.config import Config, load_config
from pipeline.messages import Decision
from pipeline.redis_server import free_port, resolve_redis
from pipeline.streams import LineKeys, StreamClient
from workers.lifecycle import install_stop_handlers, stop_bound_s
from workers.score import limit_threads

if TYPE_CHECKING:
    from models.synthetic import DemoLine

CHILD_MODULE = "workers.cli"
RUN_TAG = "demo_run"


@dataclass
class Progress:
    """Decisions seen so far for this run; ``line()`` is the live status text."""

    started: float = field(default_factory=time.monotonic)
    verdicts: dict[str, int] = field(default_factory=lambda: {"pass": 0, "fail": 0, "error": 0})
    latencies_s: list[float] = field(default_factory=list)
    scored_files: list[tuple[str, float, str]] = field(default_factory=list)  # (source file, score, verdict)

    @property
    def count(self) -> int:
        return sum(self.verdicts.values())

    def add(self, decision: Decision) -> None:
        self.verdicts[decision.verdict] += 1
        if decision.published_at_ns:
            self.latencies_s.append((decision.published_at_ns - decision.captured_at_ns) / 1e9)
        source_file = decision.metadata.get("source_file")
        if decision.score is not None and isinstance(source_file, str):
            self.scored_files.append((source_file, decision.score, decision.verdict))

    def latency_ms(self, quantile: float) -> float:
        return float(np.quantile(self.latencies_s, quantile) * 1000) if self.latencies_s else float("nan")

    def line(self, target: int) -> str:
        elapsed = time.monotonic() - self.started
        return (
            f"[{elapsed:6.1f} s] {self.count}/{target or '∞'} frames  {self.count / max(elapsed, 1e-9):5.1f} frames/s  "
            f"p50 {self.latency_ms(0.5):6.0f} ms  p99 {self.latency_ms(0.99):6.0f} ms  "
            f"pass {self.verdicts['pass']}  fail {self.verdicts['fail']}  error {self.verdicts['error']}"
        )


def _prepare_model(args: argparse.Namespace, config: Config, out: Path) -> tuple[Path, DemoLine]:
    limit_threads(config.worker.torch_threads)  # the fit runs here: [worker] torch_threads, as `fit` keeps to
    from models.fit import fit_scorer
    from models.images import list_images
    from models.synthetic import make_demo_line

    print(f"making the demo line in {out / 'demo'} ...", flush=True)
    demo = make_demo_line(out / "demo", seed=0)
    if args.model is not None:
        return Path(args.model).resolve(), demo
    good_parts = list_images(demo.train_dir)
    print(f"fitting a model on the demo's {len(good_parts)} good parts (a real line wants hundreds: fit's warnings "
          "below say what so few cost, benchmarks/RESULTS.md section 7) ...", flush=True)  # fmt: skip
    scorer = fit_scorer(good_parts, config, progress=True)
    model_dir = (out / "model").resolve()
    scorer.save(model_dir)
    print(f"model {scorer.model_id} saved to {model_dir}", flush=True)
    return model_dir, demo


def port_is_free(port: int) -> bool:
    """True when ``port`` can be bound on all interfaces (0 never is: it means 'pick one')."""
    if port == 0:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _child_env(url: str, out: Path, metrics_port: int, backlog: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "REDIS_URL": url,
            # the demo's folders are file sources: keep just enough queued for full batches, so the latency shown
            # is the pipeline's and not the time spent waiting behind a deep queue
            "LINEINSPECT__INGEST__LIVE_QUEUE_LIMIT": str(backlog),
            "LINEINSPECT__SINK__HEATMAP_DIR": str((out / "heatmaps").resolve()),
            "LINEINSPECT__SINK__METRICS_PORT": str(metrics_port),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")])
            ),
        }
    )
    return env


def scorer_threads(config: Config, workers: int, cores: int | None = None) -> int:
    """Torch threads per scoring worker: the configured number, else this host's cores shared among the workers."""
    if config.worker.torch_threads:
        return config.worker.torch_threads
    return max(1, (cores or os.cpu_count() or 1) // workers)


def _start(
    role: str, extra: list[str], args: argparse.Namespace, env: dict[str, str], logs: Path
) -> subprocess.Popen[bytes]:
    verbose = ["-v"] if getattr(args, "verbose", False) else []
    command = [sys.executable, "-m", CHILD_MODULE, *verbose, role, "--line", args.line, *extra]
    if args.config is not None:
        command += ["--config", str(args.config)]
    log_file = (logs / f"{role}-{extra[-1] if extra else ''}.log").open("wb")
    return subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


# How much longer than a worker's stop bound (workers.lifecycle.stop_bound_s) `run` waits before SIGKILL: the
# interpreter's own exit after the worker has finished
STOP_SLACK_S = 5.0
STOP_POLL_S = 0.1  # how soon a wait for a stopping worker sees a second Ctrl-C


def stop_on_signals() -> tuple[threading.Event, threading.Event]:
    """Ctrl-C (or SIGTERM) sets the first event: drain the workers and still print the summary. A second one sets
    the second: stop them at once (``stop_workers``), as a second SIGTERM stops a worker; a third ends ``run``."""
    stop, at_once = threading.Event(), threading.Event()
    install_stop_handlers(
        stop,
        (at_once, "second stop request: stopping the workers at once (what they hold stays pending, for the next run)"),
        message="stop requested: draining the workers (Ctrl-C again stops them at once)",
    )
    return stop, at_once


def stop_workers(
    config: Config,
    ingest: subprocess.Popen[bytes] | None,
    scorers: list[subprocess.Popen[bytes]],
    sink: subprocess.Popen[bytes],
    at_once: threading.Event | None = None,
) -> None:
    """SIGTERM ingest, then the scorers, then the sink, each group once the one before has exited (so the sink
    drains what the scorers committed last); each process is given its whole stop bound (``stop_bound_s``, as
    deploy/'s grace periods are) before SIGKILL, which would leave its frames in hand to the next run's claims.
    Once ``at_once`` is set (a second Ctrl-C) every worker still running is killed without waiting: up to three
    stop bounds (over two minutes with config.toml) are too long to make a user wait who asked twice."""
    wait_s = stop_bound_s(config) + STOP_SLACK_S
    at_once = at_once or threading.Event()
    for group in ([ingest] if ingest else [], scorers, [sink]):
        _stop(group, wait_s, at_once)


def _stop(processes: list[subprocess.Popen[bytes]], timeout_s: float, at_once: threading.Event) -> None:
    for process in processes:
        if process.poll() is None and not at_once.is_set():
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        while process.poll() is None and not at_once.is_set() and time.monotonic() < deadline:
            at_once.wait(STOP_POLL_S)
        if process.poll() is None:
            process.kill()
        process.wait()


def _wait_ready(
    client: StreamClient,
    prefix: str,
    line_id: str,
    expected: dict[str, int],
    children: list[subprocess.Popen[bytes]],
    stop: threading.Event,
    timeout_s: float = 300.0,
) -> str | None:
    """Wait until ``expected`` workers per role report ``ok``; returns an error text when one dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        statuses = [s for s in client.read_health(prefix) if s.get("line") == line_id and s.get("state") == "ok"]
        if all(sum(s.get("role") == role for s in statuses) >= count for role, count in expected.items()):
            return None
        if any(child.poll() is not None for child in children):
            return "a worker exited while starting"
        time.sleep(0.2)
    return None if stop.is_set() else f"workers not ready after {timeout_s:.0f} s"


def _labels_by_name(demo: DemoLine) -> dict[str, int]:
    """The demo's test frames by file name (what decisions carry as ``source_file``): 1 = defective."""
    return {path.name: label for path, label in zip(demo.test_images, demo.test_labels, strict=True)}


def _auroc(progress: Progress, demo: DemoLine) -> float | None:
    from models.evaluation import image_auroc

    labels_by_name = _labels_by_name(demo)
    scores_by_file: dict[str, float] = {}  # a looping source repeats files: each counts once, first score
    for name, score, _ in progress.scored_files:
        scores_by_file.setdefault(name, score)
    names = [name for name in scores_by_file if name in labels_by_name]
    labels = np.array([labels_by_name[name] for name in names])
    if len(set(labels.tolist())) < 2:
        return None
    return float(image_auroc(labels, np.array([scores_by_file[name] for name in names])))


def _known_verdicts(progress: Progress, demo: DemoLine) -> str:
    """How the decisions of frames with a known label went: good frames rejected, defective frames caught."""
    labels_by_name = _labels_by_name(demo)
    counts = {(label, verdict): 0 for label in (0, 1) for verdict in ("pass", "fail")}
    for name, _, verdict in progress.scored_files:
        if name in labels_by_name and verdict in ("pass", "fail"):
            counts[labels_by_name[name], verdict] += 1
    good, defective = counts[0, "pass"] + counts[0, "fail"], counts[1, "pass"] + counts[1, "fail"]
    return f"{counts[0, 'fail']} of {good} good frames rejected, {counts[1, 'fail']} of {defective} defective caught"


def run_demo(args: argparse.Namespace) -> int:
    """``lineinspect run``'s exit code; ``args.line`` is the line id ``stream_commands.cmd_run`` checked (``--line``,
    else ``worker.line_id``)."""
    config = load_config(args.config)
    if args.image_size:
        config = config.model_copy(update={"model": config.model.model_copy(update={"image_size": args.image_size})})
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with resolve_redis(config.redis.url) as url:
        print(f"redis: {url}", flush=True)
        model_dir, demo = _prepare_model(args, config, out)  # Ctrl-C here simply interrupts
        stop, at_once = stop_on_signals()  # from now on Ctrl-C drains the workers and still prints the summary
        client = StreamClient(url, config.redis, config.streams)
        keys = LineKeys(config.streams.prefix, args.line)
        client.set_model_dir(keys, str(model_dir))
        position = client.last_id(keys.decisions)
        metrics_port = config.sink.metrics_port if port_is_free(config.sink.metrics_port) else free_port()
        env = _child_env(url, out, metrics_port, backlog=2 * config.worker.max_batch * args.workers)
        run_id = uuid.uuid4().hex[:8]
        test_root = demo.test_images[0].parents[1]
        frames = ["--frames", str(args.frames)] if args.frames else []
        fps = ["--max-fps", str(args.fps)] if args.fps else []
        sink = _start("sink", ["--name", "run-sink"], args, env, logs)
        scorer_env = env | {"LINEINSPECT__WORKER__TORCH_THREADS": str(scorer_threads(config, args.workers))}
        scorers = [_start("score-worker", ["--name", f"run-score-{i}"], args, scorer_env, logs)
                   for i in range(args.workers)]  # fmt: skip
        print("waiting for the workers to load the model ...", flush=True)
        try:
            failed = _wait_ready(
                client, config.streams.prefix, args.line, {"score": args.workers, "sink": 1}, [sink, *scorers], stop
            )
        except BaseException:  # Redis lost while waiting: the workers run in sessions of their own, Ctrl-C misses them
            stop_workers(config, None, scorers, sink, at_once)
            raise
        if failed or stop.is_set():  # a worker died, or Ctrl-C while they loaded: no frames to send
            stop_workers(config, None, scorers, sink, at_once)
            client.close()
            print(f"error: {failed}; see {logs}" if failed else "stopped before any frame was sent", file=sys.stderr)
            return 1 if failed else 0
        ingest = _start(
            "ingest",
            [
                "--source",
                f"good=loop-folder:{test_root / 'good'}",
                "--source",
                f"defect=loop-folder:{test_root / 'defect'}",
                "--metadata",
                f"{RUN_TAG}={run_id}",
                *frames,
                *fps,
                "--name",
                "run-ingest",
            ],
            args,
            env,
            logs,
        )
        print(
            f"started ingest, {args.workers} scoring worker(s), sink (metrics on :{metrics_port}/metrics); "
            f"logs in {logs}",
            flush=True,
        )
        progress = Progress()
        last_print = 0.0
        try:
            while not failed and not stop.is_set() and not (args.frames and progress.count >= args.frames):
                for _stream, entry in client.tail({keys.decisions: position}, count=200, block_ms=200):
                    position = entry.entry_id
                    decision = decode_decision(entry.payload) if entry.payload else None
                    if decision is not None and decision.metadata.get(RUN_TAG) == run_id:
                        progress.add(decision)
                if time.monotonic() - last_print > 1.0:
                    last_print = time.monotonic()
                    print("\r" + progress.line(args.frames), end="", flush=True)
                dead = [p for p in [sink, *scorers] if p.poll() is not None]
                if dead:
                    failed = f"a worker exited early (code {dead[0].returncode}); see {logs}"
                    break
        finally:
            print("\r" + progress.line(args.frames), flush=True)
            print("stopping workers ...", flush=True)
            stop_workers(config, ingest, scorers, sink, at_once)
            client.close()
    auroc = _auroc(progress, demo)
    print("\nsummary")
    print(f"  frames decided     {progress.count}  ({progress.verdicts})")
    print(f"  throughput         {progress.count / max(time.monotonic() - progress.started, 1e-9):.1f} frames/s")
    p50, p99 = progress.latency_ms(0.5), progress.latency_ms(0.99)
    auroc_text = "n/a (needs good and defect frames)" if auroc is None else f"{auroc:.3f}"
    print(f"  latency p50 / p99  {p50:.0f} / {p99:.0f} ms (capture to published)")
    print(f"  image AUROC        {auroc_text} on the demo's known defects")
    print(f"  verdicts           {_known_verdicts(progress, demo)}")
    print(f"  heatmaps           {(out / 'heatmaps').resolve()}")
    print(f"  model              {model_dir}")
    if failed:
        print(f"error: {failed}", file=sys.stderr)
        return 1
    return 0
