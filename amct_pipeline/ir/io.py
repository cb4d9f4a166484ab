"""Reading and writing model files: clear errors in, atomic writes out, external data over 2 GB."""
from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..errors import ModelLoadError
from ..files import file_kind, open_regular, read_exact
from .external import ExternalValues, checked_location, expected_nbytes, is_external

__all__ = ["read_model", "write_model", "export_proto", "atomic_path", "EXTERNAL_THRESHOLD"]

EXTERNAL_THRESHOLD = (2 << 30) - (64 << 20)   # protobuf's 2 GiB limit, with room for the graph
MIN_IR_VERSION = 4                            # IR < 4 requires initializers listed as inputs; never written
MIN_EXTERNAL_BYTES = 1024                     # small constants stay inline, as onnx does


def read_model(path: Path) -> onnx.ModelProto:
    """Parse a model file without loading external data (ExternalValues read it on demand).

    Every tensor is checked before anything uses it: external data inside the model's folder and
    long enough, inline data as long as the tensor's dims say, no initializer defined twice.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such model file") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the model ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{path}: is a {file_kind(info.st_mode)}, not a model file; give an .onnx file")
    if info.st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty; expected an ONNX model")
    try:
        with open_regular(path, str(path)) as handle:
            model = onnx.load_model_from_string(handle.read())
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(exc)}); "
                             "check that the file is complete") from None
    if not model.graph.node or not model.opset_import:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes or no opset); "
                             "check that the file is complete")
    _check_tensors(model, path)
    return model


def _check_tensors(model: onnx.ModelProto, path: Path) -> None:
    """Check every tensor's data; inline the external data of tensors outside the main initializers."""
    seen: set[str] = set()
    for tensor in model.graph.initializer:
        if tensor.name in seen:
            raise ModelLoadError(f"{path}: initializer '{tensor.name}' is defined twice; names must be unique")
        seen.add(tensor.name)
    _check_value_types(model.graph, path, "")
    for tensor, where, main in _all_tensors(model.graph, ""):
        label = f"{path}: {where}"
        if tensor.data_type not in _KNOWN_TYPES or tensor.data_type == onnx.TensorProto.UNDEFINED:
            raise ModelLoadError(f"{label}: unknown data type {tensor.data_type}")
        if is_external(tensor):
            location, offset, length = checked_location(tensor, path.parent, label)
            if not main:       # subgraph/attribute tensors: read now, checked, not lazily
                with open_regular(location, f"{label}: external data") as handle:
                    raw = read_exact(handle, offset, length, f"{label}: external data in {location.name}")
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = raw
        else:
            _check_inline(tensor, label)


_KNOWN_TYPES = frozenset(onnx.TensorProto.DataType.values())


def _check_value_types(graph: onnx.GraphProto, path: Path, prefix: str) -> None:
    """Element types of inputs, outputs and value_info (subgraphs too) must be ONNX types."""
    for kind, values in (("input", graph.input), ("output", graph.output), ("value_info", graph.value_info)):
        for value in values:
            for field in ("tensor_type", "sparse_tensor_type"):
                if value.type.HasField(field):
                    elem = getattr(value.type, field).elem_type
                    if elem not in _KNOWN_TYPES:
                        raise ModelLoadError(f"{path}: {prefix}{kind} '{value.name}' has unknown element type {elem}")
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _check_value_types(sub, path, f"{prefix}node '{node.name or node.op_type}' subgraph: ")


def _all_tensors(graph: onnx.GraphProto, prefix: str) -> Iterator[tuple[onnx.TensorProto, str, bool]]:
    """Every TensorProto of a graph and its subgraphs (initializers, node attributes), with a label
    and whether it is an initializer of the main graph (those keep their external data lazily)."""
    for tensor in graph.initializer:
        yield tensor, f"{prefix}initializer '{tensor.name}'", not prefix
    for sparse in graph.sparse_initializer:
        yield sparse.values, f"{prefix}sparse initializer '{sparse.values.name}'", False
        yield sparse.indices, f"{prefix}sparse initializer '{sparse.values.name}' (indices)", False
    for node in graph.node:
        for attr in node.attribute:
            where = f"{prefix}node '{node.name or node.op_type}' attribute '{attr.name}'"
            if attr.HasField("t"):
                yield attr.t, where, False
            for tensor in attr.tensors:
                yield tensor, where, False
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values, where, False
                yield attr.sparse_tensor.indices, where, False
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_tensors(sub, f"{where} (subgraph '{sub.name}') ")


# typed-data field and values per element, for the types stored outside raw_data
_TYPED = {onnx.TensorProto.FLOAT: ("float_data", 1), onnx.TensorProto.COMPLEX64: ("float_data", 2),
          onnx.TensorProto.DOUBLE: ("double_data", 1), onnx.TensorProto.COMPLEX128: ("double_data", 2),
          onnx.TensorProto.INT64: ("int64_data", 1), onnx.TensorProto.UINT32: ("uint64_data", 1),
          onnx.TensorProto.UINT64: ("uint64_data", 1)}
for _name in ("INT32", "INT16", "INT8", "UINT16", "UINT8", "BOOL", "FLOAT16", "BFLOAT16"):
    _TYPED[getattr(onnx.TensorProto, _name)] = ("int32_data", 1)


def _check_inline(tensor: onnx.TensorProto, where: str) -> None:
    """raw_data (or the typed field) must hold exactly the elements the dims announce."""
    if any(int(d) < 0 for d in tensor.dims):
        raise ModelLoadError(f"{where}: negative dimension in dims {list(tensor.dims)}")
    if tensor.HasField("raw_data"):
        expected = expected_nbytes(tensor)
        if expected is not None and len(tensor.raw_data) != expected:
            raise ModelLoadError(f"{where}: raw_data holds {len(tensor.raw_data)} bytes but dims "
                                 f"{list(tensor.dims)} of type {_type_name(tensor.data_type)} need {expected}")
        return
    field, per = _TYPED.get(tensor.data_type, (None, 1))
    if field is None:
        return
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    held = len(getattr(tensor, field))
    if held != count * per:
        raise ModelLoadError(f"{where}: {field} holds {held} values but dims {list(tensor.dims)} need {count * per}")


def _type_name(data_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return str(data_type)


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
        elif isinstance(values, LazyValues) and values.tensor.HasField("raw_data"):
            out.write(values.tensor.raw_data)      # packed types (INT4) keep their packing
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
