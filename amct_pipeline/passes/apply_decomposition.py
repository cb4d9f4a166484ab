"""apply_decomposition: rebuild a saved decomposition structure (AMCT's ``decompose_network``).

Reads an info file written by ``decompose`` (or AMCT's own, mode SCFK/FCFK with first/last weight
shapes), checks each layer against the model, and replaces it by the same child convs, with the
same names (``<child>.weight`` / ``<child>.bias``). Weights then come from:

* ``weights``: an ``.npz`` or ``.onnx`` file holding the child tensors by name — e.g. weights
  fine-tuned elsewhere; every child tensor must be there with the right shape;
* otherwise ``init``: ``decompose`` (factorise the model's weights data-free at the saved ranks, so
  the model runs and is close to the original) or ``zeros`` (structure only, as AMCT).

Everything is checked before the graph changes; any mismatch is an error naming the layer and key.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field

from ..algorithms.decomposition import info as info_file
from ..algorithms.decomposition.convs import bias_of, conv_layer, replace_conv, spatial_shapes, weight_of
from ..errors import ConfigError, Problem
from ..options import Options, suggest
from .base import Pass, PassResult

__all__ = ["ApplyDecompositionPass", "ApplyDecompositionOptions"]

WHERE = "pass 'apply_decomposition'"


class ApplyDecompositionOptions(Options):
    info_file: str = Field(description="Info file written by decompose (or AMCT's decomposition info JSON).")
    weights: Optional[str] = Field(None, description="Child weights by tensor name: .npz, or .onnx initializers "
                                                     "(e.g. the fine-tuned decomposed model).")
    init: Literal["decompose", "zeros"] = Field(
        "decompose", description="Without 'weights': 'decompose' factorises the model's weights data-free at the "
                                 "saved ranks; 'zeros' builds the structure only.")


class ApplyDecompositionPass(Pass):
    name = "apply_decomposition"
    summary = "Re-apply a saved decomposition structure (info file) to a model; load fine-tuned child weights."
    Options = ApplyDecompositionOptions
    reads = ("info_file", "weights")
    changes_layers = True

    def run(self, graph, ctx) -> PassResult:
        opts = self.options
        entries = info_file.read_info(opts.info_file)
        plans = [_plan(ctx.session, graph, opts.info_file, name, entry, spatial_shapes(graph))
                 for name, entry in entries.items()]
        loaded = _load_weights(opts.weights) if opts.weights else None
        if loaded is not None:
            _check_weights(opts.weights, plans, loaded)
        used = 0
        for plan in plans:
            weights, bias = _child_weights(plan, loaded, opts.init)
            replace_conv(graph, plan["node"], plan["children"], weights, bias, plan["names"])
            used += len(plan["children"])
        if plans:
            graph.finalize()
        return PassResult(bool(plans), {"layers": len(plans), "children": used,
                                        "weights": "file" if loaded is not None else opts.init})


def _plan(session, graph, where: str, name: str, entry: dict[str, Any], shapes) -> dict[str, Any]:
    """Layer, method, rank and children of one entry; every inconsistency is a ConfigError."""
    nodes = {n.name: n for n in graph.nodes}
    if name not in nodes:
        convs = [n.name for n in graph.nodes if n.op == "Conv"]
        raise ConfigError([Problem(where, name, "no layer of that name in the model",
                                   suggest(name, convs) or "apply the file to the model it was made from")])
    node = nodes[name]
    if node.op != "Conv":
        raise ConfigError([Problem(where, name, f"'{name}' is a {node.op}, not a Conv layer")])
    layer = conv_layer(node, shapes)
    if isinstance(layer, str):
        raise ConfigError([Problem(where, name, f"'{name}' cannot be decomposed: {layer}")])
    problems = info_file.check_layer_matches(where, entry, layer)
    if problems:
        raise ConfigError(problems)
    method_name = info_file.entry_method(entry)
    try:
        method = session.make_algorithm("decompositions", method_name)
        rank = method.rank_from_shapes(layer, info_file.child_shapes(entry))
    except ValueError as exc:
        raise ConfigError([Problem(where, f"{name}.decom_nodes", str(exc))]) from None
    except ConfigError as exc:
        raise ConfigError([Problem(where, f"{name}.method", str(exc))]) from None
    return {"node": node, "layer": layer, "method": method, "rank": rank,
            "children": method.structure(layer, rank), "names": info_file.child_names(entry, name)}


def _load_weights(path: str) -> dict[str, np.ndarray]:
    source = Path(path)
    if not source.is_file():
        raise ConfigError([Problem(WHERE, "weights", f"{path}: no such file")])
    if source.suffix == ".onnx":    # read like an input model: external data confined to its folder
        import onnx_graphsurgeon as gs
        from ..ir.graph import load_graph
        return {name: np.asarray(tensor.values) for name, tensor in load_graph(source).tensors().items()
                if isinstance(tensor, gs.Constant)}
    try:
        with np.load(source, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (ValueError, OSError) as exc:
        raise ConfigError([Problem(WHERE, "weights", f"{path}: not a readable .npz or .onnx ({exc})")]) from None


def _tensor_names(plan: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    names = []
    for spec, child in zip(plan["children"], plan["names"]):
        names.append((f"{child}.weight", spec.weight_shape))
        if spec.has_bias:
            names.append((f"{child}.bias", (spec.cout,)))
    return names


def _check_weights(path: str, plans: list[dict[str, Any]], loaded: dict[str, np.ndarray]) -> None:
    problems = []
    for plan in plans:
        for name, shape in _tensor_names(plan):
            if name not in loaded:
                problems.append(Problem(path, name, "missing from the weights file",
                                        suggest(name, loaded) or f"it holds {len(loaded)} tensors"))
            elif tuple(loaded[name].shape) != tuple(shape):
                problems.append(Problem(path, name, f"has shape {list(loaded[name].shape)}, the structure "
                                                    f"needs {list(shape)}"))
    if problems:
        raise ConfigError(problems)


def _child_weights(plan: dict[str, Any], loaded: Optional[dict[str, np.ndarray]], init: str):
    """(child weights, last child's bias) from the file, the data-free factorisation, or zeros."""
    children, names = plan["children"], plan["names"]
    if loaded is not None:
        weights = [loaded[f"{n}.weight"] for n in names]
        bias = loaded[f"{names[-1]}.bias"] if children[-1].has_bias else None
        return weights, bias
    bias = bias_of(plan["node"])
    if init == "zeros":
        return [np.zeros(c.weight_shape, np.float32) for c in children], \
            None if bias is None else np.zeros_like(bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        weights = plan["method"].decompose(plan["layer"], weight_of(plan["node"]), plan["rank"])
    return weights, bias
