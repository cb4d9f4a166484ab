"""Structural verification: unique names, topological order, no dangling tensors."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..errors import VerificationError

__all__ = ["verify_graph", "toposort_or_raise", "check_with_onnx"]


def verify_graph(graph, *, where: str = "the graph", full: bool = False) -> None:
    """Raise VerificationError with one line naming the node or tensor at fault."""
    g = graph.gs
    _check_unique_names(g, where)
    toposort_or_raise(g, where)
    known = {t.name for t in g.inputs} | {n for n, t in g.tensors().items() if isinstance(t, gs.Constant)}
    known.add("")
    for node in g.nodes:
        for tensor in reads(node):
            if tensor.name not in known and not isinstance(tensor, gs.Constant):
                inside = "" if any(t is tensor for t in node.inputs) else " in a subgraph"
                raise VerificationError(f"{where}: node '{node.name}' ({node.op}) reads tensor "
                                        f"'{tensor.name}'{inside}, which no node, input or initializer provides")
        known.update(t.name for t in node.outputs)
    for tensor in g.outputs:
        if tensor.name not in known:
            raise VerificationError(f"{where}: graph output '{tensor.name}' is not produced by any node")
    if full:
        check_with_onnx(graph, where)


def _check_unique_names(g: gs.Graph, where: str) -> None:
    seen: dict[str, str] = {}
    for node in g.nodes:
        if node.name in seen:
            raise VerificationError(f"{where}: two nodes are named '{node.name}'")
        seen[node.name] = node.op
    produced: dict[str, str] = {t.name: "graph input" for t in g.inputs}
    for node in g.nodes:
        for tensor in node.outputs:
            if tensor.name in produced:
                raise VerificationError(f"{where}: tensor '{tensor.name}' is produced by node "
                                        f"'{node.name}' and by {produced[tensor.name]}")
            produced[tensor.name] = f"node '{node.name}'"


def toposort_or_raise(g: gs.Graph, where: str) -> None:
    """Sort nodes topologically, keeping the given order wherever it is already valid.

    Depth-first from each node in list order: a node moves only to follow what it reads, so
    nodes a pass appended land just before their first consumer. A cycle names a node on it.
    """
    if _is_sorted(g):
        return
    producer = {t.name: node for node in g.nodes for t in node.outputs}
    state: dict[int, int] = {}          # 1 = on the current path, 2 = emitted
    order: list[gs.Node] = []
    for root in g.nodes:
        stack = [(root, iter(_deps(root, producer)))]
        while stack:
            node, deps = stack[-1]
            if state.get(id(node)) == 2:
                stack.pop()
                continue
            state[id(node)] = 1
            dep = next(deps, None)
            if dep is None:
                state[id(node)] = 2
                order.append(node)
                stack.pop()
            elif state.get(id(dep)) == 1:
                raise VerificationError(f"{where}: the graph has a cycle through node '{dep.name}' ({dep.op})")
            elif state.get(id(dep)) != 2:
                stack.append((dep, iter(_deps(dep, producer))))
    g.nodes = order


def _deps(node: gs.Node, producer: dict) -> list[gs.Node]:
    return [producer[t.name] for t in reads(node) if t.name in producer]


def reads(node: gs.Node) -> list[gs.Tensor]:
    """The tensors a node reads: its inputs and, for If/Loop/Scan, what its subgraphs read from outside."""
    tensors = list(node.inputs)
    for value in node.attrs.values():
        for sub in value if isinstance(value, list) else [value]:
            if isinstance(sub, gs.Graph):
                tensors += _outer_reads(sub)
    return tensors


def _outer_reads(graph: gs.Graph) -> list[gs.Tensor]:
    local = {t.name for t in graph.inputs} | {t.name for n in graph.nodes for t in n.outputs}
    return [t for node in graph.nodes for t in reads(node)
            if t.name and t.name not in local and not isinstance(t, gs.Constant)]


def check_with_onnx(graph, where: str) -> None:
    import onnx
    model = graph.to_proto()
    try:
        onnx.checker.check_model(model) if model.ByteSize() < (2 << 30) else None
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise VerificationError(f"{where}: onnx.checker: {first}") from None


def _is_sorted(g: gs.Graph) -> bool:
    produced_by = {t.name: i for i, node in enumerate(g.nodes) for t in node.outputs}
    return all(produced_by.get(t.name, -1) < i for i, node in enumerate(g.nodes) for t in reads(node))
