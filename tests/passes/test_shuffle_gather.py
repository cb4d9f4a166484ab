"""Channel shuffles rewritten as Gathers (algorithms/targets/shuffle.py): the rewritten model computes
exactly what the float model computes (onnxruntime, bit-equal), Splits after a shuffle fold into the
Gathers, and anything that is not a channel shuffle is left alone."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.algorithms.targets.shuffle import gather_channel_shuffles, shuffle_permutation
from amct_pipeline.ir.graph import load_graph
from amct_pipeline.testing import models

SIZE = 6


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def shuffle_model(channels: int = 12, groups: int = 2, split: list[int] | None = None, *, spatial=(SIZE, SIZE),
                  typed_input: bool = True, split_attr: bool = False) -> onnx.ModelProto:
    """x -> conv (any channel order matters) -> shuffle -> [Split] -> convs -> outputs. ``spatial``: the
    H, W the first Reshape writes (a different pair is not a channel shuffle)."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, values, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    nodes.append(helper.make_node("Conv", ["x", const("w", rng.normal(size=(channels, 3, 1, 1)))], ["y"]))
    h, w = spatial
    nodes.append(helper.make_node("Reshape", ["y", const("s1", [0, groups, channels // groups, h, w], np.int64)],
                                  ["r1"]))
    nodes.append(helper.make_node("Transpose", ["r1"], ["t"], perm=[0, 2, 1, 3, 4]))
    nodes.append(helper.make_node("Reshape", ["t", const("s2", [0, channels, SIZE, SIZE], np.int64)], ["shuffled"]))
    outputs = ["shuffled"]
    if split is not None:
        outputs = [f"part{i}" for i in range(len(split))]
        if split_attr:
            nodes.append(helper.make_node("Split", ["shuffled"], outputs, axis=1, split=split))
        else:
            nodes.append(helper.make_node("Split", ["shuffled", const("sizes", split, np.int64)], outputs, axis=1))
    shape = ["N", 3, SIZE, SIZE] if typed_input else ["N", 3, "H", "W"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    return models.make_model(nodes, [x], outs, inits, opset=11 if split_attr else 13)


def rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    graph = load_graph(model)
    count = gather_channel_shuffles(graph)
    graph.finalize()
    return graph.to_proto(), count


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_permutation_is_the_reshape_transpose_reshape():
    x = np.arange(2 * 12 * 2 * 2).reshape(2, 12, 2, 2)
    shuffled = x.reshape(2, 3, 4, 2, 2).transpose(0, 2, 1, 3, 4).reshape(2, 12, 2, 2)
    np.testing.assert_array_equal(x[:, shuffle_permutation(12, 3)], shuffled)


@pytest.mark.parametrize("groups, split, split_attr", [(2, None, False), (2, [6, 6], False), (3, [4, 5, 3], False),
                                                       (2, [6, 6], True), (4, None, False)])
def test_rewrite_computes_exactly_the_shuffle(groups, split, split_attr):
    model = shuffle_model(12, groups, split, split_attr=split_attr)
    new, count = rewritten(model)
    assert count == 1
    ops = _ops(new)
    assert "Transpose" not in ops and "Reshape" not in ops and "Split" not in ops
    assert ops["Gather"] == (len(split) if split else 1)
    x = np.random.default_rng(1).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    for want, got in zip(_run(model, x), _run(new, x)):
        np.testing.assert_array_equal(want, got)


def test_unknown_spatial_size_is_left_alone():
    """H, W not known from the graph: the Reshapes' written sizes cannot be checked against them."""
    model = shuffle_model(8, 2, [4, 4], typed_input=False)
    new, count = rewritten(model)
    assert count == 0 and _ops(new) == _ops(model)


def test_a_reshape_that_moves_spatial_values_is_not_a_shuffle():
    model = shuffle_model(12, 2, spatial=(SIZE * 2, SIZE // 2))
    new, count = rewritten(model)
    assert count == 0 and _ops(new) == _ops(model)


def test_qdq_target_writes_gathers_and_keeps_the_numbers(session):
    """Through ptq and the qdq target: the same quantized outputs with and without the rewrite."""
    from amct_pipeline.testing.detector import DETECTOR_INPUT, shufflenet_detector
    model = shufflenet_detector(size=64, channels=(8, 16, 32, 64), repeats=(1, 2, 1), neck=16, classes=3)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 3, 64, 64)).astype(np.float32)
    feeds = [{DETECTOR_INPUT: x}]
    lowered = {}
    for flag in ("true", "false"):
        text = ("fuse_bn,match_layers,calibrate{algorithm=minmax dataset=calib block_outputs=true},quantize_weights,"
                f"lower{{targets=[qdq] target_options={{qdq={{gather_shuffles={flag}}}}}}}")
        lowered[flag] = session.build(text, datasets=["calib"]).run(model, datasets={"calib": feeds}).artifacts[
            "lowered"]["qdq"]
    assert _ops(lowered["true"]).get("Gather", 0) > 0 and "Gather" not in _ops(lowered["false"])
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    runs = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {DETECTOR_INPUT: x})[0] for m in (lowered["true"], lowered["false"])]
    np.testing.assert_array_equal(*runs)


# -- channel padding of depthwise blocks (algorithms/targets/channels.py) ----------------------------
def depthwise_block_model(channels: int = 10, *, shared: bool = False) -> onnx.ModelProto:
    """x -> conv 3x3 -> shuffle + Split -> (half) 1x1 conv -> Relu -> depthwise 3x3 -> 1x1 conv -> Flatten.
    ``shared``: the depthwise output is also a model output (the block cannot be widened)."""
    rng = np.random.default_rng(3)
    inits, nodes = [], []

    def const(name, values, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    half = channels // 2
    nodes.append(helper.make_node("Conv", ["x", const("w0", rng.normal(0, 0.5, (2 * channels, 3, 3, 3))),
                                           const("b0", rng.normal(0, 0.1, 2 * channels))], ["c0"], pads=[1] * 4))
    nodes.append(helper.make_node("Relu", ["c0"], ["r0"]))
    nodes.append(helper.make_node("Reshape", ["r0", const("s1", [0, 2, channels, SIZE, SIZE], np.int64)], ["t1"]))
    nodes.append(helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1, 3, 4]))
    nodes.append(helper.make_node("Reshape", ["t2", const("s2", [0, 2 * channels, SIZE, SIZE], np.int64)], ["sh"]))
    nodes.append(helper.make_node("Split", ["sh", const("sz", [channels, channels], np.int64)], ["left", "right"],
                                  axis=1))
    nodes.append(helper.make_node("Conv", ["right", const("w1", rng.normal(0, 0.3, (half, channels, 1, 1))),
                                           const("b1", rng.normal(0, 0.1, half))], ["c1"]))
    nodes.append(helper.make_node("Relu", ["c1"], ["r1"]))
    nodes.append(helper.make_node("Conv", ["r1", const("w2", rng.normal(0, 0.3, (half, 1, 3, 3))),
                                           const("b2", rng.normal(0, 0.1, half))], ["dw"], group=half, pads=[1] * 4))
    nodes.append(helper.make_node("Conv", ["dw", const("w3", rng.normal(0, 0.3, (4, half, 1, 1))),
                                           const("b3", rng.normal(0, 0.1, 4))], ["c3"]))
    nodes.append(helper.make_node("Concat", ["c3", "left"], ["cat"], axis=1))
    nodes.append(helper.make_node("Flatten", ["cat"], ["y"]))
    outputs = ["y"] + (["dw"] if shared else [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    return models.make_model(nodes, [x], outs, inits)


def _lowered(session, model, x, **qdq_options):
    options = " ".join(f"{k}={v}" for k, v in qdq_options.items())
    text = ("fuse_bn,match_layers,calibrate{algorithm=minmax dataset=calib block_outputs=true},quantize_weights,"
            f"lower{{targets=[qdq] target_options={{qdq={{{options}}}}}}}")
    feed = {model.graph.input[0].name: x}
    return session.build(text, datasets=["calib"]).run(model, datasets={"calib": [feed]}).artifacts[
        "lowered"]["qdq"]


def _same_outputs(plain: onnx.ModelProto, padded: onnx.ModelProto, x: np.ndarray) -> None:
    """Bit-equal through onnxruntime's integer kernels and through its plain execution of the graph."""
    import onnxruntime as ort
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = level
        runs = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
            None, {m.graph.input[0].name: x}) for m in (plain, padded)]
        for want, got in zip(*runs):
            np.testing.assert_array_equal(want, got)


def _depthwise_groups(model: onnx.ModelProto) -> list[int]:
    return [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group" and a.i > 1]


def test_padded_depthwise_block_gives_the_same_integers(session):
    """Widened to 16 channels (and the Gather feeding it): onnxruntime's optimized (integer) run and its
    unoptimized run of the QDQ graph give exactly the unwidened model's outputs."""
    model = depthwise_block_model(10)
    x = np.random.default_rng(4).uniform(0, 1, (4, 3, SIZE, SIZE)).astype(np.float32)
    plain, padded = _lowered(session, model, x, pad_channels=0), _lowered(session, model, x, pad_channels=16)
    assert _depthwise_groups(plain) == [5] and _depthwise_groups(padded) == [16]
    gathers = [n for n in padded.graph.node if n.op_type == "Gather"]
    sizes = {tuple(numpy_helper.to_array(i).shape) for i in padded.graph.initializer
             if i.name in {n.input[1] for n in gathers}}
    assert (16,) in sizes                     # the Gather feeding the first 1x1 conv repeats an index
    assert [n.op_type for n in padded.graph.node].count("Pad") == 1      # the 3-channel stem reads 4 channels
    assert "Pad" not in [n.op_type for n in plain.graph.node]
    _same_outputs(plain, padded, x)


def downsampling_unit_model(channels: int = 10) -> onnx.ModelProto:
    """x -> conv -> shuffle (no Split) -> [depthwise 3x3/2 -> 1x1 conv] and [1x1 conv], concatenated:
    ShuffleNet's stride-2 unit, whose input (a Gather after the rewrite) is read by two convs."""
    rng = np.random.default_rng(7)
    inits, nodes = [], []

    def const(name, values, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    nodes.append(helper.make_node("Conv", ["x", const("w0", rng.normal(0, 0.5, (channels, 3, 3, 3))),
                                           const("b0", rng.normal(0, 0.1, channels))], ["c0"], pads=[1] * 4))
    nodes.append(helper.make_node("Relu", ["c0"], ["r0"]))
    nodes.append(helper.make_node("Reshape", ["r0", const("s1", [0, 2, channels // 2, SIZE, SIZE], np.int64)], ["t1"]))
    nodes.append(helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1, 3, 4]))
    nodes.append(helper.make_node("Reshape", ["t2", const("s2", [0, channels, SIZE, SIZE], np.int64)], ["sh"]))
    nodes.append(helper.make_node("Conv", ["sh", const("w1", rng.normal(0, 0.3, (channels, 1, 3, 3))),
                                           const("b1", rng.normal(0, 0.1, channels))], ["dw"], group=channels,
                                  pads=[1] * 4, strides=[2, 2]))
    nodes.append(helper.make_node("Conv", ["dw", const("w2", rng.normal(0, 0.3, (4, channels, 1, 1)))], ["c2"]))
    nodes.append(helper.make_node("Conv", ["sh", const("w3", rng.normal(0, 0.3, (4, channels, 1, 1)))], ["c3"],
                                  strides=[2, 2]))
    nodes.append(helper.make_node("Concat", ["c2", "c3"], ["cat"], axis=1))
    nodes.append(helper.make_node("Flatten", ["cat"], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])
    return models.make_model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def test_padded_gather_read_by_two_convs_gives_the_same_integers(session):
    model = downsampling_unit_model(10)
    x = np.random.default_rng(6).uniform(0, 1, (4, 3, SIZE, SIZE)).astype(np.float32)
    plain, padded = _lowered(session, model, x, pad_channels=0), _lowered(session, model, x, pad_channels=16)
    assert _depthwise_groups(plain) == [10] and _depthwise_groups(padded) == [16]
    _same_outputs(plain, padded, x)


def test_a_depthwise_output_read_elsewhere_is_not_padded(session):
    model = depthwise_block_model(10, shared=True)
    x = np.random.default_rng(5).uniform(0, 1, (4, 3, SIZE, SIZE)).astype(np.float32)
    assert _depthwise_groups(_lowered(session, model, x, pad_channels=16)) == [5]


def subpixel_model() -> onnx.ModelProto:
    """x (1 channel) -> conv 5x5 -> Relu -> conv 3x3 to 9 channels -> DepthToSpace: super-resolution's end."""
    rng = np.random.default_rng(8)
    w0, b0 = rng.normal(0, 0.3, (16, 1, 5, 5)), rng.normal(0, 0.1, 16)
    w1, b1 = rng.normal(0, 0.2, (9, 16, 3, 3)), rng.normal(0, 0.1, 9)
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), name)
             for name, v in (("w0", w0), ("b0", b0), ("w1", w1), ("b1", b1))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[2] * 4),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1] * 4),
             helper.make_node("DepthToSpace", ["c1"], ["y"], blocksize=3)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])
    return models.make_model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def test_narrow_conv_output_is_widened_and_sliced(session):
    """The 9-channel conv computes 16 (7 zero filters); a uint8 Slice gives DepthToSpace its 9 back."""
    model = subpixel_model()
    x = np.random.default_rng(9).uniform(0, 1, (4, 1, SIZE, SIZE)).astype(np.float32)
    plain = _lowered(session, model, x, pad_channels=0, shift_inputs="false")
    padded = _lowered(session, model, x, pad_channels=16, shift_inputs="false")     # test_qdq_shifts: the stem
    ops = _ops(padded)
    assert ops.get("Slice") == 1 and "Slice" not in _ops(plain) and "Pad" not in ops     # 1 input channel: no Pad
    _same_outputs(plain, padded, x)


@pytest.mark.parametrize("build, undone", [(subpixel_model, 2), (lambda: depthwise_block_model(10), 2)])
def test_convert_qat_reads_padded_codes_back(session, build, undone):
    """undo_code_padding (run by convert_qat) removes the channel Pad / Slice on codes and restores the
    convs' widths: the same outputs, and the narrow conv / RGB stem have their original weight shapes."""
    from amct_pipeline.algorithms.targets.channels import undo_code_padding
    model = build()
    channels = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    x = np.random.default_rng(10).uniform(0, 1, (4, channels, SIZE, SIZE)).astype(np.float32)
    plain, padded = _lowered(session, model, x, pad_channels=0), _lowered(session, model, x, pad_channels=16)
    graph = load_graph(padded)
    assert undo_code_padding(graph) == undone      # subpixel: the luma shifts + the 9-channel Slice; block: RGB Pad
    #                                                + 4-channel Slice
    graph.finalize()
    restored = graph.to_proto()
    assert not {"Slice", "Pad"} & set(_ops(restored))
    _same_outputs(plain, restored, x)
