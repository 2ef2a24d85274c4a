"""``lineinspect run`` end to end, as a newcomer runs it (small frame count and image size to stay fast)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.config import RedisSettings, StreamSettings
from pipeline.streams import LineKeys, StreamClient, health_key
from tests.workers.helpers import wait_until
from tests.workers.processes import REPO_ROOT

pytestmark = pytest.mark.slow


def test_run_fits_streams_and_summarises_the_demo_line(tmp_path: Path, redis_url: str) -> None:
    pytest.importorskip("models.synthetic")
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "PYTHONPATH": str(REPO_ROOT),
        "LINEINSPECT__SINK__METRICS_PORT": "0",
        "LINEINSPECT__STREAMS__PREFIX": f"run-test-{uuid.uuid4().hex[:10]}",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "run",
            "--frames",
            "24",
            "--image-size",
            "64",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert re.search(r"frames decided\s+24\b", output), output[-3000:]
    auroc = re.search(r"image AUROC\s+([0-9.]+)", output)
    assert auroc is not None and 0.0 <= float(auroc.group(1)) <= 1.0
    known = re.search(r"verdicts\s+(\d+) of (\d+) good frames rejected, (\d+) of (\d+) defective caught", output)
    assert known is not None, output[-3000:]
    rejected, good, caught, defective = (int(value) for value in known.groups())
    decided = re.search(r"'pass': (\d+), 'fail': (\d+)", output)
    assert decided is not None and good + defective == int(decided.group(1)) + int(decided.group(2))
    assert rejected + caught == int(decided.group(2)) and rejected <= good and caught <= defective
    assert (tmp_path / "out" / "model" / "manifest.json").exists()
    assert sorted(path.name for path in (tmp_path / "out" / "logs").iterdir())


def test_ctrl_c_drains_the_workers_and_still_prints_the_summary(tmp_path: Path, redis_url: str) -> None:
    pytest.importorskip("models.synthetic")
    prefix = f"run-test-{uuid.uuid4().hex[:10]}"  # unique: a shared REDIS_URL keeps earlier runs' streams
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "PYTHONPATH": str(REPO_ROOT),
        "LINEINSPECT__SINK__METRICS_PORT": "0",
        "LINEINSPECT__STREAMS__PREFIX": prefix,
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "run",
            "--frames",
            "0",
            "--image-size",
            "64",
            "--fps",
            "5",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = StreamClient(redis_url, RedisSettings(), StreamSettings(prefix=prefix))
    try:
        wait_until(lambda: client.length(LineKeys(prefix, "line-1").decisions) >= 5, timeout_s=240, what="decisions")
    finally:
        run.send_signal(signal.SIGINT)
        output, _ = run.communicate(timeout=120)
    assert run.returncode == 0, output[-3000:]
    assert "summary" in output
    logs = "".join(path.read_text() for path in (tmp_path / "out" / "logs").iterdir())
    assert logs.count('"msg": "worker stopped"') == 3  # ingest, scoring worker and sink all exited cleanly
    assert client.read_health(prefix) == []


def test_ctrl_c_while_the_workers_load_sends_no_frame(tmp_path: Path, redis_url: str) -> None:
    # ingest was started anyway once the wait for the workers ended, and sent frames to a line being stopped
    pytest.importorskip("models.synthetic")
    prefix = f"run-test-{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(REPO_ROOT), "LINEINSPECT__SINK__METRICS_PORT": "0",
           "LINEINSPECT__STREAMS__PREFIX": prefix, "OMP_NUM_THREADS": "1"}  # fmt: skip
    out = tmp_path / "out"
    run = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "run", "--frames", "0", "--image-size", "64", "--out", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert run.stdout is not None
    seen = []
    for line in run.stdout:  # the fit, then the workers start
        seen.append(line)
        if line.startswith("waiting for the workers to load the model"):
            run.send_signal(signal.SIGINT)
            break
    output = "".join(seen) + run.communicate(timeout=180)[0]
    assert run.returncode == 0, output[-3000:]
    assert "stopped before any frame was sent" in output and "started ingest" not in output
    assert not list((out / "logs").glob("ingest*"))
    assert (
        StreamClient(redis_url, RedisSettings(), StreamSettings(prefix=prefix)).length(
            LineKeys(prefix, "line-1").frames
        )
        == 0
    )


def test_run_refuses_a_line_no_worker_may_run_before_fitting_or_touching_redis(tmp_path: Path, redis_url: str) -> None:
    # run took --line as given: it made the demo line, fitted, and wrote the model key P:health:score:model (scorer
    # 'model''s heartbeat, of another line) before its workers, which refuse such a line, exited at start
    prefix = f"run-test-{uuid.uuid4().hex[:10]}"
    client = StreamClient(redis_url, RedisSettings(), StreamSettings(prefix=prefix))
    beat = health_key(prefix, "score", "model")
    client.write_health(beat, {"role": "score", "name": "model", "line": "line-1", "state": "ok"}, 60)
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(REPO_ROOT), "LINEINSPECT__SINK__METRICS_PORT": "0",
           "LINEINSPECT__STREAMS__PREFIX": prefix, "OMP_NUM_THREADS": "1"}  # fmt: skip
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "run", "--line", "health:score", "--model", str(tmp_path / "model"),
         "--image-size", "64", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert "--line 'health:score' is reserved: 'health' names the workers' heartbeat keys" in result.stderr
    assert client.read_health(prefix) == [{"role": "score", "name": "model", "line": "line-1", "state": "ok"}]
    assert not out.exists()  # no demo line made, no worker started
