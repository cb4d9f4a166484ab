"""PTQ benchmark: our pipelines against ONNX Runtime's quantize_static and Intel NNCF, in one run.

    python benchmarks/ptq.py                       # every model, accuracy + latency tables
    python benchmarks/ptq.py --models mobilenetv2,detector --json ptq.json
    python benchmarks/ptq.py --memory              # peak RSS of calibration, 16 vs 128 images
    python benchmarks/ptq.py --speed --models mobilenetv2   # QDQ speed-ups only, more rounds

NNCF is a benchmark-only peer: ``pip install -r benchmarks/requirements-peers.txt`` (nncf==3.4.0);
without it the NNCF rows are skipped, and the run says so.

Per model and variant: top-1 accuracy (where labels exist), top-1 agreement with the float
model, output SQNR (dB; the detector also per part: boxes, objectness, classes; our variants also
of the fake-quant model, which the Ascend deploy model equals, in ``sqnr_fakequant_db``), calibration wall
time (median of 5 when under 1 s), peak calibration memory (a fresh process per variant), and the
QDQ model's onnxruntime speed-up over the float model at batch 1 and 8: our default model, NNCF's and
ORT's QDQ models and the float model run in ONE interleaved loop per batch size (shuffled each
round, medians), so every ratio uses the same float timings. A summary table gives our default and
best variants against the best peer of each kind (differences and ratios). Reads models and data
from ../shared (skips what is missing); the ShuffleNetV2-style detector is built in code
(amct_pipeline.testing.detector) and runs on the ImageNet images resized to 320 x 320.

Adding one of our variants is one line in OUR_VARIANTS: a label and the passes between
match_layers and lower, in the textual pipeline form.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import resource
import shutil
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
ORT_METHODS = ["MinMax", "Entropy", "Percentile"]


@dataclass(frozen=True)
class Ours:
    """One of our variants: ``steps`` are the passes between ``match_layers`` and ``lower`` (the textual
    form), ``before`` those between ``fuse_bn`` and ``match_layers``; ``@name`` runs a shipped pipeline
    as it is. ``quick``: also in --quick runs."""

    label: str
    steps: str
    quick: bool = False
    before: str = ""
    timed: bool = False      # also in the interleaved speed loop (the default always is)

    @property
    def slow(self) -> bool:
        return "refine_ranges" in self.steps


PRESET = "@ptq_int8"
BLOCKS = "block_outputs=true"           # the layer / Add / pooling / Concat outputs the QDQ layout quantizes
EQUALIZE = "equalize_channels{dataset=calib max_samples=16}"
ARQ, BIAS = "quantize_weights{algorithm=arq}", "quantize_weights{algorithm=arq bias_correction=true max_samples=16}"
SEQUENTIAL = "quantize_weights{algorithm=arq bias_correction=true bias_correction_input=sequential max_samples=16}"
Q70 = f"calibrate{{algorithm=sample_quantile algorithm_options={{quantile=0.7}} {BLOCKS}}}"
# One line per variant; the "step" rows build the default one step at a time (README table).
OUR_VARIANTS = [
    Ours("ours ptq_int8 (default)", PRESET, quick=True),
    Ours("ours ptq_int8_amct (AMCT IFMR)", "@ptq_int8_amct", quick=True),
    Ours("ours ptq_int8_accurate", "@ptq_int8_accurate", quick=True, timed=True),
    Ours("ours ptq_int8_mse", "@ptq_int8_mse", quick=True),
    # the QDQ model quantizing only the layer inputs, as the fake-quant model does: residual skips
    # stay float (slower: onnxruntime cannot fuse the Adds)
    Ours("ours mse_clip, layer inputs only", "calibrate{algorithm=sample_quantile algorithm_options={quantile=0.7}},"
         "quantize_weights{algorithm=mse_clip}", quick=True, before=EQUALIZE),
    Ours("step: mean_minmax", f"calibrate{{algorithm=mean_minmax {BLOCKS}}},{ARQ}", quick=True),
    Ours("step: sample_quantile 0.7", f"{Q70},{ARQ}", quick=True),
    Ours("step: + equalize_channels", f"{Q70},{ARQ}", quick=True, before=EQUALIZE),
    Ours("step: mean_minmax + equalize + bias correction", f"calibrate{{algorithm=mean_minmax {BLOCKS}}},{BIAS}",
         before=EQUALIZE),
    Ours("step: default + sequential bias correction", f"{Q70},{SEQUENTIAL}", quick=True, before=EQUALIZE),
    Ours("ours ifmr", f"calibrate{{algorithm=ifmr {BLOCKS}}},{ARQ}"),
    Ours("ours hfmg", f"calibrate{{algorithm=hfmg {BLOCKS}}},{ARQ}"),
    Ours("ours minmax", f"calibrate{{algorithm=minmax {BLOCKS}}},{ARQ}"),
    Ours("ours percentile", f"calibrate{{algorithm=percentile {BLOCKS}}},{ARQ}"),
    Ours("ours entropy", f"calibrate{{algorithm=entropy {BLOCKS}}},{ARQ}"),
    Ours("ours mse", f"calibrate{{algorithm=mse {BLOCKS}}},{ARQ}"),
    Ours("ours percentile 99.99", f"calibrate{{algorithm=percentile algorithm_options={{percentile=99.99}} {BLOCKS}}},"
                                  f"{ARQ}"),
    Ours("ours ifmr + refine", f"calibrate{{algorithm=ifmr {BLOCKS}}},{ARQ},refine_ranges"),
]
DEFAULT = OUR_VARIANTS[0].label
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
    parts: dict[str, slice] | None = None    # SQNR per slice of the last output axis, besides the whole


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
        "detector": _detector_case,
    }
    cases = []
    for name in names:
        try:
            cases.append(builders[name]())
            cases[-1].key = name
        except FileNotFoundError as exc:
            print(f"skipping {name}: missing {exc.filename}", file=sys.stderr)
    return cases


DETECTOR_SIZE = 320


def _detector_case() -> Case:
    """The ShuffleNetV2-style detector (built in code, written next to the benchmark's temp files) on
    the ImageNet images resized to 320 x 320, RGB / 255; first 100 calibrate, the other 150 evaluate."""
    from amct_pipeline.testing.detector import DETECTOR_INPUT, detector_parts, shufflenet_detector
    model = shufflenet_detector(size=DETECTOR_SIZE)
    images, _ = _imagenet()                   # read first: a missing file skips the case
    folder = tempfile.mkdtemp(prefix="amct_ptq_bench_")
    atexit.register(shutil.rmtree, folder, True)
    path = Path(folder) / "shufflenet_detector.onnx"
    onnx.save(model, str(path))
    classes = model.graph.output[0].type.tensor_type.shape.dim[2].dim_value - 5
    return Case("shufflenet_detector", path, DETECTOR_INPUT, *_split((_resized(images, DETECTOR_SIZE), None), 100),
                batch=16, fixed_batch=False, parts=detector_parts(classes))


def _resized(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW / 255, bilinear (half-pixel centres) to size x size."""
    def taps(out: int, size_in: int):
        pos = np.clip((np.arange(out) + 0.5) * size_in / out - 0.5, 0, size_in - 1)
        low = np.floor(pos).astype(int)
        return low, np.minimum(low + 1, size_in - 1), (pos - low).astype(np.float32)
    _, height, width, _ = images.shape
    y0, y1, fy = taps(size, height)
    x0, x1, fx = taps(size, width)
    out = np.empty((len(images), 3, size, size), np.float32)
    for start in range(0, len(images), 25):            # a slice at a time: bounded scratch memory
        img = images[start:start + 25].astype(np.float32) / 255.0
        rows = img[:, y0] * (1 - fy)[None, :, None, None] + img[:, y1] * fy[None, :, None, None]
        cols = rows[:, :, x0] * (1 - fx)[None, None, :, None] + rows[:, :, x1] * fx[None, None, :, None]
        out[start:start + 25] = cols.transpose(0, 3, 1, 2)
    return out


def _split(data, count: int):
    x, labels = data
    return x[:count], x[count:], (None if labels is None else labels[count:])


def _mnist():
    data = np.load(SHARED / "data" / "mnist_test10k_uint8.npz")
    return data["images_uint8"][:, None].astype(np.float32), data["labels"]


def _cifar():
    """The 212 images in a fixed shuffled order: the file is sorted by label, so its first 100 hold 3 of
    the 10 classes and calibrating (or retraining) on them says little about the other 112."""
    data = np.load(SHARED / "data" / "cifar_like212_32_uint8.npz")
    order = np.random.default_rng(0).permutation(len(data["labels"]))
    return data["images_nchw_float_0_255"][order].astype(np.float32), data["labels"][order]


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


def score(reference: list[np.ndarray], quantized: list[np.ndarray], labels, parts=None) -> dict:
    ref = np.concatenate([r.reshape(len(r), -1) for r in reference], axis=1).astype(np.float64)
    got = np.concatenate([q.reshape(len(q), -1) for q in quantized], axis=1).astype(np.float64)
    out = {"sqnr_db": _sqnr(ref, got)}
    for part, cut in (parts or {}).items():
        out[f"sqnr_{part}_db"] = _sqnr(reference[0][..., cut], quantized[0][..., cut])
    logits_ref, logits_q = reference[0].reshape(len(reference[0]), -1), quantized[0].reshape(len(quantized[0]), -1)
    if logits_ref.shape[1] > 1 and reference[0].ndim == 2:
        out["agreement"] = float(np.mean(logits_ref.argmax(1) == logits_q.argmax(1)))
        if labels is not None:
            out["top1"] = float(np.mean(logits_q.argmax(1) == labels))
            out["top1_float"] = float(np.mean(logits_ref.argmax(1) == labels))
    return out


def _sqnr(reference, got) -> float:
    reference, got = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    noise = np.sum((reference - got) ** 2)
    return float(10 * np.log10(np.sum(reference ** 2) / max(noise, 1e-30)))


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
# variants: ours, ONNX Runtime's, NNCF's

def our_pipeline(session, variant: Ours, lower: str = "lower{targets=[qdq,fakequant]}"):
    return session.build(our_text(variant, lower), datasets=["calib"])


def our_text(variant: Ours, lower: str = "lower{targets=[qdq,fakequant]}") -> str:
    """The variant's pipeline text (a shipped pipeline's name for ``@name``)."""
    if variant.steps.startswith("@"):
        return variant.steps[1:]
    before = f"{variant.before}," if variant.before else ""
    return f"fuse_bn,{before}match_layers,{variant.steps},{lower}"


def run_ours(case: Case, variant: Ours) -> dict:
    """``calib_s``: every pass before ``lower`` (what computes the factors); ``total_s``: the whole run."""
    import amct_pipeline as ap
    from amct_pipeline.pipeline.instruments import Timing
    timing = Timing()
    start = time.perf_counter()
    result = our_pipeline(ap.Session(load_entrypoints=False), variant).run(
        str(case.model), datasets={"calib": batches(case.calib, case.batch, case.input_name)}, instruments=[timing])
    total = time.perf_counter() - start
    calib, lowering = 0.0, False
    for label, seconds in timing.times:
        lowering = lowering or label.endswith(":lower")
        calib += 0.0 if lowering else seconds
    return {"qdq": result.artifacts["lowered"]["qdq"], "fakequant": result.artifacts["lowered"].get("fakequant"),
            "calib_s": calib, "total_s": total}


def ort_quantize(case: Case, method: str, per_channel: bool, workdir: Path, activations: str = "QUInt8") -> Path:
    """ONNX Runtime's quantize_static (QDQ, int8 weights, ``activations`` a QuantType name) into ``workdir``.
    16-bit activations make it write an opset-21 copy beside its input: it then reads a copy in ``workdir``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches(case.calib, case.batch, case.input_name))

        def get_next(self):
            return next(self.items, None)

    model = case.model
    if activations != "QUInt8":
        model = workdir / Path(case.model).name
        shutil.copyfile(case.model, model)
    out = workdir / f"ort_{method}_{per_channel}_{activations}.onnx"
    with contextlib.redirect_stdout(sys.stderr):         # its calibrators print progress
        quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=getattr(QuantType, activations), weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
    return out


def ort_predict(case: Case, method: str, workdir: Path, activations: str = "QUInt8") -> tuple[list, bool]:
    """(outputs on the evaluation set, per_channel) of ONNX Runtime's quantize_static model: per-channel
    weights, or per tensor where ORT cannot load its own per-channel model (mnist-8)."""
    for per_channel in (True, False):
        out = ort_quantize(case, method, per_channel, workdir, activations)
        try:
            return predict(str(out), case), per_channel
        except Exception:
            if not per_channel:
                raise
    raise AssertionError("unreachable")


def run_ort(case: Case, method: str, per_channel: bool, workdir: Path) -> dict:
    start = time.perf_counter()
    out = ort_quantize(case, method, per_channel, workdir)
    total = time.perf_counter() - start
    first = ort_calibration_time(case, method, workdir)
    calib = median_seconds(lambda: ort_calibration_time(case, method, workdir), first)
    return {"qdq": out, "calib_s": calib, "total_s": total}


def nncf_available() -> str | None:
    """None when NNCF can run, else why not (the rows are skipped and the run says so)."""
    try:
        import nncf  # noqa: F401
    except Exception as exc:       # not installed, or broken
        return (f"NNCF not installed ({type(exc).__name__}); pip install -r benchmarks/requirements-peers.txt "
                "(nncf==3.4.0) to compare against it")
    return None


def run_nncf(case: Case, workdir: Path) -> dict:
    """``nncf.quantize`` on the ONNX model with its defaults (8-bit, mixed preset, fast bias correction),
    the same calibration images one sample at a time (a fixed batch: that batch); a model below opset
    13 is upgraded to 13 first (inside the timed part). ``calib_s``: the whole call (statistics, its
    algorithms, its graph edits)."""
    import logging
    import nncf
    logging.getLogger("nncf").setLevel(logging.ERROR)
    size = case.batch if case.fixed_batch else 1
    items = batches(case.calib, size, case.input_name)
    model = onnx.load(str(case.model))
    start = time.perf_counter()
    if model.opset_import[0].version < 13:            # NNCF refuses opsets < 10 (mnist-8, UltraFace)
        from onnx import version_converter
        model = version_converter.convert_version(model, 13)
    with contextlib.redirect_stdout(sys.stderr):         # progress bars
        quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items) * size)
    seconds = time.perf_counter() - start
    out = workdir / "nncf.onnx"
    onnx.save(quantized, str(out))
    return {"qdq": out, "calib_s": seconds, "total_s": seconds}


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

    with contextlib.redirect_stdout(sys.stderr):
        calibrator.collect_data(Reader())
        calibrator.compute_data()
    return time.perf_counter() - start


# the QDQ models timed in the one interleaved loop (structure-identical variants run alike: our
# calibrator variants share one layout, ORT's Entropy / Percentile models MinMax's structure)
SPEED_ORT = [("MinMax", True), ("MinMax", False)]


def evaluate_case(case: Case, quick: bool, refine: bool = True, rounds: int = 60, memory: bool = True,
                  ort_methods: list[str] | None = None) -> list[dict]:
    rows: list[dict] = []
    reference = predict(case.model, case)
    warm_up(case)
    peaks: dict[str, dict] = {}       # calibration peak RSS per variant, measured once in a child process
    timed: dict[str, object] = {}     # label -> QDQ model, for the interleaved speed loop

    def peak_mb(kind: str, spec: str):
        if not memory:
            return None
        if (kind, spec) not in peaks:
            peaks[kind, spec] = measure_memory(case.key, kind, spec, 0)
        return peaks[kind, spec].get("peak_rss_mb")

    def add(label: str, run: Callable[[], dict], again: Callable[[], float] | None, kind: str, spec: str | None):
        try:
            got = run()
            if again is not None:
                got["calib_s"] = median_seconds(again, got["calib_s"])
        except Exception as exc:  # a failing variant is a row, not a crash
            rows.append({"model": case.name, "variant": label, "error": f"{type(exc).__name__}: {exc}"[:200]})
            print(rows[-1], file=sys.stderr, flush=True)
            return None
        rows.append(_row(case, label, got, reference))
        if spec is not None and "error" not in rows[-1]:
            rows[-1]["peak_mb"] = peak_mb(kind, spec)
        print(rows[-1], file=sys.stderr, flush=True)
        return got

    for variant in OUR_VARIANTS:
        if (quick and not variant.quick) or (variant.slow and not refine):
            continue
        got = add(variant.label, lambda: run_ours(case, variant), lambda: run_ours(case, variant)["calib_s"],
                  "ours", None if variant.slow else variant.label)
        if got is not None and (not timed or variant.timed):   # the default (another of ours if it failed)
            timed[variant.label] = got["qdq"]
    with tempfile.TemporaryDirectory() as tmp:
        for method in ort_methods or (["MinMax", "Percentile"] if quick else ORT_METHODS):
            for per_channel in (True, False):
                label = f"ORT {method} {'per-channel' if per_channel else 'per-tensor'}"
                got = add(label, lambda: run_ort(case, method, per_channel, Path(tmp)), None, "ort", method)
                if got is not None and (method, per_channel) in SPEED_ORT:
                    timed[label] = onnx.load(str(got["qdq"]))
        missing = nncf_available()
        if missing:
            print(f"{case.name}: skipping NNCF: {missing}", file=sys.stderr)
            rows.append({"model": case.name, "variant": "NNCF 3.4 defaults", "error": missing})
        else:
            got = add("NNCF 3.4 defaults", lambda: run_nncf(case, Path(tmp)), None, "nncf", "defaults")
            if got is not None:
                timed["NNCF 3.4 defaults"] = onnx.load(str(got["qdq"]))
        speed = speed_loop(case, timed, rounds, Path(tmp))
    for row in rows:
        row.update(speed.get(row["variant"], {}))
    return rows


def warm_up(case: Case) -> None:
    """One untimed calibration each side: the first run in a process pays for imports and first-use
    setup (tens of ms), which would decide the comparison on a model that calibrates in 50 ms."""
    run_ours(case, OUR_VARIANTS[1])
    with tempfile.TemporaryDirectory() as tmp:
        ort_calibration_time(case, "MinMax", Path(tmp))


def _row(case, label, got, reference) -> dict:
    row = {"model": case.name, "variant": label, "calib_s": round(got["calib_s"], 3),
           "total_s": round(got["total_s"], 3)}
    try:
        quantized = predict(got["qdq"], case)
    except Exception as exc:
        row["error"] = f"onnxruntime cannot run the QDQ model: {type(exc).__name__}: {str(exc)[:120]}"
        return row
    row.update({k: round(v, 4) for k, v in score(reference, quantized, case.labels, case.parts).items()})
    if got.get("fakequant") is not None:       # our Ascend layout: the deploy model computes what it computes
        emulated = score(reference, predict(got["fakequant"], case), case.labels)
        row["sqnr_fakequant_db"] = round(emulated["sqnr_db"], 4)
        if "agreement" in emulated:
            row["agreement_fakequant"] = round(emulated["agreement"], 4)
    return row


# -------------------------------------------------------------------------------------------
# speed: our default QDQ model, NNCF's, ORT's and the float model timed in ONE interleaved loop

def speed_loop(case: Case, models: dict, rounds: int, tmp: Path) -> dict[str, dict]:
    """Speed-up over float at batch 1 and 8 of every model in ``models`` (label -> QDQ model), all run
    in one ``median_times`` loop per batch size, plus the kernels onnxruntime's optimized graph keeps.
    A model onnxruntime cannot load is reported, not timed."""
    found: dict[str, dict] = {}
    for label, model in list(models.items()):
        try:
            found[label] = integer_ops(model, tmp)
        except Exception as exc:     # e.g. ORT's per-channel models of old opsets do not load
            print(f"{label}: onnxruntime cannot load it: {str(exc).splitlines()[0][:160]}", file=sys.stderr)
            models = {k: v for k, v in models.items() if k != label}
    for batch in (1, 8):
        if not models or (case.fixed_batch and batch != 1):
            continue
        sessions = {"float": session_for(case.model), **{k: session_for(m) for k, m in models.items()}}
        times = median_times(sessions, {case.input_name: np.ascontiguousarray(case.evaluate[:batch])}, rounds)
        for label in models:
            found[label][f"ms_b{batch}"] = round(1e3 * times[label], 2)
            found[label][f"speedup_b{batch}"] = round(times["float"] / times[label], 3)
            found[label][f"float_ms_b{batch}"] = round(1e3 * times["float"], 2)
        print(f"{case.name} batch {batch}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in times.items()),
              file=sys.stderr, flush=True)
    return found


def speed_table(case: Case, rounds: int = 60) -> list[dict]:
    """--speed: only the models of the interleaved loop (our default, ORT MinMax, NNCF)."""
    models = {DEFAULT: run_ours(case, OUR_VARIANTS[0])["qdq"]}
    with tempfile.TemporaryDirectory() as tmp:
        for method, per_channel in SPEED_ORT:
            label = f"ORT {method} {'per-channel' if per_channel else 'per-tensor'}"
            try:
                models[label] = onnx.load(str(run_ort(case, method, per_channel, Path(tmp))["qdq"]))
            except Exception as exc:
                print(f"{label}: {exc}", file=sys.stderr)
        missing = nncf_available()
        if missing:
            print(f"{case.name}: skipping NNCF: {missing}", file=sys.stderr)
        else:
            try:
                models["NNCF 3.4 defaults"] = onnx.load(str(run_nncf(case, Path(tmp))["qdq"]))
            except Exception as exc:
                print(f"NNCF: {exc}", file=sys.stderr)
        speed = speed_loop(case, models, rounds, Path(tmp))
    return [{"model": case.name, "variant": label, **values} for label, values in speed.items()]


def integer_ops(model, tmp: Path) -> dict:
    """Integer kernels, float Conv and the Q/DQ nodes left in onnxruntime's optimized graph."""
    session_for(model, optimized_path=tmp / "optimized.onnx")
    ops: dict[str, int] = {}
    for node in onnx.load(str(tmp / "optimized.onnx")).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    keep = ("QLinearConv", "QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool", "QGemm", "QLinearMatMul",
            "Conv", "FusedConv", "Concat")
    return {"ops": " ".join(f"{k}={ops[k]}" for k in keep if k in ops), "nodes": sum(ops.values()),
            "qdq_left": ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0)}


# -------------------------------------------------------------------------------------------
# memory: each measurement in a fresh child process

def measure_memory(case_name: str, kind: str, spec: str, images: int) -> dict:
    """Peak RSS and time of one calibration in a fresh process; ``kind``: ours (``spec``: a variant
    label), ort (a method) or nncf; ``images`` 0: the case's own batches."""
    code = [sys.executable, __file__, "--_child", case_name, kind, spec, str(images)]
    done = subprocess.run(code, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_memory(case_name: str, kind: str, spec: str, images: int) -> None:
    (case,) = load_cases([case_name])
    case.calib_count = images       # batches cycle over the calibration images: data memory stays flat
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "ort":
            ort_calibration_time(case, spec, Path(tmp))
        elif kind == "nncf":
            if images:
                case.calib = np.stack([case.calib[i % len(case.calib)] for i in range(images)])
            run_nncf(case, Path(tmp))
        else:
            run_ours_calibration_only(case, next(v for v in OUR_VARIANTS if v.label == spec))
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


def run_ours_calibration_only(case: Case, variant: Ours) -> None:
    """The variant's passes up to (not including) lower."""
    import amct_pipeline as ap
    session = ap.Session(load_entrypoints=False)
    feeds = cycled_batches(case) if case.calib_count else batches(case.calib, case.batch, case.input_name)
    text = our_text(variant, "")
    if variant.steps.startswith("@"):
        text = session.build(text, datasets=["calib"]).text
    text = text.split(",lower{")[0].rstrip(",")
    session.build(text, datasets=["calib"]).run(str(case.model), datasets={"calib": feeds})


MEMORY_VARIANTS = ["ours ifmr", "ours hfmg", "ours minmax", "ours percentile", "ours entropy", "ours mse"]


def memory_table(case_name: str) -> list[dict]:
    rows = []
    points = [("ours", label) for label in [DEFAULT] + MEMORY_VARIANTS]
    points += [("ort", method) for method in ORT_METHODS]
    points += [] if nncf_available() else [("nncf", "defaults")]
    for kind, spec in points:
        small, large = measure_memory(case_name, kind, spec, 16), measure_memory(case_name, kind, spec, 128)
        label = {"ours": spec, "ort": f"ORT {spec}", "nncf": "NNCF 3.4 defaults"}[kind]
        row = {"model": case_name, "calibrator": label, "rss_16_mb": small.get("peak_rss_mb"),
               "rss_128_mb": large.get("peak_rss_mb"), "s_16": small.get("seconds"), "s_128": large.get("seconds")}
        if row["rss_16_mb"] and row["rss_128_mb"]:
            row["growth"] = round(row["rss_128_mb"] / row["rss_16_mb"], 3)
        rows.append(row)
        print(row, file=sys.stderr)
    return rows


# -------------------------------------------------------------------------------------------
# summary: our default and best against the best peer of each kind

def summary(rows: list[dict]) -> list[dict]:
    """Per model: our default, our best (highest SQNR), ORT's best and NNCF, with our default's
    differences and ratios against each peer (SQNR dB, agreement points, calibration time, speed-up)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        good = [r for r in rows if r["model"] == model and "sqnr_db" in r]
        ours = [r for r in good if r["variant"].startswith("ours")]
        default = next((r for r in ours if r["variant"] == DEFAULT), None)
        if default is None:
            continue
        picks = {"ours default": default, "ours best": max(ours, key=lambda r: r["sqnr_db"])}
        ort = [r for r in good if r["variant"].startswith("ORT")]
        if ort:
            picks["ORT best"] = max(ort, key=lambda r: r["sqnr_db"])
        nncf = [r for r in good if r["variant"].startswith("NNCF")]
        if nncf:
            picks["NNCF"] = nncf[0]
        for role, row in picks.items():
            entry = {"model": model, "role": role, "variant": row["variant"]}
            for key in ("sqnr_db", "agreement", "top1", "calib_s", "speedup_b1", "speedup_b8"):
                if row.get(key) is not None:
                    entry[key] = row[key]
            if role not in ("ours default", "ours best"):
                entry["default_minus_peer_db"] = round(default["sqnr_db"] - row["sqnr_db"], 3)
                if "agreement" in default and "agreement" in row:
                    entry["default_minus_peer_agreement"] = round(default["agreement"] - row["agreement"], 4)
                entry["calib_time_ratio"] = round(default["calib_s"] / max(row["calib_s"], 1e-9), 3)
                for batch in (1, 8):
                    key = f"speedup_b{batch}"
                    if default.get(key) and row.get(key):
                        entry[f"speedup_ratio_b{batch}"] = round(default[key] / row[key], 3)
            out.append(entry)
    return out


# -------------------------------------------------------------------------------------------

def markdown(rows: list[dict], columns: list[str]) -> str:
    columns = [c for c in columns if any(row.get(c) is not None for row in rows)]
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


MAIN_COLUMNS = ["model", "variant", "top1", "top1_float", "agreement", "sqnr_db", "sqnr_fakequant_db",
                "agreement_fakequant", "sqnr_boxes_db",
                "sqnr_objectness_db", "sqnr_classes_db", "calib_s", "total_s", "peak_mb", "speedup_b1", "speedup_b8",
                "qdq_left", "error"]
SPEED_COLUMNS = ["model", "variant", "speedup_b1", "speedup_b8", "ms_b1", "ms_b8", "float_ms_b1", "float_ms_b8",
                 "nodes", "qdq_left", "ops"]
SUMMARY_COLUMNS = ["model", "role", "variant", "sqnr_db", "agreement", "top1", "calib_s", "speedup_b1", "speedup_b8",
                   "default_minus_peer_db", "default_minus_peer_agreement", "calib_time_ratio", "speedup_ratio_b1",
                   "speedup_ratio_b8"]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        child_memory(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2,mnist,resnet8,superres,ultraface,detector")
    parser.add_argument("--quick", action="store_true", help="fewer variants")
    parser.add_argument("--no-refine", action="store_true", help="skip the (slow) output-aware refinement rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant peak memory children")
    parser.add_argument("--memory", action="store_true", help="measure calibration peak RSS (16 vs 128 images)")
    parser.add_argument("--speed", action="store_true", help="only the QDQ speed-ups, in one interleaved loop")
    parser.add_argument("--rounds", type=int, default=60, help="timed runs of each model in the speed loop")
    parser.add_argument("--ort", help="ORT calibration methods, e.g. MinMax (default: all; --quick: MinMax,Percentile; "
                                      "Percentile and Entropy hold every activation in memory: ~10 GB on the detector)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    missing = nncf_available()
    if missing and not args.memory:
        print(f"note: {missing}", file=sys.stderr)
    result: dict = {}
    if args.speed:
        rows = [row for case in load_cases(args.models.split(",")) for row in speed_table(case, args.rounds)]
        print(markdown(rows, SPEED_COLUMNS))
        result["speed"] = rows
    elif args.memory:
        rows = memory_table(args.models.split(",")[0])
        print(markdown(rows, ["model", "calibrator", "rss_16_mb", "rss_128_mb", "growth", "s_16", "s_128"]))
        result["memory"] = rows
    else:
        rows = []
        for case in load_cases(args.models.split(",")):
            print(f"== {case.name}", file=sys.stderr)
            rows += evaluate_case(case, args.quick, refine=not args.no_refine, rounds=args.rounds,
                                  memory=not args.no_memory, ort_methods=args.ort.split(",") if args.ort else None)
        result["rows"], result["summary"] = rows, summary(rows)
        print(markdown(rows, MAIN_COLUMNS))
        print()
        print(markdown(result["summary"], SUMMARY_COLUMNS))
    if missing:
        result["note"] = missing
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    import logging
    logging.disable(logging.WARNING)      # onnxruntime.quantization logs every step at WARNING
    os.environ.setdefault("AMCT_PIPELINE_DISABLE_PLUGIN_AUTOLOAD", "1")
    sys.exit(main())
