"""Percentile: clip at a percentile of the data, as onnxruntime's percentile calibrator does."""
from __future__ import annotations

from pydantic import Field

from ...quant.math import scale_offset_from_range
from ..base import ActQuantParams
from .common import CalibratorOptions, StreamingCalibrator
from .histogram import FloatHistogram

__all__ = ["PercentileCalibrator"]


class PercentileCalibrator(StreamingCalibrator):
    """Symmetric: ``T = percentile(|x|, p)``, range ``[-T, T]`` cut to the data range.
    Asymmetric: ``(100 - p) / 2`` percent cut from each tail (onnxruntime's convention)."""

    name = "percentile"
    summary = "Clip at the p-th percentile (of |x| if symmetric, both tails if asymmetric)."

    class Options(CalibratorOptions):
        percentile: float = Field(99.999, gt=0.0, le=100.0)

    tail_size = 8192   # extreme values kept exactly per side (see FloatHistogram)

    def _new_stats(self) -> FloatHistogram:
        return FloatHistogram(tail_size=self.tail_size)

    def _params(self, stats: FloatHistogram) -> ActQuantParams:
        p = self.options.percentile
        if self.symmetric:
            t = stats.abs_distribution().percentile(p)
            lo, hi = max(stats.min, -t), min(stats.max, t)
        else:
            dist, cut = stats.distribution(), (100.0 - p) / 2.0
            lo, hi = dist.percentile(cut), dist.percentile(100.0 - cut)
        return scale_offset_from_range(lo, hi, self.num_bits, self.symmetric)
