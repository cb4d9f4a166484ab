"""What every plan-driven lowering target shares: upgrade the opset, rewrite a copy of the float graph
from the plan, quantize the plan's tensors, clean up and export.

The graph handed to a target is always a copy (``ir.edit.copy_graph``) whose weights are shared with
the float graph, so targets replace constants instead of editing arrays in place (copy on write).
"""
from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...ir.edit import Namer, add_node, constant, ensure_opset, int4_constant
from ...quant.fakequant import constant_factors, emit_antiquant, emit_fake_quant
from ...quant.params import ActQuantParams
from ...quant.plan import QUANT_OPSET, LoweringPlan
from ..base import LoweringContext, LoweringTarget

__all__ = ["PlanTarget", "LoweringContext", "ACT_TYPES", "UINT8_SHIFT", "PRECISION_OPSET", "qdq_pair",
           "dequantized_constant", "fake_quantized_weight", "symmetric_factors"]

UINT8_SHIFT = 128                             # uint8 zero point = int8-domain offset + 128
PRECISION_OPSET = 21                          # INT4 and 16-bit QuantizeLinear / DequantizeLinear
# activation bits -> (unsigned container, shift from AMCT's signed-domain offset to its zero point)
ACT_TYPES = {8: (np.uint8, UINT8_SHIFT), 16: (np.uint16, 1 << 15)}


class PlanTarget(LoweringTarget):
    """A lowering target driven by the plan. Subclasses set ``suffix`` and implement ``rewrite``.

    ``suffix``: the file is ``<prefix>_<suffix>.onnx``. ``min_opset``: the default-domain opset the
    output needs (the graph is upgraded with onnx.version_converter when lower; None = never).
    """

    suffix: ClassVar[str]
    min_opset: ClassVar[int | None] = QUANT_OPSET

    def check_plan(self, plan: LoweringPlan) -> None:
        """Refuse, with a ConfigError naming the layer and the target, a precision this target cannot
        hold. ``lower`` calls it for every target before any is lowered or written. Default: anything."""

    def opset(self, plan: LoweringPlan) -> int | None:
        """The default-domain opset the output needs for ``plan`` (``min_opset`` unless a precision needs more)."""
        return self.min_opset

    def lower(self, graph, ctx: LoweringContext) -> onnx.ModelProto:
        version = self.opset(ctx.plan)
        if version is not None:
            ensure_opset(graph, version, where="pass 'lower'", path=f"target '{self.name}'",
                         hint=f"upgrade the model to opset {version} or later before quantizing")
        self.rewrite(graph, ctx.plan, ctx)
        if ctx.plan.tensors:
            self.rewrite_tensors(graph, ctx.plan, ctx)
        graph.finalize()
        return graph.to_proto()

    @abc.abstractmethod
    def rewrite(self, graph, plan: LoweringPlan, ctx: LoweringContext) -> None:
        """Edit ``graph`` (a copy of the float graph) in place."""

    def rewrite_tensors(self, graph, plan: LoweringPlan, ctx: LoweringContext) -> None:
        """Tensor quantization entries (run after ``rewrite``). Default: AMCT's fake-quant form before
        the node's input, i.e. exactly what AscendQuant + AscendAntiQuant compute."""
        namer = Namer(graph)
        nodes = {node.name: node for node in graph.nodes}
        done: dict[tuple, gs.Tensor] = {}
        for entry in plan.tensors.values():
            node = nodes[entry.node]
            if entry.input_key not in done:
                prefix = f"{entry.key}.quant.fakequant"
                codes = emit_fake_quant(graph, namer, node.inputs[entry.index], prefix,
                                        constant_factors(namer, prefix, entry.act))
                done[entry.input_key] = emit_antiquant(graph, namer, codes, f"{entry.key}.fakeantiquant",
                                                       entry.act.scale)
            node.inputs[entry.index] = done[entry.input_key]


# -- QuantizeLinear / DequantizeLinear pieces the QDQ-style targets share ----------------------------
def qdq_pair(graph, namer: Namer, tensor: gs.Tensor, params: ActQuantParams, base: str,
             code_range: tuple[int, int] | None = None):
    """QuantizeLinear -> [Clip on the codes] -> DequantizeLinear with uint8 (uint16 for 16-bit) codes whose
    zero point is offset_d + 128 (+ 32768); initializers ``<base>_scale`` / ``<base>_zero_point``.
    Returns (Q node, DQ output)."""
    dtype, shift = ACT_TYPES[params.num_bits]
    scale = constant(namer, f"{base}_scale", np.array(params.scale, np.float32))
    zero_point = constant(namer, f"{base}_zero_point", np.array(params.offset + shift, dtype))
    quantize = add_node(graph, namer, "QuantizeLinear", f"{base}_QuantizeLinear", [tensor, scale, zero_point],
                        [f"{base}_quantized"])
    codes = quantize.outputs[0]
    codes.dtype = dtype
    if code_range is not None:
        low, high = (constant(namer, f"{base}_clip_{end}", np.array(code + shift, dtype))
                     for end, code in zip(("min", "max"), code_range))
        codes = add_node(graph, namer, "Clip", f"{base}_Clip", [codes, low, high], [f"{base}_clipped"]).outputs[0]
        codes.dtype = dtype
    dequantize = add_node(graph, namer, "DequantizeLinear", f"{base}_DequantizeLinear",
                          [codes, scale, zero_point], [f"{base}_dequantized"])
    dequantize.outputs[0].dtype = np.float32
    return quantize, dequantize.outputs[0]


def dequantized_constant(graph, namer: Namer, codes: np.ndarray, scale: np.ndarray, dtype, axis: int | None,
                         base: str) -> gs.Variable:
    """``codes`` as a ``dtype`` initializer behind a DequantizeLinear (zero point 0, per tensor or per
    ``axis``); ``dtype`` "int4": packed INT4 codes and zero point (opset 21)."""
    stored = (int4_constant(namer, f"{base}_quantized", codes) if isinstance(dtype, str)
              else constant(namer, f"{base}_quantized", codes.astype(dtype)))
    return _dequantize(graph, namer, stored, *symmetric_factors(namer, scale, dtype, axis, base), axis, base)


def fake_quantized_weight(graph, namer: Namer, weight: gs.Tensor, scale: np.ndarray, dtype, axis: int | None,
                          base: str) -> gs.Variable:
    """A float ``weight`` through QuantizeLinear -> DequantizeLinear sharing one scale and zero point
    (a trainable weight); ``dtype`` as in :func:`dequantized_constant`."""
    factors = symmetric_factors(namer, scale, dtype, axis, base)
    attrs = {} if axis is None else {"axis": int(axis)}
    codes = add_node(graph, namer, "QuantizeLinear", f"{base}_QuantizeLinear", [weight, *factors],
                     [f"{base}_quantized"], **attrs).outputs[0]
    return _dequantize(graph, namer, codes, *factors, axis, base)


def symmetric_factors(namer: Namer, scale: np.ndarray, dtype, axis: int | None, base: str):
    """(scale, zero point 0) initializers ``<base>_scale`` / ``<base>_zero_point`` of a symmetric quantizer."""
    scale = np.asarray(scale, np.float32).reshape(-1)
    if axis is None:
        scale_values, zero = np.array(scale[0], np.float32), np.zeros((), np.int8)
    else:
        scale_values, zero = scale, np.zeros(scale.size, np.int8)
    zero_point = (int4_constant(namer, f"{base}_zero_point", zero) if isinstance(dtype, str)
                  else constant(namer, f"{base}_zero_point", zero.astype(dtype)))
    return constant(namer, f"{base}_scale", scale_values), zero_point


def _dequantize(graph, namer: Namer, codes: gs.Tensor, scale: gs.Tensor, zero_point: gs.Tensor,
                axis: int | None, base: str) -> gs.Variable:
    attrs = {} if axis is None else {"axis": int(axis)}
    node = add_node(graph, namer, "DequantizeLinear", f"{base}_DequantizeLinear", [codes, scale, zero_point],
                    [f"{base}_dequantized"], **attrs)
    node.outputs[0].dtype = np.float32
    return node.outputs[0]
