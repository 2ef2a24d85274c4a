"""A scoring worker process whose batch hangs for good (a stuck torch or faiss call) ends itself, so that systemd and
Compose, which restart only a process that exits, restart it; its frames stay pending and get their decisions after.

Real processes and a real Redis; only the model is made to hang, inside an otherwise unchanged ``score-worker``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pipeline.config import RedisSettings, StreamSettings
from pipeline.health import HUNG_EXIT_STATUS
from pipeline.streams import SCORER_GROUP, LineKeys, StreamClient
from tests.workers.conftest import TinyLine
from tests.workers.helpers import decisions_in, frame_from_file, publish_frames, wait_until
from tests.workers.processes import REPO_ROOT, WorkerProcesses, worker_env
from workers.score import ScoredBatch, ScorerLike


class HangingScorer:
    """The real model, whose ``score`` never returns."""

    def __init__(self, scorer: ScorerLike) -> None:
        self.scorer = scorer
        self.model_id, self.threshold = scorer.model_id, scorer.threshold

    def aspect_mismatch(self, height: int, width: int) -> str | None:
        return self.scorer.aspect_mismatch(height, width)

    def score(self, images: Sequence[np.ndarray]) -> ScoredBatch:
        threading.Event().wait()  # hung for good
        raise AssertionError


def hung_score_worker() -> None:
    """``lineinspect score-worker`` (argv from the command line) with a model that hangs in its first batch."""
    import workers.score
    from workers.cli import main

    real_load_model = workers.score.load_model

    def load_model(device: str) -> Callable[[Path], ScorerLike]:
        load = real_load_model(device)
        return lambda model_dir: HangingScorer(load(model_dir))

    workers.score.load_model = load_model
    sys.exit(main(sys.argv[1:]))


def test_a_scoring_worker_whose_batch_hangs_exits_for_its_supervisor_and_loses_no_frame(
    tiny_line: TinyLine, redis_url: str, stream_prefix: str, tmp_path: Path, processes: WorkerProcesses
) -> None:
    # Past worker.max_batch_duration_s the worker stopped beating, so /livez turned 503: Kubernetes restarted it, but
    # under systemd (Restart=on-failure) or Compose (restart: unless-stopped) nothing did, and the line's frames
    # waited on a process that would never score again.
    processes.env = worker_env(redis_url, stream_prefix, tmp_path, LINEINSPECT__WORKER__MAX_BATCH_DURATION_S="1")
    client = StreamClient(redis_url, RedisSettings(), StreamSettings(prefix=stream_prefix))
    keys = LineKeys(stream_prefix, "line-1")
    ids = publish_frames(client, keys, [frame_from_file(tiny_line.good_images[i % 4]) for i in range(4)])
    arguments = ["score-worker", "--line", "line-1", "--model", str(tiny_line.model_dir), "--name", "score-a"]
    log_path = tmp_path / "hung.log"
    code = "from tests.workers.test_score_hung_exit import hung_score_worker; hung_score_worker()"
    with log_path.open("wb") as log:
        hung = subprocess.Popen([sys.executable, "-c", code, *arguments], cwd=REPO_ROOT, env=processes.env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    processes.processes.append(hung)
    try:
        # a hang guard, not a timing assertion: before, the worker never exited
        assert hung.wait(timeout=150) == HUNG_EXIT_STATUS, log_path.read_text()[-3000:]
        records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        (critical,) = [record for record in records if record["level"] == "critical"]
        assert critical["hung"] == f"a step on {keys.frames} (worker.max_batch_duration_s)"
        assert critical["held"] == 4 and critical["step_s"] > 1.0
        main_thread = next(stack for name, stack in critical["threads"].items() if name.startswith("MainThread"))
        assert main_thread[-1].endswith("in wait") and any("in score" in frame for frame in main_thread)
        assert client.length(keys.results) == 0
        assert client.group_stats(keys.frames)[SCORER_GROUP].pending == len(ids)  # left pending, nothing acked
        processes.start(*arguments)  # the supervisor's restart: the same name re-reads what it held
        wait_until(lambda: client.length(keys.results) >= len(ids), timeout_s=120, what="the restarted worker")
        assert sorted(d.frame_entry_id or "" for d in decisions_in(client, keys.results)) == sorted(ids)
        assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0
    finally:
        client.close()
