"""Where a W8A8 model's output error comes from: the weights, clipped activations, rounded activations.

    python benchmarks/error_budget.py                                   # MobileNetV2: ptq_int8, ptq_int8_mse
    python benchmarks/error_budget.py --pipelines ptq_int8_accurate --json budget.json --markdown budget.md
    python benchmarks/error_budget.py --models resnet8,mnist

Per model (data and split as benchmarks/ptq.py loads them: MobileNetV2 calibrates on the first 100
ImageNet dev images and is scored on the other 150) and pipeline, three QDQ models through onnxruntime:

* ``W8A8``: the pipeline as shipped;
* ``A16 same ranges``: every activation quantizer at 16 bits over the same calibrated range
  (``calibrate`` ``num_bits: 16``): the rounding of activations gone, their clipping kept;
* ``A16 full ranges``: 16 bits over each tensor's calibration minimum..maximum (``calibrate`` minmax):
  about the weights' error alone (plus the clipping of evaluation values beyond every calibration
  value, which no range chosen on the calibration data avoids).

Beside them, in the same run, ONNX Runtime's ``quantize_static`` (MinMax, per-channel weights; per
tensor where its per-channel model is invalid, mnist-8) at 8-bit and 16-bit activations: its ranges
are the calibration min..max, so its two A16 columns are one model and its clipping share is 0 by
construction (its clipping beyond the calibration values counts as "weights", as for ours). The
last column is each W8A8 model's output noise relative to ONNX Runtime's.

The output noise power (relative to the float output's) splits into the weights' (the full-range
model's), the clipping's (the same-range model's minus it) and the rounding's (W8A8's minus the
same-range model's); the shares are of W8A8's noise. Bias correction and range refinement run in
each variant as the pipeline has them (they see 16-bit activations in the A16 variants).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ptq  # noqa: E402  (benchmarks/ptq.py: data loading, prediction and scoring)

VARIANTS = {
    "W8A8": [],
    "A16 same ranges": ["passes.calibrate.options.algorithm_options.num_bits=16"],
    "A16 full ranges": ["passes.calibrate.options.algorithm=minmax",
                        "passes.calibrate.options.algorithm_options={num_bits: 16}"],
}


def measure(case, pipeline: str, overrides: list[str], reference) -> dict:
    import amct_pipeline as ap
    start = time.perf_counter()
    built = ap.Session(load_entrypoints=False).build(pipeline, datasets=["calib"], overrides=overrides)
    result = built.run(str(case.model), datasets={"calib": ptq.batches(case.calib, case.batch, case.input_name)})
    scores = ptq.score(reference, ptq.predict(result.artifacts["lowered"]["qdq"], case), case.labels)
    return {**scores, "seconds": round(time.perf_counter() - start, 1)}


def measure_ort(case, activations: str, reference) -> dict:
    """ONNX Runtime's quantize_static (MinMax, int8 weights per channel) with 8- or 16-bit activations."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        got, per_channel = ptq.ort_predict(case, "MinMax", Path(tmp), activations)
    scores = ptq.score(reference, got, case.labels)
    return {**scores, "per_channel": per_channel, "seconds": round(time.perf_counter() - start, 1)}


def budget(rows: dict[str, dict]) -> dict[str, float]:
    """Noise power shares of W8A8's (weights, clipping, rounding) from the three variants' SQNR."""
    noise = {k: 10 ** (-v["sqnr_db"] / 10) for k, v in rows.items()}
    total = noise["W8A8"]
    weights = noise["A16 full ranges"]
    clipping = max(noise["A16 same ranges"] - weights, 0.0)
    return {"weights": weights / total, "clipping": clipping / total,
            "rounding": max(total - noise["A16 same ranges"], 0.0) / total}


def markdown(results: list[dict]) -> str:
    lines = ["| model | pipeline | W8A8 dB | A16 same ranges dB | A16 full ranges dB | weights | clipping | rounding "
             "| W8A8 noise vs ORT's |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        v, s = r["variants"], r["shares"]
        ratio = f"{r['noise_vs_ort']:.2f}x" if "noise_vs_ort" in r else ""
        lines.append(f"| {r['model']} | {r['pipeline']} | " + " | ".join(f"{v[k]['sqnr_db']:.2f}" for k in VARIANTS)
                     + " | " + " | ".join(f"{100 * s[k]:.0f}%" for k in ("weights", "clipping", "rounding"))
                     + f" | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2")
    parser.add_argument("--pipelines", default="ptq_int8,ptq_int8_mse", help="shipped pipeline names or files")
    parser.add_argument("--no-ort", action="store_true", help="leave out ONNX Runtime's quantize_static")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    results = []
    for case in ptq.load_cases(args.models.split(",")):
        reference = ptq.predict(str(case.model), case)
        rows = []
        if not args.no_ort:
            a8, a16 = (measure_ort(case, kind, reference) for kind in ("QUInt8", "QUInt16"))
            variants = {"W8A8": a8, "A16 same ranges": a16, "A16 full ranges": a16}
            rows.append({"model": case.name, "pipeline": "ORT quantize_static MinMax", "variants": variants})
        for pipeline in args.pipelines.split(","):
            variants = {label: measure(case, pipeline, overrides, reference) for label, overrides in VARIANTS.items()}
            rows.append({"model": case.name, "pipeline": pipeline, "variants": variants})
        for row in rows:
            row["shares"] = budget(row["variants"])
            if not args.no_ort:
                ort_db, our_db = rows[0]["variants"]["W8A8"]["sqnr_db"], row["variants"]["W8A8"]["sqnr_db"]
                row["noise_vs_ort"] = 10 ** ((ort_db - our_db) / 10)
            print(json.dumps(row), file=sys.stderr, flush=True)
        results += rows
    text = markdown(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
