"""Numpy reference kernels of the Ascend quantization operators and exact integer layers.

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

**AveragePool on int8** -- AMCT records AvgPool with scale_w = 1, so AscendDequant multiplies the
pooled value by scale_d. We compute the exact integer window sum (of ``q - zero_point``) and divide
by the element count in float64; the result stays float64 until AscendDequant rounds
``avg * deq`` once to float32. The fake model computes the average in float32, so the two may
differ by one float32 ulp. ``ceil_mode`` follows ONNX/PyTorch (windows starting in the right
padding are dropped; the region beyond the explicit pads is never counted).

**Integer Conv / ConvTranspose / Gemm / MatMul** -- products of integer codes accumulated exactly
(see :func:`_exact_matmul`), plus the INT32 bias, into int64; a result outside INT32 is an error
(``on_overflow="error"``, default) or saturated (``"saturate"``).

**Zero points** -- the ``*_offset`` arguments of the integer layers are subtracted from the
integer input before the layer (padding then stands for real zero). AMCT does not fold the
activation offset into the deploy bias: the Ascend compiler (ATC) compensates it (SPEC 5.3). The
deploy-model reference (``reference.py``) passes the producing AscendQuant's offset here to
emulate that compensation.
"""
from __future__ import annotations

from typing import Callable, Sequence

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
    "conv_int",
    "conv_transpose_int",
    "gemm_int",
    "matmul_int",
    "avgpool_int",
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
_EXACT = float(2 ** 53)


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


def _int_input(name: str, x) -> np.ndarray:
    x = np.asarray(x)
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
        x = _int_input("AscendDequant input", x)
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
    x = _int_input("AscendAntiQuant input", x)
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
    x = _int_input("AscendWeightQuant input", x).astype(np.int64)
    off = _int_input("AscendWeightQuant offset", offset).astype(np.int64)
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
    x = _int_input("AscendRequant input", x)
    req, shift = _unpacked_param(req_param, x, "AscendRequant req_scale")
    v = np.rint(_shifted_times(x, req, shift))
    if relu_flag:
        v = np.maximum(v, 0)
    return np.clip(v, -128, 127).astype(np.int8)


# ---------------------------------------------------------------------------------------------
# Integer layers


def _exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of integer-valued arrays, exactly, returned as int64.

    Computed in float64 with BLAS: every product and every partial sum is an integer of magnitude
    at most ``K * max|a| * max|b|``, and integers below 2^53 are exact in float64 whatever the
    summation order (FMA included). We check that bound and fall back to int64 matmul beyond it.
    """
    k = a.shape[-1]
    amax = float(np.abs(a).max()) if a.size else 0.0
    bmax = float(np.abs(b).max()) if b.size else 0.0
    if k * amax * bmax < _EXACT:
        return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.int64)
    return np.matmul(a.astype(np.int64), b.astype(np.int64))


def _finish_int32(acc: np.ndarray, on_overflow: str, what: str) -> np.ndarray:
    if acc.size and (acc.min() < _INT32.min or acc.max() > _INT32.max):
        if on_overflow == "saturate":
            return np.clip(acc, _INT32.min, _INT32.max).astype(np.int32)
        if on_overflow == "error":
            raise AscendError(f"{what} accumulator overflows INT32 (range [{int(acc.min())}, {int(acc.max())}])")
        raise AscendError(f"on_overflow must be 'error' or 'saturate', got {on_overflow!r}")
    return acc.astype(np.int32)


def _centered(name: str, x, zero_point) -> np.ndarray:
    """Integer input minus its zero point, as int64."""
    x = _int_input(name, x).astype(np.int64)
    zp = np.asarray(zero_point)
    if zp.size != 1 or zp != np.round(zp):
        raise AscendError(f"{name} zero point must be one integer, got {zp.ravel().tolist()[:4]}")
    return x - int(zp.reshape(()))


def _bias(bias, n: int, what: str) -> np.ndarray | None:
    if bias is None:
        return None
    b = _int_input(f"{what} bias", bias).astype(np.int64).ravel()
    if b.size not in (1, n):
        raise AscendError(f"{what} bias has {b.size} values, expected {n}")
    return b


def _ints(values, n: int, default: int, name: str) -> list[int]:
    if values is None or len(values) == 0:
        return [default] * n
    values = [int(v) for v in values]
    if len(values) != n:
        raise AscendError(f"{name} has {len(values)} values, expected {n}")
    return values


def _pool_pads(in_shape, ext, strides, pads, auto_pad) -> tuple[list[int], list[int]]:
    """Begin/end pads for each spatial axis (explicit pads or ONNX auto_pad)."""
    nd = len(in_shape)
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    auto_pad = auto_pad or "NOTSET"
    if auto_pad == "NOTSET":
        p = _ints(pads, 2 * nd, 0, "pads")
        return p[:nd], p[nd:]
    if auto_pad == "VALID":
        return [0] * nd, [0] * nd
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise AscendError(f"unsupported auto_pad {auto_pad!r}")
    begin, end = [], []
    for size, e, s in zip(in_shape, ext, strides):
        out = -(-size // s)
        total = max(0, (out - 1) * s + e - size)
        small = total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin, end


def _windows(xc: np.ndarray, kernel, strides, dilations, begin, end) -> np.ndarray:
    """Padded sliding windows ``[N, C, *out, *kernel]`` of ``xc`` (``[N, C, *spatial]``)."""
    nd = len(kernel)
    ext = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    xp = np.pad(xc, [(0, 0), (0, 0)] + [(b, e) for b, e in zip(begin, end)])
    for i in range(nd):
        if xp.shape[2 + i] < ext[i]:
            raise AscendError(f"padded input size {xp.shape[2 + i]} is smaller than the kernel extent {ext[i]}")
    win = np.lib.stride_tricks.sliding_window_view(xp, ext, axis=tuple(range(2, 2 + nd)))
    sl = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + \
        tuple(slice(None, None, d) for d in dilations)
    return win[sl]


def conv_int(x, w, bias=None, strides: Sequence[int] | None = None, pads: Sequence[int] | None = None,
             dilations: Sequence[int] | None = None, group: int = 1, *, auto_pad: str = "NOTSET",
             x_offset: int = 0, on_overflow: str = "error") -> np.ndarray:
    """Integer Conv (NCW / NCHW / NCDHW), ONNX semantics, exact INT32 result.

    ``x``: integer ``[N, Cin, *spatial]``; ``w``: integer ``[Cout, Cin/group, *kernel]``; ``bias``:
    INT32 ``[Cout]`` or None. ``x_offset`` (zero point) is subtracted from ``x`` first, so padding
    stands for real zero. Implemented as im2col + one exact matmul per group.
    """
    xc = _centered("Conv input", x, x_offset)
    wi = _int_input("Conv weight", w).astype(np.int64)
    if xc.ndim < 3 or wi.ndim != xc.ndim:
        raise AscendError(f"Conv input {list(xc.shape)} and weight {list(wi.shape)} must be [N, C, *spatial] "
                          "and [Cout, Cin/group, *kernel] of the same rank (>= 3)")
    nd = xc.ndim - 2
    n, cin = xc.shape[:2]
    cout, cg = wi.shape[:2]
    group = int(group or 1)
    if cin % group or cout % group or cin // group != cg:
        raise AscendError(f"Conv group={group} does not fit input channels {cin} and weight {list(wi.shape)}")
    kernel = list(wi.shape[2:])
    strides = _ints(strides, nd, 1, "strides")
    dilations = _ints(dilations, nd, 1, "dilations")
    ext = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    begin, end = _pool_pads(xc.shape[2:], ext, strides, pads, auto_pad)
    win = _windows(xc, kernel, strides, dilations, begin, end)  # [N, Cin, *out, *k], a view
    out_sp = list(win.shape[2:2 + nd])
    npos, kprod = int(np.prod(out_sp)), int(np.prod(kernel))
    if cg == 1:  # depthwise (channel multiplier m): one exact multiply-add per kernel tap, no im2col copy
        m = cout // group
        wk = wi.reshape(group, m, kprod)
        acc = np.zeros([n, group, m] + out_sp, dtype=np.int64)
        for k, kidx in enumerate(np.ndindex(*kernel)):
            tap = win[(slice(None), slice(None)) + (slice(None),) * nd + kidx][:, :, None]  # [N, C, 1, *out]
            acc += tap * wk[:, :, k].reshape((1, group, m) + (1,) * nd)
        acc = acc.reshape([n, cout] + out_sp)
    else:
        # im2col: cols [N, g, P, Cg*K] @ weights [g, Cg*K, Cout/g]
        cols = win.reshape(n, group, cg, npos, kprod).transpose(0, 1, 3, 2, 4).reshape(n, group, npos, cg * kprod)
        wm = wi.reshape(group, cout // group, cg * kprod).transpose(0, 2, 1)
        acc = _exact_matmul(cols, wm)  # [N, g, P, Cout/g]
        acc = acc.transpose(0, 1, 3, 2).reshape([n, cout] + out_sp)
    b = _bias(bias, cout, "Conv")
    if b is not None:
        acc = acc + b.reshape((1, -1) + (1,) * nd)
    return _finish_int32(acc, on_overflow, "Conv")


def conv_transpose_int(x, w, bias=None, strides: Sequence[int] | None = None, pads: Sequence[int] | None = None,
                       dilations: Sequence[int] | None = None, group: int = 1,
                       output_padding: Sequence[int] | None = None, output_shape: Sequence[int] | None = None,
                       *, auto_pad: str = "NOTSET", x_offset: int = 0, on_overflow: str = "error") -> np.ndarray:
    """Integer ConvTranspose, ONNX semantics, exact INT32 result.

    ``w``: ``[Cin, Cout/group, *kernel]``. Scatter form: each input position adds ``x * w`` to the
    output window it maps to; ``pads`` then crop the full result.
    """
    xc = _centered("ConvTranspose input", x, x_offset)
    wi = _int_input("ConvTranspose weight", w).astype(np.int64)
    if xc.ndim < 3 or wi.ndim != xc.ndim:
        raise AscendError(f"ConvTranspose input {list(xc.shape)} and weight {list(wi.shape)} have bad ranks")
    nd = xc.ndim - 2
    n, cin = xc.shape[:2]
    group = int(group or 1)
    if wi.shape[0] != cin or cin % group:
        raise AscendError(f"ConvTranspose weight {list(wi.shape)} does not fit input channels {cin} (group={group})")
    cg, coutg = cin // group, wi.shape[1]
    cout = coutg * group
    kernel = list(wi.shape[2:])
    in_sp = list(xc.shape[2:])
    strides = _ints(strides, nd, 1, "strides")
    dilations = _ints(dilations, nd, 1, "dilations")
    opad = _ints(output_padding, nd, 0, "output_padding")
    ext = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    full = [s * (i - 1) + o + e for s, i, o, e in zip(strides, in_sp, opad, ext)]
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    auto_pad = auto_pad or "NOTSET"
    if output_shape is not None and len(output_shape) or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(output_shape)[-nd:] if output_shape is not None and len(output_shape) else \
            [i * s for i, s in zip(in_sp, strides)]
        begin, end = [], []
        for f, t in zip(full, target):
            total = f - t
            if total < 0:
                raise AscendError(f"ConvTranspose output_shape {target} is larger than the full output {full}")
            small = total // 2  # ONNX spec: SAME_UPPER puts the odd pad at the end, otherwise at the start
            begin.append(small if auto_pad == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
    elif auto_pad == "VALID":
        begin, end = [0] * nd, [0] * nd
    else:
        p = _ints(pads, 2 * nd, 0, "pads")
        begin, end = p[:nd], p[nd:]
    npos, kprod = int(np.prod(in_sp)), int(np.prod(kernel))
    xm = xc.reshape(n, group, cg, npos).transpose(0, 1, 3, 2)  # [N, g, P, Cg]
    wm = wi.reshape(group, cg, coutg * kprod)  # [g, Cg, Cout/g*K]
    contrib = _exact_matmul(xm, wm).reshape([n, group, *in_sp, coutg, *kernel])
    # move to [N, g, Cout/g, *K, *in]
    perm = [0, 1, 2 + nd] + list(range(3 + nd, 3 + 2 * nd)) + list(range(2, 2 + nd))
    contrib = contrib.transpose(perm)
    out = np.zeros([n, group, coutg] + full, dtype=np.int64)
    for kidx in np.ndindex(*kernel):
        sl = tuple(slice(k * d, k * d + (i - 1) * s + 1, s) for k, d, i, s in zip(kidx, dilations, in_sp, strides))
        out[(slice(None),) * 3 + sl] += contrib[(slice(None),) * 3 + kidx]
    crop = tuple(slice(b, f - e) for b, e, f in zip(begin, end, full))
    out = out[(slice(None),) * 3 + crop].reshape([n, cout] + [f - b - e for f, b, e in zip(full, begin, end)])
    bb = _bias(bias, cout, "ConvTranspose")
    if bb is not None:
        out = out + bb.reshape((1, -1) + (1,) * nd)
    return _finish_int32(out, on_overflow, "ConvTranspose")


def gemm_int(a, b, bias=None, transA: int = 0, transB: int = 0, *, alpha: float = 1.0, beta: float = 1.0,
             a_offset: int = 0, b_offset: int = 0, on_overflow: str = "error") -> np.ndarray:
    """Integer Gemm ``A' @ B' + C`` (2-D), exact INT32; alpha and beta must be 1 (else error)."""
    if float(alpha) != 1.0 or (bias is not None and float(beta) != 1.0):
        raise AscendError(f"integer Gemm needs alpha = beta = 1, got alpha={alpha}, beta={beta}")
    ac = _centered("Gemm A", a, a_offset)
    bc = _centered("Gemm B", b, b_offset)
    if ac.ndim != 2 or bc.ndim != 2:
        raise AscendError(f"Gemm inputs must be 2-D, got {list(ac.shape)} and {list(bc.shape)}")
    if transA:
        ac = ac.T
    if transB:
        bc = bc.T
    if ac.shape[1] != bc.shape[0]:
        raise AscendError(f"Gemm shapes {list(ac.shape)} and {list(bc.shape)} do not match")
    acc = _exact_matmul(ac, bc)
    if bias is not None:
        c = _int_input("Gemm bias", bias).astype(np.int64)
        try:
            acc = acc + c
        except ValueError as exc:
            raise AscendError(f"Gemm bias of shape {list(c.shape)} does not broadcast to {list(acc.shape)}") from exc
    return _finish_int32(acc, on_overflow, "Gemm")


def matmul_int(a, b, *, a_offset: int = 0, b_offset: int = 0, on_overflow: str = "error") -> np.ndarray:
    """Integer MatMul with numpy/ONNX broadcasting semantics, exact INT32."""
    ac = _centered("MatMul A", a, a_offset)
    bc = _centered("MatMul B", b, b_offset)
    if ac.ndim == 0 or bc.ndim == 0:
        raise AscendError("MatMul inputs must have rank >= 1")
    squeeze_a, squeeze_b = ac.ndim == 1, bc.ndim == 1
    if squeeze_a:
        ac = ac[None, :]
    if squeeze_b:
        bc = bc[:, None]
    if ac.shape[-1] != bc.shape[-2]:
        raise AscendError(f"MatMul shapes {list(np.shape(a))} and {list(np.shape(b))} do not match")
    acc = _exact_matmul(ac, bc)
    if squeeze_a:
        acc = acc[..., 0, :]
    if squeeze_b:
        acc = acc[..., 0]
    return _finish_int32(acc, on_overflow, "MatMul")


def avgpool_int(x, kernel_shape: Sequence[int], strides: Sequence[int] | None = None,
                pads: Sequence[int] | None = None, *, ceil_mode: int = 0, count_include_pad: int = 0,
                dilations: Sequence[int] | None = None, auto_pad: str = "NOTSET", x_offset: int = 0) -> np.ndarray:
    """AveragePool of integer codes: exact window sum of ``x - x_offset`` divided in float64.

    Returns float64 (see the module docstring); AscendDequant then applies ``scale_d``.
    """
    xc = _centered("AveragePool input", x, x_offset)
    nd = xc.ndim - 2
    if nd < 1:
        raise AscendError(f"AveragePool input must be [N, C, *spatial], got {list(xc.shape)}")
    kernel = _ints(kernel_shape, nd, 1, "kernel_shape")
    strides = _ints(strides, nd, 1, "strides")
    dilations = _ints(dilations, nd, 1, "dilations")
    ext = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    in_sp = list(xc.shape[2:])
    begin, end = _pool_pads(in_sp, ext, strides, pads, auto_pad)
    extra = [0] * nd
    if ceil_mode:
        for i in range(nd):
            span = in_sp[i] + begin[i] + end[i] - ext[i]
            out = -(-span // strides[i]) + 1
            if (out - 1) * strides[i] >= in_sp[i] + begin[i]:  # last window would start in the right pad
                out -= 1
            extra[i] = max(0, (out - 1) * strides[i] + ext[i] - (in_sp[i] + begin[i] + end[i]))
    # counted region: the input, plus the explicit pads when count_include_pad; never the ceil extra
    ones = np.ones([1, 1] + in_sp, dtype=np.int64)
    if count_include_pad:
        ones = np.pad(ones, [(0, 0), (0, 0)] + [(b, e) for b, e in zip(begin, end)], constant_values=1)
        cb, ce = [0] * nd, extra
    else:
        cb, ce = begin, [e + x_ for e, x_ in zip(end, extra)]
    counts = _windows(ones, kernel, strides, dilations, cb, ce).sum(axis=tuple(range(-nd, 0)))
    ends = [e + x_ for e, x_ in zip(end, extra)]
    sums = _windows(xc, kernel, strides, dilations, begin, ends).sum(axis=tuple(range(-nd, 0)))
    return sums.astype(np.float64) / counts.astype(np.float64)
