"""AMCT simplified .cfg (AMCTConfig) and retrain configs (JSON and AMCTRetrainConfig .cfg)."""
from __future__ import annotations

from importlib import resources

import pytest

from amct_pipeline.amct._proto import PROTO_FILES, message_class
from amct_pipeline.amct.cfg import parse_cfg, read_cfg
from amct_pipeline.amct.errors import ConfigFileError
from amct_pipeline.amct.quant_config import parse_quant_config
from amct_pipeline.amct.retrain_config import (
    LayerRetrainConfig, create_retrain_config, parse_retrain_cfg, parse_retrain_config, read_retrain_config,
    write_retrain_config,
)

LAYERS = [("conv1", "Conv"), ("bn1", "BatchNormalization"), ("conv2", "Conv"), ("pool", "AveragePool"),
          ("fc", "Gemm"), ("mm", "MatMul")]


def test_proto_files_ship_as_package_data():
    folder = resources.files("amct_pipeline.amct") / "proto"
    assert all((folder / name).is_file() for name in PROTO_FILES)


@pytest.mark.parametrize("message, fields", [
    ("AMCTConfig", {"batch_num": 1, "activation_offset": 2, "skip_layers": 10, "skip_layer_types": 11,
                    "fakequant_precision_mode": 21, "common_config": 50, "override_layer_types": 51,
                    "override_layer_configs": 100, "do_fusion": 200, "skip_fusion_layers": 201}),
    ("CalibrationConfig", {"arq_quantize": 13, "ada_quantize": 15, "ifmr_quantize": 100, "hfmg_quantize": 101,
                           "dmq_balancer": 200}),
    ("FMRQuantize", {"search_range_start": 1, "search_range_end": 2, "search_step": 3, "max_percentile": 4,
                     "min_percentile": 5, "asymmetric": 6, "dst_type": 10}),
    ("HFMGQuantize", {"num_of_bins": 1, "asymmetric": 2, "dst_type": 10}),
    ("ARQuantize", {"channel_wise": 1, "quant_bits": 10}),
    ("ADAquantize", {"num_iteration": 1, "reg_param": 2, "beta_range_start": 3, "beta_range_end": 4,
                     "warm_start": 5, "channel_wise": 10}),
    ("AMCTRetrainConfig", {"batch_num": 1, "retrain_data_quant_config": 2, "retrain_weight_quant_config": 3,
                           "skip_layers": 4, "override_layer_configs": 5, "skip_layer_types": 6,
                           "override_layer_types": 7, "prune_config": 8, "regular_prune_skip_layers": 9,
                           "regular_prune_skip_types": 10, "quant_skip_layers": 11, "quant_skip_types": 12,
                           "fakequant_precision_mode": 21}),
    ("ActULQquantize", {"clip_max_min": 1, "fixed_min": 2, "dst_type": 3}),
    ("ClipMaxMin", {"clip_max": 3, "clip_min": 5}),
])
def test_field_numbers_match_amct(message, fields):
    desc = message_class(f"AMCTPytorchProto.{message}").DESCRIPTOR
    assert {f.name: f.number for f in desc.fields if f.number < 1000} == fields


def test_defaults_come_from_the_proto():
    desc = message_class("AMCTPytorchProto.FMRQuantize").DESCRIPTOR
    assert round(desc.fields_by_name["search_range_end"].default_value, 6) == 1.3
    assert desc.fields_by_name["dst_type"].default_value == 1  # INT8


PRIORITY = """
activation_offset: false
common_config { ifmr_quantize { search_step: 0.02 asymmetric: true } arq_quantize { quant_bits: 7 } }
override_layer_types { layer_type: "Conv" calibration_config { ifmr_quantize { search_step: 0.03 } } }
override_layer_configs { layer_name: "conv1" calibration_config { ifmr_quantize { search_step: 0.04 } } }
override_layer_configs { layer_name: "mm" calibration_config { hfmg_quantize { num_of_bins: 2048 } } }
"""


@pytest.mark.parametrize("layer, step", [("conv1", 0.04), ("conv2", 0.03), ("fc", 0.02), ("pool", 0.02)])
def test_priority_layer_over_type_over_common(layer, step):
    assert parse_cfg(PRIORITY, LAYERS).layers[layer].act["search_step"] == step


def test_highest_priority_config_replaces_the_whole_calibration_config():
    layers = parse_cfg(PRIORITY, LAYERS).layers
    assert layers["conv1"].wts == {"algo": "arq", "num_bits": 8, "channel_wise": True}  # not common's 7 bits
    assert layers["fc"].wts == {"algo": "arq", "num_bits": 8, "channel_wise": False}     # 7 bits: Conv only
    assert layers["mm"].act == {"algo": "hfmg", "num_bits": 8, "asymmetric": False, "num_of_bins": 2048}


def test_asymmetric_falls_back_to_common_then_activation_offset():
    layers = parse_cfg(PRIORITY, LAYERS).layers
    assert layers["fc"].act["asymmetric"] is True      # common_config's own value
    assert layers["conv1"].act["asymmetric"] is True   # same algorithm as common_config: inherits it
    assert layers["mm"].act["asymmetric"] is False     # HFMG: common's IFMR value does not apply
    text = PRIORITY.replace("search_step: 0.04", "search_step: 0.04 asymmetric: false")
    assert parse_cfg(text, LAYERS).layers["conv1"].act["asymmetric"] is False
    assert parse_cfg("activation_offset: false", LAYERS).layers["conv1"].act["asymmetric"] is False


def test_globals_and_skips():
    cfg = parse_cfg('batch_num: 8 do_fusion: false skip_fusion_layers: "conv2" fakequant_precision_mode: FORCE_FP16_QUANT '
                    'skip_layers: "conv1" skip_layer_types: "MatMul"', LAYERS)
    assert (cfg.batch_num, cfg.do_fusion, cfg.skip_fusion_layers, cfg.fakequant_precision_mode) == \
        (8, False, ["conv2"], "FORCE_FP16_QUANT")
    assert list(cfg.layers) == ["conv1", "conv2", "pool", "fc", "mm"]
    assert {n: l.quant_enable for n, l in cfg.layers.items()} == \
        {"conv1": False, "conv2": True, "pool": True, "fc": True, "mm": False}
    assert cfg.layers["pool"].wts is None and cfg.layers["conv2"].act["asymmetric"] is True


def test_common_settings_are_adapted_to_each_op_type():
    cfg = parse_cfg("common_config { ifmr_quantize { dst_type: INT16 } arq_quantize { channel_wise: true } "
                    "dmq_balancer { migration_strength: 0.3 } }", LAYERS)
    bits = {n: l.act["num_bits"] for n, l in cfg.layers.items()}
    assert bits == {"conv1": 16, "conv2": 16, "pool": 8, "fc": 16, "mm": 8}
    assert cfg.layers["fc"].wts["channel_wise"] is False and cfg.layers["conv1"].wts["channel_wise"] is True
    assert cfg.layers["pool"].dmq_balancer is None and cfg.layers["fc"].dmq_balancer == 0.3


def test_last_oneof_member_wins():
    cfg = parse_cfg("common_config { ifmr_quantize { } hfmg_quantize { num_of_bins: 1024 } }", LAYERS)
    assert cfg.layers["conv1"].act["algo"] == "hfmg"


def test_spec_nuq_example_parses():
    text = ('activation_offset : true\nbatch_num : 1\nnuq_config {\n'
            '  mapping_file : "./src/nuq_conf/resnet-101_quantized.json"   # JSON dumped by ATC\n'
            '  nuq_quantize : { num_steps : 32   num_of_iteration : 1 }\n}\n')
    assert parse_cfg(text, LAYERS).nuq == {"mapping_file": "./src/nuq_conf/resnet-101_quantized.json",
                                           "num_steps": 32, "num_of_iteration": 1}


def test_cfg_result_matches_its_json_form(tmp_path):
    path = tmp_path / "quant.cfg"
    path.write_text(PRIORITY)
    cfg = read_cfg(path, LAYERS)
    assert cfg.source == str(path)
    assert parse_quant_config(cfg.to_json_dict(), LAYERS) == cfg


CFG_ERRORS = {
    "unknown skip layer": ('skip_layers: "conv_1"', "skip_layers[0]: unknown layer 'conv_1' (did you mean 'conv1'?)"),
    "skip non-quantizable": ('skip_layers: "bn1"', "skip_layers[0]: layer 'bn1' is a BatchNormalization; only "
                             "AveragePool, Conv, ConvTranspose, Gemm, MatMul layers are allowed here"),
    "unknown skip type": ('skip_layer_types: "Conv2d"', "skip_layer_types[0]: layer type 'Conv2d' cannot be "
                          "quantized (did you mean 'Conv'?)"),
    "unknown override layer": ('override_layer_configs { layer_name: "fcc" calibration_config { } }',
                               "override_layer_configs[0].layer_name: unknown layer 'fcc' (did you mean 'fc'?)"),
    "repeated override layer": ('override_layer_configs { layer_name: "fc" calibration_config { } } '
                                'override_layer_configs { layer_name: "fc" calibration_config { } }',
                                "override_layer_configs: layer 'fc' is listed 2 times; list it once"),
    "unknown override type": ('override_layer_types { layer_type: "Linear" calibration_config { } }',
                              "override_layer_types[0]: layer type 'Linear' cannot be quantized "
                              "(quantizable types: Conv, ConvTranspose, Gemm, MatMul, AveragePool)"),
    "repeated override type": ('override_layer_types { layer_type: "Gemm" calibration_config { } } '
                               'override_layer_types { layer_type: "Gemm" calibration_config { } }',
                               "override_layer_types: layer type 'Gemm' is listed more than once; list it once"),
    "channel_wise on Gemm": ('override_layer_configs { layer_name: "fc" calibration_config { arq_quantize { '
                             'channel_wise: true } } }',
                             "override_layer_configs[0].calibration_config.arq_quantize.channel_wise: must be false "
                             "for Gemm layers (only Conv, ConvTranspose support channel-wise weights)"),
    "int16 on AveragePool": ('override_layer_types { layer_type: "AveragePool" calibration_config { ifmr_quantize { '
                             'dst_type: INT16 } } }',
                             "override_layer_types[0].calibration_config.ifmr_quantize.dst_type: 16-bit activations "
                             "are not supported for AveragePool layers (only Conv, ConvTranspose, Gemm); use 8"),
    "weights on AveragePool": ('override_layer_types { layer_type: "AveragePool" calibration_config { arq_quantize { '
                               '} } }', "override_layer_types[0].calibration_config.arq_quantize: AveragePool layers "
                               "have no weights; remove the weight algorithm"),
    "quant_bits": ("common_config { arq_quantize { quant_bits: 3 } }",
                   "common_config.arq_quantize.quant_bits: must be one of 4, 6, 7, 8, got 3"),
    "dmq range": ("common_config { dmq_balancer { migration_strength: 0.9 } }",
                  "common_config.dmq_balancer.migration_strength: must be in [0.2, 0.8], got 0.9"),
    "num_of_bins": ("common_config { hfmg_quantize { num_of_bins: 1000 } }",
                    "common_config.hfmg_quantize.num_of_bins: must be one of 1024, 2048, 4096, 8192, got 1000"),
    "search_step": ("common_config { ifmr_quantize { search_step: 0.7 } }",
                    "common_config.ifmr_quantize.search_step: must be in (0, 0.6], got 0.7"),
    "percentile": ("common_config { ifmr_quantize { max_percentile: 0.4 } }",
                   "common_config.ifmr_quantize.max_percentile: must be in (0.5, 1], got 0.4"),
    "batch_num": ("batch_num: 0", "batch_num: must be > 0, got 0"),
    "required field": ('override_layer_types { layer_type: "Gemm" }',
                       "override_layer_types[0].calibration_config: required field is missing"),
    "skip_fusion type": ('skip_fusion_layers: "fc"',
                         "skip_fusion_layers[0]: layer 'fc' is a Gemm; only Conv layers are allowed here"),
    "everything skipped": ('skip_layer_types: "Conv" skip_layer_types: "Gemm" skip_layers: "pool" skip_layers: "mm"',
                           "skip_layers: skip_layers/skip_layer_types skip every quantizable layer; "
                           "nothing would be quantized"),
    "nuq steps": ('nuq_config { mapping_file: "m.json" nuq_quantize { num_steps: 8 } }',
                  "nuq_config.nuq_quantize.num_steps: must be one of 16, 32, got 8"),
}


@pytest.mark.parametrize("rule", list(CFG_ERRORS))
def test_each_cfg_rule_gives_one_located_line(rule):
    text, expected = CFG_ERRORS[rule]
    with pytest.raises(ConfigFileError) as info:
        parse_cfg(text, LAYERS, source="quant.cfg")
    assert str(info.value) == f"quant.cfg: {expected}"


def test_typo_in_field_name_reports_line_and_suggestion(tmp_path):
    path = tmp_path / "quant.cfg"
    path.write_text("batch_num: 2\ncommon_config {\n  ifmr_quantize {\n    serch_step: 0.1\n  }\n}\n")
    with pytest.raises(ConfigFileError) as info:
        read_cfg(path, LAYERS)
    assert str(info.value) == f"{path}:4:5: FMRQuantize has no field named 'serch_step' (did you mean 'search_step'?)"
    assert (info.value.issues[0].line, info.value.issues[0].col) == (4, 5)


def test_syntax_error_reports_line():
    with pytest.raises(ConfigFileError, match=r'^quant.cfg:2:15: Expected "}"\.$'):
        parse_cfg("batch_num: 2\ncommon_config {\n", LAYERS, source="quant.cfg")


def test_cfg_problems_are_all_reported():
    with pytest.raises(ConfigFileError) as info:
        parse_cfg('batch_num: 0 skip_layers: "conv_1" common_config { ifmr_quantize { search_step: 0.7 } }',
                  LAYERS, source="q.cfg")
    assert [i.where for i in info.value.issues] == ["batch_num", "skip_layers[0]", "common_config.ifmr_quantize.search_step"]


# --- retrain configs ------------------------------------------------------------------------------

def test_create_retrain_config_and_round_trip(tmp_path):
    data = create_retrain_config(LAYERS, skip_layers=["mm"])
    assert list(data) == ["version", "batch_num", "conv1", "conv2", "fc", "mm"]
    assert data["conv1"] == {"retrain_enable": True,
                             "retrain_data_config": {"algo": "ulq_quantize", "dst_type": "INT8"},
                             "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": True, "dst_type": "INT8"}}
    assert data["fc"]["retrain_weight_config"]["channel_wise"] is False and data["mm"]["retrain_enable"] is False
    path = tmp_path / "retrain.json"
    write_retrain_config(data, path)
    text = path.read_text()
    cfg = read_retrain_config(path, LAYERS)
    assert cfg.enabled_layers() == ["conv1", "conv2", "fc"]
    write_retrain_config(cfg, path)
    assert path.read_text() == text


RETRAIN_JSON_ERRORS = {
    "data algo": (("conv1", "retrain_data_config", "algo"), "ulq",
                  "conv1.retrain_data_config.algo: must be one of \"ulq_quantize\", got \"ulq\" "
                  "(did you mean 'ulq_quantize'?)"),
    "data dst_type": (("conv1", "retrain_data_config", "dst_type"), "INT2",
                      "conv1.retrain_data_config.dst_type: must be one of \"INT4\", \"INT8\", \"INT16\", got \"INT2\" (did you mean 'INT8'?)"),
    "clip_max": (("conv1", "retrain_data_config", "clip_max"), 0, "conv1.retrain_data_config.clip_max: must be finite and > 0, got 0.0"),
    "clip_min": (("conv1", "retrain_data_config", "clip_min"), 0.5,
                 "conv1.retrain_data_config.clip_min: must be finite and < 0, got 0.5"),
    "fixed_min": (("conv1", "retrain_data_config", "fixed_min"), "no",
                  'conv1.retrain_data_config.fixed_min: must be a boolean (true or false), got "no"'),
    "weight algo": (("conv1", "retrain_weight_config", "algo"), "arq",
                    "conv1.retrain_weight_config.algo: must be one of \"arq_retrain\", \"ulq_retrain\", got \"arq\" "
                    "(did you mean 'arq_retrain'?)"),
    "weight dst_type": (("conv1", "retrain_weight_config", "dst_type"), "INT16",
                        "conv1.retrain_weight_config.dst_type: must be one of \"INT4\", \"INT8\", got \"INT16\" (did you mean 'INT8'?)"),
    "channel_wise": (("fc", "retrain_weight_config", "channel_wise"), True,
                     "fc.retrain_weight_config.channel_wise: must be false for Gemm layers "
                     "(only Conv, ConvTranspose support channel-wise weights)"),
    "unknown key": (("conv1", "retrain_enabled"), True, "conv1.retrain_enabled: unknown key (did you mean 'retrain_enable'?)"),
    "unknown layer": (("conv3",), {"retrain_enable": True}, "conv3: unknown layer (did you mean 'conv2'?)"),
    "version": (("version",), 2, "version: must be 1, got 2"),
}


@pytest.mark.parametrize("rule", list(RETRAIN_JSON_ERRORS))
def test_each_retrain_json_rule(rule):
    keys, value, expected = RETRAIN_JSON_ERRORS[rule]
    data = create_retrain_config(LAYERS)
    node = data
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    with pytest.raises(ConfigFileError) as info:
        parse_retrain_config(data, LAYERS, source="retrain.json")
    assert str(info.value) == f"retrain.json: {expected}"


RETRAIN_CFG = """
batch_num: 2
retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 3.0 clip_min: -1.0 } fixed_min: true } }
retrain_weight_quant_config { arq_retrain { channel_wise: false } }
override_layer_types { layer_type: "Conv" retrain_weight_quant_config { ulq_retrain { channel_wise: true } } }
override_layer_configs { layer_name: "conv1" retrain_data_quant_config { ulq_quantize { dst_type: INT4 } } }
quant_skip_layers: "fc"
skip_layer_types: "MatMul"
prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 } } }
"""


def test_retrain_cfg_resolves_data_and_weights_separately():
    cfg = parse_retrain_cfg(RETRAIN_CFG, LAYERS)
    assert cfg.batch_num == 2 and list(cfg.layers) == ["conv1", "conv2", "fc", "mm"]
    assert cfg.layers["conv1"] == LayerRetrainConfig(
        True, {"algo": "ulq_quantize", "dst_type": "INT4", "clip_max": None, "clip_min": None, "fixed_min": None},
        {"algo": "ulq_retrain", "dst_type": "INT8", "channel_wise": True}, "Conv")
    assert cfg.layers["conv2"].act == {"algo": "ulq_quantize", "dst_type": "INT8", "clip_max": 3.0,
                                       "clip_min": -1.0, "fixed_min": True}
    assert cfg.layers["conv2"].wts["algo"] == "ulq_retrain"
    assert cfg.layers["fc"].wts == {"algo": "arq_retrain", "dst_type": "INT8", "channel_wise": False}
    assert [n for n, l in cfg.layers.items() if not l.retrain_enable] == ["fc", "mm"]
    assert parse_retrain_config(cfg.to_json_dict(), LAYERS).layers == cfg.layers


@pytest.mark.parametrize("text, expected", [
    ('quant_skip_layers: "conv_2"', "quant_skip_layers[0]: unknown layer 'conv_2' (did you mean 'conv2'?)"),
    ('override_layer_types { layer_type: "AveragePool" }', "override_layer_types[0]: layer type 'AveragePool' cannot "
     "be retrained (retrainable types: Conv, ConvTranspose, Gemm, MatMul)"),
    ('override_layer_configs { layer_name: "fc" retrain_weight_quant_config { arq_retrain { channel_wise: true } } }',
     "override_layer_configs[0].retrain_weight_quant_config.arq_retrain.channel_wise: must be false for Gemm layers "
     "(only Conv, ConvTranspose support channel-wise weights)"),
    ("retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: -1 clip_min: -2 } } }",
     "retrain_data_quant_config.ulq_quantize.clip_max_min.clip_max: must be finite and > 0, got -1.0"),
    ("prune_config { filter_pruner { balanced_l2_norm_filter_prune { } } }",
     "prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio: required field is missing"),
    ("retrain_data_quant_config { ulq_quantize { fixd_min: true } }",
     "1:44: ActULQquantize has no field named 'fixd_min' (did you mean 'fixed_min'?)"),
])
def test_retrain_cfg_errors(text, expected):
    with pytest.raises(ConfigFileError) as info:
        parse_retrain_cfg(text, LAYERS, source="retrain.cfg")
    assert str(info.value) == (f"retrain.cfg:{expected}" if expected[0].isdigit() else f"retrain.cfg: {expected}")
