"""How many good images: the default model's accuracy and first threshold against the number of good images.

Validation only, with the protocol of RESULTS.md section 4 (``select_defaults.py``): MTD's training images are
split by file-name hash into a fit pool (80%, 591 images) and validation (20%, 171); validation defects are
synthetic (``select_defaults.validation_set``: each validation image as is and with one defect). No test image is
read. For each N the first N of a seeded shuffle of the fit pool (so each N's images contain the smaller N's of the
same draw; ``--repeats`` draws again for N up to ``--repeat-below``) are fitted with ``fit_scorer`` as
``lineinspect fit`` does (10% kept out for the threshold, 10% for position statistics), and every validation image
is scored with every frame shifted (as thresholds are set).

Reported per N: the images in the bank, the position statistics and the threshold slice; image and pixel AUROC
per defect set; the false-reject rate of the fitted threshold on the validation good images (target 0.5%). And the
threshold on its own: a threshold set from k good images (``models.threshold.false_reject_threshold``) drawn at
random from the validation good images, measured on the others, over ``--draws`` draws: the mean and 90th
percentile false-reject rate, for each k.

    python benchmarks/learning_curve.py --data ../shared/datasets/mtd --out /tmp/learning_curve

Writes ``learning_curve.png``, ``learning_curve.md`` (the tables) and ``learning_curve.jsonl`` (one line per fit)
into ``--out``. ``--shift-pixels 0`` and ``--validation-images`` cut the scoring cost on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from select_defaults import VALIDATION_SETS, SetOutputs, metrics, validation_set

from models.datasets import good_images
from models.fit import fit_scorer, holdout_split
from models.images import read_image
from models.scorer import Scorer
from models.threshold import false_reject_threshold
from pipeline.config import Config, load_config

CALIBRATION_SIZES = (1, 2, 3, 5, 10, 20, 50)


class _Recorder(logging.Handler):
    """Keeps the warnings ``fit`` logs, to report what a user of that N is told."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def score_images(scorer: Scorer, images: list[np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image scores ``(N,)`` and maps ``(N, S, S)``, every frame shifted."""
    batches = [scorer.score(images[start : start + batch_size], shift_every_frame=True)
               for start in range(0, len(images), batch_size)]  # fmt: skip
    return np.concatenate([b.scores for b in batches]), np.concatenate([b.maps for b in batches])


def threshold_false_rejects(good_scores: np.ndarray, sizes: tuple[int, ...], rate: float, draws: int,
                            seed: int) -> dict[int, tuple[float, float]]:  # fmt: skip
    """k -> (mean, 90th percentile) false-reject rate on the other good images of a threshold from k of them."""
    rng = np.random.default_rng(seed)
    result: dict[int, tuple[float, float]] = {}
    for size in sizes:
        if size >= len(good_scores):
            continue
        rates = np.empty(draws)
        for draw in range(draws):
            chosen = np.zeros(len(good_scores), bool)
            chosen[rng.choice(len(good_scores), size, replace=False)] = True
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                threshold = false_reject_threshold(good_scores[chosen], rate).value
            rates[draw] = float((good_scores[~chosen] > threshold).mean())
        result[size] = (float(rates.mean()), float(np.percentile(rates, 90)))
    return result


def fit_one(paths: list[Path], config: Config) -> tuple[Scorer, list[str]]:
    """The scorer ``lineinspect fit`` would make of ``paths``, and the warnings it gave (logged or raised)."""
    recorder = _Recorder()
    logging.getLogger("models").addHandler(recorder)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scorer = fit_scorer(paths, config, progress=False, holdout_fraction=0.1)
    finally:
        logging.getLogger("models").removeHandler(recorder)
    return scorer, recorder.messages + [str(warning.message) for warning in caught]


def markdown(results: list[dict], set_names: list[str], rate: float) -> str:
    columns = [f"{name} image / pixel AUROC" for name in set_names]
    lines = ["| N good images | draw | bank / statistics / threshold images | " + " | ".join(columns)
             + f" | false rejects at the fitted threshold (target {rate:.1%}) |",
             "|---" * (4 + len(set_names)) + "|"]  # fmt: skip
    for result in results:
        cells = [f"{100 * result[f'{name}_image_auroc']:.1f} / {100 * result[f'{name}_pixel_auroc']:.1f}"
                 for name in set_names]  # fmt: skip
        frr = result["fitted_false_reject_rate"]
        fitted = "no threshold" if frr is None else f"{100 * frr:.1f}% ({result['good_rejected']} of {result['good']})"
        lines.append(f"| {result['n']} | {result['draw']} | {result['bank_images']} / {result['statistics_images']} / "
                     f"{result['threshold_images']} | " + " | ".join(cells) + f" | {fitted} |")  # fmt: skip
    sizes = sorted({int(k) for result in results for k in result["threshold_from_k"]})
    lines += ["", "False-reject rate of a threshold from k good images (mean / 90th percentile over draws):", "",
              "| N good images | draw | " + " | ".join(f"k = {k}" for k in sizes) + " |",
              "|---" * (2 + len(sizes)) + "|"]  # fmt: skip
    for result in results:
        by_k = result["threshold_from_k"]
        cells = [f"{100 * by_k[str(k)][0]:.1f}% / {100 * by_k[str(k)][1]:.1f}%" if str(k) in by_k else "-"
                 for k in sizes]  # fmt: skip
        lines.append(f"| {result['n']} | {result['draw']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], set_names: list[str], rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    first = [r for r in results if r["draw"] == 0]
    counts = [r["n"] for r in first]
    for name in set_names:
        for level, style in (("image", "-o"), ("pixel", "--s")):
            left.plot(counts, [100 * r[f"{name}_{level}_auroc"] for r in first], style, label=f"{name} {level}")
        others = [r for r in results if r["draw"] > 0]
        if others:
            left.plot([r["n"] for r in others], [100 * r[f"{name}_image_auroc"] for r in others], "k.", alpha=0.5)
    left.set(xscale="log", xlabel="good images given to fit", ylabel="AUROC (%)",
             title="validation AUROC (dots: other draws)")  # fmt: skip
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for result in (first[0], first[len(first) // 2], first[-1]):
        by_k = sorted((int(k), v) for k, v in result["threshold_from_k"].items())
        right.plot([k for k, _ in by_k], [100 * v[0] for _, v in by_k], "-o", label=f"model of N = {result['n']}")
    right.axhline(100 * rate, color="grey", linestyle=":", label=f"target {rate:.1%}")
    right.set(xscale="log", xlabel="good images the threshold is set from (k)",
              ylabel="false rejects on other good images (%)", title="threshold from k good images (mean)")  # fmt: skip
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mtd"))
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNG, markdown and JSON lines")
    parser.add_argument("--config", type=Path, default=None, help="settings (default: the built-in defaults)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[5, 10, 20, 50, 100, 200, 0],
                        help="good images to fit on; 0 = the whole fit pool")  # fmt: skip
    parser.add_argument("--sets", nargs="*", default=["subtle", "surface"], choices=list(VALIDATION_SETS))
    parser.add_argument("--repeats", type=int, default=1, help="draws of the fit images for N <= --repeat-below")
    parser.add_argument("--repeat-below", type=int, default=20)
    parser.add_argument("--validation-images", type=int, default=0, help="use only the first this many (0 = all)")
    parser.add_argument("--shift-pixels", type=int, default=None, help="override [scoring] shift_pixels")
    parser.add_argument("--draws", type=int, default=2000, help="draws per k for the threshold-from-k table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 holds up best on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    if args.shift_pixels is not None:
        config = config.model_copy(update={"scoring": config.scoring.model_copy(
            update={"shift_pixels": args.shift_pixels})})  # fmt: skip
    rate = config.threshold.false_reject_rate
    pool, validation_paths = holdout_split(good_images(args.data), 0.2)
    if args.validation_images:
        validation_paths = validation_paths[: args.validation_images]
    sets = {name: validation_set(validation_paths, 0, *VALIDATION_SETS[name]) for name in args.sets}
    good = [read_image(path) for path in validation_paths]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"fit pool {len(pool)} training images; validation {len(good)} good + {len(good)} synthetic-defect images "
          f"per set ({', '.join(args.sets)}); shift_pixels {config.scoring.shift_pixels}", flush=True)  # fmt: skip
    results: list[dict] = []
    jsonl = args.out / "learning_curve.jsonl"
    jsonl.write_text("")
    for size in args.sizes:
        n = size or len(pool)
        for draw in range(args.repeats if n <= args.repeat_below else 1):
            order = np.random.default_rng(args.seed + draw).permutation(len(pool))
            paths = [pool[index] for index in order[:n]]
            started = time.perf_counter()
            scorer, told = fit_one(paths, config)
            fitted_s = time.perf_counter() - started
            good_scores, good_maps = score_images(scorer, good, config.scoring.batch_size)
            outputs: SetOutputs = {}
            for name, validation in sets.items():
                defective = [image for image, label in zip(validation.images, validation.labels, strict=True) if label]
                scores, maps = score_images(scorer, defective, config.scoring.batch_size)
                # interleaved as validation_set made them: each good image, then its defective copy
                outputs[name] = (np.stack([good_scores, scores], 1).reshape(-1),
                                 np.stack([good_maps, maps], 1).reshape(-1, *maps.shape[1:]))  # fmt: skip
            result = {"n": n, "draw": draw, "bank_images": scorer.training.images,
                      "statistics_images": scorer.position_stats.images if scorer.position_stats else 0,
                      "threshold_images": scorer.threshold.good_images if scorer.threshold else 0,
                      "members": 1 + len(scorer.companions), "good": len(good), "fit_s": round(fitted_s, 1),
                      "scored_s": round(time.perf_counter() - started - fitted_s, 1), "warnings": told,
                      **metrics(outputs, sets)}  # fmt: skip
            rejected = int((good_scores > scorer.threshold.value).sum()) if scorer.threshold else 0
            result["good_rejected"] = rejected
            result["fitted_false_reject_rate"] = rejected / len(good) if scorer.threshold else None
            by_k = threshold_false_rejects(good_scores, CALIBRATION_SIZES, rate, args.draws, args.seed)
            result["threshold_from_k"] = {str(k): v for k, v in by_k.items()}
            results.append(result)
            with jsonl.open("a") as stream:
                stream.write(json.dumps(result) + "\n")
            aurocs = ", ".join(f"{name} {100 * result[f'{name}_image_auroc']:.1f} / "
                               f"{100 * result[f'{name}_pixel_auroc']:.1f}" for name in args.sets)  # fmt: skip
            frr = result["fitted_false_reject_rate"]
            print(f"N {n:4d} draw {draw}: bank {result['bank_images']}, statistics {result['statistics_images']}, "
                  f"threshold {result['threshold_images']} ({result['members']} members); {aurocs}; false rejects "
                  f"{'-' if frr is None else f'{100 * frr:.1f}%'}; fit {fitted_s:.0f} s, scoring "
                  f"{result['scored_s']:.0f} s", flush=True)  # fmt: skip
            for message in told:
                print(f"    told: {message}", flush=True)
    (args.out / "learning_curve.md").write_text(markdown(results, args.sets, rate))
    plot(results, args.sets, rate, args.out / "learning_curve.png")
    print(f"wrote {args.out / 'learning_curve.md'}, {args.out / 'learning_curve.png'} and {jsonl}")


if __name__ == "__main__":
    main()
