"""lower: AMCT record, fake-quant model (= integer simulation), QDQ model (integer kernels in onnxruntime).

Activation factors come from ``minmax_act_quant``, a small test pass defined here (min/max of every
layer input over the calibration data, via onnxruntime), so these tests do not depend on the
``calibrate`` pass. The integer simulation below is written from SPEC 4.1/4.3/5.4 only: it re-derives
weight and bias codes from the float weights and the record, and accumulates in int64.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from pydantic import Field

from amct_pipeline.errors import AmctError, ConfigError, PassError
from amct_pipeline.options import Options
from amct_pipeline.passes.base import Pass, PassResult
from amct_pipeline.testing import models
from conftest import shared_path

SHARED_MODELS = ["mobilenetv2_fp32.onnx", "resnet8_cifar10_bn.onnx", "ultraface_rfb320_bn.onnx",
                 "super_resolution_op15.onnx", "mnist-8.onnx", "digits_cnn_bn.onnx", "digits_cnn_bn_opset18.onnx"]


# -- a tiny activation calibration for tests -----------------------------------------------------
class MinMaxActQuantPass(Pass):
    """Test stand-in for ``calibrate``: min/max of every layer input (asymmetric, SPEC 4.2)."""

    name = "minmax_act_quant"
    requires = frozenset({"layer_map"})
    produces = frozenset({"act_quant", "tensor_quant"})

    class Options(Options):
        dataset: str = "calib"
        asymmetric: bool = True
        skip: list[str] = Field(default_factory=list)
        block_outputs: bool = False       # also the tensors a QDQ layout quantizes (artifact 'tensor_quant')

    def run(self, graph, ctx) -> PassResult:
        from amct_pipeline.runtime.data import model_inputs
        from amct_pipeline.runtime.ort import expose_tensors, make_session
        layers = [layer for layer in ctx.artifacts["layer_map"].layers() if layer.name not in self.options.skip]
        inputs = model_inputs(graph)
        feeds = {i.name for i in inputs}
        names = list(dict.fromkeys(layer.input for layer in layers))
        blocks = _block_outputs(graph, ctx.artifacts["layer_map"], names) if self.options.block_outputs else []
        names += blocks
        fetch = [n for n in names if n not in feeds]
        session = make_session(expose_tensors(graph.to_proto(), fetch)) if fetch else None
        calibrator = ctx.session.make_algorithm("calibrators", "minmax", {"asymmetric": self.options.asymmetric})
        for feed in ctx.dataset(self.options.dataset).batches(inputs):
            values = dict(zip(fetch, session.run(fetch, feed))) if session else {}
            for name in names:
                calibrator.observe(name, feed[name] if name in feeds else values[name])
        found = calibrator.finalize()
        ctx.artifacts["act_quant"] = {layer.name: found[layer.input] for layer in layers}
        if blocks:
            ctx.artifacts["tensor_quant"] = {name: found[name] for name in blocks}
        return PassResult(False, {"layers": len(layers)})


def _block_outputs(graph, layer_map, inputs: list[str]) -> list[str]:
    from amct_pipeline.quant.facts import extra_tensors, propagate_factors
    covered = dict.fromkeys(inputs)
    propagate_factors(graph, covered)
    return extra_tensors(graph, layer_map, covered)


@pytest.fixture
def session(session):
    session.register_pass(MinMaxActQuantPass)
    return session


def quantize_pipeline(lower: dict | None = None, *, batch_size: int = 8, fuse: bool = True,
                      act: dict | None = None, extra: list | None = None) -> dict:
    passes = ([{"pass": "fuse_bn"}] if fuse else []) + [
        {"pass": "match_layers"},
        {"pass": "minmax_act_quant", "options": act or {}},
        {"pass": "quantize_weights"},
        {"pass": "lower", "options": lower or {}},
    ] + (extra or [])
    return {"schema_version": 1, "name": "test-ptq", "datasets": {"calib": {"reader": "npy", "batch_size": batch_size}},
            "passes": passes}


# -- data ------------------------------------------------------------------------------------------
def demo_model_and_data(tmp_path, count: int = 32):
    from amct_pipeline.demo import build_demo_data, build_demo_model
    path = tmp_path / "demo.onnx"
    onnx.save(build_demo_model(), str(path))
    data = tmp_path / "demo.npy"
    np.save(data, build_demo_data(count))
    return path, data


def shared_model_and_data(tmp_path, name: str, count: int = 16):
    """A shared model and ``count`` real samples preprocessed for it (.npy)."""
    path = shared_path(f"models/{name}")
    x = _shared_inputs(name, count)
    data = tmp_path / f"{path.stem}.npy"
    np.save(data, x)
    return path, data


def _shared_inputs(name: str, count: int) -> np.ndarray:
    if name.startswith("mnist"):
        images = np.load(shared_path("data/mnist_test10k_uint8.npz"))["images_uint8"][:count]
        return images[:, None].astype(np.float32)
    if name.startswith("resnet8"):
        images = np.load(shared_path("data/cifar_like212_32_uint8.npz"))["images_nchw_float_0_255"]
        return images[:count].astype(np.float32)
    if name.startswith("mobilenet"):
        images = np.load(shared_path("data/imagenet_dev250_224_uint8.npz"))["images_nhwc_uint8"][:count]
        x = (images.astype(np.float32) / 255 - np.array([0.485, 0.456, 0.406], np.float32)) / \
            np.array([0.229, 0.224, 0.225], np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if name.startswith("ultraface"):
        return np.load(shared_path("data/faces24_240x320_f32.npz"))["x"][:count]
    if name.startswith("digits"):
        return np.load(shared_path("data/digits_test_split.npz"))["x"][:count]
    if name.startswith("super_resolution"):
        rng = np.random.default_rng(0)      # smooth random "Y channel" images in [0, 1]
        base = rng.uniform(0, 1, (count, 1, 28, 28)).astype(np.float32)
        return np.repeat(np.repeat(base, 8, axis=2), 8, axis=3)
    raise KeyError(name)


def run_ort(model: onnx.ModelProto, x: np.ndarray, *, optimized_path=None, level: str = "extended") -> list[np.ndarray]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    if isinstance(fixed, int) and fixed != x.shape[0]:      # fixed-batch models (mnist-8): one by one
        parts = [session.run(None, {name: x[i:i + fixed]}) for i in range(0, len(x), fixed)]
        return [np.concatenate(p) for p in zip(*parts)]
    return session.run(None, {name: x})


# -- the integer simulation (SPEC 4.1, 4.3, 5.4) ---------------------------------------------------
def quantize_act(x: np.ndarray, scale_d: float, offset_d: int, bits: int = 8) -> np.ndarray:
    """Integer codes minus the offset, as int64: clip(rint(x * float32(1/scale_d)) + offset) - offset."""
    m = np.float32(1.0 / float(scale_d))
    half = 1 << (bits - 1)
    q = np.clip(np.rint(np.asarray(x, np.float32) * m) + offset_d, -half, half - 1)
    return q.astype(np.int64) - offset_d


def weight_codes(w: np.ndarray, scale_w: np.ndarray, axis: int | None, bits: int = 8) -> np.ndarray:
    shape = [1] * w.ndim
    if scale_w.size > 1:
        shape[axis] = -1
    codes = np.rint(w.astype(np.float32) / scale_w.astype(np.float32).reshape(shape))
    half = 1 << (bits - 1)
    return np.clip(codes, -half, half - 1).astype(np.int64)


def bias_codes(b: np.ndarray, scale_d: float, scale_w: np.ndarray) -> np.ndarray:
    deq = np.float32(scale_d) * scale_w.astype(np.float32)
    return np.rint(b.astype(np.float64) / deq.astype(np.float64)).astype(np.int64)


def _same_pads(size, kernel, stride, dilation, mode) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small, big = total // 2, total - total // 2
    return (small, big) if mode == "SAME_UPPER" else (big, small)


def conv_int(q: np.ndarray, w: np.ndarray, attrs: dict) -> np.ndarray:
    """N-d integer convolution (int64 accumulation), zero padding of the offset-free codes."""
    nd = w.ndim - 2
    strides = attrs.get("strides", [1] * nd)
    dilations = attrs.get("dilations", [1] * nd)
    pads = list(attrs.get("pads", [0] * 2 * nd))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = [_same_pads(q.shape[2 + i], w.shape[2 + i], strides[i], dilations[i], auto_pad) for i in range(nd)]
        pads = [p[0] for p in pairs] + [p[1] for p in pairs]
    x = np.pad(q, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    extent = [(w.shape[2 + i] - 1) * dilations[i] + 1 for i in range(nd)]
    win = np.lib.stride_tricks.sliding_window_view(x, extent, axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, d) for d in dilations)]
    group = int(attrs.get("group", 1))
    cin_g, cout_g = w.shape[1], w.shape[0] // group
    outs = []
    for g in range(group):
        xs = win[:, g * cin_g:(g + 1) * cin_g]
        ws = w[g * cout_g:(g + 1) * cout_g]
        letters = "abcdefgh"[:nd]
        outs.append(np.einsum(f"nc{letters.upper()}{letters},oc{letters}->no{letters.upper()}", xs, ws))
    return np.concatenate(outs, axis=1)


def conv_transpose_int(q: np.ndarray, w: np.ndarray, attrs: dict) -> np.ndarray:
    """2-D transposed convolution by scattering (exact for integers): groups, strides, dilations, pads."""
    strides = attrs.get("strides", [1, 1])
    dilations = attrs.get("dilations", [1, 1])
    pads = attrs.get("pads", [0, 0, 0, 0])
    group = int(attrs.get("group", 1))
    n, cin, h, wd = q.shape
    cin_g, cout_g, kh, kw = w.shape[0] // group, w.shape[1], w.shape[2], w.shape[3]
    size = [(h - 1) * strides[0] + (kh - 1) * dilations[0] + 1, (wd - 1) * strides[1] + (kw - 1) * dilations[1] + 1]
    full = np.zeros((n, cout_g * group, *size), np.result_type(q, w))
    for g in range(group):
        xs = q[:, g * cin_g:(g + 1) * cin_g]
        ws = w[g * cin_g:(g + 1) * cin_g]
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dilations[0], i * dilations[0] + (h - 1) * strides[0] + 1, strides[0])
                cols = slice(j * dilations[1], j * dilations[1] + (wd - 1) * strides[1] + 1, strides[1])
                full[:, g * cout_g:(g + 1) * cout_g, rows, cols] += np.einsum("nchw,co->nohw", xs, ws[:, :, i, j])
    return full[:, :, pads[0]:full.shape[2] - pads[2], pads[1]:full.shape[3] - pads[3]]


def simulate(float_model: onnx.ModelProto, record, x: np.ndarray, outputs: list[str] | None = None):
    """Run the float model with every recorded layer replaced by its integer computation."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}

    def attrs(node):
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    # MatMul bias: the integer layer adds it before dequantization, so the float Add must add zeros
    matmul_bias = {}
    for node in model.graph.node:
        if node.op_type == "Add" and node.input[0] in {o for n in model.graph.node if n.op_type == "MatMul"
                                                       and n.name in record for o in n.output}:
            producer = next(n for n in model.graph.node if node.input[0] in n.output)
            bias = numpy_helper.to_array(inits[node.input[1]])
            matmul_bias[producer.name] = bias.copy()
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.zeros_like(bias), node.input[1]))

    def rec(node_name):
        r = record[node_name]
        return float(r.scale_d), int(r.offset_d), np.asarray(r.scale_w, np.float32)

    def act_bits(op) -> int:             # INT16 activations / INT4 weights as the record says
        return 16 if record[op.onnx_node.name].act_type == "INT16" else 8

    def wts_bits(op) -> int:
        return int(record[op.onnx_node.name].wts_type[3:])

    def dequant(acc, deq, channel_rank):
        deq = deq.reshape([1, -1] + [1] * (channel_rank - 2)) if deq.size > 1 else deq.reshape(())
        return acc.astype(np.float32) * deq

    def unquantized(node) -> bool:
        return node.name not in record       # layers left float run in float64, same formulas

    class Conv(OpRun):
        op_domain = ""

        def _run(self, x, w, b=None, **_):
            if unquantized(self.onnx_node):
                y = conv_int(x.astype(np.float64), w.astype(np.float64), attrs(self.onnx_node))
                return ((y + (0 if b is None else b.reshape([1, -1] + [1] * (w.ndim - 2)))).astype(np.float32),)
            scale_d, offset_d, scale_w = rec(self.onnx_node.name)
            acc = conv_int(quantize_act(x, scale_d, offset_d, act_bits(self)),
                           weight_codes(w, scale_w, 0, wts_bits(self)), attrs(self.onnx_node))
            if b is not None:
                acc = acc + bias_codes(b, scale_d, scale_w).reshape([1, -1] + [1] * (w.ndim - 2))
            return (dequant(acc, np.float32(scale_d) * scale_w, w.ndim),)

    class ConvTranspose(OpRun):
        op_domain = ""

        def _run(self, x, w, b=None, **_):
            if unquantized(self.onnx_node):
                y = conv_transpose_int(x.astype(np.float64), w.astype(np.float64), attrs(self.onnx_node))
                return ((y + (0 if b is None else b.reshape(1, -1, 1, 1))).astype(np.float32),)
            scale_d, offset_d, scale_w = rec(self.onnx_node.name)
            group = attrs(self.onnx_node).get("group", 1)
            assert group == 1 or scale_w.size == 1, "the simulation handles per-channel deconv with group 1"
            acc = conv_transpose_int(quantize_act(x, scale_d, offset_d, act_bits(self)),
                                     weight_codes(w, scale_w, 1, wts_bits(self)),
                                     attrs(self.onnx_node))
            if b is not None:
                acc = acc + bias_codes(b, scale_d, scale_w).reshape(1, -1, 1, 1)
            return (dequant(acc, np.float32(scale_d) * scale_w, 4),)

    class Gemm(OpRun):
        op_domain = ""

        def _run(self, a, b, c=None, **_):
            at = attrs(self.onnx_node)
            if unquantized(self.onnx_node):
                a = a.T if at.get("transA", 0) else a
                y = at.get("alpha", 1.0) * (a.astype(np.float64) @ (b.T if at.get("transB", 0) else b))
                return ((y + (0 if c is None else at.get("beta", 1.0) * c)).astype(np.float32),)
            scale_d, offset_d, scale_w = rec(self.onnx_node.name)
            assert at.get("alpha", 1.0) == 1.0 and at.get("beta", 1.0) == 1.0
            w = weight_codes(b.T if at.get("transB", 0) else b, scale_w, None, wts_bits(self))
            acc = quantize_act(a, scale_d, offset_d, act_bits(self)) @ w
            if c is not None:
                acc = acc + bias_codes(c, scale_d, scale_w)
            return (dequant(acc, np.float32(scale_d) * scale_w, 2),)

    class MatMul(OpRun):
        op_domain = ""

        def _run(self, a, b, **_):
            if unquantized(self.onnx_node):
                return (np.matmul(a.astype(np.float64), b).astype(np.float32),)
            scale_d, offset_d, scale_w = rec(self.onnx_node.name)
            acc = quantize_act(a, scale_d, offset_d, act_bits(self)) @ weight_codes(b, scale_w, None,
                                                                                      wts_bits(self))
            if self.onnx_node.name in matmul_bias:
                acc = acc + bias_codes(matmul_bias[self.onnx_node.name], scale_d, scale_w)
            return (dequant(acc, np.float32(scale_d) * scale_w, 2),)

    class AveragePool(OpRun):
        op_domain = ""

        def _run(self, x, **_):
            scale_d, offset_d, _ = rec(self.onnx_node.name)
            at = attrs(self.onnx_node)
            assert not any(at.get("pads", [0])), "the simulation handles unpadded pooling"
            kernel, strides = at["kernel_shape"], at.get("strides", at["kernel_shape"])
            q = quantize_act(x, scale_d, offset_d, act_bits(self))
            win = np.lib.stride_tricks.sliding_window_view(q, kernel, axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
            mean = win.sum(axis=(-2, -1)).astype(np.float64) / (kernel[0] * kernel[1])
            return (mean.astype(np.float32) * np.float32(scale_d),)

    for name in record:
        assert name in nodes, name
    evaluator = ReferenceEvaluator(model, new_ops=[Conv, ConvTranspose, Gemm, MatMul, AveragePool])
    feed = model.graph.input[0]
    fixed = feed.type.tensor_type.shape.dim[0].dim_value
    if fixed and fixed != len(x):           # fixed-batch models (mnist-8): one batch at a time
        parts = [evaluator.run(outputs, {feed.name: x[i:i + fixed]}) for i in range(0, len(x), fixed)]
        return [np.concatenate(p) for p in zip(*parts)]
    return evaluator.run(outputs, {feed.name: x})


def assert_float32_equal(actual, expected, what: str) -> None:
    """Equal up to float32 rounding of the dequantization (relative 1e-5 of the output's magnitude)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max()), 1e-30)
    err = float(np.abs(actual - expected).max())
    assert err <= 1e-5 * scale, f"{what}: max |diff| {err:.3g} vs max |value| {scale:.3g}"


def _result(session, model, data, lower=None, *, batch_size=8, **kwargs):
    pipeline = session.build(quantize_pipeline(lower, batch_size=batch_size, **kwargs))
    return pipeline.run(model, datasets={"calib": str(data)})


# -- fake-quant layout ---------------------------------------------------------------------------
def test_fakequant_layout_names_and_record(session, tmp_path):
    path, data = demo_model_and_data(tmp_path)
    result = _result(session, path, data, {"targets": ["fakequant"]})
    model = result.artifacts["lowered"]["fakequant"]
    names = {n.name: n for n in model.graph.node}
    for layer in ("conv1", "conv2", "fc"):
        chain = [names[f"{layer}.quant.fakequant.{s}"].op_type for s in ("mul", "round", "add", "clip", "sub")]
        assert chain == ["Mul", "Round", "Add", "Clip", "Sub"]
        assert names[f"{layer}.fakedequant.mul"].op_type == "Mul"
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    record = result.artifacts["quant_record"]
    assert list(record) == ["conv1", "conv2", "fc"]
    conv1 = record["conv1"]
    assert len(conv1.scale_w) == 16 and conv1.offset_w == [0] * 16 and not conv1.shift_bit
    assert inits["conv1.fakedequant.dqscale"].shape == (1, 16, 1, 1)
    np.testing.assert_allclose(inits["conv1.fakedequant.dqscale"].ravel(),
                               np.float32(conv1.scale_d) * np.asarray(conv1.scale_w, np.float32), rtol=0)
    assert inits["fc.fakedequant.dqscale"].shape == (1,) and len(record["fc"].scale_w) == 1
    np.testing.assert_allclose(inits["conv1.quant.fakequant.scale"], np.float32(1 / conv1.scale_d))
    assert (inits["conv1.quant.fakequant.min_val"], inits["conv1.quant.fakequant.max_val"]) == (-128, 127)
    weight = inits["conv1.weight"]       # AMCT keeps the name; float values that are int8 codes
    assert weight.dtype == np.float32 and np.array_equal(weight, np.rint(weight)) and np.abs(weight).max() <= 128
    bias = inits["conv1.bias"]
    assert np.array_equal(bias, np.rint(bias))
    stats = result.stats_for("lower")
    assert stats["layers"] == 3 and stats["per_channel"] == 2 and stats["unquantized"] == {}


def test_float_graph_is_not_modified(session, tmp_path):
    path, data = demo_model_and_data(tmp_path)
    save = {"pass": "save", "options": {"filename": "float.onnx"}}
    lowered = session.build(quantize_pipeline(extra=[save]))
    reference = session.build({"schema_version": 1, "name": "ref", "passes": [{"pass": "fuse_bn"}, save]})
    lowered.run(path, datasets={"calib": str(data)}, output_dir=tmp_path / "a")
    reference.run(path, output_dir=tmp_path / "b")
    a, b = onnx.load(str(tmp_path / "a" / "float.onnx")), onnx.load(str(tmp_path / "b" / "float.onnx"))
    assert a.graph.SerializeToString() == b.graph.SerializeToString()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "demo_fake_quant_model.onnx", "demo_qdq_model.onnx", "float.onnx"]


@pytest.mark.parametrize("name", ["demo", "resnet8_cifar10_bn.onnx", "mnist-8.onnx"])
def test_fakequant_equals_integer_simulation(session, tmp_path, name):
    if name == "demo":
        path, data = demo_model_and_data(tmp_path, 16)
        x = np.load(data)[:8]
    else:
        path, data = shared_model_and_data(tmp_path, name, 16)
        x = np.load(data)[:8]
    result = _result(session, path, data, {"targets": ["fakequant"]},
                     extra=[{"pass": "save", "options": {"filename": "float.onnx"}}])
    float_model = result.model            # after fuse_bn: the graph the record belongs to
    record = result.artifacts["quant_record"]
    fake = result.artifacts["lowered"]["fakequant"]
    outputs = [o.name for o in float_model.graph.output]
    expected = simulate(float_model, record, x, outputs)
    actual = run_ort(fake, x, level="none")
    for name_out, a, e in zip(outputs, actual, expected):
        assert_float32_equal(a, e, f"{name}: output '{name_out}'")
    assert len(record) >= 3


def test_fakequant_simulation_covers_every_layer_type(session, tmp_path):
    """Conv 2-D and 3-D, ConvTranspose, AveragePool, Gemm and MatMul (weight through a Reshape, Add bias)."""
    model = models.quant_layers_model()
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(3).normal(0, 1, (4, 3, 8, 8)).astype(np.float32))
    result = session.build(quantize_pipeline({"targets": ["fakequant"]}, batch_size=2, fuse=False)).run(
        model, datasets={"calib": str(data)})
    record = result.artifacts["quant_record"]
    assert set(record) == {"conv", "deconv", "pool", "conv3d", "fc", "mm"}
    assert record["pool"].scale_w == [1.0]
    x = np.load(data)[:2]
    outputs = [o.name for o in model.graph.output]
    expected = simulate(model, record, x, outputs)
    actual = run_ort(result.artifacts["lowered"]["fakequant"], x, level="none")
    for name, a, e in zip(outputs, actual, expected):
        assert_float32_equal(a, e, name)


def test_grouped_conv_transpose_per_channel_codes(session, tmp_path):
    model = models.conv_transpose_bn(group=2)
    data = tmp_path / "x.npy"
    x = np.random.default_rng(5).normal(0, 1, (4, 4, 5, 5)).astype(np.float32)
    np.save(data, x)
    result = session.build(quantize_pipeline({"targets": ["fakequant"]}, batch_size=2)).run(
        model, datasets={"calib": str(data)})
    ((name, rec),) = result.artifacts["quant_record"].items()
    weight = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                             if t.name == result.artifacts["layer_map"][name].weight))
    cin, per_group = weight.shape[:2]
    assert len(rec.scale_w) == per_group * 2
    # output channel o = g * per_group + j lives in rows g*cin/2:(g+1)*cin/2, column j
    for o, scale in enumerate(rec.scale_w):
        g, j = divmod(o, per_group)
        block = weight[g * cin // 2:(g + 1) * cin // 2, j]
        peak = np.abs(block).max()
        assert scale == pytest.approx(peak / (128 if -block.min() > block.max() else 127), rel=1e-6)
    fake = result.artifacts["lowered"]["fakequant"]
    reference = run_ort(result.model, x[:2], level="none")[0]
    assert np.abs(run_ort(fake, x[:2], level="none")[0] - reference).max() < 0.1 * np.abs(reference).max()


def test_shared_input_gets_one_quant_chain(session, tmp_path):
    """Two layers reading one tensor with equal factors share one fake-quant chain (AMCT quant fusion)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, .3, (4, 3, 3, 3)).astype(np.float32), n) for n in ("wa", "wb")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["ya"], name="a", pads=[1] * 4),
             helper.make_node("Conv", ["x", "wb"], ["yb"], name="b", pads=[1] * 4)]
    x_info = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 6, 6])
    outs = [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in ("ya", "yb")]
    model = models.make_model(nodes, [x_info], outs, inits)
    data = tmp_path / "x.npy"
    np.save(data, rng.normal(0, 1, (4, 3, 6, 6)).astype(np.float32))
    result = session.build(quantize_pipeline({"targets": ["fakequant"]}, fuse=False)).run(
        model, datasets={"calib": str(data)})
    fake = result.artifacts["lowered"]["fakequant"]
    rounds = [n.name for n in fake.graph.node if n.op_type == "Round"]
    assert rounds == ["a.quant.fakequant.round"]
    assert {n.input[0] for n in fake.graph.node if n.op_type == "Conv"} == {"a.quant.fakequant.sub:0"}


# -- QDQ -------------------------------------------------------------------------------------------
INTEGER_OPS = {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm", "MatMulIntegerToFloat"}


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> dict[str, int]:
    out = tmp_path / "optimized.onnx"
    x = np.zeros([d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim], np.float32)
    run_ort(model, x, optimized_path=out)
    counts: dict[str, int] = {}
    for node in onnx.load(str(out)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_qdq_runs_with_integer_kernels_and_matches_fakequant(session, tmp_path):
    path, data = demo_model_and_data(tmp_path)
    result = _result(session, path, data, {"target_options": {"qdq": {"extra_tensors": False}}})
    qdq, fake = result.artifacts["lowered"]["qdq"], result.artifacts["lowered"]["fakequant"]
    ops = {n.op_type for n in qdq.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {t.name: t for t in qdq.graph.initializer}
    weights = [inits[n.input[0]] for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert {t.data_type for t in weights} == {onnx.TensorProto.INT8, onnx.TensorProto.INT32}
    zero_points = [inits[n.input[2]] for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(t.data_type == onnx.TensorProto.UINT8 for t in zero_points)
    conv_w = next(n for n in qdq.graph.node if n.name == "conv1.weight_DequantizeLinear")
    assert helper.get_attribute_value(conv_w.attribute[0]) == 0 and list(inits[conv_w.input[1]].dims) == [16]
    assert INTEGER_OPS & set(_optimized_ops(qdq, tmp_path))
    x = np.load(data)[:8]
    (q,), (f,) = run_ort(qdq, x), run_ort(fake, x)
    # Same record; onnxruntime divides by the scale (fake-quant multiplies by 1/scale) and requantizes
    # in its own order, so a few codes may differ by one step: bound the output by 3 steps of fc's input.
    fc = result.artifacts["quant_record"]["fc"]
    codes = numpy_helper.to_array(next(t for t in fake.graph.initializer if t.name == "fc.weight"))
    step = np.float32(fc.scale_d) * np.abs(codes).sum(axis=1).max() * max(fc.scale_w)
    assert np.abs(q - f).max() <= 3 * step
    assert (q.argmax(1) == f.argmax(1)).mean() >= 0.85


def test_qdq_of_layer_inputs_adds_the_residual_in_float_as_the_fakequant_model_does(session, tmp_path):
    """Only the layer inputs calibrated: conv1's output is conv2's input and the residual Add's skip.
    The fake-quant (and Ascend) model adds the float skip; so must the QDQ model, else it carries one
    more quantization noise than its record (MobileNetV2 retrain_int8: 24.95 vs 25.33 dB)."""
    path, data = demo_model_and_data(tmp_path)
    result = _result(session, path, data)
    qdq, fake = result.artifacts["lowered"]["qdq"], result.artifacts["lowered"]["fakequant"]
    producers = {out: n for n in qdq.graph.node for out in n.output}
    residual = next(n for n in qdq.graph.node if n.op_type == "Add")
    assert [producers[t].op_type for t in residual.input] == ["Relu", "Relu"]
    conv2 = next(n for n in qdq.graph.node if n.name == "conv2")
    assert producers[conv2.input[0]].op_type == "DequantizeLinear"
    x = np.load(data)
    (q,), (f,), (ref,) = run_ort(qdq, x), run_ort(fake, x), run_ort(onnx.load(str(path)), x)
    assert _sqnr_db(f, q) >= 80.0             # equal up to rare codes a step apart (old layout: 59.9 dB)
    assert abs(_sqnr_db(ref, q) - _sqnr_db(ref, f)) < 0.01


def test_emulated_qdq_layout_adds_the_residual_in_float_too(session, tmp_path):
    """The passes emulating the QDQ model (refine_ranges, sequential bias correction, retrain) take
    the same float readers from quant.facts: without block outputs the residual Add reads float."""
    from amct_pipeline.quant.emulate import build_eval_model, qdq_units
    path, data = demo_model_and_data(tmp_path)
    result = session.build("fuse_bn,match_layers,minmax_act_quant,quantize_weights", datasets=["calib"]).run(
        path, datasets={"calib": str(data)})
    artifacts = result.artifacts
    units = qdq_units(result.graph, artifacts["layer_map"], artifacts["act_quant"], {})
    assert [u.float_readers for u in units if u.tensor == "conv1.out"] == [("residual",)]
    model = build_eval_model(result.graph, artifacts["layer_map"], artifacts["weight_quant"], units)
    residual = next(n for n in model.graph.node if n.name == "residual")
    assert "conv1.out" in residual.input
    factors = artifacts["act_quant"]["conv2"]                # any factors: only where they apply matters
    with_blocks = qdq_units(result.graph, artifacts["layer_map"], artifacts["act_quant"],
                            {"conv2.out": factors, "res": factors})
    assert all(not u.float_readers for u in with_blocks)     # inputs and output quantized: an integer Add


def _sqnr_db(reference, got) -> float:
    reference, got = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - got) ** 2), 1e-30)))


def test_qdq_extra_tensors_fuse_everything(session, tmp_path):
    """With the extra tensors calibrated, onnxruntime runs the whole demo CNN in integers."""
    path, data = demo_model_and_data(tmp_path)
    result = _result(session, path, data, {"targets": ["qdq"]}, act={"block_outputs": True})
    qdq = result.artifacts["lowered"]["qdq"]
    ops = _optimized_ops(qdq, tmp_path)
    assert ops.get("QLinearConv") == 2 and ops.get("QLinearAdd") == 1 and "Conv" not in ops and "Add" not in ops
    assert "QGemm" in ops or "QLinearMatMul" in ops
    float_out = run_ort(result.model, np.load(data)[:16])[0]
    q = run_ort(qdq, np.load(data)[:16])[0]
    assert (q.argmax(1) == float_out.argmax(1)).mean() >= 0.8


def test_calibrate_block_outputs_observes_the_qdq_layouts_tensors(session, tmp_path):
    """calibrate{block_outputs} observes exactly the tensors the qdq layout quantizes beyond the layer
    inputs (quant.facts.extra_tensors) in its own run; the target uses them and fuses whole blocks."""
    from amct_pipeline.quant.facts import extra_tensors, propagate_factors
    path, data = demo_model_and_data(tmp_path)
    text = "fuse_bn,match_layers,calibrate{algorithm=ifmr block_outputs=true},quantize_weights,lower{targets=[qdq]}"
    ours = session.build(text, datasets=["calib"]).run(path, datasets={"calib": str(data)})
    layer_map = ours.artifacts["layer_map"]
    covered = {layer.input: None for layer in layer_map.layers()}
    propagate_factors(ours.graph, covered)
    wanted = extra_tensors(ours.graph, layer_map, covered)
    assert wanted and list(ours.artifacts["tensor_quant"]) == wanted
    assert ours.stats_for("calibrate")["block_outputs"] == len(wanted)
    ops = _optimized_ops(ours.artifacts["lowered"]["qdq"], tmp_path)
    assert ops.get("QLinearConv") == 2 and ops.get("QLinearAdd") == 1 and "Conv" not in ops


def test_qdq_folds_clip_into_integer_range(session, tmp_path):
    """Conv -> Clip(0, 6) -> Conv: the Clip moves onto the uint8 codes when the range is wider than it."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, .3, (4, 4, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1", pads=[1] * 4),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="clip"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="c2")]
    model = models.make_model(nodes, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    data = tmp_path / "x.npy"
    x = rng.normal(0, 3, (8, 3, 6, 6)).astype(np.float32)
    np.save(data, x)
    result = session.build(quantize_pipeline({"targets": ["qdq", "fakequant"]}, fuse=False)).run(
        model, datasets={"calib": str(data)})
    record = result.artifacts["quant_record"]
    assert (127 - record["c2"].offset_d) * record["c2"].scale_d == pytest.approx(6.0, rel=1e-5)
    qdq = result.artifacts["lowered"]["qdq"]
    assert "Clip" not in {n.op_type for n in qdq.graph.node}     # the quantizer saturates at 0 and 6
    assert _optimized_ops(qdq, tmp_path).get("QLinearConv") == 1
    (q,), (f,) = run_ort(qdq, x), run_ort(result.artifacts["lowered"]["fakequant"], x)
    assert np.abs(q - f).max() <= 1e-4 * np.abs(f).max()


@pytest.mark.parametrize("name", SHARED_MODELS)
def test_every_shared_model_gives_loadable_models(session, tmp_path, name):
    path, data = shared_model_and_data(tmp_path, name, 8 if name.startswith("mobilenet") else 16)
    result = _result(session, path, data, {}, act={"block_outputs": True})
    x = np.load(data)[:2]
    for target in ("qdq", "fakequant"):
        model = result.artifacts["lowered"][target]
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset >= 13
        outputs = run_ort(model, x)
        assert all(np.isfinite(o).all() for o in outputs)
    ops = _optimized_ops(result.artifacts["lowered"]["qdq"], tmp_path)
    convs = result.artifacts["layer_map"].of_type("Conv")
    assert ops.get("QLinearConv") == len(convs)
    assert not {"Conv", "FusedConv"} & set(ops)


def test_mobilenetv2_qdq_fully_integer(session, tmp_path):
    path, data = shared_model_and_data(tmp_path, "mobilenetv2_fp32.onnx", 8)
    result = _result(session, path, data, {"targets": ["qdq"]}, act={"block_outputs": True})
    ops = _optimized_ops(result.artifacts["lowered"]["qdq"], tmp_path)
    assert ops.get("QLinearConv") == 52 and ops.get("QLinearAdd") == 10
    assert not {"Conv", "FusedConv", "Add", "MatMul", "Gemm"} & set(ops)


# -- determinism, errors ---------------------------------------------------------------------------
def test_outputs_are_byte_deterministic(session, tmp_path):
    path, data = demo_model_and_data(tmp_path)
    pipeline = session.build(quantize_pipeline({}, act={"block_outputs": True}))
    files = []
    for run in ("a", "b"):
        pipeline.run(path, datasets={"calib": str(data)}, output_dir=tmp_path / run)
        files.append({p.name: p.read_bytes() for p in sorted((tmp_path / run).iterdir())})
    assert files[0] == files[1] and len(files[0]) == 2


def test_prefix_and_amct_bare_names(session, tmp_path):
    path, data = demo_model_and_data(tmp_path)
    session.build(quantize_pipeline({"prefix": ""})).run(path, datasets={"calib": str(data)}, output_dir=tmp_path / "o")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["fake_quant_model.onnx", "qdq_model.onnx"]


def test_bias_overflow_names_the_layer(session, tmp_path):
    model = models.conv_bn(bias=True)
    for tensor in model.graph.initializer:
        if tensor.name == "conv.bias":
            tensor.CopyFrom(numpy_helper.from_array(np.full(6, 3e38, np.float32), "conv.bias"))
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).normal(0, 1, (4, 4, 6, 6)).astype(np.float32))
    with pytest.raises(PassError) as info:
        session.build(quantize_pipeline(fuse=False)).run(model, datasets={"calib": str(data)},
                                                          output_dir=tmp_path / "o")
    message = str(info.value)
    assert "'lower'" in message and "layer 'conv'" in message and "int32" in message and "skip_layers" in message
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_unknown_target_and_bad_target_options_fail_at_build(session):
    with pytest.raises(ConfigError) as info:
        session.build("match_layers,minmax_act_quant,quantize_weights,lower{targets=[fakequant,qdd]}")
    assert "unknown lowering target 'qdd'" in str(info.value) and "did you mean 'qdq'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        session.build("match_layers,minmax_act_quant,quantize_weights,lower{targets=[fakequant] "
                      "target_options={qdq={dataset=calib}}}")
    assert "not in targets" in str(info.value)
    with pytest.raises(ConfigError, match="listed twice"):
        session.build("match_layers,minmax_act_quant,quantize_weights,lower{targets=[qdq,qdq]}")


def test_bad_target_options_fail_before_writing(session, tmp_path):
    path, data = demo_model_and_data(tmp_path)
    with pytest.raises(AmctError) as info:
        session.build(quantize_pipeline({"target_options": {"qdq": {"extra_tensor": False}}})).run(
            path, datasets={"calib": str(data)}, output_dir=tmp_path / "o")
    assert "target_options.qdq.extra_tensor" in str(info.value) and "did you mean 'extra_tensors'" in str(info.value)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_layers_without_factors_stay_float(session, tmp_path):
    path, data = demo_model_and_data(tmp_path)
    result = _result(session, path, data, act={"skip": ["conv2"]})
    assert list(result.artifacts["quant_record"]) == ["conv1", "fc"]
    assert result.stats_for("lower")["unquantized"] == {"conv2": "no activation factors"}
    fake = result.artifacts["lowered"]["fakequant"]
    assert not any(n.name.startswith(("conv2.quant", "conv2.fakedequant")) for n in fake.graph.node)


def test_lower_requires_factors_in_the_pipeline(session):
    with pytest.raises(ConfigError, match="'lower' requires artifact 'act_quant'"):
        session.build("match_layers,quantize_weights,lower")
