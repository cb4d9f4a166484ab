"""Weights as a layer applies them: view ops followed, Gemm's alpha / beta folded, grouped
ConvTranspose channels laid out flat, and the fake-quant (dequantized) weight.

``effective_weight`` / ``effective_bias`` give the arrays a layer really multiplies and adds, as every
quantizer and lowering target must see them, so lowered models can set Gemm's alpha and beta to 1
(integer kernels have no such factors).

``deconv_channel_view`` puts all ``Cout`` output channels of a grouped ConvTranspose weight on axis 1
(SPEC 4.3: output channels x group), so a per-channel quantizer needs no group logic.
"""
from __future__ import annotations

import numpy as np

from ..ir.constants import chain_values
from .layers import QuantLayer
from .params import WeightQuantParams

__all__ = [
    "weight_values",
    "gemm_factors",
    "effective_weight",
    "effective_bias",
    "deconv_channel_view",
    "deconv_from_channel_view",
    "dequantize_weight",
    "quantize_with_scale",
]


def weight_values(graph, layer: QuantLayer) -> np.ndarray | None:
    """The weight array exactly as ``layer`` sees it (view ops applied); None for weightless layers."""
    if layer.weight is None:
        return None
    return chain_values(graph.tensors()[layer.weight])


def gemm_factors(graph, layer: QuantLayer) -> tuple[float, float]:
    """(alpha, beta) of a Gemm layer; (1, 1) for every other op type."""
    if layer.op_type != "Gemm":
        return 1.0, 1.0
    attrs = graph.node(layer.name).attrs
    return float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))


def effective_weight(graph, layer: QuantLayer) -> np.ndarray | None:
    """The float32 weight as the layer applies it (Gemm: ``alpha * B``); None for weightless layers."""
    values = weight_values(graph, layer)
    if values is None:
        return None
    weight = np.asarray(values, dtype=np.float32)
    alpha, _ = gemm_factors(graph, layer)
    return weight * np.float32(alpha) if alpha != 1.0 else weight


def effective_bias(graph, layer: QuantLayer) -> np.ndarray | None:
    """The float bias as the layer adds it (Gemm: ``beta * C``; MatMul: the following Add's constant)."""
    if layer.bias is None:
        return None
    bias = np.asarray(chain_values(graph.tensors()[layer.bias]), dtype=np.float64)
    _, beta = gemm_factors(graph, layer)
    return bias * beta if beta != 1.0 else bias


def deconv_channel_view(weight: np.ndarray, group: int) -> np.ndarray:
    """[Cin, Cout/g, k...] -> [Cin/g, Cout, k...] with output channel ``o = g_i * Cout/g + j`` on axis 1."""
    if group == 1:
        return weight
    cin, per_group = weight.shape[:2]
    rest = weight.shape[2:]
    blocks = weight.reshape(group, cin // group, per_group, *rest)
    return np.swapaxes(blocks, 0, 1).reshape(cin // group, group * per_group, *rest)


def deconv_from_channel_view(view: np.ndarray, group: int) -> np.ndarray:
    """Inverse of ``deconv_channel_view``."""
    if group == 1:
        return view
    cin_g, cout = view.shape[:2]
    rest = view.shape[2:]
    blocks = view.reshape(cin_g, group, cout // group, *rest)
    return np.swapaxes(blocks, 0, 1).reshape(cin_g * group, cout // group, *rest)


def dequantize_weight(quantized: np.ndarray, scale: np.ndarray, layer: QuantLayer) -> np.ndarray:
    """``q * scale_w`` with the scales along the layer's output channels (float32, AMCT fake-quant).

    ValueError when the scales match no output-channel axis of the weight.
    """
    q = np.asarray(quantized).astype(np.float32)
    s = np.asarray(scale, dtype=np.float32).reshape(-1)
    if s.size == 1:
        return q * s[0]
    axis = _scale_axis(q.shape, s.size, layer)
    if axis is not None:
        shape = [1] * q.ndim
        shape[axis] = -1
        return q * s.reshape(shape)
    if layer.op_type == "ConvTranspose" and layer.group > 1 and s.size == q.shape[1] * layer.group:
        view = deconv_channel_view(q, layer.group)
        return deconv_from_channel_view(view * s.reshape([1, -1] + [1] * (q.ndim - 2)), layer.group)
    raise ValueError(f"layer '{layer.name}': {s.size} weight scales do not match a weight of shape {q.shape}")


def _scale_axis(shape: tuple[int, ...], channels: int, layer: QuantLayer) -> int | None:
    if layer.channel_axis is not None and shape[layer.channel_axis] == channels:
        return layer.channel_axis
    if layer.op_type == "Gemm":
        axis = 0 if layer.transB else 1
        return axis if shape[axis] == channels else None
    if layer.op_type == "MatMul" and shape[-1] == channels:
        return len(shape) - 1
    return None


def quantize_with_scale(weight: np.ndarray, scale: np.ndarray, layer: QuantLayer, num_bits: int = 8) -> WeightQuantParams:
    """Integer codes ``clip(rint(w / scale_w), -2^(b-1), 2^(b-1)-1)`` for given scales (ARQ's formula)."""
    group = layer.group if layer.op_type == "ConvTranspose" else 1
    view = deconv_channel_view(np.asarray(weight, np.float32), group)
    shape = [1] * view.ndim
    if scale.size > 1:
        shape[layer.channel_axis] = -1
    half = 1 << (num_bits - 1)
    codes = np.clip(np.rint(view / scale.reshape(shape)), -half, half - 1).astype(np.int8)
    return WeightQuantParams(scale.astype(np.float32), deconv_from_channel_view(codes, group), num_bits)
