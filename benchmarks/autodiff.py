"""Autodiff engine benchmark: forward + backward of MobileNetV2 (whole and block by block) in numpy.

    python benchmarks/autodiff.py                       # batch 8, 3 timed repeats, one BLAS thread
    python benchmarks/autodiff.py --threads 2 --json autodiff.json
    python benchmarks/autodiff.py --quick               # batch 2, one repeat: a smoke run

Every configuration runs in a fresh child process, so its peak memory (VmHWM, the resident high-water
mark of that process alone) is its own. Configurations:

* ``inference``: the engine's forward without recording, next to onnxruntime's (same thread count,
  graph optimisations on) on the same batch: the ratio says what numpy costs;
* ``train weights``: forward + backward with every Conv / MatMul weight trainable;
* ``train W8A8 (ULQ + arq_retrain)``: the retrain form: a ULQ fake quantizer (learnable clip_max /
  clip_min) in front of every Conv / MatMul and arq_retrain on every weight; clips, weights trainable;
* ``blocks``: the 17 three-layer blocks ``Program.blocks(3)`` finds, each trained alone (weights
  trainable) on the previous block's output: the block-by-block mode retraining uses.

Timings are the median (and min) of the repeats after one warm-up. Reads MobileNetV2 and the ImageNet
sample from ../shared (random inputs when the images are missing; the model is required).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "mobilenetv2_fp32.onnx"
IMAGES = SHARED / "data" / "imagenet_dev250_224_uint8.npz"
CONFIGS = ["inference", "train_weights", "train_w8a8", "blocks"]
TITLES = {"inference": "inference (forward only)", "train_weights": "train weights (fwd + bwd)",
          "train_w8a8": "train W8A8: ULQ + arq_retrain (fwd + bwd)", "blocks": "17 blocks, one at a time (fwd + bwd)"}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> dict:
    fn()                                      # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0]}


def load_input(batch: int):
    import numpy as np
    if IMAGES.exists():
        images = np.load(IMAGES)["images_nhwc_uint8"][:batch].astype(np.float32) / 255.0
        x = (images - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
        return x.transpose(0, 3, 1, 2).copy(), "imagenet_dev250 images"
    return np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32), "random normal"


def layer_nodes(program):
    return [n for n in program.nodes if n.op_type in ("Conv", "MatMul") and n.inputs[1] in program.constants]


def child(config: str, batch: int, repeats: int, threads: int) -> dict:
    import numpy as np
    from amct_pipeline.autodiff import ULQ, ARQRetrain, Executor, Program
    program = Program.from_graph(MODEL)
    x, source = load_input(batch)
    feeds = {program.inputs[0]: x}
    result = {"config": config, "batch": batch, "input": source}
    if config == "inference":
        exe = Executor(program)
        result["engine"] = timed(lambda: exe.run(feeds), repeats)
        from amct_pipeline.runtime.ort import make_session
        session = make_session(str(MODEL), threads=threads)
        result["onnxruntime"] = timed(lambda: session.run(None, feeds), repeats)
        ref = session.run(None, feeds)[0]
        result["max_rel_error_vs_ort"] = float(np.abs(exe.run(feeds)[0] - ref).max() / np.abs(ref).max())
    elif config in ("train_weights", "train_w8a8"):
        params = [n.inputs[1] for n in layer_nodes(program)]
        if config == "train_w8a8":
            ranges = Executor(program).forward(feeds, keep=[n.inputs[0] for n in layer_nodes(program)], grad=False)
            for node in layer_nodes(program):
                data, weight = node.inputs[0], node.inputs[1]
                hi = program.add_constant(f"{node.name}.clip_max", np.float32(max(float(ranges[data].max()), 1e-3)))
                lo = program.add_constant(f"{node.name}.clip_min", np.float32(min(float(ranges[data].min()), -1e-3)))
                program.insert(ULQ(8), [data, hi, lo], consumers=[node.name])
                program.insert(ARQRetrain(8, 0 if node.op_type == "Conv" else None), [weight], consumers=[node.name])
                params += [hi, lo]
            del ranges
        exe = Executor(program, params=params)

        def step():
            out = exe.forward(feeds)
            exe.backward({k: np.ones_like(v) / v.size for k, v in out.items()})

        exe.forward(feeds)        # warm-up
        forward_only = timed(lambda: exe.forward(feeds), repeats)
        result["saved_for_backward_mb"] = exe.saved_nbytes() / 2 ** 20
        result["engine"] = timed(step, repeats)
        result["forward_with_recording"] = forward_only
        result["parameters"] = len(params)
    elif config == "blocks":
        blocks = program.blocks(3)
        rows = []
        current = dict(feeds)
        for index, (inputs, outputs) in enumerate(blocks):
            exe = Executor(program, inputs=inputs, outputs=outputs,
                           params=[t for n in program.subprogram(inputs, outputs).nodes
                                   if n.op_type in ("Conv", "MatMul") for t in n.inputs[1:2]])
            block_feeds = {t: current[t] for t in inputs}

            def step(exe=exe, block_feeds=block_feeds):
                out = exe.forward(block_feeds)
                exe.backward({k: np.ones_like(v) / v.size for k, v in out.items()})

            exe.forward(block_feeds)
            saved = exe.saved_nbytes() / 2 ** 20
            timing = timed(step, repeats)
            current = exe.forward(block_feeds, grad=False)
            rows.append({"block": index, "inputs": inputs, "outputs": outputs,
                         "layers": sum(1 for n in exe.program.nodes if n.op_type in ("Conv", "MatMul")),
                         "input_shape": list(block_feeds[inputs[0]].shape), "saved_for_backward_mb": saved,
                         **timing})
        result["blocks"] = rows
        result["engine"] = {"median_s": sum(r["median_s"] for r in rows), "min_s": sum(r["min_s"] for r in rows)}
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_child(config: str, args) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--child", config, "--batch", str(args.batch), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{config}: child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: list[dict], args) -> str:
    lines = [f"MobileNetV2, batch {args.batch}, {args.threads} BLAS thread(s), {args.repeats} timed repeats "
             f"(input: {results[0]['input']})", "",
             "| configuration | median s | min s | per image ms | vs onnxruntime forward | saved for backward MB "
             "| peak RSS MB |", "|---|---|---|---|---|---|---|"]
    ort = next((r["onnxruntime"]["median_s"] for r in results if "onnxruntime" in r), None)
    for r in results:
        e = r["engine"]
        ratio = f"{e['median_s'] / ort:.1f}x" if ort else ""
        saved = r.get("saved_for_backward_mb")
        if r["config"] == "blocks":
            saved = max(b["saved_for_backward_mb"] for b in r["blocks"])
            saved = f"{saved:.0f} (largest block)"
        else:
            saved = "" if saved is None else f"{saved:.0f}"
        lines.append(f"| {TITLES[r['config']]} | {e['median_s']:.3f} | {e['min_s']:.3f} | "
                     f"{1000 * e['median_s'] / args.batch:.0f} | {ratio} | {saved} | {r['peak_rss_mb']:.0f} |")
        if "onnxruntime" in r:
            o = r["onnxruntime"]
            lines.append(f"| onnxruntime forward | {o['median_s']:.3f} | {o['min_s']:.3f} | "
                         f"{1000 * o['median_s'] / args.batch:.0f} | 1.0x | | |")
    blocks = next((r for r in results if r["config"] == "blocks"), None)
    if blocks:
        lines += ["", "| block | layers | input shape | median s | min s | saved for backward MB |", "|---|---|---|---|---|---|"]
        for b in blocks["blocks"]:
            lines.append(f"| {b['block']} | {b['layers']} | {'x'.join(map(str, b['input_shape']))} | "
                         f"{b['median_s']:.3f} | {b['min_s']:.3f} | {b['saved_for_backward_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="BLAS / onnxruntime threads (default 1)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="batch 2, one repeat")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.repeats, args.threads)))
        return
    if args.quick:
        args.batch, args.repeats = 2, 1
    if not MODEL.exists():
        raise SystemExit(f"missing ../shared/models/{MODEL.name}")
    results = [run_child(c, args) for c in args.configs.split(",")]
    print(report(results, args))
    payload = {"batch": args.batch, "threads": args.threads, "repeats": args.repeats, "results": results}
    print(json.dumps(payload))
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
