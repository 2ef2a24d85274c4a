"""Multivariate-Gaussian statistics shared by the Gaussian-AD and PaDiM methods.

- ``GaussianMoments``: running sums (float64) of samples for P independent Gaussians of dimension d at once (one per
  feature-map position; P = 1 for image-level vectors), so fitting takes one pass and memory does not grow with the
  number of images. Gives the mean, the sample covariance and the Ledoit-Wolf shrunk covariance.
- ``least_variance_components``: "negated PCA", the eigenvectors with the smallest variance that together hold a
  given share of the total variance.
- ``mahalanobis``: distances of samples to their Gaussians.

Shapes: samples ``(n, P, d)``; means ``(P, d)``; covariances and precisions ``(P, d, d)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

RANK_TOLERANCE = 1e-6  # eigenvalues below this fraction of the largest count as numerically zero


class ShrunkCovariance(NamedTuple):
    covariance: torch.Tensor  # (P, d, d) float64
    shrinkage: torch.Tensor  # (P,) in [0, 1]: weight of the scaled identity


class GaussianMoments:
    """Sums of ``y = x - shift`` (and of its outer products, and for Ledoit-Wolf ``|y|^2 y`` and ``|y|^4``).

    ``shift`` should be close to the mean (e.g. the mean of the first images): sums around it lose no precision
    when the features' mean is large against their spread.
    """

    def __init__(self, positions: int, dim: int, shift: torch.Tensor | None = None, fourth_moments: bool = False):
        if positions < 1 or dim < 1:
            msg = f"GaussianMoments needs positions >= 1 and dim >= 1, got {positions} and {dim}"
            raise ValueError(msg)
        self.positions = positions
        self.dim = dim
        self.shift = torch.zeros(positions, dim, dtype=torch.float64) if shift is None else shift.double().cpu()
        if self.shift.shape != (positions, dim):
            msg = f"shift must have shape {(positions, dim)}, got {tuple(self.shift.shape)}"
            raise ValueError(msg)
        self.count = 0
        self.sum = torch.zeros(positions, dim, dtype=torch.float64)
        self.outer = torch.zeros(positions, dim, dim, dtype=torch.float64)
        self.fourth_moments = fourth_moments
        self.norm2_sum = torch.zeros(positions, dim, dtype=torch.float64)  # sum |y|^2 y
        self.norm4_sum = torch.zeros(positions, dtype=torch.float64)  # sum |y|^4

    def add(self, samples: torch.Tensor) -> None:
        """Accumulate ``(n, P, d)`` samples."""
        if samples.dim() != 3 or samples.shape[1:] != (self.positions, self.dim):
            msg = f"samples must have shape (n, {self.positions}, {self.dim}), got {tuple(samples.shape)}"
            raise ValueError(msg)
        shifted = samples.double().cpu() - self.shift  # (n, P, d)
        by_position = shifted.transpose(0, 1)  # (P, n, d)
        self.count += samples.shape[0]
        self.sum += shifted.sum(dim=0)
        # in place: the (P, d, d) product is 340 MB for the default PaDiM batch, a fresh allocation each time took
        # 5x as long as the product itself (page faults)
        self.outer.baddbmm_(by_position.transpose(1, 2), by_position)
        if self.fourth_moments:
            norm2 = shifted.square().sum(dim=2)  # (n, P)
            self.norm2_sum += (norm2[:, :, None] * shifted).sum(dim=0)
            self.norm4_sum += norm2.square().sum(dim=0)

    def _require(self, minimum: int) -> None:
        if self.count < minimum:
            msg = f"a Gaussian needs at least {minimum} samples, got {self.count}"
            raise ValueError(msg)

    def mean(self) -> torch.Tensor:
        """``(P, d)`` float64."""
        self._require(1)
        return self.sum / self.count + self.shift

    def covariance(self, unbiased: bool = True) -> torch.Tensor:
        """Sample covariance ``(P, d, d)`` float64 (divided by n - 1 when ``unbiased``, else by n)."""
        self._require(2 if unbiased else 1)
        centre = self.sum / self.count  # mean of y
        scatter = self.outer - self.count * centre[:, :, None] * centre[:, None, :]
        scatter = 0.5 * (scatter + scatter.transpose(1, 2))
        return scatter / (self.count - 1 if unbiased else self.count)

    def ledoit_wolf(self) -> ShrunkCovariance:
        """Ledoit & Wolf (2004): ``(1 - s) S + s mu I`` with S the (biased) sample covariance, mu = trace(S) / d and
        s = min(1, b / c), b = sum_k |x_k x_k^T - S|_F^2 / n^2 over centred samples x_k, c = |S - mu I|_F^2
        (the same estimator as sklearn's ``LedoitWolf``)."""
        if not self.fourth_moments:
            msg = "Ledoit-Wolf needs GaussianMoments(..., fourth_moments=True)"
            raise ValueError(msg)
        self._require(1)
        n = self.count
        sample = self.covariance(unbiased=False)
        centre = self.sum / n  # the mean of y; x = y - centre
        centre_sq = centre.square().sum(dim=1)  # |m|^2
        outer_trace = self.outer.diagonal(dim1=1, dim2=2).sum(dim=1)
        quadratic = torch.einsum("pi,pij,pj->p", centre, self.outer, centre)
        # sum_k |x_k|^4 expanded in the sums of y: (|y|^2 - 2 y.m + |m|^2)^2 summed over k
        norm4_centred = (
            self.norm4_sum - 4.0 * (self.norm2_sum * centre).sum(dim=1) + 4.0 * quadratic
            + 2.0 * centre_sq * outer_trace - 3.0 * n * centre_sq.square()
        )  # fmt: skip
        identity = torch.eye(self.dim, dtype=torch.float64)
        mu = sample.diagonal(dim1=1, dim2=2).sum(dim=1) / self.dim
        sample_sq = sample.square().sum(dim=(1, 2))
        distance = (sample - mu[:, None, None] * identity).square().sum(dim=(1, 2))
        spread = ((norm4_centred - n * sample_sq) / n**2).clamp_min(0.0)
        shrinkage = torch.where(distance > 0, torch.minimum(spread, distance) / distance.clamp_min(1e-300), 1.0)
        covariance = (1.0 - shrinkage)[:, None, None] * sample + (shrinkage * mu)[:, None, None] * identity
        return ShrunkCovariance(covariance, shrinkage)


def pool_neighbours(
    mean: torch.Tensor, covariance: torch.Tensor, grid: tuple[int, int], radius: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's Gaussian replaced by the moment-matched mixture of those within ``radius`` cells.

    ``mean (P, d)`` and ``covariance (P, d, d)`` of the ``grid = (h, w)`` positions (P = h * w); the mixture of a
    ``(2 radius + 1)^2`` neighbourhood (cut at the borders) has mean ``avg(mu_q)`` and covariance
    ``avg(S_q + mu_q mu_q^T) - mean mean^T``: more samples per Gaussian, and small misalignments of normal parts
    inside the fitted spread. ``radius = 0`` returns the inputs.
    """
    if radius == 0:
        return mean, covariance
    height, width = grid
    positions, dim = mean.shape
    kernel = 2 * radius + 1

    def pool(values: torch.Tensor) -> torch.Tensor:  # (P, k) -> (P, k), averaged over each neighbourhood
        planes = values.T.reshape(1, -1, height, width)
        pooled = torch.nn.functional.avg_pool2d(planes, kernel, 1, radius, count_include_pad=False)
        return pooled.reshape(-1, positions).T

    mean64, covariance64 = mean.double(), covariance.double()
    pooled_mean = pool(mean64)
    second = pool((covariance64 + mean64[:, :, None] * mean64[:, None, :]).reshape(positions, dim * dim))
    pooled = second.reshape(positions, dim, dim) - pooled_mean[:, :, None] * pooled_mean[:, None, :]
    return pooled_mean, 0.5 * (pooled + pooled.transpose(1, 2))


def precision_matrix(covariance: torch.Tensor) -> torch.Tensor:
    """Symmetric inverse ``(P, d, d)`` float64 of positive-definite covariances; a clear error when one is singular."""
    factor, info = torch.linalg.cholesky_ex(covariance.double())
    if bool((info > 0).any()):
        msg = (
            f"{int((info > 0).sum())} of {covariance.shape[0]} covariances are singular (constant features?): "
            "use more training images or a larger regularisation"
        )
        raise ValueError(msg)
    precision = torch.cholesky_inverse(factor)
    return (0.5 * (precision + precision.transpose(-1, -2))).contiguous()  # row-major: same products after reload


def least_variance_components(
    covariance: torch.Tensor, retained_variance: float, max_components: int | None = None
) -> torch.Tensor:
    """Negated PCA: ``(C, k)`` orthonormal eigenvectors of a ``(C, C)`` covariance with the smallest eigenvalues.

    Keeps the fewest smallest-variance components that together hold at least ``retained_variance`` of the total
    variance (Rippel et al.: about 5% works best), at most ``max_components`` of them (the smallest ones).
    Numerically null directions (eigenvalue < 1e-6 x the largest: constant features, or fewer samples than
    channels) are left out: no normal sample varies along them, so a Gaussian cannot be fitted there.
    Columns are ordered from the largest kept variance to the smallest.
    """
    if not 0 < retained_variance <= 1:
        msg = f"retained_variance must be in (0, 1], got {retained_variance}"
        raise ValueError(msg)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())  # ascending
    largest = float(eigenvalues[-1])
    if largest <= 0:
        msg = "the features do not vary at all: no components to keep"
        raise ValueError(msg)
    usable = eigenvalues > RANK_TOLERANCE * largest
    eigenvalues, eigenvectors = eigenvalues[usable], eigenvectors[:, usable]
    shares = torch.cumsum(eigenvalues, dim=0) / eigenvalues.sum()  # cumulative share, smallest first
    keep = int(torch.searchsorted(shares, torch.tensor([retained_variance], dtype=torch.float64) - 1e-12)) + 1
    keep = min(keep, eigenvalues.numel())
    if max_components is not None:
        keep = min(keep, max_components)
    return eigenvectors[:, :keep].flip(1).contiguous()


def mahalanobis(samples: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``(n, P, d)`` samples, ``(P, d)`` means, ``(P, d, d)`` precisions -> distances ``(n, P)``."""
    centred = (samples - mean).transpose(0, 1)  # (P, n, d)
    squared = ((centred @ precision) * centred).sum(dim=2)  # (P, n)
    return squared.clamp_min(0.0).sqrt().transpose(0, 1)
