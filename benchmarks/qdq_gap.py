"""Where a QDQ model loses to its fake-quant (Ascend-layout) twin: edits of one QDQ model, each scored.

    python benchmarks/qdq_gap.py                                   # MobileNetV2, ptq_int8_mse
    python benchmarks/qdq_gap.py --pipeline ptq_int8 --json gap.json

One pipeline run (data as benchmarks/ptq.py: MobileNetV2's first 100 images calibrate, the other 150
evaluate) gives the fake-quant and the QDQ model; then the QDQ model is edited and scored in
onnxruntime against the float model: residual skips reading the float stream instead of its 8-bit
copy; the residual branches' outputs (a conv's output an Add reads) left float, all together and one
at a time; their ranges scaled. Each row: output SQNR (dB) and top-1 agreement.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ptq  # noqa: E402  (data loading, prediction and scoring)


def _links(model: onnx.ModelProto):
    producer = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return producer, readers


def _branch_outputs(model: onnx.ModelProto) -> list[str]:
    """QuantizeLinear nodes on a Conv's output whose dequantized copy an Add reads."""
    producer, readers = _links(model)
    found = []
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        source = producer.get(q.input[0])
        ops = {r.op_type for dq in readers.get(q.output[0], []) for r in readers.get(dq.output[0], [])}
        if source is not None and source.op_type == "Conv" and "Add" in ops:
            found.append(q.name)
    return found


def _unquantized(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """The readers of these QuantizeLinear nodes' dequantized copies read the float tensor instead."""
    model = copy.deepcopy(model)
    _, readers = _links(model)
    for q in (n for n in model.graph.node if n.name in names):
        for dq in readers.get(q.output[0], []):
            for reader in readers.get(dq.output[0], []):
                reader.input[:] = [q.input[0] if x == dq.output[0] else x for x in reader.input]
    return model


def _float_skips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Adds read the float stream where the same dequantized copy also feeds a Conv (the skip)."""
    model = copy.deepcopy(model)
    producer, readers = _links(model)
    for add in (n for n in model.graph.node if n.op_type == "Add"):
        for k, name in enumerate(add.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and any(r.op_type == "Conv" for r in readers[name]):
                add.input[k] = q.input[0]
    return model


def _scaled(model: onnx.ModelProto, names: set[str], factor: float) -> onnx.ModelProto:
    """These QuantizeLinear nodes' scales (shared with their DequantizeLinear) times ``factor``."""
    model = copy.deepcopy(model)
    inits = {t.name: t for t in model.graph.initializer}
    for scale in {n.input[1] for n in model.graph.node if n.name in names}:
        values = numpy_helper.to_array(inits[scale]) * np.float32(factor)
        inits[scale].CopyFrom(numpy_helper.from_array(values.astype(np.float32), scale))
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="ptq_int8_mse", help="shipped pipeline name (default ptq_int8_mse)")
    parser.add_argument("--each", action="store_true", help="also leave each branch output float alone")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cases = ptq.load_cases(["mobilenetv2"])
    if not cases:
        return 1
    case = cases[0]
    got = ptq.run_ours(case, ptq.Ours(args.pipeline, "@" + args.pipeline))
    qdq, reference = got["qdq"], ptq.predict(str(case.model), case)
    branches = _branch_outputs(qdq)
    variants = [("fake-quant model (Ascend layout)", got["fakequant"]), ("QDQ model", qdq),
                ("QDQ, skips read the float stream", _float_skips(qdq)),
                (f"QDQ, the {len(branches)} branch outputs float", _unquantized(qdq, set(branches)))]
    variants += [(f"QDQ, branch output ranges x{f}", _scaled(qdq, set(branches), f)) for f in (0.8, 1.25, 1.5)]
    if args.each:
        variants += [(f"QDQ, {name} float", _unquantized(qdq, {name})) for name in branches]
    rows = []
    print(f"| {case.name}, {args.pipeline} | output SQNR dB | top-1 agreement |\n|---|---|---|")
    for label, model in variants:
        scores = ptq.score(reference, ptq.predict(model, case), case.labels)
        rows.append({"variant": label, "sqnr_db": round(scores["sqnr_db"], 3), "agreement": scores["agreement"]})
        print(f"| {label} | {rows[-1]['sqnr_db']:.2f} | {100 * rows[-1]['agreement']:.1f}% |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"pipeline": args.pipeline, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
