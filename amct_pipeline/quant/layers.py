"""Quantizable layers (SPEC 6.1): what a layer is, the layer map, and how each op type is matched.

A :class:`QuantLayer` names the tensors of one layer; :func:`match_layer` tells whether a node is a
quantizable layer and, if not, why. Weights must be constant: an initializer or a Constant node,
optionally seen through a chain of view ops (``ir.constants``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import onnx_graphsurgeon as gs

from ..ir.constants import chain_values, constant_chain, constant_shape, is_constant

__all__ = ["QuantLayer", "LayerMap", "SUPPORTED_OP_TYPES", "MATCHERS", "match_layer"]

SUPPORTED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool")


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


# -- weights ---------------------------------------------------------------------------------------
def _weight_shape(tensor: gs.Tensor, via: list[gs.Node], root: gs.Tensor) -> tuple[int, ...]:
    if not via:
        shape = constant_shape(root)
        if shape is not None:
            return shape
    if tensor.shape is not None and all(isinstance(d, int) for d in tensor.shape):
        return tuple(tensor.shape)
    return tuple(chain_values(tensor).shape)      # small view chains only: loads the weight


def _resolve_weight(graph, node: gs.Node, index: int) -> dict[str, Any] | str:
    """Weight facts, or why the weight does not qualify (not constant, shared)."""
    tensor = node.inputs[index] if index < len(node.inputs) else None
    if tensor is None or not tensor.name:
        return "has no weight input"
    chain = constant_chain(tensor)
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
    return bias.name if constant_chain(bias) is not None else False


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
    if other is out or not is_constant(other) or len(other.outputs) != 1:
        return None, None
    shape = constant_shape(other)
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


def match_layer(graph, node: gs.Node) -> dict[str, Any] | str:
    """QuantLayer fields of ``node`` (without options), or why it is not a quantizable layer."""
    return MATCHERS[node.op](graph, node)
