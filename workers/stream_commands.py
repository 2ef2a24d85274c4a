"""The streaming subcommands of ``lineinspect``: run, ingest, score-worker, sink, check, record, replay, promote,
forget-line.

``add_stream_commands(subparsers)`` registers them; each sets ``func(args) -> exit code``. Every command takes
``--config PATH`` (defaults plus environment overrides when omitted). Workers need a Redis URL (``REDIS_URL`` or
``redis.url``); only ``run`` starts an embedded Redis when none is configured or reachable.
``workers.cli.main`` runs them and turns their errors into exit codes, one way for every command: a configuration
error exits 2, a worker that gave up on Redis (``StreamsUnavailable``) exits 1 so that its supervisor restarts it.
A worker hung past ``worker.max_batch_duration_s`` or ``worker.max_startup_s`` exits 3 (``pipeline.health``), for the
same reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import uuid
from pathlib import Path

from pipeline.config import Config, ConfigError, load_config
from pipeline.logs import setup_logging
from pipeline.messages import MAX_METADATA_ENTRIES, brief_repr, line_id_problem, metadata_size_problem
from pipeline.streams import LineKeys, StreamClient, StreamsUnavailable
from workers.lifecycle import WorkerRuntime, default_worker_name, install_stop_handlers

logger = logging.getLogger(__name__)
SCORE_WORKER_COMMAND = "score-worker"
CONSUMER_COMMANDS = frozenset({SCORE_WORKER_COMMAND, "sink"})  # consumer-group members: what they hold stays pending


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _redis_url(config: Config) -> str:
    if not config.redis.url:
        msg = "no Redis configured: set REDIS_URL or redis.url in the config (`lineinspect run` starts its own)"
        raise ConfigError(msg)
    return config.redis.url


def _one_shot_client(config: Config) -> StreamClient:
    """A client for commands an operator runs and waits for (check, promote): it gives up on an unreachable Redis
    after ``redis.connect_timeout_s`` (``StreamsUnavailable``, exit 1) instead of waiting for it as a worker does."""
    client = StreamClient(_redis_url(config), config.redis, config.streams)
    client.retry_deadline = time.monotonic() + config.redis.connect_timeout_s
    return client


def _line(args: argparse.Namespace, config: Config) -> str:
    """``--line``, else ``worker.line_id`` (checked by the config), under the wire's id rules."""
    line_id = str(args.line or config.worker.line_id)
    problem = line_id_problem(line_id)
    if problem is not None:
        msg = f"--line {brief_repr(line_id)} {problem}"
        raise ValueError(msg)
    return line_id


def _one_opencv_thread() -> None:
    """Ingest and sink do light image work (colour conversion, JPEG encoding, overlays) beside the scorers, which use
    every core for torch; OpenCV would otherwise start a thread per core for it. They import no torch."""
    import cv2

    cv2.setNumThreads(1)


def _log_level(args: argparse.Namespace) -> str:
    """DEBUG with ``lineinspect -v`` (or ``python -m workers.cli -v``), else INFO."""
    return "DEBUG" if getattr(args, "verbose", False) else "INFO"


def cmd_score_worker(args: argparse.Namespace) -> int:
    from workers.score import ModelSlot, ScoreWorker, limit_threads, load_model

    config = _config(args)
    limit_threads(config.worker.torch_threads)  # before the model loader imports torch
    name = args.name or default_worker_name("score")
    setup_logging("score", _log_level(args), worker=name)
    line_id = _line(args, config)
    with WorkerRuntime(config, _redis_url(config), "score", name, config.worker.health_port) as runtime:
        install_stop_handlers(runtime.stop)
        runtime.heartbeat.beat("starting", force=True, line=line_id)
        models = ModelSlot(
            runtime,
            LineKeys(config.streams.prefix, line_id),
            load_model(config.model.device),
            args.model or config.worker.model_dir,
        )
        ScoreWorker(runtime, line_id, models).run()
    return 0


def cmd_sink(args: argparse.Namespace) -> int:
    from workers.sink import SinkWorker

    config = _config(args)
    name = args.name or default_worker_name("sink")
    setup_logging("sink", _log_level(args), worker=name)
    _one_opencv_thread()
    port = config.sink.metrics_port
    with WorkerRuntime(config, _redis_url(config), "sink", name, port, port_setting="sink.metrics_port") as runtime:
        install_stop_handlers(runtime.stop)
        SinkWorker(runtime, _line(args, config)).run()
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from workers.ingest import Ingestor
    from workers.sources import parse_source

    config = _config(args)
    if args.max_fps is not None:
        config = config.model_copy(update={"ingest": config.ingest.model_copy(update={"max_fps": args.max_fps})})
    name = args.name or default_worker_name("ingest")
    setup_logging("ingest", _log_level(args), worker=name)
    _one_opencv_thread()
    sources = [
        parse_source(spec, f"cam{index}", args.encoding, config.ingest.jpeg_quality, args.speed)
        for index, spec in enumerate(args.source)
    ]
    metadata = dict(item.split("=", 1) for item in args.metadata if "=" in item)
    if len(metadata) != len(args.metadata):
        msg = f"--metadata takes KEY=VALUE, got {args.metadata}"
        raise ValueError(msg)
    problem = metadata_size_problem(metadata)
    if len(metadata) > MAX_METADATA_ENTRIES:  # a source's own keys (source_file, label) may still tip it over
        problem = f"{len(metadata)} entries; a frame's metadata holds at most {MAX_METADATA_ENTRIES}"
    if problem is not None:
        msg = f"--metadata: {problem}"
        raise ValueError(msg)
    line_id = _line(args, config)
    with WorkerRuntime(config, _redis_url(config), "ingest", name, config.worker.health_port) as runtime:
        install_stop_handlers(runtime.stop)
        Ingestor(runtime, line_id, sources, args.frames, metadata).run()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 when there is a matching worker (``--role``, ``--line``, ``--name``; unset: any) and every matching
    worker's fresh heartbeat in Redis says ok, starting or draining; else 1."""
    config = _config(args)
    client = _one_shot_client(config)
    try:
        statuses = client.read_health(config.streams.prefix)
    except ConnectionError as error:
        print(json.dumps({"healthy": False, "error": str(error)}))
        return 1
    matching = [
        status
        for status in statuses
        if (args.role is None or status.get("role") == args.role)
        and (args.line is None or status.get("line") == args.line)
        and (args.name is None or status.get("name") == args.name)
    ]
    healthy = bool(matching) and all(status.get("state") in ("ok", "starting", "draining") for status in matching)
    print(json.dumps({"healthy": healthy, "workers": matching}, indent=2))
    return 0 if healthy else 1


def cmd_promote(args: argparse.Namespace) -> int:
    """Announce a model directory for a line; its scoring workers load it and swap between batches.

    The model is verified first (every file's sha256 and the content hash, as a worker checks them, and a
    threshold): the key outlives the workers, and a model that cannot load would otherwise be what every restarted
    or added worker is told to use. Verifying reads the files but loads no backbone, so promote can run inside a
    scorer's container without a second model's memory."""
    from models.errors import ArtifactError
    from models.manifest import verify_model

    config = _config(args)
    model_dir = Path(args.model).resolve()
    try:
        manifest = verify_model(model_dir)
    except (ArtifactError, OSError) as error:
        print(f"lineinspect promote: error: {model_dir} was not promoted: {error}", file=sys.stderr)
        return 2
    if manifest.get("threshold") is None:
        print(f"lineinspect promote: error: {model_dir} was not promoted: it has no threshold (run `lineinspect "
              "calibrate` first)", file=sys.stderr)  # fmt: skip
        return 2
    client = _one_shot_client(config)
    keys = LineKeys(config.streams.prefix, _line(args, config))
    client.set_model_dir(keys, str(model_dir))
    print(f"{keys.model} = {model_dir} (model {manifest['model_id']})")
    return 0


def cmd_forget_line(args: argparse.Namespace) -> int:
    """List a retired line's keys (a shadow line's after a replay) with their sizes; once confirmed, remove them."""
    from workers.forget_line import forget_line

    config = _config(args)
    if not args.line:
        msg = "forget-line needs --line: the line whose keys to remove (worker.line_id is never taken for it)"
        raise ConfigError(msg)
    keys = LineKeys(config.streams.prefix, _line(args, config))
    return forget_line(
        _one_shot_client(config), keys, config.redis.connect_timeout_s, dry_run=args.dry_run, yes=args.yes,
        force=args.force, discard_undecided=args.discard_undecided, keep_deadletters=args.keep_deadletters,
    )  # fmt: skip


def cmd_record(args: argparse.Namespace) -> int:
    from workers.record import install_record_stop_handlers, record_line

    config = _config(args)
    setup_logging("record", _log_level(args))
    client = StreamClient(_redis_url(config), config.redis, config.streams)
    stop, stop_waiting = threading.Event(), threading.Event()
    install_record_stop_handlers(stop, stop_waiting)  # a second Ctrl-C still closes the file with its end record
    client.stop_retrying_after(stop, config.worker.drain_timeout_s)  # Ctrl-C during an outage ends the recording
    try:
        max_frames = None if args.frames == 0 else args.frames  # 0: until Ctrl-C, as `run --frames 0`
        counts = record_line(client, LineKeys(config.streams.prefix, _line(args, config)), Path(args.out), stop,
                             max_frames, stop_waiting=stop_waiting)  # fmt: skip
    except StreamsUnavailable:  # the recording keeps what it had, closed with its end record; cli.main exits 1
        print(f"lineinspect record: {args.out} holds what was recorded before Redis was lost", file=sys.stderr)
        raise
    unusable = f" ({counts.skipped} unusable entries skipped, see the log)" if counts.skipped else ""
    print(f"recorded {counts.frames} frames and {counts.decisions} decisions to {args.out}{unusable}")
    if counts.trimmed:
        print(f"lineinspect record: warning: {counts.trimmed} frames were trimmed from the stream before the recorder "
              "read them and are missing from the recording, which marks where (it fell more than streams.maxlen "
              "frames behind the line; a replay lists the gaps)", file=sys.stderr)  # fmt: skip
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from workers.record import ReplaySource
    from workers.replay import replay_and_compare, shadow_line

    config = _config(args)
    setup_logging("replay", _log_level(args))
    if not args.line:
        msg = "replay needs --line: the shadow line whose workers run the candidate model (never the recorded line)"
        raise ConfigError(msg)
    line_id = _line(args, config)  # a line no worker may run (its scorers and sink refuse it) takes no frames either
    if not args.timeout_s > 0:  # NaN too
        msg = f"--timeout-s must be more than 0 seconds, got {args.timeout_s:g}"
        raise ConfigError(msg)
    report_path = Path(args.report) if args.report else None
    if report_path is not None:  # before the replay: a path that cannot be written must not cost the run
        try:
            report_path.parent.mkdir(parents=True, exist_ok=True)
            with report_path.open("a"):
                pass
        except OSError as error:
            msg = f"--report {report_path} cannot be written ({error.strerror or error})"
            raise ConfigError(msg) from None
    run_id = uuid.uuid4().hex[:8]
    # the recording read and verified whole, and the line checked, before the runtime (health port, Redis) starts:
    # a missing, damaged or foreign file is refused (RecordingError, exit 2) before anything reaches the line
    source = ReplaySource("replay", Path(args.file), args.speed, run_id=run_id)
    shadow_line(source.recording, line_id)
    with WorkerRuntime(config, _redis_url(config), "replay", f"replay-{run_id}", 0) as runtime:
        install_stop_handlers(runtime.stop)
        report = replay_and_compare(runtime, source, line_id, args.timeout_s)
    text = json.dumps(report, indent=2)
    print(text)
    if report_path is not None:
        report_path.write_text(text)
    for warning in report.get("warnings", []):
        print(f"lineinspect replay: warning: {warning}", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from workers.run import run_demo

    # checked before the demo line, the fit and Redis: run's workers would refuse it, after run wrote its model key
    args.line = _line(args, _config(args))
    return run_demo(args)


def _common(parser: argparse.ArgumentParser, line: bool = True) -> None:
    parser.add_argument("--config", type=Path, default=None, help="config.toml (default: built-in defaults + env)")
    if line:
        parser.add_argument("--line", default=None, help="line id (default: worker.line_id)")


def add_stream_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the streaming subcommands on the ``lineinspect`` parser."""
    run = subparsers.add_parser("run", help="demo line end to end: embedded Redis, fit, ingest, score, sink")
    _common(run)
    run.add_argument("--frames", type=int, default=200, help="stop after this many decisions (0 = until Ctrl-C)")
    run.add_argument("--model", type=Path, default=None, help="use this model directory instead of fitting one")
    run.add_argument("--workers", type=int, default=1, help="scoring worker processes")
    run.add_argument("--fps", type=float, default=None, help="frame rate per demo camera (default: as fast as scored)")
    run.add_argument("--out", type=Path, default=Path("out"), help="demo data, model and heatmaps go here")
    run.add_argument(
        "--image-size", type=int, default=None, help="demo image and model size (default model.image_size)"
    )
    run.set_defaults(func=cmd_run)

    ingest = subparsers.add_parser("ingest", help="publish frames from sources onto a line's frames stream")
    _common(ingest)
    ingest.add_argument(
        "--source",
        action="append",
        required=True,
        help="[CAMERA_ID=]KIND:TARGET with KIND folder, loop-folder, video, camera, replay; repeatable",
    )
    ingest.add_argument("--frames", type=int, default=None, help="stop after this many frames")
    ingest.add_argument(
        "--encoding", choices=["jpeg", "png", "raw"], default="jpeg", help="for video and camera frames"
    )
    ingest.add_argument("--max-fps", type=float, default=None, help="per-source frame-rate limit (ingest.max_fps)")
    ingest.add_argument("--speed", type=float, default=1.0, help="replay sources: 1 = recorded pace, 0 = flat out")
    ingest.add_argument("--metadata", action="append", default=[], help="KEY=VALUE added to every frame; repeatable")
    ingest.add_argument("--name", default=None, help="worker name for health and logs")
    ingest.set_defaults(func=cmd_ingest)

    score = subparsers.add_parser(SCORE_WORKER_COMMAND, help="scoring worker: batches frames through the model")
    _common(score)
    score.add_argument("--model", type=Path, default=None, help="model dir when the line has none announced yet")
    score.add_argument("--name", default=None, help="consumer name; stable across restarts (re-reads own pending)")
    score.set_defaults(func=cmd_score_worker)

    sink = subparsers.add_parser("sink", help="publish decisions once, write heatmaps, serve Prometheus metrics")
    _common(sink)
    sink.add_argument("--name", default=None, help="consumer name; stable across restarts")
    sink.set_defaults(func=cmd_sink)

    check = subparsers.add_parser("check", help="exit 0 when matching workers are healthy (Redis heartbeats)")
    _common(check, line=False)
    check.add_argument("--line", default=None, help="only this line's workers (default: every line's)")
    check.add_argument("--role", choices=["ingest", "score", "sink"], default=None)
    check.add_argument("--name", default=None, help="only this worker (containers: <hostname>-<role>)")
    check.set_defaults(func=cmd_check)

    record = subparsers.add_parser("record", help="save a line's new frames and decisions to a file")
    _common(record)
    record.add_argument("--out", required=True, help="recording file to write")
    record.add_argument(
        "--frames", type=int, default=None, help="stop after this many frames (default, or 0: until Ctrl-C / SIGTERM)"
    )
    record.set_defaults(func=cmd_record)

    replay = subparsers.add_parser("replay", help="push a recording through a line and compare its decisions")
    _common(replay, line=False)
    replay.add_argument("file", help="recording made by `lineinspect record`")
    replay.add_argument("--line", default=None, help="required: the shadow line whose scoring worker and sink run "
                        "the candidate model, never the recorded line")  # fmt: skip
    replay.add_argument(
        "--speed", type=float, default=0.0, help="1 = recorded pace, N = N x faster, 0 = flat out (default 0)"
    )
    replay.add_argument("--report", default=None, help="write the comparison report (JSON) here")
    replay.add_argument("--timeout-s", type=float, default=120.0, help="seconds to wait for the last decisions after "
                        "the last frame, or with no frame taken and no decision (default 120)")  # fmt: skip
    replay.set_defaults(func=cmd_replay)

    forget = subparsers.add_parser("forget-line", help="list a retired line's Redis keys and remove them")
    _common(forget, line=False)
    forget.add_argument("--line", default=None, help="required: the line whose keys to remove")
    forget.add_argument("--dry-run", action="store_true", help="only list the keys and what would refuse")
    forget.add_argument("--yes", action="store_true", help="remove without asking")
    forget.add_argument("--force", action="store_true", help="even while workers of the line beat")
    forget.add_argument(
        "--discard-undecided", action="store_true", help="even while frames of the line have no decision yet"
    )
    forget.add_argument("--keep-deadletters", action="store_true", help="keep the dead-letter stream")
    forget.set_defaults(func=cmd_forget_line)

    promote = subparsers.add_parser("promote", help="hot-swap a line's model (workers reload between batches)")
    _common(promote)
    promote.add_argument("--model", required=True, help="model directory")
    promote.set_defaults(func=cmd_promote)
