"""Calibration inside the user's own onnxruntime loop (AMCT's modified model run with ``AMCT_SO``).

``quantize_model`` writes the fused float model with a tap (``runtime.ort.TAP_OP``, a Python
operator of onnxruntime-extensions on a side branch) on every tensor the ``calibrate`` pass
calibrates. Each tap carries the calibration's description (original model, quant config, record,
``batch_num``), so a loop in another process works too. When the user's session runs a batch, the
taps hand its activations here; once every tap has seen the batch, the batch goes to a worker
thread that runs the very pipeline ``amct-pipeline run`` would::

    fuse_bn,match_layers{amct_config},calibrate{algorithm=ifmr},quantize_weights{algorithm=arq},lower

with a dataset (``runtime.data.ActivationSource``) that yields these batches instead of running a
model: the calibrators see each batch once and drop it (memory does not grow with ``batch_num``).
The ``batch_num``-th batch waits for the worker, which writes the record, so the record is complete
when that ``session.run`` returns, as with AMCT's kernels. Later batches are ignored until
``quantize_model`` is called again for the same record. ``quantize_preprocess``'s model feeds
``dmq_balance`` the same way (``CalibrationSpec.kind`` "dmq"); for auto calibration the taps also keep
each batch's model inputs (``keep_inputs``) for the ranking run. No exception may leave a tap (see
``_on_tap``): a failure is kept on its run and raised by ``save_model``.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import AmctError, CalibrationError
from ..runtime.data import ActivationSource
from ._common import api_error

__all__ = ["CalibrationSpec", "session_options", "add_taps", "read_spec", "check_finished", "forget", "failure",
           "initial_record", "balance_record", "kept_inputs"]

_runs: dict[str, "_Run"] = {}        # record path -> calibration in progress (or finished) in this process
_lock = threading.Lock()
POLL_SECONDS = 0.1                   # how often a waiting tap checks that the worker is still alive


@dataclass(frozen=True)
class CalibrationSpec:
    """What a modified model calibrates: stored in its metadata and in every tap.

    ``kind`` "quantize" (quantize_model: activation factors, after the DMQ factors of the record when
    ``balanced``) or "dmq" (quantize_preprocess: the balance factors of ``layers``, strength ``strength``).
    """

    kind: str
    model: str
    config: str
    record: str
    batch_num: int
    balanced: bool = False
    tensors: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    strength: float = 0.5
    keep_inputs: bool = False          # also tap the model inputs and keep every batch (auto calibration)
    inputs: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "CalibrationSpec":
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise api_error(where, f"the calibration description in the model is damaged ({exc}); "
                                   "run quantize_model again") from None

    def _common(self) -> list[tuple[str, dict[str, Any]]]:
        config = {"amct_config": self.config}
        passes = [("fuse_bn", config), ("match_layers", config)]
        return passes + ([("dmq_balance", {"record": self.record})] if self.balanced else [])

    def prepare_passes(self) -> list[tuple[str, dict[str, Any]]]:
        """What quantize_model / quantize_preprocess run before writing the modified model."""
        return self._common() + ([("quantize_weights", {"algorithm": "arq"})] if self.kind == "quantize" else [])

    def calibration_passes(self) -> list[tuple[str, dict[str, Any]]]:
        """The pipeline the taps feed: AMCT's PTQ up to the record (``lower`` makes it; no file
        written), or the DMQ balancer."""
        if self.kind == "dmq":
            return self._common() + [("dmq_balance", {"layers": self.layers, "migration_strength": self.strength})]
        return self._common() + [("calibrate", {"algorithm": "ifmr"}), ("quantize_weights", {"algorithm": "arq"}),
                                 ("lower", {"targets": ["fakequant"]})]

    def with_layers(self, prepared, where: str) -> "CalibrationSpec":
        """The spec completed from the prepared run: batch_num, and the tensors (and DMQ layers) to tap."""
        layer_map, config = prepared.artifacts["layer_map"], prepared.artifacts["amct_config"]
        layers = list(layer_map.layers())
        extra: dict[str, Any] = {}
        if self.kind == "dmq":
            layers = [layer for layer in layers
                      if getattr(config.layers.get(layer.name), "dmq_balancer", None) is not None]
            if not layers:
                raise api_error(where, f"{self.config}: no layer has a DMQ setting (dmq_balancer_param); give "
                                       "create_quant_config a .cfg with a dmq_balancer, as AMCT's DMQ sample does")
            strengths = {float(config.layers[layer.name].dmq_balancer) for layer in layers}
            if len(strengths) > 1:
                raise api_error(where, f"{self.config}: the layers' dmq_balancer_param differ ({sorted(strengths)}); "
                                       "one migration_strength per run is supported")
            extra = {"layers": [layer.name for layer in layers], "strength": strengths.pop()}
        if not layers:
            raise api_error(where, f"{self.config}: no layer of {self.model} is enabled for quantization; "
                                   "nothing to calibrate")
        if self.keep_inputs:
            extra["inputs"] = _float_inputs(prepared.graph, where)
        tensors = [layer.input for layer in layers] + extra.get("inputs", [])
        return replace(self, batch_num=config.batch_num, tensors=list(dict.fromkeys(tensors)), **extra)

    def final_record(self, artifacts):
        """The record the calibration writes."""
        from ..amct import LayerRecord
        from ..passes.amct_files import with_balance_factors
        if self.kind == "dmq":
            return {name: LayerRecord(tensor_balance_factor=f) for name, f in artifacts["balance_factors"].items()}
        return with_balance_factors(artifacts["quant_record"], artifacts.get("balance_factors") or {})


def _float_inputs(graph, where: str) -> list[str]:
    """The model inputs (the taps read float tensors only)."""
    from ..runtime.data import model_inputs
    inputs = model_inputs(graph)
    for info in inputs:
        if np.dtype(info.dtype) != np.float32:
            raise api_error(where, f"model input '{info.name}' is {np.dtype(info.dtype)}; keeping the "
                                   "calibration batches for the ranking run needs float32 inputs")
    return [info.name for info in inputs]


def kept_inputs(record: str) -> list[dict[str, np.ndarray]]:
    """The model inputs of every calibration batch of the run writing ``record`` (keep_inputs)."""
    run = _runs.get(os.path.abspath(record))
    return list(run.kept) if run is not None else []


def initial_record(spec: CalibrationSpec, artifacts):
    """What quantize_model writes at once (AMCT: the weights' factors, and the DMQ factors it applied);
    quantize_preprocess: nothing yet."""
    from ..amct import LayerRecord
    if spec.kind == "dmq":
        return {}
    factors = artifacts.get("balance_factors") or {}
    return {name: LayerRecord(scale_w=p.scale, offset_w=[0] * p.scale.size, wts_type=f"INT{p.num_bits}",
                              tensor_balance_factor=factors.get(name, []))
            for name, p in artifacts["weight_quant"].items()}


def _check_record_target(record_file: str) -> None:
    """The record path comes from the modified model, which may not be ours: only a record
    quantize_model wrote (an existing file that parses as one) is ever replaced."""
    from ..amct import RecordError, read_record
    try:
        if os.path.isfile(record_file) and not os.path.islink(record_file):
            read_record(record_file)
            return
    except RecordError:
        pass
    raise CalibrationError(f"the modified model names the record {record_file}, which is not a record "
                           "quantize_model wrote; run quantize_model again to make the modified model")


def balance_record(record_file: str) -> bool:
    """Whether ``record_file`` holds DMQ factors (quantize_preprocess's calibration wrote it)."""
    from ..amct import RecordError, read_record
    if not os.path.isfile(record_file):
        return False
    try:
        return any(rec.tensor_balance_factor for rec in read_record(record_file).values())
    except RecordError:
        return False          # not a record we can use: quantize_model writes a new one


# -- the modified model ---------------------------------------------------------------------------
def add_taps(graph, spec: CalibrationSpec) -> None:
    """A tap on each calibrated tensor (a side branch: the model's outputs are unchanged)."""
    from ..ir.edit import Namer, add_node
    from ..runtime.ort import TAP_DOMAIN, TAP_OP
    tensors, namer, run = graph.tensors(), Namer(graph), asdict(spec)
    for name in spec.tensors:
        node = add_node(graph, namer, TAP_OP, f"{name}.amct_calibration", [tensors[name]],
                        tap=json.dumps({"run": run, "tensor": name}, sort_keys=True))
        node.domain = TAP_DOMAIN


def read_spec(path: str, where: str) -> CalibrationSpec:
    """The CalibrationSpec of a modified model (its metadata)."""
    from ..ir.io import read_model
    from ._common import CALIBRATION_METADATA_KEY
    meta = {p.key: p.value for p in read_model(Path(path)).metadata_props}
    text = meta.get(CALIBRATION_METADATA_KEY)
    if text is None:
        raise api_error(where, f"{path} is not a modified model written by quantize_model (no calibration "
                               "description); give the modified_onnx_file of quantize_model")
    spec = CalibrationSpec.from_json(text, path)
    if spec.kind != "quantize":
        raise api_error(where, f"{path} is quantize_preprocess's model (DMQ); after its calibration run "
                               "quantize_model with that record, then calibrate its modified model")
    return spec


def check_finished(spec: CalibrationSpec, record_file: str, modified: str, where: str = "save_model") -> None:
    """AMCT's "ensure calibration is finished": every layer of the record has activation factors."""
    from ..amct import RecordError, read_record
    run = _runs.get(spec.record) if os.path.abspath(record_file) == spec.record else None
    if run is not None and run.error is not None:
        error = run.error
        raise error if isinstance(error, AmctError) else CalibrationError(f"calibration failed: {_one_line(error)}")
    if run is not None and run.batches < spec.batch_num:
        raise CalibrationError(f"{where}: calibration is not finished: {run.batches} of batch_num "
                               f"{spec.batch_num} batches were run; ensure calibration is finished (run {modified} "
                               f"with AMCT_SO for {spec.batch_num} batches)")
    try:
        record = read_record(record_file)
    except RecordError as exc:
        raise api_error(where, str(exc)) from None
    pending = [name for name, rec in record.items() if rec.scale_d is None]
    if not len(record) or pending:
        layer = f" (layer '{pending[0]}' has no scale_d)" if pending else ""
        raise CalibrationError(f"{where}: {record_file} holds no activation factors{layer}; ensure calibration "
                               f"is finished: run {modified} with AMCT_SO for batch_num ({spec.batch_num}) batches")


# -- the taps' side -------------------------------------------------------------------------------
def session_options():
    from ..runtime.ort import tap_session_options
    return tap_session_options(_on_tap)


def failure(record: str | os.PathLike) -> BaseException | None:
    """The error that stopped the calibration writing ``record`` in this process, if any."""
    run = _runs.get(os.path.abspath(record))
    return run.error if run is not None else None


def forget(record: str) -> None:
    with _lock:
        _runs.pop(record, None)


def _on_tap(attribute: str, array: np.ndarray) -> None:
    """Called by onnxruntime for every tap. Nothing may raise out of here: an exception crossing
    onnxruntime-extensions' operator aborts the process; a failed calibration is kept on its run,
    warned about once, and raised by save_model (or the command line) instead."""
    run = None
    try:
        tap = json.loads(attribute)
        spec = CalibrationSpec(**tap["run"])
        with _lock:
            run = _runs.get(spec.record)
            if run is None or run.spec != spec:
                run = _runs[spec.record] = _Run(spec)
        run.feed(tap["tensor"], array)
    except Exception as exc:
        if run is not None:
            run.fail(exc)
        else:
            warnings.warn(f"AMCT_SO: a calibration tap failed: {_one_line(exc)}", RuntimeWarning, stacklevel=1)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, AmctError) else f"{type(exc).__name__}: {text}"


class _Batches(ActivationSource):
    """The calibration dataset: batches the taps assembled, handed over one at a time."""

    name = "calib"

    def __init__(self, tensors: Sequence[str]) -> None:
        self.tensors = set(tensors)
        self.queue: queue.Queue = queue.Queue(maxsize=1)

    def activations(self, names: Sequence[str], num_batches: int | None) -> Iterator[dict[str, np.ndarray]]:
        missing = sorted(set(names) - self.tensors)
        if missing:
            raise CalibrationError(f"the modified model has no calibration tap on tensor '{missing[0]}'; the model "
                                   "or the quant config changed since quantize_model: run quantize_model again")
        for _ in range(num_batches or 0):
            yield self.queue.get()


class _Run:
    """One calibration: batches assembled from the taps, and the worker running the pipeline."""

    def __init__(self, spec: CalibrationSpec) -> None:
        self.spec = spec
        self.pending: dict[str, np.ndarray] = {}
        self.batches = 0
        self.source = _Batches(spec.tensors)
        self.error: BaseException | None = None
        self.warned = False
        self.kept: list[dict[str, np.ndarray]] = []     # model inputs per batch (spec.inputs)
        self.lock = threading.Lock()
        self.worker = threading.Thread(target=self._work, name="amct-calibration", daemon=True)
        self.worker.start()

    def feed(self, tensor: str, array: np.ndarray) -> None:
        with self.lock:
            if self.error is not None:
                self.fail(self.error)                # says so once
                return
            if self.batches >= self.spec.batch_num:
                return                               # AMCT: batches after batch_num change nothing
            if tensor in self.pending:
                raise CalibrationError(f"calibration tap on '{tensor}' ran twice in one batch")
            self.pending[tensor] = array
            if len(self.pending) < len(self.spec.tensors):
                return
            batch, self.pending = self.pending, {}
            if self.spec.inputs:
                self.kept.append({name: batch[name] for name in self.spec.inputs})
            if not self._hand_over(batch):
                return
            self.batches += 1
            if self.batches == self.spec.batch_num:
                self.worker.join()              # the record is written when this session.run returns
                if self.error is not None:
                    self.fail(self.error)

    def _hand_over(self, batch: dict[str, np.ndarray]) -> bool:
        while True:
            try:
                self.source.queue.put(batch, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                if not self.worker.is_alive():
                    self.fail(self.error or CalibrationError("calibration stopped"))
                    return False

    def fail(self, exc: BaseException) -> None:
        """Keep the first error (save_model raises it) and say so once, now."""
        if not self.warned:
            self.warned = True
            warnings.warn(f"AMCT_SO: calibration for {self.spec.record} failed after {self.batches} batch(es): "
                          f"{_one_line(exc)}; save_model will report it", RuntimeWarning, stacklevel=1)
        self.error = self.error or exc

    def _work(self) -> None:
        from ..amct import write_record
        from ._common import run_passes
        try:
            _check_record_target(self.spec.record)
            result = run_passes(self.spec.calibration_passes(), self.spec.model, datasets={"calib": self.source})
            write_record(self.spec.final_record(result.artifacts), self.spec.record)
        except Exception as exc:         # reported by the next tap and by save_model
            self.error = exc
