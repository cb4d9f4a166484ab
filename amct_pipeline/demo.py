"""The built-in demo: a small CNN and calibration data made here, no download needed."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_demo_model", "build_demo_data", "run_demo", "DEMO_PIPELINE"]

DEMO_PIPELINE = "demo"    # pipelines/demo.yaml


def build_demo_model(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """Conv-BN-Relu x2, a residual Add, global pooling and a classifier: the shapes AMCT handles."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def conv_bn_relu(x, cin, cout, tag):
        w = const(f"{tag}.weight", rng.normal(0, np.sqrt(2 / (cin * 9)), (cout, cin, 3, 3)))
        b = const(f"{tag}.bias", rng.normal(0, 0.05, cout))
        nodes.append(helper.make_node("Conv", [x, w, b], [f"{tag}.conv"], name=f"{tag}", pads=[1, 1, 1, 1]))
        bn = [const(f"{tag}.bn.{k}", v) for k, v in (
            ("scale", rng.uniform(0.5, 1.5, cout)), ("bias", rng.normal(0, 0.1, cout)),
            ("mean", rng.normal(0, 0.1, cout)), ("var", rng.uniform(0.5, 2.0, cout)))]
        nodes.append(helper.make_node("BatchNormalization", [f"{tag}.conv", *bn], [f"{tag}.bn"], name=f"{tag}.bn"))
        nodes.append(helper.make_node("Relu", [f"{tag}.bn"], [f"{tag}.out"], name=f"{tag}.relu"))
        return f"{tag}.out"

    x = conv_bn_relu("input", 3, 16, "conv1")
    y = conv_bn_relu(x, 16, 16, "conv2")
    nodes.append(helper.make_node("Add", [x, y], ["res"], name="residual"))
    nodes.append(helper.make_node("GlobalAveragePool", ["res"], ["pooled"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"))
    w = const("fc.weight", rng.normal(0, 0.25, (10, 16)))
    b = const("fc.bias", rng.normal(0, 0.05, 10))
    nodes.append(helper.make_node("Gemm", ["flat", w, b], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "amct_demo",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="amct-pipeline-demo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_demo_data(count: int = 64, seed: int = 1) -> np.ndarray:
    """Smooth random images (so activations have structure, not white noise), [N,3,32,32] float32."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (count, 3, 8, 8)).astype(np.float32)
    return np.repeat(np.repeat(base, 4, axis=2), 4, axis=3) + rng.normal(0, 0.1, (count, 3, 32, 32)).astype(np.float32)


def run_demo(session, output_dir: Path) -> int:
    """Write the demo model and data into ``output_dir``, run the demo pipeline, compare outputs."""
    from .ir.io import atomic_path
    from .runtime.ort import run_model
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path, data_path = output_dir / "demo_cnn.onnx", output_dir / "demo_calib.npy"
    model = build_demo_model()
    with atomic_path(model_path) as tmp:
        tmp.write_bytes(model.SerializeToString())
    with atomic_path(data_path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, build_demo_data())
    pipeline = session.build(DEMO_PIPELINE, datasets=["calib"])
    print(f"pipeline: {pipeline.text}", file=sys.stderr)
    result = pipeline.run(str(model_path), datasets={"calib": str(data_path)}, output_dir=output_dir / "out",
                          progress=True)
    feeds = {"input": build_demo_data(16, seed=7)}
    reference = run_model(model, feeds)[0]
    print("\nwritten (output SQNR against the float model on held-out demo images; the deploy model runs on "
          "the numpy Ascend reference):")
    for path in result.files:
        line = f"  {path}"
        if path.suffix == ".onnx":
            line += f"  {sqnr_db(reference, _run_any(onnx.load(str(path)), feeds)):.1f} dB"
        print(line)
    for name, stats in result.stats:
        shown = {k: v for k, v in stats.items() if not isinstance(v, (dict, list))}
        print(f"  {name}: {shown}")
    return 0


def _run_any(model: onnx.ModelProto, feeds) -> np.ndarray:
    """onnxruntime, or the Ascend reference for a deploy model (no Ascend chip needed)."""
    from .runtime.ort import run_model
    if any(n.op_type.startswith("Ascend") for n in model.graph.node):
        from .ascend.reference import run_deploy_model
        return run_deploy_model(model, feeds)[0]
    return run_model(model, feeds)[0]


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - other) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / noise)
