"""Fake quantization as engine operators (not ONNX operators), with the gradients retraining uses.

Activations (SPEC 4.1, 4.9)
    :class:`FakeQuant`  fixed factors; straight-through inside the code range, zero outside.
    :class:`ULQ`        learnable ``clip_max`` / ``clip_min`` (inputs 1, 2; ``fixed_min``: clip_min = 0,
                        no input 2). Factors by SPEC 4.2 (asymmetric); gradients exactly SPEC 4.9.
Weights (SPEC 4.3, 4.8, 4.10), laid out by output channel (``channel_axis``; ``None`` = one scale;
``group`` > 1 puts a grouped ConvTranspose's output channels together as ``quant.weights`` does)
    :class:`ARQRetrain` ``arq_retrain``: max-abs scale recomputed every forward, straight-through.
    :class:`LSQWeight`  ``ulq_retrain``: learnable scale (input 1), LSQ gradient of SPEC 4.10.
    :class:`AdaRound`   ADA: learnable rounding ``alpha`` (input 0) of a fixed weight and scale,
                        rectified sigmoid ``h = clip(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1)``.

QDrop (Wei et al. 2022): an activation quantizer given ``drop = QDrop(probability, rng)`` keeps each
element float with that probability in a *recording* forward (``need`` not None; evaluation never
drops): the output is ``where(kept, x, fq(x))``, the gradient of a kept element is the identity's and
it adds nothing to the clips' gradients. Training then sees a flatter, less sample-specific loss.

Forward arithmetic is the lowering's: activations ``clip(rint(x * float32(1/scale)) + offset)``,
weights ``clip(rint(w / scale))`` (ARQ's), in the input's float precision.
"""
from __future__ import annotations

import math

import numpy as np

from ..quant.math import scale_offset_arrays
from ..quant.params import ActQuantParams
from ..quant.plan import quant_multiplier
from ..quant.weights import deconv_channel_view, deconv_from_channel_view
from ._util import masked
from .op import Op

__all__ = ["QDrop", "FakeQuant", "ULQ", "ARQRetrain", "LSQWeight", "AdaRound", "ulq_factors", "ulq_guard"]


def _qrange(num_bits: int) -> tuple[int, int]:
    half = 1 << (int(num_bits) - 1)
    return -half, half - 1


def _multiplier(x: np.ndarray, scale: float):
    t = x.dtype.type
    return t(quant_multiplier(scale)) if x.dtype == np.float32 else t(1.0 / scale)


_CHUNK = 1 << 16     # elements per chunk: the temporaries of one chunk stay in cache


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)


def _act_fake_quant(x: np.ndarray, scale: float, offset: int, qmin: int, qmax: int, mask: bool = False):
    """(fake-quantized x, [codes in range]) with the lowering's float arithmetic, chunk by chunk."""
    t = x.dtype.type
    m, o, s, lo, hi = _multiplier(x, scale), t(offset), t(scale), t(qmin), t(qmax)
    xf = _flat(x)
    q = np.empty_like(xf)
    inside = np.empty(xf.shape, dtype=bool) if mask else None
    for a in range(0, xf.size, _CHUNK):
        b = min(xf.size, a + _CHUNK)
        qc = q[a:b]
        np.multiply(xf[a:b], m, out=qc)
        np.rint(qc, out=qc)
        qc += o
        if mask:
            np.greater_equal(qc, lo, out=inside[a:b])
            inside[a:b] &= qc <= hi
        np.clip(qc, lo, hi, out=qc)
        qc -= o
        qc *= s
    return q.reshape(x.shape), (inside.reshape(x.shape) if mask else None)


def _ulq_backward(x: np.ndarray, g: np.ndarray, p: ActQuantParams, want_clips: bool):
    """(dL/dx, sum g e, sum over upper of g, sum over lower of g) of SPEC 4.9, chunk by chunk."""
    t = x.dtype.type
    lo, hi = t(p.scale * (p.qmin - p.offset)), t(p.scale * (p.qmax - p.offset))
    m = _multiplier(x, p.scale)
    xf, gf = _flat(x), _flat(g)
    gx = np.empty_like(gf)
    ge = g_upper = g_lower = 0.0
    size = min(_CHUNK, xf.size)
    upper, lower, inside = (np.empty(size, dtype=bool) for _ in range(3))
    v, r = np.empty(size, dtype=x.dtype), np.empty(size, dtype=x.dtype)
    for a in range(0, xf.size, _CHUNK):
        b = min(xf.size, a + _CHUNK)
        n = b - a
        xc, gc, gxc, up, low, ins = xf[a:b], gf[a:b], gx[a:b], upper[:n], lower[:n], inside[:n]
        np.greater(xc, hi, out=up)
        np.less(xc, lo, out=low)
        np.logical_or(up, low, out=ins)
        np.logical_not(ins, out=ins)
        np.multiply(gc, ins, out=gxc)
        if want_clips:
            vc, rc = v[:n], r[:n]
            np.multiply(xc, m, out=vc)
            np.rint(vc, out=rc)
            rc -= vc                      # (round(x~) - x~); gx is 0 where clipped, where e is 0 too
            ge += float(np.dot(gxc, rc))
            if up.any():
                g_upper += float(np.dot(gc, up.astype(x.dtype)))
            if low.any():
                g_lower += float(np.dot(gc, low.astype(x.dtype)))
    return gx.reshape(g.shape), ge / ((1 << p.num_bits) - 1), g_upper, g_lower


class QDrop:
    """Which activation elements stay float in a training forward: each with ``probability``, drawn
    from ``rng`` (a seeded ``numpy.random.Generator``: the same seed and node order give the same masks)."""

    def __init__(self, probability: float, rng: np.random.Generator) -> None:
        if not 0.0 <= probability < 1.0:
            raise ValueError(f"QDrop probability must be in [0, 1), got {probability}")
        self.probability, self.rng = float(probability), rng

    def mask(self, shape) -> np.ndarray | None:
        """Boolean array (True: keep float), or None when nothing is dropped."""
        if self.probability <= 0.0:
            return None
        return self.rng.random(shape, dtype=np.float32) < np.float32(self.probability)


def _dropped(op, x: np.ndarray, y: np.ndarray, need) -> tuple[np.ndarray, np.ndarray | None]:
    """(output, kept-float mask or None): QDrop applied in a recording forward only."""
    drop = getattr(op, "drop", None)
    if need is None or drop is None:
        return y, None
    keep = drop.mask(x.shape)
    if keep is None:
        return y, None
    np.copyto(y, x, where=keep)
    return y, keep


class FakeQuant(Op):
    """Quantize-dequantize with fixed :class:`ActQuantParams`; STE gradient where the code is not clipped
    (``drop``: optional :class:`QDrop`)."""

    op_type = "FakeQuant"

    def __init__(self, params: ActQuantParams, name: str = "") -> None:
        self.params = params
        self.drop: QDrop | None = None
        super().__init__({}, 17, 1, 1, name)

    def forward(self, xs, need):
        p = self.params
        y, inside = _act_fake_quant(xs[0], p.scale, p.offset, p.qmin, p.qmax, mask=need is not None)
        y, keep = _dropped(self, xs[0], y, need)
        if keep is not None:
            inside |= keep
        return [y], inside

    def backward(self, saved, gys, need):
        return [masked(gys[0], saved)]


def ulq_factors(clip_max: float, clip_min: float, num_bits: int = 8) -> ActQuantParams:
    """SPEC 4.2 asymmetric factors of a ULQ clip pair (with ``process_scale`` sanitising)."""
    scale, offset = scale_offset_arrays(float(clip_min), float(clip_max), num_bits, symmetric=False)
    return ActQuantParams(float(scale), int(offset), int(num_bits))


def ulq_guard(clip_max: float, clip_min: float, previous: tuple[float, float], eps: float = 1e-6
              ) -> tuple[float, float]:
    """SPEC 4.9 safeguards after an update: revert both if ``clip_max - clip_min <= eps``, clip_max if
    negative, clip_min if positive."""
    old_max, old_min = previous
    if clip_max - clip_min <= eps:
        return old_max, old_min
    return (old_max if clip_max < 0 else clip_max), (old_min if clip_min > 0 else clip_min)


class ULQ(Op):
    """ULQ activation quantizer: inputs ``x, clip_max[, clip_min]`` (scalars). SPEC 4.9 backward::

        upper = x > s (2^(b-1) - 1 - o)      lower = x < s (-2^(b-1) - o)
        x~ = clamp(x) / s                   e = (round(x~) - x~) / (2^b - 1)
        dL/dclip_max = sum g (e + upper)    dL/dclip_min = sum g (lower - e)    dL/dx = g [not clipped]
    """

    op_type = "ULQ"

    def __init__(self, num_bits: int = 8, fixed_min: bool = False, name: str = "") -> None:
        self.num_bits = int(num_bits)
        self.fixed_min = bool(fixed_min)
        self.drop: QDrop | None = None          # QDrop: elements kept float while training
        super().__init__({}, 17, 2 if fixed_min else 3, 1, name)

    def factors(self, xs) -> ActQuantParams:
        clip_min = 0.0 if self.fixed_min else float(np.asarray(xs[2]).reshape(-1)[0])
        return ulq_factors(float(np.asarray(xs[1]).reshape(-1)[0]), clip_min, self.num_bits)

    def forward(self, xs, need):
        p = self.factors(xs)
        y, _ = _act_fake_quant(xs[0], p.scale, p.offset, p.qmin, p.qmax)
        y, keep = _dropped(self, xs[0], y, need)
        saved = None
        if need is not None:
            saved = (xs[0], p, np.shape(xs[1]), np.shape(xs[2]) if not self.fixed_min else None, keep)
        return [y], saved

    def backward(self, saved, gys, need):
        x, p, shape_max, shape_min, keep = saved
        g = gys[0]
        want_clips = bool(need[1] or (not self.fixed_min and need[2]))
        quantized = g if keep is None else np.where(keep, 0, g).astype(g.dtype, copy=False)
        gx, ge, g_upper, g_lower = _ulq_backward(x, quantized, p, want_clips)
        if keep is not None:        # kept-float elements: the identity's gradient
            np.copyto(gx, g, where=keep)
        out = [gx if need[0] else None]
        out.append(np.asarray(ge + g_upper, dtype=g.dtype).reshape(shape_max) if need[1] else None)
        if not self.fixed_min:
            out.append(np.asarray(g_lower - ge, dtype=g.dtype).reshape(shape_min) if need[2] else None)
        return out


class _WeightOp(Op):
    """Channel layout shared by the weight quantizers."""

    def __init__(self, num_bits: int = 8, channel_axis: int | None = 0, group: int = 1, n_inputs: int = 1,
                 name: str = "") -> None:
        self.num_bits = int(num_bits)
        self.channel_axis = channel_axis
        self.group = int(group)
        self.qmin, self.qmax = _qrange(num_bits)
        super().__init__({}, 17, n_inputs, 1, name)

    def view(self, w: np.ndarray) -> np.ndarray:
        return deconv_channel_view(w, self.group) if self.group > 1 else w

    def unview(self, v: np.ndarray) -> np.ndarray:
        return deconv_from_channel_view(v, self.group) if self.group > 1 else v

    def scale_shape(self, v: np.ndarray) -> tuple[int, ...]:
        if self.channel_axis is None:
            return (1,) * v.ndim
        return tuple(-1 if i == self.channel_axis % v.ndim else 1 for i in range(v.ndim))

    def reduce_axes(self, v: np.ndarray) -> tuple[int, ...]:
        if self.channel_axis is None:
            return tuple(range(v.ndim))
        return tuple(i for i in range(v.ndim) if i != self.channel_axis % v.ndim)


class ARQRetrain(_WeightOp):
    """``arq_retrain``: symmetric max-abs scale (127/128 rule) from the current weight at every forward."""

    op_type = "ARQRetrain"

    def __init__(self, num_bits: int = 8, channel_axis: int | None = 0, group: int = 1, name: str = "") -> None:
        super().__init__(num_bits, channel_axis, group, 1, name)

    def scale(self, w: np.ndarray) -> np.ndarray:
        """Per-channel scales in the channel view's broadcast shape (the weight's dtype)."""
        v = self.view(w)
        axes = self.reduce_axes(v)
        scale, _ = scale_offset_arrays(v.min(axis=axes), v.max(axis=axes), self.num_bits, symmetric=True)
        dtype = w.dtype if w.dtype == np.float64 else np.float32
        return scale.astype(dtype).reshape(self.scale_shape(v))

    def forward(self, xs, need):
        w = xs[0]
        s = self.scale(w)
        q = np.clip(np.rint(self.view(w) / s), self.qmin, self.qmax) * s
        return [self.unview(q).astype(w.dtype, copy=False)], (() if need is not None else None)

    def backward(self, saved, gys, need):
        return [gys[0]]


class LSQWeight(_WeightOp):
    """``ulq_retrain``: inputs ``w, s`` (``s`` one per channel, or ``1/s`` with ``reciprocal``). SPEC 4.10::

        dL/ds = sum_channel g {round(w/s) - w/s inside; -2^(b-1) below; 2^(b-1)-1 above} / sqrt(n (2^(b-1)-1))
        dL/dw = g [inside]         (reciprocal parameter r = 1/s: dL/dr = dL/ds (-s^2))
    """

    op_type = "LSQWeight"

    def __init__(self, num_bits: int = 8, channel_axis: int | None = 0, group: int = 1, reciprocal: bool = False,
                 name: str = "") -> None:
        self.reciprocal = bool(reciprocal)
        super().__init__(num_bits, channel_axis, group, 2, name)

    def _scale(self, w, s):
        v = self.view(w)
        s = np.asarray(s, dtype=w.dtype).reshape(self.scale_shape(v))
        return v, (1 / s if self.reciprocal else s)

    def forward(self, xs, need):
        w, s_param = xs
        v, s = self._scale(w, s_param)
        ratio = v / s
        q = np.clip(np.rint(ratio), self.qmin, self.qmax)
        y = self.unview(q * s)
        return [y], ((ratio, s, np.shape(s_param)) if need is not None else None)

    def backward(self, saved, gys, need):
        ratio, s, s_shape = saved
        g = self.view(gys[0])
        below = ratio < self.qmin
        above = ratio > self.qmax
        inside = ~(below | above)
        out = [self.unview(masked(g, inside)) if need[0] else None, None]
        if need[1]:
            d = np.where(inside, np.rint(ratio) - ratio, np.where(below, self.qmin, self.qmax)).astype(g.dtype)
            n = ratio.size // max(s.size, 1)
            gs = (g * d).sum(axis=self.reduce_axes(ratio), dtype=np.float64) / math.sqrt(n * self.qmax)
            if self.reciprocal:
                gs = gs * -(s.reshape(-1).astype(np.float64) ** 2)
            out[1] = gs.astype(g.dtype).reshape(s_shape)
        return out


class AdaRound(_WeightOp):
    """ADA (SPEC 4.8): ``w~ = s clip(floor(w/s) + h(alpha), qmin, qmax)``; input 0 is ``alpha``.

    ``weight`` and ``scale`` (per channel, as ARQ gives it) are fixed; ``hard=True`` rounds up where
    ``alpha >= 0`` (what the model keeps after training). :meth:`init_alpha` starts from the float
    weight (``h(alpha) = frac(w/s)``); :meth:`regularizer` is ``sum 1 - |2h - 1|^beta`` and its gradient.
    """

    op_type = "AdaRound"

    def __init__(self, weight: np.ndarray, scale: np.ndarray, num_bits: int = 8, channel_axis: int | None = 0,
                 group: int = 1, zeta: float = 1.1, gamma: float = -0.1, name: str = "") -> None:
        super().__init__(num_bits, channel_axis, group, 1, name)
        self.zeta, self.gamma = float(zeta), float(gamma)
        self.hard = False
        v = self.view(np.asarray(weight))
        self.scale = np.asarray(scale, dtype=v.dtype).reshape(self.scale_shape(v))
        self.ratio = v / self.scale
        self.floor = np.floor(self.ratio)

    def h(self, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rectified sigmoid, its derivative; zero where clipped)."""
        sig = 1 / (1 + np.exp(-alpha))
        raw = sig * (self.zeta - self.gamma) + self.gamma
        inside = (raw > 0) & (raw < 1)
        return np.clip(raw, 0, 1), np.where(inside, sig * (1 - sig) * (self.zeta - self.gamma), 0)

    def init_alpha(self) -> np.ndarray:
        """``alpha`` with ``h(alpha)`` equal to the fractional part of ``w/s`` (in the weight's layout)."""
        rest = np.clip(self.ratio - self.floor, 1e-6, 1 - 1e-6)
        p = (rest - self.gamma) / (self.zeta - self.gamma)
        return self.unview(np.log(p / (1 - p)))

    def codes(self, alpha: np.ndarray) -> np.ndarray:
        """The integer codes after training (hard rounding), in the weight's layout."""
        up = (self.view(np.asarray(alpha)) >= 0).astype(self.floor.dtype)
        return self.unview(np.clip(self.floor + up, self.qmin, self.qmax))

    def regularizer(self, alpha: np.ndarray, beta: float) -> tuple[float, np.ndarray]:
        h, dh = self.h(self.view(np.asarray(alpha)))
        u = 2 * h - 1
        value = float(np.sum(1 - np.abs(u) ** beta))
        grad = -beta * np.abs(u) ** (beta - 1) * np.sign(u) * 2 * dh
        return value, self.unview(grad.astype(alpha.dtype, copy=False))

    def forward(self, xs, need):
        a = self.view(xs[0])
        if self.hard:
            h, dh = (a >= 0).astype(a.dtype), None
        else:
            h, dh = self.h(a)
        v = self.floor.astype(a.dtype, copy=False) + h
        inside = (v >= self.qmin) & (v <= self.qmax)
        y = np.clip(v, self.qmin, self.qmax) * self.scale.astype(a.dtype, copy=False)
        saved = None
        if need is not None:
            if dh is None:
                raise self.fail("hard rounding has no gradient; set hard=False to train")
            saved = np.where(inside, dh * self.scale, 0).astype(a.dtype, copy=False)
        return [self.unview(y)], saved

    def backward(self, saved, gys, need):
        return [self.unview(self.view(gys[0]) * saved)]
