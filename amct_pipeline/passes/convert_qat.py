"""convert_qat: AMCT's ``convert_qat_model`` (SPEC 9) -- a QuantizeLinear/DequantizeLinear model becomes
the float graph plus the quantization artifacts ``lower`` needs (``layer_map``, ``act_quant``,
``weight_quant``), so ``convert_qat,lower{targets=[fakequant,ascend]},export_amct`` writes the deploy
model, the fake-quant model and ``record.txt`` of a QAT (or otherwise pre-quantized) model.

Accepted input: our own ``qdq`` target output, onnxruntime's ``quantize_static`` QDQ output (per-channel
weights, uint8 or int8 activations), PyTorch QAT exports (float weights through ``Q -> DQ``, int32 or
float biases). What happens to each node:

* **Constants behind a DequantizeLinear** (int8 weights, int32 biases, anything else) and **weights
  through Q -> DQ** (float constant -> QuantizeLinear -> DequantizeLinear; codes computed with ONNX
  semantics ``saturate(round(w / s) + zp)``) become float constants holding the dequantized values.
  The weight codes and scales are kept for the layer.
* **Activation pairs** ``x -> QuantizeLinear -> [Clip on the codes] -> DequantizeLinear -> readers``:
  a Conv / ConvTranspose / Gemm / MatMul reading the pair on its data input, with a quantized
  constant weight, becomes a quantized layer with the pair's factors: ``scale_d = scale``,
  ``offset_d = zp - 128`` (uint8) or ``zp`` (int8) (SPEC 4.1); weight factors from the weight's
  DequantizeLinear (``scale_w`` per tensor, or per output channel); AveragePool likewise with
  ``scale_w = 1``. The layer then reads ``x`` directly (``lower`` puts AscendQuant there). A Clip on
  the codes (our ``qdq`` target folds Relu that way) becomes a float Clip at the same bounds before the
  layer, which quantizes identically.
* **Add / MaxPool reading a pair** (SPEC 6.1/9, tensor quantization): an entry
  ``"<node>:<input index>" -> ActQuantParams`` in the ``tensor_quantize`` artifact, and the node reads
  ``x``; ``lower`` turns it into AscendQuant + AscendAntiQuant (deploy) or their fake-quant ops, and the
  record lists it under that key. A tensor read by a layer and an Add with the same pair shares one
  AscendQuant (AMCT's multi-output layout).
* **Every other reader of a pair** (GlobalAveragePool, Reshape, Concat, a layer whose weight is not
  quantized, a graph output, ...) has no AMCT representation. With ``other_pairs: fakequant``
  (default) the pair becomes the same quantize-dequantize in standard float ops::

      x -> Mul(float32(1/scale)) -> Round -> Add(offset_d) -> Clip(qmin, qmax) -> Sub(offset_d) -> Mul(scale)

  (nodes ``<x>.qat_quant.fakequant.{mul,round,add,clip,sub}``, ``<x>.qat_quant.fakeantiquant.mul``), in
  the float graph and so in both lowered models. onnxruntime's QDQ models quantize layer outputs and
  pooling too, and drop a Relu/Clip whose range the quantizer saturates anyway: dropping the pairs
  around MobileNetV2's GlobalAveragePool loses its last Relu6 and moves the logits by ~15 output
  quantization steps (dropping the Add input pairs instead of tensor-quantizing them: ~10 steps).
  With ``other_pairs: remove`` they are dropped all the same, keeping only their saturation as a
  float ``Clip`` to the pair's range (which restores such a Relu6, not the rounding).
* **A trailing QuantizeLinear** (its integer output is a graph output): AscendQuant in fake-quant
  form producing the codes in the original integer type, ``x -> Mul(1/scale) -> Round ->
  Add(zp) -> Clip(type range) -> Cast`` (nodes ``<Q>.quant.fakequant.*``), so the model keeps its
  interface; its factors (``offset_d = zp - 128`` for uint8) are listed in ``qat_tensor_quant``.

Every quantization point that is not a layer input is listed in the ``qat_tensor_quant`` artifact
(:class:`TensorQuant`). ``record.txt`` (written by ``lower`` / ``export_amct``) lists the layers and
the ``tensor_quantize`` entries with the QDQ factors exactly (float32).

Rules, each an error naming the node (all violations of a round are reported together -- pairs and
constants first, then layers -- and nothing is written): the two
halves of a pair must have equal factors; activations are per tensor; activation types are
int8/uint8 (others, e.g. uint16, are refused); weights are int8 (or uint8 with zero point 128) with
zero point 0 in the int8 domain, per tensor or per channel on the layer's output-channel axis; an
int32 bias's scale must equal ``scale_d * scale_w`` (relative ``bias_scale_rtol``); a
DequantizeLinear must read a QuantizeLinear or a constant.

Gemm/MatMul per-channel weights (onnxruntime's ``per_channel=True`` gives them) are kept per channel:
the lowering plan and both targets handle a ``[C]`` dequant scale; AMCT's own PTQ quantizes them per
tensor, so ``load_record`` refuses such a record. ``round_bias`` applies SPEC 9's accuracy note to
float biases in the float graph, ``round(b / (scale_d * scale_w)) * scale_d * scale_w`` (the lowered
models quantize the bias the same way either way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from pydantic import Field, PositiveFloat

from ..algorithms.base import ActQuantParams, WeightQuantParams
from ..algorithms.targets.common import TENSOR_QUANT_ARTIFACT, TENSOR_QUANT_OPS
from ..errors import ConfigError, Problem
from ..options import Options
from .base import Pass, PassResult

__all__ = ["ConvertQatOptions", "ConvertQatPass", "TensorQuant"]

WHERE = "pass 'convert_qat'"
QUANTIZE, DEQUANTIZE = "QuantizeLinear", "DequantizeLinear"
ACT_DTYPES = (np.dtype(np.uint8), np.dtype(np.int8))
UINT8_SHIFT = 128
MAX_PROBLEMS = 20


@dataclass(frozen=True)
class TensorQuant:
    """A quantization point that is not a layer input.

    ``kind``: ``"tensor_quantize"`` (Add/MaxPool inputs: entries of the ``tensor_quantize`` artifact,
    lowered and recorded by ``lower``), ``"fakequant"`` (other readers: fake-quant ops in the float
    graph), ``"removed"`` (``other_pairs: remove``: only a saturating Clip is left) or ``"output"`` (a
    trailing QuantizeLinear: AscendQuant in fake-quant form producing the graph output ``keys[0]``).
    ``keys``: ``"<reader>:<input index>"`` (graph outputs by name). ``nodes``: the float-graph nodes
    that represent it.
    """

    tensor: str
    params: ActQuantParams
    kind: str
    keys: tuple[str, ...]
    source: str
    nodes: tuple[str, ...] = ()


class ConvertQatOptions(Options):
    other_pairs: Literal["fakequant", "remove"] = Field(
        "fakequant", description="Pairs read by nodes that are neither quantized layers nor Add/MaxPool (pooling, "
                                 "Reshape, Concat, graph outputs...): keep their rounding as fake-quant float ops "
                                 "(fakequant), or drop them, keeping only their saturation as a Clip (remove).")
    round_bias: bool = Field(False, description="SPEC 9 accuracy note: round float biases to the int32 grid "
                                                "round(b/(scale_d*scale_w))*scale_d*scale_w in the float graph.")
    bias_scale_rtol: PositiveFloat = Field(1e-5, description="Allowed relative difference between an int32 bias's "
                                                             "scale and scale_d*scale_w.")


# -- factors of one Q/DQ node ------------------------------------------------------------------
@dataclass(frozen=True)
class _Factors:
    scale: np.ndarray          # float, shape () or (C,)
    zero_point: np.ndarray     # int64, same size as scale (broadcast)
    dtype: np.dtype            # the integer type
    axis: int | None        # None when per tensor

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    @property
    def shift(self) -> int:
        """uint8 -> int8 domain: offset = zp - 128 (SPEC 4.1); 0 for signed types."""
        return UINT8_SHIFT if self.dtype == np.uint8 else 0

    @property
    def code_range(self) -> tuple[int, int]:
        info = np.iinfo(self.dtype)
        return int(info.min), int(info.max)

    def same(self, other: _Factors, rank: int | None = None) -> bool:
        if self.dtype != other.dtype or self.scale.size != other.scale.size:
            return False
        if not self.per_tensor and _norm_axis(self.axis, rank) != _norm_axis(other.axis, rank):
            return False
        return (np.array_equal(self.scale.reshape(-1).astype(np.float32), other.scale.reshape(-1).astype(np.float32))
                and np.array_equal(self.zero_point.reshape(-1), other.zero_point.reshape(-1)))

    def act_params(self) -> ActQuantParams:
        return ActQuantParams(float(np.float32(self.scale.reshape(-1)[0])),
                              int(self.zero_point.reshape(-1)[0]) - self.shift, 8)

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
class _Pair:
    """x -> Q -> [Clip on codes] -> DQ. ``code_clip``: integer bounds of that Clip (in the Q's type)."""

    q: gs.Node
    dq: gs.Node
    factors: _Factors
    code_clip: tuple[int, int] | None = None

    def bounds(self) -> tuple[int, int]:
        low, high = self.factors.code_range
        if self.code_clip is not None:
            low, high = max(low, self.code_clip[0]), min(high, self.code_clip[1])
        return low, high


@dataclass
class _QuantConst:
    """A constant restored from a DequantizeLinear (or a float weight through Q -> DQ)."""

    node: str                  # the DequantizeLinear
    codes: np.ndarray          # raw integer codes
    factors: _Factors
    values: np.ndarray         # the dequantized float32 values


# -- the pass ----------------------------------------------------------------------------------
class ConvertQatPass(Pass):
    name = "convert_qat"
    summary = ("AMCT convert_qat_model: turn a QuantizeLinear/DequantizeLinear (QAT/QDQ) model into the float graph "
               "plus layer_map, act_quant and weight_quant for lower.")
    Options = ConvertQatOptions
    produces = frozenset({"layer_map", "act_quant", "weight_quant", "qat_tensor_quant", TENSOR_QUANT_ARTIFACT})

    def run(self, graph, ctx) -> PassResult:
        from ..algorithms.targets.common import ensure_opset
        if not any(n.op in (QUANTIZE, DEQUANTIZE) for n in graph.nodes):
            raise ConfigError([Problem(WHERE, "", "the model has no QuantizeLinear/DequantizeLinear nodes",
                                       "convert_qat converts QDQ/QAT models; use a PTQ pipeline for a float model")])
        if graph.opset < 13:     # Round, Clip with inputs, per-axis Q/DQ
            ensure_opset(graph, 13, target=self.name)
        problems: list[Problem] = []
        pairs, constants, trailing = _analyse(graph, problems)
        _raise(problems)
        restored = _restore_constants(graph, constants)
        converter = _Converter(graph, self.options, restored)
        layers = converter.match_layers(pairs)
        _raise(converter.problems)
        tensor_quant = converter.lower_pairs(pairs) + converter.lower_trailing(trailing)
        graph.finalize()
        left = [n.name for n in graph.nodes if n.op in (QUANTIZE, DEQUANTIZE)]
        if left:      # every Q/DQ is accounted for above; a leftover is a bug, not silently kept
            raise ConfigError([Problem(WHERE, f"node '{left[0]}'", "was not converted")])
        if self.options.round_bias:
            converter.round_biases()
        self._publish(ctx, converter, layers, tensor_quant)
        by_type: dict[str, int] = {}
        for layer in layers:
            by_type[layer.op_type] = by_type.get(layer.op_type, 0) + 1
        return PassResult(True, {
            "layers": len(layers), "by_type": by_type,
            "per_channel": sum(1 for p in converter.weight_quant.values() if p.scale.size > 1),
            "pairs": len(pairs), "constants": len(restored),
            "tensor_quantize": len(converter.tensor_quantize),
            **{kind: sum(1 for t in tensor_quant if t.kind == kind) for kind in ("fakequant", "removed", "output")},
            "unquantized": dict(converter.skipped)})

    def _publish(self, ctx, converter: _Converter, layers, tensor_quant: list[TensorQuant]) -> None:
        from .match_layers import LayerMap
        ctx.artifacts["layer_map"] = LayerMap(layers, converter.skipped)
        ctx.artifacts["act_quant"] = converter.act_quant
        ctx.artifacts["weight_quant"] = converter.weight_quant
        ctx.artifacts["qat_tensor_quant"] = tensor_quant
        settings = ctx.artifacts.setdefault("quant_settings", {})
        for layer in layers:
            params = converter.weight_quant[layer.name]
            if layer.weight is not None:
                settings.setdefault(layer.name, {})["wts"] = {
                    "algo": "arq", "num_bits": int(params.num_bits), "channel_wise": params.scale.size > 1}
        ctx.artifacts[TENSOR_QUANT_ARTIFACT] = dict(converter.tensor_quantize)


def _raise(problems: list[Problem]) -> None:
    if problems:
        shown = problems[:MAX_PROBLEMS]
        if len(problems) > MAX_PROBLEMS:
            shown.append(Problem(WHERE, "", f"... and {len(problems) - MAX_PROBLEMS} more"))
        raise ConfigError(shown)


def _problem(node: gs.Node | str, message: str, hint: str = "") -> Problem:
    name = node if isinstance(node, str) else node.name
    return Problem(WHERE, f"node '{name}'", message, hint)


# -- analysis: find pairs, constant DQs, trailing Qs; check the rules ----------------------------
def _const_chain(tensor: gs.Tensor):
    from .match_layers import _weight_chain
    return _weight_chain(tensor)


def _chain_values(tensor: gs.Tensor) -> np.ndarray:
    from .match_layers import _chain_values as values
    return values(tensor)


def _constant(graph, tensor: gs.Tensor) -> np.ndarray | None:
    if _const_chain(tensor) is None:
        return None
    return np.asarray(_chain_values(tensor))


def _factors(graph, node: gs.Node, problems: list[Problem]) -> _Factors | None:
    """The node's (scale, zero point, type, axis); None (and a problem) when they are unusable."""
    label = f"{node.op}"
    if int(node.attrs.get("block_size", 0) or 0):
        problems.append(_problem(node, f"{label} with block_size {node.attrs['block_size']} (blocked quantization) "
                                       "is not supported"))
        return None
    scale_t = node.inputs[1] if len(node.inputs) > 1 else None
    scale = _constant(graph, scale_t) if scale_t is not None and scale_t.name else None
    if scale is None:
        problems.append(_problem(node, f"{label} scale is not a constant"))
        return None
    zp_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if zp_t is not None:
        zp = _constant(graph, zp_t)
        if zp is None:
            problems.append(_problem(node, f"{label} zero point is not a constant"))
            return None
        dtype = zp.dtype
    else:
        dtype = _default_dtype(graph, node)
        zp = np.zeros(scale.shape, np.int64)
    if not np.issubdtype(dtype, np.integer):
        problems.append(_problem(node, f"{label} quantizes to {dtype.name}; only integer types are supported"))
        return None
    if scale.dtype != np.float32:
        problems.append(_problem(node, f"{label} has a {scale.dtype.name} scale; only float32 is supported"))
        return None
    if scale.size > 1 and scale.ndim != 1 or zp.size not in (1, scale.size):
        problems.append(_problem(node, f"{label} scale shape {list(scale.shape)} / zero point shape "
                                       f"{list(zp.shape)} are not per tensor or per axis"))
        return None
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        problems.append(_problem(node, f"{label} scale must be finite and > 0, got {_preview_f(scale)}"))
        return None
    axis = int(node.attrs.get("axis", 1)) if scale.size > 1 else None
    zp = np.broadcast_to(zp.astype(np.int64).reshape(-1), (scale.size,)).reshape(scale.shape)
    return _Factors(scale.astype(np.float32), zp, np.dtype(dtype), axis)


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


def _analyse(graph, problems: list[Problem]):
    """(activation pairs, constant DQs with their factors, trailing Qs) in graph order; rule checks."""
    pairs: list[_Pair] = []
    constants: list[tuple[gs.Node, _Factors, gs.Node | None]] = []    # (DQ, factors, Q of a float weight)
    trailing: list[tuple[gs.Node, _Factors]] = []
    paired_dq: set[int] = set()
    for node in list(graph.nodes):
        if node.op != QUANTIZE:
            continue
        factors = _factors(graph, node, problems)
        readers = _dq_readers(graph, node, problems)
        paired_dq.update(id(dq) for dq, _ in readers or ())
        if factors is None or readers is None:
            continue
        weight = _const_chain(node.inputs[0]) is not None
        if not weight:
            _check_activation(node, factors, problems)
        rank = _rank(node.inputs[0])
        for dq, clip in readers:
            dq_factors = _factors(graph, dq, problems)
            if dq_factors is None:
                continue
            if not factors.same(dq_factors, rank):
                problems.append(_problem(dq, f"DequantizeLinear and its QuantizeLinear '{node.name}' have different "
                                             f"factors ({dq_factors.describe()} vs {factors.describe()}); a Q/DQ "
                                             "pair must share scale and zero point"))
                continue
            if weight:
                constants.append((dq, factors, node))
            else:
                pairs.append(_Pair(node, dq, factors, clip))
        if graph.is_graph_output(node.outputs[0]):
            if weight:
                problems.append(_problem(node, "QuantizeLinear of a constant is a graph output"))
            else:
                trailing.append((node, factors))
    for node in graph.nodes:
        if node.op != DEQUANTIZE or id(node) in paired_dq:
            continue
        if _const_chain(node.inputs[0]) is None:
            producer = graph.producer(node.inputs[0])
            what = f"{producer.op} '{producer.name}'" if producer is not None else "a graph input"
            problems.append(_problem(node, f"DequantizeLinear reads '{node.inputs[0].name}' from {what}, neither a "
                                           "QuantizeLinear nor a constant", "convert_qat needs float model inputs and "
                                                                            "Q/DQ pairs"))
            continue
        factors = _factors(graph, node, problems)
        if factors is not None:
            constants.append((node, factors, None))
    return pairs, constants, trailing


def _rank(tensor: gs.Tensor) -> int | None:
    if isinstance(tensor, gs.Constant):
        return tensor.values.ndim
    return len(tensor.shape) if tensor.shape is not None else None


def _check_activation(node: gs.Node, factors: _Factors, problems: list[Problem]) -> None:
    if not factors.per_tensor:
        problems.append(_problem(node, f"per-channel activation quantization ({factors.scale.size} scales on axis "
                                       f"{factors.axis}); AMCT quantizes activations per tensor",
                                 "only weights may be quantized per channel"))
    if factors.dtype not in ACT_DTYPES:
        problems.append(_problem(node, f"unsupported activation type {factors.dtype.name}; AMCT converts int8 and "
                                       "uint8 Q/DQ pairs"))


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
                problems.append(_problem(reader, f"Clip on the codes of QuantizeLinear '{q.name}' must have "
                                                 "constant bounds and feed only DequantizeLinear nodes"))
                ok = False
                continue
            found += [(r, bounds) for r in out.outputs]
        else:
            problems.append(_problem(q, f"QuantizeLinear output feeds {reader.op} '{reader.name}', not a "
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
def _broadcast(factors: _Factors, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Scale or zero point (``values``, shape of factors.scale) broadcast to a tensor of ``shape``."""
    if factors.per_tensor:
        return np.broadcast_to(values.reshape(()), shape)
    axis = factors.axis % len(shape)
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(values.reshape(view), shape)


def _restore_constants(graph, constants) -> dict[str, _QuantConst]:
    """Every constant DQ (and float weight through Q -> DQ) becomes a float constant; name -> info."""
    restored: dict[str, _QuantConst] = {}
    for dq, factors, q in constants:
        if q is None:
            codes = np.asarray(_chain_values(dq.inputs[0]))
        else:
            weight = np.asarray(_chain_values(q.inputs[0]), np.float32)
            scale = _broadcast(factors, factors.scale, weight.shape)
            zp = _broadcast(factors, factors.zero_point, weight.shape)
            low, high = factors.code_range
            codes = np.clip(np.rint(weight / scale) + zp, low, high).astype(factors.dtype)
        if not factors.per_tensor and (factors.axis % max(codes.ndim, 1)) >= codes.ndim:
            raise ConfigError([_problem(dq, f"axis {factors.axis} is out of range for a {codes.ndim}-D tensor")])
        scale = _broadcast(factors, factors.scale, codes.shape)
        zp = _broadcast(factors, factors.zero_point, codes.shape)
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
        restored[name] = _QuantConst(dq.name, codes, factors, values)
    return restored


# -- layers, tensor quantization -------------------------------------------------------------------
class _Converter:
    def __init__(self, graph, options: ConvertQatOptions, restored: dict[str, _QuantConst]) -> None:
        from ..algorithms.targets.common import Namer
        self.graph, self.options, self.restored = graph, options, restored
        self.namer = Namer(graph)
        self.problems: list[Problem] = []
        self.skipped: dict[str, str] = {}
        self.act_quant: dict[str, ActQuantParams] = {}
        self.weight_quant: dict[str, WeightQuantParams] = {}
        self.layers: list = []
        self.tensor_quantize: dict[str, ActQuantParams] = {}
        self.absorbed: dict[int, set[int]] = {}       # id(pair) -> ids of layer nodes reading the layer input
        self._clipped: dict[int, gs.Tensor] = {}      # id(pair) -> float Clip output for layers (code clips)

    # layers ------------------------------------------------------------------------------------
    def match_layers(self, pairs: list[_Pair]) -> list:
        from .match_layers import MATCHERS, SUPPORTED_OP_TYPES
        by_output = {id(p.dq.outputs[0]): p for p in pairs}
        for node in list(self.graph.nodes):
            if node.op not in SUPPORTED_OP_TYPES:
                continue
            pair = by_output.get(id(node.inputs[0])) if node.inputs else None
            if pair is None:
                self.skipped[node.name] = "input is not quantized (no QuantizeLinear/DequantizeLinear pair)"
                continue
            found = MATCHERS[node.op](self.graph, node)
            if isinstance(found, str):
                self.skipped[node.name] = found
                continue
            weights = self._weights(node, found)
            if isinstance(weights, str):
                self.skipped[node.name] = weights
                continue
            if weights is None:      # a rule violation, already reported
                continue
            params, channel_axis = weights
            act = pair.factors.act_params()
            if not self._check_bias(node, found, act, params):
                continue
            found = dict(found)
            if channel_axis is not None and found.get("channel_axis") is None:
                found["channel_axis"] = channel_axis       # Gemm/MatMul per channel
            layer_input = self._layer_input(pair)
            node.inputs[0] = layer_input
            found["input"] = layer_input.name
            from .match_layers import QuantLayer
            self.layers.append(QuantLayer(**found))
            self.act_quant[node.name] = act
            self.weight_quant[node.name] = params
            self.absorbed.setdefault(id(pair), set()).add(id(node))
        return self.layers

    def _layer_input(self, pair: _Pair) -> gs.Tensor:
        """The tensor a quantized layer reads: the pair's input, or a float Clip of it for a code clip."""
        x = pair.q.inputs[0]
        low, high = pair.bounds()
        if (low, high) == pair.factors.code_range:
            return x
        if id(pair) not in self._clipped:
            s = np.float32(pair.factors.scale.reshape(-1)[0])
            zp = int(pair.factors.zero_point.reshape(-1)[0])
            lo, hi = (np.array(np.float32(code - zp) * s, np.float32) for code in (low, high))
            base = f"{x.name}.code_clip"
            clip = self._node("Clip", base, [x, self._const(f"{base}.min", lo), self._const(f"{base}.max", hi)])
            self._clipped[id(pair)] = clip.outputs[0]
        return self._clipped[id(pair)]

    def _weights(self, node: gs.Node, found: dict[str, Any]):
        """(WeightQuantParams, channel axis or None), a reason the layer stays float, or None on a rule error."""
        from .quantize_weights import weightless_params
        if found.get("weight") is None:
            return weightless_params(), None
        info = self.restored.get(found["weight_source"])
        if info is None:
            return "weight is not quantized (no DequantizeLinear)"
        factors = info.factors
        if factors.dtype not in ACT_DTYPES:
            self.problems.append(_problem(info.node, f"unsupported weight type {factors.dtype.name} for layer "
                                                     f"'{node.name}'; AMCT converts int8 weights"))
            return None
        offsets = factors.zero_point.reshape(-1) - factors.shift
        if np.any(offsets != 0):
            bad = int(offsets[np.flatnonzero(offsets)[0]])
            where = "" if factors.per_tensor else f" on channel {int(np.flatnonzero(offsets)[0])}"
            self.problems.append(_problem(info.node, f"weight zero point must be 0 (AMCT weights are symmetric), got "
                                                     f"{bad + factors.shift}{where} ({factors.dtype.name}) for layer "
                                                     f"'{node.name}'"))
            return None
        codes = (info.codes.astype(np.int16) - factors.shift).astype(np.int8)
        scale = _broadcast(factors, factors.scale, codes.shape).astype(np.float32)
        for view in found["weight_via"]:
            view_node = self.graph.node(view)
            codes, scale = _view(view_node, codes), _view(view_node, scale)
        channel_axis, scale_w = _channel_scales(node, found, scale)
        if scale_w is None:
            self.problems.append(_problem(info.node, f"per-channel axis {factors.axis} is not the output-channel axis "
                                                     f"of {node.op} '{node.name}' (weight axis {channel_axis})",
                                          "weights may be quantized per tensor or per output channel only"))
            return None
        if factors.per_tensor:
            scale_w = scale_w[:1]
        if node.op == "Gemm":
            alpha = float(node.attrs.get("alpha", 1.0))
            if alpha != 1.0:       # lower applies alpha through the scale (the codes are B's)
                scale_w = (scale_w * np.float32(alpha)).astype(np.float32)
        per_channel_axis = channel_axis if scale_w.size > 1 else None
        return WeightQuantParams(np.ascontiguousarray(scale_w, np.float32), np.ascontiguousarray(codes), 8), \
            per_channel_axis

    def _check_bias(self, node: gs.Node, found: dict[str, Any], act: ActQuantParams,
                    params: WeightQuantParams) -> bool:
        """An int32 bias must have been quantized with scale_d * scale_w (SPEC 4.1)."""
        bias = found.get("bias")
        if bias is None or params.scale is None:
            return True
        from .match_layers import _weight_chain
        holders = [node] + ([self.graph.node(found["bias_add"])] if found.get("bias_add") else [])
        tensor = next((t for n in holders for t in n.inputs if t.name == bias), None)
        chain = _weight_chain(tensor) if tensor is not None else None
        info = self.restored.get(chain[0].name) if chain is not None else None
        if info is None or info.factors.dtype != np.int32:
            return True
        deq = (np.float32(act.scale) * params.scale.astype(np.float32)).astype(np.float64)
        scale = _broadcast(info.factors, info.factors.scale, info.codes.shape).astype(np.float64).reshape(-1)
        if node.op == "Gemm":
            scale = scale * float(node.attrs.get("beta", 1.0))
        if scale.size != deq.size and 1 not in (scale.size, deq.size):
            return True      # bias and weight channels disagree: the lowering plan reports it
        scale, deq = np.broadcast_arrays(scale, deq)
        relative = np.abs(scale - deq) / deq
        index = int(np.argmax(relative))
        if relative[index] > self.options.bias_scale_rtol:
            self.problems.append(_problem(info.node, f"int32 bias scale {np.float32(scale[index])} of layer '{node.name}' "
                                                     f"differs from scale_d * scale_w = {np.float32(deq[index])} "
                                                     f"(relative {float(relative[index]):.2e} > bias_scale_rtol "
                                                     f"{self.options.bias_scale_rtol:g})",
                                          "the bias must be quantized with the product of the input and weight scales"))
            return False
        return True

    # pairs -----------------------------------------------------------------------------------------
    def lower_pairs(self, pairs: list[_Pair]) -> list[TensorQuant]:
        """Quantized layers read the pair's input already; Add/MaxPool readers get ``tensor_quantize``
        entries; every other reader (and a graph output) the ``other_pairs`` treatment."""
        out = []
        for pair in pairs:
            dq_out = pair.dq.outputs[0]
            absorbed = self.absorbed.get(id(pair), set())
            readers = [(r, i) for r in dq_out.outputs if id(r) not in absorbed
                       for i, t in enumerate(r.inputs) if t is dq_out]
            pair.dq.outputs.clear()
            pair.dq.inputs.clear()
            x = pair.q.inputs[0]
            params = pair.factors.act_params()
            full_range = pair.bounds() == pair.factors.code_range
            tensor_readers = [(r, i) for r, i in readers if r.op in TENSOR_QUANT_OPS and full_range]
            for reader, index in tensor_readers:
                reader.inputs[index] = x
                self.tensor_quantize[f"{reader.name}:{index}"] = params
            if tensor_readers:
                out.append(TensorQuant(x.name, params, "tensor_quantize",
                                       tuple(f"{r.name}:{i}" for r, i in tensor_readers), pair.q.name))
            keys = tuple(f"{r.name}:{i}" for r, i in readers if (r, i) not in tensor_readers)
            if self.graph.is_graph_output(dq_out):
                keys += (dq_out.name,)
            if not keys:
                continue
            if self.options.other_pairs == "fakequant":
                out.append(TensorQuant(x.name, params, "fakequant", keys, pair.q.name,
                                       self._fake_tensor_quant(x, pair, dq_out)))
            else:
                out.append(TensorQuant(x.name, params, "removed", keys, pair.q.name, self._saturation(x, pair, dq_out)))
        return out

    def _fake_tensor_quant(self, x: gs.Tensor, pair: _Pair, out: gs.Tensor) -> tuple[str, ...]:
        """AscendQuant + AscendAntiQuant as AMCT's fake-quant ops (SPEC 5.4), producing ``out``."""
        from ..algorithms.targets.common import quant_multiplier
        params = pair.factors.act_params()
        low, high = (code - pair.factors.shift for code in pair.bounds())
        base = f"{x.name}.qat_quant"
        prefix = f"{base}.fakequant"
        nodes = []
        y = x
        offset = self._const(f"{prefix}.offset", np.array(params.offset, np.float32))
        for op, suffix, extra in (
                ("Mul", "mul", [self._const(f"{prefix}.scale", np.array(quant_multiplier(params.scale), np.float32))]),
                ("Round", "round", []),
                ("Add", "add", [offset]),
                ("Clip", "clip", [self._const(f"{prefix}.min_val", np.array(low, np.float32)),
                                  self._const(f"{prefix}.max_val", np.array(high, np.float32))]),
                ("Sub", "sub", [offset])):
            node = self._node(op, f"{prefix}.{suffix}", [y, *extra])
            nodes.append(node.name)
            y = node.outputs[0]
        anti = self._node("Mul", f"{base}.fakeantiquant.mul",
                          [y, self._const(f"{base}.fakeantiquant.scale", np.array(params.scale, np.float32))], [out])
        nodes.append(anti.name)
        return tuple(nodes)

    def _saturation(self, x: gs.Tensor, pair: _Pair, out: gs.Tensor) -> tuple[str, ...]:
        """``other_pairs: remove``: the pair's representable range as a float Clip producing ``out``."""
        low, high = pair.bounds()
        s = np.float32(pair.factors.scale.reshape(-1)[0])
        zp = int(pair.factors.zero_point.reshape(-1)[0])
        base = f"{x.name}.qat_range"
        lo, hi = (np.array(np.float32(code - zp) * s, np.float32) for code in (low, high))
        clip = self._node("Clip", f"{base}.clip", [x, self._const(f"{base}.min", lo), self._const(f"{base}.max", hi)],
                          [out])
        return (clip.name,)

    def lower_trailing(self, trailing) -> list[TensorQuant]:
        """A QuantizeLinear whose codes are a graph output: AscendQuant in fake-quant form, same output type."""
        from ..algorithms.targets.common import quant_multiplier
        out = []
        for q, factors in trailing:
            x, codes = q.inputs[0], q.outputs[0]
            q.outputs.clear()
            q.inputs.clear()
            params = factors.act_params()
            zp = int(factors.zero_point.reshape(-1)[0])
            low, high = factors.code_range
            prefix = f"{q.name}.quant.fakequant"
            nodes = []
            y = x
            for op, suffix, extra in (
                    ("Mul", "mul", [self._const(f"{prefix}.scale", np.array(quant_multiplier(params.scale), np.float32))]),
                    ("Round", "round", []),
                    ("Add", "add", [self._const(f"{prefix}.offset", np.array(zp, np.float32))]),
                    ("Clip", "clip", [self._const(f"{prefix}.min_val", np.array(low, np.float32)),
                                      self._const(f"{prefix}.max_val", np.array(high, np.float32))])):
                node = self._node(op, f"{prefix}.{suffix}", [y, *extra])
                nodes.append(node.name)
                y = node.outputs[0]
            cast = self._node("Cast", f"{prefix}.cast", [y], [codes],
                              to=int(onnx.helper.np_dtype_to_tensor_dtype(factors.dtype)))
            nodes.append(cast.name)
            out.append(TensorQuant(x.name, params, "output", (codes.name,), q.name, tuple(nodes)))
        return out

    # bias rounding -----------------------------------------------------------------------------------
    def round_biases(self) -> None:
        """SPEC 9: float biases put on the int32 grid the deploy model uses."""
        from ..quant.math import quantize_bias
        from .match_layers import _weight_chain
        tensors = self.graph.tensors()
        for layer in self.layers:
            if layer.bias is None or layer.bias not in tensors:
                continue
            tensor = tensors[layer.bias]
            chain = _weight_chain(tensor)
            if not isinstance(tensor, gs.Constant) or chain is None or chain[1]:
                continue
            info = self.restored.get(tensor.name)
            if info is not None and info.factors.dtype == np.int32:
                continue      # already on the grid
            beta = float(self.graph.node(layer.name).attrs.get("beta", 1.0)) if layer.op_type == "Gemm" else 1.0
            act, params = self.act_quant[layer.name], self.weight_quant[layer.name]
            values = np.asarray(tensor.values, np.float64) * beta
            codes = quantize_bias(values, act.scale, params.scale, layer.name)
            deq = (np.float32(act.scale) * params.scale.astype(np.float32)).astype(np.float64)
            rounded = codes.reshape(-1).astype(np.float64) * (deq if deq.size > 1 else deq[0]) / beta
            tensor.values = rounded.reshape(np.shape(tensor.values)).astype(np.float32)

    # helpers -------------------------------------------------------------------------------------------
    def _const(self, name: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.namer(name), np.require(values, requirements="C"))

    def _node(self, op: str, name: str, inputs, outputs=None, **attrs) -> gs.Node:
        name = self.namer(name)
        outs = list(outputs) if outputs else [gs.Variable(self.namer(f"{name}:0"), dtype=np.float32)]
        node = gs.Node(op, name, attrs=attrs, inputs=list(inputs), outputs=outs)
        self.graph.gs.nodes.append(node)
        return node


def _view(node: gs.Node, values: np.ndarray) -> np.ndarray:
    from .match_layers import _apply_view
    return np.ascontiguousarray(_apply_view(node, values))


def _channel_scales(node: gs.Node, found: dict[str, Any], scale: np.ndarray) -> tuple[int, np.ndarray | None]:
    """(output-channel axis of the weight, the per-output-channel scales, or None when the scale varies
    along another axis). ``scale``: the weight's scale broadcast to the weight's shape, as the layer sees it."""
    from ..algorithms.weights import deconv_channel_view
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
