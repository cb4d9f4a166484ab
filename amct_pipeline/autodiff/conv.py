"""Convolutions and pooling (NCHW, 1-D lifted to 2-D): im2col + BLAS, depthwise by shifted
multiply-adds, col2im for the input gradient.

Layouts: ``cols[n, c, i, j, h, w] = xp[n, c, h*sh + i*dh, w*sw + j*dw]`` over the padded input
``xp``; a grouped convolution is ``W[g, Cout/g, Cin/g*kh*kw] @ cols[n, g, Cin/g*kh*kw, Ho*Wo]`` (one
GEMM per image and group). Backward recomputes ``cols`` from the saved input rather than keeping
it (it is kh*kw times larger than the input). A depthwise convolution (one input channel per group)
is ``sum_ij xp[..shifted by (i, j)..] * w[:, i, j]``: no copies, kh*kw passes over the output.
"""
from __future__ import annotations

import numpy as np

from ._util import conv_pads, masked
from .op import Op, register

__all__ = ["im2col", "col2im", "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool"]


def _window(start: int, stride: int, count: int) -> slice:
    return slice(start, start + stride * (count - 1) + 1, stride)


def _taps(kernel, strides, dilations, out):
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            yield i, j, (slice(None), slice(None), _window(i * dilations[0], strides[0], out[0]),
                         _window(j * dilations[1], strides[1], out[1]))


def pad2d(x: np.ndarray, begin, end, value=0.0) -> np.ndarray:
    if not any(begin) and not any(end):
        return x
    return np.pad(x, ((0, 0), (0, 0), (begin[0], end[0]), (begin[1], end[1])), constant_values=value)


def im2col(xp: np.ndarray, kernel, strides, dilations, out) -> np.ndarray:
    """``cols[n, c, i, j, h, w]`` (a new contiguous array)."""
    n, c = xp.shape[:2]
    cols = np.empty((n, c, kernel[0], kernel[1], out[0], out[1]), dtype=xp.dtype)
    for i, j, window in _taps(kernel, strides, dilations, out):
        cols[:, :, i, j] = xp[window]
    return cols


def col2im(cols: np.ndarray, padded_shape, kernel, strides, dilations, out) -> np.ndarray:
    """The adjoint of :func:`im2col`: scatter-add ``cols`` into a zero array of ``padded_shape``."""
    xp = np.zeros(padded_shape, dtype=cols.dtype)
    for i, j, window in _taps(kernel, strides, dilations, out):
        xp[window] += cols[:, :, i, j]
    return xp


def _crop(xp: np.ndarray, begin, size) -> np.ndarray:
    if xp.shape[2:] == tuple(size):
        return xp
    return xp[:, :, begin[0]:begin[0] + size[0], begin[1]:begin[1] + size[1]]


_CHUNK = 32768   # output elements per depthwise chunk: its output and temporaries stay in cache


def _depthwise_rows(x4: np.ndarray, w4: np.ndarray, geo) -> tuple[np.ndarray, np.ndarray]:
    """The padded input as rows ``[N*C, Hp, Wp]`` and each row's kernel ``[N*C, kh, kw]``."""
    n, c = x4.shape[:2]
    xp = pad2d(x4, geo["begin"], geo["need"])
    rows = xp.reshape((n * c,) + xp.shape[2:])
    kernels = np.broadcast_to(w4[:, 0], (n,) + w4[:, 0].shape).reshape((n * c,) + w4.shape[2:])
    return rows, kernels


def _chunks(total: int, per_row: int):
    step = max(1, _CHUNK // max(per_row, 1))
    for start in range(0, total, step):
        yield start, min(total, start + step)


def _depthwise_forward(x4, w4, geo) -> np.ndarray:
    """One input channel per group: ``sum_ij xp[..shifted..] * w[c, i, j]``, chunk by chunk of rows."""
    n, c = x4.shape[:2]
    rows, kernels = _depthwise_rows(x4, w4, geo)
    ho, wo = geo["out"]
    y = np.empty((n * c, ho, wo), dtype=np.result_type(x4, w4))
    tmp = np.empty((min(n * c, max(1, _CHUNK // (ho * wo))), ho, wo), dtype=y.dtype)
    taps = [(i, j, window[2:]) for i, j, window in _taps(geo["kernel"], geo["strides"], geo["dilations"], geo["out"])]
    for r0, r1 in _chunks(n * c, ho * wo):
        yc, t, xc = y[r0:r1], tmp[:r1 - r0], rows[r0:r1]
        for k, (i, j, (a, b)) in enumerate(taps):
            wc = kernels[r0:r1, i, j].reshape(-1, 1, 1)
            if k == 0:
                np.multiply(xc[:, a, b], wc, out=yc)
            else:
                np.multiply(xc[:, a, b], wc, out=t)
                yc += t
    return y.reshape(n, c, ho, wo)


def _depthwise_backward(x4, w4, gy, geo, need):
    n, c = gy.shape[:2]
    ho, wo = geo["out"]
    gyr = gy.reshape(n * c, ho, wo)
    taps = [(i, j, window[2:]) for i, j, window in _taps(geo["kernel"], geo["strides"], geo["dilations"], geo["out"])]
    gx = gw = None
    if need[1]:
        rows, _ = _depthwise_rows(x4, np.zeros((c, 1) + tuple(geo["kernel"]), x4.dtype), geo)
        gwr = np.empty((n * c,) + tuple(geo["kernel"]), dtype=gy.dtype)
        for r0, r1 in _chunks(n * c, ho * wo):
            gc, xc = gyr[r0:r1], rows[r0:r1]
            for i, j, (a, b) in taps:
                gwr[r0:r1, i, j] = np.einsum("khw,khw->k", gc, xc[:, a, b])
        gw = gwr.reshape((n, c) + tuple(geo["kernel"])).sum(axis=0)[:, None]
        del rows
    if need[0]:
        (kh, kw), (dh, dw) = geo["kernel"], geo["dilations"]
        h, w = geo["spatial"]
        begin = [(kh - 1) * dh - geo["begin"][0], (kw - 1) * dw - geo["begin"][1]]
        end = [h - ho - begin[0] + (kh - 1) * dh, w - wo - begin[1] + (kw - 1) * dw]
        if geo["strides"] == [1, 1] and min(begin + end) >= 0:
            # stride 1: the input gradient is the correlation of gy with the flipped kernel (a forward)
            full = dict(geo, begin=begin, need=end, out=[h, w])
            return _depthwise_forward(gy, w4[:, :, ::-1, ::-1], full), gw
        _, kernels = _depthwise_rows(np.zeros((n, c, 1, 1), gy.dtype), w4, dict(geo, begin=[0, 0], need=[0, 0]))
        padded = tuple(s + b + e for s, b, e in zip(geo["spatial"], geo["begin"], geo["need"]))
        gxp = np.zeros((n * c,) + padded, dtype=gy.dtype)
        tmp = np.empty((min(n * c, max(1, _CHUNK // (ho * wo))), ho, wo), dtype=gy.dtype)
        for r0, r1 in _chunks(n * c, ho * wo):
            gc, t, gxc = gyr[r0:r1], tmp[:r1 - r0], gxp[r0:r1]
            for i, j, (a, b) in taps:
                np.multiply(gc, kernels[r0:r1, i, j].reshape(-1, 1, 1), out=t)
                gxc[:, a, b] += t
        gx = _crop(gxp.reshape((n, c) + padded), geo["begin"], geo["spatial"])
    return gx, gw


class _Spatial(Op):
    """Attribute handling shared by the windowed operators; 1-D is run as 2-D with a unit axis."""

    kernel_from_weight = False

    def setup(self) -> None:
        self.kernel = [int(k) for k in self.attr("kernel_shape", [])] or None
        self.auto_pad = self.attr("auto_pad", "NOTSET") or "NOTSET"
        if isinstance(self.auto_pad, bytes):
            self.auto_pad = self.auto_pad.decode()
        self.ceil_mode = bool(self.attr("ceil_mode", 0))

    def _rank_check(self, x: np.ndarray) -> None:
        if x.ndim not in (3, 4):
            raise self.fail(f"only 1-D and 2-D windows are supported (input rank {x.ndim})")

    def _lift(self, values, rank: int, default: int) -> list[int]:
        values = [int(v) for v in values] if values is not None else [default] * rank
        return [default] + values if rank == 1 else values

    def geometry(self, x: np.ndarray, kernel) -> dict:
        rank = x.ndim - 2
        strides = self._lift(self.attr("strides"), rank, 1)
        dilations = self._lift(self.attr("dilations"), rank, 1)
        pads = self.attr("pads")
        if pads is not None and rank == 1:
            pads = [0, int(pads[0]), 0, int(pads[1])]
        kernel = [1] + list(kernel) if rank == 1 else list(kernel)
        spatial = list(x.shape[2:]) if rank == 2 else [1, x.shape[2]]
        begin, end, need, out = conv_pads(spatial, kernel, strides, dilations, pads, self.auto_pad, self.ceil_mode)
        return dict(kernel=kernel, strides=strides, dilations=dilations, begin=begin, end=end, need=need,
                    out=out, spatial=spatial)


def _as4d(x: np.ndarray) -> np.ndarray:
    return x[:, :, None, :] if x.ndim == 3 else x


@register("Conv")
class Conv(_Spatial):
    """Four kernels, chosen per call: ``depthwise`` (one input channel per group), ``pointwise``
    (1x1, stride 1, no pad: one GEMM on the input itself), ``shifted`` (stride 1, k > 1, at least
    ``SHIFTED_MIN_CHANNELS`` input channels per group: one GEMM per kernel tap on the flattened padded
    input, no im2col copy) and ``im2col``."""

    SHIFTED_MIN_CHANNELS = 8

    def forward(self, xs, need):
        x, w = xs[0], xs[1]
        b = xs[2] if len(xs) > 2 else None
        self._rank_check(x)
        rank1 = x.ndim == 3
        x4, w4 = _as4d(x), _as4d(w)
        geo = self.geometry(x, w.shape[2:])
        group = int(self.attr("group", 1))
        geo["method"] = self._method(x4, w4, group, geo)
        y = getattr(self, "_forward_" + geo["method"])(x4, w4, group, geo)
        if b is not None:
            y += b.reshape(1, -1, 1, 1).astype(y.dtype, copy=False)
        saved = None
        if need is not None:
            saved = (x4 if need[1] else None, w4 if need[0] else None, geo, group, x.shape, w.shape, rank1)
        return [y[:, :, 0, :] if rank1 else y], saved

    def _method(self, x4, w4, group, geo) -> str:
        if group > 1 and group == x4.shape[1] and w4.shape[0] == group and w4.shape[1] == 1:
            return "depthwise"
        if geo["strides"] == [1, 1]:
            if geo["kernel"] == [1, 1] and not any(geo["begin"]) and geo["out"] == geo["spatial"]:
                return "pointwise"
            if w4.shape[1] >= self.SHIFTED_MIN_CHANNELS:
                return "shifted"
        return "im2col"

    # -- forward kernels -------------------------------------------------------------------------
    @staticmethod
    def _forward_depthwise(x4, w4, group, geo):
        return _depthwise_forward(x4, w4, geo)

    @staticmethod
    def _cols(x4, group, geo) -> np.ndarray:
        n, c = x4.shape[:2]
        if geo["method"] == "pointwise":
            return x4.reshape(n, group, c // group, -1)
        xp = pad2d(x4, geo["begin"], geo["need"])
        cols = im2col(xp, geo["kernel"], geo["strides"], geo["dilations"], geo["out"])
        return cols.reshape(n, group, -1, geo["out"][0] * geo["out"][1])

    def _forward_im2col(self, x4, w4, group, geo):
        n, cout = x4.shape[0], w4.shape[0]
        y = np.matmul(w4.reshape(group, cout // group, -1), self._cols(x4, group, geo))
        return y.reshape((n, cout) + tuple(geo["out"]))

    _forward_pointwise = _forward_im2col

    @staticmethod
    def _flat(x4, group, geo):
        """The padded input flattened per channel ``[N, g, Cin/g, Hp*Wp]`` (one spare row at the bottom:
        a tap's window may run (kw-1)*dw elements past the last row), its row width, and the window length."""
        n, c = x4.shape[:2]
        xp = pad2d(x4, geo["begin"], [geo["need"][0] + 1, geo["need"][1]])
        hp, wp = xp.shape[2:]
        return xp.reshape(n, group, c // group, hp * wp), wp, geo["out"][0] * wp

    @staticmethod
    def _offsets(geo, wp):
        (kh, kw), (dh, dw) = geo["kernel"], geo["dilations"]
        return [(i, j, i * dh * wp + j * dw) for i in range(kh) for j in range(kw)]

    def _forward_shifted(self, x4, w4, group, geo):
        n, cout = x4.shape[0], w4.shape[0]
        flat, wp, length = self._flat(x4, group, geo)
        wt = w4.reshape((group, cout // group) + w4.shape[1:])
        y = tmp = None
        for i, j, off in self._offsets(geo, wp):
            if y is None:
                y = np.matmul(wt[..., i, j], flat[..., off:off + length])
            else:
                tmp = np.matmul(wt[..., i, j], flat[..., off:off + length], out=tmp)
                y += tmp
        ho, wo = geo["out"]
        return np.ascontiguousarray(y.reshape(n, cout, ho, wp)[..., :wo])

    # -- backward --------------------------------------------------------------------------------
    def backward(self, saved, gys, need):
        x4, w4, geo, group, xshape, wshape, rank1 = saved
        gy = gys[0]
        if rank1:
            gy = gy[:, :, None, :]
        gb = gy.sum(axis=(0, 2, 3)) if len(need) > 2 and need[2] else None
        method = geo["method"]
        if method == "depthwise":
            gx, gw = _depthwise_backward(x4, w4, gy, geo, need)
        elif method == "shifted":
            gx, gw = self._backward_shifted(x4, w4, gy, group, geo, need)
        else:
            gx, gw = self._backward_im2col(x4, w4, gy, group, geo, need)
        if gx is not None:
            gx = gx.reshape(xshape)
        if gw is not None:
            gw = gw.reshape(wshape)
        return [gx, gw, gb][:len(need)]

    def _backward_im2col(self, x4, w4, gy, group, geo, need):
        n, cout = gy.shape[:2]
        gy4 = gy.reshape(n, group, cout // group, -1)
        gx = gw = None
        if need[1]:
            gw = np.matmul(gy4, self._cols(x4, group, geo).swapaxes(-1, -2)).sum(axis=0)
        if need[0]:
            gcols = np.matmul(w4.reshape(group, cout // group, -1).swapaxes(-1, -2), gy4)
            c = w4.shape[1] * group
            if geo["method"] == "pointwise":
                gx = gcols.reshape((n, c) + tuple(geo["spatial"]))
            else:
                gcols = gcols.reshape((n, c) + tuple(geo["kernel"]) + tuple(geo["out"]))
                padded = (n, c) + tuple(s + b + e for s, b, e in zip(geo["spatial"], geo["begin"], geo["need"]))
                gx = _crop(col2im(gcols, padded, geo["kernel"], geo["strides"], geo["dilations"], geo["out"]),
                           geo["begin"], geo["spatial"])
        return gx, gw

    def _backward_shifted(self, x4, w4, gy, group, geo, need):
        n, cout = gy.shape[:2]
        ho, wo = geo["out"]
        padded = (geo["spatial"][0] + geo["begin"][0] + geo["need"][0] + 1,
                  geo["spatial"][1] + geo["begin"][1] + geo["need"][1])
        wp = padded[1]
        length = ho * wp
        gext = np.zeros((n, cout, ho, wp), dtype=gy.dtype)     # gradient on the row-padded output grid
        gext[..., :wo] = gy
        gext = gext.reshape(n, group, cout // group, length)
        offsets = self._offsets(geo, wp)
        gx = gw = None
        if need[1]:
            flat, _, _ = self._flat(x4, group, geo)
            kh, kw = geo["kernel"]
            gw = np.empty((group, cout // group, flat.shape[2], kh, kw), dtype=gy.dtype)
            for i, j, off in offsets:
                gw[..., i, j] = np.matmul(gext, flat[..., off:off + length].swapaxes(-1, -2)).sum(axis=0)
            del flat
        if need[0]:
            cin_g = w4.shape[1]
            wt = w4.reshape((group, cout // group) + w4.shape[1:])
            gflat = np.zeros((n, group, cin_g, padded[0] * padded[1]), dtype=gy.dtype)
            tmp = None
            for i, j, off in offsets:
                tmp = np.matmul(wt[..., i, j].swapaxes(-1, -2), gext, out=tmp)
                gflat[..., off:off + length] += tmp
            gx = _crop(gflat.reshape((n, group * cin_g) + padded), geo["begin"], geo["spatial"])
        return gx, gw


@register("ConvTranspose")
class ConvTranspose(_Spatial):
    def forward(self, xs, need):
        x, w = xs[0], xs[1]
        b = xs[2] if len(xs) > 2 else None
        self._rank_check(x)
        rank1 = x.ndim == 3
        x4, w4 = _as4d(x), _as4d(w)
        geo = self._geometry(x4, w4, rank1)
        group = int(self.attr("group", 1))
        n, cin, h, wd = x4.shape
        cog = w4.shape[1]
        wm = w4.reshape(group, cin // group, -1)
        cols = np.matmul(wm.swapaxes(-1, -2), x4.reshape(n, group, cin // group, h * wd))
        cols = cols.reshape((n, cog * group) + tuple(geo["kernel"]) + (h, wd))
        buf = col2im(cols, (n, cog * group) + tuple(geo["buffer"]), geo["kernel"], geo["strides"],
                     geo["dilations"], (h, wd))
        del cols
        y = np.ascontiguousarray(_crop(buf, geo["begin"], geo["out"]))
        if b is not None:
            y += b.reshape(1, -1, 1, 1).astype(y.dtype, copy=False)
        saved = None
        if need is not None:
            saved = (x4 if need[1] else None, w4 if need[0] else None, geo, group, x.shape, w.shape, rank1)
        return [y[:, :, 0, :] if rank1 else y], saved

    def _geometry(self, x4, w4, rank1) -> dict:
        lift = (lambda v, d: self._lift(v, 1 if rank1 else 2, d))
        strides = lift(self.attr("strides"), 1)
        dilations = lift(self.attr("dilations"), 1)
        out_pad = lift(self.attr("output_padding"), 0)
        kernel = list(w4.shape[2:])
        spatial = list(x4.shape[2:])
        full = [s * (n - 1) + (k - 1) * d + 1 for s, n, k, d in zip(strides, spatial, kernel, dilations)]
        output_shape = self.attr("output_shape")
        pads = self.attr("pads")
        if pads is not None and rank1:
            pads = [0, int(pads[0]), 0, int(pads[1])]
        if output_shape is None and self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            output_shape = [n * s for n, s in zip(spatial, strides)]
        if output_shape is not None:
            output_shape = [int(v) for v in output_shape][-(1 if rank1 else 2):]
            if rank1:
                output_shape = [1] + output_shape
            begin = []
            for f, p, o in zip(full, out_pad, output_shape):
                total = f + p - o
                if total < 0:
                    raise self.fail(f"output_shape {output_shape} needs negative padding")
                begin.append(total // 2 if self.auto_pad == "SAME_UPPER" else total - total // 2)
            out = list(output_shape)
        else:
            begin = [int(pads[i]) for i in range(2)] if pads is not None else [0, 0]
            end = [int(pads[i + 2]) for i in range(2)] if pads is not None else [0, 0]
            out = [f + p - b - e for f, p, b, e in zip(full, out_pad, begin, end)]
        buffer = [max(f + p, b + o) for f, p, b, o in zip(full, out_pad, begin, out)]
        return dict(kernel=kernel, strides=strides, dilations=dilations, begin=begin, out=out, buffer=buffer,
                    spatial=spatial)

    def backward(self, saved, gys, need):
        x4, w4, geo, group, xshape, wshape, rank1 = saved
        gy = gys[0]
        if rank1:
            gy = gy[:, :, None, :]
        n, cout = gy.shape[:2]
        gbuf = np.zeros((n, cout) + tuple(geo["buffer"]), dtype=gy.dtype)
        b0, b1 = geo["begin"]
        gbuf[:, :, b0:b0 + geo["out"][0], b1:b1 + geo["out"][1]] = gy
        gcols = im2col(gbuf, geo["kernel"], geo["strides"], geo["dilations"], geo["spatial"])
        del gbuf
        h, wd = geo["spatial"]
        gcols = gcols.reshape(n, group, -1, h * wd)
        gx = gw = gb = None
        if need[0]:
            cin = w4.shape[0]
            gx = np.matmul(w4.reshape(group, cin // group, -1), gcols).reshape(xshape)
        if need[1]:
            cin = x4.shape[1]
            xm = x4.reshape(n, group, cin // group, h * wd)
            gw = np.matmul(xm, gcols.swapaxes(-1, -2)).sum(axis=0).reshape(wshape)
        if len(need) > 2 and need[2]:
            gb = gy.sum(axis=(0, 2, 3))
        return [gx, gw, gb][:len(need)]


class _Pool(_Spatial):
    def geometry_for(self, x):
        self._rank_check(x)
        kernel = self.kernel
        if kernel is None:
            raise self.fail("kernel_shape is required")
        return self.geometry(x, kernel)


@register("MaxPool")
class MaxPool(_Pool):
    nondiff_outputs = (1,)

    def forward(self, xs, need):
        x = xs[0]
        geo = self.geometry_for(x)
        rank1 = x.ndim == 3
        x4 = _as4d(x)
        if int(self.attr("storage_order", 0)) and self.n_outputs > 1:
            raise self.fail("storage_order=1 indices are not supported")
        fill = -np.inf if x4.dtype.kind == "f" else np.iinfo(x4.dtype).min
        xp = pad2d(x4, geo["begin"], geo["need"], fill)
        record = need is not None or self.n_outputs > 1
        taps = list(_taps(geo["kernel"], geo["strides"], geo["dilations"], geo["out"]))
        y = np.array(xp[taps[0][2]])
        idx = np.zeros(y.shape, dtype=np.int16 if len(taps) < 32767 else np.int32) if record else None
        for t, (_, _, window) in enumerate(taps[1:], start=1):
            v = xp[window]
            if record:
                mask = v > y
                idx[mask] = t
                np.copyto(y, v, where=mask)
            else:
                np.maximum(y, v, out=y)
        outs = [y[:, :, 0, :] if rank1 else y]
        if self.n_outputs > 1:
            outs.append(self._indices(idx, geo, x4.shape, rank1))
        saved = (idx, geo, x.shape, x4.shape) if need is not None else None
        return outs, saved

    @staticmethod
    def _indices(idx, geo, shape4, rank1):
        n, c, h, w = shape4
        kw = geo["kernel"][1]
        ti, tj = idx // kw, idx % kw
        oh = np.arange(geo["out"][0]).reshape(-1, 1) * geo["strides"][0]
        ow = np.arange(geo["out"][1]).reshape(1, -1) * geo["strides"][1]
        rows = oh + ti * geo["dilations"][0] - geo["begin"][0]
        cols = ow + tj * geo["dilations"][1] - geo["begin"][1]
        base = (np.arange(n).reshape(-1, 1, 1, 1) * c + np.arange(c).reshape(1, -1, 1, 1)) * (h * w)
        flat = (base + rows * w + cols).astype(np.int64)
        return flat[:, :, 0, :] if rank1 else flat

    def backward(self, saved, gys, need):
        idx, geo, xshape, shape4 = saved
        gy = gys[0]
        if len(xshape) == 3:
            gy = gy[:, :, None, :]
        n, c = shape4[:2]
        padded = (n, c) + tuple(s + b + e for s, b, e in zip(geo["spatial"], geo["begin"], geo["need"]))
        gxp = np.zeros(padded, dtype=gy.dtype)
        for t, (_, _, window) in enumerate(_taps(geo["kernel"], geo["strides"], geo["dilations"], geo["out"])):
            gxp[window] += masked(gy, idx == t)
        return [_crop(gxp, geo["begin"], geo["spatial"]).reshape(xshape)]


@register("AveragePool")
class AveragePool(_Pool):
    def forward(self, xs, need):
        x = xs[0]
        geo = self.geometry_for(x)
        rank1 = x.ndim == 3
        x4 = _as4d(x)
        xp = pad2d(x4, geo["begin"], geo["need"])
        y = None
        for _, _, window in _taps(geo["kernel"], geo["strides"], geo["dilations"], geo["out"]):
            y = np.array(xp[window]) if y is None else np.add(y, xp[window], out=y)
        count = self._count(geo, y.dtype)
        y /= count
        saved = (geo, count, x.shape, x4.shape) if need is not None else None
        return [y[:, :, 0, :] if rank1 else y], saved

    def _count(self, geo, dtype) -> np.ndarray:
        """How many input (or declared-pad, with count_include_pad) positions each window covers."""
        include = bool(self.attr("count_include_pad", 0))
        axes = []
        for a in range(2):
            lo, hi = (0, geo["begin"][a] + geo["spatial"][a] + geo["end"][a]) if include else (
                geo["begin"][a], geo["begin"][a] + geo["spatial"][a])
            starts = np.arange(geo["out"][a]) * geo["strides"][a]
            taps = starts[:, None] + np.arange(geo["kernel"][a])[None, :] * geo["dilations"][a]
            axes.append(((taps >= lo) & (taps < hi)).sum(axis=1))
        return np.maximum(np.outer(axes[0], axes[1]), 1).astype(dtype)

    def backward(self, saved, gys, need):
        geo, count, xshape, shape4 = saved
        gy = gys[0]
        if len(xshape) == 3:
            gy = gy[:, :, None, :]
        g = gy / count
        n, c = shape4[:2]
        padded = (n, c) + tuple(s + b + e for s, b, e in zip(geo["spatial"], geo["begin"], geo["need"]))
        gxp = col2im(np.broadcast_to(g[:, :, None, None], (n, c) + tuple(geo["kernel"]) + g.shape[2:]),
                     padded, geo["kernel"], geo["strides"], geo["dilations"], geo["out"])
        return [_crop(gxp, geo["begin"], geo["spatial"]).reshape(xshape)]


@register("GlobalAveragePool")
class GlobalAveragePool(Op):
    def forward(self, xs, need):
        x = xs[0]
        axes = tuple(range(2, x.ndim))
        return [x.mean(axis=axes, keepdims=True)], (x.shape if need is not None else None)

    def backward(self, saved, gys, need):
        shape = saved
        count = int(np.prod(shape[2:]))
        return [np.broadcast_to(gys[0] / gys[0].dtype.type(count), shape).copy()]


@register("GlobalMaxPool")
class GlobalMaxPool(Op):
    def forward(self, xs, need):
        x = xs[0]
        axes = tuple(range(2, x.ndim))
        y = x.max(axis=axes, keepdims=True)
        return [y], ((x, y) if need is not None else None)

    def backward(self, saved, gys, need):
        x, y = saved
        mask = x == y
        first = np.cumsum(mask.reshape(x.shape[0], x.shape[1], -1), axis=-1).reshape(x.shape) == 1
        return [masked(gys[0], mask & first)]
