"""verify-deploy on a 2-layer transformer encoder (MatMul projections, LayerNormalization, Softmax, Gelu):
the float operators between quantized layers run in onnxruntime as in the fake-quant model, so float
rounding differences between implementations cannot flip a quantization code (issue 12, point 10)."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.ascend.verify import verify_deploy
from amct_pipeline.cli.main import main


def encoder_model(layers=2, d=32, t=16, heads=2, ffn=64, classes=10, seed=0, opset=20):
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32) if np.asarray(arr).dtype.kind == "f" else np.asarray(arr), name))
        return name
    def linear(prefix, x, din, dout):
        w = init(f"{prefix}.weight", rng.normal(0, 1 / np.sqrt(din), (din, dout)))
        b = init(f"{prefix}.bias", rng.normal(0, 0.02, dout))
        nodes.append(helper.make_node("MatMul", [x, w], [f"{prefix}.mm"], name=prefix))
        nodes.append(helper.make_node("Add", [f"{prefix}.mm", b], [f"{prefix}.out"], name=f"{prefix}.add"))
        return f"{prefix}.out"
    def layernorm(prefix, x):
        g = init(f"{prefix}.gamma", 1 + rng.normal(0, 0.05, d)); b = init(f"{prefix}.beta", rng.normal(0, 0.05, d))
        nodes.append(helper.make_node("LayerNormalization", [x, g, b], [f"{prefix}.out"], name=prefix, axis=-1, epsilon=1e-5))
        return f"{prefix}.out"
    hd = d // heads
    init("shape_heads", np.array([0, 0, heads, hd], np.int64))
    init("shape_merge", np.array([0, 0, d], np.int64))
    init("attn_scale", np.array(1 / np.sqrt(hd), np.float32))
    x = "input"
    for i in range(layers):
        p = f"layer{i}"
        h = layernorm(f"{p}.ln1", x)
        q, k, v = (linear(f"{p}.attn.{n}", h, d, d) for n in "qkv")
        def split(name, perm):
            nodes.append(helper.make_node("Reshape", [name, "shape_heads"], [f"{name}.r"]))
            nodes.append(helper.make_node("Transpose", [f"{name}.r"], [f"{name}.t"], perm=perm))
            return f"{name}.t"
        qh, kh, vh = split(q, [0, 2, 1, 3]), split(k, [0, 2, 3, 1]), split(v, [0, 2, 1, 3])
        nodes.append(helper.make_node("MatMul", [qh, kh], [f"{p}.scores"], name=f"{p}.attn.scores"))
        nodes.append(helper.make_node("Mul", [f"{p}.scores", "attn_scale"], [f"{p}.scaled"]))
        nodes.append(helper.make_node("Softmax", [f"{p}.scaled"], [f"{p}.probs"], axis=-1))
        nodes.append(helper.make_node("MatMul", [f"{p}.probs", vh], [f"{p}.ctx"], name=f"{p}.attn.context"))
        nodes.append(helper.make_node("Transpose", [f"{p}.ctx"], [f"{p}.ctx.t"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"{p}.ctx.t", "shape_merge"], [f"{p}.ctx.m"]))
        o = linear(f"{p}.attn.out", f"{p}.ctx.m", d, d)
        nodes.append(helper.make_node("Add", [x, o], [f"{p}.res1"]))
        h2 = layernorm(f"{p}.ln2", f"{p}.res1")
        f1 = linear(f"{p}.ffn.fc1", h2, d, ffn)
        nodes.append(helper.make_node("Gelu", [f1], [f"{p}.gelu"]))
        f2 = linear(f"{p}.ffn.fc2", f"{p}.gelu", ffn, d)
        nodes.append(helper.make_node("Add", [f"{p}.res1", f2], [f"{p}.out"]))
        x = f"{p}.out"
    h = layernorm("final_ln", x)
    nodes.append(helper.make_node("ReduceMean", [h, "axes_t"], ["pooled"], keepdims=0))
    init("axes_t", np.array([1], np.int64))
    logits = linear("classifier", "pooled", d, classes)
    nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    graph = helper.make_graph(nodes, "encoder", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", t, d])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def test_verify_deploy_passes_on_a_transformer_encoder(tmp_path, capsys):
    model = tmp_path / "enc.onnx"
    onnx.save(encoder_model(), str(model))
    rng = np.random.default_rng(1)
    np.save(tmp_path / "calib.npy", rng.normal(0, 1, (32, 16, 32)).astype(np.float32))
    # 512 samples: with the float operators in numpy, 10 logits of these differed by up to 153 steps
    np.save(tmp_path / "check.npy", np.random.default_rng(2).normal(0, 1, (512, 16, 32)).astype(np.float32))
    assert main(["run", "ptq_int8_ascend", "--model", str(model), "--data", f"calib={tmp_path / 'calib.npy'}",
                 "-o", str(tmp_path / "out"), "-q"]) == 0
    deploy, fake = tmp_path / "out" / "enc_deploy_model.onnx", tmp_path / "out" / "enc_fake_quant_model.onnx"
    ops = [n.op_type for n in onnx.load(str(deploy)).graph.node]
    assert ops.count("AscendDequant") == 13 and {"LayerNormalization", "Softmax", "Gelu"} <= set(ops)
    capsys.readouterr()
    code = main(["verify-deploy", str(deploy), str(fake), "--data", str(tmp_path / "check.npy"),
                 "--batch-size", "64", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and report["samples"] == 512
    assert report["outputs"][0]["mismatched"] == 0          # bit-identical, not merely within a step


def test_float_ops_in_onnxruntime_match_the_fake_quant_model_exactly(tmp_path):
    """The same check through the API on a model with a float (unquantized) layer in between."""
    model = tmp_path / "enc.onnx"
    onnx.save(encoder_model(layers=1, d=16, t=8, heads=2, ffn=32, seed=3), str(model))
    np.save(tmp_path / "calib.npy", np.random.default_rng(4).normal(0, 2, (16, 8, 16)).astype(np.float32))
    assert main(["run", "ptq_int8_ascend", "--model", str(model), "--data", f"calib={tmp_path / 'calib.npy'}",
                 "-o", str(tmp_path / "out"), "-q", "--set", "passes.match_layers.options.skip_layers=[layer0.ffn.fc1]"]) == 0
    data = np.random.default_rng(5).normal(0, 2, (128, 8, 16)).astype(np.float32)
    report = verify_deploy(tmp_path / "out" / "enc_deploy_model.onnx", tmp_path / "out" / "enc_fake_quant_model.onnx",
                           [data[i:i + 32] for i in range(0, 128, 32)])
    assert report.ok and report.max_abs == 0.0
