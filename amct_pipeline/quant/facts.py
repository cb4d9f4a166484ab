"""Graph-level quantization facts: which tensors a QDQ layout quantizes beyond the layer inputs, with
which factors, and the bounds of Relu/Clip.

Calibration observes exactly :func:`extra_tensors` (``calibrate{block_outputs}``), and the ``qdq``
target lays its quantizers out with :func:`plan_layout` / :func:`resolve_layout`, the same planning,
so both always agree on the tensor set.

The layout
----------
*Data movement* ops copy, select or rearrange the values of their data input (Reshape, Flatten,
Transpose, Squeeze, Unsqueeze, Identity, MaxPool, Split, Slice, Gather on constant indices, Resize
with mode nearest, Pad with constant 0). A monotone per-tensor quantizer commutes with them, so a
data input and its outputs quantized with the *same* factors give exactly the float op on dequantized
values, and onnxruntime then runs the op on the uint8 codes (it drops the DQ -> op -> Q pairs; Pad
is folded into the Conv that reads it). The tensors joined by such ops form a *class* (a tree rooted
at the one tensor no movement op produces); every tensor of a class shares one set of factors:

* a class holding exactly one tensor read by quantized layers, reached from the root through
  single-reader tensors only (``Conv -> Relu -> MaxPool -> Conv``, ``pool -> Reshape -> Gemm``), takes
  that layer's record factors (quantizing the root with them is exact: nothing else reads it);
* any other class with a layer input (a Split feeding a conv and a Concat, a tensor read by a
  layer and a Transpose ...) takes the factors of its root: the root's own layer's record factors
  when a layer reads the root, else the root is calibrated (``tensor_quant``) on its values, which
  contain every value of the class. Layers reading other tensors of such a class use the class's
  factors in the QDQ model (their record factors, for the fake-quant and Ascend models, are kept);
* a class without layer inputs is quantized when its root is (a layer, Add or pooling output, or
  an integer Concat output), so data moves in integers until a float op needs the values.

Concat
------
A Concat whose inputs are all quantized is an integer QLinearConcat; its output is calibrated on its
own values (or takes the record factors of the one layer reading it, by the first rule above). Inputs
of a different range are requantized once, where it costs least: an input that nothing else reads and
whose values come from an integer kernel (a conv, Add, pooling or Concat output, through single-reader
data movement) is quantized directly with the Concat's factors (the kernel requantizes its
accumulator for free); the others keep their class's factors and QLinearConcat requantizes them with
a lookup table. When the inputs' ranges differ by more than :data:`CONCAT_RANGE_RATIO` and no layer
reads the result (boxes in pixels beside probabilities in a detector head), the Concat stays float:
one scale would destroy the small values, and every input keeps its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.constants import constant_values
from .params import ActQuantParams
from .plan import LoweringPlan, output_node

__all__ = ["DATA_MOVEMENT_OPS", "VALUE_PRESERVING_OPS", "FOLDABLE_ACTIVATIONS", "POOLING_OPS",
           "CONCAT_RANGE_RATIO", "PAD_FUSING_OPS", "Source", "ConcatPlan", "LayoutPlan", "QdqLayout", "Quantizer",
           "moves_data", "record_factors", "propagate_factors", "extra_tensors", "output_tensors", "plan_layout",
           "resolve_layout", "float_readers",
           "qdq_quantizers",
           "activation_bounds"]

DATA_MOVEMENT_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "MaxPool", "Split",
                     "Slice", "Gather", "Resize", "Pad")
VALUE_PRESERVING_OPS = DATA_MOVEMENT_OPS      # the former name
FOLDABLE_ACTIVATIONS = ("Relu", "Clip")       # monotone clips: movable onto the integer codes
POOLING_OPS = ("GlobalAveragePool",)
PAD_FUSING_OPS = ("Conv",)                    # onnxruntime folds a zero Pad into these (then DQ -> Conv -> Q fuses)
CONCAT_RANGE_RATIO = 16.0                     # Concat inputs whose ranges differ more never share one scale


def record_factors(plan: LoweringPlan) -> dict[str, ActQuantParams]:
    """Layer inputs with the record's factors (a tensor read by several layers: the first one's)."""
    factors: dict[str, ActQuantParams] = {}
    for layer_plan in plan.layers.values():
        factors.setdefault(layer_plan.layer.input, layer_plan.act)
    return factors


# -- data movement -------------------------------------------------------------------------------
def moves_data(graph, node: gs.Node) -> bool:
    """True when ``node`` copies, selects or rearranges the values of its data input (input 0) and
    nothing else: quantizing its input and outputs with one set of factors is then exact."""
    if node.op not in DATA_MOVEMENT_OPS or not node.inputs or not isinstance(node.inputs[0], gs.Variable):
        return False
    if node.op != "Split" and any(t.outputs or graph.is_graph_output(t) for t in node.outputs[1:]):
        return False                                  # MaxPool's indices
    if node.op == "Gather":
        return len(node.inputs) > 1 and constant_values(node.inputs[1]) is not None
    if node.op == "Resize":
        return _text(node.attrs.get("mode", "nearest")) == "nearest"
    if node.op == "Pad":
        return _text(node.attrs.get("mode", "constant")) == "constant" and _pad_value(node) == 0.0
    return True


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pad_value(node: gs.Node) -> float | None:
    if len(node.inputs) > 2 and node.inputs[2].name:          # opset 11+: constant_value input
        value = constant_values(node.inputs[2])
        return None if value is None else float(np.asarray(value).reshape(-1)[0]) if np.size(value) else 0.0
    return float(node.attrs.get("value", 0.0))


@dataclass(frozen=True)
class Source:
    """Where a quantized tensor's factors come from: a layer's record factors (``act_quant``) or
    the calibrated factors of a tensor (``tensor_quant``)."""

    kind: str          # "layer" | "tensor"
    name: str


@dataclass
class _Class:
    root: str
    members: list[str]                       # graph order, root first
    demand: list[str] = field(default_factory=list)     # members read by quantized layers
    chain: str | None = None                 # the one layer input, when the class is a chain into it
    source: Source | None = None


@dataclass(frozen=True)
class ConcatPlan:
    """A Concat all of whose inputs are quantized. ``point``: its quantized output (after a Relu/Clip
    chain); ``private``: per input, True when it may take the Concat's factors (see the module doc)."""

    node: str
    inputs: tuple[str, ...]
    point: str
    private: tuple[bool, ...]


@dataclass
class LayoutPlan:
    """The structure of the QDQ layout, before any factor is known (:func:`plan_layout`)."""

    sources: dict[str, Source]               # every tensor the layout quantizes -> its source (graph order)
    concats: list[ConcatPlan]
    layer_inputs: dict[str, list[str]]       # tensor -> quantized layers reading it (graph order)
    parent: dict[str, str]                   # data-movement output -> the tensor it moves
    root: dict[str, str]                     # tensor -> root of its class (tensors in a class only)
    demanded: set[str]                       # roots of classes holding a layer input

    def wanted(self) -> list[str]:
        """Tensors whose factors must be calibrated (graph order)."""
        return list(dict.fromkeys(s.name for s in self.sources.values() if s.kind == "tensor"))

    def members(self, tensor: str) -> list[str]:
        root = self.root.get(tensor, tensor)
        return [t for t in self.sources if self.root.get(t, t) == root]


@dataclass
class QdqLayout:
    """Factors of every tensor the QDQ model quantizes (:func:`resolve_layout`).

    ``paired``: tensors that get their own QuantizeLinear -> DequantizeLinear pair (graph order);
    ``layer_pairs``: layers reading their input through a pair of their own record factors (a tensor
    read by layers calibrated differently); ``float_concats``: Concats left float by the range rule;
    ``merged``: Concat inputs quantized with the Concat's factors.
    """

    factors: dict[str, ActQuantParams]
    sources: dict[str, Source]
    paired: list[str]
    layer_pairs: dict[str, ActQuantParams]
    integer_concats: list[str] = field(default_factory=list)
    float_concats: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)


def _layer_of(entry):
    return getattr(entry, "layer", entry)          # LayerPlan or QuantLayer


def plan_layout(graph, layers) -> LayoutPlan:
    """The QDQ layout's structure. ``layers``: the quantized layers, name -> QuantLayer (a LayerMap)
    or LayerPlan."""
    nodes = list(graph.nodes)
    tensors = graph.tensors()
    layer_inputs: dict[str, list[str]] = {}
    for node in nodes:
        if node.name in layers:
            layer_inputs.setdefault(_layer_of(layers[node.name]).input, []).append(node.name)

    parent: dict[str, str] = {}
    classes: dict[str, _Class] = {}
    root_of: dict[str, str] = {}
    for node in nodes:
        if not moves_data(graph, node):
            continue
        source = node.inputs[0].name
        root = root_of.setdefault(source, source)
        cls = classes.setdefault(root, _Class(root, [root]))
        for out in node.outputs:
            parent[out.name] = source
            root_of[out.name] = root
            cls.members.append(out.name)

    def single_reader(name: str) -> bool:
        tensor = tensors[name]
        return len(tensor.outputs) == 1 and not graph.is_graph_output(tensor)

    def ancestors(name: str) -> list[str]:
        found = []
        while name in parent:
            name = parent[name]
            found.append(name)
        return found

    def class_of(name: str) -> _Class:
        root = root_of.get(name, name)
        if root not in classes:
            classes[root] = _Class(root, [root])
            root_of[root] = root
        return classes[root]

    for name in layer_inputs:
        class_of(name).demand.append(name)
    for cls in classes.values():
        if len(cls.demand) == 1:
            t = cls.demand[0]
            up = ancestors(t)
            if all(single_reader(a) for a in up) and all(m == t or m in up or t in ancestors(m) for m in cls.members):
                cls.chain = t
    order = {t: i for i, t in enumerate(_tensor_order(graph))}
    for cls in classes.values():
        cls.demand.sort(key=order.__getitem__)

    sources: dict[str, Source] = {}

    def activate(cls: _Class, source: Source) -> None:
        cls.source = source
        for member in cls.members:
            if member == cls.root and cls.chain is not None and graph.producer(tensors[member]) is None:
                continue                              # a graph input feeding a chain stays float
            sources[member] = source

    for cls in classes.values():                     # classes holding a layer input
        if cls.chain is not None:
            activate(cls, Source("layer", layer_inputs[cls.chain][0]))
        elif cls.demand:
            first = layer_inputs.get(cls.root)
            activate(cls, Source("layer", first[0]) if first else Source("tensor", cls.root))

    def supply(point: gs.Tensor | None) -> None:      # a quantized kernel output: its class follows it
        if point is None:
            return
        cls = class_of(point.name)
        if cls.source is None and cls.root == point.name:
            activate(cls, Source("tensor", point.name))

    node_by_name = {node.name: node for node in nodes}
    concats: list[ConcatPlan] = []
    for node in nodes:
        if node.name in layers:
            supply(_activation_point(graph, output_node(node_by_name, _layer_of(layers[node.name])).outputs[0]))
        elif node.op == "Add" and len(node.inputs) == 2 and all(
                isinstance(t, gs.Variable) and t.name in sources for t in node.inputs):
            supply(_activation_point(graph, node.outputs[0]))
        elif node.op in POOLING_OPS and node.inputs[0].name in sources:
            supply(_activation_point(graph, node.outputs[0]))
        elif node.op == "Concat" and node.inputs and all(
                isinstance(t, gs.Variable) and t.name in sources for t in node.inputs):
            point = _activation_point(graph, node.outputs[0])
            if point is not None:
                supply(point)
                inputs = tuple(t.name for t in node.inputs)
                private = tuple(_private(graph, name, node, classes, root_of, parent, single_reader, inputs)
                                for name in inputs)
                concats.append(ConcatPlan(node.name, inputs, point.name, private))
    sources = {t: sources[t] for t in sorted(sources, key=order.__getitem__)}
    demanded = {cls.root for cls in classes.values() if cls.demand}
    return LayoutPlan(sources, concats, layer_inputs, parent, {t: r for t, r in root_of.items()}, demanded)


def _private(graph, name: str, concat: gs.Node, classes, root_of, parent, single_reader, inputs) -> bool:
    """The input reaches ``concat`` from an integer kernel's output through single-reader data movement,
    and nothing else reads any tensor on the way: it can take the Concat's factors at no cost."""
    root = root_of.get(name, name)
    cls = classes.get(root)
    if cls is None or cls.demand or inputs.count(name) != 1 or not single_reader(name):
        return False
    path, current = [name], name
    while current in parent:
        current = parent[current]
        path.append(current)
    return len(path) == len(cls.members) and all(single_reader(t) for t in path)


def _tensor_order(graph) -> list[str]:
    names = [t.name for t in graph.gs.inputs]
    for node in graph.nodes:
        names += [t.name for t in node.inputs if isinstance(t, gs.Variable)]
        names += [t.name for t in node.outputs]
    return list(dict.fromkeys(names))


def resolve_layout(graph, plan: LayoutPlan, act_quant: Mapping[str, ActQuantParams],
                   tensor_quant: Mapping[str, ActQuantParams]) -> QdqLayout:
    """The factors of every tensor ``plan`` quantizes. ``act_quant``: layer -> record factors;
    ``tensor_quant``: calibrated tensors. A class whose calibrated factors are missing stays float (its
    layer inputs are quantized with their layers' record factors)."""
    tensors = graph.tensors()
    sources = dict(plan.sources)

    def value(source: Source | None) -> ActQuantParams | None:
        if source is None:
            return None
        return (act_quant if source.kind == "layer" else tensor_quant).get(source.name)

    for name, source in list(sources.items()):
        if value(source) is None:
            del sources[name]
    for name, readers in plan.layer_inputs.items():      # a layer input is always quantized
        if name not in sources:
            sources[name] = Source("layer", readers[0])

    integer, float_concats = [], []
    for concat in plan.concats:
        inputs = [sources.get(t) for t in concat.inputs]
        point = sources.get(concat.point)
        demanded = plan.root.get(concat.point, concat.point) in plan.demanded
        ok = point is not None and all(s is not None for s in inputs)
        if ok and not demanded:
            widths = [_width(value(s)) for s in inputs]
            ok = max(widths) <= CONCAT_RANGE_RATIO * max(min(widths), 1e-30)
        if ok:
            integer.append(concat)
            continue
        float_concats.append(concat.node)
        if not demanded:                                # nothing needs its output quantized
            for member in plan.members(concat.point):
                sources.pop(member, None)
    merged = []
    for concat in reversed(integer):                     # a later Concat's factors reach back through earlier ones
        for name, private in zip(concat.inputs, concat.private):
            if private:
                for member in plan.members(name):
                    if member in sources:
                        sources[member] = sources[concat.point]
                merged.append(name)

    factors = {name: value(source) for name, source in sources.items()}
    paired = [name for name in sources if tensors[name].outputs and not _pad_into_conv(graph, plan, tensors[name],
                                                                                        sources)]
    read_by = {layer: name for name, readers in plan.layer_inputs.items() for layer in readers}
    layer_pairs = {}
    for name, readers in plan.layer_inputs.items():
        source = sources[name]
        if source.kind != "layer" or read_by.get(source.name) != name:
            continue                # a class's factors: every layer reading it uses them
        for layer in readers:
            if act_quant.get(layer) is not None and act_quant[layer] != factors[name]:
                layer_pairs[layer] = act_quant[layer]
    order = {t: i for i, t in enumerate(sources)}
    return QdqLayout(factors, sources, paired, layer_pairs, [c.node for c in integer], float_concats,
                     sorted(merged, key=lambda t: order.get(t, 0)))


def float_readers(graph, layout: QdqLayout, layers, tensor: gs.Tensor) -> list[gs.Node]:
    """The readers of quantized ``tensor`` that take its float value in the QDQ model.

    A calibrated tensor (``tensor_quant``) is read quantized by all its readers. A layer input is read
    quantized by its layers (``layers``: the quantized layers' names) and by the nodes the layout makes
    integer: data movement into quantized outputs, and an Add / pooling / Concat whose inputs and
    outputs are all quantized. Any other reader takes the float tensor, as in the fake-quant and Ascend
    models: a residual Add whose other input stays float adds its skip branch in float (MobileNetV2:
    reading the codes there cost the QDQ model 0.3-0.4 dB against its fake-quant model)."""
    if layout.sources[tensor.name].kind == "tensor":
        return []

    def quantized(t: gs.Tensor) -> bool:        # itself, or after a Relu / Clip folded into its pair
        while t.name not in layout.factors:
            if len(t.outputs) != 1 or t.outputs[0].op not in FOLDABLE_ACTIVATIONS or graph.is_graph_output(t):
                return False
            t = t.outputs[0].outputs[0]
        return True

    def reads_codes(node: gs.Node) -> bool:
        if node.name in layers:
            return True
        if not all(quantized(t) for t in node.outputs if t.outputs or graph.is_graph_output(t)):
            return False
        return moves_data(graph, node) or all(t.name in layout.factors for t in node.inputs
                                              if isinstance(t, gs.Variable))

    return [node for node in tensor.outputs if not reads_codes(node)]


@dataclass(frozen=True)
class Quantizer:
    """One set of factors of a QDQ layout, for a pass that emulates or tunes it (``refine_ranges``).

    ``key``: the tensor the factors belong to (a layer input, or the ``tensor_quant`` entry);
    ``layers``: the layers whose ``act_quant`` entry these factors are (empty: a ``tensor_quant``
    entry); ``tensors``: where values enter quantization with them (``key`` first; quantizing there
    quantizes every tensor of the layout that has these factors, as data movement is exact);
    ``own``: only ``layers`` read the quantized copy (a layer pair), not every reader;
    ``float_readers``: otherwise, the readers of ``tensors`` that take the float value (:func:`float_readers`).
    """

    key: str
    params: ActQuantParams
    layers: tuple[str, ...]
    tensors: tuple[str, ...]
    own: bool = False
    float_readers: tuple[str, ...] = ()


def qdq_quantizers(graph, layers, act_quant: Mapping[str, ActQuantParams],
                   tensor_quant: Mapping[str, ActQuantParams]) -> list[Quantizer]:
    """The quantizers of the QDQ model ``qdq`` lowers from these factors (graph order of their keys).

    Layers sharing a tensor and one ``act_quant`` object share a quantizer (as calibrate hands them)."""
    plan = plan_layout(graph, layers)
    layout = resolve_layout(graph, plan, act_quant, tensor_quant)
    by_name = graph.tensors()
    read_by = {layer: name for name, readers in plan.layer_inputs.items() for layer in readers}
    entries: dict[Source, list[str]] = {}
    for name, source in layout.sources.items():
        parent = plan.parent.get(name)
        if parent is None or layout.sources.get(parent) != source:
            entries.setdefault(source, []).append(name)
    found = []
    for source, tensors in entries.items():
        if source.kind == "layer":
            key = read_by[source.name]
            params = act_quant[source.name]
            owners = tuple(layer for layer in plan.layer_inputs[key] if act_quant.get(layer) is params)
        else:
            key, params, owners = source.name, tensor_quant[source.name], ()
        members = (key, *[t for t in tensors if t != key])
        floats = tuple(node.name for t in members for node in float_readers(graph, layout, layers, by_name[t]))
        found.append(Quantizer(key, params, owners, members, float_readers=floats))
    for layer, params in layout.layer_pairs.items():
        found.append(Quantizer(read_by[layer], params, (layer,), (read_by[layer],), own=True))
    order = {t: i for i, t in enumerate(_tensor_order(graph))}
    return sorted(found, key=lambda q: order[q.key])


def _width(params: ActQuantParams) -> float:
    return params.clip_max - params.clip_min


def _pad_into_conv(graph, plan: LayoutPlan, tensor: gs.Tensor, sources: Mapping[str, Source]) -> bool:
    """A zero Pad whose input has the same factors and whose only reader is a Conv: no pair, so
    onnxruntime folds the Pad into the Conv (a Q/DQ pair between them would keep a float Pad). A Pad
    read by several nodes stays a float Pad between its pairs (onnxruntime has no integer rule for it)."""
    producer = graph.producer(tensor)
    if producer is None or producer.op != "Pad" or plan.parent.get(tensor.name) is None:
        return False
    source = sources.get(plan.parent[tensor.name])
    return (source is not None and source == sources.get(tensor.name) and not graph.is_graph_output(tensor)
            and len(tensor.outputs) == 1 and tensor.outputs[0].op in PAD_FUSING_OPS
            and tensor.outputs[0].inputs[0] is tensor)


# -- what calibration observes --------------------------------------------------------------------
def propagate_factors(graph, factors: dict[str, ActQuantParams]) -> None:
    """Give the input of a data-movement op the factors of its output, when the op is its only reader.

    Quantizing before a MaxPool/Reshape/... with the output's factors gives the same result as after it
    (they commute with a monotone per-tensor quantizer), and lets the producer fuse with the quantizer.
    """
    tensors = graph.tensors()
    pending = list(factors)
    while pending:
        name = pending.pop(0)
        producer = graph.producer(tensors[name])
        if producer is None or not moves_data(graph, producer) or producer.op == "Split":
            continue
        source = producer.inputs[0]
        if (source.name in factors or len(source.outputs) != 1
                or graph.is_graph_output(source) or graph.producer(source) is None):
            continue
        factors[source.name] = factors[name]
        pending.append(source.name)


def extra_tensors(graph, layers, factors: Iterable[str] = ()) -> list[str]:
    """Tensors (graph order) the QDQ layout quantizes with calibrated factors (see the module doc):
    layer, Add and pooling outputs, integer Concat outputs and the roots of data-movement classes.

    ``layers``: the quantized layers, name -> QuantLayer (a LayerMap) or LayerPlan. ``factors``:
    tensor names that already have factors (left out). A calibration pass observes exactly these
    and publishes them as ``tensor_quant``.
    """
    have = set(factors)
    return [name for name in plan_layout(graph, layers).wanted() if name not in have]


def output_tensors(graph, layers, tensors: Iterable[str]) -> list[str]:
    """Those of ``tensors`` (calibrated tensors of the layout) from which no quantized layer is
    reached: the network's last quantized values (a classifier's logits before its Softmax, a
    detector head's outputs). Calibration gives them the calibrator's whole range, not a per-sample
    estimate: their extremes are the answer (the top class), and clipping them with per-sample
    ranges changed MobileNetV2's top class on 6% of the images and cost ResNet-8 9 dB."""
    plan = plan_layout(graph, layers)
    feeds = set(plan.layer_inputs)               # tensors whose values reach a quantized layer
    for node in reversed(list(graph.nodes)):     # graph order is topological
        if any(out.name in feeds for out in node.outputs):
            feeds.update(t.name for t in node.inputs if isinstance(t, gs.Variable))
    return [name for name in tensors if name not in feeds]


def _activation_point(graph, tensor: gs.Tensor) -> gs.Tensor | None:
    """Follow a single-reader Relu/Clip chain; None when the result is a graph output or unread, also
    through Identity nodes (an exported model's named output): a layer writing a model output keeps its
    float output (onnxruntime's QGemm outputs float; an 8-bit pair on logits costs MobileNetV2 0.3 dB)."""
    while (len(tensor.outputs) == 1 and tensor.outputs[0].op in FOLDABLE_ACTIVATIONS
           and not graph.is_graph_output(tensor)):
        tensor = tensor.outputs[0].outputs[0]
    if graph.is_graph_output(tensor) or not tensor.outputs or _only_renamed_output(graph, tensor):
        return None
    return tensor


def _only_renamed_output(graph, tensor: gs.Tensor) -> bool:
    while len(tensor.outputs) == 1 and tensor.outputs[0].op == "Identity" and not graph.is_graph_output(tensor):
        tensor = tensor.outputs[0].outputs[0]
    return graph.is_graph_output(tensor) and not tensor.outputs


def activation_bounds(graph, node: gs.Node) -> tuple[float | None, float | None]:
    """(min, max) of a Relu/Clip; (None, None) when they are not constants."""
    if node.op == "Relu":
        return 0.0, np.inf
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        if index >= len(node.inputs) or not node.inputs[index].name:
            bounds.append(float(node.attrs.get("min" if index == 1 else "max", default)))
            continue
        value = constant_values(node.inputs[index])
        if value is None:
            return None, None
        bounds.append(float(np.asarray(value).reshape(())))
    return bounds[0], bounds[1]
