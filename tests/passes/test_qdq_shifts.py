"""1-channel convs on column-shifted codes (algorithms/targets/channels.py, ``shift_single_channel_inputs``):
the QDQ model with the rewrite gives bit-identical outputs through onnxruntime's integer kernels for any
kernel width, stride, dilation and padding; convs it cannot serve are left alone; ``undo_code_padding``
(convert_qat) gives the original conv back."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.algorithms.targets.channels import undo_code_padding
from amct_pipeline.ir.graph import load_graph
from amct_pipeline.testing import models

H, W = 13, 17


def luma_model(filters: int = 16, kernel=(5, 5), strides=(1, 1), dilations=(1, 1),
               pads=(2, 2, 2, 2)) -> onnx.ModelProto:
    """x (1 channel) -> conv -> Relu -> 1x1 conv to 8 channels: a luma stem and the layer reading it."""
    rng = np.random.default_rng(sum(kernel) + 7 * strides[1] + 11 * dilations[1] + sum(pads))
    w0, b0 = rng.normal(0, 0.3, (filters, 1, *kernel)), rng.normal(0, 0.1, filters)
    w1 = rng.normal(0, 0.2, (8, filters, 1, 1))
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), name)
             for name, v in (("w0", w0), ("b0", b0), ("w1", w1))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], kernel_shape=list(kernel), strides=list(strides),
                              dilations=list(dilations), pads=list(pads)),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, H, W])
    return models.make_model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def _lowered(session, model, x, **qdq_options):
    options = " ".join(f"{k}={v}" for k, v in qdq_options.items())
    text = ("fuse_bn,match_layers,calibrate{algorithm=minmax dataset=calib block_outputs=true},quantize_weights,"
            f"lower{{targets=[qdq] target_options={{qdq={{{options}}}}}}}")
    return session.build(text, datasets=["calib"]).run(model, datasets={"calib": [{"x": x}]}).artifacts[
        "lowered"]["qdq"]


def _run(model: onnx.ModelProto, x: np.ndarray, optimized: bool = True) -> np.ndarray:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _first_conv(model: onnx.ModelProto) -> tuple[list[int], dict]:
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    dequantize = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    weight = next(i for i in model.graph.initializer if i.name == dequantize.input[0])
    return list(weight.dims), {a.name: list(a.ints) for a in conv.attribute}


GEOMETRIES = [  # kernel, strides, dilations, pads
    ((5, 5), (1, 1), (1, 1), (2, 2, 2, 2)),        # super-resolution's stem
    ((3, 3), (2, 2), (1, 1), (1, 1, 1, 1)),        # a strided 3x3 stem
    ((3, 7), (1, 2), (1, 1), (0, 3, 1, 2)),        # wide, asymmetric padding, column stride
    ((3, 9), (1, 1), (2, 2), (2, 1, 2, 9)),        # dilated, 3 taps per row after the rewrite
    ((1, 2), (1, 1), (1, 1), (0, 0, 0, 0)),        # the narrowest kernel it takes
]


@pytest.mark.parametrize("kernel, strides, dilations, pads", GEOMETRIES)
def test_shifted_luma_conv_gives_the_same_integers(session, kernel, strides, dilations, pads):
    model = luma_model(16, kernel, strides, dilations, pads)
    x = np.random.default_rng(3).uniform(0, 1, (3, 1, H, W)).astype(np.float32)
    plain, shifted = _lowered(session, model, x, shift_inputs="false"), _lowered(session, model, x)
    shape, attrs = _first_conv(shifted)
    taps = -(-kernel[1] // 4)
    assert shape == [16, 4, kernel[0], taps] and attrs["dilations"] == [dilations[0], 4 * dilations[1]]
    assert _first_conv(plain)[0] == [16, 1, *kernel]
    np.testing.assert_array_equal(_run(plain, x), _run(shifted, x))        # integer kernels: bit-equal
    # onnxruntime's unoptimized run computes the float conv on dequantized values: only the float
    # summation order differs (then one code at most where a sum lands on a rounding boundary)
    reference, got = _run(plain, x, optimized=False), _run(shifted, x, optimized=False)
    assert np.mean(reference != got) < 0.01


@pytest.mark.parametrize("filters, kernel", [(8, (5, 5)), (18, (5, 5)), (16, (5, 1))])
def test_convs_the_fast_kernel_would_not_take_are_left_alone(session, filters, kernel):
    """Fewer than 16 filters (8 are widened to 16 first, then shifted), not a multiple of 4, or 1 column wide."""
    model = luma_model(filters, kernel, pads=(kernel[0] // 2, kernel[1] // 2) * 2)
    x = np.random.default_rng(5).uniform(0, 1, (2, 1, H, W)).astype(np.float32)
    shape = _first_conv(_lowered(session, model, x))[0]
    if filters == 8:
        assert shape == [16, 4, 5, 2]            # pad_narrow_outputs widened it, then it qualified
    else:
        assert shape == [filters, 1, *kernel]


@pytest.mark.parametrize("geometry", GEOMETRIES[:4])
def test_convert_qat_reads_shifted_codes_back(session, geometry):
    model = luma_model(16, *geometry)
    x = np.random.default_rng(8).uniform(0, 1, (2, 1, H, W)).astype(np.float32)
    plain, shifted = _lowered(session, model, x, shift_inputs="false"), _lowered(session, model, x)
    graph = load_graph(shifted)
    assert undo_code_padding(graph) == 1
    graph.finalize()
    restored = graph.to_proto()
    assert not {"Pad", "Concat", "Slice"} & {n.op_type for n in restored.graph.node}
    assert _first_conv(restored) == _first_conv(plain)
    np.testing.assert_array_equal(_run(plain, x), _run(restored, x))
