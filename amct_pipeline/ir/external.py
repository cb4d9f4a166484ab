"""Constants whose bytes stay in an external-data file until a pass reads them.

Keeps peak memory near the size of what passes touch, not the size of the model. The file is
checked when the tensor is attached (inside the model's folder, a regular file, offset and length
within it, length matching the tensor's shape) and every read is exact, so a truncated file is an
error naming the tensor, never zero-filled weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..errors import ModelLoadError
from ..files import external_data_path, open_regular, read_exact

__all__ = ["ExternalValues", "external_info", "is_external", "expected_nbytes", "checked_location"]

# element types stored two per byte
PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's raw data must have, from its dims and type; None when not fixed-size."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    if tensor.data_type in PACKED_4BIT:
        return (count + 1) // 2
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return count * itemsize


def checked_location(tensor: onnx.TensorProto, base_dir: str | os.PathLike, where: str) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor, every field checked against the file."""
    info = external_info(tensor)
    path = external_data_path(base_dir, info.get("location", ""), where)
    if tensor.data_type == onnx.TensorProto.STRING:
        raise ModelLoadError(f"{where}: STRING tensors cannot keep their data externally ({path.name})")
    if any(int(d) < 0 for d in tensor.dims):
        raise ModelLoadError(f"{where}: negative dimension in dims {list(tensor.dims)}")
    expected = expected_nbytes(tensor)
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else expected
    except ValueError:
        raise ModelLoadError(f"{where}: external data offset/length {info.get('offset')!r}/{info.get('length')!r} "
                             f"in {path.name} are not integers") from None
    if length is None:
        raise ModelLoadError(f"{where}: data type {tensor.data_type} has no fixed size; cannot read {path.name}")
    if offset < 0 or length < 0:
        raise ModelLoadError(f"{where}: negative external data offset or length ({offset}, {length}) in {path.name}")
    if expected is not None and length != expected:
        raise ModelLoadError(f"{where}: external data length {length} in {path.name} does not match the "
                             f"{expected} bytes of dims {list(tensor.dims)}")
    size = path.stat().st_size
    if offset + length > size:
        raise ModelLoadError(f"{where}: external data in {path.name} ends at byte {offset + length} but the file "
                             f"has {size} bytes; it is truncated (an incomplete download?) or the offset is wrong")
    return path, offset, length


class ExternalValues(LazyValues):
    """LazyValues that know where their external-data file lives (checked: see ``checked_location``)."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: str | os.PathLike, where: str | None = None) -> None:
        super().__init__(tensor)
        self.where = where or f"initializer '{tensor.name}'"
        self.path, self.offset, self.length = checked_location(tensor, base_dir, self.where)
        self.np_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))

    def _open(self):
        return open_regular(self.path, f"{self.where}: external data")

    def _short(self, got: int) -> ModelLoadError:
        return ModelLoadError(f"{self.where}: external data in {self.path.name} is truncated: {got} of "
                              f"{self.length} bytes at offset {self.offset}")

    def load(self) -> np.ndarray:
        if self.tensor.data_type in PACKED_4BIT:
            return np.array(onnx.numpy_helper.to_array(self.inline()))
        count = self.length // self.np_dtype.itemsize
        with self._open() as handle:
            handle.seek(self.offset)
            data = np.fromfile(handle, dtype=self.np_dtype, count=count)
        if data.size != count:
            raise self._short(data.size * self.np_dtype.itemsize)
        return data.reshape(self.shape)

    def copy_to(self, out, chunk: int = 64 << 20) -> None:
        """Stream the raw bytes into an open file without holding them all in memory."""
        with self._open() as handle:
            handle.seek(self.offset)
            left = self.length
            while left:
                block = handle.read(min(chunk, left))
                if not block:
                    raise self._short(self.length - left)
                out.write(block)
                left -= len(block)

    def inline(self) -> onnx.TensorProto:
        """A copy of the tensor with its bytes read in (raw_data); a short read is an error."""
        proto = onnx.TensorProto()
        proto.CopyFrom(self.tensor)
        del proto.external_data[:]
        proto.data_location = onnx.TensorProto.DEFAULT
        with self._open() as handle:
            proto.raw_data = read_exact(handle, self.offset, self.length, f"{self.where}: external data in "
                                        f"{self.path.name}")
        return proto
