"""Every registered method, and a fusion, runs in the streaming scoring worker and gives the offline scores."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.methods import METHOD_CLASSES
from pipeline.config import config_from_mapping
from tests.models.conftest import TINY
from tests.models.test_methods import FAST
from tests.workers.helpers import decisions_in, frame_from_file, publish_frames, start_thread, wait_until
from tests.workers.test_score_worker import start_worker
from workers.lifecycle import WorkerRuntime


@pytest.fixture(scope="module")
def method_line(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    from models.synthetic import make_demo_line

    demo = make_demo_line(tmp_path_factory.mktemp("methods-line"), n_train=12, n_test_good=3, n_test_defect=3,
                          image_size=96, seed=2)  # fmt: skip
    return demo.train_dir, list(demo.test_images)


# patchcore fused with padim; a third of the fit images kept out so this small line has position statistics
FUSION: dict[str, dict[str, Any]] = {
    "scoring": {"normalisation_fraction": 0.3},
    "fusion": {"members": [{"method": "padim", "model": {"aggregation_kernel": 1}}]},
}


@pytest.mark.parametrize("method", [*sorted(METHOD_CLASSES), "fusion"])
def test_streamed_scores_equal_offline_scores_for_every_method(
    method: str, method_line: tuple[Path, list[Path]], make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    from models.artifact import load_scorer
    from models.fit import fit_scorer
    from models.images import list_images, read_image

    train_dir, test_images = method_line
    settings = {section: dict(values) for section, values in TINY.items()}
    settings["model"].update({"method": "patchcore" if method == "fusion" else method, "device": "cpu"})
    for section, values in (FUSION if method == "fusion" else FAST[method]).items():
        settings.setdefault(section, {}).update(values)
    model_dir = tmp_path / "model"
    scorer = fit_scorer(list_images(train_dir), config_from_mapping(settings), progress=False, holdout_fraction=0.25)
    assert len(scorer.companions) == (1 if method == "fusion" else 0)
    scorer.save(model_dir)

    runtime = make_runtime("score", f"w-{method}")
    worker = start_worker(runtime, model_dir)
    frames = [frame_from_file(path) for path in test_images]
    publish_frames(runtime.client, worker.keys, frames)
    thread = start_thread(worker.run)
    wait_until(lambda: runtime.client.length(worker.keys.results) >= len(frames), what="all decisions")
    runtime.stop.set()
    thread.join(timeout=30)

    offline = load_scorer(model_dir, device="cpu").score([read_image(path) for path in test_images]).scores
    decisions = {d.frame_id: d for d in decisions_in(runtime.client, worker.keys.results)}
    assert {d.model_id for d in decisions.values()} == {load_scorer(model_dir, device="cpu").model_id}
    assert all(decisions[frame.frame_id].verdict in ("pass", "fail") for frame in frames)
    streamed = np.array([decisions[frame.frame_id].score for frame in frames], dtype=np.float64)
    # float32 sums over differently composed batches: equal to ~1e-5 relative (CFA's scores run into the hundreds)
    np.testing.assert_allclose(streamed, offline, rtol=1e-4, atol=1e-5)
