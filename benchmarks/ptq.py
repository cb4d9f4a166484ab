"""PTQ benchmark: our calibrators and pipeline against ONNX Runtime's quantize_static, one run.

    python benchmarks/ptq.py                       # every model, accuracy + latency tables
    python benchmarks/ptq.py --models mobilenetv2 --json ptq.json
    python benchmarks/ptq.py --memory              # peak RSS of calibration, 16 vs 128 images
    python benchmarks/ptq.py --speed --models mobilenetv2   # QDQ speed-ups, every model in one loop

Per model and variant: top-1 accuracy (where labels exist), top-1 agreement with the float
model, output SQNR (dB), calibration wall time (median of 5 when under 1 s), peak calibration
memory (a fresh process per calibrator), and the QDQ model's onnxruntime latency against the float
model at batch 1 and 8. Reads models and data from ../shared (skips what is missing).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OURS = ["ifmr", "hfmg", "minmax", "percentile", "entropy", "mse"]
TUNED = [("percentile", {"percentile": 99.99})]    # one more point: clip 0.005% of each tail
REFINED = [("ifmr", {}), ("percentile", {"percentile": 99.99})]   # also run with output-aware refinement
ORT_METHODS = ["MinMax", "Entropy", "Percentile"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# -------------------------------------------------------------------------------------------
# models and data

@dataclass
class Case:
    name: str
    model: Path
    input_name: str
    calib: np.ndarray
    evaluate: np.ndarray
    labels: np.ndarray | None
    batch: int               # calibration batch size (a fixed model batch wins)
    fixed_batch: bool
    calib_count: int = 0     # memory mode: how many images to calibrate on (0: the calibration batches)
    key: str = ""            # the --models name


def _imagenet(count: int | None = None):
    data = np.load(SHARED / "data" / "imagenet_dev250_224_uint8.npz")
    images, labels = data["images_nhwc_uint8"], data["labels"]
    return (images if count is None else images[:count]), labels


def _imagenet_nchw() -> tuple[np.ndarray, np.ndarray]:
    images, labels = _imagenet()
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return (x - mean) / std, labels


def _y_channel() -> np.ndarray:
    images, _ = _imagenet()
    rgb = images.astype(np.float32) / 255.0
    y = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return y[:, None].astype(np.float32)


def load_cases(names: list[str]) -> list[Case]:
    builders: dict[str, Callable[[], Case]] = {
        "mobilenetv2": lambda: Case("mobilenetv2", SHARED / "models" / "mobilenetv2_fp32.onnx", "input",
                                    *_split(_imagenet_nchw(), 100), batch=16, fixed_batch=False),
        "mnist": lambda: Case("mnist-8", SHARED / "models" / "mnist-8.onnx", "Input3", *_split(_mnist(), 200),
                              batch=1, fixed_batch=True),
        "resnet8": lambda: Case("resnet8", SHARED / "models" / "resnet8_cifar10_bn.onnx", "input",
                                *_split(_cifar(), 100), batch=16, fixed_batch=False),
        "superres": lambda: Case("super_resolution", SHARED / "models" / "super_resolution_op15.onnx", "input",
                                 *_split((_y_channel()[:132], None), 32), batch=8, fixed_batch=False),
        "ultraface": lambda: Case("ultraface", SHARED / "models" / "ultraface_rfb320_bn.onnx", "input",
                                  *_split((_faces(), None), 8), batch=1, fixed_batch=True),
    }
    cases = []
    for name in names:
        try:
            cases.append(builders[name]())
            cases[-1].key = name
        except FileNotFoundError as exc:
            print(f"skipping {name}: missing {exc.filename}", file=sys.stderr)
    return cases


def _split(data, count: int):
    x, labels = data
    return x[:count], x[count:], (None if labels is None else labels[count:])


def _mnist():
    data = np.load(SHARED / "data" / "mnist_test10k_uint8.npz")
    return data["images_uint8"][:, None].astype(np.float32), data["labels"]


def _cifar():
    data = np.load(SHARED / "data" / "cifar_like212_32_uint8.npz")
    return data["images_nchw_float_0_255"].astype(np.float32), data["labels"]


def _faces():
    return np.load(SHARED / "data" / "faces24_240x320_f32.npz")["x"].astype(np.float32)


def batches(x: np.ndarray, size: int, name: str) -> list[dict[str, np.ndarray]]:
    return [{name: x[i:i + size]} for i in range(0, len(x) - size + 1 if size > 1 else len(x), size)]


def cycled_batches(case: "Case"):
    """``calib_count`` images in batches, cycling over the calibration set, made one at a time."""
    for start in range(0, case.calib_count, case.batch):
        index = np.arange(start, start + case.batch) % len(case.calib)
        yield {case.input_name: np.ascontiguousarray(case.calib[index])}


# -------------------------------------------------------------------------------------------
# running and scoring

def session_for(model, threads: int = 0, optimized_path: Path | None = None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def predict(model, case: Case) -> list[np.ndarray]:
    """All outputs on the evaluation set, concatenated over batches."""
    sess = session_for(model)
    size = 1 if case.fixed_batch else 25
    outs: list[list[np.ndarray]] = []
    for start in range(0, len(case.evaluate), size):
        feed = {case.input_name: case.evaluate[start:start + size]}
        for i, value in enumerate(sess.run(None, feed)):
            if len(outs) <= i:
                outs.append([])
            outs[i].append(value)
    return [np.concatenate(o) for o in outs]


def score(reference: list[np.ndarray], quantized: list[np.ndarray], labels) -> dict:
    ref = np.concatenate([r.reshape(len(r), -1) for r in reference], axis=1).astype(np.float64)
    got = np.concatenate([q.reshape(len(q), -1) for q in quantized], axis=1).astype(np.float64)
    noise = np.sum((ref - got) ** 2)
    out = {"sqnr_db": float(10 * np.log10(np.sum(ref ** 2) / max(noise, 1e-30)))}
    logits_ref, logits_q = reference[0].reshape(len(reference[0]), -1), quantized[0].reshape(len(quantized[0]), -1)
    if logits_ref.shape[1] > 1 and reference[0].ndim == 2:
        out["agreement"] = float(np.mean(logits_ref.argmax(1) == logits_q.argmax(1)))
        if labels is not None:
            out["top1"] = float(np.mean(logits_q.argmax(1) == labels))
            out["top1_float"] = float(np.mean(logits_ref.argmax(1) == labels))
    return out


def speedup(float_model, quantized, case: Case, batch: int, rounds: int = 20) -> float | None:
    """median(float) / median(quantized), timed in one interleaved loop (see ``median_times``)."""
    if case.fixed_batch and batch != 1:
        return None
    try:
        sessions = {"float": session_for(float_model), "quantized": session_for(quantized)}
    except Exception:
        return None
    times = median_times(sessions, {case.input_name: np.ascontiguousarray(case.evaluate[:batch])}, rounds)
    return times["float"] / times["quantized"]


def median_times(sessions: dict, feed: dict, rounds: int) -> dict[str, float]:
    """Median run time of each session, all run once per round in a shuffled order, so load drifts
    hit all alike and no session always follows the same one (a session's threads spin for a while
    after its run and slow whichever runs next)."""
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, feed)
    times: dict[str, list[float]] = {label: [] for label in sessions}
    order = list(sessions.items())
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for label, sess in order:
            start = time.perf_counter()
            sess.run(None, feed)
            times[label].append(time.perf_counter() - start)
    return {label: float(np.median(t)) for label, t in times.items()}


# -------------------------------------------------------------------------------------------
# variants

def run_ours(case: Case, algorithm: str, refine: bool, options: dict | None = None) -> dict:
    import amct_pipeline as ap
    from amct_pipeline.pipeline.instruments import Timing
    session = ap.Session(load_entrypoints=False)
    algo_opts = "" if not options else " algorithm_options={" + " ".join(f"{k}={v}" for k, v in options.items()) + "}"
    # block_outputs: the layer and Add outputs are calibrated too, so onnxruntime fuses whole blocks
    # (and refine_ranges then minimises the error of exactly the QDQ model)
    steps = ["fuse_bn", "match_layers", f"calibrate{{algorithm={algorithm} dataset=calib block_outputs=true{algo_opts}}}",
             "quantize_weights{algorithm=arq}"]
    steps += ["refine_ranges{dataset=calib}"] if refine else []
    steps += ["lower{targets=[qdq,fakequant]}"]
    timing = Timing()
    start = time.perf_counter()
    result = session.build(",".join(steps), datasets=["calib"]).run(
        str(case.model), datasets={"calib": batches(case.calib, case.batch, case.input_name)}, instruments=[timing])
    total = time.perf_counter() - start
    calib = sum(t for label, t in timing.times if label.endswith(":calibrate") or label.endswith(":refine_ranges"))
    return {"qdq": result.artifacts["lowered"]["qdq"], "calib_s": calib, "total_s": total}


def run_ort(case: Case, method: str, per_channel: bool, workdir: Path) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches(case.calib, case.batch, case.input_name))

        def get_next(self):
            return next(self.items, None)

    out = workdir / f"ort_{method}_{per_channel}.onnx"
    start = time.perf_counter()
    quantize_static(str(case.model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))
    total = time.perf_counter() - start
    first = ort_calibration_time(case, method, workdir)
    calib = median_seconds(lambda: ort_calibration_time(case, method, workdir), first)
    return {"qdq": out, "calib_s": calib, "total_s": total}


def median_seconds(measure: Callable[[], float], first: float, short: float = 1.0, runs: int = 5) -> float:
    """``first`` or, for a run under ``short`` seconds, the median of ``runs`` runs: 50 ms
    calibrations move ~30% from run to run, which one sample would hand to either side."""
    if first >= short:
        return first
    return float(np.median([first] + [measure() for _ in range(runs - 1)]))


def ort_calibration_time(case: Case, method: str, workdir: Path) -> float:
    """Calibration alone (augment, collect, compute ranges), as ORT's quantize_static does it."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator
    start = time.perf_counter()
    calibrator = create_calibrator(str(case.model), augmented_model_path=str(workdir / f"aug_{method}.onnx"),
                                   calibrate_method=getattr(CalibrationMethod, method))
    feeds = cycled_batches(case) if case.calib_count else batches(case.calib, case.batch, case.input_name)

    class Reader:
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    calibrator.collect_data(Reader())
    calibrator.compute_data()
    return time.perf_counter() - start


def evaluate_case(case: Case, quick: bool, refine: bool = True) -> list[dict]:
    rows = []
    reference = predict(case.model, case)
    warm_up(case)
    variants = [(a, {}, False) for a in (["ifmr", "percentile"] if quick else OURS)]
    variants += [(a, o, False) for a, o in TUNED]
    variants += [(a, o, True) for a, o in REFINED] if refine else []
    peaks: dict[str, dict] = {}       # calibration peak RSS per calibrator, measured once in a child process

    def peak_mb(algorithm: str):
        if algorithm not in peaks:
            peaks[algorithm] = measure_memory(case.key, algorithm, 0, block_outputs=True)
        return peaks[algorithm].get("peak_rss_mb")

    for algorithm, options, refine in variants:
        label = (f"ours {algorithm}" + "".join(f" {k}={v}" for k, v in options.items()) + (" + refine" if refine else "")
                 + (" (default)" if algorithm == "ifmr" and not refine else ""))
        try:
            got = run_ours(case, algorithm, refine, options)
            got["calib_s"] = median_seconds(lambda: run_ours(case, algorithm, refine, options)["calib_s"],
                                            got["calib_s"])
        except Exception as exc:  # a failing variant is a row, not a crash
            rows.append({"model": case.name, "variant": label, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        rows.append(_row(case, label, got, reference))
        if not refine:               # options such as the percentile do not change what is kept
            rows[-1]["peak_mb"] = peak_mb(algorithm)
        print(rows[-1], file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for method in (["MinMax", "Percentile"] if quick else ORT_METHODS):
            for per_channel in (True, False):
                label = f"ORT {method} {'per-channel' if per_channel else 'per-tensor'}"
                try:
                    got = run_ort(case, method, per_channel, Path(tmp))
                    rows.append(_row(case, label, got, reference))
                    rows[-1]["peak_mb"] = peak_mb(f"ORT {method}")
                    print(rows[-1], file=sys.stderr, flush=True)
                except Exception as exc:
                    rows.append({"model": case.name, "variant": label, "error": f"{type(exc).__name__}: {exc}"[:200]})
    return rows


def warm_up(case: Case) -> None:
    """One untimed calibration each side: the first run in a process pays for imports and first-use
    setup (tens of ms), which would decide the comparison on a model that calibrates in 50 ms."""
    run_ours(case, "ifmr", False)
    with tempfile.TemporaryDirectory() as tmp:
        ort_calibration_time(case, "MinMax", Path(tmp))


def _row(case, label, got, reference) -> dict:
    row = {"model": case.name, "variant": label, "calib_s": round(got["calib_s"], 3)}
    try:
        quantized = predict(got["qdq"], case)
    except Exception as exc:
        row["error"] = f"onnxruntime cannot run the QDQ model: {type(exc).__name__}: {str(exc)[:120]}"
        return row
    row.update({k: round(v, 4) for k, v in score(reference, quantized, case.labels).items()})
    for b in (1, 8):
        ratio = speedup(case.model, got["qdq"], case, b)
        if ratio:
            row[f"speedup_b{b}"] = round(ratio, 2)
    return row


# -------------------------------------------------------------------------------------------
# speed: our default QDQ model and ONNX Runtime's, timed in ONE interleaved loop

def speed_table(case: Case, rounds: int = 60) -> list[dict]:
    """Speed-up over float of our default QDQ model and ORT's QDQ models at batch 1 and 8.

    Every model runs in one ``median_times`` loop, so each ratio uses the same float timings. Also
    counts the integer kernels in onnxruntime's optimized graph."""
    models = {"ours ifmr (default)": run_ours(case, "ifmr", False)["qdq"]}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("MinMax", "Percentile"):
            for per_channel in (True, False):
                label = f"ORT {method} {'per-channel' if per_channel else 'per-tensor'}"
                try:
                    models[label] = onnx.load(str(run_ort(case, method, per_channel, Path(tmp))["qdq"]))
                except Exception as exc:
                    print(f"{label}: {exc}", file=sys.stderr)
        rows = {}
        for label, model in list(models.items()):
            try:
                rows[label] = {"model": case.name, "variant": label, **integer_ops(model, Path(tmp))}
            except Exception as exc:     # e.g. ORT's per-channel models of old opsets do not load
                print(f"{label}: onnxruntime cannot load it: {str(exc).splitlines()[0][:160]}", file=sys.stderr)
                del models[label]
    for batch in (1, 8):
        if case.fixed_batch and batch != 1:
            continue
        sessions = {"float": session_for(case.model), **{k: session_for(m) for k, m in models.items()}}
        times = median_times(sessions, {case.input_name: np.ascontiguousarray(case.evaluate[:batch])}, rounds)
        for label in models:
            rows[label][f"ms_b{batch}"] = round(1e3 * times[label], 2)
            rows[label][f"speedup_b{batch}"] = round(times["float"] / times[label], 3)
            rows[label][f"float_ms_b{batch}"] = round(1e3 * times["float"], 2)
    return list(rows.values())


def integer_ops(model: onnx.ModelProto, tmp: Path) -> dict:
    """Counts of integer kernels (and float Conv left) in onnxruntime's optimized graph."""
    session_for(model, optimized_path=tmp / "optimized.onnx")
    ops: dict[str, int] = {}
    for node in onnx.load(str(tmp / "optimized.onnx")).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    keep = ("QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm", "QLinearMatMul", "Conv", "FusedConv")
    return {"ops": " ".join(f"{k}={ops[k]}" for k in keep if k in ops), "nodes": sum(ops.values())}


# -------------------------------------------------------------------------------------------
# memory: each measurement in a fresh child process

def measure_memory(case_name: str, algorithm: str, images: int, block_outputs: bool = False) -> dict:
    """Peak RSS and time of one calibration in a fresh process; ``images`` 0: the case's own batches."""
    code = [sys.executable, __file__, "--_child", case_name, algorithm, str(images), str(int(block_outputs))]
    done = subprocess.run(code, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_memory(case_name: str, algorithm: str, images: int, block_outputs: bool) -> None:
    (case,) = load_cases([case_name])
    case.calib_count = images       # batches cycle over the calibration images: data memory stays flat
    start = time.perf_counter()
    if algorithm.startswith("ORT "):
        with tempfile.TemporaryDirectory() as tmp:
            ort_calibration_time(case, algorithm.split()[1], Path(tmp))
    else:
        run_ours_calibration_only(case, algorithm, block_outputs)
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "seconds": round(time.perf_counter() - start, 2)}))


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux keeps ``ru_maxrss`` across exec, so a child of a large parent
    would report the parent's size; ``VmHWM`` belongs to the process's own memory map."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours_calibration_only(case: Case, algorithm: str, block_outputs: bool) -> None:
    import amct_pipeline as ap
    session = ap.Session(load_entrypoints=False)
    feeds = cycled_batches(case) if case.calib_count else batches(case.calib, case.batch, case.input_name)
    calibrate = f"calibrate{{algorithm={algorithm} dataset=calib block_outputs={str(block_outputs).lower()}}}"
    session.build(f"fuse_bn,match_layers,{calibrate}", datasets=["calib"]).run(str(case.model),
                                                                              datasets={"calib": feeds})


def memory_table(case_name: str) -> list[dict]:
    rows = []
    for algorithm in OURS + [f"ORT {m}" for m in ORT_METHODS]:
        small, large = measure_memory(case_name, algorithm, 16), measure_memory(case_name, algorithm, 128)
        row = {"model": case_name, "calibrator": algorithm, "rss_16_mb": small.get("peak_rss_mb"),
               "rss_128_mb": large.get("peak_rss_mb"), "s_16": small.get("seconds"), "s_128": large.get("seconds")}
        if row["rss_16_mb"] and row["rss_128_mb"]:
            row["growth"] = round(row["rss_128_mb"] / row["rss_16_mb"], 3)
        rows.append(row)
        print(row, file=sys.stderr)
    return rows


# -------------------------------------------------------------------------------------------

def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        child_memory(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2,mnist,resnet8,superres,ultraface")
    parser.add_argument("--quick", action="store_true", help="fewer variants")
    parser.add_argument("--no-refine", action="store_true", help="skip the (slow) output-aware refinement rows")
    parser.add_argument("--memory", action="store_true", help="measure calibration peak RSS (16 vs 128 images)")
    parser.add_argument("--speed", action="store_true", help="QDQ speed-ups of ours and ORT's in one interleaved loop")
    parser.add_argument("--rounds", type=int, default=60, help="timed runs of each model in --speed")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.speed:
        rows = [row for case in load_cases(args.models.split(",")) for row in speed_table(case, args.rounds)]
        print(markdown(rows, ["model", "variant", "speedup_b1", "speedup_b8", "ms_b1", "ms_b8", "float_ms_b1",
                              "float_ms_b8", "nodes", "ops"]))
    elif args.memory:
        rows = memory_table(args.models.split(",")[0])
        print(markdown(rows, ["model", "calibrator", "rss_16_mb", "rss_128_mb", "growth", "s_16", "s_128"]))
    else:
        rows = []
        for case in load_cases(args.models.split(",")):
            print(f"== {case.name}", file=sys.stderr)
            rows += evaluate_case(case, args.quick, refine=not args.no_refine)
        print(markdown(rows, ["model", "variant", "top1", "top1_float", "agreement", "sqnr_db", "calib_s", "peak_mb",
                              "speedup_b1", "speedup_b8", "error"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    import logging
    logging.disable(logging.WARNING)      # onnxruntime.quantization logs every step at WARNING
    os.environ.setdefault("AMCT_PIPELINE_DISABLE_PLUGIN_AUTOLOAD", "1")
    sys.exit(main())
