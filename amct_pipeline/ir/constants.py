"""The one way to read constants: initializers, Constant nodes and constants seen through view ops.

Lazy values (initializers not converted yet, external data) are loaded without being cached on the
tensor: ``tensor.values`` would cache them, and a constant that a pass replaces sits in a reference
cycle (gs tensor <-> its synchronized lists), so a cached array would outlive the edit until the
cyclic GC ran, doubling peak memory on large models.

A weight may reach its layer through view ops with constant parameters (mnist-8's
``Reshape(Parameter193)``): :func:`constant_chain` finds the root and the view nodes, and
:func:`chain_values` evaluates them in numpy.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

__all__ = [
    "VIEW_OPS",
    "constant_node",
    "is_constant",
    "constant_values",
    "constant_shape",
    "constant_dtype",
    "constant_chain",
    "apply_view",
    "chain_values",
]

VIEW_OPS = ("Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
_SCALAR_ATTRS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def constant_node(tensor: gs.Tensor) -> gs.Node | None:
    """The Constant node producing ``tensor`` when its value is numeric, else None."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "Constant" and (
            "value" in producer.attrs or any(k in producer.attrs for k in _SCALAR_ATTRS)):
        return producer
    return None


def is_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) or constant_node(tensor) is not None


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """Values of an initializer or a Constant node's output; None when ``tensor`` is not constant."""
    if isinstance(tensor, gs.Constant):
        values = tensor._values
        return values.load() if isinstance(values, LazyValues) else values
    node = constant_node(tensor)
    if node is None:
        return None
    if "value" in node.attrs:
        return constant_values(node.attrs["value"])
    key = next(k for k in _SCALAR_ATTRS if k in node.attrs)
    return np.asarray(node.attrs[key], dtype=_SCALAR_ATTRS[key])


def constant_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """Shape without loading the data (external data stays on disk); None when not constant."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    node = constant_node(tensor)
    if node is None:
        return None
    if "value" in node.attrs:
        return tuple(node.attrs["value"].shape)
    return np.shape(next(node.attrs[k] for k in _SCALAR_ATTRS if k in node.attrs))


def constant_dtype(tensor: gs.Tensor) -> np.dtype | None:
    if isinstance(tensor, gs.Constant):
        return np.dtype(tensor.dtype)
    node = constant_node(tensor)
    if node is None:
        return None
    if "value" in node.attrs:
        return np.dtype(node.attrs["value"].dtype)
    return np.dtype(next(t for k, t in _SCALAR_ATTRS.items() if k in node.attrs))


def constant_chain(tensor: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """(constant root, view nodes from the root towards ``tensor``), or None when not constant."""
    via: list[gs.Node] = []
    current = tensor
    while not is_constant(current):
        producer = current.inputs[0] if current.inputs else None
        if producer is None or producer.op not in VIEW_OPS:
            return None
        if not all(is_constant(t) for t in producer.inputs[1:] if t.name):
            return None
        via.append(producer)
        current = producer.inputs[0]
    return current, via[::-1]


def apply_view(node: gs.Node, x: np.ndarray) -> np.ndarray:
    """numpy semantics of the view ops a constant may pass through."""
    args = [constant_values(t) if t.name else None for t in node.inputs[1:]]
    if node.op == "Identity":
        return x
    if node.op == "Transpose":
        return np.transpose(x, node.attrs.get("perm"))
    if node.op == "Reshape":
        shape = [int(d) for d in args[0]]
        if not int(node.attrs.get("allowzero", 0)):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1)) % (x.ndim or 1) if x.ndim else 0
        return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    axes = node.attrs.get("axes", args[0] if args else None)
    if node.op == "Squeeze":
        return np.squeeze(x, tuple(int(a) for a in axes)) if axes is not None else np.squeeze(x)
    out_rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(int(a) % out_rank for a in axes)))


def chain_values(tensor: gs.Tensor) -> np.ndarray | None:
    """The values ``tensor`` carries (view ops applied); None when it is not constant."""
    chain = constant_chain(tensor)
    if chain is None:
        return None
    root, via = chain
    values = constant_values(root)
    for node in via:
        values = apply_view(node, values)
    return values
