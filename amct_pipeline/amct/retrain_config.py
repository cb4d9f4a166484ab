"""AMCT's quantization-aware-training configs (SPEC 2.3): the JSON ``create_quant_retrain_config``
writes, and the simplified retrain ``.cfg`` (protobuf text ``AMCTRetrainConfig``).

Both resolve to ``RetrainConfig``; each layer's settings use AMCT's own algorithm names::

    LayerRetrainConfig(retrain_enable=True, op_type="Conv",
        act={"algo": "ulq_quantize", "dst_type": "INT8", "clip_max": None, "clip_min": None, "fixed_min": None},
        wts={"algo": "arq_retrain", "dst_type": "INT8", "channel_wise": True})

``clip_max``/``clip_min`` ``None`` = initialise by IFMR; ``fixed_min`` ``None`` = AMCT's automatic rule
(true iff the layer's input comes from a Relu), which needs the graph and is left to the caller.
In the ``.cfg``, data and weight settings are resolved separately: ``override_layer_configs`` >
``override_layer_types`` > the global ``retrain_*_quant_config``. Pruning settings are parsed (so
such files load) and their layer names checked, but not resolved.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ._common import (
    LayerSpec, Problems, atomic_write_text, check_choice, check_names, check_types, f32, get, layer_types, load_json,
    read_text, show, unknown_keys,
)
from ..options import suggest
from ._proto import parse_config_text

__all__ = [
    "RETRAIN_TYPES", "LayerRetrainConfig", "RetrainConfig", "create_retrain_config", "write_retrain_config",
    "read_retrain_config", "parse_retrain_config", "read_retrain_cfg", "parse_retrain_cfg",
]

RETRAIN_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_CHANNEL_WISE_TYPES = frozenset({"Conv", "ConvTranspose"})
_ACT_DTYPES, _WTS_DTYPES = ("INT4", "INT8", "INT16"), ("INT4", "INT8")
_ACT_ALGOS, _WTS_ALGOS = ("ulq_quantize",), ("arq_retrain", "ulq_retrain")
_GLOBAL_KEYS = ("version", "batch_num")
_LAYER_KEYS = ("retrain_enable", "retrain_data_config", "retrain_weight_config")
_ACT_KEYS = ("algo", "dst_type", "clip_max", "clip_min", "fixed_min")
_WTS_KEYS = ("algo", "channel_wise", "dst_type")
_DATA_TYPE_NAMES = {0: "INT4", 1: "INT8", 2: "INT16"}   # retrain_config.proto DataType


@dataclass
class LayerRetrainConfig:
    retrain_enable: bool = True
    act: dict[str, Any] = field(default_factory=lambda: _default_act())
    wts: dict[str, Any] = field(default_factory=lambda: _default_wts(None))
    op_type: str | None = None


@dataclass
class RetrainConfig:
    layers: dict[str, LayerRetrainConfig] = field(default_factory=dict)
    version: int = 1
    batch_num: int = 1
    fakequant_precision_mode: str = "DEFAULT"   # .cfg only
    source: str | None = field(default=None, compare=False)

    def enabled_layers(self) -> list[str]:
        return [name for name, layer in self.layers.items() if layer.retrain_enable]

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "batch_num": self.batch_num}
        for name, layer in self.layers.items():
            act = {"algo": layer.act["algo"], "dst_type": layer.act["dst_type"]}
            act.update((k, layer.act[k]) for k in ("clip_max", "clip_min", "fixed_min") if layer.act.get(k) is not None)
            wts = {"algo": layer.wts["algo"]}
            if layer.wts.get("channel_wise") is not None:
                wts["channel_wise"] = layer.wts["channel_wise"]
            wts["dst_type"] = layer.wts["dst_type"]
            out[name] = {"retrain_enable": layer.retrain_enable, "retrain_data_config": act,
                         "retrain_weight_config": wts}
        return out


def _default_act() -> dict[str, Any]:
    return {"algo": "ulq_quantize", "dst_type": "INT8", "clip_max": None, "clip_min": None, "fixed_min": None}


def _default_wts(op_type: str | None) -> dict[str, Any]:
    return {"algo": "arq_retrain", "dst_type": "INT8",
            "channel_wise": None if op_type is None else op_type in _CHANNEL_WISE_TYPES}


# --- JSON -----------------------------------------------------------------------------------------


def create_retrain_config(layers: LayerSpec, *, skip_layers=(), batch_num: int = 1) -> dict[str, Any]:
    """AMCT's default retrain JSON for ``layers``; ``skip_layers`` get ``retrain_enable: false``."""
    p = Problems("create_retrain_config")
    types = layer_types(layers)
    if not (isinstance(batch_num, int) and not isinstance(batch_num, bool) and batch_num > 0):
        p.add("batch_num", f"must be an integer > 0, got {show(batch_num)}")
    skipped = set(check_names(p, "skip_layers", list(skip_layers), types, RETRAIN_TYPES))
    names = [n for n, t in types.items() if t in RETRAIN_TYPES]
    if not names:
        p.add("layers", f"no layer of a retrainable type ({', '.join(RETRAIN_TYPES)}) in the model")
    elif not set(names) - skipped:
        p.add("skip_layers", "skips every retrainable layer; nothing would be retrained")
    p.raise_if_any()
    cfg = RetrainConfig(batch_num=batch_num, layers={
        n: LayerRetrainConfig(n not in skipped, _default_act(), _default_wts(types[n]), types[n]) for n in names})
    return cfg.to_json_dict()


def write_retrain_config(cfg: Mapping[str, Any] | RetrainConfig, path: str | os.PathLike) -> None:
    data = cfg.to_json_dict() if isinstance(cfg, RetrainConfig) else dict(cfg)
    parse_retrain_config(data, source=os.fspath(path))
    atomic_write_text(path, json.dumps(data, indent=4, separators=(",", ":"), ensure_ascii=False) + "\n")


def read_retrain_config(path: str | os.PathLike, layers: LayerSpec | None = None) -> RetrainConfig:
    source = os.fspath(path)
    return parse_retrain_config(load_json(read_text(path), source), layers, source=source)


def parse_retrain_config(data: Any, layers: LayerSpec | None = None, *, source: str = "<dict>") -> RetrainConfig:
    p = Problems(source)
    if not isinstance(data, dict):
        p.add("", f"the top level must be a JSON object, got {show(data)}")
        p.raise_if_any()
    types = None if layers is None else layer_types(layers)
    cfg = RetrainConfig(source=source, version=get(p, data, "version", "", "int", 1),
                        batch_num=get(p, data, "batch_num", "", "int", 1))
    if cfg.version != 1:
        p.add("version", f"must be 1, got {show(cfg.version)}")
    if cfg.batch_num <= 0:
        p.add("batch_num", f"must be > 0, got {cfg.batch_num}")
    for key, value in data.items():
        if key in _GLOBAL_KEYS:
            continue
        if not isinstance(value, dict):
            p.add(key, f"unknown key ({suggest(key, _GLOBAL_KEYS) or 'global keys: version, batch_num'}); "
                       "layer entries must be objects")
            continue
        op_type = None if types is None else types.get(key)
        if types is not None and op_type is None:
            p.add(key, f"unknown layer ({suggest(key, types) or 'not in the model'})")
        elif op_type is not None and op_type not in RETRAIN_TYPES:
            p.add(key, f"is a {op_type} layer, which cannot be retrained (retrainable: {', '.join(RETRAIN_TYPES)})")
        cfg.layers[key] = _parse_layer(p, value, key, op_type)
    p.raise_if_any()
    return cfg


def _parse_layer(p: Problems, obj: Mapping[str, Any], name: str, op_type: str | None) -> LayerRetrainConfig:
    unknown_keys(p, obj, _LAYER_KEYS, name)
    act, wts = _default_act(), _default_wts(op_type)
    data = get(p, obj, "retrain_data_config", name, "dict", {})
    where = f"{name}.retrain_data_config"
    unknown_keys(p, data, _ACT_KEYS, where)
    act.update(algo=get(p, data, "algo", where, "str", act["algo"]), dst_type=get(p, data, "dst_type", where, "str", "INT8"),
               clip_max=get(p, data, "clip_max", where, "number"), clip_min=get(p, data, "clip_min", where, "number"),
               fixed_min=get(p, data, "fixed_min", where, "bool"))
    check_act(p, act, lambda k: f"{where}.{k}")
    weight = get(p, obj, "retrain_weight_config", name, "dict", {})
    where = f"{name}.retrain_weight_config"
    unknown_keys(p, weight, _WTS_KEYS, where)
    wts.update(algo=get(p, weight, "algo", where, "str", wts["algo"]),
               dst_type=get(p, weight, "dst_type", where, "str", "INT8"),
               channel_wise=get(p, weight, "channel_wise", where, "bool", wts["channel_wise"]))
    check_wts(p, wts, op_type, lambda k: f"{where}.{k}")
    return LayerRetrainConfig(get(p, obj, "retrain_enable", name, "bool", True), act, wts, op_type)


def check_act(p: Problems, act: Mapping[str, Any], at) -> None:
    check_choice(p, at("algo"), act["algo"], _ACT_ALGOS)
    check_choice(p, at("dst_type"), act["dst_type"], _ACT_DTYPES)
    if act["clip_max"] is not None and not (math.isfinite(act["clip_max"]) and act["clip_max"] > 0):
        p.add(at("clip_max"), f"must be finite and > 0, got {show(act['clip_max'])}")
    if act["clip_min"] is not None and not (math.isfinite(act["clip_min"]) and act["clip_min"] < 0):
        p.add(at("clip_min"), f"must be finite and < 0, got {show(act['clip_min'])}")


def check_wts(p: Problems, wts: Mapping[str, Any], op_type: str | None, at) -> None:
    check_choice(p, at("algo"), wts["algo"], _WTS_ALGOS)
    check_choice(p, at("dst_type"), wts["dst_type"], _WTS_DTYPES)
    if wts["channel_wise"] and op_type is not None and op_type not in _CHANNEL_WISE_TYPES:
        p.add(at("channel_wise"), f"must be false for {op_type} layers "
                                  f"(only {', '.join(sorted(_CHANNEL_WISE_TYPES))} support channel-wise weights)")


# --- .cfg -----------------------------------------------------------------------------------------


def read_retrain_cfg(path: str | os.PathLike, layers: LayerSpec) -> RetrainConfig:
    return parse_retrain_cfg(read_text(path), layers, source=os.fspath(path))


def parse_retrain_cfg(text: str, layers: LayerSpec, *, source: str = "<string>") -> RetrainConfig:
    msg = parse_config_text(text, "AMCTPytorchProto.AMCTRetrainConfig", source)
    p = Problems(source)
    types = layer_types(layers)
    for path in msg.FindInitializationErrors():
        p.add(path, "required field is missing")
    cfg = RetrainConfig(source=source, batch_num=msg.batch_num)
    if msg.batch_num <= 0:
        p.add("batch_num", f"must be > 0, got {msg.batch_num}")
    if msg.HasField("fakequant_precision_mode"):
        cfg.fakequant_precision_mode = "FORCE_FP16_QUANT"
    skipped, skipped_types = set(), set()
    for key in ("skip_layers", "quant_skip_layers"):
        skipped.update(check_names(p, key, getattr(msg, key), types, RETRAIN_TYPES))
    for key in ("skip_layer_types", "quant_skip_types"):
        skipped_types.update(check_types(p, key, list(getattr(msg, key)), RETRAIN_TYPES, "retrained", "retrainable"))
    check_names(p, "regular_prune_skip_layers", msg.regular_prune_skip_layers, types, None)  # pruning: names only
    base = _parts(p, msg, "", None)
    good_types = set(check_types(p, "override_layer_types", [x.layer_type for x in msg.override_layer_types],
                                 RETRAIN_TYPES, "retrained", "retrainable"))
    by_type = {item.layer_type: _parts(p, item, f"override_layer_types[{i}]", item.layer_type)
               for i, item in enumerate(msg.override_layer_types) if item.layer_type in good_types}
    names = [item.layer_name for item in msg.override_layer_configs]
    good = set(check_names(p, "override_layer_configs", names, types, RETRAIN_TYPES,
                           label=lambda i: f"override_layer_configs[{i}].layer_name"))
    by_name = {item.layer_name: _parts(p, item, f"override_layer_configs[{i}]", types[item.layer_name])
               for i, item in enumerate(msg.override_layer_configs) if item.layer_name in good}
    for name, op_type in types.items():
        if op_type not in RETRAIN_TYPES:
            continue
        layer_parts = [by_name.get(name, (None, None)), by_type.get(op_type, (None, None)), base]
        act = next((a for a, _ in layer_parts if a is not None), None) or _default_act()
        wts = dict(next((w for _, w in layer_parts if w is not None), None) or _default_wts(op_type))
        if wts["channel_wise"] is None:
            wts["channel_wise"] = op_type in _CHANNEL_WISE_TYPES
        cfg.layers[name] = LayerRetrainConfig(name not in skipped and op_type not in skipped_types,
                                              dict(act), wts, op_type)
    p.raise_if_any()
    return cfg


def _parts(p: Problems, msg, where: str, op_type: str | None):
    """(act, wts) set by one message with retrain_data/weight_quant_config fields; None where unset."""
    prefix = f"{where}." if where else ""
    act = wts = None
    if msg.HasField("retrain_data_quant_config") and msg.retrain_data_quant_config.HasField("ulq_quantize"):
        ulq = msg.retrain_data_quant_config.ulq_quantize
        act = {"algo": "ulq_quantize", "dst_type": _DATA_TYPE_NAMES[ulq.dst_type], "clip_max": None,
               "clip_min": None, "fixed_min": ulq.fixed_min if ulq.HasField("fixed_min") else None}
        if ulq.HasField("clip_max_min"):
            act["clip_max"], act["clip_min"] = f32(ulq.clip_max_min.clip_max), f32(ulq.clip_max_min.clip_min)
        at = f"{prefix}retrain_data_quant_config.ulq_quantize"
        check_act(p, act, lambda k: f"{at}.clip_max_min.{k}" if k.startswith("clip") else f"{at}.{k}")
    config = msg.retrain_weight_quant_config if msg.HasField("retrain_weight_quant_config") else None
    algo = config.WhichOneof("weights_retrain_algo") if config is not None else None
    if algo:
        q = getattr(config, algo)
        wts = {"algo": algo, "dst_type": _DATA_TYPE_NAMES[q.dst_type],
               "channel_wise": q.channel_wise if q.HasField("channel_wise") else None}
        at = f"{prefix}retrain_weight_quant_config.{algo}"
        check_wts(p, wts, op_type, lambda k: f"{at}.{k}")
    return act, wts
