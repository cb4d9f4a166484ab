"""onnxruntime, imported only when a model has to run: the one place that makes sessions."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

__all__ = ["make_session", "run_model", "expose_tensors", "tap_session_options", "open_session", "TAP_OP",
           "TAP_DOMAIN"]


def make_session(model: onnx.ModelProto | str | os.PathLike, *, optimize: bool = True, threads: int = 0,
                 memory_pattern: bool = True, memory_arena: bool = True, config: Mapping[str, str] | None = None,
                 initializers: Mapping[str, np.ndarray] | None = None):
    """An InferenceSession on the CPU for an in-memory model or a model file (a file's external data
    is found beside it). ``optimize=False`` disables onnxruntime's graph optimisations;
    ``memory_pattern=False`` its memory pattern (see ``runtime.collector``); ``memory_arena=False`` its
    CPU arena, which otherwise keeps a run's peak allocation for the session's life (many sessions
    alive at once: ``algorithms.sensitivity``); ``threads`` > 0 sets the
    intra-op and inter-op thread counts; ``config`` adds session configuration entries (e.g.
    ``{"session.disable_quant_qdq": "1"}``, or ``{"session.intra_op.allow_spinning": "0"}`` when many
    small sessions are alive at once); ``initializers`` gives the values of the model's initializers
    stored as external data, by reference (contiguous arrays; the session keeps them alive): many
    sessions then share one buffer and no proto carries the bytes."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if not memory_pattern:
        options.enable_mem_pattern = False
    if not memory_arena:
        options.enable_cpu_mem_arena = False
    options.log_severity_level = 3      # old models warn about initializers listed as inputs
    if threads:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (initializers or {}).values()]
    if values:
        options.add_external_initializers(list(initializers), values)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    if values:
        session.amct_initializers = (dict(initializers), values)    # the buffers the session reads
    return session


def run_model(model: onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray], *,
              optimize: bool = False) -> list[np.ndarray]:
    """All graph outputs of ``model`` (a proto or a path) on ``feeds``, via onnxruntime on CPU.

    Graph optimisations are off by default so that onnxruntime does not fuse BatchNormalization
    itself: comparisons then test our rewrite, not the runtime's.
    """
    return make_session(model, optimize=optimize).run(None, dict(feeds))


def expose_tensors(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (intermediate activations)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            exposed.graph.output.add().name = name
            present.add(name)
    return exposed


# -- Python operators inside a user's own session ---------------------------------------------------
TAP_OP = "AmctTap"                 # one float input, one 1-element float output (a side branch)
TAP_DOMAIN = "ai.onnx.contrib"     # the domain onnxruntime-extensions serves Python operators in
TAP_ATTRIBUTE = "tap"              # a string naming what the tap feeds (the handler parses it)
_tap_handler: list = []            # the one handler of every tap node: handler(attribute, array)


def tap_session_options(handler) -> Any:
    """``onnxruntime.SessionOptions`` under which every ``TAP_OP`` node calls ``handler(attribute,
    array)`` with its input (a copy owned by the handler) and outputs one zero, so a session opened
    on a model with taps hands its activations to Python as the user's own loop runs it.

    The operator runs through onnxruntime-extensions' Python custom operators (its prebuilt library
    matches the installed onnxruntime; nothing to compile). The handler is process-wide, as the
    operator registry is: the last call sets it."""
    import onnxruntime as ort
    try:
        from onnxruntime_extensions import PyOp, get_library_path, onnx_op
    except ImportError:
        from ..errors import ConfigError
        raise ConfigError("running a calibration model needs onnxruntime-extensions; "
                          "pip install onnxruntime-extensions") from None
    if not _tap_handler:
        @onnx_op(op_type=TAP_OP, inputs=[PyOp.dt_float], outputs=[PyOp.dt_float],
                 attrs={TAP_ATTRIBUTE: PyOp.dt_string})
        def _tap(x, **attrs):
            _tap_handler[0](attrs[TAP_ATTRIBUTE], x)
            return np.zeros(1, np.float32)
        _tap_handler.append(handler)
    _tap_handler[0] = handler
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.log_severity_level = 3
    return options


def open_session(model: str | os.PathLike, options: Any):
    """An InferenceSession on the CPU for a model file with the caller's ``SessionOptions`` (e.g.
    those of ``tap_session_options``)."""
    import onnxruntime as ort
    return ort.InferenceSession(os.fspath(model), options, providers=["CPUExecutionProvider"])
