"""Models the pipeline cannot fully handle get one located line (exit 1), never an internal error."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sec_helpers import conv_model, one_error, run_cli, save_model


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "c8.npy"
    np.save(path, np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    return path


def _ptq(capsys, model, data, out):
    return run_cli(capsys, "run", "ptq_int8", "--model", model, "--data", f"calib={data}", "-o", out, "-q")


def test_input_without_shape_or_type(capsys, tmp_path, data):
    model = conv_model()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    line = one_error(capsys, "run", "ptq_int8", "--model", save_model(model, tmp_path / "a.onnx"),
                     "--data", f"calib={data}", "-o", tmp_path / "out", "-q")
    assert "model input 'x' has no shape in the model" in line and "expects shape ()" not in line
    model = conv_model()
    model.graph.input[0].ClearField("type")
    line = one_error(capsys, "run", "ptq_int8", "--model", save_model(model, tmp_path / "b.onnx"),
                     "--data", f"calib={data}", "-o", tmp_path / "out", "-q")
    assert "model input 'x' has no element type" in line and "ONNXRuntimeError" not in line
    assert not (tmp_path / "out").exists()


def _branch(name: str, op: str, source: str) -> onnx.GraphProto:
    out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 16, 8, 8])
    return helper.make_graph([helper.make_node(op, [source], [f"{name}_out"], name=f"{name}_node")], name, [], [out])


def test_if_branches_reading_a_quantized_tensor(capsys, tmp_path, data):
    """Lowering rewires what a subgraph reads from outside: the If must then follow the new producer."""
    model = conv_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], name="if", then_branch=_branch("then", "Identity", "y"),
                                             else_branch=_branch("else", "Neg", "y")))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16, 8, 8]))
    onnx.checker.check_model(model)
    out = tmp_path / "out"
    code, err = _ptq(capsys, save_model(model, tmp_path / "if.onnx"), data, out)
    assert code == 0, err
    for name in ("if_fake_quant_model.onnx", "if_qdq_model.onnx"):
        session = ort.InferenceSession(str(out / name))
        assert session.run(None, {"x": np.ones((1, 3, 8, 8), np.float32)})[0].shape == (1, 16, 8, 8)


def test_layers_only_inside_a_loop_body(capsys, tmp_path, data):
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_id"),
         helper.make_node("Conv", ["v_in", "w"], ["v_out"], name="body_conv", pads=[1, 1, 1, 1])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 3, 8, 8])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "c0", "x"], ["z"], name="loop", body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 8, 8])],
        initializer=[numpy_helper.from_array(np.array(3, np.int64), "trip"),
                     numpy_helper.from_array(np.array(True), "c0"),
                     numpy_helper.from_array(np.full((3, 3, 3, 3), 0.1, np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    line = one_error(capsys, "run", "ptq_int8", "--model", save_model(model, tmp_path / "loop.onnx"),
                     "--data", f"calib={data}", "-o", tmp_path / "out", "-q")
    assert "body_conv (in Loop 'loop')" in line and "subgraphs are not quantized" in line
    assert ".amct-staging" not in line and not (tmp_path / "out").exists()


def test_nothing_quantized_is_one_line_without_staging_paths(capsys, tmp_path, data):
    line = one_error(capsys, "run", "match_layers{skip_layers=[conv]},calibrate,quantize_weights,lower,export_amct",
                     "--model", save_model(conv_model(), tmp_path / "m.onnx"), "--data", f"calib={data}",
                     "-o", tmp_path / "out", "-q")
    assert "no layer was quantized" in line and "in skip_layers" in line and ".amct-staging" not in line
    assert not (tmp_path / "out").exists()
