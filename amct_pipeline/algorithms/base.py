"""Interfaces of the algorithms that passes delegate their math to.

Each algorithm is a class with a registry ``name``, a one-line ``summary`` and an ``Options``
model; plugins contribute them through the ``amct_register_*`` hooks.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from ..options import NoOptions, Options

__all__ = [
    "ActQuantParams",
    "ActivationCalibrator",
    "WeightQuantParams",
    "WeightQuantizer",
    "DecompositionMethod",
    "LoweringTarget",
    "Algorithm",
]


class Algorithm(abc.ABC):
    """Common shape of every registered algorithm."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = NoOptions

    def __init__(self, options: Options | Mapping[str, Any] | None = None) -> None:
        if options is None or isinstance(options, Mapping):
            options = self.Options.model_validate(dict(options or {}))
        self.options = options


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


class ActivationCalibrator(Algorithm):
    """Streaming activation calibrator: sees batches, keeps bounded statistics.

    One instance calibrates many tensors; ``observe`` is called once per batch per tensor and
    ``finalize`` returns the factors of every observed tensor. Memory must not grow with the
    number of batches.
    """

    @abc.abstractmethod
    def observe(self, tensor_name: str, batch: np.ndarray) -> None: ...

    @abc.abstractmethod
    def finalize(self) -> dict[str, ActQuantParams]: ...


@dataclass(frozen=True)
class WeightQuantParams:
    """Symmetric weight factors: one scale per output channel (or one per tensor)."""

    scale: np.ndarray          # float32 [C] or [1]
    quantized: np.ndarray      # int8 values, same shape as the weight
    num_bits: int = 8


class WeightQuantizer(Algorithm):
    """Quantizes a constant weight tensor offline."""

    @abc.abstractmethod
    def quantize(self, weight: np.ndarray, *, op_type: str, channel_axis: int | None) -> WeightQuantParams: ...


class DecompositionMethod(Algorithm):
    """Factorizes one Conv layer into child layers."""

    @abc.abstractmethod
    def decompose(self, weight: np.ndarray, **layer: Any) -> Any: ...


class LoweringTarget(Algorithm):
    """Turns a graph plus quantization factors into a model for a runtime."""

    domain: ClassVar[str] = ""

    @abc.abstractmethod
    def lower(self, graph: Any, ctx: Any) -> Any: ...
