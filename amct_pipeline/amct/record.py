"""AMCT's record file: ``ScaleOffsetRecord`` in protobuf text format (SPEC section 3).

``read_record``/``parse_record`` load and validate a record; ``format_record``/``write_record`` produce
text that AMCT reads (and that looks like AMCT's own output), byte-for-byte stable for equal records.
Scales are protobuf ``float`` fields, so ``LayerRecord`` rounds them to float32 on construction:
what you hold is exactly what the file holds, and write -> read gives an equal record.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

from ._common import atomic_write_text, read_text
from ._proto import ProtoTextError, message_class, parse_text
from .errors import RecordError

__all__ = [
    "LayerRecord", "QuantRecord", "read_record", "parse_record", "format_record", "write_record",
    "validate_record", "validate_against",
]

_RECORD = "AMCTPytorchProto.ScaleOffsetRecord"
_PRUNE = "AMCTPytorchProto.PruneRecord"
_FLT_EPS = float(np.finfo(np.float32).eps)
_ACT_TYPES = ("INT8", "INT16")
_WTS_TYPES = ("INT4", "INT6", "INT7", "INT8")
_DST_TYPES = ("INT4", "INT8", "INT16")


@dataclass
class LayerRecord:
    """Quantization factors of one layer, named as in the record file."""

    scale_d: float | None = None
    offset_d: int | None = None
    scale_w: list[float] = field(default_factory=list)
    offset_w: list[int] = field(default_factory=list)
    shift_bit: list[int] = field(default_factory=list)
    act_type: str = "INT8"
    wts_type: str = "INT8"
    dst_type: str = "INT8"
    tensor_balance_factor: list[float] = field(default_factory=list)
    skip_fusion: bool = False
    # Rarer fields, kept so that read -> write loses nothing.
    fakequant_precision_mode: str = "DEFAULT"
    scale_h: float | None = None
    offset_h: int | None = None
    scale_r: list[float] = field(default_factory=list)
    offset_r: list[int] = field(default_factory=list)
    kv_cache_scale: list[float] = field(default_factory=list)   # MapFiledEntry.kv_cache_value.scale
    kv_cache_offset: list[int] = field(default_factory=list)    # MapFiledEntry.kv_cache_value.offset
    channels: int | None = None                                 # Caffe/ATC-style records
    height: int | None = None
    width: int | None = None
    cluster_center: list[int] = field(default_factory=list)     # NUQ

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _FLOATS:
                value = None if value is None else _to_f32(value)
            elif f.name in _FLOAT_LISTS:
                value = [_to_f32(v) for v in np.asarray(value, dtype=np.float64).ravel()]
            elif f.name in _INTS:
                value = None if value is None else int(value)
            elif f.name in _INT_LISTS:
                value = [int(v) for v in np.asarray(value).ravel()]
            setattr(self, f.name, value)


_FLOATS = ("scale_d", "scale_h")
_FLOAT_LISTS = ("scale_w", "tensor_balance_factor", "scale_r", "kv_cache_scale")
_INTS = ("offset_d", "offset_h", "channels", "height", "width")
_INT_LISTS = ("offset_w", "shift_bit", "offset_r", "kv_cache_offset", "cluster_center")
_KV = {"kv_cache_scale": "scale", "kv_cache_offset": "offset"}


def _to_f32(x: Any) -> float:
    with np.errstate(over="ignore"):  # overflow becomes inf, which validation reports
        return float(np.float32(x))


class QuantRecord(MutableMapping):
    """Ordered mapping layer name -> ``LayerRecord`` (insertion order is file order).

    ``prune_records`` keeps the file's ``prune_record`` entries as protobuf text; we do not interpret
    pruning but write them back unchanged.
    """

    def __init__(self, layers: Mapping[str, LayerRecord] | None = None, *, prune_records: list[str] = ()):
        self._layers: dict[str, LayerRecord] = {}
        self.prune_records = list(prune_records)
        for name, rec in (layers or {}).items():
            self[name] = rec

    def __getitem__(self, name: str) -> LayerRecord:
        return self._layers[name]

    def __setitem__(self, name: str, rec: LayerRecord) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"layer names must be non-empty strings, got {name!r}")
        if not isinstance(rec, LayerRecord):
            raise TypeError(f"values must be LayerRecord, got {type(rec).__name__}")
        self._layers[name] = rec

    def __delitem__(self, name: str) -> None:
        del self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantRecord):
            return NotImplemented
        return list(self._layers.items()) == list(other._layers.items()) and self.prune_records == other.prune_records

    def __repr__(self) -> str:
        return f"QuantRecord({self._layers!r})"


# --- reading --------------------------------------------------------------------------------------


def read_record(path: str | os.PathLike) -> QuantRecord:
    """Load and validate a record file."""
    from .errors import ConfigFileError
    try:
        text = read_text(path)
    except ConfigFileError as exc:
        issue = exc.issues[0]
        raise RecordError(issue.source, issue.message, line=issue.line, col=issue.col) from None
    return parse_record(text, source=os.fspath(path))


def parse_record(text: str, source: str = "<string>") -> QuantRecord:
    """Parse record text. A layer listed twice is an error naming it (AMCT would keep the last entry,
    silently dropping the first: an edited or concatenated record must not lose layers unnoticed)."""
    try:
        msg = parse_text(text, _RECORD)
    except ProtoTextError as exc:
        raise RecordError(source, f"{exc.message}; fix the record syntax", line=exc.line, col=exc.col) from None
    from google.protobuf import text_format

    record = QuantRecord(prune_records=[text_format.MessageToString(p, as_utf8=True) for p in msg.prune_record])
    for i, entry in enumerate(msg.record):
        if not entry.key:
            raise RecordError(source, f"record entry #{i + 1} has no key; every entry needs the layer name")
        if entry.key in record:
            line, col = _key_position(text, entry.key, 2)
            first = _key_position(text, entry.key, 1)[0]
            raise RecordError(source, f"is listed twice (record entries #{list(record).index(entry.key) + 1} and "
                              f"#{i + 1}{f', first at line {first}' if first else ''}); keep one entry per layer",
                              layer=entry.key, line=line, col=col)
        rec = _from_entry(entry)
        validate_record({entry.key: rec}, source=source)
        record[entry.key] = rec
    return record


def _key_position(text: str, key: str, nth: int) -> tuple[int | None, int | None]:
    """(line, column) of the ``nth`` ``key: "<key>"`` in the text, or (None, None) when not found."""
    import json
    import re
    pattern = re.compile(r'\bkey\s*:?\s*(?:' + re.escape(json.dumps(key, ensure_ascii=False)) + "|'"
                         + re.escape(key) + "')")
    for count, match in enumerate(pattern.finditer(text), 1):
        if count == nth:
            offset = match.start()
            return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1
    return None, None


def _from_entry(entry) -> LayerRecord:
    value, kv, kwargs = entry.value, entry.kv_cache_value, {}
    for f in dataclasses.fields(LayerRecord):
        if f.name in _KV:
            kwargs[f.name] = list(getattr(kv, _KV[f.name]))
        elif f.name in _FLOAT_LISTS or f.name in _INT_LISTS:
            kwargs[f.name] = list(getattr(value, f.name))
        elif value.HasField(f.name):
            kwargs[f.name] = getattr(value, f.name)
    return LayerRecord(**kwargs)


# --- validation -----------------------------------------------------------------------------------


def validate_record(record: Mapping[str, LayerRecord], source: str = "<record>") -> None:
    """SPEC 3 load-time rules; raises ``RecordError`` naming the first bad layer and field."""
    for name, rec in record.items():
        problem = _first_problem(rec)
        if problem:
            raise RecordError(source, problem[1], layer=name, field=problem[0])


def _first_problem(rec: LayerRecord) -> tuple[str, str] | None:
    for name, allowed in (("act_type", _ACT_TYPES), ("wts_type", _WTS_TYPES), ("dst_type", _DST_TYPES)):
        if getattr(rec, name) not in allowed:
            return name, f"must be one of {', '.join(allowed)}, got {getattr(rec, name)!r}"
    for name in ("scale_d", "scale_h"):
        value = getattr(rec, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            return name, f"must be finite and > 0, got {_shown(value)}"
    for name in ("scale_w", "scale_r", "kv_cache_scale"):
        bad = [v for v in getattr(rec, name) if not (math.isfinite(v) and v > 0)]
        if bad:
            return name, f"every value must be finite and > 0, got {_shown(bad[0])}"
    lo, hi = (-32768, 32767) if rec.act_type == "INT16" else (-128, 127)
    for name in ("offset_d", "offset_h"):
        value = getattr(rec, name)
        if value is not None and not lo <= value <= hi:
            return name, f"must be in [{lo}, {hi}] for act_type {rec.act_type}, got {value}"
    if any(rec.offset_w):
        return "offset_w", f"must be all 0 (weights are quantized symmetrically), got {next(v for v in rec.offset_w if v)}"
    if any(rec.shift_bit) and not all(1 <= v <= 16 for v in rec.shift_bit):
        return "shift_bit", f"must be all 0 or each in [1, 16], got {next(v for v in rec.shift_bit if not 1 <= v <= 16)}"
    for name in ("offset_w", "shift_bit"):
        values = getattr(rec, name)
        if values and len(values) != len(rec.scale_w):
            return name, f"must have as many values as scale_w ({len(rec.scale_w)}), got {len(values)}"
    bad = [v for v in rec.tensor_balance_factor if not _FLT_EPS <= v <= 1 / _FLT_EPS]
    if bad:
        return "tensor_balance_factor", f"every value must be in [FLT_EPSILON, 1/FLT_EPSILON], got {_shown(bad[0])}"
    return None


def _shown(x: float) -> str:
    return str(np.float32(x))


def validate_against(record: Mapping[str, LayerRecord], channels: Mapping[str, int],
                     in_channels: Mapping[str, int] | None = None, *, source: str = "<record>") -> None:
    """Check per-channel lengths against the model: ``scale_w`` has 1 or Cout values (``channels``,
    Cout·group for ConvTranspose is the caller's number), ``tensor_balance_factor`` has Cin values."""
    for name, rec in record.items():
        cout = channels.get(name)
        if cout is not None and len(rec.scale_w) > 1 and len(rec.scale_w) != cout:
            raise RecordError(source, f"has {len(rec.scale_w)} per-channel values but the layer has {cout} "
                              "output channels; the record does not match this model, re-run calibration",
                              layer=name, field="scale_w")
        cin = (in_channels or {}).get(name)
        if cin is not None and rec.tensor_balance_factor and len(rec.tensor_balance_factor) != cin:
            raise RecordError(source, f"has {len(rec.tensor_balance_factor)} values but the layer has {cin} "
                              "input channels; the record does not match this model, re-run calibration",
                              layer=name, field="tensor_balance_factor")


# --- writing --------------------------------------------------------------------------------------


def format_record(record: Mapping[str, LayerRecord], *, source: str = "<record>") -> str:
    """The record as AMCT protobuf text: deterministic, so equal records give identical bytes."""
    from google.protobuf import text_format

    validate_record(record, source=source)
    msg = message_class(_RECORD)()
    for name, rec in record.items():
        _to_entry(msg.record.add(), name, rec)
    for text in getattr(record, "prune_records", ()):
        text_format.Merge(text, msg.prune_record.add())
    return text_format.MessageToString(msg, as_utf8=True)


def write_record(record: Mapping[str, LayerRecord], path: str | os.PathLike) -> None:
    """Validate and write atomically (temporary file in the same directory, then ``os.replace``)."""
    atomic_write_text(path, format_record(record, source=os.fspath(path)))


def _to_entry(entry, name: str, rec: LayerRecord) -> None:
    entry.key = name
    values = {}
    for f in dataclasses.fields(LayerRecord):
        value = getattr(rec, f.name)
        if f.name in _KV:
            if value:  # touching kv_cache_value would make an empty block appear
                getattr(entry.kv_cache_value, _KV[f.name]).extend(value)
        elif value not in (None, []) and (value != f.default or f.name == "dst_type"):
            values[f.name] = value
    if set(values) == {"dst_type"} and entry.HasField("kv_cache_value"):
        return  # a KV-cache-only entry
    for key, value in values.items():  # AMCT always writes dst_type; other defaults stay implicit
        if isinstance(value, list):
            getattr(entry.value, key).extend(value)
        else:
            setattr(entry.value, key, value)
