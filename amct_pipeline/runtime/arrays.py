"""Sample arrays read lazily from .npy / .npz files: only the samples used are read.

* ``.npy``: memory-mapped, exactly as ``np.load(mmap_mode="r")``; the header is checked against
  the file size first (a header claiming more bytes than the file holds is an error).
* ``.npz``: each member's header is read (a few hundred bytes decompressed) and checked against the
  member's size in the zip directory; samples are then streamed out of the member on demand
  (``NpzArray[lo:hi]`` decompresses up to sample ``hi`` only, never the whole member at once).
* A directory of files is one dataset split into shards along the sample axis (``ShardedArray``).

Every refusal is a ``DataError`` naming the dataset and file: 0-d arrays, negative dimensions,
object (pickled) arrays, sizes that do not match, FIFOs and devices (opened without blocking).
"""
from __future__ import annotations

import os
import weakref
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import DataError
from ..files import open_regular

__all__ = ["read_arrays", "read_directory", "NpzArray", "ShardedArray", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 10000          # numpy's own limit for an .npy header
SKIP_CHUNK = 1 << 20              # bytes decompressed and dropped at a time when moving forward in a member


def _header(handle, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from an .npy header, checked; ``handle`` is left at the data."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(handle, max_header_size=MAX_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(handle, max_header_size=MAX_HEADER_BYTES)
        else:
            from numpy.lib import _format_impl
            shape, fortran, dtype = _format_impl._read_array_header(handle, version, MAX_HEADER_BYTES)
    except Exception as exc:         # numpy parses the header with Python's tokenizer: any error means "bad header"
        raise DataError(f"{what}: not a valid .npy array ({type(exc).__name__}: {_first_line(exc)})") from None
    if dtype.hasobject:
        raise DataError(f"{what}: holds Python objects (a pickle); only plain numeric arrays are read")
    if len(shape) == 0:
        raise DataError(f"{what}: holds a 0-d array (a single value); expected samples [N, ...]")
    if any(d < 0 for d in shape):
        raise DataError(f"{what}: the header claims a negative dimension in shape {shape}")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _nbytes(shape: Sequence[int], dtype: np.dtype) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * dtype.itemsize


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# -- .npy ----------------------------------------------------------------------------------------------
def _read_npy(name: str, path: Path) -> np.ndarray:
    what = f"dataset '{name}': {path}"
    with open_regular(path, f"dataset '{name}'", DataError) as handle:
        shape, fortran, dtype = _header(handle, what)
        offset = handle.tell()
        size = os.fstat(handle.fileno()).st_size
        need = _nbytes(shape, dtype)
        if offset + need > size:
            raise DataError(f"{what}: the header claims shape {shape} of {dtype} ({need} bytes) but the file holds "
                            f"{max(size - offset, 0)} bytes of data; it is truncated or corrupt")
        if need == 0:
            return np.empty(shape, dtype=dtype, order="F" if fortran else "C")
        return np.memmap(handle, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


# -- .npz ----------------------------------------------------------------------------------------------
class _LazyRows:
    """An array read only where sliced along axis 0 (``shape``, ``dtype`` and ``_rows`` from subclasses)."""

    shape: tuple
    dtype: np.dtype
    ndim = property(lambda self: len(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, slice):
            return self[:][key]
        lo, hi, step = key.indices(len(self))
        if step != 1:
            return self[lo:hi][::step] if hi > lo else self[lo:lo]
        return self._rows(lo, hi)

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        raise NotImplementedError


class NpzArray(_LazyRows):
    """One member of an .npz, sliced along axis 0 by streaming only the needed bytes out of the zip."""

    def __init__(self, archive: zipfile.ZipFile, member: zipfile.ZipInfo, what: str) -> None:
        self.archive, self.member, self.what = archive, member, what
        with archive.open(member) as stream:
            self.shape, self.fortran, self.dtype = _header(stream, what)
            self.data_offset = stream.tell()
        need = _nbytes(self.shape, self.dtype)
        held = member.file_size - self.data_offset
        if need != held:
            raise DataError(f"{what}: the header claims shape {self.shape} of {self.dtype} ({need} bytes) but the "
                            f"member holds {held} bytes of data")
        self.row_bytes = _nbytes(self.shape[1:], self.dtype)
        self._stream = None
        self._whole: np.ndarray | None = None

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        hi = max(hi, lo)
        if self.fortran:                    # samples are not contiguous: the whole member, once
            if self._whole is None:
                with self.archive.open(self.member) as stream:
                    stream.seek(self.data_offset)
                    self._whole = self._frombytes(self._read(stream, _nbytes(self.shape, self.dtype)),
                                                  self.shape, order="F")
            return self._whole[lo:hi]
        start = self.data_offset + lo * self.row_bytes
        stream = self._stream_at(start)
        data = self._read(stream, (hi - lo) * self.row_bytes)
        return self._frombytes(data, (hi - lo,) + self.shape[1:])

    def _stream_at(self, position: int):
        """The member's stream at ``position``: forward moves decompress and drop, backward reopens."""
        if self._stream is None or self._stream.tell() > position:
            if self._stream is not None:
                self._stream.close()
            self._stream = self.archive.open(self.member)
        left = position - self._stream.tell()
        while left > 0:                     # zipfile's own seek reads 16 MiB at a time; 1 MiB is enough
            skipped = len(self._stream.read(min(left, SKIP_CHUNK)))
            if not skipped:
                raise DataError(f"{self.what}: the member ends before byte {position}; the file is truncated")
            left -= skipped
        return self._stream

    def _read(self, stream, length: int) -> bytearray:
        buffer = bytearray(length)
        view, got = memoryview(buffer), 0
        while got < length:
            n = stream.readinto(view[got:])
            if not n:
                raise DataError(f"{self.what}: the member ends after {got} of {length} bytes; the file is truncated")
            got += n
        return buffer

    def _frombytes(self, data: bytearray, shape: tuple, order: str = "C") -> np.ndarray:
        return np.frombuffer(data, dtype=self.dtype).reshape(shape, order=order)


def _read_npz(name: str, path: Path) -> dict[str, NpzArray]:
    handle = open_regular(path, f"dataset '{name}'", DataError)
    try:
        archive = zipfile.ZipFile(handle)
        weakref.finalize(archive, handle.close)       # the arrays keep the archive (and file) open
        arrays = {}
        for member in archive.infolist():
            if member.is_dir() or not member.filename.endswith(".npy"):
                continue
            key = member.filename[:-4]
            if key in arrays:
                raise DataError(f"dataset '{name}': {path} holds array '{key}' twice; which one is meant is unclear")
            arrays[key] = NpzArray(archive, member, f"dataset '{name}': {path}: array '{key}'")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        handle.close()
        raise DataError(f"dataset '{name}': cannot read {path}: {_first_line(exc)}") from None
    except BaseException:
        handle.close()
        raise
    if not arrays:
        raise DataError(f"dataset '{name}': {path} holds no arrays (.npy members)")
    return arrays


def read_arrays(name: str, path: Path) -> dict[str, Any]:
    """Arrays of one .npy (named by its stem) or .npz file, all read lazily."""
    path = Path(path)
    if path.suffix == ".npy":
        return {path.stem: _read_npy(name, path)}
    return _read_npz(name, path)


# -- shards ----------------------------------------------------------------------------------------------
class ShardedArray(_LazyRows):
    """Arrays concatenated along axis 0 without reading them: slices gather from the shards."""

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.starts[-1]),) + tuple(self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        pieces = []
        for part, start, end in zip(self.parts, self.starts[:-1], self.starts[1:]):
            a, b = max(lo, start), min(hi, end)
            if a < b:
                pieces.append(np.asarray(part[a - start:b - start]))
        if not pieces:
            return np.empty((0,) + self.shape[1:], dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def read_directory(name: str, folder: Path) -> tuple[dict[str, Any], list[Path]]:
    """A folder of .npy or .npz shards, in file-name order: (arrays by name, files read).

    ``.npy`` shards are one array (named after the folder); ``.npz`` shards must hold the same array
    names. Shards must agree in dtype and in every dimension but the first.
    """
    from ..files import file_kind
    entries = sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".npz"))
    if not entries:
        raise DataError(f"dataset '{name}': {folder} holds no .npy or .npz file")
    for entry in entries:
        kind = file_kind(os.stat(entry).st_mode) if entry.exists() else "broken link"
        if kind != "regular file":
            raise DataError(f"dataset '{name}': {entry} is a {kind}, not a regular file")
    suffixes = {p.suffix for p in entries}
    if len(suffixes) > 1:
        raise DataError(f"dataset '{name}': {folder} mixes .npy and .npz files; use one kind of shard")
    if suffixes == {".npy"}:
        parts = [{folder.name: _read_npy(name, p)} for p in entries]
    else:
        parts = [_read_npz(name, p) for p in entries]
        keys = list(parts[0])
        for part, entry in zip(parts[1:], entries[1:]):
            if set(part) != set(keys):
                raise DataError(f"dataset '{name}': {entry.name} holds arrays {sorted(part)} but {entries[0].name} "
                                f"holds {sorted(keys)}; every .npz shard must hold the same array names")
    arrays = {}
    for key in parts[0]:
        shards = [p[key] for p in parts]
        _check_shards(name, key, shards, entries)
        arrays[key] = shards[0] if len(shards) == 1 else ShardedArray(shards)
    return arrays, entries


def _check_shards(name: str, key: str, shards: Sequence[Any], files: Sequence[Path]) -> None:
    first = shards[0]
    for shard, file in zip(shards[1:], files[1:]):
        if shard.dtype != first.dtype or tuple(shard.shape[1:]) != tuple(first.shape[1:]):
            raise DataError(f"dataset '{name}': array '{key}' in {file.name} is {shard.dtype} {tuple(shard.shape)} "
                            f"but in {files[0].name} {first.dtype} {tuple(first.shape)}; shards must agree "
                            "in dtype and in every dimension after the first")


def describe(arrays: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {tuple(a.shape)}" for k, a in arrays.items())
