"""Reading a QuantizeLinear / DequantizeLinear model: the factors of each Q/DQ node, the activation
pairs, the constants behind DequantizeLinear nodes and the trailing QuantizeLinear nodes, each checked
against AMCT's rules (problems name the node), and the constants restored to float.

``convert_qat`` (the pass) rewrites the graph from what this finds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import ConfigError, Problem
from ..ir.constants import chain_values, constant_chain
from .params import ActQuantParams
from .weights import deconv_channel_view

__all__ = ["QUANTIZE", "DEQUANTIZE", "ACT_DTYPES", "WEIGHT_DTYPE_NAMES", "UINT8_SHIFT", "dtype_bits", "QdqFactors", "QdqPair", "QuantConst",
           "node_factors", "analyse", "restore_constants", "broadcast", "channel_scales", "problem"]

WHERE = "pass 'convert_qat'"
QUANTIZE, DEQUANTIZE = "QuantizeLinear", "DequantizeLinear"
ACT_DTYPES = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.uint16), np.dtype(np.int16))
WEIGHT_DTYPE_NAMES = ("int8", "uint8", "int4", "uint4")      # INT4 Q/DQ (opset 21) load as ml_dtypes arrays
UINT8_SHIFT = 128


def dtype_bits(dtype: np.dtype) -> int:
    """Bits of an integer Q/DQ type (INT4 / UINT4 included)."""
    return 4 if dtype.name in ("int4", "uint4") else np.dtype(dtype).itemsize * 8


def _signed(dtype: np.dtype) -> bool:
    return dtype.name == "int4" or np.issubdtype(dtype, np.signedinteger)


def _is_integer(dtype: np.dtype) -> bool:
    return dtype.name in ("int4", "uint4") or np.issubdtype(dtype, np.integer)


def problem(node: gs.Node | str, message: str, hint: str = "") -> Problem:
    name = node if isinstance(node, str) else node.name
    return Problem(WHERE, f"node '{name}'", message, hint)


# -- factors of one Q/DQ node ------------------------------------------------------------------
@dataclass(frozen=True)
class QdqFactors:
    scale: np.ndarray          # float, shape () or (C,)
    zero_point: np.ndarray     # int64, same size as scale (broadcast)
    dtype: np.dtype            # the integer type
    axis: int | None        # None when per tensor

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    @property
    def bits(self) -> int:
        return dtype_bits(self.dtype)

    @property
    def shift(self) -> int:
        """Unsigned -> signed domain: offset = zp - 128 for uint8 (SPEC 4.1; 32768 for uint16, 8 for
        uint4); 0 for signed types."""
        return 0 if _signed(self.dtype) else 1 << (self.bits - 1)

    @property
    def code_range(self) -> tuple[int, int]:
        if _signed(self.dtype):
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    def same(self, other: QdqFactors, rank: int | None = None) -> bool:
        if self.dtype != other.dtype or self.scale.size != other.scale.size:
            return False
        if not self.per_tensor and _norm_axis(self.axis, rank) != _norm_axis(other.axis, rank):
            return False
        return (np.array_equal(self.scale.reshape(-1).astype(np.float32), other.scale.reshape(-1).astype(np.float32))
                and np.array_equal(self.zero_point.reshape(-1), other.zero_point.reshape(-1)))

    def act_params(self) -> ActQuantParams:
        return ActQuantParams(float(np.float32(self.scale.reshape(-1)[0])),
                              int(self.zero_point.reshape(-1)[0]) - self.shift, 16 if self.bits == 16 else 8)

    def describe(self) -> str:
        scale = self.scale.reshape(-1)
        zp = self.zero_point.reshape(-1)
        if self.per_tensor:
            return f"scale {np.float32(scale[0])}, zero point {int(zp[0])} ({self.dtype.name})"
        return f"{scale.size} scales on axis {self.axis}, zero points {_preview(zp)} ({self.dtype.name})"


def _norm_axis(axis: int | None, rank: int | None) -> int | None:
    return axis % rank if axis is not None and rank else axis


def _preview(values: np.ndarray, limit: int = 4) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return f"[{shown}{', ...' if values.size > limit else ''}]"


@dataclass
class QdqPair:
    """x -> Q -> [Clip on codes] -> DQ. ``code_clip``: integer bounds of that Clip (in the Q's type)."""

    q: gs.Node
    dq: gs.Node
    factors: QdqFactors
    code_clip: tuple[int, int] | None = None

    def bounds(self) -> tuple[int, int]:
        low, high = self.factors.code_range
        if self.code_clip is not None:
            low, high = max(low, self.code_clip[0]), min(high, self.code_clip[1])
        return low, high


@dataclass
class QuantConst:
    """A constant restored from a DequantizeLinear (or a float weight through Q -> DQ)."""

    node: str                  # the DequantizeLinear
    codes: np.ndarray          # raw integer codes
    factors: QdqFactors
    values: np.ndarray         # the dequantized float32 values


# -- analysis: find pairs, constant DQs, trailing Qs; check the rules ----------------------------
def _constant(graph, tensor: gs.Tensor) -> np.ndarray | None:
    if constant_chain(tensor) is None:
        return None
    return np.asarray(chain_values(tensor))


def node_factors(graph, node: gs.Node, problems: list[Problem]) -> QdqFactors | None:
    """The node's (scale, zero point, type, axis); None (and a problem) when they are unusable."""
    label = f"{node.op}"
    if int(node.attrs.get("block_size", 0) or 0):
        problems.append(problem(node, f"{label} with block_size {node.attrs['block_size']} (blocked quantization) "
                                       "is not supported"))
        return None
    scale_t = node.inputs[1] if len(node.inputs) > 1 else None
    scale = _constant(graph, scale_t) if scale_t is not None and scale_t.name else None
    if scale is None:
        problems.append(problem(node, f"{label} scale is not a constant"))
        return None
    zp_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if zp_t is not None:
        zp = _constant(graph, zp_t)
        if zp is None:
            problems.append(problem(node, f"{label} zero point is not a constant"))
            return None
        dtype = zp.dtype
    else:
        dtype = _default_dtype(graph, node)
        zp = np.zeros(scale.shape, np.int64)
    if not _is_integer(dtype):
        problems.append(problem(node, f"{label} quantizes to {dtype.name}; only integer types are supported"))
        return None
    if scale.dtype != np.float32:
        problems.append(problem(node, f"{label} has a {scale.dtype.name} scale; only float32 is supported"))
        return None
    if scale.size > 1 and scale.ndim != 1 or zp.size not in (1, scale.size):
        problems.append(problem(node, f"{label} scale shape {list(scale.shape)} / zero point shape "
                                       f"{list(zp.shape)} are not per tensor or per axis"))
        return None
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        problems.append(problem(node, f"{label} scale must be finite and > 0, got {_preview_f(scale)}"))
        return None
    axis = int(node.attrs.get("axis", 1)) if scale.size > 1 else None
    zp = np.broadcast_to(zp.astype(np.int64).reshape(-1), (scale.size,)).reshape(scale.shape)
    return QdqFactors(scale.astype(np.float32), zp, np.dtype(dtype), axis)


def _preview_f(values: np.ndarray) -> str:
    flat = values.reshape(-1)
    return ", ".join(str(v) for v in flat[:3]) + (", ..." if flat.size > 3 else "")


def _default_dtype(graph, node: gs.Node) -> np.dtype:
    """Type without a zero point: Q's output_dtype (opset 21) or uint8; DQ: its input's type."""
    if node.op == QUANTIZE:
        if len(node.inputs) > 2 and node.inputs[2].name:
            zp = _constant(graph, node.inputs[2])
            if zp is not None:
                return zp.dtype
        code = int(node.attrs.get("output_dtype", 0) or 0)
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(code)) if code else np.dtype(np.uint8)
    x = node.inputs[0]
    values = _constant(graph, x)
    if values is not None:
        return values.dtype
    producer = graph.producer(x)
    while producer is not None and producer.op == "Clip":
        producer = graph.producer(producer.inputs[0])
    if producer is not None and producer.op == QUANTIZE:
        return _default_dtype(graph, producer)
    return np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.uint8)


def analyse(graph, problems: list[Problem]):
    """(activation pairs, constant DQs with their factors, trailing Qs) in graph order; rule checks."""
    pairs: list[QdqPair] = []
    constants: list[tuple[gs.Node, QdqFactors, gs.Node | None]] = []    # (DQ, factors, Q of a float weight)
    trailing: list[tuple[gs.Node, QdqFactors]] = []
    paired_dq: set[int] = set()
    for node in list(graph.nodes):
        if node.op != QUANTIZE:
            continue
        factors = node_factors(graph, node, problems)
        readers = _dq_readers(graph, node, problems)
        paired_dq.update(id(dq) for dq, _ in readers or ())
        if factors is None or readers is None:
            continue
        weight = constant_chain(node.inputs[0]) is not None
        if not weight:
            _check_activation(node, factors, problems)
        rank = _rank(node.inputs[0])
        for dq, clip in readers:
            dq_factors = node_factors(graph, dq, problems)
            if dq_factors is None:
                continue
            if not factors.same(dq_factors, rank):
                problems.append(problem(dq, f"DequantizeLinear and its QuantizeLinear '{node.name}' have different "
                                             f"factors ({dq_factors.describe()} vs {factors.describe()}); a Q/DQ "
                                             "pair must share scale and zero point"))
                continue
            if weight:
                constants.append((dq, factors, node))
            else:
                pairs.append(QdqPair(node, dq, factors, clip))
        if graph.is_graph_output(node.outputs[0]):
            if weight:
                problems.append(problem(node, "QuantizeLinear of a constant is a graph output"))
            else:
                trailing.append((node, factors))
    for node in graph.nodes:
        if node.op != DEQUANTIZE or id(node) in paired_dq:
            continue
        if constant_chain(node.inputs[0]) is None:
            producer = graph.producer(node.inputs[0])
            what = f"{producer.op} '{producer.name}'" if producer is not None else "a graph input"
            problems.append(problem(node, f"DequantizeLinear reads '{node.inputs[0].name}' from {what}, neither a "
                                           "QuantizeLinear nor a constant", "convert_qat needs float model inputs and "
                                                                            "Q/DQ pairs"))
            continue
        factors = node_factors(graph, node, problems)
        if factors is not None:
            constants.append((node, factors, None))
    return pairs, constants, trailing


def _rank(tensor: gs.Tensor) -> int | None:
    if isinstance(tensor, gs.Constant):
        return tensor.values.ndim
    return len(tensor.shape) if tensor.shape is not None else None


def _check_activation(node: gs.Node, factors: QdqFactors, problems: list[Problem]) -> None:
    if not factors.per_tensor:
        problems.append(problem(node, f"per-channel activation quantization ({factors.scale.size} scales on axis "
                                       f"{factors.axis}); AMCT quantizes activations per tensor",
                                 "only weights may be quantized per channel"))
    if factors.dtype not in ACT_DTYPES:
        problems.append(problem(node, f"unsupported activation type {factors.dtype.name}; AMCT converts int8 and "
                                       "uint8 Q/DQ pairs (and 16-bit ones, INT16 activations)"))


def _dq_readers(graph, q: gs.Node, problems: list[Problem]) -> list[tuple[gs.Node, tuple[int, int] | None]] | None:
    """The DequantizeLinear nodes reading a QuantizeLinear, directly or through one Clip on the codes."""
    found = []
    ok = True
    for reader in list(q.outputs[0].outputs):
        if reader.op == DEQUANTIZE:
            found.append((reader, None))
        elif reader.op == "Clip" and reader.inputs[0] is q.outputs[0]:
            bounds = _code_clip(graph, reader)
            out = reader.outputs[0]
            if bounds is None or graph.is_graph_output(out) or any(r.op != DEQUANTIZE for r in out.outputs):
                problems.append(problem(reader, f"Clip on the codes of QuantizeLinear '{q.name}' must have "
                                                 "constant bounds and feed only DequantizeLinear nodes"))
                ok = False
                continue
            found += [(r, bounds) for r in out.outputs]
        else:
            problems.append(problem(q, f"QuantizeLinear output feeds {reader.op} '{reader.name}', not a "
                                        "DequantizeLinear", "convert_qat takes QDQ models (Q/DQ pairs), not "
                                                            "QOperator models (QLinearConv, ...)"))
            ok = False
    return found if ok else None


def _code_clip(graph, node: gs.Node) -> tuple[int, int] | None:
    bounds = []
    for index in (1, 2):
        if index >= len(node.inputs) or not node.inputs[index].name:
            bounds.append(None)
            continue
        value = _constant(graph, node.inputs[index])
        if value is None or value.size != 1:
            return None
        bounds.append(int(value.reshape(())))
    low, high = bounds
    return (-(1 << 62) if low is None else low, (1 << 62) if high is None else high)


# -- constants -----------------------------------------------------------------------------------
def broadcast(factors: QdqFactors, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Scale or zero point (``values``, shape of factors.scale) broadcast to a tensor of ``shape``."""
    if factors.per_tensor:
        return np.broadcast_to(values.reshape(()), shape)
    axis = factors.axis % len(shape)
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(values.reshape(view), shape)


def restore_constants(graph, constants) -> dict[str, QuantConst]:
    """Every constant DQ (and float weight through Q -> DQ) becomes a float constant; name -> info."""
    restored: dict[str, QuantConst] = {}
    for dq, factors, q in constants:
        if q is None:
            codes = np.asarray(chain_values(dq.inputs[0]))
        else:
            weight = np.asarray(chain_values(q.inputs[0]), np.float32)
            scale = broadcast(factors, factors.scale, weight.shape)
            zp = broadcast(factors, factors.zero_point, weight.shape)
            low, high = factors.code_range
            codes = np.clip(np.rint(weight / scale) + zp, low, high).astype(factors.dtype)
        if not factors.per_tensor and (factors.axis % max(codes.ndim, 1)) >= codes.ndim:
            raise ConfigError([problem(dq, f"axis {factors.axis} is out of range for a {codes.ndim}-D tensor")])
        scale = broadcast(factors, factors.scale, codes.shape)
        zp = broadcast(factors, factors.zero_point, codes.shape)
        values = ((codes.astype(np.int64) - zp).astype(np.float32) * scale).astype(np.float32)
        out = dq.outputs[0]
        dq.outputs.clear()
        name = out.name if not graph.is_graph_output(out) else f"{out.name}_value"
        const = gs.Constant(name, np.ascontiguousarray(values))
        for reader in list(out.outputs):
            for index, tensor in enumerate(reader.inputs):
                if tensor is out:
                    reader.inputs[index] = const
        if graph.is_graph_output(out):
            graph.gs.nodes.append(gs.Node("Identity", f"{dq.name}.value", inputs=[const], outputs=[out]))
        restored[name] = QuantConst(dq.name, codes, factors, values)
    return restored



def channel_scales(node: gs.Node, found: dict[str, Any], scale: np.ndarray) -> tuple[int, np.ndarray | None]:
    """(output-channel axis of the weight, the per-output-channel scales, or None when the scale varies
    along another axis). ``scale``: the weight's scale broadcast to the weight's shape, as the layer sees it."""
    op = node.op
    if op == "ConvTranspose":
        scale, axis = deconv_channel_view(scale, int(found.get("group", 1))), 1
    elif op == "Conv":
        axis = 0
    elif op == "Gemm":
        axis = 0 if int(node.attrs.get("transB", 0)) else 1
    else:
        axis = scale.ndim - 1
    rows = np.moveaxis(scale, axis, 0).reshape(scale.shape[axis], -1)
    if rows.shape[1] and not np.all(rows == rows[:, :1]):
        return axis, None
    return axis, np.ascontiguousarray(rows[:, 0] if rows.shape[1] else np.ones(rows.shape[0], np.float32))
