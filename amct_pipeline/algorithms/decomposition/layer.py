"""Conv geometry shared by every decomposition method: layers, child convs, FLOPs, composition.

Everything here is numpy only. Conventions: 2-D convs, weights ``[Cout, Cin/group, kh, kw]``,
``pads`` in ONNX order ``(top, left, bottom, right)``, FLOPs and parameters as in SPEC 8.2::

    conv FLOPs = (2·(Cin/g)·kh·kw − 1 + has_bias) · Hout·Wout·Cout
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "Rank",
    "ConvLayer",
    "ChildSpec",
    "Cost",
    "conv_cost",
    "chain_cost",
    "compose_kernels",
    "relative_error",
    "vertical",
    "horizontal",
    "pointwise",
]

Rank = tuple[int, ...]      # (r,) spatial SVD and CP; (r_in, r_out) Tucker-2


@dataclass(frozen=True)
class ConvLayer:
    """What a method needs to know about one Conv node (never the graph itself)."""

    name: str
    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    group: int = 1
    has_bias: bool = False
    in_hw: Optional[tuple[int, int]] = None      # None when shape inference could not tell
    dtype: str = "float32"

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.cout, self.cin // self.group, *self.kernel)

    @property
    def as_child(self) -> "ChildSpec":
        """The layer itself as a one-conv chain (its cost is the "before" figure)."""
        return ChildSpec("original", self.cin, self.cout, self.kernel, self.stride, self.pads, self.group,
                         self.has_bias, self.dilation)


@dataclass(frozen=True)
class ChildSpec:
    """One child conv of a decomposition: everything but the weight values."""

    role: str                                   # "first", "core", "vertical", "horizontal", "last"
    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    group: int = 1
    has_bias: bool = False
    dilation: tuple[int, int] = (1, 1)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.cout, self.cin // self.group, *self.kernel)

    def out_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        (h, w), (kh, kw), (sh, sw), (dh, dw) = in_hw, self.kernel, self.stride, self.dilation
        top, left, bottom, right = self.pads
        return ((h + top + bottom - dh * (kh - 1) - 1) // sh + 1,
                (w + left + right - dw * (kw - 1) - 1) // sw + 1)

    def to_json(self) -> dict:
        return {"role": self.role, "weight_shape": list(self.weight_shape), "kernel_size": list(self.kernel),
                "stride": list(self.stride), "padding": list(self.pads), "groups": self.group,
                "bias": self.has_bias}


@dataclass(frozen=True)
class Cost:
    """FLOPs (None when the spatial size is unknown) and parameter count."""

    flops: Optional[int]
    params: int

    def __add__(self, other: "Cost") -> "Cost":
        flops = None if self.flops is None or other.flops is None else self.flops + other.flops
        return Cost(flops, self.params + other.params)

    def metric(self, name: str) -> Optional[int]:
        return self.flops if name == "flops" else self.params


def conv_cost(spec: ChildSpec, in_hw: Optional[tuple[int, int]]) -> tuple[Cost, Optional[tuple[int, int]]]:
    """(cost of one conv, its output size) — the SPEC 8.2 formula."""
    kh, kw = spec.kernel
    params = spec.cout * (spec.cin // spec.group) * kh * kw + (spec.cout if spec.has_bias else 0)
    if in_hw is None:
        return Cost(None, params), None
    out_h, out_w = spec.out_hw(in_hw)
    per_output = 2 * (spec.cin // spec.group) * kh * kw - 1 + int(spec.has_bias)
    return Cost(per_output * out_h * out_w * spec.cout, params), (out_h, out_w)


def chain_cost(children: Sequence[ChildSpec], in_hw: Optional[tuple[int, int]]) -> Cost:
    """Total cost of convs applied one after the other."""
    total = Cost(0, 0)
    for child in children:
        cost, in_hw = conv_cost(child, in_hw)
        total = total + cost
    return total


# -- child builders: the spatial attributes stay on the axis the kernel spans (SPEC 7) ----------
def vertical(layer: ConvLayer, role: str, cin: int, cout: int, *, group: int = 1, bias: bool = False) -> ChildSpec:
    """A (kh x 1) conv carrying the layer's vertical stride/padding."""
    top, _, bottom, _ = layer.pads
    return ChildSpec(role, cin, cout, (layer.kernel[0], 1), (layer.stride[0], 1), (top, 0, bottom, 0), group, bias)


def horizontal(layer: ConvLayer, role: str, cin: int, cout: int, *, group: int = 1, bias: bool = False) -> ChildSpec:
    """A (1 x kw) conv carrying the layer's horizontal stride/padding."""
    _, left, _, right = layer.pads
    return ChildSpec(role, cin, cout, (1, layer.kernel[1]), (1, layer.stride[1]), (0, left, 0, right), group, bias)


def pointwise(role: str, cin: int, cout: int, *, bias: bool = False) -> ChildSpec:
    return ChildSpec(role, cin, cout, (1, 1), has_bias=bias)


# -- composition: the one kernel a chain of children equals --------------------------------------
def _dense(weight: np.ndarray, group: int) -> np.ndarray:
    """A grouped kernel as the equivalent dense one (zeros off the diagonal blocks)."""
    if group == 1:
        return weight
    cout, cin_g = weight.shape[:2]
    out_g = cout // group
    dense = np.zeros((cout, cin_g * group, *weight.shape[2:]), dtype=weight.dtype)
    for g in range(group):
        dense[g * out_g:(g + 1) * out_g, g * cin_g:(g + 1) * cin_g] = weight[g * out_g:(g + 1) * out_g]
    return dense


def compose_kernels(children: Sequence[ChildSpec], weights: Sequence[np.ndarray]) -> np.ndarray:
    """The single kernel equal to the chain (exact for bias-free inner children, unit dilation).

    Kernels compose by full 2-D convolution over space and matrix product over channels, so a
    (kh x 1) then (1 x kw) chain gives a (kh x kw) kernel. Strides compose only when each
    child strides on an axis no later child's kernel spans, which holds for every method here.
    """
    total = _dense(np.asarray(weights[0], np.float64), children[0].group)
    for spec, weight in zip(children[1:], weights[1:]):
        nxt = _dense(np.asarray(weight, np.float64), spec.group)
        kh = total.shape[2] + nxt.shape[2] - 1
        kw = total.shape[3] + nxt.shape[3] - 1
        out = np.zeros((nxt.shape[0], total.shape[1], kh, kw))
        for dy in range(nxt.shape[2]):
            for dx in range(nxt.shape[3]):
                out[:, :, dy:dy + total.shape[2], dx:dx + total.shape[3]] += np.einsum(
                    "or,rihw->oihw", nxt[:, :, dy, dx], total)
        total = out
    return total


def relative_error(weight: np.ndarray, approx: np.ndarray) -> float:
    """‖W − Ŵ‖ / ‖W‖ (0 for an all-zero weight reproduced exactly)."""
    weight = np.asarray(weight, np.float64)
    norm = float(np.linalg.norm(weight))
    diff = float(np.linalg.norm(weight - approx))
    return diff / norm if norm else (0.0 if diff == 0 else float("inf"))
