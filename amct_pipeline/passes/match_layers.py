"""match_layers: find the quantizable layers (SPEC 6.1) and resolve per-layer user intent.

Produces the ``layer_map`` artifact: a :class:`LayerMap` (graph order, name -> :class:`QuantLayer`)
whose ``skipped`` mapping gives the reason for every candidate node that was not matched. The graph is
never modified.

Weights must be constant: an initializer or a Constant node, optionally seen through a chain of
view ops (Identity/Transpose/Reshape/Flatten/Squeeze/Unsqueeze with constant shape inputs, as in
mnist-8's ``Reshape(Parameter193)``). :func:`weight_values` evaluates such a chain.

``amct_config`` takes an AMCT quant config (JSON from ``amct-pipeline config create`` or a simplified
``.cfg``; a relative path resolves against the current working directory): layers with
``quant_enable: false`` (or in the .cfg's skip lists) are skipped, layers a JSON file does not list
are skipped, and each quantized layer gets ``options["calibrate"] = {"algorithm": "ifmr"|"hfmg",
"algorithm_options": {AMCT's option names}}`` and ``options["quantize_weights"] = {"channel_wise",
"num_bits"}``; ``overrides`` still apply on top. The parsed ``QuantConfig`` becomes the
``amct_config`` artifact (calibrate takes its ``batch_num``).

``precision`` sets bit widths per layer name or op type (a name wins over its op type) on top of
both: ``{conv1: {act: 16}, Gemm: {wts: 4}, fc: float}``; ``float`` leaves the layer unquantized. Every
matched layer's resulting precision is checked here (``quant.precision``, AMCT's rules), so a bad one
is a one-line error naming the layer and field before calibration runs the model.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional, Union

import onnx_graphsurgeon as gs
from pydantic import Field, field_validator, model_validator

from ..amct.model_config import read_amct_config
from ..errors import ConfigError, Problem
from ..options import Options, suggest
from ..quant.layers import SUPPORTED_OP_TYPES, LayerMap, QuantLayer, match_layer
from ..quant.precision import FLOAT, layer_bits, precision_options, precision_problems
from .base import Pass, PassResult

__all__ = [
    "MatchLayersPass",
    "MatchLayersOptions",
    "LayerOverride",
    "LayerMatch",
    "LayerPrecision",
    "amct_layer_options",
]

WHERE = "pass 'match_layers'"


# -- options -----------------------------------------------------------------------------------
def _check_op_types(values: list[str]) -> list[str]:
    for value in values:
        if value not in SUPPORTED_OP_TYPES:
            hint = suggest(value, SUPPORTED_OP_TYPES) or f"supported: {', '.join(SUPPORTED_OP_TYPES)}"
            raise ValueError(f"'{value}' is not a quantizable op type; {hint}")
    return values


class LayerMatch(Options):
    """Which layers an override applies to: exactly one of the three keys."""

    name: Optional[str] = Field(None, description="A layer (node) name; must exist in the model.")
    op_type: Optional[str] = Field(None, description="Every layer of this op type.")
    name_regex: Optional[str] = Field(None, description="Layers whose name fully matches this regular expression.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "LayerMatch":
        given = [k for k in ("name", "op_type", "name_regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of name, op_type, name_regex (got {', '.join(given) or 'none'})")
        if self.op_type is not None:
            _check_op_types([self.op_type])
        if self.name_regex is not None:
            try:
                re.compile(self.name_regex)
            except re.error as exc:
                raise ValueError(f"name_regex {self.name_regex!r} is not a regular expression: {exc}") from None
        return self

    def matches(self, layer_name: str, op_type: str) -> bool:
        if self.name is not None:
            return layer_name == self.name
        if self.op_type is not None:
            return op_type == self.op_type
        return re.fullmatch(self.name_regex, layer_name) is not None


class LayerOverride(Options):
    """Per-layer intent (AMCT override_layer_configs / override_layer_types); later entries win."""

    match: LayerMatch = Field(description="Which layers: {name|op_type|name_regex: ...}.")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="Per-layer options for later passes, e.g. {calibrate: {...}}; "
                                                "merged key by key, later overrides win.")
    skip: bool = Field(False, description="Do not quantize the matched layers (an explicit false un-skips).")


class LayerPrecision(Options):
    """Bit widths of one layer (or op type); an absent side keeps its configured width."""

    act: Optional[int] = Field(None, description="Activation bits: 8 or 16 (16 on Conv, ConvTranspose, Gemm).")
    wts: Optional[int] = Field(None, description="Weight bits: 8 or 4 (6 or 7 on Conv).")


class MatchLayersOptions(Options):
    skip_layers: list[str] = Field(default_factory=list,
                                   description="AMCT 'skip_layers': layer names not to quantize (must exist).")
    skip_layer_types: list[str] = Field(default_factory=list,
                                        description="AMCT 'skip_layer_types': op types not to quantize.")
    include_op_types: list[str] = Field(default_factory=lambda: list(SUPPORTED_OP_TYPES),
                                        description="Op types to consider; a subset of "
                                                    + ", ".join(SUPPORTED_OP_TYPES) + ".")
    overrides: list[LayerOverride] = Field(default_factory=list,
                                           description="Per-layer options/skips, resolved in order; last match wins.")
    precision: dict[str, Union[Literal["float"], LayerPrecision]] = Field(
        default_factory=dict,
        description="Per layer name or op type: {act: 8|16, wts: 8|4} or 'float' (not quantized); a name wins "
                    "over its op type, and both over overrides and amct_config.")
    amct_config: Optional[str] = Field(
        None, description="AMCT quant config file (.json or simplified .cfg; a relative path resolves against "
                          "the current working directory): its skips and per-layer activation/weight settings "
                          "become per-layer options (overrides apply on top); stored as artifact 'amct_config'.")

    @field_validator("skip_layer_types", "include_op_types")
    @classmethod
    def _known_types(cls, values: list[str]) -> list[str]:
        return _check_op_types(values)


# -- the pass ----------------------------------------------------------------------------------
class MatchLayersPass(Pass):
    name = "match_layers"
    summary = "Find the quantizable Conv/ConvTranspose/Gemm/MatMul/AveragePool layers (artifact 'layer_map')."
    Options = MatchLayersOptions
    reads = ("amct_config",)
    produces = frozenset({"layer_map"})

    def produced(self, session) -> frozenset[str]:
        return self.produces | ({"amct_config"} if self.options.amct_config is not None else set())

    def run(self, graph, ctx) -> PassResult:
        _check_names(graph, self.options)
        config = None
        if self.options.amct_config is not None:
            config = read_amct_config(graph, self.options.amct_config, WHERE)
            _warn_unsupported(config)
            ctx.artifacts["amct_config"] = config
        layers: list[QuantLayer] = []
        skipped: dict[str, str] = {}
        for node in graph.nodes:
            if node.op not in SUPPORTED_OP_TYPES:
                continue
            layer = self._match(graph, node, config)
            if isinstance(layer, str):
                skipped[node.name] = layer
            else:
                layers.append(layer)
        nested = _nested_layers(graph)
        if nested and not layers:
            raise ConfigError([Problem(WHERE, "", "no quantizable layer in the model's main graph; layers inside "
                                       f"If/Loop/Scan subgraphs are not quantized: {_preview(nested)}")])
        layer_map = LayerMap(layers, skipped)
        ctx.artifacts["layer_map"] = layer_map
        return PassResult(False, {"matched": len(layer_map), "skipped": len(skipped), "by_type": layer_map.by_type()})

    def _match(self, graph, node: gs.Node, config=None) -> QuantLayer | str:
        opts = self.options
        if node.op not in opts.include_op_types:
            return "op type not in include_op_types"
        if node.op in opts.skip_layer_types:
            return "op type in skip_layer_types"
        if node.name in opts.skip_layers:
            return "in skip_layers"
        config_options, config_skip = _from_config(config, node.name)
        skip_by, layer_options, explicit = _resolve_overrides(opts.overrides, node)
        chosen, key = _precision(opts.precision, node)
        if chosen == FLOAT:
            return f"precision float (precision.{key})"
        if skip_by is not None:
            return f"skipped by overrides[{skip_by}]"
        if config_skip and not explicit and chosen is None:
            return config_skip
        layer_options = _deep_merge(config_options, layer_options)
        if chosen is not None:
            layer_options = _deep_merge(layer_options, precision_options(chosen.act, chosen.wts))
        found = match_layer(graph, node)
        if isinstance(found, str):
            return found
        _check_precision(node, layer_options, key)
        return QuantLayer(options=layer_options, **found)


def _precision(table: Mapping[str, Any], node: gs.Node) -> tuple[Any, str | None]:
    """(the node's entry of ``precision``, its key): by name, else by op type; (None, None) if absent."""
    for key in (node.name, node.op):
        if key in table:
            return table[key], key
    return None, None


def _check_precision(node: gs.Node, options: Mapping[str, Any], key: str | None) -> None:
    """AMCT's precision rules for the layer's final options; the error names the layer and the field."""
    act, wts = layer_bits(options)
    problems = precision_problems(node.op, act, wts)
    if problems:
        side, message = problems[0]
        path = f"precision.{key}.{side}" if key is not None else (
            "options.calibrate.algorithm_options.num_bits" if side == "act" else "options.quantize_weights.num_bits")
        raise ConfigError([Problem(WHERE, f"layer '{node.name}' ({node.op}) {path}", message)])


def _nested_layers(graph) -> list[str]:
    """Quantizable nodes inside subgraphs ('conv (in Loop 'loop')'): never matched, so named in errors."""
    from ..ir.graph import iter_subgraphs
    found = []

    def walk(nodes, owner):
        for node in nodes:
            if owner is not None and node.op in SUPPORTED_OP_TYPES:
                found.append(f"{node.name} (in {owner.op} '{owner.name}')")
            for sub in iter_subgraphs(node):
                walk(sub.nodes, node if owner is None else owner)
    walk(graph.nodes, None)
    return found


def _check_names(graph, opts: MatchLayersOptions) -> None:
    """Unknown (or non-quantizable) layer names are errors: a typo must not silently quantize."""
    ops = {n.name: n.op for n in graph.nodes}
    named = [("skip_layers", name) for name in opts.skip_layers]
    named += [(f"overrides[{i}].match.name", o.match.name) for i, o in enumerate(opts.overrides)
              if o.match.name is not None]
    named += [(f"precision.{key}", key) for key in opts.precision if key not in SUPPORTED_OP_TYPES]
    for path, name in named:
        if name not in ops:
            candidates = [n for n, op in ops.items() if op in SUPPORTED_OP_TYPES]
            hint = suggest(name, candidates) or f"quantizable layers: {_preview(candidates)}"
            raise ConfigError([Problem(WHERE, path, f"no layer named '{name}' in the model", hint)])
        if ops[name] not in SUPPORTED_OP_TYPES:
            raise ConfigError([Problem(WHERE, path, f"'{name}' is a {ops[name]}, not a quantizable layer",
                                       f"quantizable types: {', '.join(SUPPORTED_OP_TYPES)}")])


def _preview(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _resolve_overrides(overrides: list[LayerOverride], node: gs.Node) -> tuple[int | None, dict[str, Any], bool]:
    """(index of the override that skips the layer or None, merged options, whether any override
    set ``skip`` explicitly - an explicit false un-skips a layer the AMCT config skips). Later entries win."""
    skip_by: int | None = None
    explicit = False
    merged: dict[str, Any] = {}
    for index, override in enumerate(overrides):
        if not override.match.matches(node.name, node.op):
            continue
        if "skip" in override.model_fields_set:
            skip_by = index if override.skip else None
            explicit = True
        merged = _deep_merge(merged, override.options)
    return skip_by, merged, explicit


def amct_layer_options(layer_config) -> dict[str, Any]:
    """Per-layer options for later passes from one ``LayerQuantConfig`` (AMCT's option names)."""
    act = dict(layer_config.act)
    options: dict[str, Any] = {"calibrate": {"algorithm": act.pop("algo"), "algorithm_options": act}}
    wts = layer_config.wts
    if wts is not None:
        options["quantize_weights"] = {"channel_wise": wts["channel_wise"], "num_bits": wts["num_bits"]}
    return options


def _from_config(config, name: str) -> tuple[dict[str, Any], str | None]:
    """(options the config gives the layer, reason it skips the layer or None)."""
    if config is None:
        return {}, None
    entry = config.layers.get(name)
    source = Path(config.source).name if config.source else "the AMCT config"
    if entry is None:
        return {}, f"not listed in {source}"
    if not entry.quant_enable:
        return {}, f"quant_enable false in {source}"
    return amct_layer_options(entry), None


def _warn_unsupported(config) -> None:
    """Settings this pipeline does not implement are reported, never silently dropped."""
    unsupported = []
    if any(layer.wts and layer.wts.get("algo") == "ada" for layer in config.layers.values()):
        unsupported.append("wts_algo ada_quantize (ARQ is used)")
    if any(layer.dmq_balancer is not None for layer in config.layers.values()):
        unsupported.append("dmq_balancer")
    for key, present in (("tensor_quantize", config.tensor_quantize), ("joint_quant", config.joint_quant),
                         ("weight_offset", config.weight_offset), ("nuq_config", config.nuq)):
        if present:
            unsupported.append(key)
    if unsupported:
        warnings.warn(f"{config.source}: not supported, ignored: {', '.join(unsupported)}", UserWarning, stacklevel=3)


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = _copy(value)
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
