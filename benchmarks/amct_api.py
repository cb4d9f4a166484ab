"""AMCT API benchmark: what calibration inside the user's onnxruntime loop costs.

    python benchmarks/amct_api.py                        # MobileNetV2, 8 batches of 8 images
    python benchmarks/amct_api.py --model resnet8 --batches 4 --json amct_api.json

On the same images, batch by batch (medians over batches; one onnxruntime thread):

* **float**: the float model in a plain session (the user's loop without quantization);
* **modified, calibrating**: the AMCT flow's modified model with ``AMCT_SO`` while the taps stream
  each batch into the calibrators (``batch_num`` = all batches; the last batch also waits for the
  record), i.e. what the user's loop costs during calibration;
* **modified, taps only**: the same session after calibration finished (the taps hand each tensor
  to Python and return): the cost of the onnxruntime-extensions Python operators themselves;
* **pipeline calibrate**: the equivalent pipeline's calibration (``fuse_bn,match_layers,calibrate{ifmr}``)
  on the same batches, with its own session: total wall time.

Timings on a shared machine are pessimistic; ratios within one run are the figure to read.
Reads models and data from ../shared.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODELS = {"mobilenetv2": "mobilenetv2_fp32.onnx", "resnet8": "resnet8_cifar10_bn.onnx"}


def _images(model: str, count: int) -> np.ndarray:
    if model == "resnet8":
        data = np.load(SHARED / "data" / "cifar_like212_32_uint8.npz")["images_nchw_float_0_255"][:count]
        return data.astype(np.float32)
    data = np.load(SHARED / "data" / "imagenet_dev250_224_uint8.npz")["images_nhwc_uint8"][:count]
    x = data.astype(np.float32).transpose(0, 3, 1, 2) / 255
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    return ((x - mean) / std).astype(np.float32)


def _timed_loop(session, name, batches) -> list[float]:
    times = []
    for batch in batches:
        start = time.perf_counter()
        session.run(None, {name: batch})
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mobilenetv2")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    import amct_pipeline.amct_onnx as amct
    from amct_pipeline.session import Session
    model = SHARED / "models" / MODELS[args.model]
    if not model.exists():
        print(f"missing {model}", file=sys.stderr)
        return 1
    x = _images(args.model, args.batches * args.batch_size)
    batches = [x[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.batches)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    amct.AMCT_SO.intra_op_num_threads = amct.AMCT_SO.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config, record, modified = tmp / "config.json", tmp / "record.txt", tmp / "modified.onnx"
        amct.create_quant_config(str(config), str(model), batch_num=args.batches)
        amct.quantize_model(str(config), str(model), str(modified), str(record))
        float_session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        name = float_session.get_inputs()[0].name
        _timed_loop(float_session, name, batches[:1])                    # warm-up
        float_times = _timed_loop(float_session, name, batches)
        session = ort.InferenceSession(str(modified), amct.AMCT_SO, providers=["CPUExecutionProvider"])
        start = time.perf_counter()
        calibrating = _timed_loop(session, name, batches)
        calibrating_total = time.perf_counter() - start
        taps_only = _timed_loop(session, name, batches)
        assert record.stat().st_size > 0
        session_ = Session(load_entrypoints=False)
        pipeline = session_.pipeline([session_.make_pass("fuse_bn", amct_config=str(config)),
                                      session_.make_pass("match_layers", amct_config=str(config)),
                                      session_.make_pass("calibrate", algorithm="ifmr")])
        start = time.perf_counter()
        pipeline.run(str(model), datasets={"calib": [{name: b} for b in batches]})
        pipeline_total = time.perf_counter() - start
    med = statistics.median
    result = {"model": args.model, "batches": args.batches, "batch_size": args.batch_size,
              "float_ms": 1e3 * med(float_times), "calibrating_ms": 1e3 * med(calibrating),
              "calibrating_last_batch_ms": 1e3 * calibrating[-1], "calibrating_total_s": calibrating_total,
              "taps_only_ms": 1e3 * med(taps_only), "pipeline_calibrate_total_s": pipeline_total}
    print(f"| {args.model}, {args.batches} x {args.batch_size} | median ms / batch | vs float |")
    print("|---|---|---|")
    for label, key in (("float model", "float_ms"), ("modified, calibrating", "calibrating_ms"),
                       ("modified, taps only (after calibration)", "taps_only_ms")):
        print(f"| {label} | {result[key]:.1f} | {result[key] / result['float_ms']:.2f}x |")
    print(f"\nuser loop while calibrating: {calibrating_total:.2f} s in all (last batch, which finalizes and "
          f"writes the record: {result['calibrating_last_batch_ms']:.0f} ms); the pipeline's calibrate on the same "
          f"batches: {pipeline_total:.2f} s")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
