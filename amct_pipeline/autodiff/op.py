"""The operator interface of the engine and the registry of ONNX operators.

An operator is an object made once per node (attributes parsed there) with two methods::

    forward(xs, need)        -> (outputs, saved)
    backward(saved, gys, need) -> input gradients

``xs`` are the input arrays (None for an omitted optional input). ``need[i]`` says whether input
``i`` wants a gradient; ``need is None`` means no backward will follow, so nothing is saved.
``saved`` is whatever the backward needs, and only that: the executor drops every other array as
soon as its last reader has run. ``gys`` holds one gradient per output (None: that output gets no
gradient); ``backward`` returns one gradient (or None) per input, with the input's shape.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ._util import AutodiffError

__all__ = ["Op", "OPS", "register", "make_op", "supported_ops"]


class Op:
    """Base of every engine operator (ONNX ones and the engine's fake-quant ones)."""

    op_type = ""
    nondiff_inputs: tuple[int, ...] = ()   # inputs that never receive a gradient (shapes, indices, axes)
    differentiable = True                  # False: no output carries a gradient (Shape, Cast to int...)
    nondiff_outputs: tuple[int, ...] = ()  # outputs without gradient (MaxPool indices, LayerNorm statistics)

    def __init__(self, attrs: dict[str, Any] | None = None, opset: int = 17, n_inputs: int = 1,
                 n_outputs: int = 1, name: str = "") -> None:
        self.attrs = dict(attrs or {})
        self.opset = int(opset)
        self.n_inputs = n_inputs
        self.n_outputs = n_outputs
        self.name = name
        self.setup()

    def setup(self) -> None:
        """Parse attributes (called once by the constructor)."""

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def fail(self, message: str) -> AutodiffError:
        return AutodiffError(f"node '{self.name}' ({self.op_type}): {message}")

    def forward(self, xs: Sequence[np.ndarray | None], need: Sequence[bool] | None) -> tuple[list, Any]:
        raise NotImplementedError

    def backward(self, saved: Any, gys: Sequence[np.ndarray | None], need: Sequence[bool]) -> list:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name or self.op_type})"


OPS: dict[str, type[Op]] = {}


def register(*names: str):
    """Class decorator: the ONNX operator types (default domain) an Op class implements."""
    def deco(cls: type[Op]) -> type[Op]:
        for name in names:
            OPS[name] = cls
        if not cls.op_type:
            cls.op_type = names[0]
        return cls
    return deco


def make_op(op_type: str, attrs: dict[str, Any], opset: int, n_inputs: int, n_outputs: int, name: str = "",
            domain: str = "") -> Op:
    if domain not in ("", "ai.onnx") or op_type not in OPS:
        where = f"{domain}." if domain not in ("", "ai.onnx") else ""
        raise AutodiffError(f"node '{name}': operator {where}{op_type} is not supported by the autodiff engine")
    op = OPS[op_type](attrs, opset, n_inputs, n_outputs, name)
    op.op_type = op_type
    return op


def supported_ops() -> list[str]:
    return sorted(OPS)
