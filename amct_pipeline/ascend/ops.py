"""Numpy reference kernels of the Ascend quantization operators.

These kernels define what the deploy model computes, so that it can be executed (and compared with
the fake-quant model in onnxruntime) without an Ascend chip. All integer arithmetic is exact.

Conventions chosen for the project (issue 4; SPEC 4.1, 5.1, 5.4)
------------------------------------------------------------------
**AscendQuant rounding** -- ``convention="amct"`` (the default) is AMCT's fake-quant formula::

    q = clip(round(float32(x * scale)) + offset, qmin, qmax)        scale = float32(1 / scale_d)

i.e. multiply by the stored reciprocal in float32, round (``round_mode``; "Round" is
round-half-to-even), *then* add the integer offset. This is bit for bit what the fake-quant model
computes in onnxruntime (``Mul(1/scale_d) -> Round -> Add(offset_d) -> Clip``), so the deploy
reference, the fake-quant model and our records agree exactly. CANN documents the hardware
operator as ``round(x * scale + offset)``; ``convention="cann"`` simulates that formula with
float32 operations (``float32(float32(x * scale) + offset)``, then round). The two differ only
where float32 rounds the sum ``x * scale + offset`` onto or across a rounding boundary (for example
``x * scale = 0.49999997`` and ``offset = 1``: the sum rounds to 1.5, which rounds to 2, while the
AMCT formula gives 0 + 1 = 1). Real hardware may compute in float16 (AscendC converts to half),
which neither convention models. With ``sqrt_mode`` the product is ``(x * scale) * scale``.

**AscendAntiQuant offset sign** -- ``y = (x + offset) * scale`` (the AscendC documentation's
``dst = scale * (src + offset)``). AMCT's fake version multiplies the offset-removed code
``q - offset_d`` by ``scale_d``, so a lowering writes ``scale = scale_d`` and ``offset = -offset_d``.

**AscendDequant** -- unpacks the UINT64 parameter (SPEC 5.2). Without shift:
``y = float32(acc) * deq`` (one float32 rounding, as the fake model's ``Mul(deq)``). With shift
N > 0 (SPEC 4.6): ``y = float32(clip(floor(acc / 2^N), -32768, 32767)) * deq * 2^N``. The
parameter is per tensor (``[1]``) or per channel (``[C]``, channel axis 1). A non-zero offset_w is
rejected (AMCT weights are symmetric, SPEC 3; the hardware meaning is not documented).

**AscendRequant** -- ``y = clip(rint(float32(acc') * req), -128, 127)``, then ReLU if
``relu_flag``, where ``acc'`` is the (optionally N-shifted, as in AscendDequant) accumulator and
``req`` the float32 scale of the UINT64 word (CANN: SaturateInt8(RoundToNearestEven(x * scale))).
Per-channel on axis 1 like AscendDequant. Offset bits must be 0 (not documented by CANN).

The exact integer layers the deploy model runs between these operators are in ``kernels.py``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import AscendError
from .packing import unpack_deq_scale

__all__ = [
    "GE_DTYPES",
    "ROUND_MODES",
    "ascend_quant",
    "ascend_dequant",
    "ascend_anti_quant",
    "ascend_weight_quant",
    "ascend_requant",
    "output_dtype",
    "quant_range",
]

# GE DataType enum values used in Ascend attributes (dst_type, dtype).
GE_DTYPES = {0: "FLOAT", 1: "FLOAT16", 2: "INT8", 3: "INT32", 6: "INT16", 29: "INT4"}
_QUANT_TYPES = {"INT8": (-128, 127, np.int8), "INT4": (-8, 7, np.int8), "INT16": (-32768, 32767, np.int16)}
ROUND_MODES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Round": np.rint,  # round half to even (C rint)
    "Floor": np.floor,
    "Ceil": np.ceil,
    "Trunc": np.trunc,
}
_INT32 = np.iinfo(np.int32)


def quant_range(dst_type) -> tuple[int, int, type]:
    """``(qmin, qmax, numpy container dtype)`` of a quantized type: "INT8"/2, "INT4"/29, "INT16"/6.

    INT4 codes are held in int8 (unpacked)."""
    if isinstance(dst_type, bytes):
        dst_type = dst_type.decode()
    if isinstance(dst_type, (int, np.integer)) and not isinstance(dst_type, bool):
        name = GE_DTYPES.get(int(dst_type))
    elif isinstance(dst_type, str):
        name = dst_type.upper()
    else:
        name = None
    if name not in _QUANT_TYPES:
        raise AscendError(f"unsupported dst_type {dst_type!r}; expected one of INT8 (2), INT4 (29), INT16 (6)")
    return _QUANT_TYPES[name]


def output_dtype(dtype) -> np.dtype:
    """Float output type: GE enum 0 (float32) / 1 (float16), or a numpy float32/float16 dtype."""
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        if int(dtype) == 0:
            return np.dtype(np.float32)
        if int(dtype) == 1:
            return np.dtype(np.float16)
        raise AscendError(f"unsupported output dtype {int(dtype)}; expected 0 (float32) or 1 (float16)")
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise AscendError(f"unsupported output dtype {dtype!r}") from exc
    if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise AscendError(f"unsupported output dtype {dt}; expected float32 or float16")
    return dt


def _scalar(name: str, value, *, positive: bool = False) -> np.float32:
    arr = np.asarray(value, dtype=np.float64)
    if arr.size != 1:
        raise AscendError(f"{name} must be a scalar, got shape {list(arr.shape)}")
    v = float(arr.reshape(()))
    if not np.isfinite(v) or (positive and v <= 0):
        raise AscendError(f"{name} must be finite{' and > 0' if positive else ''}, got {v!r}")
    return np.float32(v)


def _round_fn(round_mode) -> Callable[[np.ndarray], np.ndarray]:
    if isinstance(round_mode, bytes):
        round_mode = round_mode.decode()
    for key, fn in ROUND_MODES.items():
        if isinstance(round_mode, str) and key.lower() == round_mode.lower():
            return fn
    raise AscendError(f"unsupported round_mode {round_mode!r}; expected one of {', '.join(ROUND_MODES)}")


def _float_input(name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise AscendError(f"{name} must be floating point, got dtype {x.dtype}")
    if np.isnan(x).any():
        raise AscendError(f"{name} contains NaN")
    return x.astype(np.float32, copy=False)


def integer_input(name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.name in ("int4", "uint4"):      # packed INT4 initializers load as ml_dtypes arrays
        x = x.astype(np.int8 if x.dtype.name == "int4" else np.uint8)
    if x.dtype == bool or not np.issubdtype(x.dtype, np.integer):
        raise AscendError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    return x


# ---------------------------------------------------------------------------------------------
# Ascend quantization operators


def ascend_quant(x, scale, offset, sqrt_mode: bool = False, round_mode: str = "Round",
                 dst_type="INT8", convention: str = "amct") -> np.ndarray:
    """AscendQuant: float input to integer codes (int8; int16 for INT16; INT4 codes in int8).

    ``scale`` is the attribute value ``1 / scale_d`` (used as float32), ``offset`` is ``offset_d``.
    See the module docstring for ``convention`` ("amct" default, or "cann"). Float16/float64
    inputs are computed in float32.
    """
    qmin, qmax, container = quant_range(dst_type)
    rnd = _round_fn(round_mode)
    s = _scalar("AscendQuant scale", scale, positive=True)
    o = _scalar("AscendQuant offset", offset)
    xf = _float_input("AscendQuant input", x)
    with np.errstate(over="ignore"):
        v = xf * s
        if sqrt_mode:
            v = v * s
        if convention == "amct":
            if o != np.round(o):
                raise AscendError(f"AscendQuant offset must be an integer with convention 'amct', got {float(o)!r}")
            q = rnd(v) + o
        elif convention == "cann":
            q = rnd(v + o)
        else:
            raise AscendError(f"unknown AscendQuant convention {convention!r}; expected 'amct' or 'cann'")
    return np.clip(q, qmin, qmax).astype(container)


def _channel_param(values: np.ndarray, x: np.ndarray, what: str) -> np.ndarray:
    """Broadcast a ``[1]`` or ``[C]`` parameter along axis 1 of ``x``."""
    if values.size == 1:
        return values.reshape(())
    if values.ndim != 1 or x.ndim < 2 or x.shape[1] != values.size:
        raise AscendError(f"{what} has {values.size} values but the input has shape {list(x.shape)}; "
                          "expected [1] or [C] with C = input dimension 1")
    return values.reshape((1, -1) + (1,) * (x.ndim - 2))


def _unpacked_param(param, x: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, shift int64) broadcastable to ``x``; float parameters mean scale, no shift."""
    param = np.asarray(param)
    if np.issubdtype(param.dtype, np.floating):  # the fp16/fp32 deq_scale variant of the prototype
        deq = np.atleast_1d(param).astype(np.float32)
        shift = np.zeros(deq.shape, np.uint8)
    else:
        deq, shift, off = unpack_deq_scale(param)
        if np.any(off != 0):
            raise AscendError(f"{what} has offset_w = {int(off[off != 0][0])}; only 0 is supported "
                              "(AMCT weights are symmetric)")
    deq = deq.ravel()
    shift = shift.ravel().astype(np.int64)
    return _channel_param(deq, x, what), _channel_param(shift, x, what)


def _shifted_times(acc: np.ndarray, deq: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """float32: ``acc * deq`` or, where N > 0, ``clip(floor(acc / 2^N), int16) * deq * 2^N``."""
    acc = acc.astype(np.int64)
    if np.any(shift > 0):
        reduced = np.where(shift > 0, np.clip(acc >> shift, -32768, 32767), acc)
        factor = np.ldexp(np.float32(1), shift.astype(np.int32)).astype(np.float32)
        with np.errstate(over="ignore"):
            return (reduced.astype(np.float32) * deq) * factor
    with np.errstate(over="ignore"):
        return acc.astype(np.float32) * deq


def ascend_dequant(x, deq_param, sqrt_mode: bool = False, relu_flag: bool = False, dtype=np.float32) -> np.ndarray:
    """AscendDequant: INT32 accumulator times the unpacked dequant scale (see module docstring).

    ``deq_param``: UINT64 words ``[1]``/``[C]`` (SPEC 5.2) or, for the prototype's fp16 variant, a
    float array of scales. ``x`` may also be a float array (the output of :func:`avgpool_int`); it
    is then multiplied by the scale in float64 and rounded once (no shift allowed).
    ``dtype``: output float32/float16 (GE 0/1).
    """
    out_dt = output_dtype(dtype)
    x = np.asarray(x)
    deq, shift = _unpacked_param(deq_param, x, "AscendDequant deq_scale")
    if sqrt_mode:
        deq = deq * deq
    if np.issubdtype(x.dtype, np.floating):
        if np.any(shift > 0):
            raise AscendError("AscendDequant with shift N > 0 needs an integer input, got a float tensor")
        y = (x.astype(np.float64) * deq.astype(np.float64)).astype(np.float32)
    else:
        x = integer_input("AscendDequant input", x)
        if x.size and (x.min() < _INT32.min or x.max() > _INT32.max):
            raise AscendError("AscendDequant input is outside the INT32 range")
        y = _shifted_times(x, deq, shift)
    if relu_flag:
        y = np.maximum(y, np.float32(0))
    return y.astype(out_dt)


def ascend_anti_quant(x, scale, offset, sqrt_mode: bool = False, dtype=np.float32) -> np.ndarray:
    """AscendAntiQuant: ``y = (x + offset) * scale`` in float32 (``scale**2`` with sqrt_mode).

    For AMCT's ``(q - offset_d) * scale_d`` pass ``scale = scale_d`` and ``offset = -offset_d``.
    """
    out_dt = output_dtype(dtype)
    x = integer_input("AscendAntiQuant input", x)
    s = _scalar("AscendAntiQuant scale", scale)
    o = _scalar("AscendAntiQuant offset", offset)
    if sqrt_mode:
        s = s * s
    return ((x.astype(np.float32) + o) * s).astype(out_dt)


def ascend_weight_quant(x, offset, dst_type="INT8") -> np.ndarray:
    """AscendWeightQuant: ``x - offset`` for int8 weights, checked against the ``dst_type`` range.

    ``offset`` is a scalar/``[1]``, or ``[Cout]`` (applied along axis 0, the output-channel axis of
    Conv/Gemm weights), or any array broadcastable to ``x``. A result outside the range is an error.
    """
    qmin, qmax, container = quant_range(dst_type)
    x = integer_input("AscendWeightQuant input", x).astype(np.int64)
    off = integer_input("AscendWeightQuant offset", offset).astype(np.int64)
    if off.ndim == 1 and off.size > 1 and x.ndim > 1 and off.size == x.shape[0]:
        off = off.reshape((-1,) + (1,) * (x.ndim - 1))
    elif off.size == 1:
        off = off.reshape(())
    try:
        y = x - off
    except ValueError as exc:
        raise AscendError(f"AscendWeightQuant offset of shape {list(off.shape)} does not fit weights "
                          f"of shape {list(x.shape)}") from exc
    if y.size and (y.min() < qmin or y.max() > qmax):
        raise AscendError(f"AscendWeightQuant result x - offset is outside [{qmin}, {qmax}]")
    return y.astype(container)


def ascend_requant(x, req_param, relu_flag: bool = False) -> np.ndarray:
    """AscendRequant: INT32 accumulator to INT8 with one folded scale (see module docstring)."""
    x = integer_input("AscendRequant input", x)
    req, shift = _unpacked_param(req_param, x, "AscendRequant req_scale")
    v = np.rint(_shifted_times(x, req, shift))
    if relu_flag:
        v = np.maximum(v, 0)
    return np.clip(v, -128, 127).astype(np.int8)
