"""FLOPs and bitops of quantizable layers (SPEC 8.2, AMCT's ``net_params``).

Counts are per sample (the batch axis divided out), from the layer's input and output shapes as
they are at run time, so dynamic dimensions need no shape inference::

    conv    FLOPs = (2 * Cin/g * kh * kw - 1 + has_bias) * Hout * Wout * Cout
    deconv  FLOPs = (2 * Cin/g * kh * kw - 1 + has_bias) * Hin * Win * Cout
    matmul  FLOPs = (2 * K - 1 + has_bias) * prod(out_shape) / out_shape[0]
    bitops  = FLOPs * wts_bits * act_bits     (a float side counts 32 bits)

AveragePool, which has no weights, counts one add per window element and one multiply per output
value (the formula above with ``Cin/g = 1``); its weight side counts 1 bit (scale_w = 1, SPEC 6.1).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from .layers import QuantLayer

__all__ = ["layer_flops", "bitops", "FLOAT_BITS"]

FLOAT_BITS = 32


def layer_flops(layer: QuantLayer, in_shape: Sequence[int], out_shape: Sequence[int],
                weight_shape: Optional[Sequence[int]], kernel: Sequence[int] = ()) -> int:
    """FLOPs of one sample through ``layer`` (``kernel``: AveragePool's kernel_shape)."""
    bias = 1 if layer.bias is not None else 0
    if layer.op_type in ("Conv", "ConvTranspose"):
        # Conv weight [Cout, Cin/g, k...]; ConvTranspose [Cin, Cout/g, k...]: per output value,
        # Cin/g * prod(k) products either way (deconv: spread over the input positions)
        per_out = weight_shape[1] if layer.op_type == "Conv" else weight_shape[0] // max(layer.group, 1)
        taps = per_out * math.prod(weight_shape[2:])
        cout = out_shape[1]
        spatial = math.prod(out_shape[2:]) if layer.op_type == "Conv" else math.prod(in_shape[2:])
        return int((2 * taps - 1 + bias) * spatial * cout)
    if layer.op_type in ("Gemm", "MatMul"):
        k = in_shape[-1]
        per_sample = math.prod(out_shape) // max(out_shape[0], 1) if len(out_shape) > 1 else math.prod(out_shape)
        return int((2 * k - 1 + bias) * per_sample)
    if layer.op_type == "AveragePool":
        return int(math.prod(kernel or (1,)) * math.prod(out_shape[1:]))
    return 0


def bitops(flops: int, act_bits: Optional[int], wts_bits: Optional[int]) -> int:
    """SPEC 8.2's ``FLOPs * wts_bits * act_bits``; None (float) counts 32 bits."""
    return int(flops) * (act_bits or FLOAT_BITS) * (wts_bits or FLOAT_BITS)
