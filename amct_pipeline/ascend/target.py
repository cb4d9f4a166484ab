"""ascend: AMCT's deploy model for the Ascend compiler (ATC), SPEC 5.3.

Per quantized layer L (names as AMCT writes them)::

    x -> AscendQuant "L.quant" (scale = float32(1/scale_d), offset = offset_d, sqrt_mode = 0,
                                round_mode = "Round", dst_type = "INT8" | "INT16")
      -> L with an INT8 weight initializer (codes, also for INT6/INT7 weights: narrower clip; INT4
         weights as a packed ONNX INT4 initializer, SPEC 5.3, see :func:`.packing.pack_int4`) and an
         INT32 bias initializer (Gemm: transB = 1 is transposed offline and set to 0; alpha = beta = 1)
      -> AscendDequant "L.dequant" (inputs [accumulator, UINT64 "L.dequant.param" [C]], dtype = 0)
      -> consumers

* The dequant parameter packs float32(scale_d * scale_w[c]) in bits 0..31 (shift N = 0, offset_w = 0;
  SPEC 5.2, :func:`amct_pipeline.ascend.pack_deq_scale`); ``[1]`` for per-tensor layers.
* MatMul + Add bias (SPEC 5.3): the Add's constant becomes the INT32 bias and AscendDequant follows
  the Add. AveragePool: AscendQuant before, AscendDequant with ``deq = scale_d`` after (scale_w = 1).
* Quant fusion: layers reading one tensor with equal (scale_d, offset_d, bits) share one AscendQuant.
* The activation offset is *not* folded into the bias (AMCT leaves ``-offset_d * sum(w)`` to ATC);
  the CPU reference (:mod:`amct_pipeline.ascend.reference`) emulates that compensation.
* Tensor quantization (plan ``tensors``, record keys ``"<node>:<index>"``; MaxPool / Add inputs,
  SPEC 6.1): AscendQuant "<node>:<index>.quant" (shared with a layer reading the same tensor with
  the same factors: AMCT's multi-output layout) then AscendAntiQuant "<node>:<index>.anti_quant"
  (``scale = scale_d``, ``offset = -offset_d``: ``y = (q + offset) * scale``) feeding the float node.

Node domain: ``""`` by default (what AMCT writes for ATC ``--framework=5``); any custom domain with
the ``domain`` option (e.g. ``amct.customop``), imported at version 1. The lowered model is checked by
:func:`~.schemas.check_model` (``onnx.checker`` plus the Ascend schemas, without registering
them with onnx: a pipeline run leaves onnx's schema registry as it was); onnxruntime cannot run a
deploy model (integer Conv...): use ``verify-deploy``.

Rounding convention (``quant_convention``, stored in the model's metadata): ``"amct"`` (default)
is ``q = clip(rint(float32(x * float32(1/scale_d))) + offset_d)``, bit for bit what the fake-quant
model computes, so the two models agree exactly; ``"cann"`` records CANN's documented
``round(x * scale + offset)`` for the reference to simulate instead (differs at rare ties).
"""
from __future__ import annotations

import re
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from pydantic import Field, field_validator

from ..algorithms.targets.base import PlanTarget
from ..ir.edit import Namer, add_node, detach_output, int4_values
from ..quant.plan import (TENSOR_QUANT_OPS, LayerPlan, LoweringPlan, bias_slot, neutralize_gemm, output_node,
                          quant_multiplier)
from ..errors import ConfigError, Problem
from ..options import Options
from .packing import pack_deq_scale
from .schemas import CONVENTION_METADATA_KEY, check_model

__all__ = ["AscendTarget", "AscendOptions", "CONVENTION_METADATA_KEY", "INT16_LAYER_TYPES", "REPORT_ARTIFACT",
           "lowering_report"]

REPORT_ARTIFACT = "ascend_report"
INT16_LAYER_TYPES = ("Conv", "Gemm", "ConvTranspose")     # SPEC 6.1 (LSTM/GRU are not matched)
QUANTIZABLE_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool") + TENSOR_QUANT_OPS
_DST_TYPES = {8: ("INT8", np.int8), 16: ("INT16", np.int16)}
_DOMAIN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*")


class AscendOptions(Options):
    domain: str = Field("", description="Domain of the Ascend nodes: '' (default; what AMCT writes for ATC) "
                                        "or a custom domain such as 'amct.customop'.")
    quant_convention: Literal["amct", "cann"] = Field(
        "amct", description="AscendQuant rounding the reference applies: 'amct' = rint(x * (1/scale_d)) + "
                            "offset_d, identical to the fake-quant model; 'cann' = CANN's round(x * scale + offset).")

    @field_validator("domain")
    @classmethod
    def _valid_domain(cls, value: str) -> str:
        if value in ("", "ai.onnx"):
            return ""
        if not _DOMAIN_RE.fullmatch(value) or value.startswith("ai.onnx"):
            raise ValueError(f"'{value}' is not a usable custom domain (e.g. 'amct.customop'; '' for the default)")
        return value


class AscendTarget(PlanTarget):
    name = "ascend"
    summary = "AMCT deploy model for ATC: AscendQuant / INT8 layer / AscendDequant (UINT64 deq_scale)."
    suffix = "deploy_model"
    Options = AscendOptions
    produces = frozenset({REPORT_ARTIFACT})

    def check(self, model: onnx.ModelProto) -> None:
        """onnx.checker with the Ascend schemas, leaving onnx's schema registry alone."""
        check_model(model)

    def check_plan(self, plan: LoweringPlan) -> None:
        _check_plan(plan)

    def rewrite(self, graph, plan: LoweringPlan, ctx) -> None:
        _check_plan(plan)
        report = ctx.products[REPORT_ARTIFACT] = lowering_report(graph, plan, ctx.layer_map)
        self._namer = Namer(graph)
        self._quants: dict[tuple, gs.Variable] = {}
        nodes = {node.name: node for node in graph.nodes}
        for layer_plan in plan.layers.values():
            node = nodes[layer_plan.name]
            key = layer_plan.input_key
            if key not in self._quants:
                self._quants[key] = self._quant(graph, node.inputs[0], f"{layer_plan.name}.quant", layer_plan.act)
            node.inputs[0] = self._quants[key]
            self._integer_constants(nodes, node, layer_plan)
            self._dequant(graph, output_node(nodes, layer_plan.layer), layer_plan)
        graph.meta.metadata[CONVENTION_METADATA_KEY] = self.options.quant_convention
        ctx.logger.info("ascend: %d layers lowered, %d tensors quantized, %d quantizable nodes left float",
                        len(report["lowered"]), len(report["tensor_quantized"]), len(report["not_lowered"]))

    def rewrite_tensors(self, graph, plan: LoweringPlan, ctx) -> None:
        nodes = {node.name: node for node in graph.nodes}
        anti: dict[tuple, gs.Variable] = {}
        for entry in plan.tensors.values():
            node = nodes[entry.node]
            key = entry.input_key
            if key not in anti:
                if key not in self._quants:
                    self._quants[key] = self._quant(graph, node.inputs[entry.index], f"{entry.key}.quant", entry.act)
                act = entry.act
                out = add_node(graph, self._namer, "AscendAntiQuant", f"{entry.key}.anti_quant", [self._quants[key]],
                               scale=float(np.float32(act.scale)), offset=float(-act.offset), sqrt_mode=0,
                               dtype=0)
                out.domain = self.options.domain
                out.outputs[0].dtype = np.float32
                anti[key] = out.outputs[0]
            node.inputs[entry.index] = anti[key]

    # -- pieces ----------------------------------------------------------------------------------
    def _quant(self, graph, x: gs.Tensor, name: str, act) -> gs.Variable:
        dst_type, dtype = _DST_TYPES[act.num_bits]
        node = add_node(graph, self._namer, "AscendQuant", name, [x], scale=float(quant_multiplier(act.scale)),
                        offset=float(act.offset), sqrt_mode=0, round_mode="Round", dst_type=dst_type)
        node.domain = self.options.domain
        node.outputs[0].dtype = dtype
        return node.outputs[0]

    def _integer_constants(self, nodes, node: gs.Node, plan: LayerPlan) -> None:
        if plan.weight_q is None:
            return
        codes = np.asarray(plan.weight_q)
        if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
            codes = codes.T           # transB handled offline (SPEC 5.3)
            node.attrs["transB"] = 0
        _set_constant(node, 1, codes.astype(np.int8), self._namer, f"{plan.name}.weight", packed=plan.wts_bits == 4)
        slot = bias_slot(nodes, plan.layer)
        if slot is not None and plan.bias_q is not None:
            _set_constant(slot[0], slot[1], np.asarray(plan.bias_q).astype(np.int32), self._namer, f"{plan.name}.bias")
        neutralize_gemm(node)

    def _dequant(self, graph, out_node: gs.Node, plan: LayerPlan) -> None:
        inner, original = detach_output(out_node, self._namer, f"{plan.name}.dequant.input")
        inner.dtype = None if plan.layer.op_type == "AveragePool" else np.int32
        param = gs.Constant(self._namer(f"{plan.name}.dequant.param"),
                            np.require(pack_deq_scale(plan.deq_scale), requirements="C"))
        node = add_node(graph, self._namer, "AscendDequant", f"{plan.name}.dequant", [inner, param], [original],
                        dtype=0)
        node.domain = self.options.domain


def _set_constant(node: gs.Node, index: int, values: np.ndarray, namer: Namer, name: str,
                  packed: bool = False) -> None:
    """Feed ``node.inputs[index]`` from ``values`` (copy on write; ``packed``: as an INT4 initializer). A
    plain constant read only by this node keeps its name (AMCT replaces weights under their own name),
    whatever the new shape."""
    current = node.inputs[index]
    values = np.require(values, requirements="C")
    if isinstance(current, gs.Constant) and len(current.outputs) == 1:
        if packed:
            current._values = int4_values(current.name, values)
        else:
            current.values = values
        current.export_dtype = None      # a copied Constant pins its old (float) export dtype
        return
    name = namer(name)
    node.inputs[index] = gs.Constant(name, int4_values(name, values) if packed else values)


def _problem(layer: str, message: str, hint: str = "") -> ConfigError:
    return ConfigError([Problem("target 'ascend'", f"layer '{layer}'", message, hint)])


def _check_plan(plan: LoweringPlan) -> None:
    """What the Ascend operators can express (SPEC 6.1); errors name the layer."""
    for name, layer_plan in plan.layers.items():
        op, bits = layer_plan.layer.op_type, layer_plan.act.num_bits
        if bits not in _DST_TYPES:
            raise _problem(name, f"{bits}-bit activations; AscendQuant writes INT8 or INT16")
        if bits == 16 and op not in INT16_LAYER_TYPES:
            raise _problem(name, f"INT16 activations are not allowed for {op}",
                           f"INT16 only for {', '.join(INT16_LAYER_TYPES)} (SPEC 6.1); use act_type INT8")
        if layer_plan.weight_q is None:
            continue
        wbits = int(layer_plan.wts_bits)
        if wbits not in (4, 6, 7, 8):
            raise _problem(name, f"INT{wbits} weights are not supported by the ascend target",
                           "use INT8 or INT4 (or INT6/INT7, stored as INT8) weights")
        codes = np.asarray(layer_plan.weight_q)
        low, high = -(1 << (wbits - 1)), (1 << (wbits - 1)) - 1
        if codes.size and (codes.min() < low or codes.max() > high):
            raise _problem(name, f"weight codes in [{int(codes.min())}, {int(codes.max())}] exceed INT{wbits} "
                           f"[{low}, {high}]")


def lowering_report(graph, plan: LoweringPlan, layer_map) -> dict:
    """Every node of a quantizable op type (SPEC 6.1): lowered, tensor-quantized or why not."""
    skipped = dict(getattr(layer_map, "skipped", {}) or {})
    bias_adds = {p.layer.bias_add: name for name, p in plan.layers.items() if p.layer.bias_add}
    tensor_nodes: dict[str, list[str]] = {}
    for key, entry in plan.tensors.items():
        tensor_nodes.setdefault(entry.node, []).append(key)
    report = {"lowered": [], "tensor_quantized": [], "bias_adds": {}, "not_lowered": {}}
    for node in graph.nodes:
        if node.op not in QUANTIZABLE_TYPES:
            continue
        name = node.name
        if name in plan.layers:
            report["lowered"].append(name)
        elif name in bias_adds:
            report["bias_adds"][name] = bias_adds[name]
        elif name in tensor_nodes:
            report["tensor_quantized"].extend(tensor_nodes[name])
        elif name in plan.unquantized:
            report["not_lowered"][name] = plan.unquantized[name]
        elif name in skipped:
            report["not_lowered"][name] = skipped[name]
        elif node.op in TENSOR_QUANT_OPS:
            report["not_lowered"][name] = f"{node.op}: tensor quantization only, and no tensor_quantize entry"
        else:
            report["not_lowered"][name] = "not matched as a quantizable layer"
    return report
