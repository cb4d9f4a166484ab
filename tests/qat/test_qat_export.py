"""The trainable QAT export (``lower`` target ``qat``) and its round trip through ``convert_qat``.

A user trains the exported QDQ model in a framework (straight-through rounding); here training is
stood in for by editing its initializers, which is all a framework changes.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

PRECISIONS = {"w8a8": {}, "mixed": {"conv1": {"act": 16}, "conv2": {"wts": 4}}}


def run_ort(model: onnx.ModelProto, x: np.ndarray, level: str = "all") -> list[np.ndarray]:
    from amct_pipeline.runtime.ort import make_session
    session = make_session(model, optimize=level != "none")
    return session.run(None, {session.get_inputs()[0].name: x})


def export(session, tmp_path, precision):
    from amct_pipeline.demo import build_demo_data, build_demo_model
    path, data = tmp_path / "demo.onnx", tmp_path / "demo.npy"
    onnx.save(build_demo_model(), str(path))
    np.save(data, build_demo_data(32))
    pipeline = {"schema_version": 1, "name": "qat-export", "datasets": {"calib": {"reader": "npy", "batch_size": 8}},
                "passes": [{"pass": "fuse_bn"}, {"pass": "match_layers", "options": {"precision": precision}},
                           {"pass": "calibrate", "options": {"algorithm": "ifmr"}}, {"pass": "quantize_weights"},
                           {"pass": "lower", "options": {"targets": ["fakequant", "qat"]}}]}
    result = session.build(pipeline).run(path, datasets={"calib": str(data)}, output_dir=tmp_path / "out")
    return result, np.load(data)[:16]


def convert(session, model: onnx.ModelProto):
    pipeline = {"schema_version": 1, "name": "convert", "passes": [
        {"pass": "convert_qat"}, {"pass": "lower", "options": {"targets": ["fakequant", "ascend"]}}]}
    return session.build(pipeline).run(model)


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


@pytest.mark.parametrize("name", sorted(PRECISIONS))
def test_qat_model_is_trainable_qdq_and_converts_back(session, tmp_path, name):
    result, x = export(session, tmp_path, PRECISIONS[name])
    qat, fake = result.artifacts["lowered"]["qat"], result.artifacts["lowered"]["fakequant"]
    assert (tmp_path / "out" / "demo_qat_model.onnx").is_file()
    inits = initializers(qat)
    # trainable: every weight is a float initializer read by a QuantizeLinear; every factor an initializer
    quantizers = [n for n in qat.graph.node if n.op_type == "QuantizeLinear"]
    weights = [inits[n.input[0]] for n in quantizers if n.input[0] in inits]
    assert len(weights) == len(result.artifacts["quant_record"])
    assert all(w.data_type == onnx.TensorProto.FLOAT for w in weights)
    assert all(n.input[1] in inits and n.input[2] in inits for n in quantizers)
    # untrained, it computes the fake-quant model up to the biases' INT32 rounding
    (q,), (f,) = run_ort(qat, x), run_ort(fake, x, level="none")
    assert float(np.abs(q - f).max()) <= 0.02 * float(np.abs(f).max())
    # convert_qat gives back the record and the fake-quant model exactly
    back = convert(session, qat)
    assert back.artifacts["quant_record"] == result.artifacts["quant_record"]
    (f2,) = run_ort(back.artifacts["lowered"]["fakequant"], x, level="none")
    np.testing.assert_array_equal(f2, f)


def test_trained_parameters_reach_the_record(session, tmp_path):
    result, x = export(session, tmp_path, PRECISIONS["mixed"])
    qat = result.artifacts["lowered"]["qat"]
    inits = initializers(qat)
    nodes = {n.name: n for n in qat.graph.node}
    act_scale = inits[nodes["conv1.input_QuantizeLinear"].input[1]]
    weight_q = next(n for n in qat.graph.node if n.op_type == "QuantizeLinear" and n.input[0].startswith("conv2"))
    weight, weight_scale = inits[weight_q.input[0]], inits[weight_q.input[1]]
    # a "training step": the activation clip grows 10%, the weights move
    new_scale = (numpy_helper.to_array(act_scale) * np.float32(1.1)).astype(np.float32)
    rng = np.random.default_rng(0)
    w = numpy_helper.to_array(weight)
    new_w = (w + rng.normal(0, 0.01, w.shape)).astype(np.float32)
    act_scale.CopyFrom(numpy_helper.from_array(new_scale, act_scale.name))
    weight.CopyFrom(numpy_helper.from_array(new_w, weight.name))
    back = convert(session, qat)
    record = back.artifacts["quant_record"]
    assert np.float32(record["conv1"].scale_d) == new_scale and record["conv1"].act_type == "INT16"
    s = numpy_helper.to_array(weight_scale).astype(np.float32)
    codes = np.clip(np.rint(new_w / s.reshape(-1, 1, 1, 1)), -8, 7)
    np.testing.assert_array_equal(back.artifacts["weight_quant"]["conv2"].quantized, codes.astype(np.int8))
    assert record["conv2"].wts_type == "INT4"
    # the converted deploy model equals its fake-quant model
    from amct_pipeline.ascend.reference import run_deploy_model
    deploy, fake = back.artifacts["lowered"]["ascend"], back.artifacts["lowered"]["fakequant"]
    (f,) = run_ort(fake, x, level="none")
    d = run_deploy_model(deploy, {deploy.graph.input[0].name: x})[0]
    np.testing.assert_allclose(d, f, rtol=0, atol=1e-5 * float(np.abs(f).max()))
