"""The ``ascend`` lowering target: deploy model layout (SPEC 5.3), agreement with the fake-quant model and
with an independent integer simulation, deq_scale packing of every layer, tensor quantization, INT16 /
INT6 / INT7, and errors.

The real-model checks run the shipped ``ptq_int8_ascend`` pipeline (IFMR + ARQ) on 8 real images per
model (module-scoped, run once) and compare on 4 others. Every layer's output keeps its tensor name in
both models, so the comparison exposes all of them as graph outputs: each layer is checked, not only
the model outputs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import Field

from amct_pipeline.ascend import pack_deq_scale, unpack_deq_scale
from amct_pipeline.ascend.schemas import ascend_schemas_registered, check_model
from amct_pipeline.ascend.verify import verify_deploy
from amct_pipeline.errors import AmctError, PassError
from amct_pipeline.options import Options
from amct_pipeline.passes.base import Pass, PassResult
from amct_pipeline.session import Session
from conftest import shared_path

REAL_MODELS = ["mobilenetv2_fp32.onnx", "resnet8_cifar10_bn.onnx", "mnist-8.onnx", "ultraface_rfb320_bn.onnx"]
CALIB, VERIFY = 8, 4
LAYER_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool")
SPEC61_TYPES = LAYER_TYPES + ("MaxPool", "Add")


# -- data ------------------------------------------------------------------------------------------
def real_inputs(name: str, count: int, offset: int = 0) -> np.ndarray:
    """``count`` real samples for a shared model, preprocessed as the model expects."""
    sl = slice(offset, offset + count)
    if name.startswith("mnist"):
        return np.load(shared_path("data/mnist_test10k_uint8.npz"))["images_uint8"][sl][:, None].astype(np.float32)
    if name.startswith("resnet8"):
        return np.load(shared_path("data/cifar_like212_32_uint8.npz"))["images_nchw_float_0_255"][sl].astype(np.float32)
    if name.startswith("mobilenet"):
        images = np.load(shared_path("data/imagenet_dev250_224_uint8.npz"))["images_nhwc_uint8"][sl]
        x = (images.astype(np.float32) / 255 - np.array([0.485, 0.456, 0.406], np.float32)) / \
            np.array([0.229, 0.224, 0.225], np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if name.startswith("ultraface"):
        return np.load(shared_path("data/faces24_240x320_f32.npz"))["x"][sl].astype(np.float32)
    raise KeyError(name)


# -- test passes -----------------------------------------------------------------------------------
class TensorQuantizePass(Pass):
    """Test stand-in for a calibration that supports AMCT's ``tensor_quantize``: publishes the
    ``tensor_quantize`` artifact ({"node:index": ActQuantParams}) from min/max of the listed inputs and/or
    AMCT's multi-output layout (the factors of a quantized layer reading the same tensor)."""

    name = "tensor_quantize_test"
    requires = frozenset({"layer_map", "act_quant"})
    produces = frozenset({"tensor_quantize"})

    class Options(Options):
        entries: list[str] = Field(default_factory=list)
        multi_output: bool = False
        dataset: str = "calib"
        bits: int = 8

    def run(self, graph, ctx) -> PassResult:
        from amct_pipeline.algorithms.base import ActQuantParams
        from amct_pipeline.quant.plan import multi_output_entries, parse_tensor_key
        from amct_pipeline.runtime.collector import collect
        found = {}
        if self.options.multi_output:
            found.update(multi_output_entries(graph, ctx.artifacts["layer_map"], ctx.artifacts["act_quant"]))
        if self.options.entries:
            nodes = {n.name: n for n in graph.nodes}
            tensors = {}
            for key in self.options.entries:
                parsed = parse_tensor_key(key)
                node = nodes.get(parsed[0]) if parsed else None
                if node is not None and parsed[1] < len(node.inputs):
                    tensors[key] = node.inputs[parsed[1]].name
                else:                      # bad entries are lower's to report
                    found[key] = ActQuantParams(0.1, 0, self.options.bits)
            names = sorted(set(tensors.values()))
            low = {n: np.inf for n in names}
            high = {n: -np.inf for n in names}
            for values in collect(graph, ctx.dataset(self.options.dataset), names):
                for n in names:
                    low[n] = min(low[n], float(values[n].min()))
                    high[n] = max(high[n], float(values[n].max()))
            qmin, qmax = -(1 << (self.options.bits - 1)), (1 << (self.options.bits - 1)) - 1
            for key, tensor in tensors.items():
                lo, hi = min(low[tensor], 0.0), max(high[tensor], 0.0)
                scale = max((hi - lo) / (qmax - qmin), 1e-8)
                found[key] = ActQuantParams(scale, int(np.clip(qmin - np.round(lo / scale), qmin, qmax)),
                                            self.options.bits)
        ctx.artifacts["tensor_quantize"] = found
        return PassResult(False, {"tensors": len(found)})


@pytest.fixture
def session(session):
    session.register_pass(TensorQuantizePass)
    return session


# -- the real models, lowered once ------------------------------------------------------------------
@dataclasses.dataclass
class Lowered:
    name: str
    result: object
    out: Path
    calib: Path
    x: np.ndarray

    @property
    def deploy(self) -> onnx.ModelProto:
        return onnx.load(str(self.out / f"{Path(self.name).stem}_deploy_model.onnx"))

    @property
    def fake(self) -> onnx.ModelProto:
        return onnx.load(str(self.out / f"{Path(self.name).stem}_fake_quant_model.onnx"))

    @property
    def record(self):
        return self.result.artifacts["quant_record"]


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    cache: dict[str, Lowered] = {}
    session = Session(load_entrypoints=False)

    def get(name: str) -> Lowered:
        if name not in cache:
            model = shared_path(f"models/{name}")
            tmp = tmp_path_factory.mktemp(Path(name).stem)
            calib = tmp / "calib.npy"
            np.save(calib, real_inputs(name, CALIB))
            result = session.build("ptq_int8_ascend").run(model, datasets={"calib": str(calib)},
                                                          output_dir=tmp / "out")
            cache[name] = Lowered(name, result, tmp / "out", calib, real_inputs(name, VERIFY, offset=CALIB))
        return cache[name]
    return get


def expose(model: onnx.ModelProto, names) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


def layer_outputs(deploy: onnx.ModelProto) -> list[str]:
    return [n.output[0] for n in deploy.graph.node if n.op_type == "AscendDequant"]


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("name", REAL_MODELS)
def test_deploy_matches_fakequant_on_every_layer(lowered, name):
    """Reference execution of the written deploy model vs onnxruntime (no optimisation) on the written
    fake-quant model: every layer output and every model output within one step; in fact equal up to
    float32 rounding (layer outputs are bit-identical)."""
    low = lowered(name)
    deploy, fake = low.deploy, low.fake
    names = layer_outputs(deploy)
    assert len(names) == len(low.record)
    report = verify_deploy(expose(deploy, names), expose(fake, names), [low.x])
    assert report.ok, report.format()
    assert report.samples == VERIFY
    layers = [o for o in report.outputs if o.name in names]
    assert len(layers) == len(names) and all(o.step_source.startswith("AscendDequant") for o in layers)
    assert max(o.max_steps for o in layers) <= 1e-3, report.format()     # float rounding at most
    assert report.max_steps <= 1e-3, report.format()


def test_real_model_differences_are_float_rounding(lowered):
    """The numbers behind the README: layer outputs bit-identical on the four models."""
    for name in REAL_MODELS:
        low = lowered(name)
        names = layer_outputs(low.deploy)
        report = verify_deploy(expose(low.deploy, names), expose(low.fake, names), [low.x[:1]])
        assert all(o.mismatched == 0 for o in report.outputs if o.name in names), (name, report.format())


# -- an independent integer simulation (SPEC 4.1, 5.3, 5.4) ----------------------------------------
def simulate_integer(float_model: onnx.ModelProto, record, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    """Run the float model with each recorded layer computed from the record alone: activation codes
    ``clip(rint(x * float32(1/scale_d)) + offset_d) - offset_d``, weight codes ``clip(rint(w / scale_w))``
    in the record's wts_type range, bias codes ``rint(b / (scale_d * scale_w))``, the layer evaluated by
    onnx's own reference kernels on float64 integer values (exact below 2^53), then ``* deq`` in float32.
    """
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.ops import load_op
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    # MatMul + Add bias: the integer layer adds the bias codes, the float Add then adds zeros
    matmul_bias = {}
    for node in model.graph.node:
        if node.op_type == "Add" and node.input[0] in producers:
            mm = producers[node.input[0]]
            if mm.op_type == "MatMul" and mm.name in record and node.input[1] in initializers:
                tensor = initializers[node.input[1]]
                bias = numpy_helper.to_array(tensor)
                matmul_bias[mm.name] = bias.copy()
                tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(bias), tensor.name))

    def factors(name):
        rec = record[name]
        bits = 16 if rec.act_type == "INT16" else 8
        wbits = int(rec.wts_type[3:])
        return (np.float32(rec.scale_d), int(rec.offset_d), np.asarray(rec.scale_w, np.float32), bits, wbits)

    def act_codes(x, scale_d, offset_d, bits):
        q = np.rint(np.asarray(x, np.float32) * np.float32(1.0 / np.float64(scale_d))) + offset_d
        return np.clip(q, -(1 << (bits - 1)), (1 << (bits - 1)) - 1).astype(np.float64) - offset_d

    def w_codes(w, scale_w, wbits, axis):
        shape = [1] * w.ndim
        if scale_w.size > 1:
            shape[axis] = -1
        q = np.rint(np.asarray(w, np.float32) / scale_w.reshape(shape))
        return np.clip(q, -(1 << (wbits - 1)), (1 << (wbits - 1)) - 1).astype(np.float64)

    def b_codes(b, scale_d, scale_w):
        return np.rint(np.asarray(b, np.float64) / (scale_d * scale_w).astype(np.float64))

    def dequant(acc, scale_d, scale_w, rank):
        deq = (scale_d * scale_w).astype(np.float32)
        deq = deq.reshape([1, -1] + [1] * (rank - 2)) if deq.size > 1 else deq.reshape(())
        return acc.astype(np.float32) * deq

    def layer(op, kernel):
        base = load_op("", op, opset, evaluator_cls=ReferenceEvaluator)

        def _run(self, *inputs, **kw):
            if self.onnx_node.name not in record:
                return base._run(self, *inputs, **kw)
            return kernel(self, base, *inputs, **kw)
        schema = onnx.defs.get_schema(op, opset, "")      # attribute defaults of the model's opset
        return type(op, (base,), {"op_domain": "", "op_schema": schema, "_run": _run})

    def conv(self, base, x, w, b=None, **kw):
        scale_d, offset_d, scale_w, bits, wbits = factors(self.onnx_node.name)
        bq = None if b is None else b_codes(b, scale_d, scale_w)
        (acc,) = base._run(self, act_codes(x, scale_d, offset_d, bits), w_codes(w, scale_w, wbits, 0), bq, **kw)
        return (dequant(acc, scale_d, scale_w, w.ndim),)

    def gemm(self, base, a, b, c=None, alpha=None, beta=None, transA=None, transB=None):
        scale_d, offset_d, scale_w, bits, wbits = factors(self.onnx_node.name)
        w = np.float32(1.0 if alpha is None else alpha) * b
        cq = None if c is None else b_codes(np.float64(1.0 if beta is None else beta) * c, scale_d, scale_w)
        (acc,) = base._run(self, act_codes(a, scale_d, offset_d, bits), w_codes(w, scale_w, wbits, None), cq,
                           alpha=1.0, beta=1.0, transA=transA, transB=transB)
        return (dequant(acc, scale_d, scale_w, 2),)

    def matmul(self, base, a, b):
        scale_d, offset_d, scale_w, bits, wbits = factors(self.onnx_node.name)
        acc = np.matmul(act_codes(a, scale_d, offset_d, bits), w_codes(b, scale_w, wbits, None))
        if self.onnx_node.name in matmul_bias:
            acc = acc + b_codes(matmul_bias[self.onnx_node.name], scale_d, scale_w)
        return (dequant(acc, scale_d, scale_w, 2),)

    def avgpool(self, base, x, **kw):
        scale_d, offset_d, _, bits, _ = factors(self.onnx_node.name)
        (mean,) = base._run(self, act_codes(x, scale_d, offset_d, bits), **kw)
        return ((mean * np.float64(scale_d)).astype(np.float32),)

    ops = [layer("Conv", conv), layer("Gemm", gemm), layer("MatMul", matmul), layer("AveragePool", avgpool)]
    evaluator = ReferenceEvaluator(model, new_ops=ops)
    feed = [i for i in model.graph.input if i.name not in initializers][0]
    fixed = feed.type.tensor_type.shape.dim[0].dim_value
    if fixed and fixed != len(x):
        parts = [evaluator.run(outputs, {feed.name: x[i:i + fixed]}) for i in range(0, len(x), fixed)]
        return [np.concatenate(p) for p in zip(*parts)]
    return evaluator.run(outputs, {feed.name: x})


@pytest.mark.parametrize("name", ["resnet8_cifar10_bn.onnx", "mnist-8.onnx"])
def test_deploy_and_fakequant_match_integer_simulation(lowered, name):
    low = lowered(name)
    deploy, fake = low.deploy, low.fake
    names = layer_outputs(deploy) + [o.name for o in deploy.graph.output]
    names = list(dict.fromkeys(names))
    expected = simulate_integer(low.result.model, low.record, low.x, names)
    from amct_pipeline.ascend import DeployEvaluator
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(expose(fake, names).SerializeToString(), options, providers=["CPUExecutionProvider"])
    evaluator = DeployEvaluator(expose(deploy, names))
    fixed = 1 if name.startswith("mnist") else len(low.x)
    chunks = [low.x[i:i + fixed] for i in range(0, len(low.x), fixed)]
    actual = [np.concatenate(p) for p in zip(*[evaluator.run([c], names) for c in chunks])]
    faked = [np.concatenate(p) for p in zip(*[sess.run(names, {sess.get_inputs()[0].name: c}) for c in chunks])]
    for tensor, e, a, f in zip(names, expected, actual, faked):
        scale = max(float(np.abs(e).max()), 1e-30)
        assert np.abs(a.astype(np.float64) - e).max() <= 1e-6 * scale, f"{name}: deploy '{tensor}'"
        assert np.abs(f.astype(np.float64) - e).max() <= 1e-6 * scale, f"{name}: fake-quant '{tensor}'"
    # the layers are bit-identical to the simulation (AveragePool: float64 mean, one rounding)
    layer_names = set(layer_outputs(deploy))
    assert all(np.array_equal(a, e) for t, a, e in zip(names, actual, expected) if t in layer_names)


# -- layout ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", REAL_MODELS)
def test_deploy_layout_follows_the_record(lowered, name):
    low = lowered(name)
    deploy, record = low.deploy, low.record
    assert not onnx.defs.has("AscendQuant")    # lowering registered nothing with onnx...
    check_model(deploy)                         # ...the target checks the Ascend nodes itself
    with ascend_schemas_registered():           # what onnx.checker says with the schemas (opt-in)
        onnx.checker.check_model(deploy)
    nodes = {n.name: n for n in deploy.graph.node}
    values = inits(deploy)
    producers = {o: n for n in deploy.graph.node for o in n.output}
    assert {n.domain for n in deploy.graph.node if n.op_type.startswith("Ascend")} == {""}
    for layer, rec in record.items():
        node = nodes[layer]
        quant = producers[node.input[0]]
        assert quant.op_type == "AscendQuant"
        a = attrs(quant)
        assert a["scale"] == np.float32(1.0 / np.float64(np.float32(rec.scale_d)))
        assert a["offset"] == rec.offset_d and a["sqrt_mode"] == 0
        assert a["round_mode"] == b"Round" and a["dst_type"] == b"INT8"
        dequant = nodes[f"{layer}.dequant"]
        assert attrs(dequant) == {"dtype": 0}
        param = values[f"{layer}.dequant.param"]
        assert param.dtype == np.uint64 and param.shape == (len(rec.scale_w),)
        if node.op_type != "AveragePool":
            assert values[node.input[1]].dtype == np.int8
            if len(node.input) > 2:
                assert values[node.input[2]].dtype == np.int32
        if node.op_type == "Gemm":
            assert attrs(node).get("transB", 0) == 0
    quants = [n for n in deploy.graph.node if n.op_type == "AscendQuant"]
    assert len(quants) == len({(n.input[0], attrs(n)["scale"], attrs(n)["offset"]) for n in quants})   # fused


@pytest.mark.parametrize("name", REAL_MODELS)
def test_deq_scale_round_trips_for_every_layer(lowered, name):
    low = lowered(name)
    values = inits(low.deploy)
    rng = np.random.default_rng(7)
    per_channel = 0
    for layer, rec in low.record.items():
        param = values[f"{layer}.dequant.param"]
        deq, shift, offset = unpack_deq_scale(param)
        expected = (np.float32(rec.scale_d) * np.asarray(rec.scale_w, np.float32)).astype(np.float32)
        assert deq.view(np.uint32).tolist() == expected.view(np.uint32).tolist(), layer
        assert not shift.any() and not offset.any()
        assert np.array_equal(pack_deq_scale(deq), param)
        # with shift N and offset_w in the high bits (per channel): pack -> unpack is exact
        n = rng.integers(1, 17, size=deq.size)
        off = rng.integers(-128, 128, size=deq.size)
        words = pack_deq_scale(deq, n, off)
        d2, s2, o2 = unpack_deq_scale(words)
        assert d2.view(np.uint32).tolist() == deq.view(np.uint32).tolist()
        assert s2.tolist() == n.tolist() and o2.tolist() == off.tolist()
        assert np.array_equal(words & np.uint64(0xFFFFFFFF), param)
        assert np.array_equal((words >> np.uint64(32)) & np.uint64(0xFF), n.astype(np.uint64))
        assert np.array_equal((words >> np.uint64(40)) & np.uint64(0xFF), (off & 0xFF).astype(np.uint64))
        per_channel += deq.size > 1
    assert per_channel >= 2


@pytest.mark.parametrize("name", REAL_MODELS)
def test_every_quantizable_node_lowered_or_listed(lowered, name):
    low = lowered(name)
    report = low.result.artifacts["ascend_report"]
    graph_nodes = [n for n in low.result.model.graph.node if n.op_type in SPEC61_TYPES]
    listed = set(report["lowered"]) | set(report["bias_adds"]) | set(report["not_lowered"]) | \
        {key.rpartition(":")[0] for key in report["tensor_quantized"]}
    assert {n.name for n in graph_nodes} == listed
    assert all(isinstance(reason, str) and reason for reason in report["not_lowered"].values())
    assert set(report["lowered"]) == set(low.record)
    deploy_names = {n.name for n in low.deploy.graph.node}
    assert all(f"{layer}.dequant" in deploy_names for layer in report["lowered"])
    written = sorted(p.name for p in low.out.iterdir())
    stem = Path(name).stem
    assert written == sorted([f"{stem}_deploy_model.onnx", f"{stem}_fake_quant_model.onnx", "record.txt",
                              f"{stem}_quant_config.json"])


# -- synthetic models: every layer kind ------------------------------------------------------------
def layers_model() -> onnx.ModelProto:
    """Depthwise + grouped Conv, quant fusion (two convs on one tensor), grouped per-channel ConvTranspose,
    padded AveragePool, Gemm with transB=1 and alpha/beta != 1, MatMul + Add bias."""
    rng = np.random.default_rng(11)
    f = lambda *shape: rng.normal(0, 0.4, shape).astype(np.float32)   # noqa: E731
    init = [numpy_helper.from_array(v, k) for k, v in {
        "dw.w": f(4, 1, 3, 3), "dw.b": f(4), "g.w": f(8, 2, 3, 3), "g.b": f(8), "p.w": f(8, 4, 1, 1),
        "dc.w": f(8, 3, 2, 2), "dc.b": f(6), "fc.w": f(5, 96), "fc.b": f(5), "mm.w": f(5, 7),
        "mm.b": f(7), "shape": np.array([0, -1], np.int64)}.items()]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "dw.w", "dw.b"], ["t_dw"], name="dw", group=4, pads=[1, 1, 1, 1]),
        n("Relu", ["t_dw"], ["t_r"], name="relu"),
        n("Conv", ["t_r", "g.w", "g.b"], ["t_g"], name="grouped", group=2, pads=[1, 1, 1, 1], strides=[2, 2]),
        n("Conv", ["t_r", "p.w"], ["t_p"], name="pointwise", strides=[2, 2]),
        n("Add", ["t_g", "t_p"], ["t_sum"], name="sum"),
        n("ConvTranspose", ["t_sum", "dc.w", "dc.b"], ["t_dc"], name="deconv", group=2, strides=[2, 2]),
        n("AveragePool", ["t_dc"], ["t_pool"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
          pads=[1, 1, 1, 1], count_include_pad=0),
        n("Reshape", ["t_pool", "shape"], ["t_flat"], name="flat"),
        n("Gemm", ["t_flat", "fc.w", "fc.b"], ["t_fc"], name="fc", transB=1, alpha=0.5, beta=2.0),
        n("MatMul", ["t_fc", "mm.w"], ["t_mm"], name="mm"),
        n("Add", ["t_mm", "mm.b"], ["y"], name="mm_bias"),
    ]
    graph = helper.make_graph(nodes, "layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def ptq(lower: dict, *, extra_before_lower: list | None = None, calibrator: str = "minmax") -> dict:
    return {"schema_version": 1, "name": "ascend-test", "datasets": {"calib": {"reader": "npy", "batch_size": 4}},
            "passes": [{"pass": "match_layers"},
                       {"pass": "calibrate", "options": {"algorithm": calibrator}},
                       {"pass": "quantize_weights"}] + (extra_before_lower or []) +
                      [{"pass": "lower", "options": lower}, {"pass": "export_amct"}]}


def synthetic(tmp_path, model=None, n=8, shape=(4, 8, 8), seed=3):
    model = model or layers_model()
    path, data = tmp_path / "m.onnx", tmp_path / "x.npy"
    onnx.save(model, str(path))
    x = np.random.default_rng(seed).normal(0, 1, (n,) + tuple(shape)).astype(np.float32)
    np.save(data, x)
    return path, data, x


def compare(result, x, tmp=None):
    deploy, fake = result.artifacts["lowered"]["ascend"], result.artifacts["lowered"]["fakequant"]
    anti = {n.output[0] for n in deploy.graph.node if n.op_type == "AscendAntiQuant"}
    readers = [n.output[0] for n in deploy.graph.node if anti & set(n.input)]   # same names in both models
    names = layer_outputs(deploy) + readers
    return verify_deploy(expose(deploy, names), expose(fake, names), [x])


def test_every_layer_kind_lowered_and_equal(session, tmp_path):
    path, data, x = synthetic(tmp_path)
    result = session.build(ptq({"targets": ["fakequant", "ascend"]})).run(
        path, datasets={"calib": str(data)}, output_dir=tmp_path / "out")
    deploy = result.artifacts["lowered"]["ascend"]
    record = result.artifacts["quant_record"]
    assert list(record) == ["dw", "grouped", "pointwise", "deconv", "pool", "fc", "mm"]
    nodes = {n.name: n for n in deploy.graph.node}
    values = inits(deploy)
    # one AscendQuant for the two convs reading t_r with equal factors (AMCT quant fusion)
    assert record["grouped"].scale_d == record["pointwise"].scale_d
    assert nodes["grouped"].input[0] == nodes["pointwise"].input[0] == "grouped.quant:0"
    assert "pointwise.quant" not in nodes
    # Gemm: transB applied offline, alpha/beta folded
    fc = nodes["fc"]
    assert attrs(fc) == {"transB": 0, "alpha": 1.0, "beta": 1.0}
    assert values[fc.input[1]].shape == (96, 5) and values[fc.input[1]].dtype == np.int8
    # MatMul + Add bias: the Add carries the INT32 bias, AscendDequant after the Add
    assert values[nodes["mm_bias"].input[1]].dtype == np.int32
    assert nodes["mm.dequant"].input[0] == nodes["mm_bias"].output[0]
    assert nodes["mm.dequant"].output[0] == "y"
    # AveragePool: no weights, deq = scale_d
    (deq,), _, _ = unpack_deq_scale(values["pool.dequant.param"])
    assert deq == np.float32(record["pool"].scale_d)
    # per-channel ConvTranspose (group 2): Cout = 6 scales
    assert values["deconv.dequant.param"].shape == (6,)
    assert values["dw.dequant.param"].shape == (4,)
    report = compare(result, x)
    assert report.ok and report.max_steps <= 1e-3, report.format()
    assert result.artifacts["ascend_report"]["not_lowered"] == {
        "sum": "Add: tensor quantization only, and no tensor_quantize entry"}
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["m_deploy_model.onnx", "m_fake_quant_model.onnx", "m_quant_config.json", "record.txt"]


def test_custom_domain(session, tmp_path):
    path, data, x = synthetic(tmp_path)
    result = session.build(ptq({"targets": ["fakequant", "ascend"],
                                "target_options": {"ascend": {"domain": "amct.customop"}}})).run(
        path, datasets={"calib": str(data)})
    deploy = result.artifacts["lowered"]["ascend"]
    assert {n.domain for n in deploy.graph.node if n.op_type.startswith("Ascend")} == {"amct.customop"}
    assert {(o.domain, o.version) for o in deploy.opset_import} >= {("amct.customop", 1), ("", 13)}
    onnx.checker.check_model(deploy)
    assert compare(result, x).ok


def test_bad_target_options(session, tmp_path):
    path, data, _ = synthetic(tmp_path)
    with pytest.raises(AmctError) as info:
        session.build(ptq({"targets": ["ascend"], "target_options": {"ascend": {"domain": "bad domain!"}}})).run(
            path, datasets={"calib": str(data)}, output_dir=tmp_path / "o")
    assert "target_options.ascend.domain" in str(info.value) and "bad domain!" in str(info.value)
    with pytest.raises(AmctError) as info:
        session.build(ptq({"targets": ["ascend"], "target_options": {"ascend": {"quant_convention": "x"}}})).run(
            path, datasets={"calib": str(data)}, output_dir=tmp_path / "o")
    assert "quant_convention" in str(info.value)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cann_convention_is_recorded_and_verified(session, tmp_path):
    path, data, x = synthetic(tmp_path)
    result = session.build(ptq({"targets": ["fakequant", "ascend"],
                                "target_options": {"ascend": {"quant_convention": "cann"}}})).run(
        path, datasets={"calib": str(data)})
    deploy = result.artifacts["lowered"]["ascend"]
    assert {p.key: p.value for p in deploy.metadata_props}["amct_pipeline.ascend.quant_convention"] == "cann"
    report = compare(result, x)
    assert report.quant_convention == "cann" and report.ok, report.format()


# -- tensor quantization (MaxPool / Add inputs, multi-output) ----------------------------------------
def test_maxpool_tensor_quantization_mnist(session, tmp_path):
    path = shared_path("models/mnist-8.onnx")
    data = tmp_path / "x.npy"
    x = real_inputs("mnist-8.onnx", 8)
    np.save(data, x)
    entries = {"pass": "tensor_quantize_test", "options": {"entries": ["Pooling66:0", "Pooling160:0", "Plus30:0"]}}
    result = session.build(ptq({"targets": ["fakequant", "ascend"]}, extra_before_lower=[entries])).run(
        path, datasets={"calib": str(data)}, output_dir=tmp_path / "out")
    deploy, fake = result.artifacts["lowered"]["ascend"], result.artifacts["lowered"]["fakequant"]
    nodes = {n.name: n for n in deploy.graph.node}
    producers = {o: n for n in deploy.graph.node for o in n.output}
    record = result.artifacts["quant_record"]
    for key in ("Pooling66:0", "Pooling160:0", "Plus30:0"):
        anti = nodes[f"{key}.anti_quant"]
        assert anti.op_type == "AscendAntiQuant"
        node_name, _, index = key.rpartition(":")
        assert nodes[node_name].input[int(index)] == anti.output[0]
        assert producers[anti.input[0]].op_type == "AscendQuant"
        a = attrs(anti)
        assert a["scale"] == np.float32(record[key].scale_d) and a["offset"] == -record[key].offset_d
        assert not record[key].scale_w
    fake_names = {n.name for n in fake.graph.node}
    assert {"Pooling66:0.quant.fakequant.round", "Pooling66:0.fakeantiquant.mul"} <= fake_names
    assert "Pooling66:0" in (tmp_path / "out" / "record.txt").read_text()
    report = result.artifacts["ascend_report"]
    assert report["tensor_quantized"] == ["Plus30:0", "Pooling66:0", "Pooling160:0"]
    assert compare(result, x[:4]).max_steps <= 1e-3


def test_record_with_tensor_entries_reproduces_the_deploy_model(session, tmp_path):
    """record.txt's "<node>:<input>" entries come back through load_record as tensor quantization."""
    path = shared_path("models/mnist-8.onnx")
    data = tmp_path / "x.npy"
    np.save(data, real_inputs("mnist-8.onnx", 8))
    entries = {"pass": "tensor_quantize_test", "options": {"entries": ["Pooling66:0", "Plus30:0"]}}
    lower = {"targets": ["fakequant", "ascend"]}
    first = session.build(ptq(lower, extra_before_lower=[entries])).run(
        path, datasets={"calib": str(data)}, output_dir=tmp_path / "out")
    spec = {"schema_version": 1, "name": "from-record", "passes": [
        {"pass": "match_layers"}, {"pass": "load_record", "options": {"path": str(tmp_path / "out" / "record.txt")}},
        {"pass": "lower", "options": lower}]}
    second = session.build(spec).run(path)
    assert second.stats_for("load_record")["tensors"] == 2
    assert second.artifacts["quant_record"] == first.artifacts["quant_record"]
    for target in ("fakequant", "ascend"):
        assert (second.artifacts["lowered"][target].graph.SerializeToString()
                == first.artifacts["lowered"][target].graph.SerializeToString()), target


def test_multi_output_shares_the_quant_resnet8(session, tmp_path):
    """AMCT's multi-output layout: a tensor read by a conv and by an Add is quantized once; the Add
    reads it back through an AscendAntiQuant."""
    path = shared_path("models/resnet8_cifar10_bn.onnx")
    data = tmp_path / "x.npy"
    x = real_inputs("resnet8_cifar10_bn.onnx", 8)
    np.save(data, x)
    spec = ptq({"targets": ["fakequant", "ascend"]},
               extra_before_lower=[{"pass": "tensor_quantize_test", "options": {"multi_output": True}}])
    spec["passes"].insert(0, {"pass": "fuse_bn"})
    result = session.build(spec).run(path, datasets={"calib": str(data)})
    deploy = result.artifacts["lowered"]["ascend"]
    antis = [n for n in deploy.graph.node if n.op_type == "AscendAntiQuant"]
    # 'activation' feeds conv2d_1 and add (the other Adds read conv outputs, not layer inputs)
    assert [n.name for n in antis] == ["add:0.anti_quant"]
    assert result.artifacts["quant_record"]["add:0"].scale_d == result.artifacts["quant_record"]["conv2d_1"].scale_d
    quants = [n for n in deploy.graph.node if n.op_type == "AscendQuant"]
    assert not any(":" in n.name for n in quants)               # no AscendQuant of its own ...
    assert all(a.input[0] in {n.output[0] for n in quants} for a in antis)   # ... the conv's is shared
    report = compare(result, x[:4])
    assert report.ok and report.max_steps <= 1e-3, report.format()


@pytest.mark.parametrize("entry, message", [
    ("nope:0", "no node named 'nope'"),
    ("relu:0", "node 'relu' is a Relu; tensor quantization applies to MaxPool, Add inputs only"),
    ("sum:5", "node 'sum' has no input 5"),
    ("grouped:0", "'grouped' is a quantizable Conv layer"),
    ("mm_bias:0", "adds the bias of the quantized layer 'mm'"),
])
def test_bad_tensor_quantize_entries(session, tmp_path, entry, message):
    path, data, _ = synthetic(tmp_path)
    with pytest.raises(PassError) as info:
        session.build(ptq({"targets": ["fakequant", "ascend"]},
                          extra_before_lower=[{"pass": "tensor_quantize_test", "options": {"entries": [entry]}}])).run(
            path, datasets={"calib": str(data)}, output_dir=tmp_path / "o")
    assert message in str(info.value) and f"tensor '{entry}'" in str(info.value)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# -- record act_type / wts_type ---------------------------------------------------------------------
def small_model() -> onnx.ModelProto:
    """Tiny layers whose INT16 x INT8 accumulations stay below 2^24 (exact in the float32 fake model)."""
    rng = np.random.default_rng(5)
    init = [numpy_helper.from_array(rng.normal(0, 0.5, (3, 1, 2, 2)).astype(np.float32), "c.w"),
            numpy_helper.from_array(rng.normal(0, 0.5, (3,)).astype(np.float32), "c.b"),
            numpy_helper.from_array(rng.normal(0, 0.5, (4, 3)).astype(np.float32), "fc.w"),
            numpy_helper.from_array(rng.normal(0, 0.5, (4, 2)).astype(np.float32), "mm.w"),
            numpy_helper.from_array(np.array([0, -1], np.int64), "shape")]
    n = helper.make_node
    nodes = [n("Conv", ["x", "c.w", "c.b"], ["t_c"], name="conv"),
             n("Relu", ["t_c"], ["t_r"], name="relu"),
             n("GlobalAveragePool", ["t_r"], ["t_g"], name="gap"),
             n("Reshape", ["t_g", "shape"], ["t_f"], name="flat"),
             n("Gemm", ["t_f", "fc.w"], ["t_fc"], name="fc", transB=1),
             n("MatMul", ["t_fc", "mm.w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _edited_record(session, tmp_path, edit):
    from amct_pipeline.amct.record import read_record, write_record
    path, data, x = synthetic(tmp_path, small_model(), shape=(1, 5, 5))
    session.build(ptq({"targets": ["fakequant"]})).run(path, datasets={"calib": str(data)}, output_dir=tmp_path / "a")
    record = read_record(tmp_path / "a" / "record.txt")
    edit(record)
    write_record(record, tmp_path / "edited.txt")
    return path, data, x, tmp_path / "edited.txt"


def from_record(record, targets=("fakequant", "ascend"), fuse=False) -> dict:
    return {"schema_version": 1, "name": "from-record",
            "passes": ([{"pass": "fuse_bn"}] if fuse else []) + [
                {"pass": "match_layers"}, {"pass": "load_record", "options": {"path": str(record)}},
                {"pass": "lower", "options": {"targets": list(targets)}}]}


def _from_record(session, path, record, out=None):
    return session.build(from_record(record)).run(path, output_dir=out)


def test_int16_activations_and_int6_int7_weights(session, tmp_path):
    def edit(record):
        conv = record["conv"]
        conv.act_type = "INT16"
        conv.scale_d, conv.offset_d = conv.scale_d / 256, conv.offset_d * 256
        conv.wts_type = "INT6"
        fc = record["fc"]
        fc.act_type, fc.scale_d, fc.offset_d = "INT16", fc.scale_d / 256, fc.offset_d * 256
        record["mm"].wts_type = "INT7"
    path, _, x, record = _edited_record(session, tmp_path, edit)
    result = _from_record(session, path, record)
    deploy = result.artifacts["lowered"]["ascend"]
    nodes = {n.name: n for n in deploy.graph.node}
    values = inits(deploy)
    assert attrs(nodes["conv.quant"])["dst_type"] == b"INT16"
    assert attrs(nodes["fc.quant"])["dst_type"] == b"INT16"
    assert attrs(nodes["mm.quant"])["dst_type"] == b"INT8"
    conv_w, mm_w = values[nodes["conv"].input[1]], values[nodes["mm"].input[1]]
    assert conv_w.dtype == np.int8 and conv_w.min() >= -32 and conv_w.max() <= 31 and np.abs(conv_w).max() >= 31
    assert mm_w.dtype == np.int8 and mm_w.min() >= -64 and mm_w.max() <= 63 and np.abs(mm_w).max() >= 63
    assert result.artifacts["quant_record"]["conv"].act_type == "INT16"
    report = compare(result, x)
    assert report.ok and report.max_steps <= 1e-3, report.format()


def test_int16_on_matmul_is_refused(session, tmp_path):
    def edit(record):
        record["mm"].act_type = "INT16"
    path, _, _, record = _edited_record(session, tmp_path, edit)
    with pytest.raises(PassError) as info:
        _from_record(session, path, record, tmp_path / "o")
    assert "layer 'mm'" in str(info.value) and "INT16 activations are not allowed for MatMul" in str(info.value)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_int4_weights_are_packed_and_match_fakequant(session, tmp_path):
    from amct_pipeline.ascend.packing import unpack_int4

    def edit(record):
        conv = record["conv"]
        conv.wts_type = "INT4"
        conv.scale_w = [s * 127 / 7 for s in conv.scale_w]       # the INT4 grid over the same range
    path, _, x, record = _edited_record(session, tmp_path, edit)
    result = _from_record(session, path, record)
    deploy, fake = result.artifacts["lowered"]["ascend"], result.artifacts["lowered"]["fakequant"]
    nodes = {n.name: n for n in deploy.graph.node}
    weight = next(t for t in deploy.graph.initializer if t.name == nodes["conv"].input[1])
    assert weight.data_type == onnx.TensorProto.INT4 and len(weight.raw_data) == (np.prod(weight.dims) + 1) // 2
    codes = unpack_int4(weight.raw_data, tuple(weight.dims))
    fake_codes = inits(fake)[next(n for n in fake.graph.node if n.name == "conv").input[1]]
    np.testing.assert_array_equal(codes, fake_codes.astype(np.int8))
    assert codes.min() >= -8 and codes.max() <= 7 and np.abs(codes).max() >= 7
    assert result.artifacts["quant_record"]["conv"].wts_type == "INT4"
    report = compare(result, x)
    assert report.ok and report.max_steps <= 1e-3, report.format()


# -- bad records through the ascend pipeline -------------------------------------------------------
def _resnet8_record_fails(session, record_path, out) -> str:
    """The error of lowering resnet8 to Ascend from ``record_path``; nothing may be written to ``out``."""
    with pytest.raises(AmctError) as info:
        session.build(from_record(record_path, ["ascend"], fuse=True)).run(
            shared_path("models/resnet8_cifar10_bn.onnx"), output_dir=out)
    assert not out.exists() or not any(out.iterdir())
    return str(info.value)


def test_record_naming_a_missing_layer(session, tmp_path, lowered):
    low = lowered("resnet8_cifar10_bn.onnx")
    text = (low.out / "record.txt").read_text().replace('key: "conv2d_3"', 'key: "conv2d_99"')
    bad = tmp_path / "record.txt"
    bad.write_text(text)
    message = _resnet8_record_fails(session, bad, tmp_path / "o")
    assert "layer 'conv2d_99'" in message and "not a quantizable layer" in message


def test_record_missing_factors(session, tmp_path, lowered):
    from amct_pipeline.amct.record import read_record, write_record
    low = lowered("resnet8_cifar10_bn.onnx")
    record = read_record(low.out / "record.txt")
    record["conv2d_3"].scale_d = None
    bad = tmp_path / "record.txt"
    write_record(record, bad)
    message = _resnet8_record_fails(session, bad, tmp_path / "o")
    assert "layer 'conv2d_3'" in message and "scale_d" in message
    record = read_record(low.out / "record.txt")
    record["dense"].scale_w = []
    record["dense"].offset_w = []
    write_record(record, bad)
    message = _resnet8_record_fails(session, bad, tmp_path / "o")
    assert "layer 'dense'" in message and "scale_w" in message


def test_record_round_trip_gives_the_same_deploy_model(session, lowered, tmp_path):
    """load_record on the exported record.txt reproduces the deploy model byte for byte (graph)."""
    low = lowered("mnist-8.onnx")
    result = session.build(from_record(low.out / "record.txt", fuse=True)).run(shared_path("models/mnist-8.onnx"))
    again = result.artifacts["lowered"]["ascend"]
    assert again.graph.SerializeToString() == low.deploy.graph.SerializeToString()
