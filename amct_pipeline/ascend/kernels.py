"""Exact integer layers of the deploy model (numpy reference; SPEC 5.3): Conv, ConvTranspose, Gemm,
MatMul and AveragePool on integer codes, accumulated exactly.

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

from typing import Sequence

import numpy as np

from .errors import AscendError
from .ops import integer_input

__all__ = ["conv_int", "conv_transpose_int", "gemm_int", "matmul_int", "avgpool_int"]

_INT32 = np.iinfo(np.int32)
_EXACT = float(2 ** 53)     # float64 sums of integers are exact below this


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
    x = integer_input(name, x).astype(np.int64)
    zp = np.asarray(zero_point)
    if zp.size != 1 or zp != np.round(zp):
        raise AscendError(f"{name} zero point must be one integer, got {zp.ravel().tolist()[:4]}")
    return x - int(zp.reshape(()))


def _bias(bias, n: int, what: str) -> np.ndarray | None:
    if bias is None:
        return None
    b = integer_input(f"{what} bias", bias).astype(np.int64).ravel()
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
    wi = integer_input("Conv weight", w).astype(np.int64)
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
    wi = integer_input("ConvTranspose weight", w).astype(np.int64)
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
        c = integer_input("Gemm bias", bias).astype(np.int64)
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
