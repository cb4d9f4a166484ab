"""onnxruntime's integer conv kernels against the channel count: why the qdq target pads depthwise
blocks to multiples of 16 channels and RGB inputs to 4 (``lower{targets=[qdq]}``, option
``pad_channels``), and runs 1-channel convs on column-shifted codes (``shift_inputs``); see benchmarks/README.md.

    python benchmarks/qdq_channels.py [--runs 30]

Each row: one QDQ conv (Q -> DQ -> Conv -> Q -> DQ, fused by onnxruntime into one QLinearConv), batch
8, one thread; the median kernel time of QLinearConv from onnxruntime's profiler (milliseconds), so
the load of other jobs on the machine matters less than for whole-model times.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CASES = [  # (what, input channels, output channels, kernel, group == channels, spatial size)
    ("depthwise 3x3", 58, 58, 3, True, 40), ("depthwise 3x3", 64, 64, 3, True, 40),
    ("depthwise 3x3", 116, 116, 3, True, 20), ("depthwise 3x3", 128, 128, 3, True, 20),
    ("depthwise 3x3", 232, 232, 3, True, 10), ("depthwise 3x3", 240, 240, 3, True, 10),
    ("1x1", 58, 58, 1, False, 40), ("1x1", 58, 64, 1, False, 40), ("1x1", 64, 64, 1, False, 40),
    ("3x3 stem", 3, 24, 3, False, 160), ("3x3 stem", 4, 24, 3, False, 160),
    ("5x5 luma", 1, 64, 5, False, 112), ("5x5 luma", 4, 64, 5, False, 112),
    ("5x5 luma on 4 column shifts (5x2, dilation 1x4)", 4, 64, (5, 2), False, 112),
]


def qdq_conv(cin: int, cout: int, k, depthwise: bool) -> onnx.ModelProto:
    """``k``: the square kernel size, or (rows, columns) of the column-shifted form of a 1-channel conv
    (columns 4 apart, no column padding: the input is 4 columns wider, as the qdq target pads it)."""
    rng = np.random.default_rng(0)
    kh, kw = (k, k) if isinstance(k, int) else k
    shifted = not isinstance(k, int)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z"),
             numpy_helper.from_array(rng.integers(-100, 100, (cout, 1 if depthwise else cin, kh, kw)).astype(np.int8),
                                     "w"),
             numpy_helper.from_array(np.full(cout, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(cout, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], group=cout if depthwise else 1,
                              pads=[kh // 2, 0, kh // 2, 0] if shifted else [kh // 2] * 4, kernel_shape=[kh, kw],
                              dilations=[1, 4] if shifted else [1, 1]),
             helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, None, None])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def kernel_ms(model: onnx.ModelProto, x: np.ndarray, runs: int) -> float:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = os.path.join(folder, "profile")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, {"x": x})
        with open(session.end_profiling()) as handle:
            events = json.load(handle)
    times = [e["dur"] for e in events if e.get("cat") == "Node" and e["args"].get("op_name") == "QLinearConv"
             and e["name"].endswith("kernel_time")]
    return float(np.median(times)) / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    print("| conv | in -> out channels | input (batch 8) | QLinearConv ms |\n|---|---|---|---|")
    for what, cin, cout, k, depthwise, size in CASES:
        x = rng.uniform(0, 1, (8, cin, size, size + (0 if isinstance(k, int) else 4))).astype(np.float32)
        ms = kernel_ms(qdq_conv(cin, cout, k, depthwise), x, args.runs)
        print(f"| {what} | {cin} -> {cout} | {size} x {size} | {ms:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
