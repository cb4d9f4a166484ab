"""fakequant: AMCT's fake-quant model (SPEC 5.4), runnable in onnxruntime with standard ops.

Per quantized layer L (names as AMCT writes them)::

    x -> L.quant.fakequant.mul (x * 1/scale_d) -> .round -> .add (+offset_d) -> .clip (qmin, qmax)
      -> .sub (-offset_d) -> L (float weights holding the integer codes, float bias holding the int32
      codes) -> L.fakedequant.mul (* deq_scale, [1,C,1,1] for a 2-D Conv, [1] per tensor) -> consumers

so the float graph computes ``(sum (q - o) * w_q + b_q) * scale_d * scale_w`` exactly as integer
hardware does (exact in float32 while partial sums stay below 2^24). A tensor feeding several layers
with equal factors gets one chain, named after the first layer. MatMul + Add bias: the dequant goes
after the Add, whose constant holds the int32 bias. AveragePool: chain before, ``* scale_d`` after.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ...ir.edit import Namer, constant, detach_output, replace_constant_input
from ...quant.fakequant import constant_factors, emit_antiquant, emit_fake_quant
from ...quant.plan import LayerPlan, LoweringPlan, bias_slot, channel_shape, neutralize_gemm, output_node
from .base import PlanTarget

__all__ = ["FakeQuantTarget"]


class FakeQuantTarget(PlanTarget):
    name = "fakequant"
    summary = "AMCT fake-quant model: Mul/Round/Add/Clip/Sub before each layer, integer-valued weights, Mul after."
    suffix = "fake_quant_model"

    def rewrite(self, graph, plan: LoweringPlan, ctx) -> None:
        namer = Namer(graph)
        nodes = {node.name: node for node in graph.nodes}
        chains: dict[tuple, gs.Tensor] = {}
        for layer_plan in plan.layers.values():
            node = nodes[layer_plan.name]
            key = layer_plan.input_key
            if key not in chains:
                prefix = f"{layer_plan.name}.quant.fakequant"
                chains[key] = emit_fake_quant(graph, namer, node.inputs[0], prefix,
                                              constant_factors(namer, prefix, layer_plan.act))
            node.inputs[0] = chains[key]
            _integer_constants(nodes, namer, node, layer_plan)
            _dequant(graph, namer, output_node(nodes, layer_plan.layer), layer_plan)


def _integer_constants(nodes, namer: Namer, node: gs.Node, plan: LayerPlan) -> None:
    """Weights and bias become float32 tensors holding the int8 / int32 codes."""
    if plan.weight_q is None:
        return
    replace_constant_input(node, 1, plan.weight_q.astype(np.float32), namer, f"{plan.name}.weight")
    slot = bias_slot(nodes, plan.layer)
    if slot is not None and plan.bias_q is not None:
        # float32 holds int32 codes exactly up to 2^24; larger biases round as AMCT's do
        replace_constant_input(slot[0], slot[1], plan.bias_q.astype(np.float32), namer, f"{plan.name}.bias")
    neutralize_gemm(node)


def _dequant(graph, namer: Namer, out_node: gs.Node, plan: LayerPlan) -> None:
    """AscendDequant as ``Mul(deq_scale)`` after the layer (after the bias Add for MatMul)."""
    prefix = f"{plan.name}.fakedequant"
    inner, original = detach_output(out_node, namer, f"{prefix}.input")
    dqscale = constant(namer, f"{prefix}.dqscale", channel_shape(plan, plan.deq_scale))
    emit_antiquant(graph, namer, inner, prefix, dqscale, out=original)
