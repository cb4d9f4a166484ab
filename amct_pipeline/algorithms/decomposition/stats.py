"""Data-aware statistics: input-patch covariances, whitening, and a least-squares refit.

The data-aware mode minimises each layer's *response* error ``E‖W∗x − Ŵ∗x‖²`` instead of the weight
error ``‖W − Ŵ‖``. Two tools do it for every method:

* **input whitening**: with ``C = E[p pᵀ]`` the covariance of the patches the first child reads,
  ``E‖(W − Ŵ)p‖² = ‖(W − Ŵ) C^{1/2}‖²``: decompose ``W·C^{1/2}`` and multiply the first factor by
  ``C^{-1/2}`` afterwards (for a 1x1 first child this is response PCA over the input channels);
* **least-squares refit** of the last child on the inputs it really receives in the partly
  decomposed model (so error from earlier layers is corrected) against the float layer's output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .layer import ChildSpec

__all__ = ["whitening", "gather_patches", "sample_positions", "CovarianceAccumulator", "LeastSquaresRefit"]

WHITEN_FLOOR = 1e-3       # eigenvalues below this fraction of the mean are raised to it (dead channels)


def whitening(cov: np.ndarray, floor: float = WHITEN_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """(C^{1/2}, C^{-1/2}) of a covariance, with tiny eigenvalues floored so the inverse stays tame."""
    cov = np.asarray(cov, np.float64)
    values, vectors = np.linalg.eigh(0.5 * (cov + cov.T))
    mean = max(float(np.mean(np.abs(values))), 1e-30)
    values = np.maximum(values, floor * mean)
    root = np.sqrt(values)
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def sample_positions(rng: np.random.Generator, batch: int, out_hw: tuple[int, int],
                     per_image: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, row, col) index arrays: ``per_image`` distinct output positions of each image."""
    total = out_hw[0] * out_hw[1]
    count = min(per_image, total)
    flat = np.concatenate([rng.choice(total, size=count, replace=False) for _ in range(batch)])
    image = np.repeat(np.arange(batch), count)
    return image, flat // out_hw[1], flat % out_hw[1]


def gather_patches(x: np.ndarray, spec: ChildSpec, positions: tuple[np.ndarray, ...]) -> np.ndarray:
    """[S, Cin·kh·kw] input patches of conv ``spec`` at output ``positions`` (zero padding).

    The column order (channel, row, col) matches a flattened ``[Cout, Cin, kh, kw]`` weight. Out of
    range taps read zero without padding the (possibly large) activation.
    """
    image, row, col = positions
    _, channels, height, width = x.shape
    (kh, kw), (sh, sw) = spec.kernel, spec.stride
    top, left = spec.pads[0], spec.pads[1]
    out = np.zeros((len(image), channels, kh, kw), dtype=np.float32)
    for dy in range(kh):
        ys = row * sh + dy * spec.dilation[0] - top
        for dx in range(kw):
            xs = col * sw + dx * spec.dilation[1] - left
            ok = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
            out[ok, :, dy, dx] = x[image[ok], :, ys[ok], xs[ok]]
    return out.reshape(len(image), -1)


@dataclass
class CovarianceAccumulator:
    """Running uncentred second moment E[p pᵀ] (uncentred: biases and ReLU means matter)."""

    dim: int
    total: np.ndarray = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.total = np.zeros((self.dim, self.dim))

    def add(self, patches: np.ndarray) -> None:
        p = np.asarray(patches, np.float64)
        self.total += p.T @ p
        self.count += len(p)

    def covariance(self) -> Optional[np.ndarray]:
        return self.total / self.count if self.count else None


@dataclass
class LeastSquaresRefit:
    """Ridge-regularised least squares ``Y ≈ F·W (+ b)`` from streamed (features, targets).

    The ridge pulls towards the data-free solution ``W0`` rather than zero, so directions the data
    never excites keep their data-free values instead of collapsing.
    """

    features: int
    outputs: int
    intercept: bool
    ridge: float = 1e-4
    gram: np.ndarray = field(init=False)
    cross: np.ndarray = field(init=False)
    energy: float = 0.0          # Σ y², for the response SQNR of a solution
    count: int = 0

    def __post_init__(self) -> None:
        dim = self.features + int(self.intercept)
        self.gram = np.zeros((dim, dim))
        self.cross = np.zeros((dim, self.outputs))

    def add(self, features: np.ndarray, targets: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        if self.intercept:
            f = np.concatenate([f, np.ones((len(f), 1))], axis=1)
        self.gram += f.T @ f
        targets = np.asarray(targets, np.float64)
        self.cross += f.T @ targets
        self.energy += float(np.sum(targets ** 2))
        self.count += len(f)

    def sqnr_db(self, weight: np.ndarray, bias: Optional[np.ndarray]) -> Optional[float]:
        """Response SQNR of ``F·W (+ b)`` on the accumulated samples, from the normal equations alone."""
        if not self.count:
            return None
        w = weight if not self.intercept else np.concatenate([weight, np.reshape(bias, (1, -1))], axis=0)
        noise = self.energy - 2 * float(np.sum(w * self.cross)) + float(np.sum(w * (self.gram @ w)))
        if noise <= self.energy * 1e-15:
            return float("inf")
        return 10.0 * float(np.log10(self.energy / noise))

    def solve(self, w0: np.ndarray, b0: Optional[np.ndarray]) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(W [features, outputs], b [outputs] or None), starting from the data-free (w0, b0)."""
        start = w0 if not self.intercept else np.concatenate([w0, np.reshape(b0, (1, -1))], axis=0)
        if not self.count:
            return w0, b0
        lam = self.ridge * max(float(np.trace(self.gram)) / len(self.gram), 1e-30)
        solution = np.linalg.solve(self.gram + lam * np.eye(len(self.gram)), self.cross + lam * start)
        if self.intercept:
            return solution[:-1], solution[-1]
        return solution, None
