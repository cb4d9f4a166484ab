"""qat: a trainable QDQ model holding the quantization the pipeline chose, for users who fine-tune in
their own framework (AMCT's QAT flow, SPEC 2.3 / 9); ``convert_qat`` turns the trained model back into
the fake-quant and deploy models and ``record.txt``.

Per quantized layer L::

    x -> QuantizeLinear -> DequantizeLinear -> L <- DequantizeLinear <- QuantizeLinear <- weight (float)
         (L.input_scale, L.input_zero_point)         (<w>_scale [C], <w>_zero_point, axis = output channel)

* Every factor is an initializer (``*_scale``, ``*_zero_point``; one pair per tensor, shared by layers
  reading it with equal factors, and by both halves of the pair), so a framework that imports the
  model can train weights, biases and scales with straight-through rounding.
* Weights stay float: the float graph's own weight where it rounds to the plan's codes (ARQ), else
  ``codes * scale_w`` (a learned rounding, e.g. retrain's, is kept exactly). Biases stay float (Gemm's
  ``alpha`` / ``beta`` folded in); the deploy model quantizes them to INT32 after ``convert_qat``.
* Activations: uint8 pairs (zero point ``offset_d + 128``), uint16 for INT16 layers; weights: int8,
  or int4 (packed) for INT4 layers. INT16 / INT4 need opset 21, to which the model is then upgraded.
* Tensor quantization entries (Add / MaxPool inputs) become pairs before those nodes, which
  ``convert_qat`` reads back as ``tensor_quantize`` entries.

Untrained, the model computes what the fake-quant model computes except for the biases' INT32
rounding, and ``convert_qat`` of it gives back the same record.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import ConfigError, Problem
from ...ir.edit import Namer, constant, replace_constant_input
from ...quant.plan import LayerPlan, LoweringPlan, bias_slot, neutralize_gemm
from ...quant.weights import effective_bias, effective_weight, quantize_with_scale
from .base import ACT_TYPES, PRECISION_OPSET, PlanTarget, fake_quantized_weight, qdq_pair

__all__ = ["QatTarget"]


class QatTarget(PlanTarget):
    name = "qat"
    summary = ("Trainable QAT model: float weights and biases, QuantizeLinear/DequantizeLinear pairs on every layer "
               "input and weight with the factors as initializers; convert_qat turns it back.")
    suffix = "qat_model"

    def check_plan(self, plan: LoweringPlan) -> None:
        for name, layer_plan in plan.layers.items():
            layer = layer_plan.layer
            if layer_plan.act.num_bits not in ACT_TYPES:
                raise _problem(name, f"{layer_plan.act.num_bits}-bit activations cannot be expressed as a "
                                     "QuantizeLinear", "use 8- or 16-bit activations for this layer")
            if layer_plan.per_channel and layer.op_type == "ConvTranspose" and layer.group > 1:
                raise _problem(name, "a grouped ConvTranspose with per-channel weights has no single "
                                     "QuantizeLinear axis", "quantize its weights per tensor (channel_wise: false)")

    def opset(self, plan: LoweringPlan) -> int | None:
        wide = any(p.act.num_bits != 8 or (p.weight_q is not None and p.wts_bits == 4) for p in plan.layers.values())
        return max(self.min_opset, PRECISION_OPSET) if wide else self.min_opset

    def rewrite(self, graph, plan: LoweringPlan, ctx) -> None:
        self.check_plan(plan)
        self._namer = Namer(graph)
        self._pairs: dict[tuple, gs.Tensor] = {}
        nodes = {node.name: node for node in graph.nodes}
        for layer_plan in plan.layers.values():
            node = nodes[layer_plan.name]
            node.inputs[0] = self._pair(graph, layer_plan.input_key, node.inputs[0], layer_plan.act,
                                        f"{layer_plan.name}.input")
            if layer_plan.weight_q is not None:
                self._trainable_constants(graph, nodes, node, layer_plan)

    def rewrite_tensors(self, graph, plan: LoweringPlan, ctx) -> None:
        nodes = {node.name: node for node in graph.nodes}
        for entry in plan.tensors.values():
            node = nodes[entry.node]
            node.inputs[entry.index] = self._pair(graph, entry.input_key, node.inputs[entry.index], entry.act,
                                                  entry.key)

    def _pair(self, graph, key: tuple, tensor: gs.Tensor, act, base: str) -> gs.Tensor:
        """One Q/DQ pair per (tensor, factors): readers with equal factors share it."""
        if key not in self._pairs:
            _, self._pairs[key] = qdq_pair(graph, self._namer, tensor, act, base)
        return self._pairs[key]

    def _trainable_constants(self, graph, nodes, node: gs.Node, plan: LayerPlan) -> None:
        layer = plan.layer
        weight = effective_weight(graph, layer)
        if not np.array_equal(quantize_with_scale(weight, plan.scale_w, layer, plan.wts_bits).quantized,
                              plan.weight_q.astype(np.int8)):
            weight = plan.dequantized_weight()           # codes not rint(w / scale_w): keep the learned rounding
        base = node.inputs[1].name
        float_weight = constant(self._namer, f"{base}_float", np.ascontiguousarray(weight, np.float32))
        axis = layer.channel_axis if plan.per_channel else None
        dtype = "int4" if plan.wts_bits == 4 else np.int8
        node.inputs[1] = fake_quantized_weight(graph, self._namer, float_weight, plan.scale_w, dtype, axis, base)
        slot = bias_slot(nodes, layer)
        if slot is not None and node.op == "Gemm":
            bias = np.asarray(effective_bias(graph, layer), np.float32)     # beta folded
            replace_constant_input(slot[0], slot[1], bias, self._namer, f"{plan.name}.bias")
        neutralize_gemm(node)


def _problem(layer: str, message: str, hint: str = "") -> ConfigError:
    return ConfigError([Problem("target 'qat'", f"layer '{layer}'", message, hint)])
