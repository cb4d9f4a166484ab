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

With a float input the shift is linear in the weight error ``dW = W_q - W``, so it needs only the
mean of the input (:func:`linear_bias_shifts`): for a 2-D Conv the mean output shift of channel ``c``
is ``sum dW[c, i, kh, kw] * M[i, kh, kw]``, ``M`` the mean over samples and output positions of the
input value each kernel tap reads (zero padding included), which follows exactly from the input's
per-position sum over samples ``S[i, y, x]`` (:class:`InputMeans`); for Gemm / MatMul
``shift = mean(x) @ dW``. The float model then runs once with the layer inputs exposed, without a
copy of every layer (MobileNetV2: bias correction 4x faster).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from ...ir.edit import Namer, add_node, constant, copy_graph, ensure_opset
from ...quant.fakequant import constant_factors, emit_antiquant, emit_fake_quant
from ...quant.layers import QuantLayer
from ...quant.params import ActQuantParams, WeightQuantParams
from ...quant.weights import dequantize_weight, gemm_factors, weight_values

__all__ = ["bias_shifts", "linear_bias_shifts", "sequential_shifts", "InputMeans", "CORRECTABLE"]

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
    """Write the corrected biases into ``graph`` (new arrays, never edited in place); stats, with
    ``originals`` (bias constant name -> the values it had)."""
    corrected, skipped, largest, originals = 0, {}, 0.0, {}
    for name, shift in shifts.items():
        tensor, values, why = corrected_bias(graph, layers[name], shift)
        if tensor is None:
            skipped[name] = why
            continue
        originals[tensor.name] = tensor.values
        tensor.values = np.require(values, requirements="C")
        corrected += 1
        largest = max(largest, float(np.abs(shift).max()))
    return {"corrected": corrected, "skipped": skipped, "largest_shift": largest, "originals": originals}


# -- float input: the shift is linear in the weight error ----------------------------------------------
LINEAR = ("Conv", "Gemm", "MatMul")


class InputMeans:
    """Running per-position sums of a layer input over its samples (axis 0): ``[C, H, W]`` for a 4-D
    Conv input, ``[K]`` (the last axis, every other axis summed) for Gemm / MatMul."""

    def __init__(self, op_type: str) -> None:
        self.op_type, self.sums, self.count = op_type, None, 0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if self.op_type == "Conv":      # float32 sums within a batch (pairwise: accurate), float64 across
            part, count = x.sum(axis=0), x.shape[0]
        else:
            rows = x.reshape(-1, x.shape[-1])
            part, count = rows.sum(axis=0), rows.shape[0]
        part = part.astype(np.float64)
        self.sums = part if self.sums is None else self.sums + part
        self.count += count


def linear_input(graph, layer: QuantLayer) -> bool:
    """The layer's float-input shift follows from :class:`InputMeans` (2-D Conv; Gemm without transA;
    MatMul with a 2-D weight)."""
    if layer.op_type not in LINEAR or layer.weight is None:
        return False
    node = graph.node(layer.name)
    weight = weight_values(graph, layer)            # as the layer reads it (through view ops)
    rank = 0 if weight is None else np.ndim(weight)
    if node.inputs[0].name != layer.input:
        return False
    if layer.op_type == "Conv":
        return rank == 4 and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET", "VALID", b"VALID")
    if layer.op_type == "Gemm":
        return not node.attrs.get("transA", 0)
    return rank == 2


def linear_bias_shifts(graph, layers: list[QuantLayer], weight_quant: Mapping[str, WeightQuantParams],
                       means: Mapping[str, InputMeans]) -> dict[str, np.ndarray]:
    """``{layer: shift per output channel}`` of the layers :func:`linear_input` accepts, from the
    input sums in ``means`` (layer input tensor -> InputMeans)."""
    from ...quant.weights import effective_weight
    shifts = {}
    for layer in layers:
        stats = means.get(layer.input)
        params = weight_quant.get(layer.name)
        if stats is None or stats.count == 0 or params is None:
            continue
        error = dequantize_weight(params.quantized, params.scale, layer).astype(np.float64) - \
            effective_weight(graph, layer).astype(np.float64)
        if layer.op_type == "Conv":
            shifts[layer.name] = _conv_shift(graph.node(layer.name), error, stats.sums / stats.count)
        else:
            mean = stats.sums / stats.count
            transposed = layer.op_type == "Gemm" and graph.node(layer.name).attrs.get("transB", 0)
            shifts[layer.name] = error @ mean if transposed else mean @ error
    return shifts


def _conv_shift(node: gs.Node, error: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Mean over output positions of ``conv(x, error)`` per output channel; ``mean``: ``[C, H, W]``
    the input's mean over samples at each position (zero padding outside)."""
    channels, height, width = mean.shape
    out_channels, per_group, kh, kw = error.shape
    group = int(node.attrs.get("group", 1))
    strides = list(node.attrs.get("strides", [1, 1]))
    dilations = list(node.attrs.get("dilations", [1, 1]))
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    if node.attrs.get("auto_pad", "NOTSET") in ("VALID", b"VALID"):
        pads = [0, 0, 0, 0]
    taps = []                                     # per axis: the input indices each kernel offset reads
    for size, k, stride, dilation, before, after in ((height, kh, strides[0], dilations[0], pads[0], pads[2]),
                                                     (width, kw, strides[1], dilations[1], pads[1], pads[3])):
        out = (size + before + after - dilation * (k - 1) - 1) // stride + 1
        rows = [np.arange(out) * stride + o * dilation - before for o in range(k)]
        taps.append(([r[(r >= 0) & (r < size)] for r in rows], out))
    (row_taps, out_h), (col_taps, out_w) = taps
    window = np.empty((channels, kh, kw))        # M[i, kh, kw]: summed over the positions each tap reads
    for a, rows in enumerate(row_taps):
        block = mean[:, rows].sum(axis=1)        # [C, W]
        for b, cols in enumerate(col_taps):
            window[:, a, b] = block[:, cols].sum(axis=1)
    window /= max(out_h * out_w, 1)
    per_group_out = out_channels // group
    shift = np.empty(out_channels)
    for g in range(group):
        inputs = window[g * per_group:(g + 1) * per_group]
        outs = slice(g * per_group_out, (g + 1) * per_group_out)
        shift[outs] = np.einsum("oikl,ikl->o", error[outs], inputs)
    return shift


# -- sequential: the quantized model's own input, every upstream layer already corrected -------------
def sequential_shifts(graph, model, layers: list[QuantLayer], feeds: list[dict[str, np.ndarray]],
                      fixed: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({layer: shift}, {layer: why not})``: per output channel, the bias shifts that minimise the
    squared error of what the next layers read, in the quantized model against the float model,
    with every upstream layer already corrected (AIMET's and NNCF's empirical bias correction, in
    topological order).

    What the next layers read: the layer's output, or the residual Add it alone feeds (its error
    is what the quantized sum carries on: correcting the layer's own output undoes errors that
    cancel in the sum), and the Relu / Clip that alone reads either (a value the activation cuts
    carries no error on). ``model`` is the quantized model emulated in float
    (``quant.emulate.eval_graph`` with float-chain quantizers, not finalized; factor inputs in
    ``fixed``). One sweep through the numpy engine (``autodiff``) runs the float and the quantized
    model side by side over ``feeds``, keeping every batch's intermediates: at each point the shift
    is fitted, subtracted from the quantized values (what the corrected bias does), and the sweep
    goes on from them. Measuring every layer at once in the uncorrected model instead corrects
    each layer for its upstream's shift, which the upstream corrects too (MobileNetV2: 7 dB)."""
    from ...autodiff import Executor, Program
    skipped: dict[str, str] = {}
    points: dict[str, tuple[str, int, Any]] = {}       # node whose output is fitted -> (layer, axis, bounds)
    for layer in layers:
        current = graph.tensors().get(layer.bias) if layer.bias is not None else None
        size = int(np.size(current.values)) if isinstance(current, gs.Constant) else 0
        tensor, _, why = corrected_bias(graph, layer, np.zeros(size))
        rank = _output_rank(graph, layer, weight_values(graph, layer))
        if tensor is None or layer.op_type not in CORRECTABLE or rank is None:
            skipped[layer.name] = why or ("not correctable" if rank is not None else "output rank unknown")
            continue
        node, bounds = _fitted_point(graph, layer, rank, points)
        points[node] = (layer.name, _channel_axis(layer, rank), bounds)
    if not points:
        return {}, skipped
    reference = _sweep(Executor(Program.from_graph(graph.to_proto())), feeds)
    pending: dict[str, list[np.ndarray]] = {}

    def float_outputs(name: str) -> list[np.ndarray]:
        while name not in pending:
            node, outs = next(reference)
            if node.name in points:
                pending[node.name] = outs
        return pending.pop(name)

    model.finalize()
    engine = Executor(Program.from_graph(model.to_proto()))
    shifts = {}
    for node, outs in _sweep(engine, [{**feed, **fixed} for feed in feeds]):
        if node.name not in points:
            continue
        layer, axis, bounds = points[node.name]
        shift = _best_shift(outs, float_outputs(node.name), axis, bounds)
        view = [1] * outs[0].ndim
        view[axis] = -1
        for out in outs:
            out -= shift.reshape(view).astype(out.dtype)
        shifts[layer] = shift
    return shifts, skipped


def _fitted_point(graph, layer: QuantLayer, rank: int, taken) -> tuple[str, Any]:
    """(the node whose output the layer's shift is fitted on, the (min, max) of the Relu / Clip that
    alone reads it, or None): the layer itself, or the Add its output alone feeds (channel for
    channel: same rank, not taken by another layer)."""
    node = graph.node(layer.name)
    tensor = node.outputs[0]
    if len(tensor.outputs) == 1 and not graph.is_graph_output(tensor):
        add = tensor.outputs[0]
        other = [t for t in add.inputs if t is not tensor]
        if (add.op == "Add" and len(other) == 1 and add.name not in taken
                and len(getattr(other[0], "shape", None) or []) == rank):
            node, tensor = add, add.outputs[0]
    return node.name, _activation(graph, tensor)


def _sweep(engine, feeds: list[dict[str, np.ndarray]]):
    """Run ``engine``'s nodes in order over every feed; yield ``(node, [its first output per feed])``
    before the later nodes read it, so the caller may change it in place."""
    nodes = engine.nodes
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for t in node.inputs:
            if t:
                last[t] = i
    envs = [dict(feed) for feed in feeds]
    for i, node in enumerate(nodes):
        for env in envs:
            xs = [None if not t else env[t] if t in env else engine.constants[t] for t in node.inputs]
            ys, _ = node.op.forward(xs, None)
            env.update((name, y) for name, y in zip(node.outputs, ys) if name)
        if node.outputs and node.outputs[0]:
            yield node, [env[node.outputs[0]] for env in envs]
        for env in envs:
            for t in node.inputs:
                if t and last.get(t) == i:
                    env.pop(t, None)


def _activation(graph, tensor: gs.Tensor) -> tuple[float, float] | None:
    """(min, max) of the Relu / Clip that alone reads ``tensor``: the next layers read its output."""
    from ...quant.facts import activation_bounds
    if len(tensor.outputs) != 1 or tensor.outputs[0].op not in ("Relu", "Clip") or graph.is_graph_output(tensor):
        return None
    low, high = activation_bounds(graph, tensor.outputs[0])
    return None if low is None else (low, high)


def _best_shift(outs: list[np.ndarray], refs: list[np.ndarray], axis: int, bounds, steps: int = 8) -> np.ndarray:
    """Per channel, the shift ``s`` minimising the mean squared error of ``act(out - s)`` against
    ``act(ref)`` (``act`` clips to ``bounds``; none: ``s = mean(out - ref)`` exactly). Gauss-Newton
    steps from 0; a value the activation cuts has no gradient, so channels the activation almost
    always cuts move little."""
    if bounds is None:
        return _mean([o - r for o, r in zip(outs, refs)], axis)
    low, high = bounds
    view = [1] * outs[0].ndim
    view[axis] = -1
    targets = [np.clip(r, low, high) for r in refs]
    shift = np.zeros(outs[0].shape[axis])
    for _ in range(steps):
        moved = [o - shift.reshape(view).astype(o.dtype) for o in outs]
        inside = [((m > low) & (m < high)).astype(np.float32) for m in moved]
        error = _mean([(np.clip(m, low, high) - t) * i for m, t, i in zip(moved, targets, inside)], axis)
        shift = shift + error / np.maximum(_mean(inside, axis), 0.05)
    return shift


def _mean(outs: list[np.ndarray], axis: int) -> np.ndarray:
    """Mean per channel (``axis``) over every other axis of all batches, in float64."""
    total, count = None, 0
    for out in outs:
        axes = tuple(a for a in range(out.ndim) if a != axis)
        part = out.sum(axis=axes, dtype=np.float64)
        total = part if total is None else total + part
        count += out.size // out.shape[axis]
    return total / max(count, 1)
