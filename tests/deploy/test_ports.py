"""Default metrics ports: the sink's default is where prometheus.yml scrapes it, and no well-known exporter's."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from pipeline.config import load_config
from tests.workers.processes import REPO_ROOT

NODE_EXPORTER_PORT = 9100


def scrape_ports(deploy_dir: Path, job: str) -> set[int]:
    config = yaml.safe_load((deploy_dir / "prometheus" / "prometheus.yml").read_text())
    (scrape,) = [scrape for scrape in config["scrape_configs"] if scrape["job_name"] == job]
    return {int(target.rsplit(":", 1)[1]) for group in scrape["static_configs"] for target in group["targets"]}


def test_the_sink_metrics_port_default_is_prometheus_ymls_sink_target_not_node_exporters(deploy_dir: Path) -> None:
    built_in = load_config(None, environ={}).sink.metrics_port
    in_file = tomllib.loads((REPO_ROOT / "config.toml").read_text())["sink"]["metrics_port"]
    assert built_in == in_file == load_config(REPO_ROOT / "config.toml", environ={}).sink.metrics_port
    assert built_in != NODE_EXPORTER_PORT
    assert scrape_ports(deploy_dir, "lineinspect-sink") == {built_in}


def test_no_default_or_example_port_is_node_exporters(deploy_dir: Path) -> None:
    defaults = load_config(None, environ={})
    assert defaults.worker.health_port == 0  # a free port: scorers and ingest get theirs from their env files
    for job in ("lineinspect-ingest", "lineinspect-score", "lineinspect-sink"):
        assert NODE_EXPORTER_PORT not in scrape_ports(deploy_dir, job), job
