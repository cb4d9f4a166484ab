"""Bounded, mergeable per-tensor statistics shared by every activation calibrator.

Accumulators (memory fixed at construction, independent of the number of batches):

* :class:`RunningRange` - count/min/max (MinMax needs nothing else).
* :class:`FloatHistogram` - counts per float32 bit-pattern bucket (sign, exponent, top mantissa
  bits). The grid is fixed and log-spaced (relative bin width ``2^-m`` at every magnitude), so it
  never re-bins, merges exactly, and keeps the same relative resolution at a 0.999999 percentile
  deep inside a range blown up by outliers - a linear grid would lose it. Binning is a bit shift
  and a ``bincount``: no arithmetic on the values. Optionally it also keeps the K most extreme
  values of each side exactly (a fixed-size buffer), where single values decide percentiles.
* :class:`LinearHistogram` - AMCT's HFMG histogram (SPEC 4.5): ``num_bins`` equal bins over the
  union of all ranges seen, old counts split proportionally when the range grows.

Queries go through :class:`Distribution` (uniform density inside each bin): CDF, quantiles,
re-projection onto other bins, and the exact squared error of a uniform quantizer integrated over
the histogram (:meth:`Distribution.quant_sse`) - the one routine IFMR, HFMG and MSE all score with.
"""
from __future__ import annotations

import functools
import math
import sys

import numpy as np

__all__ = ["RunningRange", "FloatHistogram", "LinearHistogram", "Distribution"]

_CHUNK = 1 << 20          # elements binned at a time: bounds the temporaries of one batch
_SSE_POINTS = 1 << 20     # boundary evaluations per quant_sse chunk: bounds its temporaries


class RunningRange:
    """Element count and exact min/max of a stream."""

    order_independent = True   # adding a stream in any cut gives the same statistics

    def __init__(self) -> None:
        self.count = 0
        self.min = np.inf
        self.max = -np.inf

    def add(self, x: np.ndarray, mn: float, mx: float) -> None:
        """Record a flat, finite float32 batch whose min/max the caller already computed."""
        self.count += int(x.size)
        self.min = min(self.min, mn)
        self.max = max(self.max, mx)

    def merge(self, other: "RunningRange") -> None:
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @property
    def nbytes(self) -> int:
        return 0


@functools.lru_cache(maxsize=None)
def _magnitude_edges(mantissa_bits: int) -> np.ndarray:
    """Lower edges of the finite magnitude buckets plus a final upper edge (float64, ascending)."""
    shift = 23 - mantissa_bits
    n = 255 << mantissa_bits                      # exponent 255 (Inf/NaN) is never counted
    bits = (np.arange(n + 1, dtype=np.uint64) << shift).astype(np.uint32)
    edges = bits.view(np.float32).astype(np.float64)
    edges[-1] = 2.0 ** 128                        # upper edge of the largest finite bucket
    edges.setflags(write=False)
    return edges


@functools.lru_cache(maxsize=None)
def _value_order(mantissa_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The finite buckets in ascending value order: lower edges, upper edges, the bucket index at
    each position, and each bucket index's position (-1 for the Inf/NaN buckets)."""
    edges = _magnitude_edges(mantissa_bits)
    n, half = edges.size - 1, 1 << (8 + mantissa_bits)
    lower = np.concatenate([-edges[:0:-1], edges[:-1]])
    upper = np.concatenate([-edges[-2::-1], edges[1:]])
    bucket = np.concatenate([half + np.arange(n)[::-1], np.arange(n)])   # negative buckets reversed
    position = np.full(2 * half, -1, np.intp)
    position[bucket] = np.arange(bucket.size)
    for a in (lower, upper, bucket, position):
        a.setflags(write=False)
    return lower, upper, bucket, position


class FloatHistogram(RunningRange):
    """Fixed log-spaced histogram indexed by the top ``9 + mantissa_bits`` bits of float32 values.

    With ``tail_size = K > 0`` it also keeps the K largest and K smallest values exactly: order
    statistics and clipping errors in sparse tails - where single values matter, as for IFMR's
    0.999999 percentile - are then exact instead of interpolated. Per batch that costs at most one
    comparison pass per side (none when the batch's extreme cannot enter): the batch's own counts
    say which of its values can.
    """

    def __init__(self, mantissa_bits: int = 7, tail_size: int = 0) -> None:
        super().__init__()
        if not 1 <= mantissa_bits <= 10:
            raise ValueError("mantissa_bits must be in [1, 10]")
        self.mantissa_bits = mantissa_bits
        self.tail_size = int(tail_size)
        self._shift = 23 - mantissa_bits
        self.counts = np.zeros(1 << (9 + mantissa_bits), dtype=np.int64)
        self.top = np.empty(0, np.float32)       # the tail_size largest values seen
        self.bottom = np.empty(0, np.float32)    # the tail_size smallest values seen

    def _index(self, x: np.ndarray) -> np.ndarray:
        if self._shift == 16 and sys.byteorder == "little":
            return x.view(np.uint16)[1::2]        # the high half-word is the bucket: no arithmetic
        return x.view(np.uint32) >> np.uint32(self._shift)

    def add(self, x: np.ndarray, mn: float, mx: float) -> None:
        batch = self._bincount(x)
        self.counts[:batch.size] += batch
        super().add(x, mn, mx)
        if self.tail_size:
            k = self.tail_size
            self.top = _keep_extreme(self.top, self._tail_candidates(x, batch, mx, largest=True), k, True)
            self.bottom = _keep_extreme(self.bottom, self._tail_candidates(x, batch, mn, largest=False), k, False)

    def _bincount(self, x: np.ndarray) -> np.ndarray:
        """The batch's counts up to its highest bucket index (the full grid would be mostly zeros)."""
        parts = [np.bincount(self._index(x[i:i + _CHUNK])) for i in range(0, x.size, _CHUNK)]
        if len(parts) == 1:
            return parts[0]
        out = np.zeros(max(p.size for p in parts), np.int64)
        for p in parts:
            out[:p.size] += p
        return out

    def _tail_candidates(self, x: np.ndarray, batch: np.ndarray, extreme: float, largest: bool) -> np.ndarray:
        """The values of a batch that may belong to the K most extreme of everything seen."""
        k, tail = self.tail_size, self.top if largest else self.bottom
        if tail.size == k:                        # full buffer: only values strictly beyond it
            edge = tail.min() if largest else tail.max()
            if (extreme <= edge) if largest else (extreme >= edge):
                return x[:0]
            return x[x > edge] if largest else x[x < edge]
        if x.size <= k:
            return x
        # values short of the bucket of the batch's own K-th extreme have K batch values beyond them
        lower, upper, _, _ = _value_order(self.mantissa_bits)
        j, alone = self._kth_extreme_bucket(batch, extreme, largest)
        if alone:                                 # all K in the extreme bucket: often a tie (ReLU's 0)
            bits = np.float32(extreme).view(np.uint32)
            if np.count_nonzero(x.view(np.uint32) == bits) >= k:
                return np.full(k, extreme, np.float32)
        return x[x >= np.float32(lower[j])] if largest else x[x <= np.float32(upper[j])]   # edges are float32 values

    def _kth_extreme_bucket(self, batch: np.ndarray, extreme: float, largest: bool) -> tuple[int, bool]:
        """Value-order position of the bucket of a batch's K-th largest (smallest) value, and whether
        that is the bucket of its extreme. Walks inwards from the extreme, a window at a time."""
        _, _, bucket, position = _value_order(self.mantissa_bits)
        batch = np.concatenate([batch, np.zeros(self.counts.size - batch.size, batch.dtype)])
        start = int(position[np.float32(extreme).view(np.uint32) >> np.uint32(self._shift)])
        step, seen = (-1 if largest else 1), 0
        for width in (8 << self.mantissa_bits, bucket.size):   # the K extremes nearly always lie within 8 octaves
            stop = max(start + step * width, -1) if largest else min(start + width, bucket.size)
            window = np.arange(start, stop, step)
            found = seen + np.cumsum(batch[bucket[window]])
            i = int(np.searchsorted(found, self.tail_size))
            if i < found.size:
                return int(window[i]), window[i] == start and not seen
            seen, start = int(found[-1]), stop
        raise AssertionError("a batch larger than tail_size has its K-th extreme in some bucket")

    def merge(self, other: "FloatHistogram") -> None:
        if (other.mantissa_bits, other.tail_size) != (self.mantissa_bits, self.tail_size):
            raise ValueError("cannot merge histograms of different resolution or tail size")
        self.counts += other.counts
        super().merge(other)
        k = self.tail_size
        if k:
            self.top = _keep_extreme(self.top, other.top, k, True)
            self.bottom = _keep_extreme(self.bottom, other.bottom, k, False)

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes + 4 * 2 * self.tail_size

    def _used_buckets(self) -> tuple[np.ndarray, np.ndarray]:
        """Value-order positions (ascending) and counts of the non-empty buckets."""
        raw = np.flatnonzero(self.counts != 0)       # nonzero() is ~5x faster on a bool mask
        split = int(np.searchsorted(raw, self.counts.size // 2))   # negative buckets: larger index, smaller value
        raw = np.concatenate([raw[split:][::-1], raw[:split]])
        return _value_order(self.mantissa_bits)[3][raw], self.counts[raw]

    def _value_position(self, v) -> np.ndarray:
        """Value-order position of the bucket holding each float32 value."""
        raw = np.ascontiguousarray(v, np.float32).view(np.uint32) >> np.uint32(self._shift)
        return _value_order(self.mantissa_bits)[3][raw]

    def _magnitude_bucket(self, v) -> np.ndarray:
        return (np.abs(np.ascontiguousarray(v, np.float32)).view(np.uint32) >> np.uint32(self._shift)).astype(np.intp)

    def _all_values(self) -> np.ndarray:
        """Every value seen, when the two tails hold them all (count <= 2 * tail_size)."""
        return np.concatenate([np.sort(self.bottom)[: self.count - self.top.size], self.top])

    def distribution(self, exact: int | None = None) -> "Distribution":
        """The signed distribution, bins in ascending value order.

        The ``exact`` most extreme kept values of each side (all kept ones by default) are point
        masses; a caller that needs only a few order statistics asks for those and gets a
        distribution of the used buckets plus a few points, much cheaper to build and query.
        """
        if self.tail_size and self.count <= 2 * self.tail_size:
            return Distribution.of_values(self._all_values())
        lower, upper, _, _ = _value_order(self.mantissa_bits)
        pos, counts = self._used_buckets()
        top, bottom = _most_extreme(self.top, exact, True), _most_extreme(self.bottom, exact, False)
        return _with_tails(lower[pos], upper[pos], counts, pos, self._value_position, top, bottom, self.min, self.max)

    def abs_distribution(self, exact: int | None = None) -> "Distribution":
        """Distribution of ``|x|``: the grid is sign-symmetric, so folding the buckets is exact."""
        k = self.tail_size
        if k and self.count <= 2 * k:
            return Distribution.of_values(np.abs(self._all_values()))
        edges = _magnitude_edges(self.mantissa_bits)
        n, half = edges.size - 1, self.counts.size // 2
        folded = self.counts[:n] + self.counts[half:half + n]
        used = np.flatnonzero(folded != 0)
        vmax = max(abs(self.min), abs(self.max))
        vmin = 0.0 if self.min <= 0.0 <= self.max else min(abs(self.min), abs(self.max))
        # the k largest |x| are among the k largest and the k smallest x
        top = _most_extreme(np.abs(np.concatenate([self.top, self.bottom])), min(k, exact or k), True)
        return _with_tails(edges[used], edges[used + 1], folded[used], used, self._magnitude_bucket, top, top[:0],
                           vmin, vmax)


def _most_extreme(values: np.ndarray, count: int | None, largest: bool) -> np.ndarray:
    if count is None or count >= values.size:
        return values
    if largest:
        return np.partition(values, values.size - count)[values.size - count:]
    return np.partition(values, count - 1)[:count]


def _with_tails(lower, upper, counts, keys, key_of, top, bottom, vmin, vmax) -> "Distribution":
    """Non-empty buckets (sorted by ``keys``; ``key_of`` gives a value's key) minus the exactly
    kept extreme values, which are added back as point masses."""
    if not (top.size or bottom.size):
        return Distribution(lower, upper, counts, vmin, vmax)
    counts = counts.copy()
    for tail in (top, bottom):
        counts -= np.bincount(np.searchsorted(keys, key_of(tail)), minlength=counts.size)
    # what is left of the boundary buckets lies between the two tails
    if top.size:
        j = int(np.searchsorted(keys, key_of(top.min()[None])[0]))
        upper[j] = min(upper[j], float(top.min()))
    if bottom.size:
        j = int(np.searchsorted(keys, key_of(bottom.max()[None])[0]))
        lower[j] = max(lower[j], float(bottom.max()))
    values, mult = np.unique(np.concatenate([bottom, top]).astype(np.float64), return_counts=True)
    lower, upper = np.concatenate([lower, values]), np.concatenate([upper, values])
    order = np.lexsort((upper, lower))
    counts = np.concatenate([counts, mult])
    return Distribution(lower[order], upper[order], counts[order], vmin, vmax)


def _keep_extreme(buffer: np.ndarray, candidates: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """The k largest (or smallest) of ``buffer`` and ``candidates``."""
    if not candidates.size:
        return buffer
    merged = np.concatenate([buffer, candidates.astype(np.float32, copy=False)])
    if merged.size <= k:
        return merged
    cut = merged.size - k if largest else k - 1
    part = np.partition(merged, cut)
    return part[cut:].copy() if largest else part[:k].copy()


class LinearHistogram(RunningRange):
    """AMCT HFMG histogram: ``num_bins`` bins over ``[min, max]`` of everything seen (SPEC 4.5).

    Integer counts; on range growth each old bin's count moves to the new bin(s) it overlaps, a
    straddling bin split proportionally with truncation, as ``hfmg_merge_inter`` does.
    """

    order_independent = False   # re-binning on range growth depends on where the stream is cut

    def __init__(self, num_bins: int = 4096) -> None:
        super().__init__()
        self.num_bins = int(num_bins)
        self.counts = np.zeros(self.num_bins, dtype=np.int64)

    def add(self, x: np.ndarray, mn: float, mx: float) -> None:
        lo, hi = (min(mn, self.min), max(mx, self.max)) if self.count else (mn, mx)
        if self.count and (lo, hi) != (self.min, self.max):
            self._grow(lo, hi)                    # new batch is then binned on the union range
        for i in range(0, x.size, _CHUNK):
            self.counts += self._histc(x[i:i + _CHUNK], lo, hi)
        super().add(x, mn, mx)

    def merge(self, other: "LinearHistogram") -> None:
        if not other.count:
            return
        if not self.count:
            self.counts = other.counts.copy()
        else:
            lo, hi = min(self.min, other.min), max(self.max, other.max)
            self._grow(lo, hi)
            self.counts += _rebin(other.counts, other.min, other.max, lo, hi)
        super().merge(other)

    def _grow(self, lo: float, hi: float) -> None:
        self.counts = _rebin(self.counts, self.min, self.max, lo, hi)

    def _histc(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        n = self.num_bins
        if hi <= lo:                              # zero-width range: one point mass
            return np.bincount(np.zeros(1, np.intp), weights=[x.size], minlength=n).astype(np.int64)
        t = x - np.float32(lo)
        t *= np.float32(n / (hi - lo))
        idx = t.astype(np.intp)                   # t >= 0 (up to rounding), so truncation = floor
        np.clip(idx, 0, n - 1, out=idx)           # x == max lands in the last bin, like torch.histc
        return np.bincount(idx, minlength=n)

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes

    def distribution(self) -> "Distribution":
        edges = np.linspace(self.min, self.max, self.num_bins + 1)
        return Distribution(edges[:-1], edges[1:], self.counts, self.min, self.max)


def _rebin(counts: np.ndarray, lo: float, hi: float, new_lo: float, new_hi: float) -> np.ndarray:
    """Move integer counts of an equal-width grid on [lo, hi] onto one on [new_lo, new_hi] (contains it)."""
    n = counts.size
    i = np.arange(n)
    lower = lo + i * ((hi - lo) / n)
    upper = lo + (i + 1) * ((hi - lo) / n)
    width = (new_hi - new_lo) / n
    il = np.clip(np.floor((lower - new_lo) / width), 0, n - 1).astype(np.intp)
    ih = np.clip(np.floor((upper - new_lo) / width), 0, n - 1).astype(np.intp)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(upper > lower, (new_lo + (il + 1) * width - lower) / (upper - lower), 1.0)
    low = np.where(il == ih, counts, np.floor(counts * np.clip(frac, 0.0, 1.0))).astype(np.int64)
    out = np.bincount(il, weights=low, minlength=n) + np.bincount(ih, weights=counts - low, minlength=n)
    return np.rint(out).astype(np.int64)


class Distribution:
    """Counts on sorted, disjoint bins ``[lower_j, upper_j]`` with uniform density inside each bin.

    Bin edges are clamped to the exact data ``[vmin, vmax]`` (the extreme bins then hold only
    real data range); a bin of zero width is a point mass. Moments are taken about the range
    centre (``origin``) so that squared-error sums do not cancel catastrophically.
    """

    def __init__(self, lower, upper, counts, vmin: float, vmax: float) -> None:
        counts = np.asarray(counts)
        keep = counts > 0
        self.vmin, self.vmax = float(vmin), float(vmax)
        self.origin = 0.5 * (self.vmin + self.vmax)
        self.a = np.clip(np.asarray(lower, np.float64)[keep], vmin, vmax)
        self.b = np.clip(np.asarray(upper, np.float64)[keep], vmin, vmax)
        self.h = counts[keep].astype(np.float64)
        if self.h.size == 0:
            raise ValueError("empty distribution")
        self.total = float(self.h.sum())
        width = self.b - self.a
        point = width <= 0
        dens = np.where(point, 0.0, self.h / np.where(point, 1.0, width))
        a0, b0 = self.a - self.origin, self.b - self.origin
        moments = (self.h, self.h * (a0 + b0) / 2, self.h * (a0 * a0 + a0 * b0 + b0 * b0) / 3)
        self._prefix = [np.concatenate([[0.0], np.cumsum(m)]) for m in moments]
        self.moments = tuple(float(p[-1]) for p in self._prefix)   # count, sum, sum of squares about origin
        # The m-th cumulative moment at x inside bin j is base_m[j] + dens_j * u^(m+1) / (m+1), with
        # u = x - origin clamped to the bin; a point mass at or below x counts whole. Entry 0 is a
        # sentinel bin (nothing below it) for x under every bin.
        self._search = np.concatenate([[-np.inf], a0])
        self._lo, self._hi = np.concatenate([a0[:1], a0]), np.concatenate([a0[:1], b0])
        self._dens = np.concatenate([[0.0], dens])
        power = a0.copy()
        self._base = []
        for m, prefix in enumerate(self._prefix):
            self._base.append(np.concatenate([[0.0], np.where(point, prefix[1:], prefix[:-1] - dens * power / (m + 1))]))
            power *= a0

    def cumulative(self, x, order: int = 0) -> list[np.ndarray]:
        """``[sum_{v<=x} 1, sum (v-origin), sum (v-origin)^2]`` (first ``order+1`` of them) at points ``x``."""
        return self._cumulative_about_origin(np.asarray(x, dtype=np.float64) - self.origin, order)

    def _cumulative_about_origin(self, x0: np.ndarray, order: int) -> list[np.ndarray]:
        j = np.searchsorted(self._search, x0, side="right") - 1
        u = np.minimum(np.maximum(x0, self._lo[j]), self._hi[j])
        dens = self._dens[j]
        out = [self._base[0][j] + dens * u]
        if order >= 1:
            u2 = u * u
            out.append(self._base[1][j] + dens * u2 * 0.5)
        if order >= 2:
            out.append(self._base[2][j] + dens * u2 * u * (1.0 / 3.0))
        return out

    def cdf(self, x) -> np.ndarray:
        """Number of values ``<= x`` (interpolated inside bins)."""
        return self.cumulative(x)[0]

    def quantile_count(self, t) -> np.ndarray:
        """The value below which ``t`` counts lie (inverse of :meth:`cdf`)."""
        t = np.asarray(t, dtype=np.float64)
        p0 = self._prefix[0]
        j = np.clip(np.searchsorted(p0[1:], t, side="left"), 0, self.h.size - 1)
        frac = np.clip((t - p0[j]) / self.h[j], 0.0, 1.0)
        return np.clip(self.a[j] + frac * (self.b[j] - self.a[j]), self.vmin, self.vmax)

    def kth_smallest(self, k: int) -> float:
        """k-th smallest value (1-based); exact for k == 1."""
        if k >= self.total:
            return self.vmax
        return self.vmin if k <= 1 else float(self.quantile_count(k - 0.5))

    def kth_largest(self, k: int) -> float:
        """k-th largest value (1-based); exact for k == 1."""
        return self.vmax if k <= 1 else float(self.quantile_count(self.total - k + 0.5))

    def percentile(self, q: float) -> float:
        """Like ``np.percentile(x, q)``: linear interpolation between neighbouring order statistics."""
        pos = min(max(q, 0.0), 100.0) / 100.0 * (self.total - 1)
        k = math.floor(pos)
        low = self.kth_smallest(k + 1)
        return low if pos == k else low + (pos - k) * (self.kth_smallest(k + 2) - low)

    @classmethod
    def of_values(cls, values) -> "Distribution":
        """Exact distribution of a few values: one point mass per distinct value."""
        values, mult = np.unique(np.asarray(values, np.float64), return_counts=True)
        return cls(values, values, mult, values[0], values[-1])

    def project(self, edges) -> np.ndarray:
        """Counts re-binned onto contiguous ``edges`` (float64; mass outside them is dropped)."""
        return np.diff(self.cdf(edges))

    def quant_sse(self, first_level, step, num_levels, method: str = "auto") -> np.ndarray:
        """Sum of squared errors of uniform quantizers over the histogram, one per candidate.

        Candidate ``c`` has levels ``first_level[c] + k * step[c]`` for ``k < num_levels[c]``; each
        value goes to the nearest level and values beyond the end levels go to them (clipping
        error included). Exact for uniform density inside bins. ``"levels"`` uses cumulative
        moments at the decision boundaries (O(levels) per candidate); ``"bins"`` integrates the
        periodic rounding error over each bin (O(bins), no cancellation); ``"auto"`` picks the
        cheaper, so 8-bit searches never touch every bin and 16-bit ones stay affordable.
        """
        first, step, nlev = np.broadcast_arrays(
            np.asarray(first_level, np.float64), np.asarray(step, np.float64), np.asarray(num_levels, np.int64))
        first, step, nlev = first.ravel(), step.ravel(), nlev.ravel()
        kmax = int(nlev.max())
        by_bins = method == "bins" or (method == "auto" and kmax + 1 > self.h.size)
        cost = self.h.size if by_bins else kmax + 1
        out = np.empty(first.size)
        rows = max(1, _SSE_POINTS // cost)
        for s in range(0, first.size, rows):
            args = first[s:s + rows, None], step[s:s + rows, None], nlev[s:s + rows, None]
            out[s:s + rows] = self._sse_by_bins(*args) if by_bins else self._sse_by_levels(*args, kmax)
        return np.maximum(out, 0.0)

    def _sse_by_levels(self, f, st, nl, kmax: int) -> np.ndarray:
        # With levels L_k, boundaries b_k = (L_(k-1) + L_k) / 2 and cumulative moments C0, C1 (about
        # the origin), summation by parts turns sum_k sum_(v in cell k) (v - L_k)^2 into
        #   sum_v (v - L_last)^2 + 2 * step * sum_k [C1(b_k) - b_k * C0(b_k)]
        # (L_(k-1)^2 - L_k^2 = -2 * step * b_k): two moments at the boundaries, no differences.
        k = np.arange(1, kmax)
        bounds = (f - self.origin) + (k - 0.5) * st
        c0, c1 = self._cumulative_about_origin(bounds, order=1)
        inner = np.where(k < nl, c1 - bounds * c0, 0.0).sum(axis=1)
        last = (f - self.origin) + (nl - 1) * st
        t0, t1, t2 = self.moments
        return ((t2 - 2.0 * last * t1 + last * last * t0) + 2.0 * st * inner[:, None]).ravel()

    def _sse_by_bins(self, f, st, nl) -> np.ndarray:
        a, b, h = self.a, self.b, self.h
        width = b - a
        point = width <= 0
        inv = 1.0 / np.where(point, 1.0, width)
        top = f + (nl - 1) * st
        b0 = np.where(nl > 1, f + 0.5 * st, f)   # below b0 -> first level, above b1 -> last level
        b1 = np.where(nl > 1, top - 0.5 * st, f)
        lo, hi = np.clip(b0, a, b), np.clip(b1, a, b)

        def periodic(x):                          # antiderivative of (x - round-to-grid(x))^2
            m = np.floor((x - f) / st + 0.5)
            r = x - f - m * st
            return st ** 3 / 12 * m + (r ** 3 + st ** 3 / 8) / 3

        cont = ((lo - f) ** 3 - (a - f) ** 3 + (b - top) ** 3 - (hi - top) ** 3) / 3
        cont += np.where(hi > lo, periodic(hi) - periodic(lo), 0.0)
        k = np.clip(np.rint((a - f) / st), 0, nl - 1)
        mass = (a - f - k * st) ** 2              # point masses: error of their single value
        return (np.where(point, mass, cont * inv) * h).sum(axis=1)
