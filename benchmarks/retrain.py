"""Retrain benchmark: the retrain pipelines against PTQ and ONNX Runtime's quantize_static, in one run.

    python benchmarks/retrain.py                                  # every model, W8A8 and W4A8
    python benchmarks/retrain.py --models mobilenetv2 --json retrain.json --markdown retrain.md
    python benchmarks/retrain.py --models mnist,resnet8 --steps 100     # shorter retraining
    python benchmarks/retrain.py --models mobilenetv2 --precisions w8a8 --variants retrain_int8 \
        --set passes.retrain.options.holdout=0        # an experiment: overrides of the retrain pipelines

Per model (data as benchmarks/ptq.py loads it: MobileNetV2 on the first 100 ImageNet dev images,
evaluated on the other 150; mnist-8 200 / 9,800; ResNet-8; super-resolution) and precision:

* W8A8: our PTQ variants (ptq_int8, the default: equalization, sample_quantile 0.7 ranges, ARQ + bias
  correction; ptq_int8_mse, the same with mse_clip weights; percentile 99.99 + ARQ; ptq_int8_accurate:
  ptq_int8_mse's layer inputs with ranges refined on the output error), ONNX Runtime's quantize_static
  (MinMax, per channel), and retrain_int8 (the shipped pipeline, from ptq_int8_mse's ranges and weights);
* W4A8: round-to-nearest (ARQ's 4-bit scales, IFMR activations, nothing learned) and retrain_w4a8.

Columns: top-1 (where labels exist), top-1 agreement with the float model, output SQNR of the QDQ
model (dB), wall time and CPU time (user + system) of the run, peak RSS of that run (a fresh process per variant, VmHWM), and
for retrain the time per block. The machine's load average is recorded: times are pessimistic under load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ptq  # noqa: E402  (benchmarks/ptq.py: data loading, prediction and scoring shared with the PTQ benchmark)

W8 = [
    ("ptq_int8", "@ptq_int8"),
    ("ptq_int8_mse", "@ptq_int8_mse"),
    ("ptq percentile 99.99", "fuse_bn,match_layers,calibrate{algorithm=percentile algorithm_options={percentile=99.99} "
                             "block_outputs=true},quantize_weights{algorithm=arq},lower{targets=[qdq,fakequant]}"),
    ("ptq_int8_accurate", "@ptq_int8_accurate"),
    ("ort quantize_static MinMax", "ort"),
    ("retrain_int8", "@retrain_int8"),
]
W4 = [
    ("W4A8 round-to-nearest", "fuse_bn,match_layers,calibrate{algorithm=ifmr},"
                              "retrain{wts_algo=arq weight_bits=4 steps=0},lower{targets=[qdq,fakequant]}"),
    ("retrain_w4a8", "@retrain_w4a8"),
]


def run_variant(case_key: str, label: str, spec: str, steps: int | None, out: Path,
                settings: tuple[str, ...] = ()) -> dict:
    """One variant in this process: the QDQ model's scores, wall time, retrain stats."""
    case = ptq.load_cases([case_key])[0]
    start = time.perf_counter()
    stats: dict = {}
    if spec == "ort":
        with tempfile.TemporaryDirectory() as tmp:
            quantized, per_channel = ptq.ort_predict(case, "MinMax", Path(tmp))
        seconds = time.perf_counter() - start
        if not per_channel:
            stats["note"] = "per tensor (ORT's per-channel model is invalid)"
        scores = ptq.score(ptq.predict(str(case.model), case), quantized, case.labels)
    else:
        import amct_pipeline as ap
        session = ap.Session(load_entrypoints=False)
        text = spec[1:] if spec.startswith("@") else spec
        overrides = [f"passes.retrain.options.steps={steps}"] if steps is not None and spec.startswith("@retrain") \
            else []
        overrides += list(settings) if spec.startswith("@retrain") else []
        pipeline = session.build(text, datasets=["calib"], overrides=overrides)
        data = ptq.batches(case.calib, case.batch, case.input_name)
        result = pipeline.run(str(case.model), datasets={"calib": data})
        seconds = time.perf_counter() - start
        qdq = result.artifacts["lowered"]["qdq"]
        scores = ptq.score(ptq.predict(str(case.model), case), ptq.predict(qdq, case), case.labels)
        if "retrain" in text:
            full = result.stats_for("retrain")
            stats = {k: full[k] for k in ("blocks", "steps", "block_seconds", "block_db_before", "block_db_after",
                                          "nearest_fallbacks") if k in full}
    row = {"model": case.name, "variant": label, **scores, "wall_s": round(seconds, 1), **stats}
    if settings and spec.startswith("@retrain"):
        row["set"] = list(settings)
    return row


def child(case_key: str, label: str, spec: str, steps: int | None, settings: tuple[str, ...] = ()) -> dict:
    """Run one variant in a fresh process; its peak RSS (VmHWM) is that variant's."""
    code = ("import json,sys,resource; sys.path.insert(0, %r); import retrain as r; "
            "row = r.run_variant(%r, %r, %r, %r, None, %r); "
            "use = resource.getrusage(resource.RUSAGE_SELF); row['peak_rss_mb'] = round(use.ru_maxrss / 1024); "
            "row['cpu_s'] = round(use.ru_utime + use.ru_stime, 1); "
            "print('ROW' + json.dumps(row))") % (str(HERE), case_key, label, spec, steps, tuple(settings))
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")     # faster than two threads for the engine on this shared machine
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("ROW"):
            return json.loads(line[3:])
    return {"variant": label, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}


def markdown(rows: list[dict]) -> str:
    columns = ["model", "variant", "set", "top1_float", "top1", "agreement", "sqnr_db", "wall_s", "cpu_s", "peak_rss_mb"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, row.get("error", "") if c == "variant" and "error" in row else "")
            cells.append(f"{v:.4f}" if isinstance(v, float) and c in ("top1", "top1_float", "agreement")
                         else f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    blocks = [r for r in rows if r.get("block_seconds")]
    for row in blocks:
        lines.append(f"\n{row['model']} {row['variant']}: {row['blocks']} blocks, {row['steps']} steps; seconds per "
                     f"block {row['block_seconds']}; block SQNR dB before {row['block_db_before']} after "
                     f"{row['block_db_after']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2,resnet8,mnist,superres")
    parser.add_argument("--precisions", default="w8a8,w4a8")
    parser.add_argument("--variants", default="", help="comma-separated labels to run (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="retrain steps per block (default: the pipeline's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the retrain pipelines (repeatable), e.g. passes.retrain.options.qdrop=0.5 "
                             "or passes.quantize_weights.options.algorithm=mse_clip")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    wanted = [v for v in args.variants.split(",") if v]
    rows = []
    load_before = os.getloadavg()
    for key in args.models.split(","):
        for precision in args.precisions.split(","):
            for label, spec in (W8 if precision == "w8a8" else W4):
                if wanted and label not in wanted:
                    continue
                row = child(key, label, spec, args.steps, tuple(args.set))
                row["precision"] = precision
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    text = markdown(rows) + f"\n\nload average before / after: {load_before} / {os.getloadavg()} (2 cores)\n"
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "load": [load_before, os.getloadavg()]}, indent=1))
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
