"""Quantization parameters: what calibrators and weight quantizers produce and every target consumes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ActQuantParams", "WeightQuantParams", "weightless_params"]


@dataclass(frozen=True)
class ActQuantParams:
    """Activation quantization factors in AMCT's convention (SPEC 4.1).

    ``q = clip(round(x / scale) + offset, -2^(b-1), 2^(b-1)-1)``; offset is an int8-domain zero point.
    """

    scale: float
    offset: int
    num_bits: int = 8

    @property
    def qmin(self) -> int:
        return -(1 << (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.num_bits - 1)) - 1

    @property
    def clip_min(self) -> float:
        return (self.qmin - self.offset) * self.scale

    @property
    def clip_max(self) -> float:
        return (self.qmax - self.offset) * self.scale


@dataclass(frozen=True)
class WeightQuantParams:
    """Symmetric weight factors: one scale per output channel (or one per tensor)."""

    scale: np.ndarray          # float32 [C] or [1]
    quantized: np.ndarray      # int8 values, same shape as the weight
    num_bits: int = 8


def weightless_params() -> WeightQuantParams:
    """AveragePool: deq_scale = scale_d, no weight codes."""
    return WeightQuantParams(scale=np.ones(1, np.float32), quantized=np.zeros((0,), np.int8), num_bits=8)
