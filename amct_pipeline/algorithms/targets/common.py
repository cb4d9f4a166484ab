"""What every lowering target shares: the lowering plan (factors, integer weights and biases per layer)
and the graph surgery helpers that turn a copy of the float graph into a quantized model.

A target subclasses :class:`PlanTarget` and implements ``rewrite(graph, plan, ctx)``; ``lower`` makes
sure the opset is high enough, calls it, cleans the graph up and exports it. The graph handed to a
target is always a copy (``copy_graph``) whose weights are shared with the float graph, so helpers
replace constants instead of editing arrays in place (copy on write).

Activation quantization convention (shared with the deploy reference of the ``ascend`` target)::

    q = clip(rint(x * m) + offset_d, -2^(b-1), 2^(b-1)-1)   with  m = float32(1 / scale_d)

computed in float32: ``x * m`` is rounded to float32 first, ties go to even (ONNX ``Round``,
AscendQuant ``round_mode=Round``). See :func:`quant_multiplier`.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...errors import ConfigError, Problem
from ..base import ActQuantParams, LoweringTarget

__all__ = [
    "QUANT_OPSET",
    "LayerPlan",
    "LoweringPlan",
    "build_plan",
    "lowering_plan",
    "PlanTarget",
    "Namer",
    "copy_graph",
    "ensure_opset",
    "quant_multiplier",
    "add_node",
    "constant",
    "output_node",
    "detach_output",
    "reroute",
    "replace_constant_input",
    "bias_slot",
    "channel_shape",
    "neutralize_gemm",
    "normalized_act",
]

QUANT_OPSET = 13          # Round/Clip-with-inputs (11) and per-axis Quantize/DequantizeLinear (13)
PLAN_ARTIFACT = "lowering_plan"
WHERE = "pass 'lower'"


def quant_multiplier(scale_d: float) -> np.float32:
    """The float32 multiplier ``1/scale_d`` every target and reference uses (AscendQuant's ``scale``)."""
    return np.float32(1.0 / float(scale_d))


# -- the plan ------------------------------------------------------------------------------------
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
        from ..weights import deconv_channel_view, deconv_from_channel_view
        layer, codes = self.layer, self.weight_q.astype(np.float32)
        if not self.per_channel:
            return codes * self.scale_w[0]
        group = layer.group if layer.op_type == "ConvTranspose" else 1
        view = deconv_channel_view(codes, group)
        axis = layer.channel_axis
        shape = [1] * view.ndim
        shape[axis] = -1
        return deconv_from_channel_view(view * self.scale_w.reshape(shape), group)

    @property
    def input_key(self) -> tuple:
        """Layers with equal keys can share one quantizer (AMCT's quant fusion)."""
        act = self.act
        return self.layer.input, act.scale, act.offset, act.num_bits

    def record(self):
        from ...amct.record import LayerRecord
        return LayerRecord(scale_d=self.act.scale, offset_d=self.act.offset, scale_w=self.scale_w.tolist(),
                           offset_w=[0] * self.scale_w.size, act_type="INT8" if self.act.num_bits <= 8 else "INT16",
                           wts_type=f"INT{self.wts_bits}")


@dataclass
class LoweringPlan:
    """Per quantized layer (graph order) its plan; ``unquantized``: matched layers left float, with why."""

    layers: dict[str, LayerPlan]
    unquantized: dict[str, str] = dataclasses.field(default_factory=dict)

    def record(self):
        from ...amct.record import QuantRecord
        return QuantRecord({name: plan.record() for name, plan in self.layers.items()})


def lowering_plan(ctx, graph) -> LoweringPlan:
    """The plan the ``lower`` pass built for this run (built here when a target runs on its own)."""
    plan = ctx.artifacts.get(PLAN_ARTIFACT)
    if plan is None:
        plan = ctx.artifacts[PLAN_ARTIFACT] = build_plan(graph, ctx.artifacts)
    return plan


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
    return LoweringPlan(layers, unquantized)


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


def _layer_plan(graph, layer, act: ActQuantParams, weights) -> LayerPlan:
    from ..weights import effective_bias
    from ...quant.math import quantize_bias
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


# -- the target base -----------------------------------------------------------------------------
class PlanTarget(LoweringTarget):
    """A lowering target driven by the plan. Subclasses set ``suffix`` and implement ``rewrite``.

    ``suffix``: the file is ``<prefix>_<suffix>.onnx``. ``min_opset``: the default-domain opset the
    output needs (the graph is upgraded with onnx.version_converter when lower; None = never).
    """

    suffix: ClassVar[str]
    min_opset: ClassVar[int | None] = QUANT_OPSET

    def lower(self, graph, ctx) -> onnx.ModelProto:
        plan = lowering_plan(ctx, graph)
        if self.min_opset is not None:
            ensure_opset(graph, self.min_opset, target=self.name)
        self.rewrite(graph, plan, ctx)
        graph.finalize()
        return graph.to_proto()

    @abc.abstractmethod
    def rewrite(self, graph, plan: LoweringPlan, ctx) -> None:
        """Edit ``graph`` (a copy of the float graph) in place."""


# -- graph helpers ------------------------------------------------------------------------------
def copy_graph(graph):
    """A Graph sharing no nodes or tensors with ``graph`` (constant arrays are shared: copy on write)."""
    from ...ir.graph import Graph
    meta = dataclasses.replace(graph.meta, metadata=dict(graph.meta.metadata), functions=list(graph.meta.functions))
    return Graph(graph.gs.copy(), meta, graph.name)


def ensure_opset(graph, version: int, *, target: str = "") -> bool:
    """Upgrade the default-domain opset to ``version`` in place (True when it changed anything).

    Layer (node) names survive the conversion, so the plan still applies.
    """
    if graph.opset >= version:
        return False
    from onnx import version_converter
    from ...ir.graph import Graph
    old = graph.opset
    try:
        converted = version_converter.convert_version(graph.to_proto(), version)
    except Exception as exc:  # the converter raises bare RuntimeErrors / ValueErrors
        raise ConfigError([Problem(WHERE, f"target '{target}'", f"cannot upgrade the model from opset {old} "
                                   f"to {version}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}",
                                   "upgrade the model to opset 13 or later before quantizing")]) from None
    graph.gs = Graph.from_proto(converted, name=graph.name).gs
    graph.meta.ir_version = max(graph.meta.ir_version, 7)     # IR 7 introduced opset 13
    return True


class Namer:
    """Fresh tensor/node names: ``base``, else ``base_1``, ``base_2``... (deterministic)."""

    def __init__(self, graph) -> None:
        self.taken = set(graph.tensors()) | set(graph.node_names())

    def __call__(self, base: str) -> str:
        name, index = base, 0
        while name in self.taken:
            index += 1
            name = f"{base}_{index}"
        self.taken.add(name)
        return name


def constant(namer: Namer, name: str, values) -> gs.Constant:
    return gs.Constant(namer(name), _contiguous(values))


def _contiguous(values) -> np.ndarray:
    # np.ascontiguousarray would turn a 0-d scale into shape [1], which onnxruntime's QDQ fusions reject
    return np.require(np.asarray(values), requirements="C")


def add_node(graph, namer: Namer, op: str, name: str, inputs: Sequence[gs.Tensor],
             outputs: Sequence[gs.Tensor | str] | None = None, **attrs: Any) -> gs.Node:
    """Append a node; string outputs become new Variables named after them (``<name>:0`` by default)."""
    outs = [o if isinstance(o, gs.Tensor) else gs.Variable(namer(o)) for o in (outputs or [f"{name}:0"])]
    node = gs.Node(op, namer(name), attrs=attrs, inputs=list(inputs), outputs=outs)
    graph.gs.nodes.append(node)
    return node


def output_node(nodes: dict[str, gs.Node], layer) -> gs.Node:
    """The node whose output carries the layer's int32 accumulator: the bias Add after a MatMul."""
    return nodes[layer.bias_add] if layer.bias_add else nodes[layer.name]


def detach_output(node: gs.Node, namer: Namer, name: str) -> tuple[gs.Variable, gs.Tensor]:
    """Give ``node`` a fresh output; return (fresh, original). The original keeps its name and
    consumers (and graph-output role) and must be produced by whatever the caller inserts."""
    original = node.outputs[0]
    fresh = gs.Variable(namer(name), dtype=original.dtype)
    node.outputs[0] = fresh
    return fresh, original


def reroute(tensor: gs.Tensor, new: gs.Tensor, consumers: Iterable[gs.Node] | None = None) -> None:
    """Make ``consumers`` (default: all) read ``new`` wherever they read ``tensor``."""
    for node in list(tensor.outputs if consumers is None else consumers):
        for index, current in enumerate(node.inputs):
            if current is tensor:
                node.inputs[index] = new


def replace_constant_input(node: gs.Node, index: int, values: np.ndarray, namer: Namer, name: str) -> gs.Constant:
    """Feed ``node.inputs[index]`` from new values, never editing the shared array.

    A plain constant read only by this node keeps its name (AMCT replaces weights under their own
    name); a constant reached through view ops or a Constant node gets a new one, ``name``.
    """
    current = node.inputs[index]
    values = _contiguous(values)
    if isinstance(current, gs.Constant) and len(current.outputs) == 1 and tuple(current.shape) == values.shape:
        current.values = values          # this Constant object belongs to the copy
        return current
    fresh = gs.Constant(namer(name), values)
    node.inputs[index] = fresh
    return fresh


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
