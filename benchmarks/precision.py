"""Per-layer precision benchmark: W8A8 against INT4 weights (ARQ round to nearest), INT16 activations
and mixed configurations, through the fake-quant and QDQ models (onnxruntime), on the models and
splits of ``benchmarks/ptq.py``.

    python benchmarks/precision.py                          # mobilenetv2, mnist, resnet8
    python benchmarks/precision.py --models mobilenetv2 --json precision.json

Per model and configuration: output SQNR and top-1 agreement with the float model on the held-out
images (QDQ model in onnxruntime; the fake-quant model's SQNR beside it), top-1 where labels exist,
the QDQ file's size, the optimized graph's integer kernels (QLinearConv / QLinearMatMul) against
float Conv / Gemm / MatMul, and the pipeline's wall time (single-threaded onnxruntime for
calibration is not forced: times on a loaded machine are pessimistic). Calibration is IFMR with
block outputs (``ptq_int8``'s), weights ARQ.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptq import batches, load_cases, predict, score, session_for  # noqa: E402

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INT16_TYPES = ("Conv", "ConvTranspose", "Gemm")          # SPEC 6.1
CONFIGS = {                                             # label -> match_layers precision
    "W8A8": {},
    "W4A8 (ARQ round to nearest)": {t: {"wts": 4} for t in WEIGHTED},
    "W8A16": {t: {"act": 16} for t in INT16_TYPES},                                       # MatMul stays A8
    "W4A16": {**{t: {"act": 16, "wts": 4} for t in INT16_TYPES}, "MatMul": {"wts": 4}},   # MatMul: A8 (SPEC 6.1)
}


def pipeline(precision: dict) -> dict:
    return {"schema_version": 1, "name": "precision", "datasets": {"calib": {"reader": "npy"}},
            "passes": [{"pass": "fuse_bn"}, {"pass": "match_layers", "options": {"precision": precision}},
                       {"pass": "calibrate", "options": {"algorithm": "ifmr", "block_outputs": True}},
                       {"pass": "quantize_weights", "options": {"algorithm": "arq"}},
                       {"pass": "lower", "options": {"targets": ["fakequant", "qdq"]}}]}


def kernels(model: onnx.ModelProto, tmp: Path) -> dict[str, int]:
    """Integer and float compute kernels in onnxruntime's optimized graph."""
    out = tmp / "optimized.onnx"
    session_for(model, optimized_path=out)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    return {"integer": sum(op.startswith("QLinear") and op in ("QLinearConv", "QLinearMatMul") for op in ops),
            "float": sum(op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm") for op in ops)}


def run_config(case, label: str, precision: dict, reference, tmp: Path) -> dict:
    import amct_pipeline as ap
    start = time.perf_counter()
    out = tmp / case.name / label.split()[0]
    result = ap.Session(load_entrypoints=False).build(pipeline(precision)).run(
        str(case.model), datasets={"calib": batches(case.calib, case.batch, case.input_name)}, output_dir=out)
    seconds = time.perf_counter() - start
    low = result.artifacts["lowered"]
    row = {"model": case.name, "config": label, "seconds": round(seconds, 1)}
    row.update({f"qdq_{k}": v for k, v in score(reference, predict(low["qdq"], case), case.labels).items()})
    row["fakequant_sqnr_db"] = score(reference, predict(low["fakequant"], case), None)["sqnr_db"]
    qdq_file = next(out.glob("*_qdq_model.onnx"))
    row["qdq_kb"] = round(qdq_file.stat().st_size / 1024, 1)
    row.update({f"{k}_kernels": v for k, v in kernels(low["qdq"], tmp).items()})
    return row


def markdown(rows: list[dict]) -> str:
    columns = ["model", "config", "qdq_sqnr_db", "qdq_agreement", "qdq_top1", "qdq_top1_float", "fakequant_sqnr_db",
               "qdq_kb", "integer_kernels", "float_kernels", "seconds"]
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2,mnist,resnet8")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="labels of CONFIGS, comma-separated")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    chosen = [c for c in CONFIGS if c in args.configs.split(",")] or list(CONFIGS)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for case in load_cases(args.models.split(",")):
            reference = predict(str(case.model), case)
            for label in chosen:
                rows.append(run_config(case, label, CONFIGS[label], reference, Path(work)))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    import logging
    logging.disable(logging.WARNING)
    os.environ.setdefault("AMCT_PIPELINE_DISABLE_PLUGIN_AUTOLOAD", "1")
    sys.exit(main())
