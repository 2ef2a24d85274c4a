"""A real Prometheus scrapes a real pipeline (ingest, scoring worker, sink as processes) on loopback.

The workers pick free ports; their JSON logs say which. Prometheus gets a generated config with the job names of
deploy/prometheus/*.yml and the repo's rules file, scrapes every second, and must answer the p99 recording rule, a
non-zero frame count, a line label on the stream-lag rule, every rule evaluated without error, and every dashboard
query (the panels that always have data: with data).
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import DEPLOY
from tests.deploy.test_grafana import dashboard_queries
from tests.workers.conftest import TinyLine
from tests.workers.helpers import wait_until
from tests.workers.processes import WorkerProcesses, worker_env

pytestmark = pytest.mark.slow
JOBS = {"ingest": "lineinspect-ingest", "score": "lineinspect-score", "sink": "lineinspect-sink"}
# Panels with data whenever a line runs (the others count dead letters, drops, failures, reloads: none here).
ALWAYS_DATA = {
    "Decisions per second (every line)",
    "Frames in per second (every line)",
    "Throughput by verdict",
    "Model per scoring worker",
    "End-to-end latency (capture to decision)",
    "Stage latency p50",
    "Batch size",
    "Stream lag (not yet delivered)",
    "Frames trimmed unread, 15 min",  # 0 while none are lost (Redis 7 and later)
    "Frames in per camera",
    "Workers up / reaching Redis (every line)",
    "Worker restarts, last hour (every line)",
    "Resident memory (every line)",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def metrics_ports(log_dir: Path) -> dict[str, int]:
    """role -> the port its /metrics server bound, from each worker's 'worker started' log line."""
    ports: dict[str, int] = {}
    for path in log_dir.glob("*.log"):
        for line in path.read_text().splitlines():
            if line.startswith("{") and '"worker started"' in line:
                record = json.loads(line)
                ports[record["role"]] = int(record["health_port"])
    return ports


class PrometheusApi:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=5) as response:
            return json.loads(response.read())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        reply = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert reply["status"] == "success", reply
        return list(reply["data"]["result"])

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_pipeline_and_answers_the_p99_rule(
    tiny_line: TinyLine,
    redis_url: str,
    stream_prefix: str,
    tmp_path: Path,
    processes: WorkerProcesses,
    prometheus: str,
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in tiny_line.good_images + tiny_line.defect_images:
        shutil.copy(path, images / path.name)
    processes.env = worker_env(redis_url, stream_prefix, tmp_path)
    processes.start("sink", "--line", "line-1", "--name", "sink-1")
    processes.start("score-worker", "--line", "line-1", "--name", "a", "--model", str(tiny_line.model_dir))
    processes.start(
        "ingest", "--line", "line-1", "--name", "cams", "--source", f"cam0=loop-folder:{images}", "--max-fps", "20"
    )
    wait_until(
        lambda: set(metrics_ports(processes.log_dir)) == set(JOBS),
        timeout_s=120,
        what=f"all three workers to serve /metrics\n{processes.logs()}",
    )
    ports = metrics_ports(processes.log_dir)

    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
        "scrape_configs": [
            {"job_name": JOBS[role], "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for role, port in sorted(ports.items())
        ],
    }
    (prom_dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = (prom_dir / "prometheus.log").open("wb")
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={prom_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = PrometheusApi(port)
    try:
        wait_until(api.ready, timeout_s=30, what="Prometheus to start")

        def p99() -> float | None:
            return api.value('line:lineinspect_end_to_end_latency_seconds:p99{line="line-1"}')

        wait_until(
            lambda: (value := p99()) is not None and math.isfinite(value),
            timeout_s=90,
            what=f"the p99 recording rule\n{processes.logs()}",
        )
        latency = p99()
        assert latency is not None and 0 < latency <= 300  # histogram buckets end at 300 s

        frames = api.value('sum(lineinspect_frames_total{line="line-1"})')
        assert frames is not None and frames > 0
        ingested = api.value('sum(lineinspect_ingested_frames_total{line="line-1", camera="cam0"})')
        assert ingested is not None and ingested > 0
        up = {item["metric"]["job"]: float(item["value"][1]) for item in api.query('up{job=~"lineinspect-.*"}')}
        assert up == {job: 1.0 for job in JOBS.values()}
        lag = api.query('line_stream_group:lineinspect_stream_lag:max{line="line-1", group="scorers"}')
        assert [item["metric"]["stream"] for item in lag] == [f"{stream_prefix}:line-1:frames"]
        assert api.query('lineinspect_model_info{job="lineinspect-score", line="line-1"}')

        def rules() -> list[dict[str, Any]]:
            groups = api.get("/api/v1/rules")["data"]["groups"]
            return [rule for group in groups for rule in group["rules"]]

        wait_until(lambda: all(rule["health"] != "unknown" for rule in rules()), timeout_s=30, what="rule evaluation")
        broken = {rule["name"]: rule.get("lastError") for rule in rules() if rule["health"] != "ok"}
        assert broken == {}
        assert len(rules()) >= 20

        dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "lineinspect.json").read_text())
        titles = [panel["title"] for panel in dashboard["panels"] for _ in panel.get("targets", [])]
        queries = dashboard_queries(DEPLOY)
        assert set(titles) >= ALWAYS_DATA

        def empty_panels() -> list[tuple[str, str]]:
            """Queries of ALWAYS_DATA panels without data; every query must be valid PromQL (api.query asserts)."""
            results = [(title, query, api.query(query)) for title, query in zip(titles, queries, strict=True)]
            return [(title, query) for title, query, result in results if not result and title in ALWAYS_DATA]

        # rates need two scrapes of a series in their window: give the last target to appear up to a minute
        deadline = time.monotonic() + 60
        while (empty := empty_panels()) and time.monotonic() < deadline:
            time.sleep(0.5)  # each poll runs every query
        assert empty == []
        trimmed = api.query('line_stream_group:lineinspect_stream_trimmed_unread:increase15m{line="line-1"}')
        assert [(item["metric"]["stream"], item["metric"]["group"], float(item["value"][1])) for item in trimmed] == [
            (f"{stream_prefix}:line-1:frames", "scorers", 0.0)  # the sink's total, with a line label; nothing lost
        ]
        (workers,) = [
            api.query(query)
            for title, query in zip(titles, queries, strict=True)
            if title == "Model per scoring worker"
        ]
        assert [item["metric"]["name"] for item in workers] == ["a"]  # the join with worker_up names the worker
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
