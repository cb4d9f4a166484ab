"""amct_pipeline.quant.math against the SPEC 4.1-4.3 formulas written out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from amct_pipeline.algorithms.base import ActQuantParams
from amct_pipeline.quant.math import (
    FLT_EPSILON,
    arq,
    fake_quant,
    process_scale,
    quantize,
    quantize_bias,
    scale_offset_from_range,
)


def ref_asym(mn, mx, bits=8):
    mn, mx = min(mn, 0.0), max(mx, 0.0)
    scale = (mx - mn) / (2 ** bits - 1)
    return scale, round(-(2 ** (bits - 1)) - mn / scale)


def test_asymmetric_matches_spec_formula():
    rng = np.random.default_rng(0)
    for mn, mx in rng.uniform(-10, 10, (200, 2)):
        mn, mx = min(mn, mx), max(mn, mx)
        p = scale_offset_from_range(mn, mx)
        scale, offset = ref_asym(mn, mx)
        assert p.scale == pytest.approx(scale, rel=1e-12)
        assert p.offset == offset and -128 <= p.offset <= 127
        # the range (with 0 added) is representable up to half a step
        assert p.clip_min <= min(mn, 0) + p.scale / 2 and p.clip_max >= max(mx, 0) - p.scale / 2


def test_asymmetric_examples():
    assert scale_offset_from_range(-1.0, 3.0) == ActQuantParams(4 / 255, -64, 8)
    p = scale_offset_from_range(2.0, 5.0)          # zero is forced into the range
    assert p.scale == pytest.approx(5 / 255) and p.offset == -128
    p = scale_offset_from_range(-5.0, -2.0)
    assert p.scale == pytest.approx(5 / 255) and p.offset == 127
    assert scale_offset_from_range(-1.0, 1.0, num_bits=16).scale == pytest.approx(2 / 65535)


def test_symmetric_127_128_rule():
    assert scale_offset_from_range(-1.0, 2.0, symmetric=True) == ActQuantParams(2 / 127, 0, 8)
    assert scale_offset_from_range(-2.0, 1.0, symmetric=True) == ActQuantParams(2 / 128, 0, 8)
    assert scale_offset_from_range(-2.0, 2.0, symmetric=True).scale == pytest.approx(2 / 127)
    assert scale_offset_from_range(0.0, 3.0, num_bits=16, symmetric=True).scale == pytest.approx(3 / 32767)


def test_degenerate_scale_is_sanitised():
    assert scale_offset_from_range(0.0, 0.0) == ActQuantParams(1.0, -128, 8)
    assert scale_offset_from_range(0.0, 0.0, symmetric=True) == ActQuantParams(1.0, 0, 8)
    tiny = FLT_EPSILON * 100                      # scale = tiny/255 < FLT_EPSILON
    assert scale_offset_from_range(0.0, tiny) == ActQuantParams(1.0, -128, 8)
    assert process_scale(0.5, 3, 8, symmetric=False) == ActQuantParams(0.5, 3, 8)


def test_unusable_ranges_raise():
    with pytest.raises(ValueError):
        scale_offset_from_range(0.0, 1e12)         # 1/scale < FLT_EPSILON
    with pytest.raises(ValueError):
        scale_offset_from_range(0.0, float("nan"))
    with pytest.raises(ValueError):
        scale_offset_from_range(0.0, 1.0, num_bits=1)


def test_fake_quant_and_quantize():
    p = ActQuantParams(0.1, -20, 8)
    x = np.array([-100.0, -1.0, 0.05, 0.15, 0.25, 3.0, 100.0], dtype=np.float32)
    q = quantize(x, p)
    ref = np.clip(np.rint(x / np.float32(0.1)) - 20, -128, 127)
    assert q.dtype == np.int8 and np.array_equal(q, ref)
    assert q[0] == -128 and q[-1] == 127          # clipped at both ends
    y = fake_quant(x, p)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, (ref + 20) * 0.1, rtol=1e-6)
    # half-to-even rounding (np.rint), not half-away-from-zero
    half = quantize(np.array([0.5, 1.5, 2.5, -0.5]), ActQuantParams(1.0, 0, 8))
    assert half.tolist() == [0, 2, 2, 0]
    assert quantize(np.array([1e9]), ActQuantParams(1.0, 0, 16)).dtype == np.int16


def ref_arq_row(row, bits=8):
    mx, mn = max(row.max(), 0), min(row.min(), 0)
    scope = 2 ** (bits - 1) - 1 + (abs(mx) < abs(mn))
    scale = max(abs(mx), abs(mn)) / scope
    return 1.0 if scale < FLT_EPSILON else scale


def test_arq_per_channel_matches_reference():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 3, 3, 3)).astype(np.float32)
    w[2] = 0.0                                   # zero channel -> scale 1.0, codes 0
    w[3, 0, 0, 0] = -10.0                        # negative extreme -> /128, code -128
    p = arq(w, channel_axis=0)
    assert p.scale.dtype == np.float32 and p.scale.shape == (6,)
    assert p.quantized.dtype == np.int8 and p.quantized.shape == w.shape
    for c in range(6):
        assert p.scale[c] == pytest.approx(ref_arq_row(w[c].ravel()), rel=1e-6)
        ref = np.clip(np.rint(w[c] / p.scale[c]), -128, 127)
        assert np.array_equal(p.quantized[c], ref)
    assert p.scale[2] == 1.0 and not p.quantized[2].any()
    assert p.quantized[3, 0, 0, 0] == -128
    assert np.abs(p.quantized * p.scale[:, None, None, None] - w).max() <= p.scale.max() / 2 + 1e-6


def test_arq_other_axis_and_per_tensor():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(5, 4)).astype(np.float32)  # e.g. a MatMul weight [K, N] with N output channels
    p = arq(w, channel_axis=1)
    assert p.scale.shape == (4,)
    for c in range(4):
        assert p.scale[c] == pytest.approx(ref_arq_row(w[:, c]), rel=1e-6)
    t = arq(w, channel_axis=None)
    assert t.scale.shape == (1,) and t.scale[0] == pytest.approx(ref_arq_row(w.ravel()), rel=1e-6)
    assert np.abs(t.quantized.astype(int)).max() in (127, 128)
    assert arq(np.zeros((2, 2)), None).scale[0] == 1.0
    four = arq(w, channel_axis=None, num_bits=4)
    assert four.quantized.min() >= -8 and four.quantized.max() <= 7


def test_quantize_bias():
    scale_w = np.array([0.01, 0.02], dtype=np.float32)
    b = quantize_bias(np.array([1.0, -3.0]), 0.5, scale_w, "conv1")
    assert b.dtype == np.int32
    assert b.tolist() == [round(1.0 / (np.float32(0.5) * np.float32(0.01))), round(-3.0 / (np.float32(0.5) * np.float32(0.02)))]
    assert quantize_bias(np.array([1.0, 2.0]), 0.5, np.float32(0.25), "fc").tolist() == [8, 16]


def test_quantize_bias_out_of_range_names_layer():
    with pytest.raises(ValueError, match=r"conv7.*skip_layers"):
        quantize_bias(np.array([1.0, 1e6]), 1e-4, np.array([1e-4, 1e-4]), "conv7")
    with pytest.raises(ValueError):
        quantize_bias(np.array([1.0, 2.0, 3.0]), 1.0, np.array([1.0, 1.0]), "bad")
