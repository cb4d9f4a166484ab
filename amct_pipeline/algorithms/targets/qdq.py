"""qdq: QuantizeLinear / DequantizeLinear model laid out for onnxruntime's integer kernels.

Per quantized layer: its input goes through ``QuantizeLinear -> DequantizeLinear`` with UINT8 data
(zero point = offset_d + 128: the same quantization as AMCT's int8 offset, and the form onnxruntime's
u8s8 kernels run fast; int8 activations made its QDQ models slower than float), the weight is an INT8
initializer behind a ``DequantizeLinear`` (per channel with ``axis`` for Conv/ConvTranspose), and the
bias an INT32 initializer behind ``DequantizeLinear(scale = scale_d * scale_w, zero point 0)``.

onnxruntime fuses ``DQ -> Conv -> Q`` into QLinearConv only when the layer output is itself quantized
(and read by nothing else), so, like onnxruntime's own quantizer, the layout also quantizes (see
``quant.facts`` for the rules, shared with ``calibrate{block_outputs}``):

* every consumer of a quantized tensor but the float readers of ``quant.facts.float_readers`` (all
  others read the dequantized copy, so the producer's only reader is the QuantizeLinear). With only
  the layer inputs calibrated, a residual Add reads its skip in float, so the QDQ model computes what
  the fake-quant and Ascend models do;
* layer outputs (after a following Relu/Clip) and the outputs of Add and GlobalAveragePool nodes
  whose inputs are quantized, with factors from the ``tensor_quant`` artifact (tensor name ->
  ActQuantParams) that ``calibrate{block_outputs: true}`` (or ``refine_ranges``) provides; without it
  they stay float (slower). The target never calibrates;
* data movement (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, MaxPool, Split, Slice, Gather,
  nearest Resize, zero Pad) with one set of factors on its input and outputs, which is exact, so
  onnxruntime drops the pairs and moves uint8 codes; Concats of quantized inputs become QLinearConcat,
  each input requantized at most once (inside its producer's kernel when nothing else reads it, else
  by QLinearConcat), except where the inputs' ranges are too far apart to share a scale.

A Relu/Clip right before a quantized tensor is moved onto the codes (dropped when the quantizer
saturates where it clips, else a uint8 Clip after the QuantizeLinear), which is exact and lets the
layer before it fuse. Opsets below 13 are upgraded first (per-axis DequantizeLinear needs 13), so old models load.
Grouped ConvTranspose with per-channel weights cannot be expressed with one DequantizeLinear axis; its
weight is stored dequantized (float), which onnxruntime would not run in integers anyway.

Other precisions, per layer (opset 21 is then required and the model is upgraded to it):

* INT4 weights: a packed INT4 initializer (two codes per byte) behind a per-channel DequantizeLinear
  with an INT4 zero point; onnxruntime dequantizes it once when the session is built and runs the
  layer in float (it has no integer Conv for INT4), so the file shrinks, not the compute.
* INT16 activations: UINT16 QuantizeLinear / DequantizeLinear (zero point offset_d + 32768) on the
  layer's own input pair; onnxruntime has no 16-bit QLinearConv, so the layer runs in float on the
  dequantized input (quantization is simulated exactly; no integer speed-up).
* Block outputs of a mixed-precision plan (some layer has 16-bit activations), ``mixed_block_output_bits``:
  16 (default) gives every tensor the layout quantizes beyond the layer inputs (layer, Add, pooling
  and Concat outputs, the network's last quantized values) 16 bits over its 8-bit range widened
  ``WIDE_RANGE`` (4) times, and so does a layer input another node also reads (the Add of a residual
  path), the 8-bit layers there reading it through an 8-bit pair of their own. The QDQ model then
  computes what the fake-quant and Ascend models compute (MobileNetV2's mixed point at 1.2x bitops:
  8-bit block outputs cost it 1.3 dB, 0.6 of it the logits); an 8-bit layer producing such an output
  runs in float in onnxruntime (no 16-bit QLinearConv), the others still fuse. A tensor an 8-bit layer
  produces for pooling only keeps 8 bits (the average divides its rounding noise; the layer fuses).
  8: the all-INT8 layout, whose block-output tensors around a 16-bit layer (its input class and its
  output) get no pair. 16-bit Relu/Clip bounds that a quantizer does not saturate at stay float ops
  (onnxruntime has no uint16 Clip).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs
from pydantic import Field

from ...ir.edit import Namer, constant, reroute
from ...options import Options
from ...quant.facts import (FOLDABLE_ACTIVATIONS, POOLING_OPS, LayoutPlan, QdqLayout, activation_bounds,
                            float_readers, moves_data, plan_layout, resolve_layout)
from ...quant.math import scale_offset_from_range
from ...quant.params import ActQuantParams
from ...quant.plan import (LayerPlan, LoweringPlan, bias_slot, neutralize_gemm, normalized_act, output_node,
                           with_input_factors)
from .base import PRECISION_OPSET, PlanTarget, check_activation_bits, dequantized_constant, qdq_pair
from .channels import pad_depthwise_blocks, pad_narrow_outputs, pad_rgb_inputs, shift_single_channel_inputs
from .shuffle import gather_channel_shuffles

__all__ = ["QdqTarget", "QdqOptions"]

WIDE_RANGE = 4.0      # 16-bit block outputs of a mixed plan: their 8-bit range widened this many times


class QdqOptions(Options):
    extra_tensors: bool = Field(True, description="Also quantize layer outputs, Add, pooling and Concat outputs and "
                                                  "data movement when factors exist for them (artifact 'tensor_quant' "
                                                  "from calibrate{block_outputs: true}), so onnxruntime fuses whole "
                                                  "blocks and moves data in integers.")
    gather_shuffles: bool = Field(True, description="Write each channel shuffle (Reshape -> Transpose -> Reshape) "
                                                    "and the channel Split reading it as Gathers: the same values in "
                                                    "one copy instead of two or three.")
    mixed_block_output_bits: Literal[8, 16] = Field(16, description="In a plan with 16-bit layers (a mixed-precision "
                                                    "point): bits of the block outputs (layer, Add, pooling, Concat "
                                                    "outputs, residual reads of layer inputs). 16: the QDQ model "
                                                    "computes what the fake-quant model does; 8-bit layers producing "
                                                    "them run in float. 8: the all-INT8 layout (integer fusion).")
    pad_channels: int = Field(16, ge=0, le=64, description="Widen conv -> depthwise -> conv blocks to a multiple "
                                                           "of this many channels, narrower conv outputs to it and "
                                                           "3-channel conv inputs to 4, "
                                                           "with zero weights (exact; onnxruntime's integer kernels "
                                                           "run them 2-2.5x faster). 0: off.")
    shift_inputs: bool = Field(True, description="Run convs reading 1 channel (luma / grayscale stems) on 4 "
                                                 "column-shifted copies of their codes with a 4x narrower kernel: "
                                                 "the same integer sums on onnxruntime's fast kernel (exact).")


class QdqTarget(PlanTarget):
    name = "qdq"
    summary = ("QuantizeLinear/DequantizeLinear model (uint8/uint16 activations, int8/int4 weights, int32 bias) "
               "for onnxruntime.")
    suffix = "qdq_model"
    Options = QdqOptions
    precision_opset = PRECISION_OPSET

    def check_plan(self, plan: LoweringPlan) -> None:
        check_activation_bits(plan, self.name)

    def rewrite(self, graph, plan: LoweringPlan, ctx) -> None:
        self.check_plan(plan)
        if self.options.gather_shuffles:
            gather_channel_shuffles(graph, keep=frozenset(entry.node for entry in plan.tensors.values()))
        layout = self.layout(graph, plan, ctx)
        for name, layer_plan in plan.layers.items():      # a 16-bit layer reads its own 16-bit pair
            if layer_plan.act.num_bits != 8 and layout.factors.get(layer_plan.layer.input) != layer_plan.act:
                layout.layer_pairs[name] = layer_plan.act
        namer = Namer(graph)
        _quantize_activations(graph, namer, plan, layout)
        nodes = {node.name: node for node in graph.nodes}
        for name, layer_plan in plan.layers.items():
            act = layout.layer_pairs.get(name) or layout.factors.get(layer_plan.layer.input, layer_plan.act)
            _quantize_constants(graph, namer, nodes, with_input_factors(graph, layer_plan, act))
        if self.options.pad_channels:
            pad_depthwise_blocks(graph, self.options.pad_channels)
            pad_rgb_inputs(graph)
            pad_narrow_outputs(graph, self.options.pad_channels)
        if self.options.shift_inputs:                 # after pad_narrow_outputs, which may make a stem qualify
            shift_single_channel_inputs(graph)

    def layout(self, graph, plan: LoweringPlan, ctx) -> QdqLayout:
        """Which tensors get which factors (``quant.facts``); layer inputs only without ``extra_tensors``."""
        act = {name: layer_plan.act for name, layer_plan in plan.layers.items()}
        structure = plan_layout(graph, plan.layers)
        if not self.options.extra_tensors:
            structure.sources = {t: s for t, s in structure.sources.items() if t in structure.layer_inputs}
            structure.concats = []
            return resolve_layout(graph, structure, act, {})
        wanted = structure.wanted()
        mixed = self.options.mixed_block_output_bits == 16 and any(p.act.num_bits == 16 for p in plan.layers.values())
        wide = set() if mixed else _wide_neighbourhood(graph, plan)
        wide |= {structure.sources[t].name for t in wide if t in structure.sources}     # their classes' sources
        found = {name: normalized_act(ctx.tensor_quant[name], name) for name in wanted
                 if name in ctx.tensor_quant and name not in wide}
        if len(found) < len(wanted):
            ctx.logger.info("qdq: %d layer/Add/pooling/Concat outputs have no factors and stay float (calibrate "
                            "with block_outputs: true for full integer fusion)", len(wanted) - len(found))
        layout = resolve_layout(graph, structure, act, found)
        if layout.float_concats:
            ctx.logger.info("qdq: %d Concats stay float (their inputs' ranges differ too much to share one scale): "
                            "%s", len(layout.float_concats), ", ".join(layout.float_concats))
        if mixed:
            _widen_block_outputs(graph, plan, structure, layout)
        return layout


def _wide_neighbourhood(graph, plan: LoweringPlan) -> set[str]:
    """Inputs and outputs (after a Relu/Clip) of 16-bit layers. Their 8-bit block-output factors exist
    only so onnxruntime fuses integer kernels, which it has none of for 16-bit layers; quantizing them
    would put 8-bit noise around a layer the user asked to keep at 16 bits, so they stay float."""
    nodes = {node.name: node for node in graph.nodes}
    names: set[str] = set()
    for layer_plan in plan.layers.values():
        if layer_plan.act.num_bits == 8:
            continue
        names.add(layer_plan.layer.input)
        out = output_node(nodes, layer_plan.layer).outputs[0]
        names.add(out.name)
        while len(out.outputs) == 1 and out.outputs[0].op in FOLDABLE_ACTIVATIONS:
            out = out.outputs[0].outputs[0]
            names.add(out.name)
    return names


def _sixteen_bits(act: ActQuantParams) -> ActQuantParams:
    """16-bit factors for a block output of an 8-bit range: the range widened :data:`WIDE_RANGE` times
    away from zero. The 8-bit range clips rare extremes to buy resolution; at 16 bits the step is still
    256 / WIDE_RANGE times finer, and the extremes pass (MobileNetV2's mixed point: +0.2 dB)."""
    if act.num_bits == 16:
        return act
    return scale_offset_from_range(min(act.clip_min * WIDE_RANGE, 0.0), max(act.clip_max * WIDE_RANGE, 0.0), 16)


def _widen_block_outputs(graph, plan: LoweringPlan, structure: LayoutPlan, layout: QdqLayout) -> None:
    """16-bit block outputs in a mixed-precision plan (``mixed_block_output_bits``): every calibrated
    tensor of the layout, and each layer input another node reads (the Add of a residual path); the
    8-bit layers reading a widened tensor keep their 8-bit factors through a pair of their own. A
    tensor only pooled keeps 8 bits when an 8-bit layer produces it (which then still fuses): the
    average divides its rounding noise by the window."""
    tensors = graph.tensors()
    before = dict(layout.factors)

    def read_elsewhere(name: str) -> bool:
        tensor = tensors[name]
        return graph.is_graph_output(tensor) or any(
            reader.name not in plan.layers and not moves_data(graph, reader) for reader in tensor.outputs)

    def averaged(name: str) -> bool:        # only pooled: its rounding noise is averaged over the window
        readers = tensors[name].outputs
        return (any(r.op in POOLING_OPS for r in readers) and not graph.is_graph_output(tensors[name])
                and all(r.op in POOLING_OPS or moves_data(graph, r) for r in readers))

    around_16 = _wide_neighbourhood(graph, plan)     # a 16-bit layer's output: nothing fuses there
    kept = {member for name in layout.sources if averaged(name) and name not in around_16
            for member in structure.members(name)}
    for name, source in layout.sources.items():
        if name not in kept and (source.kind == "tensor" or read_elsewhere(name)):
            layout.factors[name] = _sixteen_bits(before[name])
    for name, layer_plan in plan.layers.items():
        tensor = layer_plan.layer.input
        if layer_plan.act.num_bits == 8 and tensor in before and layout.factors[tensor] != before[tensor]:
            layout.layer_pairs.setdefault(name, before[tensor])
    paired = set(layout.paired)          # a zero Pad left unpaired (folded into its Conv) follows its input
    for name in layout.sources:
        parent = structure.parent.get(name)
        if name not in paired and tensors[name].outputs and parent in layout.factors and \
                layout.factors[parent] != layout.factors[name]:
            paired.add(name)
    layout.paired = [name for name in layout.sources if name in paired]


# -- emitting -------------------------------------------------------------------------------------
def _quantize_activations(graph, namer: Namer, plan: LoweringPlan, layout: QdqLayout) -> None:
    """One Q/DQ pair per paired tensor, read by all its readers but ``quant.facts.float_readers`` (a
    residual Add adding a layer input in float). A layer whose own record factors differ from the
    tensor's (two layers, different settings) gets its own pair."""
    tensors = graph.tensors()
    readers = {}
    for name in layout.paired:      # chosen first: rerouting renames the inputs the rule looks at
        floats = {node.name for node in float_readers(graph, layout, plan.layers, tensors[name])}
        readers[name] = [node for node in tensors[name].outputs if node.name not in floats]
    for name in layout.paired:
        tensor, params = tensors[name], layout.factors[name]
        source, code_range = _fold_activation(graph, tensor, params)
        _, dequantized = qdq_pair(graph, namer, source, params, name, code_range)
        reroute(tensor, dequantized, readers[name])
    nodes = {node.name: node for node in graph.nodes}
    for name, params in layout.layer_pairs.items():
        node = nodes[name]
        _, dequantized = qdq_pair(graph, namer, tensors[plan.layers[name].layer.input], params, f"{name}.input")
        node.inputs[0] = dequantized


def _fold_activation(graph, tensor: gs.Tensor, params: ActQuantParams) -> tuple[gs.Tensor, tuple[int, int] | None]:
    """(tensor the QuantizeLinear reads, clip range to apply to the int8-domain codes or None).

    A Relu/Clip producing ``tensor`` is moved into the integer domain: ``Q(Clip(x)) ==
    Clip(Q(x), Q(lo), Q(hi))`` for the monotone quantizer, so the layer before it reads the
    QuantizeLinear directly and fuses. When the quantizer saturates at the clip bounds no integer clip
    is needed at all (onnxruntime's own Clip/Relu folding misses ranges like [0, 6] by a float32 ulp,
    and keeps ranges that IFMR widened, e.g. [0, 6.06] after Clip(0, 6)).
    """
    node = graph.producer(tensor)
    if node is None or node.op not in FOLDABLE_ACTIVATIONS or graph.is_graph_output(tensor):
        return tensor, None
    source = node.inputs[0]
    if len(source.outputs) != 1 or graph.is_graph_output(source) or graph.producer(source) is None:
        return tensor, None
    low, high = activation_bounds(graph, node)
    if low is None:
        return tensor, None
    q_low, q_high = _code(low, params), _code(high, params)
    if q_low > q_high:
        return tensor, None
    if q_low <= params.qmin and q_high >= params.qmax:
        return source, None
    if params.num_bits != 8:        # onnxruntime has no uint16 Clip, nor a 16-bit kernel to fuse
        return tensor, None
    return source, (q_low, q_high)


def _code(bound: float, params: ActQuantParams) -> int:
    """The int8-domain code QuantizeLinear gives ``bound`` (saturated)."""
    if np.isinf(bound):
        return params.qmin if bound < 0 else params.qmax
    code = np.rint(np.float32(bound) / np.float32(params.scale)) + params.offset
    return int(np.clip(code, params.qmin, params.qmax))


def _quantize_constants(graph, namer: Namer, nodes: dict[str, gs.Node], plan: LayerPlan) -> None:
    """INT8 (or packed INT4) weight and INT32 bias initializers behind DequantizeLinear nodes."""
    if plan.weight_q is None:
        return
    layer, node = plan.layer, nodes[plan.name]
    base = node.inputs[1].name
    if plan.per_channel and layer.op_type == "ConvTranspose" and layer.group > 1:
        node.inputs[1] = constant(namer, f"{base}_dequantized", plan.dequantized_weight())
    else:
        axis = layer.channel_axis if plan.per_channel else None
        dtype = "int4" if plan.wts_bits == 4 else np.int8
        node.inputs[1] = dequantized_constant(graph, namer, plan.weight_q.astype(np.int8), plan.scale_w,
                                               dtype, axis, base)
    slot = bias_slot(nodes, layer)
    if slot is not None and plan.bias_q is not None:
        bias_node, index = slot
        axis = 0 if plan.per_channel else None
        bias_node.inputs[index] = dequantized_constant(graph, namer, plan.bias_q, plan.deq_scale, np.int32, axis,
                                                        bias_node.inputs[index].name)
    neutralize_gemm(node)
