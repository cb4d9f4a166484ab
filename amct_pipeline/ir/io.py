"""Reading and writing model files: clear errors in, atomic writes out, external data over 2 GB."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..errors import ModelLoadError
from .external import ExternalValues, external_info, is_external

__all__ = ["read_model", "write_model", "export_proto", "atomic_path", "EXTERNAL_THRESHOLD"]

EXTERNAL_THRESHOLD = (2 << 30) - (64 << 20)   # protobuf's 2 GiB limit, with room for the graph
MIN_IR_VERSION = 4                            # IR < 4 requires initializers listed as inputs; never written
MIN_EXTERNAL_BYTES = 1024                     # small constants stay inline, as onnx does


def read_model(path: Path) -> onnx.ModelProto:
    """Parse a model file without loading external data (ExternalValues read it on demand)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty; expected an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(exc)}); "
                             "check that the file is complete") from None
    if not model.graph.node or not model.opset_import:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes or no opset); "
                             "check that the file is complete")
    _check_external_files(model, path)
    return model


def _check_external_files(model: onnx.ModelProto, path: Path) -> None:
    for tensor in model.graph.initializer:
        if is_external(tensor):
            location = path.parent / external_info(tensor).get("location", "")
            if not location.is_file():
                raise ModelLoadError(f"{path}: initializer '{tensor.name}' keeps its data in "
                                     f"{location.name}, which is missing; put it beside the model")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


StubWriter = Callable[[gs.Constant], onnx.TensorProto]


def export_proto(graph, external: StubWriter | None = None) -> onnx.ModelProto:
    """Export a Graph. With ``external``, big constants are streamed out and replaced by stubs."""
    swapped = []
    for tensor in graph.gs.tensors().values():
        if not isinstance(tensor, gs.Constant):
            continue
        values = tensor._values
        if external is not None and _nbytes(tensor) >= MIN_EXTERNAL_BYTES and _raw_bytes(values):
            stub = external(tensor)
        elif isinstance(values, ExternalValues):
            stub = values.inline()
        else:
            continue
        swapped.append((tensor, values))
        tensor._values = LazyValues(stub)
    try:
        model = gs.export_onnx(graph.gs, do_type_check=False)
    finally:
        for tensor, values in swapped:
            tensor._values = values
    _stamp(model, graph)
    return model


def _raw_bytes(values) -> bool:
    """Whether the values are plain fixed-size elements (strings can't go to external data)."""
    if isinstance(values, LazyValues):
        return values.tensor.data_type != onnx.TensorProto.STRING
    return getattr(values, "dtype", None) is not None and values.dtype.kind not in "OSUV"


def _nbytes(tensor: gs.Constant) -> int:
    values = tensor._values
    return int(values.nbytes) if values is not None else 0


def _stamp(model: onnx.ModelProto, graph) -> None:
    meta = graph.meta
    model.ir_version = max(meta.ir_version, MIN_IR_VERSION)
    model.producer_name = meta.producer_name or "amct-pipeline"
    model.producer_version = meta.producer_version
    model.domain, model.model_version, model.doc_string = meta.domain, meta.model_version, meta.doc_string
    del model.metadata_props[:]
    for key in sorted(meta.metadata):
        model.metadata_props.add(key=key, value=meta.metadata[key])


def model_nbytes(graph) -> int:
    return sum(_nbytes(t) for t in graph.gs.tensors().values() if isinstance(t, gs.Constant))


def write_model(graph, path: Path, *, external: bool | None = None) -> list[Path]:
    """Write atomically; external data (``<name>.data``) when over 2 GB or asked. Returns files."""
    path = Path(path)
    use_external = model_nbytes(graph) > EXTERNAL_THRESHOLD if external is None else external
    if not use_external:
        model = export_proto(graph)
        with atomic_path(path) as tmp:
            tmp.write_bytes(model.SerializeToString(deterministic=True))
        return [path]
    data_path = path.with_name(path.name + ".data")
    with atomic_path(data_path) as tmp_data, open(tmp_data, "wb") as out:
        model = export_proto(graph, _stub_writer(out, data_path.name))
    with atomic_path(path) as tmp:
        tmp.write_bytes(model.SerializeToString(deterministic=True))
    return [path, data_path]


def _stub_writer(out, location: str) -> StubWriter:
    def write(tensor: gs.Constant) -> onnx.TensorProto:
        values = tensor._values
        offset = out.tell()
        if isinstance(values, ExternalValues):
            values.copy_to(out)
            stub = _stub_like(values.tensor)
        else:
            array = tensor.values
            out.write(memoryview(array.reshape(-1).view("uint8")) if array.flags.c_contiguous else array.tobytes())
            # a bare stub: onnx.helper.make_tensor(raw=True) insists on the bytes being there
            stub = onnx.TensorProto()
            stub.name, stub.data_type = tensor.name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            stub.dims.extend(array.shape)
        length = out.tell() - offset
        stub.data_location = onnx.TensorProto.EXTERNAL
        del stub.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            stub.external_data.add(key=key, value=value)
        return stub
    return write


def _stub_like(tensor: onnx.TensorProto) -> onnx.TensorProto:
    stub = onnx.TensorProto()
    stub.name, stub.data_type = tensor.name, tensor.data_type
    stub.dims.extend(tensor.dims)
    return stub


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())     # mkstemp's 0600 would make outputs private
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
