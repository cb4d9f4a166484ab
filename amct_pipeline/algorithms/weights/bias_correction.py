"""Empirical bias correction: the mean output error each quantized layer adds, measured on data.

Quantizing a layer's weights (and its input) shifts the mean of its outputs per channel: rounding
errors do not cancel in a sum over a channel's weights, and clipping the input's rare extremes
lowers its mean. Every later layer receives that shift as a systematic error. Following Nagel et
al. ("Data-Free Quantization", section 4.2, empirical variant) and NNCF's fast bias correction,
the shift is measured on the calibration data and subtracted from the layer's bias:

    shift[c] = mean over samples and positions of ( layer(Q(x); W_q)[c] - layer(x; W)[c] )
    bias[c] -= shift[c]

``x`` is the layer's float input, ``Q`` the layer's activation quantizer (``act_quant``; without
one only the weights are quantized) and ``W_q`` the dequantized integer weight. All layers are
measured in ONE run of the float model over the data: each layer gets a copy that reads ``Q(x)`` and
``W_q``, and a ``ReduceMean`` of the difference over every axis but the channel axis, so only one
number per channel leaves onnxruntime per batch and memory does not grow with the data.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from ...ir.edit import Namer, add_node, constant, copy_graph, ensure_opset
from ...quant.fakequant import constant_factors, emit_antiquant, emit_fake_quant
from ...quant.layers import QuantLayer
from ...quant.params import ActQuantParams, WeightQuantParams
from ...quant.weights import dequantize_weight, gemm_factors

__all__ = ["bias_shifts", "CORRECTABLE"]

CORRECTABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PREFIX = "amct_bias_correction"


def _output_rank(graph, layer: QuantLayer, weight: np.ndarray) -> int | None:
    out = graph.tensors().get(layer.output)
    shape = getattr(out, "shape", None)
    if shape is not None and len(shape) > 0:
        return len(shape)
    if layer.op_type in ("Conv", "ConvTranspose"):
        return weight.ndim
    return 2 if layer.op_type == "Gemm" else None


def _channel_axis(layer: QuantLayer, rank: int) -> int:
    return 1 if layer.op_type in ("Conv", "ConvTranspose") else rank - 1


def bias_shifts(graph, layers: list[QuantLayer], weight_quant: Mapping[str, WeightQuantParams],
                act_quant: Mapping[str, ActQuantParams] | None, batches) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({layer: shift per output channel (float64)}, {layer: why it was not measured})``.

    ``batches(model_proto, fetch)`` must yield ``({tensor: array}, samples)`` per batch: the caller
    owns the data and how the model runs (``runtime.collector.collect``)."""
    model = copy_graph(graph)
    ensure_opset(model, 13, where="quantize_weights{bias_correction}", path="the model",
                 hint="Round and Clip with inputs need opset 11; upgrade the model")
    namer = Namer(model)
    outputs: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for layer in layers:
        reason = _add_branch(model, namer, layer, weight_quant.get(layer.name),
                             (act_quant or {}).get(layer.name), outputs)
        if reason:
            skipped[layer.name] = reason
    if not outputs:
        return {}, skipped
    model.finalize()
    proto = model.to_proto()
    sums: dict[str, np.ndarray] = {}
    total = 0
    for got, samples in batches(proto, list(outputs.values())):
        for name, tensor in outputs.items():
            value = np.asarray(got[tensor], np.float64) * samples
            sums[name] = sums[name] + value if name in sums else value
        total += samples
    return {name: s / max(total, 1) for name, s in sums.items()}, skipped


def _add_branch(model, namer: Namer, layer: QuantLayer, params: WeightQuantParams | None,
                act: ActQuantParams | None, outputs: dict[str, str]) -> str:
    """Copy the layer reading ``Q(x)`` and ``W_q``; expose the channel means of the difference."""
    if layer.op_type not in CORRECTABLE or layer.weight is None or params is None:
        return "no weight to correct for"
    node = model.node(layer.name)
    tensors = model.tensors()
    weight = dequantize_weight(params.quantized, params.scale, layer)
    rank = _output_rank(model, layer, weight)
    if rank is None:
        return "output rank unknown"
    base = f"{PREFIX}.{layer.name}"
    x = tensors[layer.input]
    if act is not None:
        codes = emit_fake_quant(model, namer, x, f"{base}.quant", constant_factors(namer, f"{base}.quant", act))
        x_q = emit_antiquant(model, namer, codes, f"{base}.dequant", act.scale)
    else:
        x_q = x
    w_q = constant(namer, f"{base}.weight", weight.astype(np.float32))
    inputs = [x_q if t is x else w_q if t.name == layer.weight else t for t in node.inputs]
    attrs = dict(node.attrs)
    if layer.op_type == "Gemm" and gemm_factors(model, layer)[0] != 1.0:
        attrs["alpha"] = 1.0                       # the codes quantize alpha * B
    copy = add_node(model, namer, node.op, f"{base}.layer", inputs, **attrs).outputs[0]
    diff = add_node(model, namer, "Sub", f"{base}.diff", [copy, node.outputs[0]]).outputs[0]
    axes = [a for a in range(rank) if a != _channel_axis(layer, rank)]
    if model.opset >= 18:
        mean = add_node(model, namer, "ReduceMean", f"{base}.mean",
                        [diff, constant(namer, f"{base}.axes", np.array(axes, np.int64))], keepdims=0)
    else:
        mean = add_node(model, namer, "ReduceMean", f"{base}.mean", [diff], axes=axes, keepdims=0)
    out = mean.outputs[0]
    out.dtype = np.float32
    model.gs.outputs.append(out)
    outputs[layer.name] = out.name
    return ""


def corrected_bias(graph, layer: QuantLayer, shift: np.ndarray) -> tuple[gs.Constant | None, np.ndarray | None, str]:
    """(the bias constant to replace, its new values, why not) for subtracting ``shift`` from the
    bias the layer adds. Only a plain constant read by this layer alone, holding one value per output
    channel, is corrected (a new name or shape would leave the layer map behind)."""
    if layer.bias is None:
        return None, None, "no bias"
    tensor = graph.tensors().get(layer.bias)
    if not isinstance(tensor, gs.Constant) or len(tensor.outputs) != 1:
        return None, None, "bias is shared or computed"
    values = np.asarray(tensor.values)
    if values.size != shift.size:
        return None, None, f"bias has {values.size} values for {shift.size} channels"
    _, beta = gemm_factors(graph, layer)
    new = values.astype(np.float64) - shift.reshape(values.shape) / beta
    return tensor, new.astype(values.dtype), ""


def apply_shifts(graph, layers: Mapping[str, QuantLayer], shifts: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Write the corrected biases into ``graph`` (new arrays, never edited in place); stats."""
    corrected, skipped, largest = 0, {}, 0.0
    for name, shift in shifts.items():
        tensor, values, why = corrected_bias(graph, layers[name], shift)
        if tensor is None:
            skipped[name] = why
            continue
        tensor.values = np.require(values, requirements="C")
        corrected += 1
        largest = max(largest, float(np.abs(shift).max()))
    return {"corrected": corrected, "skipped": skipped, "largest_shift": largest}
