"""Reading confinement: external data only from regular files inside the model's folder, read exactly."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.errors import ModelLoadError
from amct_pipeline.ir import load_graph
from amct_pipeline.ir.external import ExternalValues
from sec_helpers import conv_model, digests, one_error, run_cli, save_model, weight, write_external_model

SECRET = b"S" * weight().nbytes


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.bin"
    path.write_bytes(SECRET)
    return path


def _refused(capsys, tmp_path, model, expected):
    before = digests(model.parent)
    out = tmp_path / "out"
    line = one_error(capsys, "run", "save", "--model", model, "-o", out, "-q")
    assert "initializer 'w'" in line and expected in line, line
    assert not out.exists() and digests(model.parent) == before
    return line


def test_absolute_location_is_refused(capsys, tmp_path, secret):
    model = write_external_model(tmp_path / "m", str(secret))
    _refused(capsys, tmp_path, model, "is an absolute path")


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "..\\secret.bin"])
def test_dotdot_location_is_refused(capsys, tmp_path, secret, location):
    model = write_external_model(tmp_path / "m", location)
    (tmp_path / "m" / "sub").mkdir()
    _refused(capsys, tmp_path, model, "'..'")


def test_symlink_leaving_the_folder_is_refused(capsys, tmp_path, secret):
    model = write_external_model(tmp_path / "m", "link.bin")
    os.symlink(secret, tmp_path / "m" / "link.bin")
    line = _refused(capsys, tmp_path, model, "outside the model's folder")
    assert "link.bin" in line


def test_symlinked_folder_leaving_the_model_folder_is_refused(capsys, tmp_path, secret):
    model = write_external_model(tmp_path / "m", "d/secret.bin")
    os.symlink(tmp_path, tmp_path / "m" / "d")
    _refused(capsys, tmp_path, model, "outside the model's folder")


@pytest.mark.parametrize("location", ["/proc/self/environ", "/dev/zero", "/etc/hostname"])
def test_proc_and_device_files_are_refused(capsys, tmp_path, location):
    model = write_external_model(tmp_path / "m", location)
    _refused(capsys, tmp_path, model, "absolute path")


def test_device_reached_through_a_symlink_is_refused(capsys, tmp_path):
    model = write_external_model(tmp_path / "m", "zero.bin")
    os.symlink("/dev/zero", tmp_path / "m" / "zero.bin")
    _refused(capsys, tmp_path, model, "outside the model's folder")


def test_fifo_and_folder_inside_the_model_folder_are_refused(capsys, tmp_path):
    model = write_external_model(tmp_path / "m", "w.bin")
    os.mkfifo(tmp_path / "m" / "w.bin")
    _refused(capsys, tmp_path, model, "is a FIFO, not a regular file")
    model = write_external_model(tmp_path / "d", "w.bin")
    (tmp_path / "d" / "w.bin").mkdir()
    _refused(capsys, tmp_path, model, "is a directory, not a regular file")


def test_missing_and_empty_location(capsys, tmp_path):
    _refused(capsys, tmp_path, write_external_model(tmp_path / "a", "gone.bin"), "is missing")
    _refused(capsys, tmp_path, write_external_model(tmp_path / "b", ""), "is empty")


def test_truncated_file_is_an_error_naming_the_tensor(capsys, tmp_path):
    model = write_external_model(tmp_path / "m", "w.bin", weight().tobytes()[:100])
    line = _refused(capsys, tmp_path, model, "truncated")
    assert "w.bin" in line


def test_offset_or_length_past_the_end(capsys, tmp_path):
    data = weight().tobytes()
    _refused(capsys, tmp_path, write_external_model(tmp_path / "a", "w.bin", data, offset=10 ** 6), "truncated")
    _refused(capsys, tmp_path, write_external_model(tmp_path / "b", "w.bin", data, length=len(data) * 2),
             "does not match")
    _refused(capsys, tmp_path, write_external_model(tmp_path / "c", "w.bin", data, offset=-4), "negative")


def test_subfolder_inside_the_model_folder_is_allowed(capsys, tmp_path):
    model = write_external_model(tmp_path / "m", "weights/w.bin")
    (tmp_path / "m" / "weights").mkdir()
    (tmp_path / "m" / "weights" / "w.bin").write_bytes(weight().tobytes())
    code, err = run_cli(capsys, "run", "save", "--model", model, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    saved = onnx.load(str(tmp_path / "out" / "m.onnx"))
    assert np.array_equal(numpy_helper.to_array(saved.graph.initializer[0]), weight())


def test_truncation_after_loading_is_caught_on_read(tmp_path):
    """The file shrinks after the model was loaded: the lazy read is exact too (no zero fill)."""
    model = write_external_model(tmp_path / "m", "w.bin", weight().tobytes())
    graph = load_graph(model)
    values = graph.tensors()["w"]._values
    assert isinstance(values, ExternalValues)
    (tmp_path / "m" / "w.bin").write_bytes(weight().tobytes()[:64])
    for read in (values.inline, values.load, lambda: values.copy_to(open(os.devnull, "wb"))):
        with pytest.raises(ModelLoadError, match="'w'.*truncated"):
            read()


def test_external_data_in_a_subgraph_or_attribute_is_confined(tmp_path, secret):
    """Tensors outside the main initializers (Constant attributes) are checked and read in at load."""
    const = helper.make_node("Constant", [], ["k"], name="const", value=_external_scalar("../secret.bin"))
    model = conv_model()
    model.graph.node.insert(0, const)
    model.graph.output.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, [1]))
    path = save_model(model, tmp_path / "m" / "m.onnx")
    with pytest.raises(ModelLoadError, match="node 'const' attribute 'value'.*'..'"):
        load_graph(path)
    (tmp_path / "m" / "k.bin").write_bytes(np.float32(2.5).tobytes())
    model.graph.node[0].CopyFrom(helper.make_node("Constant", [], ["k"], name="const",
                                                  value=_external_scalar("k.bin")))
    save_model(model, path)
    graph = load_graph(path)
    assert float(graph.tensors()["k"].inputs[0].attrs["value"].values[0]) == 2.5


def _external_scalar(location: str) -> TensorProto:
    tensor = numpy_helper.from_array(np.array([0.0], np.float32), "kv")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


def test_inline_data_length_mismatch_and_duplicates(capsys, tmp_path):
    model = conv_model()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    line = one_error(capsys, "run", "save", "--model", save_model(model, tmp_path / "a.onnx"), "-o", tmp_path / "o")
    assert "initializer 'w'" in line and "raw_data holds 1724 bytes" in line and "1728" in line
    model = conv_model()
    model.graph.initializer.append(model.graph.initializer[1])
    line = one_error(capsys, "run", "save", "--model", save_model(model, tmp_path / "b.onnx"), "-o", tmp_path / "o")
    assert "initializer 'b' is defined twice" in line


def test_model_that_is_a_device_or_fifo_is_named_as_such(capsys, tmp_path):
    line = one_error(capsys, "run", "save", "--model", "/dev/zero", "-o", tmp_path / "o")
    assert "/dev/zero: is a character device, not a model file" in line and "no such" not in line
    os.mkfifo(tmp_path / "f.onnx")
    line = one_error(capsys, "run", "save", "--model", tmp_path / "f.onnx", "-o", tmp_path / "o")
    assert "is a FIFO, not a model file" in line


def test_unknown_data_types_are_located(capsys, tmp_path):
    model = conv_model()
    model.graph.initializer[1].data_type = 999
    line = one_error(capsys, "run", "save", "--model", save_model(model, tmp_path / "a.onnx"), "-o", tmp_path / "o")
    assert "initializer 'b': unknown data type 999" in line
    model = conv_model()
    model.graph.input[0].type.tensor_type.elem_type = 999
    line = one_error(capsys, "run", "save", "--model", save_model(model, tmp_path / "b.onnx"), "-o", tmp_path / "o")
    assert "input 'x' has unknown element type 999" in line
