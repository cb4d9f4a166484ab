"""Program: the engine's form of a graph (nodes in topological order over named tensors, constants),
with the edits retraining needs: inserting engine operators (fake quantization) and cutting out the
sub-graph between two tensor sets (a block).

A Program never changes the graph it came from; it shares constant arrays with it (read only).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx

from ..ir.constants import constant_node, constant_values, is_constant
from ..ir.graph import Graph, iter_subgraphs, load_graph
from ._util import AutodiffError
from .op import Op, make_op

__all__ = ["Node", "Program"]


@dataclass
class Node:
    name: str
    op: Op
    inputs: list[str]          # "" for an omitted optional input
    outputs: list[str]

    @property
    def op_type(self) -> str:
        return self.op.op_type


@dataclass
class Program:
    nodes: list[Node]
    constants: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]
    opset: int = 17
    meta: dict = field(default_factory=dict)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_graph(cls, source: Graph | onnx.ModelProto | str | Path) -> "Program":
        """From an ``ir.Graph``, a ModelProto or a model file (external data read beside it).

        Every operator is checked here: an unsupported one is an error naming the node."""
        graph = source if isinstance(source, Graph) else load_graph(source)
        g = graph.gs
        opset = graph.opset
        constants: dict[str, np.ndarray] = {}
        for name, tensor in g.tensors().items():
            if is_constant(tensor) and constant_node(tensor) is None:      # initializers (Constant nodes run)
                constants[name] = np.asarray(constant_values(tensor))
        inputs = [t.name for t in g.inputs if t.name not in constants]
        nodes = []
        problems = []
        for node in g.nodes:
            if any(True for _ in iter_subgraphs(node)):
                problems.append(f"node '{node.name}' ({node.op}): sub-graphs (If / Loop / Scan) are not supported")
                continue
            attrs = {key: _attr_value(value) for key, value in node.attrs.items()}
            try:
                op = make_op(node.op, attrs, _domain_opset(g, node.domain, opset), len(node.inputs),
                             len(node.outputs), node.name, node.domain or "")
            except AutodiffError as exc:
                problems.append(str(exc))
                continue
            nodes.append(Node(node.name, op, [t.name for t in node.inputs], [t.name for t in node.outputs]))
        if problems:
            raise AutodiffError("; ".join(problems))
        return cls(nodes, constants, inputs, [t.name for t in g.outputs], opset)

    def copy(self) -> "Program":
        """A program sharing operators and constant arrays, with its own node list and dicts."""
        nodes = [Node(n.name, n.op, list(n.inputs), list(n.outputs)) for n in self.nodes]
        return Program(nodes, dict(self.constants), list(self.inputs), list(self.outputs), self.opset, dict(self.meta))

    # -- queries ---------------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def producer(self, tensor: str) -> Node | None:
        for node in self.nodes:
            if tensor in node.outputs:
                return node
        return None

    def consumers(self, tensor: str) -> list[Node]:
        return [n for n in self.nodes if tensor in n.inputs]

    def tensor_names(self) -> set[str]:
        names = set(self.constants) | set(self.inputs)
        for node in self.nodes:
            names.update(node.outputs)
        return names

    def op_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return counts

    def unique_name(self, base: str) -> str:
        taken = self.tensor_names() | {n.name for n in self.nodes}
        if base not in taken:
            return base
        return next(f"{base}_{i}" for i in itertools.count(1) if f"{base}_{i}" not in taken)

    def cut_points(self) -> list[str]:
        """Tensors that alone carry everything later nodes need: after one is produced, no other
        non-constant tensor is still to be read. The program input comes first when it is the only
        one; a graph output is live to the end. Block boundaries for block-by-block training."""
        static = self.static_tensors()
        readers: dict[str, int] = {}
        for node in self.nodes:
            for t in set(node.inputs):
                if t and t not in static:
                    readers[t] = readers.get(t, 0) + 1
        outputs = set(self.outputs)
        live = {t for t in self.inputs if readers.get(t) or t in outputs}
        cuts = list(live) if len(live) == 1 else []
        for node in self.nodes:
            for t in set(node.inputs):
                if t in readers:
                    readers[t] -= 1
                    if not readers[t] and t not in outputs:
                        live.discard(t)
            live.update(t for t in node.outputs if t and t not in static and (readers.get(t) or t in outputs))
            if len(live) == 1 and next(iter(live)) in node.outputs:
                cuts.append(next(iter(live)))
        return cuts

    def blocks(self, min_layers: int = 1, layer_types: Sequence[str] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
               ) -> list[tuple[list[str], list[str]]]:
        """Consecutive ``(inputs, outputs)`` pieces between cut points, each with at least ``min_layers``
        nodes of ``layer_types`` where the graph allows (a short tail joins the last piece, which ends at
        the program outputs)."""
        cuts = [c for c in self.cut_points() if c not in self.outputs]
        position = {t: i for i, n in enumerate(self.nodes) for t in n.outputs}
        pieces: list[tuple[list[str], list[str]]] = []
        start, count = list(self.inputs), 0
        last = -1
        for cut in cuts:
            end = position.get(cut, -1)
            count += sum(1 for n in self.nodes[last + 1:end + 1] if n.op_type in layer_types)
            last = max(last, end)
            if count >= min_layers and cut not in start:
                pieces.append((start, [cut]))
                start, count = [cut], 0
        if start != list(self.outputs):
            count += sum(1 for n in self.nodes[last + 1:] if n.op_type in layer_types)
            if pieces and count < min_layers:
                pieces[-1] = (pieces[-1][0], list(self.outputs))      # a short tail joins the last piece
            else:
                pieces.append((start, list(self.outputs)))
        return pieces

    def static_tensors(self) -> set[str]:
        """Constants and what nodes compute from constants alone (a weight seen through Reshape)."""
        static = set(self.constants) | {""}
        for node in self.nodes:
            if all(t in static for t in node.inputs):
                static.update(node.outputs)
        return static

    # -- edits -----------------------------------------------------------------------------------
    def add_constant(self, name: str, value) -> str:
        """A new constant tensor (e.g. a learnable clip or scale, made trainable by the Executor)."""
        if name in self.tensor_names():
            raise AutodiffError(f"tensor '{name}' already exists")
        self.constants[name] = np.asarray(value)
        return name

    def insert(self, op: Op, inputs: Sequence[str], output: str | None = None,
               consumers: Iterable[str] | None = None, name: str | None = None, replaces: str | None = None) -> str:
        """Insert ``op`` reading ``inputs``; the nodes ``consumers`` (node names; default every reader)
        then read its output instead of ``replaces`` (default ``inputs[0]``). Returns the output's name.

        Typical use: ``prog.insert(ULQ(), [x, clip_max, clip_min], consumers=[conv])``, on a weight
        ``prog.insert(ARQRetrain(), [weight], consumers=[conv])``, and for a weight computed from other
        parameters ``prog.insert(AdaRound(w, s), [alpha], replaces=weight, consumers=[conv])``."""
        source = replaces or inputs[0]
        known = self.tensor_names()
        for tensor in inputs:
            if tensor and tensor not in known:
                raise AutodiffError(f"insert: tensor '{tensor}' does not exist")
        readers = [n for n in self.nodes if source in n.inputs]
        if consumers is not None:
            wanted = set(consumers)
            missing = wanted - {n.name for n in readers}
            if missing:
                raise AutodiffError(f"insert: node(s) {sorted(missing)} do not read '{source}'")
            readers = [n for n in readers if n.name in wanted]
        if source not in known:
            raise AutodiffError(f"insert: tensor '{source}' does not exist")
        output = output or self.unique_name(f"{source}.{op.op_type.lower()}")
        if output in known:
            raise AutodiffError(f"insert: tensor '{output}' already exists")
        node_name = name or self.unique_name(f"{source}.{op.op_type}")
        op.name = op.name or node_name
        new = Node(node_name, op, list(inputs), [output])
        position = self._position_after(inputs)
        if readers:
            first = min(self.nodes.index(r) for r in readers)
            if first < position:
                raise AutodiffError(f"insert: an input of '{node_name}' is produced after its first reader "
                                    f"'{self.nodes[first].name}'")
            position = first
        self.nodes.insert(position, new)
        for reader in readers:
            reader.inputs = [output if t == source else t for t in reader.inputs]
        return output

    def _position_after(self, tensors: Sequence[str]) -> int:
        last = 0
        for i, node in enumerate(self.nodes):
            if any(t in node.outputs for t in tensors if t):
                last = i + 1
        return last

    def subprogram(self, inputs: Sequence[str], outputs: Sequence[str]) -> "Program":
        """The nodes computing ``outputs`` from ``inputs`` and constants (a block of the graph)."""
        inputs, outputs = list(inputs), list(outputs)
        available = set(inputs) | set(self.constants) | {""}
        producers = {t: n for n in self.nodes for t in n.outputs}
        needed: set[str] = set()
        stack = [t for t in outputs if t not in available]
        while stack:
            tensor = stack.pop()
            node = producers.get(tensor)
            if node is None:
                raise AutodiffError(f"sub-graph: the outputs {outputs} need graph input '{tensor}', which is "
                                    f"not among the block inputs {inputs}")
            if node.name in needed:
                continue
            needed.add(node.name)
            stack.extend(t for t in node.inputs if t not in available)
        nodes = [Node(n.name, n.op, list(n.inputs), list(n.outputs)) for n in self.nodes if n.name in needed]
        used = {t for n in nodes for t in n.inputs} | set(outputs)
        constants = {k: v for k, v in self.constants.items() if k in used}
        return Program(nodes, constants, inputs, outputs, self.opset, dict(self.meta))


def _attr_value(value):
    """Tensor attributes (a Constant's ``value``) as arrays; everything else as onnx-graphsurgeon gives it."""
    if hasattr(value, "inputs") and hasattr(value, "outputs"):
        return np.asarray(constant_values(value))
    return value


def _domain_opset(g, domain: str, default: int) -> int:
    imports = getattr(g, "import_domains", None) or []
    for entry in imports:
        if (entry.domain or "") == (domain or ""):
            return int(entry.version)
    return default
