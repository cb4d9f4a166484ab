"""Graph editing tools every pass and target uses: fresh names, node insertion, rerouting, constant
replacement, copies and opset upgrades.

Edits never change an array in place: copies (:func:`copy_graph`) share their constant arrays with
the graph they came from, so a new value always goes into a new or replaced constant (copy on write).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import ConfigError, Problem
from .graph import Graph, fresh_name

__all__ = [
    "Namer",
    "constant",
    "add_node",
    "detach_output",
    "reroute",
    "replace_constant_input",
    "copy_graph",
    "ensure_opset",
    "pack_int4",
    "int4_constant",
    "int4_values",
]


class Namer:
    """Fresh tensor/node names for one round of edits: remembers what it handed out."""

    def __init__(self, graph) -> None:
        self.taken = set(graph.tensors()) | set(graph.node_names())

    def __call__(self, base: str) -> str:
        name = fresh_name(base, self.taken)
        self.taken.add(name)
        return name


def contiguous(values) -> np.ndarray:
    # np.ascontiguousarray would turn a 0-d scale into shape [1], which onnxruntime's QDQ fusions reject
    return np.require(np.asarray(values), requirements="C")


def constant(namer: Namer, name: str, values) -> gs.Constant:
    return gs.Constant(namer(name), contiguous(values))


def pack_int4(codes) -> bytes:
    """ONNX's INT4 layout: two codes per byte in row-major order, the first in the low nibble, an odd
    count padded with a zero nibble. Codes must lie in [-8, 7]."""
    flat = np.asarray(codes).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"INT4 codes must lie in [-8, 7], got [{int(flat.min())}, {int(flat.max())}]")
    nibbles = (flat & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def int4_constant(namer: Namer, name: str, codes) -> gs.Constant:
    """A packed INT4 initializer holding ``codes`` (an integer array in [-8, 7]), half the bytes of INT8.

    onnx-graphsurgeon would write one byte per code, so the constant wraps the finished TensorProto."""
    name = namer(name)
    return gs.Constant(name, int4_values(name, codes))


def int4_values(name: str, codes):
    """Values for a ``gs.Constant`` named ``name`` that export as a packed INT4 initializer."""
    import onnx
    from onnx_graphsurgeon.ir.tensor import LazyValues
    codes = np.asarray(codes)
    tensor = onnx.TensorProto()
    tensor.name, tensor.data_type = name, onnx.TensorProto.INT4
    tensor.dims.extend(codes.shape)
    tensor.raw_data = pack_int4(codes)
    return LazyValues(tensor)


def add_node(graph, namer: Namer, op: str, name: str, inputs: Sequence[gs.Tensor],
             outputs: Sequence[gs.Tensor | str] | None = None, **attrs: Any) -> gs.Node:
    """Append a node; string outputs become new Variables named after them (``<name>:0`` by default)."""
    outs = [o if isinstance(o, gs.Tensor) else gs.Variable(namer(o)) for o in (outputs or [f"{name}:0"])]
    node = gs.Node(op, namer(name), attrs=attrs, inputs=list(inputs), outputs=outs)
    graph.gs.nodes.append(node)
    return node


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
    values = contiguous(values)
    if isinstance(current, gs.Constant) and len(current.outputs) == 1 and tuple(current.shape) == values.shape:
        current.values = values          # this Constant object belongs to the copy
        return current
    fresh = gs.Constant(namer(name), values)
    node.inputs[index] = fresh
    return fresh


def copy_graph(graph):
    """A Graph sharing no nodes or tensors with ``graph`` (constant arrays are shared: copy on write)."""
    meta = dataclasses.replace(graph.meta, metadata=dict(graph.meta.metadata), functions=list(graph.meta.functions))
    return Graph(graph.gs.copy(), meta, graph.name)


def ensure_opset(graph, version: int, *, where: str, path: str, hint: str = "") -> bool:
    """Upgrade the default-domain opset to ``version`` in place (True when it changed anything).

    Node names survive the conversion, so layer names still apply. A failure is a ConfigError at
    ``where`` / ``path``.
    """
    if graph.opset >= version:
        return False
    from onnx import version_converter
    old = graph.opset
    try:
        converted = version_converter.convert_version(graph.to_proto(), version)
    except Exception as exc:  # the converter raises bare RuntimeErrors / ValueErrors
        text = str(exc).strip()
        raise ConfigError([Problem(where, path, f"cannot upgrade the model from opset {old} to {version}: "
                                   f"{text.splitlines()[0] if text else exc}", hint)]) from None
    graph.gs = Graph.from_proto(converted, name=graph.name).gs
    graph.meta.ir_version = max(graph.meta.ir_version, 7)     # IR 7 introduced opset 13
    return True
