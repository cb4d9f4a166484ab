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
int8/uint8, or int16/uint16 for INT16 activations (others are refused); weights are int8 (or uint8 with
zero point 128), or int4 / uint4 for INT4 weights (opset 21), with zero point 0 in the signed domain, per tensor or per channel on the layer's output-channel axis; an
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

from ..algorithms.targets.channels import undo_code_padding
from ..errors import ConfigError, Problem
from ..ir.constants import apply_view, constant_chain
from ..ir.edit import Namer, add_node, constant, ensure_opset
from ..options import Options
from ..quant.fakequant import constant_factors, emit_antiquant, emit_codes, emit_fake_quant
from ..quant.layers import SUPPORTED_OP_TYPES, LayerMap, QuantLayer, match_layer
from ..quant.math import quantize_bias
from ..quant.params import ActQuantParams, WeightQuantParams, weightless_params
from ..quant.plan import TENSOR_QUANT_ARTIFACT, TENSOR_QUANT_OPS
from ..quant.qdq_analysis import (WEIGHT_DTYPE_NAMES, DEQUANTIZE, QUANTIZE, QdqPair, QuantConst, analyse, broadcast, channel_scales,
                                  problem, restore_constants)
from .base import Pass, PassResult

__all__ = ["ConvertQatOptions", "ConvertQatPass", "TensorQuant"]

WHERE = "pass 'convert_qat'"
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


# -- the pass ----------------------------------------------------------------------------------
class ConvertQatPass(Pass):
    name = "convert_qat"
    summary = ("AMCT convert_qat_model: turn a QuantizeLinear/DequantizeLinear (QAT/QDQ) model into the float graph "
               "plus layer_map, act_quant and weight_quant for lower.")
    Options = ConvertQatOptions
    produces = frozenset({"layer_map", "act_quant", "weight_quant", "qat_tensor_quant", "quant_settings",
                          TENSOR_QUANT_ARTIFACT})

    def run(self, graph, ctx) -> PassResult:
        if not any(n.op in (QUANTIZE, DEQUANTIZE) for n in graph.nodes):
            raise ConfigError([Problem(WHERE, "", "the model has no QuantizeLinear/DequantizeLinear nodes",
                                       "convert_qat converts QDQ/QAT models; use a PTQ pipeline for a float model")])
        if graph.opset < 13:     # Round, Clip with inputs, per-axis Q/DQ
            ensure_opset(graph, 13, where=WHERE, path="the model",
                         hint="upgrade the model to opset 13 or later before converting")
        undo_code_padding(graph)          # our qdq target's channel Pad / Slice on codes (algorithms/targets/channels.py)
        problems: list[Problem] = []
        pairs, constants, trailing = analyse(graph, problems)
        _raise(problems)
        restored = restore_constants(graph, constants)
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


# -- layers, tensor quantization -------------------------------------------------------------------
class _Converter:
    def __init__(self, graph, options: ConvertQatOptions, restored: dict[str, QuantConst]) -> None:
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
    def match_layers(self, pairs: list[QdqPair]) -> list:
        by_output = {id(p.dq.outputs[0]): p for p in pairs}
        for node in list(self.graph.nodes):
            if node.op not in SUPPORTED_OP_TYPES:
                continue
            pair = by_output.get(id(node.inputs[0])) if node.inputs else None
            if pair is None:
                self.skipped[node.name] = "input is not quantized (no QuantizeLinear/DequantizeLinear pair)"
                continue
            found = match_layer(self.graph, node)
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
            self.layers.append(QuantLayer(**found))
            self.act_quant[node.name] = act
            self.weight_quant[node.name] = params
            self.absorbed.setdefault(id(pair), set()).add(id(node))
        return self.layers

    def _layer_input(self, pair: QdqPair) -> gs.Tensor:
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
            bounds = [constant(self.namer, f"{base}.min", lo), constant(self.namer, f"{base}.max", hi)]
            clip = add_node(self.graph, self.namer, "Clip", base, [x, *bounds])
            self._clipped[id(pair)] = clip.outputs[0]
        return self._clipped[id(pair)]

    def _weights(self, node: gs.Node, found: dict[str, Any]):
        """(WeightQuantParams, channel axis or None), a reason the layer stays float, or None on a rule error."""
        if found.get("weight") is None:
            return weightless_params(), None
        info = self.restored.get(found["weight_source"])
        if info is None:
            return "weight is not quantized (no DequantizeLinear)"
        factors = info.factors
        if factors.dtype.name not in WEIGHT_DTYPE_NAMES:
            self.problems.append(problem(info.node, f"unsupported weight type {factors.dtype.name} for layer "
                                                     f"'{node.name}'; AMCT converts int8 and int4 weights"))
            return None
        offsets = factors.zero_point.reshape(-1) - factors.shift
        if np.any(offsets != 0):
            bad = int(offsets[np.flatnonzero(offsets)[0]])
            where = "" if factors.per_tensor else f" on channel {int(np.flatnonzero(offsets)[0])}"
            self.problems.append(problem(info.node, f"weight zero point must be 0 (AMCT weights are symmetric), got "
                                                     f"{bad + factors.shift}{where} ({factors.dtype.name}) for layer "
                                                     f"'{node.name}'"))
            return None
        codes = (info.codes.astype(np.int16) - factors.shift).astype(np.int8)
        scale = broadcast(factors, factors.scale, codes.shape).astype(np.float32)
        for view in found["weight_via"]:
            view_node = self.graph.node(view)
            codes, scale = (np.ascontiguousarray(apply_view(view_node, a)) for a in (codes, scale))
        channel_axis, scale_w = channel_scales(node, found, scale)
        if scale_w is None:
            self.problems.append(problem(info.node, f"per-channel axis {factors.axis} is not the output-channel axis "
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
        bits = 4 if factors.bits == 4 else 8
        return WeightQuantParams(np.ascontiguousarray(scale_w, np.float32), np.ascontiguousarray(codes), bits), \
            per_channel_axis

    def _check_bias(self, node: gs.Node, found: dict[str, Any], act: ActQuantParams,
                    params: WeightQuantParams) -> bool:
        """An int32 bias must have been quantized with scale_d * scale_w (SPEC 4.1)."""
        bias = found.get("bias")
        if bias is None or params.scale is None:
            return True
        holders = [node] + ([self.graph.node(found["bias_add"])] if found.get("bias_add") else [])
        tensor = next((t for n in holders for t in n.inputs if t.name == bias), None)
        chain = constant_chain(tensor) if tensor is not None else None
        info = self.restored.get(chain[0].name) if chain is not None else None
        if info is None or info.factors.dtype != np.int32:
            return True
        deq = (np.float32(act.scale) * params.scale.astype(np.float32)).astype(np.float64)
        scale = broadcast(info.factors, info.factors.scale, info.codes.shape).astype(np.float64).reshape(-1)
        if node.op == "Gemm":
            scale = scale * float(node.attrs.get("beta", 1.0))
        if scale.size != deq.size and 1 not in (scale.size, deq.size):
            return True      # bias and weight channels disagree: the lowering plan reports it
        scale, deq = np.broadcast_arrays(scale, deq)
        relative = np.abs(scale - deq) / deq
        index = int(np.argmax(relative))
        if relative[index] > self.options.bias_scale_rtol:
            self.problems.append(problem(info.node, f"int32 bias scale {np.float32(scale[index])} of layer '{node.name}' "
                                                     f"differs from scale_d * scale_w = {np.float32(deq[index])} "
                                                     f"(relative {float(relative[index]):.2e} > bias_scale_rtol "
                                                     f"{self.options.bias_scale_rtol:g})",
                                          "the bias must be quantized with the product of the input and weight scales"))
            return False
        return True

    # pairs -----------------------------------------------------------------------------------------
    def lower_pairs(self, pairs: list[QdqPair]) -> list[TensorQuant]:
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

    def _fake_tensor_quant(self, x: gs.Tensor, pair: QdqPair, out: gs.Tensor) -> tuple[str, ...]:
        """AscendQuant + AscendAntiQuant as AMCT's fake-quant ops (SPEC 5.4), producing ``out``."""
        params = pair.factors.act_params()
        low, high = (code - pair.factors.shift for code in pair.bounds())
        base = f"{x.name}.qat_quant"
        prefix = f"{base}.fakequant"
        first = len(self.graph.nodes)
        y = emit_fake_quant(self.graph, self.namer, x, prefix,
                            constant_factors(self.namer, prefix, params, code_range=(low, high)))
        emit_antiquant(self.graph, self.namer, y, f"{base}.fakeantiquant", params.scale, out=out)
        return tuple(node.name for node in self.graph.nodes[first:])

    def _saturation(self, x: gs.Tensor, pair: QdqPair, out: gs.Tensor) -> tuple[str, ...]:
        """``other_pairs: remove``: the pair's representable range as a float Clip producing ``out``."""
        low, high = pair.bounds()
        s = np.float32(pair.factors.scale.reshape(-1)[0])
        zp = int(pair.factors.zero_point.reshape(-1)[0])
        base = f"{x.name}.qat_range"
        lo, hi = (np.array(np.float32(code - zp) * s, np.float32) for code in (low, high))
        bounds = [constant(self.namer, f"{base}.min", lo), constant(self.namer, f"{base}.max", hi)]
        clip = add_node(self.graph, self.namer, "Clip", f"{base}.clip", [x, *bounds], [out])
        return (clip.name,)

    def lower_trailing(self, trailing) -> list[TensorQuant]:
        """A QuantizeLinear whose codes are a graph output: AscendQuant in fake-quant form, same output type."""
        out = []
        for q, factors in trailing:
            x, codes = q.inputs[0], q.outputs[0]
            q.outputs.clear()
            q.inputs.clear()
            params = factors.act_params()
            zp = int(factors.zero_point.reshape(-1)[0])
            prefix = f"{q.name}.quant.fakequant"
            first = len(self.graph.nodes)
            y = emit_codes(self.graph, self.namer, x, prefix,
                           constant_factors(self.namer, prefix, params, code_range=factors.code_range, offset=zp))
            add_node(self.graph, self.namer, "Cast", f"{prefix}.cast", [y], [codes],
                     to=int(onnx.helper.np_dtype_to_tensor_dtype(factors.dtype)))
            nodes = tuple(node.name for node in self.graph.nodes[first:])
            out.append(TensorQuant(x.name, params, "output", (codes.name,), q.name, nodes))
        return out

    # bias rounding -----------------------------------------------------------------------------------
    def round_biases(self) -> None:
        """SPEC 9: float biases put on the int32 grid the deploy model uses."""
        tensors = self.graph.tensors()
        for layer in self.layers:
            if layer.bias is None or layer.bias not in tensors:
                continue
            tensor = tensors[layer.bias]
            chain = constant_chain(tensor)
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
