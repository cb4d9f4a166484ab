"""Empirical bias correction (quantize_weights{bias_correction}) against a numpy reference."""
from __future__ import annotations

import numpy as np
import pytest

from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.errors import ConfigError
from amct_pipeline.pipeline.spec import DatasetSpec
from amct_pipeline.quant.math import fake_quant
from amct_pipeline.quant.weights import dequantize_weight, effective_bias, weight_values
from amct_pipeline.runtime.data import ArraySource


def _source(count: int = 48, batch_size: int = 16, seed: int = 1) -> ArraySource:
    return ArraySource("calib", {"x": build_demo_data(count, seed=seed)}, DatasetSpec(batch_size=batch_size), "test")


def _run(session, text: str, source=None):
    return session.build(text, datasets=["calib"]).run(build_demo_model(), datasets={"calib": source or _source()})


def _conv3x3(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Conv, 3x3 kernel, stride 1, zero padding 1, float64, no bias."""
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))   # N, C, H, W, 3, 3
    return np.einsum("nchwij,ocij->nohw", windows, w.astype(np.float64))


def test_bias_correction_removes_the_measured_mean_shift(session):
    """The corrected bias is the float bias minus the mean of (quantized layer - float layer) over the
    calibration data, checked in numpy on the first conv (its input is the model input)."""
    base = "fuse_bn,match_layers,calibrate{algorithm=mean_minmax}"
    plain = _run(session, base + ",quantize_weights")
    corrected = _run(session, base + ",quantize_weights{bias_correction=true bias_correction_input=quantized}")
    stats = corrected.stats_for("quantize_weights")
    assert stats["bias_corrected"] == 3 and "bias_not_corrected" not in stats
    layer = plain.artifacts["layer_map"]["conv1"]
    act = plain.artifacts["act_quant"]["conv1"]
    wq = plain.artifacts["weight_quant"]["conv1"]
    x = build_demo_data(48)
    w = weight_values(plain.graph, layer)
    w_q = dequantize_weight(wq.quantized, wq.scale, layer)
    assert plain.graph.node("conv1").attrs["pads"] == [1, 1, 1, 1]
    shift = (_conv3x3(fake_quant(x, act), w_q) - _conv3x3(x, w)).mean(axis=(0, 2, 3))
    before = effective_bias(plain.graph, layer)
    after = effective_bias(corrected.graph, corrected.artifacts["layer_map"]["conv1"])
    np.testing.assert_allclose(after, before - shift, rtol=0, atol=2e-5 * np.abs(before).max())
    assert plain.model.graph.initializer and corrected.model is not plain.model


def test_bias_correction_of_the_weights_alone(session):
    """By default the layer reads its float input: the shift is that of the weights' rounding alone
    (checked on the first conv); the dataset is checked when given."""
    result = _run(session, "fuse_bn,match_layers,quantize_weights{bias_correction=true batch_num=2}")
    assert result.stats_for("quantize_weights")["bias_corrected"] == 3
    plain = _run(session, "fuse_bn,match_layers,quantize_weights")
    layer = plain.artifacts["layer_map"]["conv1"]
    wq = plain.artifacts["weight_quant"]["conv1"]
    x = build_demo_data(48)[:32]                      # batch_num=2 batches of 16
    w = weight_values(plain.graph, layer)
    shift = _conv3x3(x, dequantize_weight(wq.quantized, wq.scale, layer) - w).mean(axis=(0, 2, 3))
    after = effective_bias(result.graph, result.artifacts["layer_map"]["conv1"])
    before = effective_bias(plain.graph, layer)
    np.testing.assert_allclose(after, before - shift, rtol=0, atol=2e-5 * np.abs(before).max())
    with pytest.raises(ConfigError, match="dataset 'other'"):
        session.build("fuse_bn,match_layers,quantize_weights{bias_correction=true dataset=other}",
                      datasets=["calib"])


def _odd_convs_model():
    """Convs with stride 2 and asymmetric pads, groups, dilation, a 1x1, then a Gemm (transB)."""
    from onnx import TensorProto, helper, numpy_helper
    from amct_pipeline.testing import models
    rng = np.random.default_rng(3)
    inits, nodes = [], []

    def const(name, shape):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name))
        return name

    nodes.append(helper.make_node("Conv", ["x", const("w1", (8, 3, 3, 3)), const("b1", (8,))], ["y1"], name="c1",
                                  strides=[2, 2], pads=[0, 1, 1, 0]))
    nodes.append(helper.make_node("Relu", ["y1"], ["r1"], name="r1"))
    nodes.append(helper.make_node("Conv", ["r1", const("w2", (8, 2, 3, 3)), const("b2", (8,))], ["y2"], name="c2",
                                  group=4, dilations=[2, 2], pads=[2, 2, 2, 2]))
    nodes.append(helper.make_node("Conv", ["y2", const("w3", (6, 8, 1, 1)), const("b3", (6,))], ["y3"], name="c3",
                                  auto_pad="VALID"))
    nodes.append(helper.make_node("Flatten", ["y3"], ["f"], name="flat"))
    nodes.append(helper.make_node("Gemm", ["f", const("w4", (5, 6 * 8 * 8)), const("b4", (5,))], ["out"], name="g",
                                  transB=1, alpha=0.5))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])
    return models.make_model(nodes, [x], [out], inits)


def test_linear_shifts_equal_the_measured_ones(session):
    """With a float input the shift follows from the input's mean (no layer copies): the same numbers
    as running the copies, for strides, asymmetric pads, groups, dilation, VALID and a Gemm with alpha."""
    from amct_pipeline.algorithms.weights.bias_correction import (InputMeans, bias_shifts, linear_bias_shifts,
                                                                  linear_input)
    from amct_pipeline.runtime.ort import make_session
    model = _odd_convs_model()
    x = np.random.default_rng(0).normal(0.5, 1.0, (24, 3, 16, 16)).astype(np.float32)
    source = ArraySource("calib", {"x": x}, DatasetSpec(batch_size=8), "test")
    result = session.build("match_layers,quantize_weights",
                           datasets=["calib"]).run(model, datasets={"calib": source})
    graph, weight_quant = result.graph, result.artifacts["weight_quant"]
    layers = list(result.artifacts["layer_map"].layers())
    assert all(linear_input(graph, layer) for layer in layers)

    def batches(proto, fetch):
        sess = make_session(proto)
        for start in range(0, len(x), 8):
            yield dict(zip(fetch, sess.run(fetch, {"x": x[start:start + 8]}))), 8

    measured, skipped = bias_shifts(graph, layers, weight_quant, None, batches)
    assert not skipped
    from amct_pipeline.runtime.ort import expose_tensors
    fetch = [t for t in dict.fromkeys(layer.input for layer in layers) if t != "x"]
    sess = make_session(expose_tensors(graph.to_proto(), fetch))
    means = {layer.input: InputMeans(layer.op_type) for layer in layers}
    for start in range(0, len(x), 8):
        got = dict(zip(fetch, sess.run(fetch, {"x": x[start:start + 8]})))
        got["x"] = x[start:start + 8]
        for name, stats in means.items():
            stats.add(got[name])
    linear = linear_bias_shifts(graph, layers, weight_quant, means)
    assert set(linear) == set(measured)
    for name in measured:
        np.testing.assert_allclose(linear[name], measured[name], rtol=1e-3, atol=1e-5 * np.abs(measured[name]).max())
        assert np.abs(measured[name]).max() > 0


SEQUENTIAL_BASE = ("fuse_bn,match_layers,calibrate{algorithm=sample_quantile algorithm_options={quantile=0.5} "
                   "block_outputs=true}")


def _qdq_outputs(result, x):
    from amct_pipeline.runtime.ort import make_session
    lowered = result.artifacts["lowered"]["qdq"]
    session = make_session(lowered)
    return session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)


def test_sequential_bias_correction_matches_the_float_means_in_the_qdq_model(session):
    """Ranges that clip (the median of the samples' maxima) shift the quantized model's means; the
    sequential correction, fitted in the emulated quantized model, makes the QDQ model's logits (the
    last layer, a graph output: its shift is the plain mean error) match the float model's per class
    on the calibration data, and lowers their squared error."""
    from amct_pipeline.runtime.ort import run_model
    lower = ",lower{targets=[qdq]}"
    plain = _run(session, SEQUENTIAL_BASE + ",quantize_weights{bias_correction=true}" + lower)
    corrected = _run(session, SEQUENTIAL_BASE + ",quantize_weights{bias_correction=true "
                     "bias_correction_input=sequential max_samples=48}" + lower)
    stats = corrected.stats_for("quantize_weights")
    assert stats["bias_corrected"] == 3 and "bias_not_corrected" not in stats
    x = build_demo_data(48)
    model = build_demo_model()
    reference = run_model(model, {model.graph.input[0].name: x})[0].astype(np.float64)
    before, after = _qdq_outputs(plain, x) - reference, _qdq_outputs(corrected, x) - reference
    assert np.abs(before.mean(axis=0)).max() > 0.01 * np.abs(reference).mean()      # the clipping shifts them
    assert np.abs(after.mean(axis=0)).max() < 0.2 * np.abs(before.mean(axis=0)).max()
    assert np.mean(after ** 2) < np.mean(before ** 2)


def test_sequential_bias_correction_needs_activation_ranges(session):
    from amct_pipeline.errors import PassError
    with pytest.raises(PassError, match="needs activation ranges"):
        _run(session, "fuse_bn,match_layers,quantize_weights{bias_correction=true bias_correction_input=sequential}")


def test_float_reference_puts_the_shifted_biases_back():
    """``float_reference``: the graph with the biases bias correction shifted restored, in a copy
    (the graph keeps the corrected ones, which the quantized models use); without the artifact, the graph."""
    from types import SimpleNamespace

    from amct_pipeline.ir.graph import Graph
    from amct_pipeline.passes.base import FLOAT_VALUES, float_reference
    graph = Graph.from_proto(build_demo_model())
    bias = next(t for t in graph.tensors().values() if t.name.endswith("bias") and hasattr(t, "values"))
    original = np.array(bias.values, copy=True)
    bias.values = original + 1.0                       # what a correction writes
    ctx = SimpleNamespace(artifacts={FLOAT_VALUES: {bias.name: original}})
    restored = float_reference(graph, ctx)
    np.testing.assert_array_equal(restored.tensors()[bias.name].values, original)
    np.testing.assert_array_equal(graph.tensors()[bias.name].values, original + 1.0)
    assert float_reference(graph, SimpleNamespace(artifacts={})) is graph
