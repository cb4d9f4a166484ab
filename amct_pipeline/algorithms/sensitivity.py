"""Quantization sensitivity: per-layer statistics in one run, the output effect of each layer by
suffix execution, and a model whose per-layer precision is chosen by its inputs.

Evaluation models built from the float graph, all run by onnxruntime:

* the **probe model** (:func:`build_probe_model`) computes, beside the float network, each layer a
  second time on its fake-quantized input with its fake-quantized weight (AMCT's ranking feeds the
  float layer input to the float and to the fake-quant layer, SPEC 8.1) and reduces both outputs to
  a few scalars per batch: their dot product, norms and squared difference, the input's range and
  the shapes. One run of it over the calibration data gives every layer's AMCT sensitivity
  (``0.5 + 0.5 cos``, MSE) and FLOPs, however many layers there are, and keeps nothing per sample.
* **suffix models** (:func:`quantized_graph`, :func:`suffix_model`) give the output SQNR with only
  one layer quantized, and with all but one: the graph from that layer on, fed with the tensors a
  float (or all-quantized) run of the same batch computed, so each configuration costs the part
  of the network after the layer, not a whole run (:func:`_output_effects`).
* the **switch model** (:class:`SwitchModel`) holds, for each layer, fake-quant branches of its
  input and weight at several bit widths, each picked by a ``Where`` whose condition is a boolean
  graph input. Any per-layer precision (float, INT8/INT16 activations, INT8/INT4 weights)
  is then one more run of the same session: the mixed-precision search needs no model rebuilt.
  The suffix models quantize a layer exactly as it does (:func:`_branch`, the same weights).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..errors import CalibrationError
from ..ir.edit import Namer, add_node, copy_graph, ensure_opset
from ..quant.fakequant import constant_factors, emit_antiquant, emit_fake_quant
from ..quant.params import ActQuantParams
from ..quant.weights import dequantize_weight, weight_values

__all__ = ["LayerStats", "Variants", "Precision", "build_probe_model", "probe_statistics", "SwitchModel",
           "OutputMeter", "OutputError", "quantized_graph", "suffix_model", "Suffix", "SharedWeights", "first_samples",
           "subset_feeds", "sqnr_db", "INT16_ACT_TYPES", "progress_bar"]

PREFIX = "amct_sens"
MIN_OPSET = 13
INT16_ACT_TYPES = ("Conv", "Gemm", "ConvTranspose")      # SPEC 6.1: INT16 activations allowed


@dataclass(frozen=True)
class Precision:
    """One layer's precision: bits of its input activation and of its weight (None = float)."""

    act: Optional[int] = 8
    wts: Optional[int] = 8

    def text(self) -> str:
        if self.act is None and self.wts is None:
            return "float"
        return f"A{self.act or 'f'}W{self.wts or 'f'}"


@dataclass
class LayerStats:
    """What the probe run measured for one layer (sums over batches)."""

    name: str
    cos_sum: float = 0.0          # sum over batches of 0.5 + 0.5 cos (AMCT's CosineSimilarity)
    sse: float = 0.0
    count: int = 0
    batches: int = 0
    in_min: float = math.inf
    in_max: float = -math.inf
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()

    @property
    def similarity(self) -> float:
        return self.cos_sum / max(self.batches, 1)

    @property
    def mse(self) -> float:
        return self.sse / max(self.count, 1)


# -- the probe model -----------------------------------------------------------------------------
def _fake_quant(model, namer: Namer, x: gs.Tensor, base: str, act: ActQuantParams) -> gs.Tensor:
    """x -> AMCT's fake quant -> dequantized float (the one emitter, constant factors)."""
    codes = emit_fake_quant(model, namer, x, base, constant_factors(namer, base, act))
    return emit_antiquant(model, namer, codes, f"{base}.dequant", float(act.scale))


def _branch(model, namer: Namer, x: gs.Tensor, base: str, act: ActQuantParams) -> gs.Tensor:
    """The dequantized fake quant of ``x``: 8 bits as QuantizeLinear -> DequantizeLinear (uint8 codes,
    zero point ``offset_d + 128``: AMCT's codes, two ops instead of six), wider as AMCT's float chain."""
    if act.num_bits != 8:
        return _fake_quant(model, namer, x, base, act)
    scale = gs.Constant(namer(f"{base}.scale"), np.array(act.scale, np.float32))
    zero = gs.Constant(namer(f"{base}.zero_point"), np.array(act.offset + 128, np.uint8))
    codes = add_node(model, namer, "QuantizeLinear", f"{base}.quant", [x, scale, zero]).outputs[0]
    out = add_node(model, namer, "DequantizeLinear", f"{base}.dequant", [codes, scale, zero]).outputs[0]
    codes.dtype, out.dtype = np.uint8, np.float32
    return out


def _quant_weight(graph, layer, params) -> np.ndarray:
    seen = weight_values(graph, layer)
    try:
        values = dequantize_weight(params.quantized, params.scale, layer)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None
    return values.astype(seen.dtype, copy=False)


def _scalar_out(model, namer, op: str, name: str, inputs) -> gs.Variable:
    out = add_node(model, namer, op, name, inputs, keepdims=0).outputs[0]
    out.dtype, out.shape = np.float32, []
    model.gs.outputs.append(out)
    return out


def _shape_out(model, namer, tensor: gs.Tensor, name: str) -> gs.Variable:
    out = add_node(model, namer, "Shape", name, [tensor]).outputs[0]
    out.dtype, out.shape = np.int64, [None]
    model.gs.outputs.append(out)
    return out


def build_probe_model(graph, layers: Sequence, act_quant: Mapping[str, ActQuantParams],
                      weight_quant: Mapping[str, Any]) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """The float graph plus, per layer, its fake-quant twin and the reductions comparing them.

    Returns the model and, per layer, the names of its outputs: dot, |float|^2, |quant|^2, squared
    error, input min, input max, input shape, output shape (the dot product has its own reduction:
    from the other three it loses half the digits of 1 - cos). The input's fake quant is the switch
    model's (:func:`_branch`: QuantizeLinear -> DequantizeLinear for 8 bits, AMCT's codes; 15% less
    time than the float chain on MobileNetV2, similarities within 1e-7). ``graph`` is never changed.
    """
    model = copy_graph(graph)
    ensure_opset(model, MIN_OPSET, where="pass 'analyze'", path="the model",
                 hint="Round and Clip with inputs need opset 11; upgrade the model")
    model.gs.outputs.clear()      # only the probes: the float outputs are not needed here
    namer = Namer(model)
    names: dict[str, list[str]] = {}
    for index, layer in enumerate(layers):
        node = model.node(layer.name)
        base = f"{PREFIX}.{index}"
        x, y = node.inputs[0], node.outputs[0]
        twin_inputs = [_branch(model, namer, x, f"{base}.in", act_quant[layer.name])] + list(node.inputs[1:])
        params = weight_quant.get(layer.name)
        if layer.weight is not None and params is not None:
            slot = next(i for i, t in enumerate(node.inputs) if t.name == layer.weight)
            twin_inputs[slot] = gs.Constant(namer(f"{base}.weight"), _quant_weight(graph, layer, params))
        attrs = dict(node.attrs)
        if layer.op_type == "Gemm" and "alpha" in attrs:     # the codes quantize alpha * B
            attrs["alpha"] = 1.0
        twin = add_node(model, namer, node.op, f"{base}.twin", twin_inputs, **attrs).outputs[0]
        twin.dtype = np.float32
        prod = add_node(model, namer, "Mul", f"{base}.prod", [y, twin]).outputs[0]
        diff = add_node(model, namer, "Sub", f"{base}.diff", [y, twin]).outputs[0]
        outs = [_scalar_out(model, namer, "ReduceSum", f"{base}.dot", [prod]),
                _scalar_out(model, namer, "ReduceSumSquare", f"{base}.ref", [y]),
                _scalar_out(model, namer, "ReduceSumSquare", f"{base}.got", [twin]),
                _scalar_out(model, namer, "ReduceSumSquare", f"{base}.sse", [diff]),
                _scalar_out(model, namer, "ReduceMin", f"{base}.min", [x]),
                _scalar_out(model, namer, "ReduceMax", f"{base}.max", [x]),
                _shape_out(model, namer, x, f"{base}.in_shape"), _shape_out(model, namer, y, f"{base}.out_shape")]
        names[layer.name] = [o.name for o in outs]
    model.finalize()
    return model.to_proto(), names


def _cosine_term(dot: float, ref: float, got: float) -> float:
    """AMCT: 0.5 + 0.5 cos; 1 when the reference is all zero, 0 when only the quantized one is."""
    if ref <= 0.0:
        return 1.0
    if got <= 0.0:
        return 0.0
    return 0.5 + 0.5 * max(-1.0, min(1.0, dot / math.sqrt(ref * got)))


def probe_statistics(graph, source, layers: Sequence, act_quant, weight_quant, *, num_batches: int | None = None,
                     progress: bool = False) -> dict[str, LayerStats]:
    """Stream the dataset through the probe model once; per layer its :class:`LayerStats`."""
    from ..runtime.collector import collect
    model, names = build_probe_model(graph, layers, act_quant, weight_quant)
    stats = {layer.name: LayerStats(layer.name) for layer in layers}
    fetch = [n for layer in layers for n in names[layer.name]]
    for got in collect(graph, source, fetch, num_batches, model=model, progress=progress, desc="analyze: layers"):
        for layer in layers:
            dot, ref, quant, sse, lo, hi, in_shape, out_shape = (float(got[n]) if i < 6 else got[n]
                                                                  for i, n in enumerate(names[layer.name]))
            s = stats[layer.name]
            s.cos_sum += _cosine_term(dot, ref, quant)
            s.sse += sse
            s.count += int(np.prod(out_shape))
            s.batches += 1
            s.in_min, s.in_max = min(s.in_min, lo), max(s.in_max, hi)
            s.in_shape, s.out_shape = tuple(int(v) for v in in_shape), tuple(int(v) for v in out_shape)
    return stats


# -- the switch model ----------------------------------------------------------------------------
@dataclass
class Variants:
    """The precisions one layer can take: activation factors and fake-quant weights per bit width."""

    act: dict[int, ActQuantParams] = field(default_factory=dict)
    wts: dict[int, np.ndarray] = field(default_factory=dict)


class SwitchModel:
    """The float model with every layer's precision selected by 0/1 graph inputs (one session)."""

    def __init__(self, graph, layers: Sequence, variants: Mapping[str, Variants]) -> None:
        self.layers = list(layers)
        self.variants = dict(variants)
        self.inputs: dict[tuple[str, str, int], str] = {}     # (layer, "act"|"wts", bits) -> input name
        self.model = self._build(graph)
        self._session = None

    def _switch(self, model, namer: Namer, key: tuple[str, str, int], base: str) -> gs.Variable:
        var = gs.Variable(namer(base), dtype=np.bool_, shape=[])
        model.gs.inputs.append(var)
        self.inputs[key] = var.name
        return var

    def _select(self, model, namer: Namer, key, base: str, on: gs.Tensor, off: gs.Tensor) -> gs.Tensor:
        """``on`` where the switch input is true, else ``off`` (one Where: cheap next to the layer)."""
        cond = self._switch(model, namer, key, f"{base}.on")
        out = add_node(model, namer, "Where", f"{base}.select", [cond, on, off]).outputs[0]
        out.dtype = np.float32
        return out

    def _build(self, graph) -> onnx.ModelProto:
        model = copy_graph(graph)
        ensure_opset(model, MIN_OPSET, where="pass 'analyze'", path="the model",
                     hint="Round and Clip with inputs need opset 11; upgrade the model")
        namer = Namer(model)
        for index, layer in enumerate(self.layers):
            node = model.node(layer.name)
            base = f"{PREFIX}.sw{index}"
            found = self.variants.get(layer.name) or Variants()
            x = node.inputs[0]
            for bits, act in sorted(found.act.items()):
                fq = _branch(model, namer, x, f"{base}.a{bits}", act)
                node.inputs[0] = self._select(model, namer, (layer.name, "act", bits), f"{base}.a{bits}", fq,
                                              node.inputs[0])
            if found.wts and layer.weight is not None:
                self._weight_branches(graph, model, namer, node, layer, found, base)
        model.finalize()
        return model.to_proto()

    def _weight_branches(self, graph, model, namer: Namer, node: gs.Node, layer, found: Variants, base: str) -> None:
        """The layer's weight chosen among constants by ``Where`` (float, then each bit width). A copy
        of the layer per variant with its own constant weight measured slower on MobileNetV2 (6.8 vs
        3.7 s for 16 images): the selected weight costs onnxruntime its pre-packing, the copies cost
        more convolutions and more layout reorders."""
        slot = next(i for i, t in enumerate(node.inputs) if t.name == layer.weight)
        w = np.asarray(weight_values(graph, layer), dtype=np.float32)
        alpha = float(node.attrs.get("alpha", 1.0)) if layer.op_type == "Gemm" else 1.0
        if alpha != 1.0:          # quantized values hold alpha * B: every branch runs with alpha 1
            w = w * np.float32(alpha)
            node.attrs["alpha"] = 1.0
        current: gs.Tensor = gs.Constant(namer(f"{base}.w"), w)
        for bits, values in sorted(found.wts.items()):
            wq = gs.Constant(namer(f"{base}.w{bits}.values"), np.asarray(values, np.float32))
            current = self._select(model, namer, (layer.name, "wts", bits), f"{base}.w{bits}", wq, current)
        node.inputs[slot] = current

    def feed(self, config: Mapping[str, Precision]) -> dict[str, np.ndarray]:
        """0/1 inputs for ``config`` (layer -> Precision; a layer not named stays float)."""
        feed = {}
        for (layer, side, bits), name in self.inputs.items():
            precision = config.get(layer)
            chosen = None if precision is None else (precision.act if side == "act" else precision.wts)
            feed[name] = np.array(chosen == bits)
        return feed

    def check(self, config: Mapping[str, Precision]) -> None:
        """Every bit width asked for has a branch (else a one-line error naming the layer)."""
        for layer, precision in config.items():
            for side, bits in (("act", precision.act), ("wts", precision.wts)):
                if bits is not None and (layer, side, bits) not in self.inputs:
                    have = sorted(b for (n, s, b) in self.inputs if n == layer and s == side)
                    raise CalibrationError(f"layer '{layer}': no {bits}-bit {'activation' if side == 'act' else 'weight'}"
                                           f" quantization available (have {have or 'none'})")

    def session(self):
        if self._session is None:
            from ..runtime.ort import make_session
            self._session = make_session(self.model, config={"session.disable_quant_qdq": "1"})
        return self._session


# -- measuring the model's outputs ----------------------------------------------------------------
def sqnr_db(relative_error: float) -> float:
    return float("inf") if relative_error <= 0 else -10.0 * math.log10(relative_error)


class OutputError:
    """Squared error of each model output against the float reference, summed over batches, and the
    top-1 agreement of the first output when it is [N, classes]."""

    def __init__(self, outputs: int) -> None:
        self.sse = [0.0] * outputs
        self.agree = self.total = 0

    def add(self, ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> None:
        for k, (r, g) in enumerate(zip(ref, got)):
            if r is not g:          # an output the quantized layers do not reach is the reference itself
                self.sse[k] += float(np.square(g - r, dtype=np.float64).sum())
        if ref[0].ndim == 2 and ref[0].shape[1] > 1:
            self.agree += int((got[0].argmax(1) == ref[0].argmax(1)).sum())
            self.total += len(ref[0])

    def result(self, power: Sequence[float]) -> dict[str, float]:
        """{sqnr_db: mean over outputs of the relative error, in dB; agreement (None: no class output)}."""
        error = float(np.mean([e / max(p, 1e-30) for e, p in zip(self.sse, power)]))
        return {"sqnr_db": round(sqnr_db(error), 4), "agreement": (self.agree / self.total) if self.total else None}


def output_power(refs: Sequence[np.ndarray]) -> list[float]:
    return [float(np.square(r, dtype=np.float64).sum()) for r in refs]


class OutputMeter:
    """The float model's outputs on fixed feeds, and how far another run's outputs are from them."""

    def __init__(self, float_model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        from ..runtime.ort import make_session
        self.feeds = list(feeds)
        self.outputs = [o.name for o in float_model.graph.output]
        session = make_session(float_model)
        self.refs = [session.run(self.outputs, dict(feed)) for feed in self.feeds]
        self.power = [sum(p) for p in zip(*(output_power(r) for r in self.refs))]
        self.runs = 0

    @property
    def samples(self) -> int:
        return sum(len(next(iter(feed.values()))) for feed in self.feeds)

    def measure(self, session, extra: Mapping[str, np.ndarray]) -> dict[str, float]:
        """{sqnr_db: mean over outputs of the relative error, in dB; agreement: top-1 agreement of the
        first output when it is [N, classes] (else None)}."""
        error = OutputError(len(self.outputs))
        for feed, ref in zip(self.feeds, self.refs):
            error.add(ref, session.run(self.outputs, {**feed, **extra}))
        self.runs += 1
        return error.result(self.power)


def first_samples(graph, source, max_samples: int) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's first batches, streamed, the last cut so that at most ``max_samples`` samples
    come out where the batch dimension is free (a fixed batch is yielded whole)."""
    from ..runtime.collector import planned_batches
    plan = planned_batches(graph, source, None)
    fixed = any(i.fixed_batch for i in plan.inputs)
    budget, seen = max_samples, 0
    for feed in source.batches(plan.inputs):
        if budget <= 0:
            break
        size = len(next(iter(feed.values())))
        if size > budget and not fixed:
            feed, size = {k: v[:budget] for k, v in feed.items()}, budget
        seen += 1
        yield feed
        budget -= size
    if not seen:
        raise CalibrationError(f"dataset '{source.name}' yields no batch")


def subset_feeds(graph, source, max_samples: int) -> list[dict[str, np.ndarray]]:
    """:func:`first_samples`, held in a list."""
    return list(first_samples(graph, source, max_samples))


def progress_bar(enabled: bool, total: int, desc: str, unit: str = "run"):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, leave=False)


# -- the whole analysis -----------------------------------------------------------------------------
def layer_precision(layer, act_quant, weight_quant) -> Precision:
    """The precision ``act_quant`` / ``weight_quant`` give a layer (weightless: no weight bits)."""
    act = act_quant.get(layer.name)
    wts = weight_quant.get(layer.name) if layer.weight is not None else None
    return Precision(act.num_bits if act is not None else None, wts.num_bits if wts is not None else None)


def layer_cost(graph, layer, stats: LayerStats, precision: Precision) -> tuple[int, int]:
    """(FLOPs, bitops) per sample of ``layer`` at ``precision`` (weightless layers count 1 weight bit)."""
    from ..quant.cost import bitops, layer_flops
    weight = weight_values(graph, layer)
    kernel = tuple(graph.node(layer.name).attrs.get("kernel_shape", ())) if layer.op_type == "AveragePool" else ()
    flops = layer_flops(layer, stats.in_shape, stats.out_shape, None if weight is None else weight.shape, kernel)
    wts_bits = precision.wts if layer.weight is not None else 1
    return flops, bitops(flops, precision.act, wts_bits)


def quantized_config(layers, act_quant, weight_quant) -> dict[str, Precision]:
    return {layer.name: layer_precision(layer, act_quant, weight_quant) for layer in layers}


def chosen_variants(graph, layers, act_quant, weight_quant) -> dict[str, Variants]:
    """Each layer's own precision as the switch model's one branch per side."""
    out = {}
    for layer in layers:
        act, wts = act_quant[layer.name], weight_quant.get(layer.name)
        weights = {}
        if layer.weight is not None and wts is not None:
            weights[wts.num_bits] = _quant_weight(graph, layer, wts)
        out[layer.name] = Variants({act.num_bits: act}, weights)
    return out


def analyze(graph, source, layer_map, act_quant, weight_quant, *, max_samples: int, output_effects: bool = True,
            num_batches: int | None = None, progress: bool = False, reference=None) -> dict[str, Any]:
    """AMCT's per-layer sensitivity plus output effects, FLOPs and bitops: the ``sensitivity`` artifact.

    ``reference``: the float model the output effects are measured against, when ``graph`` holds values
    fitted to the quantized model (bias correction's biases, retrained weights); default ``graph``.

    Time: one run of the probe model over the calibration data (every layer computed twice, plus the
    fake quant and reductions: ~8 float runs on MobileNetV2), plus, with ``output_effects``, on the
    first ``max_samples`` samples one float and one quantized run and two suffix runs per layer
    (:func:`_output_effects`).
    """
    layers = [layer for layer in layer_map.layers() if act_quant.get(layer.name) is not None]
    if not layers:
        raise CalibrationError("no layer has activation factors to analyze; run calibrate before analyze")
    stats = probe_statistics(graph, source, layers, act_quant, weight_quant, num_batches=num_batches,
                             progress=progress)
    config = quantized_config(layers, act_quant, weight_quant)
    rows = []
    for layer in layers:
        flops, bits = layer_cost(graph, layer, stats[layer.name], config[layer.name])
        s = stats[layer.name]
        rows.append({"name": layer.name, "op_type": layer.op_type, "act_bits": config[layer.name].act,
                     "wts_bits": config[layer.name].wts, "cosine_similarity": round(s.similarity, 8),
                     "mse": float(f"{s.mse:.6g}"), "input_range": [s.in_min, s.in_max],
                     "flops": flops, "bitops": bits})
    result: dict[str, Any] = {"metric": "CosineSimilarity", "samples": int(stats[layers[0].name].batches)}
    if output_effects:
        reference = graph if reference is None else reference
        result.update(_output_effects(graph, reference, source, layers, act_quant, weight_quant, rows, max_samples,
                                      progress))
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["cosine_similarity"], i))
    for rank, i in enumerate(order):
        rows[i]["rank"] = rank + 1
    result["ranking_information"] = {rows[i]["name"]: rows[i]["cosine_similarity"] for i in order}
    result["layers"] = rows
    result["total"] = {"flops": sum(r["flops"] for r in rows), "bitops": sum(r["bitops"] for r in rows)}
    return result


# -- output effects by suffix execution -------------------------------------------------------------
def _set_weight(model, namer: Namer, node: gs.Node, layer, values: np.ndarray, base: str) -> None:
    """The layer reads ``values`` (fake-quant, alpha folded in as the codes hold it) as its weight."""
    slot = next(i for i, t in enumerate(node.inputs) if t.name == layer.weight)
    node.inputs[slot] = gs.Constant(namer(f"{base}.w"), np.asarray(values, np.float32))
    if layer.op_type == "Gemm" and "alpha" in node.attrs:
        node.attrs["alpha"] = 1.0


def quantized_graph(graph, layers: Sequence, act_quant, weights: Mapping[str, np.ndarray], quantized,
                    biases: Mapping[str, np.ndarray] | None = None):
    """A copy of ``graph`` in which the ``quantized`` layers (names) read their input through its fake
    quant (as the switch model does it, :func:`_branch`), their fake-quant weight and their bias from
    ``biases`` (by bias name; the quantized model's where it differs from ``graph``'s); per layer, the
    nodes that compute it from its float input (its fake-quant nodes, then the layer)."""
    model = copy_graph(graph)
    ensure_opset(model, MIN_OPSET, where="pass 'analyze'", path="the model",
                 hint="Round and Clip with inputs need opset 11; upgrade the model")
    namer = Namer(model)
    heads: dict[str, list[gs.Node]] = {}
    for index, layer in enumerate(layers):
        node = model.node(layer.name)
        heads[layer.name] = [node]
        if layer.name not in quantized:
            continue
        base, before = f"{PREFIX}.q{index}", len(model.gs.nodes)
        node.inputs[0] = _branch(model, namer, node.inputs[0], base, act_quant[layer.name])
        heads[layer.name] = list(model.gs.nodes[before:]) + [node]
        if layer.name in weights:
            _set_weight(model, namer, node, layer, weights[layer.name], base)
        if biases and layer.bias in biases:
            _set_bias(model, namer, layer, biases[layer.bias], base)
    return model, heads


def _set_bias(model, namer: Namer, layer, values: np.ndarray, base: str) -> None:
    """The layer (or the Add carrying a MatMul's bias) reads ``values`` as its bias, under a new name
    (a name means the same values in every suffix: ``SharedWeights``)."""
    reader = model.node(layer.bias_add or layer.name)
    slot = next(i for i, t in enumerate(reader.inputs) if t.name == layer.bias)
    reader.inputs[slot] = gs.Constant(namer(f"{base}.b"), np.asarray(values))


def _bias_changes(graph, reference, layers) -> dict[str, np.ndarray]:
    """The biases whose values in ``graph`` (the quantized model's) differ from ``reference``'s."""
    if reference is graph:
        return {}
    mine, theirs = graph.tensors(), reference.tensors()
    changed = {}
    for layer in layers:
        if layer.bias and layer.bias in mine and layer.bias in theirs:
            values = np.asarray(mine[layer.bias].values)
            if not np.array_equal(values, np.asarray(theirs[layer.bias].values)):
                changed[layer.bias] = values
    return changed


def suffix_model(model, heads: Sequence[gs.Node]) -> "Suffix":
    """The part of ``model`` computed from ``heads`` (and the heads), as a :class:`Suffix`.

    Its inputs are the tensors it reads from the rest of the graph (residual branches, the heads'
    own inputs) and its outputs the graph outputs it reaches; the rest of the outputs do not change
    when only the heads do. ``model`` is consumed."""
    g = model.gs
    inside, todo = {id(n) for n in heads}, list(heads)
    while todo:
        for out in todo.pop().outputs:
            for consumer in out.outputs:
                if id(consumer) not in inside:
                    inside.add(id(consumer))
                    todo.append(consumer)
    for node in [n for n in g.nodes if id(n) in inside]:     # Constant nodes come along, not as inputs
        for t in node.inputs:
            if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
                inside.add(id(t.inputs[0]))
    made = {t.name for n in g.nodes if id(n) in inside for t in n.outputs}
    reads = {t.name: t for n in g.nodes if id(n) in inside for t in n.inputs
             if isinstance(t, gs.Variable) and t.name and t.name not in made}
    outputs = [t for t in g.outputs if t.name in made]
    # the graph inputs too: a subgraph (If, Loop) may read a tensor of the rest, which then stays
    g.inputs = list({**reads, **{t.name: t for t in g.inputs if isinstance(t, gs.Variable)}}.values())
    g.outputs = outputs
    g.cleanup(remove_unused_graph_inputs=True)
    for t in g.inputs:
        t.shape = None        # the dtype is set from the data before a session is made
    return Suffix(model, [t.name for t in g.inputs], [t.name for t in outputs])


def _constant_bytes(model) -> int:
    return sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in model.gs.tensors().values()
               if isinstance(t, gs.Constant))


class SharedWeights:
    """The suffix models' large float constants, handed to onnxruntime by reference: one buffer per
    name for every session (a name means the same values in every suffix: they are all cut from
    copies of one graph, and replaced weights get new names), and no bytes copied into the protos."""

    MIN_SIZE = 1024       # smaller constants stay inside the model

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def detach(self, model) -> dict[str, np.ndarray]:
        """Turn ``model``'s large float constants into external-data stubs; their values by name."""
        out = {}
        for t in model.gs.tensors().values():
            if not isinstance(t, gs.Constant) or t.dtype != np.float32 or int(np.prod(t.shape)) < self.MIN_SIZE:
                continue
            values = self.arrays.get(t.name)
            if values is None:
                values = self.arrays[t.name] = np.ascontiguousarray(t.values)
            if values.shape != tuple(t.shape):
                continue
            stub = onnx.TensorProto(name=t.name, data_type=onnx.TensorProto.FLOAT, dims=values.shape,
                                    data_location=onnx.TensorProto.EXTERNAL)
            stub.external_data.add(key="location", value="amct-shared-weights")
            t.values = LazyValues(stub)
            out[t.name] = values
        return out


class Suffix:
    """One suffix model and its onnxruntime session, made on the first batch (when the dtypes of its
    inputs are known) and kept until :meth:`close`."""

    def __init__(self, model, inputs: list[str], outputs: list[str]) -> None:
        self.model, self.inputs, self.outputs = model, inputs, outputs
        self.weight_bytes = _constant_bytes(model)
        self._session = None

    def run(self, cache: Mapping[str, np.ndarray], shared: SharedWeights) -> dict[str, np.ndarray]:
        if not self.outputs:
            return {}
        if self._session is None:
            from ..runtime.ort import make_session
            for t in self.model.gs.inputs:
                t.dtype = cache[t.name].dtype
            weights = shared.detach(self.model)
            # no arena: it would keep each session's peak activations for the session's life
            self._session = make_session(self.model.to_proto(), memory_arena=False, config=SUFFIX_SESSION,
                                         initializers=weights)
            self.model = None
        return dict(zip(self.outputs, self._session.run(self.outputs, {n: cache[n] for n in self.inputs})))

    def close(self) -> None:
        self._session = None


SUFFIX_SESSION = {"session.disable_quant_qdq": "1", "session.intra_op.allow_spinning": "0"}
# the suffix sessions alive at once stay within this many bytes of weights (onnxruntime re-lays the
# convolutions' weights out per session; the originals are shared: SharedWeights)
SUFFIX_WEIGHT_BUDGET = 512 << 20


def _cached_session(model, fetch: Sequence[str]):
    """A session of ``model`` that also outputs ``fetch`` (no memory pattern: see runtime.collector)."""
    from ..runtime.ort import expose_tensors, make_session
    return make_session(expose_tensors(model.to_proto(), fetch), memory_pattern=False, config=SUFFIX_SESSION)


def _groups(pairs: Sequence[tuple["Suffix", "Suffix"]], budget: int) -> list[list[int]]:
    """Consecutive layers whose suffix sessions fit ``budget`` bytes of weights together (at least one)."""
    groups, used = [[]], 0
    for index, (one, other) in enumerate(pairs):
        size = one.weight_bytes + other.weight_bytes
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += size
    return groups


def _suffix_pairs(graph, layers, act_quant, weights, biases) -> list[tuple[Suffix, Suffix]]:
    """Per layer: the float graph's suffix from it with it quantized, the all-quantized graph's with
    it float."""
    every = {layer.name for layer in layers}
    pairs = []
    for layer in layers:
        model, heads = quantized_graph(graph, layers, act_quant, weights, {layer.name}, biases)
        only = suffix_model(model, heads[layer.name])
        model, heads = quantized_graph(graph, layers, act_quant, weights, every - {layer.name}, biases)
        pairs.append((only, suffix_model(model, heads[layer.name])))
    return pairs


def _output_effects(graph, reference, source, layers, act_quant, weight_quant, rows, max_samples: int,
                    progress: bool):
    """Output SQNR with only each layer quantized and with all but it, by suffix execution, against
    ``reference`` (the float model; its float layers keep its values, quantized ones take ``graph``'s
    fake-quant weights and biases).

    Per batch the float model and the all-quantized model run once each, keeping the tensors the
    suffixes read. "Only layer i" is then the float model's suffix from layer i, with layer i
    quantized, fed from the float run; "all but i" the quantized model's suffix from layer i, with
    layer i float, fed from the quantized run: two suffix runs per layer, about L float runs when the
    FLOPs are spread evenly, less for late layers. Each suffix session is made once. Memory: one
    batch's cached tensors and the sessions of one group of layers (``SUFFIX_WEIGHT_BUDGET``); each
    further group costs one more float and quantized run per batch.
    """
    weights = {layer.name: _quant_weight(graph, layer, weight_quant[layer.name]) for layer in layers
               if layer.weight is not None and weight_quant.get(layer.name) is not None}
    biases = _bias_changes(graph, reference, layers)
    pairs = _suffix_pairs(reference, layers, act_quant, weights, biases)
    outputs = [t.name for t in graph.gs.outputs]
    feeds = {t.name for t in graph.gs.inputs}

    def fetch(suffixes):
        return [n for n in dict.fromkeys(outputs + [i for s in suffixes for i in s.inputs]) if n not in feeds]
    every = {layer.name for layer in layers}
    runs = (_cached_session(reference, fetch(p[0] for p in pairs)),
            _cached_session(quantized_graph(reference, layers, act_quant, weights, every, biases)[0],
                            fetch(p[1] for p in pairs)))
    whole, power = OutputError(len(outputs)), [0.0] * len(outputs)
    errors = [(OutputError(len(outputs)), OutputError(len(outputs))) for _ in layers]
    groups = _groups(pairs, SUFFIX_WEIGHT_BUDGET)
    samples, shared = 0, SharedWeights()
    with progress_bar(progress, len(groups) * max_samples, "analyze: output effects", unit="sample") as bar:
        for number, group in enumerate(groups):
            wanted = (fetch(pairs[i][0] for i in group), fetch(pairs[i][1] for i in group))
            for feed in first_samples(graph, source, max_samples):
                caches = [{**feed, **dict(zip(names, run.run(names, feed)))} for run, names in zip(runs, wanted)]
                ref, quant = ([cache[n] for n in outputs] for cache in caches)
                size = len(next(iter(feed.values())))
                if number == 0:
                    power = [p + q for p, q in zip(power, output_power(ref))]
                    whole.add(ref, quant)
                    samples += size
                for i in group:
                    for suffix, cache, base, error in zip(pairs[i], caches, (ref, quant), errors[i]):
                        got = suffix.run(cache, shared)  # the outputs it does not reach: the base run's
                        error.add(ref, [got.get(n, b) for n, b in zip(outputs, base)])
                bar.update(size)
                del caches, ref, quant, feed
            for i in group:
                pairs[i][0].close()
                pairs[i][1].close()
    for row, (alone, rest) in zip(rows, errors):
        only_i, rest_i = alone.result(power), rest.result(power)
        row.update({"sqnr_only_db": only_i["sqnr_db"], "sqnr_all_but_db": rest_i["sqnr_db"],
                    "agreement_all_but": rest_i["agreement"]})
    return {"output_samples": samples, "all_quantized": whole.result(power)}
