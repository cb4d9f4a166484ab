"""AMCT's files in and out of a pipeline.

``export_amct`` writes the ``quant_record`` artifact as AMCT's ``record.txt`` (ScaleOffsetRecord
protobuf text) and the JSON quant config of what was used (every quantizable layer, ``quant_enable``
false for the ones left float, per-layer activation and weight settings).

``load_record`` is AMCT's "record -> save_model": it reads a record file, checks it against the
matched layers and re-quantizes the weights with the record's ``scale_w``, producing ``act_quant``
and ``weight_quant`` for ``lower``::

    match_layers,load_record{path=record.txt},lower
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field

from ..algorithms.base import ActQuantParams
from ..errors import ConfigError, Problem
from ..options import Options, suggest
from ..quant.plan import TENSOR_QUANT_ARTIFACT, parse_tensor_key
from ..quant.balance import record_factors
from ..quant.params import weightless_params
from ..quant.weights import effective_weight, quantize_with_scale
from .base import Pass, PassResult

__all__ = ["ExportAmctPass", "ExportAmctOptions", "LoadRecordPass", "LoadRecordOptions", "used_quant_config",
           "with_balance_factors"]

AMCT_ACT_ALGOS = ("ifmr", "hfmg")
AMCT_WTS_ALGOS = ("arq", "ada")
USER_SKIP_PREFIXES = ("in skip_layers", "skipped by", "op type in skip_layer_types", "op type not in include",
                      "quant_enable false", "not listed in")


# -- export ---------------------------------------------------------------------------------------
class ExportAmctOptions(Options):
    record: str = Field("record.txt", description="Record file name in the output directory ({model}: input stem).")
    quant_config: Optional[str] = Field("{model}_quant_config.json",
                                        description="AMCT JSON quant config of the settings used; null: none.")


class ExportAmctPass(Pass):
    name = "export_amct"
    summary = "Write AMCT's record.txt and the JSON quant config of the settings used."
    Options = ExportAmctOptions
    requires = frozenset({"quant_record", "layer_map"})
    writes = ("record", "quant_config")

    def run(self, graph, ctx) -> PassResult:
        from ..amct.quant_config import write_quant_config
        from ..amct.record import write_record
        if ctx.outputs.directory is None:
            return PassResult(False, {"written": 0})
        record = ctx.artifacts["quant_record"]
        if not record:          # AMCT's files need at least one quantized layer
            layer_map = ctx.artifacts["layer_map"]
            reasons = sorted(set(layer_map.skipped.values())) or ["the model has no quantizable layer"]
            raise ConfigError([Problem("pass 'export_amct'", "", "no layer was quantized, so there is no record "
                                       f"to write ({len(layer_map)} matched, {len(layer_map.skipped)} skipped: "
                                       f"{'; '.join(reasons)[:300]})")])
        record = with_balance_factors(record, ctx.artifacts.get("balance_factors") or {})
        files = [ctx.file_name(self.options.record, "record")]
        write_record(record, ctx.output_path(files[0]))
        if self.options.quant_config:
            files.append(ctx.file_name(self.options.quant_config, "quant_config"))
            write_quant_config(used_quant_config(graph, ctx.artifacts), ctx.output_path(files[1]))
        return PassResult(False, {"written": len(files), "files": files, "layers": len(record)})


def with_balance_factors(record, factors):
    """A copy of the record whose balanced layers carry their DMQ factors (``tensor_balance_factor``)."""
    import dataclasses

    from ..amct.record import QuantRecord
    if not factors:
        return record
    return QuantRecord({name: dataclasses.replace(rec, tensor_balance_factor=list(factors[name]))
                        if name in factors else rec for name, rec in record.items()},
                       prune_records=getattr(record, "prune_records", ()))


def used_quant_config(graph, artifacts):
    """A ``QuantConfig`` listing every quantizable layer (graph order) with the settings used."""
    from ..amct.quant_config import LayerQuantConfig, QuantConfig, default_wts
    layer_map, record = artifacts["layer_map"], artifacts["quant_record"]
    base = artifacts.get("amct_config")
    settings = artifacts.get("quant_settings") or {}
    asymmetric = getattr(base, "activation_offset", True)
    config = QuantConfig(batch_num=getattr(base, "batch_num", 1), activation_offset=asymmetric,
                         do_fusion=getattr(base, "do_fusion", True),
                         skip_fusion_layers=list(getattr(base, "skip_fusion_layers", [])))
    act_quant = artifacts.get("act_quant") or {}
    respelled: list[str] = []
    for name, op_type in _quantizable_layers(graph, layer_map):
        layer = layer_map.get(name)
        used = settings.get(name, {})
        act = used.get("act") or _act_from_options(layer, act_quant.get(name), asymmetric)
        wts = used.get("wts") or default_wts(op_type)
        if wts is not None and wts.get("algo") not in AMCT_WTS_ALGOS:
            respelled.append(f"{name} ({wts.get('algo')})")
            wts = {**default_wts(op_type), "num_bits": wts.get("num_bits", 8)}
        config.layers[name] = LayerQuantConfig(name in record, act, None if op_type == "AveragePool" else wts,
                                               None, op_type)
    if respelled:
        # the record holds the factors actually used; AMCT's config format only names arq / ada
        warnings.warn(f"{len(respelled)} layer(s) quantized their weights with an algorithm AMCT's quant config "
                      f"cannot name ({', '.join(respelled[:3])}{', ...' if len(respelled) > 3 else ''}); the quant "
                      "config lists AMCT's arq for them, record.txt holds the factors used", RuntimeWarning,
                      stacklevel=2)
    return config


def _quantizable_layers(graph, layer_map) -> list[tuple[str, str]]:
    """Matched layers plus the ones the user skipped (not those refused for structural reasons)."""
    wanted = set(layer_map) | {name for name, reason in layer_map.skipped.items()
                               if reason.startswith(USER_SKIP_PREFIXES)}
    seen, out = set(), []
    for node in graph.nodes:
        if node.name in wanted and node.name not in seen:
            seen.add(node.name)
            out.append((node.name, node.op))
    return out


def _act_from_options(layer, params: ActQuantParams | None, asymmetric: bool) -> dict[str, Any]:
    """AMCT activation settings from the layer's calibrate options; AMCT defaults where unknown."""
    from ..amct.quant_config import HFMG_DEFAULTS, default_act
    per = (layer.options.get("calibrate") if layer is not None else None) or {}
    algorithm = per.get("algorithm", "ifmr")
    options = dict(per.get("algorithm_options") or {})
    asymmetric = bool(per.get("asymmetric", options.get("asymmetric", asymmetric)))
    num_bits = int(options.get("num_bits", params.num_bits if params is not None else 8))
    if algorithm not in AMCT_ACT_ALGOS:
        warnings.warn(f"layer '{layer.name}': activation algorithm '{algorithm}' has no AMCT spelling; the quant "
                      "config lists AMCT's ifmr defaults for it", RuntimeWarning, stacklevel=2)
        algorithm, options = "ifmr", {}
    act = default_act(asymmetric, num_bits)
    if algorithm == "hfmg":
        act = {"algo": "hfmg", "num_bits": num_bits, "asymmetric": asymmetric, **HFMG_DEFAULTS}
    act.update({k: v for k, v in options.items() if k in act and k not in ("algo", "asymmetric", "num_bits")})
    return act


# -- load -----------------------------------------------------------------------------------------
class LoadRecordOptions(Options):
    path: str = Field(description="AMCT record file (ScaleOffsetRecord text), e.g. record.txt.")
    missing_layers: Literal["skip", "error"] = Field(
        "skip", description="Matched layers the record does not list: leave them float (AMCT) or fail.")


class LoadRecordPass(Pass):
    name = "load_record"
    summary = "Read an AMCT record.txt: activation factors and weights re-quantized with its scale_w."
    Options = LoadRecordOptions
    requires = frozenset({"layer_map"})
    reads = ("path",)
    produces = frozenset({"act_quant", "weight_quant", "quant_settings", TENSOR_QUANT_ARTIFACT, "layer_map",
                          "balance_factors"})

    def run(self, graph, ctx) -> PassResult:
        layer_map = ctx.artifacts["layer_map"]
        source = str(self.options.path)
        record = _read(source)
        tensors = {key: _act_params(record[key], key, source) for key in list(record)
                   if key not in layer_map and parse_tensor_key(key) is not None}
        for key in tensors:    # "<node>:<input>" entries: tensor quantization, checked when lowered
            del record[key]
        if tensors:
            ctx.artifacts[TENSOR_QUANT_ARTIFACT] = tensors
        self._check_names(record, layer_map, source)
        factors = record_factors(graph, record, layer_map, source)
        if factors:     # AMCT's DMQ: the record's scale_w are those of the balanced weights
            from ..quant.balance import apply_balance
            layer_map = ctx.artifacts["layer_map"] = apply_balance(graph, layer_map, factors)
            ctx.artifacts["balance_factors"] = factors
        act_quant, weight_quant = {}, {}
        settings = ctx.artifacts.setdefault("quant_settings", {})
        for name, rec in record.items():
            layer = layer_map[name]
            act_quant[name] = _act_params(rec, name, source)
            scale_w = _scale_w(rec, layer, source)
            if layer.weight is None:
                weight_quant[name] = weightless_params()
                continue
            bits = int(rec.wts_type[3:])
            weight_quant[name] = quantize_with_scale(effective_weight(graph, layer), scale_w, layer, bits)
            settings.setdefault(name, {})["wts"] = {"algo": "arq", "num_bits": bits, "channel_wise": scale_w.size > 1}
        ctx.artifacts["act_quant"], ctx.artifacts["weight_quant"] = act_quant, weight_quant
        stats = {"layers": len(record), "tensors": len(tensors), "unlisted": len(layer_map) - len(record),
                 "per_channel": sum(1 for p in weight_quant.values() if p.scale.size > 1)}
        return PassResult(bool(factors), {**stats, "balanced": len(factors)} if factors else stats)

    def _check_names(self, record, layer_map, source: str) -> None:
        for name in record:
            if name in layer_map:
                continue
            if name in layer_map.skipped:
                hint = f"it was not matched for quantization ({layer_map.skipped[name]})"
            else:
                hint = suggest(name, list(layer_map)) or "the record does not belong to this model"
            raise ConfigError([Problem(source, f"layer '{name}'", "is in the record but not a quantizable layer "
                                       "of the model", hint)])
        missing = [name for name in layer_map if name not in record]
        if missing and self.options.missing_layers == "error":
            raise ConfigError([Problem(source, f"layer '{missing[0]}'", f"has no record entry ({len(missing)} "
                                       "matched layers missing)", "set missing_layers: skip to leave them float")])
        if missing:
            warnings.warn(f"{source}: {len(missing)} matched layer(s) not in the record stay float: "
                          f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}", RuntimeWarning,
                          stacklevel=2)


def _read(source: str):
    from ..amct.errors import RecordError
    from ..amct.record import read_record
    if not Path(source).is_file():
        raise ConfigError([Problem("pass 'load_record'", "path", f"no record file '{source}'")])
    try:
        record = read_record(source)
    except RecordError as exc:
        located = exc.source if exc.line is None else f"{exc.source}:{exc.line}:{exc.col}"
        raise _record_problem(located, exc.layer, exc.field, exc.reason) from None
    if not len(record):    # every layer would silently stay float
        raise ConfigError([Problem(source, "", "the record has no layer entries (an empty or truncated file?)",
                                   "give the record.txt that calibration wrote for this model")])
    return record


def _record_problem(source: str, layer: str | None, field: str | None, message: str) -> ConfigError:
    where = " ".join(part for part in (f"layer '{layer}'" if layer else "", f"field {field}" if field else "") if part)
    return ConfigError([Problem(source, where, message)])


def _act_params(rec, name: str, source: str) -> ActQuantParams:
    for field in ("scale_d", "offset_d"):
        if getattr(rec, field) is None:
            raise _record_problem(source, name, field, "is missing; every quantized layer needs scale_d and offset_d")
    return ActQuantParams(float(rec.scale_d), int(rec.offset_d), 16 if rec.act_type == "INT16" else 8)


def _scale_w(rec, layer, source: str) -> np.ndarray:
    """scale_w checked against the layer: 1 value, or one per output channel where per-channel is allowed."""
    scale = np.asarray(rec.scale_w, dtype=np.float32)
    if layer.weight is None:
        if scale.size and not np.all(scale == 1.0):
            raise _record_problem(source, layer.name, "scale_w", f"must be 1 for a {layer.op_type} layer "
                                  f"(no weights), got {rec.scale_w}")
        return np.ones(1, np.float32)
    if scale.size == 0:
        raise _record_problem(source, layer.name, "scale_w", "is missing; a layer with weights needs scale_w")
    if scale.size > 1 and layer.channel_axis is None:
        raise _record_problem(source, layer.name, "scale_w", f"has {scale.size} values but {layer.op_type} "
                              "weights are quantized per tensor (1 value)")
    if scale.size not in (1, layer.out_channels):
        raise _record_problem(source, layer.name, "scale_w", f"has {scale.size} per-channel values but the layer "
                              f"has {layer.out_channels} output channels; the record does not match this model")
    return scale
