"""onnxruntime, imported only when a model has to run: the one place that makes sessions."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import onnx

__all__ = ["make_session", "run_model", "expose_tensors"]


def make_session(model: onnx.ModelProto | str | os.PathLike, *, optimize: bool = True, threads: int = 0,
                 memory_pattern: bool = True, config: Mapping[str, str] | None = None):
    """An InferenceSession on the CPU for an in-memory model or a model file (a file's external data
    is found beside it). ``optimize=False`` disables onnxruntime's graph optimisations;
    ``memory_pattern=False`` its memory pattern (see ``runtime.collector``); ``threads`` > 0 sets the
    intra-op and inter-op thread counts; ``config`` adds session configuration entries (e.g.
    ``{"session.disable_quant_qdq": "1"}``, or ``{"session.intra_op.allow_spinning": "0"}`` when many
    small sessions are alive at once)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if not memory_pattern:
        options.enable_mem_pattern = False
    options.log_severity_level = 3      # old models warn about initializers listed as inputs
    if threads:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


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
