"""The provisioned dashboard: generated JSON is current, every panel is per line, provisioning files fit together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml


def test_committed_dashboard_is_what_the_generator_writes(deploy_dir: Path) -> None:
    script = deploy_dir / "grafana" / "make_dashboard.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_dashboard_is_per_line_and_covers_what_a_supervisor_needs(deploy_dir: Path) -> None:
    dashboard = json.loads((deploy_dir / "grafana" / "dashboards" / "lineinspect.json").read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["line"]["type"] == "query" and variables["datasource"]["query"] == "prometheus"
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            # a panel is about the chosen line, or says in its title that it shows every line
            assert ('line="$line"' in target["expr"]) != panel["title"].endswith("(every line)"), target["expr"]
    exprs = " ".join(target["expr"] for panel in panels for target in panel["targets"])
    for needed in (
        "lineinspect_frames_total",  # throughput
        "lineinspect_fail_ratio",
        "end_to_end_latency_seconds:p99",
        "stage_latency_seconds:p99",
        "lineinspect_batch_size",
        "stream_lag",
        "stream_pending",
        "lineinspect_dropped_frames_total",
        "lineinspect_dead_letters_total",
        "lineinspect_stream_trimmed_unread",  # frames lost before any scorer read them
        "lineinspect_model_info",
        "sum by (line) (rate(lineinspect_frames_total[5m]))",  # is every line being inspected now
        "lineinspect_heatmap_failures_total",
        "lineinspect_errors_total",
        "process_start_time_seconds",  # restarts
        'up{job=~"lineinspect-.*"}',
    ):
        assert needed in exprs, needed
    cells = set()  # no two panels overlap on the 24-column grid
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))


def test_provisioning_points_at_the_dashboard_folder_compose_mounts(deploy_dir: Path) -> None:
    grafana = deploy_dir / "grafana"
    datasources = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert [source["type"] for source in datasources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load((grafana / "provisioning" / "dashboards" / "lineinspect.yml").read_text())["providers"]
    compose = yaml.safe_load((deploy_dir / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(mount.endswith(":" + providers[0]["options"]["path"] + ":ro") for mount in mounts), mounts


def dashboard_queries(deploy_dir: Path) -> list[str]:
    """Every PromQL query of the dashboard, with Grafana's variables replaced as Grafana would."""
    dashboard = json.loads((deploy_dir / "grafana" / "dashboards" / "lineinspect.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    return [expr.replace("$__rate_interval", "1m").replace("$line", "line-1") for expr in exprs]


def promtool_check_queries(promtool: str, exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    rules = [{"record": f"dashboard:query_{index}:check", "expr": expr} for index, expr in enumerate(exprs)]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def test_promtool_parses_every_dashboard_query(promtool: str, deploy_dir: Path, tmp_path: Path) -> None:
    exprs = dashboard_queries(deploy_dir)
    assert len(exprs) >= 25
    result = promtool_check_queries(promtool, exprs, tmp_path)
    assert result.returncode == 0 and f"{len(exprs)} rules found" in result.stdout, result.stdout + result.stderr
    broken = promtool_check_queries(promtool, ["sum by (line (rate(lineinspect_frames_total[5m]))"], tmp_path)
    assert broken.returncode != 0  # the check can fail
