"""Quantization math shared by calibrators, weight quantizers and lowering (SPEC 4.1-4.3).

Conventions (SPEC 4.1): ``q = clip(rint(x / scale) + offset, -2^(b-1), 2^(b-1)-1)`` and
``x_hat = (q - offset) * scale``; offsets are int8-domain zero points, weights are symmetric.
"""
from __future__ import annotations

import numpy as np

from .params import ActQuantParams, WeightQuantParams

__all__ = [
    "FLT_EPSILON",
    "process_scale",
    "scale_offset_arrays",
    "scale_offset_from_range",
    "fake_quant",
    "quantize",
    "arq",
    "quantize_bias",
]

FLT_EPSILON = float(np.finfo(np.float32).eps)  # 1.192092896e-07, AMCT's threshold
_INT32 = np.iinfo(np.int32)


def _qrange(num_bits: int) -> tuple[int, int]:
    if not 2 <= int(num_bits) <= 16:
        raise ValueError(f"num_bits must be in [2, 16], got {num_bits}")
    half = 1 << (int(num_bits) - 1)
    return -half, half - 1


def scale_offset_arrays(min_v, max_v, num_bits: int = 8, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised SPEC 4.2 plus ``process_scale`` sanitising; returns float64 scales and int64 offsets.

    Used directly by searches that score many candidate ranges at once.
    """
    qmin, qmax = _qrange(num_bits)
    lo = np.minimum(np.asarray(min_v, dtype=np.float64), 0.0)  # the range always contains 0
    hi = np.maximum(np.asarray(max_v, dtype=np.float64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        if symmetric:
            scope = np.where(np.abs(hi) < np.abs(lo), qmax + 1, qmax)  # 128 when the negative side dominates
            scale = np.maximum(np.abs(hi), np.abs(lo)) / scope
            offset = np.zeros(scale.shape, dtype=np.int64)
        else:
            scale = (hi - lo) / (qmax - qmin)
            offset = np.rint(qmin - lo / scale)
    bad = ~(scale >= FLT_EPSILON)  # also catches NaN from 0/0
    scale = np.where(bad, 1.0, scale)
    offset = np.where(bad, 0 if symmetric else qmin, offset).astype(np.int64)
    return scale, np.clip(offset, qmin, qmax)


def process_scale(scale: float, offset: int, num_bits: int = 8, symmetric: bool = False) -> ActQuantParams:
    """AMCT's ``process_scale``: tiny scales become 1.0 (asym offset -2^(b-1)); huge or non-finite ones are errors."""
    qmin, _ = _qrange(num_bits)
    scale = float(scale)
    if np.isnan(scale) or not scale >= FLT_EPSILON:
        return ActQuantParams(1.0, 0 if symmetric else qmin, int(num_bits))
    if not np.isfinite(scale) or 1.0 / scale < FLT_EPSILON:
        raise ValueError(f"quantization scale {scale!r} is too large (1/scale < FLT_EPSILON); range is not usable")
    return ActQuantParams(scale, 0 if symmetric else int(offset), int(num_bits))


def scale_offset_from_range(min_v: float, max_v: float, num_bits: int = 8, symmetric: bool = False) -> ActQuantParams:
    """Activation factors for the range ``[min_v, max_v]`` (SPEC 4.2, ``calculate_scale_offset``)."""
    if not (np.isfinite(min_v) and np.isfinite(max_v)):
        raise ValueError(f"range [{min_v}, {max_v}] is not finite")
    scale, offset = scale_offset_arrays(min_v, max_v, num_bits, symmetric)
    return process_scale(float(scale), int(offset), num_bits, symmetric)


def _float_dtype(x: np.ndarray) -> np.dtype:
    return x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)


def quantize(x, params: ActQuantParams) -> np.ndarray:
    """Integer codes (int8 for <= 8 bits, else int16), computed in the input's float precision."""
    x = np.asarray(x)
    x = x.astype(_float_dtype(x), copy=False)
    q = np.rint(x / x.dtype.type(params.scale)) + params.offset
    q = np.clip(q, params.qmin, params.qmax)
    return q.astype(np.int8 if params.num_bits <= 8 else np.int16)


def fake_quant(x, params: ActQuantParams) -> np.ndarray:
    """Quantize-dequantize with half-to-even rounding, as ONNX/AscendQuant do."""
    x = np.asarray(x)
    dtype = _float_dtype(x)
    q = quantize(x, params).astype(dtype)
    return (q - dtype.type(params.offset)) * dtype.type(params.scale)


def arq(weight, channel_axis: int | None, num_bits: int = 8) -> WeightQuantParams:
    """ARQ (SPEC 4.3): symmetric max-abs scale per output channel (or per tensor), 127/128 rule, no search.

    ``channel_axis=None`` means one scale for the whole tensor. Scales are float32; the codes are
    computed from that float32 scale so that ``quantized * scale`` is exactly the fake-quant weight.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.size == 0:
        raise ValueError("cannot quantize an empty weight")
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf")
    if channel_axis is None:
        rows, shape = w.reshape(1, -1), (1,) * w.ndim
    else:
        axis = channel_axis % w.ndim
        rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        shape = tuple(-1 if i == axis else 1 for i in range(w.ndim))
    scale, _ = scale_offset_arrays(rows.min(axis=1), rows.max(axis=1), num_bits, symmetric=True)
    scale = scale.astype(np.float32)
    qmin, qmax = _qrange(num_bits)
    q = np.clip(np.rint(w / scale.reshape(shape)), qmin, qmax)
    return WeightQuantParams(scale=scale, quantized=q.astype(np.int8 if num_bits <= 8 else np.int16), num_bits=num_bits)


def quantize_bias(bias, scale_d: float, scale_w, layer_name: str) -> np.ndarray:
    """``round(b / (scale_d * scale_w[c]))`` as int32 (SPEC 4.1), using the float32 deq_scale the runtime uses."""
    deq = np.float32(scale_d) * np.asarray(scale_w, dtype=np.float32).reshape(-1)
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    if deq.size not in (1, b.size):
        raise ValueError(f"layer '{layer_name}': {deq.size} weight scales for {b.size} bias values")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.rint(b / deq.astype(np.float64))
    bad = ~((q >= _INT32.min) & (q <= _INT32.max))  # NaN/Inf count as out of range
    if bad.any():
        worst = b[bad][0]
        raise ValueError(
            f"layer '{layer_name}': quantized bias out of int32 range (bias {worst!r} / deq_scale "
            f"{float(deq[np.argmax(bad)] if deq.size > 1 else deq[0])!r}); add '{layer_name}' to skip_layers"
        )
    return q.astype(np.int32).reshape(np.shape(bias))
