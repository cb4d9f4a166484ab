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
``quantize_model`` is called again for the same record.
"""
from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import CalibrationError
from ..runtime.data import ActivationSource
from ._common import api_error

__all__ = ["CalibrationSpec", "session_options", "add_taps", "strip_taps", "check_finished", "forget", "failure",
           "calibration_passes"]

_runs: dict[str, "_Run"] = {}        # record path -> calibration in progress (or finished) in this process
_lock = threading.Lock()
POLL_SECONDS = 0.1                   # how often a waiting tap checks that the worker is still alive


@dataclass(frozen=True)
class CalibrationSpec:
    """What a modified model calibrates: stored in its metadata and in every tap."""

    model: str
    config: str
    record: str
    batch_num: int
    tensors: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "CalibrationSpec":
        try:
            data = json.loads(text)
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise api_error(where, f"the calibration description in the model is damaged ({exc}); "
                              "run quantize_model again") from None


def calibration_passes(spec: CalibrationSpec) -> list[tuple[str, dict[str, Any]]]:
    """The pipeline the taps feed: AMCT's PTQ up to the record (``lower`` makes it; no file written)."""
    config = {"amct_config": spec.config}
    return [("fuse_bn", config), ("match_layers", config), ("calibrate", {"algorithm": "ifmr"}),
            ("quantize_weights", {"algorithm": "arq"}), ("lower", {"targets": ["fakequant"]})]


# -- the modified model ---------------------------------------------------------------------------
def add_taps(graph, spec: CalibrationSpec) -> None:
    """A tap on each calibrated tensor (a side branch: the model's outputs are unchanged)."""
    from ..ir.edit import Namer, add_node
    from ..runtime.ort import TAP_DOMAIN, TAP_OP
    tensors, namer, run = graph.tensors(), Namer(graph), json.loads(spec.to_json())
    for name in spec.tensors:
        node = add_node(graph, namer, TAP_OP, f"{name}.amct_calibration", [tensors[name]],
                        tap=json.dumps({"run": run, "tensor": name}, sort_keys=True))
        node.domain = TAP_DOMAIN


def strip_taps(path: str, where: str):
    """(the fused float graph, its CalibrationSpec) of a modified model."""
    from ..ir import load_graph
    from ..runtime.ort import TAP_DOMAIN, TAP_OP
    from ._common import CALIBRATION_METADATA_KEY
    graph = load_graph(path)
    text = graph.meta.metadata.pop(CALIBRATION_METADATA_KEY, None)
    if text is None:
        raise api_error(where, f"{path} is not a modified model written by quantize_model (no calibration "
                          "description); give the modified_onnx_file of quantize_model")
    graph.gs.nodes = [n for n in graph.gs.nodes if not (n.op == TAP_OP and n.domain == TAP_DOMAIN)]
    graph.gs.cleanup(remove_unused_graph_inputs=False)
    if graph.gs.import_domains is not None:
        graph.gs.import_domains = [d for d in graph.gs.import_domains if d.domain != TAP_DOMAIN]
    return graph, CalibrationSpec.from_json(text, path)


def check_finished(spec: CalibrationSpec, record_file: str, modified: str) -> None:
    """AMCT's "ensure calibration is finished": every layer of the record has activation factors."""
    from ..amct import RecordError, read_record
    run = _runs.get(spec.record)
    if run is not None and os.path.abspath(record_file) == spec.record and run.batches < spec.batch_num:
        raise CalibrationError(f"save_model: calibration is not finished: {run.batches} of batch_num "
                               f"{spec.batch_num} batches were run; ensure calibration is finished (run {modified} "
                               f"with AMCT_SO for {spec.batch_num} batches) before save_model")
    try:
        record = read_record(record_file)
    except RecordError as exc:
        raise api_error("save_model", str(exc)) from None
    pending = [name for name, rec in record.items() if rec.scale_d is None]
    if not len(record) or pending:
        layer = f" (layer '{pending[0]}' has no scale_d)" if pending else ""
        raise CalibrationError(f"save_model: {record_file} holds no activation factors{layer}; ensure calibration "
                               f"is finished: run {modified} with AMCT_SO for batch_num ({spec.batch_num}) batches "
                               "before save_model")


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
    tap = json.loads(attribute)
    spec = CalibrationSpec(**tap["run"])
    with _lock:
        run = _runs.get(spec.record)
        if run is None or run.spec != spec:
            run = _runs[spec.record] = _Run(spec)
    run.feed(tap["tensor"], array)


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
        self.worker = threading.Thread(target=self._work, name="amct-calibration", daemon=True)
        self.worker.start()

    def feed(self, tensor: str, array: np.ndarray) -> None:
        if self.batches >= self.spec.batch_num:
            return                                   # AMCT: batches after batch_num change nothing
        if tensor in self.pending:
            raise CalibrationError(f"calibration tap on '{tensor}' ran twice in one batch")
        self.pending[tensor] = array
        if len(self.pending) < len(self.spec.tensors):
            return
        batch, self.pending = self.pending, {}
        self._hand_over(batch)
        self.batches += 1
        if self.batches == self.spec.batch_num:
            self.worker.join()
            if self.error is not None:
                raise self.error

    def _hand_over(self, batch: dict[str, np.ndarray]) -> None:
        while True:
            try:
                self.source.queue.put(batch, timeout=POLL_SECONDS)
                return
            except queue.Full:
                if not self.worker.is_alive():
                    raise self.error or CalibrationError("calibration stopped") from None

    def _work(self) -> None:
        from ..amct import write_record
        from ._common import run_passes
        try:
            result = run_passes(calibration_passes(self.spec), self.spec.model, datasets={"calib": self.source})
            write_record(result.artifacts["quant_record"], self.spec.record)
        except BaseException as exc:     # handed to the user's session.run by the next tap
            self.error = exc
