#!/usr/bin/env python
"""Peak memory of `fuse_bn` + `save` on an ONNX model over 2 GB with external data.

    python benchmarks/large_model.py [--size-gb 2.2] [--layers 6] [--workdir DIR] [--json out.json] [--keep]

1. Builds, without ever holding the weights in memory, a chain of Conv(3x3)+BatchNormalization+Relu
   layers (then GlobalAveragePool, Flatten, Gemm+BatchNormalization) whose weights are written chunk
   by chunk into one external-data file and referenced by offset/length. The ModelProto is a few KB.
2. Runs ``amct-pipeline run pipelines/fuse_bn.yaml --model M --output-dir OUT -q`` in a child process
   and measures its peak RSS (``os.wait4`` rusage; /proc/PID/status is polled as a cross-check) and
   wall time. The same pipeline on a tiny model gives the fixed cost (interpreter + imports).
3. Checks the output: one ``.onnx`` plus its ``.data`` file, no staging leftovers, no
   BatchNormalization left, the fused weights/biases of a few channels equal the BN formula
   (read straight from both data files), and onnxruntime gives the same outputs on both models.
   Each onnxruntime run is a child process too; its peak RSS after creating the InferenceSession
   is the side-by-side reference ("ORT session").

Sizes are GiB (2**30 bytes): protobuf's limit, which forces external data, is 2 GiB. The target
(issue 2) is peak RSS of the pipeline run <= 2.5x the model's size.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

GIB = 1 << 30
ALIGN = 4096                       # page-aligned offsets (lets runtimes mmap the data)
CHUNK_ELEMENTS = 1 << 24           # 64 MB of float32 per write while building
EPS = 1e-5
GEMM_OUT = 256
SPATIAL = 3                        # input is [1, C, 3, 3]: every tap of the 3x3 kernel is used
REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 2.5


# -- building the model ------------------------------------------------------------------------
class DataWriter:
    """Appends tensors to one external-data file; returns TensorProto stubs that point at them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = path.name
        self.handle = open(path, "wb")

    def _pad(self) -> int:
        offset = self.handle.tell()
        pad = (-offset) % ALIGN
        if pad:
            self.handle.write(b"\0" * pad)
        return offset + pad

    def _stub(self, name: str, dims: tuple[int, ...], offset: int, length: int):
        import onnx
        tensor = onnx.TensorProto()
        tensor.name, tensor.data_type = name, onnx.TensorProto.FLOAT
        tensor.dims.extend(dims)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def random(self, name: str, dims: tuple[int, ...], rng: np.random.Generator, std: float):
        """N(0, std²) float32 values, generated and written CHUNK_ELEMENTS at a time."""
        offset = self._pad()
        left = int(np.prod(dims, dtype=np.int64))
        while left:
            n = min(left, CHUNK_ELEMENTS)
            block = rng.standard_normal(n, dtype=np.float32)
            block *= np.float32(std)
            self.handle.write(memoryview(block).cast("B"))
            left -= n
        return self._stub(name, dims, offset, self.handle.tell() - offset)

    def array(self, name: str, values: np.ndarray):
        offset = self._pad()
        values = np.ascontiguousarray(values, dtype=np.float32)
        self.handle.write(values.tobytes())
        return self._stub(name, values.shape, offset, values.nbytes)

    def close(self) -> None:
        self.handle.close()


def channels_for(size_bytes: int, layers: int) -> int:
    """Conv width C so that ``layers`` weights of [C, C, 3, 3] float32 add up to ``size_bytes``."""
    per_layer = size_bytes / layers
    c = int((per_layer / (9 * 4)) ** 0.5)
    return max(8, c - c % 8)


def build_model(path: Path, size_bytes: int, layers: int, seed: int = 0) -> dict:
    """Write ``path`` and ``path.data``; nothing bigger than one chunk is ever in memory."""
    import onnx
    from onnx import TensorProto, helper

    c = channels_for(size_bytes, layers)
    rng = np.random.default_rng(seed)
    data = DataWriter(path.with_name(path.name + ".data"))
    initializers, nodes = [], []

    def bn(prefix: str, x: str, y: str, channels: int) -> None:
        params = {
            "scale": rng.uniform(0.5, 1.5, channels),
            "bias": rng.normal(0.0, 0.1, channels),
            "mean": rng.normal(0.0, 0.1, channels),
            "var": rng.uniform(0.5, 1.5, channels),
        }
        initializers.extend(data.array(f"{prefix}.{k}", v) for k, v in params.items())
        nodes.append(helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in params], [y],
                                      name=f"{prefix}", epsilon=EPS))

    try:
        x = "input"
        for i in range(layers):
            w = data.random(f"conv{i}.weight", (c, c, 3, 3), rng, std=(2.0 / (c * 9)) ** 0.5)
            initializers += [w, data.array(f"conv{i}.bias", rng.normal(0.0, 0.05, c))]
            nodes.append(helper.make_node("Conv", [x, w.name, f"conv{i}.bias"], [f"conv{i}_out"], name=f"conv{i}",
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            bn(f"bn{i}", f"conv{i}_out", f"bn{i}_out", c)
            nodes.append(helper.make_node("Relu", [f"bn{i}_out"], [f"relu{i}_out"], name=f"relu{i}"))
            x = f"relu{i}_out"
        nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
        nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
        w = data.random("fc.weight", (GEMM_OUT, c), rng, std=(1.0 / c) ** 0.5)
        initializers += [w, data.array("fc.bias", rng.normal(0.0, 0.05, GEMM_OUT))]
        nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["fc_out"], name="fc", transB=1))
        bn("bn_fc", "fc_out", "output", GEMM_OUT)
    finally:
        data.close()
    graph = helper.make_graph(
        nodes, "large_conv_bn_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, SPATIAL, SPATIAL])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, GEMM_OUT])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="large_model.py")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))   # by path: the checker never loads the external data
    return {"channels": c, "layers": layers, "bn": layers + 1, "proto_bytes": path.stat().st_size,
            "data_bytes": data.path.stat().st_size}


# -- measuring child processes -----------------------------------------------------------------
def _vm(pid: int | str, field: str) -> int:
    """A /proc/PID/status memory field in bytes (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# The child is started by this minimal launcher, which forks and execs it and reports its rusage.
# Measuring through a launcher matters: on Linux a child's ru_maxrss starts at the RSS of the
# process it was forked from (the kernel keeps the pre-exec high-water mark), so spawning the
# command straight from this script would count this script's own memory.
LAUNCHER = r"""
import json, os, sys
report, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as handle:
    json.dump({"pid": pid, "maxrss_kb": usage.ru_maxrss, "status": status}, handle)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def _child_of(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(text[0]) if text else None


def measure(cmd: list[str], *, interval: float = 0.02) -> dict:
    """Run ``cmd``: wall time, peak RSS (wait4 rusage via LAUNCHER), /proc-polled peak as cross-check."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        report = Path(handle.name)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(report), *cmd],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    polled = {"peak": 0, "at": 0.0}
    done = threading.Event()

    def poll() -> None:
        child = None
        while not done.is_set():
            child = child or _child_of(proc.pid)
            rss = _vm(child, "VmRSS") if child else 0
            if rss > polled["peak"]:
                polled.update(peak=rss, at=time.perf_counter() - start)
            done.wait(interval)

    sampler = threading.Thread(target=poll, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate()
    finally:
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        info = json.loads(report.read_text()) if report.stat().st_size else {"maxrss_kb": 0}
        report.unlink(missing_ok=True)
    return {"cmd": cmd, "returncode": proc.returncode, "wall_s": wall, "peak_rss": info["maxrss_kb"] * 1024,
            "polled_peak_rss": polled["peak"], "polled_peak_at_s": polled["at"],
            "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace")}


def pipeline_cmd(model: Path, out_dir: Path) -> list[str]:
    exe = shutil.which("amct-pipeline") or str(Path(sys.executable).with_name("amct-pipeline"))
    if not Path(exe).exists():
        return [sys.executable, "-m", "amct_pipeline", "run", str(REPO / "pipelines/fuse_bn.yaml"),
                "--model", str(model), "--output-dir", str(out_dir), "-q"]
    return [exe, "run", str(REPO / "pipelines/fuse_bn.yaml"), "--model", str(model), "--output-dir", str(out_dir), "-q"]


def ort_child(model: str, feed: str, out: str, report: str) -> int:
    """Hidden mode: create an InferenceSession (timed, VmHWM after it), run once, save the output."""
    import onnxruntime as ort
    before = _vm("self", "VmHWM")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # test our fold, not ORT's
    start = time.perf_counter()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    created = time.perf_counter()
    after_session = _vm("self", "VmHWM")
    x = np.load(feed)
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    ran = time.perf_counter()
    np.save(out, y)
    Path(report).write_text(json.dumps({
        "import_peak_rss": before, "session_peak_rss": after_session, "run_peak_rss": _vm("self", "VmHWM"),
        "session_s": created - start, "run_s": ran - created}))
    return 0


def run_ort(model: Path, feed: Path, work: Path, tag: str) -> tuple[np.ndarray, dict]:
    out, report = work / f"ort_{tag}.npy", work / f"ort_{tag}.json"
    result = measure([sys.executable, __file__, "--ort-child", str(model), str(feed), str(out), str(report)])
    if result["returncode"] != 0:
        raise RuntimeError(f"onnxruntime on {model.name} failed:\n{result['stderr'][-2000:]}")
    info = json.loads(report.read_text())
    info.update(wall_s=result["wall_s"], peak_rss=result["peak_rss"])
    return np.load(out), info


# -- checking the output -----------------------------------------------------------------------
def _tensors(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def _read(tensor, base: Path, start: int = 0, count: int | None = None) -> np.ndarray:
    """float32 elements [start, start+count) of a tensor; external ones read straight from their file."""
    import onnx
    if tensor.data_location != onnx.TensorProto.EXTERNAL:      # small outputs are saved inline
        flat = onnx.numpy_helper.to_array(tensor).reshape(-1)
        return flat[start:None if count is None else start + count]
    info = {e.key: e.value for e in tensor.external_data}
    total = int(info["length"]) // 4
    count = total - start if count is None else count
    with open(base / info["location"], "rb") as handle:
        handle.seek(int(info.get("offset", 0)) + 4 * start)
        return np.fromfile(handle, dtype=np.float32, count=count)


def check_output(src: Path, out_dir: Path, expect_fused: int) -> dict:
    import onnx
    onnx_files = sorted(p.name for p in out_dir.glob("*.onnx"))
    leftovers = sorted(p.name for p in out_dir.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")
    assert len(onnx_files) == 1, f"expected one .onnx in {out_dir}, found {onnx_files}"
    out = out_dir / onnx_files[0]
    data_files = sorted(p.name for p in out_dir.iterdir() if p.name.endswith(".data"))
    before = onnx.load(str(src), load_external_data=False)
    after = onnx.load(str(out), load_external_data=False)
    bn_left = sum(n.op_type == "BatchNormalization" for n in after.graph.node)
    external = [t for t in after.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    ext_bytes = sum(int(e.value) for t in external for e in t.external_data if e.key == "length")
    # the BN formula on a few channels of every fused layer, read straight from both data files
    src_t, out_t = _tensors(before), _tensors(after)
    consumer = {n.input[1]: n for n in after.graph.node if n.op_type in ("Conv", "Gemm")}
    worst_w = worst_b = 0.0
    checked = 0
    for node in before.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        prefix = node.name
        bn_name = "bn_fc" if node.op_type == "Gemm" else "bn" + prefix[len("conv"):]
        gamma, beta, mean, var = (_read(src_t[f"{bn_name}.{k}"], src.parent).astype(np.float64)
                                  for k in ("scale", "bias", "mean", "var"))
        s = gamma / np.sqrt(var + EPS)
        w_src = src_t[node.input[1]]
        fused_node = consumer[node.input[1]] if node.input[1] in consumer else None
        assert fused_node is not None, f"weight {node.input[1]} of {prefix} not found in the output"
        w_out, b_out = out_t[fused_node.input[1]], out_t[fused_node.input[2]]
        row = int(np.prod(w_src.dims[1:]))
        bias_src = _read(src_t[node.input[2]], src.parent).astype(np.float64)
        worst_b = max(worst_b, float(np.max(np.abs(_read(b_out, out.parent) - ((bias_src - mean) * s + beta)))))
        for ch in sorted({0, len(s) // 2, len(s) - 1}):
            expect = _read(w_src, src.parent, ch * row, row).astype(np.float64) * s[ch]
            got = _read(w_out, out.parent, ch * row, row)
            worst_w = max(worst_w, float(np.max(np.abs(got - expect)) / max(np.max(np.abs(expect)), 1e-30)))
            checked += 1
    return {
        "output": str(out), "output_proto_bytes": out.stat().st_size,
        "output_data_files": data_files, "output_bytes": sum((out_dir / f).stat().st_size for f in data_files)
        + out.stat().st_size, "external_tensors": len(external), "external_bytes": ext_bytes,
        "locations": sorted(locations), "leftovers": leftovers, "bn_before": sum(
            n.op_type == "BatchNormalization" for n in before.graph.node), "bn_left": bn_left,
        "bn_expected_fused": expect_fused, "formula_rows_checked": checked,
        "formula_max_rel_err_weight": worst_w, "formula_max_abs_err_bias": worst_b,
        "ok": (bn_left == 0 and len(data_files) == 1 and locations == {data_files[0]} and not leftovers
               and worst_w <= 1e-6 and worst_b <= 1e-5),
    }


# -- driver ------------------------------------------------------------------------------------
def fmt_gib(n: float) -> str:
    return f"{n / GIB:.3f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--ort-child":
        return ort_child(*argv[1:5])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.2, help="weights to generate, GiB (default 2.2)")
    parser.add_argument("--layers", type=int, default=6, help="Conv+BN layers (default 6)")
    parser.add_argument("--workdir", help="where to build the model (default: a new temp dir, deleted after)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the built model and the output")
    parser.add_argument("--no-ort", action="store_true", help="skip the onnxruntime runs")
    args = parser.parse_args(argv)

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="amct-large-"))
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=root))
    results: dict = {"target_ratio": TARGET_RATIO}
    try:
        model = work / "large.onnx"
        t0 = time.perf_counter()
        info = build_model(model, int(args.size_gb * GIB), args.layers)
        info["build_s"] = time.perf_counter() - t0
        model_bytes = info["proto_bytes"] + info["data_bytes"]
        results["model"] = {**info, "bytes": model_bytes, "gib": model_bytes / GIB}
        print(f"built {model} ({fmt_gib(model_bytes)} GiB, C={info['channels']}, {info['layers']} Conv+BN "
              f"+ Gemm+BN) in {info['build_s']:.1f}s", file=sys.stderr)

        # fixed cost: the same pipeline on a tiny model (interpreter, onnx, numpy, plugins)
        tiny = work / "tiny" / "tiny.onnx"
        tiny.parent.mkdir()
        build_model(tiny, 8 * 8 * 9 * 4, 1)
        base = measure(pipeline_cmd(tiny, work / "tiny_out"))
        if base["returncode"] != 0:
            raise RuntimeError(f"pipeline failed on the tiny model:\n{base['stderr']}")
        results["baseline"] = {"peak_rss": base["peak_rss"], "wall_s": base["wall_s"]}

        out_dir = work / "out"
        run = measure(pipeline_cmd(model, out_dir))
        if run["returncode"] != 0:
            raise RuntimeError(f"pipeline failed (exit {run['returncode']}):\n{run['stderr'][-4000:]}")
        results["amct"] = {k: run[k] for k in ("wall_s", "peak_rss", "polled_peak_rss", "polled_peak_at_s")}
        results["amct"]["ratio"] = run["peak_rss"] / model_bytes
        results["amct"]["ratio_above_baseline"] = (run["peak_rss"] - base["peak_rss"]) / model_bytes
        print(f"amct-pipeline: {run['wall_s']:.1f}s, peak RSS {fmt_gib(run['peak_rss'])} GiB", file=sys.stderr)

        check = check_output(model, out_dir, info["bn"])
        results["output"] = check

        if not args.no_ort:
            c = info["channels"]
            feed = work / "feed.npy"
            np.save(feed, np.random.default_rng(1).standard_normal((1, c, SPATIAL, SPATIAL), dtype=np.float32))
            y_ref, ort_in = run_ort(model, feed, work, "input")
            y_out, ort_out = run_ort(Path(check["output"]), feed, work, "output")
            rel = float(np.max(np.abs(y_ref - y_out)) / max(float(np.max(np.abs(y_ref))), 1e-30))
            results["ort"] = {"input_model": ort_in, "output_model": ort_out, "max_rel_diff": rel,
                              "session_ratio": ort_in["session_peak_rss"] / model_bytes,
                              "run_ratio": ort_in["peak_rss"] / model_bytes,
                              "amct_vs_ort": run["peak_rss"] / ort_in["peak_rss"]}
            check["numerics_ok"] = rel <= 1e-4
            check["ok"] = check["ok"] and check["numerics_ok"]
        results["pass"] = bool(check["ok"] and results["amct"]["ratio"] <= TARGET_RATIO)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(root, ignore_errors=True)

    print(table(results))
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if results["pass"] else 1


def table(r: dict) -> str:
    m, a, o = r["model"], r["amct"], r["output"]
    rows = [
        ("model size (GiB)", fmt_gib(m["bytes"]), f"{m['layers']}x Conv[{m['channels']}x{m['channels']}x3x3]+BN+Relu, Gemm+BN"),
        ("amct-pipeline peak RSS (GiB)", fmt_gib(a["peak_rss"]), f"fuse_bn.yaml, wait4 rusage (polled {fmt_gib(a['polled_peak_rss'])})"),
        ("ratio peak / model", f"{a['ratio']:.2f}", f"target <= {r['target_ratio']}"),
        ("ratio (peak - fixed cost) / model", f"{a['ratio_above_baseline']:.2f}",
         f"fixed cost = peak on a tiny model, {fmt_gib(r['baseline']['peak_rss'])} GiB"),
        ("wall time (s)", f"{a['wall_s']:.1f}", f"fixed cost {r['baseline']['wall_s']:.1f} s"),
        ("BN fused", f"{o['bn_before'] - o['bn_left']}/{o['bn_before']}", f"{o['bn_left']} left"),
        ("output size (GiB)", fmt_gib(o["output_bytes"]), f"{o['external_tensors']} external tensors in {', '.join(o['output_data_files'])}"),
        ("fused weight vs BN formula", f"{o['formula_max_rel_err_weight']:.1e}", f"{o['formula_rows_checked']} channels, max rel err"),
    ]
    if "ort" in r:
        ort, ref = r["ort"], r["ort"]["input_model"]
        rows += [
            ("ORT peak RSS, InferenceSession + 1 run (GiB)", fmt_gib(ref["peak_rss"]),
             f"input model: ratio {ort['run_ratio']:.2f} of model; session {ref['session_s']:.1f} s + run {ref['run_s']:.1f} s"),
            ("ORT peak RSS after InferenceSession only (GiB)", fmt_gib(ref["session_peak_rss"]),
             f"ratio {ort['session_ratio']:.2f} (ORT maps external data; pages are read on first run)"),
            ("amct-pipeline peak / ORT peak", f"{ort['amct_vs_ort']:.2f}", "fuse_bn+save vs. load+run"),
            ("ORT output rel diff (fused vs original)", f"{ort['max_rel_diff']:.1e}", "max|a-b| / max|a|, tol 1e-4"),
        ]
    rows.append(("result", "PASS" if r["pass"] else "FAIL", ""))
    lines = ["| metric | value | notes |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
