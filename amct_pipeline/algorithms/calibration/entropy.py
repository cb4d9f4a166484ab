"""Entropy: TensorRT-style KL-divergence threshold on the histogram of ``|x|``.

Unlike onnxruntime's default (128 bins, 128 quantized bins: no candidate can clip), the ``|x|``
histogram has ``num_bins`` (2048) bins and each candidate keeps the first ``i >= nq`` of them,
so the threshold really moves inside heavy tails. As in NVIDIA's pytorch-quantization: the first
bin's count is replaced by the second's (a ReLU zero spike would otherwise dominate the
divergence), ``nq`` is 2^(b-1) (2^b for a one-sided tensor quantized asymmetrically, which gets
every level on its side), and ties go to the larger threshold.

The search is on ``|x|`` in both modes (not on the two tails separately): the threshold ``T``
gives the range ``[max(min, -T), min(max, T)]``, and SPEC 4.2 then makes the factors.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from pydantic import Field, model_validator

from ...quant.math import scale_offset_from_range
from ..base import ActQuantParams
from .common import CalibratorOptions, StreamingCalibrator
from .histogram import FloatHistogram

__all__ = ["EntropyCalibrator", "kl_divergences"]


def _xlogx(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


MAX_SEARCH_WORK = 1 << 26      # (candidates x quantized bins) per tensor: a few s; the default is 2.5e5
CHUNK_WORK = 1 << 20           # candidates are evaluated in chunks of about this many bin evaluations


def search_work(num_bins: int, num_quantized_bins: int) -> int:
    """Bin evaluations of one KL search: (candidates) x (quantized bins + 1)."""
    return max(num_bins - num_quantized_bins + 1, 0) * (num_quantized_bins + 1)


def kl_divergences(hist: np.ndarray, num_quantized_bins: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) for every candidate ``i`` in ``num_quantized_bins .. len(hist)``, all in closed form.

    P is ``hist[:i]`` with the clipped mass added to its last bin; Q merges ``hist[:i]`` into
    ``num_quantized_bins`` bins (``floor(j * nq / i)``) and spreads each back over its nonzero source
    bins. Prefix sums make each candidate O(nq) instead of O(i). Returns (candidates, kl); a
    candidate whose last kept bin is empty while mass is clipped has infinite divergence.
    """
    h = np.asarray(hist, dtype=np.float64)
    nb, nq = h.size, int(num_quantized_bins)
    s = np.concatenate([[0.0], np.cumsum(h)])
    z = np.concatenate([[0], np.cumsum(h > 0)])
    hlogh = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
    total = s[-1]
    candidates = np.arange(nq, nb + 1)
    rows = max(1, CHUNK_WORK // (nq + 1))
    kl = np.empty(candidates.size)
    for start in range(0, candidates.size, rows):     # rows are independent: memory ~ CHUNK_WORK, not nb x nq
        i = candidates[start:start + rows]
        outliers = total - s[i]
        last = h[i - 1]
        bounds = (np.arange(nq + 1)[None, :] * i[:, None] + nq - 1) // nq   # first source bin of each q bin
        qs, nz = np.diff(s[bounds], axis=1), np.diff(z[bounds], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            p_log_q = np.where(qs > 0, qs * np.log(qs / nz), 0.0).sum(axis=1)
            p_log_q += np.where(outliers > 0, outliers * np.log(qs[:, -1] / nz[:, -1]), 0.0)
            p_log_p = hlogh[i - 1] + _xlogx(last + outliers)
            part = (p_log_p - p_log_q) / total - np.log(total) + np.log(s[i])
        part[((last == 0) & (outliers > 0)) | (s[i] <= 0)] = np.inf
        kl[start:start + rows] = part
    return candidates, kl


class EntropyCalibrator(StreamingCalibrator):
    name = "entropy"
    summary = "KL-divergence (TensorRT) threshold on |x|: 2048 bins, 128 quantized bins, clips tails."

    class Options(CalibratorOptions):
        num_bins: int = Field(2048, ge=16, le=1 << 16)
        num_quantized_bins: Optional[int] = Field(None, ge=2)   # None: 2^(b-1), or 2^b one-sided asym

        @model_validator(mode="after")
        def _check_bins(self):
            if self.num_quantized_bins is not None and self.num_quantized_bins > self.num_bins:
                raise ValueError("num_quantized_bins must be <= num_bins")
            quantized = ([self.num_quantized_bins] if self.num_quantized_bins is not None else
                         [min(1 << (self.num_bits - 1), self.num_bins), min(1 << self.num_bits, self.num_bins)])
            work, nq = max((search_work(self.num_bins, nq), nq) for nq in quantized)
            if work > MAX_SEARCH_WORK:
                raise ValueError(f"num_bins {self.num_bins} with {nq} quantized bins costs {work:.3g} "
                                 f"bin evaluations per tensor; at most {MAX_SEARCH_WORK:.3g} are allowed "
                                 "(fewer num_bins, or num_quantized_bins near 128 or near num_bins)")
            return self

    def _quantized_bins(self, stats: FloatHistogram) -> int:
        if self.options.num_quantized_bins is not None:
            return self.options.num_quantized_bins
        one_sided = stats.min >= 0 or stats.max <= 0
        nq = 1 << (self.num_bits - (0 if one_sided and not self.symmetric else 1))
        return min(nq, self.options.num_bins)

    def _new_stats(self) -> FloatHistogram:
        return FloatHistogram()

    def _params(self, stats: FloatHistogram) -> ActQuantParams:
        dist = stats.abs_distribution()
        edges = np.linspace(0.0, dist.vmax, self.options.num_bins + 1)
        hist = dist.project(edges)
        hist[0] = hist[1]
        cand, kl = kl_divergences(hist, self._quantized_bins(stats))
        t = edges[cand[kl.size - 1 - int(np.argmin(kl[::-1]))]] if np.isfinite(kl).any() else dist.vmax
        return scale_offset_from_range(max(stats.min, -t), min(stats.max, t), self.num_bits, self.symmetric)
