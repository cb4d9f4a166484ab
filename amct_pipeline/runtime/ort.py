"""onnxruntime, imported only when a model has to run."""
from __future__ import annotations

from typing import Sequence

import onnx

__all__ = ["make_session", "expose_tensors"]


def make_session(model: onnx.ModelProto, *, optimize: bool = True, threads: int = 0):
    """An InferenceSession on the CPU for an in-memory model."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


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
