"""Interfaces of the algorithms that passes delegate their math to.

Each algorithm is a class with a registry ``name``, a one-line ``summary`` and an ``Options``
model; plugins contribute them through the ``amct_register_*`` hooks.
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..options import NoOptions, Options
from ..quant.params import ActQuantParams, WeightQuantParams

__all__ = [
    "ActQuantParams",
    "ActivationCalibrator",
    "WeightQuantParams",
    "WeightQuantizer",
    "DecompositionMethod",
    "LoweringTarget",
    "LoweringContext",
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


class WeightQuantizer(Algorithm):
    """Quantizes a constant weight tensor offline."""

    @abc.abstractmethod
    def quantize(self, weight: np.ndarray, *, op_type: str, channel_axis: int | None) -> WeightQuantParams: ...


class DecompositionMethod(Algorithm):
    """Factorizes one 2-D Conv layer into a chain of child convs (numpy only; no graph access).

    ``layer`` is an ``algorithms.decomposition.layer.ConvLayer`` (channels, kernel, stride, pads,
    input size); a rank is a tuple of ints whose meaning the method defines. The ``decompose`` pass
    does eligibility, rank budgets, data collection, the refit of the last child and the surgery;
    ``apply_decomposition`` rebuilds a saved structure from ``structure`` alone.
    """

    preferred_rules: ClassVar[str] = "basic"    # eligibility rules when the pass does not choose

    @abc.abstractmethod
    def mode(self, layer: Any) -> str:
        """The info file's ``mode`` (AMCT: SCFK/FCFK for spatial SVD)."""

    @abc.abstractmethod
    def structure(self, layer: Any, rank: tuple[int, ...]) -> list:
        """The child convs (``ChildSpec``: channels, kernel, stride, pads, groups), first to last."""

    @abc.abstractmethod
    def max_rank(self, layer: Any) -> tuple[int, ...]:
        """The largest rank the layer allows, per rank component."""

    @abc.abstractmethod
    def default_rank(self, layer: Any, weight: np.ndarray) -> tuple[int, ...]:
        """The rank chosen when neither an override nor a target gives one (EVBMF-based rules)."""

    @abc.abstractmethod
    def candidate_ranks(self, layer: Any) -> list[tuple[int, ...]]:
        """Ranks a target may pick from, cheapest first."""

    @abc.abstractmethod
    def decompose(self, layer: Any, weight: np.ndarray, rank: tuple[int, ...], *,
                  input_cov: np.ndarray | None = None) -> list[np.ndarray]:
        """Child weights, first to last (the pass gives the last child the layer's bias).

        ``input_cov``: uncentred covariance of the patches the first child reads (data-aware
        mode); the method then minimises the response error instead of the weight error.
        """

    @abc.abstractmethod
    def normalize_rank(self, layer: Any, rank: int | Sequence[int]) -> tuple[int, ...]:
        """A user-given rank as the method's tuple; ValueError saying why when out of range."""

    def rank_from_shapes(self, layer: Any, shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
        """The rank whose structure has these child weight shapes (re-applying an info file)."""
        for rank in self.candidate_ranks(layer):
            if [list(c.weight_shape) for c in self.structure(layer, rank)] == [list(s) for s in shapes]:
                return rank
        raise ValueError(f"no {self.name} rank of layer '{layer.name}' gives child weight shapes "
                         f"{[list(s) for s in shapes]}")


@dataclass
class LoweringContext:
    """What a lowering target gets besides the graph copy it rewrites.

    ``plan``: the checked factors, integer weights and biases per layer (``quant.plan``);
    ``tensor_quant``: calibrated factors of tensors beyond the layer inputs (block outputs), by tensor
    name; ``products``: where the target puts the artifacts it declares in ``produces``.
    """

    plan: Any                                   # quant.plan.LoweringPlan
    layer_map: Any = None                       # quant.layers.LayerMap
    tensor_quant: Mapping[str, ActQuantParams] = field(default_factory=dict)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("amct_pipeline.targets"))
    products: dict[str, Any] = field(default_factory=dict)


class LoweringTarget(Algorithm):
    """Turns a graph plus quantization factors into a model for a runtime.

    ``produces``: the artifacts the target writes into ``ctx.products`` (declared, so a pipeline's
    dataflow is checked before it runs)."""

    domain: ClassVar[str] = ""
    produces: ClassVar[frozenset[str]] = frozenset()
    suffix: ClassVar[str] = ""          # the file is <prefix>_<suffix>.onnx; empty: the target's name

    @classmethod
    def file_suffix(cls) -> str:
        return cls.suffix or cls.name

    @abc.abstractmethod
    def lower(self, graph: Any, ctx: LoweringContext) -> Any: ...

    def check(self, model: Any) -> None:
        """Validate the lowered model (an onnx ModelProto; default: ``onnx.checker`` when the proto is
        serializable). A target with operators onnx has no schema for checks them itself: nothing may
        change onnx's process-wide schema registry."""
        import onnx
        if model.ByteSize() < (2 << 30) - (64 << 20):
            onnx.checker.check_model(model)
