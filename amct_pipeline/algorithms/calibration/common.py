"""Base class of the built-in calibrators: per-tensor bounded statistics, input checks, common options."""
from __future__ import annotations

import abc
import warnings
from typing import Any, Literal, Mapping

import numpy as np

from ...options import Options
from ...quant.math import scale_offset_from_range
from ..base import ActivationCalibrator, ActQuantParams
from .histogram import RunningRange

__all__ = ["CalibratorOptions", "StreamingCalibrator"]


class CalibratorOptions(Options):
    """Options every built-in calibrator takes."""

    asymmetric: bool = True
    num_bits: Literal[8, 16] = 8


class StreamingCalibrator(ActivationCalibrator):
    """Keeps one bounded statistics object per tensor name; subclasses turn it into factors.

    ``observe`` rejects NaN/Inf (naming the tensor). A tensor whose values are all equal gets the
    SPEC 4.2 factors of its degenerate range (which represent the constant exactly; an all-zero
    tensor gets the sanitised scale 1.0) and a warning, whatever the algorithm.

    Small batches of statistics whose result does not depend on how the stream is cut
    (``stats.order_independent``) are pooled up to ``pool_size`` values per tensor before they are
    added: on a tiny model the fixed cost of each ``add`` would otherwise dominate calibration. The
    pool is bounded, so memory still does not grow with the number of batches.
    """

    Options = CalibratorOptions
    pool_size = 1 << 16

    def __init__(self, options: Options | Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self._stats: dict[str, RunningRange] = {}
        self._pools: dict[str, _Pool] = {}

    @property
    def symmetric(self) -> bool:
        return not self.options.asymmetric

    @property
    def num_bits(self) -> int:
        return self.options.num_bits

    @abc.abstractmethod
    def _new_stats(self) -> RunningRange: ...

    @abc.abstractmethod
    def _params(self, stats: Any) -> ActQuantParams:
        """Factors of a tensor that has at least two distinct values."""

    def observe(self, tensor_name: str, batch: np.ndarray) -> None:
        # float32 is what the runtime produces; the histograms index float32 bit patterns
        x = np.asarray(batch, dtype=np.float32).reshape(-1)
        if x.size == 0:
            return
        mn, mx = float(x.min()), float(x.max())
        if not (np.isfinite(mn) and np.isfinite(mx)):
            raise ValueError(f"tensor '{tensor_name}': calibration batch contains NaN or Inf values")
        stats = self._stats.get(tensor_name)
        if stats is None:
            stats = self._stats[tensor_name] = self._new_stats()
        if x.size >= self.pool_size or not stats.order_independent:
            stats.add(x, mn, mx)
            return
        pool = self._pools.setdefault(tensor_name, _Pool())
        pool.put(x, mn, mx)
        if pool.size >= self.pool_size:
            pool.drain_into(stats)

    def _drain(self) -> None:
        for name, pool in self._pools.items():
            pool.drain_into(self._stats[name])

    def finalize(self) -> dict[str, ActQuantParams]:
        self._drain()
        return {name: self._finalize_one(name, stats) for name, stats in self._stats.items()}

    def _finalize_one(self, name: str, stats: RunningRange) -> ActQuantParams:
        if stats.min == stats.max:
            warnings.warn(
                f"tensor '{name}' is constant ({stats.min!r}) over all calibration batches; "
                "using the factors of its degenerate range",
                RuntimeWarning,
                stacklevel=3,
            )
            return scale_offset_from_range(stats.min, stats.max, self.num_bits, self.symmetric)
        return self._params(stats)

    def statistics(self, tensor_name: str) -> RunningRange:
        """The statistics object kept for one tensor (for merging or inspection)."""
        self._drain()
        return self._stats[tensor_name]

    @property
    def nbytes(self) -> int:
        """Bytes held by all statistics arrays: constant in the number of batches."""
        return sum(s.nbytes for s in self._stats.values()) + sum(4 * p.size for p in self._pools.values())


class _Pool:
    """Small flat float32 batches of one tensor waiting to be added together."""

    def __init__(self) -> None:
        self._empty()

    def _empty(self) -> None:
        self.parts: list[np.ndarray] = []
        self.size, self.min, self.max = 0, np.inf, -np.inf

    def put(self, x: np.ndarray, mn: float, mx: float) -> None:
        self.parts.append(x.copy())   # the caller may reuse its buffer
        self.size += x.size
        self.min, self.max = min(self.min, mn), max(self.max, mx)

    def drain_into(self, stats: RunningRange) -> None:
        if self.parts:
            stats.add(np.concatenate(self.parts), self.min, self.max)
            self._empty()
