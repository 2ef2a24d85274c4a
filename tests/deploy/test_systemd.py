"""systemd units: ``systemd-analyze verify`` (where installed) and the keys that make restarts and draining work.

``verify`` needs the ExecStart binary to exist, so it runs on a copy whose install path points at this venv's
``lineinspect``. It prints unknown or malformed settings as warnings with exit status 0, so any output fails the test.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from tests.deploy.conftest import parse_lineinspect, stop_bound_s
from tests.workers.processes import REPO_ROOT

INSTALLED = "/opt/lineinspect/.venv/bin/lineinspect"
# unit -> (example instance, example env file, subcommand)
UNITS = {
    "lineinspect-score@.service": ("line-1-a", "score-line-1-a.env", "score-worker"),
    "lineinspect-ingest@.service": ("cam1", "ingest-cam1.env", "ingest"),
    "lineinspect-sink@.service": ("line-1", "sink-line-1.env", "sink"),
}


def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """section -> [(key, value)] in order (keys such as EnvironmentFile may repeat, so no configparser)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_restarts_on_failure_and_stops_with_a_drain(deploy_dir: Path, unit: str) -> None:
    instance, example_env, subcommand = UNITS[unit]
    entries = unit_entries(deploy_dir / "systemd" / unit)
    service = dict(entries["Service"])
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # SIGTERM to the worker only, not to every thread/child at once
    assert float(service["TimeoutStopSec"]) > stop_bound_s()
    assert "ExecStop" not in service  # systemd would send KillSignal after it: a second SIGTERM skips the drain
    assert service["User"] not in ("root", "0")
    env_files = [value for key, value in entries["Service"] if key == "EnvironmentFile"]
    assert env_files == ["/etc/lineinspect/lineinspect.env", f"/etc/lineinspect/{example_env.split('-')[0]}-%i.env"]
    assert dict(entries["Install"])["WantedBy"] == "multi-user.target"

    environ = {**env_file(deploy_dir / "systemd" / "env" / "lineinspect.env")}
    environ.update(env_file(deploy_dir / "systemd" / "env" / example_env))
    config = load_config(REPO_ROOT / "config.toml", environ=environ)  # every override names a real key
    command = service["ExecStart"].replace("%i", instance).replace("%H", "host")
    command = command.replace("${LINEINSPECT_SOURCE}", environ.get("LINEINSPECT_SOURCE", ""))
    argv = shlex.split(command)
    assert argv[0] == INSTALLED
    args = parse_lineinspect(argv[1:])
    assert args.command == subcommand
    assert args.name == f"host-{subcommand.split('-')[0]}-{instance}"
    port = config.sink.metrics_port if subcommand == "sink" else config.worker.health_port
    assert port not in (0, 9100)  # fixed, for Prometheus; 9100 is node_exporter's
    if subcommand == "score-worker":
        assert config.worker.line_id == "line-1" and config.worker.model_dir is not None
    if subcommand == "ingest":
        assert args.source == ["cam1=" + environ["LINEINSPECT_SOURCE"]]


def test_ports_in_the_example_env_files_match_prometheus_yml(deploy_dir: Path) -> None:
    scrape = (deploy_dir / "prometheus" / "prometheus.yml").read_text()
    for example in ("score-line-1-a.env", "ingest-cam1.env", "sink-line-1.env"):
        ports = [value for key, value in env_file(deploy_dir / "systemd" / "env" / example).items() if "PORT" in key]
        assert ports and all(f"127.0.0.1:{port}" in scrape for port in ports), example


def test_prometheus_yml_scrapes_no_worker_the_examples_do_not_start(deploy_dir: Path) -> None:
    """deploy/README.md's steps start the example units only: a target with nothing behind it is `up == 0`, and
    LineinspectWorkerDown (critical) would page from the first minute of a correct install."""
    config = yaml.safe_load((deploy_dir / "prometheus" / "prometheus.yml").read_text())
    scraped = {
        (scrape["job_name"], target)
        for scrape in config["scrape_configs"]
        if scrape["job_name"].startswith("lineinspect-")
        for group in scrape["static_configs"]
        for target in group["targets"]
    }
    started = set()
    for unit, (_, example, _) in UNITS.items():
        job = "lineinspect-" + unit.removeprefix("lineinspect-").split("@")[0]
        ports = [value for key, value in env_file(deploy_dir / "systemd" / "env" / example).items() if "PORT" in key]
        started |= {(job, f"127.0.0.1:{port}") for port in ports}
    assert scraped == started


def test_systemd_analyze_verify_accepts_the_units(deploy_dir: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed; the key checks above still ran")
    lineinspect = Path(sys.executable).parent / "lineinspect"
    assert lineinspect.exists(), "install the package (pip install -e .) so verify finds the ExecStart binary"
    for unit in UNITS:
        copy = tmp_path / unit
        copy.write_text((deploy_dir / "systemd" / unit).read_text().replace(INSTALLED, str(lineinspect)))
        result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), unit
