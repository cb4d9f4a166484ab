"""The QDQ layout's data movement (quant.facts): integer Concat, Split, shuffles, pooling and resizing in
onnxruntime's optimized graph, separate scales where ranges differ, numerics against the float model
and onnxruntime's reference (unoptimized) execution of the same QDQ graph."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.quant.facts import CONCAT_RANGE_RATIO, extra_tensors, plan_layout, resolve_layout
from amct_pipeline.testing import models
from amct_pipeline.testing.detector import DETECTOR_INPUT, detector_parts, shufflenet_detector

PIPELINE = ("fuse_bn,match_layers,calibrate{{algorithm={algorithm} dataset=calib block_outputs=true}},"
            "quantize_weights,lower{{targets=[qdq]}}")


# -- helpers ---------------------------------------------------------------------------------------
def _session_run(model: onnx.ModelProto, x: np.ndarray, *, optimize: bool, optimized_path=None) -> list[np.ndarray]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def optimized_ops(model: onnx.ModelProto, x: np.ndarray, tmp_path) -> dict[str, int]:
    """Op counts of onnxruntime's optimized graph (what actually runs)."""
    path = tmp_path / "optimized.onnx"
    _session_run(model, x[:1], optimize=True, optimized_path=path)
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def qdq_count(ops: dict[str, int]) -> int:
    return ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0)


def sqnr(reference: np.ndarray, got: np.ndarray) -> float:
    reference, got = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - got) ** 2), 1e-30)))


def quantize(session, model: onnx.ModelProto, data: np.ndarray, algorithm: str = "minmax", batch: int = 8):
    text = PIPELINE.format(algorithm=algorithm)
    feeds = [{model.graph.input[0].name: data[i:i + batch]} for i in range(0, len(data), batch)]
    return session.build(text, datasets=["calib"]).run(model, datasets={"calib": feeds})


def smooth_images(count: int, channels: int, size: int, seed: int = 0, low: float = 0.0) -> np.ndarray:
    """Blocky random images (activations with structure), values in [low, 1]."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(low, 1.0, (count, channels, size // 4, size // 4)).astype(np.float32)
    x = np.repeat(np.repeat(base, 4, axis=2), 4, axis=3)
    return (x + rng.normal(0, 0.02, x.shape)).astype(np.float32)


class _Net:
    """A tiny graph builder: convs with random weights, any node, one input ``x``."""

    def __init__(self, channels: int, size: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shape = [None, channels, size, size]
        self.count = 0

    def const(self, values, dtype=np.float32) -> str:
        self.count += 1
        name = f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def op(self, op: str, inputs, outputs: int = 1, **attrs) -> list[str]:
        self.count += 1
        name = f"{op.lower()}{self.count}"
        outs = [f"{name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs

    def conv(self, x: str, cin: int, cout: int, *, k: int = 3, relu: bool = True, gain: float = 1.0) -> str:
        w = self.const(self.rng.normal(0, gain / np.sqrt(cin * k * k), (cout, cin, k, k)))
        b = self.const(self.rng.normal(0, 0.1 * gain, cout))
        (y,) = self.op("Conv", [x, w, b], pads=[k // 2] * 4)
        return self.op("Relu", [y])[0] if relu else y

    def model(self, *outputs: str) -> onnx.ModelProto:
        """Each output through a Flatten (a conv whose output is a graph output cannot fuse: nothing
        quantizes its output), so every conv of these models runs as QLinearConv."""
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *self.shape[1:]])
        flat = [self.op("Flatten", [o])[0] for o in outputs]
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in flat]
        return models.make_model(self.nodes, [x], outs, self.inits)


def assert_matches_reference(qdq: onnx.ModelProto, float_model: onnx.ModelProto, x: np.ndarray,
                             min_sqnr: float) -> None:
    """onnxruntime's integer kernels compute what the QDQ graph says (its unoptimized execution), up
    to requantization rounding, and the QDQ model stays close to the float model."""
    fast = _session_run(qdq, x, optimize=True)
    reference = _session_run(qdq, x, optimize=False)
    floats = _session_run(float_model, x, optimize=False)
    for got, ref, flt in zip(fast, reference, floats):
        assert sqnr(ref, got) >= 35.0, "integer kernels differ from the QDQ graph's semantics"
        assert sqnr(flt, got) >= min_sqnr


# -- Concat ----------------------------------------------------------------------------------------
def two_branch_concat(*, shared: bool = False, box_gain: float = 1.0, reader: str = "conv") -> onnx.ModelProto:
    """x -> conv (a) and conv (b) -> Concat -> conv / Reshape -> y. ``shared``: branch a is also read by a
    conv of its own (so the Concat must requantize it); ``box_gain``: branch b's weights scaled (its
    range); ``reader``: what reads the Concat ("conv": a layer, "reshape": only data movement)."""
    net = _Net(3, 16)
    stem = net.conv("x", 3, 8)
    a = net.conv(stem, 8, 8)
    b = net.conv(stem, 8, 8, relu=False, gain=box_gain)
    (cat,) = net.op("Concat", [a, b], axis=1)
    outputs = []
    if reader == "conv":
        outputs.append(net.conv(cat, 16, 4, k=1, relu=False))
    else:
        outputs.append(net.op("Reshape", [cat, net.const([0, 16, -1], np.int64)])[0])
    if shared:
        outputs.append(net.conv(a, 8, 4, k=1, relu=False))
    return net.model(*outputs)


def test_concat_of_two_quantized_branches_is_qlinearconcat(session, tmp_path):
    model = two_branch_concat()
    x = smooth_images(32, 3, 16)
    result = quantize(session, model, x)
    qdq = result.artifacts["lowered"]["qdq"]
    ops = optimized_ops(qdq, x, tmp_path)
    assert ops.get("QLinearConcat") == 1 and "Concat" not in ops
    assert ops.get("QLinearConv") == 4 and "Conv" not in ops
    assert qdq_count(ops) == 2                  # the input's QuantizeLinear, the output's DequantizeLinear
    # both branches nothing else reads take the Concat's factors: no requantization at all
    layout = resolve_layout(result.graph, plan_layout(result.graph, result.artifacts["layer_map"]),
                            result.artifacts["act_quant"], result.artifacts["tensor_quant"])
    concat = next(n for n in result.graph.nodes if n.op == "Concat")
    assert sorted(layout.merged) == sorted(t.name for t in concat.inputs)
    scales = {layout.factors[t.name] for t in concat.inputs} | {layout.factors[concat.outputs[0].name]}
    assert len(scales) == 1
    assert_matches_reference(qdq, model, x[:8], 25.0)


def test_concat_requantizes_an_input_read_elsewhere(session, tmp_path):
    model = two_branch_concat(shared=True)
    x = smooth_images(32, 3, 16)
    result = quantize(session, model, x)
    qdq = result.artifacts["lowered"]["qdq"]
    ops = optimized_ops(qdq, x, tmp_path)
    assert ops.get("QLinearConcat") == 1 and ops.get("QLinearConv") == 5 and "Concat" not in ops
    assert qdq_count(ops) == 3                  # input Q, two output DQs: no pair left around the Concat
    layout = resolve_layout(result.graph, plan_layout(result.graph, result.artifacts["layer_map"]),
                            result.artifacts["act_quant"], result.artifacts["tensor_quant"])
    concat = next(n for n in result.graph.nodes if n.op == "Concat")
    shared, private = (t.name for t in concat.inputs)
    assert layout.merged == [private]           # the shared input keeps its factors; QLinearConcat requantizes it
    assert layout.factors[shared] != layout.factors[concat.outputs[0].name]
    assert_matches_reference(qdq, model, x[:8], 25.0)


def test_values_of_very_different_ranges_never_share_one_scale(session, tmp_path):
    """Boxes in pixels beside small values (a detector head): one shared scale would leave the small
    ones a few codes; the Concat stays float and each input keeps its own scale."""
    model = two_branch_concat(box_gain=200.0, reader="reshape")
    x = smooth_images(32, 3, 16)
    result = quantize(session, model, x)
    qdq = result.artifacts["lowered"]["qdq"]
    graph, tensor_quant = result.graph, result.artifacts["tensor_quant"]
    layout = resolve_layout(graph, plan_layout(graph, result.artifacts["layer_map"]), result.artifacts["act_quant"],
                            tensor_quant)
    concat = next(n for n in graph.nodes if n.op == "Concat")
    small, box = (t.name for t in concat.inputs)
    width = {t: p.clip_max - p.clip_min for t, p in tensor_quant.items()}
    assert width[box] > CONCAT_RANGE_RATIO * width[small]
    assert layout.float_concats == [concat.name] and concat.outputs[0].name not in layout.factors
    assert layout.factors[small] == tensor_quant[small] and layout.factors[box] == tensor_quant[box]
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == concat.outputs[0].name for n in qdq.graph.node)
    reference = _session_run(model, x[:8], optimize=False)[0].reshape(8, 16, -1)[:, :8]
    got = _session_run(qdq, x[:8], optimize=True)[0].reshape(8, 16, -1)[:, :8]
    assert sqnr(reference, got) >= 30.0                      # the small values keep ~8 bits
    # what one scale over both would have left of them
    shared = tensor_quant[concat.outputs[0].name]
    one_scale = np.clip(np.rint(reference / shared.scale) + shared.offset, -128, 127) - shared.offset
    assert sqnr(reference, one_scale * shared.scale) < 15.0


def test_similar_ranges_share_the_concat(session, tmp_path):
    model = two_branch_concat(box_gain=2.0, reader="reshape")
    x = smooth_images(32, 3, 16)
    result = quantize(session, model, x)
    ops = optimized_ops(result.artifacts["lowered"]["qdq"], x, tmp_path)
    assert ops.get("QLinearConcat") == 1 and qdq_count(ops) == 2


# -- data movement ---------------------------------------------------------------------------------
MOVEMENT = {
    "Transpose": lambda net, t: net.op("Transpose", [t], perm=[0, 1, 3, 2])[0],
    "Reshape": lambda net, t: net.op("Reshape", [t, net.const([0, 8, 8, 32], np.int64)])[0],
    "Squeeze": lambda net, t: net.op("Squeeze", [net.op("Unsqueeze", [t, net.const([2], np.int64)])[0],
                                                 net.const([2], np.int64)])[0],
    "MaxPool": lambda net, t: net.op("MaxPool", [t], kernel_shape=[2, 2], strides=[2, 2])[0],
    "Resize": lambda net, t: net.op("Resize", [t, "", net.const([1, 1, 2, 2])], mode="nearest")[0],
    "Slice": lambda net, t: net.op("Slice", [t, net.const([2], np.int64), net.const([14], np.int64),
                                             net.const([2], np.int64)])[0],
    "Gather": lambda net, t: net.op("Gather", [t, net.const([0, 2, 4, 6, 1, 3, 5, 7], np.int64)], axis=1)[0],
    "Pad": lambda net, t: net.op("Pad", [t, net.const([0, 0, 1, 1, 0, 0, 1, 1], np.int64)], mode="constant")[0],
}


@pytest.mark.parametrize("op", sorted(MOVEMENT))
@pytest.mark.parametrize("fan_out", [False, True])
def test_data_movement_runs_on_codes(session, tmp_path, op, fan_out):
    """conv -> OP -> conv (and, with ``fan_out``, the OP's input and output read by more layers, which
    makes the tensors a class with calibrated factors): no pair is left around the OP."""
    net = _Net(3, 16)
    a = net.conv(net.conv("x", 3, 8), 8, 8)
    moved = MOVEMENT[op](net, a)
    outputs = [net.conv(moved, 8, 4, relu=False)]
    if fan_out:
        outputs += [net.conv(a, 8, 4, k=1, relu=False), net.conv(moved, 8, 4, k=1, relu=False)]
    model = net.model(*outputs)
    x = smooth_images(32, 3, 16)
    result = quantize(session, model, x)
    qdq = result.artifacts["lowered"]["qdq"]
    ops = optimized_ops(qdq, x, tmp_path)
    channel_pads = sum(1 for node in qdq.graph.node if node.op_type == "Pad" and ".channel_pad" in node.name)
    assert channel_pads == 1                   # the 3-channel input's codes padded to 4 channels (pad_channels)
    ops["Pad"] = ops.get("Pad", 0) - channel_pads
    ops = {k: v for k, v in ops.items() if v}
    assert ops.get("QLinearConv") == len(outputs) + 2 and "Conv" not in ops and "FusedConv" not in ops
    if op == "Pad" and fan_out:                 # no integer Pad in onnxruntime: DQ -> Pad -> Q stays
        assert qdq_count(ops) == 3 + len(outputs) and ops.get("Pad") == 1, ops
    else:
        assert qdq_count(ops) == 1 + len(outputs), ops
        assert "Pad" not in ops                 # folded into the conv reading it
    assert_matches_reference(qdq, model, x[:8], 25.0)


@pytest.mark.parametrize("variant", ["pad_value", "resize_linear", "gather_dynamic"])
def test_inexact_movement_is_not_moved(variant):
    """Ops that do not just move values keep float: Pad with a value other than 0, linear Resize."""
    net = _Net(3, 16)
    a = net.conv("x", 3, 8)
    if variant == "pad_value":
        moved = net.op("Pad", [a, net.const([0, 0, 1, 1, 0, 0, 1, 1], np.int64), net.const(1.5)])[0]
    elif variant == "resize_linear":
        moved = net.op("Resize", [a, "", net.const([1, 1, 2, 2])], mode="linear")[0]
    else:
        (shape,) = net.op("Shape", [a])
        indices = net.op("Slice", [shape, net.const([1], np.int64), net.const([2], np.int64)])[0]
        moved = net.op("Gather", [a, net.op("Sub", [indices, net.const([7], np.int64)])[0]], axis=1)[0]
    model = net.model(net.conv(moved, 8, 4, relu=False))
    from amct_pipeline.ir.graph import Graph
    from amct_pipeline.quant.facts import moves_data
    graph = Graph.from_proto(model)
    mover = next(n for n in graph.nodes if n.outputs[0].name == moved)
    assert not moves_data(graph, mover)


# -- the ShuffleNetV2-style detector ---------------------------------------------------------------
def small_detector(**kwargs) -> onnx.ModelProto:
    return shufflenet_detector(size=64, channels=(8, 16, 32, 64), repeats=(1, 2, 1), neck=16, classes=3, **kwargs)


@pytest.mark.parametrize("bn", [True, False])
def test_detector_moves_data_in_integers(session, tmp_path, bn):
    """Channel shuffle (Reshape -> Transpose -> Reshape), Split, Concats, MaxPool, Resize: all on codes;
    what is left is the input's QuantizeLinear and one DequantizeLinear per head (before its Sigmoid)."""
    model = small_detector(bn=bn)
    x = smooth_images(32, 3, 64)
    result = quantize(session, model, x, algorithm="ifmr")
    qdq = result.artifacts["lowered"]["qdq"]
    ops = optimized_ops(qdq, x, tmp_path)
    convs = sum(1 for n in model.graph.node if n.op_type == "Conv")
    assert ops.get("QLinearConv") == convs and "Conv" not in ops and "FusedConv" not in ops
    assert qdq_count(ops) == 4, ops
    concats = sum(1 for n in model.graph.node if n.op_type == "Concat")
    assert ops.get("QLinearConcat") == concats - 4          # the heads' decoded boxes stay float
    assert ops.get("Split", 0) >= 2 and ops.get("Transpose", 0) >= 4
    reference = _session_run(model, x[:8], optimize=False)[0]
    got = _session_run(qdq, x[:8], optimize=True)[0]
    for part, cut in detector_parts(3).items():
        assert sqnr(reference[..., cut], got[..., cut]) >= 15.0, part
    assert_matches_reference(qdq, model, x[:8], 20.0)


def test_detector_calibration_observes_the_layouts_tensors(session):
    """calibrate{block_outputs} observes exactly extra_tensors (one function decides the tensor set), and
    the record (AMCT's ifmr/hfmg results for each layer's input) is the same as without block outputs."""
    model = small_detector()
    x = smooth_images(16, 3, 64)
    feeds = [{DETECTOR_INPUT: x[i:i + 8]} for i in range(0, 16, 8)]
    for algorithm in ("ifmr", "hfmg"):
        runs = {}
        for blocks in (False, True):
            text = f"fuse_bn,match_layers,calibrate{{algorithm={algorithm} block_outputs={str(blocks).lower()}}}"
            runs[blocks] = session.build(text, datasets=["calib"]).run(model, datasets={"calib": feeds})
        ours = runs[True]
        assert list(ours.artifacts["tensor_quant"]) == extra_tensors(ours.graph, ours.artifacts["layer_map"])
        assert ours.artifacts["act_quant"] == runs[False].artifacts["act_quant"]


def test_refine_ranges_emulates_the_qdq_model(session):
    """refine_ranges' evaluation model (QDQ layout) computes what the lowered QDQ model computes."""
    from amct_pipeline.passes.refine_ranges import _qdq_units, build_eval_model, factor_feed
    model = small_detector()
    x = smooth_images(16, 3, 64)
    result = quantize(session, model, x, algorithm="ifmr")
    graph, artifacts = result.graph, result.artifacts
    units = _qdq_units(graph, artifacts["layer_map"], artifacts["act_quant"], artifacts["tensor_quant"])
    assert any(unit.extra for unit in units)
    emulated = build_eval_model(graph, artifacts["layer_map"], artifacts["weight_quant"], units)
    feed = {DETECTOR_INPUT: x[:4]}
    for unit in units:
        feed.update(factor_feed(unit, unit.params))
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    got = ort.InferenceSession(emulated.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, feed)[0]
    lowered = _session_run(artifacts["lowered"]["qdq"], x[:4], optimize=False)[0]
    for part, cut in detector_parts(3).items():       # the evaluation model keeps float biases: not bit-equal
        assert sqnr(lowered[..., cut], got[..., cut]) >= 35.0, part


# -- model outputs ---------------------------------------------------------------------------------
def _classifier(renamed: bool) -> onnx.ModelProto:
    """conv -> pool -> Flatten -> Gemm -> logits, the logits written directly or through an Identity
    (as exported models name their outputs)."""
    net = _Net(3, 16)
    feat = net.conv(net.conv("x", 3, 8), 8, 16)
    (flat,) = net.op("Flatten", net.op("GlobalAveragePool", [feat]))
    w, b = net.const(net.rng.normal(0, 0.3, (10, 16))), net.const(net.rng.normal(0, 0.1, 10))
    (logits,) = net.op("Gemm", [flat, w, b], transB=1)
    if renamed:
        (logits,) = net.op("Identity", [logits])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    return models.make_model(net.nodes, [x], [helper.make_tensor_value_info(logits, TensorProto.FLOAT, None)],
                             net.inits)


def test_logits_stay_float_through_an_identity(session, tmp_path):
    """A layer writing a model output gets no output pair, also behind an Identity: onnxruntime's QGemm
    writes float logits, one rounding fewer, the same model either way."""
    x = smooth_images(24, 3, 16)
    direct, renamed = (quantize(session, _classifier(r), x).artifacts["lowered"]["qdq"] for r in (False, True))
    ops = optimized_ops(renamed, x, tmp_path)
    assert ops.get("QGemm") == 1 and ops.get("QLinearConv") == 2
    assert qdq_count(ops) == 1                                  # the input's QuantizeLinear alone
    np.testing.assert_array_equal(_session_run(direct, x, optimize=True)[0], _session_run(renamed, x, optimize=True)[0])
    assert_matches_reference(renamed, _classifier(True), x, min_sqnr=25.0)
