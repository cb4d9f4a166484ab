"""dmq_balance: AMCT's DMQ balancer (SPEC 4.7) — factors, folding, the targets and the record."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.amct.record import read_record
from amct_pipeline.errors import AmctError
from amct_pipeline.quant.balance import balance_factors, scaled_weight, weight_channel_max
from amct_pipeline.quant.layers import QuantLayer
from amct_pipeline.runtime.ort import run_model

HIDDEN = 16


def outlier_model() -> onnx.ModelProto:
    """Conv 3x3 (4 -> 16) -> Relu -> Conv 3x3 (16 -> 8) -> Gemm-free output; two of the 16 hidden
    channels are 40x and 25x larger than the rest (the outliers a per-tensor range serves badly)."""
    rng = np.random.default_rng(0)
    gains = np.ones(HIDDEN, np.float32)
    gains[[3, 11]] = [40.0, 25.0]
    w1 = rng.normal(0, 0.3, (HIDDEN, 4, 3, 3)).astype(np.float32) * gains[:, None, None, None]
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(rng.normal(0.2, 0.1, HIDDEN).astype(np.float32) * gains, "b1"),
             # the next layer reads the outliers with small weights, so every channel matters about equally
             numpy_helper.from_array(rng.normal(0, 0.2, (8, HIDDEN, 3, 3)).astype(np.float32)
                                     / gains[None, :, None, None], "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"], name="relu"),
             helper.make_node("Conv", ["a1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _data(count: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (count, 4, 8, 8)).astype(np.float32)


def _sqnr(reference: np.ndarray, other: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((reference - other) ** 2)))


def _pipeline(dmq: dict | None, extra: list | None = None) -> dict:
    passes = [{"pass": "match_layers"}]
    if dmq is not None:
        passes.append({"pass": "dmq_balance", "options": dmq})
    passes += [{"pass": "calibrate", "options": {"algorithm": "minmax", "dataset": "calib"}},
               {"pass": "quantize_weights"}, {"pass": "lower", "options": {"targets": ["fakequant", "qdq"]}}]
    return {"schema_version": 1, "name": "dmq-test", "datasets": {"calib": {"reader": "npy", "batch_size": 8}},
            "passes": passes + (extra or [])}


def _run(session, tmp_path, dmq, extra=None, out=None):
    model = tmp_path / "outliers.onnx"
    onnx.save(outlier_model(), str(model))
    data = tmp_path / "calib.npy"
    np.save(data, _data())
    return session.build(_pipeline(dmq, extra)).run(model, datasets={"calib": str(data)},
                                                    output_dir=None if out is None else tmp_path / out)


def test_factors_follow_spec_formula_and_corner_cases():
    a, w = np.array([4.0, 1.0, 0.0, 2.0, 0.0]), np.array([1.0, 9.0, 2.0, 0.0, 0.0])
    f = balance_factors(a, w, 0.5)
    np.testing.assert_allclose(f[:2], [2.0, 1 / 3], rtol=1e-6)             # sqrt(a) / sqrt(w)
    np.testing.assert_allclose(f[2], max(1.0 * 2.0, 9.0 / 3) / 2.0, rtol=1e-6)     # activation zero
    np.testing.assert_allclose(f[3], 2.0 / max(4.0 / 2.0, 1.0 * 3), rtol=1e-6)     # weight zero
    assert f[4] == 1.0                                                       # both zero
    np.testing.assert_allclose(balance_factors(np.array([8.0]), np.array([2.0]), 0.8), [8 ** 0.8 / 2 ** 0.2], rtol=1e-6)


@pytest.mark.parametrize("op_type,shape,group", [("Conv", (6, 2, 3, 3), 2), ("Conv", (4, 1, 3, 3), 4),
                                                 ("ConvTranspose", (4, 3, 2, 2), 1), ("Gemm", (5, 4), 1),
                                                 ("MatMul", (4, 5), 1)])
def test_weight_folding_keeps_the_function(op_type, shape, group):
    """Scaling input channel j of W by f_j and dividing channel j of X by f_j changes nothing."""
    rng = np.random.default_rng(2)
    layer = QuantLayer("l", op_type, "x", "y", weight="w", group=group, transB=1 if op_type == "Gemm" else 0)
    w = rng.normal(0, 1, shape).astype(np.float32)
    cin = 4
    f = rng.uniform(0.2, 5, cin).astype(np.float32)
    x = rng.normal(0, 1, (2, cin, 5, 5) if op_type.startswith("Conv") else (3, cin)).astype(np.float32)
    xb = x / (f.reshape(1, -1, 1, 1) if x.ndim == 4 else f)

    def apply(weight, inp):
        node = {"Conv": helper.make_node("Conv", ["x", "w"], ["y"], group=group),
                "ConvTranspose": helper.make_node("ConvTranspose", ["x", "w"], ["y"]),
                "Gemm": helper.make_node("Gemm", ["x", "w"], ["y"], transB=1),
                "MatMul": helper.make_node("MatMul", ["x", "w"], ["y"])}[op_type]
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
        return run_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), {"x": inp})[0]
    np.testing.assert_allclose(apply(scaled_weight(layer, w, f), xb), apply(w, x), rtol=1e-4, atol=1e-5)
    assert weight_channel_max(layer, w).shape == (cin,)


def test_balancing_raises_output_sqnr_at_the_same_precision(session, tmp_path):
    x = _data(64, seed=7)                       # evaluation data, not the calibration data
    reference = run_model(outlier_model(), {"x": x})[0]
    plain = _run(session, tmp_path, None)
    balanced = _run(session, tmp_path, {"dataset": "calib", "migration_strength": 0.5})
    stats = balanced.stats_for("dmq_balance")
    assert stats["layers"] == 2
    factors = balanced.artifacts["balance_factors"]
    assert set(factors) == {"conv1", "conv2"} and factors["conv2"].shape == (HIDDEN,)
    assert factors["conv2"][3] > 3 * np.median(factors["conv2"])          # the outlier channels move most
    float_out = run_model(balanced.model, {"x": x})[0]                    # folding keeps the float function
    np.testing.assert_allclose(float_out, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    for target in ("fakequant", "qdq"):
        before = _sqnr(reference, run_model(plain.artifacts["lowered"][target], {"x": x})[0])
        after = _sqnr(reference, run_model(balanced.artifacts["lowered"][target], {"x": x})[0])
        assert after > before + 3.0, (target, before, after)
        assert (plain.artifacts["quant_record"]["conv2"].act_type
                == balanced.artifacts["quant_record"]["conv2"].act_type == "INT8")
    ops = [n.op_type for n in balanced.artifacts["lowered"]["fakequant"].graph.node]
    assert ops.count("Mul") >= 2


def test_record_round_trips_the_factors(session, tmp_path):
    first = _run(session, tmp_path, {}, extra=[{"pass": "export_amct"}], out="out")
    record = read_record(tmp_path / "out" / "record.txt")
    for name, f in first.artifacts["balance_factors"].items():
        np.testing.assert_array_equal(np.asarray(record[name].tensor_balance_factor, np.float32), f)
    load = {"schema_version": 1, "name": "load", "passes": [
        {"pass": "match_layers"}, {"pass": "load_record", "options": {"path": str(tmp_path / "out" / "record.txt")}},
        {"pass": "lower", "options": {"targets": ["fakequant", "qdq"]}}]}
    second = session.build(load).run(tmp_path / "outliers.onnx")
    assert second.stats_for("load_record")["balanced"] == 2
    for name, f in first.artifacts["balance_factors"].items():
        np.testing.assert_array_equal(second.artifacts["balance_factors"][name], f)
    for target in ("fakequant", "qdq"):
        a, b = first.artifacts["lowered"][target], second.artifacts["lowered"][target]
        assert a.graph.SerializeToString() == b.graph.SerializeToString(), target


def test_bad_options_are_one_line_errors(session, tmp_path):
    with pytest.raises(AmctError, match="migration_strength"):
        _run(session, tmp_path, {"migration_strength": 0.9})
    with pytest.raises(AmctError, match="'conv9' is not a matched layer.*conv"):
        _run(session, tmp_path, {"layers": ["conv9"]})
    record = tmp_path / "bad.txt"
    record.write_text('record {\n  key: "conv2"\n  value {\n    scale_d: 0.1\n    offset_d: 0\n    scale_w: 0.01\n'
                      '    tensor_balance_factor: 1.0\n    tensor_balance_factor: 2.0\n  }\n}\n')
    onnx.save(outlier_model(), str(tmp_path / "m.onnx"))
    load = {"schema_version": 1, "name": "load", "passes": [
        {"pass": "match_layers"}, {"pass": "load_record", "options": {"path": str(record)}}]}
    with pytest.raises(AmctError, match="conv2.*tensor_balance_factor.*2 values.*16 input channels"):
        session.build(load).run(tmp_path / "m.onnx")


def test_amct_config_dmq_balancer_param_selects_layers_and_strength(session, tmp_path):
    """AMCT's per-layer dmq_balancer_param: those layers only, each with its own strength."""
    import json

    from amct_pipeline.amct.quant_config import create_quant_config
    from amct_pipeline.quant.balance import balance_factors
    config = create_quant_config([("conv1", "Conv"), ("conv2", "Conv")])
    config["conv2"]["dmq_balancer_param"] = 0.3
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    model = tmp_path / "outliers.onnx"
    onnx.save(outlier_model(), str(model))
    data = tmp_path / "calib.npy"
    np.save(data, _data())
    pipeline = _pipeline({})
    pipeline["passes"][0] = {"pass": "match_layers", "options": {"amct_config": str(path)}}
    result = session.build(pipeline).run(model, datasets={"calib": str(data)})
    factors = result.artifacts["balance_factors"]
    assert list(factors) == ["conv2"]
    x = _data()[:8]                  # the config's batch_num (1) batch of 8, as calibration counts them
    a1 = run_model(_exposed(outlier_model(), "a1"), {"x": x})[1]
    w2 = numpy_helper.to_array(next(i for i in outlier_model().graph.initializer if i.name == "w2"))
    expected = balance_factors(np.abs(a1).max(axis=(0, 2, 3)), np.abs(w2).max(axis=(0, 2, 3)), 0.3)
    np.testing.assert_allclose(factors["conv2"], expected, rtol=1e-5)


def _exposed(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    from amct_pipeline.runtime.ort import expose_tensors
    return expose_tensors(model, [name])
