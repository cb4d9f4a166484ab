"""Decomposition benchmark: every method, data-free and data-aware, at several targets, on three real models.

    python benchmarks/decompose.py                          # all models, markdown + JSON on stdout
    python benchmarks/decompose.py --models mnist --json decompose.json --plot plots/
    python benchmarks/decompose.py --quick                  # one target per model (smoke run)
    python benchmarks/decompose.py --models mnist super_resolution --methods tucker2 spatial_svd   # the goals

Targets are shared out by sensitivity (the decompose pass's allocation); layers reading fewer than
8 channels stay whole. Per point: FLOPs of the decomposed convs before/after (SPEC 8.2), their
MACs reduction (weights x output pixels, from onnx shape inference), the quality figure (output SQNR
in dB on evaluation images; top-1 accuracy for MNIST; top-1 agreement with the float model for
ResNet-8), decomposition wall time, and onnxruntime latency of the whole model against the
original (median of repeated runs, measured alternately, single thread; ratio < 1 = faster).

Data (from ../shared): super-resolution: Y channel (0.299R + 0.587G + 0.114B)/255 of
imagenet_dev250_224_uint8.npz, first 32 images calibrate, the next 100 evaluate; ResNet-8:
cifar_like212_32_uint8.npz raw pixels, first 32 calibrate, the other 180 evaluate; MNIST:
mnist_test10k_uint8.npz raw pixels 0..255, the last 64 images calibrate, the first 9,900 evaluate.
"""
from __future__ import annotations

import os

# Small BLAS calls (SVD, ALS) slow down by 10-50x when OpenBLAS threads fight onnxruntime's and
# other processes' threads on a small machine; one thread is faster here and steadier to time.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
METHODS = ("spatial_svd", "tucker2", "cp")


# -- models and data ---------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    model: Path
    input_name: str
    calib: list[dict[str, np.ndarray]]       # calibration feeds (batches)
    evaluate: np.ndarray                     # evaluation inputs [N, ...]
    labels: Optional[np.ndarray]             # accuracy when given, else agreement + SQNR
    eval_batch: int
    latency_batch: int
    targets: tuple[float, ...]
    passes_before: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)   # decompose options every point shares
    latency_repeats: int = 200


def _batches(x: np.ndarray, name: str, size: int) -> list[dict[str, np.ndarray]]:
    return [{name: x[i:i + size]} for i in range(0, len(x), size)]


def super_resolution() -> Case:
    images = np.load(SHARED / "data" / "imagenet_dev250_224_uint8.npz")["images_nhwc_uint8"][:132]
    y = (images[..., 0] * 0.299 + images[..., 1] * 0.587 + images[..., 2] * 0.114) / 255.0
    y = y.astype(np.float32)[:, None]
    # the 1-channel input conv stays whole (min_in_channels); the target is shared out by sensitivity
    # over the three others (the two 3x3 middle convs carry 93 % of the FLOPs)
    return Case("super_resolution_op15", SHARED / "models" / "super_resolution_op15.onnx", "input",
                _batches(y[:32], "input", 8), y[32:132], None, 10, 1, (0.4, 0.3),
                options={"rules": "basic"}, latency_repeats=15)


def resnet8() -> Case:
    data = np.load(SHARED / "data" / "cifar_like212_32_uint8.npz")
    x = data["images_nchw_float_0_255"].astype(np.float32)
    return Case("resnet8_cifar10_bn", SHARED / "models" / "resnet8_cifar10_bn.onnx", "input",
                _batches(x[:32], "input", 8), x[32:], None, 60, 8, (0.8, 0.6),
                passes_before=["fuse_bn"], options={"rules": "basic"})


def mnist() -> Case:
    data = np.load(SHARED / "data" / "mnist_test10k_uint8.npz")
    x = data["images_uint8"].astype(np.float32)[:, None]
    # conv 1 has one input channel (left whole by min_in_channels); conv 2 (5x5, 8->16) fails AMCT's
    # channel rules, so the seed's basic rules are used
    return Case("mnist-8", SHARED / "models" / "mnist-8.onnx", "Input3", _batches(x[-64:], "Input3", 1),
                x[:9900], data["labels"][:9900], 1, 1, (0.6, 0.5, 0.45, 0.4),
                options={"rules": "basic"}, latency_repeats=400)


CASES: dict[str, Callable[[], Case]] = {"super_resolution": super_resolution, "resnet8": resnet8, "mnist": mnist}


# -- measuring ---------------------------------------------------------------------------------
def _session(model: onnx.ModelProto, threads: int = 1):
    """Single-thread sessions time steadily on a small shared machine; evaluation may use them all."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def outputs(model: onnx.ModelProto, case: Case) -> np.ndarray:
    session = _session(model, threads=0)
    parts = [session.run(None, {case.input_name: case.evaluate[i:i + case.eval_batch]})[0]
             for i in range(0, len(case.evaluate), case.eval_batch)]
    return np.concatenate(parts)


def quality(reference: np.ndarray, approx: np.ndarray, labels: Optional[np.ndarray]) -> dict[str, float]:
    noise = float(np.sum((reference.astype(np.float64) - approx) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    out = {"sqnr_db": 10 * np.log10(signal / noise) if noise else float("inf")}
    if reference.ndim == 2:
        out["agreement"] = float(np.mean(reference.argmax(1) == approx.argmax(1)) * 100)
        if labels is not None:
            out["accuracy"] = float(np.mean(approx.argmax(1) == labels) * 100)
    return out


def latency_ratio(original: onnx.ModelProto, decomposed: onnx.ModelProto, case: Case) -> dict[str, float]:
    """Median run time of each model, measured in alternating rounds so drift hits both alike."""
    feed = {case.input_name: case.evaluate[:case.latency_batch]}
    sessions = [_session(original), _session(decomposed)]
    for session in sessions:
        for _ in range(3):
            session.run(None, feed)
    times: list[list[float]] = [[], []]
    for _ in range(2 * case.latency_repeats):
        for which, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            times[which].append(time.perf_counter() - start)
    base, ours = statistics.median(times[0]), statistics.median(times[1])
    return {"latency_ms_original": base * 1e3, "latency_ms": ours * 1e3, "latency_ratio": ours / base}


def conv_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates of every Conv, weights x output pixels (shapes from onnx shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.output)}
    weights = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return {n.name: weights[n.input[1]] * int(np.prod(shapes[n.output[0]][2:]))
            for n in model.graph.node if n.op_type == "Conv"}


def macs_reduction(original: onnx.ModelProto, decomposed: onnx.ModelProto) -> Optional[float]:
    """MACs of the convs that were decomposed, before / after (their children)."""
    before, after = conv_macs(original), conv_macs(decomposed)
    gone = [name for name in before if name not in after]
    children = sum(v for name, v in after.items() if name not in before)
    return sum(before[name] for name in gone) / children if children else None


# -- one point ---------------------------------------------------------------------------------
def run_point(session, case: Case, original: onnx.ModelProto, reference: np.ndarray, method: str,
              aware: bool, target: Optional[float], timings: dict[tuple, dict[str, float]]) -> dict[str, Any]:
    options = dict(case.options, method=method, report=False, info_file=None)
    if target is not None:                 # else the method's rank rule (spatial_svd: AMCT's EVBMF rule)
        options["target"] = target
    if aware:
        options.update(data_aware=True, dataset="calib")
    passes = [session.make_pass(name) for name in case.passes_before] + [session.make_pass("decompose", **options)]
    start = time.perf_counter()
    result = session.pipeline(passes).run(original, datasets={"calib": case.calib} if aware else None)
    seconds = time.perf_counter() - start
    report = result.artifacts["decomposition"].report
    point: dict[str, Any] = {
        "model": case.name, "method": method, "mode": "data-aware" if aware else "data-free",
        "target": target, "layers": {layer.name: list(layer.rank) for layer in report.layers},
        "flops_before": report.total("flops_before"), "flops_after": report.total("flops_after"),
        "flops_reduction": report.flops_reduction, "params_reduction": report.params_reduction,
        "decompose_s": seconds}
    if not report.layers:
        return point
    point["macs_reduction"] = macs_reduction(original, result.model)
    point.update(quality(reference, outputs(result.model, case), case.labels))
    # data-free and data-aware points of one target share the graph structure (only weights
    # differ): time it once, with twice the repeats, and report that figure for both
    shape = (case.name, method, target, tuple(map(tuple, point["layers"].values())))
    if shape not in timings:
        timings[shape] = latency_ratio(original, result.model, case)
    point.update(timings[shape])
    return point


def run_case(session, case: Case, quick: bool, methods=METHODS) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    original = onnx.load(str(case.model))
    reference = outputs(original, case)
    baseline = {"model": case.name, **quality(reference, reference, case.labels)}
    targets = case.targets[:1] if quick else case.targets
    points, timings = [], {}
    for method in methods:
        plan = [None] if method == "spatial_svd" and not quick else []
        for target in [*targets, *plan]:
            for aware in (False, True):
                point = run_point(session, case, original, reference, method, aware, target, timings)
                points.append(point)
                print(_one_line(point), file=sys.stderr, flush=True)
    return baseline, points


# -- output ------------------------------------------------------------------------------------
def _one_line(point: dict[str, Any]) -> str:
    target = "rule" if point["target"] is None else f"{point['target']:g}"
    return (f"{point['model']:22} {point['method']:11} {point['mode']:10} target {target:5} "
            f"x{point.get('flops_reduction') or 0:.2f} sqnr {point.get('sqnr_db', float('nan')):.2f} "
            f"lat {point.get('latency_ratio', float('nan')):.3f} ({point['decompose_s']:.1f}s)")


def goals(baselines: list[dict[str, Any]], points: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's figures: mnist-8 tucker2 (data-aware) at the largest FLOPs reduction within 0.5
    points of float top-1; super-resolution points with >= 28 dB at >= 2.5x fewer MACs."""
    base = {b["model"]: b for b in baselines}
    out: dict[str, Any] = {}
    mnist = [p for p in points if p["model"] == "mnist-8" and p["method"] == "tucker2" and p["mode"] == "data-aware"
             and "accuracy" in p and p["accuracy"] >= base["mnist-8"]["accuracy"] - 0.5]
    if mnist:
        best = max(mnist, key=lambda p: p["flops_reduction"])
        out["mnist-8 tucker2"] = {"target": best["target"], "flops_reduction": best["flops_reduction"],
                                  "accuracy": best["accuracy"], "float_accuracy": base["mnist-8"]["accuracy"]}
    sr = [p for p in points if p["model"] == "super_resolution_op15" and (p.get("macs_reduction") or 0) >= 2.5
          and p.get("sqnr_db", 0) >= 28]
    if sr:
        best = max(sr, key=lambda p: p["macs_reduction"])
        out["super_resolution"] = {k: best[k] for k in ("method", "mode", "target", "macs_reduction", "sqnr_db")}
    return out


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(baselines: list[dict[str, Any]], points: list[dict[str, Any]]) -> str:
    lines = ["| model | method | mode | target | ranks | FLOPs (M) before → after | FLOPs x | MACs x | quality | "
             "vs float | latency ratio | decompose s |", "|" + "---|" * 12]
    base = {b["model"]: b for b in baselines}
    for p in points:
        label, value, ref = _quality_label(p, base[p["model"]])
        ranks = ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in p["layers"].items()) or "none"
        flops = f"{p['flops_before'] / 1e6:,.1f} → {p['flops_after'] / 1e6:,.1f}" if p["flops_after"] else "n/a"
        target = "AMCT rule" if p["target"] is None else p["target"]
        lines.append(f"| {p['model']} | {p['method']} | {p['mode']} | {target} | {ranks} | {flops} | "
                     f"{_fmt(p.get('flops_reduction'), '.2f')} | {_fmt(p.get('macs_reduction'), '.2f')} | "
                     f"{label} {value} | {ref} | "
                     f"{_fmt(p.get('latency_ratio'), '.3f')} | {p['decompose_s']:.1f} |")
    return "\n".join(lines)


def _quality_label(point: dict[str, Any], baseline: dict[str, Any]) -> tuple[str, str, str]:
    if "accuracy" in point:
        return "top-1 %", f"{point['accuracy']:.2f}", f"{point['accuracy'] - baseline['accuracy']:+.2f} pt"
    if "agreement" in point:
        return "SQNR dB", f"{point['sqnr_db']:.2f}", f"agree {point['agreement']:.1f} %"
    return "SQNR dB", _fmt(point.get("sqnr_db"), ".2f"), ""


def plots(directory: Path, baselines: list[dict[str, Any]], points: list[dict[str, Any]]) -> None:
    from amct_pipeline.reports.plot import plot_tradeoff
    directory.mkdir(parents=True, exist_ok=True)
    for baseline in baselines:
        mine = [p for p in points if p["model"] == baseline["model"] and p.get("flops_reduction")]
        key = "accuracy" if "accuracy" in baseline else "sqnr_db"
        series: dict[str, list[tuple[float, float]]] = {}
        for p in mine:
            series.setdefault(f"{p['method']} {p['mode']}", []).append((1 / p["flops_reduction"], p[key]))
        plot_tradeoff(series, directory / f"{baseline['model']}_decompose.png",
                      ylabel="top-1 accuracy (%)" if key == "accuracy" else "output SQNR (dB)",
                      baseline=baseline.get("accuracy"), title=f"{baseline['model']}: quality vs FLOPs kept")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument("--quick", action="store_true", help="one target per model, no rule points")
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--json", help="also write the JSON to this file")
    parser.add_argument("--plot", help="write one PNG per model into this directory (needs matplotlib)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from amct_pipeline.session import Session
    session = Session(load_entrypoints=False)
    baselines, points = [], []
    for name in args.models:
        try:
            case = CASES[name]()
        except FileNotFoundError as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        baseline, mine = run_case(session, case, args.quick, args.methods)
        baselines.append(baseline)
        points += mine
    result = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "cpus": os.cpu_count()}, "baselines": baselines, "points": points,
              "goals": goals(baselines, points)}
    print(markdown(baselines, points))
    print("\n".join(f"- {name}: {json.dumps(value, default=float)}" for name, value in result["goals"].items()))
    print(json.dumps(result, indent=1, default=float))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float) + "\n")
    if args.plot:
        plots(Path(args.plot), baselines, points)
    return 0


if __name__ == "__main__":
    sys.exit(main())
