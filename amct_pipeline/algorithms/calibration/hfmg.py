"""HFMG (SPEC 4.5): AMCT's histogram calibrator - greedy window shrink scored by analytic L2 error."""
from __future__ import annotations

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
    prefix = np.concatenate([[0], np.cumsum(counts)])
    step = max(math.ceil(int(prefix[-1]) / STEP_DIVISOR), 1)
    # where AMCT's pointer walks stop once `step` counts are removed from a side, for every start
    # (the greedy loop below is sequential; these lookups are not)
    next_left = np.searchsorted(prefix, prefix[:-1] + step, side="left").tolist()
    next_right = (np.searchsorted(prefix, prefix[1:] - step, side="right") - 2).tolist()
    min_bins = math.ceil(n / MIN_BIN_RATIO)
    left, right, windows = 0, n - 1, []
    while right - left > min_bins:
        tl = min(next_left[left], right)
        tr = max(next_right[right], tl)
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
    loss = _window_losses(dist, hist.min + left * width, hist.min + (right + 1) * width, dst, levels)
    best = int(np.argmin(loss))
    lo = hist.min + left[best] * width
    hi = hist.min + (right[best] + 1) * width
    return scale_offset_from_range(lo, hi, num_bits, symmetric)


def _window_losses(dist, lo: np.ndarray, hi: np.ndarray, dst: np.ndarray, levels: int, chunk: int = 64) -> np.ndarray:
    """Each window's L2 loss, skipping windows that cannot beat the best one found (loss inf there).

    The windows nest (each inside the one before), so the error of clipping at the window edges alone,
    a lower bound of a window's loss (its end levels lie inside the edges), never decreases along the
    list: once it reaches the best loss so far, no later window can win and the search stops. The
    argmin is the full search's; only losing windows go unevaluated."""
    bound = _clip_sse(dist, lo, hi)
    slack = 1e-9 * dist.moments[2]              # rounding of the moment sums
    loss = np.full(lo.size, np.inf)
    best = np.inf
    for start in range(0, lo.size, chunk):
        if bound[start] > best * (1 + 1e-9) + slack:
            break
        end = start + chunk
        loss[start:end] = dist.quant_sse(lo[start:end] + dst[start:end] / 2, dst[start:end], levels)
        best = min(best, float(loss[start:end].min()))
    return loss


def _clip_sse(dist, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Squared error of moving every value below ``lo`` to ``lo`` and above ``hi`` to ``hi``."""
    o = dist.origin
    below = dist.cumulative(lo, order=2)
    upto = dist.cumulative(hi, order=2)
    above = [t - c for t, c in zip(dist.moments, upto)]
    low_err = below[2] - 2 * (lo - o) * below[1] + (lo - o) ** 2 * below[0]
    high_err = above[2] - 2 * (hi - o) * above[1] + (hi - o) ** 2 * above[0]
    return np.maximum(low_err, 0.0) + np.maximum(high_err, 0.0)


class HfmgCalibrator(StreamingCalibrator):
    name = "hfmg"
    summary = "AMCT HFMG: merged histogram, greedy range shrink, analytic L2 error."

    class Options(CalibratorOptions):
        num_of_bins: Literal[1024, 2048, 4096, 8192] = 4096

    def _new_stats(self) -> LinearHistogram:
        return LinearHistogram(self.options.num_of_bins)

    def _params(self, stats: LinearHistogram) -> ActQuantParams:
        return hfmg_search(stats, self.num_bits, self.symmetric)
