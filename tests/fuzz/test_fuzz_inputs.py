"""Fuzz what a run reads: mutated models (protobuf fields, dims, dtypes, external-data fields, bytes),
AMCT quant configs (JSON), simplified configs (.cfg), records, and .npy/.npz headers."""
from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zipfile

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from amct_pipeline.amct import create_quant_config
from amct_pipeline.amct._proto import message_class
from amct_pipeline.demo import build_demo_data, build_demo_model
from fuzz_helpers import COUNTS, Sandbox, fuzz_settings, planned, run_cli
from test_fuzz_pipelines import mutate_text

LAYERS = [("conv1", "Conv"), ("conv2", "Conv"), ("fc", "Gemm")]
NAMES = st.one_of(st.sampled_from([n for n, _ in LAYERS] + ["pool", "residual", "conv1:0", "fc:x", "", "Conv",
                                                            "Gemm", "conv1.bn", "input"]),
                  st.text(st.characters(codec="utf-8"), max_size=8))
NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 0.5, 1e-45, 3.4e38, 2e-9, 127, 128, -129, 65536, 2**31, 2**63]))
JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, NAMES),
                           lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(NAMES, inner, max_size=3)),
                           max_leaves=8)


@pytest.fixture
def sandbox(tmp_path):
    box = Sandbox(tmp_path)
    box.write("m.onnx", build_demo_model().SerializeToString())
    os.symlink(box.elsewhere / "secret.bin", box.inputs / "link.bin")
    os.mkfifo(box.inputs / "fifo.bin")
    return box


# -- models ------------------------------------------------------------------------------------------
LOCATIONS = st.sampled_from(["ext.bin", "ext.bin", "../elsewhere/secret.bin", str("/proc/self/environ"), "/dev/zero",
                             "link.bin", "fifo.bin", "missing.bin", "", ".", "sub/../ext.bin", "/etc/hostname",
                             "ext.bin\x00x", "m.onnx", "%2e%2e/x"])


def _external_base() -> tuple[bytes, bytes]:
    """The demo model with every initializer of 64+ bytes in ext.bin: (model bytes, ext.bin bytes)."""
    model = build_demo_model()
    blob = bytearray()
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) >= 64:
            offset = len(blob)
            blob += tensor.raw_data
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", "ext.bin"), ("offset", str(offset)), ("length", str(len(tensor.raw_data) or
                                                                                                  len(blob) - offset))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    return model.SerializeToString(), bytes(blob)


BASE_MODEL = build_demo_model().SerializeToString()
EXT_MODEL, EXT_BLOB = _external_base()


def _mutate_model(draw, model: onnx.ModelProto) -> None:
    """Edits drawn by index (a failing case prints short draws, not whole tensors)."""
    graph = model.graph
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.integers(0, 12))
        inits, nodes = list(graph.initializer), list(graph.node)
        if what == 0 and graph.input:
            dims = graph.input[0].type.tensor_type.shape.dim
            if dims:
                dim = dims[draw(st.integers(0, len(dims) - 1))]
                choice = draw(st.sampled_from([-1, 0, 1, 2, 2**31, 2**62, None]))
                if choice is None:
                    dim.dim_param = draw(NAMES)
                else:
                    dim.dim_value = choice
        elif what == 1 and inits:
            inits[draw(st.integers(0, len(inits) - 1))].data_type = draw(st.one_of(st.integers(0, 26), st.just(999)))
        elif what == 2 and inits:
            tensor = inits[draw(st.integers(0, len(inits) - 1))]
            new = draw(st.lists(st.one_of(st.integers(-2, 70), st.sampled_from([2**31, 2**40])), max_size=5))
            del tensor.dims[:]
            tensor.dims.extend(new)
        elif what == 3 and inits:
            tensor = inits[draw(st.integers(0, len(inits) - 1))]
            if tensor.raw_data:
                cut = draw(st.integers(0, len(tensor.raw_data) + 8))
                tensor.raw_data = (tensor.raw_data + b"\x00" * 8)[:cut]
            else:
                tensor.float_data.extend([1.0] * draw(st.integers(0, 3)))
        elif what == 4 and nodes:
            node = nodes[draw(st.integers(0, len(nodes) - 1))]
            for att in node.attribute:
                if att.type == onnx.AttributeProto.INTS and draw(st.booleans()):
                    del att.ints[:]
                    att.ints.extend(draw(st.lists(st.integers(-3, 2**33), max_size=5)))
                elif att.type == onnx.AttributeProto.INT and draw(st.booleans()):
                    att.i = draw(st.integers(-3, 2**33))
                elif att.type == onnx.AttributeProto.FLOAT and draw(st.booleans()):
                    att.f = draw(st.floats(width=32, allow_nan=True))
        elif what == 5 and nodes:
            node = nodes[draw(st.integers(0, len(nodes) - 1))]
            if node.input:
                node.input[draw(st.integers(0, len(node.input) - 1))] = draw(
                    st.one_of(NAMES, st.sampled_from([o for n in nodes for o in n.output])))
        elif what == 6 and nodes:
            node = nodes[draw(st.integers(0, len(nodes) - 1))]
            node.op_type = draw(st.sampled_from(["If", "Loop", "Foo", "Conv", "Gemm", "BatchNormalization", "Relu",
                                                 "Scan", "MatMul", ""]))
            if draw(st.booleans()):
                node.domain = draw(st.sampled_from(["", "com.microsoft", "ai.onnx.ml", "x"]))
        elif what == 7:
            model.opset_import[0].version = draw(st.integers(-1, 40))
        elif what == 8:
            model.ir_version = draw(st.integers(-1, 20))
        elif what == 9 and inits:                    # external-data fields
            tensor = inits[draw(st.integers(0, len(inits) - 1))]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key in draw(st.lists(st.sampled_from(["location", "offset", "length", "checksum", "basepath",
                                                      "other"]), max_size=4)) + ["location"]:
                entry = tensor.external_data.add()
                entry.key = key
                entry.value = draw(LOCATIONS) if key == "location" else str(draw(st.one_of(
                    st.integers(-10, 2**64), st.sampled_from(["x", "", "1e3", "0x10"]))))
        elif what == 10 and inits:
            graph.initializer.add().CopyFrom(inits[draw(st.integers(0, len(inits) - 1))])          # duplicate name
        elif what == 11:
            if graph.output and draw(st.booleans()):
                graph.output[0].name = draw(NAMES)
            elif graph.input:
                del graph.input[0]
        elif what == 12 and nodes:
            node = nodes[draw(st.integers(0, len(nodes) - 1))]
            node.output[0] = draw(st.sampled_from([o for n in nodes for o in n.output] + ["input", ""]))


def test_fuzz_mutated_models(sandbox):
    @fuzz_settings("models")
    @given(st.data())
    def case(data):
        external = data.draw(st.booleans())
        model = onnx.ModelProto()
        model.ParseFromString(EXT_MODEL if external else BASE_MODEL)
        blob = EXT_BLOB
        if external and data.draw(st.integers(0, 3)) == 0:
            blob = blob[:data.draw(st.integers(0, len(blob)))]            # an incomplete download
        sandbox.write("ext.bin", blob)
        if data.draw(st.integers(0, 5)):
            _mutate_model(data.draw, model)
        raw = model.SerializeToString()
        if data.draw(st.integers(0, 6)) == 0:                             # bytes: flip or truncate
            raw = bytearray(raw)
            for _ in range(data.draw(st.integers(1, 4))):
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
            raw = bytes(raw[:data.draw(st.integers(0, len(raw)))])
        path = sandbox.write("m.onnx", raw)
        pipeline = data.draw(st.sampled_from(["fuse_bn,save", "fuse_bn,match_layers,save",
                                              "fuse_bn,save{external_data=true}"]))
        model_arg = path if data.draw(st.integers(0, 30)) else sandbox.inputs / "fifo.bin"
        run_cli(sandbox, ["run", pipeline, "--model", model_arg, "-o", sandbox.out, "-q"], "models")
    case()
    assert COUNTS["models"] >= planned("models")


# -- AMCT configs ------------------------------------------------------------------------------------
BASE_CONFIG = create_quant_config(LAYERS)


def _set_path(draw, obj, depth=0):
    if isinstance(obj, dict) and obj and depth < 4 and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(obj)))
        if isinstance(obj[key], (dict, list)) and draw(st.booleans()):
            return _set_path(draw, obj[key], depth + 1)
        action = draw(st.integers(0, 2))
        if action == 0:
            del obj[key]
        else:
            obj[key] = draw(JSON_VALUES)
    elif isinstance(obj, list) and obj:
        obj[draw(st.integers(0, len(obj) - 1))] = draw(JSON_VALUES)
    elif isinstance(obj, dict):
        obj[draw(NAMES)] = draw(JSON_VALUES)


def test_fuzz_quant_config_json(sandbox):
    @fuzz_settings("quant_config")
    @given(st.data())
    def case(data):
        config = json.loads(json.dumps(BASE_CONFIG))
        for _ in range(data.draw(st.integers(0, 4))):
            _set_path(data.draw, config)
        text = json.dumps(config, indent=data.draw(st.sampled_from([None, 2])), allow_nan=True)
        if data.draw(st.integers(0, 3)) == 0:
            text = mutate_text(data.draw, text)
        path = sandbox.write("q.json", text)
        run_cli(sandbox, ["config", "check", path, "--model", sandbox.inputs / "m.onnx"], "quant_config")
    case()
    assert COUNTS["quant_config"] >= planned("quant_config")


def _proto_text(draw, descriptor, depth: int = 0) -> str:
    """Random protobuf text for ``descriptor``: real field names with fitting or unfitting values."""
    parts = []
    fields = list(descriptor.fields)
    for field in draw(st.lists(st.sampled_from(fields), max_size=5 if depth < 3 else 1)) if fields else []:
        if field.message_type is not None:
            if depth < 3:
                parts.append(f"{field.name} {{ {_proto_text(draw, field.message_type, depth + 1)} }}")
            continue
        if field.enum_type is not None:
            value = draw(st.one_of(st.sampled_from([v.name for v in field.enum_type.values]), st.sampled_from(["X", "1"])))
        elif field.type == field.TYPE_STRING:
            value = json.dumps(draw(NAMES))
        elif field.type == field.TYPE_BOOL:
            value = draw(st.sampled_from(["true", "false", "1", "0", "yes"]))
        else:
            number = draw(NUMBERS)
            value = ("nan" if number != number else "inf" if number == float("inf") else "-inf"
                     if number == -float("inf") else repr(number))
        parts.append(f"{field.name}: {value}")
    return "\n".join(parts)


def test_fuzz_simplified_cfg(sandbox):
    descriptor = message_class("AMCTPytorchProto.AMCTConfig").DESCRIPTOR

    @fuzz_settings("cfg")
    @given(st.data())
    def case(data):
        text = _proto_text(data.draw, descriptor)
        if data.draw(st.integers(0, 3)) == 0:
            text = mutate_text(data.draw, text)
        path = sandbox.write("q.cfg", text)
        run_cli(sandbox, ["config", "check", path, "--model", sandbox.inputs / "m.onnx"], "cfg")
    case()
    assert COUNTS["cfg"] >= planned("cfg")


def _record_text(draw) -> str:
    value_desc = message_class("AMCTPytorchProto.SingleLayerRecord").DESCRIPTOR
    entries = []
    for name in draw(st.lists(NAMES, min_size=0, max_size=4)) if draw(st.integers(0, 3)) == 0 else \
            [n for n, _ in LAYERS if draw(st.integers(0, 5))]:
        body = draw(st.one_of(st.just("scale_d: 0.05 offset_d: -3 scale_w: 0.01"),
                              st.builds(lambda t: t, st.just(None)).map(lambda _: _proto_text(draw, value_desc, 2))))
        entries.append(f"record {{ key: {json.dumps(name)} value {{ {body} }} }}")
    return "\n".join(entries) + "\n"


def test_fuzz_records(sandbox):
    @fuzz_settings("record")
    @given(st.data())
    def case(data):
        text = _record_text(data.draw)
        if data.draw(st.integers(0, 3)) == 0:
            text = mutate_text(data.draw, text)
        path = sandbox.write("record.txt", text)
        pipeline = {"passes": [{"pass": "fuse_bn"}, {"pass": "match_layers"},
                               {"pass": "load_record", "options": {"path": str(path)}},
                               {"pass": "lower", "options": {"targets": ["fakequant"]}}]}
        pipe = sandbox.write("p.json", json.dumps(pipeline))
        run_cli(sandbox, ["run", pipe, "--model", sandbox.inputs / "m.onnx", "-o", sandbox.out, "-q"], "record")
    case()
    assert COUNTS["record"] >= planned("record")


# -- .npy / .npz -------------------------------------------------------------------------------------
GOOD = build_demo_data(4)


def _npy_bytes(draw) -> bytes:
    descr = draw(st.sampled_from(["<f4", "<f4", "<f8", "|u1", "<i8", "|O", "<U3", "V8", "x", "<f4,<f4", "<c8", "|b1"]))
    fortran = draw(st.sampled_from(["False", "False", "True", "0", "'x'"]))
    shape = draw(st.one_of(st.just(GOOD.shape), st.lists(st.one_of(st.integers(-2, 40), st.sampled_from(
        [10**15, 2**31, 2**63 - 1, 3, 32])), max_size=5).map(tuple)))
    header = "{'descr': %r, 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, repr(shape))
    if draw(st.integers(0, 6)) == 0:
        header = mutate_text(draw, header)
    encoded = header.encode("latin1", "replace")
    encoded += b" " * ((64 - (len(encoded) + 11) % 64) % 64) + b"\n"
    version = draw(st.sampled_from([(1, 0), (1, 0), (2, 0), (3, 0), (9, 9)]))
    length = struct.pack("<H", len(encoded)) if version[0] == 1 else struct.pack("<I", len(encoded))
    if draw(st.integers(0, 8)) == 0:
        length = struct.pack("<H", draw(st.integers(0, 65535)))
    body = GOOD.astype(np.float32).tobytes()
    body = body[:draw(st.integers(0, len(body)))] if draw(st.integers(0, 2)) == 0 else body
    return b"\x93NUMPY" + bytes(version) + length + encoded + body


def test_fuzz_npy_npz_headers(sandbox):
    @fuzz_settings("data")
    @given(st.data())
    def case(data):
        if data.draw(st.booleans()):
            path = sandbox.write("calib.npy", _npy_bytes(data.draw))
        else:
            buffer = io.BytesIO()
            compression = data.draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
            with zipfile.ZipFile(buffer, "w", compression) as archive, warnings.catch_warnings():
                warnings.simplefilter("ignore")     # a member twice ('input' and 'input.npy') is a case too
                for name in data.draw(st.lists(st.sampled_from(["input", "x", "input.npy", "../x.npy", "a/b.npy"]),
                                               min_size=0, max_size=3, unique=True)):
                    archive.writestr(name if name.endswith(".npy") else name + ".npy", _npy_bytes(data.draw))
            raw = buffer.getvalue()
            if data.draw(st.integers(0, 5)) == 0:
                raw = raw[:data.draw(st.integers(0, len(raw)))]
            path = sandbox.write("calib.npz", raw)
        target = path if data.draw(st.integers(0, 30)) else sandbox.inputs / "fifo.bin"
        run_cli(sandbox, ["run", "fuse_bn,match_layers,calibrate{dataset=calib algorithm=minmax}", "--model",
                          sandbox.inputs / "m.onnx", "--data", f"calib={target}", "-q"], "data")
    case()
    assert COUNTS["data"] >= planned("data")
