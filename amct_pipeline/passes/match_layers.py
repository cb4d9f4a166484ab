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
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import onnx_graphsurgeon as gs
from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError, Problem
from ..options import Options, suggest
from .base import Pass, PassResult

__all__ = [
    "MatchLayersPass",
    "MatchLayersOptions",
    "LayerOverride",
    "LayerMatch",
    "QuantLayer",
    "LayerMap",
    "SUPPORTED_OP_TYPES",
    "weight_values",
    "read_amct_config",
    "amct_layer_options",
]

SUPPORTED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool")
VIEW_OPS = ("Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
WHERE = "pass 'match_layers'"


# -- the artifact ------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantLayer:
    """One quantizable layer. Tensor fields are tensor names; node names are layer names.

    ``weight`` is the tensor the layer reads; ``weight_source`` the constant it comes from (the same
    name unless view ops sit in between, listed in ``weight_via``). ``channel_axis`` is the weight's
    output-channel axis for channel-wise quantization (0 Conv, 1 ConvTranspose; None = per-tensor
    only). ``bias_add`` names the Add that carries a MatMul's bias (its constant is ``bias``).
    """

    name: str
    op_type: str
    input: str
    output: str
    weight: Optional[str] = None
    bias: Optional[str] = None
    bias_add: Optional[str] = None
    channel_axis: Optional[int] = None
    out_channels: Optional[int] = None
    group: int = 1
    transB: int = 0
    weight_source: Optional[str] = None
    weight_via: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict, hash=False)


class LayerMap(Mapping):
    """Ordered mapping layer name -> QuantLayer (graph order), plus ``skipped``: name -> reason."""

    def __init__(self, layers: Iterable[QuantLayer] = (), skipped: Mapping[str, str] | None = None) -> None:
        self._layers: dict[str, QuantLayer] = {layer.name: layer for layer in layers}
        self.skipped: dict[str, str] = dict(skipped or {})

    def __getitem__(self, name: str) -> QuantLayer:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def layers(self) -> list[QuantLayer]:
        return list(self._layers.values())

    def of_type(self, op_type: str) -> list[QuantLayer]:
        return [layer for layer in self._layers.values() if layer.op_type == op_type]

    def by_type(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self._layers.values():
            counts[layer.op_type] = counts.get(layer.op_type, 0) + 1
        return counts

    def __repr__(self) -> str:
        return f"LayerMap({len(self)} layers {self.by_type()}, {len(self.skipped)} skipped)"


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
        if skip_by is not None:
            return f"skipped by overrides[{skip_by}]"
        if config_skip and not explicit:
            return config_skip
        layer_options = _deep_merge(config_options, layer_options)
        found = MATCHERS[node.op](graph, node)
        if isinstance(found, str):
            return found
        return QuantLayer(options=layer_options, **found)


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


# -- AMCT quant config files -------------------------------------------------------------------
def read_amct_config(graph, path: str, where: str):
    """Read an AMCT JSON quant config or .cfg (by suffix, relative to the working directory),
    checked against the graph's nodes; every problem of the file becomes one line of a ConfigError."""
    from ..amct import ConfigFileError, read_cfg, read_quant_config
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".cfg"):
        raise ConfigError([Problem(where, "amct_config", f"'{path}' is neither a .json nor a .cfg file",
                                   "give AMCT's JSON quant config (.json) or its simplified config (.cfg)")])
    if not Path(path).is_file():
        raise ConfigError([Problem(where, "amct_config", f"file '{path}' not found",
                                   f"relative paths resolve against the current directory {Path.cwd()}")])
    layers = _node_types(graph)
    try:
        return read_quant_config(path, layers) if suffix == ".json" else read_cfg(path, layers)
    except ConfigFileError as exc:
        raise ConfigError([Problem(i.source if i.line is None else f"{i.source}:{i.line}:{i.col}", i.where,
                                   i.message) for i in exc.issues]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(where, "amct_config", f"cannot read '{path}': {exc}")]) from None


def _node_types(graph) -> dict[str, str]:
    """{node name: op type}, first occurrence of a repeated name (the readers need unique names)."""
    types: dict[str, str] = {}
    for node in graph.nodes:
        types.setdefault(node.name, node.op)
    return types


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


# -- constants and weights ---------------------------------------------------------------------
def _constant_node(tensor: gs.Tensor) -> gs.Node | None:
    producer = tensor.inputs[0] if tensor.inputs else None
    return producer if producer is not None and producer.op == "Constant" else None


def _is_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) or _constant_node(tensor) is not None


def _weight_chain(tensor: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """(constant root, view nodes from the root towards the layer), or None when not constant."""
    via: list[gs.Node] = []
    current = tensor
    while not _is_constant(current):
        producer = current.inputs[0] if current.inputs else None
        if producer is None or producer.op not in VIEW_OPS:
            return None
        if not all(_is_constant(t) for t in producer.inputs[1:] if t.name):
            return None
        via.append(producer)
        current = producer.inputs[0]
    return current, via[::-1]


def _const_values(tensor: gs.Tensor) -> np.ndarray:
    if isinstance(tensor, gs.Constant):
        return tensor.values
    attrs = _constant_node(tensor).attrs
    if "value" in attrs:
        return attrs["value"].values
    for key in ("value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            return np.asarray(attrs[key], dtype=np.float32 if "float" in key else np.int64)
    raise ValueError(f"Constant producing '{tensor.name}' has no supported value attribute")


def _const_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """Shape without loading data (None when it cannot be told cheaply)."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    attrs = _constant_node(tensor).attrs
    if "value" in attrs:
        return tuple(attrs["value"].shape)
    return None


def _apply_view(node: gs.Node, x: np.ndarray) -> np.ndarray:
    """numpy semantics of the view ops a weight may pass through."""
    args = [_const_values(t) if t.name else None for t in node.inputs[1:]]
    if node.op == "Identity":
        return x
    if node.op == "Transpose":
        return np.transpose(x, node.attrs.get("perm"))
    if node.op == "Reshape":
        shape = [int(d) for d in args[0]]
        if not int(node.attrs.get("allowzero", 0)):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1)) % (x.ndim or 1) if x.ndim else 0
        return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    axes = node.attrs.get("axes", args[0] if args else None)
    if node.op == "Squeeze":
        return np.squeeze(x, tuple(int(a) for a in axes)) if axes is not None else np.squeeze(x)
    out_rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(int(a) % out_rank for a in axes)))


def _chain_values(tensor: gs.Tensor) -> np.ndarray:
    root, via = _weight_chain(tensor)
    values = _const_values(root)
    for node in via:
        values = _apply_view(node, values)
    return values


def weight_values(graph, layer: QuantLayer) -> np.ndarray | None:
    """The weight array exactly as ``layer`` sees it (view ops applied); None for weightless layers."""
    if layer.weight is None:
        return None
    return _chain_values(graph.tensors()[layer.weight])


def _weight_shape(tensor: gs.Tensor, via: list[gs.Node], root: gs.Tensor) -> tuple[int, ...]:
    if not via:
        shape = _const_shape(root)
        if shape is not None:
            return shape
    if tensor.shape is not None and all(isinstance(d, int) for d in tensor.shape):
        return tuple(tensor.shape)
    return tuple(_chain_values(tensor).shape)      # small view chains only: loads the weight


def _resolve_weight(graph, node: gs.Node, index: int) -> dict[str, Any] | str:
    """Weight facts, or why the weight does not qualify (not constant, shared)."""
    tensor = node.inputs[index] if index < len(node.inputs) else None
    if tensor is None or not tensor.name:
        return "has no weight input"
    chain = _weight_chain(tensor)
    if chain is None:
        return "weight is not constant"
    root, via = chain
    for t in [root] + [n.outputs[0] for n in via]:
        readers = [n.name for n in t.outputs if n is not node and n not in via]
        if readers or graph.is_graph_output(t):
            others = ", ".join(f"'{r}'" for r in readers) or "a graph output"
            return f"shared weight '{t.name}' (also used by {others})"
    return {"weight": tensor.name, "weight_source": root.name, "weight_via": tuple(n.name for n in via),
            "shape": _weight_shape(tensor, via, root)}


def _optional_bias(graph, node: gs.Node, index: int) -> str | None | bool:
    """The bias tensor name, None when absent, or False when present but not a usable constant."""
    if index >= len(node.inputs) or not node.inputs[index].name:
        return None
    bias = node.inputs[index]
    return bias.name if _weight_chain(bias) is not None else False


# -- per-op matchers: return QuantLayer fields or a reason -------------------------------------
def _base(node: gs.Node) -> dict[str, Any]:
    return {"name": node.name, "op_type": node.op, "input": node.inputs[0].name, "output": node.outputs[0].name}


def _weighted(graph, node: gs.Node) -> tuple[dict[str, Any], tuple[int, ...]] | str:
    weight = _resolve_weight(graph, node, 1)
    if isinstance(weight, str):
        return weight
    shape = weight.pop("shape")
    return {**_base(node), **weight}, shape


def _match_conv(graph, node: gs.Node) -> dict[str, Any] | str:
    found = _weighted(graph, node)
    if isinstance(found, str):
        return found
    fields, shape = found
    if len(shape) not in (3, 4, 5):
        return f"weight is {len(shape)}-D; Conv weights must be 3-D to 5-D"
    dilations = list(node.attrs.get("dilations", [1] * (len(shape) - 2)))
    if len(shape) == 5 and dilations and int(dilations[0]) != 1:
        return f"Conv3D dilation_d={dilations[0]} (must be 1)"
    bias = _optional_bias(graph, node, 2)
    if bias is False:
        return "bias is not constant"
    return {**fields, "bias": bias, "channel_axis": 0, "out_channels": int(shape[0]),
            "group": int(node.attrs.get("group", 1))}


def _match_conv_transpose(graph, node: gs.Node) -> dict[str, Any] | str:
    found = _weighted(graph, node)
    if isinstance(found, str):
        return found
    fields, shape = found
    if len(shape) != 4:
        return f"weight is {len(shape)}-D; ConvTranspose needs a 4-D filter"
    dilations = [int(d) for d in node.attrs.get("dilations", [1, 1])]
    if any(d != 1 for d in dilations):
        return f"dilations={dilations} (ConvTranspose needs dilation 1)"
    bias = _optional_bias(graph, node, 2)
    if bias is False:
        return "bias is not constant"
    group = int(node.attrs.get("group", 1))
    return {**fields, "bias": bias, "channel_axis": 1, "out_channels": int(shape[1]) * group, "group": group}


def _match_gemm(graph, node: gs.Node) -> dict[str, Any] | str:
    trans_a = int(node.attrs.get("transA", 0))
    if trans_a:
        return f"transA={trans_a} (must be 0)"
    found = _weighted(graph, node)
    if isinstance(found, str):
        return found
    fields, shape = found
    if len(shape) != 2:
        return f"weight is {len(shape)}-D, not 2-D"
    trans_b = int(node.attrs.get("transB", 0))
    bias = _optional_bias(graph, node, 2)
    if bias is False:
        return "bias is not constant"
    return {**fields, "bias": bias, "out_channels": int(shape[0] if trans_b else shape[1]), "transB": trans_b}


def _match_matmul(graph, node: gs.Node) -> dict[str, Any] | str:
    found = _weighted(graph, node)
    if isinstance(found, str):
        return found
    fields, shape = found
    if len(shape) != 2:
        return f"weight is {len(shape)}-D, not 2-D"
    bias, bias_add = _matmul_bias(graph, node, int(shape[1]))
    return {**fields, "bias": bias, "bias_add": bias_add, "out_channels": int(shape[1])}


def _matmul_bias(graph, node: gs.Node, features: int) -> tuple[str | None, str | None]:
    """A following Add of a constant [N] (or [1,..,1,N]) vector is the MatMul's bias."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or graph.is_graph_output(out):
        return None, None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is out or not _is_constant(other) or len(other.outputs) != 1:
        return None, None
    shape = _const_shape(other)
    if shape is None or not shape or shape[-1] != features or any(d != 1 for d in shape[:-1]):
        return None, None
    if len(shape) > 2 and (out.shape is None or len(shape) > len(out.shape)):
        return None, None          # would broadcast the output to a higher rank: not a bias
    return other.name, add.name


def _match_avgpool(graph, node: gs.Node) -> dict[str, Any]:
    return _base(node)


MATCHERS = {
    "Conv": _match_conv,
    "ConvTranspose": _match_conv_transpose,
    "Gemm": _match_gemm,
    "MatMul": _match_matmul,
    "AveragePool": _match_avgpool,
}
