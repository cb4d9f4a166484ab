"""The lowering plan: per quantized layer its factors, integer weights and INT32 bias, checked once
for every target; tensor quantization entries; AMCT's record of it.

Activation quantization convention (shared by every target and the Ascend deploy reference)::

    q = clip(rint(x * m) + offset_d, -2^(b-1), 2^(b-1)-1)   with  m = float32(1 / scale_d)

computed in float32: ``x * m`` is rounded to float32 first, ties go to even (ONNX ``Round``,
AscendQuant ``round_mode=Round``). See :func:`quant_multiplier`.

Tensor quantization (SPEC 3 record keys ``"<node>:<input index>"``, SPEC 6.1: MaxPool and Add inputs)
---------------------------------------------------------------------------------------------------
The artifact ``tensor_quantize`` (``{"<node>:<input index>": ActQuantParams}``) asks for an input
tensor of a node that is *not* a quantized layer to be quantized and brought back to float
(AscendQuant + AscendAntiQuant in the deploy model; quantize + ``Mul(scale_d)`` in float ops
elsewhere). :func:`build_plan` checks it into ``LoweringPlan.tensors``.
:func:`multi_output_entries` derives AMCT's multi-output layout (a tensor read by a quantized layer
and by e.g. an Add gets the layer's factors at the Add's input, so the quantizer is shared).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import ConfigError, Problem
from ..ir.constants import constant_values
from .math import quantize_bias
from .params import ActQuantParams
from .weights import dequantize_weight, effective_bias

__all__ = [
    "QUANT_OPSET",
    "TENSOR_QUANT_ARTIFACT",
    "TENSOR_QUANT_OPS",
    "LayerPlan",
    "TensorPlan",
    "LoweringPlan",
    "build_plan",
    "with_input_factors",
    "normalized_act",
    "parse_tensor_key",
    "multi_output_entries",
    "quant_multiplier",
    "channel_shape",
    "output_node",
    "bias_slot",
    "neutralize_gemm",
]

QUANT_OPSET = 13          # Round/Clip-with-inputs (11) and per-axis Quantize/DequantizeLinear (13)
TENSOR_QUANT_ARTIFACT = "tensor_quantize"     # {"<node>:<input index>": ActQuantParams}
TENSOR_QUANT_OPS = ("MaxPool", "Add")         # SPEC 6.1: tensor (activation) quantization only
WHERE = "pass 'lower'"


def quant_multiplier(scale_d: float) -> np.float32:
    """The float32 multiplier ``1/scale_d`` every target and reference uses (AscendQuant's ``scale``)."""
    return np.float32(1.0 / float(scale_d))


@dataclass(frozen=True)
class LayerPlan:
    """Everything a target needs to lower one layer; arrays are never modified."""

    layer: Any                      # QuantLayer
    act: ActQuantParams
    scale_w: np.ndarray             # float32 [C] or [1]
    weight_q: np.ndarray | None     # integer codes in the layer's weight layout (None: AveragePool)
    bias_q: np.ndarray | None       # int32 codes, the bias's own shape
    wts_bits: int = 8

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def per_channel(self) -> bool:
        return self.scale_w.size > 1

    @property
    def deq_scale(self) -> np.ndarray:
        """float32 ``scale_d * scale_w`` (SPEC 4.1): what dequantizes the int32 accumulator."""
        return (np.float32(self.act.scale) * self.scale_w.astype(np.float32)).astype(np.float32)

    def dequantized_weight(self) -> np.ndarray:
        """``weight_q * scale_w`` broadcast on the output-channel axis (the fake-quant float weight)."""
        return dequantize_weight(self.weight_q, self.scale_w, self.layer)

    @property
    def input_key(self) -> tuple:
        """Layers with equal keys can share one quantizer (AMCT's quant fusion)."""
        act = self.act
        return self.layer.input, act.scale, act.offset, act.num_bits

    def record(self):
        from ..amct.record import LayerRecord
        return LayerRecord(scale_d=self.act.scale, offset_d=self.act.offset, scale_w=self.scale_w.tolist(),
                           offset_w=[0] * self.scale_w.size, act_type="INT8" if self.act.num_bits <= 8 else "INT16",
                           wts_type=f"INT{self.wts_bits}",
                           dst_type="INT4" if self.wts_bits == 4 else "INT8")     # AMCT: the weights' QAT type


@dataclass(frozen=True)
class TensorPlan:
    """Quantization of one input tensor of a node that stays float (record key ``"<node>:<index>"``)."""

    key: str                        # "<node>:<input index>"
    node: str
    index: int
    tensor: str                     # the tensor the node reads at ``index``
    act: ActQuantParams

    @property
    def input_key(self) -> tuple:
        """Equal to a layer's ``input_key`` when both may share one quantizer."""
        act = self.act
        return self.tensor, act.scale, act.offset, act.num_bits

    def record(self):
        from ..amct.record import LayerRecord
        return LayerRecord(scale_d=self.act.scale, offset_d=self.act.offset,
                           act_type="INT8" if self.act.num_bits <= 8 else "INT16")


@dataclass
class LoweringPlan:
    """Per quantized layer (graph order) its plan; ``unquantized``: matched layers left float, with why;
    ``tensors``: tensor quantization entries (``tensor_quantize`` artifact), in graph order."""

    layers: dict[str, LayerPlan]
    unquantized: dict[str, str] = dataclasses.field(default_factory=dict)
    tensors: dict[str, TensorPlan] = dataclasses.field(default_factory=dict)

    def record(self):
        from ..amct.record import QuantRecord
        entries = {name: plan.record() for name, plan in self.layers.items()}
        entries.update((key, plan.record()) for key, plan in self.tensors.items())
        return QuantRecord(entries)


def build_plan(graph, artifacts) -> LoweringPlan:
    """Check the factors against the layers and quantize biases to INT32; errors name the layer."""
    layer_map, act_quant = artifacts["layer_map"], artifacts["act_quant"]
    weight_quant = artifacts["weight_quant"]
    layers, unquantized = {}, {}
    for layer in layer_map.layers():
        act = act_quant.get(layer.name)
        if act is None:
            unquantized[layer.name] = "no activation factors"
            continue
        act = normalized_act(act, layer.name)
        layers[layer.name] = _layer_plan(graph, layer, act, weight_quant.get(layer.name))
    tensors = _tensor_plans(graph, artifacts.get(TENSOR_QUANT_ARTIFACT) or {}, layer_map, layers)
    return LoweringPlan(layers, unquantized, tensors)


def parse_tensor_key(key: str) -> tuple[str, int] | None:
    """``"<node>:<input index>"`` -> (node, index); None when ``key`` is not of that form."""
    node, sep, index = str(key).rpartition(":")
    if not sep or not node or not index.isdigit():
        return None
    return node, int(index)


def _tensor_plans(graph, entries, layer_map, layers: dict[str, LayerPlan]) -> dict[str, TensorPlan]:
    """Check the ``tensor_quantize`` entries against the graph; errors name the node."""
    if not entries:
        return {}
    nodes = {node.name: node for node in graph.nodes}
    bias_adds = {plan.layer.bias_add: name for name, plan in layers.items() if plan.layer.bias_add}
    found: dict[str, TensorPlan] = {}
    for key, act in entries.items():
        parsed = parse_tensor_key(key)
        if parsed is None:
            raise _problem_at(f"tensor '{key}'", "is not of the form '<node>:<input index>'")
        name, index = parsed
        node = nodes.get(name)
        if node is None:
            from ..options import suggest
            raise _problem_at(f"tensor '{key}'", f"no node named '{name}' in the model",
                              suggest(name, [n for n, v in nodes.items() if v.op in TENSOR_QUANT_OPS]))
        if name in layer_map:
            raise _problem_at(f"tensor '{key}'", f"'{name}' is a quantizable {node.op} layer; its input is "
                              "quantized with the layer's own factors", "remove the tensor_quantize entry")
        if name in bias_adds:
            raise _problem_at(f"tensor '{key}'", f"'{name}' adds the bias of the quantized layer "
                              f"'{bias_adds[name]}' (integer accumulator); it cannot be tensor-quantized")
        if node.op not in TENSOR_QUANT_OPS:
            raise _problem_at(f"tensor '{key}'", f"node '{name}' is a {node.op}; tensor quantization applies "
                              f"to {', '.join(TENSOR_QUANT_OPS)} inputs only (SPEC 6.1)")
        if index >= len(node.inputs) or not node.inputs[index].name:
            raise _problem_at(f"tensor '{key}'", f"node '{name}' has no input {index}")
        tensor = node.inputs[index]
        if constant_values(tensor) is not None:
            raise _problem_at(f"tensor '{key}'", f"input {index} of node '{name}' is a constant, not an activation")
        act = normalized_act(act, key)
        if act.num_bits != 8:
            raise _problem_at(f"tensor '{key}'", f"{act.num_bits}-bit tensor quantization is not allowed; "
                              "INT16 activations only for Conv, Gemm and ConvTranspose (SPEC 6.1)")
        found[key] = TensorPlan(key, name, index, tensor.name, act)
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    return dict(sorted(found.items(), key=lambda item: (order[item[1].node], item[1].index)))


def multi_output_entries(graph, layer_map, act_quant, op_types: Sequence[str] = TENSOR_QUANT_OPS
                         ) -> dict[str, ActQuantParams]:
    """AMCT's multi-output optimisation (SPEC 5.3) as ``tensor_quantize`` entries.

    A tensor read by a quantized layer and by nodes of ``op_types`` (not themselves layers) gets, at
    each such reader's input, the factors of the first layer reading it (graph order), so the
    deploy model quantizes the tensor once and an AscendAntiQuant feeds the float reader.
    """
    first: dict[str, ActQuantParams] = {}
    for layer in layer_map.layers():
        act = act_quant.get(layer.name)
        if act is not None:
            first.setdefault(layer.input, act)
    bias_adds = {layer.bias_add for layer in layer_map.layers() if layer.bias_add}
    entries: dict[str, ActQuantParams] = {}
    for node in graph.nodes:
        if node.op not in op_types or node.name in layer_map or node.name in bias_adds:
            continue
        for index, tensor in enumerate(node.inputs):
            if tensor.name in first:
                entries[f"{node.name}:{index}"] = first[tensor.name]
    return entries


def _problem_at(where: str, message: str, hint: str = "") -> ConfigError:
    return ConfigError([Problem(WHERE, where, message, hint)])


def _problem(layer: str, message: str, hint: str = "") -> ConfigError:
    return ConfigError([Problem(WHERE, f"layer '{layer}'", message, hint)])


def normalized_act(act: ActQuantParams, name: str) -> ActQuantParams:
    """Plain Python scalars, the scale rounded to float32 as the record stores it (so a model lowered
    from a re-read record.txt is identical), checked; errors name the layer or tensor. Calibrators may
    hand numpy arrays of shape [1]; onnxruntime only fuses Q/DQ pairs whose scale is a true scalar."""
    try:
        scale = float(np.float32(np.asarray(act.scale, np.float64).reshape(())))
        offset, bits = np.asarray(act.offset).reshape(()), act.num_bits
    except ValueError:
        raise _problem(name, f"activation factors must be scalars, got scale {act.scale!r}") from None
    if not (math.isfinite(scale) and scale > 0):
        raise _problem(name, f"scale_d must be finite and > 0, got {scale!r}")
    if offset != np.rint(offset):
        raise _problem(name, f"offset_d must be an integer, got {offset!r}")
    act = ActQuantParams(scale, int(offset), int(bits))
    if not act.qmin <= act.offset <= act.qmax:
        raise _problem(name, f"offset_d {act.offset} is outside [{act.qmin}, {act.qmax}]")
    return act


def with_input_factors(graph, plan: LayerPlan, act: ActQuantParams) -> LayerPlan:
    """``plan`` with ``act`` quantizing the layer's input instead of the record's factors, the INT32 bias
    requantized to ``scale_d * scale_w`` of the new ``scale_d`` (a QDQ model whose data movement shares
    one set of factors; onnxruntime fuses a Conv only when the bias scale is input scale x weight scale)."""
    if act == plan.act:
        return plan
    bias_q = plan.bias_q
    if bias_q is not None:
        try:
            bias_q = quantize_bias(effective_bias(graph, plan.layer), act.scale, plan.scale_w, plan.name)
        except ValueError as exc:
            raise ConfigError([Problem(WHERE, f"layer '{plan.name}'", str(exc))]) from None
    return dataclasses.replace(plan, act=act, bias_q=bias_q)


def _layer_plan(graph, layer, act: ActQuantParams, weights) -> LayerPlan:
    if layer.weight is None:
        return LayerPlan(layer, act, np.ones(1, np.float32), None, None)
    if weights is None:
        raise _problem(layer.name, "has activation factors but no weight factors",
                       "run quantize_weights (or load_record) before lower")
    scale_w = np.asarray(weights.scale, dtype=np.float32).reshape(-1)
    if scale_w.size not in (1, layer.out_channels):
        raise _problem(layer.name, f"{scale_w.size} weight scales for {layer.out_channels} output channels")
    bias = effective_bias(graph, layer)
    bias_q = None
    if bias is not None:
        try:
            bias_q = quantize_bias(bias, act.scale, scale_w, layer.name)
        except ValueError as exc:
            raise ConfigError([Problem(WHERE, f"layer '{layer.name}'", str(exc))]) from None
    return LayerPlan(layer, act, scale_w, np.asarray(weights.quantized), bias_q, int(weights.num_bits))


# -- where a layer sits in the graph ------------------------------------------------------------
def output_node(nodes: dict[str, gs.Node], layer) -> gs.Node:
    """The node whose output carries the layer's int32 accumulator: the bias Add after a MatMul."""
    return nodes[layer.bias_add] if layer.bias_add else nodes[layer.name]


def bias_slot(nodes: dict[str, gs.Node], layer) -> tuple[gs.Node, int] | None:
    """(node, input index) of the layer's bias constant, or None."""
    if layer.bias is None:
        return None
    node = output_node(nodes, layer)
    for index, tensor in enumerate(node.inputs):
        if tensor.name == layer.bias:
            return node, index
    return None


def channel_shape(plan: LayerPlan, values: np.ndarray) -> np.ndarray:
    """Per-channel factors as ``[1, C, 1, ...]`` against the layer's output (rank from the weight);
    per-tensor ones as ``[1]`` (broadcasts against any output rank)."""
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if values.size == 1 and not plan.per_channel:
        return values.reshape(1)
    rank = plan.weight_q.ndim if plan.layer.op_type in ("Conv", "ConvTranspose") else 2
    return values.reshape([1, -1] + [1] * (rank - 2))


def neutralize_gemm(node: gs.Node) -> None:
    """The plan folded Gemm's alpha/beta into weight and bias: the lowered Gemm must not apply them again."""
    if node.op != "Gemm":
        return
    for key in ("alpha", "beta"):
        if key in node.attrs and float(node.attrs[key]) != 1.0:
            node.attrs[key] = 1.0
