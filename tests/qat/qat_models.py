"""Small hand-built QDQ/QAT models for the convert_qat tests (PyTorch-export style and rule breakers)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


class QdqBuilder:
    """Nodes and initializers of a QDQ graph; ``pair`` / ``weight`` add the Q/DQ nodes."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs, outputs, name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))
        return outputs[0]

    def pair(self, x: str, tag: str, scale: float, zero_point: int, dtype=np.uint8, *,
             dq_scale: float | None = None, axis: int | None = None) -> str:
        """x -> QuantizeLinear -> DequantizeLinear (``dq_scale`` breaks the pair; array ``scale`` with ``axis``
        makes it per channel)."""
        scale_arr = np.asarray(scale, np.float32)
        zp_arr = np.asarray(zero_point, dtype) if np.ndim(zero_point) else np.array(zero_point, dtype)
        s = self.const(f"{tag}.scale", scale_arr)
        z = self.const(f"{tag}.zero_point", zp_arr)
        attrs = {} if axis is None else {"axis": axis}
        q = self.node("QuantizeLinear", [x, s, z], [f"{tag}.q"], f"{tag}.QuantizeLinear", **attrs)
        if dq_scale is not None:
            s = self.const(f"{tag}.dq_scale", np.asarray(dq_scale, np.float32))
        return self.node("DequantizeLinear", [q, s, z], [f"{tag}.dq"], f"{tag}.DequantizeLinear", **attrs)

    def float_weight(self, tag: str, weight: np.ndarray, scale, axis: int = 0, zero_point=None) -> str:
        """PyTorch QAT export: float weight -> QuantizeLinear (int8) -> DequantizeLinear."""
        w = self.const(tag, np.asarray(weight, np.float32))
        scale = np.asarray(scale, np.float32)
        zp = np.zeros(scale.shape, np.int8) if zero_point is None else np.asarray(zero_point, np.int8)
        return self.pair(w, f"{tag}.wq", scale, zp, np.int8, axis=axis if scale.ndim else None)

    def int_constant(self, tag: str, codes: np.ndarray, scale, zero_point=None, axis: int = 0) -> str:
        """onnxruntime style: an integer initializer behind a DequantizeLinear."""
        codes = np.asarray(codes)
        q = self.const(f"{tag}_quantized", codes)
        scale = np.asarray(scale, np.float32)
        zp = np.zeros(scale.shape, codes.dtype) if zero_point is None else np.asarray(zero_point, codes.dtype)
        s, z = self.const(f"{tag}_scale", scale), self.const(f"{tag}_zero_point", zp)
        attrs = {"axis": axis} if scale.ndim else {}
        return self.node("DequantizeLinear", [q, s, z], [f"{tag}_dequantized"], f"{tag}_DequantizeLinear", **attrs)

    def model(self, inputs, outputs, opset: int = OPSET) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "qat", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qat-test")
        model.ir_version = 8 if opset < 21 else 10
        onnx.checker.check_model(model)
        return model


# activation pairs of torch_style_qat by tensor: (scale, zero point, type)
ACT = {"x": (0.02, 128, np.uint8), "r1": (0.03, -100, np.int8), "c2": (0.05, 120, np.uint8),
       "flat": (0.04, 0, np.uint8), "y": (0.02, 128, np.uint8)}


def torch_style_qat(*, code_clip: bool = False) -> onnx.ModelProto:
    """A PyTorch-QAT-like export: float weights through Q -> DQ (per-channel Conv/Gemm, per-tensor 1x1 Conv),
    uint8 and int8 activation pairs, a float bias and int32 biases through DQ, an Add with pairs on both
    inputs (one shared with a layer), pooling, and a trailing QuantizeLinear producing the uint8 output."""
    b = QdqBuilder(0)
    rng = b.rng
    x = b.pair("x", "x", *ACT["x"])
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    s_w1 = (np.abs(w1).reshape(8, -1).max(1) / 127).astype(np.float32)
    c1 = b.node("Conv", [x, b.float_weight("conv1.weight", w1, s_w1), b.const("conv1.bias", rng.normal(0, .1, 8)
                                                                               .astype(np.float32))],
                ["c1"], "conv1", pads=[1, 1, 1, 1])
    r1 = b.node("Relu", [c1], ["r1"], "relu1")
    a1 = b.pair(r1, "r1", *ACT["r1"])                         # read by conv2 and by the Add
    if code_clip:      # our qdq target folds a Relu6 this way: Clip on the int8 codes
        b.nodes.pop()
        q = b.nodes[-1].output[0]
        lo, hi = b.const("r1.clip_lo", np.array(-100, np.int8)), b.const("r1.clip_hi", np.array(60, np.int8))
        clipped = b.node("Clip", [q, lo, hi], ["r1.clipped"], "r1.Clip")
        a1 = b.node("DequantizeLinear", [clipped, "r1.scale", "r1.zero_point"], ["r1.dq"], "r1.DequantizeLinear")
    w2 = rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32)
    s_w2 = np.float32(np.abs(w2).max() / 127)
    s_a1 = np.float32(ACT["r1"][0])
    bias2 = np.round(rng.normal(0, .1, 8) / (s_a1 * s_w2)).astype(np.int32)
    c2 = b.node("Conv", [a1, b.float_weight("conv2.weight", w2, s_w2),
                         b.int_constant("conv2.bias", bias2, np.float32(s_a1 * s_w2))], ["c2"], "conv2")
    a2 = b.pair(c2, "c2", *ACT["c2"])
    add = b.node("Add", [a1, a2], ["sum"], "add")
    pooled = b.node("GlobalAveragePool", [add], ["pooled"], "pool")
    flat = b.node("Flatten", [pooled], ["flat"], "flatten")
    f = b.pair(flat, "flat", *ACT["flat"])
    w3 = rng.normal(0, 0.5, (4, 8)).astype(np.float32)
    s_w3 = (np.abs(w3).max(1) / 127).astype(np.float32)
    s_fc = np.float32(ACT["flat"][0])
    bias3 = np.round(rng.normal(0, .2, 4) / (s_fc * s_w3)).astype(np.int32)
    logits = b.node("Gemm", [f, b.float_weight("fc.weight", w3, s_w3, axis=0),
                             b.int_constant("fc.bias", bias3, (s_fc * s_w3).astype(np.float32))],
                    ["logits"], "fc", transB=1)
    s_out, zp_out, dt_out = ACT["y"]
    b.node("QuantizeLinear", [logits, b.const("out.scale", np.float32(s_out)), b.const("out.zero_point",
                                                                                      np.array(zp_out, dt_out))],
           ["y"], "out.QuantizeLinear")
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.UINT8, ["N", 4])])


def conv_qdq(*, act_scale_dq: float | None = None, act_axis: bool = False, weight_zp: int = 0,
             act_dtype=np.uint8, opset: int = OPSET) -> onnx.ModelProto:
    """x -> pair -> Conv(int8 weight DQ, int32 bias DQ) -> y, with one optional rule violation."""
    b = QdqBuilder(1)
    rng = b.rng
    if act_axis:
        x = b.pair("x", "x", np.array([0.02, 0.03, 0.04], np.float32), np.array([128, 128, 128], np.uint8),
                   np.uint8, axis=1)
    else:
        zp = 128 if act_dtype in (np.uint8,) else (32768 if act_dtype == np.uint16 else 0)
        x = b.pair("x", "x", 0.02, zp, act_dtype, dq_scale=act_scale_dq)
    codes = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    w = b.int_constant("conv.weight", codes, np.full(4, 0.01, np.float32), np.full(4, weight_zp, np.int8))
    bias = b.int_constant("conv.bias", rng.integers(-500, 500, 4).astype(np.int32), np.full(4, 0.0002, np.float32))
    b.node("Conv", [x, w, bias], ["y"], "conv", pads=[1, 1, 1, 1])
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], opset)
