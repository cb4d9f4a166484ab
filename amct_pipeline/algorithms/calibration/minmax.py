"""MinMax: the exact running range of every batch seen (SPEC 4.2 on [min, max])."""
from __future__ import annotations

from ...quant.math import scale_offset_from_range
from ..base import ActQuantParams
from .common import CalibratorOptions, StreamingCalibrator
from .histogram import RunningRange

__all__ = ["MinMaxCalibrator"]


class MinMaxCalibrator(StreamingCalibrator):
    name = "minmax"
    summary = "Running min/max of all batches; no clipping."

    class Options(CalibratorOptions):
        pass

    def _new_stats(self) -> RunningRange:
        return RunningRange()

    def _params(self, stats: RunningRange) -> ActQuantParams:
        return scale_offset_from_range(stats.min, stats.max, self.num_bits, self.symmetric)
