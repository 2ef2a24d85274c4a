"""No rule or dashboard panel points at a metric, recording rule or label that the workers do not export.

The reference is what a worker's ``/metrics`` serves: ``Metrics().render()`` after every metric has recorded once
(the test checks that none was left out), parsed as Prometheus text, so histogram ``_bucket``/``_sum``/``_count``
and counter ``_total`` names are the real ones. A metric defined in ``pipeline/metrics.py`` counts only if worker
code records it (``metrics.<attribute>`` or a ``Metrics`` method that records it, called from ``workers/``), or
``Metrics`` itself does (process metrics, build info): a panel on a metric nobody sets would show "No data" forever.
tests/deploy/test_prometheus_e2e.py runs every query against a real Prometheus scraping real workers.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from pipeline.messages import Decision, StageTimings
from pipeline.metrics import STAGES, Metrics
from pipeline.streams import GroupStats
from tests.workers.processes import REPO_ROOT

# Labels that exist without the workers exporting them: Prometheus' target labels, histogram buckets, and the line
# label the recording rules add to stream metrics (label_replace in alerts.yml).
EXTRA_LABELS = {"job", "instance", "le", "line"}
RECORDING_NAME = re.compile(r"^[a-z_]+:lineinspect_[a-z_]+:[a-z0-9_]+$")
PROMQL_KEYWORDS = {"by", "on", "without", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}


def recorded_attributes(worker_sources: Iterable[str]) -> set[str]:
    """``Metrics`` attributes that the given worker sources record, directly or through a ``Metrics`` method."""
    used = {name for source in worker_sources for name in re.findall(r"\bmetrics\.(\w+)", source)}
    tree = ast.parse((REPO_ROOT / "pipeline" / "metrics.py").read_text())
    (metrics_class,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Metrics"]
    recorded = set(used)
    for method in metrics_class.body:
        if isinstance(method, ast.FunctionDef) and method.name in used | {"__init__"}:
            touched = {
                node.attr
                for node in ast.walk(method)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
            }
            # __init__ assigns every metric; only the ones it also records (build_info.labels(...).set) count
            recorded |= (
                touched if method.name != "__init__" else set(re.findall(r"self\.(\w+)\.labels\(", ast.unparse(method)))
            )
    return recorded


def unrecorded_families(metrics: Metrics, worker_sources: Iterable[str]) -> set[str]:
    """Families defined on ``metrics`` that no worker source records."""
    recorded = recorded_attributes(worker_sources)
    return {
        next(iter(collector.describe())).name
        for attribute, collector in vars(metrics).items()
        if isinstance(collector, MetricWrapperBase) and attribute not in recorded
    }


def worker_sources() -> list[str]:
    return [path.read_text() for path in sorted((REPO_ROOT / "workers").glob("*.py"))]


def exported() -> tuple[set[str], set[str]]:
    """(sample names, label names) a worker's /metrics serves once each metric has a value; only metrics a worker
    records count."""
    metrics = Metrics()
    timings = StageTimings(**{f"{stage}_s": 0.01 for stage in STAGES})
    for verdict, reason in (("pass", None), ("fail", None), ("error", "stale")):
        decision = Decision(
            frame_id=f"f-{verdict}",
            line_id="line-1",
            camera_id="cam0",
            verdict=verdict,  # type: ignore[arg-type]
            error_reason=reason,
            score=None if reason else 2.0,
            threshold=None if reason else 4.0,
            timings=timings,
            captured_at_ns=1_000_000_000,
        )
        metrics.observe_decision(decision, published_at_ns=1_100_000_000)
    metrics.batch_size.labels("line-1").observe(8)
    metrics.shifted_frames.labels("line-1").inc()
    metrics.unregistered_frames.labels("line-1").inc()
    metrics.dead_letters.labels("line-1", "not_msgpack").inc()
    metrics.ingested_frames.labels("line-1", "cam0").inc()
    metrics.dropped_frames.labels("line-1", "cam0", "backpressure").inc()
    metrics.duplicates.labels("line-1").inc()
    metrics.heatmaps.labels("line-1").inc()
    metrics.heatmap_failures.labels("line-1").inc()
    frames_group = GroupStats(pending=1, lag=2, last_delivered_id="1-0", trimmed_unread=3)
    metrics.observe_groups("lineinspect:line-1:frames", {"scorers": frames_group})
    metrics.set_model("line-1", "0123456789ab")
    metrics.model_reloads.labels("line-1", "ok").inc()
    metrics.worker_up.labels("score", "a").set(1)

    metrics.watch_redis(lambda: True)

    families = list(text_string_to_metric_families(metrics.render().decode()))
    empty = [family.name for family in families if not family.samples]
    assert empty == [], f"record a value for {empty} in this test so their names are checked"
    unrecorded = unrecorded_families(metrics, worker_sources())
    if "watch_redis" not in recorded_attributes(worker_sources()):
        unrecorded.add("lineinspect_redis_up")
    samples = [sample for family in families if family.name not in unrecorded for sample in family.samples]
    return {sample.name for sample in samples}, {label for sample in samples for label in sample.labels}


def rule_expressions(path: Path) -> tuple[list[str], set[str]]:
    """(every expr, every recording-rule name) in a Prometheus rules file."""
    groups = yaml.safe_load(path.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return [rule["expr"] for rule in rules], {rule["record"] for rule in rules if "record" in rule}


def dashboard_expressions(path: Path) -> list[str]:
    dashboard = json.loads(path.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [variable["query"]["query"] for variable in dashboard["templating"]["list"] if variable["type"] == "query"]
    return exprs


def names_and_labels(expr: str) -> tuple[set[str], set[str]]:
    """Metric-like names and label names used in a PromQL expression (string literals ignored)."""
    matchers = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"", expr))
    grouped = {
        label.strip()
        for clause in re.findall(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr)
        for label in clause.split(",")
        if label.strip()
    }
    bare = re.sub(r'"[^"]*"', '""', expr)
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # range selectors such as [5m] or [$__rate_interval]
    names = {
        token
        for token in re.findall(r"(?<![\w$:.])[a-zA-Z_:][a-zA-Z0-9_:]*", bare)
        if token.startswith(("lineinspect_", "process_")) or ":" in token
    }
    return names, matchers | grouped


@pytest.fixture(scope="module")
def reference() -> tuple[set[str], set[str], set[str]]:
    samples, labels = exported()
    _, recorded = rule_expressions(Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml")
    return samples, labels, recorded


def unknown(exprs: list[str], reference: tuple[set[str], set[str], set[str]]) -> tuple[set[str], set[str]]:
    samples, labels, recorded = reference
    bad_names: set[str] = set()
    bad_labels: set[str] = set()
    for expr in exprs:
        names, used_labels = names_and_labels(expr)
        for name in names:
            known = name in recorded if RECORDING_NAME.match(name) else name in samples
            if not known:
                bad_names.add(name)
        bad_labels |= used_labels - labels - EXTRA_LABELS - PROMQL_KEYWORDS
    return bad_names, bad_labels


def test_the_reference_really_is_the_workers_output(reference: tuple[set[str], set[str], set[str]]) -> None:
    samples, labels, recorded = reference
    assert {"lineinspect_end_to_end_latency_seconds_bucket", "lineinspect_frames_total"} <= samples
    assert {"process_start_time_seconds", "lineinspect_build_info", "lineinspect_heatmap_failures_total"} <= samples
    assert "lineinspect_frames" not in samples  # counters are exported with _total only
    assert {"line", "verdict", "camera", "stream", "group", "model_id"} <= labels
    assert "line:lineinspect_end_to_end_latency_seconds:p99" in recorded


def test_rules_use_only_exported_metrics_and_labels(
    deploy_dir: Path, reference: tuple[set[str], set[str], set[str]]
) -> None:
    exprs, _ = rule_expressions(deploy_dir / "prometheus" / "alerts.yml")
    assert len(exprs) >= 20
    assert unknown(exprs, reference) == (set(), set())


def test_dashboard_uses_only_exported_metrics_and_labels(
    deploy_dir: Path, reference: tuple[set[str], set[str], set[str]]
) -> None:
    exprs = dashboard_expressions(deploy_dir / "grafana" / "dashboards" / "lineinspect.json")
    assert len(exprs) >= 15
    assert unknown(exprs, reference) == (set(), set())


def test_the_checker_catches_a_misspelt_metric_label_and_rule(reference: tuple[set[str], set[str], set[str]]) -> None:
    exprs = [
        'sum by (camra) (rate(lineinspect_frame_total{line="x"}[5m]))',
        "line:lineinspect_end_to_end_latency_seconds:p42",
        'lineinspect_stream_lag{strem="a"}',
    ]
    assert unknown(exprs, reference) == (
        {"lineinspect_frame_total", "line:lineinspect_end_to_end_latency_seconds:p42"},
        {"camra", "strem"},
    )


def test_a_metric_no_worker_records_is_not_in_the_reference() -> None:
    metrics = Metrics()
    sources = worker_sources()
    assert unrecorded_families(metrics, sources) == set()  # today every metric defined is recorded somewhere
    without_sink = [source for source in sources if "class Sink" not in source]
    assert len(without_sink) == len(sources) - 1
    # without the sink nobody records heatmaps, duplicates, or (through observe_decision) verdicts and latencies
    assert {
        "lineinspect_heatmap_failures",
        "lineinspect_heatmaps_written",
        "lineinspect_duplicate_decisions",
        "lineinspect_frames",
        "lineinspect_end_to_end_latency_seconds",
        "lineinspect_stream_lag",
    } <= unrecorded_families(metrics, without_sink)
    assert "lineinspect_batch_size" not in unrecorded_families(metrics, without_sink)
    assert "lineinspect_build_info" not in unrecorded_families(metrics, [])  # Metrics sets it itself
