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
from workers.lifecycle import stop_bound_s as worker_stop_bound_s
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
    """How long a worker may take to exit after SIGTERM with config.toml's settings (``workers.lifecycle.stop_bound_s``,
    the one definition ``lineinspect run`` waits by too), which supervisors' grace periods must exceed."""
    return worker_stop_bound_s(load_config(REPO_ROOT / "config.toml", environ={}))
