"""AMCT's ``amct_onnx calibration`` command line (also ``amct-pipeline amct-calibration``).

    amct_onnx calibration --model m.onnx --save_path results/m --input_shape "input:16,3,32,32" \\
        --data_dir data/input --data_types float32 [--calibration_config quant.cfg] [--evaluator ev.py]

Each ``--data_dir`` folder (one per input, ``;``-separated, in ``--input_shape`` order) holds raw
``.bin`` batches of that input's shape and type, taken in sorted file-name order. The command runs
the API as AMCT's does: ``create_quant_config`` (``batch_num`` = the number of batches, or the .cfg's),
``quantize_model``, the modified model in onnxruntime with ``AMCT_SO`` over the batches (or the
evaluator module's ``customize_evaluator.calibration(modified_model)``), ``save_model``. Files:
``<save_path>_fake_quant_model.onnx``, ``<save_path>_deploy_model.onnx``, and ``config.json``,
``record.txt``, ``modified_model.onnx`` in ``<save folder>/amct_temp/``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import AmctError, DataError

__all__ = ["main", "add_calibration_arguments", "run_calibration", "parse_input_shape", "bin_batches"]

TEMP_FOLDER = "amct_temp"
MAX_BATCHES = 100_000          # more .bin files than this in one folder is a wrong folder, not data


def _usage(message: str):
    from ._common import api_error
    return api_error("calibration", message)


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the float .onnx model")
    parser.add_argument("--save_path", required=True, help="output prefix, e.g. results/resnet8 "
                        "(writes results/resnet8_fake_quant_model.onnx, results/resnet8_deploy_model.onnx)")
    parser.add_argument("--input_shape", help='shape of each batch per input: "name:n,c,h,w;name2:..."')
    parser.add_argument("--data_dir", help='folders of raw .bin batches, one per input: "dir1;dir2"')
    parser.add_argument("--data_types", "--data_type", default=None,
                        help='numpy type of each input\'s .bin data: "float32;..." (default float32)')
    parser.add_argument("--calibration_config", help="AMCT simplified config (.cfg, config_defination)")
    parser.add_argument("--evaluator", help="Python file defining customize_evaluator with .calibration(model)")


def parse_input_shape(text: str) -> dict[str, tuple[int, ...]]:
    """'name:1,3,224,224;name2:1,10' -> {name: shape}; a one-line error for anything else."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        name, sep, dims = item.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise _usage(f'--input_shape "{text}": cannot parse "{item}"; expected "name:n,c,h,w" with '
                              'positive integer dimensions, inputs separated by ";"')
        if name in shapes:
            raise _usage(f'--input_shape "{text}": input "{name}" is given twice')
        shapes[name] = shape
    if not shapes:
        raise _usage(f'--input_shape "{text}": no input given; expected "name:n,c,h,w;name2:..."')
    return shapes


def _split(text: str | None, count: int, flag: str, default: str | None = None) -> list[str]:
    parts = [p.strip() for p in text.split(";")] if text else [default] * count
    if len(parts) != count or any(not p for p in parts):
        raise _usage(f'{flag} "{text}": gives {len(parts)} value(s) for {count} input(s) of --input_shape; '
                          'separate one per input with ";"')
    return parts  # type: ignore[return-value]


def _dtype(name: str, flag: str) -> np.dtype:
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "fiub":
        raise _usage(f"{flag}: '{name}' is not a numeric type; use e.g. float32, float16, int64, uint8")
    return dtype


def _bin_files(folder: str) -> list[Path]:
    from ..files import is_within
    if not os.path.isdir(folder):
        raise DataError(f"--data_dir: {folder} is not a folder")
    files = sorted(p for p in Path(folder).iterdir() if p.suffix == ".bin")
    outside = [p for p in files if not is_within(p, folder)]
    if outside:      # a symlink out of the folder: data must be the folder's own files
        raise DataError(f"--data_dir: {outside[0]} leads outside {folder}; copy the data into the folder")
    if not files:
        raise DataError(f"--data_dir: {folder} holds no .bin file")
    if len(files) > MAX_BATCHES:
        raise DataError(f"--data_dir: {folder} holds {len(files)} .bin files, more than {MAX_BATCHES}")
    return files


def _check_size(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
    size = int(np.prod(shape)) * dtype.itemsize
    found = os.path.getsize(path)
    if found != size:
        raise DataError(f"--data_dir: {path} holds {found} bytes; a batch of shape {list(shape)} {dtype} takes {size}")
    return size


def _read_bin(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    from ..files import open_regular, read_exact
    size = _check_size(path, shape, dtype)
    with open_regular(path, "--data_dir", DataError) as handle:
        data = read_exact(handle, 0, size, f"--data_dir: {path}", DataError)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def bin_batches(shapes: dict[str, tuple[int, ...]], folders: Sequence[str],
                types: Sequence[str]) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
    """(number of batches, the feeds) of AMCT's .bin folders: the i-th sorted file of each folder."""
    names = list(shapes)
    files = [_bin_files(folder) for folder in folders]
    counts = {len(f) for f in files}
    if len(counts) != 1:
        raise DataError(f"--data_dir: the folders hold different numbers of .bin batches "
                        f"({', '.join(f'{d}: {len(f)}' for d, f in zip(folders, files))})")
    dtypes = [_dtype(t, "--data_types") for t in types]
    for name, folder_files, dtype in zip(names, files, dtypes):      # every size, before any work
        for path in folder_files:
            _check_size(path, shapes[name], dtype)

    def feeds():
        for batch in zip(*files):
            yield {name: _read_bin(path, shapes[name], dtype) for name, path, dtype in zip(names, batch, dtypes)}
    return counts.pop(), feeds()


def _check_inputs(model: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """--input_shape names exactly the model's inputs (those that are not initializers)."""
    from ..ir.io import read_model
    graph = read_model(Path(model)).graph
    constants = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in constants]
    unknown = [name for name in shapes if name not in inputs]
    missing = [name for name in inputs if name not in shapes]
    if unknown or missing:
        from ..options import suggest
        name = (unknown or missing)[0]
        what = f'"{name}" is not an input of {model}' if unknown else f'gives no shape for input "{name}" of {model}'
        hint = suggest(name, inputs) if unknown else ""
        raise _usage(f'--input_shape: {what} (its inputs: {", ".join(inputs)})' + (f"; {hint}" if hint else ""))


def _load_evaluator(path: str):
    import importlib.util
    if not os.path.isfile(path):
        raise _usage(f"--evaluator: no such file {path}")
    spec = importlib.util.spec_from_file_location("amct_user_evaluator", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:       # the user's code: say so, in one line
        raise _usage(f"--evaluator {path}: importing it failed: {type(exc).__name__}: {exc}") from None
    evaluator = getattr(module, "customize_evaluator", None)
    if evaluator is None or not callable(getattr(evaluator, "calibration", None)):
        raise _usage(f"--evaluator {path}: defines no customize_evaluator with a calibration(model) method")
    return evaluator


def run_calibration(args) -> list[str]:
    """The command; returns the files written."""
    from . import _api
    from ._calibration import failure, session_options
    folder, prefix = os.path.split(args.save_path)
    temp = Path(folder or ".") / TEMP_FOLDER
    evaluator = _load_evaluator(args.evaluator) if args.evaluator else None
    if evaluator is None and (not args.data_dir or not args.input_shape):
        missing = "--data_dir" if not args.data_dir else "--input_shape"
        raise _usage(f"{missing} is required without --evaluator (the .bin batches to calibrate on)")
    count, feeds = 0, iter(())
    if evaluator is None:
        shapes = parse_input_shape(args.input_shape)
        folders = _split(args.data_dir, len(shapes), "--data_dir")
        types = _split(args.data_types, len(shapes), "--data_types", default="float32")
        _check_inputs(args.model, shapes)
        count, feeds = bin_batches(shapes, folders, types)
    temp.mkdir(parents=True, exist_ok=True)
    config, record, modified = temp / "config.json", temp / "record.txt", temp / "modified_model.onnx"
    if args.calibration_config:
        _api.create_quant_config(config, args.model, config_defination=args.calibration_config)
    else:
        _api.create_quant_config(config, args.model, batch_num=max(count, 1))
    _api.quantize_model(config, args.model, modified, record)
    if evaluator is not None:
        evaluator.calibration(str(modified))
    else:
        from ..runtime.ort import open_session
        session = open_session(modified, session_options())
        for index, feed in enumerate(feeds):
            try:
                session.run(None, feed)
            except Exception as exc:   # the calibration's own error if it failed, else onnxruntime's
                raise failure(record) or DataError(f"--data_dir: batch {index}: onnxruntime failed: "
                                                   f"{' '.join(str(exc).split())[:300]}") from None
    _api.save_model(modified, record, args.save_path)
    return [str(_api.model_path(folder or ".", prefix, s)) for s in ("fake_quant_model", "deploy_model")]


def main(argv: Sequence[str] | None = None) -> int:
    """``amct_onnx calibration ...``"""
    parser = argparse.ArgumentParser(prog="amct_onnx", description="AMCT's command line over amct-pipeline.")
    sub = parser.add_subparsers(metavar="COMMAND")
    calibration = sub.add_parser("calibration", help="post-training quantization from .bin batches")
    add_calibration_arguments(calibration)
    calibration.set_defaults(func=run_calibration)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        for path in args.func(args):
            print(path)
    except AmctError as exc:
        for line in str(exc).strip().splitlines():
            print(f"amct_onnx: error: {line}", file=sys.stderr)
        return 1
    return 0
