"""HFMG (SPEC 4.5): AMCT's histogram calibrator - greedy window shrink scored by analytic L2 error."""
from __future__ import annotations

import bisect
import math
from typing import Literal

import numpy as np

from ...quant.math import scale_offset_from_range
from ..base import ActQuantParams
from .common import CalibratorOptions, StreamingCalibrator
from .histogram import LinearHistogram

__all__ = ["HfmgCalibrator", "hfmg_windows", "hfmg_search"]

STEP_DIVISOR = 100000   # AMCT: each shrink step removes at least total/100000 counts
MIN_BIN_RATIO = 4       # AMCT: stop when the window is down to num_bins/4 bins


def hfmg_windows(counts: np.ndarray) -> list[tuple[int, int]]:
    """AMCT's ``hfmg_get_search_range``: shrink the side whose next ``step`` counts span more bins."""
    n = counts.size
    prefix = [0, *np.cumsum(counts).tolist()]   # a list: bisect beats np.searchsorted on scalars
    step = max(math.ceil(prefix[-1] / STEP_DIVISOR), 1)
    min_bins = math.ceil(n / MIN_BIN_RATIO)
    left, right, windows = 0, n - 1, []
    while right - left > min_bins:
        # where AMCT's pointer walks stop once `step` counts are removed from each side
        tl = min(bisect.bisect_left(prefix, prefix[left] + step), right)
        tr = max(bisect.bisect_right(prefix, prefix[right + 1] - step) - 2, tl)
        if right - tr >= tl - left:
            right = tr
        else:
            left = tl
        windows.append((left, right))
    return windows


def hfmg_search(hist: LinearHistogram, num_bits: int = 8, symmetric: bool = False) -> ActQuantParams:
    """HFMG factors from the merged histogram: the window with least quantization L2 error."""
    dist, n = hist.distribution(), hist.num_bins
    width = (hist.max - hist.min) / n
    windows = np.array(hfmg_windows(hist.counts) or [(0, n - 1)], dtype=np.float64)
    left, right = windows[:, 0], windows[:, 1]
    levels = 1 << num_bits
    dst = (right + 1 - left) * width / levels           # 2^b equal destination bins, values at centres
    loss = dist.quant_sse(hist.min + left * width + dst / 2, dst, levels)
    best = int(np.argmin(loss))
    lo = hist.min + left[best] * width
    hi = hist.min + (right[best] + 1) * width
    return scale_offset_from_range(lo, hi, num_bits, symmetric)


class HfmgCalibrator(StreamingCalibrator):
    name = "hfmg"
    summary = "AMCT HFMG: merged histogram, greedy range shrink, analytic L2 error."

    class Options(CalibratorOptions):
        num_of_bins: Literal[1024, 2048, 4096, 8192] = 4096

    def _new_stats(self) -> LinearHistogram:
        return LinearHistogram(self.options.num_of_bins)

    def _params(self, stats: LinearHistogram) -> ActQuantParams:
        return hfmg_search(stats, self.num_bits, self.symmetric)
