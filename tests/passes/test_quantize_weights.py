"""quantize_weights + ARQ: SPEC 4.3 formulas, per-channel rules, per-layer overrides, clear errors."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from amct_pipeline.algorithms.weights import ArqQuantizer
from amct_pipeline.quant.weights import deconv_channel_view, deconv_from_channel_view
from amct_pipeline.errors import ConfigError, PassError
from amct_pipeline.testing import models
from conftest import shared_path


def spec_arq(w: np.ndarray, rows_first: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """SPEC 4.2/4.3 written out: rows = output channels; scale = max(|max|,|min|) / (2^(b-1)-1 [+1])."""
    rows = rows_first.reshape(rows_first.shape[0], -1).astype(np.float64)
    hi, lo = np.maximum(rows.max(1), 0), np.minimum(rows.min(1), 0)
    scope = np.where(np.abs(hi) < np.abs(lo), 2 ** (bits - 1), 2 ** (bits - 1) - 1)
    scale = (np.maximum(np.abs(hi), np.abs(lo)) / scope).astype(np.float32)
    return scale, scope


def _weights(session, model, text: str = "match_layers,quantize_weights"):
    result = session.build(text).run(model)
    return result, result.artifacts["weight_quant"]


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_conv_per_channel_matches_spec(session):
    model = models.conv_bn(bias=True)
    result, weights = _weights(session, model)
    w = _init(model, "conv.weight")
    params = weights["conv"]
    scale, _ = spec_arq(w, w)
    np.testing.assert_array_equal(params.scale, scale)
    codes = np.clip(np.rint(w / scale[:, None, None, None]), -128, 127)
    np.testing.assert_array_equal(params.quantized, codes)
    assert params.quantized.dtype == np.int8 and params.num_bits == 8
    assert result.stats_for("quantize_weights") == {"layers": 1, "per_channel": 1, "weightless": 0}


def test_128_denominator_when_the_negative_extreme_dominates():
    w = np.array([[[[-1.0, 0.5]]], [[[0.25, -0.1]]]], np.float32)      # row 0: |min| > |max|
    params = ArqQuantizer().quantize(w, op_type="Conv", channel_axis=0)
    np.testing.assert_array_equal(params.scale, np.float32([1.0 / 128, 0.25 / 127]))
    assert params.quantized[0].ravel().tolist() == [-128, 64]
    assert params.quantized[1].ravel().tolist() == [127, -51]


def test_per_tensor_when_channel_wise_false(session):
    model = models.conv_bn()
    _, weights = _weights(session, model, "match_layers,quantize_weights{algorithm_options={channel_wise=false}}")
    w = _init(model, "conv.weight")
    assert weights["conv"].scale.shape == (1,)
    assert weights["conv"].scale[0] == np.float32(np.abs(w).max() / (128 if -w.min() > w.max() else 127))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_per_tensor_with_trans_b(session, trans_b):
    model = models.gemm_bn(trans_b=trans_b)
    result, weights = _weights(session, model)
    (name,) = weights
    layer = result.artifacts["layer_map"][name]
    w = _init(model, layer.weight)
    params = weights[name]
    assert params.scale.shape == (1,) and params.quantized.shape == w.shape
    assert params.scale[0] == np.float32(np.abs(w).max() / (128 if -w.min() > w.max() else 127))
    np.testing.assert_array_equal(params.quantized, np.clip(np.rint(w / params.scale[0]), -128, 127))


def test_gemm_alpha_is_folded_into_the_weight(session):
    model = models.gemm_bn(alpha=0.5)
    _, weights = _weights(session, model, "match_layers,quantize_weights")
    (name, params), = weights.items()
    layer_weight = next(t for t in model.graph.initializer if t.name.endswith("weight") or t.name.endswith(".w"))
    w = numpy_helper.to_array(layer_weight) * np.float32(0.5)
    assert params.scale[0] == np.float32(np.abs(w).max() / (128 if -w.min() > w.max() else 127))


def test_conv_transpose_groups_scale_output_channels():
    """SPEC 4.3: ConvTranspose channels are Cout = (Cout/group) x group, on axis 1 per group."""
    rng = np.random.default_rng(0)
    group, cin, per_group = 2, 4, 3
    w = rng.normal(0, 1, (cin, per_group, 2, 2)).astype(np.float32)
    params = ArqQuantizer().quantize(w, op_type="ConvTranspose", channel_axis=1, group=group)
    assert params.scale.shape == (group * per_group,) and params.quantized.shape == w.shape
    for o in range(group * per_group):
        g, j = divmod(o, per_group)
        block = w[g * cin // group:(g + 1) * cin // group, j]
        scale, _ = spec_arq(block, block.reshape(1, -1))
        assert params.scale[o] == scale[0]
        np.testing.assert_array_equal(params.quantized[g * 2:(g + 1) * 2, j],
                                      np.clip(np.rint(block / scale[0]), -128, 127))
    view = deconv_channel_view(w, group)
    np.testing.assert_array_equal(deconv_from_channel_view(view, group), w)


def test_conv_transpose_through_the_pass(session):
    model = models.conv_transpose_bn(group=2)
    _, weights = _weights(session, model, "fuse_bn,match_layers,quantize_weights")
    assert weights["deconv"].scale.shape == (6,)


@pytest.mark.parametrize("bits", [6, 7])
def test_low_bits_conv_clip_range_stored_as_int8(session, bits):
    model = models.conv_bn()
    _, weights = _weights(session, model, f"match_layers,quantize_weights{{algorithm_options={{num_bits={bits}}}}}")
    w = _init(model, "conv.weight")
    params = weights["conv"]
    half = 2 ** (bits - 1)
    scale, _ = spec_arq(w, w, bits)
    np.testing.assert_array_equal(params.scale, scale)
    assert params.quantized.dtype == np.int8 and params.num_bits == bits
    assert params.quantized.min() >= -half and params.quantized.max() <= half - 1


def test_per_layer_override_from_match_layers(session):
    model = models.quant_layers_model()
    text = ("match_layers{overrides=[{match={name=conv} options={quantize_weights={channel_wise=false}}} "
            "{match={name=conv3d} options={quantize_weights={algorithm=arq algorithm_options={num_bits=7}}}}]},"
            "quantize_weights")
    result, weights = _weights(session, model, text)
    assert weights["conv"].scale.shape == (1,)
    assert weights["conv3d"].num_bits == 7
    assert weights["deconv"].scale.shape == (2,) and weights["fc"].scale.shape == (1,)
    assert weights["pool"].scale.tolist() == [1.0] and weights["pool"].quantized.size == 0
    settings = result.artifacts["quant_settings"]
    assert settings["conv"]["wts"] == {"algo": "arq", "num_bits": 8, "channel_wise": False}
    assert settings["fc"]["wts"]["channel_wise"] is False and "pool" not in settings


def test_channel_wise_on_gemm_layer_is_an_error_naming_it(session):
    text = "match_layers{overrides=[{match={name=fc} options={quantize_weights={channel_wise=true}}}]},quantize_weights"
    with pytest.raises(PassError) as info:
        session.build(text).run(models.quant_layers_model())
    message = str(info.value)
    assert "layer 'fc'" in message and "channel_wise" in message and "Gemm" in message


def test_pass_wide_channel_wise_keeps_gemm_per_tensor(session):
    _, weights = _weights(session, models.quant_layers_model(),
                          "match_layers,quantize_weights{algorithm_options={channel_wise=true}}")
    assert weights["fc"].scale.shape == (1,) and weights["conv"].scale.shape == (4,)


def test_low_bits_on_gemm_is_an_error_naming_it(session):
    with pytest.raises(PassError) as info:
        session.build("match_layers{include_op_types=[Gemm]},quantize_weights{algorithm_options={num_bits=6}}").run(
            models.quant_layers_model())
    assert "layer 'fc'" in str(info.value) and "6-bit" in str(info.value)


def test_bad_options_fail_at_build(session):
    with pytest.raises(ConfigError) as info:
        session.build("match_layers,quantize_weights{algorithm=arc}")
    assert "unknown weight quantizer 'arc'" in str(info.value) and "did you mean 'arq'" in str(info.value)
    with pytest.raises(ConfigError, match="num_bits"):
        session.build("match_layers,quantize_weights{algorithm_options={num_bits=5}}")
    with pytest.raises(ConfigError, match="chanel_wise"):
        session.build("match_layers,quantize_weights{algorithm_options={chanel_wise=true}}")


def test_unknown_per_layer_algorithm_names_the_layer(session):
    text = "match_layers{overrides=[{match={name=conv} options={quantize_weights={algorithm=ada}}}]},quantize_weights"
    with pytest.raises(PassError) as info:
        session.build(text).run(models.quant_layers_model())
    assert "layer 'conv'" in str(info.value) and "unknown weight quantizer 'ada'" in str(info.value)


def test_graph_is_not_modified(session):
    model = models.quant_layers_model()
    result = session.build("match_layers,quantize_weights").run(model)
    assert result.stats_for("quantize_weights")["layers"] == 5
    untouched = session.build("match_layers").run(model).model
    assert result.model.graph.SerializeToString() == untouched.graph.SerializeToString()


def test_weight_through_view_ops(session):
    """mnist-8's MatMul weight is Reshape(Parameter193): quantized as the layer sees it, [256, 10]."""
    path = shared_path("models/mnist-8.onnx")
    result, weights = _weights(session, path)
    assert weights["Times212"].quantized.shape == (256, 10) and weights["Times212"].scale.shape == (1,)
    assert weights["Convolution28"].scale.shape == (8,)


def test_mobilenetv2_weights_on_their_int8_grid(session):
    """The zoo model's weights were dequantized from int8 per channel: ARQ recovers scales close to the
    originals, so codes reproduce the weights to within half a step."""
    path = shared_path("models/mobilenetv2_fp32.onnx")
    result, weights = _weights(session, path)
    assert result.stats_for("quantize_weights") == {"layers": 53, "per_channel": 52, "weightless": 0}
    from amct_pipeline.quant.weights import weight_values
    layer = result.artifacts["layer_map"].of_type("Conv")[3]
    w = weight_values(result.graph, layer)
    params = weights[layer.name]
    error = np.abs(params.quantized * params.scale.reshape(-1, 1, 1, 1) - w)
    assert (error <= params.scale.reshape(-1, 1, 1, 1) / 2 * 1.0001).all()
