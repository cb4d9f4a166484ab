"""Tiny models for pass tests, built with ``onnx.helper``.

Every builder is deterministic (fixed seed), names its activation input ``x`` and returns a
checked ``onnx.ModelProto``. BatchNormalization statistics are random but valid (variance > 0),
so folding them changes weights visibly and numerics tests can fail.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "make_model",
    "bn_nodes",
    "conv_bn",
    "conv_transpose_bn",
    "gemm_bn",
    "matmul_bn",
    "shared_weight_conv_bn",
    "shared_bias_conv_bn",
    "nonconst_weight_conv_bn",
    "conv_output_reused_bn",
    "bn_training_mode",
    "bn_extra_output_used",
    "conv_bn_mul_add",
    "relu_bn",
    "conv_add_bn",
    "quant_layers_model",
]

FLOAT = TensorProto.FLOAT


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto] = (),
               *, opset: int = 13, name: str = "test") -> onnx.ModelProto:
    """A checked model; IR version 8 so that every onnxruntime we support loads it."""
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    _fill_output_types(model)
    onnx.checker.check_model(model)
    return model


def _fill_output_types(model: onnx.ModelProto) -> None:
    """Give outputs declared without a shape the rank shape inference finds (the checker wants one)."""
    if all(o.type.tensor_type.HasField("shape") for o in model.graph.output):
        return
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in (*inferred.graph.output, *inferred.graph.value_info)}
    for output in model.graph.output:
        if not output.type.tensor_type.HasField("shape") and output.name in known:
            output.type.CopyFrom(known[output.name].type)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _bn_stats(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    return {
        "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        "bias": rng.normal(0, 0.5, channels).astype(np.float32),
        "mean": rng.normal(0, 0.5, channels).astype(np.float32),
        "var": rng.uniform(0.2, 2.0, channels).astype(np.float32),
    }


def bn_nodes(prefix: str, x: str, y: str, channels: int, *, seed: int = 1, as_constant_nodes: bool = False,
             epsilon: float = 1e-3, extra_outputs: Sequence[str] = (),
             training_mode: int | None = None) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A BatchNormalization named ``prefix`` (plus Constant nodes or initializers for its stats)."""
    stats = _bn_stats(_rng(seed), channels)
    names = [f"{prefix}.{key}" for key in stats]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    for name, values in zip(names, stats.values()):
        if as_constant_nodes:
            nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const", value=_init(name, values)))
        else:
            inits.append(_init(name, values))
    attrs = {"epsilon": epsilon}
    if training_mode is not None:
        attrs["training_mode"] = training_mode
    nodes.append(helper.make_node("BatchNormalization", [x, *names], [y, *extra_outputs], name=prefix, **attrs))
    return nodes, inits


def _conv_weight(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    return rng.normal(0, 0.3, shape).astype(np.float32)


def conv_bn(*, dims: int = 2, cin: int = 4, cout: int = 6, group: int = 1, bias: bool = True,
            opset: int = 13, bn_as_constant_nodes: bool = False, tail: str = "output",
            size: int = 6) -> onnx.ModelProto:
    """x -> Conv 'conv' -> BatchNormalization 'bn' -> ...

    ``tail``: "output" (the BN output ``y`` is the graph output), "relu" (BN -> Relu -> y) or
    "both" (BN output is a graph output and also feeds a Relu whose output is a second output).
    """
    rng = _rng(dims * 10 + group)
    spatial = [size] * dims
    w = _conv_weight(rng, [cout, cin // group] + [3] * dims)
    inits = [_init("conv.weight", w)]
    conv_inputs = ["x", "conv.weight"]
    if bias:
        inits.append(_init("conv.bias", rng.normal(0, 0.1, cout).astype(np.float32)))
        conv_inputs.append("conv.bias")
    nodes = [helper.make_node("Conv", conv_inputs, ["conv_out"], name="conv", group=group, pads=[1] * 2 * dims)]
    bn_out = "y" if tail in ("output", "both") else "bn_out"
    more, bn_inits = bn_nodes("bn", "conv_out", bn_out, cout, as_constant_nodes=bn_as_constant_nodes)
    nodes += more
    outputs = [helper.make_tensor_value_info("y", FLOAT, None)]
    if tail == "relu":
        nodes.append(helper.make_node("Relu", ["bn_out"], ["y"], name="relu"))
    elif tail == "both":
        nodes.append(helper.make_node("Relu", ["y"], ["z"], name="relu"))
        outputs.append(helper.make_tensor_value_info("z", FLOAT, None))
    x = helper.make_tensor_value_info("x", FLOAT, [2, cin, *spatial])
    return make_model(nodes, [x], outputs, inits + bn_inits, opset=opset)


def conv_transpose_bn(*, cin: int = 4, cout: int = 6, group: int = 2, dims: int = 2,
                      bias: bool = True) -> onnx.ModelProto:
    """x -> ConvTranspose 'deconv' (weight [Cin, Cout/group, k...]) -> BatchNormalization 'bn' -> y."""
    rng = _rng(20 + group)
    inits = [_init("deconv.weight", _conv_weight(rng, [cin, cout // group] + [3] * dims))]
    inputs = ["x", "deconv.weight"]
    if bias:
        inits.append(_init("deconv.bias", rng.normal(0, 0.1, cout).astype(np.float32)))
        inputs.append("deconv.bias")
    nodes = [helper.make_node("ConvTranspose", inputs, ["deconv_out"], name="deconv", group=group,
                              strides=[2] * dims)]
    more, bn_inits = bn_nodes("bn", "deconv_out", "y", cout)
    x = helper.make_tensor_value_info("x", FLOAT, [2, cin] + [5] * dims)
    return make_model(nodes + more, [x], [helper.make_tensor_value_info("y", FLOAT, None)], inits + bn_inits)


def gemm_bn(*, trans_b: int = 0, alpha: float = 1.0, beta: float = 1.0, bias: str = "vector",
            k: int = 8, n: int = 5, m: int = 3) -> onnx.ModelProto:
    """x[m,k] -> Gemm 'fc' -> BatchNormalization 'bn' -> y. ``bias``: "vector", "row", "matrix" or "none"."""
    rng = _rng(30 + trans_b)
    w = rng.normal(0, 0.3, [n, k] if trans_b else [k, n]).astype(np.float32)
    inits = [_init("fc.weight", w)]
    inputs = ["x", "fc.weight"]
    bias_shape = {"vector": [n], "row": [1, n], "matrix": [m, n]}.get(bias)
    if bias_shape is not None:
        inits.append(_init("fc.bias", rng.normal(0, 0.1, bias_shape).astype(np.float32)))
        inputs.append("fc.bias")
    nodes = [helper.make_node("Gemm", inputs, ["fc_out"], name="fc", transB=trans_b, alpha=alpha, beta=beta)]
    more, bn_inits = bn_nodes("bn", "fc_out", "y", n)
    x = helper.make_tensor_value_info("x", FLOAT, [m, k])
    return make_model(nodes + more, [x], [helper.make_tensor_value_info("y", FLOAT, None)], inits + bn_inits)


def matmul_bn(*, bias_add: bool = False, k: int = 8, n: int = 5, m: int = 3, rank: int = 2) -> onnx.ModelProto:
    """x -> MatMul 'mm' (constant [k,n] weight) [-> Add 'mm_bias'] -> BatchNormalization 'bn' -> y.

    ``rank=3`` makes x [2,m,k]: the BN then normalises axis 1 (not the features) and must not fold.
    """
    rng = _rng(40)
    inits = [_init("mm.weight", rng.normal(0, 0.3, [k, n]).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "mm.weight"], ["mm_out"], name="mm")]
    bn_in = "mm_out"
    if bias_add:
        inits.append(_init("mm.bias", rng.normal(0, 0.1, [n]).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["mm_out", "mm.bias"], ["mm_biased"], name="mm_bias"))
        bn_in = "mm_biased"
    channels = n if rank == 2 else m
    more, bn_inits = bn_nodes("bn", bn_in, "y", channels)
    shape = [m, k] if rank == 2 else [2, m, k]
    x = helper.make_tensor_value_info("x", FLOAT, shape)
    out_shape = [m, n] if rank == 2 else [2, m, n]
    return make_model(nodes + more, [x], [helper.make_tensor_value_info("y", FLOAT, out_shape)], inits + bn_inits)


def _two_convs_bn(share_weight: bool, share_bias: bool) -> onnx.ModelProto:
    rng = _rng(50)
    inits = [_init("w1", _conv_weight(rng, [4, 3, 3, 3])), _init("b1", np.zeros(4, np.float32) + 0.1)]
    if not share_weight:
        inits.append(_init("w2", _conv_weight(rng, [4, 3, 3, 3])))
    if not share_bias:
        inits.append(_init("b2", np.zeros(4, np.float32) - 0.1))
    w2, b2 = ("w1" if share_weight else "w2"), ("b1" if share_bias else "b2")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", w2, b2], ["c2"], name="conv2", pads=[1, 1, 1, 1])]
    for i in (1, 2):
        more, bn_inits = bn_nodes(f"bn{i}", f"c{i}", f"y{i}", 4, seed=i)
        nodes += more
        inits += bn_inits
    x = helper.make_tensor_value_info("x", FLOAT, [1, 3, 5, 5])
    outs = [helper.make_tensor_value_info(f"y{i}", FLOAT, None) for i in (1, 2)]
    return make_model(nodes, [x], outs, inits)


def shared_weight_conv_bn() -> onnx.ModelProto:
    """Two Convs 'conv1'/'conv2' reading the same weight 'w1', each followed by a BN (bn1/bn2)."""
    return _two_convs_bn(share_weight=True, share_bias=False)


def shared_bias_conv_bn() -> onnx.ModelProto:
    """Two Convs with their own weights but the same bias 'b1', each followed by a BN."""
    return _two_convs_bn(share_weight=False, share_bias=True)


def nonconst_weight_conv_bn() -> onnx.ModelProto:
    """Conv 'conv' whose weight is the graph input 'w', followed by BN 'bn'."""
    nodes, inits = bn_nodes("bn", "conv_out", "y", 4)
    nodes.insert(0, helper.make_node("Conv", ["x", "w"], ["conv_out"], name="conv"))
    inputs = [helper.make_tensor_value_info("x", FLOAT, [1, 3, 5, 5]),
              helper.make_tensor_value_info("w", FLOAT, [4, 3, 3, 3])]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", FLOAT, None)], inits)


def conv_output_reused_bn() -> onnx.ModelProto:
    """Conv 'conv' whose output feeds BN 'bn' and also a Relu: folding would change the Relu's input."""
    rng = _rng(60)
    nodes, inits = bn_nodes("bn", "conv_out", "y", 4)
    nodes.insert(0, helper.make_node("Conv", ["x", "w"], ["conv_out"], name="conv"))
    nodes.append(helper.make_node("Relu", ["conv_out"], ["z"], name="relu"))
    inits.append(_init("w", _conv_weight(rng, [4, 3, 3, 3])))
    x = helper.make_tensor_value_info("x", FLOAT, [1, 3, 5, 5])
    outs = [helper.make_tensor_value_info(n, FLOAT, None) for n in ("y", "z")]
    return make_model(nodes, [x], outs, inits)


def _conv_then(bn_builder_kwargs: dict, extra_outputs: Sequence[str], opset: int,
               used: Sequence[str] | None = None) -> onnx.ModelProto:
    rng = _rng(70)
    nodes, inits = bn_nodes("bn", "conv_out", "y", 4, extra_outputs=extra_outputs, **bn_builder_kwargs)
    nodes.insert(0, helper.make_node("Conv", ["x", "w"], ["conv_out"], name="conv"))
    inits.append(_init("w", _conv_weight(rng, [4, 3, 3, 3])))
    x = helper.make_tensor_value_info("x", FLOAT, [1, 3, 5, 5])
    outs = [helper.make_tensor_value_info("y", FLOAT, None)]
    outs += [helper.make_tensor_value_info(n, FLOAT, [4]) for n in (extra_outputs if used is None else used)]
    return make_model(nodes, [x], outs, inits, opset=opset)


def bn_training_mode() -> onnx.ModelProto:
    """Opset 15 BN 'bn' with training_mode=1 and its running statistics as graph outputs."""
    return _conv_then({"training_mode": 1}, ["running_mean", "running_var"], opset=15)


def bn_extra_output_used() -> onnx.ModelProto:
    """Opset 9 BN 'bn' whose optional 'mean' output is a graph output."""
    return _conv_then({}, ["mean_out", "var_out", "saved_mean", "saved_var"], opset=9, used=["mean_out"])


def conv_bn_mul_add() -> onnx.ModelProto:
    """Conv 'conv' -> BN 'bn' -> Mul 'mul' (per-channel [C,1,1]) -> Add 'add' ([1,C,1,1]) -> Relu -> y."""
    rng = _rng(80)
    nodes, inits = bn_nodes("bn", "conv_out", "bn_out", 4)
    nodes.insert(0, helper.make_node("Conv", ["x", "w"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]))
    nodes += [helper.make_node("Mul", ["bn_out", "mul_c"], ["mul_out"], name="mul"),
              helper.make_node("Add", ["add_c", "mul_out"], ["add_out"], name="add"),
              helper.make_node("Relu", ["add_out"], ["y"], name="relu")]
    inits += [_init("w", _conv_weight(rng, [4, 3, 3, 3])),
              _init("mul_c", rng.uniform(-2, 2, [4, 1, 1]).astype(np.float32)),
              _init("add_c", rng.normal(0, 1, [1, 4, 1, 1]).astype(np.float32))]
    x = helper.make_tensor_value_info("x", FLOAT, [2, 3, 5, 5])
    return make_model(nodes, [x], [helper.make_tensor_value_info("y", FLOAT, None)], inits)


def relu_bn() -> onnx.ModelProto:
    """Conv 'conv' -> Relu 'relu' -> BN 'bn': the BN follows no foldable layer."""
    rng = _rng(90)
    nodes, inits = bn_nodes("bn", "relu_out", "y", 4)
    nodes[0:0] = [helper.make_node("Conv", ["x", "w"], ["conv_out"], name="conv"),
                  helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu")]
    inits.append(_init("w", _conv_weight(rng, [4, 3, 3, 3])))
    x = helper.make_tensor_value_info("x", FLOAT, [1, 3, 5, 5])
    return make_model(nodes, [x], [helper.make_tensor_value_info("y", FLOAT, None)], inits)


def conv_add_bn() -> onnx.ModelProto:
    """Conv 'conv' (weight from Constant node 'wconst') -> Add 'add' ([C,1,1] bias) -> BN 'bn' -> y.

    The mnist-8 / Caffe-converter shape: the bias sits in an Add; the BN folds into that Add.
    """
    rng = _rng(110)
    nodes, inits = bn_nodes("bn", "add_out", "y", 4)
    w = _conv_weight(rng, [4, 3, 3, 3])
    nodes[0:0] = [helper.make_node("Constant", [], ["wc"], name="wconst", value=_init("wc", w)),
                  helper.make_node("Conv", ["x", "wc"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
                  helper.make_node("Add", ["conv_out", "add_b"], ["add_out"], name="add")]
    inits.append(_init("add_b", rng.normal(0, 0.5, [4, 1, 1]).astype(np.float32)))
    x = helper.make_tensor_value_info("x", FLOAT, [2, 3, 5, 5])
    return make_model(nodes, [x], [helper.make_tensor_value_info("y", FLOAT, None)], inits)


def quant_layers_model() -> onnx.ModelProto:
    """One of each quantizable layer, plus candidates that must be refused (for match_layers).

    Matched: conv (with bias), conv3d, deconv, pool (AveragePool), fc (Gemm), mm (MatMul whose weight
    comes through a Reshape, with Add bias 'mm_bias'). Refused: conv3d_dil (dilation_d=2),
    fc_ta (transA=1), mm_dyn (second input not constant), deconv_dil (dilation 2),
    conv_shared_a / conv_shared_b (shared weight).
    """
    rng = _rng(100)
    f = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)  # noqa: E731
    inits = [
        _init("conv.w", f(4, 3, 3, 3)), _init("conv.b", f(4)), _init("shared.w", f(4, 4, 1, 1)),
        _init("deconv.w", f(4, 2, 2, 2)), _init("deconv_dil.w", f(4, 2, 2, 2)),
        _init("c3.w", f(2, 1, 1, 1, 1)), _init("c3d.w", f(2, 1, 1, 1, 1)),
        _init("fc.w", f(64, 6)), _init("fc.b", f(6)), _init("fc_ta.w", f(2, 5)),
        _init("mm.w_raw", f(2, 3, 5)), _init("mm.shape", np.array([6, 5], np.int64)),
        _init("mm.bias", f(1, 5)), _init("flat.shape", np.array([2, 64], np.int64)),
        _init("x3_shape", np.array([2, 1, 4, 4, 4], np.int64)),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "conv.w", "conv.b"], ["t_conv"], name="conv", pads=[1, 1, 1, 1]),
        n("Conv", ["t_conv", "shared.w"], ["t_sa"], name="conv_shared_a"),
        n("Conv", ["t_sa", "shared.w"], ["t_sb"], name="conv_shared_b"),
        n("ConvTranspose", ["t_sb", "deconv.w"], ["t_dc"], name="deconv", group=1, strides=[1, 1]),
        n("ConvTranspose", ["t_sb", "deconv_dil.w"], ["t_dcd"], name="deconv_dil", dilations=[2, 2]),
        n("AveragePool", ["t_sb"], ["t_pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        # Conv3D on a [2,1,4,4,4] view of the pool output
        n("Reshape", ["t_pool", "x3_shape"], ["t_x3"], name="to3d"),
        n("Conv", ["t_x3", "c3.w"], ["t_c3"], name="conv3d"),
        n("Conv", ["t_x3", "c3d.w"], ["t_c3d"], name="conv3d_dil", dilations=[2, 1, 1]),
        n("Reshape", ["t_pool", "flat.shape"], ["t_flat"], name="flatten"),
        n("Gemm", ["t_flat", "fc.w", "fc.b"], ["t_fc"], name="fc"),
        n("Gemm", ["t_fc", "fc_ta.w"], ["t_fcta"], name="fc_ta", transA=1),
        n("Reshape", ["mm.w_raw", "mm.shape"], ["mm.w"], name="mm_weight_view"),
        n("MatMul", ["t_fc", "mm.w"], ["t_mm"], name="mm"),
        n("Add", ["t_mm", "mm.bias"], ["t_mmb"], name="mm_bias"),
        n("Transpose", ["t_fc"], ["t_fc_t"], name="fc_t"),
        n("MatMul", ["t_fc", "t_fc_t"], ["t_dyn"], name="mm_dyn"),
    ]
    x = helper.make_tensor_value_info("x", FLOAT, [2, 3, 8, 8])
    outs = [helper.make_tensor_value_info(t, FLOAT, None)
            for t in ("t_dc", "t_dcd", "t_c3", "t_c3d", "t_fcta", "t_mmb", "t_dyn")]
    return make_model(nodes, [x], outs, inits)
