"""Built-in streaming activation calibrators (numpy only) and their shared histogram statistics."""
from .common import CalibratorOptions, StreamingCalibrator
from .entropy import EntropyCalibrator
from .extremes import MeanMinMaxCalibrator, SampleQuantileCalibrator
from .hfmg import HfmgCalibrator
from .ifmr import IfmrCalibrator
from .minmax import MinMaxCalibrator
from .mse import MseCalibrator
from .percentile import PercentileCalibrator

__all__ = [
    "BUILTIN_CALIBRATORS",
    "CalibratorOptions",
    "StreamingCalibrator",
    "IfmrCalibrator",
    "HfmgCalibrator",
    "MinMaxCalibrator",
    "PercentileCalibrator",
    "EntropyCalibrator",
    "MseCalibrator",
    "MeanMinMaxCalibrator",
    "SampleQuantileCalibrator",
]

BUILTIN_CALIBRATORS = [
    IfmrCalibrator,
    HfmgCalibrator,
    MinMaxCalibrator,
    PercentileCalibrator,
    EntropyCalibrator,
    MseCalibrator,
    MeanMinMaxCalibrator,
    SampleQuantileCalibrator,
]
