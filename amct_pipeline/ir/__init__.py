"""The graph layer: load, edit (over onnx-graphsurgeon), verify and save ONNX models."""
from .graph import Graph, load_graph
from .io import read_model, write_model
from .verify import verify_graph

__all__ = ["Graph", "load_graph", "read_model", "write_model", "verify_graph"]
