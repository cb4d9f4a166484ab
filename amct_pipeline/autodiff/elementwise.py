"""Elementwise ONNX operators (arithmetic with broadcasting, activations, Clip): forward and VJP.

Gradients at kinks (Relu at 0, Clip at its bounds) follow PyTorch: the bound itself passes.
Clip before opset 11 takes attributes.
"""
from __future__ import annotations

import math

import numpy as np

from ._util import erf, masked, optional, scalar_like, unbroadcast
from .op import Op, register

__all__: list[str] = []

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_2_OVER_SQRTPI = 2.0 / math.sqrt(math.pi)


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
        return np.maximum(x, scalar_like(x, 0))

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
        return g * (scalar_like(x, _2_OVER_SQRTPI) * np.exp(-x * x))


@register("Softplus")
class Softplus(_Unary):
    save = "x"

    def f(self, x):
        return np.logaddexp(x, scalar_like(x, 0)).astype(x.dtype, copy=False)

    def df(self, x, y, g):
        return g * (1 / (1 + np.exp(-x)))


@register("LeakyRelu")
class LeakyRelu(_Unary):
    save = "x"

    def setup(self):
        self.alpha = float(self.attr("alpha", 0.01))

    def f(self, x):
        return np.where(x >= 0, x, x * scalar_like(x, self.alpha))

    def df(self, x, y, g):
        return np.where(x >= 0, g, g * scalar_like(g, self.alpha))


@register("Elu")
class Elu(_Unary):
    save = "x"

    def setup(self):
        self.alpha = float(self.attr("alpha", 1.0))

    def f(self, x):
        return np.where(x > 0, x, (np.exp(np.minimum(x, 0)) - 1) * scalar_like(x, self.alpha))

    def df(self, x, y, g):
        return np.where(x > 0, g, g * np.exp(np.minimum(x, 0)) * scalar_like(g, self.alpha))


@register("HardSigmoid")
class HardSigmoid(_Unary):
    save = "x"

    def setup(self):
        self.alpha = float(self.attr("alpha", 0.2))
        self.beta = float(self.attr("beta", 0.5))

    def f(self, x):
        return np.clip(x * scalar_like(x, self.alpha) + scalar_like(x, self.beta), 0, 1).astype(x.dtype, copy=False)

    def df(self, x, y, g):
        z = x * scalar_like(x, self.alpha) + scalar_like(x, self.beta)
        return masked(g * scalar_like(g, self.alpha), (z > 0) & (z < 1))


@register("HardSwish")
class HardSwish(_Unary):
    save = "x"

    def f(self, x):
        return x * np.clip(x * scalar_like(x, 1 / 6) + scalar_like(x, 0.5), 0, 1).astype(x.dtype, copy=False)

    def df(self, x, y, g):
        z = x * scalar_like(x, 1 / 6) + scalar_like(x, 0.5)
        inside = (z > 0) & (z < 1)
        d = np.clip(z, 0, 1) + np.where(inside, x * scalar_like(x, 1 / 6), 0)
        return (g * d).astype(g.dtype, copy=False)


@register("Gelu")
class Gelu(_Unary):
    save = "x"

    def setup(self):
        approx = self.attr("approximate", "none")
        self.tanh = (approx.decode() if isinstance(approx, bytes) else approx) == "tanh"

    def f(self, x):
        if self.tanh:
            t = np.tanh(scalar_like(x, _SQRT_2_OVER_PI) * (x + scalar_like(x, 0.044715) * x ** 3))
            return scalar_like(x, 0.5) * x * (1 + t)
        return scalar_like(x, 0.5) * x * (1 + erf(x / scalar_like(x, _SQRT2)))

    def df(self, x, y, g):
        if self.tanh:
            inner = scalar_like(x, _SQRT_2_OVER_PI) * (x + scalar_like(x, 0.044715) * x ** 3)
            t = np.tanh(inner)
            dinner = scalar_like(x, _SQRT_2_OVER_PI) * (1 + scalar_like(x, 3 * 0.044715) * x * x)
            return g * (scalar_like(x, 0.5) * (1 + t) + scalar_like(x, 0.5) * x * (1 - t * t) * dinner)
        cdf = scalar_like(x, 0.5) * (1 + erf(x / scalar_like(x, _SQRT2)))
        pdf = np.exp(-x * x / 2) * scalar_like(x, 1 / math.sqrt(2 * math.pi))
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
            lo, hi = optional(xs, 1), optional(xs, 2)
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
