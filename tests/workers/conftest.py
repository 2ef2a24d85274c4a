"""Worker test fixtures: a tiny real model (fitted once per session) and in-process worker runtimes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import Config, config_from_mapping
from tests.workers.processes import WorkerProcesses
from workers.lifecycle import WorkerRuntime

TINY_MODEL = {"image_size": 64, "device": "cpu"}


@dataclass(frozen=True)
class TinyLine:
    model_dir: Path
    other_model_dir: Path
    good_images: list[Path]
    defect_images: list[Path]


def _fit(train: list[Path], model_dir: Path, seed: int) -> None:
    from models.fit import fit_scorer

    config = config_from_mapping({"model": TINY_MODEL, "bank": {"seed": seed}})
    fit_scorer(train, config, progress=False).save(model_dir)


@pytest.fixture(scope="session")
def tiny_line(tmp_path_factory: pytest.TempPathFactory) -> TinyLine:
    """A demo line at 96 px and two different 64 px models fitted on it (a few seconds on a CPU)."""
    pytest.importorskip("models.fit")
    from models.images import list_images
    from models.synthetic import make_demo_line

    root = tmp_path_factory.mktemp("tiny-line")
    demo = make_demo_line(root / "demo", n_train=8, n_test_good=4, n_test_defect=4, image_size=96, seed=1)
    train = list_images(demo.train_dir)
    _fit(train, root / "model-a", seed=0)
    _fit(train[:5], root / "model-b", seed=1)
    labels = dict(zip(demo.test_images, demo.test_labels, strict=True))
    return TinyLine(
        root / "model-a",
        root / "model-b",
        [path for path, label in labels.items() if label == 0],
        [path for path, label in labels.items() if label == 1],
    )


@pytest.fixture
def worker_config(config: Config, tmp_path: Path) -> Config:
    """Test config: fast claims and small batches, heatmaps under tmp_path, tiny model settings."""
    data = config.model_dump(mode="json")
    data["model"].update(TINY_MODEL)
    data["worker"].update({"max_batch": 4, "max_wait_ms": 5, "drain_timeout_s": 5.0})
    data["sink"].update({"heatmap_dir": str(tmp_path / "heatmaps"), "metrics_port": 0})
    data["streams"].update({"max_frame_bytes": 200_000})
    return config_from_mapping(data)


@pytest.fixture
def make_runtime(worker_config: Config) -> Iterator[Callable[..., WorkerRuntime]]:
    """Build WorkerRuntimes (entered) that are closed at the end of the test. A step they take for hung does not end
    the test process: ``heartbeat.exit_status`` records that it would have (``Heartbeat.exit_if_hung``)."""
    runtimes: list[WorkerRuntime] = []

    def make(role: str, name: str, config: Config | None = None) -> WorkerRuntime:
        cfg = config or worker_config
        runtime = WorkerRuntime(cfg, cfg.redis.url or "", role, name, port=0).__enter__()
        runtime.heartbeat.exit_process = lambda _status: None
        runtimes.append(runtime)
        return runtime

    yield make
    for runtime in runtimes:
        runtime.stop.set()
        runtime.__exit__(None, None, None)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[WorkerProcesses]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    launcher = WorkerProcesses({}, log_dir)
    yield launcher
    launcher.stop_all()
