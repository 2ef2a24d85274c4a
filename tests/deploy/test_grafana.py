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
            assert 'line="$line"' in target["expr"] or panel["title"] == "Workers up", target["expr"]
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
        "lineinspect_model_info",
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
