"""The ``lineinspect`` command: model commands here, streaming daemons from ``workers.stream_commands``.

``main`` is the one entry point of every command (the console script, ``python -m workers.cli``, and the
children ``lineinspect run`` starts), so each error has one exit code and one message form.

    lineinspect fit --good DIR [--config config.toml] --out MODEL_DIR
    lineinspect score --model MODEL_DIR IMAGE... [--heatmaps DIR]
    lineinspect evaluate --model MODEL_DIR --data DIR --out REPORT_DIR
    lineinspect calibrate --model MODEL_DIR --good DIR [--false-reject-rate R] [--data DIR]
    lineinspect demo [--out DIR]      small fit + evaluate on synthetic scikit-image parts

``--good`` and ``--data`` accept a folder of images, an MVTec AD-layout folder, or a folder with a
``split.json`` (such as ``../shared/datasets/mtd``). Bad input is reported as one line and exit code 2; a streaming
worker that gave up on Redis exits 1, one hung past its bound (a batch or the first model load) exits 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from workers.stream_commands import CONSUMER_COMMANDS, add_stream_commands

if TYPE_CHECKING:
    from models.scorer import Scorer, Threshold
    from pipeline.config import Config

log = logging.getLogger("lineinspect")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be at least 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _fraction(low: float, high: float) -> Callable[[str], float]:
    """A float strictly between ``low`` and ``high`` (NaN refused)."""

    def parse(text: str) -> float:
        value = float(text)
        if not low < value < high:
            msg = f"must be between {low} and {high} (exclusive), got {text}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def _shift(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 32:  # as [scoring] shift_pixels
        msg = f"must be 0 to 32 pixels, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _writable_directory(path: Path, what: str) -> Path:
    """Create ``path`` (a directory) now, so that a location that cannot be written fails before the work."""
    if path.exists() and not path.is_dir():
        msg = f"{what} {path} exists and is not a directory"
        raise ValueError(msg)
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        msg = f"{what} {path} is not writable"
        raise ValueError(msg)
    return path


def _config(args: argparse.Namespace) -> Config:
    from pipeline.config import load_config

    return load_config(args.config)


def _limit_threads(config: Config) -> None:
    """Fit and calibrate share a line's host with its scorers: they keep to ``[worker] torch_threads`` as a scorer
    does, and to its short OpenMP busy-wait (``workers.score.limit_threads``). Called before torch is imported."""
    from workers.score import limit_threads

    limit_threads(config.worker.torch_threads)


def cmd_fit(args: argparse.Namespace) -> int:
    config = _config(args)
    _limit_threads(config)
    from models.artifact import check_model_destination
    from models.datasets import good_images
    from models.fit import fit_scorer
    from models.threshold import ThresholdWarning, good_images_to_calibrate_on

    check_model_destination(args.out)  # before minutes of fitting, not after
    paths = good_images(args.good)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThresholdWarning)  # said with the command's result, below
        scorer = fit_scorer(paths, config, progress=not args.quiet, holdout_fraction=args.holdout,
                            source=str(Path(args.good).resolve()))  # fmt: skip
    model_id = scorer.save(args.out)
    threshold = f"{scorer.threshold.value:.4f}" if scorer.threshold else "none"
    print(f"model {model_id} written to {args.out}: {scorer.describe()} from {_training_images(scorer)} in "
          f"{scorer.training.fit_seconds:.1f} s; threshold {threshold}")  # fmt: skip
    for name, choice in (("intensity", scorer.training.intensity_choice),
                         ("registration", scorer.training.registration_choice)):  # fmt: skip
        if choice:
            print(f"{name} {choice}")
    calibrate = f"`lineinspect calibrate --model {args.out} --good GOOD_IMAGES`"
    if scorer.threshold is None:
        print(f"no threshold: the model scores but gives no pass/fail verdicts until {calibrate} sets one from at "
              f"least {good_images_to_calibrate_on(config.threshold.false_reject_rate)} good images it has not "
              "seen")  # fmt: skip
    else:
        _print_reliability(scorer.threshold, calibrate)
    return 0


def _training_images(scorer: Scorer) -> str:
    """Where a fit's good images went: "40 good images (34 fitted on, 3 for position statistics, 3 for the
    threshold; 2 unreadable files skipped)"."""
    statistics = scorer.position_stats.images if scorer.position_stats is not None else 0
    threshold = scorer.threshold.good_images if scorer.threshold is not None else 0
    uses = [f"{scorer.training.images} fitted on"]
    uses += [f"{statistics} for position statistics"] if statistics else []
    uses += [f"{threshold} for the threshold"] if threshold else []
    skipped = len(scorer.training.skipped)
    unreadable = f"; {skipped} unreadable file{'s' if skipped > 1 else ''} skipped" if skipped else ""
    return f"{scorer.training.images + statistics + threshold} good images ({', '.join(uses)}{unreadable})"


def _print_reliability(threshold: Threshold, calibrate: str) -> None:
    """Say how far a threshold from few good images can be trusted (nothing when its images measure its rate)."""
    from models.threshold import threshold_reliability

    if threshold.method == "false_reject_rate" and threshold.false_reject_rate is not None:
        reliability = threshold_reliability(threshold.good_images, threshold.false_reject_rate)
        if reliability:
            print(f"threshold {threshold.value:.4f}: {reliability.removesuffix('.')}: {calibrate}")


def cmd_score(args: argparse.Namespace) -> int:
    import cv2

    from models.artifact import load_scorer
    from models.heatmap import overlay_heatmap
    from models.images import ImageError, read_image

    scorer = load_scorer(args.model, args.device)
    threshold = scorer.threshold.value if scorer.threshold else None
    if threshold is None:
        print(
            f"lineinspect score: the model has no threshold, so every verdict is 'unknown': run `lineinspect "
            f"calibrate --model {args.model} --good GOOD_IMAGES` on good images it has not seen",
            file=sys.stderr,
        )
    if args.heatmaps:
        _writable_directory(args.heatmaps, "heatmap directory")
    written: set[str] = set()
    failures = 0
    results = []
    for path in args.images:
        try:
            image = read_image(path, keep_depth=True)
        except ImageError as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
            continue
        mismatch = scorer.aspect_mismatch(image.shape[0], image.shape[1])
        if mismatch is not None:  # the model's inspection mask does not fit it (the worker's wrong_aspect)
            print(f"error: {path} is {mismatch}", file=sys.stderr)
            failures += 1
            continue
        batch = scorer.score([image])
        score = float(batch.scores[0])
        verdict = "unknown" if threshold is None else ("fail" if scorer.verdicts(batch.scores)[0] else "pass")
        results.append({"image": str(path), "score": score, "verdict": verdict, "model_id": scorer.model_id})
        if args.heatmaps:
            name = _unique_name(f"{path.stem}_{verdict}", written)
            cv2.imwrite(str(args.heatmaps / f"{name}.png"), overlay_heatmap(image, batch.maps[0], threshold, score))
            results[-1]["heatmap"] = str(args.heatmaps / f"{name}.png")
        if not args.json:
            print(f"{verdict:7s} {score:10.4f}  {path}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 1 if failures else 0


def _unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``...: images of one run that share a stem (a.jpg, a.png, x/a.png) each
    keep their own overlay."""
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{name}-{number}"
    taken.add(candidate)
    return candidate


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.artifact import load_scorer
    from models.datasets import test_items
    from models.report import evaluate

    scorer = load_scorer(args.model, args.device)
    _writable_directory(args.out, "report directory")
    if args.shift_pixels is not None:
        scorer = scorer.with_scoring(scorer.scoring.model_copy(update={"shift_pixels": args.shift_pixels}))
    metrics = evaluate(scorer, test_items(args.data), args.out, batch_size=args.batch_size, progress=not args.quiet,
                       shift_every_frame=not args.shift_only_failing)  # fmt: skip
    shown = {key: metrics[key] for key in ("image_auroc", "pixel_auroc", "pro", "f1_max", "images_per_second")}
    print(json.dumps(shown, indent=1))
    written = [name for name in ("metrics.json", "scores.json", "roc.png", "pro.png") if (args.out / name).exists()]
    print(f"report written to {args.out} ({', '.join([*written, 'overlays/'])})")  # no pro.png without masks
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    config = _config(args)
    _limit_threads(config)
    import numpy as np

    from models.artifact import MANIFEST, load_scorer, update_threshold
    from models.datasets import calibration_images, is_dataset_root, test_items
    from models.errors import ArtifactError
    from models.fit import score_paths
    from models.threshold import ThresholdWarning, best_f1_threshold, false_reject_threshold

    rate = args.false_reject_rate if args.false_reject_rate is not None else config.threshold.false_reject_rate
    scorer = load_scorer(args.model, args.device)
    if not os.access(args.model / MANIFEST, os.W_OK) or not os.access(args.model, os.W_OK):
        msg = f"{args.model} is not writable: calibrate writes the threshold into the model"
        raise ArtifactError(msg)
    paths, description = calibration_images(args.good)
    source = scorer.training.source
    if source and not is_dataset_root(args.good) and Path(source).resolve() == Path(args.good).resolve():
        msg = (f"{args.good} holds the images the model was fitted on (its training source): their scores are too "
               "low to set a threshold from; calibrate on good images the model has not seen")  # fmt: skip
        raise ValueError(msg)
    # Fewer images than the rate needs (200 for 0.5%) give a threshold just above their largest score (with a
    # warning, as fit's does); but such a threshold must not replace one that rested on more images.
    needed = math.ceil(1 / rate)
    current = scorer.threshold.good_images if scorer.threshold is not None else 0

    def refuse_too_few(count: int) -> None:
        if count < needed and count < current:
            msg = (f"{count} readable good images cannot measure a false-reject rate of {rate:.2%} (that needs "
                   f"{needed}) and the model's threshold rests on {current}: the threshold is unchanged (use more "
                   "good images or a larger --false-reject-rate)")  # fmt: skip
            raise ValueError(msg)

    refuse_too_few(len(paths))
    # everything that can be refused is refused before the images are scored (minutes), not after
    items = test_items(args.data) if args.data is not None else []
    if scorer.inspection_mask is not None:
        scorer.inspection_mask.check_files(paths, "good images")
        scorer.inspection_mask.check_files([item.image for item in items], "labelled images")
    print(f"calibrating on {description}")
    batch = scorer.scoring.batch_size
    good_scores = score_paths(scorer, paths, batch, not args.quiet, "calibrate: scoring good images")
    refuse_too_few(len(good_scores))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThresholdWarning)  # said with the command's result, below
        threshold = false_reject_threshold(good_scores, rate)
    if items:
        scored: list[Path] = []  # the readable ones, which have scores: their labels, not every item's
        scores = score_paths(scorer, [item.image for item in items], batch, not args.quiet,
                             "calibrate: scoring labelled images", kept=scored)  # fmt: skip
        label_of = {item.image: item.label for item in items}
        labels = np.array([label_of[path] for path in scored])
        if labels.any():
            best, f1 = best_f1_threshold(labels, scores)
            threshold = type(threshold)(**{**threshold.__dict__, "best_f1_value": best})
            print(f"best-F1 threshold on {args.data}: {best:.4f} (F1 {f1:.3f}); not applied")
    model_id = update_threshold(args.model, threshold)
    print(f"threshold {threshold.value:.4f} (false-reject rate {rate:.2%} asked, from {threshold.good_images} good "
          f"images) written; model id is now {model_id}")  # fmt: skip
    _print_reliability(threshold, f"`lineinspect calibrate --model {args.model} --good MORE_GOOD_IMAGES`")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from models.fit import fit_scorer
    from models.report import evaluate
    from models.synthetic import make_demo_line
    from pipeline.config import config_from_mapping

    out = args.out or Path(tempfile.mkdtemp(prefix="lineinspect-demo-"))
    demo = make_demo_line(out / "data")
    print(f"demo line written to {demo.root}")
    scorer = fit_scorer(sorted(demo.train_dir.iterdir()), config_from_mapping({}), progress=not args.quiet,
                        source="demo")  # fmt: skip
    scorer.save(out / "model")
    from models.datasets import test_items

    metrics = evaluate(scorer, test_items(demo.root), out / "report")
    print(f"demo: image AUROC {metrics['image_auroc']:.3f}, pixel AUROC {metrics['pixel_auroc']:.3f}, "
          f"PRO {metrics['pro']:.3f}; report in {out / 'report'}")  # fmt: skip
    return 0


def _add_model_commands(subparsers: argparse._SubParsersAction) -> None:
    def command(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name in ("fit", "calibrate"):  # score and evaluate use the settings saved with the model
            parser.add_argument("--config", type=Path, default=None, help="config.toml (default: built-in defaults)")
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
        parser.set_defaults(func=func)
        return parser

    fit = command("fit", cmd_fit, "fit a model on good images")
    fit.add_argument("--good", type=Path, required=True, help="folder of good images, MVTec root, or split.json root")
    fit.add_argument("--out", type=Path, required=True, help="model directory to write")
    fit.add_argument("--holdout", type=_fraction(0.0, 0.5), default=0.1,
                     help="fraction of good images kept out of the bank to set the first threshold")  # fmt: skip

    for name, func, text in (
        ("score", cmd_score, "score images with a fitted model"),
        ("evaluate", cmd_evaluate, "evaluate a model on a labelled dataset"),
        ("calibrate", cmd_calibrate, "set the pass/fail threshold from good images"),
    ):
        parser = command(name, func, text)
        parser.add_argument("--model", type=Path, required=True, help="model directory")
        parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        if name == "score":
            parser.add_argument("images", type=Path, nargs="+")
            parser.add_argument("--heatmaps", type=Path, default=None, help="write heatmap overlay PNGs here")
            parser.add_argument("--json", action="store_true", help="print results as JSON")
        elif name == "evaluate":
            parser.add_argument("--data", type=Path, required=True, help="MVTec-layout or split.json dataset root")
            parser.add_argument("--out", type=Path, required=True, help="report directory")
            parser.add_argument("--batch-size", type=_positive_int, default=8)
            parser.add_argument("--shift-pixels", type=_shift, default=None, help="override the model's shift size")
            parser.add_argument("--shift-only-failing", action="store_true",
                                help="score as workers do: shift only frames failing unshifted (same verdicts; "
                                "passing frames keep unshifted scores). Default: every frame shifted")  # fmt: skip
        else:
            parser.add_argument("--good", type=Path, required=True, help="held-out good images")
            parser.add_argument(
                "--false-reject-rate",
                type=_fraction(0.0, 0.5),
                default=None,
                help="share of good parts allowed to fail (default: [threshold] false_reject_rate)",
            )
            parser.add_argument("--data", type=Path, default=None, help="labelled data: also report best-F1 threshold")

    demo = command("demo", cmd_demo, "fit and evaluate on a synthetic demo line (no Redis)")
    demo.add_argument("--out", type=Path, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lineinspect", description="Streaming visual inspection for factory lines.")
    parser.add_argument("-v", "--verbose", action="store_true")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(subparsers)
    add_stream_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    from pipeline.logs import PlainFormatter, quiet_noisy_libraries

    handler = logging.StreamHandler()
    handler.setFormatter(PlainFormatter())
    logging.basicConfig(level=level, handlers=[handler])
    quiet_noisy_libraries(level)
    from models.datasets import DatasetError
    from models.errors import ArtifactError, BackboneError
    from models.images import ImageError
    from pipeline.config import ConfigError
    from pipeline.streams import StreamsUnavailable

    previous = None
    if threading.current_thread() is threading.main_thread():
        # systemd and Kubernetes stop with SIGTERM: unwind like Ctrl-C, so a model being written is removed and the
        # old one kept. The streaming commands install their own draining handler over this one.
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _one_line_warning(args.command)
    try:
        code: int = args.func(args)
    except (ArtifactError, BackboneError, ConfigError, DatasetError, ImageError, ValueError) as error:
        print(f"lineinspect {args.command}: error: {error}", file=sys.stderr)
        return 2
    except StreamsUnavailable as error:
        # a worker that gave up on Redis (told to stop during an outage, or past a retry deadline): what it held stays
        # pending in Redis, redelivered to it (same name) or claimed by its peers. Exit 1: a runtime failure that a
        # supervisor restarts (2 is a configuration error, which it does not)
        held = "; entries in hand stay pending" if args.command in CONSUMER_COMMANDS else ""  # ingest, one-shots: none
        log.error("redis unreachable, exiting%s", held, extra={"error": str(error)})
        print(f"lineinspect {args.command}: error: {error}", file=sys.stderr)
        return REDIS_LOST_EXIT
    except OSError as error:
        # a model command's path that cannot be read or written, a full disk: the OS names the file. A streaming
        # worker's OSError (Redis gone) is a runtime failure, not bad input: exit 2 would stop systemd restarting it
        if args.command not in MODEL_COMMANDS or isinstance(error, ConnectionError):
            raise
        print(f"lineinspect {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lineinspect {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code


MODEL_COMMANDS = ("fit", "score", "evaluate", "calibrate", "demo")
REDIS_LOST_EXIT = 1


def _one_line_warning(command: str) -> Callable[..., str]:
    """A warning a command prints is for its user: one line naming the command, not Python's file, line number and
    source line (``/.../models/fit.py:196: UserWarning: ...`` followed by the code that warned)."""

    def format_warning(message: Warning | str, *_: object) -> str:
        return f"lineinspect {command}: warning: {message}\n"

    return format_warning


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
