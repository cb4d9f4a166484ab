"""Constants whose bytes stay in an external-data file until a pass reads them.

Keeps peak memory near the size of what passes touch, not the size of the model.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx_graphsurgeon.ir.tensor import LazyValues

__all__ = ["ExternalValues", "external_info", "is_external"]


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


class ExternalValues(LazyValues):
    """LazyValues that know where their external-data file lives."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: str | os.PathLike) -> None:
        super().__init__(tensor)
        info = external_info(tensor)
        self.path = Path(base_dir) / info["location"]
        self.offset = int(info.get("offset", 0))
        self.np_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        self.length = int(info.get("length", int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize))

    def load(self) -> np.ndarray:
        count = self.length // self.np_dtype.itemsize
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = np.fromfile(handle, dtype=self.np_dtype, count=count)
        if data.size != count:
            raise ValueError(f"external data of '{self.tensor.name}' in {self.path} is truncated")
        return data.reshape(self.shape)

    def copy_to(self, out, chunk: int = 64 << 20) -> None:
        """Stream the raw bytes into an open file without holding them all in memory."""
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            left = self.length
            while left:
                block = handle.read(min(chunk, left))
                if not block:
                    raise ValueError(f"external data of '{self.tensor.name}' in {self.path} is truncated")
                out.write(block)
                left -= len(block)

    def inline(self) -> onnx.TensorProto:
        """A copy of the tensor with its bytes read in (raw_data)."""
        proto = onnx.TensorProto()
        proto.CopyFrom(self.tensor)
        del proto.external_data[:]
        proto.data_location = onnx.TensorProto.DEFAULT
        buffer = bytearray(self.length)
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            handle.readinto(buffer)
        proto.raw_data = bytes(buffer)
        return proto
