"""calibrate: streamed collection, per-layer configurations, shared tensors, bounded memory, clear errors."""
from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.algorithms.calibration.common import CalibratorOptions, StreamingCalibrator
from amct_pipeline.algorithms.calibration.histogram import RunningRange
from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.errors import ConfigError, PassError
from amct_pipeline.pipeline.spec import DatasetSpec, Preprocess
from amct_pipeline.quant.math import scale_offset_from_range
from amct_pipeline.runtime.data import ArraySource
from amct_pipeline.runtime.ort import expose_tensors, make_session
from conftest import shared_path

IMAGENET = Preprocess(layout="nhwc_to_nchw", scale=1 / 255, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def _source(array: np.ndarray, batch_size: int, preprocess: Preprocess | None = None, **spec) -> ArraySource:
    return ArraySource("calib", {"x": array}, DatasetSpec(batch_size=batch_size, preprocess=preprocess, **spec), "test")


def _run(session, model, text: str, source, **kwargs):
    return session.build(text, datasets=["calib"]).run(model, datasets={"calib": source}, **kwargs)


def _direct(session, model: onnx.ModelProto, source, layers, algorithm: str, options=None, batches=None):
    """Reference: collect each layer input through onnxruntime ourselves and feed a fresh calibrator."""
    tensors = sorted({layer.input for layer in layers})
    inputs = {i.name for i in model.graph.input}
    fetch = [t for t in tensors if t not in inputs]
    ort_session = make_session(expose_tensors(model, fetch))
    calibrator = session.make_algorithm("calibrators", algorithm, options)
    from amct_pipeline.runtime.data import model_inputs
    from amct_pipeline.ir import load_graph
    for index, feed in enumerate(source.batches(model_inputs(load_graph(model)))):
        if batches is not None and index >= batches:
            break
        acts = dict(zip(fetch, ort_session.run(fetch, feed)))
        acts.update({t: feed[t] for t in tensors if t in inputs})
        for t in tensors:
            calibrator.observe(t, acts[t])
    params = calibrator.finalize()
    return {layer.name: params[layer.input] for layer in layers}


def _assert_same(ours: dict, reference: dict) -> None:
    assert list(ours) == list(reference)
    for name, params in ours.items():
        expected = reference[name]
        assert params.offset == expected.offset and params.num_bits == expected.num_bits, name
        assert params.scale == pytest.approx(expected.scale, rel=1e-6), name


# -- equality with the calibrator fed directly ---------------------------------------------------
@pytest.mark.parametrize("algorithm,options", [("ifmr", {}), ("ifmr", {"asymmetric": False}), ("hfmg", {}),
                                               ("minmax", {}), ("percentile", {"percentile": 99.9})])
def test_demo_layers_equal_direct_calibration(session, algorithm, options):
    source = _source(build_demo_data(48), 16)
    calibrate = session.make_pass("calibrate", algorithm=algorithm, algorithm_options=options)
    result = session.pipeline([session.make_pass("fuse_bn"), session.make_pass("match_layers"), calibrate]).run(
        build_demo_model(), datasets={"calib": source})
    layers = result.artifacts["layer_map"].layers()
    assert [layer.name for layer in layers] == ["conv1", "conv2", "fc"]
    _assert_same(result.artifacts["act_quant"], _direct(session, result.model, source, layers, algorithm, options))
    assert result.stats_for("calibrate") == {"layers": 3, "tensors": 3, "batches": 3, "algorithm": algorithm}


def test_mobilenetv2_ifmr_equals_direct(session):
    images = np.load(shared_path("data/imagenet_dev250_224_uint8.npz"))["images_nhwc_uint8"][:8]
    source = _source(images, 4, IMAGENET)
    result = _run(session, shared_path("models/mobilenetv2_fp32.onnx"),
                  "match_layers,calibrate{fit_activation_bounds=false}", source)
    layers = result.artifacts["layer_map"].layers()
    assert len(layers) == 53
    direct = _direct(session, result.model, source, layers, "ifmr")
    _assert_same(result.artifacts["act_quant"], direct)
    stats = result.stats_for("calibrate")
    assert (stats["layers"], stats["batches"]) == (53, 2) and stats["tensors"] <= 53
    # by default a range beyond a Relu6's 6 is narrowed to [0, 6]; the others are left alone
    fitted = _run(session, shared_path("models/mobilenetv2_fp32.onnx"), "match_layers,calibrate", source)
    graph = fitted.graph
    tensors = graph.tensors()
    narrowed = 0
    for layer in layers:
        got, raw = fitted.artifacts["act_quant"][layer.name], direct[layer.name]
        producer = graph.producer(tensors[layer.input])
        if producer is not None and producer.op == "Clip" and raw.clip_max > 6 * (1 + 1e-6):
            narrowed += 1
            assert got.offset == -128 and got.scale == pytest.approx(6 / 255, rel=1e-6), layer.name
        else:
            assert (got.scale, got.offset) == (raw.scale, raw.offset), layer.name
    assert narrowed > 0


def test_mnist8_hfmg_equals_direct_fixed_batch_of_one(session):
    images = np.load(shared_path("data/mnist_test10k_uint8.npz"))["images_uint8"][:12]
    source = _source(images, 4, Preprocess(add_channel_axis=True, dtype="float32"))
    result = _run(session, shared_path("models/mnist-8.onnx"), "match_layers,calibrate{algorithm=hfmg}", source)
    layers = result.artifacts["layer_map"].layers()
    assert [layer.op_type for layer in layers] == ["Conv", "Conv", "MatMul"]
    assert result.stats_for("calibrate")["batches"] == 12     # the model's batch dimension is fixed at 1
    _assert_same(result.artifacts["act_quant"], _direct(session, result.model, source, layers, "hfmg"))


# -- shared tensors and per-layer configurations --------------------------------------------------
def _two_heads_model() -> onnx.ModelProto:
    """input -> conv0 -> relu -> r; r feeds conv_a and conv_b (one tensor, two layers)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n)
             for n, s in (("w0", (4, 3, 3, 3)), ("wa", (4, 4, 1, 1)), ("wb", (2, 4, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wa"], ["ya"], name="conv_a"),
             helper.make_node("Conv", ["r", "wb"], ["yb"], name="conv_b")]
    graph = helper.make_graph(nodes, "two_heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("ya", "yb")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


class CountingCalibrator(StreamingCalibrator):
    name = "counting"
    seen: list = []

    class Options(CalibratorOptions):
        pass

    def _new_stats(self):
        return RunningRange()

    def observe(self, tensor_name, batch):
        CountingCalibrator.seen.append(tensor_name)
        super().observe(tensor_name, batch)

    def _params(self, stats):
        return scale_offset_from_range(stats.min, stats.max, self.num_bits, self.symmetric)


def test_shared_tensor_is_calibrated_once_and_layers_share_params(session):
    session.register("calibrators", CountingCalibrator)
    CountingCalibrator.seen = []
    data = np.random.default_rng(1).normal(size=(12, 3, 8, 8)).astype(np.float32)
    result = _run(session, _two_heads_model(), "match_layers,calibrate{algorithm=counting}", _source(data, 4))
    act = result.artifacts["act_quant"]
    assert act["conv_a"] is act["conv_b"]
    assert sorted(CountingCalibrator.seen) == sorted(["x", "r"] * 3)       # 3 batches, each tensor once
    assert result.stats_for("calibrate") == {"layers": 3, "tensors": 2, "batches": 3, "algorithm": "counting"}


def test_per_layer_override_calibrates_a_shared_tensor_per_configuration(session):
    data = np.random.default_rng(2).normal(size=(12, 3, 8, 8)).astype(np.float32)
    text = ("match_layers{overrides=[{match={name=conv_b} options={calibrate={algorithm=hfmg asymmetric=false}}}]},"
            "calibrate{algorithm=ifmr}")
    result = _run(session, _two_heads_model(), text, _source(data, 4))
    act, layer_map = result.artifacts["act_quant"], result.artifacts["layer_map"]
    assert act["conv_a"] is not act["conv_b"]
    reference_b = _direct(session, result.model, _source(data, 4), [layer_map["conv_b"]], "hfmg", {"asymmetric": False})
    reference_a = _direct(session, result.model, _source(data, 4), [layer_map["conv_a"]], "ifmr")
    _assert_same({"conv_b": act["conv_b"]}, reference_b)
    _assert_same({"conv_a": act["conv_a"]}, reference_a)
    assert act["conv_b"].offset == 0
    stats = result.stats_for("calibrate")
    assert stats["calibrations"] == 3 and stats["algorithms"] == {"ifmr": 2, "hfmg": 1}


def test_switching_algorithm_keeps_the_pipelines_asymmetry(session):
    data = np.random.default_rng(3).normal(size=(8, 3, 8, 8)).astype(np.float32)
    text = ("match_layers{overrides=[{match={name=conv0} options={calibrate={algorithm=minmax}}}]},"
            "calibrate{algorithm=ifmr algorithm_options={asymmetric=false search_step=0.02}}")
    result = _run(session, _two_heads_model(), text, _source(data, 4))
    assert all(p.offset == 0 for p in result.artifacts["act_quant"].values())


def test_bad_per_layer_options_name_the_layer(session):
    data = np.zeros((4, 3, 8, 8), np.float32)
    text = "match_layers{overrides=[{match={name=conv_a} options={calibrate={algorithm_options={num_of_bins=3}}}}]},calibrate"
    with pytest.raises(PassError) as info:
        _run(session, _two_heads_model(), text, _source(data, 4))
    assert "layer 'conv_a'" in str(info.value) and "num_of_bins" in str(info.value)


def test_unknown_algorithm_and_options_are_caught_before_any_model(session):
    with pytest.raises(ConfigError) as info:
        session.build("calibrate{algorithm=ifmx}", datasets=["calib"])
    assert "did you mean 'ifmr'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        session.build("calibrate{algorithm=hfmg algorithm_options={num_of_bins=100}}", datasets=["calib"])
    assert "num_of_bins" in str(info.value)
    with pytest.raises(ConfigError) as info:
        session.build("match_layers,calibrate{dataset=calibration}", datasets=["calib"])
    assert "calibration" in str(info.value)


# -- errors ------------------------------------------------------------------------------------
def test_nan_activation_error_names_the_layers(session):
    data = build_demo_data(16)
    data[5, 0, 3, 3] = np.nan
    with pytest.raises(PassError) as info:
        _run(session, build_demo_model(), "fuse_bn,match_layers,calibrate", _source(data, 8))
    message = str(info.value)
    assert "layer 'conv1'" in message and "NaN" in message and "batch 0" in message
    assert "\n" not in message


def test_inf_downstream_names_the_reading_layer(session):
    # 'r' feeds conv_a and conv_b: a huge input overflows conv0 to inf
    data = np.ones((4, 3, 8, 8), np.float32) * 3e38
    with pytest.raises(PassError) as info:
        _run(session, _two_heads_model(), "match_layers,calibrate", _source(data, 4))
    assert "layers 'conv_a', 'conv_b'" in str(info.value) or "layer 'conv0'" in str(info.value)


def test_fewer_batches_than_batch_num(session):
    with pytest.raises(PassError) as info:
        _run(session, build_demo_model(), "match_layers,calibrate{batch_num=5}", _source(build_demo_data(32), 8))
    assert "dataset 'calib' yields 4 batches, batch_num asks for 5" in str(info.value)


def test_fewer_batches_from_an_unsized_python_source(session):
    data = build_demo_data(16)

    def batches():                         # a generator function: no len(), found out while running
        for i in range(0, 16, 8):
            yield {"input": data[i:i + 8]}
    pipeline = session.build("match_layers,calibrate{batch_num=3}", datasets=["calib"])
    with pytest.raises(PassError) as info:
        pipeline.run(build_demo_model(), datasets={"calib": batches})
    assert "yields 2 batches, batch_num asks for 3" in str(info.value)


def test_batch_num_takes_the_first_batches(session):
    source = _source(build_demo_data(64), 8)
    result = _run(session, build_demo_model(), "fuse_bn,match_layers,calibrate{batch_num=3}", source)
    layers = result.artifacts["layer_map"].layers()
    assert result.stats_for("calibrate")["batches"] == 3
    _assert_same(result.artifacts["act_quant"], _direct(session, result.model, source, layers, "ifmr", batches=3))


def test_wrong_shape_data_names_input_and_both_shapes_on_one_line(session):
    data = np.zeros((8, 3, 16, 16), np.float32)
    with pytest.raises(PassError) as info:
        _run(session, build_demo_model(), "match_layers,calibrate", _source(data, 4))
    message = str(info.value)
    assert "input 'input'" in message and "('?', 3, 32, 32)" in message and "(4, 3, 16, 16)" in message
    assert "\n" not in message


def test_wrong_dtype_data_is_one_line(session):
    data = np.zeros((8, 3, 32, 32), np.float64)
    with pytest.raises(PassError) as info:
        _run(session, build_demo_model(), "match_layers,calibrate", _source(data, 4, Preprocess(dtype="int32")))
    assert "input 'input' expects float32" in str(info.value) and "\n" not in str(info.value)


def test_constant_activation_warning_names_the_layer(session):
    data = np.zeros((8, 3, 8, 8), np.float32)     # relu(conv0(0)) = 0 everywhere: constant
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _run(session, _two_heads_model(), "match_layers,calibrate", _source(data, 4))
    texts = [str(w.message) for w in caught if "constant" in str(w.message)]
    assert any("layers 'conv_a', 'conv_b'" in t for t in texts) and any("layer 'conv0'" in t for t in texts)
    assert result.artifacts["act_quant"]["conv_a"].scale == 1.0        # SPEC 4.1 sanitised scale


# -- memory ------------------------------------------------------------------------------------
def _peak(session, data: np.ndarray, batches: int, algorithm: str) -> int:
    source = _source(data, 32, num_batches=batches)
    pipeline = session.build(f"fuse_bn,match_layers,calibrate{{algorithm={algorithm}}}", datasets=["calib"])
    model = build_demo_model()
    tracemalloc.start()
    try:
        pipeline.run(model, datasets={"calib": source})
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("algorithm", ["ifmr", "hfmg"])
def test_peak_memory_does_not_grow_with_batches(session, algorithm):
    data = build_demo_data(256)                   # made before tracing: only the run is measured
    _peak(session, data, 1, algorithm)            # warm caches (edge tables, imports)
    two, eight = _peak(session, data, 2, algorithm), _peak(session, data, 8, algorithm)
    assert eight <= 1.15 * two, (two, eight)
