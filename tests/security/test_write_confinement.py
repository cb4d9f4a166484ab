"""Writing confinement: every output is a bare name inside --output-dir; templates fill {model} only."""
from __future__ import annotations

import errno
import os
import time

import numpy as np
import pytest

from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.files import render_filename, template_problem
from amct_pipeline.errors import ConfigError
from sec_helpers import conv_model, digests, one_error, run_cli, save_model, visible

BAD_TEMPLATES = {
    "{model:>400000000}": "format spec", "{model!r}": "format spec", "{0}": "not a template field",
    "{}": "not a template field", "{x}": "not a template field", "{model.__class__}": "not a template field",
    "{model[0]}": "not a template field", "a{": "Single '{'", "}": "Single '}'",
}
BAD_NAMES = {"/tmp/abs.onnx": "absolute path", "../up.onnx": "'..'", "a/../../b.onnx": "'..'",
             "sub/x.onnx": "folder part", "..": "'..'", "": "empty",
             "x" * 300: "longer than 255"}
# every option that names an output file, as (pipeline prefix, option, pipeline suffix)
OUTPUT_OPTIONS = [("", "save", "filename", ""), ("", "lower", "prefix", ""),
                  ("", "export_amct", "record", ""), ("", "export_amct", "quant_config", ""),
                  ("", "decompose", "info_file", ""), ("", "decompose", "report_file", "")]


@pytest.fixture
def model(tmp_path):
    return save_model(conv_model(), tmp_path / "in" / "m.onnx")


@pytest.mark.parametrize("template", sorted(BAD_TEMPLATES))
def test_templates_substitute_model_only(template):
    problem = template_problem(template)
    assert problem and BAD_TEMPLATES[template] in problem
    with pytest.raises(ConfigError) as info:
        render_filename(template, "passes[0].options.filename", model="m")
    assert "passes[0].options.filename" in str(info.value) and len(str(info.value)) < 300


def test_good_templates_are_unchanged():
    assert render_filename("{model}.onnx", "o", model="resnet") == "resnet.onnx"
    assert render_filename("{model}_{model}{{x}}.json", "o", model="m") == "m_m{x}.json"
    assert render_filename("", "o", model="m", fragment=True) == ""
    for name in ("a\\b.onnx", "..\\x.onnx", "c:x.onnx", "a\x00b"):
        with pytest.raises(ConfigError):
            render_filename(name, "o", model="m")


@pytest.mark.parametrize("_, pass_name, option, __", OUTPUT_OPTIONS)
@pytest.mark.parametrize("value", ["{model:>400000000}", "{0}", "/tmp/abs.json", "../up.json", "d/x.json"])
def test_validate_refuses_every_output_option(capsys, _, pass_name, option, __, value):
    text = f'{pass_name}{{{option}="{value}"}}'
    start = time.perf_counter()
    code, err = run_cli(capsys, "validate", text)
    assert time.perf_counter() - start < 5
    assert code == 1 and len(err) == 1 and f"passes[0].options.{option}" in err[0], err
    assert len(err[0]) < 400


@pytest.mark.parametrize("name", sorted(BAD_NAMES))
def test_run_writes_nothing_outside_the_output_folder(capsys, tmp_path, model, name):
    out = tmp_path / "out"
    before = digests(tmp_path)
    line = one_error(capsys, "run", f'save{{filename="{name}"}}', "--model", model, "-o", out, "-q")
    assert "passes[0].options.filename" in line and BAD_NAMES[name] in line
    assert digests(tmp_path) == before and not out.exists()


def test_names_are_checked_before_the_model_is_read(capsys, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    line = one_error(capsys, "run", 'save{filename="{model:>9}"}', "--model", broken, "-o", tmp_path / "o")
    assert "options.filename" in line and "not a readable" not in line


def test_dump_ir_stays_inside_the_output_folder(capsys, tmp_path, model):
    out = tmp_path / "out"
    for value, expected in (("/tmp/ir", "absolute path"), ("../ir", "'..'"), ("a/../../ir", "'..'")):
        line = one_error(capsys, "run", "fuse_bn,save", "--model", model, "-o", out, "--dump-ir", value, "-q")
        assert "--dump-ir" in line and expected in line, line
    assert not out.exists() and not (tmp_path / "ir").exists()
    line = one_error(capsys, "run", "fuse_bn,save", "--model", model, "--dump-ir", "ir", "-q")
    assert "--output-dir" in line
    demo = save_model(build_demo_model(), tmp_path / "demo.onnx")
    code, err = run_cli(capsys, "run", "fuse_bn,save{filename=x.onnx}", "--model", demo, "-o", out,
                        "--dump-ir", "ir", "-q")
    assert code == 0, err
    assert visible(out) == {"x.onnx", "ir"} and visible(out / "ir") == {"00_after_fuse_bn.onnx"}


def test_dump_ir_into_a_file_or_a_full_disk(capsys, tmp_path, model, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ir").write_text("a file")
    model_demo = save_model(build_demo_model(), tmp_path / "demo.onnx")
    line = one_error(capsys, "run", "fuse_bn,save", "--model", model_demo, "-o", out, "--dump-ir", "ir", "-q")
    assert "ir is a regular file, not a folder" in line
    assert visible(out) == {"ir"}

    import amct_pipeline.ir.io as ir_io
    real = ir_io.write_model

    def full(graph, path, **kwargs):
        if "after_" in path.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(graph, path, **kwargs)
    monkeypatch.setattr(ir_io, "write_model", full)
    line = one_error(capsys, "run", "fuse_bn,save", "--model", model_demo, "-o", out, "--dump-ir", "dumps", "-q")
    assert "IR dump folder" in line and "00_after_fuse_bn.onnx" in line and "no space left on device" in line
    assert visible(out) == {"ir"}      # the empty dump folder is removed again; nothing was committed


def test_output_folder_that_is_a_file_is_reported_before_calibration(capsys, tmp_path):
    model = save_model(build_demo_model(), tmp_path / "demo.onnx")
    data = tmp_path / "calib.npy"
    np.save(data, build_demo_data(32))
    target = tmp_path / "out"
    target.write_text("I am a file")
    code, err = run_cli(capsys, "run", "ptq_int8", "--model", model, "--data", f"calib={data}", "-o", target)
    assert code == 1 and err == [f"amct-pipeline: error: --output-dir {target} is a regular file, not a folder; "
                                 "choose another output folder"], err
    # progress lines would show "[1/6] fuse_bn ...": the check ran before the first pass
    code, err = run_cli(capsys, "run", "ptq_int8", "--model", model, "--data", f"calib={data}",
                        "-o", target / "sub")
    assert code == 1 and len(err) == 1 and "is inside" in err[0] and "[1/" not in err[0], err
    assert target.read_text() == "I am a file"


def test_failed_run_removes_the_output_folders_it_created(capsys, tmp_path, model):
    out = tmp_path / "a" / "b" / "out"
    line = one_error(capsys, "run", "save,match_layers{amct_config=missing.json}", "--model", model, "-o", out, "-q")
    assert "missing.json" in line
    assert not (tmp_path / "a").exists()
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("x")
    one_error(capsys, "run", "save,match_layers{amct_config=missing.json}", "--model", model, "-o", keep, "-q")
    assert visible(keep) == {"mine.txt"}


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A real write limit (RLIMIT_FSIZE, as a full disk): the run stops with one line, exit 1, no folder left."""
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # writes then fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    model = save_model(build_demo_model(), tmp_path / "demo.onnx")
    data = tmp_path / "calib.npy"
    np.save(data, build_demo_data(16))
    before = digests(tmp_path)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "amct_pipeline", "run", "ptq_int8", "--model", str(model),
                           "--data", f"calib={data}", "-o", str(out), "-q", "--dump-ir", "ir", "--no-plugins"],
                          capture_output=True, text=True, preexec_fn=limit)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "File too large" in lines[0], done.stderr
    assert "internal error" not in lines[0] and not out.exists() and digests(tmp_path) == before


def test_a_full_disk_names_the_output_file(capsys, tmp_path, monkeypatch):
    model = save_model(build_demo_model(), tmp_path / "demo.onnx")
    data = tmp_path / "calib.npy"
    np.save(data, build_demo_data(32))
    import amct_pipeline.ir.io as ir_io

    def full(graph, path, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(ir_io, "write_model", full)
    out = tmp_path / "out"
    line = one_error(capsys, "run", "ptq_int8", "--model", model, "--data", f"calib={data}", "-o", out, "-q")
    assert f"--output-dir {out}: cannot write demo_fake_quant_model.onnx (no space left on device)" in line, line
    assert ".amct-staging" not in line and not out.exists()
