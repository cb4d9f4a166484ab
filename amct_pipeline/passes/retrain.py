"""retrain: AMCT's retrain simulation on ONNX, block by block against the float model (no labels).

Each quantized layer's input gets a ULQ quantizer whose clip_max / clip_min are learned (SPEC 4.9;
initialised from ``act_quant``, i.e. IFMR from ``calibrate``, unless the config gives them;
``fixed_min`` when the producer is a Relu, AMCT's rule), and its weight one of:

* ``arq_retrain`` (default, as in AMCT): the float weights learned through ARQ re-quantization at
  every step (straight-through);
* ``ada`` (AMCT's ADA, SPEC 4.8): ARQ's scales kept, each weight's rounding (down or up) learned
  (AdaRound, annealed to hard rounding);
* ``ulq_retrain``: the float weights and the per-channel scales learned (LSQ, SPEC 4.10);
* ``arq``: round-to-nearest with ARQ's scales, nothing learned.

Biases (plain constants of one layer) are learned too (``learn_bias``). The model is optimised block
by block (``algorithms.reconstruct``): a block's quantized copy, fed by the already retrained blocks,
learns to reproduce the float block's output on the dataset. The quantizers sit where the QDQ model
``lower{targets: [qdq]}`` puts them (``layout: qdq``, the default: data movement reads the quantized
copy, residual Adds too when ``tensor_quant`` quantizes their other input, and ``tensor_quant``'s block
outputs are learned too), or where the fake-quant and Ascend models do (``layout: fakequant``).

Settings per layer: the pass options (``wts_algo``, ``weight_bits``, ``act_bits``, ``channel_wise``),
then an AMCT retrain config (``config``: JSON from ``create_quant_retrain_config`` or the ``.cfg``
text; ``retrain_enable: false`` leaves a layer float), then ``layers: {name: {act: {...}, wts: {...}}}``
in AMCT spelling (act: clip_max, clip_min, fixed_min, dst_type; wts: algo, dst_type, channel_wise).
Every value is checked before any model runs (the JSON config and ``layers`` when the pipeline is
built; the ``.cfg``, which needs the layer types, against the input model before the first pass).

Produces what PTQ produces: ``act_quant`` (the learned clips as AMCT factors), ``tensor_quant``,
``weight_quant`` (the learned codes; INT4 codes in int8 arrays within [-8, 7]), ``quant_settings``;
learned biases and (``arq_retrain`` / ``ulq_retrain``) weights are written into the graph, so
``lower`` and ``export_amct`` run unchanged; their float values go to ``float_values``, so passes after
this one still measure against the float model (``float_reference``).
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError, Problem
from ..options import Options, suggest
from ..quant.params import ActQuantParams, WeightQuantParams
from ..quant.precision import layer_bits, precision_problems
from ..quant.weights import effective_weight
from .base import FLOAT_VALUES, Pass, PassResult, float_reference, keep_float_values

__all__ = ["RetrainPass", "RetrainOptions", "WTS_ALGOS"]

WHERE = "pass 'retrain'"
WTS_ALGOS = ("ada", "arq_retrain", "ulq_retrain", "arq")
ACT_ALGOS = ("ulq_quantize",)
WTS_BITS = {"INT4": 4, "INT8": 8}
ACT_BITS = {"INT8": 8, "INT16": 16}
ACT_KEYS = ("algo", "dst_type", "clip_max", "clip_min", "fixed_min")
WTS_KEYS = ("algo", "dst_type", "channel_wise")
LAYER_KEYS = ("retrain_enable", "act", "wts")
MAX_STEPS = 20000
MAX_SAMPLES = 4096
MAX_COPIES = 16


class Augment(Options):
    """Augmented copies of the training samples (4-D NCHW image inputs)."""

    copies: int = Field(1, ge=1, le=MAX_COPIES, description="Augmented copies per sample (time of the "
                                                              "per-block passes and memory grow with it).")
    flip: bool = Field(True, description="Mirror left-right with probability 1/2.")
    crop: float = Field(1.0, gt=0.05, le=1.0, description="Random crops of [crop, 1] of the image area resized "
                                                          "back (1: no crop).")


class RetrainOptions(Options):
    dataset: str = Field("calib", description="Dataset the model is retrained on (inputs only, no labels).")
    config: Optional[str] = Field(
        None, description="AMCT retrain config: the JSON create_quant_retrain_config writes, or the .cfg text "
                          "(per-layer retrain_enable, ULQ clips, arq_retrain / ulq_retrain, dst_type INT4 / INT8).")
    wts_algo: str = Field(
        "arq_retrain", description="Weights: arq_retrain (AMCT's default: the float weights learned through ARQ "
                                   "re-quantization at every step, straight-through), ada (learned rounding of "
                                   "ARQ-scaled weights), ulq_retrain (learned weights and scales), arq "
                                   "(round-to-nearest, nothing learned).")
    weight_bits: Literal[4, 8] = Field(8, description="Weight bits of layers match_layers gives no width "
                                                     "(INT4 codes are stored in int8 arrays within [-8, 7]).")
    act_bits: Optional[Literal[8, 16]] = Field(None, description="Activation bits; default: calibrate's per layer.")
    channel_wise: bool = Field(True, description="Per-channel weight scales for Conv / ConvTranspose.")
    layers: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per layer, AMCT spelling: {retrain_enable, act: {clip_max, clip_min, "
                                          "fixed_min, dst_type}, wts: {algo, dst_type, channel_wise}}.")
    layout: Literal["qdq", "fakequant"] = Field(
        "qdq", description="Where the quantizers sit while learning: as in the QDQ model (qdq) or as in the "
                           "fake-quant / Ascend models (fakequant).")
    learn_clips: bool = Field(True, description="Learn the activation clips (ULQ); false: keep the calibrated ones.")
    learn_bias: bool = Field(True, description="Learn the biases too (plain bias constants of one layer).")
    max_samples: int = Field(128, ge=1, le=MAX_SAMPLES, description="Samples of the dataset used (the first ones).")
    steps: int = Field(300, ge=0, le=MAX_STEPS, description="Optimiser steps per block (time grows linearly).")
    batch_size: int = Field(8, ge=1, le=256, description="Samples per step.")
    block_layers: int = Field(2, ge=1, le=64, description="At least this many layers per block (blocks end at "
                                                          "tensors that alone carry the model forward).")
    lr_clip: float = Field(2e-3, gt=0, le=1, description="Clip learning rate, relative to each clip.")
    lr_round: float = Field(1e-3, gt=0, le=10, description="AdaRound learning rate (Adam moves every variable by about this much per step, so larger rates flip roundings on noise).")
    lr_weight: float = Field(2e-3, gt=0, le=1, description="arq_retrain / ulq_retrain weight learning rate, "
                                                           "relative to the weight's quantization step.")
    lr_scale: float = Field(1e-3, gt=0, le=1, description="ulq_retrain scale learning rate, relative to the scale.")
    lr_bias: float = Field(1e-3, gt=0, le=1, description="Bias learning rate, relative to the layer's "
                                                         "weight step times sqrt(fan-in).")
    reg_weight: float = Field(0.1, ge=0, le=100, description="AdaRound rounding regulariser, relative to the "
                                                             "block's initial error.")
    qdrop: float = Field(0.0, ge=0, le=0.9, description="QDrop (Wei et al. 2022): probability that a training "
                                                        "forward keeps an activation element float instead of "
                                                        "fake-quantized (0: off; the paper's 0.5). Less overfitting "
                                                        "of few samples; evaluation always quantizes.")
    block_input: Literal["quantized", "float", "mixed"] = Field(
        "quantized", description="What a block trains on: the quantized model's inputs (learns to undo the error "
                                 "reaching it), the float model's (its own error only), or mixed (QDrop: each "
                                 "element the float one with probability qdrop).")
    augment: Optional[Augment] = Field(None, description="Train on the samples plus augmented copies "
                                                         "({copies, flip, crop}; NCHW image inputs; seeded).")
    holdout: float = Field(0.0, ge=0, le=0.5, description="Fraction of the samples held out (the last ones, at "
                                                          "least one; their augmented copies too): not trained on, "
                                                          "each block keeps the values (its start or a check every "
                                                          "25 steps) with the least error on them and stops early "
                                                          "on them (0: off).")
    average: float = Field(0.0, ge=0, lt=1, description="Polyak averaging: the values kept (and checked on the "
                                                       "held-out samples) are an exponential moving average of "
                                                       "the steps' values with this decay (0: off; e.g. 0.98).")
    patience: int = Field(4, ge=1, le=100, description="Early stop after this many checks (every 25 steps) "
                                                       "without a 1% lower error.")
    seed: Optional[int] = Field(None, description="Seed of the batch order (default: the run's seed).")
    spill_mb: int = Field(512, ge=1, le=1 << 20, description="A block's stored activations larger than this go "
                                                             "to memory-mapped files in the output folder.")

    @field_validator("wts_algo")
    @classmethod
    def _algo(cls, value: str) -> str:
        if value not in WTS_ALGOS:
            raise ValueError(f"unknown weight algorithm '{value}' ({suggest(value, WTS_ALGOS) or 'choose one of ' + ', '.join(WTS_ALGOS)})")
        return value

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        problems = []
        for name, entry in value.items():
            problems += check_layer_entry(name, entry)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @model_validator(mode="after")
    def _mixed_needs_qdrop(self) -> "RetrainOptions":
        if self.block_input == "mixed" and self.qdrop <= 0:
            raise ValueError("block_input 'mixed' takes the float input with probability qdrop: give qdrop > 0")
        return self

    @model_validator(mode="after")
    def _config_values(self) -> "RetrainOptions":
        """A JSON config's values are checked now, before any model runs (a .cfg needs the layer types)."""
        if self.config and not self.config.endswith(".cfg"):
            from ..amct.retrain_config import read_retrain_config
            try:
                read_retrain_config(self.config)
            except Exception as exc:      # AMCT config errors list every problem; keep the first line
                raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        return self


def check_layer_entry(name: str, entry: Any) -> list[str]:
    """Problems of one ``layers`` entry, each naming the layer and the field."""
    if not isinstance(entry, dict):
        return [f"layer '{name}': must be a mapping of {', '.join(LAYER_KEYS)}"]
    problems = [f"layer '{name}'.{k}: unknown key ({suggest(k, LAYER_KEYS) or 'keys: ' + ', '.join(LAYER_KEYS)})"
                for k in entry if k not in LAYER_KEYS]
    act, wts = entry.get("act") or {}, entry.get("wts") or {}
    problems += [f"layer '{name}'.act.{k}: unknown key" for k in act if k not in ACT_KEYS]
    problems += [f"layer '{name}'.wts.{k}: unknown key" for k in wts if k not in WTS_KEYS]
    problems += _act_problems(name, act) + _wts_problems(name, wts)
    return problems


def _act_problems(name: str, act: dict[str, Any]) -> list[str]:
    out = []
    if "algo" in act and act["algo"] not in ACT_ALGOS:
        out.append(f"layer '{name}'.act.algo: unknown algorithm '{act['algo']}' (activations: ulq_quantize)")
    if "dst_type" in act and act["dst_type"] not in ACT_BITS:
        out.append(f"layer '{name}'.act.dst_type: {act['dst_type']!s} activations are not supported "
                   "(INT8 or INT16; no target holds INT4 activations)")
    high, low = act.get("clip_max"), act.get("clip_min")
    if high is not None and not (_number(high) and math.isfinite(high) and high > 0):
        out.append(f"layer '{name}'.act.clip_max: must be a finite number > 0, got {high!r}")
    if low is not None and not (_number(low) and math.isfinite(low) and low < 0):
        out.append(f"layer '{name}'.act.clip_min: must be a finite number < 0, got {low!r}")
    if _number(high) and _number(low) and low >= high:
        out.append(f"layer '{name}'.act.clip_min: must be below clip_max ({low!r} >= {high!r})")
    if "fixed_min" in act and not isinstance(act["fixed_min"], bool):
        out.append(f"layer '{name}'.act.fixed_min: must be true or false, got {act['fixed_min']!r}")
    return out


def _wts_problems(name: str, wts: dict[str, Any]) -> list[str]:
    out = []
    if "algo" in wts and wts["algo"] not in WTS_ALGOS:
        hint = suggest(str(wts["algo"]), WTS_ALGOS) or "choose one of " + ", ".join(WTS_ALGOS)
        out.append(f"layer '{name}'.wts.algo: unknown weight algorithm '{wts['algo']}' ({hint})")
    if "dst_type" in wts and wts["dst_type"] not in WTS_BITS:
        out.append(f"layer '{name}'.wts.dst_type: {wts['dst_type']!s} weights are not supported (INT4 or INT8)")
    if "channel_wise" in wts and not isinstance(wts["channel_wise"], bool):
        out.append(f"layer '{name}'.wts.channel_wise: must be true or false, got {wts['channel_wise']!r}")
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class LayerSettings:
    enabled: bool
    act_bits: Optional[int]          # None: the calibrated width
    clip_max: Optional[float]
    clip_min: Optional[float]
    fixed_min: Optional[bool]
    wts_algo: str
    weight_bits: int
    channel_wise: bool


class RetrainPass(Pass):
    name = "retrain"
    summary = ("Retrain simulation: learn activation clips (ULQ) and weight rounding / weights block by block "
               "against the float model (updates 'act_quant', 'weight_quant' and the biases).")
    Options = RetrainOptions
    requires = frozenset({"layer_map", "act_quant"})
    produces = frozenset({"act_quant", "tensor_quant", "weight_quant", "quant_settings", FLOAT_VALUES})
    references = {"dataset": "datasets"}
    reads = ("config",)

    def check_model(self, graph, writes_files: bool) -> None:
        """A ``.cfg`` needs the layer types: its values are checked against the input model's layers."""
        if self.options.config and self.options.config.endswith(".cfg"):
            from ..amct.retrain_config import RETRAIN_TYPES
            self._settings({n.name: _GraphLayer(n.name, n.op, n.name if n.op in RETRAIN_TYPES else None, {})
                            for n in graph.gs.nodes if n.name and n.op in RETRAIN_TYPES + ("AveragePool",)})

    def run(self, graph, ctx) -> PassResult:
        layer_map = ctx.artifacts["layer_map"]
        settings = self._settings({layer.name: layer for layer in layer_map.layers()})
        act_quant = _initial_act(graph, layer_map, ctx.artifacts["act_quant"], settings)
        weights = _initial_weights(graph, layer_map, ctx.artifacts.get("weight_quant") or {}, settings)
        tensor_quant = dict(ctx.artifacts.get("tensor_quant") or {}) if self.options.layout == "qdq" else {}
        units = _units(graph, layer_map, act_quant, tensor_quant, self.options.layout)
        from ..algorithms.retrain_model import build
        fixed = {u.key: _unit_fixed_min(graph, u, settings) for u in units}
        model = build(graph, layer_map, units, weights, settings, self.options, fixed, float_reference(graph, ctx))
        data, micro = _samples(graph, ctx.dataset(self.options.dataset), self.options)
        originals = len(next(iter(data.values())))
        held = held_out_count(originals, self.options.holdout)
        if held and held >= originals:
            raise ConfigError([Problem(WHERE, "holdout", f"holding out {held} of the {originals} samples the "
                                       "dataset gives leaves none to train on", "give more samples or holdout: 0")])
        if self.options.augment is not None:
            data = _augmented(data, self.options.augment, self._seed(ctx))
        learned, reports, seconds = self._optimise(ctx, model, data, micro, originals, held)
        act_quant, tensor_quant = model.act_results(learned, act_quant, tensor_quant)
        weight_quant, replaced = model.weight_results(graph, learned)
        keep_float_values(ctx, replaced)
        ctx.artifacts["act_quant"] = act_quant
        if tensor_quant:
            ctx.artifacts["tensor_quant"] = tensor_quant
        ctx.artifacts["weight_quant"] = weight_quant
        quant_settings = ctx.artifacts.setdefault("quant_settings", {})
        for name in weight_quant:
            s = settings[name]
            layer = layer_map[name]
            if layer.weight is not None:
                quant_settings.setdefault(name, {})["wts"] = {
                    # the deploy-side names of AMCT's quant config: learned rounding is ADA, the rest ARQ codes
                    "algo": "ada" if s.wts_algo == "ada" else "arq", "num_bits": s.weight_bits,
                    "channel_wise": bool(s.channel_wise and layer.channel_axis is not None)}
        for name in list(quant_settings):
            if name in settings and not settings[name].enabled:
                del quant_settings[name]
        stats = _stats(reports, seconds, len(data[next(iter(data))]), model, settings)
        return PassResult(bool(replaced), stats, _report(reports))

    # -- settings --------------------------------------------------------------------------------
    def _settings(self, layer_map: dict[str, Any]) -> dict[str, LayerSettings]:
        o = self.options
        config = _read_config(o.config, layer_map) if o.config else None
        problems = [f"layer '{n}'" for n in o.layers if n not in layer_map]
        if problems:
            name = next(n for n in o.layers if n not in layer_map)
            raise ConfigError([Problem(WHERE, f"layers.{name}", "is not a matched layer",
                                       suggest(name, list(layer_map)) or "see `amct-pipeline inspect`")])
        out = {}
        for layer in layer_map.values():
            _, given_wts = layer_bits(layer.options)          # match_layers' precision / AMCT quant config
            s = LayerSettings(True, o.act_bits, None, None, None, o.wts_algo,
                              given_wts if given_wts in (4, 8) else o.weight_bits, o.channel_wise)
            entry = config.layers.get(layer.name) if config is not None else None
            if entry is not None:
                s.enabled = entry.retrain_enable
                s.act_bits = ACT_BITS.get(entry.act["dst_type"], 0) or _bad(layer.name, "act.dst_type",
                                                                            entry.act["dst_type"])
                s.clip_max, s.clip_min, s.fixed_min = entry.act["clip_max"], entry.act["clip_min"], entry.act["fixed_min"]
                s.wts_algo, s.weight_bits = entry.wts["algo"], WTS_BITS[entry.wts["dst_type"]]
                if entry.wts.get("channel_wise") is not None:
                    s.channel_wise = entry.wts["channel_wise"]
            _apply_entry(s, o.layers.get(layer.name) or {})
            if layer.weight is None and s.wts_algo != "arq":
                s.wts_algo = "arq"            # AveragePool: nothing to learn on the weight side
            problems = precision_problems(layer.op_type, s.act_bits, s.weight_bits if layer.weight is not None else None)
            if problems and s.enabled:
                side, message = problems[0]
                raise ConfigError([Problem(WHERE, f"layer '{layer.name}' ({layer.op_type}).{side}.dst_type", message)])
            out[layer.name] = s
        return out

    # -- optimisation ----------------------------------------------------------------------------
    def _seed(self, ctx) -> int:
        return int(self.options.seed if self.options.seed is not None else ctx.seed)

    def _optimise(self, ctx, model, data, micro, originals: int, held: int):
        from ..algorithms.reconstruct import ReconstructSettings, bar, reconstruct
        o = self.options
        seed = self._seed(ctx)
        directory = getattr(ctx.outputs, "directory", None)
        with tempfile.TemporaryDirectory(prefix=".amct-retrain-spill-",
                                         dir=str(directory) if directory is not None and Path(directory).is_dir()
                                         else None) as spill:
            settings = ReconstructSettings(
                steps=o.steps, batch_size=o.batch_size, micro_batch=micro, lr_clip=o.lr_clip, lr_round=o.lr_round,
                lr_weight=o.lr_weight, lr_scale=o.lr_scale, lr_bias=o.lr_bias, reg_weight=o.reg_weight, qdrop=o.qdrop, block_input=o.block_input,
                patience=o.patience, average=o.average, holdout=held, originals=originals,
                seed=int(seed), spill_bytes=o.spill_mb << 20, spill_dir=spill)
            blocks = model.float_program.blocks(o.block_layers)
            start = time.perf_counter()
            with bar(ctx.progress, o.steps * len(blocks), len(blocks)) as progress_bar:
                last = {"done": 0}

                def progress(block: int, step: int, steps: int) -> None:
                    if step == 0:
                        progress_bar.set_description(f"retrain block {block + 1}/{len(blocks)}")
                        last["done"] = 0
                    progress_bar.update(step - last["done"])
                    last["done"] = step

                learned, reports = reconstruct(model.float_program, model.quant_program, blocks, data,
                                               model.params, model.clips, model.rounding, model.lrs, settings,
                                               progress)
            return learned, reports, time.perf_counter() - start


def held_out_count(samples: int, fraction: float) -> int:
    """Samples held out: ``fraction`` of them, rounded, at least one when the fraction is not 0."""
    return max(1, int(round(fraction * samples))) if fraction > 0 else 0


def _bad(layer: str, field: str, value) -> int:
    raise ConfigError([Problem(WHERE, f"layer '{layer}'.{field}", f"{value} activations are not supported "
                               "(INT8 or INT16; no target holds INT4 activations)")])


def _apply_entry(s: LayerSettings, entry: dict[str, Any]) -> None:
    """A ``layers`` entry (already checked by the options model) over the settings."""
    if "retrain_enable" in entry:
        s.enabled = bool(entry["retrain_enable"])
    act, wts = entry.get("act") or {}, entry.get("wts") or {}
    if "dst_type" in act:
        s.act_bits = ACT_BITS[act["dst_type"]]
    s.clip_max = act.get("clip_max", s.clip_max)
    s.clip_min = act.get("clip_min", s.clip_min)
    s.fixed_min = act.get("fixed_min", s.fixed_min)
    s.wts_algo = wts.get("algo", s.wts_algo)
    if "dst_type" in wts:
        s.weight_bits = WTS_BITS[wts["dst_type"]]
    s.channel_wise = wts.get("channel_wise", s.channel_wise)


@dataclass(frozen=True)
class _GraphLayer:
    """What ``_settings`` reads of a matched layer, taken from the input model before match_layers ran."""
    name: str
    op_type: str
    weight: Any                      # anything but None: the layer has a weight
    options: Any


def _read_config(path: str, layer_map):
    """The AMCT retrain config, checked against the matched layers (one line per problem)."""
    from ..amct.retrain_config import parse_retrain_config, read_retrain_cfg
    from ..amct._common import load_json, read_text
    layers = {layer.name: layer.op_type for layer in layer_map.values()}
    if path.endswith(".cfg"):
        return read_retrain_cfg(path, layers)
    data = load_json(read_text(path), path)
    known = {k: v for k, v in data.items() if k in layers or not isinstance(v, dict)}
    unknown = [k for k, v in data.items() if isinstance(v, dict) and k not in layers]
    if unknown:
        raise ConfigError([Problem(path, unknown[0], "is not a matched layer of the model",
                                   suggest(unknown[0], list(layers)) or "see `amct-pipeline inspect`")])
    return parse_retrain_config(known, layers, source=path)


# -- initial factors ---------------------------------------------------------------------------
def _initial_act(graph, layer_map, act_quant, settings) -> dict[str, ActQuantParams]:
    """Per enabled layer: the config's clips, else the calibrated ones; layers reading one tensor
    with equal settings keep sharing one object (one quantizer)."""
    from ..autodiff import ulq_factors
    out: dict[str, ActQuantParams] = {}
    shared: dict[tuple, ActQuantParams] = {}
    for layer in layer_map.layers():
        s = settings[layer.name]
        params = act_quant.get(layer.name)
        if not s.enabled or params is None:
            continue
        fixed = _fixed_min(graph, layer.input) if s.fixed_min is None else s.fixed_min
        high = s.clip_max if s.clip_max is not None else params.clip_max
        low = 0.0 if fixed else (s.clip_min if s.clip_min is not None else params.clip_min)
        if not high > low:
            raise ConfigError([Problem(WHERE, f"layer '{layer.name}'.act", f"calibrated range [{low}, {high}] is "
                                       "empty; give clip_max / clip_min")])
        bits = s.act_bits or params.num_bits
        key = (layer.input, id(params), high, low, fixed, bits)
        if key not in shared:
            shared[key] = ulq_factors(max(high, 1e-6), min(low, 0.0), bits)
        out[layer.name] = shared[key]
    return out


def _unit_fixed_min(graph, unit, settings) -> bool:
    """A quantizer's fixed_min: its layers' setting, else AMCT's rule on the quantized tensor."""
    given = [settings[name].fixed_min for name in unit.layers if settings[name].fixed_min is not None]
    return given[0] if given else _fixed_min(graph, unit.key)


def _fixed_min(graph, tensor: str) -> bool:
    """AMCT's rule: clip_min is fixed at 0 when the layer's input comes from a Relu."""
    t = graph.tensors().get(tensor)
    producer = graph.producer(t) if t is not None else None
    return producer is not None and producer.op == "Relu"


def _initial_weights(graph, layer_map, weight_quant, settings) -> dict[str, WeightQuantParams]:
    """ARQ's round-to-nearest per enabled weighted layer at the layer's bits (``weight_quant``'s when it
    already has that layer at those bits and layout)."""
    from ..quant.math import arq
    from ..quant.weights import quantize_with_scale
    out = {}
    for layer in layer_map.layers():
        s = settings[layer.name]
        if not s.enabled:
            continue
        if layer.weight is None:
            out[layer.name] = weight_quant.get(layer.name) or _weightless()
            continue
        per_channel = s.channel_wise and layer.channel_axis is not None
        given = weight_quant.get(layer.name)
        if given is not None and given.num_bits == s.weight_bits and (given.scale.size > 1) == per_channel:
            out[layer.name] = given
            continue
        if s.weight_bits != 8 and layer.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            raise ConfigError([Problem(WHERE, f"layer '{layer.name}'.wts.dst_type",
                                       f"INT{s.weight_bits} weights are not supported for {layer.op_type} layers")])
        weight = effective_weight(graph, layer)
        if layer.op_type == "ConvTranspose" and layer.group > 1:
            from ..quant.weights import deconv_channel_view
            scale = arq(deconv_channel_view(weight, layer.group), 1 if per_channel else None, s.weight_bits).scale
        else:
            scale = arq(weight, layer.channel_axis if per_channel else None, s.weight_bits).scale
        out[layer.name] = quantize_with_scale(weight, scale, layer, s.weight_bits)
    return out


def _weightless() -> WeightQuantParams:
    from ..quant.params import weightless_params
    return weightless_params()


def _units(graph, layer_map, act_quant, tensor_quant, layout: str):
    """The activation quantizers: the QDQ model's (``quant.facts.qdq_quantizers``) or one per (layer
    input, params object) as the fake-quant model has them."""
    from ..quant.facts import Quantizer, qdq_quantizers
    layers = {layer.name: layer for layer in layer_map.layers() if layer.name in act_quant}
    if layout == "qdq":
        return qdq_quantizers(graph, layers, act_quant, tensor_quant)
    units: dict[tuple[str, int], list[str]] = {}
    for layer in layers.values():
        units.setdefault((layer.input, id(act_quant[layer.name])), []).append(layer.name)
    return [Quantizer(tensor, act_quant[names[0]], tuple(names), (tensor,), own=True)
            for (tensor, _), names in units.items()]


# -- samples -----------------------------------------------------------------------------------
def _samples(graph, source, options: RetrainOptions) -> tuple[dict[str, np.ndarray], int]:
    """The first ``max_samples`` samples per model input, and the samples per engine run (1 for a
    model with a fixed batch dimension)."""
    from ..errors import CalibrationError
    from ..runtime.collector import planned_batches
    plan = planned_batches(graph, source, None)
    fixed = any(i.fixed_batch for i in plan.inputs)
    parts: dict[str, list[np.ndarray]] = {}
    count = 0
    for feed in source.batches(plan.inputs):
        take = min(len(next(iter(feed.values()))), options.max_samples - count)
        for k, v in feed.items():
            parts.setdefault(k, []).append(np.asarray(v[:take]))
        count += take
        if count >= options.max_samples:
            break
    if not count:
        raise CalibrationError(f"dataset '{source.name}' yields no batch")
    data = {k: np.concatenate(v) for k, v in parts.items()}
    micro = (plan.inputs[0].fixed_batch or 1) if fixed else options.batch_size
    return data, micro


def _augmented(data: dict[str, np.ndarray], augment: Augment, seed: int) -> dict[str, np.ndarray]:
    """The samples and their augmented copies (``augment_images``); every input draws from the same
    seeded sequence, so image inputs of one size get the same flips and crops."""
    from ..algorithms.reconstruct import augment_images
    out = {}
    for name, x in data.items():
        if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
            raise ConfigError([Problem(WHERE, "augment", f"input '{name}' is {x.dtype} {list(x.shape)}, not a float "
                                       "NCHW image batch", "drop the augment option for this model")])
        out[name] = augment_images(x, augment.copies, augment.flip, augment.crop,
                                   np.random.default_rng([seed, 2]))
    return out


# -- report ------------------------------------------------------------------------------------
def _db(relative: float) -> float:
    return round(-10 * math.log10(relative), 2) if relative > 0 else float("inf")


def _stats(reports, seconds: float, samples: int, model, settings) -> dict[str, Any]:
    enabled = [n for n, s in settings.items() if s.enabled]
    algos: dict[str, int] = {}
    for name in enabled:
        algos[settings[name].wts_algo] = algos.get(settings[name].wts_algo, 0) + 1
    return {"layers": len(enabled), "float_layers": len(settings) - len(enabled), "blocks": len(reports),
            "samples": samples, "steps": sum(r.steps for r in reports), "seconds": round(seconds, 1),
            "weight_algorithms": algos, "clips": len(model.clips), "learned_biases": model.biases,
            "block_seconds": [round(r.seconds, 2) for r in reports],
            "block_db_before": [_db(r.loss_start) for r in reports],
            "block_db_after": [_db(r.loss_end) for r in reports],
            "nearest_fallbacks": sum(r.rounding == "nearest" for r in reports)}


def _report(reports) -> str:
    lines = ["| block | layers | output | steps | seconds | SQNR before dB | after dB | rounding |",
             "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r.index} | {r.layers} | {', '.join(r.outputs)[:40]} | {r.steps} | {r.seconds:.1f} | "
                     f"{_db(r.loss_start)} | {_db(r.loss_end)} | {r.rounding} |")
    return "\n".join(lines)
