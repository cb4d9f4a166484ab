"""Two sessions in one process, one lowering to ``ascend`` and one not, give byte-identical results to the
same runs in separate processes: lowering to ``ascend`` leaves onnx's process-wide schema registry alone.

The runs happen in two subprocesses (this file is their script), in opposite orders: in the first every
non-Ascend run comes after an Ascend lowering, in the second before it (as in a process of its own),
and the Ascend run comes first, then last. The ``check`` run is the sensitive one: it puts a model
holding default-domain Ascend nodes through ``onnx.checker`` (``verify_each: full``), which would pass
only after an Ascend lowering had registered the Ascend schemas with onnx.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STEPS = ("ascend", "qdq", "qat", "check")


def _ptq(targets: list[str]) -> dict:
    return {"schema_version": 1, "datasets": {"calib": {"reader": "npy", "batch_size": 4}},
            "passes": [{"pass": "fuse_bn"}, {"pass": "match_layers"},
                       {"pass": "calibrate", "options": {"algorithm": "minmax", "dataset": "calib"}},
                       {"pass": "quantize_weights"}, {"pass": "lower", "options": {"targets": targets}},
                       {"pass": "export_amct"}]}


def ascend_nodes_model() -> onnx.ModelProto:
    """Conv -> BatchNormalization -> AscendQuant -> AscendAntiQuant (default domain)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.ones(4, np.float32), "s"), numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(np.zeros(4, np.float32), "m"), numpy_helper.from_array(np.ones(4, np.float32), "v")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("AscendQuant", ["n"], ["q"], name="q", scale=10.0, offset=0.0),
             helper.make_node("AscendAntiQuant", ["q"], ["y"], name="aq", scale=0.1, offset=0.0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def run_steps(inputs: Path, out: Path, steps) -> dict:
    """Run ``steps`` in this process, one Session each; the outcome of each ("ok" or the error)."""
    from amct_pipeline.session import Session
    outcomes = {}
    for step in steps:
        session, target = Session(load_entrypoints=False), out / step
        try:
            if step in ("ascend", "qdq"):
                spec = _ptq(["fakequant", step])
                session.build(spec).run(str(inputs / "float.onnx"), datasets={"calib": str(inputs / "calib.npy")},
                                        output_dir=target)
            elif step == "qat":
                spec = {"schema_version": 1, "passes": [{"pass": "convert_qat"},
                                                        {"pass": "lower", "options": {"targets": ["fakequant"]}},
                                                        {"pass": "export_amct", "options": {"quant_config": None}},
                                                        {"pass": "save"}]}
                session.build(spec).run(str(inputs / "qdq.onnx"), output_dir=target)
            else:
                spec = {"schema_version": 1, "context": {"verify_each": "full"},
                        "passes": [{"pass": "fuse_bn"}, {"pass": "save"}]}
                session.build(spec).run(str(inputs / "ascend_nodes.onnx"), output_dir=target)
            outcomes[step] = "ok"
        except Exception as exc:           # the outcome is compared, whatever it is
            outcomes[step] = f"{type(exc).__name__}: {exc}"
    outcomes["registered"] = sorted(op for op in ("AscendQuant", "AscendDequant", "AscendAntiQuant")
                                    if onnx.defs.has(op, ""))
    return outcomes


def _subprocess(inputs: Path, out: Path, steps) -> dict:
    import amct_pipeline
    root = str(Path(amct_pipeline.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, __file__, str(inputs), str(out), *steps], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_two_sessions_in_one_process_equal_separate_processes(tmp_path):
    from amct_pipeline.demo import build_demo_data, build_demo_model
    from amct_pipeline.session import Session
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    onnx.save(build_demo_model(), str(inputs / "float.onnx"))
    np.save(inputs / "calib.npy", build_demo_data(8))
    onnx.save(ascend_nodes_model(), str(inputs / "ascend_nodes.onnx"))
    Session(load_entrypoints=False).build(_ptq(["qdq"])).run(
        str(inputs / "float.onnx"), datasets={"calib": str(inputs / "calib.npy")}, output_dir=tmp_path / "made")
    (tmp_path / "made" / "float_qdq_model.onnx").rename(inputs / "qdq.onnx")

    ascend_first = _subprocess(inputs, tmp_path / "first", STEPS)
    ascend_last = _subprocess(inputs, tmp_path / "last", STEPS[1:] + STEPS[:1])
    assert ascend_first == ascend_last
    assert ascend_first["registered"] == []
    assert ascend_first["ascend"] == ascend_first["qdq"] == ascend_first["qat"] == "ok"
    for step in STEPS:
        first, last = _files(tmp_path / "first" / step), _files(tmp_path / "last" / step)
        assert sorted(first) == sorted(last), step
        assert all(first[name] == last[name] for name in first), f"{step}: files differ"
    assert any(name.endswith("_deploy_model.onnx") for name in _files(tmp_path / "first" / "ascend"))


if __name__ == "__main__":     # the subprocess: INPUTS OUT STEP...
    print(json.dumps(run_steps(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])))
