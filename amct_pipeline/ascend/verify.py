"""Check a deploy model against its fake-quant model by executing both (``amct-pipeline verify-deploy``).

The deploy model (AscendQuant / integer layers / AscendDequant, SPEC 5.3) runs on the CPU reference
(:class:`~.reference.DeployEvaluator`); the fake-quant model (SPEC 5.4) runs in onnxruntime with
graph optimisations *disabled* (onnxruntime would fold the dequantization ``Mul`` into the weights
and drift by float rounding). Per graph output the report gives the largest absolute difference
and that difference in units of the output's quantization step:

* an output produced by an AscendDequant (directly: per channel; through Reshape/Flatten/Transpose/
  Squeeze/Unsqueeze/Identity: its largest scale) -- the dequant scale ``scale_d * scale_w``;
* any other output (after Softmax, Concat, ...) -- the largest step of the model: the largest of
  every AscendDequant scale, AscendAntiQuant scale and AscendQuant ``1/scale``.

Float operators of the deploy model (LayerNormalization, Softmax, Gelu, residual Adds, unquantized
layers) run in onnxruntime node by node, as in the fake-quant model: with numpy's float rounding
instead, a value next to a rounding boundary could quantize to a different code in the next layer and
one flipped code moves an output by up to 127 steps.

The models agree when every output is within one step (in practice they are equal up to float32
rounding: both compute ``(sum (q - o) * w_q + b_q) * deq``). The AscendQuant rounding convention is
read from the deploy model's metadata (written by the ``ascend`` target; default ``"amct"``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from ..errors import DataError, ModelLoadError
from .errors import AscendError
from .schemas import CONVENTION_METADATA_KEY

__all__ = ["OutputDiff", "VerifyReport", "verify_deploy", "output_steps", "npy_batches", "fixed_batch",
           "load_model", "CONVENTION_METADATA_KEY"]

_SHAPE_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}


@dataclass
class OutputDiff:
    """How far one output of the deploy model is from the fake-quant model's."""

    name: str
    max_abs: float = 0.0
    max_steps: float = 0.0
    step: float = 0.0                 # the step at the worst element (or the output's step)
    step_source: str = ""
    mismatched: int = 0               # elements that differ at all
    elements: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.max_steps <= 1.0)


@dataclass
class VerifyReport:
    outputs: list[OutputDiff]
    batches: int = 0
    samples: int = 0
    quant_convention: str = "amct"
    deploy: str = ""
    fakequant: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_steps(self) -> float:
        return max((o.max_steps for o in self.outputs), default=0.0)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "batches": self.batches, "samples": self.samples,
                "quant_convention": self.quant_convention, "deploy": self.deploy, "fakequant": self.fakequant,
                "outputs": [{"name": o.name, "max_abs": o.max_abs, "max_steps": o.max_steps, "step": o.step,
                             "step_source": o.step_source, "mismatched": o.mismatched, "elements": o.elements,
                             "ok": o.ok} for o in self.outputs]}

    def format(self) -> str:
        lines = [f"deploy {self.deploy or '<model>'} (reference, convention {self.quant_convention}) vs "
                 f"fake-quant {self.fakequant or '<model>'} (onnxruntime, no graph optimisation): "
                 f"{self.samples} samples in {self.batches} batches"]
        for o in self.outputs:
            lines.append(f"  {'ok  ' if o.ok else 'FAIL'} output '{o.name}': max |diff| {o.max_abs:.6g} = "
                         f"{o.max_steps:.4g} steps (step {o.step:.6g}, {o.step_source}); "
                         f"{o.mismatched}/{o.elements} elements differ")
        lines.append("ok: every output within one quantization step" if self.ok else
                     "FAIL: some output differs by more than one quantization step")
        return "\n".join(lines)


# -- steps ------------------------------------------------------------------------------------------
def _attr(node: onnx.NodeProto, name: str, default=None):
    for att in node.attribute:
        if att.name == name:
            return onnx.helper.get_attribute_value(att)
    return default


def _deq_values(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> np.ndarray | None:
    """Dequant scales (float64, shift applied) of an AscendDequant whose parameter is an initializer."""
    from onnx import numpy_helper
    from .packing import unpack_deq_scale
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    param = numpy_helper.to_array(inits[node.input[1]])
    if np.issubdtype(param.dtype, np.floating):
        deq = np.atleast_1d(param).astype(np.float64).ravel()
    else:
        scale, shift, _ = unpack_deq_scale(param)
        deq = scale.astype(np.float64).ravel() * np.exp2(shift.astype(np.float64).ravel())
    if _attr(node, "sqrt_mode", 0):
        deq = deq * deq
    return np.abs(deq)


def output_steps(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, bool, str]]:
    """Per graph output: (steps, per_channel, description). ``per_channel``: the steps run along axis 1."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    everything: list[float] = []
    for node in graph.node:
        if node.op_type == "AscendDequant":
            deq = _deq_values(node, inits)
            if deq is not None and deq.size:
                everything.append(float(deq.max()))
        elif node.op_type in ("AscendAntiQuant", "AscendQuant"):
            scale = abs(float(_attr(node, "scale", 0.0) or 0.0))
            if _attr(node, "sqrt_mode", 0):
                scale = scale * scale
            if scale > 0:
                everything.append(scale if node.op_type == "AscendAntiQuant" else 1.0 / scale)
    largest = max(everything, default=0.0)
    found = {}
    for out in graph.output:
        node, direct = producers.get(out.name), True
        while node is not None and node.op_type in _SHAPE_OPS and node.input:
            node, direct = producers.get(node.input[0]), False
        deq = _deq_values(node, inits) if node is not None and node.op_type == "AscendDequant" else None
        if deq is not None and deq.size:
            found[out.name] = (deq if direct else np.array([deq.max()]), direct and deq.size > 1,
                               f"AscendDequant '{node.name}'")
        else:
            found[out.name] = (np.array([largest]), False, "largest step of the model")
    return found


# -- running ----------------------------------------------------------------------------------------
def load_model(model, what: str) -> tuple[onnx.ModelProto, str]:
    """``(model, path)`` for a ModelProto (path ``""``) or a file; ``what`` ("deploy", "fake-quant")
    names the model in the :class:`ModelLoadError` for a missing or unreadable file."""
    if isinstance(model, onnx.ModelProto):
        return model, ""
    path = Path(os.fspath(model))
    if not path.is_file():
        raise ModelLoadError(f"{what} model '{path}' not found")
    try:
        return onnx.load(str(path)), str(path)
    except Exception as exc:  # protobuf decode errors have no common base class
        raise ModelLoadError(f"{what} model '{path}' is not a readable ONNX file: {exc}") from None


def fixed_batch(model: onnx.ModelProto, inputs: Sequence[str]) -> int | None:
    """The batch size a model's inputs insist on (e.g. 1 for mnist-8), or None."""
    for value in model.graph.input:
        if value.name in inputs and value.type.tensor_type.shape.dim:
            dim = value.type.tensor_type.shape.dim[0]
            if dim.HasField("dim_value") and dim.dim_value > 0:
                return int(dim.dim_value)
    return None


def _chunks(feeds: Mapping[str, np.ndarray], size: int | None) -> Iterator[dict[str, np.ndarray]]:
    n = len(next(iter(feeds.values())))
    if size is None or n == size:
        yield dict(feeds)
        return
    if n % size:
        raise DataError(f"a batch of {n} samples cannot be split into the model's fixed batch of {size}")
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in feeds.items()}


def _ort_session(model: onnx.ModelProto):
    from ..runtime.ort import make_session
    try:
        return make_session(model, optimize=False)
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime cannot load the fake-quant model: {str(exc).strip().splitlines()[0]}") \
            from None


def verify_deploy(deploy, fakequant, feeds_iter: Iterable, *, quant_convention: str | None = None,
                  input_offsets: str = "atc", max_batches: int | None = None) -> VerifyReport:
    """Run ``deploy`` (path or ModelProto) on the CPU reference and ``fakequant`` in onnxruntime on
    every batch of ``feeds_iter`` (mappings input name -> array, or arrays for a single-input model)
    and report, per output, the largest difference in absolute terms and in quantization steps.

    ``quant_convention``: None reads the deploy model's metadata (default "amct"). A bad deploy model
    (unknown Ascend attribute, ...) raises :class:`AscendError` naming the node.
    """
    from .reference import DeployEvaluator
    deploy_model, deploy_path = load_model(deploy, "deploy")
    fake_model, fake_path = load_model(fakequant, "fake-quant")
    if quant_convention is None:
        meta = {p.key: p.value for p in deploy_model.metadata_props}
        quant_convention = meta.get(CONVENTION_METADATA_KEY, "amct")
    try:
        evaluator = DeployEvaluator(deploy_model, quant_convention=quant_convention, input_offsets=input_offsets,
                                    float_ops="onnxruntime")
    except AscendError as exc:
        raise AscendError(f"{deploy_path + ': ' if deploy_path else ''}{exc}") from None
    session = _ort_session(fake_model)
    fake_inputs = [i.name for i in session.get_inputs()]
    fake_outputs = [o.name for o in session.get_outputs()]
    names = evaluator.output_names
    missing = [n for n in names if n not in fake_outputs]
    if missing or sorted(fake_inputs) != sorted(evaluator.input_names):
        raise DataError(f"the models do not match: deploy inputs {evaluator.input_names} / outputs {names}, "
                        f"fake-quant inputs {fake_inputs} / outputs {fake_outputs}")
    steps = output_steps(deploy_model)
    fixed = fixed_batch(deploy_model, evaluator.input_names) or fixed_batch(fake_model, fake_inputs)
    dtypes = {i.name: _np_type(i.type) for i in session.get_inputs()}
    diffs = {n: OutputDiff(n, step_source=steps[n][2]) for n in names}
    batches = samples = 0
    for feeds in feeds_iter:
        if max_batches is not None and batches >= max_batches:
            break
        feeds = _as_feeds(feeds, evaluator.input_names, dtypes)
        for chunk in _chunks(feeds, fixed):
            expected = session.run(names, chunk)
            actual = evaluator.run(chunk, names)
            for name, a, e in zip(names, actual, expected):
                _accumulate(diffs[name], np.asarray(a), np.asarray(e), *steps[name][:2])
        batches += 1
        samples += len(next(iter(feeds.values())))
    if batches == 0:
        raise DataError("no data: the feeds gave no batch")
    return VerifyReport([diffs[n] for n in names], batches, samples, quant_convention, deploy_path, fake_path)


def _np_type(type_str: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
            "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
            "tensor(int8)": np.int8}.get(type_str, np.float32)


def _as_feeds(feeds, names: Sequence[str], dtypes) -> dict[str, np.ndarray]:
    if not isinstance(feeds, Mapping):
        if isinstance(feeds, np.ndarray) or len(names) == 1 and not isinstance(feeds, (list, tuple)):
            feeds = [feeds]
        feeds = list(feeds)
        if len(feeds) != len(names):
            raise DataError(f"got {len(feeds)} arrays per batch, the model takes {len(names)} inputs: "
                            f"{', '.join(names)}")
        feeds = dict(zip(names, feeds))
    missing = [n for n in names if n not in feeds]
    if missing:
        raise DataError(f"missing model input(s) in the data: {', '.join(missing)}")
    return {n: np.ascontiguousarray(np.asarray(feeds[n]), dtype=dtypes.get(n, np.float32)) for n in names}


def _accumulate(diff: OutputDiff, actual: np.ndarray, expected: np.ndarray, step: np.ndarray,
                per_channel: bool) -> None:
    if actual.shape != expected.shape:
        raise AscendError(f"output '{diff.name}': deploy shape {list(actual.shape)} vs fake-quant "
                          f"{list(expected.shape)}")
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    delta = np.where(a == e, 0.0, np.abs(a - e))          # equal infinities count as equal
    delta = np.where(np.isnan(a) & np.isnan(e), 0.0, delta)
    delta = np.where(np.isnan(delta), np.inf, delta)
    if per_channel and delta.ndim >= 2 and delta.shape[1] == step.size:
        steps = np.broadcast_to(step.reshape((1, -1) + (1,) * (delta.ndim - 2)), delta.shape)
    else:
        steps = np.broadcast_to(np.asarray(step.max() if step.size else 0.0), delta.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        units = np.where(delta == 0, 0.0, delta / steps)
    diff.elements += int(delta.size)
    diff.mismatched += int(np.count_nonzero(delta))
    diff.max_abs = max(diff.max_abs, float(delta.max()) if delta.size else 0.0)
    if units.size:
        worst = int(np.argmax(units))
        if units.flat[worst] >= diff.max_steps:
            diff.max_steps = float(units.flat[worst])
            diff.step = float(steps.flat[worst])
    if not diff.step and steps.size:
        diff.step = float(np.max(steps))


# -- data files ----------------------------------------------------------------------------------------
def npy_batches(sources: Mapping[str, str | os.PathLike], input_names: Sequence[str], batch_size: int,
                max_batches: int | None = None, multiple_of: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches from ``.npy`` files (``[N, ...]``; one per input) or one ``.npz`` (keys = input names).

    ``sources``: input name -> file; the key ``""`` stands for the only input of a single-input model.
    ``multiple_of``: a model's fixed batch size; trailing samples that do not fill one are left out.
    """
    from ..runtime.arrays import read_arrays
    arrays: dict[str, Any] = {}
    for key, path in sources.items():
        path = Path(os.fspath(path))
        if path.suffix not in (".npy", ".npz"):
            raise DataError(f"data file '{path}': give a .npy or .npz file")
        loaded = read_arrays(key or "--data", path)       # lazy; FIFOs, devices and bad headers refused
        if path.suffix == ".npz":
            members = loaded
            if len(members) == 1 and len(input_names) == 1 and not key:
                arrays[input_names[0]] = next(iter(members.values()))
            else:
                unknown = [m for m in members if m not in input_names]
                if unknown:
                    raise DataError(f"'{path}': arrays {unknown} are not model inputs ({', '.join(input_names)})")
                arrays.update(members)
            continue
        if not key:
            if len(input_names) != 1:
                raise DataError(f"the model has {len(input_names)} inputs ({', '.join(input_names)}); "
                                "give --data INPUT=PATH.npy for each")
            key = input_names[0]
        if key not in input_names:
            raise DataError(f"--data {key}=...: '{key}' is not a model input ({', '.join(input_names)})")
        arrays[key] = next(iter(loaded.values()))
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise DataError(f"no data for model input(s) {', '.join(missing)}")
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise DataError(f"the data files hold different sample counts: {sorted(counts)}")
    total = counts.pop()
    if multiple_of:
        total -= total % multiple_of
    if total == 0:
        raise DataError("the data files hold no samples" + (f" (the model needs batches of {multiple_of})"
                                                             if multiple_of else ""))
    for index, start in enumerate(range(0, total, batch_size)):
        if max_batches is not None and index >= max_batches:
            return
        yield {n: np.asarray(a[start:start + batch_size]) for n, a in arrays.items()}
