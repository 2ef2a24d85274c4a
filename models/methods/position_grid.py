"""Per-position linear algebra on a feature grid, shared by N-pad and PaDiM.

A fitted model holds one Gaussian per position of the stride-8 grid: means ``(P, C)`` and whitening matrices
``(P, C, C)`` (``A_p = chol(Sigma_p)^-1``), ``P = h * w``. Scoring whitens each view's features ``(V, C, h, w)``
against them, optionally taking the smallest distance over the ``(2r + 1)^2`` positions within ``r`` cells
(N-pad's inference neighbourhood): ``min_neighbour_mahalanobis -> (V, h, w)``. Batched small-matrix kernels run
through ``per_position`` (one single-threaded chunk per core), which holds up on a CPU shared with other processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

VIEW_CHUNK = 8  # views whose neighbourhoods are whitened in one batched matmul (bounds scoring memory)


@contextlib.contextmanager
def single_threaded_kernels() -> Iterator[int]:
    """Run torch single-threaded inside; yields the previous thread count.

    Batched small-matrix kernels (one Cholesky or matmul per grid position) open one parallel region per matrix.
    On a CPU shared with other processes each region waits for its descheduled partner thread: measured here at a
    load of 12 on 2 cores, 784 Choleskys of 152 x 152 took 70 s with 2 threads and 1.5 s with 1, and the scoring
    matmul 8.9 s against 0.7 s. Parallelise over positions ourselves instead (``per_position``).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def per_position(function: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """``function(*chunks)`` over chunks of the leading (position) dimension, one single-threaded chunk per core,
    concatenated. CUDA tensors go through in one call."""
    if tensors[0].device.type != "cpu":
        return function(*tensors)
    with single_threaded_kernels() as threads:
        if threads <= 1 or tensors[0].shape[0] < 2 * threads:
            return function(*tensors)
        chunks = zip(*(tensor.chunk(threads) for tensor in tensors), strict=True)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return torch.cat(list(pool.map(lambda parts: function(*parts), chunks)))


def neighbour_offsets(radius: int) -> list[tuple[int, int]]:
    """``(dy, dx)`` of the ``(2r + 1)^2`` positions within Chebyshev distance ``radius``, row-major."""
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


def valid_slices(grid: tuple[int, int], dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices of positions ``p`` and of ``q = p + (dy, dx)`` on a ``(h, w)`` grid, where both lie on the grid."""
    height, width = grid
    rows_p = slice(max(0, -dy), height - max(0, dy))
    cols_p = slice(max(0, -dx), width - max(0, dx))
    rows_q = slice(max(0, dy), height - max(0, -dy))
    cols_q = slice(max(0, dx), width - max(0, -dx))
    return (rows_p, cols_p), (rows_q, cols_q)


def whitening_matrices(covariances: torch.Tensor) -> torch.Tensor:
    """``(P, C, C)`` -> lower-triangular ``A = chol(Sigma)^-1``: ``A^T A`` is the inverse covariance and the
    Mahalanobis distance is ``||A (x - mu)||`` (a sum of squares, never negative through rounding)."""
    factor = torch.linalg.cholesky(covariances)
    identity = torch.eye(covariances.shape[-1], dtype=covariances.dtype, device=covariances.device)
    return torch.linalg.solve_triangular(factor, identity.expand_as(factor), upper=False)


def min_neighbour_mahalanobis(
    features: torch.Tensor, means: torch.Tensor, whitening: torch.Tensor, radius: int
) -> torch.Tensor:
    """``(V, C, h, w)`` -> ``(V, h, w)``: min over positions q within ``radius`` of p of ``||A_q (x_p - mu_q)||``.

    For each q the features of its ``(2r + 1)^2`` neighbours (all views) are whitened in one batched matmul, so
    each whitening matrix is read once per chunk of views.
    """
    views, channels, height, width = features.shape
    kernel = 2 * radius + 1
    positions = height * width
    # at each q, x at q + offset for every offset (zeros off the grid, never used below); slicing a padded copy is
    # ~20x faster than F.unfold on the CPU here
    padded = F.pad(features, (radius, radius, radius, radius))
    shifted = [padded[:, :, radius + dy : radius + dy + height, radius + dx : radius + dx + width]
               for dy, dx in neighbour_offsets(radius)]  # fmt: skip
    stacked = torch.stack(shifted).permute(3, 4, 0, 1, 2).reshape(positions, kernel * kernel * views, channels)
    whitened = per_position(torch.bmm, stacked - means[:, None, :], whitening.transpose(1, 2))
    distances = whitened.square().sum(-1).sqrt().view(height, width, kernel * kernel, views)
    # distances[q, o] = d(x_{q + o}, G_q): move each offset's map to p = q + o and take the minimum
    best = torch.full((views, height, width), torch.inf, dtype=features.dtype, device=features.device)
    for position, (dy, dx) in enumerate(neighbour_offsets(radius)):
        at_q, at_p = valid_slices((height, width), dy, dx)
        candidate = distances[at_q[0], at_q[1], position].permute(2, 0, 1)
        best[:, at_p[0], at_p[1]] = torch.minimum(best[:, at_p[0], at_p[1]], candidate)
    return best
