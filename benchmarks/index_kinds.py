"""Exact (``flat``) against approximate (``ivf``, ``hnsw``) nearest-neighbour search over a PatchCore bank.

Search alone (default): the validation split of ``select_defaults.py`` (MTD training images split by file-name hash,
80% fit / 20% validation; no test image is read). The fit part's patches ``(N, 152)`` (the default backbone and
layers, 3x3-averaged, frames standardised as ``fit`` chooses for MTD) fill the fit's 200,000-patch reservoir;
banks are its greedy k-center coreset of 6,272 rows (the default bank, as ``fit`` builds it) and uniform samples of
4x and 16x as many rows (``--sizes``; a coreset that large takes many minutes to select). Queries are the
validation good images and their copies with one synthetic surface defect each (``select_defaults``' "surface"
set), 784 patches an image. For each bank and index kind (built by ``models.index``, with config.toml's settings
unless varied here) it prints the build time, the search time in batches of 8 images (6,272 queries, as a scorer
searches an unshifted batch; median of ``--repeats``), recall@1 (queries whose returned neighbour is as near as
the exact one) and how much farther the returned neighbours are than the exact ones (the patch scores' error).

``--write-models DIR --model M`` instead copies the fitted model ``M`` once per approximate index kind into
``DIR/<variant>``: the same bank, PaDiM members, position statistics and threshold, only PatchCore's index rebuilt
(and ``[index]`` recorded accordingly), so ``scoring_throughput.py`` times the index kinds on one identical model.

    python benchmarks/index_kinds.py --data ../shared/datasets/mtd [--sizes 1 4 16] [--repeats 5]
    python benchmarks/index_kinds.py --model M --write-models DIR
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from select_defaults import VALIDATION_SETS, validation_set

from models.artifact import load_scorer, save_scorer
from models.datasets import good_images
from models.features import PatchFeatureExtractor, flatten_patches
from models.fit import holdout_split
from models.images import read_image
from models.index import NearestNeighbourIndex
from models.memory_bank import PatchReservoir, bounded_coreset
from models.methods.patchcore import PatchCoreMethod, build_extractor, embed
from models.scorer import preprocess
from pipeline.config import config_from_mapping

# name -> [index] settings (config.toml's defaults for whatever is not given) and HNSW's efSearch (not a setting:
# faiss's default 16 is what the product searches with)
VARIANTS: dict[str, tuple[dict, int | None]] = {
    "flat": ({"kind": "flat"}, None),
    "ivf-probe-1": ({"kind": "ivf", "ivf_probe": 1}, None),
    "ivf-probe-8": ({"kind": "ivf", "ivf_probe": 8}, None),
    "ivf-probe-32": ({"kind": "ivf", "ivf_probe": 32}, None),
    "hnsw-32": ({"kind": "hnsw", "hnsw_neighbors": 32}, None),
    "hnsw-32-ef-64": ({"kind": "hnsw", "hnsw_neighbors": 32}, 64),
}
BATCH_IMAGES = 8


def build(bank: np.ndarray, settings: dict, ef_search: int | None) -> NearestNeighbourIndex:
    index_settings = config_from_mapping({"index": settings}).index
    index = NearestNeighbourIndex.build(bank, index_settings.kind, False, index_settings.ivf_lists,
                                        index_settings.ivf_probe, index_settings.hnsw_neighbors)  # fmt: skip
    if ef_search is not None:
        graph = faiss.downcast_index(index.cpu_index)
        assert isinstance(graph, faiss.IndexHNSWFlat), "efSearch is HNSW's"
        graph.hnsw.efSearch = ef_search
    return index


def patches_of(paths_or_images: list, extractor: PatchFeatureExtractor, size: int) -> np.ndarray:
    """Patch features ``(images * 784, 152)`` of image paths or arrays, standardised frames (MTD's fit choice)."""
    rows = []
    for start in range(0, len(paths_or_images), BATCH_IMAGES):
        chunk = paths_or_images[start : start + BATCH_IMAGES]
        images = [read_image(item) if isinstance(item, Path) else item for item in chunk]
        with torch.inference_mode():
            rows.append(flatten_patches(embed(extractor, preprocess(images, size, "stretch", "standardise"))).numpy())
    return np.concatenate(rows)


def search_benchmark(data: Path, sizes: list[int], repeats: int) -> None:
    config = config_from_mapping({})
    fit_paths, validation_paths = holdout_split(good_images(data), 0.2)
    extractor = build_extractor(config.model, torch.device("cpu"))
    extractor.eval()
    size = config.model.image_size
    reservoir = PatchReservoir(config.bank.pool_patches, config.bank.seed)
    for start in range(0, len(fit_paths), 64):
        reservoir.add(patches_of(fit_paths[start : start + 64], extractor, size))
    pool = reservoir.sample()
    rows = round(config.bank.compression_ratio * 28 * 28)
    surface = validation_set(validation_paths, 0, *VALIDATION_SETS["surface"])
    queries = patches_of(surface.images, extractor, size)
    per_image = 28 * 28
    print(f"fit part {len(fit_paths)} images ({reservoir.seen} patches, pool {pool.shape[0]}); queries: "
          f"{len(surface.images)} validation images (half with a synthetic surface defect), {queries.shape[0]} "
          f"patches; torch threads {torch.get_num_threads()}, faiss threads {faiss.omp_get_max_threads()}")  # fmt: skip
    print(f"{'bank':>9} {'variant':<14} {'build s':>8} {'ms/img':>7} {'recall@1':>9} {'defect':>9} {'mean excess':>12} "
          f"{'p99 excess':>11} {'defect top-10 excess':>21}")  # fmt: skip
    defective = np.repeat(surface.labels == 1, per_image)
    for multiple in sizes:
        started = time.perf_counter()
        if multiple == 1:
            bank = bounded_coreset(reservoir, rows, config.bank.coreset_projection_dim, config.bank.seed).features
            how = "coreset"
        else:
            chosen = np.random.default_rng(multiple).choice(pool.shape[0], rows * multiple, replace=False)
            bank = np.ascontiguousarray(pool[np.sort(chosen)])
            how = "uniform"
        print(f"bank {bank.shape[0]} x {bank.shape[1]} ({how}, {time.perf_counter() - started:.0f} s to select)")
        exact: np.ndarray | None = None
        for name, (settings, ef_search) in VARIANTS.items():
            started = time.perf_counter()
            index = build(bank, settings, ef_search)
            build_s = time.perf_counter() - started
            batch = BATCH_IMAGES * per_image
            distances = np.concatenate([index.search(queries[s : s + batch], 1)[0][:, 0]
                                        for s in range(0, queries.shape[0], batch)])  # fmt: skip
            timings = []
            for repeat in range(repeats):
                start = (repeat * batch) % (queries.shape[0] - batch)
                started = time.perf_counter()
                index.search(queries[start : start + batch], 1)
                timings.append((time.perf_counter() - started) / BATCH_IMAGES)
            if exact is None:
                exact = distances
            excess = distances / np.maximum(exact, 1e-12) - 1
            near = distances <= exact * (1 + 1e-5) + 1e-6  # as near as the exact neighbour (ties count)
            # what the image score sees: the mean of each defective image's 10 highest patch distances
            top = np.sort(distances.reshape(-1, per_image), axis=1)[:, -10:].mean(axis=1)
            top_exact = np.sort(exact.reshape(-1, per_image), axis=1)[:, -10:].mean(axis=1)
            top_excess = (top / top_exact - 1)[surface.labels == 1]
            print(f"{bank.shape[0]:>9} {name:<14} {build_s:8.2f} {1000 * np.median(timings):7.2f} "
                  f"{near.mean():9.4f} {near[defective].mean():9.4f} {100 * excess.mean():11.2f}% "
                  f"{100 * np.percentile(excess, 99):10.2f}% {100 * top_excess.mean():20.2f}%", flush=True)  # fmt: skip


def write_models(model: Path, out_dir: Path) -> None:
    scorer = load_scorer(model, device="cpu")
    method = scorer.method
    if not isinstance(method, PatchCoreMethod):
        raise SystemExit(f"{model} is a {method.name} model: only PatchCore has an index")
    bank = method.bank.features
    for name, (settings, ef_search) in VARIANTS.items():
        if name == "flat" or ef_search is not None:
            continue  # the model itself; efSearch is not saved as a setting
        method.index = build(bank, settings, None)
        method.index_settings = method.index_settings.model_copy(update=settings)
        print(f"{out_dir / name}: model id {save_scorer(scorer, out_dir / name)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mtd"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], help="bank rows as multiples of 6,272")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", type=Path, help="with --write-models: the fitted model to copy")
    parser.add_argument("--write-models", type=Path, help="write --model once per approximate index kind here")
    args = parser.parse_args()
    if args.write_models:
        if args.model is None:
            parser.error("--write-models needs --model")
        write_models(args.model, args.write_models)
    else:
        search_benchmark(args.data, args.sizes, args.repeats)


if __name__ == "__main__":
    main()
