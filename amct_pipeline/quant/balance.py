"""DMQ balancing (SPEC 4.7, AMCT's quantize_preprocess): move activation outliers into the weights.

A per-tensor activation quantizer gives every input channel the step of the widest one; a few
outlier channels (MobileNetV2's late residual tensors) leave the others a handful of levels. Per
input channel ``j`` of a layer: ``f_j = max|X_j|^a / max|W_j|^(1-a)`` (``a`` = migration strength),
the weights' input channel ``j`` is multiplied by ``f_j`` and a ``Mul(1/f)`` before the layer divides
the activation by it, so the float function is unchanged while the activation's channels get
closer ranges (and the weights, quantized per output channel, absorb the difference).

``balance_factors`` is the formula with AMCT's corner cases; ``input_channel_max`` / ``weight_channel_max``
the statistics; ``apply_balance`` edits a graph and its layer map (used by ``dmq_balance`` and by
``load_record`` for a record carrying ``tensor_balance_factor``).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from .layers import LayerMap, QuantLayer

__all__ = ["BALANCED_OP_TYPES", "balance_problem", "balance_factors", "input_channel_max", "weight_channel_max",
           "in_channels", "scaled_weight", "apply_balance", "record_factors", "FACTOR_RANGE"]

BALANCED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_EPS = float(np.finfo(np.float32).eps)
FACTOR_RANGE = (_EPS, 1.0 / _EPS)   # what the record accepts (record.validate_record)


def balance_problem(layer: QuantLayer) -> str | None:
    """Why the layer cannot be balanced, or None."""
    if layer.op_type not in BALANCED_OP_TYPES:
        return f"{layer.op_type} layers have no weights to balance"
    if layer.weight_via:
        return "its weight is reached through view ops (balancing edits the weight constant itself)"
    if layer.op_type == "Gemm" and layer.transB not in (0, 1):
        return "unsupported Gemm layout"
    return None


def balance_factors(act_max: np.ndarray, wts_max: np.ndarray, strength: float) -> np.ndarray:
    """SPEC 4.7: ``f = max|X|^a / max|W|^(1-a)`` per channel, AMCT's rules for all-zero channels."""
    a = np.asarray(act_max, np.float64)
    w = np.asarray(wts_max, np.float64)
    f = np.ones_like(a)
    normal = (a > 0) & (w > 0)
    f[normal] = a[normal] ** strength / w[normal] ** (1.0 - strength)
    if normal.any():
        dead_w = (w == 0) & (a > 0)         # the weight is zero: give X the range the others end up with
        f[dead_w] = a[dead_w] / np.max(a[normal] / f[normal])
        dead_x = (a == 0) & (w > 0)         # the activation is zero: give W the range the others end up with
        f[dead_x] = np.max(w[normal] * f[normal]) / w[dead_x]
    return np.clip(f, *FACTOR_RANGE).astype(np.float32)


def in_channels(layer: QuantLayer, weight_shape: tuple[int, ...]) -> int:
    """The number of input channels the layer reads (balance factors have this length)."""
    if layer.op_type == "Conv":
        return int(weight_shape[1]) * layer.group
    if layer.op_type == "Gemm" and layer.transB:
        return int(weight_shape[1])
    return int(weight_shape[0])


def input_channel_max(layer: QuantLayer, x: np.ndarray) -> np.ndarray:
    """``max |X_j|`` over one batch: channels on axis 1 for convs, on the last axis for Gemm/MatMul."""
    axis = 1 if layer.op_type in ("Conv", "ConvTranspose") else x.ndim - 1
    return np.abs(np.moveaxis(np.asarray(x), axis, 0).reshape(x.shape[axis], -1)).max(axis=1)


def _factor_shape(layer: QuantLayer, weight: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """(the weight viewed so that input channels line up with a broadcast factor, that factor's shape)."""
    if layer.op_type == "Conv":          # [Cout, Cin/g, k...] -> [g, Cout/g, Cin/g, k*]
        g = layer.group
        view = weight.reshape(g, weight.shape[0] // g, weight.shape[1], -1)
        return view, (g, 1, weight.shape[1], 1)
    if layer.op_type == "ConvTranspose":  # [Cin, Cout/g, k...]
        return weight, (-1,) + (1,) * (weight.ndim - 1)
    if layer.op_type == "Gemm" and layer.transB:   # [N, K]
        return weight, (1, -1)
    return weight, (-1, 1)               # Gemm / MatMul [K, N]


def weight_channel_max(layer: QuantLayer, weight: np.ndarray) -> np.ndarray:
    """``max |W_j|`` per input channel ``j`` (grouped convs: each channel's own group of filters)."""
    view, shape = _factor_shape(layer, np.abs(np.asarray(weight, np.float64)))
    channels = in_channels(layer, weight.shape)
    axes = tuple(i for i, n in enumerate(shape) if n == 1)
    return view.max(axis=axes).reshape(channels)


def scaled_weight(layer: QuantLayer, weight: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """``W[:, j] * f_j`` in the weight's own layout and dtype."""
    view, shape = _factor_shape(layer, np.asarray(weight, np.float64))
    return (view * np.asarray(factors, np.float64).reshape(shape)).reshape(weight.shape).astype(weight.dtype)


def apply_balance(graph, layer_map: LayerMap, factors: Mapping[str, np.ndarray]) -> LayerMap:
    """Fold ``factors`` into the graph: each layer's weight input channels times ``f``, a ``Mul(1/f)``
    on its input (a new tensor, so layers sharing an input each get their own); returns the layer
    map with the layers' inputs renamed to the Mul outputs (what calibration and the targets quantize)."""
    import onnx_graphsurgeon as gs

    from ..ir.edit import Namer, add_node, constant, replace_constant_input
    from .weights import weight_values
    namer = Namer(graph)
    layers = []
    for layer in layer_map.layers():
        f = factors.get(layer.name)
        if f is None:
            layers.append(layer)
            continue
        node = graph.node(layer.name)
        weight = np.asarray(weight_values(graph, layer))
        replace_constant_input(node, 1, scaled_weight(layer, weight, f), namer, f"{layer.weight}_dmq")
        x = node.inputs[0]
        rank = weight.ndim if layer.op_type in ("Conv", "ConvTranspose") else 1
        shape = (1, -1) + (1,) * (rank - 2) if rank > 1 else (-1,)
        inverse = (1.0 / np.asarray(f, np.float64)).astype(np.float32).reshape(shape)
        balanced = gs.Variable(namer(f"{layer.name}_dmq_input"), dtype=x.dtype, shape=x.shape)
        add_node(graph, namer, "Mul", f"{layer.name}_dmq_balance", [x, constant(namer, f"{layer.name}_dmq_scale", inverse)],
                 [balanced])
        node.inputs[0] = balanced
        layers.append(dataclasses.replace(layer, input=balanced.name))
    graph.finalize()
    return LayerMap(layers, layer_map.skipped)


def record_factors(graph, record, layer_map: LayerMap, source: str) -> dict[str, np.ndarray]:
    """An AMCT record's ``tensor_balance_factor`` per layer, checked against the layer's input channels
    (``load_record`` and ``dmq_balance{record=...}``)."""
    from ..errors import ConfigError, Problem
    from .weights import weight_values

    def problem(name: str, message: str) -> ConfigError:
        return ConfigError([Problem(source, f"layer '{name}' field tensor_balance_factor", message)])
    factors = {}
    for name, rec in record.items():
        if not rec.tensor_balance_factor:
            continue
        layer = layer_map[name]
        why = balance_problem(layer)
        if why:
            raise problem(name, f"cannot be applied: {why}")
        cin = in_channels(layer, np.shape(weight_values(graph, layer)))
        if len(rec.tensor_balance_factor) != cin:
            raise problem(name, f"has {len(rec.tensor_balance_factor)} values but the layer has {cin} input "
                                "channels; the record does not match this model")
        factors[name] = np.asarray(rec.tensor_balance_factor, np.float32)
    return factors
