"""AMCT's simplified post-training config (``.cfg``, protobuf text ``AMCTConfig``, SPEC 2.2).

``read_cfg(path, layers)`` resolves the file against the model's layers into the same ``QuantConfig``
the JSON reader returns. Per layer the *whole* ``CalibrationConfig`` of the highest-priority match is
used, as AMCT does: ``override_layer_configs`` > ``override_layer_types`` > ``common_config``; parts it
does not set take defaults. ``asymmetric`` falls back to ``common_config``'s (same algorithm only),
then to ``activation_offset``. Settings inherited from ``common_config`` that a layer's op type cannot
use are adapted silently like AMCT (16-bit activations -> 8, 6/7-bit weights -> 8, channel-wise ->
per-tensor, DMQ dropped); the same settings in an override naming that layer or type are errors.

The retrain (QAT) readers live in ``retrain_config`` and are re-exported here.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

from ._common import LayerSpec, Problems, check_choice, check_names, check_types, f32, layer_types, read_text
from ._proto import parse_config_text
from .quant_config import (
    CHANNEL_WISE_TYPES, FUSABLE_TYPES, INT16_ACT_TYPES, LOW_BIT_WTS_TYPES, QUANTIZABLE_TYPES, WEIGHTLESS_TYPES,
    LayerQuantConfig, QuantConfig, TensorQuantConfig, check_act, check_dmq, check_wts, default_act, default_wts,
)
from .retrain_config import (
    LayerRetrainConfig, RetrainConfig, create_retrain_config, parse_retrain_cfg, parse_retrain_config,
    read_retrain_cfg, read_retrain_config, write_retrain_config,
)

__all__ = [
    "read_cfg", "parse_cfg",
    # re-exported from retrain_config
    "LayerRetrainConfig", "RetrainConfig", "create_retrain_config", "parse_retrain_cfg", "parse_retrain_config",
    "read_retrain_cfg", "read_retrain_config", "write_retrain_config",
]

_AMCT_CONFIG = "AMCTPytorchProto.AMCTConfig"
_DTYPE_BITS = {1: 8, 2: 16}   # FMRQuantize/HFMGQuantize.CalibrationDataType: INT8 = 1, INT16 = 2


class _Calib(NamedTuple):
    """One ``CalibrationConfig``, partially filled like AMCT's (``None`` = not set there)."""

    act: dict[str, Any] | None
    wts: dict[str, Any] | None
    dmq: float | None


def read_cfg(path: str | os.PathLike, layers: LayerSpec) -> QuantConfig:
    """Read a ``.cfg`` and resolve it for ``layers`` (``(name, op_type)`` in graph order)."""
    return parse_cfg(read_text(path), layers, source=os.fspath(path))


def parse_cfg(text: str, layers: LayerSpec, *, source: str = "<string>") -> QuantConfig:
    """``read_cfg`` for text already in memory."""
    msg = parse_config_text(text, _AMCT_CONFIG, source)
    p = Problems(source)
    types = layer_types(layers)
    _missing_required(p, msg)
    cfg = _globals(p, msg, types)
    skip_layers = set(check_names(p, "skip_layers", msg.skip_layers, types, QUANTIZABLE_TYPES))
    skip_types = set(check_types(p, "skip_layer_types", list(msg.skip_layer_types), QUANTIZABLE_TYPES,
                                 "quantized", "quantizable"))
    common = _calib(p, msg.common_config, "common_config", None) if msg.HasField("common_config") else None
    by_type = {t: _calib(p, item.calibration_config, f"override_layer_types[{i}].calibration_config", t)
               for i, item, t in _override_types(p, msg)}
    by_name = {n: _calib(p, item.calibration_config, f"override_layer_configs[{i}].calibration_config", types[n])
               for i, item, n in _override_layers(p, msg, types)}
    quantizable = [n for n, t in types.items() if t in QUANTIZABLE_TYPES]
    if not quantizable and not cfg.tensor_quantize:
        p.add("", f"the model has no quantizable layer ({', '.join(QUANTIZABLE_TYPES)})")
    elif quantizable and all(n in skip_layers or types[n] in skip_types for n in quantizable):
        p.add("skip_layers", "skip_layers/skip_layer_types skip every quantizable layer; nothing would be quantized")
    for name in quantizable:
        op_type = types[name]
        chosen = by_name.get(name) or by_type.get(op_type) or common or _Calib(None, None, None)
        layer = _resolve(chosen, common, op_type, cfg.activation_offset, from_common=chosen is common)
        layer.quant_enable = name not in skip_layers and op_type not in skip_types
        cfg.layers[name] = layer
    p.raise_if_any()
    return cfg


def _missing_required(p: Problems, msg) -> None:
    for path in msg.FindInitializationErrors():
        p.add(path, "required field is missing")


def _globals(p: Problems, msg, types) -> QuantConfig:
    cfg = QuantConfig(source=p.source, batch_num=msg.batch_num, activation_offset=msg.activation_offset,
                      do_fusion=msg.do_fusion, joint_quant=msg.joint_quant, weight_offset=msg.weight_offset)
    if msg.batch_num <= 0:
        p.add("batch_num", f"must be > 0, got {msg.batch_num}")
    if msg.HasField("version") and msg.version != 1:
        p.add("version", f"must be 1, got {msg.version}")
    if msg.HasField("fakequant_precision_mode"):
        cfg.fakequant_precision_mode = "FORCE_FP16_QUANT"
    cfg.skip_fusion_layers = list(msg.skip_fusion_layers)
    check_names(p, "skip_fusion_layers", cfg.skip_fusion_layers, types, FUSABLE_TYPES)
    for i, item in enumerate(msg.tensor_quantize):
        where = f"tensor_quantize[{i}]"
        if not (item.HasField("layer_name") and item.HasField("input_index")):
            p.add(where, "needs both layer_name and input_index")
            continue
        check_names(p, where, [item.layer_name], types, None, label=lambda _: f"{where}.layer_name")
        act = _act_of(item) or default_act(None)
        check_act(p, act, None, _act_path(act, where))
        act["asymmetric"] = cfg.activation_offset if act["asymmetric"] is None else act["asymmetric"]
        cfg.tensor_quantize.append(TensorQuantConfig(item.layer_name, item.input_index, act))
    if msg.HasField("nuq_config"):
        nuq = msg.nuq_config.nuq_quantize
        cfg.nuq = {"mapping_file": msg.nuq_config.mapping_file, "num_steps": nuq.num_steps,
                   "num_of_iteration": nuq.num_of_iteration}
        check_choice(p, "nuq_config.nuq_quantize.num_steps", nuq.num_steps, (16, 32))
        check_choice(p, "nuq_config.nuq_quantize.num_of_iteration", nuq.num_of_iteration, range(6))
        if not msg.nuq_config.mapping_file:
            p.add("nuq_config.mapping_file", "is required: the JSON ATC dumped for the uniformly quantized model")
    return cfg


def _override_types(p: Problems, msg):
    good = set(check_types(p, "override_layer_types", [item.layer_type for item in msg.override_layer_types],
                           QUANTIZABLE_TYPES, "quantized", "quantizable"))
    return [(i, item, item.layer_type) for i, item in enumerate(msg.override_layer_types) if item.layer_type in good]


def _override_layers(p: Problems, msg, types):
    names = [item.layer_name for item in msg.override_layer_configs]
    good = set(check_names(p, "override_layer_configs", names, types, QUANTIZABLE_TYPES,
                           label=lambda i: f"override_layer_configs[{i}].layer_name"))
    return [(i, item, item.layer_name) for i, item in enumerate(msg.override_layer_configs) if item.layer_name in good]


def _calib(p: Problems, msg, where: str, op_type: str | None) -> _Calib:
    """Read and check one CalibrationConfig; ``op_type`` (overrides only) enables op-type checks."""
    act = _act_of(msg)
    if act is not None:
        check_act(p, act, op_type, _act_path(act, where))
    wts = None
    if msg.HasField("arq_quantize"):
        arq = msg.arq_quantize
        wts = {"algo": "arq", "num_bits": arq.quant_bits if arq.HasField("quant_bits") else 8,
               "channel_wise": arq.channel_wise if arq.HasField("channel_wise") else None}
    elif msg.HasField("ada_quantize"):
        ada = msg.ada_quantize
        wts = {"algo": "ada", "num_bits": 8, "channel_wise": ada.channel_wise if ada.HasField("channel_wise") else None,
               "num_iteration": ada.num_iteration, "reg_param": f32(ada.reg_param),
               "beta_range_start": f32(ada.beta_range_start), "beta_range_end": f32(ada.beta_range_end),
               "warm_start": f32(ada.warm_start)}
    if wts is not None:
        field = "arq_quantize" if wts["algo"] == "arq" else "ada_quantize"
        check_wts(p, wts, op_type, lambda k: f"{where}.{field}.{'quant_bits' if k == 'num_bits' else k}")
        if op_type in WEIGHTLESS_TYPES:
            p.add(f"{where}.{field}", f"{op_type} layers have no weights; remove the weight algorithm")
    dmq = f32(msg.dmq_balancer.migration_strength) if msg.HasField("dmq_balancer") else None
    if dmq is not None:
        check_dmq(p, f"{where}.dmq_balancer.migration_strength", dmq, op_type)
    return _Calib(act, wts, dmq)


def _act_of(msg) -> dict[str, Any] | None:
    if msg.HasField("ifmr_quantize"):
        q = msg.ifmr_quantize
        return {"algo": "ifmr", "num_bits": _DTYPE_BITS[q.dst_type],
                "asymmetric": q.asymmetric if q.HasField("asymmetric") else None,
                "max_percentile": f32(q.max_percentile), "min_percentile": f32(q.min_percentile),
                "search_range_start": f32(q.search_range_start), "search_range_end": f32(q.search_range_end),
                "search_step": f32(q.search_step)}
    if msg.HasField("hfmg_quantize"):
        q = msg.hfmg_quantize
        return {"algo": "hfmg", "num_bits": _DTYPE_BITS[q.dst_type],
                "asymmetric": q.asymmetric if q.HasField("asymmetric") else None, "num_of_bins": q.num_of_bins}
    return None


def _act_path(act: dict[str, Any], where: str):
    field = "ifmr_quantize" if act["algo"] == "ifmr" else "hfmg_quantize"
    return lambda k: f"{where}.{field}.{'dst_type' if k == 'num_bits' else k}"


def _resolve(chosen: _Calib, common: _Calib | None, op_type: str, activation_offset: bool,
             from_common: bool) -> LayerQuantConfig:
    act = dict(chosen.act) if chosen.act else default_act(None)
    wts = None if op_type in WEIGHTLESS_TYPES else dict(chosen.wts or default_wts(op_type))
    dmq = chosen.dmq
    if act["asymmetric"] is None:
        inherited = common.act if common and common.act and common.act["algo"] == act["algo"] else None
        act["asymmetric"] = activation_offset if inherited is None or inherited["asymmetric"] is None \
            else inherited["asymmetric"]
    if wts is not None and wts["channel_wise"] is None:
        wts["channel_wise"] = op_type in CHANNEL_WISE_TYPES
    if from_common:  # AMCT adapts a shared setting to each layer instead of failing
        if act["num_bits"] == 16 and op_type not in INT16_ACT_TYPES:
            act["num_bits"] = 8
        if wts is not None and wts["num_bits"] in (6, 7) and op_type not in LOW_BIT_WTS_TYPES:
            wts["num_bits"] = 8
        if wts is not None and wts["channel_wise"] and op_type not in CHANNEL_WISE_TYPES:
            wts["channel_wise"] = False
        if op_type in WEIGHTLESS_TYPES:
            dmq = None
    return LayerQuantConfig(True, act, wts, dmq, op_type)
