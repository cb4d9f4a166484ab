"""``amct-pipeline verify-deploy`` and ``verify_deploy``: deploy model (CPU reference) vs fake-quant model
(onnxruntime, no graph optimisation), per output in absolute terms and in quantization steps."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.ascend import AscendError, pack_deq_scale
from amct_pipeline.ascend.verify import output_steps, verify_deploy
from amct_pipeline.cli.main import main
from amct_pipeline.errors import DataError
from conftest import shared_path


def _inputs(name: str, count: int, offset: int = 0) -> np.ndarray:
    if name.startswith("resnet8"):
        data = np.load(shared_path("data/cifar_like212_32_uint8.npz"))["images_nchw_float_0_255"]
        return data[offset:offset + count].astype(np.float32)
    data = np.load(shared_path("data/mnist_test10k_uint8.npz"))["images_uint8"]
    return data[offset:offset + count, None].astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """resnet8 and mnist-8 through `amct-pipeline run ptq_int8_ascend` (calibrated on 8 images)."""
    out = {}
    for name in ("resnet8_cifar10_bn", "mnist-8"):
        tmp = tmp_path_factory.mktemp(name)
        np.save(tmp / "calib.npy", _inputs(name, 8))
        np.save(tmp / "check.npy", _inputs(name, 4, offset=8))
        rc = main(["run", "ptq_int8_ascend", "--model", str(shared_path(f"models/{name}.onnx")),
                   "--data", f"calib={tmp / 'calib.npy'}", "-o", str(tmp / "out"), "-q"])
        assert rc == 0
        out[name] = (tmp / "out" / f"{name}_deploy_model.onnx", tmp / "out" / f"{name}_fake_quant_model.onnx",
                     tmp / "check.npy", tmp)
    return out


def test_cli_reports_agreement(built, capsys):
    deploy, fake, data, _ = built["resnet8_cifar10_bn"]
    rc = main(["verify-deploy", str(deploy), str(fake), "--data", str(data), "--batches", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "output 'probs'" in out and "ok: every output within one quantization step" in out
    assert "4 samples in 1 batches" in out


def test_cli_json_and_fixed_batch_model(built, capsys):
    deploy, fake, data, _ = built["mnist-8"]          # input fixed to batch 1: 4 batches of 1
    rc = main(["verify-deploy", str(deploy), str(fake), "--data", str(data), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"] and report["batches"] == 4 and report["samples"] == 4
    (output,) = report["outputs"]
    assert output["name"] == "Plus214_Output_0" and output["step_source"] == "AscendDequant 'Times212.dequant'"
    assert output["max_abs"] == 0.0 and output["max_steps"] == 0.0
    rc = main(["verify-deploy", str(deploy), str(fake), "--data", f"Input3={data}", "--batches", "2",
               "--quant-convention", "cann", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["batches"] == 2 and report["quant_convention"] == "cann"


def test_cli_fails_on_a_wrong_deploy_model(built, capsys, tmp_path):
    """A deploy model whose last dequant scale is off by 1 % is more than one step away: exit 1."""
    deploy, fake, data, _ = built["resnet8_cifar10_bn"]
    model = onnx.load(str(deploy))
    for tensor in model.graph.initializer:
        if tensor.name == "dense.dequant.param":
            from amct_pipeline.ascend import unpack_deq_scale
            deq, _, _ = unpack_deq_scale(numpy_helper.to_array(tensor))
            tensor.CopyFrom(numpy_helper.from_array(pack_deq_scale(deq * np.float32(1.01)), tensor.name))
    model.graph.output.append(helper.make_tensor_value_info("dense_logits", TensorProto.FLOAT, None))
    bad = tmp_path / "bad_deploy_model.onnx"
    onnx.save(model, str(bad))
    fake_model = onnx.load(str(fake))
    fake_model.graph.output.append(helper.make_tensor_value_info("dense_logits", TensorProto.FLOAT, None))
    onnx.save(fake_model, str(tmp_path / "fake.onnx"))
    rc = main(["verify-deploy", str(bad), str(tmp_path / "fake.onnx"), "--data", str(data)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL output 'dense_logits'" in out and "AscendDequant 'dense.dequant'" in out
    assert out.strip().endswith("FAIL: some output differs by more than one quantization step")


def test_unknown_ascend_attribute_is_a_one_line_error(built, capsys, tmp_path):
    deploy, fake, data, _ = built["resnet8_cifar10_bn"]
    model = onnx.load(str(deploy))
    node = next(n for n in model.graph.node if n.name == "conv2d_1.quant")
    node.attribute.append(helper.make_attribute("foo", 1))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["verify-deploy", str(bad), str(fake), "--data", str(data)])
    captured = capsys.readouterr()
    assert rc == 1 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "unknown attribute 'foo' on AscendQuant node 'conv2d_1.quant'" in lines[0] and str(bad) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before        # nothing written
    with pytest.raises(AscendError, match="unknown attribute 'foo' on AscendQuant node 'conv2d_1.quant'"):
        verify_deploy(model, fake, [np.load(data)])


@pytest.mark.parametrize("args, message", [
    (["--data", "nothere.npy"], "nothere.npy does not exist"),
    (["--data", "wrong={data}"], "'wrong' is not a model input (input)"),
    (["--batch-size", "0"], None),
])
def test_cli_data_errors(built, capsys, args, message):
    deploy, fake, data, _ = built["resnet8_cifar10_bn"]
    args = [a.format(data=data) for a in args]
    if "--data" not in args:
        args += ["--data", str(data)]
    if message is None:                                       # argparse usage error
        with pytest.raises(SystemExit) as info:
            main(["verify-deploy", str(deploy), str(fake)] + args)
        assert info.value.code == 2
        return
    rc = main(["verify-deploy", str(deploy), str(fake)] + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and message in err[0]


def test_models_that_do_not_belong_together(built):
    deploy, _, data, _ = built["resnet8_cifar10_bn"]
    _, fake, _, _ = built["mnist-8"]
    with pytest.raises(DataError, match="the models do not match"):
        verify_deploy(deploy, fake, [np.load(data)])


def test_api_takes_arrays_or_mappings(built):
    deploy, fake, data, _ = built["resnet8_cifar10_bn"]
    x = np.load(data)
    a = verify_deploy(str(deploy), str(fake), [x[:2], x[2:]])
    b = verify_deploy(onnx.load(str(deploy)), onnx.load(str(fake)), [{"input": x}], max_batches=1)
    assert a.ok and b.ok and a.batches == 2 and b.batches == 1 and a.samples == b.samples == 4
    assert a.outputs[0].max_abs == b.outputs[0].max_abs
    with pytest.raises(DataError, match="no data"):
        verify_deploy(deploy, fake, [])


def test_output_steps():
    """Direct AscendDequant: per channel; through a Reshape: its largest scale; else the largest step."""
    deq = np.array([0.5, 0.25, 0.125], np.float32)
    init = [numpy_helper.from_array(np.ones((3, 2, 1, 1), np.int8), "w"),
            numpy_helper.from_array(pack_deq_scale(deq), "c.dequant.param"),
            numpy_helper.from_array(np.array([0, -1], np.int64), "shape")]
    nodes = [helper.make_node("AscendQuant", ["x"], ["q"], name="c.quant", scale=4.0, offset=0.0),
             helper.make_node("Conv", ["q", "w"], ["acc"], name="c"),
             helper.make_node("AscendDequant", ["acc", "c.dequant.param"], ["y"], name="c.dequant", dtype=0),
             helper.make_node("Reshape", ["y", "shape"], ["flat"], name="r"),
             helper.make_node("Softmax", ["flat"], ["p"], name="s")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "flat", "p")],
                              init)
    steps = output_steps(helper.make_model(graph))
    assert steps["y"][0].tolist() == deq.tolist() and steps["y"][1] is True
    assert steps["flat"][0].tolist() == [0.5] and steps["flat"][1] is False
    assert steps["flat"][2] == steps["y"][2] == "AscendDequant 'c.dequant'"
    assert steps["p"][0].tolist() == [0.5] and steps["p"][2] == "largest step of the model"
