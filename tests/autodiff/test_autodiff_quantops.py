"""The engine's fake-quant operators: forward equal to the lowering (and to ARQ), gradients equal to the
formulas of SPEC 4.9 (ULQ) and 4.10 (straight-through, LSQ), AdaRound's (SPEC 4.8) by finite differences."""
from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper

from amct_pipeline.autodiff import (ULQ, AdaRound, ARQRetrain, FakeQuant, LSQWeight, QDrop, quantops, ulq_factors,
                                    ulq_guard)
from amct_pipeline.ir.edit import Namer
from amct_pipeline.ir.graph import load_graph
from amct_pipeline.quant.fakequant import constant_factors, emit_antiquant, emit_fake_quant
from amct_pipeline.quant.math import arq, scale_offset_from_range
from amct_pipeline.quant.params import ActQuantParams
from amct_pipeline.quant.weights import deconv_channel_view, deconv_from_channel_view
from amct_pipeline.runtime.ort import make_session

RNG = np.random.default_rng(7)


def lowered_fake_quant(x: np.ndarray, act: ActQuantParams) -> np.ndarray:
    """The fake-quant chain every target emits (quant.fakequant), run by onnxruntime."""
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"], name="id")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 13)])
    graph = load_graph(model)
    namer = Namer(graph)
    t = graph.gs.outputs[0]
    y = emit_fake_quant(graph, namer, t, "q", constant_factors(namer, "q", act))
    y = emit_antiquant(graph, namer, y, "dq", act.scale)
    graph.gs.outputs = [y]
    graph.finalize()
    return make_session(graph.to_proto(), optimize=False).run(None, {"x": x})[0]


@pytest.mark.parametrize("chunk", [None, 37])
@pytest.mark.parametrize("act", [ActQuantParams(0.0173, -7, 8), ActQuantParams(0.05, -128, 8), ActQuantParams(0.3, 0, 4)])
def test_fake_quant_forward_is_the_lowering_and_ste_passes_inside(act, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(quantops, "_CHUNK", chunk)
    x = (RNG.standard_normal((4, 3, 5, 5)) * 3).astype(np.float32)
    op = FakeQuant(act)
    (y,), mask = op.forward([x], (True,))
    np.testing.assert_array_equal(y, lowered_fake_quant(x, act))
    g = RNG.standard_normal(x.shape).astype(np.float32)
    (gx,) = op.backward(mask, [g], (True,))
    codes = np.rint(x * np.float32(1 / act.scale)) + act.offset
    inside = (codes >= act.qmin) & (codes <= act.qmax)
    assert 0 < inside.mean() < 1
    np.testing.assert_array_equal(gx, np.where(inside, g, 0))


def spec_ulq_grads(x, g, clip_max, clip_min, b=8):
    """SPEC 4.9, written out."""
    s, o = scale_offset_from_range(clip_min, clip_max, b).scale, scale_offset_from_range(clip_min, clip_max, b).offset
    upper = x > s * (2 ** (b - 1) - 1 - o)
    lower = x < s * (-2 ** (b - 1) - o)
    xt = np.clip(x, s * (-2 ** (b - 1) - o), s * (2 ** (b - 1) - 1 - o)) / s
    e = (np.round(xt) - xt) / (2 ** b - 1)
    return (g * ~(upper | lower), np.sum(g * (e + upper)), np.sum(g * (lower - e)))


@pytest.mark.parametrize("chunk", [None, 37])
@pytest.mark.parametrize("bits", [8, 4])
def test_ulq_forward_and_spec_gradients(bits, chunk, monkeypatch):
    if chunk:                       # activations run in chunks: many, and a partial last one
        monkeypatch.setattr(quantops, "_CHUNK", chunk)
    x = RNG.standard_normal((3, 4, 6, 6)) * 2
    g = RNG.standard_normal(x.shape)
    clip_max, clip_min = np.array(2.5), np.array(-1.7)
    op = ULQ(num_bits=bits)
    (y,), saved = op.forward([x, clip_max, clip_min], (True, True, True))
    act = ulq_factors(2.5, -1.7, bits)
    assert act == scale_offset_from_range(-1.7, 2.5, bits)
    np.testing.assert_allclose(y, (np.clip(np.rint(x / act.scale) + act.offset, act.qmin, act.qmax) - act.offset)
                               * act.scale, rtol=0, atol=1e-12)
    gx, gmax, gmin = op.backward(saved, [g], (True, True, True))
    ex, emax, emin = spec_ulq_grads(x, g, 2.5, -1.7, bits)
    np.testing.assert_allclose(gx, ex, atol=1e-12)
    np.testing.assert_allclose(gmax, emax, rtol=1e-10)
    np.testing.assert_allclose(gmin, emin, rtol=1e-10)
    assert gmax.shape == clip_max.shape and gmin.shape == clip_min.shape


def test_ulq_clip_gradients_are_those_of_the_clipping_when_rounding_error_vanishes():
    """With x already on the grid the e terms vanish; what remains is d/dclip of clip(x): a finite difference."""
    act = ulq_factors(2.55, -1.0, 8)
    codes = RNG.integers(-140, 140, size=400)
    codes = codes[(codes != act.qmin) & (codes != act.qmax)]        # no point on a clip bound itself
    x = (codes - act.offset) * act.scale
    g = RNG.standard_normal(x.shape)
    op = ULQ()
    (_,), saved = op.forward([x, np.array(act.clip_max), np.array(act.clip_min)], (True, True, True))
    _, gmax, gmin = op.backward(saved, [g], (True, True, True))
    assert (codes < act.qmin).sum() > 10 and (codes > act.qmax).sum() > 10
    h = 1e-7

    def clipped(lo, hi):
        return np.sum(g * np.clip(x, lo, hi))

    fd_max = (clipped(act.clip_min, act.clip_max + h) - clipped(act.clip_min, act.clip_max - h)) / (2 * h)
    fd_min = (clipped(act.clip_min + h, act.clip_max) - clipped(act.clip_min - h, act.clip_max)) / (2 * h)
    np.testing.assert_allclose([gmax, gmin], [fd_max, fd_min], rtol=1e-6, atol=1e-6)


def test_ulq_fixed_min_has_no_min_input():
    x = np.abs(RNG.standard_normal((2, 50)))
    op = ULQ(fixed_min=True)
    assert op.n_inputs == 2
    (y,), saved = op.forward([x, np.array(3.0)], (True, True))
    act = ulq_factors(3.0, 0.0)
    assert act.offset == -128
    gx, gmax = op.backward(saved, [np.ones_like(x)], (True, True))
    ex, emax, _ = spec_ulq_grads(x, np.ones_like(x), 3.0, 0.0)
    np.testing.assert_allclose(gmax, emax, rtol=1e-10)


def _drop_mask(seed: int, shape, probability: float) -> np.ndarray:
    return QDrop(probability, np.random.default_rng(seed)).mask(shape)


@pytest.mark.parametrize("fixed_min", [False, True])
def test_qdrop_keeps_elements_float_and_passes_their_gradient_through(fixed_min):
    """QDrop: kept elements are the input and get the identity's gradient; the clip gradients are the
    SPEC 4.9 ones of the quantized elements only; an evaluation forward never drops."""
    x = RNG.standard_normal((2, 3, 7, 7)) * 2
    if fixed_min:
        x = np.abs(x)
    g = RNG.standard_normal(x.shape)
    clips = [np.array(2.5)] + ([] if fixed_min else [np.array(-1.7)])
    op = ULQ(fixed_min=fixed_min)
    (plain,), _ = op.forward([x, *clips], None)
    op.drop = QDrop(0.5, np.random.default_rng(3))
    need = (True,) * (2 if fixed_min else 3)
    (y,), saved = op.forward([x, *clips], need)
    keep = _drop_mask(3, x.shape, 0.5)
    assert 0.4 < keep.mean() < 0.6
    np.testing.assert_array_equal(y, np.where(keep, x, plain))
    (evaluated,), _ = op.forward([x, *clips], None)          # no recording: every element quantized
    np.testing.assert_array_equal(evaluated, plain)
    grads = op.backward(saved, [g], need)
    ex, emax, emin = spec_ulq_grads(x, np.where(keep, 0.0, g), 2.5, 0.0 if fixed_min else -1.7)
    np.testing.assert_allclose(grads[0], np.where(keep, g, ex), atol=1e-12)
    np.testing.assert_allclose(grads[1], emax, rtol=1e-10)
    if not fixed_min:
        np.testing.assert_allclose(grads[2], emin, rtol=1e-10)


def test_qdrop_input_gradient_matches_finite_differences():
    """With the mask drawn again from the same seed, the kept elements' derivative is 1 (central
    differences of sum(g y)); quantized elements away from a rounding step: 0 inside the grid's slope."""
    x = RNG.standard_normal((4, 50)) * 2
    g = RNG.standard_normal(x.shape)
    op = ULQ()
    clips = [np.array(2.0), np.array(-2.0)]

    def forward(values, need=None):
        op.drop = QDrop(0.5, np.random.default_rng(11))
        return op.forward([values, *clips], need or (True, False, False))

    (_,), saved = forward(x)
    gx = op.backward(saved, [g], (True, False, False))[0]
    keep = _drop_mask(11, x.shape, 0.5)
    h = 1e-7
    fd = np.empty_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        fd[i] = (np.sum(g * forward(up)[0][0]) - np.sum(g * forward(down)[0][0])) / (2 * h)
    np.testing.assert_allclose(fd[keep], gx[keep], rtol=1e-6)
    np.testing.assert_allclose(fd[~keep], 0.0, atol=1e-6)     # the rounded elements: flat almost everywhere


def test_fake_quant_qdrop_and_bad_probability():
    act = ActQuantParams(0.05, 0, 8)
    x = RNG.standard_normal((3, 40)) * 10         # many clipped elements
    op = FakeQuant(act)
    op.drop = QDrop(0.5, np.random.default_rng(5))
    (y,), saved = op.forward([x], (True,))
    keep = _drop_mask(5, x.shape, 0.5)
    (plain,), _ = FakeQuant(act).forward([x], None)
    np.testing.assert_array_equal(y, np.where(keep, x, plain))
    (gx,) = op.backward(saved, [np.ones_like(x)], (True,))
    inside = np.abs(x) <= act.scale * 127
    np.testing.assert_array_equal(gx, (keep | inside).astype(x.dtype))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="QDrop probability"):
            QDrop(bad, np.random.default_rng(0))


def test_ulq_guard_reverts_per_spec():
    assert ulq_guard(1.0, 1.0, (2.0, -1.0)) == (2.0, -1.0)
    assert ulq_guard(-0.5, -1.0, (2.0, -1.0)) == (2.0, -1.0)
    assert ulq_guard(1.5, 0.2, (2.0, -1.0)) == (1.5, -1.0)
    assert ulq_guard(1.5, -0.2, (2.0, -1.0)) == (1.5, -0.2)


WEIGHTS = [
    ("conv", (6, 3, 3, 3), 0, 1),
    ("gemm_transB0", (5, 4), 1, 1),
    ("per_tensor", (4, 3, 1, 1), None, 1),
    ("deconv_group2", (4, 3, 2, 2), 1, 2),
]


def arq_reference(w, axis, group, bits):
    view = deconv_channel_view(w, group)
    params = arq(view, axis, bits)
    shape = [1] * view.ndim
    if axis is not None:
        shape[axis] = -1
    return deconv_from_channel_view(params.quantized.astype(np.float32) * params.scale.reshape(shape), group), params


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name,shape,axis,group", WEIGHTS, ids=[w[0] for w in WEIGHTS])
def test_arq_retrain_forward_is_arq_and_gradient_straight_through(name, shape, axis, group, bits):
    w = RNG.standard_normal(shape).astype(np.float32)
    op = ARQRetrain(bits, axis, group)
    (y,), saved = op.forward([w], (True,))
    expect, _ = arq_reference(w, axis, group, bits)
    np.testing.assert_array_equal(y, expect)
    g = RNG.standard_normal(shape).astype(np.float32)
    assert op.backward(saved, [g], (True,))[0] is g


def spec_lsq_grads(w_view, g_view, s, axis, bits):
    """SPEC 4.10 (ulq_retrain), written out per channel."""
    qn, qp = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    rows_w = np.moveaxis(w_view, axis, 0).reshape(w_view.shape[axis], -1) if axis is not None else w_view.reshape(1, -1)
    rows_g = np.moveaxis(g_view, axis, 0).reshape(rows_w.shape) if axis is not None else g_view.reshape(1, -1)
    gs, gw = [], []
    for c in range(rows_w.shape[0]):
        v = rows_w[c] / s[c]
        below, above = v < qn, v > qp
        inside = ~(below | above)
        term = np.where(inside, np.round(v) - v, np.where(below, qn, qp))
        gs.append(np.sum(rows_g[c] * term) / math.sqrt(rows_w.shape[1] * qp))
        gw.append(rows_g[c] * inside)
    gw = np.array(gw)
    gw = np.moveaxis(gw.reshape((w_view.shape[axis],) + tuple(np.delete(w_view.shape, axis))), 0, axis) \
        if axis is not None else gw.reshape(w_view.shape)
    return np.array(gs), gw


@pytest.mark.parametrize("reciprocal", [False, True])
@pytest.mark.parametrize("name,shape,axis,group", WEIGHTS, ids=[w[0] for w in WEIGHTS])
def test_lsq_weight_forward_and_spec_gradients(name, shape, axis, group, reciprocal):
    bits = 4
    w = RNG.standard_normal(shape)
    view = deconv_channel_view(w, group)
    channels = view.shape[axis] if axis is not None else 1
    s = np.abs(RNG.standard_normal(channels)) * 0.2 + 0.1     # small enough that some weights clip
    op = LSQWeight(bits, axis, group, reciprocal=reciprocal)
    param = 1 / s if reciprocal else s
    (y,), saved = op.forward([w, param], (True, True))
    bshape = [1] * view.ndim
    if axis is not None:
        bshape[axis] = -1
    sb = s.reshape(bshape)
    np.testing.assert_allclose(y, deconv_from_channel_view(np.clip(np.rint(view / sb), -8, 7) * sb, group), atol=1e-12)
    g = RNG.standard_normal(shape)
    gw, gs = op.backward(saved, [g], (True, True))
    egs, egw = spec_lsq_grads(view, deconv_channel_view(g, group), s, axis, bits)
    if reciprocal:
        egs = egs * -(s ** 2)
    np.testing.assert_allclose(gs, egs, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gw, deconv_from_channel_view(egw, group), atol=1e-12)
    assert gs.shape == param.shape


def test_lsq_weight_with_arq_scale_equals_arq():
    w = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    _, params = arq_reference(w, 0, 1, 8)
    (y,), _ = LSQWeight(8, 0).forward([w, params.scale], None)
    np.testing.assert_array_equal(y, arq_reference(w, 0, 1, 8)[0])


@pytest.mark.parametrize("name,shape,axis,group", WEIGHTS, ids=[w[0] for w in WEIGHTS])
def test_adaround_gradient_matches_finite_differences(name, shape, axis, group):
    w = RNG.standard_normal(shape)
    _, params = arq_reference(w.astype(np.float32), axis, group, 4)
    op = AdaRound(w, params.scale.astype(np.float64), 4, axis, group)
    alpha = op.init_alpha() + RNG.standard_normal(shape) * 0.3
    g = RNG.standard_normal(shape)
    (y,), saved = op.forward([alpha], (True,))
    (ga,) = op.backward(saved, [g], (True,))
    eps = 1e-6
    fd = np.zeros_like(alpha)
    for i in range(alpha.size):
        a1, a2 = alpha.copy(), alpha.copy()
        a1.flat[i] += eps
        a2.flat[i] -= eps
        fd.flat[i] = (np.sum(g * op.forward([a1], None)[0][0]) - np.sum(g * op.forward([a2], None)[0][0])) / (2 * eps)
    np.testing.assert_allclose(ga, fd, rtol=1e-6, atol=1e-9)


def test_adaround_init_hard_codes_and_regularizer():
    w = RNG.standard_normal((6, 3, 3, 3))
    _, params = arq_reference(w.astype(np.float32), 0, 1, 8)
    scale = params.scale.astype(np.float64)
    op = AdaRound(w, scale, 8, 0)
    alpha = op.init_alpha()
    (y,), _ = op.forward([alpha], None)
    clipped = np.clip(w / scale.reshape(-1, 1, 1, 1), -128, 127) * scale.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(y, clipped, atol=1e-5 * np.abs(w).max())  # soft rounding starts at the float weight
    codes = op.codes(alpha)
    np.testing.assert_array_equal(codes, np.clip(np.floor(w / scale.reshape(-1, 1, 1, 1)) + (alpha >= 0), -128, 127))
    assert np.abs(codes - np.rint(w / scale.reshape(-1, 1, 1, 1))).max() <= 1
    op.hard = True
    (yh,), _ = op.forward([alpha], None)
    np.testing.assert_allclose(yh, codes * scale.reshape(-1, 1, 1, 1), atol=1e-12)
    with pytest.raises(Exception, match="hard rounding"):
        op.forward([alpha], (True,))
    op.hard = False
    a = RNG.standard_normal(w.shape)
    value, grad = op.regularizer(a, 3.0)
    h = 1 / (1 + np.exp(-a)) * 1.2 - 0.1
    assert value == pytest.approx(np.sum(1 - np.abs(2 * np.clip(h, 0, 1) - 1) ** 3))
    eps = 1e-6
    for i in range(0, a.size, 17):
        a1, a2 = a.copy(), a.copy()
        a1.flat[i] += eps
        a2.flat[i] -= eps
        fd = (op.regularizer(a1, 3.0)[0] - op.regularizer(a2, 3.0)[0]) / (2 * eps)
        assert grad.flat[i] == pytest.approx(fd, rel=1e-5, abs=1e-7)   # the sum is ~100: FD noise ~1e-8
