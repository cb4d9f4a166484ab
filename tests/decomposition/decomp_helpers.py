"""Tiny conv models and independent checks (FLOPs from shape inference, structure signatures)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["conv_chain", "conv_flops", "structure", "feeds", "sqnr"]


def _pair(value: Any) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value, value]


def conv_chain(layers: Sequence[dict[str, Any]], *, cin: int = 8, hw: int = 12, batch: Any = 2,
               seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    """x -> conv0 [-> Relu] -> conv1 ... -> y. Layer keys: cout, k, stride, pads, auto_pad, group,
    dilation, bias (default True), relu (default True), weight (explicit array)."""
    rng = np.random.default_rng(seed)
    nodes, inits, current, channels = [], [], "x", cin
    for i, spec in enumerate(layers):
        kh, kw = _pair(spec.get("k", 3))
        group = spec.get("group", 1)
        weight = spec.get("weight")
        if weight is None:
            weight = rng.normal(0, 1 / np.sqrt(channels // group * kh * kw), (spec["cout"], channels // group, kh, kw))
        inits.append(numpy_helper.from_array(np.asarray(weight, np.float32), f"conv{i}.weight"))
        inputs = [current, f"conv{i}.weight"]
        if spec.get("bias", True):
            inits.append(numpy_helper.from_array(rng.normal(0, 0.1, spec["cout"]).astype(np.float32), f"conv{i}.bias"))
            inputs.append(f"conv{i}.bias")
        attrs = {"kernel_shape": [kh, kw], "strides": _pair(spec.get("stride", 1)), "group": group,
                 "dilations": _pair(spec.get("dilation", 1))}
        if "auto_pad" in spec:
            attrs["auto_pad"] = spec["auto_pad"]
        else:
            attrs["pads"] = list(spec.get("pads", [kh // 2, kw // 2, kh // 2, kw // 2]))
        out = f"conv{i}_out"
        nodes.append(helper.make_node("Conv", inputs, [out], name=f"conv{i}", **attrs))
        current, channels = out, spec["cout"]
        if spec.get("relu", True) and i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"], name=f"relu{i}"))
            current = f"relu{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"], name="out"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, hw, hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "chain", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def feeds(model: onnx.ModelProto, count: int = 2, seed: int = 1, batches: int = 1) -> list[dict[str, np.ndarray]]:
    x = model.graph.input[0]
    shape = [d.dim_value or count for d in x.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return [{x.name: rng.normal(size=shape).astype(np.float32)} for _ in range(batches)]


def conv_geometry(model: onnx.ModelProto):
    """(node, cout, cin/group, kh, kw, output h, output w) of every Conv, from onnx shape inference
    (independent of the passes' own counts)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv":
            cout, cin_g, kh, kw = inits[node.input[1]]
            _, _, h, w = shapes[node.output[0]]
            yield node, cout, cin_g, kh, kw, h, w


def conv_flops(model: onnx.ModelProto, names: Sequence[str] | None = None) -> dict[str, int]:
    """SPEC 8.2 FLOPs of every Conv (or those in ``names``)."""
    out = {}
    for node, cout, cin_g, kh, kw, h, w in conv_geometry(model):
        if names is None or node.name in names:
            bias = int(len(node.input) > 2 and bool(node.input[2]))
            out[node.name] = (2 * cin_g * kh * kw - 1 + bias) * h * w * cout
    return out


def structure(model: onnx.ModelProto) -> list[tuple]:
    """What must match when a saved structure is re-applied: nodes, attributes, tensor names and shapes."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    sig = []
    for node in model.graph.node:
        attrs = tuple(sorted((a.name, tuple(helper.get_attribute_value(a)) if a.type == a.INTS
                              else helper.get_attribute_value(a)) for a in node.attribute))
        sig.append((node.op_type, node.name, tuple(node.input), tuple(node.output), attrs,
                    tuple(inits.get(i) for i in node.input)))
    return sig


def sqnr(reference: Sequence[np.ndarray], approx: Sequence[np.ndarray]) -> float:
    signal = sum(float(np.sum(np.square(r, dtype=np.float64))) for r in reference)
    noise = sum(float(np.sum(np.square(np.asarray(r, np.float64) - a))) for r, a in zip(reference, approx))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)
