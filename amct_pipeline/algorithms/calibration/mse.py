"""MSE: the clipping range whose SPEC 4.2 factors minimise the tensor's quantization MSE.

Each candidate range is turned into real factors (scale, rounded offset, 127/128 rule) and scored
by the exact squared error of that quantizer integrated over the histogram. Symmetric: one
threshold ``T`` on ``|x|`` (range cut to the data). Asymmetric: both ends, by alternating 1-D
searches (max with min fixed, then min with max fixed). Each 1-D search is a log-spaced sweep
down to 2^-12 of the extent, refined linearly around the best point.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ...quant.math import scale_offset_arrays, scale_offset_from_range
from ..base import ActQuantParams
from .common import CalibratorOptions, StreamingCalibrator
from .histogram import Distribution, FloatHistogram

__all__ = ["MseCalibrator", "mse_search"]

_COARSE, _FINE, _ROUNDS = 128, 33, 3


def _range_sse(dist: Distribution, lo, hi, num_bits: int, symmetric: bool) -> np.ndarray:
    scale, offset = scale_offset_arrays(lo, hi, num_bits, symmetric)
    qmin = -(1 << (num_bits - 1))
    return dist.quant_sse((qmin - offset) * scale, scale, 1 << num_bits)


def _search_1d(score: Callable[[np.ndarray], np.ndarray], extent: float) -> float:
    t = extent * np.geomspace(2.0 ** -12, 1.0, _COARSE)
    k = int(np.argmin(score(t)))
    fine = np.linspace(t[max(k - 1, 0)], t[min(k + 1, t.size - 1)], _FINE)
    return float(fine[int(np.argmin(score(fine)))])


def mse_search(dist: Distribution, num_bits: int = 8, symmetric: bool = False) -> tuple[float, float]:
    """The ``(min, max)`` clipping range minimising quantization MSE over ``dist``."""
    vmin, vmax = dist.vmin, dist.vmax
    if symmetric:
        extent = max(abs(vmin), abs(vmax))
        t = _search_1d(lambda t: _range_sse(dist, np.maximum(vmin, -t), np.minimum(vmax, t), num_bits, True), extent)
        return max(vmin, -t), min(vmax, t)
    lo, hi = min(vmin, 0.0), max(vmax, 0.0)
    for _ in range(_ROUNDS):
        if vmax > 0:
            hi = _search_1d(lambda h: _range_sse(dist, lo, h, num_bits, False), vmax)
        if vmin < 0:
            lo = -_search_1d(lambda m: _range_sse(dist, -m, hi, num_bits, False), -vmin)
    return lo, hi


class MseCalibrator(StreamingCalibrator):
    name = "mse"
    summary = "Clipping range minimising each tensor's quantization MSE (both ends if asymmetric)."

    class Options(CalibratorOptions):
        pass

    def _new_stats(self) -> FloatHistogram:
        return FloatHistogram()

    def _params(self, stats: FloatHistogram) -> ActQuantParams:
        lo, hi = mse_search(stats.distribution(), self.num_bits, self.symmetric)
        return scale_offset_from_range(lo, hi, self.num_bits, self.symmetric)
