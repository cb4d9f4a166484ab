"""Every engine operator: forward against onnxruntime (float32) and its VJP against central finite
differences (float64, small tensors), over the attribute variants the shared models and the ONNX
specification use."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from amct_pipeline.autodiff import supported_ops

from ad_check import Case, check_forward, check_gradients

RNG = np.random.default_rng(1234)
F, I64 = TensorProto.FLOAT, TensorProto.INT64


def r(*shape, low=None, high=None):
    """float32-representable float64 values (so float32 and float64 runs see the same numbers)."""
    if low is not None:
        v = RNG.uniform(low, high, shape)
    else:
        v = RNG.standard_normal(shape)
    return v.astype(np.float32).astype(np.float64)


def away(*shape, gap=0.05):
    """Normal values kept away from 0 (no kink of Relu / Abs / Clip at 0 inside a finite difference)."""
    v = r(*shape)
    return np.where(np.abs(v) < gap, np.sign(v + 1e-9) * (gap + np.abs(v)), v).astype(np.float32).astype(np.float64)


def i64(*values):
    return np.array(values, dtype=np.int64)


def x_(shape, role="in", name="x", **kw):
    return (name, r(*shape, **kw), role)


def c_(name, value):
    return (name, np.asarray(value), "const")


def conv(id, xs, ws, bias=True, op="Conv", opset=17, **attrs):
    inputs = [("x", r(*xs), "in"), ("w", r(*ws), "param")]
    if bias:
        nb = ws[0] if op == "Conv" else ws[1] * attrs.get("group", 1)
        inputs.append(("b", r(nb), "param"))
    return Case(id, op, inputs, attrs, opset)


CASES = [
    # convolutions
    conv("conv3x3_pad1", (2, 3, 5, 5), (4, 3, 3, 3), kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    conv("conv3x3_s2_asym_pads", (1, 2, 6, 6), (3, 2, 3, 3), pads=[0, 0, 1, 1], strides=[2, 2]),
    conv("conv_dilated", (1, 2, 7, 7), (2, 2, 3, 3), pads=[2, 2, 2, 2], dilations=[2, 2]),
    conv("conv_grouped", (1, 4, 5, 5), (6, 2, 3, 3), group=2, pads=[1, 1, 1, 1]),
    conv("conv_depthwise", (2, 3, 6, 6), (3, 1, 3, 3), group=3, pads=[1, 1, 1, 1]),
    conv("conv_depthwise_s2", (1, 4, 7, 7), (4, 1, 3, 3), group=4, pads=[1, 1, 1, 1], strides=[2, 2]),
    conv("conv_depthwise_dilated", (1, 2, 7, 7), (2, 1, 3, 3), group=2, pads=[2, 2, 2, 2], dilations=[2, 2]),
    conv("conv_depth_multiplier", (1, 3, 5, 5), (6, 1, 3, 3), group=3),
    conv("conv_depthwise_asym_pads", (1, 3, 6, 6), (3, 1, 3, 3), group=3, pads=[0, 1, 2, 0]),
    conv("conv_pointwise", (2, 4, 3, 3), (5, 4, 1, 1), bias=False),
    conv("conv_pointwise_s2", (1, 3, 5, 5), (2, 3, 1, 1), strides=[2, 2]),
    conv("conv_same_upper_even_k", (1, 2, 5, 6), (2, 2, 4, 4), auto_pad="SAME_UPPER", strides=[2, 2]),
    conv("conv_same_lower", (1, 2, 5, 5), (2, 2, 4, 4), auto_pad="SAME_LOWER"),
    conv("conv_valid", (1, 2, 6, 5), (2, 2, 3, 2), auto_pad="VALID", strides=[1, 2]),
    conv("conv_5x5_same_upper_opset8", (1, 1, 6, 6), (2, 1, 5, 5), bias=False, auto_pad="SAME_UPPER", opset=8),
    conv("conv1d", (2, 3, 7), (4, 3, 3), pads=[1, 1], strides=[2]),
    # >= 8 input channels per group at stride 1: the shifted-GEMM kernel
    conv("conv_shifted_3x3", (2, 8, 5, 6), (3, 8, 3, 3), pads=[1, 1, 1, 1]),
    conv("conv_shifted_grouped_dilated", (1, 16, 6, 6), (4, 8, 3, 3), group=2, dilations=[2, 2], pads=[2, 1, 2, 1]),
    conv("conv_shifted_same_upper_even_k", (1, 8, 4, 5), (2, 8, 2, 2), auto_pad="SAME_UPPER"),
    conv("conv_shifted_valid_5x5", (1, 8, 7, 6), (2, 8, 5, 3), bias=False),
    conv("conv_shifted_1d", (2, 8, 7), (3, 8, 3), pads=[2, 0]),
    conv("convT_s2_outpad", (1, 3, 3, 3), (3, 2, 3, 3), op="ConvTranspose", strides=[2, 2], pads=[1, 1, 1, 1],
         output_padding=[1, 1]),
    conv("convT_grouped", (1, 4, 3, 3), (4, 1, 3, 3), op="ConvTranspose", group=2, strides=[2, 2]),
    conv("convT_dilated", (1, 2, 3, 4), (2, 3, 2, 2), op="ConvTranspose", dilations=[2, 2], bias=False),
    conv("convT_output_shape", (1, 2, 3, 3), (2, 2, 3, 3), op="ConvTranspose", strides=[2, 2], output_shape=[6, 6]),
    conv("convT_1d", (2, 2, 4), (2, 3, 3), op="ConvTranspose", strides=[2], pads=[1, 0]),
    # pooling
    Case("maxpool_2x2", "MaxPool", [x_((2, 2, 4, 6))], dict(kernel_shape=[2, 2], strides=[2, 2])),
    Case("maxpool_3x3_s2_p1", "MaxPool", [x_((1, 2, 7, 7))], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    Case("maxpool_ceil", "MaxPool", [x_((1, 1, 6, 7))], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    Case("maxpool_dilated", "MaxPool", [x_((1, 1, 7, 7))], dict(kernel_shape=[2, 2], dilations=[2, 2])),
    Case("maxpool_same_upper", "MaxPool", [x_((1, 2, 5, 5))], dict(kernel_shape=[2, 2], auto_pad="SAME_UPPER")),
    Case("maxpool_indices", "MaxPool", [x_((1, 2, 4, 5))], dict(kernel_shape=[2, 2], strides=[2, 1], pads=[0, 0, 1, 0]),
         outputs=[("y", F), ("idx", I64)]),
    Case("maxpool_1d", "MaxPool", [x_((2, 2, 9))], dict(kernel_shape=[3], strides=[2])),
    Case("avgpool_8x8", "AveragePool", [x_((2, 2, 8, 8))], dict(kernel_shape=[8, 8], strides=[8, 8])),
    Case("avgpool_pads_exclude", "AveragePool", [x_((1, 2, 5, 5))], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    Case("avgpool_pads_include", "AveragePool", [x_((1, 2, 5, 5))],
         dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)),
    Case("avgpool_ceil", "AveragePool", [x_((1, 1, 6, 6))], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    Case("avgpool_ceil_include", "AveragePool", [x_((1, 1, 6, 6))],
         dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, pads=[1, 1, 1, 1], count_include_pad=1)),
    Case("avgpool_1d", "AveragePool", [x_((1, 3, 8))], dict(kernel_shape=[2], strides=[2])),
    Case("global_avgpool", "GlobalAveragePool", [x_((2, 3, 4, 5))]),
    Case("global_maxpool", "GlobalMaxPool", [x_((2, 3, 4, 5))]),
    # matrix products
    Case("gemm_transB", "Gemm", [x_((3, 4), name="a"), x_((5, 4), "param", "b"), x_((5,), "param", "c")], dict(transB=1)),
    Case("gemm_transA_alpha_beta", "Gemm", [x_((4, 3), name="a"), x_((4, 5), name="b"), x_((1, 5), name="c")],
         dict(transA=1, alpha=0.5, beta=2.0)),
    Case("gemm_both_scalar_c", "Gemm", [x_((4, 3), name="a"), x_((5, 4), name="b"), x_((1,), name="c")],
         dict(transA=1, transB=1)),
    Case("gemm_no_c", "Gemm", [x_((2, 3), name="a"), x_((3, 4), name="b")], {}),
    Case("matmul_2d", "MatMul", [x_((3, 4), name="a"), x_((4, 2), "param", "b")]),
    Case("matmul_batched_broadcast", "MatMul", [x_((2, 1, 3, 4), name="a"), x_((5, 4, 2), name="b")]),
    Case("matmul_vec_mat", "MatMul", [x_((4,), name="a"), x_((2, 4, 3), name="b")]),
    Case("matmul_mat_vec", "MatMul", [x_((2, 3, 4), name="a"), x_((4,), name="b")]),
    # elementwise binary with broadcasting
    Case("add_broadcast", "Add", [x_((3, 1, 4), name="a"), x_((2, 1), name="b")]),
    Case("sub_broadcast", "Sub", [x_((2, 3), name="a"), x_((3,), name="b")]),
    Case("mul_broadcast", "Mul", [x_((2, 3, 4), name="a"), x_((1, 3, 1), name="b")]),
    Case("div_broadcast", "Div", [x_((2, 3), name="a"), ("b", away(3, gap=0.5), "in")]),
    Case("pow_const_exponent", "Pow", [x_((2, 3), low=0.5, high=2.0), c_("e", np.array(2.5, np.float32))]),
    Case("pow_square", "Pow", [x_((2, 3)), c_("e", np.array(2.0, np.float32))]),
    Case("pow_both", "Pow", [x_((2, 3), name="a", low=0.5, high=2.0), x_((3,), name="b")]),
    Case("sum3", "Sum", [x_((2, 3), name="a"), x_((3,), name="b"), x_((2, 1), name="c")]),
    Case("max2", "Max", [x_((2, 3), name="a"), x_((2, 3), name="b")]),
    Case("min2", "Min", [x_((2, 3), name="a"), x_((1, 3), name="b")]),
    # elementwise unary
    Case("relu", "Relu", [("x", away(3, 4), "in")]),
    Case("neg", "Neg", [x_((3, 4))]),
    Case("exp", "Exp", [x_((3, 4))]),
    Case("log", "Log", [x_((3, 4), low=0.2, high=3.0)]),
    Case("sqrt", "Sqrt", [x_((3, 4), low=0.2, high=3.0)]),
    Case("abs", "Abs", [("x", away(3, 4), "in")]),
    Case("reciprocal", "Reciprocal", [("x", away(3, 4, gap=0.3), "in")]),
    Case("sigmoid", "Sigmoid", [x_((3, 4))]),
    Case("tanh", "Tanh", [x_((3, 4))]),
    Case("erf", "Erf", [x_((3, 4))]),
    Case("softplus", "Softplus", [x_((3, 4))]),
    Case("elu", "Elu", [("x", away(3, 4), "in")], dict(alpha=0.7)),
    Case("leaky_relu", "LeakyRelu", [("x", away(3, 4), "in")], dict(alpha=0.1)),
    Case("hard_sigmoid", "HardSigmoid", [x_((3, 4), low=-4.0, high=4.0)], dict(alpha=0.3, beta=0.4)),
    Case("hard_swish", "HardSwish", [x_((3, 5), low=-5.0, high=5.0)], opset=14),
    Case("gelu_erf", "Gelu", [x_((3, 4))], opset=20),
    Case("gelu_tanh", "Gelu", [x_((3, 4))], dict(approximate="tanh"), opset=20),
    Case("clip_inputs", "Clip", [x_((3, 4), low=-2.0, high=8.0), c_("lo", np.float32(0)), c_("hi", np.float32(6))], opset=13),
    Case("clip_min_only", "Clip", [x_((3, 4)), c_("lo", np.float32(-0.3))], opset=13),
    Case("clip_attrs_opset6", "Clip", [x_((3, 4), low=-2.0, high=8.0)], dict(min=0.0, max=6.0), opset=6),
    Case("clip_learned_bounds", "Clip", [x_((3, 4), low=-2.0, high=2.0), ("lo", np.array(-0.5), "in"),
                                        ("hi", np.array(0.7), "in")], opset=13),
    Case("prelu", "PRelu", [("x", away(2, 3, 2, 2), "in"), x_((3, 1, 1), "param", "slope")]),
    Case("floor_zero_grad", "Floor", [x_((3, 4))]),
    Case("round_zero_grad", "Round", [x_((3, 4))]),
    # softmax and normalisation
    Case("softmax_opset13_axis1", "Softmax", [x_((2, 3, 4))], dict(axis=1), opset=13),
    Case("softmax_opset11_coerce", "Softmax", [x_((2, 3, 4))], dict(axis=1), opset=11),
    Case("softmax_opset9_axis2", "Softmax", [x_((1, 5, 2))], dict(axis=2), opset=9),
    Case("logsoftmax", "LogSoftmax", [x_((2, 5))], opset=13),
    Case("batchnorm", "BatchNormalization", [x_((2, 3, 2, 2)), x_((3,), name="scale"), x_((3,), name="bias"),
                                             x_((3,), name="mean"), x_((3,), name="var", low=0.5, high=2.0)],
         dict(epsilon=1e-3)),
    Case("batchnorm_2d_opset9", "BatchNormalization", [x_((4, 3)), x_((3,), "param", "scale"),
                                                      x_((3,), "param", "bias"), c_("mean", r(3).astype(np.float32)),
                                                      c_("var", r(3, low=0.5, high=2.0).astype(np.float32))], opset=9),
    Case("layernorm_last", "LayerNormalization", [x_((2, 3, 4)), x_((4,), "param", "scale"), x_((4,), "param", "bias")]),
    Case("layernorm_axis1", "LayerNormalization", [x_((2, 3, 4)), x_((3, 4), name="scale")], dict(axis=1, epsilon=1e-3)),
    # reductions
    Case("reducemean_attr", "ReduceMean", [x_((2, 3, 4))], dict(axes=[1, 2], keepdims=0), opset=13),
    Case("reducemean_input_axes", "ReduceMean", [x_((2, 3, 4)), c_("axes", i64(-1))], opset=18),
    Case("reducemean_all", "ReduceMean", [x_((2, 3))], dict(keepdims=1), opset=13),
    Case("reducesum_input_axes", "ReduceSum", [x_((2, 3, 4)), c_("axes", i64(0, 2))], dict(keepdims=0), opset=13),
    Case("reducesum_noop", "ReduceSum", [x_((2, 3)), c_("axes", np.zeros(0, np.int64))], dict(noop_with_empty_axes=1),
         opset=13),
    # shape and data movement
    Case("concat_axis1", "Concat", [x_((2, 1, 3), name="a"), x_((2, 2, 3), name="b")], dict(axis=1)),
    Case("concat_neg_axis", "Concat", [x_((2, 3), name="a"), x_((2, 2), name="b")], dict(axis=-1)),
    Case("split_attr_opset11", "Split", [x_((2, 5))], dict(axis=1, split=[2, 3]), opset=11,
         outputs=[("y0", F), ("y1", F)]),
    Case("split_input", "Split", [x_((6, 2)), c_("split", i64(1, 2, 3))], opset=13,
         outputs=[("y0", F), ("y1", F), ("y2", F)]),
    Case("split_num_outputs", "Split", [x_((2, 7))], dict(axis=1, num_outputs=3), opset=18,
         outputs=[("y0", F), ("y1", F), ("y2", F)]),
    Case("split_equal", "Split", [x_((4, 2))], opset=13, outputs=[("y0", F), ("y1", F)]),
    Case("reshape_zero_minus1", "Reshape", [x_((2, 3, 4)), c_("s", i64(0, -1, 2))]),
    Case("reshape_allowzero", "Reshape", [x_((2, 3, 4)), c_("s", i64(4, 6))], dict(allowzero=1), opset=14),
    Case("flatten_axis2", "Flatten", [x_((2, 3, 2, 2))], dict(axis=2)),
    Case("flatten_axis0", "Flatten", [x_((2, 3))], dict(axis=0)),
    Case("transpose_perm", "Transpose", [x_((2, 3, 4))], dict(perm=[2, 0, 1])),
    Case("transpose_default", "Transpose", [x_((2, 3, 4))]),
    Case("squeeze_attr_opset11", "Squeeze", [x_((2, 1, 3, 1))], dict(axes=[1, -1]), opset=11),
    Case("squeeze_input", "Squeeze", [x_((2, 1, 3)), c_("axes", i64(1))], opset=13),
    Case("squeeze_all", "Squeeze", [x_((1, 3, 1))], opset=13),
    Case("unsqueeze_attr_opset9", "Unsqueeze", [x_((2, 3))], dict(axes=[0]), opset=9),
    Case("unsqueeze_input_neg", "Unsqueeze", [x_((2, 3)), c_("axes", i64(1, -1))], opset=13),
    Case("slice_attrs_opset9", "Slice", [x_((1, 6, 4))], dict(axes=[2], starts=[2], ends=[2 ** 63 - 1]), opset=9),
    Case("slice_steps_negative", "Slice", [x_((4, 6)), c_("st", i64(3, -1)), c_("en", i64(0, -2 ** 63)),
                                           c_("ax", i64(0, 1)), c_("sp", i64(-1, -2))], opset=13),
    Case("slice_neg_axes", "Slice", [x_((3, 5)), c_("st", i64(1)), c_("en", i64(-1)), c_("ax", i64(-1))], opset=13),
    Case("gather_axis1", "Gather", [x_((3, 4, 2)), c_("i", np.array([[0, -1], [2, 0]], np.int64))], dict(axis=1)),
    Case("gather_scalar", "Gather", [x_((3, 4)), c_("i", np.array(1, np.int64))], dict(axis=0)),
    Case("expand", "Expand", [x_((3, 1)), c_("s", i64(2, 3, 4))], opset=13),
    Case("tile", "Tile", [x_((2, 3)), c_("reps", i64(2, 3))], opset=13),
    Case("pad_constant", "Pad", [x_((2, 3)), c_("pads", i64(1, 0, 2, 2)), c_("v", np.float32(0.5))], opset=13),
    Case("pad_negative", "Pad", [x_((3, 4)), c_("pads", i64(-1, 1, 0, -2))], opset=13),
    Case("pad_reflect", "Pad", [x_((1, 3, 4)), c_("pads", i64(0, 1, 2, 0, 2, 1))], dict(mode="reflect"), opset=13),
    Case("pad_edge", "Pad", [x_((1, 3, 4)), c_("pads", i64(0, 2, 1, 0, 1, 3))], dict(mode="edge"), opset=13),
    Case("depth_to_space_dcr", "DepthToSpace", [x_((1, 8, 2, 3))], dict(blocksize=2)),
    Case("depth_to_space_crd", "DepthToSpace", [x_((2, 9, 2, 2))], dict(blocksize=3, mode="CRD")),
    Case("space_to_depth", "SpaceToDepth", [x_((1, 2, 4, 6))], dict(blocksize=2)),
    Case("identity", "Identity", [x_((2, 3))]),
    Case("dropout_inference", "Dropout", [x_((2, 3))], opset=13),
    Case("where", "Where", [c_("c", np.array([[True, False, True]])), x_((2, 3), name="a"), x_((1,), name="b")]),
    Case("cast_double", "Cast", [x_((2, 3))], dict(to=TensorProto.DOUBLE), outputs=[("y", TensorProto.DOUBLE)]),
    # resizing
    Case("resize_nearest_asym_floor", "Resize", [x_((1, 2, 3, 4)), c_("roi", np.zeros(0, np.float32)),
                                                 c_("scales", np.array([1, 1, 2, 2], np.float32))],
         dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), opset=13),
    Case("resize_nearest_half_pixel_sizes", "Resize", [x_((1, 2, 3, 4)), ("", np.zeros(0), "const"),
                                                       ("", np.zeros(0), "const"), c_("sizes", i64(1, 2, 7, 5))],
         dict(mode="nearest"), opset=13),
    Case("resize_linear_half_pixel", "Resize", [x_((1, 2, 3, 4)), c_("roi", np.zeros(0, np.float32)),
                                                c_("scales", np.array([1, 1, 2, 2], np.float32))],
         dict(mode="linear"), opset=13),
    Case("resize_linear_align_corners", "Resize", [x_((1, 1, 3, 4)), ("", np.zeros(0), "const"),
                                                   ("", np.zeros(0), "const"), c_("sizes", i64(1, 1, 5, 7))],
         dict(mode="linear", coordinate_transformation_mode="align_corners"), opset=13),
    Case("resize_linear_pytorch_down", "Resize", [x_((1, 1, 6, 8)), c_("roi", np.zeros(0, np.float32)),
                                                  c_("scales", np.array([1, 1, 0.5, 0.75], np.float32))],
         dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"), opset=13),
    Case("resize_cubic", "Resize", [x_((1, 1, 4, 4)), c_("roi", np.zeros(0, np.float32)),
                                    c_("scales", np.array([1, 1, 2, 1.5], np.float32))], dict(mode="cubic"), opset=13),
    Case("resize_cubic_exclude_outside", "Resize", [x_((1, 1, 4, 5)), c_("roi", np.zeros(0, np.float32)),
                                                    c_("scales", np.array([1, 1, 1.5, 2], np.float32))],
         dict(mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5), opset=13),
    Case("resize_opset10_nearest", "Resize", [x_((1, 2, 2, 3)), c_("scales", np.array([1, 1, 2, 3], np.float32))],
         dict(mode="nearest"), opset=10),
    Case("upsample_opset9_nearest", "Upsample", [x_((1, 2, 2, 3)), c_("scales", np.array([1, 1, 2, 2], np.float32))],
         dict(mode="nearest"), opset=9),
    Case("upsample_opset9_linear", "Upsample", [x_((1, 1, 3, 3)), c_("scales", np.array([1, 1, 2, 2], np.float32))],
         dict(mode="linear"), opset=9),
    # non-differentiable helpers (shape arithmetic, constants, comparisons): forward only
    Case("shape", "Shape", [x_((2, 3, 4))], outputs=[("y", I64)], grad=False),
    Case("shape_start_end", "Shape", [x_((2, 3, 4))], dict(start=1, end=-1), opset=15, outputs=[("y", I64)], grad=False),
    Case("size", "Size", [x_((2, 3))], outputs=[("y", I64)], grad=False),
    Case("constant_of_shape", "ConstantOfShape", [c_("s", i64(2, 3))], outputs=[("y", F)], grad=False,
         attrs=dict()),
    Case("range", "Range", [c_("a", np.array(1, np.int64)), c_("b", np.array(9, np.int64)),
                            c_("d", np.array(3, np.int64))], outputs=[("y", I64)], grad=False),
    Case("equal", "Equal", [c_("a", i64(1, 2, 3)), c_("b", i64(1, 0, 3))], outputs=[("y", TensorProto.BOOL)], grad=False),
    Case("less", "Less", [x_((2, 3), name="a"), x_((3,), name="b")], outputs=[("y", TensorProto.BOOL)], grad=False),
    Case("cast_to_int", "Cast", [x_((2, 3), low=-5.0, high=5.0)], dict(to=TensorProto.INT64), outputs=[("y", I64)],
         grad=False),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_matches_onnxruntime(case):
    if not case.ort:
        pytest.skip("onnxruntime has no kernel for this variant")
    check_forward(case)


@pytest.mark.parametrize("case", [c for c in CASES if c.grad], ids=[c.id for c in CASES if c.grad])
def test_vjp_matches_finite_differences(case):
    check_gradients(case)


@pytest.mark.parametrize("strides", [[1, 1], [2, 2]])
def test_depthwise_chunking(monkeypatch, strides):
    """Depthwise convolutions run in chunks of rows (image x channel); a tiny chunk forces many."""
    from amct_pipeline.autodiff import conv as conv_module
    monkeypatch.setattr(conv_module, "_CHUNK", 20)
    case = conv("dw_chunks", (2, 3, 6, 5), (3, 1, 3, 3), group=3, pads=[1, 1, 1, 1], strides=strides)
    check_forward(case)
    check_gradients(case)


def test_every_registered_operator_is_tested():
    tested = {c.op for c in CASES}
    untested = set(supported_ops()) - tested - {"Constant", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And",
                                                 "Or", "Ceil", "Sign"}
    assert not untested, f"operators without a test case: {sorted(untested)}"
