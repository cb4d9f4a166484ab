"""AMCT files and bindings that used to be accepted silently: duplicate record keys, an empty record,
duplicate keys in quant-config JSON and .cfg, an unused --data binding; and validate's python-reader note."""
import numpy as np
import pytest

from amct_pipeline.cli.main import main
from amct_pipeline.demo import build_demo_data, build_demo_model

RECORD = ('record {{ key: "{0}" value {{ scale_d: 0.05 offset_d: -3 scale_w: 0.01 }} }}\n')


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(build_demo_model().SerializeToString())
    return path


def run(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(capsys, argv):
    code, _, err = run(capsys, argv)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("amct-pipeline: error: "), err
    assert "internal error" not in err
    return lines[0]


def test_duplicate_record_key_names_file_line_and_layer(tmp_path, model, capsys):
    record = tmp_path / "record.txt"
    record.write_text(RECORD.format("conv1") + RECORD.format("conv2") + RECORD.format("conv1"))
    line = one_error(capsys, ["run", "fuse_bn,match_layers,load_record{path=%s},lower{targets=[fakequant]}" % record,
                              "--model", model, "-o", tmp_path / "out", "-q"])
    assert f"{record}:3:10" in line and "layer 'conv1'" in line and "listed twice" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("text", ["", "\n# nothing\n", 'prune_record { producer { name: "conv1" } }\n'])
def test_empty_record_is_an_error_not_a_float_model(tmp_path, model, capsys, text):
    record = tmp_path / "record.txt"
    record.write_text(text)
    line = one_error(capsys, ["run", "fuse_bn,match_layers,load_record{path=%s},lower{targets=[fakequant]}" % record,
                              "--model", model, "-o", tmp_path / "out", "-q"])
    assert str(record) in line and "no layer entries" in line


def test_non_utf8_record_is_located(tmp_path, model, capsys):
    record = tmp_path / "record.txt"
    record.write_bytes(RECORD.format("conv1").encode() + b'# \xff\n')
    line = one_error(capsys, ["run", "fuse_bn,match_layers,load_record{path=%s}" % record, "--model", model, "-q"])
    assert f"{record}:2:3" in line and "not UTF-8" in line


def test_duplicate_key_in_quant_config_json(tmp_path, model, capsys):
    config = tmp_path / "quant.json"
    config.write_text('{"version": 1,\n "batch_num": 1,\n "conv1": {"quant_enable": true},\n'
                      ' "conv1": {"quant_enable": false}}\n')
    line = one_error(capsys, ["config", "check", config, "--model", model])
    assert f"{config}:4:2" in line and "key 'conv1' appears more than once (first at line 3)" in line
    config.write_text('{"version": 1, "conv1": {"quant_enable": true, "quant_enable": false}}')
    assert "key 'quant_enable' appears more than once" in one_error(capsys, ["config", "check", config,
                                                                              "--model", model])


def test_deep_quant_config_json_is_located(tmp_path, model, capsys):
    config = tmp_path / "quant.json"
    config.write_text('{"conv1": ' + "[" * 3000 + "]" * 3000 + "}")
    line = one_error(capsys, ["config", "check", config, "--model", model])
    assert f"{config}:1:" in line and "nested more than" in line


def test_duplicate_field_in_cfg(tmp_path, model, capsys):
    cfg = tmp_path / "quant.cfg"
    cfg.write_text("batch_num: 2\nactivation_offset: true\nbatch_num: 4\n")
    line = one_error(capsys, ["config", "check", cfg, "--model", model])
    assert f"{cfg}:3:1" in line and "'batch_num'" in line and "given twice (first at line 1)" in line
    cfg.write_text('override_layer_configs { layer_name: "conv1"\n  calibration_config { ifmr_quantize { '
                   "search_step: 0.02\n search_step: 0.03 } } }\n")
    line = one_error(capsys, ["config", "check", cfg, "--model", model])
    assert f"{cfg}:3:2" in line and "'search_step'" in line


def test_cfg_rules_kept_for_valid_files(tmp_path, model, capsys):
    cfg = tmp_path / "quant.cfg"
    cfg.write_text('batch_num: 2\nskip_layers: "conv1"\nskip_layers: "conv2"\n'
                   "common_config { ifmr_quantize { } hfmg_quantize { num_of_bins: 1024 } }\n")
    code, out, err = run(capsys, ["config", "check", cfg, "--model", model])
    assert code == 0 and "2 skipped" in out and "batch_num 2" in out, err


def test_unused_data_binding_warns(tmp_path, model, capsys):
    data = tmp_path / "calib.npy"
    np.save(data, build_demo_data(4))
    code, out, err = run(capsys, ["run", "fuse_bn,save", "--model", model, "-o", tmp_path / "out", "-q",
                                  "--data", f"calbi={data}"])
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("amct-pipeline: warning:")]
    assert len(warnings) == 1 and "--data calbi=...: no pass uses dataset 'calbi'" in warnings[0]
    code, out, err = run(capsys, ["run", "fuse_bn,match_layers,calibrate{dataset=calib},save", "--model", model,
                                  "-o", tmp_path / "out2", "-q", "--data", f"calib={data}"])
    assert code == 0 and "warning" not in err, err


def test_validate_says_when_the_python_reader_runs_code(tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("datasets:\n  calib: {reader: python, path: 'mypkg.data:batches'}\n"
                        "passes:\n  - pass: fuse_bn\n  - {pass: match_layers}\n"
                        "  - {pass: calibrate, options: {dataset: calib}}\n")
    code, out, err = run(capsys, ["validate", pipeline])
    assert code == 0, err
    note = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "'python' reader" in note[0] and "imports 'mypkg.data'" in note[0]
    assert "calls 'mypkg.data:batches'" in note[0]
    code, out, _ = run(capsys, ["validate", "fuse_bn"])
    assert code == 0 and "note:" not in out
