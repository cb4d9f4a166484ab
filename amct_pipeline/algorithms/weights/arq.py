"""ARQ (SPEC 4.3): symmetric max-abs weight scales, per output channel or per tensor, no search.

``scale = max(|max|, |min|) / (127 or 128)`` (128 when the negative extreme dominates), codes
``clip(rint(w / scale), -2^(b-1), 2^(b-1)-1)``. 6- and 7-bit weights (Conv only, AMCT's Winograd
bits) use the narrower clip range but are stored as INT8. 4-bit weights (AMCT ``dst_type: INT4``, every
weighted layer type) keep their codes in [-8, 7] in an int8 array; targets store them packed.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ...options import Options
from ...quant.math import arq
from ...quant.weights import deconv_channel_view, deconv_from_channel_view
from ..base import WeightQuantizer, WeightQuantParams

__all__ = ["ArqQuantizer", "ArqOptions", "CHANNEL_WISE_TYPES", "LOW_BIT_TYPES"]

CHANNEL_WISE_TYPES = ("Conv", "ConvTranspose")
LOW_BIT_TYPES = ("Conv",)        # 6 and 7 bits (AMCT); 4 and 8 bits apply to every weighted layer


class ArqOptions(Options):
    channel_wise: bool = Field(True, description="One scale per output channel for Conv/ConvTranspose; Gemm and "
                                                 "MatMul are always per tensor (setting it true on one such "
                                                 "layer is an error, as in AMCT).")
    num_bits: Literal[4, 6, 7, 8] = Field(8, description="Weight bits: 8, 4 (AMCT INT4, stored packed by the qdq "
                                                         "and ascend targets), 6 and 7 only for Conv (stored as INT8).")


class ArqQuantizer(WeightQuantizer):
    name = "arq"
    summary = "AMCT ARQ: symmetric max-abs weight scales (127/128 rule), per channel for Conv/ConvTranspose."
    Options = ArqOptions

    def quantize(self, weight: np.ndarray, *, op_type: str, channel_axis: int | None,
                 group: int = 1) -> WeightQuantParams:
        """``channel_axis`` None = per tensor. ConvTranspose with ``group > 1``: axis 1 holds Cout/group
        channels per group, so the weight is regrouped to give every one of the Cout channels its scale."""
        bits = self.options.num_bits
        if bits in (6, 7) and op_type not in LOW_BIT_TYPES:
            raise ValueError(f"{bits}-bit weights are only supported for Conv layers, not {op_type}")
        if channel_axis is not None and op_type not in CHANNEL_WISE_TYPES:
            raise ValueError(f"{op_type} weights are quantized per tensor; channel_axis must be None")
        if channel_axis is None or not self.options.channel_wise:
            return arq(weight, None, bits)
        if op_type == "ConvTranspose" and group > 1:
            params = arq(deconv_channel_view(np.asarray(weight), group), 1, bits)
            return WeightQuantParams(params.scale, deconv_from_channel_view(params.quantized, group), bits)
        return arq(weight, channel_axis, bits)
