"""The decomposition info file, in AMCT's shape (SPEC 7).

One entry per decomposed layer, keyed by the layer name::

    {"Conv_2": {"ori_layer_info": {"name", "in_channels", "out_channels", "kernel_size", "stride",
                                   "dilation", "groups", (ours:) "padding", "bias"},
                "mode": "SCFK",
                "decom_nodes": {"first": {"weight_shape": [...], (ours:) "name", ...},
                                "last":  {"weight_shape": [...], ...}},
                (ours:) "method": "spatial_svd", "rank": [32]}}

AMCT's keys come first and mean what they mean in AMCT; ours are extra keys inside the entries so
that a reader of AMCT's format still finds what it expects. Child conv names are ``<layer>.<i>``
(AMCT's ``changes`` use the same form), their weights ``<child>.weight`` / ``<child>.bias``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...errors import ConfigError, Problem
from .layer import ChildSpec, ConvLayer, Rank

__all__ = ["MODE_METHODS", "layer_info", "info_entry", "read_info", "check_layer_matches", "entry_method",
           "child_names", "child_shapes", "INFO_FORMAT"]

INFO_FORMAT = "amct_pipeline.decompose_info"
MODE_METHODS = {"SCFK": "spatial_svd", "FCFK": "spatial_svd", "TUCKER2": "tucker2", "CP": "cp"}
COMPARED = ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups")


def layer_info(layer: ConvLayer) -> dict[str, Any]:
    return {"name": layer.name, "in_channels": layer.cin, "out_channels": layer.cout,
            "kernel_size": list(layer.kernel), "stride": list(layer.stride), "dilation": list(layer.dilation),
            "groups": layer.group, "padding": list(layer.pads), "bias": layer.has_bias}


def info_entry(layer: ConvLayer, method: str, mode: str, rank: Rank, children: Sequence[ChildSpec],
               names: Sequence[str]) -> dict[str, Any]:
    nodes = {spec.role: {"name": name, **spec.to_json()} for spec, name in zip(children, names)}
    for node in nodes.values():
        node.pop("role")
    return {"ori_layer_info": layer_info(layer), "mode": mode, "decom_nodes": nodes,
            "method": method, "rank": list(rank)}


def read_info(path: str | Path) -> dict[str, dict[str, Any]]:
    """Load and shape-check an info file; every problem is a ConfigError naming the file and key."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError([Problem(where, "", "decomposition info file not found",
                                   "give the file the decompose pass wrote (info_file)")])
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(where, "", f"not valid JSON: {exc}")]) from None
    if not isinstance(data, dict) or not data:
        raise ConfigError([Problem(where, "", "expected a non-empty mapping of layer name -> entry")])
    problems = [p for name, entry in data.items() for p in _entry_problems(where, name, entry)]
    if problems:
        raise ConfigError(problems)
    return data


def _entry_problems(where: str, name: str, entry: Any) -> list[Problem]:
    if not isinstance(entry, dict):
        return [Problem(where, name, "entry is not a mapping")]
    problems = [Problem(where, f"{name}.{key}", "missing") for key in ("ori_layer_info", "mode", "decom_nodes")
                if key not in entry]
    nodes = entry.get("decom_nodes")
    if isinstance(nodes, dict):
        problems += [Problem(where, f"{name}.decom_nodes.{role}", "has no weight_shape")
                     for role, node in nodes.items() if not isinstance(node, dict) or "weight_shape" not in node]
    elif nodes is not None:
        problems.append(Problem(where, f"{name}.decom_nodes", "expected a mapping of child role -> weight_shape"))
    if "method" not in entry and entry.get("mode") not in MODE_METHODS and "mode" in entry:
        problems.append(Problem(where, f"{name}.mode", f"unknown mode {entry.get('mode')!r}",
                                f"known: {', '.join(MODE_METHODS)}"))
    return problems


def entry_method(entry: Mapping[str, Any]) -> str:
    return entry.get("method") or MODE_METHODS[entry["mode"]]


def child_shapes(entry: Mapping[str, Any]) -> list[list[int]]:
    return [list(node["weight_shape"]) for node in entry["decom_nodes"].values()]


def child_names(entry: Mapping[str, Any], layer_name: str) -> list[str]:
    """Saved child names, or AMCT's ``<layer>.<i>`` when the file (e.g. AMCT's own) has none."""
    return [node.get("name") or f"{layer_name}.{i}" for i, node in enumerate(entry["decom_nodes"].values())]


def check_layer_matches(where: str, entry: Mapping[str, Any], layer: ConvLayer) -> list[Problem]:
    """The model's layer must be the one the file was made from (channels, kernel, stride, ...)."""
    saved = entry["ori_layer_info"]
    actual = layer_info(layer)
    return [Problem(where, f"{layer.name}.ori_layer_info.{key}",
                    f"the file says {saved[key]!r} but the model's '{layer.name}' has {actual[key]!r}",
                    "re-apply the file to the model it was made from")
            for key in COMPARED if key in saved and not _same(saved[key], actual[key])]


def _same(saved: Any, actual: Any) -> bool:
    """Equal values; PyTorch writes ``kernel_size: 3`` where we write ``[3, 3]``."""
    if isinstance(saved, (int, float)) and isinstance(actual, list):
        return all(int(saved) == v for v in actual)
    if isinstance(saved, (list, tuple)) and isinstance(actual, list):
        return [int(v) for v in saved] == actual
    return saved == actual
