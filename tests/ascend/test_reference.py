"""Deploy models executed by the CPU reference agree with the fake-quant layout run in onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.ascend import AscendError, DeployEvaluator, pack_deq_scale, run_deploy_model

OPSET = 13


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def run_ort(model):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no Conv+Mul folding
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda feeds: sess.run(None, feeds)


def max_ulps(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    ia = a.view(np.int32).astype(np.int64)
    ib = b.view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int(np.abs(ia - ib).max())


class Builder:
    """Builds the deploy model (SPEC 5.3) and the fake-quant model (SPEC 5.4) side by side."""

    def __init__(self, domain=""):
        self.domain = domain
        self.dn, self.fn, self.di, self.fi = [], [], [], []

    def quant(self, name, x, scale_d, offset_d):
        inv = np.float32(1.0 / float(scale_d))
        self.dn.append(helper.make_node("AscendQuant", [x], [f"{name}.q"], name=f"{name}.quant", domain=self.domain,
                                        scale=float(inv), offset=float(offset_d), dst_type="INT8"))
        p = f"{name}.quant.fakequant"
        self.fi += [init(f"{p}.scale", inv), init(f"{p}.offset", np.float32(offset_d)),
                    init(f"{p}.min_val", np.float32(-128)), init(f"{p}.max_val", np.float32(127))]
        self.fn += [helper.make_node("Mul", [x, f"{p}.scale"], [f"{p}.mul"]),
                    helper.make_node("Round", [f"{p}.mul"], [f"{p}.round"]),
                    helper.make_node("Add", [f"{p}.round", f"{p}.offset"], [f"{p}.add"]),
                    helper.make_node("Clip", [f"{p}.add", f"{p}.min_val", f"{p}.max_val"], [f"{p}.clip"]),
                    helper.make_node("Sub", [f"{p}.clip", f"{p}.offset"], [f"{name}.q"])]
        return f"{name}.q"

    def dequant(self, name, acc, deq, bshape):
        self.di.append(init(f"{name}.dequant.param", pack_deq_scale(deq)))
        self.dn.append(helper.make_node("AscendDequant", [acc, f"{name}.dequant.param"], [f"{name}.y"],
                                        name=f"{name}.dequant", domain=self.domain, dtype=0))
        self.fi.append(init(f"{name}.fakedequant.dqscale", np.asarray(deq, np.float32).reshape(bshape)))
        self.fn.append(helper.make_node("Mul", [acc, f"{name}.fakedequant.dqscale"], [f"{name}.y"]))
        return f"{name}.y"

    def layer(self, op, inputs, out, weights, **attrs):
        """``weights``: (name, int array) pairs: int8/int32 in deploy, float32 holding the ints in fake."""
        for n, a in weights:
            self.di.append(init(n, a))
            self.fi.append(init(n, a.astype(np.float32)))
        for nodes in (self.dn, self.fn):
            nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def plain(self, op, inputs, out, **attrs):
        for nodes in (self.dn, self.fn):
            nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def anti_quant(self, name, q, scale_d, offset_d):
        self.dn.append(helper.make_node("AscendAntiQuant", [q], [f"{name}.anti"], name=f"{name}.antiquant",
                                        domain=self.domain, scale=float(scale_d), offset=float(-offset_d)))
        self.fi.append(init(f"{name}.anti.scale", np.float32(scale_d)))
        self.fn.append(helper.make_node("Mul", [q, f"{name}.anti.scale"], [f"{name}.anti"]))
        return f"{name}.anti"

    def models(self, inputs, outputs):
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
        opsets = [helper.make_opsetid("", OPSET)]
        if self.domain == "ascend":  # one custom domain declared, "amct.customop" deliberately not
            opsets.append(helper.make_opsetid("ascend", 1))
        deploy = helper.make_model(helper.make_graph(self.dn, "deploy", ins, outs, self.di), opset_imports=opsets)
        fake = helper.make_model(helper.make_graph(self.fn, "fake", ins, outs, self.fi),
                                 opset_imports=[helper.make_opsetid("", OPSET)])
        return deploy, fake


def weights_int8(rng, shape):
    return np.clip(np.rint(rng.normal(0, 50, shape)), -128, 127).astype(np.int8)


def conv_models(offset_d, per_channel, domain="", pads=(1, 1, 1, 1)):
    rng = np.random.default_rng(7)
    b = Builder(domain)
    scale_d = np.float32(0.0173)
    w = weights_int8(rng, (6, 3, 3, 3))
    bias = rng.integers(-3000, 3000, 6).astype(np.int32)
    scale_w = rng.uniform(0.001, 0.01, 6 if per_channel else 1).astype(np.float32)
    q = b.quant("conv1", "x", scale_d, offset_d)
    acc = b.layer("Conv", [q, "conv1.weight", "conv1.bias"], "conv1.acc",
                  [("conv1.weight", w), ("conv1.bias", bias)], pads=list(pads), strides=[1, 2])
    b.dequant("conv1", acc, scale_d * scale_w, (1, -1, 1, 1))
    return b.models([("x", [2, 3, 9, 9])], ["conv1.y"])


def input_data(shape, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, scale, shape).astype(np.float32)
    # include exact ties of the quantization grid (x / scale_d = k + 0.5)
    x.reshape(-1)[:20] = (np.arange(-10, 10) + 0.5).astype(np.float32) * np.float32(0.0173)
    return x


@pytest.mark.parametrize("offset_d", [0, -20, 9])
@pytest.mark.parametrize("per_channel", [True, False])
def test_conv_deploy_equals_fake_quant_in_onnxruntime(offset_d, per_channel):
    deploy, fake = conv_models(offset_d, per_channel)
    x = input_data([2, 3, 9, 9])
    (ref,) = run_deploy_model(deploy, {"x": x})
    (expected,) = run_ort(fake)({"x": x})
    assert ref.dtype == np.float32
    assert max_ulps(ref, expected) <= 1
    assert np.array_equal(ref, expected)  # in practice bit-identical


@pytest.mark.parametrize("domain", ["", "amct.customop", "ascend"])
def test_ascend_nodes_in_any_domain(domain):
    deploy, fake = conv_models(-3, True, domain=domain)
    x = input_data([2, 3, 9, 9], seed=1)
    assert np.array_equal(run_deploy_model(deploy, [x])[0], run_ort(fake)({"x": x})[0])
    assert deploy.graph.node[0].domain == domain  # the caller's model is not modified


def full_models():
    """Conv -> Relu -> AvgPool -> depthwise Conv -> Flatten -> Gemm / MatMul+Add, and an AntiQuant exit."""
    rng = np.random.default_rng(11)
    b = Builder()
    s1, s2, s3, s4 = np.float32(0.02), np.float32(0.011), np.float32(0.009), np.float32(0.013)
    q = b.quant("conv1", "x", s1, -7)
    w1, sw1 = weights_int8(rng, (8, 3, 3, 3)), rng.uniform(0.001, 0.004, 8).astype(np.float32)
    acc = b.layer("Conv", [q, "conv1.weight", "conv1.bias"], "conv1.acc",
                  [("conv1.weight", w1), ("conv1.bias", rng.integers(-2000, 2000, 8).astype(np.int32))],
                  pads=[1, 1, 1, 1])
    y1 = b.plain("Relu", [b.dequant("conv1", acc, s1 * sw1, (1, -1, 1, 1))], "relu1")
    q2 = b.quant("pool", y1, s2, -128)
    anti = b.anti_quant("pool", q2, s2, -128)
    pooled = b.plain("AveragePool", [q2], "pool.avg", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    y2 = b.dequant("pool", pooled, np.float32([s2]), (1,))  # AvgPool: scale_w = 1
    q3 = b.quant("dw", y2, s3, 5)
    w3, sw3 = weights_int8(rng, (8, 1, 3, 3)), rng.uniform(0.002, 0.006, 8).astype(np.float32)
    acc3 = b.layer("Conv", [q3, "dw.weight", "dw.bias"], "dw.acc",
                   [("dw.weight", w3), ("dw.bias", rng.integers(-500, 500, 8).astype(np.int32))],
                   pads=[1, 1, 1, 1], strides=[2, 2], group=8)
    flat = b.plain("Flatten", [b.dequant("dw", acc3, s3 * sw3, (1, -1, 1, 1))], "flat")
    q4 = b.quant("fc", flat, s4, 0)
    w4, sw4 = weights_int8(rng, (72, 10)), np.float32(0.003)
    acc4 = b.layer("Gemm", [q4, "fc.weight", "fc.bias"], "fc.acc",
                   [("fc.weight", w4), ("fc.bias", rng.integers(-900, 900, 10).astype(np.int32))])
    b.dequant("fc", acc4, np.float32([s4 * sw4]), (1, 1))
    w5, sw5 = weights_int8(rng, (72, 6)), np.float32(0.002)
    mm = b.layer("MatMul", [q4, "mm.weight"], "mm.acc", [("mm.weight", w5)])
    added = b.layer("Add", [mm, "mm.bias"], "mm.add", [("mm.bias", rng.integers(-900, 900, 6).astype(np.int32))])
    b.dequant("mm", added, np.float32([s4 * sw5]), (1, 1))
    return b.models([("x", [4, 3, 12, 12])], ["fc.y", "mm.y", anti, "relu1"])


def test_full_deploy_chain_equals_fake_quant():
    deploy, fake = full_models()
    x = input_data([4, 3, 12, 12], seed=3, scale=2.0)
    ref = run_deploy_model(deploy, {"x": x})
    expected = run_ort(fake)({"x": x})
    for r, e in zip(ref, expected):
        assert r.dtype == np.float32
        assert max_ulps(r, e) <= 1
    assert np.array_equal(ref[2], expected[2])  # AscendAntiQuant exit
    # sanity: the quantized path is not trivially zero
    assert np.abs(ref[0]).max() > 0 and np.abs(ref[1]).max() > 0


def test_evaluator_reuse_and_output_selection():
    deploy, fake = full_models()
    ev = DeployEvaluator(deploy)
    assert ev.input_names == ["x"]
    for seed in (4, 5):
        x = input_data([4, 3, 12, 12], seed=seed, scale=2.0)
        (y,) = ev.run({"x": x}, ["mm.y"])
        assert max_ulps(y, run_ort(fake)({"x": x})[1]) <= 1


def test_input_offsets_none_is_plain_onnx_integer_semantics():
    x = input_data([2, 3, 9, 9], seed=2)
    deploy, _ = conv_models(-20, True)
    atc = run_deploy_model(deploy, {"x": x})[0]
    plain = run_deploy_model(deploy, {"x": x}, input_offsets="none")[0]
    assert not np.array_equal(atc, plain)
    deploy0, _ = conv_models(0, True)
    assert np.array_equal(run_deploy_model(deploy0, {"x": x})[0],
                          run_deploy_model(deploy0, {"x": x}, input_offsets="none")[0])


def test_cann_convention_option_runs():
    deploy, fake = conv_models(0, True)
    x = input_data([2, 3, 9, 9])
    y = run_deploy_model(deploy, {"x": x}, quant_convention="cann")[0]
    assert np.array_equal(y, run_ort(fake)({"x": x})[0])  # offset 0: the conventions coincide


def test_float_layers_fall_back_to_standard_implementation():
    """Float Conv/Gemm/MatMul/AveragePool use onnx's implementation; results match onnxruntime."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c0", "bn.s", "bn.b", "bn.m", "bn.v"], ["c"], epsilon=1e-3),
             helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["y"], transB=1),
             helper.make_node("MatMul", ["f", "m"], ["z"])]
    # an unfused BatchNormalization must use the stored statistics (onnx's reference would not)
    inits = [init(f"bn.{k}", rng.uniform(0.5, 2, 4).astype(np.float32)) for k in "sbmv"]
    inits += [init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
             init("g", rng.normal(size=(5, 64)).astype(np.float32)),
             init("m", rng.normal(size=(64, 2)).astype(np.float32))]
    graph = helper.make_graph(nodes, "f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "yz"], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    for r, e in zip(run_deploy_model(model, {"x": x}), run_ort(model)({"x": x})):
        np.testing.assert_allclose(r, e, rtol=1e-5, atol=1e-5)


def with_attr(model, node_name, **attrs):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = next(n for n in m.graph.node if n.name == node_name)
    for k, v in attrs.items():
        for i, a in enumerate(node.attribute):
            if a.name == k:
                del node.attribute[i]
                break
        if v is not None:
            node.attribute.append(helper.make_attribute(k, v))
    return m


@pytest.mark.parametrize("node, attrs, message", [
    ("conv1.quant", dict(foo=1), "unknown attribute 'foo' on AscendQuant node 'conv1.quant'"),
    ("conv1.dequant", dict(scale=1.0), "unknown attribute 'scale' on AscendDequant node 'conv1.dequant'"),
    ("conv1.quant", dict(scale=None), "AscendQuant node 'conv1.quant' lacks required attribute 'scale'"),
    ("conv1.quant", dict(round_mode="Banana"), "AscendQuant node 'conv1.quant': unsupported round_mode 'Banana'"),
    ("conv1.quant", dict(dst_type="INT2"), "AscendQuant node 'conv1.quant': unsupported dst_type 'INT2'"),
    ("conv1.dequant", dict(dtype=9), "AscendDequant node 'conv1.dequant': unsupported output dtype 9"),
])
def test_bad_ascend_attributes_are_one_line_errors(node, attrs, message):
    deploy, _ = conv_models(0, True)
    bad = with_attr(deploy, node, **attrs)
    with pytest.raises(AscendError) as info:
        run_deploy_model(bad, {"x": input_data([2, 3, 9, 9])})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_runtime_error_names_the_node():
    deploy, _ = conv_models(0, True)
    param = next(i for i in deploy.graph.initializer if i.name == "conv1.dequant.param")
    param.CopyFrom(init("conv1.dequant.param", pack_deq_scale(np.float32([0.1] * 6), None, 3)))
    with pytest.raises(AscendError, match=r"^AscendDequant node 'conv1.dequant': .*offset_w = 3"):
        run_deploy_model(deploy, {"x": input_data([2, 3, 9, 9])})


def test_wrong_input_count_and_missing_feed():
    deploy, _ = conv_models(0, True)
    deq = next(n for n in deploy.graph.node if n.op_type == "AscendDequant")
    del deq.input[1]
    with pytest.raises(AscendError, match="AscendDequant node 'conv1.dequant' has 1 inputs, expected 2"):
        run_deploy_model(deploy, {"x": input_data([2, 3, 9, 9])})
    deploy, _ = conv_models(0, True)
    with pytest.raises(AscendError, match="missing model input"):
        run_deploy_model(deploy, {"y": input_data([2, 3, 9, 9])})
