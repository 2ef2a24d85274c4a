"""Dockerfile and deploy/compose.yaml: the services asked for, real CLI commands, drain-length grace, valid compose.

No image is built here (the bases are several GB); ``docker compose config`` validates the file when Docker's compose
plugin is installed, else the older ``docker-compose`` (which predates the top-level ``name`` key) checks the rest.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import parse_lineinspect, stop_bound_s
from tests.workers.processes import REPO_ROOT
from workers.lifecycle import default_worker_name

ROLE_OF_COMMAND = {"ingest": "ingest", "score-worker": "score", "sink": "sink"}


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", text)
    assert match, text
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


@pytest.fixture(scope="module")
def compose(deploy_dir: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((deploy_dir / "compose.yaml").read_text()))


def test_compose_has_the_services_with_real_commands_and_drain_time(compose: dict[str, Any], deploy_dir: Path) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "ingest", "score-worker", "sink", "prometheus", "grafana"}
    for name, command in ROLE_OF_COMMAND.items():
        service = services[name]
        args = parse_lineinspect(service["command"])
        assert args.command == name
        assert args.config == Path("/etc/lineinspect/config.toml")
        assert getattr(args, "name", None) is None  # the health check finds the default <hostname>-<role> name
        assert service["environment"]["LINEINSPECT_ROLE"] == command
        assert service["environment"]["REDIS_URL"].startswith("redis://redis:6379")
        assert seconds(service["stop_grace_period"]) > stop_bound_s()
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "--appendonly" in services["redis"]["command"]
    model_mounts = [mount for mount in services["score-worker"]["volumes"] if ":/models/" in mount]
    assert model_mounts and all(mount.endswith(":ro") for mount in model_mounts)
    for service in ("prometheus", "grafana"):
        for mount in services[service]["volumes"]:
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (deploy_dir / source).exists(), mount


def test_compose_file_passes_docker_compose_config(deploy_dir: Path, tmp_path: Path) -> None:
    docker = shutil.which("docker")
    plugin = docker is not None and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    files = [deploy_dir / "compose.yaml", deploy_dir / "compose.gpu.yaml"]
    if plugin:
        assert docker is not None
        command = [docker, "compose", "--project-directory", str(deploy_dir)]
    elif shutil.which("docker-compose"):
        legacy = tmp_path / "compose.yaml"  # docker-compose 1.x rejects only the newer top-level `name`
        legacy.write_text(
            "".join(line for line in files[0].read_text().splitlines(True) if not line.startswith("name:"))
        )
        files[0] = legacy
        command = ["docker-compose", "--project-directory", str(deploy_dir)]
    else:
        pytest.skip("neither `docker compose` nor docker-compose is installed; the YAML checks above still ran")
    for path in files:
        command += ["-f", str(path)]
    result = subprocess.run([*command, "config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert (
        resolved["services"]["score-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    )


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_has_both_bases_a_non_root_user_and_a_check_health_check() -> None:
    instructions = dockerfile_instructions()
    bases = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert any(base.startswith("nvidia/cuda:") and "runtime" in base for base in bases)
    assert any(base.startswith("python:3.11-slim") for base in bases)
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = [rest for keyword, rest in instructions if keyword == "HEALTHCHECK"]
    assert len(health) == 1 and "lineinspect check" in health[0]
    # the check names this container's worker the way the worker names itself
    assert '--name "$HOSTNAME-$LINEINSPECT_ROLE"' in health[0]
    assert default_worker_name("score") == f"{socket.gethostname()}-score"
    assert ("ENTRYPOINT", '["lineinspect"]') in instructions
    for keyword, rest in instructions:
        if keyword == "COPY" and not rest.startswith("--from"):
            source = rest.split()[0]
            assert (REPO_ROOT / source).exists(), source
    pins = dict(re.findall(r"(torch|torchvision)==([\w.]+)", (REPO_ROOT / "Dockerfile").read_text()))
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert all(f'"{name}=={version}"' in pyproject for name, version in pins.items()), pins
