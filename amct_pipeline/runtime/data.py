"""Data readers: named datasets become batches of feed dicts mapped to the model's inputs."""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .spec import DatasetSpec, Preprocess

__all__ = ["InputInfo", "DataReader", "DataSource", "ActivationSource", "NpyReader", "PythonReader", "IterableSource",
           "ArraySource", "open_datasets", "model_inputs"]


@dataclass(frozen=True)
class InputInfo:
    name: str
    shape: tuple            # ints for fixed dims, None for symbolic ones
    dtype: np.dtype

    @property
    def fixed_batch(self) -> int | None:
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) and self.shape[0] > 0 else None


def model_inputs(graph) -> list[InputInfo]:
    """Name, shape and dtype of each input; an input without type or shape is an error naming it."""
    out = []
    for tensor in graph.gs.inputs:
        if tensor.dtype is None:
            raise DataError(f"model input '{tensor.name}' has no element type in the model, so no data can be "
                            "fed to it; give the input a type (e.g. float32) in the model")
        try:
            dtype = np.dtype(tensor.dtype)
        except TypeError:
            raise DataError(f"model input '{tensor.name}' has type {tensor.dtype}, which numpy cannot hold") from None
        if tensor.shape is None:
            raise DataError(f"model input '{tensor.name}' has no shape in the model (not even its rank), so data "
                            "cannot be checked against it and onnx.checker refuses the model; give the input a "
                            "shape, e.g. [N, 3, 224, 224] with N symbolic")
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in tensor.shape)
        out.append(InputInfo(tensor.name, shape, dtype))
    return out


class DataSource:
    """Yields feed dicts for a model's inputs. ``name`` is the dataset name (for messages)."""

    name: str = "data"

    def batches(self, inputs: Sequence[InputInfo]) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def num_batches(self, inputs: Sequence[InputInfo]) -> int | None:
        return None


class ActivationSource(DataSource):
    """A dataset of activations computed elsewhere: ``activations(names, num_batches)`` yields
    ``{tensor: array}`` per batch, so calibration needs no session of its own (the AMCT API's
    calibration inside the user's onnxruntime loop). It cannot feed model inputs."""

    def activations(self, names: Sequence[str], num_batches: int | None) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def batches(self, inputs: Sequence[InputInfo]) -> Iterator[dict[str, np.ndarray]]:
        raise DataError(f"dataset '{self.name}' holds activations of a calibration model, not model inputs; "
                        "this pass needs input data (e.g. an .npy file)")


class DataReader:
    """A registered reader: turns a DatasetSpec into a DataSource."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""

    def open(self, name: str, spec: DatasetSpec, base_dir: Path) -> DataSource:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
class ArraySource(DataSource):
    """Batches cut from named arrays ([N, ...] each), memory-mapped where the format allows."""

    def __init__(self, name: str, arrays: Mapping[str, Any], spec: DatasetSpec, origin: str) -> None:
        self.name, self.arrays, self.spec, self.origin = name, dict(arrays), spec, origin
        lengths = {len(a) for a in self.arrays.values()}
        if len(lengths) != 1:
            raise DataError(f"dataset '{name}' ({origin}): arrays have different sample counts {sorted(lengths)}")
        total = lengths.pop()
        self.start = min(spec.start, total)
        self.count = total - self.start if spec.count is None else min(spec.count, total - self.start)

    def _binding(self, inputs: Sequence[InputInfo]) -> dict[str, str]:
        """Model input name -> array name."""
        if self.spec.inputs:
            unknown = [i for i in self.spec.inputs if i not in {x.name for x in inputs}]
            missing = [a for a in self.spec.inputs.values() if a not in self.arrays]
            if unknown or missing:
                raise DataError(f"dataset '{self.name}': inputs mapping names model input(s) {unknown} "
                                f"or array(s) {missing} that do not exist; arrays: {sorted(self.arrays)}")
            return dict(self.spec.inputs)
        if len(inputs) == 1:
            key = self.spec.key or (next(iter(self.arrays)) if len(self.arrays) == 1 else None)
            if key is None:
                key = inputs[0].name if inputs[0].name in self.arrays else None
            if key is None or key not in self.arrays:
                raise DataError(f"dataset '{self.name}' ({self.origin}) holds arrays {sorted(self.arrays)}; "
                                f"say which feeds input '{inputs[0].name}' with key: NAME")
            return {inputs[0].name: key}
        missing = [i.name for i in inputs if i.name not in self.arrays]
        if missing:
            raise DataError(f"dataset '{self.name}' ({self.origin}) has no array for input(s) {missing}; "
                            "name arrays after the inputs or give an 'inputs' mapping")
        return {i.name: i.name for i in inputs}

    def _batch_size(self, inputs: Sequence[InputInfo]) -> int:
        fixed = {i.fixed_batch for i in inputs if i.fixed_batch}
        return fixed.pop() if len(fixed) == 1 else self.spec.batch_size

    def num_batches(self, inputs: Sequence[InputInfo]) -> int:
        size = self._batch_size(inputs)
        fixed = any(i.fixed_batch for i in inputs)
        available = self.count // size if fixed else math.ceil(self.count / size)
        return available if self.spec.num_batches is None else self.spec.num_batches

    def batches(self, inputs: Sequence[InputInfo]) -> Iterator[dict[str, np.ndarray]]:
        binding = self._binding(inputs)
        size = self._batch_size(inputs)
        wanted = self.num_batches(inputs)
        fixed = any(i.fixed_batch for i in inputs)
        available = self.count // size if fixed else math.ceil(self.count / size)
        if wanted > available:
            raise DataError(f"dataset '{self.name}' ({self.origin}) has {self.count} samples, "
                            f"{available} batches of {size}; {wanted} batches were asked for")
        info = {i.name: i for i in inputs}
        for b in range(wanted):
            lo = self.start + b * size
            hi = min(lo + size, self.start + self.count)
            yield {inp: conform(self.name, info[inp], preprocess(np.asarray(self.arrays[arr][lo:hi]), self.spec.preprocess))
                   for inp, arr in binding.items()}


def preprocess(batch: np.ndarray, spec: Preprocess | None) -> np.ndarray:
    if spec is None:
        return batch
    if spec.add_channel_axis:
        batch = batch[:, None]
    if spec.layout == "nhwc_to_nchw" and batch.ndim == 4:
        batch = batch.transpose(0, 3, 1, 2)
    batch = batch.astype(spec.dtype)
    if spec.scale != 1.0:
        batch = batch * np.asarray(spec.scale, dtype=batch.dtype)
    shape = (1, -1) + (1,) * (batch.ndim - 2)
    if spec.mean is not None:
        batch = batch - np.asarray(spec.mean, dtype=batch.dtype).reshape(shape)
    if spec.std is not None:
        batch = batch / np.asarray(spec.std, dtype=batch.dtype).reshape(shape)
    return np.ascontiguousarray(batch)


def conform(dataset: str, info: InputInfo, batch: np.ndarray) -> np.ndarray:
    """Check a batch against the model input; the error names the input and both shapes."""
    expected = tuple("?" if d is None else d for d in info.shape)
    ok = batch.ndim == len(info.shape) and all(d is None or d == s for d, s in zip(info.shape, batch.shape))
    if not ok:
        raise DataError(f"dataset '{dataset}': input '{info.name}' expects shape {expected}, "
                        f"data has {tuple(batch.shape)}; fix the data or add preprocess options")
    if batch.dtype != info.dtype:
        raise DataError(f"dataset '{dataset}': input '{info.name}' expects {info.dtype}, data is "
                        f"{batch.dtype}; add preprocess: {{dtype: {info.dtype}}} to the dataset")
    return batch


class NpyReader(DataReader):
    name = "npy"
    summary = ".npy / .npz file or a folder of shards ([N, ...] arrays, read lazily: only the samples used)"

    def open(self, name: str, spec: DatasetSpec, base_dir: Path) -> DataSource:
        from .arrays import read_arrays, read_directory
        if not spec.path:
            raise ConfigError(f"dataset '{name}' has no path; set datasets.{name}.path or use --data {name}=PATH")
        path = Path(spec.path) if Path(spec.path).is_absolute() else Path(base_dir) / spec.path
        if not path.exists():
            raise DataError(f"dataset '{name}': {path} does not exist")
        if path.is_dir():
            arrays, files = read_directory(name, path)
        else:
            arrays, files = read_arrays(name, path), [path]
        source = ArraySource(name, arrays, spec, str(path))
        source.files = files            # what the run reads: never an output (see pipeline/guard.py)
        return source


class IterableSource(DataSource):
    """Any Python iterable of feed dicts, or an onnxruntime CalibrationDataReader (get_next)."""

    def __init__(self, name: str, data: Any, num_batches: int | None = None) -> None:
        self.name, self.data, self.limit = name, data, num_batches

    def _iter(self) -> Iterator[Mapping[str, Any]]:
        if hasattr(self.data, "get_next"):
            if hasattr(self.data, "rewind"):
                self.data.rewind()
            return iter(self.data.get_next, None)
        return iter(self.data() if callable(self.data) else self.data)

    def num_batches(self, inputs):
        if self.limit is not None:
            return self.limit
        return len(self.data) if hasattr(self.data, "__len__") else None

    def batches(self, inputs: Sequence[InputInfo]) -> Iterator[dict[str, np.ndarray]]:
        info = {i.name: i for i in inputs}
        for index, feed in enumerate(self._iter()):
            if self.limit is not None and index >= self.limit:
                return
            if not isinstance(feed, Mapping):
                if len(inputs) != 1:
                    raise DataError(f"dataset '{self.name}': batch {index} is not a dict of input name -> array")
                feed = {inputs[0].name: feed}
            unknown = [k for k in feed if k not in info]
            if unknown:
                raise DataError(f"dataset '{self.name}': batch {index} feeds unknown input(s) {unknown}; "
                                f"model inputs: {sorted(info)}")
            yield {k: conform(self.name, info[k], np.asarray(v)) for k, v in feed.items()}


class PythonReader(DataReader):
    name = "python"
    summary = "path = 'module:function' returning an iterable of feed dicts"

    def open(self, name: str, spec: DatasetSpec, base_dir: Path) -> DataSource:
        target = spec.path or ""
        module, _, attr = target.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"dataset '{name}': cannot import '{target}' ({exc}); "
                              "give path: 'package.module:function'") from None
        return IterableSource(name, factory, spec.num_batches)


def open_datasets(session, spec, given: Mapping[str, Any]) -> dict[str, DataSource]:
    """Open the pipeline's datasets; ``given`` binds names to paths or Python data."""
    sources: dict[str, DataSource] = {}
    for name in list(spec.datasets) + [n for n in given if n not in spec.datasets]:
        dataset = spec.datasets.get(name) or DatasetSpec()
        value = given.get(name)
        if isinstance(value, DataSource):
            sources[name] = value
        elif value is not None and not isinstance(value, (str, Path)):
            sources[name] = IterableSource(name, value, dataset.num_batches)
        else:
            if value is not None:
                dataset = dataset.model_copy(update={"path": str(value), "reader": _reader_for(dataset, value)})
            base = Path(spec.base_dir) if value is None else Path(".")
            reader = session.lookup("readers", dataset.reader)()
            sources[name] = reader.open(name, dataset, base)
    return sources


def _reader_for(dataset: DatasetSpec, path: Any) -> str:
    return dataset.reader if dataset.reader != "python" else "npy"
