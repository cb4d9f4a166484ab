"""quantize_weights: quantize every matched layer's constant weight offline (artifact ``weight_quant``).

The float graph is not modified: lowering targets place the integer weights later. Per-layer settings
come from ``match_layers`` (overrides or an AMCT config) as ``options: {quantize_weights: {algorithm:
arq, algorithm_options: {num_bits: 7}}}``, the algorithm's options also accepted flattened beside
``algorithm`` (``{channel_wise: false, num_bits: 8}``); they override the pass-level ``algorithm`` /
``algorithm_options`` key by key. AveragePool layers get ``scale_w = [1.0]`` (SPEC 5.3).

Besides ``weight_quant`` (layer -> WeightQuantParams) the pass records the settings it used per layer
in ``ctx.artifacts["quant_settings"][layer]["wts"]`` (AMCT config spelling: algo, num_bits,
channel_wise), which ``export_amct`` writes into AMCT's JSON quant config.

``bias_correction: true`` then measures, on the calibration data, the mean output shift each layer's
quantized weights cause (with ``bias_correction_input: quantized`` also its quantized input, from
``act_quant``) and subtracts it from the layer's bias in the graph
(``algorithms.weights.bias_correction``): one more run of the model, and the only case in which this
pass changes the graph. ``bias_correction_input: sequential`` fits the shifts in topological order in
the quantized model as ``lower`` writes it (``quant.emulate``; QDQ layout when ``tensor_quant``
exists), one sweep of the numpy engine.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Mapping, Optional

import numpy as np
from pydantic import Field, PositiveInt

from ..algorithms.base import WeightQuantParams
from ..errors import ConfigError, Problem
from ..options import Options, parse_options
from ..quant.params import weightless_params
from ..quant.weights import deconv_channel_view, deconv_from_channel_view, effective_weight
from .base import FLOAT_VALUES, Pass, PassResult, keep_float_values

__all__ = ["QuantizeWeightsPass", "QuantizeWeightsOptions", "PER_TENSOR_TYPES"]

PER_TENSOR_TYPES = ("Gemm", "MatMul")
WHERE = "pass 'quantize_weights'"


class QuantizeWeightsOptions(Options):
    algorithm: str = Field("arq", description="Weight quantizer (see `amct-pipeline list quantizers`).")
    algorithm_options: dict[str, Any] = Field(default_factory=dict,
                                              description="Options of the weight quantizer, e.g. {channel_wise: true}.")
    bias_correction: bool = Field(
        False, description="Subtract from each layer's bias the mean output shift its quantization causes on the "
                           "calibration data (quantized weights, and the quantized input when 'act_quant' exists).")
    bias_correction_input: Literal["float", "quantized", "sequential"] = Field(
        "float", description="Input of the measured layer: 'float' (the shift of the weights' rounding alone), "
                             "'quantized' (also the input's quantization, from 'act_quant', each layer on its own: "
                             "hurt MobileNetV2, 20.4 -> 14.1 dB) or 'sequential' (the quantized model's own input, "
                             "every upstream layer already corrected: the activations' clipping shifts too; needs "
                             "'act_quant', runs the quantized model once on max_samples in the numpy engine; "
                             "held-out output SQNR: MobileNetV2 23.2 -> 18.1 dB; ResNet-8 22.3 -> 22.6 dB on 96 samples).")
    dataset: Optional[str] = Field(None, description="Dataset for bias_correction (default 'calib').")
    batch_num: Optional[PositiveInt] = Field(None, description="Batches bias_correction measures on (default: all).")
    max_samples: Optional[PositiveInt] = Field(
        None, le=1_000_000, description="bias_correction with a float input stops after the batch that reaches this "
                                        "many samples (default: no limit); 'sequential' measures on at most this many "
                                        "(default 16).")


class QuantizeWeightsPass(Pass):
    name = "quantize_weights"
    summary = "Quantize the weights of every matched layer offline (artifact 'weight_quant'); the graph is unchanged."
    Options = QuantizeWeightsOptions
    requires = frozenset({"layer_map"})
    produces = frozenset({"weight_quant", "quant_settings"})
    references = {"algorithm": "weight_quantizers", "dataset": "datasets"}

    def produced(self, session) -> frozenset[str]:
        """Bias correction also keeps the biases it shifts (``float_values``, read by ``float_reference``)."""
        return self.produces | ({FLOAT_VALUES} if self.options.bias_correction else set())

    def run(self, graph, ctx) -> PassResult:
        layer_map = ctx.artifacts["layer_map"]
        quantizers: dict[str, Any] = {}
        results: dict[str, WeightQuantParams] = {}
        settings = ctx.artifacts.setdefault("quant_settings", {})
        per_channel = 0
        for layer in layer_map.layers():
            if layer.weight is None:
                results[layer.name] = weightless_params()
                continue
            name, options = self._layer_settings(layer)
            quantizer = self._quantizer(ctx, quantizers, layer, name, options)
            params = _quantize(quantizer, effective_weight(graph, layer), layer)
            results[layer.name] = params
            per_channel += params.scale.size > 1
            settings.setdefault(layer.name, {})["wts"] = _settings_record(quantizer, params, layer)
        ctx.artifacts["weight_quant"] = results
        weighted = sum(1 for layer in layer_map.layers() if layer.weight is not None)
        stats = {"layers": weighted, "per_channel": per_channel, "weightless": len(results) - weighted}
        modified = False
        if self.options.bias_correction:
            corrected = self._correct_biases(graph, ctx, layer_map, results)
            modified = corrected["corrected"] > 0
            keep_float_values(ctx, corrected["originals"])
            stats["bias_corrected"] = corrected["corrected"]
            stats["bias_largest_shift"] = corrected["largest_shift"]
            if corrected["skipped"]:
                stats["bias_not_corrected"] = corrected["skipped"]
        return PassResult(modified, stats)

    def _correct_biases(self, graph, ctx, layer_map, weight_quant) -> dict[str, Any]:
        from ..algorithms.weights.bias_correction import apply_shifts, bias_shifts, linear_input
        from ..runtime.collector import collect
        from ..runtime.data import model_inputs
        source = ctx.dataset(self.options.dataset or "calib")
        first = model_inputs(graph)[0].name

        def batches(model, fetch):
            for got in collect(graph, source, [*fetch, first], self.options.batch_num, model=model,
                               progress=ctx.progress, desc="bias_correction"):
                yield got, len(got[first])

        layers = [layer for layer in layer_map.layers() if layer.weight is not None]
        if self.options.bias_correction_input == "sequential":
            return self._sequential(graph, ctx, layer_map, layers, weight_quant)
        quantized = self.options.bias_correction_input == "quantized"
        linear = [] if quantized else [layer for layer in layers if linear_input(graph, layer)]
        shifts = self._linear_shifts(graph, ctx, linear, weight_quant) if linear else {}
        rest = [layer for layer in layers if layer.name not in shifts]
        skipped: dict[str, str] = {}
        if rest:
            act_quant = ctx.artifacts.get("act_quant") if quantized else None
            more, skipped = bias_shifts(graph, rest, weight_quant, act_quant, batches)
            shifts.update(more)
        stats = apply_shifts(graph, {layer.name: layer for layer in layers}, shifts)
        stats["skipped"].update(skipped)
        return stats

    def _sequential(self, graph, ctx, layer_map, layers, weight_quant) -> dict[str, Any]:
        """Correct in the quantized model as ``lower`` will write it (QDQ layout when 'tensor_quant' exists)."""
        from ..algorithms.weights.bias_correction import apply_shifts, sequential_shifts
        from ..autodiff import AutodiffError
        from ..quant.emulate import eval_graph, factor_feed, layer_units, qdq_units
        act_quant = ctx.artifacts.get("act_quant")
        if act_quant is None:
            raise ConfigError([Problem(WHERE, "bias_correction_input", "'sequential' corrects the quantized model "
                                       "and needs activation ranges ('act_quant')", "run 'calibrate' before "
                                       "'quantize_weights', or use bias_correction_input: float")])
        blocks = ctx.artifacts.get("tensor_quant")
        units = qdq_units(graph, layer_map, act_quant, blocks) if blocks is not None else \
            layer_units(layer_map, act_quant)
        fixed: dict[str, np.ndarray] = {}
        for unit in units:
            unit.chain = True          # the engine runs AMCT's float chain, the same codes as Q/DQ
            fixed.update(factor_feed(unit, unit.params))
        model = eval_graph(graph, layer_map, weight_quant, units, where=WHERE)
        feeds = _first_samples(graph, ctx.dataset(self.options.dataset or "calib"), self.options.max_samples or 16)
        try:
            shifts, skipped = sequential_shifts(graph, model, layers, feeds, fixed)
        except AutodiffError as exc:
            raise ConfigError([Problem(WHERE, "bias_correction_input", f"'sequential' runs the model in the numpy "
                                       f"engine: {exc}", "use bias_correction_input: float")]) from None
        stats = apply_shifts(graph, {layer.name: layer for layer in layers}, shifts)
        stats["skipped"].update(skipped)
        return stats

    def _linear_shifts(self, graph, ctx, layers, weight_quant) -> dict[str, Any]:
        """Float-input shifts from the layer inputs' means: one run of the float model, no layer copies."""
        from ..algorithms.weights.bias_correction import InputMeans, linear_bias_shifts
        from ..runtime.collector import collect
        means: dict[str, InputMeans] = {}
        for layer in layers:       # a tensor read by a Conv and a Gemm: the Gemm goes the general way
            means.setdefault(layer.input, InputMeans(layer.op_type))
        layers = [layer for layer in layers if (means[layer.input].op_type == "Conv") == (layer.op_type == "Conv")]
        source = ctx.dataset(self.options.dataset or "calib")
        samples, limit = 0, self.options.max_samples
        for got in collect(graph, source, list(means), self.options.batch_num, progress=ctx.progress,
                           desc="bias_correction"):
            for name, stats in means.items():
                stats.add(got[name])
            samples += len(got[next(iter(means))])
            if limit is not None and samples >= limit:
                break
        return linear_bias_shifts(graph, layers, weight_quant, means)

    # -- per-layer settings ---------------------------------------------------------------------
    def _layer_settings(self, layer) -> tuple[str, dict[str, Any]]:
        """(algorithm, options): the layer override wins key by key over the pass options."""
        override = layer.options.get("quantize_weights") or {}
        if not isinstance(override, Mapping):
            raise ConfigError([Problem(WHERE, f"layer '{layer.name}'", "per-layer 'quantize_weights' options "
                                       f"must be a mapping, got {override!r}")])
        override = dict(override)
        layer_keys = set(override) | set(override.get("algorithm_options") or {})
        name = override.pop("algorithm", self.options.algorithm)
        options = dict(self.options.algorithm_options) if name == self.options.algorithm else {}
        options.update(override.pop("algorithm_options", None) or {})
        options.update(override)           # flattened keys (AMCT configs give channel_wise, num_bits)
        # AMCT: channel_wise on a Gemm/MatMul layer is an error, not silently ignored. A pass-wide
        # channel_wise only means "per channel where the op allows it".
        if options.get("channel_wise") and "channel_wise" in layer_keys and layer.op_type in PER_TENSOR_TYPES:
            raise ConfigError([Problem(WHERE, f"layer '{layer.name}'", f"channel_wise is not supported for "
                                       f"{layer.op_type} layers", "only Conv and ConvTranspose weights can be "
                                       "quantized per channel; set channel_wise false for this layer")])
        return name, options

    def _quantizer(self, ctx, cache: dict[str, Any], layer, name: str, options: dict[str, Any]):
        key = json.dumps([name, options], sort_keys=True, default=str)
        if key in cache:
            return cache[key]
        registry = ctx.session.registry("weight_quantizers")
        unknown = registry.unknown(name, WHERE, f"layer '{layer.name}'")
        if unknown:
            raise ConfigError([unknown])
        cls = registry.get(name)
        parsed, problems = parse_options(cls.Options, options)
        if problems:
            raise ConfigError([Problem(WHERE, f"layer '{layer.name}'.{p.path}", f"{p.message} (weight quantizer "
                                       f"'{name}')", p.hint) for p in problems])
        cache[key] = cls(parsed)
        return cache[key]


def _first_samples(graph, source, limit: int) -> list[dict[str, np.ndarray]]:
    """The dataset's first batches up to ``limit`` samples (the last one cut where the batch is free)."""
    from ..runtime.collector import planned_batches
    plan = planned_batches(graph, source, None)
    fixed = any(i.fixed_batch for i in plan.inputs)
    feeds, seen = [], 0
    for feed in source.batches(plan.inputs):
        size = len(next(iter(feed.values())))
        if seen + size > limit and not fixed:
            feed = {k: v[:limit - seen] for k, v in feed.items()}
            size = limit - seen
        feeds.append(feed)
        seen += size
        if seen >= limit:
            break
    if not feeds:
        raise ConfigError([Problem(WHERE, "dataset", f"dataset '{source.name}' yields no batch")])
    return feeds


def _quantize(quantizer, weight: np.ndarray, layer) -> WeightQuantParams:
    """Run the quantizer on the layer's weight (grouped ConvTranspose as a Cout-on-axis-1 view)."""
    regroup = layer.op_type == "ConvTranspose" and layer.group > 1
    view = deconv_channel_view(weight, layer.group) if regroup else weight
    try:
        params = quantizer.quantize(view, op_type=layer.op_type, channel_axis=layer.channel_axis)
    except ValueError as exc:
        raise ConfigError([Problem(WHERE, f"layer '{layer.name}'", str(exc))]) from None
    _check_result(quantizer, params, view, layer)
    if regroup:
        params = WeightQuantParams(params.scale, deconv_from_channel_view(params.quantized, layer.group),
                                   params.num_bits)
    return params


def _check_result(quantizer, params: WeightQuantParams, weight: np.ndarray, layer) -> None:
    """A plugin quantizer must return codes shaped like the weight and 1 or Cout finite scales."""
    scale = np.asarray(params.scale)
    problem = None
    if tuple(params.quantized.shape) != tuple(weight.shape):
        problem = f"codes of shape {tuple(params.quantized.shape)} for a weight of shape {tuple(weight.shape)}"
    elif scale.ndim != 1 or scale.size not in (1, layer.out_channels):
        problem = f"{scale.size} scales; expected 1 or {layer.out_channels}"
    elif not (np.isfinite(scale).all() and (scale > 0).all()):
        problem = "a scale that is not finite and > 0"
    if problem:
        raise ConfigError([Problem(WHERE, f"layer '{layer.name}'",
                                   f"weight quantizer '{quantizer.name}' returned {problem}")])


def _settings_record(quantizer, params: WeightQuantParams, layer) -> dict[str, Any]:
    per_channel = getattr(quantizer.options, "channel_wise", params.scale.size > 1)
    return {"algo": quantizer.name, "num_bits": int(params.num_bits),
            "channel_wise": bool(per_channel and layer.channel_axis is not None)}
