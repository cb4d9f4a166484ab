"""The engine on every shared model: forward equal to onnxruntime on real samples, and gradients of
whole models and blocks against finite differences (float64)."""
from __future__ import annotations

import numpy as np
import pytest

from amct_pipeline.autodiff import AutodiffError, Executor, Program
from amct_pipeline.runtime.ort import make_session
from conftest import shared_path

FWD_RTOL = 1e-5       # max |engine - onnxruntime| / max |onnxruntime|, float32


def _imagenet(n):
    images = np.load(shared_path("data/imagenet_dev250_224_uint8.npz"))["images_nhwc_uint8"][:n]
    return images.astype(np.float32)


def mobilenet_input():
    x = _imagenet(3) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return [x.transpose(0, 3, 1, 2).astype(np.float32)]


def super_resolution_input():
    rgb = _imagenet(2)
    y = (rgb @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0
    return [y[:, None].astype(np.float32)]


def resnet8_input():
    return [np.load(shared_path("data/cifar_like212_32_uint8.npz"))["images_nchw_float_0_255"][:4].astype(np.float32)]


def mnist_input():
    images = np.load(shared_path("data/mnist_test10k_uint8.npz"))["images_uint8"][:3].astype(np.float32)
    return [im[None, None] for im in images]


def ultraface_input():
    return [x[None] for x in np.load(shared_path("data/faces24_240x320_f32.npz"))["x"][:2]]


def digits_input():
    return [x[None] for x in np.load(shared_path("data/digits_test_split.npz"))["x"][:3]]


MODELS = {
    "mobilenetv2_fp32.onnx": mobilenet_input,
    "resnet8_cifar10_bn.onnx": resnet8_input,
    "ultraface_rfb320_bn.onnx": ultraface_input,
    "super_resolution_op15.onnx": super_resolution_input,
    "mnist-8.onnx": mnist_input,
    "digits_cnn_bn.onnx": digits_input,
    "digits_cnn_bn_opset18.onnx": digits_input,
}


def forward_error(model: str) -> float:
    path = shared_path(f"models/{model}")
    exe = Executor(path)
    session = make_session(path, optimize=False)
    worst = 0.0
    for x in MODELS[model]():
        feeds = {exe.program.inputs[0]: x}
        ref = session.run(None, feeds)
        got = exe.run(feeds)
        for r, g in zip(ref, got):
            assert r.shape == g.shape
            worst = max(worst, float(np.abs(r - g).max() / np.abs(r).max()))
    return worst


@pytest.mark.parametrize("model", sorted(MODELS))
def test_forward_matches_onnxruntime_on_real_samples(model):
    assert forward_error(model) <= FWD_RTOL


def directional_check(exe: Executor, feeds, names, outputs=None, directions=2, seed=0, rtol=1e-6):
    """<grad, v> against (L(p + eps v) - L(p - eps v)) / 2 eps for random v, per parameter / grad input."""
    rng = np.random.default_rng(seed)
    out = exe.forward(feeds, outputs=outputs)
    cot = {k: rng.standard_normal(v.shape) for k, v in out.items()}
    grads = exe.backward(cot)

    def loss(name, value):
        if name in exe.params:
            saved, exe.params[name] = exe.params[name], value
            result = exe.forward(feeds, outputs=outputs, grad=False)
            exe.params[name] = saved
        else:
            result = exe.forward({**feeds, name: value}, outputs=outputs, grad=False)
        return sum(float(np.sum(cot[k] * result[k])) for k in cot)

    eps = 1e-7      # real blocks have ~1e5 Relu/Clip inputs: a larger step crosses kinks
    for name in names:
        base = exe.params[name] if name in exe.params else feeds[name]
        for _ in range(directions):
            v = rng.standard_normal(base.shape)
            numeric = (loss(name, base + eps * v) - loss(name, base - eps * v)) / (2 * eps)
            analytic = float(np.sum(grads[name] * v))
            assert abs(numeric - analytic) <= rtol * (abs(numeric) + 1e-3), (name, numeric, analytic)


def test_digits_cnn_gradients_of_every_initializer():
    program = Program.from_graph(shared_path("models/digits_cnn_bn.onnx"))
    params = sorted(program.constants)
    exe = Executor(program, params=params, grad_inputs=program.inputs, dtype=np.float64)
    x = digits_input()[0].astype(np.float64)
    directional_check(exe, {program.inputs[0]: x}, params + program.inputs)


def test_mnist8_gradients_through_a_weight_view_chain():
    """mnist-8's MatMul weight reaches the layer through Reshape: training it keeps the Reshape node."""
    program = Program.from_graph(shared_path("models/mnist-8.onnx"))
    weights = [n.inputs[1] for n in program.nodes if n.op_type == "Conv"] + ["Parameter193"]
    exe = Executor(program, params=weights, grad_inputs=program.inputs, dtype=np.float64)
    assert "Parameter193" in [t for n in exe.nodes for t in n.inputs]
    x = mnist_input()[0].astype(np.float64) / 255
    x += np.random.default_rng(1).uniform(0, 0.1, x.shape)     # the blank background ties every MaxPool window
    directional_check(exe, {program.inputs[0]: x}, weights + program.inputs)


def _is_block_input(program, tensor, output) -> bool:
    try:
        program.subprogram([tensor], [output])
    except AutodiffError:
        return False
    return True


def test_mobilenet_residual_block_runs_alone_and_its_gradients_check():
    program = Program.from_graph(shared_path("models/mobilenetv2_fp32.onnx"))
    add = next(n for n in program.nodes if n.op_type == "Add")
    skip = next(t for t in add.inputs if _is_block_input(program, t, add.outputs[0]))
    full = Executor(program)
    x = mobilenet_input()[0][:1]
    ref = full.forward({program.inputs[0]: x}, outputs=[add.outputs[0]], keep=[skip], grad=False)
    block = Executor(program, inputs=[skip], outputs=[add.outputs[0]])
    assert [n.op_type for n in block.nodes] == ["Conv", "Clip", "Conv", "Clip", "Conv", "Add"]
    np.testing.assert_array_equal(block.run({skip: ref[skip]})[0], ref[add.outputs[0]])
    weights = [t for n in block.nodes if n.op_type == "Conv" for t in n.inputs[1:]]
    exe = Executor(program, params=weights, inputs=[skip], outputs=[add.outputs[0]], grad_inputs=[skip],
                   dtype=np.float64)
    directional_check(exe, {skip: ref[skip].astype(np.float64)}, weights + [skip], directions=1)


def test_ultraface_box_decoding_gradients():
    """Heads -> Transpose, runtime Shape/Gather/Unsqueeze/Concat -> Reshape, Softmax, Slice, Exp, Mul, Div..."""
    program = Program.from_graph(shared_path("models/ultraface_rfb320_bn.onnx"))
    heads = [n.inputs[0] for n in program.nodes if n.op_type == "Transpose"]
    full = Executor(program)
    kept = full.forward({program.inputs[0]: ultraface_input()[0]}, keep=heads, grad=False)
    exe = Executor(program, inputs=heads, grad_inputs=heads, dtype=np.float64)
    assert {"Shape", "Gather", "Slice", "Exp", "Softmax"} <= set(n.op_type for n in exe.nodes)
    directional_check(exe, {h: kept[h].astype(np.float64) for h in heads}, heads, directions=1)


def test_engine_runs_the_lowered_fake_quant_model_like_onnxruntime(session, tmp_path):
    """The AMCT fake-quant model of the ptq_int8 preset (Mul / Round / Add / Clip / Sub chains, integer
    weights, Mul dequant) runs in the engine as in onnxruntime: what a retrained model is checked with."""
    x = resnet8_input()[0]
    data = tmp_path / "calib.npy"
    np.save(data, np.concatenate([x] * 4))
    result = session.build("ptq_int8").run(shared_path("models/resnet8_cifar10_bn.onnx"), datasets={"calib": str(data)})
    fake = result.artifacts["lowered"]["fakequant"]
    ref = make_session(fake, optimize=False).run(None, {fake.graph.input[0].name: x})
    exe = Executor(fake)
    assert {"Round", "Clip", "Sub"} <= set(n.op_type for n in exe.nodes)
    got = exe.run({exe.program.inputs[0]: x})
    for r, g in zip(ref, got):
        assert np.abs(r - g).max() <= 1e-4 * np.abs(r).max()
