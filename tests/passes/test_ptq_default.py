"""The shipped PTQ pipelines: ptq_int8 (equalization, per-sample ranges, bias correction) and
ptq_int8_amct (AMCT's IFMR + ARQ flow, unchanged), and the model-output rule of block calibration."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.testing import models
from test_lower import demo_model_and_data, run_ort


def _sqnr(reference: np.ndarray, got: np.ndarray) -> float:
    reference, got = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - got) ** 2), 1e-30)))


def test_ptq_int8_amct_is_the_ifmr_flow(session, tmp_path):
    """ptq_int8_amct gives exactly the record factors of calibrate{ifmr} + arq (AMCT users' numbers)."""
    model, data = demo_model_and_data(tmp_path, 32)
    amct = session.build("ptq_int8_amct", datasets=["calib"]).run(str(model), datasets={"calib": str(data)},
                                                                  output_dir=tmp_path / "amct")
    plain = session.build("fuse_bn,match_layers,calibrate{algorithm=ifmr},quantize_weights{algorithm=arq}",
                          datasets=["calib"]).run(str(model), datasets={"calib": str(data)})
    assert amct.artifacts["act_quant"] == plain.artifacts["act_quant"]
    for name, params in plain.artifacts["weight_quant"].items():
        np.testing.assert_array_equal(amct.artifacts["weight_quant"][name].quantized, params.quantized)


def test_ptq_int8_default_runs_the_new_steps_and_stays_close_to_float(session, tmp_path):
    """The default equalizes, calibrates per-sample quantiles and corrects biases; its QDQ model
    tracks the float model on held-out data (both pipelines; on this small demo net IFMR's wider
    ranges are the better choice, on the real models of benchmarks/ptq.py the default is)."""
    model, data = demo_model_and_data(tmp_path, 64)
    x = np.load(data)
    np.save(tmp_path / "calib.npy", x[:32])
    held_out = x[32:]
    got = {}
    for name in ("ptq_int8", "ptq_int8_amct"):
        result = session.build(name, datasets=["calib"]).run(str(model), datasets={"calib": str(tmp_path / "calib.npy")},
                                                             output_dir=tmp_path / name)
        qdq = onnx.load(str(tmp_path / name / "demo_qdq_model.onnx"))
        got[name] = (_sqnr(run_ort(onnx.load(str(model)), held_out)[0], run_ort(qdq, held_out)[0]), result)
    stats = {label: stats for label, stats in got["ptq_int8"][1].stats}
    assert stats["calibrate"]["algorithm"] == "sample_quantile"
    assert stats["quantize_weights"]["bias_corrected"] > 0
    assert "equalize_channels" in stats
    assert got["ptq_int8"][0] >= 30.0 and got["ptq_int8_amct"][0] >= 30.0


@pytest.mark.parametrize("tail", ["Flatten", "Softmax"])
def test_model_outputs_keep_their_whole_range(session, tail):
    """The last quantized tensor (nothing quantized downstream: a conv output read by a Flatten or a
    Softmax producing the graph output) is calibrated with its whole range (minmax), every other
    block output with the pass's calibrator."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.4, (4, 8, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["b"], name="c2"),
             helper.make_node("Flatten", ["b"], ["f"], name="flat"),
             helper.make_node(tail, ["f"], ["y"], name="tail", **({"axis": 1} if tail == "Softmax" else {}))]
    model = models.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    x = rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    feeds = [{"x": x[i:i + 8]} for i in range(0, 32, 8)]
    result = session.build("match_layers,calibrate{algorithm=mean_minmax block_outputs=true}",
                           datasets=["calib"]).run(model, datasets={"calib": feeds})
    blocks = result.artifacts["tensor_quant"]
    y = run_ort(model, x)[0] if tail == "Flatten" else _conv_outputs(model, x)
    assert "b" in blocks
    step = blocks["b"].scale            # the integer zero point moves the ends by up to a step
    assert blocks["b"].clip_max >= y.max() - step and blocks["b"].clip_min <= y.min() + step
    per_sample = np.mean(y.reshape(len(y), -1).max(axis=1))
    assert per_sample < y.max() - 2 * step      # what mean_minmax would have clipped to
    assert result.stats_for("calibrate")["block_outputs"] == len(blocks)


def _conv_outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The values of tensor 'b' (the conv before the tail op)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output[0].name = "f"
    return run_ort(exposed, x)[0]
