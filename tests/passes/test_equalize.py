"""equalize_channels: cross-layer equalization before depthwise convs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.passes.equalize import equalization_scales
from amct_pipeline.pipeline.spec import DatasetSpec
from amct_pipeline.quant.math import arq
from amct_pipeline.runtime.data import ArraySource
from amct_pipeline.runtime.ort import expose_tensors, run_model

CHANNELS = 8


def expand_depthwise(activation: str = "Clip") -> onnx.ModelProto:
    """Conv 1x1 (3 -> 8, channel gains 0.05 .. 4) -> Relu6 / Relu -> depthwise 3x3 -> output."""
    rng = np.random.default_rng(0)
    gains = np.geomspace(0.05, 4.0, CHANNELS).astype(np.float32)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (CHANNELS, 3, 1, 1)).astype(np.float32) * gains[:, None, None, None], "w1"),
             numpy_helper.from_array(rng.normal(0.1, 0.05, CHANNELS).astype(np.float32) * gains, "b1"),
             numpy_helper.from_array(rng.normal(0, 1, (CHANNELS, 1, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, CHANNELS).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="expand")]
    if activation == "Clip":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="relu6"))
    else:
        nodes.append(helper.make_node("Relu", ["c1"], ["a1"], name="relu"))
    nodes.append(helper.make_node("Conv", ["a1", "w2", "b2"], ["y"], name="depthwise", group=CHANNELS, pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CHANNELS, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _data(count: int = 32) -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1, (count, 3, 8, 8)).astype(np.float32)


def _equalize(session, model, text: str = "equalize_channels"):
    source = ArraySource("calib", {"x": _data()}, DatasetSpec(batch_size=8), "test")
    return session.build(text, datasets=["calib"]).run(model, datasets={"calib": source})


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("activation", ["Clip", "Relu"])
def test_function_unchanged_and_channel_ranges_equalized(session, activation):
    model = expand_depthwise(activation)
    result = _equalize(session, model)
    stats = result.stats_for("equalize_channels")
    assert (stats["pairs"], stats["equalized"], stats["samples"]) == (1, 1, 32)
    x = _data()
    np.testing.assert_allclose(run_model(result.model, {"x": x})[0], run_model(model, {"x": x})[0], rtol=1e-4, atol=1e-4)

    def sample_max(m):                                            # [N, C]: each sample's channel maxima
        return run_model(expose_tensors(m, ["a1"]), {"x": x})[1].max(axis=(2, 3))
    per_sample = sample_max(model)
    before, after = per_sample.max(axis=0), sample_max(result.model).max(axis=0)
    assert after.max() / after.min() < 0.25 * before.max() / before.min()
    assert activation == "Relu" or after.max() <= 6.0 + 1e-5    # the Relu6 never binds on the data
    # no stretched channel goes past the widest channel's mean per-sample maximum (no clipping added)
    top = per_sample.mean(axis=0).max()
    stretched = ~np.isclose(after, before, rtol=1e-5)
    assert stretched.sum() >= CHANNELS // 2 and np.all(after[stretched] <= top * (1 + 1e-5))
    # both weights are quantized per output channel: the integer codes do not change
    old, new = _initializers(model), _initializers(result.model)
    for name in ("w1", "w2"):
        assert np.array_equal(arq(old[name], 0).quantized, arq(new[name], 0).quantized)
        assert not np.allclose(old[name], new[name])


def test_scales_rule():
    # each channel's largest value stretched to the widest channel's mean maximum (4), never beyond
    t = equalization_scales(np.array([4.0, 1.0, 0.1, 0.0]), np.array([5.0, 2.0, 0.2, 0.0]), 16.0)
    np.testing.assert_allclose(t, [1.0, 2.0, 16.0, 1.0])         # 4/5 floored at 1; 4/2; 20 capped; dead channel
    t = equalization_scales(np.array([4.0, 1.0]), np.array([4.0, 1.0]), 16.0)
    np.testing.assert_allclose(t, [1.0, 4.0])


def test_only_depthwise_pairs_with_own_constants(session):
    model = expand_depthwise()
    model.graph.node[-1].attribute[0].i = 1                     # group=1: not depthwise
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    w2 = next(i for i in bad.graph.initializer if i.name == "w2")
    w2.CopyFrom(numpy_helper.from_array(np.ones((CHANNELS, CHANNELS, 3, 3), np.float32), "w2"))
    result = _equalize(session, bad)
    assert result.stats_for("equalize_channels") == {"pairs": 0}
