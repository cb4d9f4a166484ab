"""Graph: a thin wrapper over ``onnx_graphsurgeon.Graph`` that passes edit in place."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import onnx
import onnx_graphsurgeon as gs

from ..errors import AmctError, ModelLoadError, VerificationError
from .external import ExternalValues, is_external
from .io import export_proto, read_model
from .verify import toposort_or_raise, verify_graph

__all__ = ["Graph", "ModelMeta", "load_graph", "fresh_name"]


def fresh_name(base: str, taken) -> str:
    """``base`` if free, else ``base_1``, ``base_2``... (the one naming rule for new nodes and tensors)."""
    if base not in taken:
        return base
    return next(f"{base}_{i}" for i in itertools.count(1) if f"{base}_{i}" not in taken)


@dataclass
class ModelMeta:
    """Model-level fields that onnx-graphsurgeon does not keep."""

    ir_version: int = 8
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    functions: list = field(default_factory=list)


class Graph:
    """The graph passes work on. ``g.gs`` is the onnx-graphsurgeon graph; helpers keep edits safe."""

    def __init__(self, graph: gs.Graph, meta: ModelMeta | None = None, name: str = "model") -> None:
        self.gs = graph
        self.meta = meta or ModelMeta()
        self.name = name          # file stem or "model"; used to name outputs

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_proto(cls, model: onnx.ModelProto, *, base_dir: str | Path | None = None,
                   name: str = "model") -> "Graph":
        """Import a ModelProto. The proto may be aliased: pass a copy if the caller keeps it."""
        graph = gs.import_onnx(model)
        if base_dir is not None:
            _attach_external(graph, base_dir)
        _name_nodes(graph)
        meta = ModelMeta(
            ir_version=model.ir_version, producer_name=model.producer_name,
            producer_version=model.producer_version, domain=model.domain,
            model_version=model.model_version, doc_string=model.doc_string,
            metadata={p.key: p.value for p in model.metadata_props},
            functions=list(model.functions))
        return cls(graph, meta, name)

    def to_proto(self, external=None) -> onnx.ModelProto:
        """Export. ``external(tensor_proto_stub_factory)`` streams big constants (see io.write_model)."""
        return export_proto(self, external)

    # -- queries -----------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return int(self.gs.opset)

    @property
    def nodes(self) -> list[gs.Node]:
        return self.gs.nodes

    def tensors(self) -> dict[str, gs.Tensor]:
        return self.gs.tensors()

    def node(self, name: str) -> gs.Node:
        for node in self.gs.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def node_names(self) -> list[str]:
        return [n.name for n in self.gs.nodes]

    @staticmethod
    def producer(tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    @staticmethod
    def consumers(tensor: gs.Tensor) -> list[gs.Node]:
        return list(tensor.outputs)

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return any(t is tensor for t in self.gs.outputs)

    def unique_name(self, base: str) -> str:
        """A tensor/node name not used in the graph yet."""
        return fresh_name(base, set(self.tensors()) | set(self.node_names()))

    def finalize(self) -> None:
        """Drop unused nodes/tensors and restore topological order after edits."""
        self.gs.cleanup(remove_unused_graph_inputs=False)
        toposort_or_raise(self.gs, "the edited graph")

    def op_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.gs.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts

    def __iter__(self) -> Iterator[gs.Node]:
        return iter(self.gs.nodes)


def load_graph(source, *, copy: bool = True) -> Graph:
    """A Graph from a path or an in-memory ModelProto (copied unless ``copy=False``)."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        if copy:
            model.CopyFrom(source)
        else:
            model = source
        base_dir, name = None, "model"
    else:
        path = Path(source)
        model, base_dir, name = read_model(path), path.parent, path.stem
    try:
        graph = Graph.from_proto(model, base_dir=base_dir, name=name)
    except AmctError:
        raise
    except Exception as exc:     # onnx-graphsurgeon's import of a malformed model: name the model, one line
        where = source if isinstance(source, (str, Path)) else "the model"
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelLoadError(f"{where}: cannot import the graph ({type(exc).__name__}: {text}); "
                             "the model is malformed") from None
    verify_graph(graph, where="the input model")
    return graph


def _attach_external(graph: gs.Graph, base_dir: str | Path) -> None:
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if isinstance(tensor, gs.Constant) and hasattr(values, "tensor") and is_external(values.tensor):
            tensor._values = ExternalValues(values.tensor, base_dir)


def _name_nodes(graph: gs.Graph) -> None:
    """Give every nameless node a stable name (``Conv_3``): layers are addressed by name."""
    taken = {n.name for n in graph.nodes if n.name}
    for index, node in enumerate(graph.nodes):
        if not node.name:
            name = f"{node.op}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def iter_subgraphs(node: gs.Node) -> Iterable[gs.Graph]:
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value
        elif isinstance(value, list):
            yield from (v for v in value if isinstance(v, gs.Graph))


__all__ += ["VerificationError", "iter_subgraphs"]
