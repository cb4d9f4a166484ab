"""Numpy reference kernels of the Ascend operators and the exact integer layers."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from amct_pipeline.ascend import (
    AscendError,
    ascend_anti_quant,
    ascend_dequant,
    ascend_quant,
    ascend_requant,
    ascend_weight_quant,
    avgpool_int,
    conv_int,
    conv_transpose_int,
    gemm_int,
    matmul_int,
    pack_deq_scale,
)

RNG = np.random.default_rng(1234)


def vinfo(names, elem):
    return [helper.make_tensor_value_info(n, elem, None) for n in names]


def i8(shape, lo=-128, hi=128):
    return RNG.integers(lo, hi, shape).astype(np.int8)


# --------------------------------------------------------------------------- AscendQuant

def test_quant_round_half_even_and_offset_after_rounding():
    x = np.float32([0.5, 1.5, 2.5, -0.5, -1.5, 0.49, -3.7])
    assert ascend_quant(x, 1.0, 0).tolist() == [0, 2, 2, 0, -2, 0, -4]
    assert ascend_quant(x, 1.0, 3).tolist() == [3, 5, 5, 3, 1, 3, -1]
    assert ascend_quant(x, 2.0, 0).tolist() == [1, 3, 5, -1, -3, 1, -7]


@pytest.mark.parametrize("mode, expected", [
    ("Round", [2, -2, 2, -2, 0]),
    ("Floor", [1, -2, 2, -3, 0]),
    ("Ceil", [2, -1, 3, -2, 1]),
    ("Trunc", [1, -1, 2, -2, 0]),
])
def test_quant_round_modes(mode, expected):
    x = np.float32([1.5, -1.5, 2.25, -2.25, 0.25])
    assert ascend_quant(x, 1.0, 0, round_mode=mode).tolist() == expected


def test_quant_saturates_and_dst_types():
    x = np.float32([-1e9, -200, 200, 1e9, np.inf, -np.inf])
    assert ascend_quant(x, 1.0, 0).tolist() == [-128, -128, 127, 127, 127, -128]
    assert ascend_quant(x, 1.0, 0, dst_type="INT4").tolist() == [-8, -8, 7, 7, 7, -8]
    assert ascend_quant(x, 1.0, 0, dst_type=29).dtype == np.int8
    q16 = ascend_quant(np.float32([40000, -300.5]), 1.0, 0, dst_type="INT16")
    assert q16.dtype == np.int16 and q16.tolist() == [32767, -300]
    assert ascend_quant(np.float32([10]), 1.0, 125).tolist() == [127]


def test_quant_sqrt_mode_squares_scale():
    assert ascend_quant(np.float32([1.0, 2.6]), 3.0, 1, sqrt_mode=True).tolist() == [10, 24]


def test_quant_conventions_differ_where_float32_rounds_the_sum():
    x = np.float32([0.49999997])  # 0.5 - 2^-25
    assert ascend_quant(x, 1.0, 1, convention="amct").tolist() == [1]   # rint(0.49999997) + 1
    assert ascend_quant(x, 1.0, 1, convention="cann").tolist() == [2]   # rint(float32(1.49999997) = 1.5)
    y = RNG.normal(0, 30, 1000).astype(np.float32)
    # away from such cases the two agree
    assert np.array_equal(ascend_quant(y, 0.7, -5, convention="amct"), ascend_quant(y, 0.7, -5, convention="cann"))


def test_quant_multiplies_by_float32_reciprocal():
    scale_d = np.float32(0.1)
    inv = np.float32(1) / scale_d
    x = (np.arange(-50, 50, dtype=np.float32) + np.float32(0.5)) * scale_d
    expected = np.clip(np.rint(x * inv) + 7, -128, 127).astype(np.int8)
    assert np.array_equal(ascend_quant(x, inv, 7), expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=0.0), "scale must be finite and > 0"),
    (dict(scale=np.nan), "scale must be finite"),
    (dict(offset=0.5), "offset must be an integer"),
    (dict(round_mode="Banana"), "unsupported round_mode"),
    (dict(dst_type="INT3"), "unsupported dst_type"),
    (dict(convention="other"), "unknown AscendQuant convention"),
])
def test_quant_bad_parameters(kwargs, message):
    args = dict(scale=1.0, offset=0) | kwargs
    with pytest.raises(AscendError, match=message):
        ascend_quant(np.float32([1.0]), **args)


def test_quant_rejects_nan_and_int_input():
    with pytest.raises(AscendError, match="NaN"):
        ascend_quant(np.float32([np.nan]), 1.0, 0)
    with pytest.raises(AscendError, match="floating point"):
        ascend_quant(np.int8([1]), 1.0, 0)


# --------------------------------------------------------------------------- AscendDequant

def test_dequant_per_tensor_and_per_channel():
    acc = RNG.integers(-2 ** 20, 2 ** 20, (2, 3, 4, 4)).astype(np.int32)
    deq = np.float32([0.001, 0.002, 0.5])
    y = ascend_dequant(acc, pack_deq_scale(deq))
    assert y.dtype == np.float32
    assert np.array_equal(y, acc.astype(np.float32) * deq.reshape(1, 3, 1, 1))
    y1 = ascend_dequant(acc, pack_deq_scale(deq[:1]))
    assert np.array_equal(y1, acc.astype(np.float32) * deq[0])
    y2 = ascend_dequant(acc[:, :, 0, 0], pack_deq_scale(deq))  # Gemm output [N, C]
    assert np.array_equal(y2, acc[:, :, 0, 0].astype(np.float32) * deq)


def test_dequant_shift_hand_computed():
    deq = np.float32(0.25)
    acc = np.int32([100000, -7, 2 ** 25, -(2 ** 25), 5]).reshape(1, 5)
    y = ascend_dequant(acc, pack_deq_scale([deq], [4]))
    # floor(100000/16)=6250; floor(-7/16)=-1; 2^25/16=2^21 -> 32767; -> -32768; floor(5/16)=0
    assert y.tolist() == [[6250 * 0.25 * 16, -1 * 0.25 * 16, 32767 * 0.25 * 16, -32768 * 0.25 * 16, 0.0]]
    y1 = ascend_dequant(np.int32([[-7, 7]]), pack_deq_scale([1.0], [1]))
    assert y1.tolist() == [[-8.0, 6.0]]


def test_dequant_per_channel_shift():
    acc = np.int32([[1000, 1000]])
    y = ascend_dequant(acc, pack_deq_scale(np.float32([1.0, 1.0]), [3, 16]))
    assert y.tolist() == [[1000.0, 0.0]]


def test_dequant_relu_sqrt_dtype():
    acc = np.int32([[-4, 4]])
    assert ascend_dequant(acc, pack_deq_scale([0.5]), relu_flag=True).tolist() == [[0.0, 2.0]]
    assert ascend_dequant(acc, pack_deq_scale([0.5]), sqrt_mode=True).tolist() == [[-1.0, 1.0]]
    assert ascend_dequant(acc, pack_deq_scale([0.5]), dtype=1).dtype == np.float16
    assert ascend_dequant(acc, np.float16([0.5])).tolist() == [[-2.0, 2.0]]  # fp16 deq_scale variant


def test_dequant_errors():
    acc = np.zeros((1, 3, 2, 2), np.int32)
    with pytest.raises(AscendError, match="offset_w = 2"):
        ascend_dequant(acc, pack_deq_scale([1.0], None, [2]))
    with pytest.raises(AscendError, match="2 values but the input has shape"):
        ascend_dequant(acc, pack_deq_scale([1.0, 1.0]))
    with pytest.raises(AscendError, match="unsupported output dtype"):
        ascend_dequant(acc, pack_deq_scale([1.0]), dtype=7)


def test_dequant_float_input_from_avgpool():
    avg = np.array([[1 / 3, -2.5]])
    y = ascend_dequant(avg, pack_deq_scale([0.1]))
    assert y.dtype == np.float32 and np.array_equal(y, (avg * np.float64(np.float32(0.1))).astype(np.float32))


# --------------------------------------------------------------------------- other Ascend ops

def test_anti_quant_offset_sign():
    q = np.arange(-128, 128).astype(np.int8)
    scale_d, offset_d = np.float32(0.05), -17
    y = ascend_anti_quant(q, scale_d, -offset_d)  # our attribute offset = -offset_d
    assert y.dtype == np.float32
    assert np.array_equal(y, (q.astype(np.float32) - np.float32(offset_d)) * scale_d)
    assert ascend_anti_quant(np.int8([3]), 2.0, 1, sqrt_mode=True).tolist() == [16.0]
    assert ascend_anti_quant(np.int8([3]), 2.0, 1, dtype=1).dtype == np.float16


def test_weight_quant():
    w = np.int8([[1, -2], [3, 4]])
    assert ascend_weight_quant(w, np.int8([1])).tolist() == [[0, -3], [2, 3]]
    assert ascend_weight_quant(w, np.int8([1, -1])).tolist() == [[0, -3], [4, 5]]  # per output channel
    assert ascend_weight_quant(np.int8([5]), np.int8([-2]), "INT4").tolist() == [7]
    with pytest.raises(AscendError, match=r"outside \[-8, 7\]"):
        ascend_weight_quant(np.int8([6]), np.int8([-2]), "INT4")
    with pytest.raises(AscendError, match=r"outside \[-128, 127\]"):
        ascend_weight_quant(np.int8([127]), np.int8([-1]))


def test_requant():
    acc = np.int32([[5, -5, 7, 1000, -1000, 3]])
    req = pack_deq_scale([0.5])
    assert ascend_requant(acc, req).tolist() == [[2, -2, 4, 127, -128, 2]]  # half-to-even
    assert ascend_requant(acc, req, relu_flag=True).tolist() == [[2, 0, 4, 127, 0, 2]]
    per_c = pack_deq_scale([0.5, 0.25, 1.0])
    assert ascend_requant(np.int32([[[4], [4], [4]]]), per_c).tolist() == [[[2], [1], [4]]]
    assert ascend_requant(np.int32([[100000]]), pack_deq_scale([0.001], [4])).tolist() == [[100]]


# --------------------------------------------------------------------------- integer layers

def naive_conv(x, w, b, strides, pads, dil, group):
    """Direct float64 convolution of integer values, one shifted slice per kernel tap."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    nd = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    cout, cg = w.shape[:2]
    k = w.shape[2:]
    out = [(xp.shape[2 + i] - dil[i] * (k[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    y = np.zeros([x.shape[0], cout] + out)
    og = cout // group
    for g in range(group):
        for kidx in np.ndindex(*k):
            sl = tuple(slice(kidx[i] * dil[i], kidx[i] * dil[i] + (out[i] - 1) * strides[i] + 1, strides[i])
                       for i in range(nd))
            patch = xp[(slice(None), slice(g * cg, (g + 1) * cg)) + sl]
            wk = w[(slice(g * og, (g + 1) * og), slice(None)) + kidx]
            y[:, g * og:(g + 1) * og] += np.einsum("nc...,oc->no...", patch, wk)
    if b is not None:
        y += b.astype(np.float64).reshape((1, -1) + (1,) * nd)
    return y


CONV_CASES = [
    # (x shape, w shape, strides, pads, dilations, group)
    ((2, 3, 9, 9), (4, 3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((1, 4, 10, 7), (6, 2, 3, 2), (2, 1), (1, 0, 2, 1), (1, 2), 2),            # grouped, asym pads
    ((1, 8, 12, 12), (8, 1, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 8),          # depthwise, stride 2
    ((1, 6, 11, 11), (12, 1, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 6),         # depthwise multiplier 2, dilation
    ((2, 5, 8, 8), (7, 5, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),            # pointwise
    ((2, 3, 17), (5, 3, 4), (3,), (2, 1), (2,), 1),                            # 1-D
    ((1, 4, 13), (4, 1, 5), (1,), (2, 2), (1,), 4),                            # 1-D depthwise
]


@pytest.mark.parametrize("xs, ws, strides, pads, dil, group", CONV_CASES)
def test_conv_int_exact(xs, ws, strides, pads, dil, group):
    x, w = i8(xs), i8(ws)
    b = RNG.integers(-2 ** 20, 2 ** 20, ws[0]).astype(np.int32)
    y = conv_int(x, w, b, strides, pads, dil, group)
    assert y.dtype == np.int32
    assert np.array_equal(y, naive_conv(x, w, b, strides, pads, dil, group))
    assert np.array_equal(conv_int(x, w, None, strides, pads, dil, group),
                          naive_conv(x, w, None, strides, pads, dil, group))


def test_conv_int_extremes_and_zero_point():
    x = np.full((1, 16, 5, 5), -128, np.int8)
    w = np.full((2, 16, 3, 3), -128, np.int8)
    y = conv_int(x, w, None, None, [1, 1, 1, 1])
    assert y[0, 0, 2, 2] == 16 * 9 * 128 * 128 and y[0, 0, 0, 0] == 16 * 4 * 128 * 128
    xq, wq, o = i8((1, 3, 6, 6)), i8((4, 3, 3, 3)), -37
    # zero point: padding stands for real zero, i.e. code o
    ref = naive_conv(xq.astype(np.int64) - o, wq, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert np.array_equal(conv_int(xq, wq, None, None, [1, 1, 1, 1], x_offset=o), ref)


def test_conv_int_auto_pad_matches_onnx_reference():
    x, w = i8((1, 2, 7, 8)), i8((3, 2, 3, 3))
    for auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad=auto_pad, strides=[2, 2])
        graph = helper.make_graph([node], "g", vinfo("xw", TensorProto.DOUBLE), vinfo("y", TensorProto.DOUBLE))
        ref = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
        expected = ref.run(None, {"x": x.astype(np.float64), "w": w.astype(np.float64)})[0]
        assert np.array_equal(conv_int(x, w, None, [2, 2], auto_pad=auto_pad), expected), auto_pad


def test_conv_int_overflow():
    x = np.full((1, 1, 1, 1), 127, np.int8)
    w = np.full((1, 1, 1, 1), 127, np.int8)
    b = np.int32([2 ** 31 - 100])
    with pytest.raises(AscendError, match="overflows INT32"):
        conv_int(x, w, b)
    assert conv_int(x, w, b, on_overflow="saturate").tolist() == [[[[2 ** 31 - 1]]]]


def test_conv_int_bad_group():
    with pytest.raises(AscendError, match="group=2 does not fit"):
        conv_int(i8((1, 3, 4, 4)), i8((2, 3, 1, 1)), group=2)


@pytest.mark.parametrize("xs, ws, attrs", [
    ((1, 4, 5, 5), (4, 3, 3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])),
    ((2, 4, 4, 6), (4, 2, 2, 3), dict(strides=[2, 1], group=2, dilations=[1, 2])),
    ((1, 3, 7), (3, 2, 4), dict(strides=[3], pads=[1, 2])),
    ((1, 2, 4, 5), (2, 3, 3, 3), dict(strides=[2, 2], output_shape=[9, 10])),
    ((1, 2, 4, 5), (2, 3, 3, 3), dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    ((1, 2, 4, 5), (2, 3, 3, 3), dict(strides=[2, 2], auto_pad="SAME_LOWER", output_shape=[8, 9])),
])
def test_conv_transpose_int_matches_onnxruntime(xs, ws, attrs):
    import onnxruntime as ort

    x, w = i8(xs), i8(ws)
    cout = ws[1] * attrs.get("group", 1)
    b = RNG.integers(-1000, 1000, cout).astype(np.int32)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", vinfo("xwb", TensorProto.FLOAT), vinfo("y", TensorProto.FLOAT))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # integer sums stay far below 2^24, so float32 is exact here
    expected = sess.run(None, {"x": x.astype(np.float32), "w": w.astype(np.float32), "b": b.astype(np.float32)})[0]
    y = conv_transpose_int(x, w, b, attrs.get("strides"), attrs.get("pads"), attrs.get("dilations"),
                           attrs.get("group", 1), attrs.get("output_padding"), attrs.get("output_shape"),
                           auto_pad=attrs.get("auto_pad", "NOTSET"))
    assert y.dtype == np.int32 and np.array_equal(y, expected)


def test_gemm_and_matmul_int():
    a, b = i8((5, 300)), i8((300, 7))
    c = RNG.integers(-1000, 1000, 7).astype(np.int32)
    exact = a.astype(np.int64) @ b.astype(np.int64)
    assert np.array_equal(gemm_int(a, b, c), exact + c)
    assert np.array_equal(gemm_int(a.T.copy(), b.T.copy(), c, transA=1, transB=1), exact + c)
    assert np.array_equal(gemm_int(a, b, None, a_offset=3), (a.astype(np.int64) - 3) @ b.astype(np.int64))
    with pytest.raises(AscendError, match="alpha = beta = 1"):
        gemm_int(a, b, c, alpha=2.0)
    a3 = i8((2, 3, 300))
    assert np.array_equal(matmul_int(a3, b), a3.astype(np.int64) @ b.astype(np.int64))
    assert matmul_int(a3, b).dtype == np.int32
    v = i8((300,))
    assert np.array_equal(matmul_int(v, b), v.astype(np.int64) @ b.astype(np.int64))


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[8, 8], strides=[8, 8]),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
    dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1),
    dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1, count_include_pad=1),
])
def test_avgpool_int_matches_onnxruntime(attrs):
    import onnxruntime as ort

    x = i8((2, 3, 8, 9))
    node = helper.make_node("AveragePool", ["x"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", vinfo("x", TensorProto.FLOAT), vinfo("y", TensorProto.FLOAT))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"x": x.astype(np.float32)})[0]  # window sums are exact in float32
    y = avgpool_int(x, attrs["kernel_shape"], attrs.get("strides"), attrs.get("pads"),
                    ceil_mode=attrs.get("ceil_mode", 0), count_include_pad=attrs.get("count_include_pad", 0))
    assert y.dtype == np.float64 and y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=2 ** -23, atol=0)  # within one float32 ulp


def test_avgpool_int_zero_point():
    x = i8((1, 2, 4, 4))
    y = avgpool_int(x, [2, 2], [2, 2], x_offset=-5)
    expected = (x.astype(np.float64) + 5).reshape(1, 2, 2, 2, 2, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(y, expected, rtol=1e-15)
