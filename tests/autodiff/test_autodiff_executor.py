"""Executor and Program behaviour: parameters, fake-quant insertion, memory bookkeeping, determinism, errors."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.autodiff import ULQ, AdaRound, ARQRetrain, AutodiffError, Executor, LSQWeight, Program
from amct_pipeline.autodiff import Adam, mse
from amct_pipeline.ir.graph import load_graph
from amct_pipeline.quant.math import arq
from amct_pipeline.runtime.ort import make_session
from conftest import shared_path

RNG = np.random.default_rng(3)


def small_cnn() -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv(depthwise) -> Clip -> GlobalAveragePool -> Flatten -> Gemm (fixed weights)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((8, 1, 3, 3)).astype(np.float32) * 0.3
    wf = rng.standard_normal((4, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", group=8, pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="clip2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w1", w1), ("b1", np.zeros(8, np.float32) + 0.1), ("w2", w2), ("lo", np.array(0, np.float32)),
        ("hi", np.array(6, np.float32)), ("wf", wf), ("bf", np.zeros(4, np.float32))]]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def x_small():
    return RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)


def test_params_are_copies_and_gradients_have_their_shapes():
    model = small_cnn()
    graph = load_graph(model)
    program = Program.from_graph(graph)
    exe = Executor(program, params=["w1", "b1", "wf"])
    before = program.constants["w1"].copy()
    out = exe.forward({"x": x_small()})
    grads = exe.backward({"y": np.ones_like(out["y"])})
    assert set(grads) == {"w1", "b1", "wf"}
    assert all(grads[k].shape == exe.params[k].shape for k in grads)
    exe.params["w1"] -= 0.1 * grads["w1"]
    np.testing.assert_array_equal(program.constants["w1"], before)
    np.testing.assert_array_equal(graph.tensors()["w1"].values, before)


def test_unreached_parameter_gets_zeros_and_nodes_before_the_first_parameter_save_nothing():
    exe = Executor(small_cnn(), params=["wf"])
    exe.forward({"x": x_small()})
    recorded = [step.node.name for step, _ in exe._tape]
    assert recorded == ["fc"]                        # only the Gemm sees a parameter
    assert exe.saved_nbytes() == 2 * 8 * 4           # its input, [2, 8] float32
    exe.forward({"x": x_small()}, grad=False)
    assert exe.saved_nbytes() == 0
    with pytest.raises(AutodiffError, match="backward needs a forward"):
        exe.backward({"y": np.ones((2, 4), np.float32)})


def test_memory_is_bounded_by_what_backward_needs():
    """MobileNetV2 at batch 2: training only the classifier keeps kilobytes; training every conv keeps
    the convs' inputs, and no more than the activations of the whole forward."""
    path = shared_path("models/mobilenetv2_fp32.onnx")
    program = Program.from_graph(path)
    x = RNG.standard_normal((2, 3, 224, 224)).astype(np.float32)
    head = Executor(program, params=[next(n.inputs[1] for n in program.nodes if n.op_type == "MatMul")])
    head.forward({"input": x})
    assert head.saved_nbytes() < 64 * 1024
    convs = [n for n in program.nodes if n.op_type == "Conv"]
    exe = Executor(program, params=[n.inputs[1] for n in convs])
    exe.forward({"input": x})
    weights = sum(exe.params[n.inputs[1]].nbytes for n in convs)
    conv_inputs = Executor(program).forward({"input": x}, keep=[n.inputs[0] for n in convs], grad=False)
    activations = sum(v.nbytes for k, v in conv_inputs.items() if k not in program.outputs)
    assert activations < exe.saved_nbytes() <= activations + weights + activations // 4   # + Clip outputs/masks


def test_inserted_arq_retrain_weights_equal_the_arq_fake_quant_model_in_onnxruntime():
    model = small_cnn()
    program = Program.from_graph(model)
    for conv in ("conv1", "conv2"):
        weight = program.node(conv).inputs[1]
        program.insert(ARQRetrain(8, 0), [weight], consumers=[conv])
    exe = Executor(program, params=["w1", "w2"])
    x = x_small()
    got = exe.forward({"x": x})["y"]
    fake = onnx.ModelProto()
    fake.CopyFrom(model)
    for init in fake.graph.initializer:
        if init.name in ("w1", "w2"):
            w = numpy_helper.to_array(init)
            p = arq(w, 0, 8)
            init.CopyFrom(numpy_helper.from_array(p.quantized.astype(np.float32) * p.scale.reshape(-1, 1, 1, 1), init.name))
    ref = make_session(fake, optimize=False).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    grads = exe.backward({"y": np.ones_like(got)})
    assert np.abs(grads["w1"]).sum() > 0 and np.abs(grads["w2"]).sum() > 0


def test_insert_ulq_and_lsq_learnable_parameters_get_gradients():
    program = Program.from_graph(small_cnn())
    original = program.copy()
    cmax = program.add_constant("conv2.clip_max", np.float32(2.0))
    quantized = program.insert(ULQ(8, fixed_min=True), ["r1", cmax], consumers=["conv2"])
    scale = program.add_constant("conv1.scale_w", arq(program.constants["w1"], 0, 4).scale)
    program.insert(LSQWeight(4, 0), ["w1", scale], consumers=["conv1"])
    assert program.node("conv2").inputs[0] == quantized
    assert original.node("conv2").inputs[0] == "r1" and len(original.nodes) == len(program.nodes) - 2
    exe = Executor(program, params=[cmax, scale, "w1"])
    out = exe.forward({"x": x_small()})
    grads = exe.backward({"y": RNG.standard_normal(out["y"].shape).astype(np.float32)})
    assert grads[cmax].shape == () and grads[cmax] != 0
    assert grads[scale].shape == (8,) and np.abs(grads[scale]).min() > 0
    with pytest.raises(AutodiffError, match="do not read"):
        program.insert(ULQ(), ["r1", cmax, cmax], consumers=["fc"])


def test_same_inputs_give_byte_identical_outputs_and_gradients():
    results = []
    for _ in range(2):
        exe = Executor(small_cnn(), params=["w1", "w2", "wf"])
        out = exe.forward({"x": np.ones((2, 3, 8, 8), np.float32)})
        grads = exe.backward({"y": np.full((2, 4), 0.5, np.float32)})
        results.append([out["y"].tobytes()] + [grads[k].tobytes() for k in sorted(grads)])
    assert results[0] == results[1]


def test_errors_name_what_is_wrong():
    model = small_cnn()
    model.graph.node.append(helper.make_node("TopK", ["y", "k"], ["v", "i"], name="topk"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "k"))
    with pytest.raises(AutodiffError, match=r"node 'topk': operator TopK is not supported"):
        Program.from_graph(model)
    exe = Executor(small_cnn())
    with pytest.raises(AutodiffError, match=r"missing feed\(s\) \['x'\]"):
        exe.forward({})
    with pytest.raises(AutodiffError, match="parameter 'nope' is not a constant"):
        Executor(small_cnn(), params=["nope"])
    with pytest.raises(AutodiffError, match="need graph input 'x'"):
        Program.from_graph(small_cnn()).subprogram(["c2"], ["c1", "y"])
    with pytest.raises(AutodiffError, match="node 'conv1' \\(Conv\\) failed on input shapes"):
        exe.forward({"x": np.ones((2, 5, 8, 8), np.float32)})


def test_sub_graph_between_two_tensor_sets():
    model = small_cnn()
    full = Executor(model)
    x = x_small()
    kept = full.forward({"x": x}, keep=["r1", "r2"], grad=False)
    block = Executor(model, inputs=["r1"], outputs=["r2"], grad_inputs=["r1"])
    assert [n.name for n in block.nodes] == ["conv2", "clip2"]
    np.testing.assert_array_equal(block.forward({"r1": kept["r1"]})["r2"], kept["r2"])
    g = block.backward({"r2": np.ones_like(kept["r2"])})
    assert g["r1"].shape == kept["r1"].shape


def test_cut_points_and_blocks_of_a_small_cnn():
    program = Program.from_graph(small_cnn())
    assert program.cut_points() == ["x", "c1", "r1", "c2", "r2", "gap", "flat", "y"]
    assert program.blocks(1) == [(["x"], ["c1"]), (["c1"], ["c2"]), (["c2"], ["y"])]
    assert program.blocks(2) == [(["x"], ["y"])]          # the one-layer tail joins the last block


def test_mobilenet_blocks_chain_back_to_the_model():
    """Three-layer blocks (found from the graph alone) run one after another give the model's output."""
    program = Program.from_graph(shared_path("models/mobilenetv2_fp32.onnx"))
    blocks = program.blocks(3)
    assert len(blocks) == 17
    assert blocks[0][0] == program.inputs and blocks[-1][1] == program.outputs
    x = RNG.standard_normal((1, 3, 224, 224)).astype(np.float32)
    values = {program.inputs[0]: x}
    covered = set()
    for inputs, outputs in blocks:
        exe = Executor(program, inputs=inputs, outputs=outputs)
        covered.update(n.name for n in exe.program.nodes)
        values.update(exe.forward({t: values[t] for t in inputs}, grad=False))
    assert covered == {n.name for n in program.nodes}
    np.testing.assert_array_equal(values[program.outputs[0]], Executor(program).run({program.inputs[0]: x})[0])


def test_adam_minimises_a_quadratic_deterministically():
    target = np.arange(6, dtype=np.float64).reshape(2, 3)
    runs = []
    for _ in range(2):
        params = {"p": np.zeros((2, 3)), "q": np.array(5.0)}
        opt = Adam(params, lr={"p": 0.1, "q": 0.05})
        for _ in range(500):
            opt.step({"p": 2 * (params["p"] - target), "q": 2 * params["q"]})
        runs.append(params["p"].tobytes() + params["q"].tobytes())
        np.testing.assert_allclose(params["p"], target, atol=1e-3)
        assert abs(params["q"]) < 1e-2
    assert runs[0] == runs[1]
    loss, grad = mse(np.array([1.0, 3.0]), np.array([0.0, 1.0]))
    assert loss == 2.5 and grad.tolist() == [1.0, 2.0]


def test_adam_rate_per_channel_is_a_scalar_rate_per_slice():
    target = np.array([[1.0, -2.0], [30.0, 40.0]], np.float32)
    joint = {"w": np.zeros((2, 2), np.float32)}
    rows = [{"w": np.zeros(2, np.float32)} for _ in range(2)]
    rates = np.array([[0.01], [0.5]], np.float32)
    opts = [Adam(joint, lr={"w": rates})] + [Adam(r, lr=float(rates[i, 0])) for i, r in enumerate(rows)]
    for _ in range(50):
        opts[0].step({"w": 2 * (joint["w"] - target)})
        for i, r in enumerate(rows):
            opts[i + 1].step({"w": 2 * (r["w"] - target[i])})
    assert np.array_equal(joint["w"], np.stack([r["w"] for r in rows]))
    assert abs(joint["w"][0, 0]) < 0.6 < abs(joint["w"][1, 0])          # each row at its own speed


def test_adaround_training_beats_round_to_nearest_at_4_bits():
    """End to end on a conv layer: AdaRound (SPEC 4.8) inserted with Program.insert(replaces=...), trained
    with Adam against the float outputs, then hard-rounded, has a lower output error than ARQ's RTN."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")]),
        opset_imports=[helper.make_opsetid("", 13)])
    mix = rng.standard_normal((16, 16)) + 2.0                   # correlated channels, smooth in space:
    x = np.einsum("oc,nchw->nohw", mix, rng.standard_normal((64, 16, 6, 6))) / 4   # where rounding to
    x = ((x + np.roll(x, 1, axis=3) + np.roll(x, 1, axis=2)) / 3).astype(np.float32)  # nearest is not best
    target = Executor(model).run({"x": x})[0]
    p = arq(w, 0, 4)
    rtn = p.quantized.astype(np.float32) * p.scale.reshape(-1, 1, 1, 1)
    program = Program.from_graph(model)
    op = AdaRound(w, p.scale, 4, 0)
    alpha = program.add_constant("conv.alpha", op.init_alpha().astype(np.float32))
    program.insert(op, [alpha], replaces="w", consumers=["conv"])
    exe = Executor(program, params=[alpha])
    opt = Adam(exe.params, lr=0.05)
    steps = 150
    for step in range(steps):
        batch = slice((step * 16) % 64, (step * 16) % 64 + 16)
        out = exe.forward({"x": x[batch]})["y"]
        _, g = mse(out, target[batch])
        grads = exe.backward({"y": g * (out.size / out.shape[0])})     # per-sample squared error
        if step >= steps // 5:                    # warm start, then the rounding regulariser, beta 20 -> 2
            beta = 20 - 18 * (step - steps // 5) / (steps - steps // 5)
            grads[alpha] = grads[alpha] + 0.1 * op.regularizer(exe.params[alpha], beta)[1]
        opt.step(grads)
    op.hard = True
    ada_error = mse(exe.run({"x": x})[0], target)[0]
    rtn_error = mse(Executor(model, params={"w": rtn}).run({"x": x})[0], target)[0]
    codes = op.codes(exe.params[alpha])
    assert np.abs(codes - p.quantized).max() <= 1          # only the rounding direction is learned
    assert ada_error < 0.6 * rtn_error, (ada_error, rtn_error)         # measured: 0.43x


def test_engine_imports_respect_the_layering():
    """autodiff/ sits at the runtime level: numpy, onnx and the ir / quant / options / errors packages only."""
    import ast
    from pathlib import Path

    import amct_pipeline.autodiff as autodiff
    allowed_internal = {"ir", "quant", "options", "errors"}
    for path in Path(autodiff.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                assert (node.module or "").split(".")[0] in allowed_internal, (path.name, node.module)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in {"__future__", "typing", "dataclasses", "pathlib", "numpy",
                                                     "onnx", "itertools", "math"}, (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in {"math", "itertools", "numpy", "onnx"} for a in node.names), path.name
