"""An AMCT quant config read for one model: JSON or ``.cfg`` by suffix, checked against the model's
nodes, every problem of the file one located line of a ConfigError (used by match_layers and fuse_bn).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, Problem
from .cfg import read_cfg
from .errors import ConfigFileError
from .quant_config import read_quant_config

__all__ = ["read_amct_config"]


def read_amct_config(graph, path: str, where: str):
    """Read an AMCT JSON quant config or .cfg (by suffix, relative to the working directory),
    checked against the graph's nodes; every problem of the file becomes one line of a ConfigError."""
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
