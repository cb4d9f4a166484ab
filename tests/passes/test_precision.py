"""Per-layer precision: INT4 weights and INT16 activations through fakequant, qdq and ascend, set by
``match_layers{precision}`` or an AMCT config; errors before any model runs.

Numerics are checked through onnxruntime against the float model and against the integer simulation
of the record (``test_lower.simulate``, which reads INT16 / INT4 from the record).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from amct_pipeline.errors import AmctError
from test_lower import assert_float32_equal, demo_model_and_data, run_ort, simulate

TARGETS = ["fakequant", "qdq", "ascend"]


def pipeline(precision=None, *, targets=TARGETS, calibrate=None, match=None, extra=()) -> dict:
    match_options = dict(match or {})
    if precision is not None:
        match_options["precision"] = precision
    return {"schema_version": 1, "name": "precision", "datasets": {"calib": {"reader": "npy", "batch_size": 8}},
            "passes": [{"pass": "fuse_bn"}, {"pass": "match_layers", "options": match_options},
                       {"pass": "calibrate", "options": calibrate or {"algorithm": "minmax"}},
                       {"pass": "quantize_weights"},
                       {"pass": "lower", "options": {"targets": list(targets)}}, *extra]}


def run(session, model, data, precision=None, out=None, **kwargs):
    datasets = {"calib": data if callable(data) else str(data)}
    return session.build(pipeline(precision, **kwargs)).run(model, datasets=datasets, output_dir=out)


def never_read():
    raise AssertionError("the calibration data was read: the error came too late")


def sqnr(reference: np.ndarray, actual: np.ndarray) -> float:
    return float(10 * np.log10((reference.astype(np.float64) ** 2).sum() / ((reference - actual) ** 2).sum()))


def initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def deploy_outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from amct_pipeline.ascend.reference import run_deploy_model
    return run_deploy_model(model, {model.graph.input[0].name: x})[0]


# -- INT4 weights -------------------------------------------------------------------------------------
def test_int4_weights_in_every_target(session, tmp_path):
    path, data = demo_model_and_data(tmp_path)
    x = np.load(data)[:16]
    result = run(session, path, data, {"Conv": {"wts": 4}, "Gemm": {"wts": 4}}, out=tmp_path / "w4")
    low, record = result.artifacts["lowered"], result.artifacts["quant_record"]
    assert {r.wts_type for r in record.values()} == {"INT4"} and {r.dst_type for r in record.values()} == {"INT4"}
    codes = [result.artifacts["weight_quant"][name].quantized for name in record]
    assert all(c.dtype == np.int8 and c.min() >= -8 and c.max() <= 7 for c in codes)
    # fake-quant model == integer simulation of the record
    (fake,) = run_ort(low["fakequant"], x, level="none")
    assert_float32_equal(fake, simulate(result.model, record, x)[0], "W4 fakequant vs simulation")
    # QDQ: packed INT4 initializers behind DequantizeLinear (opset 21), runs in onnxruntime, matches fakequant
    qdq = low["qdq"]
    assert max(o.version for o in qdq.opset_import if o.domain in ("", "ai.onnx")) == 21
    dq_inputs = {n.input[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    int4 = [t for t in qdq.graph.initializer if t.name in dq_inputs and t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == len(record)
    assert all(len(t.raw_data) == (int(np.prod(t.dims)) + 1) // 2 for t in int4)
    (q,) = run_ort(qdq, x)
    step = max(float(np.float32(r.scale_d) * max(r.scale_w)) for r in record.values())
    assert np.abs(q - fake).max() <= 64 * step, "QDQ W4 drifts from the fake-quant model"
    assert (q.argmax(1) == fake.argmax(1)).mean() >= 0.9
    # the W4 QDQ file is smaller than the W8 one
    w8 = run(session, path, data, None, out=tmp_path / "w8")
    size = {name: (tmp_path / name / "demo_qdq_model.onnx").stat().st_size for name in ("w4", "w8")}
    assert size["w4"] < size["w8"], size
    assert w8.artifacts["lowered"]["qdq"].opset_import[0].version == 13      # no upgrade unless needed
    # Ascend deploy: packed INT4 weights, equal to the fake-quant model
    deploy = low["ascend"]
    conv = next(n for n in deploy.graph.node if n.name == "conv2")
    assert initializer(deploy, conv.input[1]).data_type == onnx.TensorProto.INT4
    np.testing.assert_allclose(deploy_outputs(deploy, x), fake, rtol=0, atol=1e-5 * float(np.abs(fake).max()))


def test_int4_record_and_quant_config_round_trip(session, tmp_path):
    path, data = demo_model_and_data(tmp_path)
    first = run(session, path, data, {"conv2": {"wts": 4}, "fc": {"act": 16}}, out=tmp_path / "a",
                targets=["fakequant", "qdq"], calibrate={"algorithm": "ifmr", "batch_num": 4}, extra=[{"pass": "export_amct"}])
    config = json.loads((tmp_path / "a" / "demo_quant_config.json").read_text())
    assert config["conv2"]["weight_quant_params"]["num_bits"] == 4
    assert config["fc"]["activation_quant_params"]["num_bits"] == 16
    assert config["conv1"]["weight_quant_params"]["num_bits"] == 8
    # the written AMCT config, read back by match_layers, gives the same record and models
    again = run(session, path, data, None, out=tmp_path / "b", targets=["fakequant", "qdq"],
                calibrate={"algorithm": "ifmr", "batch_num": 4}, match={"amct_config": str(tmp_path / "a" / "demo_quant_config.json")})
    assert again.artifacts["quant_record"] == first.artifacts["quant_record"]
    # the record, loaded back, lowers to byte-identical models
    from_record = {"schema_version": 1, "name": "from-record", "passes": [
        {"pass": "fuse_bn"}, {"pass": "match_layers"},
        {"pass": "load_record", "options": {"path": str(tmp_path / "a" / "record.txt")}},
        {"pass": "lower", "options": {"targets": ["fakequant", "qdq"]}}]}
    session.build(from_record).run(path, output_dir=tmp_path / "c")
    for name in ("demo_fake_quant_model.onnx", "demo_qdq_model.onnx"):
        a, c = (onnx.load(str(tmp_path / d / name)) for d in ("a", "c"))
        for proto in (a, c):
            del proto.metadata_props[:]          # the pipeline text differs
        assert a.SerializeToString(deterministic=True) == c.SerializeToString(deterministic=True), name


# -- INT16 activations ----------------------------------------------------------------------------------
def outlier_model(tmp_path):
    """Conv -> Relu -> Conv -> Gemm whose input has one channel 100x the others, which the model ignores:
    an INT8 range over it leaves the other channels a few steps."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)
    w1[:, 0] = 0                  # the outlier channel only sets the range; the output comes from the others
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (6, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.3, (6, 5)).astype(np.float32), "w3"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], "conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], "pool"),
             helper.make_node("Reshape", ["p", "shape"], ["f"], "flatten"),
             helper.make_node("Gemm", ["f", "w3"], ["y"], "fc")]
    graph = helper.make_graph(nodes, "outliers", [helper.make_tensor_value_info("x", 1, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "outliers.onnx"
    onnx.save(model, str(path))
    x = rng.normal(0, 1, (32, 4, 8, 8)).astype(np.float32)
    x[:, 0] *= 100
    data = tmp_path / "outliers.npy"
    np.save(data, x)
    return path, data, x


def test_int16_activations_raise_sqnr_in_every_target(session, tmp_path):
    path, data, x = outlier_model(tmp_path)
    (reference,) = run_ort(onnx.load(str(path)), x)
    results = {bits: run(session, path, data, {t: {"act": bits} for t in ("Conv", "Gemm")}) for bits in (8, 16)}
    figures = {}
    for bits, result in results.items():
        low, record = result.artifacts["lowered"], result.artifacts["quant_record"]
        assert {r.act_type for r in record.values()} == {f"INT{bits}"}
        (fake,) = run_ort(low["fakequant"], x, level="none")
        assert_float32_equal(fake, simulate(result.model, record, x)[0], f"A{bits} fakequant vs simulation")
        (q,) = run_ort(low["qdq"], x)
        deploy = deploy_outputs(low["ascend"], x)
        figures[bits] = {"fakequant": sqnr(reference, fake), "qdq": sqnr(reference, q), "ascend": sqnr(reference, deploy)}
    for target in ("fakequant", "qdq", "ascend"):
        assert figures[16][target] >= figures[8][target] + 10, figures
    qdq16 = results[16].artifacts["lowered"]["qdq"]
    zero_points = {initializer(qdq16, n.input[2]).data_type for n in qdq16.graph.node if n.op_type == "QuantizeLinear"
                   and n.name.endswith(".input_QuantizeLinear") or n.name.startswith("x_")}
    assert onnx.TensorProto.UINT16 in zero_points or any(
        initializer(qdq16, n.input[2]).data_type == onnx.TensorProto.UINT16
        for n in qdq16.graph.node if n.op_type == "QuantizeLinear")
    quant_nodes = [n for n in results[16].artifacts["lowered"]["ascend"].graph.node if n.op_type == "AscendQuant"]
    assert {helper.get_attribute_value(a) for n in quant_nodes for a in n.attribute if a.name == "dst_type"} == {b"INT16"}


def test_mixed_per_layer_precision(session, tmp_path):
    path, data, x = outlier_model(tmp_path)
    precision = {"Conv": {"act": 16}, "conv2": {"act": 8, "wts": 4}, "fc": "float"}
    result = run(session, path, data, precision)
    record, low = result.artifacts["quant_record"], result.artifacts["lowered"]
    assert {k: (r.act_type, r.wts_type) for k, r in record.items()} == {"conv1": ("INT16", "INT8"),
                                                                       "conv2": ("INT8", "INT4")}
    assert "precision float" in result.artifacts["layer_map"].skipped["fc"]
    (fake,) = run_ort(low["fakequant"], x, level="none")
    assert_float32_equal(fake, simulate(result.model, record, x)[0], "mixed fakequant vs simulation")
    assert not any(n.name.startswith("fc.") for n in low["fakequant"].graph.node)
    (q,) = run_ort(low["qdq"], x)
    assert sqnr(fake, q) >= 30
    np.testing.assert_allclose(deploy_outputs(low["ascend"], x), fake, rtol=0, atol=1e-4 * float(np.abs(fake).max()))


def test_int16_qdq_runs_in_float_kernels(session, tmp_path):
    """What onnxruntime runs: INT8 layers fuse into QLinearConv; INT16 ones keep a float Conv."""
    path, data, x = outlier_model(tmp_path)
    result = run(session, path, data, {"conv1": {"act": 16}}, targets=["qdq"],
                 calibrate={"algorithm": "minmax", "block_outputs": True})
    out = tmp_path / "optimized.onnx"
    run_ort(result.artifacts["lowered"]["qdq"], x[:2], optimized_path=out)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "QLinearConv" in ops and "Conv" in ops, ops


def stem_model(tmp_path, channels: int):
    """x (``channels`` = 3: RGB, 1: luma) -> 3x3 conv to 16 -> Relu -> 1x1 conv to 4 -> Relu -> 1x1 conv to 8:
    the stems and the narrow conv whose codes the QDQ target pads, shifts and slices at 8 bits."""
    rng = np.random.default_rng(channels)
    shapes = {"w0": (16, channels, 3, 3), "w1": (4, 16, 1, 1), "w2": (8, 4, 1, 1)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name) for name, shape in shapes.items()]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], "conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], "conv1"), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], "conv2")]
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", 1, ["N", channels, 9, 11])],
                              [helper.make_tensor_value_info("y", 1, ["N", 8, 9, 11])], inits)
    path = tmp_path / f"stem{channels}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    x = rng.uniform(0, 1, (8, channels, 9, 11)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return path, tmp_path / "x.npy", x


@pytest.mark.parametrize("channels", [3, 1])
def test_int16_qdq_with_rgb_and_luma_stems_runs_in_onnxruntime(session, tmp_path, channels):
    """The QDQ target's code rewrites (a channel Pad for RGB stems, column shifts for luma stems, a Slice
    after a narrow conv) are for 8-bit codes: at 16 bits onnxruntime has no Pad kernel, so they stay out."""
    path, data, x = stem_model(tmp_path, channels)
    (reference,) = run_ort(onnx.load(str(path)), x)
    rewrites, figures = {"Pad", "Slice", "Concat"}, {}
    for bits in (8, 16):
        lowered = run(session, path, data, {"Conv": {"act": bits}}, targets=["fakequant", "qdq"],
                      calibrate={"algorithm": "minmax", "block_outputs": True}).artifacts["lowered"]
        ops = {n.op_type for n in lowered["qdq"].graph.node}
        assert (ops & rewrites) if bits == 8 else not (ops & rewrites), (bits, ops)
        (got,) = run_ort(lowered["qdq"], x)
        (fake,) = run_ort(lowered["fakequant"], x, level="none")
        figures[bits] = (sqnr(reference, got), sqnr(fake, got))
    assert figures[8][0] >= 25 and figures[16][0] > figures[8][0] and figures[16][1] >= 60, figures


# -- errors, before any model runs ---------------------------------------------------------------------
@pytest.mark.parametrize("precision, words", [
    ({"conv1": {"wts": 16}}, ["layer 'conv1'", "precision.conv1.wts", "16-bit weights"]),
    ({"pool": {"act": 16}}, ["precision.pool", "'pool' is a GlobalAveragePool, not a quantizable layer"]),
    ({"Gemm": {"wts": 6}}, ["layer 'fc'", "precision.Gemm.wts", "only allowed for Conv"]),
    ({"conv1": {"act": 4}}, ["layer 'conv1'", "precision.conv1.act", "4-bit activations"]),
    ({"cnv1": {"act": 16}}, ["precision.cnv1", "conv1"]),
])
def test_bad_precision_is_one_line_before_calibration(session, tmp_path, precision, words):
    path, data = demo_model_and_data(tmp_path)
    with pytest.raises(AmctError) as info:
        run(session, path, never_read, precision, out=tmp_path / "o")
    message = str(info.value)
    assert "\n" not in message.strip() and all(w in message for w in words), message
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_int16_on_average_pool_and_weights_through_overrides(session, tmp_path):
    from amct_pipeline.testing import models
    path = tmp_path / "layers.onnx"
    onnx.save(models.quant_layers_model(), str(path))
    ops = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
    pool = next(name for name, op in ops.items() if op == "AveragePool")
    mm = next(name for name, op in ops.items() if op == "MatMul")
    for precision, words in (({pool: {"act": 16}}, [f"layer '{pool}'", "INT16 activations are not allowed"]),
                             ({pool: {"wts": 4}}, [f"layer '{pool}'", "no weights"]),
                             ({mm: {"act": 16}}, [f"layer '{mm}'", "INT16 activations are not allowed for MatMul"])):
        with pytest.raises(AmctError) as info:
            run(session, path, never_read, precision)
        assert all(w in str(info.value) for w in words), str(info.value)
    overrides = [{"match": {"op_type": "Conv"}, "options": {"quantize_weights": {"num_bits": 16}}}]
    with pytest.raises(AmctError) as info:
        run(session, path, never_read, match={"overrides": overrides})
    assert "options.quantize_weights.num_bits" in str(info.value) and "16-bit weights" in str(info.value)


def test_a_target_refusing_a_precision_fails_before_writing(session, tmp_path):
    from amct_pipeline.algorithms.targets.fakequant import FakeQuantTarget
    from amct_pipeline.errors import ConfigError, Problem

    class NoInt4(FakeQuantTarget):
        name, suffix = "no_int4", "no_int4_model"

        def check_plan(self, plan):
            for name, layer in plan.layers.items():
                if layer.weight_q is not None and layer.wts_bits == 4:
                    raise ConfigError([Problem("target 'no_int4'", f"layer '{name}'", "cannot hold INT4 weights")])

    session.register("targets", NoInt4)
    path, data = demo_model_and_data(tmp_path)
    with pytest.raises(AmctError) as info:
        run(session, path, data, {"conv2": {"wts": 4}}, out=tmp_path / "o", targets=["fakequant", "no_int4"])
    assert "layer 'conv2'" in str(info.value) and "target 'no_int4'" in str(info.value)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_int16_layers_keep_their_neighbourhood_out_of_8_bit_block_outputs(session, tmp_path):
    """Block outputs (8-bit, for integer fusion) around 16-bit layers would add 8-bit noise the
    fake-quant model does not have; the QDQ model leaves them float."""
    path, data, x = outlier_model(tmp_path)
    (reference,) = run_ort(onnx.load(str(path)), x)
    result = run(session, path, data, {t: {"act": 16} for t in ("Conv", "Gemm")}, targets=["fakequant", "qdq"],
                 calibrate={"algorithm": "minmax", "block_outputs": True})
    assert result.artifacts["tensor_quant"]          # block outputs were calibrated
    low = result.artifacts["lowered"]
    assert all(initializer(low["qdq"], n.input[2]).data_type == onnx.TensorProto.UINT16
               for n in low["qdq"].graph.node if n.op_type == "QuantizeLinear")
    (fake,), (q,) = run_ort(low["fakequant"], x, level="none"), run_ort(low["qdq"], x, level="none")
    assert abs(sqnr(reference, q) - sqnr(reference, fake)) <= 0.05
    # onnxruntime's extended optimizations turn DequantizeLinear(int8 weight) -> Gemm into MatMulNBits,
    # which computes with less precise activations; measured, not hidden
    (optimized,) = run_ort(low["qdq"], x)
    assert sqnr(reference, fake) - 2 <= sqnr(reference, optimized) <= sqnr(reference, fake) + 0.05


def test_packed_int4_initializers_stay_packed_in_external_data(tmp_path):
    import onnx_graphsurgeon as gs
    from amct_pipeline.ascend.packing import unpack_int4
    from amct_pipeline.ir.edit import Namer, int4_constant
    from amct_pipeline.ir.graph import Graph
    from amct_pipeline.ir.io import read_model, write_model
    codes = np.random.default_rng(0).integers(-8, 8, (299, 301)).astype(np.int8)     # odd count: a pad nibble
    graph = Graph.from_proto(helper.make_model(helper.make_graph([], "g", [], []),
                                              opset_imports=[helper.make_opsetid("", 21)]))
    x, y, w_float = gs.Variable("x", np.float32, (2, 299)), gs.Variable("y", np.float32, (2, 301)), gs.Variable("wf")
    weight = int4_constant(Namer(graph), "w", codes)
    graph.gs.nodes += [gs.Node("DequantizeLinear", inputs=[weight, gs.Constant("s", np.array(0.1, np.float32))],
                               outputs=[w_float]), gs.Node("MatMul", inputs=[x, w_float], outputs=[y])]
    graph.gs.inputs, graph.gs.outputs = [x], [y]
    files = write_model(graph, tmp_path / "m.onnx", external=True)
    assert files[1].stat().st_size == (codes.size + 1) // 2          # packed; the scale stays inline
    model = read_model(tmp_path / "m.onnx")
    onnx.load_external_data_for_model(model, str(tmp_path))
    stored = next(t for t in model.graph.initializer if t.name == "w")
    np.testing.assert_array_equal(unpack_int4(stored.raw_data, codes.shape), codes)
    (got,) = run_ort(onnx.load(str(tmp_path / "m.onnx")), np.ones((2, 299), np.float32))
    np.testing.assert_allclose(got, np.ones((2, 299)) @ (codes * np.float32(0.1)), rtol=1e-5, atol=1e-3)
