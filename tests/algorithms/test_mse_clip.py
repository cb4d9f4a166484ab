"""mse_clip weight quantizer: a lower squared weight error than ARQ on heavy tails; exact on a narrow grid; through onnxruntime, a model whose weights lie on a narrow INT8 grid keeps its
float outputs with mse_clip weights and not with ARQ's."""
from __future__ import annotations

import numpy as np
import pytest

from amct_pipeline.algorithms.weights import ArqQuantizer, MseClipQuantizer
from amct_pipeline.options import parse_options


def _quantizer(cls, **options):
    parsed, problems = parse_options(cls.Options, options)
    assert not problems
    return cls(parsed)


def _error(params, weight):
    scale = params.scale.reshape((-1,) + (1,) * (weight.ndim - 1)) if params.scale.size > 1 else params.scale
    return float(((params.quantized * scale - weight) ** 2).sum())


@pytest.mark.parametrize("axis", [0, None])
def test_heavy_tails_are_clipped_for_a_lower_error_than_arq(axis):
    rng = np.random.default_rng(0)
    w = rng.laplace(0, 0.05, (8, 64, 3, 3)).astype(np.float32)      # heavy tails: clipping pays
    op = "Conv" if axis is not None else "Gemm"
    weight = w if axis is not None else w.reshape(8, -1)
    arq = _quantizer(ArqQuantizer, channel_wise=axis is not None).quantize(weight, op_type=op, channel_axis=axis)
    mse = _quantizer(MseClipQuantizer, channel_wise=axis is not None).quantize(weight, op_type=op, channel_axis=axis)
    assert mse.quantized.dtype == arq.quantized.dtype and mse.scale.shape == arq.scale.shape
    assert _error(mse, weight) < _error(arq, weight)
    if axis is not None:
        assert np.all(mse.scale <= arq.scale * 128 / 127 * (1 + 1e-6)) and np.any(mse.scale < arq.scale)


def test_a_narrow_grid_comes_back_exactly():
    """Channels that are exact multiples of maxabs / 127 (an INT8 model's weights) whose negative
    extreme dominates: ARQ's 128 rule re-rounds them, mse_clip keeps them."""
    rng = np.random.default_rng(1)
    codes = rng.integers(-126, 127, (6, 5)).astype(np.float32)
    codes[:, 0] = -127
    scale = rng.uniform(0.001, 0.01, (6, 1)).astype(np.float32)
    w = codes * scale
    arq = _quantizer(ArqQuantizer).quantize(w, op_type="Conv", channel_axis=0)
    mse = _quantizer(MseClipQuantizer).quantize(w, op_type="Conv", channel_axis=0)
    assert _error(arq, w) > 0
    np.testing.assert_allclose(mse.quantized * mse.scale[:, None], w, rtol=1e-6, atol=0)


def test_options_are_bounded():
    _, problems = parse_options(MseClipQuantizer.Options, {"steps": 10_000})
    assert problems
    _, problems = parse_options(MseClipQuantizer.Options, {"min_ratio": 0})
    assert problems


def test_narrow_grid_model_through_onnxruntime(session):
    """A conv model exported from INT8 weights: with mse_clip the fake-quant weights equal the float
    ones, so (activations not quantized) onnxruntime gives the float outputs; ARQ's do not."""
    from onnx import TensorProto, helper, numpy_helper
    from amct_pipeline.quant.emulate import build_eval_model
    from amct_pipeline.runtime.data import ArraySource
    from amct_pipeline.pipeline.spec import DatasetSpec
    from amct_pipeline.runtime.ort import run_model
    rng = np.random.default_rng(2)
    codes = rng.integers(-126, 127, (8, 3, 3, 3)).astype(np.float32)
    codes[:, 0, 0, 0] = -127
    w = codes * rng.uniform(0.002, 0.02, (8, 1, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(8, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    source = ArraySource("calib", {"x": x}, DatasetSpec(batch_size=4), "test")
    reference = run_model(model, {"x": x})[0]
    errors = {}
    for algorithm in ("arq", "mse_clip"):
        result = session.build(f"match_layers,quantize_weights{{algorithm={algorithm}}}", datasets=["calib"]).run(
            model, datasets={"calib": source})
        emulated = build_eval_model(result.graph, result.artifacts["layer_map"], result.artifacts["weight_quant"], [])
        errors[algorithm] = float(np.abs(run_model(emulated, {"x": x})[0] - reference).max())
    assert errors["mse_clip"] < 1e-5 * np.abs(reference).max() < errors["arq"]
