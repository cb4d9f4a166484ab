"""AMCT's JSON quant config (SPEC 2.1): create, write, read with AMCT's validation.

The parsed form is ``QuantConfig``: global settings plus one ``LayerQuantConfig`` per layer entry, with
AMCT's JSON spellings turned into our option names::

    LayerQuantConfig(quant_enable=True, op_type="Conv", dmq_balancer=None,
        act={"algo": "ifmr", "num_bits": 8, "asymmetric": True, "max_percentile": 0.999999,
             "min_percentile": 0.999999, "search_range_start": 0.7, "search_range_end": 1.3,
             "search_step": 0.01},                   # HFMG: {"algo": "hfmg", "num_bits", "asymmetric", "num_of_bins"}
        wts={"algo": "arq", "num_bits": 8, "channel_wise": True})   # None for AveragePool;
                                                     # ADA adds num_iteration, reg_param, beta_range_start/end, warm_start

``asymmetric`` is resolved (per-layer value, else the global ``activation_offset``). ``channel_wise`` is
``None`` only when the layer's op type is unknown (no ``layers`` given) and the file does not say.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ._common import (
    LayerSpec, Problems, atomic_write_text, check_choice, check_names, check_range, get, layer_types, load_json,
    read_text, show, unknown_keys,
)
from ..options import suggest

__all__ = [
    "QUANTIZABLE_TYPES", "CHANNEL_WISE_TYPES", "LayerQuantConfig", "TensorQuantConfig", "QuantConfig",
    "create_quant_config", "write_quant_config", "read_quant_config", "parse_quant_config",
    "default_act", "default_wts",
]

QUANTIZABLE_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool")
CHANNEL_WISE_TYPES = frozenset({"Conv", "ConvTranspose"})
WEIGHTLESS_TYPES = frozenset({"AveragePool"})
INT16_ACT_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm"})
LOW_BIT_WTS_TYPES = frozenset({"Conv"})  # 6/7-bit weights (stored as INT8)
FUSABLE_TYPES = frozenset({"Conv"})      # Conv+BN, controlled by do_fusion / skip_fusion_layers
ACT_BITS, WTS_BITS, NUM_OF_BINS = (4, 8, 16), (4, 6, 7, 8), (1024, 2048, 4096, 8192)
FAKEQUANT_MODES = ("DEFAULT", "FORCE_FP16_QUANT")

IFMR_DEFAULTS = {"max_percentile": 0.999999, "min_percentile": 0.999999,
                 "search_range_start": 0.7, "search_range_end": 1.3, "search_step": 0.01}
HFMG_DEFAULTS = {"num_of_bins": 4096}
ADA_DEFAULTS = {"num_iteration": 10000, "reg_param": 0.01, "beta_range_start": 20.0, "beta_range_end": 2.0,
                "warm_start": 0.2}

_GLOBAL_KEYS = ("version", "batch_num", "activation_offset", "joint_quant", "weight_offset", "do_fusion",
                "fakequant_precision_mode", "skip_fusion_layers", "tensor_quantize")
_LAYER_KEYS = ("quant_enable", "dmq_balancer_param", "activation_quant_params", "weight_quant_params")
_IFMR_KEYS = ("max_percentile", "min_percentile", "search_range", "search_step")
_HFMG_KEYS = ("num_of_bins",)
_ACT_KEYS = ("num_bits",) + _IFMR_KEYS + ("act_algo", "asymmetric") + _HFMG_KEYS
_ADA_KEYS = ("num_iteration", "reg_param", "beta_range", "warm_start")
_WTS_KEYS = ("num_bits", "wts_algo") + _ADA_KEYS + ("channel_wise",)
_TENSOR_KEYS = ("layer_name", "input_index", "activation_quant_params")


@dataclass
class LayerQuantConfig:
    """Resolved settings of one layer (see the module docstring for ``act``/``wts``)."""

    quant_enable: bool = True
    act: dict[str, Any] = field(default_factory=lambda: default_act(True))
    wts: dict[str, Any] | None = field(default_factory=lambda: default_wts(None))
    dmq_balancer: float | None = None   # DMQ migration strength, None = no balancing
    op_type: str | None = None


@dataclass
class TensorQuantConfig:
    """Quantization of one input tensor of a layer (``tensor_quantize``: MaxPool/Add inputs)."""

    layer_name: str
    input_index: int
    act: dict[str, Any]


@dataclass
class QuantConfig:
    """A parsed AMCT quant config; ``layers`` is in file (JSON) or graph (``.cfg``) order."""

    layers: dict[str, LayerQuantConfig] = field(default_factory=dict)
    version: int = 1
    batch_num: int = 1
    activation_offset: bool = True
    do_fusion: bool = True
    skip_fusion_layers: list[str] = field(default_factory=list)
    joint_quant: bool = False
    weight_offset: bool = False
    fakequant_precision_mode: str = "DEFAULT"
    tensor_quantize: list[TensorQuantConfig] = field(default_factory=list)
    nuq: dict[str, Any] | None = None   # .cfg nuq_config: {mapping_file, num_steps, num_of_iteration}
    source: str | None = field(default=None, compare=False)

    def enabled_layers(self) -> list[str]:
        return [name for name, layer in self.layers.items() if layer.quant_enable]

    def to_json_dict(self) -> dict[str, Any]:
        """AMCT's JSON form (key order as AMCT writes it)."""
        out: dict[str, Any] = {"version": self.version, "batch_num": self.batch_num,
                               "activation_offset": self.activation_offset}
        for key in ("joint_quant", "weight_offset"):
            if getattr(self, key):
                out[key] = True
        out["do_fusion"] = self.do_fusion
        if self.fakequant_precision_mode != "DEFAULT":  # AMCT drops the default
            out["fakequant_precision_mode"] = self.fakequant_precision_mode
        out["skip_fusion_layers"] = list(self.skip_fusion_layers)
        for name, layer in self.layers.items():
            out[name] = _layer_json(layer)
        if self.tensor_quantize:
            out["tensor_quantize"] = [{"layer_name": t.layer_name, "input_index": t.input_index,
                                       "activation_quant_params": _act_json(t.act)} for t in self.tensor_quantize]
        return out


def default_act(asymmetric: bool | None, num_bits: int = 8) -> dict[str, Any]:
    return {"algo": "ifmr", "num_bits": num_bits, "asymmetric": asymmetric, **IFMR_DEFAULTS}


def default_wts(op_type: str | None) -> dict[str, Any] | None:
    if op_type in WEIGHTLESS_TYPES:
        return None
    return {"algo": "arq", "num_bits": 8, "channel_wise": None if op_type is None else op_type in CHANNEL_WISE_TYPES}


# --- create / write -------------------------------------------------------------------------------


def create_quant_config(layers: LayerSpec, *, skip_layers=(), batch_num: int = 1,
                        activation_offset: bool = True) -> dict[str, Any]:
    """AMCT's default JSON config for ``layers`` (``(name, op_type)`` in graph order).

    Every quantizable layer is listed; ``skip_layers`` get ``quant_enable: false``. Like AMCT, each
    layer spells out ``asymmetric`` (= ``activation_offset``), so editing one layer is self-contained.
    """
    p = Problems("create_quant_config")
    types = layer_types(layers)
    if not (isinstance(batch_num, int) and not isinstance(batch_num, bool) and batch_num > 0):
        p.add("batch_num", f"must be an integer > 0, got {show(batch_num)}")
    if not isinstance(activation_offset, bool):
        p.add("activation_offset", f"must be a boolean, got {show(activation_offset)}")
    skipped = set(check_names(p, "skip_layers", list(skip_layers), types, QUANTIZABLE_TYPES))
    quantizable = [n for n, t in types.items() if t in QUANTIZABLE_TYPES]
    if not quantizable:
        p.add("layers", f"no quantizable layer ({', '.join(QUANTIZABLE_TYPES)}) in the model")
    elif not set(quantizable) - skipped:
        p.add("skip_layers", "skips every quantizable layer; nothing would be quantized")
    for name in quantizable:
        if name in _GLOBAL_KEYS:
            p.add(name, "is a global key of the config and cannot be a layer name; rename the node")
    p.raise_if_any()
    cfg = QuantConfig(batch_num=batch_num, activation_offset=activation_offset, layers={
        n: LayerQuantConfig(n not in skipped, default_act(activation_offset), default_wts(types[n]), None, types[n])
        for n in quantizable})
    return cfg.to_json_dict()


def write_quant_config(cfg: Mapping[str, Any] | QuantConfig, path: str | os.PathLike) -> None:
    """Validate and write atomically, 4-space indented in AMCT's layout (``"key":value``)."""
    source = os.fspath(path)
    data = cfg.to_json_dict() if isinstance(cfg, QuantConfig) else dict(cfg)
    parse_quant_config(data, source=source)  # never write a file we would refuse to read
    atomic_write_text(path, json.dumps(data, indent=4, separators=(",", ":"), ensure_ascii=False) + "\n")


def _layer_json(layer: LayerQuantConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"quant_enable": layer.quant_enable}
    if layer.dmq_balancer is not None:
        out["dmq_balancer_param"] = layer.dmq_balancer
    out["activation_quant_params"] = _act_json(layer.act)
    if layer.wts is not None:
        out["weight_quant_params"] = _wts_json(layer.wts)
    return out


def _act_json(act: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"num_bits": act["num_bits"]}
    if act["algo"] == "ifmr":
        out.update(max_percentile=act["max_percentile"], min_percentile=act["min_percentile"],
                   search_range=[act["search_range_start"], act["search_range_end"]],
                   search_step=act["search_step"])
    out["act_algo"] = act["algo"]
    if act.get("asymmetric") is not None:
        out["asymmetric"] = act["asymmetric"]
    if act["algo"] == "hfmg":
        out["num_of_bins"] = act["num_of_bins"]
    return out


def _wts_json(wts: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"num_bits": wts["num_bits"], "wts_algo": f"{wts['algo']}_quantize"}
    if wts["algo"] == "ada":
        out.update(num_iteration=wts["num_iteration"], reg_param=wts["reg_param"],
                   beta_range=[wts["beta_range_start"], wts["beta_range_end"]], warm_start=wts["warm_start"])
    if wts.get("channel_wise") is not None:
        out["channel_wise"] = wts["channel_wise"]
    return out


# --- read -----------------------------------------------------------------------------------------


def read_quant_config(path: str | os.PathLike, layers: LayerSpec | None = None) -> QuantConfig:
    """Read and validate a JSON quant config. Layer names and op types (layer entries,
    ``skip_fusion_layers``, ``tensor_quantize``) are checked against the model only when ``layers`` is given.

    Every problem is collected first; one ``ConfigFileError`` then lists them, one per line.
    """
    source = os.fspath(path)
    return parse_quant_config(load_json(read_text(path), source), layers, source=source)


def parse_quant_config(data: Any, layers: LayerSpec | None = None, *, source: str = "<dict>") -> QuantConfig:
    """Validate an already-loaded JSON config (see ``read_quant_config``)."""
    p = Problems(source)
    if not isinstance(data, dict):
        p.add("", f"the top level must be a JSON object, got {show(data)}")
        p.raise_if_any()
    types = None if layers is None else layer_types(layers)
    cfg = _parse_globals(p, data, types)
    for key, value in data.items():
        if key in _GLOBAL_KEYS:
            continue
        if not isinstance(value, dict):
            hint = suggest(key, _GLOBAL_KEYS) or f"global keys: {', '.join(_GLOBAL_KEYS)}"
            p.add(key, f"unknown key ({hint}); layer entries must be objects")
            continue
        op_type = None if types is None else types.get(key)
        if types is not None and op_type is None:
            p.add(key, f"unknown layer ({suggest(key, types) or 'not in the model'})")
        elif op_type is not None and op_type not in QUANTIZABLE_TYPES:
            p.add(key, f"is a {op_type} layer, which cannot be quantized (quantizable: {', '.join(QUANTIZABLE_TYPES)})")
        cfg.layers[key] = _parse_layer(p, value, key, op_type, cfg.activation_offset)
    if not p and not cfg.enabled_layers() and not cfg.tensor_quantize:
        p.add("", "no layer has quant_enable true; nothing would be quantized")
    p.raise_if_any()
    return cfg


def _parse_globals(p: Problems, data: Mapping[str, Any], types: Mapping[str, str] | None) -> QuantConfig:
    cfg = QuantConfig(source=p.source)
    cfg.version = get(p, data, "version", "", "int", 1)
    if cfg.version != 1:
        p.add("version", f"must be 1 (the only AMCT config version), got {show(cfg.version)}")
    cfg.batch_num = get(p, data, "batch_num", "", "int", 1)
    if cfg.batch_num <= 0:
        p.add("batch_num", f"must be > 0, got {cfg.batch_num}")
    for key in ("activation_offset", "joint_quant", "weight_offset", "do_fusion"):
        setattr(cfg, key, get(p, data, key, "", "bool", getattr(cfg, key)))
    mode = get(p, data, "fakequant_precision_mode", "", "str", "DEFAULT")
    cfg.fakequant_precision_mode = mode if check_choice(p, "fakequant_precision_mode", mode, FAKEQUANT_MODES) else "DEFAULT"
    names = get(p, data, "skip_fusion_layers", "", "list", [])
    if not all(isinstance(n, str) for n in names):
        p.add("skip_fusion_layers", f"must be a list of layer names, got {show(names)}")
    elif types is not None:
        check_names(p, "skip_fusion_layers", names, types, FUSABLE_TYPES)
    cfg.skip_fusion_layers = list(names)
    for i, entry in enumerate(get(p, data, "tensor_quantize", "", "list", [])):
        tensor = _parse_tensor(p, entry, f"tensor_quantize[{i}]", types, cfg.activation_offset)
        if tensor is not None:
            cfg.tensor_quantize.append(tensor)
    return cfg


def _parse_tensor(p: Problems, entry: Any, where: str, types, activation_offset: bool) -> TensorQuantConfig | None:
    if not isinstance(entry, dict):
        p.add(where, f"must be an object, got {show(entry)}")
        return None
    unknown_keys(p, entry, _TENSOR_KEYS, where)
    name, index = get(p, entry, "layer_name", where, "str"), get(p, entry, "input_index", where, "int")
    if name is None or index is None:
        p.add(where, "needs both layer_name and input_index")
        return None
    if types is not None and name not in types:
        p.add(f"{where}.layer_name", f"unknown layer '{name}' ({suggest(name, types) or 'not in the model'})")
    if index < 0:
        p.add(f"{where}.input_index", f"must be >= 0, got {index}")
    act = _parse_act(p, entry.get("activation_quant_params", {}), f"{where}.activation_quant_params",
                     None, activation_offset)
    return TensorQuantConfig(name, index, act)


def _parse_layer(p: Problems, obj: Mapping[str, Any], name: str, op_type: str | None,
                 activation_offset: bool) -> LayerQuantConfig:
    unknown_keys(p, obj, _LAYER_KEYS, name)
    dmq = get(p, obj, "dmq_balancer_param", name, "number")
    if dmq is not None:
        check_dmq(p, f"{name}.dmq_balancer_param", dmq, op_type)
    act = _parse_act(p, obj.get("activation_quant_params", {}), f"{name}.activation_quant_params",
                     op_type, activation_offset)
    wts = _parse_wts(p, obj.get("weight_quant_params", {}), f"{name}.weight_quant_params", op_type)
    return LayerQuantConfig(get(p, obj, "quant_enable", name, "bool", True), act,
                            None if op_type in WEIGHTLESS_TYPES else wts, dmq, op_type)


def _parse_act(p: Problems, obj: Any, where: str, op_type: str | None, activation_offset: bool) -> dict[str, Any]:
    if not isinstance(obj, dict):
        p.add(where, f"must be an object, got {show(obj)}")
        return default_act(activation_offset)
    unknown_keys(p, obj, _ACT_KEYS, where)
    ifmr_keys = [k for k in _IFMR_KEYS if k in obj]
    hfmg_keys = [k for k in _HFMG_KEYS if k in obj]
    algo = get(p, obj, "act_algo", where, "str") or ("hfmg" if hfmg_keys and not ifmr_keys else "ifmr")
    if not check_choice(p, f"{where}.act_algo", algo, ("ifmr", "hfmg")):
        algo = "ifmr"
    if ifmr_keys and hfmg_keys:
        p.add(where, f"mixes IFMR keys ({', '.join(ifmr_keys)}) with HFMG keys ({', '.join(hfmg_keys)}); "
                     "keep the keys of one act_algo")
    elif algo == "ifmr" and hfmg_keys:
        p.add(f"{where}.num_of_bins", "is an HFMG key but act_algo is 'ifmr'; remove it or set act_algo 'hfmg'")
    elif algo == "hfmg" and ifmr_keys:
        p.add(f"{where}.{ifmr_keys[0]}", "is an IFMR key but act_algo is 'hfmg'; remove it or set act_algo 'ifmr'")
    asym = get(p, obj, "asymmetric", where, "bool")
    act: dict[str, Any] = {"algo": algo, "num_bits": get(p, obj, "num_bits", where, "int", 8),
                           "asymmetric": activation_offset if asym is None else asym}
    if algo == "ifmr":
        for key in ("max_percentile", "min_percentile"):
            act[key] = get(p, obj, key, where, "number", IFMR_DEFAULTS[key])
        act["search_range_start"], act["search_range_end"] = _pair(p, obj, "search_range", where, (0.7, 1.3))
        act["search_step"] = get(p, obj, "search_step", where, "number", IFMR_DEFAULTS["search_step"])
    else:
        act["num_of_bins"] = get(p, obj, "num_of_bins", where, "int", HFMG_DEFAULTS["num_of_bins"])
    check_act(p, act, op_type, lambda k: f"{where}.{_JSON_ACT_KEY.get(k, k)}")
    return act


def _parse_wts(p: Problems, obj: Any, where: str, op_type: str | None) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        p.add(where, f"must be an object, got {show(obj)}")
        return default_wts(op_type)
    unknown_keys(p, obj, _WTS_KEYS, where)
    algo = get(p, obj, "wts_algo", where, "str", "arq_quantize")
    if not check_choice(p, f"{where}.wts_algo", algo, ("arq_quantize", "ada_quantize")):
        algo = "arq_quantize"
    ada_keys = [k for k in _ADA_KEYS if k in obj]
    if algo == "arq_quantize" and ada_keys:
        p.add(f"{where}.{ada_keys[0]}", "is an ADA key but wts_algo is 'arq_quantize'; remove it or set 'ada_quantize'")
    default_cw = None if op_type is None else op_type in CHANNEL_WISE_TYPES
    wts: dict[str, Any] = {"algo": algo.split("_")[0], "num_bits": get(p, obj, "num_bits", where, "int", 8),
                           "channel_wise": get(p, obj, "channel_wise", where, "bool", default_cw)}
    if algo == "ada_quantize":
        wts["num_iteration"] = get(p, obj, "num_iteration", where, "int", ADA_DEFAULTS["num_iteration"])
        for key in ("reg_param", "warm_start"):
            wts[key] = get(p, obj, key, where, "number", ADA_DEFAULTS[key])
        wts["beta_range_start"], wts["beta_range_end"] = _pair(p, obj, "beta_range", where, (20.0, 2.0))
    check_wts(p, wts, op_type, lambda k: f"{where}.{_JSON_WTS_KEY.get(k, k)}")
    return wts


_JSON_ACT_KEY = {"search_range_start": "search_range", "search_range_end": "search_range"}
_JSON_WTS_KEY = {"beta_range_start": "beta_range", "beta_range_end": "beta_range"}


def _pair(p: Problems, obj: Mapping[str, Any], key: str, where: str, default: tuple[float, float]):
    value = get(p, obj, key, where, "list", list(default))
    if len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        p.add(f"{where}.{key}", f"must be a list of two numbers [start, end], got {show(value)}")
        return default
    return float(value[0]), float(value[1])


# --- value checks shared with the .cfg reader (``at`` maps our option name to the file's key path) ----


def check_act(p: Problems, act: Mapping[str, Any], op_type: str | None, at: Callable[[str], str]) -> None:
    if check_choice(p, at("num_bits"), act["num_bits"], ACT_BITS) and act["num_bits"] == 16 \
            and op_type is not None and op_type not in INT16_ACT_TYPES:
        p.add(at("num_bits"), f"16-bit activations are not supported for {op_type} layers "
                              f"(only {', '.join(sorted(INT16_ACT_TYPES))}); use 8")
    if act["algo"] == "hfmg":
        check_choice(p, at("num_of_bins"), act["num_of_bins"], NUM_OF_BINS)
        return
    check_range(p, at("max_percentile"), act["max_percentile"], 0.5, 1.0)
    check_range(p, at("min_percentile"), act["min_percentile"], 0.5, 1.0)
    start, end = act["search_range_start"], act["search_range_end"]
    if not 0 < start < end:
        p.add(at("search_range_start"), f"must satisfy 0 < start < end, got [{show(start)}, {show(end)}]")
    else:
        check_range(p, at("search_step"), act["search_step"], 0.0, end - start)


def check_wts(p: Problems, wts: Mapping[str, Any], op_type: str | None, at: Callable[[str], str]) -> None:
    if check_choice(p, at("num_bits"), wts["num_bits"], WTS_BITS) and wts["num_bits"] in (6, 7) \
            and op_type is not None and op_type not in LOW_BIT_WTS_TYPES:
        p.add(at("num_bits"), f"{wts['num_bits']}-bit weights are only supported for Conv layers, not {op_type}")
    if wts["channel_wise"] and op_type is not None and op_type not in CHANNEL_WISE_TYPES:
        p.add(at("channel_wise"), f"must be false for {op_type} layers "
                                  f"(only {', '.join(sorted(CHANNEL_WISE_TYPES))} support channel-wise weights)")
    if wts["algo"] == "ada":
        if wts["num_iteration"] <= 0:
            p.add(at("num_iteration"), f"must be > 0, got {wts['num_iteration']}")
        check_range(p, at("reg_param"), wts["reg_param"], 0.0, float("inf"), hi_open=True)
        check_range(p, at("warm_start"), wts["warm_start"], 0.0, 1.0, lo_open=False)
        if not (wts["beta_range_start"] > 0 and wts["beta_range_end"] > 0):
            p.add(at("beta_range_start"), f"must be two numbers > 0, got [{show(wts['beta_range_start'])}, "
                                          f"{show(wts['beta_range_end'])}]")


def check_dmq(p: Problems, where: str, value: float, op_type: str | None) -> None:
    check_range(p, where, value, 0.2, 0.8, lo_open=False)
    if op_type in WEIGHTLESS_TYPES:
        p.add(where, f"{op_type} layers have no weights to balance; remove the DMQ setting")
