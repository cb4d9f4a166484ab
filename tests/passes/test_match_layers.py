"""match_layers: quantizable layers of SPEC 6.1, reasons for every refusal, skips and overrides."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from amct_pipeline.errors import ConfigError, PassError
from amct_pipeline.quant.layers import LayerMap, QuantLayer
from amct_pipeline.quant.weights import weight_values
from amct_pipeline.testing import models
from conftest import shared_path


def _layer_map(session, model, text: str = "match_layers") -> LayerMap:
    result = session.build(text).run(model)
    layer_map = result.artifacts["layer_map"]
    assert isinstance(layer_map, LayerMap)
    stats = result.stats_for("match_layers")
    assert stats["matched"] == len(layer_map) and stats["skipped"] == len(layer_map.skipped)
    return layer_map


# -- real models --------------------------------------------------------------------------------
def test_mobilenetv2_52_conv_and_a_matmul(session):
    layer_map = _layer_map(session, shared_path("models/mobilenetv2_fp32.onnx"))
    assert layer_map.by_type() == {"Conv": 52, "MatMul": 1}
    assert layer_map.skipped == {}
    depthwise = [layer for layer in layer_map.of_type("Conv") if layer.group > 1]
    assert depthwise and all(layer.group == layer.out_channels for layer in depthwise)
    (matmul,) = layer_map.of_type("MatMul")
    assert matmul.out_channels == 1000 and matmul.bias_add is not None and matmul.channel_axis is None


def test_mnist8_matmul_weight_through_reshape_with_bias_add(session):
    path = shared_path("models/mnist-8.onnx")
    layer_map = _layer_map(session, path)
    assert layer_map.by_type() == {"Conv": 2, "MatMul": 1}
    matmul = layer_map["Times212"]
    assert (matmul.bias, matmul.bias_add) == ("Parameter194", "Plus214")
    assert (matmul.weight_source, matmul.weight_via) == ("Parameter193", ("Times212_reshape1",))
    assert matmul.out_channels == 10
    conv = layer_map["Convolution28"]
    assert (conv.weight, conv.channel_axis, conv.out_channels, conv.bias) == ("Parameter5", 0, 8, None)
    # the weight as the MatMul sees it: the [16,4,4,10] initializer reshaped to [256,10]
    from amct_pipeline.ir import load_graph
    graph = load_graph(path)
    raw = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}["Parameter193"]
    np.testing.assert_array_equal(weight_values(graph, matmul), raw.reshape(256, 10))


def test_resnet8_conv_gemm_avgpool(session):
    layer_map = _layer_map(session, shared_path("models/resnet8_cifar10_bn.onnx"))
    assert layer_map.by_type() == {"Conv": 9, "Gemm": 1, "AveragePool": 1}
    gemm = layer_map["dense"]
    assert (gemm.transB, gemm.out_channels, gemm.bias, gemm.channel_axis) == (1, 10, "dense.bias", None)
    pool = layer_map["average_pooling2d"]
    assert (pool.weight, pool.input, pool.output) == (None, "activation_6", "average_pooling2d")
    assert list(layer_map)[0] == "conv2d" and list(layer_map)[-1] == "dense"      # graph order


def test_after_fuse_bn_layers_are_the_same(session):
    path = shared_path("models/resnet8_cifar10_bn.onnx")
    before = _layer_map(session, path)
    after = _layer_map(session, path, "fuse_bn,match_layers")
    assert list(before) == list(after)
    assert all(layer.bias is not None for layer in after.of_type("Conv"))


# -- constraints on a model with one of each ----------------------------------------------------
def test_constraints_and_reasons(session):
    layer_map = _layer_map(session, models.quant_layers_model())
    assert list(layer_map) == ["conv", "deconv", "pool", "conv3d", "fc", "mm"]
    assert layer_map.skipped == {
        "conv_shared_a": "shared weight 'shared.w' (also used by 'conv_shared_b')",
        "conv_shared_b": "shared weight 'shared.w' (also used by 'conv_shared_a')",
        "deconv_dil": "dilations=[2, 2] (ConvTranspose needs dilation 1)",
        "conv3d_dil": "Conv3D dilation_d=2 (must be 1)",
        "fc_ta": "transA=1 (must be 0)",
        "mm_dyn": "weight is not constant",
    }
    deconv = layer_map["deconv"]
    assert (deconv.channel_axis, deconv.out_channels) == (1, 2)
    assert layer_map["conv"].bias == "conv.b" and layer_map["conv3d"].out_channels == 2
    mm = layer_map["mm"]
    assert (mm.bias, mm.bias_add, mm.weight_source) == ("mm.bias", "mm_bias", "mm.w_raw")


def test_pass_does_not_modify_the_graph(session):
    model = models.quant_layers_model()
    result = session.build("match_layers").run(model)
    # loading may reorder nodes topologically; the pass itself adds, removes and renames nothing
    assert sorted(n.name for n in result.model.graph.node) == sorted(n.name for n in model.graph.node)
    assert sorted(t.name for t in result.model.graph.initializer) == sorted(t.name for t in model.graph.initializer)


def test_quant_layer_is_frozen(session):
    layer = _layer_map(session, models.conv_bn())["conv"]
    assert isinstance(layer, QuantLayer)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.name = "other"  # type: ignore[misc]


# -- skips and overrides ------------------------------------------------------------------------
def test_skip_layers_types_and_include(session):
    model = models.quant_layers_model()
    layer_map = _layer_map(session, model, "match_layers{skip_layers=[conv] skip_layer_types=[Gemm] "
                                           "include_op_types=[Conv,Gemm,MatMul,AveragePool]}")
    assert list(layer_map) == ["pool", "conv3d", "mm"]
    assert layer_map.skipped["conv"] == "in skip_layers"
    assert layer_map.skipped["fc"] == "op type in skip_layer_types"
    assert layer_map.skipped["deconv"] == "op type not in include_op_types"


def test_overrides_merge_in_order_last_wins(session):
    text = ("match_layers{overrides=["
            "{match={op_type=Conv} options={calibrate={algorithm=ifmr num_bits=8}}} "
            "{match={name=conv} options={calibrate={algorithm=hfmg}}} "
            "{match={name_regex=\"conv3.*\"} skip=true} "
            "{match={name=conv3d} skip=false}]}")
    layer_map = _layer_map(session, models.quant_layers_model(), text)
    assert layer_map["conv"].options == {"calibrate": {"algorithm": "hfmg", "num_bits": 8}}
    assert layer_map["conv3d"].options == {"calibrate": {"algorithm": "ifmr", "num_bits": 8}}
    assert layer_map["fc"].options == {}
    assert "conv3d" in layer_map                                   # un-skipped by the last override
    assert layer_map.skipped["conv3d_dil"] == "skipped by overrides[2]"


def test_unknown_skip_layer_is_an_error_with_suggestion(session):
    with pytest.raises(PassError) as info:
        session.build("match_layers{skip_layers=[convv]}").run(models.quant_layers_model())
    cause = info.value.__cause__
    assert isinstance(cause, ConfigError)
    assert "skip_layers" in str(cause) and "no layer named 'convv'" in str(cause)
    assert "did you mean 'conv'" in str(cause) and "\n" not in str(cause)


def test_unknown_override_name_is_an_error(session):
    with pytest.raises(PassError, match=r"overrides\[0\]\.match\.name.*no layer named 'fcc'.*did you mean 'fc'"):
        session.build("match_layers{overrides=[{match={name=fcc} skip=true}]}").run(models.quant_layers_model())


def test_non_quantizable_name_is_an_error(session):
    with pytest.raises(PassError, match="'flatten' is a Reshape, not a quantizable layer"):
        session.build("match_layers{skip_layers=[flatten]}").run(models.quant_layers_model())


@pytest.mark.parametrize("text, message", [
    ("match_layers{include_op_types=[Relu]}", "not a quantizable op type"),
    ("match_layers{skip_layer_types=[Conv2D]}", "did you mean 'Conv'"),
    ("match_layers{overrides=[{match={name=a op_type=Conv}}]}", "exactly one"),
    ("match_layers{overrides=[{match={}}]}", "exactly one"),
    ("match_layers{overrides=[{match={name_regex=\"(\"}}]}", "not a regular expression"),
    ("match_layers{overrides=[{match={name_regex=\"(a+)+b\"}}]}", "repeats a repetition"),
    ("match_layers{overrides=[{match={name_regex=\"(?:x|y*)*z\"}}]}", "repeats a repetition"),
    ("match_layers{overrides=[{match={name_regex=\"%s\"}}]}" % ("a" * 1001), "at most 1000"),
    ("match_layers{amct_confg=x.json}", "did you mean .amct_config."),
])
def test_bad_options_fail_at_build(session, text, message):
    with pytest.raises(ConfigError, match=message):
        session.build(text)
