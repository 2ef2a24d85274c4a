"""The model commands end to end on a small demo line: fit, score, calibrate, evaluate."""

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.artifact import load_scorer
from models.synthetic import DemoLine
from workers.cli import main

TINY_TOML = """
[model]
image_size = 96
[bank]
compression_ratio = 2
init_images = 4
"""


@pytest.fixture(scope="module")
def cli_model(demo_line: DemoLine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("cli")
    good = work / "good"
    shutil.copytree(demo_line.train_dir, good)
    (good / "zz_broken.png").write_bytes(b"garbage")
    (work / "config.toml").write_text(TINY_TOML)
    assert main(["fit", "--good", str(good), "--config", str(work / "config.toml"), "--out", str(work / "model"),
                 "--quiet"]) == 0  # fmt: skip
    return work / "model"


def test_fit_skips_unreadable_images_and_records_them(cli_model: Path) -> None:
    manifest = json.loads((cli_model / "manifest.json").read_text())
    assert any("zz_broken.png" in reason for reason in manifest["training"]["skipped"])
    assert manifest["threshold"] is not None


def test_fit_fails_clearly_when_nothing_is_readable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    assert main(["fit", "--good", str(tmp_path), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "no readable training image" in capsys.readouterr().err


def test_fit_refuses_an_output_that_is_not_a_model_before_fitting(
    demo_line: DemoLine, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in demo_line.train_dir.iterdir())
    assert main(["fit", "--good", str(demo_line.train_dir), "--out", str(demo_line.train_dir), "--quiet"]) == 2
    assert "not a lineinspect model (no lineinspect manifest.json): refusing to replace it" in capsys.readouterr().err
    assert sorted(p.name for p in demo_line.train_dir.iterdir()) == before


def test_score_prints_verdicts_and_writes_heatmaps(cli_model: Path, demo_line: DemoLine, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    images = [str(p) for p in demo_line.test_images[:2]]
    assert main(["score", "--model", str(cli_model), *images, "--heatmaps", str(tmp_path), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["verdict"] in ("pass", "fail") for r in results] == [True, True]
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_calibrate_writes_threshold_and_reports_best_f1(cli_model: Path, demo_line: DemoLine, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    model = tmp_path / "model"
    shutil.copytree(cli_model, model)
    before = json.loads((model / "manifest.json").read_text())["model_id"]
    code = main(["calibrate", "--model", str(model), "--good", str(demo_line.root / "test" / "good"),
                 "--false-reject-rate", "0.2", "--data", str(demo_line.root), "--quiet"])  # fmt: skip
    assert code == 0
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["model_id"] != before
    assert manifest["threshold"]["good_images"] == 6 and manifest["threshold"]["best_f1_value"] is not None
    assert "best-F1 threshold" in capsys.readouterr().out


def test_evaluate_writes_metrics_curves_and_overlays(cli_model: Path, demo_line: DemoLine, tmp_path: Path) -> None:
    assert main(["evaluate", "--model", str(cli_model), "--data", str(demo_line.root), "--out", str(tmp_path),
                 "--quiet"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pro", "f1_max", "images_per_second"):
        assert metrics[key] is not None
    assert metrics["image_auroc"] > 0.8 and metrics["pixel_auroc"] > 0.8
    # one defect type: its images with the good ones are the whole test set
    assert metrics["image_auroc_by_type"] == {"defect": metrics["image_auroc"]}
    assert metrics["pixel_auroc_by_type"] == {"defect": metrics["pixel_auroc"]}
    assert metrics["model"].startswith("patchcore (") and metrics["model_id"] == load_scorer(cli_model).model_id
    assert (tmp_path / "roc.png").stat().st_size > 1000 and (tmp_path / "pro.png").stat().st_size > 1000
    assert len(list((tmp_path / "overlays").glob("*.png"))) >= 4


def test_bad_config_value_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.toml").write_text("[scoring]\nshift_pixels = -3\n")
    assert main(["fit", "--good", str(tmp_path), "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path)]) == 2
    assert "scoring.shift_pixels" in capsys.readouterr().err


def _threshold(model: Path) -> float:
    return float(json.loads((model / "manifest.json").read_text())["threshold"]["value"])


def test_calibrate_refuses_fewer_images_than_the_threshold_it_would_replace(
    cli_model: Path, demo_line: DemoLine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """3 good images cannot measure 0.5% (the default): their maximum must not replace a threshold set from more."""
    model = tmp_path / "model"
    shutil.copytree(cli_model, model)
    before = json.loads((model / "manifest.json").read_text())["threshold"]
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted((demo_line.root / "test" / "good").iterdir())[:3]:
        shutil.copy(path, few / path.name)
    assert before["good_images"] > 3
    assert main(["calibrate", "--model", str(model), "--good", str(few), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "3 readable good images cannot measure a false-reject rate of 0.50% (that needs 200)" in error
    assert json.loads((model / "manifest.json").read_text())["threshold"] == before
    # as many images as the threshold rests on, or more: calibrated, saying that 0.5% is not resolved
    assert main(["calibrate", "--model", str(model), "--good", str(demo_line.root / "test" / "good"),
                 "--quiet"]) == 0  # fmt: skip
    assert "cannot resolve a false-reject rate of 0.50%" in capsys.readouterr().out


def test_fit_and_calibrate_say_how_far_a_threshold_from_few_good_images_can_be_trusted(
    cli_model: Path, demo_line: DemoLine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The result a user reads last says how unreliable the threshold is and what to run, once (not a warning and
    the same again), and calibrate no longer reports a rate its images cannot measure as if met."""
    model = tmp_path / "model"
    shutil.copytree(cli_model, model)
    assert main(["calibrate", "--model", str(model), "--good", str(demo_line.root / "test" / "good"),
                 "--quiet"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert "false-reject rate 0.50% on 6 good images" not in out
    assert ("From fewer than 20 good images such a threshold is unreliable: on validation such thresholds rejected "
            "6.6% of other good parts when set from 5 good images and 2.1% from 10") in out  # fmt: skip
    assert (
        f"calibrate on at least 20, better 200, good images the model has not seen: `lineinspect calibrate "
        f"--model {model} --good MORE_GOOD_IMAGES`" in out
    )
    assert "unreliable" not in err
    good = tmp_path / "good"
    good.mkdir()
    for path in sorted(demo_line.train_dir.iterdir())[:5]:  # 2 of them make fit's threshold slice
        shutil.copy(path, good / path.name)
    (good / "zz_empty.png").write_bytes(b"")
    (tmp_path / "config.toml").write_text(TINY_TOML)
    fitted = tmp_path / "fitted"
    assert main(["fit", "--good", str(good), "--config", str(tmp_path / "config.toml"), "--out", str(fitted),
                 "--quiet"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert "23.1% of other good parts when set from 2 good images" in out and "unreliable" not in err
    # where the 5 went (the line said "from 3 images" or fewer: those fitted on alone)
    assert re.search(r"from 5 good images \(\d fitted on(, \d for position statistics)?, 2 for the threshold; 1 "
                     r"unreadable file skipped\) in", out)  # fmt: skip
    assert f"`lineinspect calibrate --model {fitted} --good GOOD_IMAGES`" in out
    for path in sorted(good.iterdir())[:2]:  # 3 good images left: too few for a threshold
        path.unlink()
    assert main(["fit", "--good", str(good), "--config", str(tmp_path / "config.toml"), "--out", str(fitted),
                 "--quiet"]) == 0  # fmt: skip
    assert (
        f"no threshold: the model scores but gives no pass/fail verdicts until `lineinspect calibrate --model "
        f"{fitted} --good GOOD_IMAGES` sets one from at least 20, better 200,"
    ) in capsys.readouterr().out


def test_calibrate_takes_its_rate_from_the_config_and_held_out_images_from_a_dataset_root(
    cli_model: Path, demo_line: DemoLine, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    model = tmp_path / "model"
    shutil.copytree(cli_model, model)
    monkeypatch.setenv("LINEINSPECT__THRESHOLD__FALSE_REJECT_RATE", "0.2")
    assert main(["calibrate", "--model", str(model), "--good", str(demo_line.root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"calibrating on held-out good images of {demo_line.root} (test/good)" in out
    threshold = json.loads((model / "manifest.json").read_text())["threshold"]
    assert threshold["false_reject_rate"] == 0.2 and threshold["good_images"] == 6  # not the training images


def test_score_writes_one_overlay_per_image_even_when_names_repeat(cli_model: Path, demo_line: DemoLine,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    image = demo_line.test_images[0]
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(image, other / image.name)
    heatmaps = tmp_path / "heatmaps"
    main(["score", "--model", str(cli_model), str(image), str(other / image.name), "--heatmaps", str(heatmaps)])
    assert len(list(heatmaps.glob("*.png"))) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "--data", "d", "--out", "o", "--batch-size", "0"], "must be at least 1"),
        (["evaluate", "--data", "d", "--out", "o", "--shift-pixels", "100"], "must be 0 to 32 pixels"),
        (["calibrate", "--good", "g", "--false-reject-rate", "0.7"], "must be between 0.0 and 0.5"),
        (["calibrate", "--good", "g", "--false-reject-rate", "nan"], "must be between 0.0 and 0.5"),
    ],
)
def test_numbers_out_of_range_are_refused_before_any_work(argv: list[str], message: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([argv[0], "--model", "m", *argv[1:]])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_output_that_cannot_be_a_directory_is_a_one_line_error(
    cli_model: Path, demo_line: DemoLine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "report.txt"
    taken.write_text("not a directory")
    assert main(["evaluate", "--model", str(cli_model), "--data", str(demo_line.root), "--out", str(taken)]) == 2
    error = capsys.readouterr().err
    assert f"report directory {taken} exists and is not a directory" in error and "Traceback" not in error


def test_fit_on_too_few_images_for_its_held_out_slices_fits_them_all_and_says_to_calibrate(
    demo_line: DemoLine, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    good = tmp_path / "good"
    good.mkdir()
    for path in sorted(demo_line.train_dir.iterdir())[:3]:
        shutil.copy(path, good / path.name)
    (tmp_path / "config.toml").write_text(TINY_TOML)
    with caplog.at_level(logging.WARNING):
        code = main(["fit", "--good", str(good), "--config", str(tmp_path / "config.toml"), "--out",
                     str(tmp_path / "m"), "--holdout", "0.4", "--quiet"])  # fmt: skip
    assert code == 0 and "from 3 good images (3 fitted on) in" in capsys.readouterr().out
    assert "all 3 are fitted and the model has no threshold: run `lineinspect calibrate`" in caplog.text
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["threshold"] is None


def test_calibrate_refuses_the_folder_the_model_was_fitted_on(demo_line: DemoLine, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    good = tmp_path / "good"
    shutil.copytree(demo_line.train_dir, good)
    (tmp_path / "config.toml").write_text(TINY_TOML)
    model = tmp_path / "model"
    assert main(["fit", "--good", str(good), "--config", str(tmp_path / "config.toml"), "--out", str(model),
                 "--quiet"]) == 0  # fmt: skip
    before = _threshold(model)
    assert main(["calibrate", "--model", str(model), "--good", str(good), "--false-reject-rate", "0.2"]) == 2
    assert "holds the images the model was fitted on" in capsys.readouterr().err
    assert _threshold(model) == before


def test_a_warning_is_one_line_naming_the_command_not_python_source() -> None:
    """Warnings from the models (few images, an unresolved false-reject rate) are for the user: Python's default form
    printed the file, line number and source line of the code that warned."""
    script = (
        "import sys, warnings\n"
        "from workers import cli\n"
        "def warn(args):\n"
        "    warnings.warn('only 3 good images', UserWarning)\n"
        "    return 0\n"
        "cli.cmd_demo = warn\n"
        "sys.exit(cli.main(['demo']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["lineinspect demo: warning: only 3 good images"]


def test_calibrate_leaves_an_unreadable_labelled_image_out_with_its_label(
    cli_model: Path, demo_line: DemoLine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scores skipped the unreadable file but labels did not: every later image's score met its neighbour's label,
    and the best-F1 threshold came from that mismatch without a word."""
    model = tmp_path / "model"
    shutil.copytree(cli_model, model)
    data = tmp_path / "data"
    shutil.copytree(demo_line.root, data)
    calibrate = ["calibrate", "--model", str(model), "--good", str(demo_line.root / "test" / "good"),
                 "--false-reject-rate", "0.2", "--data", str(data), "--quiet"]  # fmt: skip
    assert main(calibrate) == 0
    clean = capsys.readouterr().out
    for folder in ("good", "defect"):  # listed first in each class
        (data / "test" / folder / "a_broken.png").write_bytes(b"garbage")
    assert main(calibrate) == 0
    out = capsys.readouterr().out
    best_f1 = [line for line in clean.splitlines() if line.startswith("best-F1 threshold")]
    assert best_f1 and best_f1 == [line for line in out.splitlines() if line.startswith("best-F1 threshold")]


def test_fit_and_calibrate_keep_to_the_configured_torch_threads(demo_line: DemoLine, tmp_path: Path) -> None:
    """A fit or calibrate beside the line's scorers keeps to [worker] torch_threads and OpenMP's short busy-wait, as
    the scorers do (oversubscribed spinning threads slowed a scorer 6x, benchmarks/RESULTS.md section 2)."""
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    show = "import torch; torch.ones(64, 64) @ torch.ones(64, 64); print(torch.get_num_threads())"
    default = int(subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, check=True,
                                 env=environment, timeout=120).stdout)  # fmt: skip
    if default == 1:
        pytest.skip("one core: torch's own default is already the cap asked for")  # torch takes no more than cores
    good = tmp_path / "good"
    good.mkdir()
    for path in sorted(demo_line.train_dir.iterdir())[:5]:
        shutil.copy(path, good / path.name)
    config = tmp_path / "config.toml"
    config.write_text(TINY_TOML + "[worker]\ntorch_threads = 1\n")  # a host shared with busy software
    model, held_out = tmp_path / "model", demo_line.root / "test" / "good"
    for command in (["fit", "--good", str(good), "--out", str(model)],
                    ["calibrate", "--model", str(model), "--good", str(held_out)]):  # fmt: skip
        arguments = [*command, "--config", str(config), "--quiet"]
        code = (f"from workers.cli import main; assert main({arguments!r}) == 0; import os; {show}; "
                "print(os.environ['GOMP_SPINCOUNT'])")  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-2:] == ["1", "10000"], command[0]


def fit_without_threshold(demo_line: DemoLine, tmp_path: Path, config_toml: str) -> Path:
    """A model fitted with ``config_toml`` on 3 of the demo's good images, too few for a threshold."""
    good = tmp_path / "good"
    good.mkdir()
    for path in sorted(demo_line.train_dir.iterdir())[:3]:
        shutil.copy(path, good / path.name)
    (tmp_path / "config.toml").write_text(config_toml)
    model = tmp_path / "model"
    assert main(["fit", "--good", str(good), "--config", str(tmp_path / "config.toml"), "--out", str(model),
                 "--quiet"]) == 0  # fmt: skip
    return model


def test_score_says_why_an_uncalibrated_models_verdicts_are_unknown(
    demo_line: DemoLine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = fit_without_threshold(demo_line, tmp_path, TINY_TOML)
    capsys.readouterr()
    assert main(["score", "--model", str(model), str(demo_line.test_images[0])]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("unknown")
    assert f"no threshold, so every verdict is 'unknown': run `lineinspect calibrate --model {model}" in err


def test_evaluate_without_masks_names_only_the_files_it_wrote(
    cli_model: Path, demo_line: DemoLine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(demo_line.root / "test", data / "test")  # no ground_truth/: no PRO curve
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(cli_model), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    assert not (out / "pro.png").exists()
    assert f"report written to {out} (metrics.json, scores.json, roc.png, overlays/)" in capsys.readouterr().out


def test_fit_without_threshold_asks_for_as_many_good_images_as_the_rate_needs(
    demo_line: DemoLine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At a 10% false-reject rate 10 good images resolve the rate: fit asked for 'at least 20, better 10'."""
    model = fit_without_threshold(demo_line, tmp_path, TINY_TOML + "[threshold]\nfalse_reject_rate = 0.1\n")
    out = capsys.readouterr().out
    assert f"`lineinspect calibrate --model {model} --good GOOD_IMAGES` sets one from at least 20 good images it" in out
