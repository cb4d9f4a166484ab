"""ONNX operators other than convolution, pooling and resizing: forward and vector-Jacobian product.

Semantics follow the ONNX operator specification of the model's opset where it changed (Softmax
before 13 coerces to 2-D, Clip before 11 and Slice before 10 take attributes, axes of Squeeze /
Unsqueeze / ReduceSum (13) and ReduceMean / Split (18) move from attributes to inputs).
Gradients at kinks (Relu at 0, Clip at its bounds) follow PyTorch: the bound itself passes.
"""
from __future__ import annotations

import math

import numpy as np
import onnx

from ._util import as_ints, erf, masked, unbroadcast
from .op import Op, register

__all__: list[str] = []

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_2_OVER_SQRTPI = 2.0 / math.sqrt(math.pi)


def _scalar(x: np.ndarray, value: float):
    return x.dtype.type(value) if x.dtype.kind == "f" else value


def _np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(onnx_type)))


def _opt(xs, i):
    return xs[i] if len(xs) > i else None


def _axes(op: Op, xs, attr_until: int, index: int = 1):
    """Axes from the attribute (opset < ``attr_until``) or from input ``index``; None when absent."""
    if op.opset < attr_until:
        value = op.attr("axes")
    else:
        value = _opt(xs, index)
    return None if value is None else as_ints(value)


# -- elementwise binary ----------------------------------------------------------------------

@register("Add")
class Add(Op):
    def forward(self, xs, need):
        a, b = xs
        return [a + b], ((a.shape, b.shape) if need is not None else None)

    def backward(self, saved, gys, need):
        g = gys[0]
        return [unbroadcast(g, saved[0]) if need[0] else None, unbroadcast(g, saved[1]) if need[1] else None]


@register("Sub")
class Sub(Op):
    def forward(self, xs, need):
        a, b = xs
        return [a - b], ((a.shape, b.shape) if need is not None else None)

    def backward(self, saved, gys, need):
        g = gys[0]
        return [unbroadcast(g, saved[0]) if need[0] else None, unbroadcast(-g, saved[1]) if need[1] else None]


@register("Mul")
class Mul(Op):
    def forward(self, xs, need):
        a, b = xs
        saved = None
        if need is not None:
            saved = (b if need[0] else None, a if need[1] else None, a.shape, b.shape)
        return [a * b], saved

    def backward(self, saved, gys, need):
        b, a, sa, sb = saved
        g = gys[0]
        return [unbroadcast(g * b, sa) if need[0] else None, unbroadcast(g * a, sb) if need[1] else None]


@register("Div")
class Div(Op):
    def forward(self, xs, need):
        a, b = xs
        if a.dtype.kind in "iu" and b.dtype.kind in "iu":
            y = np.trunc(a / b).astype(np.result_type(a, b))      # C integer division
        else:
            y = a / b
        saved = None
        if need is not None:
            saved = (b, y if need[1] else None, a.shape, b.shape)
        return [y], saved

    def backward(self, saved, gys, need):
        b, y, sa, sb = saved
        g = gys[0]
        ga = unbroadcast(g / b, sa) if need[0] else None
        gb = unbroadcast(-g * y / b, sb) if need[1] else None
        return [ga, gb]


@register("Pow")
class Pow(Op):
    def forward(self, xs, need):
        a, b = xs
        if a.dtype.kind == "f":
            b = b.astype(a.dtype, copy=False)
        y = np.power(a, b).astype(a.dtype, copy=False)
        return [y], ((a, b, y) if need is not None else None)

    def backward(self, saved, gys, need):
        a, b, y = saved
        g = gys[0]
        ga = gb = None
        if need[0]:
            ga = unbroadcast(g * b * np.power(a, b - 1), a.shape)
        if need[1]:
            with np.errstate(divide="ignore", invalid="ignore"):
                log_a = np.where(a > 0, np.log(np.where(a > 0, a, 1)), 0)
            gb = unbroadcast(g * y * log_a, b.shape)
        return [ga, gb]


class _Variadic(Op):
    """Sum / Max / Min over any number of broadcast inputs."""

    def forward(self, xs, need):
        y = xs[0]
        for x in xs[1:]:
            y = self.combine(y, x)
        if len(xs) == 1:
            y = np.array(y)
        return [y], ((list(xs), y) if need is not None else None)

    def backward(self, saved, gys, need):
        xs, y = saved
        g = gys[0]
        if self.op_type == "Sum":
            return [unbroadcast(g, x.shape) if n else None for x, n in zip(xs, need)]
        taken = np.zeros(y.shape, dtype=bool)
        grads = []
        for x, n in zip(xs, need):
            hit = (np.broadcast_to(x, y.shape) == y) & ~taken   # the first input holding the extreme
            taken |= hit
            grads.append(unbroadcast(masked(g, hit), x.shape) if n else None)
        return grads


@register("Sum")
class Sum(_Variadic):
    combine = staticmethod(np.add)


@register("Max")
class Max(_Variadic):
    combine = staticmethod(np.maximum)


@register("Min")
class Min(_Variadic):
    combine = staticmethod(np.minimum)


# -- elementwise unary -----------------------------------------------------------------------

class _Unary(Op):
    """``y = f(x)``; ``save`` says whether the backward reads x or y."""

    save = "y"

    def f(self, x):
        raise NotImplementedError

    def df(self, x, y, g):
        raise NotImplementedError

    def forward(self, xs, need):
        x = xs[0]
        y = self.f(x)
        saved = None
        if need is not None:
            saved = y if self.save == "y" else x
        return [y], saved

    def backward(self, saved, gys, need):
        x, y = (None, saved) if self.save == "y" else (saved, None)
        return [self.df(x, y, gys[0])]


@register("Identity")
class Identity(Op):
    def forward(self, xs, need):
        return [xs[0]], None

    def backward(self, saved, gys, need):
        return [gys[0]]


@register("Dropout")
class Dropout(Op):
    nondiff_inputs = (1, 2)
    nondiff_outputs = (1,)

    def forward(self, xs, need):
        outs = [xs[0]]
        if self.n_outputs > 1:
            outs.append(np.ones(xs[0].shape, dtype=bool))
        return outs, None

    def backward(self, saved, gys, need):
        return [gys[0], None, None][:len(need)]


@register("Neg")
class Neg(Op):
    def forward(self, xs, need):
        return [-xs[0]], None

    def backward(self, saved, gys, need):
        return [-gys[0]]


@register("Relu")
class Relu(_Unary):
    def f(self, x):
        return np.maximum(x, _scalar(x, 0))

    def df(self, x, y, g):
        return masked(g, y > 0)


@register("Exp")
class Exp(_Unary):
    def f(self, x):
        return np.exp(x)

    def df(self, x, y, g):
        return g * y


@register("Log")
class Log(_Unary):
    save = "x"

    def f(self, x):
        return np.log(x)

    def df(self, x, y, g):
        return g / x


@register("Sqrt")
class Sqrt(_Unary):
    def f(self, x):
        return np.sqrt(x)

    def df(self, x, y, g):
        return g / (y * 2)


@register("Reciprocal")
class Reciprocal(_Unary):
    def f(self, x):
        return np.reciprocal(x)

    def df(self, x, y, g):
        return -g * y * y


@register("Abs")
class Abs(_Unary):
    save = "x"

    def f(self, x):
        return np.abs(x)

    def df(self, x, y, g):
        return g * np.sign(x)


@register("Sigmoid")
class Sigmoid(_Unary):
    def f(self, x):
        # exp of -|x| only: no overflow for large |x|
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)

    def df(self, x, y, g):
        return g * y * (1 - y)


@register("Tanh")
class Tanh(_Unary):
    def f(self, x):
        return np.tanh(x)

    def df(self, x, y, g):
        return g * (1 - y * y)


@register("Erf")
class Erf(_Unary):
    save = "x"

    def f(self, x):
        return erf(x)

    def df(self, x, y, g):
        return g * (_scalar(x, _2_OVER_SQRTPI) * np.exp(-x * x))


@register("Softplus")
class Softplus(_Unary):
    save = "x"

    def f(self, x):
        return np.logaddexp(x, _scalar(x, 0)).astype(x.dtype, copy=False)

    def df(self, x, y, g):
        return g * (1 / (1 + np.exp(-x)))


@register("LeakyRelu")
class LeakyRelu(_Unary):
    save = "x"

    def setup(self):
        self.alpha = float(self.attr("alpha", 0.01))

    def f(self, x):
        return np.where(x >= 0, x, x * _scalar(x, self.alpha))

    def df(self, x, y, g):
        return np.where(x >= 0, g, g * _scalar(g, self.alpha))


@register("Elu")
class Elu(_Unary):
    save = "x"

    def setup(self):
        self.alpha = float(self.attr("alpha", 1.0))

    def f(self, x):
        return np.where(x > 0, x, (np.exp(np.minimum(x, 0)) - 1) * _scalar(x, self.alpha))

    def df(self, x, y, g):
        return np.where(x > 0, g, g * np.exp(np.minimum(x, 0)) * _scalar(g, self.alpha))


@register("HardSigmoid")
class HardSigmoid(_Unary):
    save = "x"

    def setup(self):
        self.alpha = float(self.attr("alpha", 0.2))
        self.beta = float(self.attr("beta", 0.5))

    def f(self, x):
        return np.clip(x * _scalar(x, self.alpha) + _scalar(x, self.beta), 0, 1).astype(x.dtype, copy=False)

    def df(self, x, y, g):
        z = x * _scalar(x, self.alpha) + _scalar(x, self.beta)
        return masked(g * _scalar(g, self.alpha), (z > 0) & (z < 1))


@register("HardSwish")
class HardSwish(_Unary):
    save = "x"

    def f(self, x):
        return x * np.clip(x * _scalar(x, 1 / 6) + _scalar(x, 0.5), 0, 1).astype(x.dtype, copy=False)

    def df(self, x, y, g):
        z = x * _scalar(x, 1 / 6) + _scalar(x, 0.5)
        inside = (z > 0) & (z < 1)
        d = np.clip(z, 0, 1) + np.where(inside, x * _scalar(x, 1 / 6), 0)
        return (g * d).astype(g.dtype, copy=False)


@register("Gelu")
class Gelu(_Unary):
    save = "x"

    def setup(self):
        approx = self.attr("approximate", "none")
        self.tanh = (approx.decode() if isinstance(approx, bytes) else approx) == "tanh"

    def f(self, x):
        if self.tanh:
            t = np.tanh(_scalar(x, _SQRT_2_OVER_PI) * (x + _scalar(x, 0.044715) * x ** 3))
            return _scalar(x, 0.5) * x * (1 + t)
        return _scalar(x, 0.5) * x * (1 + erf(x / _scalar(x, _SQRT2)))

    def df(self, x, y, g):
        if self.tanh:
            inner = _scalar(x, _SQRT_2_OVER_PI) * (x + _scalar(x, 0.044715) * x ** 3)
            t = np.tanh(inner)
            dinner = _scalar(x, _SQRT_2_OVER_PI) * (1 + _scalar(x, 3 * 0.044715) * x * x)
            return g * (_scalar(x, 0.5) * (1 + t) + _scalar(x, 0.5) * x * (1 - t * t) * dinner)
        cdf = _scalar(x, 0.5) * (1 + erf(x / _scalar(x, _SQRT2)))
        pdf = np.exp(-x * x / 2) * _scalar(x, 1 / math.sqrt(2 * math.pi))
        return g * (cdf + x * pdf)


class _ZeroGrad(_Unary):
    """Piecewise-constant functions: the true gradient, zero (use the engine's fake-quant ops for STE)."""

    def df(self, x, y, g):
        return np.zeros_like(g)


@register("Floor")
class Floor(_ZeroGrad):
    def f(self, x):
        return np.floor(x)


@register("Ceil")
class Ceil(_ZeroGrad):
    def f(self, x):
        return np.ceil(x)


@register("Round")
class Round(_ZeroGrad):
    def f(self, x):
        return np.rint(x)


@register("Sign")
class Sign(_ZeroGrad):
    def f(self, x):
        return np.sign(x)


@register("Clip")
class Clip(Op):
    """Saves its output only (the next layer usually keeps it anyway): at a bound itself the gradient
    is zero, as for Relu at 0."""

    def forward(self, xs, need):
        x = xs[0]
        if self.opset < 11:
            lo, hi = self.attr("min"), self.attr("max")
        else:
            lo, hi = _opt(xs, 1), _opt(xs, 2)
        lo = None if lo is None else x.dtype.type(np.asarray(lo).reshape(()))
        hi = None if hi is None else x.dtype.type(np.asarray(hi).reshape(()))
        if lo is not None:
            y = np.maximum(x, lo)
            if hi is not None:
                np.minimum(y, hi, out=y)
        elif hi is not None:
            y = np.minimum(x, hi)
        else:
            y = np.array(x)
        return [y], ((y, lo, hi) if need is not None else None)

    def backward(self, saved, gys, need):
        y, lo, hi = saved
        g = gys[0]
        grads = [None]
        if need[0]:
            inside = y > lo if lo is not None else None
            if hi is not None:
                inside = y < hi if inside is None else np.logical_and(inside, y < hi, out=inside)
            grads[0] = masked(g, inside) if inside is not None else g
        below = y <= lo if lo is not None and len(need) > 1 and need[1] else None
        above = y >= hi if hi is not None and len(need) > 2 and need[2] else None
        if len(need) > 1:
            grads.append(np.asarray(np.sum(g, where=below), dtype=g.dtype) if need[1] and lo is not None else None)
        if len(need) > 2:
            grads.append(np.asarray(np.sum(g, where=above), dtype=g.dtype) if need[2] and hi is not None else None)
        return grads


@register("PRelu")
class PRelu(Op):
    def forward(self, xs, need):
        x, slope = xs
        return [np.where(x >= 0, x, x * slope).astype(x.dtype, copy=False)], ((x, slope) if need is not None else None)

    def backward(self, saved, gys, need):
        x, slope = saved
        g = gys[0]
        gx = np.where(x >= 0, g, g * slope).astype(g.dtype, copy=False) if need[0] else None
        gs = unbroadcast(np.where(x >= 0, 0, g * x), slope.shape).astype(g.dtype, copy=False) if need[1] else None
        return [gx, gs]


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
        b = _opt(xs, 2)
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
        axes = _axes(self, xs, self.axes_input_since)
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
        c = _opt(xs, 2)
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
        axes = _axes(self, xs, 13)
        if axes is None:
            return np.squeeze(x)
        return np.squeeze(x, tuple(a % x.ndim for a in axes))


@register("Unsqueeze")
class Unsqueeze(_ViewOp):
    nondiff_inputs = (1,)

    def apply(self, x, xs):
        axes = _axes(self, xs, 13)
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
        split = self.attr("split") if self.opset < 13 else _opt(xs, 1)
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
            axes, steps = _opt(xs, 3), _opt(xs, 4)
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
            value = _opt(xs, 2)
            value = 0 if value is None or np.size(value) == 0 else np.asarray(value).reshape(()).item()
            axes = _opt(xs, 3)
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
        self.to = _np_dtype(self.attr("to"))
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
