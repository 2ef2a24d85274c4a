import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.artifact import load_scorer, read_manifest, update_threshold
from models.errors import ArtifactError
from models.images import read_image
from models.scorer import Scorer, Threshold
from models.synthetic import DemoLine


def test_reloaded_model_in_a_new_scorer_gives_identical_scores(fitted_scorer: Scorer, saved_model: Path,
                                                               demo_line: DemoLine) -> None:  # fmt: skip
    images = [read_image(p) for p in demo_line.test_images]
    reloaded = load_scorer(saved_model, device="cpu")
    assert reloaded is not fitted_scorer and reloaded.method is not fitted_scorer.method
    first, second = fitted_scorer.score(images), reloaded.score(images)
    assert np.array_equal(first.scores, second.scores)
    assert np.array_equal(first.maps, second.maps)
    assert reloaded.threshold == fitted_scorer.threshold
    assert reloaded.model_id == read_manifest(saved_model)["model_id"] != "unsaved"


def test_manifest_describes_the_model(saved_model: Path) -> None:
    manifest = json.loads((saved_model / "manifest.json").read_text())
    assert manifest["model"]["backbone"] == "efficientnet_lite0"
    method = manifest["method"]
    assert method["name"] == "patchcore" and method["layers"] == ["blocks.2", "blocks.4"]
    assert method["bank"]["kind"] == "bounded_coreset" and method["bank"]["rows"] == 288
    assert manifest["training"]["images"] > 0 and "torch" in manifest["libraries"]
    assert manifest["registration"] is None  # TINY: unregistered (tests/models/test_registration.py registers)
    assert sorted(p.name for p in saved_model.iterdir()) == ["bank.npy", "index.faiss", "manifest.json"]


def _copy(saved_model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(saved_model, target)
    return target


def test_corrupt_bank_is_detected(saved_model: Path, tmp_path: Path) -> None:
    model = _copy(saved_model, tmp_path)
    data = bytearray((model / "bank.npy").read_bytes())
    data[-1] ^= 0xFF
    (model / "bank.npy").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"bank\.npy does not match its sha256"):
        load_scorer(model)


def test_hand_edited_manifest_is_detected(saved_model: Path, tmp_path: Path) -> None:
    model = _copy(saved_model, tmp_path)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["scoring"]["shift_pixels"] = 3
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="content hash"):
        load_scorer(model)


def test_backbone_mismatch_is_detected(saved_model: Path, tmp_path: Path) -> None:
    model = _copy(saved_model, tmp_path)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["method"]["layers"] = ["blocks.2", "blocks.3"]  # 40 + 80 channels, the bank has 152
    from models.artifact import _write_manifest

    _write_manifest(model, manifest)
    with pytest.raises(ArtifactError, match="backbone or weights mismatch"):
        load_scorer(model)


def test_missing_or_non_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        load_scorer(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_scorer(tmp_path)


def test_new_threshold_makes_a_new_model_version(saved_model: Path, tmp_path: Path) -> None:
    model = _copy(saved_model, tmp_path)
    before = read_manifest(model)["model_id"]
    after = update_threshold(model, Threshold(value=1.5, method="manual"))
    assert after != before and load_scorer(model).threshold == Threshold(value=1.5, method="manual")


def test_the_resize_mode_travels_with_the_model(fitted_scorer: Scorer, demo_line: DemoLine, tmp_path: Path) -> None:
    settings = fitted_scorer.model_settings.model_copy(update={"resize": "pad"})
    padded = Scorer(fitted_scorer.method, settings, fitted_scorer.scoring, fitted_scorer.training,
                    fitted_scorer.threshold, position_stats=fitted_scorer.position_stats,
                    registration=fitted_scorer.registration)  # fmt: skip
    padded.save(tmp_path / "model")
    reloaded = load_scorer(tmp_path / "model", device="cpu")
    assert reloaded.model_settings.resize == "pad"
    part = read_image(demo_line.test_images[0])
    wide = np.concatenate([part, part], axis=1)
    np.testing.assert_allclose(reloaded.score([wide]).maps, padded.score([wide]).maps, rtol=1e-5, atol=1e-5)
    assert not np.allclose(reloaded.score([wide]).maps, fitted_scorer.score([wide]).maps, atol=1e-3)


def test_settings_travel_with_the_model_and_older_models_behave_as_before(saved_model: Path, tmp_path: Path) -> None:
    from models.artifact import _write_manifest

    scorer = load_scorer(saved_model, device="cpu")
    # the defaults ("auto" standardises this line)
    assert (scorer.model_settings.intensity, scorer.scoring.map_baseline) == ("standardise", "none")
    model = _copy(saved_model, tmp_path)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["model"]["intensity"], manifest["scoring"]["map_baseline"] = "raw", "median"
    _write_manifest(model, manifest)
    scorer = load_scorer(model, device="cpu")
    assert (scorer.model_settings.intensity, scorer.scoring.map_baseline) == ("raw", "median")
    del manifest["model"]["intensity"], manifest["scoring"]["map_baseline"]  # written before these settings existed
    _write_manifest(model, manifest)
    scorer = load_scorer(model, device="cpu")
    assert (scorer.model_settings.intensity, scorer.scoring.map_baseline) == ("raw", "none")


def _hidden_siblings(model: Path) -> list[str]:
    return sorted(p.name for p in model.parent.iterdir() if p.name.startswith(f".{model.name}."))


def test_saving_over_a_model_replaces_its_files_and_keeps_the_users(fitted_scorer: Scorer, saved_model: Path,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    from models.artifact import _write_manifest
    from models.manifest import file_sha256

    model = _copy(saved_model, tmp_path)
    # an older model here was fused and registered: its manifest lists a registration file and a member directory
    (model / "registration.npz").write_bytes(b"older model")
    (model / "fusion-1-padim").mkdir()
    (model / "fusion-1-padim" / "manifest.json").write_text("{}")
    manifest = read_manifest(model)
    manifest["files"]["registration.npz"] = file_sha256(model / "registration.npz")
    manifest["fusion"] = [{"dir": "fusion-1-padim", "content_hash": "0" * 64}]
    _write_manifest(model, manifest)
    # and the user keeps notes, a report and arrays of their own in it
    (model / "NOTES.txt").write_text("camera 2 refitted after the lens change")
    (model / "report").mkdir()
    (model / "report" / "metrics.json").write_text("{}")
    (model / "embeddings.npy").write_bytes(b"the user's")
    model_id = fitted_scorer.save(model)
    assert sorted(p.name for p in model.iterdir()) == ["NOTES.txt", "bank.npy", "embeddings.npy", "index.faiss",
                                                       "manifest.json", "report"]  # fmt: skip
    assert (model / "NOTES.txt").read_text() == "camera 2 refitted after the lens change"
    assert (model / "report" / "metrics.json").is_file() and (model / "embeddings.npy").read_bytes() == b"the user's"
    assert load_scorer(model, device="cpu").model_id == model_id == read_manifest(saved_model)["model_id"]
    assert _hidden_siblings(model) == []


def test_a_manifest_json_of_something_else_is_not_a_model(fitted_scorer: Scorer, tmp_path: Path) -> None:
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "my app", "icons": []}')
    (webapp / "index.html").write_text("<html></html>")
    with pytest.raises(ArtifactError, match="is not a lineinspect model"):
        fitted_scorer.save(webapp)
    assert sorted(p.name for p in webapp.iterdir()) == ["index.html", "manifest.json"]


def test_the_current_directory_is_never_replaced(fitted_scorer: Scorer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from models.artifact import check_model_destination

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for destination in (Path("."), tmp_path, Path("/")):
        with pytest.raises(ArtifactError, match="is the current directory or holds it"):
            check_model_destination(destination)


def test_an_interrupted_save_is_finished_by_the_next_and_keeps_the_users_files(
    fitted_scorer: Scorer, saved_model: Path, tmp_path: Path
) -> None:
    """Killed between its two renames: the model directory is missing, the old model and the new one lie beside."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    model = tmp_path / "model"
    replaced = tmp_path / f".model.replaced-{dead_pid}-0123abcd"
    shutil.copytree(saved_model, replaced)
    (replaced / "NOTES.txt").write_text("mine")
    writing = tmp_path / f".model.writing-{dead_pid}-4567cdef"
    shutil.copytree(saved_model, writing)
    running = tmp_path / f".model.writing-{os.getpid()}-89abcdef"  # a save in progress (this process): left be
    running.mkdir()
    fitted_scorer.save(model)
    assert (model / "NOTES.txt").read_text() == "mine"
    assert not replaced.exists() and not writing.exists() and running.is_dir()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), SystemExit(143)])  # 143: SIGTERM
def test_a_save_that_fails_half_way_keeps_the_old_model(saved_model: Path, tmp_path: Path, failure: BaseException,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import models.artifact
    from models.memory_bank import MemoryBank
    from models.methods.patchcore import PatchCoreMethod

    model = _copy(saved_model, tmp_path)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    refitted = load_scorer(saved_model, device="cpu")  # a new model, with another bank
    method = refitted.method
    assert isinstance(method, PatchCoreMethod)
    method.bank = MemoryBank(method.bank.features[::2].copy(), method.bank.kind)

    def fail() -> dict[str, str]:  # called after the bank and index are written, before the manifest
        raise failure

    monkeypatch.setattr(models.artifact, "library_versions", fail)
    with pytest.raises(type(failure)):
        refitted.save(model)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert load_scorer(model, device="cpu").model_id == read_manifest(saved_model)["model_id"]
    assert _hidden_siblings(model) == []


def test_a_directory_that_is_not_a_model_is_never_replaced(fitted_scorer: Scorer, tmp_path: Path) -> None:
    from models.artifact import check_model_destination

    data = tmp_path / "data"
    data.mkdir()
    (data / "part.png").write_bytes(b"someone's image")
    with pytest.raises(ArtifactError, match=r"not a lineinspect model .* refusing to replace it"):
        fitted_scorer.save(data)
    assert [p.name for p in data.iterdir()] == ["part.png"]
    with pytest.raises(ArtifactError, match="not a directory"):
        check_model_destination(data / "part.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    fitted_scorer.save(empty)
    assert (empty / "manifest.json").is_file()


def test_saving_through_a_symlink_replaces_its_target_and_keeps_the_link(fitted_scorer: Scorer, saved_model: Path,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    version = _copy(saved_model, tmp_path)
    (version / "bank.npy").write_bytes(b"an older model's bank")  # listed in its manifest: replaced
    current = tmp_path / "current"
    current.symlink_to(version, target_is_directory=True)
    fitted_scorer.save(current)
    assert current.is_symlink() and current.resolve() == version.resolve()
    assert load_scorer(current, device="cpu").model_id == read_manifest(saved_model)["model_id"]


def test_model_files_get_the_umask_permissions(fitted_scorer: Scorer, tmp_path: Path) -> None:
    """Workers often run as another user than the engineer who fits: the files must be as readable as any."""
    previous = os.umask(0o022)
    try:
        fitted_scorer.save(tmp_path / "model")
    finally:
        os.umask(previous)
    for path in [tmp_path / "model", *(tmp_path / "model").iterdir()]:
        assert path.stat().st_mode & 0o044 == 0o044, path


def test_loading_names_what_is_wrong_with_the_directory(saved_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        load_scorer(tmp_path / "nowhere")
    model = _copy(saved_model, tmp_path)
    (model / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="not a lineinspect manifest"):
        load_scorer(model)
    (model / "manifest.json").write_text('{"files": ["bank.npy"]}')
    with pytest.raises(ArtifactError, match="not a lineinspect manifest"):
        load_scorer(model)


def test_verifying_a_model_checks_its_fusion_members_without_loading_it(saved_model: Path, tmp_path: Path) -> None:
    from models.artifact import _write_manifest, verify_model

    model = _copy(saved_model, tmp_path)
    shutil.copytree(saved_model, model / "fusion-1-patchcore")  # a member: a complete model of its own
    manifest = read_manifest(model)
    member_hash = read_manifest(model / "fusion-1-patchcore")["content_hash"]
    manifest["fusion"] = [{"dir": "fusion-1-patchcore", "content_hash": member_hash}]
    _write_manifest(model, manifest)
    assert verify_model(model)["fusion"][0]["dir"] == "fusion-1-patchcore"
    bank = model / "fusion-1-patchcore" / "bank.npy"
    bank.write_bytes(bank.read_bytes() + b"x")
    with pytest.raises(ArtifactError, match=r"fusion-1-patchcore: bank\.npy does not match its sha256"):
        verify_model(model)
    shutil.rmtree(model / "fusion-1-patchcore")
    with pytest.raises(ArtifactError, match="fusion member directory 'fusion-1-patchcore' is missing"):
        verify_model(model)
