"""Write deploy/grafana/dashboards/lineinspect.json, the provisioned per-line dashboard (Grafana 10/11).

    python deploy/grafana/make_dashboard.py          # rewrite the JSON
    python deploy/grafana/make_dashboard.py --check  # exit 1 if the committed JSON differs (tests run this)

The panels are the ``ROWS`` table below: title, PromQL (``$line`` is the template variable), legend, unit. Queries use
the workers' metrics and the recording rules of deploy/prometheus/alerts.yml; tests/deploy checks that every name
exists. Standard library only: the generated JSON is committed, so Grafana needs nothing from this script.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "lineinspect.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
LINE = 'line="$line"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    description: str = ""
    width: int = 8


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    (
        "Every line now",
        (
            Panel(
                "Decisions per second (every line)",
                (Query("sum by (line) (rate(lineinspect_frames_total[5m]))", "{{line}}"),),
                unit="reqps",
                kind="stat",
                description="Decisions published over the last 5 minutes, per line. A line at 0 whose cameras still "
                "send frames is not being inspected (alert LineinspectLineStopped).",
            ),
            Panel(
                "Frames in per second (every line)",
                (Query("sum by (line) (rate(lineinspect_ingested_frames_total[5m]))", "{{line}}"),),
                unit="reqps",
                kind="stat",
                description="Frames ingest published over the last 5 minutes, per line: compare with the decisions.",
            ),
            Panel(
                "Fail share, 15 min (every line)",
                (Query("line:lineinspect_fail_ratio:rate15m", "{{line}}"),),
                unit="percentunit",
                kind="stat",
                description="Failed / (passed + failed) over 15 minutes, per line (alert LineinspectFailRateJump "
                "compares it with the line's last day).",
            ),
        ),
    ),
    (
        "Decisions",
        (
            Panel(
                "Throughput by verdict",
                (
                    Query(
                        f"sum by (verdict) (rate(lineinspect_frames_total{{{LINE}}}[$__rate_interval]))", "{{verdict}}"
                    ),
                ),
                unit="reqps",
                description="Published decisions per second (one per frame).",
            ),
            Panel(
                "Fail share (15 min vs 1 day) and errors",
                (
                    Query(f"line:lineinspect_fail_ratio:rate15m{{{LINE}}}", "fail share, 15 min"),
                    Query(f"line:lineinspect_fail_ratio:rate1d{{{LINE}}}", "fail share, 1 day"),
                    Query(
                        f"sum(rate(lineinspect_errors_total{{{LINE}}}[$__rate_interval]))"
                        f" / sum(rate(lineinspect_frames_total{{{LINE}}}[$__rate_interval]))",
                        "error share",
                    ),
                ),
                unit="percentunit",
                description="Failed / (passed + failed). The alert LineinspectFailRateJump compares the two lines.",
            ),
            Panel(
                "Model per scoring worker",
                (
                    Query(
                        f'max by (name, model_id) (lineinspect_model_info{{{LINE}, job="lineinspect-score"}}'
                        ' * on (instance) group_left (name) lineinspect_worker_up{role="score"})',
                        "{{name}}: {{model_id}}",
                    ),
                ),
                kind="stat",
                description="The model id (first 12 digits of its content hash) each scoring worker of the line runs; "
                "two ids for one line is a mismatch (alert LineinspectModelMismatch).",
            ),
        ),
    ),
    (
        "Score drift",
        (
            Panel(
                "Image score / threshold (1 = pass/fail boundary)",
                tuple(
                    Query(
                        f"histogram_quantile({quantile}, sum by (le) "
                        f"(rate(lineinspect_score_threshold_ratio_bucket{{{LINE}}}[$__rate_interval])))",
                        name,
                    )
                    for quantile, name in (("0.5", "median"), ("0.9", "p90"), ("0.99", "p99"))
                ),
                description="Scores relative to the threshold. A median or p90 creeping towards 1 (light, camera, "
                "material drift) shows before the fail share rises: recalibrate or re-fit then.",
                width=24,
            ),
        ),
    ),
    (
        "Latency",
        (
            Panel(
                "End-to-end latency (capture to decision)",
                (
                    Query(f"line:lineinspect_end_to_end_latency_seconds:p50{{{LINE}}}", "p50"),
                    Query(f"line:lineinspect_end_to_end_latency_seconds:p95{{{LINE}}}", "p95"),
                    Query(f"line:lineinspect_end_to_end_latency_seconds:p99{{{LINE}}}", "p99"),
                ),
                unit="s",
            ),
            Panel(
                "Stage latency p50",
                (Query(f"line_stage:lineinspect_stage_latency_seconds:p50{{{LINE}}}", "{{stage}}"),),
                unit="s",
            ),
            Panel(
                "Stage latency p99",
                (Query(f"line_stage:lineinspect_stage_latency_seconds:p99{{{LINE}}}", "{{stage}}"),),
                unit="s",
            ),
        ),
    ),
    (
        "Scoring and streams",
        (
            Panel(
                "Batch size",
                (
                    Query(
                        f"sum(rate(lineinspect_batch_size_sum{{{LINE}}}[$__rate_interval]))"
                        f" / sum(rate(lineinspect_batch_size_count{{{LINE}}}[$__rate_interval]))",
                        "mean",
                    ),
                    Query(
                        "histogram_quantile(0.95, sum by (le) "
                        f"(rate(lineinspect_batch_size_bucket{{{LINE}}}[$__rate_interval])))",
                        "p95",
                    ),
                ),
                description="Frames per scored batch (up to worker.max_batch).",
                width=6,
            ),
            Panel(
                "Frames shifted, frames not registered",
                (
                    Query(
                        f"sum(rate(lineinspect_shifted_frames_total{{{LINE}}}[$__rate_interval]))"
                        f" / sum(rate(lineinspect_batch_size_sum{{{LINE}}}[$__rate_interval]))",
                        "scored again with shifts",
                    ),
                    Query(
                        f"sum(rate(lineinspect_unregistered_frames_total{{{LINE}}}[$__rate_interval]))"
                        f" / sum(rate(lineinspect_batch_size_sum{{{LINE}}}[$__rate_interval]))",
                        "not registered",
                    ),
                ),
                unit="percentunit",
                description="Shares of scored frames. Shifted: failed unshifted and scored again at N-pad's shifted "
                "views (each costs about five frames of scoring): when this rises, so does the scorers' load. Not "
                "registered (models that register parts): too unlike the good frames' pose to be moved into it, "
                "scored as they came: the camera or fixture moved, the light changed, or another part is on the line.",
                width=6,
            ),
            Panel(
                "Stream lag (not yet delivered)",
                (Query(f"line_stream_group:lineinspect_stream_lag:max{{{LINE}}}", "{{group}}"),),
                description="scorers: frames waiting for a scoring worker (ingest holds back at live_queue_limit); "
                "sinks: results waiting for the sink. KEDA scales scorers on the first.",
                width=6,
            ),
            Panel(
                "Stream pending (delivered, not acknowledged)",
                (Query(f"line_stream_group:lineinspect_stream_pending:max{{{LINE}}}", "{{group}}"),),
                description="Frames in workers' hands; stuck entries are claimed after streams.claim_idle_ms.",
                width=6,
            ),
        ),
    ),
    (
        "Cameras and losses",
        (
            Panel(
                "Frames in per camera",
                (
                    Query(
                        f"sum by (camera) (rate(lineinspect_ingested_frames_total{{{LINE}}}[$__rate_interval]))",
                        "{{camera}}",
                    ),
                ),
                unit="reqps",
                width=5,
            ),
            Panel(
                "Dropped frames per camera",
                (
                    Query(
                        f"sum by (camera, reason) (rate(lineinspect_dropped_frames_total{{{LINE}}}[$__rate_interval]))",
                        "{{camera}} {{reason}}",
                    ),
                ),
                unit="reqps",
                description="Frames not sent, by reason: backpressure (a live camera's oldest frames, while the "
                "scorers' backlog is at ingest.live_queue_limit), too_large (over streams.max_frame_bytes) or invalid "
                "(ids or metadata over the wire's limits).",
                width=5,
            ),
            Panel(
                "Frames trimmed unread, 15 min",
                (
                    Query(
                        f'line_stream_group:lineinspect_stream_trimmed_unread:increase15m{{{LINE}, group="scorers"}}',
                        "lost, no decision",
                    ),
                ),
                description="Frames trimmed from the frames stream (streams.maxlen) before any scorer read them: no "
                "decision, no dead letter. Redis 7+ counts them once the scorers catch up or their lag exceeds the "
                "stream's length, and the sink exports them. Alert LineinspectFramesTrimmedUnread.",
                width=4,
            ),
            Panel(
                "Dead letters and error decisions by reason",
                (
                    Query(
                        f"sum by (reason) (rate(lineinspect_dead_letters_total{{{LINE}}}[$__rate_interval]))",
                        "dead letter: {{reason}}",
                    ),
                    Query(
                        f"sum by (reason) (rate(lineinspect_errors_total{{{LINE}}}[$__rate_interval]))",
                        "error: {{reason}}",
                    ),
                ),
                unit="reqps",
                description="Dead letters: entries that could not be processed (frames with a readable id also get an "
                "error decision). Error decisions: frames decided 'error' (stale, undecodable, uncalibrated model).",
                width=5,
            ),
            Panel(
                "Heatmaps written and failed",
                (
                    Query(f"sum(rate(lineinspect_heatmaps_written_total{{{LINE}}}[$__rate_interval]))", "written"),
                    Query(f"sum(rate(lineinspect_heatmap_failures_total{{{LINE}}}[$__rate_interval]))", "failed"),
                ),
                unit="reqps",
                description="Overlays the sink wrote (failed frames, or all with sink.save_all_heatmaps) and "
                "decisions published without theirs (disk full, heatmap_dir not writable; the sink logs the error; "
                "alert LineinspectHeatmapFailures).",
                width=5,
            ),
        ),
    ),
    (
        "Workers",
        (
            Panel(
                "Workers up / reaching Redis (every line)",
                (
                    Query('sum by (job) (up{job=~"lineinspect-.*"})', "{{job}} up"),
                    Query('sum by (job) (lineinspect_redis_up{job=~"lineinspect-.*"})', "{{job}} reach Redis"),
                ),
                kind="stat",
                description="Scrape targets answering, per role (alert LineinspectWorkerDown), and how many of them "
                "reached Redis with a PING at the scrape (alert LineinspectRedisUnreachable): fewer is an outage, "
                "which stops the line without any worker being down.",
                width=4,
            ),
            Panel(
                "Worker restarts, last hour (every line)",
                (
                    Query(
                        'sum by (job, instance) (changes(process_start_time_seconds{job=~"lineinspect-.*"}[1h]))',
                        "{{job}} {{instance}}",
                    ),
                ),
                kind="stat",
                description="New processes behind one scrape target (systemd or Docker restarts, a pod's container "
                "restarted); a rescheduled pod is a new target instead. Alert LineinspectWorkerRestarting.",
                width=5,
            ),
            Panel(
                "Resident memory (every line)",
                (
                    Query(
                        'max by (job, instance) (process_resident_memory_bytes{job=~"lineinspect-.*"})',
                        "{{job}} {{instance}}",
                    ),
                ),
                unit="bytes",
                description="Per worker process. A scorer holds its model (the fused default's bank and Gaussians) "
                "and torch; steady growth is a leak (benchmarks/memory_soak.py).",
                width=5,
            ),
            Panel(
                "Model reloads (last hour)",
                (
                    Query(
                        f"sum by (outcome) (increase(lineinspect_model_reloads_total{{{LINE}}}[1h]))",
                        "{{outcome}}",
                    ),
                ),
                kind="stat",
                width=5,
            ),
            Panel(
                "Duplicate decisions suppressed",
                (
                    Query(
                        f"sum(rate(lineinspect_duplicate_decisions_total{{{LINE}}}[$__rate_interval]))",
                        "duplicates",
                    ),
                ),
                unit="reqps",
                description="Redelivered frames whose decision was already published (after a worker died).",
                width=5,
            ),
        ),
    ),
)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {"datasource": DATASOURCE, "expr": query.expr, "legendFormat": query.legend, "refId": chr(ord("A") + index)}
        for index, query in enumerate(panel.queries)
    ]
    body: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
    }
    if panel.kind == "stat":
        body["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "value_and_name",
            "colorMode": "none",
        }
    else:
        body["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    return body


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    panel_id, y = 1, 0
    for row_title, row_panels in ROWS:
        panels.append(
            {"id": panel_id, "type": "row", "title": row_title, "collapsed": False, "panels": [],
             "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}
        )  # fmt: skip
        panel_id, y, x = panel_id + 1, y + 1, 0
        for panel in row_panels:
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id, x = panel_id + 1, x + panel.width
        y += 8
    line_variable = {
        "name": "line",
        "label": "Line",
        "type": "query",
        "datasource": DATASOURCE,
        "definition": "label_values(lineinspect_model_info, line)",
        "query": {"query": "label_values(lineinspect_model_info, line)", "refId": "line"},
        "refresh": 2,
        "sort": 1,
        "includeAll": False,
        "multi": False,
    }
    datasource_variable = {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"}
    return {
        "uid": "lineinspect-line",
        "title": "lineinspect: line",
        "description": "One inspection line: decisions, latency, scoring, streams, cameras, workers. Generated by "
        "deploy/grafana/make_dashboard.py.",
        "tags": ["lineinspect"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "templating": {"list": [datasource_variable, line_variable]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python deploy/grafana/make_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
