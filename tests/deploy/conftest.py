"""Deploy test fixtures: the repo's deploy/ folder, the Prometheus binaries, and the worker tests' tiny model."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import pytest

from pipeline.config import load_config
from tests.workers.conftest import processes, tiny_line  # noqa: F401  (fixtures shared with the worker tests)
from tests.workers.processes import REPO_ROOT
from workers.stream_commands import add_stream_commands

DEPLOY = REPO_ROOT / "deploy"


def required_tool(name: str) -> str:
    """Path of ``name``; skips when absent outside CI, fails in CI (where .ci/run installs it)."""
    path = shutil.which(name)
    if path is not None:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed, and CI must run this test (.ci/run installs Debian's prometheus)")
    pytest.skip(f"{name} not installed (apt-get install prometheus); CI installs it and runs this test")


@pytest.fixture(scope="session")
def promtool() -> str:
    return required_tool("promtool")


@pytest.fixture(scope="session")
def prometheus() -> str:
    return required_tool("prometheus")


@pytest.fixture(scope="session")
def deploy_dir() -> Path:
    return DEPLOY


def parse_lineinspect(argv: list[str]) -> argparse.Namespace:
    """Parse a deploy file's command line with the real CLI parser (fails on an unknown subcommand or option)."""
    parser = argparse.ArgumentParser(prog="lineinspect", exit_on_error=False)
    add_stream_commands(parser.add_subparsers(dest="command", required=True))
    try:
        return parser.parse_args(argv)
    except SystemExit:  # argparse exits on some errors even with exit_on_error=False
        pytest.fail(f"lineinspect rejects {argv}")


def stop_bound_s() -> float:
    """How long a worker may take to exit after SIGTERM with config.toml's settings, which supervisors' grace periods
    must exceed: worker.drain_timeout_s to finish what it holds (retries through a Redis outage end there too), then
    joining its in-hand keeper, which may be inside one Redis call (redis.connect_timeout_s + 1 s, workers/in_hand.py),
    then waiting for a heartbeat write in flight before removing its key (one socket timeout, connect_timeout_s +
    streams.block_ms, WorkerRuntime.exit_wait_s)."""
    config = load_config(REPO_ROOT / "config.toml", environ={})
    keeper_join_s = config.redis.connect_timeout_s + 1.0
    key_removal_s = config.redis.connect_timeout_s + config.streams.block_ms / 1000.0
    return config.worker.drain_timeout_s + keeper_join_s + key_removal_s
