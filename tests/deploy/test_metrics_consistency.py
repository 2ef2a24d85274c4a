"""What real workers export adds up: a dashboard built on these counters tells the truth about the stream.

Ingest, a scoring worker and the sink run as processes on a real Redis; two entries that are not frames go into the
frames stream beside the ingested ones. Once the line is drained, each worker's ``/metrics`` must agree with Redis
and with each other: decisions = frames ingested (the stream's entries less the dead letters), every decision has a
latency and a score ratio, every fail a heatmap, the scorer scored exactly the frames and dead-lettered exactly the
two others, and both streams' lag and pending read 0.
"""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from pipeline.streams import PAYLOAD
from tests.deploy.test_prometheus_e2e import metrics_ports
from tests.workers.conftest import TinyLine
from tests.workers.helpers import wait_until
from tests.workers.processes import WorkerProcesses, worker_env

pytestmark = pytest.mark.slow
FRAMES = 16
NOT_FRAMES = 2


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value of one worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of ``name`` over the samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(
        value for (sample, sample_labels), value in samples.items() if sample == name and wanted <= sample_labels
    )


def test_exported_counts_agree_with_the_streams_and_each_other(
    tiny_line: TinyLine, redis_url: str, stream_prefix: str, tmp_path: Path, processes: WorkerProcesses
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in tiny_line.good_images + tiny_line.defect_images:
        shutil.copy(path, images / path.name)
    frames_stream = f"{stream_prefix}:line-1:frames"
    client = redis.Redis.from_url(redis_url)
    try:
        for index in range(NOT_FRAMES):  # dead-lettered as not_msgpack, no frame id: no decision
            client.xadd(frames_stream, {PAYLOAD: f"not a frame {index}".encode()})
        processes.env = worker_env(redis_url, stream_prefix, tmp_path)
        processes.start("sink", "--line", "line-1", "--name", "sink-1")
        processes.start("score-worker", "--line", "line-1", "--name", "a", "--model", str(tiny_line.model_dir))
        ingest = processes.start(
            "ingest", "--line", "line-1", "--name", "cams", "--source", f"cam0=loop-folder:{images}",
            "--frames", str(FRAMES),
        )  # fmt: skip
        assert ingest.wait(timeout=120) == 0, processes.logs()
        wait_until(lambda: {"sink", "score"} <= set(metrics_ports(processes.log_dir)), timeout_s=60, what="ports")
        ports = metrics_ports(processes.log_dir)

        def drained() -> bool:
            sink = scrape(ports["sink"])
            return (
                total(sink, "lineinspect_frames_total") == FRAMES
                and total(sink, "lineinspect_stream_lag") == 0
                and total(sink, "lineinspect_stream_pending") == 0
            )

        wait_until(drained, timeout_s=180, what=f"{FRAMES} decisions and empty streams\n{processes.logs()}")
        sink, scorer = scrape(ports["sink"]), scrape(ports["score"])

        entries = client.xinfo_stream(frames_stream)["entries-added"]
        assert entries == FRAMES + NOT_FRAMES
        assert client.xlen(f"{stream_prefix}:line-1:deadletter") == NOT_FRAMES
        assert client.xlen(f"{stream_prefix}:line-1:decisions") == FRAMES

        decisions = total(sink, "lineinspect_frames_total")
        dead_letters = total(scorer, "lineinspect_dead_letters_total") + total(sink, "lineinspect_dead_letters_total")
        assert decisions == entries - dead_letters == FRAMES
        assert total(scorer, "lineinspect_dead_letters_total", reason="not_msgpack") == NOT_FRAMES
        assert total(sink, "lineinspect_errors_total") == 0
        assert total(sink, "lineinspect_duplicate_decisions_total") == 0
        assert total(scorer, "lineinspect_batch_size_sum") == FRAMES  # scored exactly the frames
        assert total(sink, "lineinspect_end_to_end_latency_seconds_count") == FRAMES
        assert total(sink, "lineinspect_score_threshold_ratio_count") == FRAMES
        for stage in ("queue_wait", "backbone", "publish"):
            assert total(sink, "lineinspect_stage_latency_seconds_count", stage=stage) == FRAMES, stage
        fails = total(sink, "lineinspect_frames_total", verdict="fail")
        assert 0 < fails < FRAMES  # the tiny line has good and defective parts
        assert total(sink, "lineinspect_heatmaps_written_total") == fails  # save_all_heatmaps is off
        assert total(sink, "lineinspect_heatmap_failures_total") == 0
        scorer_model = {dict(labels)["model_id"] for (name, labels) in scorer if name == "lineinspect_model_info"}
        sink_model = {dict(labels)["model_id"] for (name, labels) in sink if name == "lineinspect_model_info"}
        assert len(scorer_model) == 1 and scorer_model == sink_model
        assert total(sink, "lineinspect_worker_up", role="sink") == 1
        assert total(scorer, "lineinspect_worker_up", role="score") == 1
    finally:
        client.close()
