"""Conv layers in the graph, for the decomposition passes: a Conv node's facts as a ``ConvLayer``
(explicit pads, input size from shape inference), its weight and bias, and the surgery that puts a
chain of child convs where it was.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...ir.constants import constant_shape, constant_values
from .layer import ChildSpec, ConvLayer

__all__ = ["spatial_shapes", "weight_of", "bias_of", "conv_layer", "replace_conv"]


def spatial_shapes(graph) -> dict[str, tuple]:
    """Tensor name -> shape from ONNX shape inference (empty when inference fails)."""
    try:
        model = onnx.shape_inference.infer_shapes(graph.to_proto())
    except Exception:          # inference is best effort: without sizes FLOPs are simply unknown
        return {}
    shapes = {}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return shapes


def weight_of(node: gs.Node) -> np.ndarray:
    return np.asarray(constant_values(node.inputs[1]))


def bias_of(node: gs.Node) -> Optional[np.ndarray]:
    if len(node.inputs) > 2 and node.inputs[2].name:
        return np.asarray(constant_values(node.inputs[2]))
    return None


def conv_layer(node: gs.Node, shapes: dict[str, tuple]) -> ConvLayer | str:
    """The facts of a Conv node, or why it cannot be decomposed at all."""
    if len(node.inputs) < 2 or constant_shape(node.inputs[1]) is None:
        return "weight is not a constant"
    wshape = constant_shape(node.inputs[1])
    if len(wshape) != 4:
        return f"{len(wshape) - 2}-D conv: only 2-D convs are decomposed"
    if len(node.inputs) > 2 and node.inputs[2].name and constant_shape(node.inputs[2]) is None:
        return "bias is not a constant"
    dtype = node.inputs[1].dtype if isinstance(node.inputs[1], gs.Constant) else np.float32
    if np.dtype(dtype).kind != "f":
        return f"weight is {np.dtype(dtype)}, not floating point"
    attrs = node.attrs
    group = int(attrs.get("group", 1))
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", wshape[2:]))
    stride = tuple(int(s) for s in attrs.get("strides", (1, 1)))
    dilation = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
    in_shape = shapes.get(node.inputs[0].name) or tuple(node.inputs[0].shape or ())
    in_hw = tuple(in_shape[2:4]) if len(in_shape) == 4 and all(isinstance(d, int) and d for d in in_shape[2:4]) \
        else None
    pads = _pads(attrs, kernel, stride, dilation, in_hw)
    if isinstance(pads, str):
        return pads
    return ConvLayer(node.name, wshape[1] * group, wshape[0], kernel, stride, pads, dilation, group,
                     len(node.inputs) > 2 and bool(node.inputs[2].name), in_hw, np.dtype(dtype).name)


def _pads(attrs, kernel, stride, dilation, in_hw) -> tuple[int, int, int, int] | str:
    """Explicit ONNX pads (auto_pad resolved: the children need their own explicit padding)."""
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        pads = [int(p) for p in attrs.get("pads", (0, 0, 0, 0))]
        return tuple(pads) if len(pads) == 4 else (0, 0, 0, 0)
    if auto == "VALID":
        return (0, 0, 0, 0)
    begin, end = [], []
    for axis in range(2):
        span = (kernel[axis] - 1) * dilation[axis] + 1
        if in_hw is None and stride[axis] != 1:
            return f"auto_pad {auto} with stride {stride[axis]} and an unknown input size"
        size = in_hw[axis] if in_hw is not None else 1
        out = -(-size // stride[axis])
        total = max((out - 1) * stride[axis] + span - size, 0) if in_hw is not None else span - 1
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return (begin[0], begin[1], end[0], end[1])


def replace_conv(graph, node: gs.Node, children: list[ChildSpec], weights: list[np.ndarray],
                 bias: Optional[np.ndarray], names: Optional[list[str]] = None) -> list[gs.Node]:
    """Put the chain of child convs where ``node`` was; the last child takes over its output tensor."""
    x, y = node.inputs[0], node.outputs[0]
    dtype = np.dtype(node.inputs[1].dtype) if isinstance(node.inputs[1], gs.Constant) else np.dtype(np.float32)
    names = names or [graph.unique_name(f"{node.name}.{i}") for i in range(len(children))]
    position = graph.nodes.index(node)
    node.inputs.clear()
    node.outputs.clear()
    new, current = [], x
    for index, (spec, weight, name) in enumerate(zip(children, weights, names)):
        last = index == len(children) - 1
        inputs = [current, gs.Constant(f"{name}.weight", np.ascontiguousarray(weight, dtype=dtype))]
        if spec.has_bias:
            inputs.append(gs.Constant(f"{name}.bias", np.ascontiguousarray(bias, dtype=dtype)))
        out = y if last else gs.Variable(f"{name}.out", dtype=x.dtype)
        attrs = {"kernel_shape": list(spec.kernel), "strides": list(spec.stride), "pads": list(spec.pads),
                 "dilations": list(spec.dilation), "group": spec.group}
        new.append(gs.Node("Conv", name=name, attrs=attrs, inputs=inputs, outputs=[out]))
        current = out
    graph.gs.nodes[position:position + 1] = new
    return new
