"""Shape and data movement (Reshape ... Pad) and the non-differentiable shape helpers: forward and VJP.

Slice before opset 10 takes attributes; axes of Squeeze / Unsqueeze (13) and Split (18) move from
attributes to inputs.
"""
from __future__ import annotations

import numpy as np

from ._util import as_ints, axes_of, np_dtype, optional, unbroadcast
from .op import Op, register

__all__: list[str] = []


# -- shape and data movement ------------------------------------------------------------------

class _ViewOp(Op):
    """Shape-only operators: gradient = output gradient reshaped back."""

    def forward(self, xs, need):
        x = xs[0]
        return [self.apply(x, xs)], (x.shape if need is not None else None)

    def backward(self, saved, gys, need):
        return [gys[0].reshape(saved)] + [None] * (len(need) - 1)


@register("Reshape")
class Reshape(_ViewOp):
    nondiff_inputs = (1,)

    def apply(self, x, xs):
        if self.opset < 5:
            shape = as_ints(self.attr("shape"))
        else:
            shape = as_ints(xs[1])
        if not int(self.attr("allowzero", 0)):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)


@register("Flatten")
class Flatten(_ViewOp):
    def apply(self, x, xs):
        axis = int(self.attr("axis", 1))
        axis = axis % x.ndim if axis < 0 else axis
        return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


@register("Squeeze")
class Squeeze(_ViewOp):
    nondiff_inputs = (1,)

    def apply(self, x, xs):
        axes = axes_of(self, xs, 13)
        if axes is None:
            return np.squeeze(x)
        return np.squeeze(x, tuple(a % x.ndim for a in axes))


@register("Unsqueeze")
class Unsqueeze(_ViewOp):
    nondiff_inputs = (1,)

    def apply(self, x, xs):
        axes = axes_of(self, xs, 13)
        rank = x.ndim + len(axes)
        return np.expand_dims(x, tuple(sorted(a % rank for a in axes)))


@register("Transpose")
class Transpose(Op):
    def forward(self, xs, need):
        x = xs[0]
        perm = self.attr("perm")
        perm = list(range(x.ndim))[::-1] if perm is None else [int(p) for p in perm]
        return [np.transpose(x, perm)], (perm if need is not None else None)

    def backward(self, saved, gys, need):
        return [np.transpose(gys[0], np.argsort(saved))]


class _BlockShuffle(Op):
    """DepthToSpace / SpaceToDepth: reshape, transpose, reshape; backward inverts the three."""

    def forward(self, xs, need):
        x = xs[0]
        mid, perm, out = self.plan(x.shape)
        y = x.reshape(mid).transpose(perm).reshape(out)
        return [y], ((x.shape, mid, perm) if need is not None else None)

    def backward(self, saved, gys, need):
        shape, mid, perm = saved
        g = gys[0].reshape([mid[p] for p in perm]).transpose(np.argsort(perm))
        return [g.reshape(shape)]


@register("DepthToSpace")
class DepthToSpace(_BlockShuffle):
    def plan(self, shape):
        n, c, h, w = shape
        b = int(self.attr("blocksize"))
        mode = self.attr("mode", "DCR")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "CRD":
            return (n, c // (b * b), b, b, h, w), (0, 1, 4, 2, 5, 3), (n, c // (b * b), h * b, w * b)
        return (n, b, b, c // (b * b), h, w), (0, 3, 4, 1, 5, 2), (n, c // (b * b), h * b, w * b)


@register("SpaceToDepth")
class SpaceToDepth(_BlockShuffle):
    def plan(self, shape):
        n, c, h, w = shape
        b = int(self.attr("blocksize"))
        return (n, c, h // b, b, w // b, b), (0, 3, 5, 1, 2, 4), (n, c * b * b, h // b, w // b)


@register("Concat")
class Concat(Op):
    def forward(self, xs, need):
        axis = int(self.attr("axis")) % max(xs[0].ndim, 1)
        y = np.concatenate(xs, axis=axis)
        return [y], (([x.shape[axis] for x in xs], axis) if need is not None else None)

    def backward(self, saved, gys, need):
        sizes, axis = saved
        cuts = np.cumsum(sizes)[:-1]
        parts = np.split(gys[0], cuts, axis=axis)
        return [p if n else None for p, n in zip(parts, need)]


@register("Split")
class Split(Op):
    nondiff_inputs = (1,)

    def forward(self, xs, need):
        x = xs[0]
        axis = int(self.attr("axis", 0)) % x.ndim
        split = self.attr("split") if self.opset < 13 else optional(xs, 1)
        n = x.shape[axis]
        if split is not None:
            sizes = as_ints(split)
        elif self.attr("num_outputs") is not None:
            k = int(self.attr("num_outputs"))
            chunk = -(-n // k)
            sizes = [min(chunk, n - i * chunk) for i in range(k)]
        else:
            sizes = [n // self.n_outputs] * self.n_outputs
        parts = np.split(x, np.cumsum(sizes)[:-1], axis=axis)
        return parts, ((x.shape, sizes, axis) if need is not None else None)

    def backward(self, saved, gys, need):
        shape, sizes, axis = saved
        parts = []
        for g, size in zip(gys, sizes):
            if g is None:
                part_shape = list(shape)
                part_shape[axis] = size
                g = np.zeros(part_shape, dtype=next(v.dtype for v in gys if v is not None))
            parts.append(g)
        return [np.concatenate(parts, axis=axis)] + [None] * (len(need) - 1)


@register("Slice")
class Slice(Op):
    nondiff_inputs = (1, 2, 3, 4)

    def forward(self, xs, need):
        x = xs[0]
        if self.opset < 10:
            starts, ends = as_ints(self.attr("starts")), as_ints(self.attr("ends"))
            axes = self.attr("axes")
            steps = None
        else:
            starts, ends = as_ints(xs[1]), as_ints(xs[2])
            axes, steps = optional(xs, 3), optional(xs, 4)
        axes = list(range(len(starts))) if axes is None else [a % x.ndim for a in as_ints(axes)]
        steps = [1] * len(starts) if steps is None else as_ints(steps)
        index = [slice(None)] * x.ndim
        for a, s, e, st in zip(axes, starts, ends, steps):
            index[a] = slice(s, e, st)
        index = tuple(index)
        return [x[index]], ((x.shape, x.dtype, index) if need is not None else None)

    def backward(self, saved, gys, need):
        shape, dtype, index = saved
        g = np.zeros(shape, dtype=gys[0].dtype)
        g[index] = gys[0]
        return [g] + [None] * (len(need) - 1)


@register("Gather")
class Gather(Op):
    nondiff_inputs = (1,)

    def forward(self, xs, need):
        data, idx = xs
        axis = int(self.attr("axis", 0)) % data.ndim
        idx = np.asarray(idx).astype(np.int64)
        return [np.take(data, idx, axis=axis)], ((data.shape, idx, axis) if need is not None else None)

    def backward(self, saved, gys, need):
        shape, idx, axis = saved
        g = np.zeros(shape, dtype=gys[0].dtype)
        gm = np.moveaxis(g, axis, 0)
        gy = np.moveaxis(gys[0], tuple(range(axis, axis + idx.ndim)), tuple(range(idx.ndim)))
        np.add.at(gm, np.where(idx < 0, idx + shape[axis], idx), gy)
        return [g, None]


@register("Expand")
class Expand(Op):
    nondiff_inputs = (1,)

    def forward(self, xs, need):
        x, shape = xs
        out = np.broadcast_shapes(x.shape, tuple(as_ints(shape)))
        return [np.broadcast_to(x, out).copy()], (x.shape if need is not None else None)

    def backward(self, saved, gys, need):
        return [unbroadcast(gys[0], saved), None]


@register("Tile")
class Tile(Op):
    nondiff_inputs = (1,)

    def forward(self, xs, need):
        x, reps = xs
        reps = as_ints(reps)
        return [np.tile(x, reps)], ((x.shape, reps) if need is not None else None)

    def backward(self, saved, gys, need):
        shape, reps = saved
        split = []
        for r, s in zip(reps, shape):
            split += [r, s]
        g = gys[0].reshape(split).sum(axis=tuple(range(0, 2 * len(shape), 2)))
        return [g, None]


@register("Pad")
class Pad(Op):
    nondiff_inputs = (1, 2, 3)

    def forward(self, xs, need):
        x = xs[0]
        mode = self.attr("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if self.opset < 11:
            pads, value, axes = as_ints(self.attr("pads")), float(self.attr("value", 0.0)), None
        else:
            pads = as_ints(xs[1])
            value = optional(xs, 2)
            value = 0 if value is None or np.size(value) == 0 else np.asarray(value).reshape(()).item()
            axes = optional(xs, 3)
        axes = list(range(x.ndim)) if axes is None else [a % x.ndim for a in as_ints(axes)]
        k = len(axes)
        begin, end = [0] * x.ndim, [0] * x.ndim
        for i, a in enumerate(axes):
            begin[a], end[a] = pads[i], pads[i + k]
        index = tuple(slice(max(-b, 0), n - max(-e, 0)) for b, e, n in zip(begin, end, x.shape))
        cropped = x[index]
        widths = [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)]
        if mode == "constant":
            y = np.pad(cropped, widths, constant_values=value)
            maps = None
        else:
            maps = [self._map(n, b, e, mode) for n, (b, e) in zip(cropped.shape, widths)]
            y = cropped
            for a, m in enumerate(maps):
                y = np.take(y, m, axis=a)
        return [y], ((x.shape, index, widths, maps) if need is not None else None)

    @staticmethod
    def _map(n, b, e, mode):
        i = np.arange(-b, n + e)
        if mode == "edge":
            return np.clip(i, 0, n - 1)
        if mode == "wrap":
            return i % n
        if mode == "reflect":
            period = 2 * (n - 1) if n > 1 else 1
            i = np.abs(i) % period
            return np.where(i >= n, period - i, i)
        raise ValueError(mode)

    def backward(self, saved, gys, need):
        shape, index, widths, maps = saved
        g = gys[0]
        if maps is None:
            g = g[tuple(slice(b, g.shape[a] - e) for a, (b, e) in enumerate(widths))]
        else:
            for a in reversed(range(len(maps))):
                m = maps[a]
                n = int(m.max()) + 1 if m.size else 0
                acc = np.zeros(g.shape[:a] + (n,) + g.shape[a + 1:], dtype=g.dtype)
                np.add.at(np.moveaxis(acc, a, 0), m, np.moveaxis(g, a, 0))
                g = acc
        full = np.zeros(shape, dtype=g.dtype)
        full[index] = g
        return [full] + [None] * (len(need) - 1)


# -- non-differentiable helpers (shape arithmetic, constants, comparisons) ---------------------

class _NoGrad(Op):
    differentiable = False

    def backward(self, saved, gys, need):  # pragma: no cover - never called
        return [None] * len(need)


@register("Shape")
class Shape(_NoGrad):
    def forward(self, xs, need):
        shape = xs[0].shape
        start = int(self.attr("start", 0))
        end = self.attr("end")
        return [np.array(shape[start:None if end is None else int(end)], dtype=np.int64)], None


@register("Size")
class Size(_NoGrad):
    def forward(self, xs, need):
        return [np.array(xs[0].size, dtype=np.int64)], None


@register("Constant")
class Constant(_NoGrad):
    def forward(self, xs, need):
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                           ("value_ints", np.int64)):
            if key in self.attrs:
                return [np.asarray(self.attrs[key], dtype=dtype)], None
        if "value" not in self.attrs:
            raise self.fail("only numeric Constant values are supported")
        return [np.asarray(self.attrs["value"])], None


@register("ConstantOfShape")
class ConstantOfShape(_NoGrad):
    def forward(self, xs, need):
        value = self.attr("value")
        value = np.zeros(1, np.float32) if value is None else np.asarray(value)
        return [np.full(as_ints(xs[0]), value.reshape(-1)[0], dtype=value.dtype)], None


@register("Range")
class Range(_NoGrad):
    def forward(self, xs, need):
        start, limit, delta = (np.asarray(v).reshape(()) for v in xs)
        return [np.arange(start, limit, delta, dtype=np.result_type(start, limit, delta))], None


class _Compare(_NoGrad):
    def forward(self, xs, need):
        return [self.fn(*xs)], None


for _name, _fn in (("Equal", np.equal), ("Less", np.less), ("Greater", np.greater), ("LessOrEqual", np.less_equal),
                   ("GreaterOrEqual", np.greater_equal), ("Not", np.logical_not), ("And", np.logical_and),
                   ("Or", np.logical_or)):
    register(_name)(type(_name, (_Compare,), {"fn": staticmethod(_fn), "op_type": _name}))


@register("Cast")
class Cast(Op):
    def setup(self):
        self.to = np_dtype(self.attr("to"))
        self.differentiable = self.to.kind == "f"

    def forward(self, xs, need):
        x = xs[0]
        return [x.astype(self.to)], (x.dtype if need is not None else None)

    def backward(self, saved, gys, need):
        return [gys[0].astype(saved) if saved.kind == "f" else None]


@register("Where")
class Where(Op):
    nondiff_inputs = (0,)

    def forward(self, xs, need):
        c, a, b = xs
        return [np.where(c, a, b)], ((c, a.shape, b.shape) if need is not None else None)

    def backward(self, saved, gys, need):
        c, sa, sb = saved
        g = gys[0]
        zero = g.dtype.type(0)
        return [None, unbroadcast(np.where(c, g, zero), sa) if need[1] else None,
                unbroadcast(np.where(c, zero, g), sb) if need[2] else None]
