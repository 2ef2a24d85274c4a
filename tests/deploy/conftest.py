"""Deploy test fixtures: the repo's deploy/ folder, the Prometheus binaries, and the worker tests' tiny model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.workers.conftest import processes, tiny_line  # noqa: F401  (fixtures shared with the worker tests)
from tests.workers.processes import REPO_ROOT

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
