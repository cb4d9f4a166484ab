"""calibrate: stream the calibration dataset through the float model and calibrate every layer input.

Produces ``act_quant``: ``{layer name: ActQuantParams}`` for every layer of the ``layer_map``. Each
layer's configuration is the pass's ``algorithm``/``algorithm_options``, overridden per layer by
``layer.options["calibrate"]`` (from match_layers ``overrides`` or an AMCT config file) with the keys
``algorithm``, ``algorithm_options`` and ``asymmetric``. Layers are grouped by their resolved
configuration, one calibrator instance per group; a tensor read by several layers of one group is
observed once and those layers share one ``ActQuantParams`` object.

With ``block_outputs`` it also calibrates, with the pass's calibrator, the tensors a QDQ model
quantizes beyond the layer inputs (layer outputs after a Relu/Clip, Add and pooling outputs; see
``quant.facts.extra_tensors``) and publishes them as ``tensor_quant`` (tensor name ->
ActQuantParams): the qdq target then fuses whole blocks into integer kernels and ``refine_ranges``
refines those ranges too, all from the same run of the model.

The model runs once per batch (one onnxruntime session, every needed tensor exposed) and each batch
is handed to the calibrators and dropped: memory does not grow with ``batch_num``.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
from pydantic import Field, PositiveInt

from ..errors import CalibrationError, ConfigError, Problem
from ..options import Options, parse_options, suggest
from ..quant.facts import activation_bounds, extra_tensors, output_tensors, propagate_factors
from .base import Pass, PassResult

__all__ = ["CalibratePass", "CalibrateOptions", "LAYER_KEYS", "resolve_layer_calibration"]

LAYER_KEYS = ("algorithm", "algorithm_options", "asymmetric")
WHERE = "pass 'calibrate'"


class CalibrateOptions(Options):
    algorithm: str = Field("ifmr", description="Activation calibrator (see `amct-pipeline list calibrators`); "
                                               "per-layer options.calibrate.algorithm overrides it.")
    algorithm_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the calibrator, e.g. {asymmetric: false} (AMCT activation_offset) or "
                    "{max_percentile: 0.99999}; checked before any model is loaded.")
    dataset: str = Field("calib", description="Name of the calibration dataset.")
    batch_num: Optional[PositiveInt] = Field(
        None, description="AMCT batch_num: batches to calibrate on. Default: the AMCT config's batch_num when "
                          "match_layers read one, else every batch the dataset yields.")
    fit_activation_bounds: bool = Field(
        True, description="Narrow a range reaching beyond the bounds of the Relu/Clip producing the tensor "
                          "(e.g. [0, 6.06] after Relu6) to those bounds: no value lies outside them, the grid gets "
                          "finer, and the QDQ model needs no integer Clip. false: the calibrator's ranges as they are.")
    block_outputs: bool = Field(
        False, description="Also calibrate the tensors a QDQ model quantizes beyond the layer inputs (layer "
                           "outputs, Add and pooling outputs) into artifact 'tensor_quant', so onnxruntime "
                           "fuses whole blocks and refine_ranges can refine them.")
    candidates: list[str] = Field(
        default_factory=list,
        description="More calibrators run on the same batches (one run of the model); their ranges of every "
                    "calibrated tensor go to artifact 'range_candidates' (tensor -> [the chosen range, then each "
                    "candidate's, in this order]), from which refine_ranges picks by the model's output error.")
    candidate_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Options per candidate calibrator, e.g. {percentile: {percentile: 99.99}}; asymmetric and "
                    "num_bits follow each tensor's own configuration.")


@dataclass
class _Group:
    """Layers sharing one calibrator configuration; ``tensors``: tensor -> layers reading it."""

    algorithm: str
    options: dict[str, Any]
    calibrator: Any = None
    tensors: dict[str, list[str]] = field(default_factory=dict)
    params: Optional[dict[str, Any]] = None       # the calibrator's result, once finalized
    candidates: list["_Group"] = field(default_factory=list)   # same tensors, other calibrators


class CalibratePass(Pass):
    name = "calibrate"
    summary = "Run the float model on the calibration data and calibrate each layer's input (artifact 'act_quant')."
    Options = CalibrateOptions
    requires = frozenset({"layer_map"})
    produces = frozenset({"act_quant", "tensor_quant"})
    references = {"algorithm": "calibrators", "dataset": "datasets", "candidates": "calibrators"}

    def produced(self, session) -> frozenset[str]:
        return self.produces | ({"range_candidates"} if self.options.candidates else set())

    def run(self, graph, ctx) -> PassResult:
        from ..runtime.collector import collect
        layer_map = ctx.artifacts["layer_map"]
        groups = _make_groups(ctx.session, layer_map, self.options)
        blocks = _block_groups(ctx.session, graph, layer_map, self.options) if self.options.block_outputs else []
        groups += blocks
        for group in groups:
            group.candidates = _candidate_groups(ctx.session, group, self.options)
        batch_num = self._batch_num(ctx)
        tensors = list(dict.fromkeys(t for g in groups for t in g.tensors))
        batches = 0
        if tensors:
            source = ctx.dataset(self.options.dataset)
            for acts in collect(graph, source, tensors, batch_num, progress=ctx.progress, desc="calibrate"):
                for group in groups:
                    for tensor, layers in group.tensors.items():
                        for member in (group, *group.candidates):
                            _observe(member, tensor, layers, acts[tensor], batches)
                batches += 1
                del acts
        if self.options.fit_activation_bounds:
            _fit_bounds(graph, groups + [c for g in groups for c in g.candidates])
        act_quant = _finalize(groups, layer_map)
        ctx.artifacts["act_quant"] = act_quant
        stats = _stats(self.options, [g for g in groups if not any(g is b for b in blocks)], act_quant, tensors,
                       batches)
        if blocks:
            ctx.artifacts["tensor_quant"] = {t: _finalize_group(b)[t] for b in blocks for t in b.tensors}
            stats["block_outputs"] = sum(len(b.tensors) for b in blocks)
        if self.options.candidates:
            ctx.artifacts["range_candidates"] = _range_candidates(groups)
        return PassResult(False, stats)

    def _batch_num(self, ctx) -> int | None:
        """Ours, else the AMCT config's (AMCT: batch_num batches, default 1), else all batches."""
        if self.options.batch_num is not None:
            return self.options.batch_num
        config = ctx.artifacts.get("amct_config")
        return getattr(config, "batch_num", None)


# -- configuration per layer -------------------------------------------------------------------
def resolve_layer_calibration(session, layer, options: CalibrateOptions) -> tuple[str, dict[str, Any]]:
    """(algorithm, validated calibrator options as a plain dict) for one layer."""
    per = layer.options.get("calibrate") or {}
    where = f"layer '{layer.name}'.options.calibrate"
    if not isinstance(per, Mapping):
        raise ConfigError([Problem(WHERE, where, f"must be a mapping of {', '.join(LAYER_KEYS)}")])
    for key in per:
        if key not in LAYER_KEYS:
            raise ConfigError([Problem(WHERE, f"{where}.{key}", "unknown key",
                                       suggest(key, LAYER_KEYS) or f"known keys: {', '.join(LAYER_KEYS)}")])
    return _resolve(session, per, options, where)


def _resolve(session, per: Mapping[str, Any], options: CalibrateOptions, where: str) -> tuple[str, dict[str, Any]]:
    """(algorithm, validated options) of the pass's configuration overridden by ``per``."""
    algorithm = per.get("algorithm", options.algorithm)
    registry = session.registry("calibrators")
    unknown = registry.unknown(algorithm, WHERE, f"{where}.algorithm")
    if unknown:
        raise ConfigError([unknown])
    cls = registry.get(algorithm)
    merged = _inherited(options, algorithm, cls)
    merged.update(per.get("algorithm_options") or {})
    if "asymmetric" in per:
        merged["asymmetric"] = per["asymmetric"]
    parsed, problems = parse_options(cls.Options, merged)
    if problems:
        raise ConfigError([Problem(WHERE, f"{where}.algorithm_options.{p.path}", f"{p.message} (calibrator "
                                   f"'{algorithm}')", p.hint) for p in problems])
    return algorithm, parsed.model_dump()


def _inherited(options: CalibrateOptions, algorithm: str, cls) -> dict[str, Any]:
    """The pass's algorithm_options; for a layer on another algorithm only the keys it accepts
    (asymmetric, num_bits, ...), so switching one layer to hfmg keeps the pipeline's asymmetry."""
    if algorithm == options.algorithm:
        return dict(options.algorithm_options)
    accepted = set(cls.Options.model_fields)
    return {k: v for k, v in options.algorithm_options.items() if k in accepted}


def _make_groups(session, layer_map, options: CalibrateOptions) -> list[_Group]:
    groups: dict[tuple[str, str], _Group] = {}
    for layer in layer_map.layers():
        algorithm, algo_options = resolve_layer_calibration(session, layer, options)
        key = (algorithm, json.dumps(algo_options, sort_keys=True, default=str))
        group = groups.get(key)
        if group is None:
            group = groups[key] = _new_group(session, algorithm, algo_options)
        group.tensors.setdefault(layer.input, []).append(layer.name)
    return list(groups.values())


def _new_group(session, algorithm: str, algo_options: dict[str, Any]) -> _Group:
    return _Group(algorithm, algo_options, session.make_algorithm("calibrators", algorithm, algo_options))


def _candidate_groups(session, group: _Group, options: CalibrateOptions) -> list[_Group]:
    """One group per candidate calibrator over the group's tensors, with the group's asymmetric and
    num_bits (a candidate equal to the group's own configuration is skipped)."""
    out = []
    for name in dict.fromkeys(options.candidates):
        algorithm, algo_options = _resolve(session, {"algorithm": name, "algorithm_options": {
            **(options.candidate_options.get(name) or {}),
            **{k: group.options[k] for k in ("asymmetric", "num_bits") if k in group.options}}},
            options.model_copy(update={"algorithm_options": {}}), f"candidates '{name}'")
        if (algorithm, algo_options) == (group.algorithm, group.options):
            continue
        out.append(_Group(algorithm, algo_options, session.make_algorithm("calibrators", algorithm, algo_options),
                          group.tensors))
    return out


def _range_candidates(groups: list[_Group]) -> dict[str, list[Any]]:
    """tensor -> [its chosen range, then each candidate calibrator's range, in the order of
    ``candidates``] (first group of a tensor wins; equal ranges are kept, so position k is always
    the k-th calibrator's)."""
    out: dict[str, list[Any]] = {}
    for group in groups:
        for tensor in group.tensors:
            if tensor not in out:
                out[tensor] = [_finalize_group(member)[tensor] for member in (group, *group.candidates)]
    return out


def _block_groups(session, graph, layer_map, options: CalibrateOptions) -> list[_Group]:
    """The pass's own calibrator over the block outputs a QDQ layout quantizes (no layers read them
    as a layer input; ``tensors`` maps each to an empty layer list), and ``minmax`` (with the pass's
    asymmetric / num_bits) over those that are model outputs (``quant.facts.output_tensors``)."""
    group = _new_group(session, *_resolve(session, {}, options, "calibrate"))
    covered = {layer.input: None for layer in layer_map.layers()}
    propagate_factors(graph, covered)
    names = extra_tensors(graph, layer_map, covered)
    outputs = set(output_tensors(graph, layer_map, names))
    group.tensors = {name: [] for name in names if name not in outputs}
    if not outputs:
        return [group]
    keep = {k: group.options[k] for k in ("asymmetric", "num_bits") if k in group.options}
    whole = _new_group(session, *_resolve(session, {"algorithm": "minmax", "algorithm_options": keep},
                                          options.model_copy(update={"algorithm_options": {}}), "calibrate"))
    whole.tensors = {name: [] for name in names if name in outputs}
    return [group, whole] if group.tensors else [whole]


# -- observing and finalizing ------------------------------------------------------------------
def _layers_text(layers: list[str]) -> str:
    if not layers:
        return "block output"
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(f"'{n}'" for n in layers)


def _observe(group: _Group, tensor: str, layers: list[str], batch: np.ndarray, index: int) -> None:
    try:
        group.calibrator.observe(tensor, batch)
    except ValueError as exc:
        if not np.isfinite(batch).all():
            raise CalibrationError(f"{_layers_text(layers)}: input activation '{tensor}' has NaN or Inf values "
                                   f"in calibration batch {index}; check the data and the float model") from None
        raise CalibrationError(f"{_layers_text(layers)}: calibrator '{group.algorithm}' failed on input "
                               f"'{tensor}' (batch {index}): {exc}") from exc


_TENSOR_IN_MESSAGE = re.compile(r"tensor '([^']*)'")


def _finalize_group(group: _Group) -> dict[str, Any]:
    """The group's factors per tensor (computed once; warnings re-issued naming the layers)."""
    if group.params is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                group.params = group.calibrator.finalize()
            except ValueError as exc:
                raise CalibrationError(f"calibrator '{group.algorithm}' failed: {exc}") from exc
        _rewarn(caught, group)
    return group.params


def _fit_bounds(graph, groups: list[_Group]) -> None:
    """Narrow each tensor's range to the bounds of the Relu/Clip producing it (in the groups' params)."""
    from ..quant.math import scale_offset_from_range
    tensors = graph.tensors()
    for group in groups:
        params = _finalize_group(group)
        symmetric = not group.options.get("asymmetric", True)
        for name in group.tensors:
            producer = graph.producer(tensors[name]) if name in tensors else None
            p = params.get(name)
            if p is None or producer is None or producer.op not in ("Relu", "Clip"):
                continue
            low, high = activation_bounds(graph, producer)
            if low is None:
                continue
            slack = 1e-6 * max(abs(p.clip_max), abs(p.clip_min))     # float32 scale rounding is not "wider"
            if p.clip_max > high + slack or (not symmetric and p.clip_min < min(low, 0.0) - slack):
                top = min(p.clip_max, high)
                bottom = -top if symmetric else max(p.clip_min, min(low, 0.0))
                params[name] = scale_offset_from_range(bottom, top, p.num_bits, symmetric)


def _finalize(groups: list[_Group], layer_map) -> dict[str, Any]:
    by_layer: dict[str, Any] = {}
    for group in groups:
        params = _finalize_group(group)
        for tensor, layers in group.tensors.items():
            if tensor not in params:
                raise CalibrationError(f"{_layers_text(layers)}: calibrator '{group.algorithm}' returned no "
                                       f"factors for input '{tensor}'")
            for name in layers:
                by_layer[name] = params[tensor]   # the same object for layers sharing the tensor
    return {name: by_layer[name] for name in layer_map if name in by_layer}


def _rewarn(caught, group: _Group) -> None:
    """Calibrators warn about tensors; users think in layers, so name them."""
    for w in caught:
        text = str(w.message)
        match = _TENSOR_IN_MESSAGE.search(text)
        layers = group.tensors.get(match.group(1)) if match else None
        if layers:
            text = f"{_layers_text(layers)}: {text}"
        warnings.warn(text, w.category if issubclass(w.category, Warning) else RuntimeWarning, stacklevel=4)


def _stats(options: CalibrateOptions, groups: list[_Group], act_quant, tensors: list[str], batches: int):
    stats: dict[str, Any] = {"layers": len(act_quant), "tensors": len(tensors), "batches": batches,
                             "algorithm": options.algorithm}
    algorithms: dict[str, int] = {}
    for group in groups:
        algorithms[group.algorithm] = algorithms.get(group.algorithm, 0) + sum(map(len, group.tensors.values()))
    if len(groups) > 1:
        stats["calibrations"] = sum(len(g.tensors) for g in groups)
        stats["algorithms"] = algorithms
    return stats
