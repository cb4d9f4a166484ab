"""Small helpers shared by the operators: broadcasting reductions, attribute parsing, padding."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx

from ..errors import AmctError

__all__ = ["AutodiffError", "masked", "unbroadcast", "as_ints", "conv_pads", "erf"]


class AutodiffError(AmctError):
    """A graph the engine cannot execute or differentiate (unsupported operator or attribute)."""


def masked(g: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``g`` where ``mask``, else 0 (a multiply: several times faster than ``np.where`` on large arrays)."""
    return np.multiply(g, mask, dtype=g.dtype)


def unbroadcast(grad: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Sum ``grad`` over the axes numpy broadcasting added or stretched to reach ``shape``."""
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    if lead:
        grad = grad.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def as_ints(values) -> list[int]:
    return [int(v) for v in np.asarray(values).reshape(-1)]


def conv_pads(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
              pads: Sequence[int] | None, auto_pad: str, ceil_mode: bool = False
              ) -> tuple[list[int], list[int], list[int], list[int]]:
    """(pads at the start, declared pads at the end, pads at the end the windows need, output lengths)
    of a convolution or pooling window.

    ``auto_pad`` SAME_UPPER / SAME_LOWER give ``ceil(in / stride)`` outputs (the extra pad at the end /
    the start), VALID none, NOTSET the explicit ``pads``. With ``ceil_mode`` the end pad grows so that a
    last partial window exists, unless it would start inside the end padding (ONNX / onnxruntime rule).
    """
    rank = len(spatial)
    begin, end, need, out = [0] * rank, [0] * rank, [0] * rank, [0] * rank
    for i in range(rank):
        eff = (kernel[i] - 1) * dilations[i] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out[i] = -(-spatial[i] // strides[i])
            total = max((out[i] - 1) * strides[i] + eff - spatial[i], 0)
            small, big = total // 2, total - total // 2
            begin[i], end[i] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
            need[i] = max(0, (out[i] - 1) * strides[i] + eff - spatial[i] - begin[i])
            continue
        if auto_pad == "VALID":
            begin[i] = end[i] = 0
        elif auto_pad in ("NOTSET", "", None):
            begin[i], end[i] = (int(pads[i]), int(pads[i + rank])) if pads else (0, 0)
        else:
            raise AutodiffError(f"unknown auto_pad {auto_pad!r}")
        span = spatial[i] + begin[i] + end[i] - eff
        if ceil_mode:
            n = -(-span // strides[i]) + 1
            if (n - 1) * strides[i] >= spatial[i] + begin[i]:
                n -= 1
        else:
            n = span // strides[i] + 1
        out[i] = n
        need[i] = max(0, (n - 1) * strides[i] + eff - spatial[i] - begin[i])  # what the last window reaches
    return begin, end, need, out


_erf = np.frompyfunc(math.erf, 1, 1)


def erf(x: np.ndarray) -> np.ndarray:
    """The error function to double precision (``math.erf`` elementwise; numpy has none)."""
    x = np.asarray(x)
    return _erf(x).astype(x.dtype if x.dtype.kind == "f" else np.float64)


# -- operator helpers ------------------------------------------------------------------------
def scalar_like(x: np.ndarray, value: float):
    return x.dtype.type(value) if x.dtype.kind == "f" else value


def np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(onnx_type)))


def optional(xs, i):
    return xs[i] if len(xs) > i else None


def axes_of(op, xs, attr_until: int, index: int = 1):
    """Axes from the attribute (opset < ``attr_until``) or from input ``index``; None when absent."""
    if op.opset < attr_until:
        value = op.attr("axes")
    else:
        value = optional(xs, index)
    return None if value is None else as_ints(value)
