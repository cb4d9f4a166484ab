"""The trainable quantized copy of a model the ``retrain`` pass optimises, and the factors it yields.

``build`` makes two engine programs from the float graph: the float one (targets, block boundaries)
and the quantized one, with a ULQ quantizer (learnable clip_max / clip_min, ``fixed_min`` pinning
clip_min at 0) on every tensor a quantizer of the layout reads, and per weighted layer an AdaRound
(``ada``, and ``arq`` with its rounding frozen), ARQRetrain (``arq_retrain``) or LSQWeight
(``ulq_retrain``) operator. ``act_results`` / ``weight_results`` turn learned values back into
``ActQuantParams`` / ``WeightQuantParams`` with exactly the arithmetic the operators used, so the
lowered models compute what was trained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..autodiff import ULQ, AdaRound, ARQRetrain, FakeQuant, LSQWeight, Program, ulq_factors
from ..quant.math import arq
from ..quant.params import ActQuantParams, WeightQuantParams
from ..quant.weights import deconv_channel_view, deconv_from_channel_view, effective_weight, gemm_factors

__all__ = ["RetrainModel", "build"]

PREFIX = "amct_retrain"
ALPHA_START = 2.0


@dataclass
class _Weight:
    layer: Any
    algo: str
    params: WeightQuantParams
    alpha: float                    # Gemm alpha (the codes quantize alpha * B)
    op: Any = None
    names: tuple[str, ...] = ()     # learned tensors: alpha | weight | (weight, scale)
    frozen: Any = None              # arq: the fixed rounding variables
    plain: bool = False             # arq_retrain / ulq_retrain: the learned float weight goes back into the graph


@dataclass
class RetrainModel:
    float_program: Program
    quant_program: Program
    units: list[Any]
    fixed: dict[str, bool]
    params: dict[str, np.ndarray] = field(default_factory=dict)
    lrs: dict[str, float | np.ndarray] = field(default_factory=dict)   # a weight's: one per channel
    clips: list[Any] = field(default_factory=list)
    rounding: dict[str, AdaRound] = field(default_factory=dict)
    weights: dict[str, _Weight] = field(default_factory=dict)
    bias_names: dict[str, str] = field(default_factory=dict)   # layer -> bias constant learned

    @property
    def biases(self) -> int:
        return len(self.bias_names)

    # -- results ---------------------------------------------------------------------------------
    def act_results(self, learned: Mapping[str, np.ndarray], act_quant: dict[str, ActQuantParams],
                    tensor_quant: dict[str, ActQuantParams]):
        """(act_quant, tensor_quant) with every unit's learned clips as AMCT factors (layers of one
        unit share one object, as calibrate hands them)."""
        act_quant, tensor_quant = dict(act_quant), dict(tensor_quant)
        for index, unit in enumerate(self.units):
            high = learned.get(_clip_name(index, "max"))
            if high is None:
                continue
            low = 0.0 if self.fixed[unit.key] else float(learned[_clip_name(index, "min")].reshape(-1)[0])
            params = ulq_factors(float(high.reshape(-1)[0]), low, unit.params.num_bits)
            for name in unit.layers:
                act_quant[name] = params
            if not unit.layers:
                tensor_quant[unit.key] = params
        return act_quant, tensor_quant

    def weight_results(self, graph, learned: Mapping[str, np.ndarray]
                       ) -> tuple[dict[str, WeightQuantParams], dict[str, np.ndarray]]:
        """(weight_quant, the replaced constants' values before): codes from the learned values; learned
        biases and float weights are written into ``graph``."""
        out: dict[str, WeightQuantParams] = {}
        writes: dict[str, np.ndarray] = {}
        for name, w in self.weights.items():
            out[name] = _final_weight(w, learned)
            if w.plain:         # retrained float weights; codes and scales are in weight_quant either way
                writes[w.layer.weight] = learned[w.names[0]]
        writes.update({bias: learned[bias] for bias in self.bias_names.values()})
        tensors = graph.tensors()
        replaced = {name: np.array(tensors[name].values, copy=True) for name in writes}
        for name, values in writes.items():
            _set(tensors[name], values)
        return out, replaced


def _final_weight(w: _Weight, learned: Mapping[str, np.ndarray]) -> WeightQuantParams:
    layer, bits = w.layer, w.params.num_bits
    if w.algo in ("ada", "arq"):
        alpha = learned[w.names[0]] if w.names else w.frozen
        codes = w.op.codes(alpha)
        return WeightQuantParams(w.params.scale, codes.astype(np.int8 if bits <= 8 else np.int16), bits)
    if w.algo == "arq_retrain":
        weight = np.asarray(learned[w.names[0]], np.float32) * np.float32(w.alpha)
        group = layer.group if layer.op_type == "ConvTranspose" else 1
        axis = w.op.channel_axis
        got = arq(deconv_channel_view(weight, group), axis, bits)
        return WeightQuantParams(got.scale, deconv_from_channel_view(got.quantized, group), bits)
    weight, scale = learned[w.names[0]], np.asarray(learned[w.names[1]], np.float32).reshape(-1)
    view = w.op.view(np.asarray(weight, np.float32))
    codes = np.clip(np.rint(view / scale.reshape(w.op.scale_shape(view))), w.op.qmin, w.op.qmax)
    return WeightQuantParams((scale * np.float32(w.alpha)).astype(np.float32),
                             w.op.unview(codes).astype(np.int8 if bits <= 8 else np.int16), bits)


def _set(tensor: gs.Tensor, values: np.ndarray) -> None:
    tensor.values = np.require(np.asarray(values).astype(np.asarray(tensor.values).dtype), requirements="C")


def _clip_name(index: int, which: str) -> str:
    return f"{PREFIX}.{index}.clip_{which}"


# -- building ----------------------------------------------------------------------------------
def build(graph, layer_map, units: Sequence[Any], weights: Mapping[str, WeightQuantParams], settings,
          options, fixed: Mapping[str, bool], reference=None) -> RetrainModel:
    """The float and quantized programs and the initial learned values (see the module doc).

    ``settings``: layer -> object with ``wts_algo``; ``options``: learn_clips, learn_bias, lr_*;
    ``fixed``: unit key -> fixed_min; ``reference``: the graph of the float function the targets come
    from when it is not ``graph``'s (biases shifted by bias correction are the quantized model's start,
    not the float model's)."""
    quant_program = Program.from_graph(graph)
    float_program = quant_program.copy() if reference is None or reference is graph else Program.from_graph(reference)
    model = RetrainModel(float_program, quant_program, list(units), dict(fixed))
    # own (layer pair) quantizers first: a shared quantizer then rewires only the other readers
    for index in sorted(range(len(model.units)), key=lambda i: not model.units[i].own):
        _add_act(model, index, options)
    for layer in layer_map.layers():
        if layer.name in weights and layer.weight is not None:
            _add_weight(graph, model, layer, weights[layer.name], settings[layer.name].wts_algo, options)
            if options.learn_bias:
                _add_bias(graph, model, layer, weights[layer.name], options)
    return model


def _add_act(model: RetrainModel, index: int, options) -> None:
    from ..algorithms.reconstruct import ClipParam
    unit, program = model.units[index], model.quant_program
    fixed = model.fixed[unit.key]
    high, low = unit.params.clip_max, 0.0 if fixed else unit.params.clip_min
    skip = set(unit.float_readers)

    def consumers(tensor: str) -> list[str] | None:     # None: every reader
        if unit.own and tensor == unit.key:
            return list(unit.layers)
        return [n.name for n in program.nodes if tensor in n.inputs and n.name not in skip] if skip else None

    if not options.learn_clips:
        params = ulq_factors(high, low, unit.params.num_bits)
        for tensor in unit.tensors:
            program.insert(FakeQuant(params), [tensor], consumers=consumers(tensor))
        return
    names = [program.add_constant(_clip_name(index, "max"), np.array([high], np.float32))]
    if not fixed:
        names.append(program.add_constant(_clip_name(index, "min"), np.array([low], np.float32)))
    for tensor in unit.tensors:
        program.insert(ULQ(unit.params.num_bits, fixed), [tensor, *names], consumers=consumers(tensor))
    rate = options.lr_clip * max(abs(high), abs(low), 1e-6)
    for name in names:
        model.params[name] = program.constants[name]
        model.lrs[name] = rate
    model.clips.append(ClipParam(names[0], names[1] if len(names) > 1 else None, high, low))


def _plain_constant(graph, name: str | None, reader: str) -> bool:
    """A constant the layer alone reads directly (safe to learn and write back under its name)."""
    tensor = graph.tensors().get(name) if name else None
    return (isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1 and tensor.outputs[0].name == reader)


def _add_weight(graph, model: RetrainModel, layer, params: WeightQuantParams, algo: str, options) -> None:
    program = model.quant_program
    group = layer.group if layer.op_type == "ConvTranspose" else 1
    axis = layer.channel_axis if params.scale.size > 1 else None
    if layer.op_type in ("Gemm", "MatMul") and params.scale.size > 1:
        axis = _dense_axis(layer, params)
    alpha, _ = gemm_factors(graph, layer)
    weight = effective_weight(graph, layer)
    entry = _Weight(layer, algo, params, alpha)
    scale = np.asarray(params.scale, np.float32).reshape(-1)
    if algo in ("ada", "arq"):
        op = AdaRound(weight / np.float32(alpha), _channel(scale, weight, axis, group) / np.float32(alpha),
                      params.num_bits, axis, group)
        # start at h(alpha) = frac(w / s) (the soft weight equals the float one), on the side of the
        # given codes (round-to-nearest) where they differ (ties, codes from other scales)
        up = op.view(np.asarray(params.quantized, np.float32)) > op.floor
        start = op.unview(np.where(up, ALPHA_START, -ALPHA_START)).astype(np.float32)
        name = program.add_constant(f"{PREFIX}.{layer.name}.alpha", start)
        program.insert(op, [name], replaces=layer.weight, consumers=[layer.name])
        entry.op, entry.frozen = op, start
        if algo == "ada":
            entry.names = (name,)
            model.params[name] = program.constants[name]
            model.lrs[name] = options.lr_round
            model.rounding[name] = op
        else:
            op.hard = True               # round-to-nearest, nothing learned
    else:
        # a private copy of the weight as the layer applies it (a view chain folded), learned in float
        copy = program.add_constant(f"{PREFIX}.{layer.name}.weight", (weight / np.float32(alpha)).astype(np.float32))
        # Adam moves a variable by about its rate per step: each channel's rate is its own step's, so a
        # channel equalization scaled down (MobileNetV2's depthwise filters, by up to 16x) does not take
        # larger relative steps than its neighbours (W4A8 agreement 86.0% -> 92.0%)
        steps = _channel(np.asarray(scale, np.float32), weight, axis, group)
        if steps.ndim == weight.ndim and np.broadcast_shapes(steps.shape, weight.shape) == weight.shape:
            rate = (options.lr_weight * steps / np.float32(alpha)).astype(np.float32)
        else:                    # per tensor, or a grouped ConvTranspose's channel view: the mean step
            rate = options.lr_weight * float(np.mean(scale)) / alpha
        model.params[copy], model.lrs[copy] = program.constants[copy], rate
        entry.names = (copy,)
        entry.plain = _plain_constant(graph, layer.weight, layer.name) and weight_shape_matches(graph, layer, weight)
        if algo == "arq_retrain":
            op = ARQRetrain(params.num_bits, axis, group)
            program.insert(op, [copy], replaces=layer.weight, consumers=[layer.name])
        else:
            op = LSQWeight(params.num_bits, axis, group)
            s_name = program.add_constant(f"{PREFIX}.{layer.name}.scale",
                                          (scale / np.float32(alpha)).astype(np.float32))
            program.insert(op, [copy, s_name], replaces=layer.weight, consumers=[layer.name])
            model.params[s_name] = program.constants[s_name]
            # each scale learns relative to itself
            model.lrs[s_name] = np.float32(options.lr_scale) * np.abs(program.constants[s_name])
            entry.names = (copy, s_name)
        entry.op = op
    model.weights[layer.name] = entry


def weight_shape_matches(graph, layer, weight: np.ndarray) -> bool:
    return tuple(np.shape(graph.tensors()[layer.weight].values)) == tuple(weight.shape)


def _dense_axis(layer, params: WeightQuantParams) -> int | None:
    shape = params.quantized.shape
    if layer.op_type == "Gemm":
        return 0 if layer.transB else 1
    return len(shape) - 1


def _channel(scale: np.ndarray, weight: np.ndarray, axis: int | None, group: int) -> np.ndarray:
    """The scales in the channel view's broadcast shape."""
    if axis is None or scale.size == 1:
        return scale.reshape(())
    view = deconv_channel_view(weight, group) if group > 1 else weight
    return scale.reshape(tuple(-1 if i == axis % view.ndim else 1 for i in range(view.ndim)))


def _add_bias(graph, model: RetrainModel, layer, params: WeightQuantParams, options) -> None:
    bias = layer.bias
    if not _plain_constant(graph, bias, layer.bias_add or layer.name) or bias not in model.quant_program.constants:
        return
    weight = effective_weight(graph, layer)
    fan_in = weight.size / max(params.scale.size, 1) if params.scale.size > 1 else weight.size / max(
        np.asarray(graph.tensors()[bias].values).size, 1)
    unit = next((u for u in model.units if layer.name in u.layers), None)
    reach = unit.params.clip_max if unit is not None else 1.0
    _, beta = gemm_factors(graph, layer)
    rate = options.lr_bias * float(np.mean(params.scale)) * math.sqrt(fan_in) * reach / max(abs(beta), 1e-12)
    model.params[bias] = model.quant_program.constants[bias]
    model.lrs[bias] = rate
    model.bias_names[layer.name] = bias
