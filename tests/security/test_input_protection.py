"""No file a run reads can be one it writes, checked before any pass runs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from amct_pipeline.demo import build_demo_data, build_demo_model
from sec_helpers import digests, one_error, run_cli, save_model, visible, weight, write_external_model


@pytest.fixture
def ext_model(tmp_path):
    return write_external_model(tmp_path / "m", "w.bin", weight().tobytes())


def _refused(capsys, *args) -> str:
    code, err = run_cli(capsys, *args)      # progress is on: no "[1/..]" line means no pass started
    err = [line for line in err if not line.startswith("amct-pipeline: warning:")]
    assert code == 1 and len(err) == 1 and not any(line.startswith("[") for line in err), err
    line = err[0]
    assert "would overwrite an input" in line or "destroy an input" in line or "holds" in line, line
    return line


def test_save_onto_the_models_external_data_file(capsys, ext_model):
    folder = ext_model.parent
    before = digests(folder)
    line = _refused(capsys, "run", "save{filename=w.bin}", "--model", ext_model, "-o", folder)
    assert "passes[0].options.filename" in line and "'w.bin'" in line
    assert digests(folder) == before and visible(folder) == {"m.onnx", "w.bin"}


def test_external_data_of_the_output_cannot_be_the_inputs(capsys, tmp_path):
    """save writes 'x.onnx' and, when external, 'x.onnx.data': the input's data file has that name."""
    model = write_external_model(tmp_path / "m", "x.onnx.data", weight().tobytes())
    before = digests(model.parent)
    line = _refused(capsys, "run", "save{filename=x.onnx,external_data=true}", "--model", model,
                    "-o", model.parent)
    assert "'x.onnx.data'" in line and digests(model.parent) == before


def test_save_onto_the_model_itself(capsys, ext_model):
    before = digests(ext_model.parent)
    _refused(capsys, "run", "save", "--model", ext_model, "-o", ext_model.parent)
    assert digests(ext_model.parent) == before


def test_pipeline_file_is_an_input(capsys, tmp_path, ext_model):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("schema_version: 1\npasses:\n  - pass: save\n    options: {filename: p.yaml}\n")
    before = pipeline.read_bytes()
    line = _refused(capsys, "run", pipeline, "--model", ext_model, "-o", tmp_path)
    assert str(pipeline) in line.split(": passes")[0] and pipeline.read_bytes() == before


def test_amct_config_and_record_are_inputs(capsys, tmp_path, ext_model):
    config = tmp_path / "q.json"
    config.write_text(json.dumps({"batch_num": 1}))
    record = tmp_path / "record.txt"
    record.write_text("")
    before = digests(tmp_path)
    _refused(capsys, "run", f"match_layers{{amct_config={config}}},save{{filename=q.json}}", "--model", ext_model,
             "-o", tmp_path)
    _refused(capsys, "run", f"match_layers,load_record{{path={record}}},save{{filename=record.txt}}",
             "--model", ext_model, "-o", tmp_path)
    assert digests(tmp_path) == before


def test_data_files_are_inputs(capsys, tmp_path, ext_model):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        np.save(shards / f"part{i}.npy", np.zeros((2, 3, 8, 8), np.float32))
    before = digests(shards)
    _refused(capsys, "run", "save{filename=part1.npy}", "--model", ext_model, "--data", f"calib={shards}",
             "-o", shards)
    single = shards / "part0.npy"
    _refused(capsys, "run", "save{filename=part0.npy}", "--model", ext_model, "--data", f"calib={single}",
             "-o", shards)
    assert digests(shards) == before


def test_dump_ir_folder_holding_an_input(capsys, tmp_path):
    model = save_model(build_demo_model(), tmp_path / "out" / "ir" / "demo.onnx")
    line = _refused(capsys, "run", "fuse_bn", "--model", model, "-o", tmp_path / "out", "--dump-ir", "ir")
    assert "IR dump folder" in line and "demo.onnx" in line


def test_config_create_never_replaces_the_model_or_its_data(capsys, tmp_path, ext_model):
    before = digests(ext_model.parent)
    for target in (ext_model, ext_model.parent / "w.bin"):
        line = _refused(capsys, "config", "create", "--model", ext_model, "-o", target)
        assert "config create: --output" in line
    assert digests(ext_model.parent) == before


def test_config_create_into_a_missing_folder_or_onto_a_folder(capsys, tmp_path):
    model = save_model(build_demo_model(), tmp_path / "demo.onnx")
    line = one_error(capsys, "config", "create", "--model", model, "-o", tmp_path / "nope" / "q.json")
    assert "the folder" in line and "does not exist" in line
    line = one_error(capsys, "config", "create", "--model", model, "-o", tmp_path)
    assert "is a folder" in line
    code, err = run_cli(capsys, "config", "create", "--model", model, "-o", tmp_path / "q.json")
    assert code == 0 and (tmp_path / "q.json").is_file(), err


def test_a_valid_run_is_unaffected(capsys, tmp_path):
    """The guard changes nothing for a normal ptq run: same files, inputs byte-identical."""
    model = save_model(build_demo_model(), tmp_path / "in" / "demo.onnx")
    data = tmp_path / "in" / "calib.npy"
    np.save(data, build_demo_data(32))
    before = digests(tmp_path / "in")
    code, err = run_cli(capsys, "run", "ptq_int8", "--model", model, "--data", f"calib={data}",
                        "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert visible(tmp_path / "out") == {"demo_fake_quant_model.onnx", "demo_qdq_model.onnx", "record.txt",
                                         "demo_quant_config.json"}
    assert digests(tmp_path / "in") == before


def test_files_named_by_options_must_be_regular(capsys, tmp_path, ext_model):
    """A FIFO or device named as an AMCT config or record would block or never end: refused first."""
    import os
    os.mkfifo(tmp_path / "q.json")
    line = one_error(capsys, "run", f"match_layers{{amct_config={tmp_path / 'q.json'}}},save", "--model", ext_model,
                     "-o", tmp_path / "out", "-q")
    assert "passes[0].options.amct_config" in line and "is a FIFO" in line
    line = one_error(capsys, "run", "match_layers,load_record{path=/dev/zero},lower", "--model", ext_model,
                     "-o", tmp_path / "out", "-q")
    assert "passes[1].options.path" in line and "character device" in line
    assert not (tmp_path / "out").exists()
