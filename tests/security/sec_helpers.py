"""Small models and a CLI runner for the security tests (all built in memory, milliseconds each)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.cli.main import main as cli_main

from conftest import shared_path  # noqa: F401  (re-exported for the security tests)

WEIGHT_SHAPE = (16, 3, 3, 3)


def weight() -> np.ndarray:
    return (np.arange(np.prod(WEIGHT_SHAPE), dtype=np.float32).reshape(WEIGHT_SHAPE) - 200) / 400


def conv_model(w_tensor: TensorProto | None = None, *, batch: int | str = 1) -> onnx.ModelProto:
    """x[batch,3,8,8] -> Conv(w, pads 1) -> Relu -> y; ``w_tensor`` replaces the inline weight."""
    w = w_tensor if w_tensor is not None else numpy_helper.from_array(weight(), "w")
    b = numpy_helper.from_array(np.linspace(-0.1, 0.1, WEIGHT_SHAPE[0]).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, WEIGHT_SHAPE[0], 8, 8])],
        initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def external_weight(location: str, *, offset: int = 0, length: int | None = None) -> TensorProto:
    tensor = numpy_helper.from_array(weight(), "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="offset", value=str(offset))
    if length is not None:
        tensor.external_data.add(key="length", value=str(length))
    return tensor


def write_external_model(folder: Path, location: str, data: bytes | None = None, **kwargs) -> Path:
    """``folder/m.onnx`` whose weight 'w' lives at ``location``; ``data`` is written there if given."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    path.write_bytes(conv_model(external_weight(location, **kwargs)).SerializeToString())
    if data is not None:
        (folder / location).write_bytes(data)
    return path


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def run_cli(capsys, *args) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of the CLI run in this process (no plugins)."""
    code = cli_main([*map(str, args), "--no-plugins"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def one_error(capsys, *args) -> str:
    """Run the CLI, expect exit 1 with exactly one 'amct-pipeline: error:' line; return it."""
    code, err = run_cli(capsys, *args)
    errors = [line for line in err if line.startswith("amct-pipeline: error:")]
    assert code == 1 and len(errors) == 1, (code, err)
    assert "internal error" not in errors[0] and "Traceback" not in "\n".join(err)
    return errors[0]


def digests(*paths: Path) -> dict[str, str]:
    """sha256 of every file at or under the paths (to show inputs are byte-identical afterwards)."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def visible(folder: Path) -> set[str]:
    """Names in a folder (hidden ones included) or an empty set when it does not exist."""
    return {p.name for p in folder.iterdir()} if folder.exists() else set()
