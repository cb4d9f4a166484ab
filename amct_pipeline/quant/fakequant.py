"""The one fake-quant emitter: AscendQuant / AscendAntiQuant written as standard float ONNX ops.

AMCT's fake-quant form (SPEC 5.4), in float32 exactly as the integer hardware computes::

    codes      = Clip(Add(Round(Mul(x, 1/scale_d)), offset_d), low, high)      AscendQuant
    fake quant = Sub(codes, offset_d)               (integers in float32, what a fake-quant layer reads)
    antiquant  = Mul(fake quant, scale_d)           AscendAntiQuant (back to float)

Every target, ``convert_qat`` and ``refine_ranges`` build their chains here; the factors are
constants (:func:`constant_factors`) or, for a search that changes them between runs, graph inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.edit import Namer, add_node, constant
from .params import ActQuantParams
from .plan import quant_multiplier

__all__ = ["QuantFactors", "constant_factors", "emit_codes", "emit_fake_quant", "emit_antiquant"]


@dataclass(frozen=True)
class QuantFactors:
    """The tensors one quantizer reads: ``1/scale_d``, ``offset_d`` and the code range."""

    multiplier: gs.Tensor
    offset: gs.Tensor
    low: gs.Tensor
    high: gs.Tensor


def constant_factors(namer: Namer, prefix: str, act: ActQuantParams, code_range: tuple[int, int] | None = None,
                     offset: int | None = None) -> QuantFactors:
    """Constants ``<prefix>.scale`` (the multiplier), ``.offset``, ``.min_val``, ``.max_val``.

    ``code_range``: codes narrower than the type's (a clip moved onto the codes); ``offset``: the
    zero point to add when it differs from ``act.offset`` (a uint8 code range)."""
    low, high = code_range if code_range is not None else (act.qmin, act.qmax)
    return QuantFactors(
        multiplier=constant(namer, f"{prefix}.scale", np.array(quant_multiplier(act.scale), np.float32)),
        offset=constant(namer, f"{prefix}.offset", np.array(act.offset if offset is None else offset, np.float32)),
        low=constant(namer, f"{prefix}.min_val", np.array(low, np.float32)),
        high=constant(namer, f"{prefix}.max_val", np.array(high, np.float32)))


def emit_codes(graph, namer: Namer, x: gs.Tensor, prefix: str, factors: QuantFactors) -> gs.Tensor:
    """AscendQuant: the integer codes (in float32) of ``x``; nodes ``<prefix>.mul/.round/.add/.clip``."""
    y = add_node(graph, namer, "Mul", f"{prefix}.mul", [x, factors.multiplier]).outputs[0]
    y = add_node(graph, namer, "Round", f"{prefix}.round", [y]).outputs[0]
    y = add_node(graph, namer, "Add", f"{prefix}.add", [y, factors.offset]).outputs[0]
    return add_node(graph, namer, "Clip", f"{prefix}.clip", [y, factors.low, factors.high]).outputs[0]


def emit_fake_quant(graph, namer: Namer, x: gs.Tensor, prefix: str, factors: QuantFactors) -> gs.Tensor:
    """AscendQuant as float ops, offset removed: the output holds ``q - offset_d`` (``<prefix>.sub``)."""
    codes = emit_codes(graph, namer, x, prefix, factors)
    return add_node(graph, namer, "Sub", f"{prefix}.sub", [codes, factors.offset]).outputs[0]


def emit_antiquant(graph, namer: Namer, y: gs.Tensor, prefix: str, scale: gs.Tensor | float,
                   out: gs.Tensor | None = None) -> gs.Tensor:
    """AscendAntiQuant / AscendDequant as ``Mul(y, scale)`` (``<prefix>.mul``), optionally producing ``out``."""
    if not isinstance(scale, gs.Tensor):
        scale = constant(namer, f"{prefix}.scale", np.array(scale, np.float32))
    return add_node(graph, namer, "Mul", f"{prefix}.mul", [y, scale], [out] if out is not None else None).outputs[0]
