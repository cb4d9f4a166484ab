"""The CLI: the run form, listing, validation, and one clear line for every kind of bad input."""
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from amct_pipeline.demo import build_demo_model

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "amct_pipeline", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env)


@pytest.fixture
def demo_model(tmp_path):
    path = tmp_path / "demo.onnx"
    path.write_bytes(build_demo_model().SerializeToString())
    return path


def test_run_fuse_bn_writes_exactly_one_onnx(demo_model, tmp_path):
    out = tmp_path / "out"
    done = cli("run", ROOT / "pipelines" / "fuse_bn.yaml", "--model", demo_model, "--output-dir", out, "-q")
    assert done.returncode == 0, done.stderr
    assert [p.name for p in out.iterdir()] == ["demo_fused.onnx"]
    fused = onnx.load(str(out / "demo_fused.onnx"))
    assert "BatchNormalization" not in {n.op_type for n in fused.graph.node}


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_every_shipped_pipeline_validates(pipeline):
    done = cli("validate", pipeline)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok:")


def test_validate_reports_each_problem_on_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes:\n  - pass: fuse_bm\n  - pass: save\n    options: {filenme: x}\n")
    done = cli("validate", bad)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and all(str(bad) in line for line in lines)
    assert "did you mean 'fuse_bn'" in lines[0] and "did you mean 'filename'" in lines[1]


def test_list_describe_print(demo_model):
    listed = cli("list", "passes")
    assert listed.returncode == 0 and "fuse_bn" in listed.stdout and "match_layers" in listed.stdout
    described = cli("describe", "fuse_bn")
    assert described.returncode == 0 and "skip_fusion_layers" in described.stdout
    printed = cli("print-pipeline", "fuse_bn,match_layers{skip_layers=[fc]},save")
    assert printed.stdout.strip() == "fuse_bn,match_layers{skip_layers=[fc]},save"
    assert cli("describe", "fuse_bm").stderr.strip().endswith("did you mean 'fuse_bn'?")


def test_set_overrides(demo_model, tmp_path):
    done = cli("run", ROOT / "pipelines" / "fuse_bn.yaml", "--model", demo_model, "-o", tmp_path / "o", "-q",
               "--set", "passes.save.options.filename=x.onnx")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o" / "x.onnx").exists()


def test_schema_export(tmp_path):
    done = cli("schema", "-o", tmp_path / "schema.json")
    assert done.returncode == 0
    import json
    schema = json.loads((tmp_path / "schema.json").read_text())
    names = {v["properties"]["pass"]["const"] for v in schema["properties"]["passes"]["items"]["oneOf"]}
    assert {"fuse_bn", "match_layers", "save"} <= names


def _cycle_model():
    nodes = [helper.make_node("Relu", ["b"], ["a"], name="r1"), helper.make_node("Relu", ["a"], ["b"], name="r2"),
             helper.make_node("Add", ["x", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def _dangling_model():
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


BAD_MODELS = {
    "empty": (b"", "empty"),
    "not_onnx": (b"hello, I am a text file\n" * 20, "not a readable ONNX model"),
    "truncated": (build_demo_model().SerializeToString()[:3000], "ONNX model"),
    "cycle": (_cycle_model(), "cycle through node"),
    "dangling": (_dangling_model(), "'ghost'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_MODELS))
def test_bad_models_get_one_clear_line(kind, tmp_path):
    content, expected = BAD_MODELS[kind]
    path = tmp_path / f"{kind}.onnx"
    path.write_bytes(content)
    out = tmp_path / "out"
    done = cli("run", ROOT / "pipelines" / "fuse_bn.yaml", "--model", path, "-o", out, "-q")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amct-pipeline: error:"), done.stderr
    assert expected in lines[0] and str(path) in lines[0] or kind in ("cycle", "dangling") and expected in lines[0]
    assert "Traceback" not in done.stderr
    assert not out.exists() or not any(out.iterdir())
    assert path.read_bytes() == content


def test_missing_model_and_debug_traceback(tmp_path):
    done = cli("run", ROOT / "pipelines" / "fuse_bn.yaml", "--model", tmp_path / "none.onnx", "-o", tmp_path / "o")
    assert done.returncode == 1 and "no such model file" in done.stderr and "Traceback" not in done.stderr
    debug = cli("run", ROOT / "pipelines" / "fuse_bn.yaml", "--model", tmp_path / "none.onnx", "-o", tmp_path / "o",
                "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_output_never_overwrites_the_input(demo_model):
    before = demo_model.read_bytes()
    done = cli("run", "fuse_bn,save{filename=demo.onnx}", "--model", demo_model, "-o", demo_model.parent, "-q")
    assert done.returncode == 1 and "input" in done.stderr
    assert demo_model.read_bytes() == before


def test_run_prints_pass_reports_unless_quiet(demo_model, tmp_path):
    loud = cli("run", "decompose{rules=basic min_in_channels=1}", "--model", demo_model, "-o", tmp_path / "a")
    assert loud.returncode == 0, loud.stderr
    table = loud.stderr.split("decompose done in")[1]       # printed after the run, not from inside the pass
    assert "2 layer(s) decomposed" in table and "FLOPs before" in table
    quiet = cli("run", "decompose{rules=basic}", "--model", demo_model, "-o", tmp_path / "b", "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""


NEEDS_MORE = {"auto_calibrate_int8.yaml": "a user evaluator", "convert_qat_ascend.yaml": "a QDQ model (tested below)"}


@pytest.mark.parametrize("pipeline", [p for p in PIPELINES if p.name not in NEEDS_MORE], ids=lambda p: p.name)
def test_every_shipped_pipeline_runs_on_the_demo_model(pipeline, demo_model, tmp_path):
    """Each preset, as a user runs it: exit 0, something written, and nothing on stderr but one-line
    warnings (a preset whose last pass cannot write what it computed fails here)."""
    import numpy as np
    from amct_pipeline.demo import build_demo_data
    np.save(tmp_path / "calib.npy", build_demo_data(32))
    out = tmp_path / "out"
    done = cli("run", pipeline, "--model", demo_model, "--data", f"calib={tmp_path / 'calib.npy'}", "-o", out, "-q")
    assert done.returncode == 0, done.stderr
    assert any(out.iterdir())
    assert all(line.startswith("amct-pipeline: warning: ") for line in done.stderr.splitlines()), done.stderr


def test_convert_qat_preset_reads_the_qdq_model_ptq_int8_wrote(demo_model, tmp_path):
    import numpy as np
    from amct_pipeline.demo import build_demo_data
    np.save(tmp_path / "calib.npy", build_demo_data(32))
    assert cli("run", "ptq_int8", "--model", demo_model, "--data", f"calib={tmp_path / 'calib.npy'}",
               "-o", tmp_path / "ptq", "-q").returncode == 0
    done = cli("run", ROOT / "pipelines" / "convert_qat_ascend.yaml", "--model", tmp_path / "ptq" / "demo_qdq_model.onnx",
               "-o", tmp_path / "out", "-q")
    assert done.returncode == 0, done.stderr
    assert any(p.name.endswith("deploy_model.onnx") for p in (tmp_path / "out").iterdir())
