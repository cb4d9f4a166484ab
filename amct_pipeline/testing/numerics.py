"""Run models through onnxruntime and compare outputs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

__all__ = ["run_model", "max_rel_diff", "max_rel_diffs"]


def run_model(model: onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray], *,
              optimize: bool = False) -> list[np.ndarray]:
    """All graph outputs of ``model`` (a proto or a path) on ``feeds``, via onnxruntime on CPU.

    Graph optimisations are off by default so that onnxruntime does not fuse BatchNormalization
    itself: comparisons then test our rewrite, not the runtime's.
    """
    import onnxruntime as ort   # heavy: imported only when a model actually runs
    options = ort.SessionOptions()
    options.log_severity_level = 3      # old models warn about initializers listed as inputs
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, (str, Path, os.PathLike)) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max|a − b| / max|a| (``a`` is the reference); 0 when both are all zeros."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def max_rel_diffs(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> list[float]:
    """``max_rel_diff`` for each pair of outputs."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference outputs vs {len(other)}")
    return [max_rel_diff(a, b) for a, b in zip(reference, other)]
