"""Run models through onnxruntime and compare outputs."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..runtime.ort import run_model   # re-exported: tests and plugin authors run models from here

__all__ = ["run_model", "max_rel_diff", "max_rel_diffs"]


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
