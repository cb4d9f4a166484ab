"""Softmax, normalisations, reductions and matrix products: forward and VJP.

Softmax before opset 13 coerces to 2-D; axes of ReduceSum (13) and ReduceMean (18) move from
attributes to inputs.
"""
from __future__ import annotations

import numpy as np

from ._util import axes_of, optional, unbroadcast
from .op import Op, register

__all__: list[str] = []


# -- normalisation, softmax, reductions --------------------------------------------------------

class _SoftmaxBase(Op):
    def _view(self, x):
        """(2-D-or-original view, axis) per the opset's axis rule."""
        if self.opset < 13:
            axis = int(self.attr("axis", 1)) % max(x.ndim, 1)
            lead = int(np.prod(x.shape[:axis], dtype=np.int64))
            return x.reshape(lead, -1), 1
        return x, int(self.attr("axis", -1)) % max(x.ndim, 1)


@register("Softmax")
class Softmax(_SoftmaxBase):
    def forward(self, xs, need):
        x = xs[0]
        v, axis = self._view(x)
        e = np.exp(v - v.max(axis=axis, keepdims=True))
        y = (e / e.sum(axis=axis, keepdims=True)).reshape(x.shape)
        return [y], (y if need is not None else None)

    def backward(self, saved, gys, need):
        y = saved
        yv, axis = self._view(y)
        gv = gys[0].reshape(yv.shape)
        return [(yv * (gv - (gv * yv).sum(axis=axis, keepdims=True))).reshape(y.shape)]


@register("LogSoftmax")
class LogSoftmax(_SoftmaxBase):
    def forward(self, xs, need):
        x = xs[0]
        v, axis = self._view(x)
        s = v - v.max(axis=axis, keepdims=True)
        y = (s - np.log(np.exp(s).sum(axis=axis, keepdims=True))).reshape(x.shape)
        return [y], (y if need is not None else None)

    def backward(self, saved, gys, need):
        y = saved
        yv, axis = self._view(y)
        gv = gys[0].reshape(yv.shape)
        return [(gv - np.exp(yv) * gv.sum(axis=axis, keepdims=True)).reshape(y.shape)]


@register("BatchNormalization")
class BatchNormalization(Op):
    """Inference form: ``(x - mean) / sqrt(var + eps) * scale + B`` with the stored statistics."""

    nondiff_outputs = (1, 2, 3, 4)

    def setup(self):
        if int(self.attr("training_mode", 0)) or self.n_outputs > 1:
            raise self.fail("only the inference form (one output, training_mode=0) is supported")
        self.eps = float(self.attr("epsilon", 1e-5))

    def forward(self, xs, need):
        x, scale, b, mean, var = xs
        shape = (1, -1) + (1,) * (x.ndim - 2)
        dt = x.dtype
        inv = (1 / np.sqrt(var.astype(dt) + dt.type(self.eps))).reshape(shape)
        k = scale.astype(dt).reshape(shape) * inv
        y = (x - mean.astype(dt).reshape(shape)) * k + b.astype(dt).reshape(shape)
        saved = (x, scale, mean, inv, k) if need is not None else None
        return [y], saved

    def backward(self, saved, gys, need):
        x, scale, mean, inv, k = saved
        g = gys[0]
        axes = (0,) + tuple(range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        out = [g * k if need[0] else None]
        centered = (x - mean.astype(x.dtype).reshape(shape)) if (need[1] or need[4]) else None
        out.append((g * centered * inv).sum(axis=axes).astype(scale.dtype) if need[1] else None)
        out.append(g.sum(axis=axes) if need[2] else None)
        out.append(-(g.sum(axis=axes)) * k.reshape(-1) if need[3] else None)
        out.append((g * centered).sum(axis=axes) * k.reshape(-1) * (-0.5) * inv.reshape(-1) ** 2 if need[4] else None)
        return out


@register("LayerNormalization")
class LayerNormalization(Op):
    nondiff_outputs = (1, 2)

    def forward(self, xs, need):
        x, scale = xs[0], xs[1]
        b = optional(xs, 2)
        axis = int(self.attr("axis", -1)) % x.ndim
        axes = tuple(range(axis, x.ndim))
        eps = float(self.attr("epsilon", 1e-5))
        mu = x.mean(axis=axes, keepdims=True)
        centered = x - mu
        var = (centered * centered).mean(axis=axes, keepdims=True)
        r = 1 / np.sqrt(var + x.dtype.type(eps))
        xhat = centered * r
        y = xhat * scale
        if b is not None:
            y = y + b
        outs = [y, mu, r][:self.n_outputs]
        saved = (xhat, r, scale, axes, b.shape if b is not None else None) if need is not None else None
        return outs, saved

    def backward(self, saved, gys, need):
        xhat, r, scale, axes, bshape = saved
        g = gys[0]
        out = [None, None, None][:len(need)]
        if need[0]:
            gxhat = g * scale
            out[0] = r * (gxhat - gxhat.mean(axis=axes, keepdims=True)
                          - xhat * (gxhat * xhat).mean(axis=axes, keepdims=True))
        if need[1]:
            out[1] = unbroadcast(g * xhat, scale.shape)
        if len(need) > 2 and need[2]:
            out[2] = unbroadcast(g, bshape)
        return out


class _Reduce(Op):
    nondiff_inputs = (1,)
    axes_input_since = 18

    def _axes_for(self, xs):
        axes = axes_of(self, xs, self.axes_input_since)
        x = xs[0]
        if not axes:
            if int(self.attr("noop_with_empty_axes", 0)):
                return None
            return tuple(range(x.ndim))
        return tuple(sorted(a % x.ndim for a in axes))

    def forward(self, xs, need):
        x = xs[0]
        axes = self._axes_for(xs)
        keep = bool(self.attr("keepdims", 1))
        if axes is None:
            return [np.array(x)], ((x.shape, None, keep) if need is not None else None)
        y = self.reduce(x, axes, keep)
        return [y], ((x.shape, axes, keep) if need is not None else None)

    def backward(self, saved, gys, need):
        shape, axes, keep = saved
        g = gys[0]
        if axes is None:
            return [g, None][:len(need)]
        if not keep:
            g = np.expand_dims(g, axes)
        g = np.broadcast_to(self.scale_grad(g, shape, axes), shape).copy()
        return [g, None][:len(need)]


@register("ReduceMean")
class ReduceMean(_Reduce):
    def reduce(self, x, axes, keep):
        return x.mean(axis=axes, keepdims=keep)

    def scale_grad(self, g, shape, axes):
        return g / g.dtype.type(int(np.prod([shape[a] for a in axes])))


@register("ReduceSum")
class ReduceSum(_Reduce):
    axes_input_since = 13

    def reduce(self, x, axes, keep):
        return x.sum(axis=axes, keepdims=keep)

    def scale_grad(self, g, shape, axes):
        return g


# -- matrix products --------------------------------------------------------------------------

@register("MatMul")
class MatMul(Op):
    def forward(self, xs, need):
        a, b = xs
        saved = None
        if need is not None:
            saved = (a if need[1] else None, b if need[0] else None, a.shape, b.shape)
        return [np.matmul(a, b)], saved

    def backward(self, saved, gys, need):
        a, b, sa, sb = saved
        g = gys[0]
        if len(sa) == 1:
            g = np.expand_dims(g, -2)
        if len(sb) == 1:
            g = np.expand_dims(g, -1)
        ga = gb = None
        if need[0]:
            b2 = b if b.ndim > 1 else b[:, None]
            ga2 = np.matmul(g, b2.swapaxes(-1, -2))
            ga = unbroadcast(ga2, (1,) + tuple(sa) if len(sa) == 1 else sa).reshape(sa)
        if need[1]:
            a2 = a if a.ndim > 1 else a[None, :]
            gb2 = np.matmul(a2.swapaxes(-1, -2), g)
            gb = unbroadcast(gb2, tuple(sb) + (1,) if len(sb) == 1 else sb).reshape(sb)
        return [ga, gb]


@register("Gemm")
class Gemm(Op):
    def setup(self):
        self.alpha = float(self.attr("alpha", 1.0))
        self.beta = float(self.attr("beta", 1.0))
        self.ta = bool(self.attr("transA", 0))
        self.tb = bool(self.attr("transB", 0))

    def forward(self, xs, need):
        a, b = xs[0], xs[1]
        c = optional(xs, 2)
        a2 = a.T if self.ta else a
        b2 = b.T if self.tb else b
        y = a2 @ b2
        if self.alpha != 1.0:
            y *= y.dtype.type(self.alpha)
        if c is not None:
            y += c * c.dtype.type(self.beta) if self.beta != 1.0 else c
        saved = None
        if need is not None:
            saved = (a2 if need[1] else None, b2 if need[0] else None, c.shape if c is not None else None)
        return [y], saved

    def backward(self, saved, gys, need):
        a2, b2, cshape = saved
        g = gys[0]
        if self.alpha != 1.0:
            g_ab = g * g.dtype.type(self.alpha)
        else:
            g_ab = g
        ga = gb = gc = None
        if need[0]:
            ga = g_ab @ b2.T
            ga = ga.T if self.ta else ga
        if need[1]:
            gb = a2.T @ g_ab
            gb = gb.T if self.tb else gb
        if len(need) > 2 and need[2]:
            gc = unbroadcast(g * g.dtype.type(self.beta) if self.beta != 1.0 else g, cshape)
        return [ga, gb, gc][:len(need)]
