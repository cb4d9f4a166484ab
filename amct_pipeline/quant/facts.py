"""Graph-level quantization facts: which tensors a QDQ layout quantizes beyond the layer inputs
(block outputs), how factors propagate through value-preserving ops, and the bounds of Relu/Clip.

Calibration observes exactly :func:`extra_tensors` (``calibrate{block_outputs}``), and the ``qdq``
target lays its quantizers out with the same functions, so both always agree on the tensor set.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.constants import constant_values
from .params import ActQuantParams
from .plan import LoweringPlan, output_node

__all__ = ["VALUE_PRESERVING_OPS", "FOLDABLE_ACTIVATIONS", "POOLING_OPS", "record_factors", "propagate_factors",
           "extra_tensors", "activation_bounds"]

VALUE_PRESERVING_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
FOLDABLE_ACTIVATIONS = ("Relu", "Clip")       # monotone clips: movable onto the integer codes
POOLING_OPS = ("GlobalAveragePool",)


def record_factors(plan: LoweringPlan) -> dict[str, ActQuantParams]:
    """Layer inputs with the record's factors (a tensor read by several layers: the first one's)."""
    factors: dict[str, ActQuantParams] = {}
    for layer_plan in plan.layers.values():
        factors.setdefault(layer_plan.layer.input, layer_plan.act)
    return factors


def propagate_factors(graph, factors: dict[str, ActQuantParams]) -> None:
    """Give the input of a value-preserving op the factors of its output, when the op is its only reader.

    Quantizing before a MaxPool/Reshape/... with the output's factors gives the same result as after it
    (they commute with a monotone per-tensor quantizer), and lets the producer fuse with the quantizer.
    """
    tensors = graph.tensors()
    pending = list(factors)
    while pending:
        name = pending.pop(0)
        producer = graph.producer(tensors[name])
        if producer is None or producer.op not in VALUE_PRESERVING_OPS or _extra_outputs_used(graph, producer):
            continue
        source = producer.inputs[0]
        if (isinstance(source, gs.Constant) or source.name in factors or len(source.outputs) != 1
                or graph.is_graph_output(source) or graph.producer(source) is None):
            continue
        factors[source.name] = factors[name]
        pending.append(source.name)


def _extra_outputs_used(graph, node: gs.Node) -> bool:
    return any(t.outputs or graph.is_graph_output(t) for t in node.outputs[1:])


def extra_tensors(graph, layers, factors) -> list[str]:
    """Tensors (graph order) whose quantization lets onnxruntime fuse more, lacking factors so far.

    ``layers``: the quantized layers, name -> QuantLayer (a LayerMap) or LayerPlan. ``factors``: tensor
    names that already have factors. A calibration pass can observe exactly these and publish them
    as ``tensor_quant``.
    """
    have = set(factors)
    wanted: list[str] = []
    nodes = {node.name: node for node in graph.nodes}
    for node in graph.nodes:
        point = None
        if node.name in layers:
            layer = getattr(layers[node.name], "layer", layers[node.name])    # LayerPlan or QuantLayer
            point = _activation_point(graph, output_node(nodes, layer).outputs[0])
        elif node.op == "Add" and len(node.inputs) == 2 and all(
                isinstance(t, gs.Variable) and t.name in have for t in node.inputs):
            point = _activation_point(graph, node.outputs[0])
        elif node.op in POOLING_OPS and node.inputs[0].name in have:
            point = _activation_point(graph, node.outputs[0])
        if point is not None and point.name not in have:
            wanted.append(point.name)
            have.add(point.name)
    return wanted


def _activation_point(graph, tensor: gs.Tensor) -> gs.Tensor | None:
    """Follow a single-reader Relu/Clip chain; None when the result is a graph output or unread."""
    while (len(tensor.outputs) == 1 and tensor.outputs[0].op in FOLDABLE_ACTIVATIONS
           and not graph.is_graph_output(tensor)):
        tensor = tensor.outputs[0].outputs[0]
    if graph.is_graph_output(tensor) or not tensor.outputs:
        return None
    return tensor


def activation_bounds(graph, node: gs.Node) -> tuple[float | None, float | None]:
    """(min, max) of a Relu/Clip; (None, None) when they are not constants."""
    if node.op == "Relu":
        return 0.0, np.inf
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        if index >= len(node.inputs) or not node.inputs[index].name:
            bounds.append(float(node.attrs.get("min" if index == 1 else "max", default)))
            continue
        value = constant_values(node.inputs[index])
        if value is None:
            return None, None
        bounds.append(float(np.asarray(value).reshape(())))
    return bounds[0], bounds[1]
