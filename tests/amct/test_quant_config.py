"""AMCT JSON quant config: creation, writing, reading and AMCT's validation rules."""
from __future__ import annotations

import copy
import json

import pytest

from amct_pipeline.amct.errors import ConfigFileError
from amct_pipeline.amct.quant_config import (
    LayerQuantConfig, QuantConfig, create_quant_config, parse_quant_config, read_quant_config, write_quant_config,
)

LAYERS = [("conv1", "Conv"), ("bn1", "BatchNormalization"), ("relu1", "Relu"), ("pool", "AveragePool"),
          ("fc", "Gemm"), ("mm", "MatMul"), ("deconv", "ConvTranspose")]
IFMR = {"num_bits": 8, "max_percentile": 0.999999, "min_percentile": 0.999999, "search_range": [0.7, 1.3],
        "search_step": 0.01, "act_algo": "ifmr", "asymmetric": True}


def wts(channel_wise: bool) -> dict:
    return {"num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": channel_wise}


def test_create_quant_config_lists_quantizable_layers_in_graph_order():
    cfg = create_quant_config(LAYERS, skip_layers=["mm"], batch_num=4)
    assert list(cfg) == ["version", "batch_num", "activation_offset", "do_fusion", "skip_fusion_layers",
                         "conv1", "pool", "fc", "mm", "deconv"]
    assert cfg["version"] == 1 and cfg["batch_num"] == 4 and cfg["activation_offset"] is True
    assert cfg["do_fusion"] is True and cfg["skip_fusion_layers"] == []
    assert cfg["conv1"] == {"quant_enable": True, "activation_quant_params": IFMR, "weight_quant_params": wts(True)}
    assert cfg["pool"] == {"quant_enable": True, "activation_quant_params": IFMR}
    assert cfg["fc"]["weight_quant_params"] == wts(False)
    assert cfg["mm"]["quant_enable"] is False and cfg["mm"]["weight_quant_params"] == wts(False)
    assert cfg["deconv"]["weight_quant_params"] == wts(True)
    assert list(cfg["conv1"]["activation_quant_params"]) == list(IFMR)


def test_create_with_symmetric_activations_spells_it_per_layer():
    cfg = create_quant_config(LAYERS, activation_offset=False)
    assert cfg["activation_offset"] is False
    assert {cfg[n]["activation_quant_params"]["asymmetric"] for n in ("conv1", "pool", "fc", "mm", "deconv")} == {False}


@pytest.mark.parametrize("kwargs, line", [
    ({"skip_layers": ["conv_1"]}, "create_quant_config: skip_layers[0]: unknown layer 'conv_1' (did you mean 'conv1'?)"),
    ({"skip_layers": ["relu1"]}, "create_quant_config: skip_layers[0]: layer 'relu1' is a Relu; only AveragePool, "
                                 "Conv, ConvTranspose, Gemm, MatMul layers are allowed here"),
    ({"skip_layers": ["fc", "fc"]}, "create_quant_config: skip_layers: layer 'fc' is listed 2 times; list it once"),
    ({"batch_num": 0}, "create_quant_config: batch_num: must be an integer > 0, got 0"),
    ({"skip_layers": ["conv1", "pool", "fc", "mm", "deconv"]},
     "create_quant_config: skip_layers: skips every quantizable layer; nothing would be quantized"),
])
def test_create_errors(kwargs, line):
    with pytest.raises(ConfigFileError) as info:
        create_quant_config(LAYERS, **kwargs)
    assert str(info.value) == line


def test_write_read_round_trip_is_byte_stable(tmp_path):
    path = tmp_path / "quant.json"
    write_quant_config(create_quant_config(LAYERS, skip_layers=["fc"]), path)
    text = path.read_text()
    assert text.startswith('{\n    "version":1,\n    "batch_num":1,\n')   # AMCT's separators
    cfg = read_quant_config(path, LAYERS)
    assert cfg.layers["fc"].quant_enable is False and cfg.enabled_layers() == ["conv1", "pool", "mm", "deconv"]
    write_quant_config(cfg, path)
    assert path.read_text() == text
    assert read_quant_config(path, LAYERS) == cfg


def test_parsed_layers_use_our_option_names():
    cfg = parse_quant_config(create_quant_config(LAYERS), LAYERS)
    assert cfg.layers["conv1"] == LayerQuantConfig(
        quant_enable=True, op_type="Conv", dmq_balancer=None,
        act={"algo": "ifmr", "num_bits": 8, "asymmetric": True, "max_percentile": 0.999999,
             "min_percentile": 0.999999, "search_range_start": 0.7, "search_range_end": 1.3, "search_step": 0.01},
        wts={"algo": "arq", "num_bits": 8, "channel_wise": True})
    assert cfg.layers["pool"].wts is None
    assert (cfg.version, cfg.batch_num, cfg.activation_offset, cfg.do_fusion) == (1, 1, True, True)


def test_asymmetric_resolves_per_layer_then_global():
    data = create_quant_config(LAYERS, activation_offset=False)
    del data["fc"]["activation_quant_params"]["asymmetric"]
    data["conv1"]["activation_quant_params"]["asymmetric"] = True
    cfg = parse_quant_config(data, LAYERS)
    assert cfg.layers["conv1"].act["asymmetric"] is True
    assert cfg.layers["fc"].act["asymmetric"] is False
    data["activation_offset"] = True
    assert parse_quant_config(data, LAYERS).layers["fc"].act["asymmetric"] is True


def test_hfmg_ada_dmq_and_tensor_quantize_are_read():
    data = create_quant_config(LAYERS)
    data["conv1"] = {"quant_enable": True, "dmq_balancer_param": 0.3,
                     "activation_quant_params": {"num_bits": 16, "act_algo": "hfmg", "num_of_bins": 8192},
                     "weight_quant_params": {"num_bits": 8, "wts_algo": "ada_quantize", "num_iteration": 50,
                                             "reg_param": 0.1, "beta_range": [10, 1], "warm_start": 0.3}}
    data["tensor_quantize"] = [{"layer_name": "relu1", "input_index": 0,
                                "activation_quant_params": {"act_algo": "hfmg", "num_of_bins": 1024}}]
    cfg = parse_quant_config(data, LAYERS)
    conv = cfg.layers["conv1"]
    assert conv.act == {"algo": "hfmg", "num_bits": 16, "asymmetric": True, "num_of_bins": 8192}
    assert conv.wts == {"algo": "ada", "num_bits": 8, "channel_wise": True, "num_iteration": 50, "reg_param": 0.1,
                        "beta_range_start": 10.0, "beta_range_end": 1.0, "warm_start": 0.3}
    assert conv.dmq_balancer == 0.3
    assert cfg.tensor_quantize[0].layer_name == "relu1" and cfg.tensor_quantize[0].act["num_of_bins"] == 1024
    assert parse_quant_config(cfg.to_json_dict(), LAYERS) == cfg


def test_without_layers_op_type_is_unknown():
    cfg = parse_quant_config({"conv1": {"quant_enable": True}})
    assert cfg.layers["conv1"].op_type is None
    assert cfg.layers["conv1"].wts == {"algo": "arq", "num_bits": 8, "channel_wise": None}


def _set(path: str, value):
    """Mutation: set a '/'-separated key path (value None deletes the key)."""
    def apply(data):
        *parents, last = path.split("/")
        node = data
        for key in parents:
            node = node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return apply


def _hfmg_with(bins):
    return _set("conv1/activation_quant_params", {"num_bits": 8, "act_algo": "hfmg", "num_of_bins": bins})


def _disable_all(data):
    for name in ("conv1", "pool", "fc", "mm", "deconv"):
        data[name]["quant_enable"] = False


ACT = "conv1.activation_quant_params"
RULES = {
    "version": (_set("version", 2), "version: must be 1 (the only AMCT config version), got 2"),
    "batch_num": (_set("batch_num", 0), "batch_num: must be > 0, got 0"),
    "batch_num type": (_set("batch_num", "1"), 'batch_num: must be an integer, got "1"'),
    "bool type": (_set("do_fusion", 1), "do_fusion: must be a boolean (true or false), got 1"),
    "max_percentile": (_set("conv1/activation_quant_params/max_percentile", 0.5),
                       f"{ACT}.max_percentile: must be in (0.5, 1], got 0.5"),
    "min_percentile": (_set("conv1/activation_quant_params/min_percentile", 1.01),
                       f"{ACT}.min_percentile: must be in (0.5, 1], got 1.01"),
    "search_range order": (_set("conv1/activation_quant_params/search_range", [1.3, 0.7]),
                           f"{ACT}.search_range: must satisfy 0 < start < end, got [1.3, 0.7]"),
    "search_range start": (_set("conv1/activation_quant_params/search_range", [0, 1.3]),
                           f"{ACT}.search_range: must satisfy 0 < start < end, got [0.0, 1.3]"),
    "search_range shape": (_set("conv1/activation_quant_params/search_range", [0.7]),
                           f"{ACT}.search_range: must be a list of two numbers [start, end], got [0.7]"),
    "search_step": (_set("conv1/activation_quant_params/search_step", 0.7),
                    f"{ACT}.search_step: must be in (0, 0.6], got 0.7"),
    "search_step zero": (_set("conv1/activation_quant_params/search_step", 0),
                         f"{ACT}.search_step: must be in (0, 0.6], got 0.0"),
    "act num_bits": (_set("conv1/activation_quant_params/num_bits", 6),
                     f"{ACT}.num_bits: must be one of 4, 8, 16, got 6"),
    "act int16 op": (_set("pool/activation_quant_params/num_bits", 16),
                     "pool.activation_quant_params.num_bits: 16-bit activations are not supported for AveragePool "
                     "layers (only Conv, ConvTranspose, Gemm); use 8"),
    "wts num_bits": (_set("conv1/weight_quant_params/num_bits", 5),
                     "conv1.weight_quant_params.num_bits: must be one of 4, 6, 7, 8, got 5"),
    "wts 7-bit op": (_set("fc/weight_quant_params/num_bits", 7),
                     "fc.weight_quant_params.num_bits: 7-bit weights are only supported for Conv layers, not Gemm"),
    "num_of_bins": (_hfmg_with(1000), f"{ACT}.num_of_bins: must be one of 1024, 2048, 4096, 8192, got 1000"),
    "dmq range": (_set("conv1/dmq_balancer_param", 0.9), "conv1.dmq_balancer_param: must be in [0.2, 0.8], got 0.9"),
    "dmq weightless": (_set("pool/dmq_balancer_param", 0.5),
                       "pool.dmq_balancer_param: AveragePool layers have no weights to balance; remove the DMQ setting"),
    "ifmr+hfmg": (_set("conv1/activation_quant_params/num_of_bins", 4096),
                  f"{ACT}: mixes IFMR keys (max_percentile, min_percentile, search_range, search_step) with HFMG keys "
                  "(num_of_bins); keep the keys of one act_algo"),
    "hfmg algo with ifmr key": (_set("conv1/activation_quant_params", {"act_algo": "hfmg", "search_step": 0.1}),
                                f"{ACT}.search_step: is an IFMR key but act_algo is 'hfmg'; remove it or set act_algo 'ifmr'"),
    "act_algo": (_set("conv1/activation_quant_params/act_algo", "kl"),
                 f"{ACT}.act_algo: must be one of \"ifmr\", \"hfmg\", got \"kl\""),
    "wts_algo": (_set("conv1/weight_quant_params/wts_algo", "arq"),
                 'conv1.weight_quant_params.wts_algo: must be one of "arq_quantize", "ada_quantize", got "arq" '
                 "(did you mean 'arq_quantize'?)"),
    "ada key with arq": (_set("conv1/weight_quant_params/warm_start", 0.2),
                         "conv1.weight_quant_params.warm_start: is an ADA key but wts_algo is 'arq_quantize'; "
                         "remove it or set 'ada_quantize'"),
    "channel_wise Gemm": (_set("fc/weight_quant_params/channel_wise", True),
                          "fc.weight_quant_params.channel_wise: must be false for Gemm layers "
                          "(only Conv, ConvTranspose support channel-wise weights)"),
    "channel_wise MatMul": (_set("mm/weight_quant_params/channel_wise", True),
                            "mm.weight_quant_params.channel_wise: must be false for MatMul layers "
                            "(only Conv, ConvTranspose support channel-wise weights)"),
    "channel_wise AveragePool": (_set("pool/weight_quant_params", {"channel_wise": True}),
                                 "pool.weight_quant_params.channel_wise: must be false for AveragePool layers "
                                 "(only Conv, ConvTranspose support channel-wise weights)"),
    "quant_enable type": (_set("conv1/quant_enable", "yes"),
                          'conv1.quant_enable: must be a boolean (true or false), got "yes"'),
    "unknown layer": (_set("conv_1", {"quant_enable": True}), "conv_1: unknown layer (did you mean 'conv1'?)"),
    "non-quantizable layer": (_set("relu1", {"quant_enable": True}),
                              "relu1: is a Relu layer, which cannot be quantized "
                              "(quantizable: Conv, ConvTranspose, Gemm, MatMul, AveragePool)"),
    "unknown layer key": (_set("conv1/quant_enabled", True),
                          "conv1.quant_enabled: unknown key (did you mean 'quant_enable'?)"),
    "unknown act key": (_set("conv1/activation_quant_params/serch_step", 0.1),
                        f"{ACT}.serch_step: unknown key (did you mean 'search_step'?)"),
    "unknown global key": (_set("batch_nm", 2),
                           "batch_nm: unknown key (did you mean 'batch_num'?); layer entries must be objects"),
    "skip_fusion unknown": (_set("skip_fusion_layers", ["conv2"]),
                            "skip_fusion_layers[0]: unknown layer 'conv2' (did you mean 'conv1'?)"),
    "skip_fusion type": (_set("skip_fusion_layers", ["fc"]),
                         "skip_fusion_layers[0]: layer 'fc' is a Gemm; only Conv layers are allowed here"),
    "fakequant mode": (_set("fakequant_precision_mode", "FP16"),
                       "fakequant_precision_mode: must be one of \"DEFAULT\", \"FORCE_FP16_QUANT\", got \"FP16\""),
    "nothing enabled": (_disable_all, "no layer has quant_enable true; nothing would be quantized"),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_validation_rule_gives_one_located_line(rule):
    mutate, expected = RULES[rule]
    data = create_quant_config(LAYERS)
    mutate(data)
    with pytest.raises(ConfigFileError) as info:
        parse_quant_config(data, LAYERS, source="quant.json")
    assert str(info.value) == f"quant.json: {expected}"


def test_all_problems_are_reported_together():
    data = create_quant_config(LAYERS)
    data["version"] = 3
    data["conv1"]["activation_quant_params"]["search_step"] = 0.7
    data["fc"]["weight_quant_params"]["channel_wise"] = True
    with pytest.raises(ConfigFileError) as info:
        parse_quant_config(data, LAYERS, source="quant.json")
    assert str(info.value).splitlines() == [
        "quant.json: version: must be 1 (the only AMCT config version), got 3",
        "quant.json: conv1.activation_quant_params.search_step: must be in (0, 0.6], got 0.7",
        "quant.json: fc.weight_quant_params.channel_wise: must be false for Gemm layers "
        "(only Conv, ConvTranspose support channel-wise weights)",
    ]
    assert [i.where for i in info.value.issues] == [
        "version", "conv1.activation_quant_params.search_step", "fc.weight_quant_params.channel_wise"]


def test_json_syntax_errors_and_repeated_keys(tmp_path):
    path = tmp_path / "quant.json"
    path.write_text('{\n  "version": 1,\n  "batch_num": 1,,\n}\n')
    with pytest.raises(ConfigFileError, match=r"quant.json:3:18: invalid JSON: Expecting property name"):
        read_quant_config(path)
    path.write_text('{"conv1": {"quant_enable": true}, "conv1": {"quant_enable": false}}')
    with pytest.raises(ConfigFileError, match=r"quant.json:1:35: key 'conv1' appears more than once \(first at line 1\); keep one$"):
        read_quant_config(path)


def test_write_refuses_invalid_config(tmp_path):
    data = create_quant_config(LAYERS)
    data["batch_num"] = -1
    with pytest.raises(ConfigFileError, match="batch_num: must be > 0, got -1"):
        write_quant_config(data, tmp_path / "quant.json")
    assert not (tmp_path / "quant.json").exists()


def test_quant_config_to_json_keeps_amct_key_order():
    cfg = QuantConfig(layers={"c": LayerQuantConfig(op_type="Conv")}, fakequant_precision_mode="FORCE_FP16_QUANT",
                      joint_quant=True)
    assert list(cfg.to_json_dict()) == ["version", "batch_num", "activation_offset", "joint_quant", "do_fusion",
                                        "fakequant_precision_mode", "skip_fusion_layers", "c"]
    assert json.loads(json.dumps(copy.deepcopy(cfg.to_json_dict())))["c"]["activation_quant_params"]["act_algo"] == "ifmr"
