"""What the native libraries cost on this machine: faiss's exact search against numpy's matrix product, and the
backbone per view by pass size. Behind RESULTS.md section 2, session 14; run it on a new kind of machine to see
whether faiss's bundled OpenBLAS picked fast kernels (``models.native``).

    python benchmarks/native_costs.py [--rounds 5]

Prints the OpenBLAS core faiss runs (``openblas_get_corename``), ms per image and GFLOP/s of a flat L2 search of
8 frames' 784 patches each over a 6,272 x 152 bank (the default model's shapes) and of the same product in numpy,
then the Lite0 backbone (blocks.2-4) in ms per view for 40 views (8 frames x 5 shifted views) run in one pass and in
chunks.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from models.backbones import load_backbone
from models.native import configure_native_libraries, faiss_openblas_core

BANK_ROWS, CHANNELS, PATCHES_PER_IMAGE, IMAGES = 6272, 152, 784, 8


def seconds_per_call(function: Callable[[], object], rounds: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(rounds):
        function()
    return (time.perf_counter() - started) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import faiss

    settings = configure_native_libraries()
    core = faiss_openblas_core() or "(no separate OpenBLAS)"
    print(f"OPENBLAS_CORETYPE {settings.openblas_core_type}, malloc tuned {settings.malloc_tuned}, "
          f"faiss's OpenBLAS core {core}, torch threads {torch.get_num_threads()}")  # fmt: skip
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((BANK_ROWS, CHANNELS)).astype(np.float32)
    queries = rng.standard_normal((PATCHES_PER_IMAGE * IMAGES, CHANNELS)).astype(np.float32)
    index = faiss.IndexFlatL2(CHANNELS)
    index.add(bank)
    flops = 2.0 * queries.shape[0] * BANK_ROWS * CHANNELS
    for name, function in (("faiss flat search, k=1", lambda: index.search(queries, 1)),
                           ("numpy matrix product", lambda: queries @ bank.T)):  # fmt: skip
        seconds = seconds_per_call(function, args.rounds)
        print(f"{name}: {1000 * seconds / IMAGES:.1f} ms per image, {flops / seconds / 1e9:.0f} GFLOP/s")
    import models.backbones as backbones

    backbone = load_backbone("efficientnet_lite0", ("blocks.2", "blocks.3", "blocks.4"))
    views = torch.rand(5 * IMAGES, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    default_chunk, default_pixels = backbones.FORWARD_CHUNK, backbones.PASS_PIXELS
    default_pass = backbones.images_per_pass(224, 224)
    with torch.inference_mode():
        for chunk in (views.shape[0], 16, 8, 5, 4):
            backbones.FORWARD_CHUNK, backbones.PASS_PIXELS = chunk, chunk * 224 * 224
            seconds = seconds_per_call(lambda: backbone(views), max(1, args.rounds // 2))
            print(f"backbone, {views.shape[0]} views in passes of {chunk}: {1000 * seconds / views.shape[0]:.1f} "
                  f"ms per view{' (default)' if chunk == default_pass else ''}")  # fmt: skip
    backbones.FORWARD_CHUNK, backbones.PASS_PIXELS = default_chunk, default_pixels


if __name__ == "__main__":
    main()
