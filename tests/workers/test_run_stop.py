"""``lineinspect run``'s own process: how long it lets its workers drain before SIGKILL, and the threads its fit uses.

Pure process tests: the children are small Python programs that take as long to exit after SIGTERM as a worker may.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Config, config_from_mapping, load_config
from tests.workers.processes import REPO_ROOT
from workers.lifecycle import stop_bound_s
from workers.run import _prepare_model, stop_on_signals, stop_workers

# Installs a SIGTERM handler, says so, and exits 0 the given number of seconds after SIGTERM: a worker draining.
SLOW_TO_STOP = """
import signal, sys, time
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(time.monotonic()))
print("ready", flush=True)
while not stopping:
    time.sleep(0.02)
time.sleep(float(sys.argv[1]))
"""


def slow_to_stop(exit_after_sigterm_s: float) -> subprocess.Popen[bytes]:
    child = subprocess.Popen([sys.executable, "-c", SLOW_TO_STOP, str(exit_after_sigterm_s)], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"
    return child


def test_run_gives_each_worker_its_whole_stop_bound_before_killing_it(config: Config) -> None:
    # run SIGKILLed scorers worker.drain_timeout_s + 5 s after SIGTERM (30 s) and the sink after 15 s, below what a
    # worker may take (drain, keeper join, key removal: 36.2 s with config.toml): a Ctrl-C could kill a draining
    # scorer or sink. Here drain_timeout_s = 1 s makes that bound 12 s, and a scorer taking 8 s (within it) was killed
    # at 6 s.
    data = config.model_dump(mode="json")
    data["worker"]["drain_timeout_s"] = 1.0
    settings = config_from_mapping(data)
    assert stop_bound_s(settings) > 8.0  # the scorers below exit within the bound
    ingest, scorers, sink = slow_to_stop(0.0), [slow_to_stop(8.0), slow_to_stop(8.0)], slow_to_stop(1.0)
    try:
        stop_workers(settings, ingest, scorers, sink)
    finally:
        for child in (ingest, *scorers, sink):
            if child.poll() is None:
                child.kill()
                child.wait()
    assert [child.returncode for child in (ingest, *scorers, sink)] == [0, 0, 0, 0]  # none killed (-9)


def run_stopping_its_workers() -> None:
    """What ``lineinspect run`` does once its workers run (run by the test below): Ctrl-C handlers, then, once asked
    to stop, ``stop_workers`` on workers that take a minute to drain (config.toml's stop bound: 41 s each)."""
    stop, at_once = stop_on_signals()
    ingest, scorers, sink = slow_to_stop(0.0), [slow_to_stop(60.0), slow_to_stop(60.0)], slow_to_stop(60.0)
    print("ready", flush=True)
    stop.wait()
    print("stopping", flush=True)
    stop_workers(load_config(environ={}), ingest, scorers, sink, at_once)
    print(" ".join(str(child.returncode) for child in (ingest, *scorers, sink)), flush=True)


def test_a_second_ctrl_c_stops_runs_workers_at_once() -> None:
    # Since run waits each group of workers its whole stop bound (2e79f6a: 41 s with config.toml, so over two minutes
    # for ingest, scorers and sink in turn), a second Ctrl-C only set the stop event again: the user waited it out.
    code = "from tests.workers.test_run_stop import run_stopping_its_workers; run_stopping_its_workers()"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE)
    try:
        assert run.stdout is not None and run.stdout.readline() == b"ready\n"
        run.send_signal(signal.SIGINT)
        assert run.stdout.readline() == b"stopping\n"
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=30) == 0  # a hang guard: before, it returned only after the scorers' bound, 41 s
        assert run.stdout.read().split()[1:] == [b"-9", b"-9", b"-9"]  # scorers and sink killed, not waited for
    finally:
        run.kill()
        run.wait()


def test_run_fits_its_model_under_the_configured_torch_threads(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `fit` and `calibrate` keep to [worker] torch_threads (88a09bf); `run` fitted in its own process with one
    # thread per core (here OMP_NUM_THREADS=1 from the environment) whatever the config said.
    torch = pytest.importorskip("torch")
    import models.fit

    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT"):  # limit_threads sets them: restored
        monkeypatch.setenv(variable, os.environ.get(variable, "1"))
    threads_before = torch.get_num_threads()
    wanted = threads_before + 1
    seen: dict[str, object] = {}

    class FitCalled(Exception):
        pass

    def fake_fit(*_args: object, **_kwargs: object) -> None:
        seen["threads"], seen["omp"] = torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]
        raise FitCalled

    monkeypatch.setattr(models.fit, "fit_scorer", fake_fit)
    data = config.model_dump(mode="json")
    data["worker"]["torch_threads"] = wanted
    try:
        with pytest.raises(FitCalled):
            _prepare_model(argparse.Namespace(model=None), config_from_mapping(data), tmp_path)
    finally:
        torch.set_num_threads(threads_before)
    assert seen == {"threads": wanted, "omp": str(wanted)}
