"""AMCT record file (ScaleOffsetRecord protobuf text): parsing, writing, validation."""
from __future__ import annotations

import os

import numpy as np
import pytest

from amct_pipeline.amct._proto import message_class
from amct_pipeline.amct.errors import RecordError
from amct_pipeline.amct.record import (
    LayerRecord, QuantRecord, format_record, parse_record, read_record, validate_against, write_record,
)

# SPEC section 3 example, verbatim.
SPEC_EXAMPLE = """record {
  key: "layer1.0.conv1"
  value { scale_d: 0.00392156886  offset_d: -128
          scale_w: 0.00106807391  scale_w: 0.00104224426  offset_w: 0  offset_w: 0  dst_type: "INT8" }
}
"""


def f32(x: float) -> float:
    return float(np.float32(x))


def sample() -> QuantRecord:
    return QuantRecord({
        "conv1": LayerRecord(scale_d=0.5, offset_d=-3, scale_w=[0.25, 0.125], offset_w=[0, 0]),
        "fc": LayerRecord(scale_d=0.1, offset_d=0, scale_w=[0.01], offset_w=[0], act_type="INT16",
                          tensor_balance_factor=[1.5, 0.5], skip_fusion=True),
    })


def test_spec_example_parses_to_expected_values():
    record = parse_record(SPEC_EXAMPLE)
    assert list(record) == ["layer1.0.conv1"]
    rec = record["layer1.0.conv1"]
    assert rec.scale_d == f32(0.00392156886)
    assert rec.offset_d == -128
    assert rec.scale_w == [f32(0.00106807391), f32(0.00104224426)]
    assert rec.offset_w == [0, 0]
    assert (rec.dst_type, rec.act_type, rec.wts_type, rec.shift_bit, rec.skip_fusion) == ("INT8", "INT8", "INT8", [], False)


def test_format_looks_like_amct_output():
    text = format_record(QuantRecord({"conv1": LayerRecord(scale_d=0.5, offset_d=-3, scale_w=[0.25], offset_w=[0])}))
    assert text == (
        'record {\n  key: "conv1"\n  value {\n    scale_d: 0.5\n    offset_d: -3\n'
        '    scale_w: 0.25\n    offset_w: 0\n    dst_type: "INT8"\n  }\n}\n'
    )


def test_write_read_round_trip_and_byte_stability(tmp_path):
    path = tmp_path / "record.txt"
    write_record(sample(), path)
    first = path.read_bytes()
    loaded = read_record(path)
    assert loaded == sample()
    write_record(loaded, path)
    assert path.read_bytes() == first
    assert format_record(parse_record(SPEC_EXAMPLE)) == format_record(parse_record(SPEC_EXAMPLE))


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text("old")
    write_record(sample(), path)
    assert os.listdir(tmp_path) == ["record.txt"]
    assert read_record(path) == sample()


def test_write_refuses_invalid_record_and_keeps_old_file(tmp_path):
    path = tmp_path / "record.txt"
    path.write_text("old")
    with pytest.raises(RecordError, match=r"record.txt: layer 'bad' field scale_d: must be finite and > 0, got 0.0"):
        write_record({"bad": LayerRecord(scale_d=0.0)}, path)
    assert path.read_text() == "old"


def test_layer_record_rounds_scales_to_float32():
    rec = LayerRecord(scale_d=0.1, scale_w=np.array([0.1, 0.2]), offset_w=np.zeros(2, dtype=np.int64))
    assert rec.scale_d == f32(0.1) and rec.scale_w == [f32(0.1), f32(0.2)] and rec.offset_w == [0, 0]
    assert parse_record(format_record({"a": rec}))["a"] == rec


def test_duplicates_are_errors_naming_file_line_and_key():
    text = ('record { key: "a" value { scale_d: 1.0 offset_d: 1 } }\n'
            'record { key: "b" value { scale_d: 3.0 } }\n'
            'record { key: "a" value { scale_d: 4.0 } }\n')
    with pytest.raises(RecordError, match=r"^r.txt:3:10: layer 'a': is listed twice .*first at line 1"):
        parse_record(text, source="r.txt")
    with pytest.raises(RecordError, match=r"^r.txt:1:40: field 'scale_d' of SingleLayerRecord is given twice"):
        parse_record('record { key: "a" value { scale_d: 1.0 scale_d: 2.0 offset_d: 1 } }', source="r.txt")


def test_caffe_fields_prune_and_kv_cache_entries_load_and_survive_a_round_trip():
    text = ('record { key: "data" value { scale_d: 0.5 offset_d: 0 channels: 3 height: 224 width: 224 } }\n'
            'record { key: "nuq" value { scale_w: 1 offset_w: 0 cluster_center: -8 cluster_center: 7 } }\n'
            'record { key: "k" kv_cache_value { scale: 0.5 offset: 2 } }\n'
            'prune_record { producer { name: "conv1" attr { name: "type" type: STRING s: "Conv" } } '
            'consumer { name: "conv2" } }\n')
    record = parse_record(text)
    assert (record["data"].channels, record["data"].height, record["data"].width) == (3, 224, 224)
    assert record["nuq"].cluster_center == [-8, 7]
    assert (record["k"].kv_cache_scale, record["k"].kv_cache_offset, record["k"].scale_d) == ([0.5], [2], None)
    assert len(record.prune_records) == 1 and 'name: "conv2"' in record.prune_records[0]
    out = format_record(record)
    assert 'key: "k"\n  kv_cache_value' in out  # KV-only entry gets no empty value block
    assert parse_record(out) == record


RECORD_FIELD_NUMBERS = {
    "scale_d": 1, "offset_d": 2, "scale_w": 3, "offset_w": 4, "shift_bit": 5, "tensor_balance_factor": 6,
    "skip_fusion": 9, "dst_type": 10, "act_type": 11, "wts_type": 12, "fakequant_precision_mode": 13,
    "scale_h": 21, "offset_h": 22, "scale_r": 23, "offset_r": 24,
}


def test_field_names_and_numbers_match_amct():
    layer = message_class("AMCTPytorchProto.SingleLayerRecord").DESCRIPTOR
    assert {f.name: f.number for f in layer.fields if f.number < 1000} == RECORD_FIELD_NUMBERS
    entry = message_class("AMCTPytorchProto.MapFiledEntry").DESCRIPTOR
    assert [(f.name, f.number) for f in entry.fields] == [("key", 1), ("value", 2), ("kv_cache_value", 3)]
    top = message_class("AMCTPytorchProto.ScaleOffsetRecord").DESCRIPTOR
    assert [(f.name, f.number) for f in top.fields] == [("record", 1), ("prune_record", 2)]


@pytest.mark.parametrize("value, field, message", [
    ("scale_d: -1", "scale_d", "must be finite and > 0, got -1.0"),
    ("scale_d: nan", "scale_d", "must be finite and > 0, got nan"),
    ("scale_d: inf", "scale_d", "must be finite and > 0, got inf"),
    ("scale_w: 0.5 scale_w: 0 offset_w: 0 offset_w: 0", "scale_w", "every value must be finite and > 0, got 0.0"),
    ("offset_d: 128", "offset_d", "must be in [-128, 127] for act_type INT8, got 128"),
    ("offset_d: -129", "offset_d", "must be in [-128, 127] for act_type INT8, got -129"),
    ('act_type: "INT16" offset_d: 40000', "offset_d", "must be in [-32768, 32767] for act_type INT16, got 40000"),
    ("scale_w: 1 offset_w: 3", "offset_w", "must be all 0 (weights are quantized symmetrically), got 3"),
    ("scale_w: 1 scale_w: 1 shift_bit: 0 shift_bit: 4", "shift_bit", "must be all 0 or each in [1, 16], got 0"),
    ("scale_w: 1 shift_bit: 17", "shift_bit", "must be all 0 or each in [1, 16], got 17"),
    ("scale_w: 1 scale_w: 1 offset_w: 0", "offset_w", "must have as many values as scale_w (2), got 1"),
    ("scale_w: 1 offset_w: 0 shift_bit: 1 shift_bit: 1", "shift_bit", "must have as many values as scale_w (1), got 2"),
    ('act_type: "INT32"', "act_type", "must be one of INT8, INT16, got 'INT32'"),
    ('wts_type: "INT2"', "wts_type", "must be one of INT4, INT6, INT7, INT8, got 'INT2'"),
    ("tensor_balance_factor: 0", "tensor_balance_factor", "every value must be in [FLT_EPSILON, 1/FLT_EPSILON], got 0.0"),
])
def test_each_validation_rule_names_layer_and_field(value, field, message):
    with pytest.raises(RecordError) as info:
        parse_record(f'record {{ key: "conv1" value {{ {value} }} }}', source="record.txt")
    assert str(info.value) == f"record.txt: layer 'conv1' field {field}: {message}"
    assert (info.value.layer, info.value.field) == ("conv1", field)


@pytest.mark.parametrize("value", [
    'act_type: "INT16" offset_d: -32768', "offset_d: 127", "scale_w: 1 scale_w: 2 offset_w: 0 offset_w: 0",
    "scale_w: 1 scale_w: 2 shift_bit: 1 shift_bit: 16", "scale_w: 1 shift_bit: 0",
])
def test_values_at_the_limits_are_accepted(value):
    assert "conv1" in parse_record(f'record {{ key: "conv1" value {{ {value} }} }}')


def test_entry_without_key_is_an_error():
    with pytest.raises(RecordError, match=r"^r.txt: record entry #2 has no key"):
        parse_record('record { key: "a" } record { value { scale_d: 1 } }', source="r.txt")


def test_syntax_error_reports_line_column_and_suggestion():
    with pytest.raises(RecordError) as info:
        parse_record('record {\n  key: "a"\n  value { scale_dd: 1 }\n}\n', source="record.txt")
    assert str(info.value) == ("record.txt:3:11: SingleLayerRecord has no field named 'scale_dd' "
                               "(did you mean 'scale_d'?); fix the record syntax")
    assert (info.value.line, info.value.col) == (3, 11)


def test_validate_against_checks_per_channel_lengths():
    record = QuantRecord({
        "conv1": LayerRecord(scale_w=[1.0, 2.0, 3.0], offset_w=[0, 0, 0]),
        "fc": LayerRecord(scale_w=[1.0], offset_w=[0]),                     # per-tensor: any Cout
        "other": LayerRecord(scale_w=[1.0, 2.0], tensor_balance_factor=[1.0]),  # not in the model
    })
    validate_against(record, {"conv1": 3, "fc": 10})
    with pytest.raises(RecordError, match=r"^rec.txt: layer 'conv1' field scale_w: has 3 per-channel values but "
                                          r"the layer has 4 output channels"):
        validate_against(record, {"conv1": 4}, source="rec.txt")
    with pytest.raises(RecordError, match=r"layer 'other' field tensor_balance_factor: has 1 values but the "
                                          r"layer has 2 input channels"):
        validate_against(record, {}, {"other": 2})


def test_quant_record_is_an_ordered_mapping():
    record = QuantRecord()
    record["b"] = LayerRecord(scale_d=1.0)
    record["a"] = LayerRecord(scale_d=2.0)
    assert list(record) == ["b", "a"] and len(record) == 2
    assert record != QuantRecord({"a": LayerRecord(scale_d=2.0), "b": LayerRecord(scale_d=1.0)})
    with pytest.raises(TypeError):
        record["c"] = {"scale_d": 1.0}
