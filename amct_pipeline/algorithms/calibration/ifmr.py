"""IFMR (SPEC 4.4): percentile init, then an MSE search over scaled clip maxima - AMCT's PTQ default.

AMCT concatenates every batch in memory; here the same formulas run on bounded statistics: a
log-spaced float histogram plus the ``tail_size`` largest/smallest values kept exactly. The
percentiles are exact while ``N * (1 - percentile) <= tail_size`` (N up to 1e9 values per tensor
at the default 0.999999, beyond what AMCT itself can hold in memory), and each candidate's MSE is
integrated exactly over the bins, so the pick matches the all-data search (it can differ by one
candidate only where the all-data loss curve has near-ties at the level of its own sampling noise).
"""
from __future__ import annotations

import math

import numpy as np
from pydantic import Field, model_validator

from ...quant.math import FLT_EPSILON, process_scale
from ..base import ActQuantParams
from .common import CalibratorOptions, StreamingCalibrator
from .histogram import Distribution, FloatHistogram

__all__ = ["IfmrCalibrator", "ifmr_ratios", "ifmr_percentile_rank", "ifmr_search"]


MAX_SEARCH_CANDIDATES = 10_000   # (end - start) / step: time and memory grow with it (AMCT's default: 60)


def ifmr_ratios(start: float, end: float, step: float) -> np.ndarray:
    """``start + i*step`` for ``i = 0..floor((end-start)/step)``: end included, as AMCT's C++ core does."""
    count = math.floor((end - start) / step + 1e-6)   # tolerate 59.999999 for 0.6/0.01
    return start + step * np.arange(count + 1)


def ifmr_percentile_rank(percentile: float, n: int) -> int:
    """``k`` such that the k-th largest (or smallest) value is IFMR's initial max (or min)."""
    return 1 if 1.0 - percentile < FLT_EPSILON else max(1, n - math.floor(percentile * n))


def ifmr_search(
    dist: Distribution,
    *,
    num_bits: int = 8,
    symmetric: bool = False,
    max_percentile: float = 0.999999,
    min_percentile: float = 0.999999,
    search_range_start: float = 0.7,
    search_range_end: float = 1.3,
    search_step: float = 0.01,
) -> ActQuantParams:
    """IFMR factors of the data summarised by ``dist``."""
    n = int(round(dist.total))
    max_v = max(dist.kth_largest(ifmr_percentile_rank(max_percentile, n)), 0.0)
    min_v = min(dist.kth_smallest(ifmr_percentile_rank(min_percentile, n)), 0.0)
    ratios = ifmr_ratios(search_range_start, search_range_end, search_step)
    half = 1 << (num_bits - 1)
    if symmetric:
        scope = half if abs(max_v) < abs(min_v) else half - 1
        clip = ratios * max(abs(max_v), abs(min_v))
        scale = clip / scope
        lo_clip = -clip
    else:
        clip = ratios * max_v
        scale = (clip - min_v) / (2 * half - 1)
        lo_clip = np.full_like(clip, min_v)
    if not scale.max() > 0:                       # all-zero percentiles: nothing to search
        return process_scale(0.0, 0, num_bits, symmetric)
    # clip-then-round == uniform quantizer with levels round(lo/s)*s .. round(c/s)*s
    first = np.rint(lo_clip / scale)
    nlev = np.rint(clip / scale) - first + 1
    loss = dist.quant_sse(first * scale, scale, nlev)
    best = int(np.argmin(loss))
    offset = 0 if symmetric else int(-np.rint(min_v / scale[best]) - half)
    return process_scale(scale[best], offset, num_bits, symmetric)


class IfmrCalibrator(StreamingCalibrator):
    name = "ifmr"
    summary = "AMCT IFMR: percentile init, MSE search of the clip max over [start, end] ratios."

    class Options(CalibratorOptions):
        max_percentile: float = Field(0.999999, gt=0.5, le=1.0)
        min_percentile: float = Field(0.999999, gt=0.5, le=1.0)
        search_range_start: float = Field(0.7, gt=0.0)
        search_range_end: float = Field(1.3, gt=0.0)
        search_step: float = Field(0.01, gt=0.0)

        @model_validator(mode="after")
        def _check_range(self):
            span = self.search_range_end - self.search_range_start
            if span <= 0:
                raise ValueError("search_range_start must be < search_range_end")
            if self.search_step > span:
                raise ValueError("search_step must be in (0, search_range_end - search_range_start]")
            if span / self.search_step > MAX_SEARCH_CANDIDATES:
                raise ValueError(f"search_step {self.search_step:g} gives {span / self.search_step:.3g} candidate "
                                 f"ranges; at most {MAX_SEARCH_CANDIDATES} are allowed (search_step >= "
                                 f"{span / MAX_SEARCH_CANDIDATES:.3g} for this search range)")
            return self

    tail_size = 1024   # exact extreme values per side (see FloatHistogram); per-batch cost grows with it

    def _new_stats(self) -> FloatHistogram:
        return FloatHistogram(tail_size=self.tail_size)

    def _params(self, stats: FloatHistogram) -> ActQuantParams:
        o = self.options
        # only the two percentile order statistics need exact values; the rest stay binned
        ranks = (ifmr_percentile_rank(p, stats.count) for p in (o.max_percentile, o.min_percentile))
        return ifmr_search(
            stats.distribution(exact=max(ranks)),
            num_bits=o.num_bits,
            symmetric=not o.asymmetric,
            max_percentile=o.max_percentile,
            min_percentile=o.min_percentile,
            search_range_start=o.search_range_start,
            search_range_end=o.search_range_end,
            search_step=o.search_step,
        )
