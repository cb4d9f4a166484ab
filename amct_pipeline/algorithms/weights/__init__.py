"""Weight quantizers, selected by ``quantize_weights{algorithm=NAME}``.

The weight views they quantize (effective weights, grouped ConvTranspose channels) live in
``quant.weights``.
"""
from __future__ import annotations

from .arq import ArqOptions, ArqQuantizer
from .mse_clip import MseClipOptions, MseClipQuantizer

__all__ = ["ArqQuantizer", "ArqOptions", "MseClipQuantizer", "MseClipOptions", "BUILTIN_WEIGHT_QUANTIZERS"]

BUILTIN_WEIGHT_QUANTIZERS = [ArqQuantizer, MseClipQuantizer]
