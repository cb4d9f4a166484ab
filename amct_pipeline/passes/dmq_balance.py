"""dmq_balance: AMCT's DMQ balancer (``quantize_preprocess``, SPEC 4.7), between match_layers and calibrate.

One streamed run of the float model over the calibration data (the calibrate pass's collector: one
batch in memory at a time, ``batch_num`` batches as calibration counts them) measures ``max |X_j|``
per input channel of every balanced layer; with ``max |W_j|`` of its weights that gives
``f_j = max|X_j|^a / max|W_j|^(1-a)``. The weights' input channels are multiplied by ``f`` and a
``Mul(1/f)`` is inserted before the layer (``quant.balance.apply_balance``): the float function is
unchanged, the layer's quantized input is now the Mul's output, so calibrate, the fake-quant, QDQ
and Ascend models all quantize the balanced activation. The factors go to artifact
``balance_factors`` (layer -> float32[Cin]); export_amct writes them to the record's
``tensor_balance_factor`` and load_record applies them again::

    fuse_bn,match_layers,dmq_balance{migration_strength=0.5},calibrate,quantize_weights,lower,export_amct
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from pydantic import Field, PositiveInt

from ..errors import CalibrationError, ConfigError, Problem
from ..options import Options, suggest
from .base import Pass, PassResult

__all__ = ["DmqBalancePass", "DmqBalanceOptions"]

WHERE = "pass 'dmq_balance'"


class DmqBalanceOptions(Options):
    dataset: str = Field("calib", description="Dataset whose batches measure the activation channel ranges.")
    migration_strength: float = Field(0.5, ge=0.2, le=0.8, description="AMCT's migration_strength a in "
                                      "f = max|X|^a / max|W|^(1-a): how much of the outliers moves into the weights.")
    layers: Optional[list[str]] = Field(None, description="Layers to balance. Default: those an AMCT config gives "
                                                          "dmq_balancer_param (with its strength) when it gives "
                                                          "any, else every matched Conv, ConvTranspose, Gemm "
                                                          "and MatMul layer.")
    record: Optional[str] = Field(
        None, description="Apply the tensor_balance_factor of this AMCT record (what quantize_preprocess's "
                          "calibration wrote) instead of measuring: no data is read.")
    batch_num: Optional[PositiveInt] = Field(
        None, description="Batches to measure on. Default: the AMCT config's batch_num when match_layers read "
                          "one, else every batch the dataset yields (as calibrate).")


class DmqBalancePass(Pass):
    name = "dmq_balance"
    summary = ("AMCT's DMQ balancer: per-input-channel factors from activation and weight ranges, folded into "
               "the weights with a Mul before each layer (artifact 'balance_factors').")
    Options = DmqBalanceOptions
    requires = frozenset({"layer_map"})
    produces = frozenset({"layer_map", "balance_factors"})
    references = {"dataset": "datasets"}
    reads = ("record",)

    def run(self, graph, ctx) -> PassResult:
        from ..quant.balance import apply_balance
        if "act_quant" in ctx.artifacts:
            raise ConfigError([Problem(WHERE, "", "the layers are already calibrated; balancing now would "
                                       "invalidate their ranges", "put dmq_balance before calibrate")])
        layer_map = ctx.artifacts["layer_map"]
        if self.options.record is not None:
            return self._from_record(graph, ctx, layer_map)
        layers = self._layers(layer_map)
        if not layers:
            ctx.artifacts["balance_factors"] = {}
            return PassResult(False, {"layers": 0})
        factors = self._factors(graph, ctx, layers)
        ctx.artifacts["layer_map"] = apply_balance(graph, layer_map, factors)
        ctx.artifacts["balance_factors"] = factors
        spread = [float(f.max() / f.min()) for f in factors.values()]
        return PassResult(True, {"layers": len(factors), "migration_strength": self.options.migration_strength,
                                 "largest_factor_spread": round(max(spread), 2)})

    def _from_record(self, graph, ctx, layer_map) -> PassResult:
        """The record's factors, folded in as measured ones would be (AMCT: quantize_model after
        quantize_preprocess)."""
        from ..amct import RecordError, read_record
        from ..quant.balance import apply_balance, record_factors
        source = str(self.options.record)
        try:
            record = read_record(source)
        except RecordError as exc:
            raise ConfigError([Problem(source, f"layer '{exc.layer}'" if exc.layer else "", exc.reason)]) from None
        unknown = [name for name in record if name not in layer_map]
        if unknown:
            raise ConfigError([Problem(source, f"layer '{unknown[0]}'", "is in the record but not a matched layer",
                                       suggest(unknown[0], list(layer_map)) or "the record does not belong to this model")])
        factors = record_factors(graph, record, layer_map, source)
        ctx.artifacts["layer_map"] = apply_balance(graph, layer_map, factors) if factors else layer_map
        ctx.artifacts["balance_factors"] = factors
        return PassResult(bool(factors), {"layers": len(factors), "from_record": True})

    def _layers(self, layer_map) -> list:
        from ..quant.balance import balance_problem
        if self.options.layers is None:
            configured = [layer for layer in layer_map.layers() if layer.options.get("dmq_balance")]
            return configured or [layer for layer in layer_map.layers() if balance_problem(layer) is None]
        chosen = []
        for index, name in enumerate(dict.fromkeys(self.options.layers)):
            path = f"layers[{index}]"
            if name not in layer_map:
                why = layer_map.skipped.get(name)
                raise ConfigError([Problem(WHERE, path, f"'{name}' is not a matched layer" +
                                           (f" ({why})" if why else ""),
                                           "" if why else suggest(name, list(layer_map)) or "")])
            problem = balance_problem(layer_map[name])
            if problem:
                raise ConfigError([Problem(WHERE, path, f"layer '{name}' cannot be balanced: {problem}")])
            chosen.append(layer_map[name])
        return chosen

    def _factors(self, graph, ctx, layers) -> dict[str, np.ndarray]:
        """Stream the data once, keep the running per-channel maxima, then SPEC 4.7's factors."""
        from ..quant.balance import balance_factors, in_channels, input_channel_max, weight_channel_max
        from ..quant.weights import weight_values
        from ..runtime.collector import collect
        weights = {layer.name: np.asarray(weight_values(graph, layer)) for layer in layers}
        peaks: dict[str, np.ndarray] = {}
        source = ctx.dataset(self.options.dataset)
        tensors = list(dict.fromkeys(layer.input for layer in layers))
        for acts in collect(graph, source, tensors, self._batch_num(ctx), progress=ctx.progress, desc="dmq_balance"):
            for layer in layers:
                peak = input_channel_max(layer, acts[layer.input])
                expected = in_channels(layer, weights[layer.name].shape)
                if peak.size != expected:
                    raise ConfigError([Problem(WHERE, f"layer '{layer.name}'", f"input '{layer.input}' has "
                                               f"{peak.size} channels but the weight expects {expected}")])
                if not np.all(np.isfinite(peak)):
                    raise CalibrationError(f"layer '{layer.name}': input activation '{layer.input}' has NaN or Inf "
                                           "values in the calibration data; check the data and the float model")
                peaks[layer.name] = np.maximum(peaks[layer.name], peak) if layer.name in peaks else peak
            del acts
        return {layer.name: balance_factors(peaks[layer.name], weight_channel_max(layer, weights[layer.name]),
                                            self._strength(layer)) for layer in layers}

    def _strength(self, layer) -> float:
        """The AMCT config's dmq_balancer_param for the layer, else the pass's migration_strength."""
        return float((layer.options.get("dmq_balance") or {}).get("migration_strength",
                                                                  self.options.migration_strength))

    def _batch_num(self, ctx) -> int | None:
        if self.options.batch_num is not None:
            return self.options.batch_num
        return getattr(ctx.artifacts.get("amct_config"), "batch_num", None)
