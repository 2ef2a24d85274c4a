"""Thread caps for scoring workers that share a host (oversubscribed OpenMP threads spin against each other)."""

from __future__ import annotations

import subprocess
import sys

from pipeline.config import config_from_mapping
from workers.run import scorer_threads


def test_run_shares_the_cores_among_its_scorers_unless_configured() -> None:
    default = config_from_mapping({})
    assert default.worker.torch_threads == 0  # torch's own default for a lone daemon
    assert [scorer_threads(default, workers, cores=2) for workers in (1, 2, 3)] == [2, 1, 1]
    assert scorer_threads(default, 2, cores=8) == 4
    assert scorer_threads(config_from_mapping({"worker": {"torch_threads": 3}}), 2, cores=8) == 3


def _run(code: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", **(env or {})}, check=True)  # fmt: skip
    return done.stdout.strip()


def _torch_threads(code: str) -> int:
    return int(_run(code + "; import torch; torch.ones(64, 64) @ torch.ones(64, 64); print(torch.get_num_threads())"))


def test_the_cap_reaches_torch_when_set_before_it_loads() -> None:
    default = _torch_threads("pass")  # a fresh process with no OMP_NUM_THREADS: one thread per core
    assert _torch_threads("from workers.score import limit_threads; limit_threads(0)") == default
    assert _torch_threads("from workers.score import limit_threads; limit_threads(1)") == 1


def test_scorers_shorten_openmp_busy_waiting_unless_the_host_sets_it() -> None:
    show = "from workers.score import limit_threads; limit_threads({}); import os; print(os.environ['GOMP_SPINCOUNT'])"
    assert _run(show.format(0)) == "10000"
    assert _run(show.format(2)) == "10000"
    assert _run(show.format(0), env={"GOMP_SPINCOUNT": "250"}) == "250"
