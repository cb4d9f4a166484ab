"""refine_ranges: output-aware range refinement on a one-session fake-quant evaluation model."""
from __future__ import annotations

import numpy as np
import pytest

from amct_pipeline.algorithms.base import ActQuantParams
from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.errors import ConfigError
from amct_pipeline.passes.base import Pass, PassResult
from amct_pipeline.quant.weights import weight_values
from amct_pipeline.passes.refine_ranges import _units, build_eval_model, eval_session, factor_feed
from amct_pipeline.quant.weights import dequantize_weight
from amct_pipeline.pipeline.spec import DatasetSpec, Preprocess
from amct_pipeline.quant.math import arq, fake_quant
from amct_pipeline.runtime.data import ArraySource
from amct_pipeline.runtime.ort import make_session
from conftest import shared_path


class ArqWeights(Pass):
    """Test stand-in for quantize_weights: ARQ per channel (Conv) or per tensor (Gemm/MatMul)."""

    name = "test_arq_weights"
    requires = frozenset({"layer_map"})
    produces = frozenset({"weight_quant"})

    def run(self, graph, ctx) -> PassResult:
        layers = ctx.artifacts["layer_map"].layers()
        ctx.artifacts["weight_quant"] = {layer.name: arq(weight_values(graph, layer), layer.channel_axis)
                                         for layer in layers if layer.weight is not None}
        return PassResult(False, {})


@pytest.fixture
def session(session):
    session.register_pass(ArqWeights)
    return session


def _run(session, model, source, refine: str = "refine_ranges", calibrate: str = "calibrate{algorithm=minmax}"):
    text = f"fuse_bn,match_layers,{calibrate},test_arq_weights,{refine}"
    return session.build(text, datasets=["calib"]).run(model, datasets={"calib": source})


def _demo_source(count: int = 64, batch_size: int = 16) -> ArraySource:
    return ArraySource("calib", {"x": build_demo_data(count)}, DatasetSpec(batch_size=batch_size), "test")


def test_demo_output_error_does_not_grow(session):
    result = _run(session, build_demo_model(), _demo_source())
    stats = result.stats_for("refine_ranges")
    assert stats["mse_after"] <= stats["mse_before"]
    assert stats["sqnr_db_after"] >= stats["sqnr_db_before"]
    assert (stats["tensors"], stats["sweeps"], stats["samples"]) == (3, 1, 32)
    assert set(stats) >= {"tensors_changed", "evaluations"}
    act = result.artifacts["act_quant"]
    assert list(act) == ["conv1", "conv2", "fc"] and all(isinstance(p, ActQuantParams) for p in act.values())


def test_mnist8_output_error_does_not_grow(session):
    images = np.load(shared_path("data/mnist_test10k_uint8.npz"))["images_uint8"][:96]
    source = ArraySource("calib", {"x": images}, DatasetSpec(preprocess=Preprocess(add_channel_axis=True)), "test")
    # the model's batch is fixed at 1: 32 batches = 32 samples; opset 8 is converted for Round/Clip
    result = _run(session, shared_path("models/mnist-8.onnx"), source, "refine_ranges{num_batches=32 sweeps=2}")
    stats = result.stats_for("refine_ranges")
    assert stats["mse_after"] <= stats["mse_before"] and stats["samples"] == 32
    before = result.stats_for("calibrate")
    assert before["batches"] == 96


def test_changes_only_shrink_ranges_and_are_kept_in_act_quant(session):
    result = _run(session, build_demo_model(), _demo_source(), "refine_ranges{min_improvement=0}",
                  "calibrate{algorithm=minmax}")
    baseline = _run(session, build_demo_model(), _demo_source(), "refine_ranges{factors=[1.0]}")
    assert baseline.stats_for("refine_ranges")["tensors_changed"] == 0
    for name, params in result.artifacts["act_quant"].items():
        original = baseline.artifacts["act_quant"][name]
        assert params.clip_max <= original.clip_max * (1 + 1e-6)
        assert params.clip_min >= original.clip_min * (1 + 1e-6) - 1e-9
    changed = result.stats_for("refine_ranges")["tensors_changed"]
    differing = sum(result.artifacts["act_quant"][n] != baseline.artifacts["act_quant"][n] for n in ("conv1", "conv2", "fc"))
    assert differing == changed


def test_eval_model_matches_numpy_fake_quant(session):
    """The evaluation branch is AMCT's fake quant: compare with quant.math.fake_quant on conv1's input."""
    result = _run(session, build_demo_model(), _demo_source(16), "refine_ranges{factors=[1.0]}")
    graph, layer_map = result.graph, result.artifacts["layer_map"]
    act, weights = result.artifacts["act_quant"], result.artifacts["weight_quant"]
    params = ActQuantParams(0.0123, -7)
    units = _units(layer_map, {**act, "conv1": params})
    model = build_eval_model(graph, layer_map, weights, units)
    unit = next(u for u in units if u.layers == ["conv1"])
    branch = unit.output
    from amct_pipeline.runtime.ort import expose_tensors
    ort_session = eval_session(expose_tensors(model, [branch]))
    x = build_demo_data(4, seed=5)
    feed = {"input": x}
    for u in units:
        feed.update(factor_feed(u, params if u is unit else act[u.layers[0]]))
    got = ort_session.run([branch], feed)[0]
    expected = fake_quant(x, params)
    assert np.mean(got == expected) > 0.999                 # x*(1/s) vs x/s may differ at a rounding tie
    np.testing.assert_allclose(got, expected, atol=params.scale * 1.0001)


def test_weights_are_fake_quantized_per_channel(session):
    result = _run(session, build_demo_model(), _demo_source(16), "refine_ranges{factors=[1.0]}")
    graph, layer_map = result.graph, result.artifacts["layer_map"]
    wq = result.artifacts["weight_quant"]["conv2"]
    w = weight_values(graph, layer_map["conv2"])
    deq = dequantize_weight(wq.quantized, wq.scale, layer_map["conv2"])
    assert deq.shape == w.shape
    np.testing.assert_allclose(deq, wq.quantized * wq.scale.reshape(-1, 1, 1, 1), rtol=0, atol=0)
    assert np.abs(deq - w).max() <= wq.scale.max() / 2 + 1e-7


def test_options_are_validated_before_the_model(session):
    with pytest.raises(ConfigError) as info:
        session.build("fuse_bn,match_layers,calibrate,test_arq_weights,refine_ranges{factors=[0.9,-1]}",
                      datasets=["calib"])
    assert "factors" in str(info.value)
    with pytest.raises(ConfigError) as info:
        session.build("fuse_bn,match_layers,calibrate,refine_ranges", datasets=["calib"])
    assert "weight_quant" in str(info.value)


def test_with_quantize_weights_and_gemm_alpha(session):
    """quantize_weights codes alpha * B; the evaluation model must not apply alpha twice."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(4)
    b = (rng.integers(-127, 128, (5, 8)) * 0.01).astype(np.float32)
    b[0, 0] = 1.27                                        # ARQ scale of 2B is exactly 0.02: exact codes
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "B"], ["y"], name="fc", alpha=2.0, transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    data = rng.normal(size=(32, 8)).astype(np.float32)
    source = ArraySource("calib", {"x": data}, DatasetSpec(batch_size=16), "test")
    result = session.build("match_layers,calibrate{algorithm=minmax},quantize_weights,refine_ranges",
                           datasets=["calib"]).run(model, datasets={"calib": source})
    stats = result.stats_for("refine_ranges")
    # only the 8-bit activation error is left: ~40 dB, not the -10 dB of a doubled alpha
    assert stats["sqnr_db_before"] > 30


def _output_sqnr_db(reference: np.ndarray, got: np.ndarray) -> float:
    return float(-10 * np.log10(np.square(got - reference, dtype=np.float64).sum()
                                / np.square(reference, dtype=np.float64).sum()))


@pytest.mark.parametrize("layout", ["fakequant", "qdq"])
def test_layout_evaluates_the_model_that_is_lowered(session, tmp_path, layout):
    """refine's own error estimate (sqnr_db_before, nothing changed) is the error of the model of its
    layout: the fake-quant model for 'fakequant', the QDQ model (block outputs too) for 'qdq'."""
    from amct_pipeline.demo import build_demo_model
    x = build_demo_data(32)
    source = ArraySource("calib", {"x": x}, DatasetSpec(batch_size=16), "test")
    text = ("fuse_bn,match_layers,calibrate{algorithm=ifmr block_outputs=true},test_arq_weights,"
            f"refine_ranges{{factors=[1.0] layout={layout}}},lower{{targets=[fakequant,qdq]}}")
    result = session.build(text, datasets=["calib"]).run(build_demo_model(), datasets={"calib": source})
    stats = result.stats_for("refine_ranges")
    assert stats["layout"] == layout
    assert stats["tensors"] == 3 + (len(result.artifacts["tensor_quant"]) if layout == "qdq" else 0)
    reference = make_session(result.model).run(None, {"input": x})[0]
    sqnr = {target: _output_sqnr_db(reference, make_session(result.artifacts["lowered"][target]).run(None, {"input": x})[0])
            for target in ("fakequant", "qdq")}
    assert abs(sqnr[layout] - stats["sqnr_db_before"]) < 0.3
    other = "qdq" if layout == "fakequant" else "fakequant"
    assert abs(sqnr[other] - stats["sqnr_db_before"]) > abs(sqnr[layout] - stats["sqnr_db_before"])


def test_qdq_layout_refines_block_outputs(session):
    from amct_pipeline.demo import build_demo_model
    source = _demo_source()
    text = ("fuse_bn,match_layers,calibrate{algorithm=minmax block_outputs=true},test_arq_weights,"
            "refine_ranges{min_improvement=0}")
    result = session.build(text, datasets=["calib"]).run(build_demo_model(), datasets={"calib": source})
    calibrated = session.build(text.rsplit(",", 1)[0], datasets=["calib"]).run(
        build_demo_model(), datasets={"calib": _demo_source()}).artifacts["tensor_quant"]
    refined = result.artifacts["tensor_quant"]
    assert list(refined) == list(calibrated)
    stats = result.stats_for("refine_ranges")
    assert stats["layout"] == "qdq" and stats["sqnr_db_after"] >= stats["sqnr_db_before"]
    for name, params in refined.items():
        assert params.clip_max <= calibrated[name].clip_max * (1 + 1e-6)


def test_output_error_is_measured_against_the_float_model_after_bias_correction(session):
    """After ``quantize_weights{bias_correction}`` the graph's biases are the quantized model's; the
    output error refine_ranges minimises is against the input model (its ``sqnr_db_before`` is the
    fake-quant model's SQNR against the model as given)."""
    x = build_demo_data(32)
    source = ArraySource("calib", {"x": x}, DatasetSpec(batch_size=16), "test")
    text = ("fuse_bn,match_layers,calibrate{algorithm=ifmr},quantize_weights{algorithm=arq bias_correction=true},"
            "refine_ranges{factors=[] candidates=false max_samples=32},lower{targets=[fakequant]}")
    start = session.build(text.replace("refine_ranges{factors=[] candidates=false max_samples=32},", ""),
                          datasets=["calib"]).run(build_demo_model(), datasets={"calib": source})
    result = session.build(text, datasets=["calib"]).run(build_demo_model(), datasets={"calib": source})
    reference = make_session(build_demo_model()).run(None, {"input": x})[0].astype(np.float64)
    got = make_session(start.artifacts["lowered"]["fakequant"]).run(None, {"input": x})[0].astype(np.float64)
    expected = 10 * np.log10(np.square(reference).sum() / np.square(got - reference).sum())
    assert result.stats_for("refine_ranges")["sqnr_db_before"] == pytest.approx(expected, abs=0.2)
