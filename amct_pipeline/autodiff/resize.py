"""Resize (opset 10+) and Upsample (opset 7-9) as one linear map per resized axis.

Every supported mode is separable: along an axis of length ``n_in`` resized to ``n_out`` the output
is ``M @ x`` with an ``[n_out, n_in]`` interpolation matrix (one-hot rows for nearest, two taps for
linear, four for cubic). Forward applies the matrices axis by axis (nearest uses a gather, exact);
backward applies their transposes in reverse order.
"""
from __future__ import annotations

import math

import numpy as np

from ._util import as_ints
from .op import Op, register

__all__ = ["interpolation_matrix"]


def _coordinates(n_in: int, n_out: int, scale: float, mode: str) -> np.ndarray:
    x = np.arange(n_out, dtype=np.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if n_out > 1 else np.zeros(n_out)
    if mode == "align_corners":
        return x * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros(n_out)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adjustment = n_out / (scale * n_in)
        offset = n_in / 2 * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    raise ValueError(f"coordinate_transformation_mode {mode!r} is not supported")


def _nearest(x: np.ndarray, mode: str, downsampling: bool) -> np.ndarray:
    if mode == "round_prefer_floor":
        return np.where(x - np.floor(x) == 0.5, np.floor(x), np.round(x))
    if mode == "round_prefer_ceil":
        return np.where(x - np.floor(x) == 0.5, np.ceil(x), np.round(x))
    if mode == "floor":
        return np.floor(x)
    if mode == "ceil":
        return np.ceil(x)
    if mode == "simple":                     # Upsample / Resize-10: onnxruntime's rule
        return np.ceil(x) if downsampling else np.floor(x)
    raise ValueError(f"nearest_mode {mode!r} is not supported")


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


def interpolation_matrix(n_in: int, n_out: int, scale: float, mode: str, coord: str, nearest_mode: str,
                         cubic_a: float = -0.75, exclude_outside: bool = False) -> np.ndarray:
    """The float64 ``[n_out, n_in]`` matrix of one axis."""
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    x = _coordinates(n_in, n_out, scale, coord)
    if mode == "nearest":
        idx = np.clip(_nearest(x, nearest_mode, scale < 1), 0, n_in - 1).astype(np.int64)
        m[rows, idx] = 1.0
    elif mode == "linear":
        x = np.clip(x, 0, n_in - 1)
        x0 = np.floor(x).astype(np.int64)
        x1 = np.minimum(x0 + 1, n_in - 1)
        w1 = x - x0
        np.add.at(m, (rows, x0), 1 - w1)
        np.add.at(m, (rows, x1), w1)
    elif mode == "cubic":
        x0 = np.floor(x).astype(np.int64)
        t = x - x0
        taps = x0[:, None] + np.arange(-1, 3)[None, :]
        w = _cubic(t[:, None] - np.arange(-1, 3)[None, :], cubic_a)
        if exclude_outside:
            w = np.where((taps >= 0) & (taps < n_in), w, 0.0)
            w = w / w.sum(axis=1, keepdims=True)
        np.add.at(m, (np.repeat(rows, 4), np.clip(taps, 0, n_in - 1).reshape(-1)), w.reshape(-1))
    else:
        raise ValueError(f"mode {mode!r} is not supported")
    return m


def _apply(x: np.ndarray, m: np.ndarray, axis: int) -> np.ndarray:
    m = m.astype(x.dtype)
    if axis == x.ndim - 1:
        return np.matmul(x, m.T)
    if axis == x.ndim - 2:
        return np.matmul(m, x)
    return np.moveaxis(np.matmul(m, np.moveaxis(x, axis, -2)), -2, axis)


class _ResizeBase(Op):
    nondiff_inputs = (1, 2, 3)

    def _str(self, key: str, default: str) -> str:
        value = self.attr(key, default)
        return value.decode() if isinstance(value, bytes) else value

    def plan(self, x: np.ndarray, scales, sizes, coord: str, nearest_mode: str):
        """[(axis, matrix or index array)] for the axes that change."""
        mode = self._str("mode", "nearest")
        axes = self.attr("axes")
        axes = list(range(x.ndim)) if axes is None else [int(a) % x.ndim for a in axes]
        full_scales = [1.0] * x.ndim
        out = list(x.shape)
        if sizes is not None and np.size(sizes):
            if self._str("keep_aspect_ratio_policy", "stretch") != "stretch":
                raise self.fail("keep_aspect_ratio_policy other than 'stretch' is not supported")
            for a, s in zip(axes, as_ints(sizes)):
                out[a] = s
                full_scales[a] = s / x.shape[a]
        elif scales is not None and np.size(scales):
            for a, s in zip(axes, np.asarray(scales, dtype=np.float64).reshape(-1)):
                s = float(np.float32(s))
                full_scales[a] = s
                out[a] = int(math.floor(x.shape[a] * s + 1e-9))
        else:
            raise self.fail("needs scales or sizes")
        steps = []
        for a in range(x.ndim):
            if out[a] == x.shape[a] and full_scales[a] == 1.0:
                continue
            m = interpolation_matrix(x.shape[a], out[a], full_scales[a], mode, coord, nearest_mode,
                                     float(self.attr("cubic_coeff_a", -0.75)), bool(self.attr("exclude_outside", 0)))
            steps.append((a, m, mode == "nearest"))
        return steps

    def run(self, x, steps, need):
        y = x
        for axis, m, nearest in steps:
            y = np.take(y, m.argmax(axis=1), axis=axis) if nearest else _apply(y, m, axis)
        if y is x:
            y = np.array(x)
        return [y], ((steps, x.shape) if need is not None else None)

    def backward(self, saved, gys, need):
        steps, shape = saved
        g = gys[0]
        for axis, m, _ in reversed(steps):
            g = _apply(g, m.T, axis)
        return [g.reshape(shape)] + [None] * (len(need) - 1)


@register("Resize")
class Resize(_ResizeBase):
    def forward(self, xs, need):
        x = xs[0]
        if int(self.attr("antialias", 0)):
            raise self.fail("antialias is not supported")
        if self.opset < 11:
            coord, nearest_mode = "asymmetric", "simple"
            scales, sizes = xs[1], None
        else:
            coord = self._str("coordinate_transformation_mode", "half_pixel")
            nearest_mode = self._str("nearest_mode", "round_prefer_floor")
            if coord == "tf_crop_and_resize":
                raise self.fail("coordinate_transformation_mode 'tf_crop_and_resize' is not supported")
            scales = xs[2] if len(xs) > 2 else None
            sizes = xs[3] if len(xs) > 3 else None
        return self.run(x, self.plan(x, scales, sizes, coord, nearest_mode), need)


@register("Upsample")
class Upsample(_ResizeBase):
    def forward(self, xs, need):
        x = xs[0]
        scales = self.attr("scales") if self.opset < 9 else xs[1]
        return self.run(x, self.plan(x, scales, None, "asymmetric", "simple"), need)
