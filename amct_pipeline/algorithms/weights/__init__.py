"""Weight quantizers (selected by ``quantize_weights{algorithm=NAME}``) and the weight views they share.

``effective_weight`` / ``effective_bias`` give the arrays a layer really multiplies and adds, as every
quantizer and lowering target must see them: view ops applied (``weight_values``), and Gemm's ``alpha``
/ ``beta`` folded in (so lowered models can set both to 1, as integer kernels have no such factors).

``deconv_channel_view`` puts all ``Cout`` output channels of a grouped ConvTranspose weight on axis 1
(SPEC 4.3: output channels x group), so a per-channel quantizer needs no group logic.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .arq import ArqOptions, ArqQuantizer

__all__ = [
    "ArqQuantizer",
    "ArqOptions",
    "BUILTIN_WEIGHT_QUANTIZERS",
    "effective_weight",
    "effective_bias",
    "gemm_factors",
    "deconv_channel_view",
    "deconv_from_channel_view",
]

BUILTIN_WEIGHT_QUANTIZERS = [ArqQuantizer]


def gemm_factors(graph, layer) -> tuple[float, float]:
    """(alpha, beta) of a Gemm layer; (1, 1) for every other op type."""
    if layer.op_type != "Gemm":
        return 1.0, 1.0
    attrs = graph.node(layer.name).attrs
    return float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))


def effective_weight(graph, layer) -> np.ndarray | None:
    """The float32 weight as the layer applies it (Gemm: ``alpha * B``); None for weightless layers."""
    from ...passes.match_layers import weight_values
    values = weight_values(graph, layer)
    if values is None:
        return None
    weight = np.asarray(values, dtype=np.float32)
    alpha, _ = gemm_factors(graph, layer)
    return weight * np.float32(alpha) if alpha != 1.0 else weight


def effective_bias(graph, layer) -> np.ndarray | None:
    """The float bias as the layer adds it (Gemm: ``beta * C``; MatMul: the following Add's constant)."""
    from ...passes.match_layers import weight_values
    if layer.bias is None:
        return None
    # weight_values follows view ops from any constant input; reuse it for the bias tensor
    values = weight_values(graph, dataclasses.replace(layer, weight=layer.bias))
    bias = np.asarray(values, dtype=np.float64)
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
