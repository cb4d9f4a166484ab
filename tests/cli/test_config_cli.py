"""`amct-pipeline config create/check` and AMCT config files as pipeline input (fuse_bn, match_layers, calibrate)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.errors import PassError
from amct_pipeline.pipeline.spec import DatasetSpec
from amct_pipeline.runtime.data import ArraySource
from conftest import shared_path


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "amct_pipeline", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.fixture
def demo_model(tmp_path):
    path = tmp_path / "demo.onnx"
    path.write_bytes(build_demo_model().SerializeToString())
    return path


@pytest.fixture
def created(demo_model, tmp_path):
    """A config made by the CLI with every default."""
    out = tmp_path / "quant.json"
    done = cli("config", "create", "--model", demo_model, "--output", out)
    assert done.returncode == 0, done.stderr
    return out


def _source(count: int = 48, batch_size: int = 8) -> ArraySource:
    return ArraySource("calib", {"x": build_demo_data(count)}, DatasetSpec(batch_size=batch_size), "test")


def _run(session, model, config, calibrate: str = "calibrate", source=None):
    text = f"fuse_bn{{amct_config=\"{config}\"}},match_layers{{amct_config=\"{config}\"}},{calibrate}"
    return session.build(text, datasets=["calib"]).run(str(model), datasets={"calib": source or _source()})


# -- create --------------------------------------------------------------------------------------
def test_create_lists_every_quantizable_layer_with_amct_defaults(created):
    data = json.loads(created.read_text())
    assert [k for k in data if isinstance(data[k], dict)] == ["conv1", "conv2", "fc"]
    assert (data["version"], data["batch_num"], data["activation_offset"], data["do_fusion"]) == (1, 1, True, True)
    act = data["conv1"]["activation_quant_params"]
    assert act == {"num_bits": 8, "max_percentile": 0.999999, "min_percentile": 0.999999, "search_range": [0.7, 1.3],
                   "search_step": 0.01, "act_algo": "ifmr", "asymmetric": True}
    assert data["conv1"]["weight_quant_params"]["channel_wise"] is True
    assert data["fc"]["weight_quant_params"]["channel_wise"] is False       # Gemm: per tensor


def test_create_with_flags(demo_model, tmp_path):
    out = tmp_path / "q.json"
    done = cli("config", "create", "--model", demo_model, "-o", out, "--skip-layers", "fc,conv2", "--batch-num", "4",
               "--activation-offset", "false")
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert (data["batch_num"], data["activation_offset"]) == (4, False)
    assert [data[n]["quant_enable"] for n in ("conv1", "conv2", "fc")] == [True, False, False]
    assert data["conv1"]["activation_quant_params"]["asymmetric"] is False


def test_create_bad_flags_one_line_each_and_nothing_written(demo_model, tmp_path):
    out = tmp_path / "q.json"
    done = cli("config", "create", "--model", demo_model, "-o", out, "--skip-layers", "fcc", "--batch-num", "0")
    assert done.returncode == 1 and not out.exists()
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2
    assert "--batch-num" in lines[0] and "--skip-layers" in lines[1] and "did you mean 'fc'" in lines[1]


def test_create_on_mobilenetv2_lists_its_53_layers(tmp_path):
    out = tmp_path / "mbv2.json"
    done = cli("config", "create", "--model", shared_path("models/mobilenetv2_fp32.onnx"), "-o", out)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    layers = {k: v for k, v in data.items() if isinstance(v, dict)}
    assert len(layers) == 53
    assert sum("channel_wise" in v["weight_quant_params"] and not v["weight_quant_params"]["channel_wise"]
               for v in layers.values()) == 1                                 # the MatMul


# -- check ---------------------------------------------------------------------------------------
def test_check_ok(created, demo_model):
    done = cli("config", "check", created, "--model", demo_model)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ok: {created}: 3 layers quantized, 0 skipped, batch_num 1")


def test_check_bad_config_one_line_naming_the_key(created, demo_model):
    data = json.loads(created.read_text())
    data["conv2"]["quant_enabel"] = data["conv2"].pop("quant_enable")
    created.write_text(json.dumps(data))
    done = cli("config", "check", created, "--model", demo_model)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "conv2.quant_enabel" in lines[0] and "did you mean 'quant_enable'" in lines[0]


def test_check_cfg_and_its_errors(tmp_path, demo_model):
    good = tmp_path / "q.cfg"
    good.write_text('batch_num: 3\nskip_layers: "fc"\n')
    done = cli("config", "check", good, "--model", demo_model)
    assert done.returncode == 0 and "2 layers quantized, 1 skipped, batch_num 3" in done.stdout
    bad = tmp_path / "bad.cfg"
    bad.write_text('batch_num: 3\nskip_layers: "fcx"\n')
    done = cli("config", "check", bad, "--model", demo_model)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "skip_layers" in done.stderr and "fcx" in done.stderr


def test_check_missing_file_and_wrong_suffix(tmp_path, demo_model):
    done = cli("config", "check", "missing.json", "--model", demo_model, cwd=tmp_path)
    assert done.returncode == 1 and "not found" in done.stderr and str(tmp_path) in done.stderr
    other = tmp_path / "q.yaml"
    other.write_text("{}")
    done = cli("config", "check", other, "--model", demo_model)
    assert done.returncode == 1 and "neither a .json nor a .cfg" in done.stderr


# -- the config as pipeline input ------------------------------------------------------------------
def test_edited_config_changes_layer_map_and_calibration(session, created, demo_model):
    data = json.loads(created.read_text())
    data["batch_num"] = 2
    data["conv2"]["quant_enable"] = False
    data["fc"]["activation_quant_params"] = {"num_bits": 8, "act_algo": "hfmg", "num_of_bins": 1024,
                                             "asymmetric": False}
    created.write_text(json.dumps(data))
    result = _run(session, demo_model, created)
    layer_map = result.artifacts["layer_map"]
    assert list(layer_map) == ["conv1", "fc"]
    assert layer_map.skipped["conv2"] == "quant_enable false in quant.json"
    assert layer_map["fc"].options == {
        "calibrate": {"algorithm": "hfmg", "algorithm_options": {"num_bits": 8, "asymmetric": False, "num_of_bins": 1024}},
        "quantize_weights": {"channel_wise": False, "num_bits": 8}}
    assert layer_map["conv1"].options["calibrate"]["algorithm"] == "ifmr"
    stats = result.stats_for("calibrate")
    assert stats["batches"] == 2                          # batch_num from the file
    assert stats["algorithms"] == {"ifmr": 1, "hfmg": 1}
    # the same as calibrating those layers with the inline options
    inline = session.build("fuse_bn,match_layers{skip_layers=[conv2] overrides=[{match={name=fc} options="
                           "{calibrate={algorithm=hfmg algorithm_options={num_of_bins=1024 asymmetric=false}}}}]},"
                           "calibrate{batch_num=2}", datasets=["calib"]).run(str(demo_model), datasets={"calib": _source()})
    assert result.artifacts["act_quant"] == inline.artifacts["act_quant"]
    assert result.artifacts["act_quant"]["fc"].offset == 0
    assert result.artifacts["amct_config"].batch_num == 2


def test_cfg_override_and_fusion_settings(session, tmp_path, demo_model):
    cfg = tmp_path / "q.cfg"
    cfg.write_text('batch_num: 2\nactivation_offset: false\ndo_fusion: false\n'
                   'override_layer_configs {\n  layer_name: "conv1"\n'
                   '  calibration_config { hfmg_quantize { num_of_bins: 2048 asymmetric: true } }\n}\n')
    result = _run(session, demo_model, cfg)
    assert result.stats_for("fuse_bn")["fused"] == 0                     # do_fusion false from the file
    act = result.artifacts["act_quant"]
    assert act["conv1"].offset != 0 and act["conv2"].offset == 0 and act["fc"].offset == 0
    assert result.artifacts["layer_map"]["conv1"].options["calibrate"]["algorithm_options"]["num_of_bins"] == 2048


def test_explicit_pass_options_win_over_the_file(session, created, demo_model):
    data = json.loads(created.read_text())
    data["do_fusion"] = False
    created.write_text(json.dumps(data))
    text = f"fuse_bn{{amct_config=\"{created}\" do_fusion=true}}"
    assert session.build(text).run(str(demo_model)).stats_for("fuse_bn")["fused"] == 2


def test_override_unskips_a_layer_the_file_skips(session, created, demo_model):
    data = json.loads(created.read_text())
    data["fc"]["quant_enable"] = False
    created.write_text(json.dumps(data))
    text = (f"match_layers{{amct_config=\"{created}\" overrides=[{{match={{name=fc}} skip=false}}]}}")
    assert list(session.build(text).run(str(demo_model)).artifacts["layer_map"]) == ["conv1", "conv2", "fc"]


def test_layer_missing_from_a_json_config_is_skipped(session, created, demo_model):
    data = json.loads(created.read_text())
    del data["conv2"]
    created.write_text(json.dumps(data))
    layer_map = session.build(f"match_layers{{amct_config=\"{created}\"}}").run(str(demo_model)).artifacts["layer_map"]
    assert layer_map.skipped["conv2"] == "not listed in quant.json"


def test_bad_config_in_a_pipeline_names_the_key(session, created, demo_model):
    data = json.loads(created.read_text())
    data["conv1"]["activation_quant_params"]["search_step"] = 5
    created.write_text(json.dumps(data))
    with pytest.raises(PassError) as info:
        _run(session, demo_model, created)
    assert "conv1.activation_quant_params.search_step" in str(info.value)
    assert "\n" not in str(info.value)
