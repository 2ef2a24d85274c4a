"""A scoring worker loading its model for longer than the heartbeat's TTL, against a real Redis and model: it is
shown *starting* (alive, not ready; its key in Redis says so, and ``lineinspect check`` prints it) up to
``worker.max_startup_s``, and taken for hung past it."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config import Config, config_from_mapping
from pipeline.health import HUNG_EXIT_STATUS
from pipeline.streams import LineKeys
from tests.workers.conftest import TinyLine
from tests.workers.helpers import start_thread, wait_until
from tests.workers.test_score_slow_batches import HEARTBEAT_TTL_S, status
from workers.cli import main
from workers.lifecycle import WorkerRuntime
from workers.score import ModelSlot, ScorerLike, load_model


def gated_loader(gate: threading.Event, loading: threading.Event) -> Callable[[Path], ScorerLike]:
    """The real loader, but it waits until ``gate`` opens: a model load as slow as the test wants (a big model, a
    slow disk)."""

    def load(model_dir: Path) -> ScorerLike:
        loading.set()
        assert gate.wait(timeout=120), "the test never opened the gate"
        return load_model("cpu")(model_dir)

    return load


def start_loading(
    runtime: WorkerRuntime, model_dir: Path, gate: threading.Event
) -> tuple[threading.Thread, list[ModelSlot]]:
    """Start the worker's start-up (as ``score-worker`` does: beat "starting", then load the line's model)."""
    runtime.heartbeat.ttl_s = HEARTBEAT_TTL_S
    loading, slots = threading.Event(), list[ModelSlot]()
    runtime.heartbeat.beat("starting", force=True, line="line-1")
    keys = LineKeys(runtime.config.streams.prefix, "line-1")
    thread = start_thread(lambda: slots.append(ModelSlot(runtime, keys, gated_loader(gate, loading), model_dir)))
    assert loading.wait(timeout=30)
    return thread, slots


def test_a_scorer_loading_its_model_past_the_heartbeat_ttl_is_alive_and_starting_not_ready(
    tiny_line: TinyLine,
    make_runtime: Callable[..., WorkerRuntime],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The worker beat "starting" once and loaded its model: 15 s later the key expired (`lineinspect check` found no
    # worker), and /healthz and /livez turned 503, so Kubernetes' liveness probe restarted a pod still loading.
    runtime = make_runtime("score", "w1")
    monkeypatch.setenv("REDIS_URL", runtime.config.redis.url or "")
    monkeypatch.setenv("LINEINSPECT__STREAMS__PREFIX", runtime.config.streams.prefix)
    gate = threading.Event()
    try:
        thread, slots = start_loading(runtime, tiny_line.model_dir, gate)
        port, codes = runtime.server.port, set()
        loading_until = time.monotonic() + 3 * HEARTBEAT_TTL_S
        while time.monotonic() < loading_until:
            codes.add((status(port, "/livez"), status(port, "/healthz")))
            time.sleep(0.1)
        assert codes == {(200, 503)}  # alive, not ready to score
        (written,) = runtime.client.read_health(runtime.config.streams.prefix)
        assert written["state"] == "starting" and written["loading"] == str(tiny_line.model_dir)
        assert written["starting_s"] >= HEARTBEAT_TTL_S
        assert main(["check", "--role", "score", "--line", "line-1"]) == 0  # alive: Docker's health check waits
        printed = json.loads(capsys.readouterr().out)
        assert [worker["state"] for worker in printed["workers"]] == ["starting"]
    finally:
        gate.set()
    thread.join(timeout=60)
    assert not thread.is_alive() and slots
    runtime.heartbeat.beat("ok", force=True)  # the loop's first beat
    assert (status(runtime.server.port, "/livez"), status(runtime.server.port, "/healthz")) == (200, 200)
    assert "starting_s" not in runtime.client.read_health(runtime.config.streams.prefix)[0]


def test_a_model_load_past_max_startup_s_is_taken_for_hung(
    tiny_line: TinyLine,
    worker_config: Config,
    make_runtime: Callable[..., WorkerRuntime],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A load that never ends (a hung network disk) must not keep the worker alive for ever: past the bound its beats
    # stop, so /livez turns 503 (the liveness probe restarts it) and its key expires.
    data = worker_config.model_dump(mode="json")
    data["worker"]["max_startup_s"] = 2 * HEARTBEAT_TTL_S
    runtime = make_runtime("score", "w1", config_from_mapping(data))
    gate = threading.Event()
    try:
        with caplog.at_level(logging.ERROR, logger="pipeline.health"):
            thread, _ = start_loading(runtime, tiny_line.model_dir, gate)
            wait_until(lambda: status(runtime.server.port, "/livez") == 503, timeout_s=30, what="/livez 503")
            wait_until(lambda: not runtime.client.read_health(runtime.config.streams.prefix), 10, "the key to expire")
            wait_until(lambda: runtime.heartbeat.exit_status == HUNG_EXIT_STATUS, 10, "the hung start's exit")
        assert "worker.max_startup_s" in caplog.text
    finally:
        gate.set()
    thread.join(timeout=60)
    assert not thread.is_alive()
    runtime.heartbeat.beat("ok", force=True)  # the load ended after all: the worker serves, healthy again
    assert status(runtime.server.port, "/livez") == status(runtime.server.port, "/healthz") == 200
