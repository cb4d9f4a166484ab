"""Calibrators over per-sample extremes: the range the network needs on a typical input.

A global min/max (or a percentile of all values pooled together) is decided by the rarest inputs;
the deep layers of a classifier then keep extremes that one image in a hundred reaches and lose the
resolution every other image needs. These estimators look at each calibration *sample* (a slice
along axis 0 of the tensor: the batch axis of every activation the calibrate pass observes; a
tensor of rank < 2 is one sample per batch) and reduce the per-sample minimum and maximum:

* ``mean_minmax``: the mean over samples of each sample's min and max, as NNCF's ``MEAN_MINMAX``
  range estimator (its default for per-tensor activations). Symmetric: ``T = mean(max |x|)`` per
  sample and the range ``[-T, T]`` (``[0, T]`` is not representable with a zero offset, so a
  non-negative tensor also gets ``[-T, T]``: symmetric ranges are our convention, SPEC 4.2).
* ``sample_quantile``: a quantile ``q`` of the per-sample maxima and the ``1 - q`` quantile of the
  per-sample minima (``q = 0.5``: NNCF's ``MEDIAN_MINMAX``; ``q = 1``: the global min/max).

Bounded memory (:class:`SampleExtremes`): the sums behind the means are exact streaming sums (three
float64 numbers per tensor); quantiles read a reservoir of at most ``capacity`` samples' (min, max)
pairs: the first ``capacity`` samples are all kept (quantiles exact), every later sample ``i``
(0-based) replaces a uniformly drawn slot with probability ``capacity / (i + 1)`` (Vitter's
Algorithm R, a fixed-seed generator: runs are reproducible), so the reservoir stays a uniform
subsample of every sample seen and memory is ``2 * capacity`` float64 per tensor whatever the
number of batches.
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from ...quant.math import scale_offset_from_range
from ..base import ActQuantParams
from .common import CalibratorOptions, StreamingCalibrator
from .histogram import RunningRange

__all__ = ["SampleExtremes", "MeanMinMaxCalibrator", "SampleQuantileCalibrator", "sample_extremes"]

RESERVOIR = 4096    # per-sample (min, max) pairs kept per tensor for quantiles


def sample_extremes(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (min, max) of one batch: samples along axis 0 (rank < 2: the batch is one sample)."""
    x = np.asarray(batch)
    rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 and x.shape[0] > 0 else x.reshape(1, -1)
    return rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)


class SampleExtremes(RunningRange):
    """Per-sample minima and maxima of a stream: exact sums, a bounded uniform reservoir, the global range.

    ``count`` counts values (as every statistics object), ``samples`` counts samples.
    """

    order_independent = False      # samples are slices of the batches: never pool batches together

    def __init__(self, capacity: int = RESERVOIR, seed: int = 0) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = int(capacity)
        self.samples = 0
        self.sum_min = self.sum_max = self.sum_absmax = 0.0
        self._pairs = np.empty((self.capacity, 2), np.float64)
        self._rng = np.random.default_rng(seed)

    def add_samples(self, mins: np.ndarray, maxs: np.ndarray, values: int) -> None:
        """Record the per-sample extremes of ``values`` values (their batch's global range included)."""
        mins, maxs = np.asarray(mins, np.float64).ravel(), np.asarray(maxs, np.float64).ravel()
        RunningRange.add(self, np.empty(0), float(mins.min()), float(maxs.max()))
        self.count += int(values)
        self.sum_min += float(mins.sum())
        self.sum_max += float(maxs.sum())
        self.sum_absmax += float(np.maximum(np.abs(mins), np.abs(maxs)).sum())
        pairs = np.stack([mins, maxs], axis=1)
        start = self.samples
        free = max(0, min(self.capacity - start, len(pairs)))
        self._pairs[start:start + free] = pairs[:free]
        if free < len(pairs):               # Algorithm R for the samples past the capacity
            index = start + np.arange(free, len(pairs))
            slot = (self._rng.random(index.size) * (index + 1)).astype(np.int64)
            for i in np.flatnonzero(slot < self.capacity):
                self._pairs[slot[i]] = pairs[free + i]
        self.samples += len(pairs)

    def add(self, x: np.ndarray, mn: float, mx: float) -> None:
        """A flat batch is one sample."""
        self.add_samples(np.array([mn]), np.array([mx]), x.size)

    def merge(self, other: "SampleExtremes") -> None:
        """Combine two streams: exact sums and range; the reservoir a uniform subsample of both."""
        if other.capacity != self.capacity:
            raise ValueError("cannot merge sample reservoirs of different capacity")
        mine, theirs = self.reservoir.copy(), other.reservoir
        total = self.samples + other.samples
        if total <= self.capacity:
            pairs = np.concatenate([mine, theirs])
        else:   # each slot from one side in proportion to the samples it stands for
            take = int(self._rng.binomial(self.capacity, self.samples / total))
            take = min(max(take, self.capacity - len(theirs)), len(mine))
            pairs = np.concatenate([self._rng.permutation(mine)[:take],
                                    self._rng.permutation(theirs)[:self.capacity - take]])
        self._pairs[:len(pairs)] = pairs
        self.samples = total
        self.sum_min += other.sum_min
        self.sum_max += other.sum_max
        self.sum_absmax += other.sum_absmax
        super().merge(other)

    @property
    def reservoir(self) -> np.ndarray:
        """The kept (min, max) pairs, one row per sample (every sample while ``samples <= capacity``)."""
        return self._pairs[:min(self.samples, self.capacity)]

    @property
    def mean_min(self) -> float:
        return self.sum_min / self.samples

    @property
    def mean_max(self) -> float:
        return self.sum_max / self.samples

    @property
    def mean_absmax(self) -> float:
        return self.sum_absmax / self.samples

    def quantiles(self, q: float) -> tuple[float, float]:
        """(``1-q`` quantile of the per-sample minima, ``q`` quantile of the maxima), numpy's linear rule."""
        kept = self.reservoir
        return float(np.quantile(kept[:, 0], 1.0 - q)), float(np.quantile(kept[:, 1], q))

    def abs_quantile(self, q: float) -> float:
        """``q`` quantile of the per-sample max ``|x|``."""
        return float(np.quantile(np.abs(self.reservoir).max(axis=1), q))

    @property
    def nbytes(self) -> int:
        return self._pairs.nbytes


class _SampleCalibrator(StreamingCalibrator):
    """Observes per-sample extremes (no pooling: a pooled batch would lose its sample boundaries)."""

    capacity = RESERVOIR

    def _new_stats(self) -> SampleExtremes:
        return SampleExtremes(self.capacity)

    def observe(self, tensor_name: str, batch: np.ndarray) -> None:
        x = np.asarray(batch)
        if x.size == 0:
            return
        mins, maxs = sample_extremes(x)
        if not (np.isfinite(mins).all() and np.isfinite(maxs).all()):
            raise ValueError(f"tensor '{tensor_name}': calibration batch contains NaN or Inf values")
        stats = self._stats.get(tensor_name)
        if stats is None:
            stats = self._stats[tensor_name] = self._new_stats()
        stats.add_samples(mins, maxs, x.size)

    def _range(self, lo: float, hi: float, absmax: float) -> ActQuantParams:
        if self.symmetric:
            lo, hi = -absmax, absmax
        return scale_offset_from_range(lo, hi, self.num_bits, self.symmetric)


class MeanMinMaxCalibrator(_SampleCalibrator):
    name = "mean_minmax"
    summary = "Mean over calibration samples of each sample's min and max (NNCF's MEAN_MINMAX)."

    class Options(CalibratorOptions):
        pass

    def _params(self, stats: SampleExtremes) -> ActQuantParams:
        return self._range(stats.mean_min, stats.mean_max, stats.mean_absmax)


class SampleQuantileCalibrator(_SampleCalibrator):
    name = "sample_quantile"
    summary = "Quantile q of the per-sample maxima and 1-q of the minima (q=0.5: NNCF's MEDIAN_MINMAX)."

    class Options(CalibratorOptions):
        quantile: float = Field(0.5, ge=0.0, le=1.0, description="q: 0.5 the median sample, 1.0 the global range.")

    def _params(self, stats: SampleExtremes) -> ActQuantParams:
        q = self.options.quantile
        lo, hi = stats.quantiles(q)
        return self._range(lo, hi, stats.abs_quantile(q))
