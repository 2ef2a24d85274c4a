"""Start lineinspect workers as real separate processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class WorkerProcesses:
    """Launches ``python -m workers.cli ...`` children sharing one environment; kills leftovers."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{'-'.join(args[:4]).replace('/', '_')}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *args],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(self.log_dir.glob("*.log")))


def worker_env(redis_url: str, prefix: str, tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "REDIS_URL": redis_url,
            "PYTHONPATH": str(REPO_ROOT),
            "LINEINSPECT__STREAMS__PREFIX": prefix,
            "LINEINSPECT__STREAMS__CLAIM_IDLE_MS": "1000",
            "LINEINSPECT__STREAMS__BLOCK_MS": "100",
            "LINEINSPECT__REDIS__RECONNECT_MAX_BACKOFF_S": "0.5",
            "LINEINSPECT__MODEL__DEVICE": "cpu",
            "LINEINSPECT__WORKER__MAX_BATCH": "4",
            "LINEINSPECT__SINK__HEATMAP_DIR": str(tmp_path / "heatmaps"),
            "LINEINSPECT__SINK__METRICS_PORT": "0",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(overrides)
    return env
