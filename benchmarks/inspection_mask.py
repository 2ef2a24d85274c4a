"""What an inspection mask does on a line whose parts carry a label with a lot code that changes from part to part.

Synthetic data only (no test split of anything is read): parts are crops of scikit-image's ``brick`` texture, each
moved by up to 2 px and 1 degree (``models.synthetic.make_part``), with a white label in the top-right corner
printing a random 6-digit lot code. New good parts come plain and with a pen mark in the label (one to three dark
strokes, as an operator ticks a part off: nothing the good images showed); defective parts get one synthetic
defect at ``--strength`` (``add_synthetic_defect``, the scratch/blob/cutpaste/noise kinds) that does not touch the
label. The default model is fitted on ``--train`` good parts twice, without a mask and with one ignoring the label
(``[model] inspection_mask``), as ``lineinspect fit`` fits (10% kept out for a first threshold, 10% for position
statistics); each threshold is then calibrated on ``--calibrate`` more plain good parts at a 0.5% false-reject rate,
as README asks before verdicts are trusted (``lineinspect calibrate``), and both models score the same new parts as
the streaming scorer does (shifting only frames that fail unshifted).

Reported per model: image AUROC of all good parts against the defective ones, and at the calibrated threshold the
good parts rejected (plain and marked) and the defects caught.

    python benchmarks/inspection_mask.py --out /tmp/inspection_mask

Writes the parts and ``mask.png`` under ``--out`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from models.evaluation import image_auroc
from models.fit import fit_scorer, score_paths
from models.images import read_image
from models.scorer import Scorer
from models.synthetic import DEFECT_KINDS, add_synthetic_defect, make_part
from models.threshold import false_reject_threshold
from pipeline.config import config_from_mapping

SIZE = 224
LABEL = (8, 140, 44, 216)  # top, left, bottom, right of the printed label


def make_parts(out_dir: Path, count: int, seed: int, defect_strength: float = 0.0, marked: bool = False) -> list[Path]:
    """``count`` parts as PNGs under ``out_dir``, each with its own lot code; with ``defect_strength`` one defect
    each, ``marked`` a pen mark in the label."""
    import skimage.data

    texture = skimage.data.brick()
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    top, left, bottom, right = LABEL
    crop_top, crop_left = (texture.shape[0] - SIZE) // 2, (texture.shape[1] - SIZE) // 2  # make_part's crop
    paths = []
    for index in range(count):
        labelled = texture.copy()  # the label is on the part, so it moves with it
        label = labelled[crop_top + top : crop_top + bottom, crop_left + left : crop_left + right]
        label[:] = 235
        code = f"{int(rng.integers(0, 1_000_000)):06d}"
        cv2.putText(label, code, (4, bottom - top - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.55, 20, 2, cv2.LINE_AA)
        if marked:
            for _ in range(int(rng.integers(1, 4))):
                points = np.stack([rng.integers(0, right - left, 3), rng.integers(0, bottom - top, 3)], axis=1)
                cv2.polylines(label, [points.astype(np.int32)], False, 60, 2, cv2.LINE_AA)
        part = make_part(labelled, rng, SIZE, max_shift=2.0, max_rotation=1.0)
        if defect_strength:
            kind = DEFECT_KINDS[index % len(DEFECT_KINDS)]
            while True:
                flawed, defect = add_synthetic_defect(part, rng, kind=kind, strength=defect_strength)
                if not defect[max(0, top - 8) : bottom + 8, left - 8 : min(SIZE, right + 8)].any():
                    part = flawed
                    break
        path = out_dir / f"{index:04d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(part, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def write_mask(path: Path) -> Path:
    """White inspected, the label (and 4 px around it) black."""
    mask = np.full((SIZE, SIZE), 255, np.uint8)
    top, left, bottom, right = LABEL
    mask[max(0, top - 4) : bottom + 4, left - 4 : min(SIZE, right + 4)] = 0
    cv2.imwrite(str(path), mask)
    return path


def score_all(scorer: Scorer, paths: list[Path], desc: str) -> np.ndarray:
    scores = []
    for start in tqdm(range(0, len(paths), 8), desc=desc, unit="batch"):
        scores.append(scorer.score([read_image(p) for p in paths[start : start + 8]]).scores)
    return np.concatenate(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--calibrate", type=int, default=200, help="plain good parts setting each threshold")
    parser.add_argument("--test", type=int, default=100, help="good and defective parts each")
    parser.add_argument("--strength", type=float, default=0.5, help="defects' strength, (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train = make_parts(args.out / "train", args.train, args.seed)
    calibration = make_parts(args.out / "calibrate", args.calibrate, args.seed + 4)
    good = make_parts(args.out / "test_good", args.test, args.seed + 1)
    marked = make_parts(args.out / "test_good_marked", args.test, args.seed + 2, marked=True)
    defective = make_parts(args.out / "test_defective", args.test, args.seed + 3, defect_strength=args.strength)
    mask = write_mask(args.out / "mask.png")
    rows = []
    for name, model in (("no mask", {}), ("label ignored", {"inspection_mask": str(mask)})):
        scorer = fit_scorer(train, config_from_mapping({"model": model}), progress=True)
        calibration_scores = score_paths(scorer, calibration, 8, desc=f"{name}: calibrating")
        scorer.threshold = false_reject_threshold(calibration_scores, 0.005)
        threshold = scorer.threshold.value
        plain, pen = score_all(scorer, good, f"{name}: good"), score_all(scorer, marked, f"{name}: marked")
        defects = score_all(scorer, defective, f"{name}: defective")
        labels = np.r_[np.zeros(len(plain) + len(pen)), np.ones(len(defects))]
        auroc = image_auroc(labels, np.r_[plain, pen, defects])
        rows.append(f"| {name} | {100 * auroc:.1f} | {int((plain > threshold).sum())} of {len(plain)} | "
                    f"{int((pen > threshold).sum())} of {len(pen)} | {int((defects > threshold).sum())} of "
                    f"{len(defects)} |")  # fmt: skip
    print(f"\n{args.train} good parts fitted, {args.calibrate} calibrating each threshold; {args.test} new parts of "
          f"each kind scored, defects at strength {args.strength}\n")  # fmt: skip
    print("| model | image AUROC | plain good rejected | marked good rejected | defects caught |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
