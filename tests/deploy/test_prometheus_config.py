"""promtool accepts the scrape configs and the rules, and the rules' own unit tests (alerts_test.yml) pass."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

JOBS = {"lineinspect-ingest", "lineinspect-score", "lineinspect-sink"}


def promtool_run(promtool: str, *args: str) -> str:
    result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.compose.yml"])
def test_promtool_accepts_the_scrape_config(promtool: str, deploy_dir: Path, name: str) -> None:
    path = deploy_dir / "prometheus" / name
    assert "SUCCESS" in promtool_run(promtool, "check", "config", str(path))
    config = yaml.safe_load(path.read_text())
    assert {job["job_name"] for job in config["scrape_configs"]} >= JOBS  # alerts.yml relies on these names
    assert config["rule_files"] == ["alerts.yml"]


def test_promtool_accepts_the_rules(promtool: str, deploy_dir: Path) -> None:
    output = promtool_run(promtool, "check", "rules", str(deploy_dir / "prometheus" / "alerts.yml"))
    assert "SUCCESS" in output


def test_alert_unit_tests_pass(promtool: str, deploy_dir: Path) -> None:
    output = promtool_run(promtool, "test", "rules", str(deploy_dir / "prometheus" / "alerts_test.yml"))
    assert "SUCCESS" in output


def test_every_requested_alert_and_recording_rule_exists(deploy_dir: Path) -> None:
    groups = yaml.safe_load((deploy_dir / "prometheus" / "alerts.yml").read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    alerts = {rule["alert"] for rule in rules if "alert" in rule}
    recorded = {rule["record"] for rule in rules if "record" in rule}
    assert {
        "LineinspectLatencyP99High",
        "LineinspectStreamLagGrowing",
        "LineinspectDeadLetters",
        "LineinspectFailRateJump",
        "LineinspectScoreDrift",
        "LineinspectWorkerDown",
        "LineinspectCameraSilent",
        "LineinspectModelMismatch",
        "LineinspectLineStopped",
        "LineinspectHeatmapFailures",
        "LineinspectWorkerRestarting",
        "LineinspectFramesTrimmedUnread",
    } <= alerts
    assert {f"line:lineinspect_end_to_end_latency_seconds:p{q}" for q in (50, 95, 99)} <= recorded
    assert "line_stream_group:lineinspect_stream_trimmed_unread:increase15m" in recorded
    tested = yaml.safe_load((deploy_dir / "prometheus" / "alerts_test.yml").read_text())["tests"]
    exercised = {case["alertname"] for test in tested for case in test.get("alert_rule_test", [])}
    assert alerts - exercised == set()  # every alert has a promtool case
    firing = {case["alertname"] for test in tested for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert alerts - firing == set()  # ... in which it fires, not only one where it stays quiet
